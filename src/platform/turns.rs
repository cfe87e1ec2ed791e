//! Accounting of the reactor's turns: which part woke each one ([`Woken`], in
//! [`super::Stats::woken`]; per service in [`super::Platform::service_wakes`]) and, in debug
//! builds, a warning when a long run of turns is woken by a deadline already past and does
//! nothing: a deadline that nothing consumes, which keeps the reactor busy for nothing.

/// Turns in a row, woken by a deadline of one owner already past and doing nothing, after
/// which a debug build logs a warning naming that owner.
pub const SPIN_WARN_TURNS: u32 = 1000;

/// What woke the reactor's turns, one count per turn under the first that applies: socket
/// readiness, queued work, then the owner of the deadline that was due, else idle.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Woken {
    /// Readiness of a socket (the connection manager's or a service's).
    pub io: u64,
    /// Work already waiting (messages, events, handle commands) or a handle's wake-up.
    pub work: u64,
    /// A deadline of the platform's own timers (user timers, the periodic nodeInfo and
    /// bootstrap requests).
    pub timers: u64,
    /// A hosted service's wake-up (by service: [`super::Platform::service_wakes`]).
    pub services: u64,
    /// The connection manager: its deadline, or work that only it had pending.
    pub connections: u64,
    /// Nothing due: the caller's timeout ran out.
    pub idle: u64,
}

/// Who set a deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Owner {
    /// The platform's own timers.
    Timers,
    /// The service in this slot.
    Service(usize),
    /// The connection manager.
    Connections,
}

/// Why one turn ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cause {
    /// Socket readiness.
    Io,
    /// Work already waiting, or a handle's wake-up.
    Work,
    /// A deadline of this owner was due.
    Deadline(Owner),
    /// The caller's timeout ran out.
    Idle,
}

impl Woken {
    /// Counts one turn.
    pub(crate) fn count(&mut self, cause: Cause) {
        let c = match cause {
            Cause::Io => &mut self.io,
            Cause::Work => &mut self.work,
            Cause::Deadline(Owner::Timers) => &mut self.timers,
            Cause::Deadline(Owner::Service(_)) => &mut self.services,
            Cause::Deadline(Owner::Connections) => &mut self.connections,
            Cause::Idle => &mut self.idle,
        };
        *c += 1;
    }
}

/// Follows runs of turns that were woken by a deadline already past when the turn began and
/// did nothing (no readiness, no message dispatched).
#[derive(Debug, Default)]
pub(crate) struct SpinWatch {
    owner: Option<Owner>,
    run: u32,
}

impl SpinWatch {
    /// Records a turn: `spun` is the owner of the past deadline that woke a turn that did
    /// nothing, `None` for any other turn. Returns the owner when its run reaches
    /// [`SPIN_WARN_TURNS`] (once per run).
    pub(crate) fn turn(&mut self, spun: Option<Owner>) -> Option<Owner> {
        match spun {
            Some(o) if self.owner == Some(o) => self.run = self.run.saturating_add(1),
            Some(o) => {
                self.owner = Some(o);
                self.run = 1;
            }
            None => {
                self.owner = None;
                self.run = 0;
            }
        }
        (self.run == SPIN_WARN_TURNS).then_some(spun).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_one_owner_warns_once_and_any_other_turn_ends_it() {
        let mut w = SpinWatch::default();
        let s = Owner::Service(2);
        for _ in 1..SPIN_WARN_TURNS {
            assert_eq!(w.turn(Some(s)), None);
        }
        assert_eq!(w.turn(Some(s)), Some(s));
        assert_eq!(w.turn(Some(s)), None, "once per run");
        // Another owner starts a new run; a turn that did something ends it.
        for _ in 1..SPIN_WARN_TURNS {
            assert_eq!(w.turn(Some(Owner::Connections)), None);
        }
        assert_eq!(w.turn(None), None);
        for _ in 1..SPIN_WARN_TURNS {
            assert_eq!(w.turn(Some(Owner::Connections)), None);
        }
        assert_eq!(w.turn(Some(Owner::Connections)), Some(Owner::Connections));
    }

    #[test]
    fn turns_count_under_their_cause() {
        let mut k = Woken::default();
        for c in [
            Cause::Io,
            Cause::Work,
            Cause::Deadline(Owner::Timers),
            Cause::Deadline(Owner::Service(0)),
            Cause::Deadline(Owner::Service(1)),
            Cause::Deadline(Owner::Connections),
            Cause::Idle,
        ] {
            k.count(c);
        }
        assert_eq!(
            k,
            Woken {
                io: 1,
                work: 1,
                timers: 1,
                services: 2,
                connections: 1,
                idle: 1
            }
        );
    }
}
