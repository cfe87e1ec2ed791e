//! Circles: the `friends` and `devices` sets that decide a remote message's scope.
//!
//! Members are kept as box keys ([`BoxId`]), the key CurveCP authenticates, so that an ed25519
//! key and any other encoding of the same curve25519 key land in the same scope. A circle is
//! replaced as a whole by a `self.friends.update` / `self.devices.update` message whose payload
//! is a JSON array of signIds; an update with any invalid entry is refused entirely (logged at
//! debug level) and leaves the circle unchanged. Only messages with scope `self` (local, or from
//! one of our devices) can update circles.

use std::collections::HashSet;

use crate::identity::{BoxId, KeyCache, SignId};
use crate::platform::message::Scope;

/// Which circle an update is for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Circle {
    Friends,
    Devices,
}

/// The two trust circles.
#[derive(Debug, Default, Clone)]
pub struct Circles {
    friends: HashSet<BoxId>,
    devices: HashSet<BoxId>,
}

impl Circles {
    /// The scope of a message from the node whose box key is `sender`: `self` for our devices,
    /// `friends` for friends, `public` otherwise.
    pub fn scope_of(&self, sender: &BoxId) -> Scope {
        if self.devices.contains(sender) {
            Scope::Own
        } else if self.friends.contains(sender) {
            Scope::Friends
        } else {
            Scope::Public
        }
    }

    /// Whether `id` is in the friends circle.
    pub fn is_friend(&self, id: &BoxId) -> bool {
        self.friends.contains(id)
    }

    /// Whether `id` is one of our devices.
    pub fn is_device(&self, id: &BoxId) -> bool {
        self.devices.contains(id)
    }

    /// Number of friends.
    pub fn friends_len(&self) -> usize {
        self.friends.len()
    }

    /// Number of devices.
    pub fn devices_len(&self) -> usize {
        self.devices.len()
    }

    /// Replaces a circle with these signIds; refused (returns `false`, nothing changes) if any
    /// is not a valid ed25519 key.
    pub(crate) fn replace(&mut self, which: Circle, ids: &[SignId], keys: &mut KeyCache) -> bool {
        let mut set = HashSet::with_capacity(ids.len());
        for id in ids {
            match keys.box_id(id) {
                Some(b) => {
                    set.insert(b);
                }
                None => {
                    log::debug!("circle update refused: {id} is not a valid key");
                    return false;
                }
            }
        }
        match which {
            Circle::Friends => self.friends = set,
            Circle::Devices => self.devices = set,
        }
        true
    }

    /// Applies an update message's JSON payload (an array of base64 signIds).
    pub(crate) fn apply_update(
        &mut self,
        which: Circle,
        payload: &[u8],
        keys: &mut KeyCache,
    ) -> bool {
        let Ok(list) = serde_json::from_slice::<Vec<String>>(payload) else {
            log::debug!("circle update refused: payload is not an array of strings");
            return false;
        };
        let mut ids = Vec::with_capacity(list.len());
        for s in &list {
            match s.parse::<SignId>() {
                Ok(id) => ids.push(id),
                Err(_) => {
                    log::debug!("circle update refused: {s:?} is not a signId");
                    return false;
                }
            }
        }
        self.replace(which, &ids, keys)
    }
}
