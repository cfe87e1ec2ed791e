//! The command line protocol of `examples/node.rs`, driven as a child process: what it does
//! with input that is not a well-formed command.
//!
//! - a line that is not UTF-8, not JSON or not an object is answered with an error event and
//!   the node goes on with the next line;
//! - a line longer than `--max-line` (default twice the maximal frame, 32 MiB) is discarded as
//!   it streams in, never held whole, and answered with an error naming the bound; so is a
//!   line of more JSON values than the bound allows (one per 32 bytes); memory taken by large
//!   lines is given back;
//! - a send the platform refuses (a payload beyond the maximal message) is reported, and a
//!   large message taken and delivered is not kept afterwards;
//! - every malformed field of a command is answered with an error event naming the field and
//!   the command's id;
//! - the end of input quits once the commands before it have run.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use support::{node_bin, JsonProc, TempDir};

const LIMIT: Duration = Duration::from_secs(30);
/// The default `--max-line`: twice `NetConfig::max_frame` (16 MiB).
const DEFAULT_MAX_LINE: usize = 32 << 20;

/// Starts a node without transports (nothing here leaves the process), its data in
/// `dir/name`, with `extra` arguments; returns it once it is ready.
fn start(dir: &TempDir, name: &str, extra: &[&str]) -> JsonProc {
    let mut cmd = Command::new(node_bin());
    cmd.arg("--data")
        .arg(dir.path(name))
        .args(["--udp", "off", "--tcp", "off"])
        .args(extra)
        .stderr(std::process::Stdio::null());
    let mut p = JsonProc::spawn(name, &mut cmd);
    p.wait_for(LIMIT, |v| v["event"] == "ready");
    p
}

/// Sends `{"cmd":"connections","id":id}` and waits for the answer: the node still reads and
/// runs commands, and every line before this one has been handled.
fn still_answers(p: &mut JsonProc, id: &str) {
    p.cmd(json!({"cmd": "connections", "id": id}));
    p.wait_for(LIMIT, |v| v["event"] == "connections" && v["id"] == id);
    let alive = p.proc.child.as_mut().expect("running").try_wait();
    assert!(
        matches!(alive, Ok(None)),
        "{}: exited: {alive:?}",
        p.proc.name
    );
}

/// The error event about line `line` (numbered from 1), whose text must contain `what`.
fn line_error(p: &mut JsonProc, line: u64, what: &str) -> Value {
    let e = p.wait_for(LIMIT, move |v| v["event"] == "error" && v["line"] == line);
    assert!(
        e["error"].as_str().is_some_and(|t| t.contains(what)),
        "line {line}: expected an error about {what}, got {e}"
    );
    e
}

