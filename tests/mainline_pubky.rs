//! The Mainline DHT service against pubky's `mainline` crate (Rust, 8.x: what pkarr and
//! iroh's pkarr publishing run), a real other side: a `Testnet` of its nodes on 127.0.0.1 and
//! a client of it, in the helper crate `tests/pubky-mainline/` (its own workspace, built here
//! with `cargo build --manifest-path`; its nodes and client are given the testnet's addresses
//! as bootstrap, never the public routers its defaults name, so nothing leaves 127.0.0.1).
//!
//! - Its nodes answer only KRPC transaction ids of exactly 4 bytes (a raw `find_node` with a
//!   2-byte id gets no reply, the same with 4 bytes does): why ours are 4 bytes.
//! - Our node publishes its nodeInfo through the testnet, and the crate's own client reads the
//!   BEP 44 item back (it checks the signature and the target itself).
//! - A second node of ours that knows only the testnet resolves the first through it and
//!   delivers a message to it.
//!
//! When the helper cannot be built (no `cargo`, no registry access) the tests print a loud
//! skip message, or fail when `MM_REQUIRE_PUBKY=1` (CI).

mod support;

use std::net::{SocketAddrV4, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use mm_platform::proto::mainline::krpc::{self, Fields, Kind, Message, Method};
use mm_platform::services::mainline::MainlineConfig;
use support::mainline::{hex, publisher, resolve_and_message, unhex};
use support::JsonProc;

const LIMIT: Duration = Duration::from_secs(30);
/// Nodes of the pubky testnet.
const NODES: usize = 10;

/// Builds the helper; `None` (after a loud message) if it cannot be, unless
/// `MM_REQUIRE_PUBKY=1`, which makes that a failure.
fn helper_bin(test: &str) -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("pubky-mainline");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let built = Command::new(cargo)
        .arg("build")
        .arg("--quiet")
        .arg("--manifest-path")
        .arg(root.join("tests/pubky-mainline/Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target)
        .status();
    let bin = target.join("debug").join("pubky-mainline");
    match built {
        Ok(st) if st.success() && bin.is_file() => Some(bin),
        other => {
            if std::env::var("MM_REQUIRE_PUBKY").as_deref() == Ok("1") {
                panic!(
                    "{test}: cannot build tests/pubky-mainline ({other:?}) and MM_REQUIRE_PUBKY=1"
                );
            }
            mm_platform::proto::skip_test(
                test,
                &format!(
                    "cannot build tests/pubky-mainline ({other:?}); it needs \
                     the `mainline` crate from the registry. CI sets MM_REQUIRE_PUBKY=1."
                ),
            );
            None
        }
    }
}

/// A pubky testnet of [`NODES`] nodes and its client; returns it with the testnet's addresses.
fn testnet(test: &str) -> Option<(JsonProc, Vec<SocketAddrV4>)> {
    let bin = helper_bin(test)?;
    let mut cmd = Command::new(bin);
    cmd.arg(NODES.to_string());
    let mut p = JsonProc::spawn("pubky-mainline", &mut cmd);
    let line = p.wait_for(LIMIT, |v| v.get("bootstrap").is_some());
    let addrs: Vec<SocketAddrV4> = line["bootstrap"]
        .as_array()
        .expect("bootstrap list")
        .iter()
        .map(|a| a.as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(addrs.len(), NODES);
    assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    Some((p, addrs))
}

/// Sends a `find_node` with transaction id `t` to `to`; returns the reply's `t`, if any
/// came within a second.
fn find_node_with_tid(sock: &UdpSocket, to: SocketAddrV4, t: &[u8]) -> Option<Vec<u8>> {
    let q = Message::query(
        t.to_vec(),
        Method::FindNode,
        Fields {
            id: Some([0x5a; 20]),
            target: Some([0xa5; 20]),
            ..Fields::default()
        },
        true,
    );
    sock.send_to(&krpc::encode(&q).unwrap(), to).unwrap();
    let mut buf = [0u8; 1500];
    let end = Instant::now() + Duration::from_secs(1);
    // Bounded: one second of reads.
    while Instant::now() < end {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) if from == std::net::SocketAddr::V4(to) => {
                let m = krpc::decode(&buf[..n]).expect("its reply decodes");
                assert_eq!(m.kind, Kind::Response, "{m:?}");
                return Some(m.t);
            }
            _ => {}
        }
    }
    None
}

#[test]
fn pubky_mainline_answers_only_four_byte_transaction_ids() {
    let test = "pubky mainline transaction ids";
    let Some((_net, addrs)) = testnet(test) else {
        return;
    };
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let two = find_node_with_tid(&sock, addrs[1], &[0x12, 0x34]);
    let four = find_node_with_tid(&sock, addrs[1], &[0x12, 0x34, 0x56, 0x78]);
    eprintln!("{test}: 2-byte t -> {two:?}, 4-byte t -> {four:?}");
    assert_eq!(two, None, "a 2-byte id is dropped by pubky's mainline");
    assert_eq!(four, Some(vec![0x12, 0x34, 0x56, 0x78]));
}

#[test]
fn pubky_testnet_reads_our_item_and_resolves_ours_for_a_message() {
    let test = "pubky mainline interop";
    let Some((mut net, addrs)) = testnet(test) else {
        return;
    };
    // Our node publishes through the pubky testnet.
    let (mut publisher, s) = publisher(test, MainlineConfig::new(addrs.clone()), LIMIT);

    // The crate's own client reads our item (it verifies the signature and target).
    let key = hex(publisher.sign_id().as_bytes());
    net.cmd(json!({"cmd": "get", "key": key}));
    let got = net.wait_for(LIMIT, |v| v.get("item").is_some());
    let item = &got["item"];
    assert!(item.is_object(), "pubky's client found no item: {got}");
    assert_eq!(item["seq"].as_i64(), Some(s.seq), "{got}");
    let value: Value = serde_json::from_slice(&unhex(item["value"].as_str().unwrap()))
        .expect("our item's value is a JSON nodeInfo");
    let ours = publisher.node_info().to_json();
    assert_eq!(value["signId"], ours["signId"], "{value}");
    assert_eq!(value["boxId"], ours["boxId"], "{value}");

    // A node that knows only the pubky testnet resolves ours through it, then talks to it.
    resolve_and_message(
        test,
        &mut publisher,
        MainlineConfig::new(addrs[5..].to_vec()),
        "pubky",
        LIMIT,
    );
    net.quit(LIMIT);
}
