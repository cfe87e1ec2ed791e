//! A peer that restarts (SIGKILL, then the same data directory and ports) gets what was queued
//! for it while it was gone, within 10 s of its restart, whichever transports both sides have:
//! UDP only, TCP only, both. The old session is dead on the restarted side (its packets are
//! ignored over UDP, reset over TCP) and must be detected and replaced, not waited out.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{free_port, node_bin, JsonProc, TempDir};

fn start(dir: &TempDir, name: &str, flags: &[String]) -> (JsonProc, serde_json::Value) {
    let mut cmd = Command::new(node_bin());
    cmd.arg("--data")
        .arg(dir.path(name))
        .args(flags)
        .env("RUST_LOG", "mm_platform=debug")
        .stderr(if std::env::var_os("MM_NODE_STDERR").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
    let mut p = JsonProc::spawn(name, &mut cmd);
    let info = p.wait_for(Duration::from_secs(20), |v| v["event"] == "ready")["nodeInfo"].clone();
    (p, info)
}

fn sign_of(info: &serde_json::Value) -> String {
    info["signId"].as_str().expect("signId").to_owned()
}

/// A and B exchange a message; B is SIGKILLed; A queues a non-real-time message; B restarts:
/// the message arrives within 10 s of B's restart. Returns how long it took.
fn redelivered_after_restart(udp: bool, tcp: bool, label: &str) -> Duration {
    let dir = TempDir::new(&format!("peer-restart-{label}"));
    // Fixed ports, so that B restarts where A knows it.
    let flags = || -> Vec<String> {
        let mut f = Vec::new();
        for (on, flag) in [(udp, "--udp"), (tcp, "--tcp")] {
            f.push(flag.to_string());
            f.push(if on {
                addr(free_port(true))
            } else {
                "off".into()
            });
        }
        f
    };
    let b_flags = flags();
    let (mut b, info_b) = start(&dir, "b", &b_flags);
    let (mut a, info_a) = start(&dir, "a", &flags());
    let (sa, sb) = (sign_of(&info_a), sign_of(&info_b));
    a.cmd(json!({"cmd": "nodeInfo", "nodeInfo": info_b}));
    b.cmd(json!({"cmd": "nodeInfo", "nodeInfo": info_a}));
    a.cmd(json!({"cmd": "send", "id": 1, "topic": "t.hello", "to": sb, "payload": 1}));
    b.wait_for(Duration::from_secs(10), |v| v["topic"] == "public.t.hello");
    b.cmd(json!({"cmd": "send", "id": 2, "topic": "t.back", "to": sa, "payload": 2}));
    a.wait_for(Duration::from_secs(10), |v| v["topic"] == "public.t.back");

    b.kill_and_drain(Duration::from_millis(200));
    drop(b);
    a.cmd(
        json!({"cmd": "send", "id": 3, "topic": "t.later", "to": sb, "payload": 3,
        "realtime": false}),
    );
    std::thread::sleep(Duration::from_millis(500));

    let (mut b, info_b2) = start(&dir, "b", &b_flags);
    assert_eq!(info_b2, info_b, "same identity and ports");
    let t0 = Instant::now();
    b.wait_for(Duration::from_secs(10), |v| v["topic"] == "public.t.later");
    let took = t0.elapsed();
    a.wait_for(Duration::from_secs(10), |v| {
        v["event"] == "sent" && v["id"] == 3 && v["ok"] == true
    });
    eprintln!("{label}: redelivered {took:?} after the restart");
    a.quit(Duration::from_secs(5));
    b.quit(Duration::from_secs(5));
    took
}

fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

#[test]
fn a_restarted_peer_gets_its_messages_over_udp_only() {
    redelivered_after_restart(true, false, "udp");
}

#[test]
fn a_restarted_peer_gets_its_messages_over_tcp_only() {
    redelivered_after_restart(false, true, "tcp");
}

#[test]
fn a_restarted_peer_gets_its_messages_over_both() {
    redelivered_after_restart(true, true, "both");
}
