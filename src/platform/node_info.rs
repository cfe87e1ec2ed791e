//! A node's published description, [`NodeInfo`] (`{"signId", "boxId", "connectionInfo"}`), and
//! its parsing with the poisoning check (a `boxId` that is not the curve25519 conversion of the
//! `signId` is refused). Used by the directory's cache and by its memory of peers; re-exported
//! as `platform::directory::NodeInfo` and at the crate root.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::identity::{BoxId, KeyCache, SignId};
use crate::transport::connection_info::{self, Endpoint};

/// A node's published description: ids and endpoints; what [`crate::Platform::node_info`]
/// returns and [`crate::Platform::add_peer`] takes.
///
/// Its serde form is its JSON form ([`NodeInfo::to_json`]: `{"signId", "boxId",
/// "connectionInfo"}`), and deserializing checks it as [`NodeInfo::from_json`] does (a
/// poisoned one is refused), so it can be sent as an `ms` payload as it is.
///
/// ```
/// use mm_platform::{NodeInfo, Platform};
///
/// let p = Platform::builder().build().unwrap();
/// let info: NodeInfo = p.node_info();
/// let text = serde_json::to_string(&info).unwrap();
/// assert_eq!(serde_json::from_str::<NodeInfo>(&text).unwrap(), info);
/// assert_eq!(NodeInfo::parse(&info.to_json()), Ok(info));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Its id.
    pub sign_id: SignId,
    /// Its box key (checked to be the conversion of `sign_id`).
    pub box_id: BoxId,
    /// The endpoints parsed from `connectionInfo` (invalid entries skipped).
    pub endpoints: Vec<Endpoint>,
}

/// Why a nodeInfo was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeInfoError {
    /// Not an object with string `signId` and `boxId` that are valid keys.
    Malformed,
    /// `boxId` is not the conversion of `signId` (directory poisoning).
    KeyMismatch,
}

impl std::fmt::Display for NodeInfoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeInfoError::Malformed => "malformed nodeInfo",
            NodeInfoError::KeyMismatch => "nodeInfo boxId is not the conversion of its signId",
        })
    }
}

impl std::error::Error for NodeInfoError {}

impl Serialize for NodeInfo {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for NodeInfo {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        NodeInfo::parse(&Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl NodeInfo {
    /// Parses and checks a nodeInfo, as [`NodeInfo::from_json`] does without a cache.
    pub fn parse(v: &Value) -> Result<NodeInfo, NodeInfoError> {
        NodeInfo::from_json(v, &mut KeyCache::new(1))
    }

    /// Parses and checks a nodeInfo (the conversion is cached in `keys`).
    pub fn from_json(v: &Value, keys: &mut KeyCache) -> Result<NodeInfo, NodeInfoError> {
        let sign_id: SignId = v
            .get("signId")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
            .ok_or(NodeInfoError::Malformed)?;
        let box_id: BoxId = v
            .get("boxId")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
            .ok_or(NodeInfoError::Malformed)?;
        let converted = keys.box_id(&sign_id).ok_or(NodeInfoError::Malformed)?;
        if converted != box_id {
            return Err(NodeInfoError::KeyMismatch);
        }
        let endpoints = v
            .get("connectionInfo")
            .map(connection_info::parse)
            .unwrap_or_default();
        Ok(NodeInfo {
            sign_id,
            box_id,
            endpoints,
        })
    }

    /// The JSON form (endpoints written back in their canonical form).
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "signId": self.sign_id.to_string(),
            "boxId": self.box_id.to_string(),
            "connectionInfo": connection_info::to_json(&self.endpoints),
        })
    }
}
