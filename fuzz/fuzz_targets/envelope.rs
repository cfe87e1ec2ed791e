//! Fuzzes the envelope decoders (protobuf body and the framed stream reader): no panic, bounded
//! buffering, and whatever decodes re-encodes to something that decodes to the same message.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mm_platform::proto::envelope::{Envelope, FrameReader};

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::decode_protobuf(data) {
        let mut again = Vec::new();
        env.encode_protobuf(&mut again);
        assert_eq!(Envelope::decode_protobuf(&again).as_ref(), Ok(&env));
    }
    let mut reader = FrameReader::new(512);
    let mut input = data;
    while !input.is_empty() {
        let n = reader.push(input);
        input = &input[n..];
        loop {
            match reader.next_envelope() {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
        if n == 0 {
            return;
        }
    }
});
