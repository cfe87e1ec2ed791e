//! What a [`super::ServerDriver`]'s listening sockets receive, handled sans-IO: one handler per
//! verdict of the transport's dispatcher (`dispatch::sort`, docs/ARCHITECTURE.md §4.3). The
//! driver reads a datagram or a stream's frames, asks the dispatcher whose they are, and hands
//! them here; a handler feeds the CurveCP server and its own state and hands back what to send,
//! written into a buffer the driver owns ([`Reply`] for the UDP socket; a stream's replies are
//! gathered in [`StreamFrames`]). Sockets stay the driver's.
//!
//! - [`native_datagram`]: a native CurveCP packet, for the server.
//! - [`Compat::datagram`]: a 1tp session datagram, for the stateless accepting side; the
//!   CurveCP packets it carries go to the server on a [`Path::UdpCompat`].
//! - [`Nat::datagram`]: relay, punch and dial-back datagrams: packets a bound relay forwards
//!   (to the server, on a [`Path::Relayed`]), a relay's bind confirmation and our dial-back
//!   probe ([`NatEvent`]s), punch probes, and the relay role's traffic.
//! - [`StreamFrames::frame`]: the frames of an accepted TCP stream, whose first frame chooses
//!   the stream's framing.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use log::debug;

use super::relayed::ServerRelays;
use super::{Framing, NatEvent, Path};
use crate::curvecp::server::{ConnectionId, Server};
use crate::transport::dispatch::{self, Carrier, Handler};
use crate::transport::onetp::{self, Inbound, SocketPacket};
use crate::transport::relay::{self, Datagram};

/// [`NatEvent`]s kept for the application (older ones are dropped).
const MAX_NAT_EVENTS: usize = 64;

/// A datagram to send from the listening UDP socket in answer to one received.
pub(super) struct Reply<'b> {
    /// The datagram.
    pub(super) bytes: &'b [u8],
    /// Where it goes.
    pub(super) to: SocketAddr,
    /// What it is, for the log should it not be sent.
    pub(super) what: &'static str,
}

/// Counters of a [`super::ServerDriver`]'s compatibility framing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompatStats {
    /// 1tp session datagrams received (first byte 0x00-0x05).
    pub datagrams: u64,
    /// Compatibility datagrams and TCP frames dropped as malformed.
    pub dropped: u64,
    /// Replies of the accepting side sent (SYN_ACK, PONG, ACK) on UDP and TCP.
    pub replies: u64,
    /// Sessions reset by their peer (RST).
    pub resets: u64,
    /// TCP streams that chose the compatibility framing.
    pub tcp_streams: u64,
    /// TCP streams closed because their first frame chose no framing.
    pub tcp_refused: u64,
}

/// A native CurveCP packet from `from`: the server's. Returns its reply (a Cookie), written
/// into `reply`.
pub(super) fn native_datagram<'b>(
    server: &mut Server<Path>,
    reply: &'b mut [u8],
    d: &[u8],
    from: SocketAddr,
    now: Instant,
) -> Option<Reply<'b>> {
    let len = server.handle_packet(d, Path::Udp(from), now, reply)?;
    Some(Reply {
        bytes: &reply[..len],
        to: from,
        what: "Cookie",
    })
}

/// The compatibility framing's state on the UDP socket: counters, and the connection each
/// session carries (an RST ends it). The accepting side itself is stateless.
#[derive(Default)]
pub(super) struct Compat {
    /// Counters, on UDP and TCP.
    pub(super) stats: CompatStats,
    /// The connection each 1tp UDP session carries (for an RST).
    pub(super) sessions: HashMap<Path, ConnectionId>,
}