/// A `send` command line of exactly `len` bytes (without the newline) whose payload is a
/// string of `a`s.
fn send_line(id: &str, len: usize) -> Vec<u8> {
    let head = format!(r#"{{"cmd":"send","id":"{id}","topic":"test.big","to":"local","payload":""#);
    let tail = "\"}";
    assert!(len >= head.len() + tail.len());
    let mut line = Vec::with_capacity(len + 1);
    line.extend_from_slice(head.as_bytes());
    line.resize(len - tail.len(), b'a');
    line.extend_from_slice(tail.as_bytes());
    line
}

/// `VmRSS` and `VmHWM` (peak) of a process, in bytes.
#[cfg(target_os = "linux")]
fn memory(pid: u32) -> (usize, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| -> usize {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing from /proc/{pid}/status"));
        let kib: usize = line
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .expect("a number of kB");
        kib * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[test]
fn lines_that_are_not_utf8_json_or_objects_are_answered_and_the_node_goes_on() {
    let dir = TempDir::new("node-cli-utf8");
    let mut p = start(&dir, "a", &[]);

    p.write_raw(
        b"{\"cmd\":\"connections\",\"id\":\"\xff\xfe\"}\n".to_vec(),
        LIMIT,
    );
    line_error(&mut p, 1, "UTF-8");
    still_answers(&mut p, "after-utf8");

    p.write_raw(b"{\"cmd\": \"connections\"\n".to_vec(), LIMIT);
    line_error(&mut p, 3, "not JSON");
    p.write_raw(b"[\"cmd\", \"connections\"]\n".to_vec(), LIMIT);
    line_error(&mut p, 4, "not a JSON object");
    // Blank lines are skipped (still counted).
    p.write_raw(b"\n  \r\n".to_vec(), LIMIT);
    still_answers(&mut p, "after-json");
    p.write_raw(b"\xc3\n".to_vec(), LIMIT);
    line_error(&mut p, 8, "UTF-8");
    still_answers(&mut p, "after-truncated-utf8");

    let errors = p.seen.iter().filter(|v| v["event"] == "error").count();
    assert_eq!(errors, 4, "one error per bad line: {:?}", p.seen);
    p.quit(LIMIT);
}

#[test]
fn an_overlong_line_is_discarded_as_it_streams_in_and_named() {
    let dir = TempDir::new("node-cli-long");
    const MAX: usize = 1 << 20;
    let mut p = start(&dir, "a", &["--max-line", &MAX.to_string()]);
    still_answers(&mut p, "warm");
    #[cfg(target_os = "linux")]
    let (_, peak_before) = memory(p.proc.id());

    // 20 MB in one line, then the next command.
    let mut long = send_line("long", 20_000_000);
    long.push(b'\n');
    p.write_raw(long, LIMIT);
    let e = line_error(&mut p, 2, "--max-line");
    assert!(
        e["error"].as_str().unwrap().contains(&MAX.to_string()),
        "the error names the bound: {e}"
    );
    assert!(
        e.get("id").is_none(),
        "a discarded line is never parsed: {e}"
    );
    still_answers(&mut p, "after-long");
    assert!(
        !p.seen
            .iter()
            .any(|v| v["id"] == "long" && v["event"] == "sent"),
        "the discarded send never ran: {:?}",
        p.seen
    );

    // A line of exactly the bound is taken; one byte more is not.
    let mut at = send_line("at-bound", MAX);
    at.push(b'\n');
    p.write_raw(at, LIMIT);
    let sent = p.wait_for(LIMIT, |v| v["event"] == "sent" && v["id"] == "at-bound");
    assert_eq!(sent["ok"], true, "{sent}");
    let mut over = send_line("over-bound", MAX + 1);
    over.push(b'\n');
    p.write_raw(over, LIMIT);
    line_error(&mut p, 5, "--max-line");
    still_answers(&mut p, "after-over");
    assert!(!p.seen.iter().any(|v| v["id"] == "over-bound"));

    // A line within the bound but of more values than it allows (one per 32 bytes of it):
    // refused before parsing, which would take 16 times its size.
    let mut many = br#"{"cmd":"send","id":"many","topic":"t","to":"local","payload":[0"#.to_vec();
    while many.len() < MAX / 2 {
        many.extend_from_slice(b",0");
    }
    many.extend_from_slice(b"]}\n");
    p.write_raw(many, LIMIT);
    let e = line_error(&mut p, 7, "JSON values");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains(&(MAX / 32).to_string()),
        "{e}"
    );
    // Exactly that many is taken: the object, its 5 fields (their values follow a `:`, the
    // fields after the first a `,`: 1 + 5 + 4 counted), the array's first element and the
    // rest.
    let mut fewer = br#"{"cmd":"send","id":"fewer","topic":"t","to":"local","payload":[0"#.to_vec();
    for _ in 0..MAX / 32 - 11 {
        fewer.extend_from_slice(b",0");
    }
    fewer.extend_from_slice(b"]}\n");
    p.write_raw(fewer, LIMIT);
    let sent = p.wait_for(LIMIT, |v| v["event"] == "sent" && v["id"] == "fewer");
    assert_eq!(sent["ok"], true, "{sent}");
    assert!(!p.seen.iter().any(|v| v["id"] == "many"));

    // The 20 MB line was never held whole: the peak grew by far less than its size.
    #[cfg(target_os = "linux")]
    {
        let (_, peak_after) = memory(p.proc.id());
        assert!(
            peak_after < peak_before + 8_000_000,
            "peak RSS grew from {peak_before} to {peak_after} bytes for a discarded 20 MB line"
        );
    }
    p.quit(LIMIT);
}

#[test]
fn a_send_beyond_the_maximal_message_is_reported_and_large_lines_give_memory_back() {
    let dir = TempDir::new("node-cli-large");
    let mut p = start(&dir, "a", &[]);
    still_answers(&mut p, "warm");
    #[cfg(target_os = "linux")]
    let (rss_before, _) = memory(p.proc.id());

    // 17 MB of payload: within the line bound, beyond the platform's 16 MiB message.
    let mut big = send_line("big", 17_000_000);
    big.push(b'\n');
    p.write_raw(big, LIMIT);
    let sent = p.wait_for(LIMIT, |v| v["event"] == "sent" && v["id"] == "big");
    assert_eq!(sent["ok"], false, "{sent}");
    assert!(
        sent["error"]
            .as_str()
            .unwrap()
            .contains("is larger than the limit of 16777216 bytes"),
        "{sent}"
    );

    // The same without an id: nothing to report it on but an error event.
    let mut anonymous = br#"{"cmd":"send","topic":"test.big","to":"local","payload":""#.to_vec();
    anonymous.resize(17_000_000, b'b');
    anonymous.extend_from_slice(b"\"}\n");
    p.write_raw(anonymous, LIMIT);
    let e = p.wait_for(LIMIT, |v| v["event"] == "error" && v["cmd"] == "send");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("is larger than the limit of 16777216 bytes"),
        "{e}"
    );

    // 10 MB to the local bus: taken, delivered, printed, and then not kept.
    let mut medium = send_line("medium", 10_000_000);
    medium.push(b'\n');
    p.write_raw(medium, LIMIT);
    let sent = p.wait_for(LIMIT, |v| v["event"] == "sent" && v["id"] == "medium");
    assert_eq!(sent["ok"], true, "{sent}");
    p.wait_for(LIMIT, |v| {
        v["event"] == "message" && v["topic"] == "self.test.big" && v["payload"].is_string()
    });
    p.seen.retain(|v| v["event"] != "message");

    // One byte over the default bound (twice the maximal frame).
    let mut over = send_line("over-default", DEFAULT_MAX_LINE + 1);
    over.push(b'\n');
    p.write_raw(over, LIMIT);
    let e = line_error(&mut p, 5, "--max-line");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains(&DEFAULT_MAX_LINE.to_string()),
        "{e}"
    );
    still_answers(&mut p, "after-large");
    assert!(!p.seen.iter().any(|v| v["id"] == "over-default"));

    // What the large lines took is given back (before: 13 MB grew to 155 MB and stayed).
    #[cfg(target_os = "linux")]
    {
        let (rss_after, peak) = memory(p.proc.id());
        eprintln!("RSS before {rss_before}, after {rss_after}, peak {peak} bytes");
        assert!(
            rss_after < rss_before + 8_000_000,
            "RSS grew from {rss_before} to {rss_after} bytes after large lines"
        );
    }
    p.quit(LIMIT);
}

