//! The [`Handle`]: how other threads talk to a running reactor.
//!
//! A handle is `Send + Clone`. It puts commands on a bounded crossbeam channel and wakes the
//! reactor through a `mio::Waker`. Wake-ups are coalesced: a flag records that a wake is
//! already pending, so a burst of sends costs one system call, not one per message. The reactor
//! clears the flag before draining the channel, so no command is ever left unseen.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Sender, TrySendError};
use serde::Serialize;

use crate::identity::SignId;
use crate::platform::message::{
    refuse_invalid, Address, SendError, SendOptions, SendResult, ToAddress,
};

/// A message on its way from a handle to the reactor.
pub(crate) struct Outgoing {
    pub(crate) dest: Address,
    pub(crate) protocol: Cow<'static, str>,
    pub(crate) topic: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) options: SendOptions,
}

/// What a handle asks of the reactor.
pub(crate) enum Command {
    Send(Outgoing),
}

/// The state shared by every handle of one platform.
pub(crate) struct Shared {
    pub(crate) waker: mio::Waker,
    pub(crate) wake_pending: AtomicBool,
    pub(crate) stop_requested: AtomicBool,
}

impl Shared {
    pub(crate) fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::SeqCst) {
            if let Err(e) = self.waker.wake() {
                log::debug!("waking the reactor failed: {e}");
            }
        }
    }
}

/// Sends messages to a [`crate::Platform`] and stops it, from any thread.
///
/// Local messages sent through a handle are delivered in the reactor's next turn, after the
/// messages the reactor itself queued earlier. The channel to the reactor is bounded
/// ([`crate::Limits::handle_queue`]); when it is full the send returns
/// [`SendError::BufferFull`]. What no retry can make succeed (an invalid topic, the reserved
/// protocol, a message too large for its path) is refused here with the status the reactor
/// would give. A remote destination gets [`SendError::NoTransport`] when the
/// platform has no transports; otherwise the reactor takes the message and the outcome of the
/// remote send (queue full, unknown destination, ...) is only logged: use
/// [`crate::Platform::send_with_callback`] on the reactor's thread to learn it.
///
/// ```
/// use std::time::Duration;
/// use mm_platform::Platform;
///
/// let mut platform = Platform::builder().build().unwrap();
/// let rx = platform.messaging().on_channel("self.chat.*", 16).1;
/// let handle = platform.handle();
/// std::thread::spawn(move || {
///     let _ = handle.send_json("chat.hello", "local", &"hi from a thread");
///     handle.shutdown();
/// });
/// platform.run().unwrap();
/// assert_eq!(rx.try_recv().unwrap().json::<String>().unwrap(), "hi from a thread");
/// ```
#[derive(Clone)]
pub struct Handle {
    pub(crate) tx: Sender<Command>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) own: SignId,
    pub(crate) max_message_size: usize,
    /// The largest frame a real-time and a non-real-time message to another node may take
    /// (`None`: no transports).
    pub(crate) frame_caps: Option<(usize, usize)>,
}

impl Handle {
    /// Sends a message of any protocol (the low-level send of the original); arguments in the
    /// order of [`crate::Platform::send`]: protocol, topic, destination, payload.
    pub fn send(
        &self,
        protocol: impl Into<Cow<'static, str>>,
        topic: impl Into<String>,
        dest: impl ToAddress,
        payload: impl Into<Vec<u8>>,
    ) -> SendResult {
        self.send_with(protocol, topic, dest, payload, SendOptions::default())
    }

    /// [`Handle::send`] with options.
    pub fn send_with(
        &self,
        protocol: impl Into<Cow<'static, str>>,
        topic: impl Into<String>,
        dest: impl ToAddress,
        payload: impl Into<Vec<u8>>,
        options: SendOptions,
    ) -> SendResult {
        let Some(dest) = dest.to_address() else {
            return Err(SendError::InvalidDestination);
        };
        let dest = match dest {
            Address::Node(id) if id == self.own => Address::Local,
            other => other,
        };
        let frame_cap = match (dest, self.frame_caps) {
            (Address::Local, _) => None,
            (_, None) => return Err(SendError::NoTransport),
            (_, Some((realtime, offline))) => {
                Some(if options.realtime { realtime } else { offline })
            }
        };
        let (protocol, topic, payload) = (protocol.into(), topic.into(), payload.into());
        if let Some(refused) = refuse_invalid(
            &protocol,
            &topic,
            payload.len(),
            self.max_message_size,
            frame_cap,
        ) {
            return Err(refused);
        }
        let cmd = Command::Send(Outgoing {
            dest,
            protocol,
            topic,
            payload,
            options,
        });
        match self.tx.try_send(cmd) {
            Ok(()) => {
                self.shared.wake();
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(SendError::BufferFull),
            Err(TrySendError::Disconnected(_)) => Err(SendError::Closed),
        }
    }

    /// Sends a JSON message (protocol `ms`), like `messaging.send` of the original.
    pub fn send_json<T: Serialize + ?Sized>(
        &self,
        topic: impl Into<String>,
        dest: impl ToAddress,
        value: &T,
    ) -> SendResult {
        match serde_json::to_vec(value) {
            Ok(payload) => self.send("ms", topic, dest, payload),
            Err(_) => Err(SendError::EncodeFailed),
        }
    }

    /// Asks the reactor to stop: [`crate::Platform::run`] returns after the current turn.
    /// Never blocks and always gets through (it is a flag, not a queued command); has no effect
    /// if the platform is gone.
    pub fn shutdown(&self) {
        self.shared.stop_requested.store(true, Ordering::SeqCst);
        self.shared.wake();
    }

    /// The node id of the platform.
    pub fn sign_id(&self) -> SignId {
        self.own
    }
}
