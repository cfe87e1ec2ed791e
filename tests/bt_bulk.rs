//! Large torrenting payloads node to node, over UDP and over TCP, both directions at once: every
//! byte arrives, in order, through the paths a bulk transfer takes (TCP frames read in bounded
//! batches with acknowledgements between them, frame buffers taken from and given back to the
//! spare pool, a large payload taking over its frame's buffer, `on_bytes` lending it and `on`
//! copying it). Two platforms on 127.0.0.1 driven in one thread, with uneven turns so that
//! more frames than one read batch wait between the reader's turns.

use mm_platform::Shared;
use std::time::{Duration, Instant};

use mm_platform::Platform;
use serde_json::{json, Value};

/// Payloads per direction, and their sizes: large ones (beyond the 64 KiB where buffers are
/// pooled and payloads take over their frame's buffer), with small ones between them.
const SIZES: [usize; 8] = [
    1 << 20,
    17,
    300_000,
    (1 << 20) + 5,
    65_536,
    0,
    700_001,
    2 << 20,
];

/// What a subscriber got: topic and payload, in order.
type Got = Shared<Vec<(String, Vec<u8>)>>;

fn node(kind: &str) -> Platform {
    Platform::builder()
        .connection_info(
            json!([{"transportType": kind, "transportInfo": {"address": "127.0.0.1", "port": 0}}]),
        )
        .build()
        .unwrap()
}

/// Payload `i` from `from`: its bytes depend on both, so a misplaced or mixed-up byte shows.
fn payload(from: u8, i: usize) -> Vec<u8> {
    (0..SIZES[i])
        .map(|k| (k as u32).wrapping_mul(2_654_435_761).to_le_bytes()[k % 4] ^ from ^ i as u8)
        .collect()
}

fn tell(p: &mut Platform, other: &Platform) {
    let info: Value = other.node_info().to_json();
    assert!(p
        .messaging()
        .send("transports.nodeInfo", "local", &info)
        .is_ok());
}

fn both_ways(kind: &str) {
    let mut a = node(kind);
    let mut b = node(kind);
    tell(&mut a, &b);
    tell(&mut b, &a);
    // a's payloads reach b's borrowing subscriber, b's reach a's copying one.
    let got_b: Got = Default::default();
    let g = got_b.clone();
    b.torrenting()
        .on_bytes("public.bulk.*", move |_ctx, msg, bytes| {
            g.borrow_mut().push((msg.topic.clone(), bytes.to_vec()))
        });
    let got_a: Got = Default::default();
    let g = got_a.clone();
    a.torrenting().on("public.bulk.*", move |_ctx, msg, v| {
        g.borrow_mut().push((msg.topic.clone(), v))
    });
    let (aid, bid) = (a.sign_id(), b.sign_id());
    let (mut sent_a, mut sent_b) = (0, 0);
    let end = Instant::now() + Duration::from_secs(60);
    for round in 0..1_000_000 {
        // Send what the queues take, then a turn each.
        while sent_a < SIZES.len()
            && a.torrenting()
                .send(&format!("bulk.{sent_a}"), bid, &payload(1, sent_a))
                .is_ok()
        {
            sent_a += 1;
        }
        while sent_b < SIZES.len()
            && b.torrenting()
                .send(&format!("bulk.{sent_b}"), aid, &payload(2, sent_b))
                .is_ok()
        {
            sent_b += 1;
        }
        if got_a.borrow().len() == SIZES.len() && got_b.borrow().len() == SIZES.len() {
            break;
        }
        if Instant::now() > end {
            break;
        }
        // Uneven turns, each side in turn several times for one of the other: frames pile up
        // between the reader's turns beyond one read batch, both ways.
        let (many, one) = if round % 2 == 0 {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        for _ in 0..4 {
            many.poll(Some(Duration::from_millis(1))).unwrap();
        }
        one.poll(Some(Duration::from_millis(1))).unwrap();
    }
    for (got, from) in [(got_b, 1u8), (got_a, 2u8)] {
        let got = got.borrow();
        assert_eq!(
            got.len(),
            SIZES.len(),
            "{kind}: every payload from node {from}"
        );
        for (i, (topic, bytes)) in got.iter().enumerate() {
            assert_eq!(topic, &format!("bulk.{i}"), "{kind}: in order");
            assert_eq!(
                bytes.len(),
                SIZES[i],
                "{kind}: payload {i} from {from}, length"
            );
            assert!(
                *bytes == payload(from, i),
                "{kind}: payload {i} from node {from} arrived altered"
            );
        }
    }
    let c = a.connections();
    assert_eq!(c.len(), 1, "{kind}: one connection: {c:?}");
}

#[test]
fn large_payloads_over_udp_both_ways_arrive_whole_and_in_order() {
    both_ways("udp");
}

#[test]
fn large_payloads_over_tcp_both_ways_arrive_whole_and_in_order() {
    both_ways("tcp");
}
