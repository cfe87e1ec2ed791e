//! The static bootstrap service: a list of nodeInfos given in options, published as
//! `transports.nodeInfo` and `transports.nodeInfoBootstrap` when it starts, and again when the
//! platform asks for bootstrap nodes (`self.transports.requestBootstrapNodeInfo`), at most once
//! per [`Bootstrap::MIN_INTERVAL`]. The platform checks each nodeInfo when it arrives; this
//! service does not filter them.

use std::io;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Service, ServiceContext};
use crate::platform::Message;

/// Publishes a fixed list of nodeInfos (see the [module docs](self)).
///
/// ```
/// use mm_platform::services::bootstrap::Bootstrap;
/// use mm_platform::Platform;
///
/// let peer = Platform::builder().transports(false).build().unwrap();
/// let platform = Platform::builder()
///     .service(Bootstrap::new(vec![peer.node_info().to_json()]))
///     .build()
///     .unwrap();
/// # drop(platform);
/// ```
#[derive(Debug, Clone)]
pub struct Bootstrap {
    nodes: Vec<Value>,
    last: Option<Instant>,
}

impl Bootstrap {
    /// Least time between two publications of the list.
    pub const MIN_INTERVAL: Duration = Duration::from_secs(60);

    /// A service publishing `nodes` (nodeInfo JSON objects).
    pub fn new(nodes: Vec<Value>) -> Bootstrap {
        Bootstrap { nodes, last: None }
    }

    /// Parses a JSON array of nodeInfos (the `--bootstrap FILE` format of `examples/node.rs`).
    pub fn from_json(text: &[u8]) -> Result<Bootstrap, String> {
        match serde_json::from_slice::<Value>(text) {
            Ok(Value::Array(nodes)) => Ok(Bootstrap::new(nodes)),
            Ok(_) => Err("a bootstrap list must be a JSON array of nodeInfos".into()),
            Err(e) => Err(format!("bootstrap list is not JSON: {e}")),
        }
    }

    fn publish(&mut self, ctx: &mut ServiceContext<'_>) {
        let now = ctx.now();
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < Self::MIN_INTERVAL)
        {
            return;
        }
        self.last = Some(now);
        for info in &self.nodes {
            let status = ctx.publish_node_info(info, true);
            if let Err(e) = status {
                log::debug!("bootstrap nodeInfo not queued: {e}");
            }
        }
    }
}

impl Service for Bootstrap {
    fn name(&self) -> &str {
        "bootstrap"
    }

    fn start(&mut self, ctx: &mut ServiceContext<'_>) -> io::Result<()> {
        ctx.subscribe("self.transports.requestBootstrapNodeInfo");
        self.publish(ctx);
        Ok(())
    }

    fn on_message(&mut self, ctx: &mut ServiceContext<'_>, _msg: &Message) {
        self.publish(ctx);
    }
}
