//! Fuzzes the CurveCP packet parsers (client packets with the server's prefilter, Cookies and
//! server Messages): no panic on any input, and whatever parses has a valid length.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mm_platform::proto::curvecp::packet::{
    parse_client_packet, parse_cookie, parse_server_message,
};

fuzz_target!(|data: &[u8]| {
    let ext = [0u8; 16];
    if parse_client_packet(data, &ext).is_ok() {
        assert!(data.len() % 16 == 0 && (80..=1184).contains(&data.len()));
    }
    if parse_cookie(data, &ext, &ext).is_ok() {
        assert_eq!(data.len(), 200);
    }
    if parse_server_message(data, &ext, &ext).is_ok() {
        assert!(data.len() % 16 == 0 && (80..=1152).contains(&data.len()));
    }
});
