//! Fuzzes the Kademlia service's input: the JavaScript-exact JSON reader (what parses
//! re-serialises to text that parses to the same value), the RPC opener (signature, nonce and
//! contact checks) and the sans-IO node that consumes a message. Nothing panics; the node's
//! store, lookups and pending RPCs stay within their bounds.
//!
//! No amplification property here: Kademlia RPCs are platform messages over CurveCP, so every
//! answer goes to a peer that CurveCP has already authenticated (see fuzz/README.md).
//!
//! The node is made once (its own contact's key conversion and table were most of the cost of
//! an input) and every input starts from a clone of it, at the same instant: the same input
//! always meets the same state.
#![no_main]
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use mm_platform::identity::{Identity, KeyCache};
use mm_platform::proto::kademlia::json::JsValue;
use mm_platform::proto::kademlia::rpc;
use mm_platform::proto::kademlia::state::{Config, KadState};

struct Setup {
    other: Identity,
    cfg: Config,
    node: KadState,
    now: Instant,
    now_ms: f64,
}

thread_local! {
    // Not a static: the node is not Sync; libFuzzer runs one thread.
    static SETUP: Setup = {
        let (me, other) = (Identity::generate(), Identity::generate());
        let info = serde_json::json!({
            "signId": me.sign_id().to_string(),
            "boxId": me.box_id().to_string(),
            "connectionInfo": [],
        });
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_millis() as f64);
        let cfg = Config::default();
        let now = Instant::now();
        let node = KadState::new(cfg, me.sign_keypair().clone(), &info, now, now_ms).expect("ours");
        Setup { other, cfg, node, now, now_ms }
    };
}

fuzz_target!(|data: &[u8]| SETUP.with(|s| {
    if let Some(v) = JsValue::parse(data) {
        let text = v.stringify();
        let again = JsValue::parse(text.as_bytes()).expect("our own text parses");
        assert_eq!(again.stringify(), text);
    }
    let (now, now_ms, cfg) = (s.now, s.now_ms, s.cfg);
    let _ = rpc::open(data, &mut KeyCache::new(16), now_ms);
    let mut st = s.node.clone();
    st.handle_message(s.other.box_id(), Some(s.other.sign_id()), data, now, now_ms);
    st.handle_timeout(now, now_ms);
    while st.poll_transmit().is_some() {}
    while st.poll_event().is_some() {}
    assert!(st.items_len() <= cfg.max_items);
    assert!(st.pending_len() <= cfg.max_pending);
    assert!(st.lookups_len() <= cfg.max_lookups);
}));