#[test]
fn every_malformed_field_is_answered_with_an_error_naming_it_and_the_command() {
    let dir = TempDir::new("node-cli-fields");
    let mut p = start(&dir, "a", &[]);
    let info = p
        .seen
        .iter()
        .find(|v| v["event"] == "ready")
        .expect("ready")["nodeInfo"]
        .clone();
    let sign_id = info["signId"].as_str().unwrap().to_owned();
    let box_id = info["boxId"].as_str().unwrap().to_owned();
    // The signId's bytes as a box key: a valid key, but not the conversion of the signId.
    let not_the_conversion = sign_id.clone();

    // (command, field the error must name)
    let cases: Vec<(Value, &str)> = vec![
        (json!({"cmd": "nodeInfo"}), "nodeInfo"),
        (json!({"cmd": "nodeInfo", "nodeInfo": 5}), "nodeInfo"),
        (
            json!({"cmd": "nodeInfo", "nodeInfo": {"signId": "nope", "boxId": box_id}}),
            "nodeInfo.signId",
        ),
        (
            json!({"cmd": "nodeInfo", "nodeInfo": {"signId": sign_id, "boxId": 7}}),
            "nodeInfo.boxId",
        ),
        (
            json!({"cmd": "nodeInfo",
                "nodeInfo": {"signId": sign_id, "boxId": not_the_conversion}}),
            "nodeInfo.boxId",
        ),
        (
            json!({"cmd": "nodeInfo",
                "nodeInfo": {"signId": sign_id, "boxId": box_id, "connectionInfo": "x"}}),
            "nodeInfo.connectionInfo",
        ),
        (json!({"cmd": "friends"}), "keys"),
        (json!({"cmd": "friends", "keys": "abc"}), "keys"),
        (
            json!({"cmd": "friends", "keys": [sign_id, "nope"]}),
            "keys[1]",
        ),
        (json!({"cmd": "devices", "keys": [3]}), "keys[0]"),
        (json!({"cmd": "put", "key": "k", "value": 1}), "cmd"),
        (json!({"cmd": "get", "key": "k"}), "cmd"),
        (
            json!({"cmd": "send", "topic": "t", "to": "local", "realtime": "yes"}),
            "realtime",
        ),
        (
            json!({"cmd": "send", "topic": "t", "to": "local", "expireAfter": -5}),
            "expireAfter",
        ),
        (
            json!({"cmd": "send", "topic": "t", "to": "local", "expireAfter": "10"}),
            "expireAfter",
        ),
        (
            json!({"cmd": "send", "topic": "t", "to": "local", "expireAfter": 1.5}),
            "expireAfter",
        ),
        (json!({"cmd": "send", "to": "local"}), "topic"),
        (json!({"cmd": "send", "topic": 4, "to": "local"}), "topic"),
        (json!({"cmd": "send", "topic": "t"}), "to"),
        (json!({"cmd": "send", "topic": "t", "to": "nobody"}), "to"),
        (
            json!({"cmd": "send", "topic": "t", "to": "local", "realTime": false}),
            "realTime",
        ),
        (json!({"cmd": "quit", "now": true}), "now"),
        (json!({"cmd": "frobnicate"}), "cmd"),
        (json!({"cmd": 1}), "cmd"),
        (json!({"command": "send"}), "cmd"),
    ];
    let n = cases.len();
    for (i, (mut cmd, field)) in cases.into_iter().enumerate() {
        let id = format!("bad-{i}");
        cmd["id"] = json!(id);
        p.cmd(cmd.clone());
        let e = p.wait_for(LIMIT, |v| v["event"] == "error" && v["id"] == id);
        assert_eq!(e["field"], field, "{cmd} -> {e}");
        // put and get name the option they need.
        let named = if field == "cmd" && (cmd["cmd"] == "put" || cmd["cmd"] == "get") {
            "--dht"
        } else {
            field
        };
        assert!(
            e["error"].as_str().unwrap().contains(named),
            "the text names {named}: {cmd} -> {e}"
        );
        if cmd["cmd"].is_string() {
            assert_eq!(e["cmd"], cmd["cmd"], "{e}");
        } else {
            assert!(e.get("cmd").is_none(), "{e}");
        }
    }

    // Well-formed commands are taken without a word (a send with an id is reported).
    p.cmd(json!({"cmd": "nodeInfo", "id": "ok-1", "nodeInfo": info}));
    p.cmd(json!({"cmd": "friends", "id": "ok-2", "keys": [sign_id]}));
    p.cmd(json!({"cmd": "devices", "id": "ok-3", "keys": []}));
    p.cmd(
        json!({"cmd": "send", "id": "ok-4", "topic": "test.fine", "to": "local", "payload": {"x": 1},
            "realtime": false, "expireAfter": 0}),
    );
    p.wait_for(LIMIT, |v| {
        v["event"] == "sent" && v["id"] == "ok-4" && v["ok"] == true
    });
    p.wait_for(LIMIT, |v| {
        v["event"] == "message" && v["topic"] == "self.test.fine" && v["payload"]["x"] == 1
    });
    still_answers(&mut p, "ok-5");
    let errors: Vec<&Value> = p.seen.iter().filter(|v| v["event"] == "error").collect();
    assert_eq!(
        errors.len(),
        n,
        "one error per malformed command: {errors:?}"
    );
    p.quit(LIMIT);
}

