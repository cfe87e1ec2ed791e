//! The platform's side of [`crate::services`]: the [`Service`] trait every service implements
//! (re-exported as `services::Service`), the table of hosted services, their token blocks, their
//! single wake-up timer, their bus subscriptions, and the [`ServiceContext`] they are called
//! with. The platform knows services only through the [`Service`] trait.

use std::io;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Instant;

use mio::{Interest, Token};

use super::{
    Context, Core, Event, Message, SendResult, SubscriptionId, Target, TimerAction, TimerId,
    CONNECTION_TOKEN_BASE,
};

/// A service: a bus client with its own sockets and timer, driven by the platform's reactor.
/// See the [services module docs](crate::services) for how and when its methods run.
///
/// `Send`, like every part a [`crate::Platform`] owns, so a platform can be built on one thread
/// and polled on another.
pub trait Service: Send {
    /// A short name, used as the source tag of the nodeInfo it publishes
    /// ([`crate::Event::NodeInfo`]) and in logs (`mdns`, `bootstrap`, `kademlia`, ...).
    fn name(&self) -> &str;

    /// Runs once, when the service is added: open and register sockets, subscribe, set the
    /// first wake-up. An error is returned by the call that added the service (which then
    /// keeps no trace of it).
    fn start(&mut self, ctx: &mut ServiceContext<'_>) -> io::Result<()>;

    /// A message matching one of the service's subscriptions ([`ServiceContext::subscribe`]).
    fn on_message(&mut self, ctx: &mut ServiceContext<'_>, msg: &Message) {
        let _ = (ctx, msg);
    }

    /// Readiness of a source the service registered as `local` (its index within the service's
    /// token block). The poll is edge-triggered: read until `WouldBlock` or ask for a turn.
    fn on_io(&mut self, ctx: &mut ServiceContext<'_>, local: usize, event: &mio::event::Event) {
        let _ = (ctx, local, event);
    }

    /// The instant set with [`ServiceContext::set_wake`] has come (the wake-up is cleared
    /// before this runs).
    fn on_timer(&mut self, ctx: &mut ServiceContext<'_>) {
        let _ = ctx;
    }

    /// The platform is going away: persist what should survive a restart. Sends made here are
    /// never delivered.
    fn stop(&mut self, ctx: &mut ServiceContext<'_>) {
        let _ = ctx;
    }
}

/// First token of the services: service `i` owns tokens
/// `SERVICE_TOKEN_BASE + i * SERVICE_TOKEN_BLOCK ..` (one block each), below
/// [`CONNECTION_TOKEN_BASE`] and far above the listeners' accepted TCP streams.
pub(crate) const SERVICE_TOKEN_BASE: usize = 1 << 29;
/// Tokens per service.
pub const SERVICE_TOKEN_BLOCK: usize = 1 << 16;
/// Most services one platform hosts (the token blocks that fit below the connections').
pub const MAX_SERVICES: usize = (CONNECTION_TOKEN_BASE - SERVICE_TOKEN_BASE) / SERVICE_TOKEN_BLOCK;

/// Identifies a hosted service (its index in the platform's table).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ServiceId(pub(crate) usize);

struct ServiceSlot {
    /// Out of the slot while one of its methods runs.
    service: Option<Box<dyn Service>>,
    name: Arc<str>,
    timer: Option<TimerId>,
    /// Turns its wake-up woke.
    wakes: u64,
}

/// Which service a poll token belongs to, and the local index within its block.
pub(crate) fn service_of(token: Token) -> Option<(usize, usize)> {
    let t = token.0;
    if !(SERVICE_TOKEN_BASE..CONNECTION_TOKEN_BASE).contains(&t) {
        return None;
    }
    let off = t - SERVICE_TOKEN_BASE;
    Some((off / SERVICE_TOKEN_BLOCK, off % SERVICE_TOKEN_BLOCK))
}

/// What a service's methods get: the platform's [`Context`] (through `Deref`: send, our
/// nodeInfo, storage, `now`) plus what only services do: register sockets in their token
/// block, subscribe the service itself to topics, set its wake-up, publish nodeInfo with its
/// source tag.
pub struct ServiceContext<'a> {
    ctx: Context<'a>,
    slot: usize,
}

