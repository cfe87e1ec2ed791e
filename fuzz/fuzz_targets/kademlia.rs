//! Fuzzes the Kademlia service's input: the JavaScript-exact JSON reader (what parses
//! re-serialises to text that parses to the same value), the RPC opener (signature, nonce and
//! contact checks) and the sans-IO node that consumes a message. Nothing panics; the node's
//! store, lookups and pending RPCs stay within their bounds.
#![no_main]
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use mm_platform::identity::{Identity, KeyCache};
use mm_platform::services::kademlia::json::JsValue;
use mm_platform::services::kademlia::rpc;
use mm_platform::services::kademlia::state::{Config, KadState};

fn ids() -> &'static (Identity, Identity) {
    static IDS: OnceLock<(Identity, Identity)> = OnceLock::new();
    IDS.get_or_init(|| (Identity::generate(), Identity::generate()))
}

fuzz_target!(|data: &[u8]| {
    if let Some(v) = JsValue::parse(data) {
        let text = v.stringify();
        let again = JsValue::parse(text.as_bytes()).expect("our own text parses");
        assert_eq!(again.stringify(), text);
    }
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_millis() as f64);
    let _ = rpc::open(data, &mut KeyCache::new(16), now_ms);
    let (me, other) = ids();
    let info = serde_json::json!({
        "signId": me.sign_id().to_string(),
        "boxId": me.box_id().to_string(),
        "connectionInfo": [],
    });
    let cfg = Config::default();
    let now = Instant::now();
    let mut st = KadState::new(cfg, me.sign_keypair().clone(), &info, now, now_ms).expect("ours");
    st.handle_message(other.box_id(), Some(other.sign_id()), data, now, now_ms);
    st.handle_timeout(now, now_ms);
    while st.poll_transmit().is_some() {}
    while st.poll_event().is_some() {}
    assert!(st.items_len() <= cfg.max_items);
    assert!(st.pending_len() <= cfg.max_pending);
    assert!(st.lookups_len() <= cfg.max_lookups);
});
