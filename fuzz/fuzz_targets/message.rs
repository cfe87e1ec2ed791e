//! Fuzzes the message-layer codec and the stream state machine: arbitrary bytes split into
//! messages are parsed and fed to a stream, which must neither panic nor grow beyond its bounds,
//! and must keep producing well-formed messages.
#![no_main]
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use mm_platform::proto::curvecp::message::Message;
use mm_platform::proto::curvecp::stream::{Stream, StreamConfig};

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let config = StreamConfig::server();
    let mut stream = Stream::new(&config, start);
    stream.write(b"some data to keep the sender busy");
    let mut out = [0u8; 1088];
    let mut buf = [0u8; 4096];
    // The first byte of each chunk gives its length in 16-byte units, as on the pipe interface.
    let mut rest = data;
    let mut step = 0u64;
    while let Some((&l, tail)) = rest.split_first() {
        let len = (usize::from(l) * 16).min(tail.len());
        let (msg, tail) = tail.split_at(len);
        rest = tail;
        step += 1;
        let now = start + Duration::from_millis(step);
        let _ = Message::parse(msg);
        stream.handle_message(msg, now);
        let mut produced = 0;
        while let Some(n) = stream.poll_message(now, 1088, &mut out) {
            assert!(n % 16 == 0 && (16..=1088).contains(&n));
            assert!(Message::parse(&out[..n]).is_some());
            produced += 1;
            assert!(produced < 1000, "poll_message does not settle");
        }
        while stream.read(&mut buf) > 0 {}
    }
});