impl Compat {
    /// A 1tp session datagram from `from`: SYN answered by SYN_ACK, PING by PONG, FIN and RST
    /// by ACK (an RST also removes the connection its session carried), DATA's CurveCP packet
    /// to the server (its reply wrapped back); malformed ones dropped and counted. Returns the
    /// datagram to send back, written into `out` (the server's reply goes into `reply` first).
    pub(super) fn datagram<'b>(
        &mut self,
        server: &mut Server<Path>,
        reply: &mut [u8],
        out: &'b mut [u8],
        d: &[u8],
        from: SocketAddr,
        now: Instant,
    ) -> Option<Reply<'b>> {
        self.stats.datagrams += 1;
        let answer = |bytes, what| {
            Some(Reply {
                bytes,
                to: from,
                what,
            })
        };
        match onetp::accept_datagram(d, out) {
            Err(e) => {
                self.stats.dropped += 1;
                debug!("server: dropped a 1tp datagram from {from}: {e}");
                None
            }
            Ok(Inbound::Nothing) => None,
            Ok(Inbound::Reply(n)) => {
                self.stats.replies += 1;
                answer(&out[..n], "1tp reply")
            }
            Ok(Inbound::Reset { session, ack }) => {
                self.stats.replies += 1;
                self.stats.resets += 1;
                let path = Path::UdpCompat {
                    addr: from,
                    session,
                };
                if let Some(&id) = self.sessions.get(&path) {
                    debug!("server: 1tp session reset by {from}: its connection ends");
                    server.remove(id);
                }
                answer(&out[..ack], "1tp ACK")
            }
            Ok(Inbound::Packet { session, packet }) => {
                let path = Path::UdpCompat {
                    addr: from,
                    session,
                };
                let len = server.handle_packet(packet, path, now, reply)?;
                match onetp::wrap_udp(&session, &reply[..len], out) {
                    Some(m) => answer(&out[..m], "Cookie"),
                    None => {
                        debug!("server: a {len}-byte reply cannot be wrapped");
                        None
                    }
                }
            }
        }
    }
}

/// A server's part in NAT traversal, on its listening UDP socket: its relayed paths (the
/// relay role, the relays it holds a reservation with, its hole punches; none without the
/// `relay` feature), the dial-back probe it awaits, and what it learnt for the connection
/// manager.
#[derive(Default)]
pub(super) struct Nat {
    /// Relayed paths and punches.
    pub(super) relays: ServerRelays,
    /// What was learnt, for [`super::ServerDriver::poll_nat_event`] (at most
    /// [`MAX_NAT_EVENTS`]).
    pub(super) events: VecDeque<NatEvent>,
    /// The nonce of the dial-back probe we wait for.
    pub(super) dial_back: Option<[u8; relay::DIAL_BACK_NONCE_LEN]>,
    /// Who-is questions awaiting an answer (at most [`MAX_WHOIS`], the oldest forgotten).
    pub(super) whois: VecDeque<(SocketAddr, [u8; relay::WHO_NONCE_LEN])>,
}

/// Who-is questions awaited at once at most.
pub const MAX_WHOIS: usize = 32;

/// Keeps `event` for the application (dropping the oldest beyond [`MAX_NAT_EVENTS`]).
pub(super) fn push_event(events: &mut VecDeque<NatEvent>, event: NatEvent) {
    if events.len() >= MAX_NAT_EVENTS {
        events.pop_front();
    }
    events.push_back(event);
}

impl Nat {
    /// A relay-family datagram from `from`: the awaited dial-back probe becomes a
    /// [`NatEvent`]; anything else well-formed is the relayed paths' (`relayed.rs`), which
    /// answer or drop it; malformed ones are dropped. Returns the datagram to send, written
    /// into `out` (the server's reply goes into `reply` first).
    pub(super) fn datagram<'b>(
        &mut self,
        server: &mut Server<Path>,
        reply: &mut [u8],
        out: &'b mut [u8],
        d: &[u8],
        from: SocketAddr,
        now: Instant,
    ) -> Option<Reply<'b>> {
        match relay::parse(d) {
            Some(Datagram::DialBack(nonce)) if self.dial_back == Some(nonce) => {
                self.dial_back = None;
                push_event(&mut self.events, NatEvent::DialedBack { from });
                None
            }
            Some(Datagram::Iam { nonce, sign }) => {
                // Only the answer to a question of ours, from where we asked it.
                let i = self.whois.iter().position(|w| *w == (from, nonce))?;
                self.whois.remove(i);
                push_event(&mut self.events, NatEvent::RelayIs { addr: from, sign });
                None
            }
            Some(parsed) => {
                let bufs = (reply, out);
                let events = &mut self.events;
                self.relays
                    .datagram(server, bufs, d, parsed, from, now, events)
            }
            None => {
                debug!("server: dropped a relay datagram from {from}");
                None
            }
        }
    }
}