impl<'a> Deref for ServiceContext<'a> {
    type Target = Context<'a>;
    fn deref(&self) -> &Context<'a> {
        &self.ctx
    }
}

impl DerefMut for ServiceContext<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.ctx
    }
}

impl ServiceContext<'_> {
    /// This service's id.
    pub fn id(&self) -> ServiceId {
        ServiceId(self.slot)
    }

    /// This service's name (its source tag).
    pub fn name(&self) -> &str {
        self.ctx.core.services.name(self.slot)
    }

    /// The poll token of this service's source number `local` (< [`SERVICE_TOKEN_BLOCK`]).
    pub fn token(&self, local: usize) -> io::Result<Token> {
        if local >= SERVICE_TOKEN_BLOCK {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "service token index out of its block",
            ));
        }
        Ok(Token(
            SERVICE_TOKEN_BASE + self.slot * SERVICE_TOKEN_BLOCK + local,
        ))
    }

    /// Registers a socket (any `mio` source) with the platform's poll as this service's source
    /// number `local`; its readiness arrives in [`Service::on_io`] with that number.
    pub fn register<S>(
        &mut self,
        source: &mut S,
        local: usize,
        interest: Interest,
    ) -> io::Result<()>
    where
        S: mio::event::Source + ?Sized,
    {
        let token = self.token(local)?;
        self.ctx.core.registry.register(source, token, interest)
    }

    /// Changes the interest of a registered source.
    pub fn reregister<S>(
        &mut self,
        source: &mut S,
        local: usize,
        interest: Interest,
    ) -> io::Result<()>
    where
        S: mio::event::Source + ?Sized,
    {
        let token = self.token(local)?;
        self.ctx.core.registry.reregister(source, token, interest)
    }

    /// Removes a source from the poll (dropping a socket also does).
    pub fn deregister<S>(&mut self, source: &mut S) -> io::Result<()>
    where
        S: mio::event::Source + ?Sized,
    {
        self.ctx.core.registry.deregister(source)
    }

    /// Subscribes this service to every message (any protocol) whose scoped topic matches
    /// `pattern`; they arrive in [`Service::on_message`]. Remove with
    /// [`Context::off`]. Panics for an invalid pattern, as [`Context::on`].
    #[track_caller]
    pub fn subscribe(&mut self, pattern: &str) -> SubscriptionId {
        self.ctx
            .core
            .subscribe(pattern, None, false, Target::Service(self.slot))
    }

    /// Sets the instant [`Service::on_timer`] runs (`None`: no wake-up), replacing the previous
    /// one. An instant already past runs in the next turn.
    pub fn set_wake(&mut self, at: Option<Instant>) {
        let core = &mut *self.ctx.core;
        let slot = &mut core.services.slots[self.slot];
        if let Some(old) = slot.timer.take() {
            core.timers.cancel(old);
        }
        if let Some(at) = at {
            slot.timer = Some(core.timers.schedule(at, TimerAction::Service(self.slot)));
        }
    }

    /// Publishes a nodeInfo found by this service: `transports.nodeInfo` and, if `bootstrap`,
    /// `transports.nodeInfoBootstrap` (protocol `ms`, destination `local`), and raises
    /// [`Event::NodeInfo`] with this service's name as the source. The platform checks the
    /// nodeInfo itself when it arrives (a poisoned one is refused there). Returns the status of
    /// the `transports.nodeInfo` send.
    pub fn publish_node_info(&mut self, info: &serde_json::Value, bootstrap: bool) -> SendResult {
        let payload = serde_json::to_vec(info).unwrap_or_default();
        let status = self
            .ctx
            .send("ms", "transports.nodeInfo", "local", payload.clone());
        if bootstrap {
            let b = self
                .ctx
                .send("ms", "transports.nodeInfoBootstrap", "local", payload);
            if let Err(e) = b {
                log::debug!("transports.nodeInfoBootstrap not queued: {e}");
            }
        }
        if status.is_ok() {
            let source = self.name().to_owned();
            self.ctx.core.emit(Event::NodeInfo {
                node_info: info.clone(),
                source,
            });
        }
        status
    }
}