#[test]
fn dht_commands_check_their_fields() {
    let dir = TempDir::new("node-cli-dht");
    let mut p = start(&dir, "a", &["--dht"]);
    let cases: Vec<(Value, &str)> = vec![
        (json!({"cmd": "put", "value": 1}), "key"),
        (json!({"cmd": "put", "key": 3, "value": 1}), "key"),
        (json!({"cmd": "put", "key": "k"}), "value"),
        (json!({"cmd": "get"}), "key"),
        (json!({"cmd": "get", "key": ["k"]}), "key"),
    ];
    let n = cases.len();
    for (i, (mut cmd, field)) in cases.into_iter().enumerate() {
        let id = format!("bad-{i}");
        cmd["id"] = json!(id);
        p.cmd(cmd.clone());
        let e = p.wait_for(LIMIT, |v| v["event"] == "error" && v["id"] == id);
        assert_eq!(e["field"], field, "{cmd} -> {e}");
        assert_eq!(e["cmd"], cmd["cmd"], "{e}");
    }
    // A well-formed get is answered (no node holds it).
    p.cmd(json!({"cmd": "get", "id": "ok", "key": "nobody stored this"}));
    p.wait_for(LIMIT, |v| {
        v["event"] == "value" && v["key"] == "nobody stored this"
    });
    let errors = p.seen.iter().filter(|v| v["event"] == "error").count();
    assert_eq!(errors, n, "{:?}", p.seen);
    p.quit(LIMIT);
}

