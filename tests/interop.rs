//! Interoperability with DJB's reference CurveCP tools (Debian `nacl-tools`), over real UDP on
//! 127.0.0.1, in both directions, and our tool against itself over UDP and TCP.
//!
//! Our side is the `curvecp` example binary, which mirrors the reference tools' interface.
//! Without the reference tools these tests skip loudly, unless `MM_REQUIRE_REFERENCE=1` (CI),
//! where their absence fails. Every wait is bounded generously; no test asserts a duration.

mod support;

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

const MB: usize = 1 << 20;
/// Generous bound for a 1 MB transfer with the reference (about 1 MB/s on loopback).
const LIMIT: Duration = Duration::from_secs(120);

fn our_client(
    server_hex: &str,
    port: u16,
    tcp: bool,
    input: Option<&std::path::Path>,
) -> std::process::Output {
    let mut cmd = Command::new(curvecp_bin());
    cmd.args(["client", "test.example.org", server_hex, "127.0.0.1"])
        .arg(port.to_string())
        .arg(EXT);
    if tcp {
        cmd.arg("--tcp");
    }
    cmd.stdin(stdin_file(input))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Proc::spawn("our client", &mut cmd).output(LIMIT)
}

fn assert_success(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_same(name: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{name}: length differs");
    assert!(got == want, "{name}: content differs");
}

#[test]
fn our_client_downloads_from_reference_server() {
    if !reference_available("our_client_downloads_from_reference_server") {
        return;
    }
    let dir = TempDir::new("dl-ref");
    let key = reference_makekey(&dir.path("serverkey"));
    let data = random_data(MB, 1);
    fs::write(dir.path("data"), &data).unwrap();
    let port = free_port(false);
    let mut server = Proc::spawn(
        "curvecpserver",
        Command::new("curvecpserver")
            .arg("test.example.org")
            .arg(dir.path("serverkey"))
            .args(["127.0.0.1", &port.to_string(), EXT])
            .args(["curvecpmessage", "cat"])
            .arg(dir.path("data"))
            .stderr(Stdio::null()),
    );
    wait_for_udp_bind(port, &mut server);
    let out = our_client(&key, port, false, None);
    assert_success(&out, "our client failed");
    assert_same("download", &out.stdout, &data);
}

#[test]
fn our_client_uploads_to_reference_server() {
    if !reference_available("our_client_uploads_to_reference_server") {
        return;
    }
    let dir = TempDir::new("ul-ref");
    let key = reference_makekey(&dir.path("serverkey"));
    let data = random_data(MB, 2);
    fs::write(dir.path("data"), &data).unwrap();
    let port = free_port(false);
    let upload = dir.path("upload");
    let mut server = Proc::spawn(
        "curvecpserver",
        Command::new("curvecpserver")
            .arg("test.example.org")
            .arg(dir.path("serverkey"))
            .args(["127.0.0.1", &port.to_string(), EXT])
            .args(["curvecpmessage", "sh", "-c"])
            .arg(format!("cat > '{}'", upload.display()))
            .stderr(Stdio::null()),
    );
    wait_for_udp_bind(port, &mut server);
    let out = our_client(&key, port, false, Some(&dir.path("data")));
    assert_success(&out, "our client failed");
    // Our client exits once the server's EOF arrived, which the reference sends only after its
    // handler (`cat > upload`) has exited: the file is complete.
    assert!(out.stdout.is_empty());
    assert_same("upload", &fs::read(&upload).unwrap(), &data);
}

fn our_server(dir: &TempDir, key_dir: &str, port: u16, tcp: bool, prog: &[&str]) -> Proc {
    let mut cmd = Command::new(curvecp_bin());
    cmd.args(["server", "test.example.org"])
        .arg(dir.path(key_dir))
        .args(["127.0.0.1", &port.to_string(), EXT]);
    if tcp {
        cmd.arg("--tcp");
    }
    cmd.arg("--").args(prog).stderr(Stdio::inherit());
    let mut p = Proc::spawn("our server", &mut cmd);
    if tcp {
        wait_for_tcp_listen(port, &mut p);
    } else {
        wait_for_udp_bind(port, &mut p);
    }
    p
}

fn reference_client(key: &str, port: u16, program: &str) -> Proc {
    Proc::spawn(
        "curvecpclient",
        Command::new("curvecpclient")
            .args(["test.example.org", key, "127.0.0.1", &port.to_string(), EXT])
            .args(["curvecpmessage", "-c", "sh", "-c", program])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
}

#[test]
fn reference_client_downloads_from_our_server() {
    if !reference_available("reference_client_downloads_from_our_server") {
        return;
    }
    let dir = TempDir::new("dl-ours");
    // Keys made by our makekey, used by the reference client: the layouts agree.
    let key = our_makekey(&dir.path("serverkey"));
    let data = random_data(MB, 3);
    let data_path = dir.path("data");
    fs::write(&data_path, &data).unwrap();
    let port = free_port(false);
    let _server = our_server(
        &dir,
        "serverkey",
        port,
        false,
        &["cat", data_path.to_str().unwrap()],
    );
    let out = dir.path("download");
    let client = reference_client(&key, port, &format!("cat <&6 > '{}'", out.display()));
    let o = client.output(LIMIT);
    assert_success(&o, "curvecpclient failed");
    assert_same("download", &fs::read(&out).unwrap(), &data);
}

#[test]
fn reference_client_uploads_to_our_server() {
    if !reference_available("reference_client_uploads_to_our_server") {
        return;
    }
    let dir = TempDir::new("ul-ours");
    let key = our_makekey(&dir.path("serverkey"));
    let data = random_data(MB, 4);
    let data_path = dir.path("data");
    fs::write(&data_path, &data).unwrap();
    let upload = dir.path("upload");
    let port = free_port(false);
    let _server = our_server(
        &dir,
        "serverkey",
        port,
        false,
        &["sh", "-c", &format!("cat > '{}'", upload.display())],
    );
    let client = reference_client(&key, port, &format!("cat '{}' >&7", data_path.display()));
    let o = client.output(LIMIT);
    assert_success(&o, "curvecpclient failed");
    // The reference client ends once our EOF arrived, which our server sends when its handler
    // (`cat > upload`) closed its stdout, i.e. after it wrote everything.
    assert_same("upload", &fs::read(&upload).unwrap(), &data);
}

#[test]
fn several_reference_clients_at_once_against_our_server() {
    if !reference_available("several_reference_clients_at_once_against_our_server") {
        return;
    }
    let dir = TempDir::new("multi-ref");
    // A reference key directory served by our server: the layouts agree this way too.
    let key = reference_makekey(&dir.path("serverkey"));
    let port = free_port(false);
    let _server = our_server(&dir, "serverkey", port, false, &["cat"]);
    let mut clients = Vec::new();
    for i in 0..4u64 {
        let data = random_data(256 * 1024, 10 + i);
        let input = dir.path(&format!("in{i}"));
        let output = dir.path(&format!("out{i}"));
        fs::write(&input, &data).unwrap();
        // Each client uploads its file and reads the echo at the same time. The shell closes
        // its own copy of fd 7 so that the upload's end is the stream's EOF.
        let prog = format!(
            "cat '{}' >&7 & exec 7>&-; cat <&6 > '{}'; wait",
            input.display(),
            output.display()
        );
        clients.push((reference_client(&key, port, &prog), data, output));
    }
    for (i, (client, data, output)) in clients.into_iter().enumerate() {
        let o = client.output(LIMIT);
        assert_success(&o, &format!("curvecpclient {i} failed"));
        assert_same(&format!("echo {i}"), &fs::read(&output).unwrap(), &data);
    }
}

fn ours_against_ours(tcp: bool, clients: u64) {
    let dir = TempDir::new(if tcp { "ours-tcp" } else { "ours-udp" });
    let key = our_makekey(&dir.path("serverkey"));
    let port = free_port(tcp);
    let _server = our_server(&dir, "serverkey", port, tcp, &["cat"]);
    let mut running = Vec::new();
    for i in 0..clients {
        let size = if i == 0 { MB } else { 100 * 1024 + i as usize };
        let data = random_data(size, 20 + i);
        let input = dir.path(&format!("in{i}"));
        fs::write(&input, &data).unwrap();
        let key = key.clone();
        running.push(std::thread::spawn(move || {
            let out = our_client(&key, port, tcp, Some(&input));
            (out, data)
        }));
    }
    for (i, t) in running.into_iter().enumerate() {
        let (out, data) = t.join().unwrap();
        assert_success(&out, &format!("client {i} failed"));
        assert_same(&format!("echo {i}"), &out.stdout, &data);
    }
}

#[test]
fn ours_against_ours_over_udp() {
    ours_against_ours(false, 4);
}

#[test]
fn ours_against_ours_over_tcp() {
    ours_against_ours(true, 4);
}

#[test]
fn our_client_reports_no_response() {
    // Nothing listens: the client gives up after its Hello schedule (about a minute in the
    // reference schedule) with a one-line reason and a non-zero exit. Run it against a closed
    // TCP port instead, which fails at once, so the test stays short.
    let port = free_port(true);
    let key = "00".repeat(32);
    let out = our_client(&key, port, true, None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one-line reason: {err}");
}

#[test]
fn our_client_fails_when_the_server_vanishes() {
    // CurveCP has no close packet: a client whose server disappears while it waits for the
    // server's stream must notice (keepalive probes, then the stream's dead-peer timeout) and
    // exit non-zero with a reason, not wait forever.
    let dir = TempDir::new("vanish");
    let key = our_makekey(&dir.path("serverkey"));
    let port = free_port(false);
    // A handler that never answers (and ends by itself, so nothing is left behind).
    let server = our_server(&dir, "serverkey", port, false, &["sleep", "45"]);
    let mut cmd = Command::new(curvecp_bin());
    cmd.args(["client", "test.example.org", &key, "127.0.0.1"])
        .arg(port.to_string())
        .arg(EXT)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let client = Proc::spawn("our client", &mut cmd);
    std::thread::sleep(Duration::from_secs(1));
    drop(server); // SIGKILL: the server vanishes without a word
    let out = client.output(Duration::from_secs(120));
    assert!(!out.status.success(), "the client must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one-line reason: {err}");
    assert!(err.contains("unresponsive"), "reason: {err}");
}
