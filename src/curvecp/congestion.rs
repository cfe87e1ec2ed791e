//! CONTRACT SKELETON
use std::sync::Arc;
/// Congestion controller (see the stream helper's design).
pub trait Congestion: Send {}
/// Makes one controller per stream.
pub type CongestionFactory = Arc<dyn Fn() -> Box<dyn Congestion> + Send + Sync>;