#[test]
fn the_end_of_input_quits_after_the_commands_before_it() {
    let dir = TempDir::new("node-cli-eof");
    let mut p = start(&dir, "a", &[]);
    let mut lines = Vec::new();
    for i in 0..50 {
        lines.extend_from_slice(
            format!(r#"{{"cmd":"send","id":{i},"topic":"test.eof","to":"local","payload":{i}}}"#)
                .as_bytes(),
        );
        lines.push(b'\n');
    }
    // The last one without its newline.
    lines.extend_from_slice(br#"{"cmd":"send","id":"last","topic":"test.eof","to":"local"}"#);
    p.write_raw(lines, LIMIT);
    p.close_stdin();
    let status = p.proc.wait(LIMIT);
    assert!(status.success(), "{status}");
    p.collect_for(Duration::from_millis(500));
    let sent: Vec<&Value> = p
        .seen
        .iter()
        .filter(|v| v["event"] == "sent" && v["ok"] == true)
        .collect();
    assert_eq!(
        sent.len(),
        51,
        "every command ran before the exit: {:?}",
        p.seen
    );
    assert!(sent.iter().any(|v| v["id"] == "last"));
}

/// Two nodes on one data directory: the second exits at once (code 1) with an error naming the
/// directory and the first one's pid; the first goes on.
#[test]
fn a_second_node_on_the_same_data_directory_is_refused() {
    let dir = TempDir::new("node-cli-lock");
    let mut first = start(&dir, "a", &[]);
    let out = Command::new(node_bin())
        .arg("--data")
        .arg(dir.path("a"))
        .args(["--udp", "off", "--tcp", "off"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run the second node");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let pid = first.proc.id().to_string();
    assert!(
        err.contains("in use by process") && err.contains(&pid),
        "the error names the holder ({pid}): {err}"
    );
    assert!(out.stdout.is_empty(), "no ready event: {:?}", out.stdout);
    still_answers(&mut first, "after");
}

/// The command line: `--help` lists every flag on stdout (exit 0); an unknown flag, a bad
/// value and an address that cannot be bound are named in the error (exit 2, 2, 1).
#[test]
fn the_command_line_says_what_is_wrong() {
    let run = |args: &[&str]| {
        Command::new(node_bin())
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run the node")
    };
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--data",
        "--udp",
        "--tcp",
        "--dead-after",
        "--mdns",
        "--mainline",
        "--dht",
        "--max-line",
    ] {
        assert!(text.contains(flag), "--help names {flag}: {text}");
    }
    let bogus = run(&["--bogus"]);
    assert_eq!(bogus.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bogus.stderr).contains("unknown flag \"--bogus\""));
    let dir = TempDir::new("node-cli-args");
    let data = dir.path("a");
    let data = data.to_str().unwrap();
    let bad = run(&["--data", data, "--connect-timeout", "soon"]);
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr).into_owned();
    assert!(
        err.contains("--connect-timeout") && err.contains("soon"),
        "{err}"
    );
    // 192.0.2.1 (documentation range) is no address of this machine: binding fails at once.
    let addr = run(&["--data", data, "--udp", "192.0.2.1:5", "--tcp", "off"]);
    assert_eq!(addr.status.code(), Some(1));
    let err = String::from_utf8_lossy(&addr.stderr).into_owned();
    assert!(err.contains("192.0.2.1:5"), "the address is named: {err}");
}
