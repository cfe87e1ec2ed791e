//! The static bootstrap service through `examples/node.rs --bootstrap FILE`: a node given
//! another's nodeInfo in a file reports it as a peer (source `bootstrap`) and reaches it; a
//! file that is not a JSON array stops the node with an error.

mod support;

use std::time::Duration;

use serde_json::json;

use support::{node_bin, JsonProc, TempDir};

const LIMIT: Duration = Duration::from_secs(30);

#[test]
fn a_node_given_a_bootstrap_file_reports_and_reaches_its_peers() {
    let bin = node_bin();
    let dir = TempDir::new("bootstrap");
    let mut b = JsonProc::spawn(
        "b",
        std::process::Command::new(&bin)
            .arg("--data")
            .arg(dir.path("b"))
            .stderr(std::process::Stdio::null()),
    );
    let b_info = b.wait_for(LIMIT, |v| v["event"] == "ready")["nodeInfo"].clone();
    let file = dir.path("peers.json");
    std::fs::write(&file, serde_json::to_vec(&json!([b_info])).unwrap()).unwrap();
    let mut a = JsonProc::spawn(
        "a",
        std::process::Command::new(&bin)
            .arg("--data")
            .arg(dir.path("a"))
            .arg("--bootstrap")
            .arg(&file)
            .stderr(std::process::Stdio::null()),
    );
    let a_info = a.wait_for(LIMIT, |v| v["event"] == "ready")["nodeInfo"].clone();
    let peer = a.wait_for(LIMIT, |v| v["event"] == "peer");
    assert_eq!(peer["source"], "bootstrap");
    assert_eq!(peer["nodeInfo"], b_info);
    a.cmd(
        json!({"cmd": "send", "id": 1, "topic": "test.boot", "to": b_info["signId"], "payload": 7}),
    );
    let got = b.wait_for(LIMIT, |v| {
        v["event"] == "message" && v["topic"] == "public.test.boot"
    });
    assert_eq!(got["sender"], a_info["signId"]);
    a.quit(LIMIT);
    b.quit(LIMIT);

    std::fs::write(&file, b"{\"not\": \"a list\"}").unwrap();
    let out = std::process::Command::new(&bin)
        .arg("--data")
        .arg(dir.path("c"))
        .arg("--bootstrap")
        .arg(&file)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("JSON array"));
}