/// What the frames of one read of an accepted TCP stream asked for, gathered while the
/// stream's read buffer lends them out; the driver then answers ([`super::ServerDriver`]).
pub(super) struct StreamFrames {
    slot: usize,
    generation: u64,
    /// The stream's framing: as it was, or chosen by this read's first frame.
    pub(super) chosen: Option<Framing>,
    /// The first frame fitted neither framing: close the stream.
    pub(super) refused: bool,
    /// A PING arrived: answer with a PONG.
    pub(super) pong: bool,
    /// Compatibility frames dropped as malformed.
    pub(super) dropped: u64,
    /// The length of the server's last reply, written into the `reply` buffer.
    pub(super) reply: Option<usize>,
    /// A packet the server did not drop arrived (the stream is active).
    pub(super) valid: bool,
}

impl StreamFrames {
    /// Nothing read yet from the stream in `slot` (of `generation`), whose framing is `chosen`.
    pub(super) fn new(slot: usize, generation: u64, chosen: Option<Framing>) -> StreamFrames {
        StreamFrames {
            slot,
            generation,
            chosen,
            refused: false,
            pong: false,
            dropped: 0,
            reply: None,
            valid: false,
        }
    }

    /// One frame: the first one chooses the stream's framing ([`dispatch::sort`]); a native
    /// frame is a CurveCP packet, a compatibility frame a socket-layer packet (PING, PONG or
    /// DATA wrapping a CurveCP packet). The packet goes to the server, whose reply is written
    /// into `reply`.
    pub(super) fn frame(
        &mut self,
        server: &mut Server<Path>,
        reply: &mut [u8],
        frame: &[u8],
        now: Instant,
    ) {
        if self.refused {
            return;
        }
        let framing = match self.chosen {
            Some(f) => f,
            None => {
                let f = match dispatch::sort(Carrier::StreamStart, frame) {
                    Handler::Native => Framing::Native,
                    Handler::Compat => Framing::Compat,
                    Handler::Relay | Handler::Drop => {
                        self.refused = true;
                        return;
                    }
                };
                self.chosen = Some(f);
                f
            }
        };
        let packet = match framing {
            Framing::Native => frame,
            Framing::Compat => match SocketPacket::parse(frame) {
                Ok(SocketPacket::Data(p)) => p,
                // Not activity: a peer trickling PINGs must not hold the slot open.
                Ok(SocketPacket::Ping) => {
                    self.pong = true;
                    return;
                }
                Ok(SocketPacket::Pong) => return,
                Err(e) => {
                    debug!("server: dropped a 1tp frame: {e}");
                    self.dropped += 1;
                    return;
                }
            },
        };
        let path = Path::Tcp {
            slot: self.slot,
            generation: self.generation,
            framing,
        };
        let dropped = server.stats().dropped;
        // A reply is a Cookie, one per Hello. Should one read hold several Hellos
        // (retransmissions), answering the last is enough: any valid Cookie will do.
        if let Some(len) = server.handle_packet(packet, path, now, reply) {
            self.reply = Some(len);
        }
        // Only a packet the server did not drop keeps the stream from the idle close: junk
        // frames must not hold a stream slot open.
        self.valid |= server.stats().dropped == dropped;
    }
}
