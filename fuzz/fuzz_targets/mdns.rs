//! Fuzzes the mDNS discovery input: the DNS packet decoder and the sans-IO state that consumes
//! what it decodes. Nothing panics; what decodes stays within the bounds; whatever the state
//! publishes is a JSON object (a checked nodeInfo).
#![no_main]
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use mm_platform::proto::mdns::state::{MdnsState, Timing};
use mm_platform::proto::mdns::wire::{decode, txt_text, Decoded, MAX_NODE_INFO, MAX_RECORDS};

fuzz_target!(|data: &[u8]| {
    if let Ok(Decoded::Response(texts)) = decode(data) {
        assert!(texts.len() <= MAX_RECORDS);
        assert!(texts.iter().all(|t| t.len() <= MAX_NODE_INFO));
    }
    if let Some(t) = txt_text(data) {
        assert!(t.len() <= MAX_NODE_INFO);
    }
    let now = Instant::now();
    let mut state = MdnsState::new(Timing::default(), 1);
    state.request_bootstrap(now);
    state.handle_packet(data, now);
    state.handle_timeout(now);
    while state.poll_transmit().is_some() {}
    while let Some(v) = state.poll_publication() {
        assert!(v.is_object());
    }
});
