//! The connection manager does work in proportion to what happened, not to what is open: with
//! 100 idle connections, an exchange with one more peer visits O(1) connections per turn
//! (counted by `Stats::conn_visits`, no timing involved), and an idle node with connections
//! asks for its next turn at its nearest real deadline, not at a periodic tick.

use std::time::{Duration, Instant};

use mm_platform::{Message, NetConfig, Platform};

fn introduce(a: &mut Platform, b: &Platform) {
    let info = b.node_info();
    let _ = a.messaging().send("transports.nodeInfo", "local", &info);
}

/// Keepalives far away, so that nothing is due while the test looks.
fn quiet() -> NetConfig {
    NetConfig {
        keepalive: Duration::from_secs(600),
        dead_after: Duration::from_secs(1800),
        // Every node here connects from 127.0.0.1.
        max_inbound_per_ip: 1024,
        ..NetConfig::default()
    }
}

fn active(p: &Platform) -> usize {
    p.connections().iter().filter(|c| c.active).count()
}

/// Polls every node (zero timeout) until `done` or 30 s.
fn poll_until(
    hub: &mut Platform,
    others: &mut [Platform],
    mut done: impl FnMut(&Platform) -> bool,
) {
    let end = Instant::now() + Duration::from_secs(30);
    while !done(hub) && Instant::now() < end {
        hub.poll(Some(Duration::ZERO)).unwrap();
        for o in others.iter_mut() {
            o.poll(Some(Duration::ZERO)).unwrap();
        }
        hub.poll(Some(Duration::from_millis(1))).unwrap();
    }
}

#[test]
fn an_exchange_costs_o1_connection_visits_with_100_idle_connections_open() {
    const IDLE: usize = 100;
    let mut hub = Platform::builder().net(quiet()).build().unwrap();
    let mut idle: Vec<Platform> = (0..IDLE)
        .map(|_| Platform::builder().net(quiet()).build().unwrap())
        .collect();
    let (_, hub_rx) = hub.messaging().on_channel("public.hello", 4 * IDLE);
    let hub_id = hub.sign_id();
    for p in idle.iter_mut() {
        introduce(p, &hub);
        assert!(p.messaging().send("hello", hub_id, &1).is_ok());
    }
    let mut hellos = 0;
    poll_until(&mut hub, &mut idle, |h| {
        hellos += hub_rx.try_iter().count();
        hellos >= IDLE && active(h) >= IDLE
    });
    assert_eq!(active(&hub), IDLE, "every idle node connected");
    assert_eq!(hellos, IDLE);
    // Let the handshakes' last acknowledgements settle (idle nodes are not polled below).
    for _ in 0..50 {
        for p in idle.iter_mut() {
            p.poll(Some(Duration::ZERO)).unwrap();
        }
        hub.poll(Some(Duration::from_millis(1))).unwrap();
    }

    // One more node exchanges messages with the hub, ping-pong.
    let mut x = Platform::builder().net(quiet()).build().unwrap();
    introduce(&mut x, &hub);
    introduce(&mut hub, &x);
    let (_, x_rx) = x.messaging().on_channel("public.pong", 64);
    let (_, ping_rx) = hub.messaging().on_channel("public.ping", 64);
    let x_id = x.sign_id();
    let before = hub.stats();
    let rounds = 20;
    let mut pongs = 0;
    let end = Instant::now() + Duration::from_secs(30);
    assert!(x.messaging().send("ping", hub_id, &0).is_ok());
    while pongs < rounds && Instant::now() < end {
        hub.poll(Some(Duration::from_millis(1))).unwrap();
        for m in ping_rx.try_iter() {
            let n: u32 = m.json().unwrap();
            assert!(hub.messaging().send("pong", x_id, &n).is_ok());
        }
        x.poll(Some(Duration::from_millis(1))).unwrap();
        let got: Vec<Message> = x_rx.try_iter().collect();
        for _ in got {
            pongs += 1;
            if pongs < rounds {
                assert!(x.messaging().send("ping", hub_id, &pongs).is_ok());
            }
        }
    }
    assert_eq!(pongs, rounds);
    let after = hub.stats();
    let turns = after.turns - before.turns;
    let visits = after.conn_visits - before.conn_visits;
    let peers = after.peer_visits - before.peer_visits;
    assert!(turns > 0);
    // The connection to x (and at most a stray idle one now and then), never all 101.
    assert!(
        visits <= 2 * turns + 8,
        "{visits} connection visits in {turns} turns with {IDLE} idle connections open"
    );
    assert!(
        peers <= turns + 8,
        "{peers} peer visits in {turns} turns with {IDLE} idle peers known"
    );
    assert_eq!(active(&hub), IDLE + 1);
}

#[test]
fn an_idle_node_with_connections_sleeps_until_its_nearest_deadline() {
    let cfg = NetConfig {
        keepalive: Duration::from_secs(120),
        dead_after: Duration::from_secs(600),
        ..NetConfig::default()
    };
    let mut a = Platform::builder().net(cfg).build().unwrap();
    let mut b = Platform::builder().net(cfg).build().unwrap();
    introduce(&mut a, &b);
    let (_, rb) = b.messaging().on_channel("public.hi", 4);
    assert!(a.messaging().send("hi", b.sign_id(), &1).is_ok());
    let mut got = 0;
    let end = Instant::now() + Duration::from_secs(20);
    while got == 0 && Instant::now() < end {
        a.poll(Some(Duration::from_millis(1))).unwrap();
        b.poll(Some(Duration::from_millis(1))).unwrap();
        got += rb.try_iter().count();
    }
    assert_eq!(got, 1);
    // Settle: the last acknowledgements and stream timers run out (bounded).
    let settle_until = |p: &Platform| {
        p.next_deadline()
            .is_some_and(|d| d > Instant::now() + Duration::from_secs(5))
    };
    let end = Instant::now() + Duration::from_secs(20);
    while !(settle_until(&a) && settle_until(&b)) && Instant::now() < end {
        a.poll(Some(Duration::from_millis(5))).unwrap();
        b.poll(Some(Duration::from_millis(5))).unwrap();
    }
    assert_eq!(active(&a), 1);
    assert_eq!(active(&b), 1);
    for p in [&a, &b] {
        let d = p.next_deadline().expect("a keepalive is due some day");
        let now = Instant::now();
        // No periodic tick: the next turn is seconds away (keepalive 120 s, the listener's
        // minute key rotation, the 5-minute nodeInfo republication)...
        assert!(d > now + Duration::from_secs(5), "{:?}", d - now);
        // ... and not later than the keepalive.
        assert!(d <= now + Duration::from_secs(120));
    }
    // Idle turns visit no connection.
    let before = a.stats().conn_visits;
    for _ in 0..20 {
        a.poll(Some(Duration::ZERO)).unwrap();
    }
    assert_eq!(a.stats().conn_visits, before);
}