/// The table of hosted services (one slot per service ever added: ids are never reused).
#[derive(Default)]
pub(crate) struct Services {
    slots: Vec<ServiceSlot>,
}

impl Services {
    /// The name of the service in `slot` (empty if there is none).
    pub(crate) fn name(&self, slot: usize) -> &str {
        self.slots.get(slot).map_or("", |s| &s.name)
    }

    /// Counts a turn that the wake-up of the service in `slot` woke.
    pub(crate) fn count_wake(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.wakes += 1;
        }
    }

    /// (name, turns woken) of every service slot, in order.
    pub(crate) fn wakes(&self) -> Vec<(String, u64)> {
        self.slots
            .iter()
            .map(|s| (s.name.to_string(), s.wakes))
            .collect()
    }
}

/// Adds and starts a service.
pub(crate) fn add(core: &mut Core, mut service: Box<dyn Service>) -> io::Result<ServiceId> {
    if core.services.slots.len() >= MAX_SERVICES {
        return Err(io::Error::other("too many services"));
    }
    let slot = core.services.slots.len();
    core.services.slots.push(ServiceSlot {
        service: None,
        name: service.name().into(),
        timer: None,
        wakes: 0,
    });
    let now = core.now;
    let result = service.start(&mut ServiceContext {
        ctx: Context { core, now },
        slot,
    });
    match result {
        Ok(()) => {
            core.services.slots[slot].service = Some(service);
            Ok(ServiceId(slot))
        }
        Err(e) => {
            // Leave no trace: its subscriptions and timer go with it. The slot stays
            // (empty) so ids are never reused.
            if let Some(t) = core.services.slots[slot].timer.take() {
                core.timers.cancel(t);
            }
            core.bus
                .remove_where(|t| matches!(t, Target::Service(s) if *s == slot));
            Err(e)
        }
    }
}

/// Runs `f` with the service in `slot` taken out of its slot (absent or busy: skipped).
pub(crate) fn with_service<F>(core: &mut Core, slot: usize, f: F)
where
    F: FnOnce(&mut dyn Service, &mut ServiceContext<'_>),
{
    let Some(mut service) = core
        .services
        .slots
        .get_mut(slot)
        .and_then(|s| s.service.take())
    else {
        return;
    };
    let now = core.now;
    f(
        &mut *service,
        &mut ServiceContext {
            ctx: Context { core, now },
            slot,
        },
    );
    core.services.slots[slot].service = Some(service);
}

/// The timer of the service in `slot` fired.
pub(crate) fn on_timer(core: &mut Core, slot: usize) {
    if let Some(s) = core.services.slots.get_mut(slot) {
        s.timer = None;
    }
    with_service(core, slot, |s, ctx| s.on_timer(ctx));
}

/// Hands the readiness events of this turn to their services.
pub(crate) fn on_io(core: &mut Core, events: &mio::Events) {
    for event in events.iter() {
        if let Some((slot, local)) = service_of(event.token()) {
            with_service(core, slot, |s, ctx| s.on_io(ctx, local, event));
        }
    }
}

/// Stops every service (the platform is going away).
pub(crate) fn stop_all(core: &mut Core) {
    for slot in 0..core.services.slots.len() {
        with_service(core, slot, |s, ctx| s.stop(ctx));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_blocks_partition_the_service_range() {
        assert_eq!(service_of(Token(SERVICE_TOKEN_BASE)), Some((0, 0)));
        assert_eq!(
            service_of(Token(SERVICE_TOKEN_BASE + SERVICE_TOKEN_BLOCK + 3)),
            Some((1, 3))
        );
        assert_eq!(service_of(Token(SERVICE_TOKEN_BASE - 1)), None);
        assert_eq!(service_of(Token(CONNECTION_TOKEN_BASE)), None);
        assert_eq!(
            service_of(Token(CONNECTION_TOKEN_BASE - 1)),
            Some((MAX_SERVICES - 1, SERVICE_TOKEN_BLOCK - 1))
        );
    }
}
