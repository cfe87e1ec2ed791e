//! What the Mainline interop tests (`mainline_libtorrent`, `mainline_pubky`) share: hex, and a
//! node that knows only another implementation's testnet resolving ours and messaging it.

use std::time::{Duration, Instant};

use mm_platform::services::mainline::{Mainline, MainlineConfig, MainlineStats};
use mm_platform::{Event, Platform};
use serde_json::{json, Value};

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The bytes of lower-case or upper-case hex (panics on anything else: test data).
pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

/// A node whose Mainline service (of `config`, with publishing on) publishes its nodeInfo;
/// returns it once one publication is done (at most `limit`) with the service's figures,
/// after checking that at least one node of the testnet stored it.
pub fn publisher(test: &str, config: MainlineConfig, limit: Duration) -> (Platform, MainlineStats) {
    let service = Mainline::new(config.publish(true));
    let stats = service.stats_handle();
    let mut publisher = Platform::builder().service(service).build().unwrap();
    let end = Instant::now() + limit;
    while stats.get().publishes == 0 {
        assert!(
            Instant::now() < end,
            "{test}: no publication: {:?}",
            stats.get()
        );
        publisher.poll(Some(Duration::from_millis(10))).unwrap();
    }
    let s = stats.get();
    eprintln!(
        "{test}: stored on {} nodes of the testnet, first ack after {:?}, done after {:?} \
         ({} queries, {} replies)",
        s.last_publish_stored,
        s.last_publish_first_ack,
        s.last_publish_took,
        s.queries_sent,
        s.replies
    );
    assert!(s.last_publish_stored >= 1, "{s:?}");
    (publisher, s)
}

/// A new node with a Mainline service of `config` (bootstrapped only into the other
/// implementation's testnet) resolves `publisher`'s nodeInfo through the DHT and sends it
/// `{"via": via}`; waits (at most `limit`) for the message to arrive, checks that the nodeInfo
/// came from the Mainline service, and returns the resolver's service figures.
pub fn resolve_and_message(
    test: &str,
    publisher: &mut Platform,
    config: MainlineConfig,
    via: &str,
    limit: Duration,
) -> MainlineStats {
    let ours = publisher.node_info().to_json();
    // The counters of the DHT it resolves in: the IPv6 one when it has no IPv4 bootstrap.
    let v6 = config.bootstrap.is_empty();
    let service = Mainline::new(config);
    let stats = if v6 {
        service.stats6_handle()
    } else {
        service.stats_handle()
    };
    let mut resolver = Platform::builder().service(service).build().unwrap();
    let (_, inbox) = publisher.on_channel("public.test.hello", 8);
    let to = publisher.sign_id().to_string();
    let status = resolver
        .messaging()
        .send("test.hello", to.as_str(), &json!({ "via": via }));
    status.expect("queued");
    let end = Instant::now() + limit;
    let mut resolved = None;
    let msg = loop {
        assert!(
            Instant::now() < end,
            "{test}: not delivered: resolver {:?}, resolved {resolved:?}",
            stats.get()
        );
        resolver.poll(Some(Duration::from_millis(5))).unwrap();
        publisher.poll(Some(Duration::from_millis(5))).unwrap();
        for e in resolver.drain_events() {
            if let Event::NodeInfo { source, node_info } = e {
                if source == "mainline" && node_info["signId"] == ours["signId"] {
                    resolved = Some(node_info);
                }
            }
        }
        if let Ok(m) = inbox.try_recv() {
            break m;
        }
    };
    assert_eq!(msg.sender.to_string(), resolver.sign_id().to_string());
    assert_eq!(
        msg.json::<Value>().unwrap(),
        json!({ "via": via }),
        "{msg:?}"
    );
    let resolved = resolved.expect("the nodeInfo came from the Mainline service");
    assert_eq!(resolved["boxId"], ours["boxId"]);
    let r = stats.get();
    eprintln!("{test}: resolver {r:?}");
    r
}
