//! Fuzzes the netstring decoder: it never panics, and every frame it returns lies inside the
//! input and within the maximum.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mm_platform::proto::netstring::decode;

fuzz_target!(|data: &[u8]| {
    let max = data.first().map_or(0, |&b| b as usize * 8);
    let mut at = 0;
    while at < data.len() {
        match decode(&data[at..], max) {
            Ok(Some(f)) => {
                assert!(f.payload.len() <= max);
                assert!(at + f.consumed <= data.len());
                at += f.consumed;
            }
            _ => break,
        }
    }
});
