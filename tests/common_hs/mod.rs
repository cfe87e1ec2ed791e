//! Helpers for `tests/handshake.rs`: a hand-driven raw CurveCP client that builds exactly the
//! packets a test wants (including wrong ones), and a hand-encoded message-layer message.

#![allow(dead_code)]

use mm_platform::proto::crypto::{random_bytes, BoxKeyPair, BoxPublicKey, SharedKey};
use mm_platform::proto::curvecp::packet::*;
use mm_platform::proto::curvecp::Extension;

/// A 192-byte message-layer data message: id, stream position, data (at the end), EOF flag.
pub fn data_msg(id: u32, pos: u64, data: &[u8], eof: bool) -> Vec<u8> {
    assert!(data.len() <= 128);
    let mut m = vec![0u8; 192];
    m[0..4].copy_from_slice(&id.to_le_bytes());
    let flags = data.len() as u16 | if eof { 2048 } else { 0 };
    m[38..40].copy_from_slice(&flags.to_le_bytes());
    m[40..48].copy_from_slice(&pos.to_le_bytes());
    m[192 - data.len()..].copy_from_slice(data);
    m
}

/// The acknowledged message ID (offset 4) and range 1 end A1 (offset 8) of a message.
pub fn ack_fields(msg: &[u8]) -> (u32, u64) {
    (
        u32::from_le_bytes(msg[4..8].try_into().unwrap()),
        u64::from_le_bytes(msg[8..16].try_into().unwrap()),
    )
}

/// A raw client: one short-term key, a counter, and what it learned from a Cookie.
pub struct Raw {
    pub short: BoxKeyPair,
    pub long: BoxKeyPair,
    pub server: BoxPublicKey,
    pub sext: Extension,
    pub cext: Extension,
    pub name: ServerName,
    pub counter: u64,
    pub cookie: [u8; 96],
    pub session: Option<SharedKey>,
    pub last_server_nonce: u64,
}

impl Raw {
    pub fn new(server: BoxPublicKey, sext: Extension, name: ServerName) -> Raw {
        Raw {
            short: BoxKeyPair::generate(),
            long: BoxKeyPair::generate(),
            server,
            sext,
            cext: [0; 16],
            name,
            counter: 1000,
            cookie: [0; 96],
            session: None,
            last_server_nonce: 0,
        }
    }

    pub fn hello(&mut self) -> Vec<u8> {
        self.counter += 1;
        let mut out = vec![0u8; 224];
        let k = self.short.shared_key(&self.server);
        build_hello(
            &mut out,
            &self.sext,
            &self.cext,
            &self.short.public.0,
            self.counter,
            &k,
        );
        out
    }

    /// Opens a Cookie packet; keeps S' and the cookie. Returns whether it was valid.
    pub fn take_cookie(&mut self, pkt: &[u8]) -> bool {
        let Ok(v) = parse_cookie(pkt, &self.cext, &self.sext) else {
            return false;
        };
        let mut plain = [0u8; 128];
        let k = self.short.shared_key(&self.server);
        if k.open_into(&long_nonce(COOKIE_NONCE, v.nonce), v.boxed, &mut plain)
            .is_err()
        {
            return false;
        }
        let sp = BoxPublicKey(plain[..32].try_into().unwrap());
        self.cookie.copy_from_slice(&plain[32..]);
        self.session = Some(self.short.shared_key(&sp));
        true
    }

    pub fn vouch_with(&self, long: &BoxKeyPair, server: &BoxPublicKey) -> [u8; 64] {
        let mut vouch = [0u8; 64];
        random_bytes(&mut vouch[..16]);
        let vn: [u8; 16] = vouch[..16].try_into().unwrap();
        long.shared_key(server).seal_into(
            &long_nonce(VOUCH_NONCE, &vn),
            &self.short.public.0,
            &mut vouch[16..],
        );
        vouch
    }

    /// An Initiate with the given message (a multiple of 16, 16..=640 bytes) and a fresh nonce.
    pub fn initiate(&mut self, msg: &[u8]) -> Vec<u8> {
        let vouch = self.vouch_with(&self.long, &self.server);
        let name = self.name;
        let cookie = self.cookie;
        self.initiate_custom(msg, &name, &vouch, &cookie)
    }

    pub fn initiate_custom(
        &mut self,
        msg: &[u8],
        name: &ServerName,
        vouch: &[u8; 64],
        cookie: &[u8; 96],
    ) -> Vec<u8> {
        self.counter += 1;
        let mut out = vec![0u8; 544 + msg.len()];
        out[544..].copy_from_slice(msg);
        let f = InitiateFields {
            server_extension: &self.sext,
            client_extension: &self.cext,
            client_short: &self.short.public.0,
            cookie,
            client_long: &self.long.public.0,
            vouch,
            name: &name.0,
        };
        let n = seal_initiate(
            &mut out,
            &f,
            self.counter,
            self.session.as_ref().unwrap(),
            msg.len(),
        );
        assert_eq!(n, out.len());
        out
    }

    /// A client Message with the next nonce.
    pub fn message(&mut self, msg: &[u8]) -> Vec<u8> {
        self.counter += 1;
        let n = self.counter;
        self.message_with_nonce(msg, n)
    }

    pub fn message_with_nonce(&mut self, msg: &[u8], nonce: u64) -> Vec<u8> {
        let mut out = vec![0u8; 96 + msg.len()];
        out[96..].copy_from_slice(msg);
        seal_client_message(
            &mut out,
            &self.sext,
            &self.cext,
            &self.short.public.0,
            nonce,
            self.session.as_ref().unwrap(),
            msg.len(),
        );
        out
    }

    /// Opens a server Message (strictly increasing nonce); returns the message.
    pub fn open_server(&mut self, pkt: &[u8]) -> Option<Vec<u8>> {
        let v = parse_server_message(pkt, &self.cext, &self.sext).ok()?;
        if v.nonce <= self.last_server_nonce {
            return None;
        }
        let mut plain = vec![0u8; v.boxed.len() - 16];
        self.session
            .as_ref()?
            .open_into(
                &counter_nonce(SERVER_MESSAGE_NONCE, v.nonce),
                v.boxed,
                &mut plain,
            )
            .ok()?;
        self.last_server_nonce = v.nonce;
        Some(plain)
    }
}
