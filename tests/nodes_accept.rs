//! `PlatformBuilder::accept_peers`: a node that accepts only listed peers refuses every other
//! node's connection at the CurveCP handshake, while listed peers connect and deliver.

use mm_platform::Shared;
use std::time::{Duration, Instant};

use mm_platform::{DeliveryError, NetConfig, Platform, SendOptions};

fn introduce(a: &mut Platform, b: &Platform) {
    let info = b.node_info();
    let _ = a.messaging().send("transports.nodeInfo", "local", &info);
}

#[test]
fn a_refused_peer_cannot_connect_and_an_accepted_one_can() {
    let fast = NetConfig {
        connect_timeout: Duration::from_millis(300),
        max_attempts: 2,
        ..NetConfig::default()
    };
    let mut friend = Platform::builder().net(fast).build().unwrap();
    let mut stranger = Platform::builder().net(fast).build().unwrap();
    let mut server = Platform::builder()
        .accept_peers([friend.sign_id()])
        .build()
        .unwrap();
    introduce(&mut friend, &server);
    introduce(&mut stranger, &server);
    let (_, rx) = server.messaging().on_channel("public.knock", 16);
    let sid = server.sign_id();
    let outcome = Shared::new(None);
    let o = outcome.clone();
    let st = stranger.send_with_callback(
        "ms",
        "knock",
        sid,
        b"\"stranger\"".to_vec(),
        SendOptions::default(),
        move |_c, r| *o.borrow_mut() = Some(r),
    );
    assert!(st.is_ok());
    assert!(friend.messaging().send("knock", sid, &"friend").is_ok());
    let mut got: Vec<String> = Vec::new();
    let end = Instant::now() + Duration::from_secs(20);
    while (got.is_empty() || outcome.borrow().is_none()) && Instant::now() < end {
        for p in [&mut friend, &mut stranger, &mut server] {
            p.poll(Some(Duration::from_millis(1))).unwrap();
        }
        got.extend(rx.try_iter().map(|m| m.json::<String>().unwrap()));
    }
    assert_eq!(got, vec!["friend".to_string()]);
    assert!(
        matches!(
            outcome.borrow().as_ref(),
            Some(Err(DeliveryError::Unreachable(_)))
        ),
        "{:?}",
        outcome.borrow()
    );
    let peers: Vec<_> = server
        .connections()
        .into_iter()
        .filter_map(|c| c.peer)
        .collect();
    assert_eq!(peers, vec![friend.sign_id()]);
    assert!(stranger.connections().iter().all(|c| !c.active));
}
