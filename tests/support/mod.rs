//! Helpers for the process-level tests: locating our `curvecp` example binary and the reference
//! tools, temporary directories, free loopback ports, and child processes that are killed when
//! a test fails.

#![allow(dead_code)]

pub mod js;
#[cfg(feature = "mainline")]
pub mod mainline;
pub mod nat;

use std::fs;
use std::io::Read;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The reference tools the interoperability tests use.
pub const REFERENCE_TOOLS: [&str; 5] = [
    "curvecpserver",
    "curvecpclient",
    "curvecpmessage",
    "curvecpmakekey",
    "curvecpprintkey",
];

/// An extension used by the tests (any 32 hex digits do).
pub const EXT: &str = "0123456789abcdef0123456789abcdef";

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Whether the reference tools are installed. When they are not: with
/// `MM_REQUIRE_REFERENCE=1` (CI) the test fails; otherwise it prints a loud skip message and the
/// caller returns.
pub fn reference_available(test: &str) -> bool {
    let missing: Vec<&str> = REFERENCE_TOOLS
        .iter()
        .copied()
        .filter(|t| !on_path(t))
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("MM_REQUIRE_REFERENCE").as_deref() == Ok("1") {
        panic!("{test}: reference tools missing ({missing:?}) and MM_REQUIRE_REFERENCE=1: install nacl-tools");
    }
    mm_platform::proto::skip_test(
        test,
        &format!(
            "reference CurveCP tools not installed ({missing:?}).\n\
             *** Install them with `apt-get install nacl-tools`; CI sets MM_REQUIRE_REFERENCE=1."
        ),
    );
    false
}

/// Our `curvecp` example binary (`cargo test` builds the examples next to the test binaries).
pub fn curvecp_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("examples").join("curvecp");
    assert!(
        bin.is_file(),
        "{} not found: build it with `cargo build --examples` (cargo test does)",
        bin.display()
    );
    bin
}

/// A fresh directory under the system's temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates it, named after `tag`, the process id and a counter.
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "mm-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    /// A path inside it.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A loopback port that is free for UDP (and, with `tcp`, for TCP) right now.
pub fn free_port(tcp: bool) -> u16 {
    for _ in 0..100 {
        let u = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = u.local_addr().unwrap().port();
        if !tcp || TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port");
}

/// `n` pseudo-random bytes from a seed (xorshift; the content only has to be incompressible
/// and reproducible).
pub fn random_data(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A child process killed (and reaped) when dropped, so a failing test leaves no server behind.
pub struct Proc {
    pub child: Option<Child>,
    pub name: String,
}

impl Proc {
    /// Spawns `cmd`, naming it for messages.
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("unable to start {name}: {e}"));
        Proc {
            child: Some(child),
            name: name.to_string(),
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits at most `limit` for the process to exit; panics (killing it) if it does not.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        match self.try_wait_for(limit) {
            Some(st) => st,
            None => panic!("{} did not finish within {limit:?}", self.name),
        }
    }

    /// Waits at most `limit`; on time-out kills the process and returns `None`.
    pub fn try_wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                self.child = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits at most `limit` and collects stdout/stderr (the command must have piped them).
    pub fn output(mut self, limit: Duration) -> Output {
        let mut child = self.child.take().expect("running");
        let mut out = child.stdout.take();
        let mut err = child.stderr.take();
        let t_out = std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(o) = out.as_mut() {
                let _ = o.read_to_end(&mut v);
            }
            v
        });
        let t_err = std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(e) = err.as_mut() {
                let _ = e.read_to_end(&mut v);
            }
            v
        });
        self.child = Some(child);
        let status = self.try_wait_for(limit);
        let stdout = t_out.join().unwrap();
        let stderr = t_err.join().unwrap();
        match status {
            Some(status) => Output {
                status,
                stdout,
                stderr,
            },
            None => {
                let err = String::from_utf8_lossy(&stderr);
                let tail: Vec<&str> = err.lines().rev().take(40).collect();
                panic!(
                    "{} did not finish within {limit:?}; {} bytes of stdout; last lines of stderr:\n{}",
                    self.name,
                    stdout.len(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `curvecpmakekey DIR` (reference) and returns the public key's hex.
pub fn reference_makekey(dir: &Path) -> String {
    let st = Command::new("curvecpmakekey").arg(dir).status().unwrap();
    assert!(st.success(), "curvecpmakekey failed");
    let out = Command::new("curvecpprintkey").arg(dir).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Runs `curvecp makekey DIR` (ours) and returns the public key's hex.
pub fn our_makekey(dir: &Path) -> String {
    let st = Command::new(curvecp_bin())
        .arg("makekey")
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success(), "curvecp makekey failed");
    let out = Command::new(curvecp_bin())
        .arg("printkey")
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Waits until a UDP server bound to `port` (it cannot be probed without a handshake) has had
/// time to start: polls for the process being alive and the port being taken.
pub fn wait_for_udp_bind(port: u16, server: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(st) = server.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("{} exited early: {st}", server.name);
        }
        if UdpSocket::bind(("127.0.0.1", port)).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{} did not bind UDP port {port}", server.name);
}

/// Waits until a TCP server listens on `port`.
pub fn wait_for_tcp_listen(port: u16, server: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(st) = server.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("{} exited early: {st}", server.name);
        }
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{} did not listen on TCP port {port}", server.name);
}

/// Standard streams for a child: stdin from a file (or nothing), stdout and stderr piped.
pub fn stdin_file(path: Option<&Path>) -> Stdio {
    match path {
        Some(p) => Stdio::from(fs::File::open(p).expect("open input")),
        None => Stdio::null(),
    }
}

/// Whether an environment flag that turns a skip into a failure is set to `1`.
fn required(var: &str) -> bool {
    std::env::var(var).as_deref() == Ok("1")
}

/// A private network namespace with only `lo` (up, multicast on, 224.0.0.0/4 routed to it),
/// so multicast tests never send a packet off the machine. Deleted when dropped, pass or fail.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates one. Without root or `ip` it prints a loud SKIPPING line and returns `None`
    /// (the caller returns), unless `MM_REQUIRE_NETNS=1` (CI), where it panics.
    pub fn create(test: &str) -> Option<Netns> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "mmtest-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let ip = |args: &[&str]| -> Result<(), String> {
            match Command::new("ip")
                .args(args)
                .stderr(Stdio::piped())
                .output()
            {
                Ok(o) if o.status.success() => Ok(()),
                Ok(o) => Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => Err(format!("ip: {e}")),
            }
        };
        let made = ip(&["netns", "add", &name]);
        let ns = Netns { name: name.clone() };
        let setup = made.and_then(|()| {
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
            ip(&["-n", &name, "link", "set", "lo", "multicast", "on"])?;
            ip(&["-n", &name, "route", "add", "224.0.0.0/4", "dev", "lo"])
        });
        match setup {
            Ok(()) => Some(ns),
            Err(e) => {
                drop(ns);
                if required("MM_REQUIRE_NETNS") {
                    panic!(
                        "{test}: cannot create a network namespace ({e}) and MM_REQUIRE_NETNS=1"
                    );
                }
                mm_platform::proto::skip_test(
                    test,
                    &format!(
                        "cannot create a network namespace ({e}).\n\
                         *** Multicast tests need root and iproute2; CI sets MM_REQUIRE_NETNS=1."
                    ),
                );
                None
            }
        }
    }

    /// `program` to be run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// The JS test peers' directory (`tests/js`), if `node` and its `node_modules` are there.
/// Otherwise a loud SKIPPING line and `None`, unless `MM_REQUIRE_JS=1` (CI): then a panic.
pub fn js_dir(test: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("js");
    let node = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let modules = [
        "mm-services-mdns",
        "1tp",
        "curvecp",
        "kad-fs",
        "bittorrent-dht",
        "mm-services-kademlia",
    ]
    .iter()
    .all(|m| dir.join("node_modules").join(m).is_dir());
    if node && modules {
        return Some(dir);
    }
    let why = if node {
        "tests/js/node_modules missing (run `cd tests/js && npm ci --ignore-scripts`)"
    } else {
        "`node` not found"
    };
    if required("MM_REQUIRE_JS") {
        panic!("{test}: {why} and MM_REQUIRE_JS=1");
    }
    mm_platform::proto::skip_test(
        test,
        &format!("{why}.\n*** CI installs them and sets MM_REQUIRE_JS=1."),
    );
    None
}

/// Our `node` example binary, built first (`cargo test --test NAME` alone does not build the
/// examples; this is a no-op when it is fresh), in the profile of the running binary (release
/// for `cargo bench`).
pub fn node_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "--quiet", "--example", "node"]);
    if dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let st = build.status().expect("cargo build");
    assert!(st.success(), "building examples/node.rs failed");
    let bin = dir.join("examples").join("node");
    assert!(
        bin.is_file(),
        "{} not found: build it with `cargo build --examples` (cargo test does)",
        bin.display()
    );
    bin
}

/// Starts `examples/node.rs` with `--mdns` inside `ns`, its data in `dir/name`; returns it
/// and its nodeInfo (from its `ready` event, within 30 s).
pub fn start_mdns_node(ns: &Netns, dir: &TempDir, name: &str) -> (JsonProc, serde_json::Value) {
    let mut cmd = ns.command(node_bin());
    cmd.arg("--data")
        .arg(dir.path(name))
        .arg("--mdns")
        .stderr(Stdio::null());
    let mut p = JsonProc::spawn(name, &mut cmd);
    let info = p.wait_for(Duration::from_secs(30), |v| v["event"] == "ready")["nodeInfo"].clone();
    (p, info)
}

/// A child process speaking JSON lines: commands on stdin, events read from stdout by a
/// thread (lines that are not JSON objects are ignored). Killed when dropped.
pub struct JsonProc {
    pub proc: Proc,
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::mpsc::Receiver<serde_json::Value>,
    /// Every event read so far.
    pub seen: Vec<serde_json::Value>,
}

impl JsonProc {
    /// Spawns `cmd` with piped stdin and stdout.
    pub fn spawn(name: &str, cmd: &mut Command) -> JsonProc {
        JsonProc::spawn_paced(name, cmd, Duration::ZERO)
    }

    /// [`JsonProc::spawn`] with a reader that takes `per_line` for each line, as an
    /// application's work would: once the pipe is full, the process blocks on its writes.
    pub fn spawn_paced(name: &str, cmd: &mut Command, per_line: Duration) -> JsonProc {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut proc = Proc::spawn(name, cmd);
        let child = proc.child.as_mut().expect("running");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !per_line.is_zero() {
                    std::thread::sleep(per_line);
                }
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v.is_object() && tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        JsonProc {
            proc,
            stdin,
            lines,
            seen: Vec::new(),
        }
    }

    /// Writes one command line.
    pub fn cmd(&mut self, v: serde_json::Value) {
        use std::io::Write;
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = writeln!(stdin, "{v}");
            let _ = stdin.flush();
        }
    }

    /// Writes `bytes` as they are (no newline added) from a helper thread, waiting at most
    /// `limit` for the write to complete; panics if it does not (the child is killed on drop,
    /// which ends a blocked write) or if the child closed its stdin.
    pub fn write_raw(&mut self, bytes: Vec<u8>, limit: Duration) {
        use std::io::Write;
        let mut stdin = self.stdin.take().expect("stdin open");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = stdin.write_all(&bytes).and_then(|()| stdin.flush());
            let _ = tx.send((r, stdin));
        });
        match rx.recv_timeout(limit) {
            Ok((Ok(()), stdin)) => self.stdin = Some(stdin),
            Ok((Err(e), _)) => panic!("{}: writing input failed: {e}", self.proc.name),
            Err(_) => panic!("{}: input not taken within {limit:?}", self.proc.name),
        }
    }

    /// Closes its stdin (the end of input).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits at most `limit` for an event matching `pred` (every event read is kept in
    /// `seen`); panics with what was seen if none comes.
    pub fn wait_for(
        &mut self,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return v.clone();
        }
        let end = Instant::now() + limit;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "{}: no matching event within {limit:?}; seen {:?}",
                    self.proc.name, self.seen
                ),
            }
        }
    }

    /// Kills the process with SIGKILL (no destructor runs) and keeps reading what it had
    /// written before it died (bounded: at most `limit`).
    pub fn kill_and_drain(&mut self, limit: Duration) {
        if let Some(c) = self.proc.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.proc.child = None;
        self.stdin = None;
        let end = Instant::now() + limit;
        while let Ok(v) = self
            .lines
            .recv_timeout(end.saturating_duration_since(Instant::now()))
        {
            self.seen.push(v);
        }
    }

    /// Events that arrived so far without waiting, added to `seen`.
    pub fn poll_lines(&mut self) {
        while let Ok(v) = self.lines.try_recv() {
            self.seen.push(v);
        }
    }

    /// Collects the events that arrive within `period`.
    pub fn collect_for(&mut self, period: Duration) {
        let end = Instant::now() + period;
        while let Ok(v) = self
            .lines
            .recv_timeout(end.saturating_duration_since(Instant::now()))
        {
            self.seen.push(v);
        }
    }

    /// Closes stdin (the node quits at end of input) and waits at most `limit` for the exit.
    pub fn quit(mut self, limit: Duration) {
        self.cmd(serde_json::json!({"cmd": "quit"}));
        self.stdin = None;
        let _ = self.proc.try_wait_for(limit);
    }
}

/// Short connection timings for tests with several platforms on 127.0.0.1.
pub fn quick() -> mm_platform::NetConfig {
    mm_platform::NetConfig {
        connect_timeout: Duration::from_millis(400),
        offline_retry: Duration::from_millis(300),
        lookup_timeout: Duration::from_millis(500),
        ..mm_platform::NetConfig::default()
    }
}

/// `realtime: false`, the platform's default expiry: sent through the offline buffer.
pub fn offline() -> mm_platform::SendOptions {
    mm_platform::SendOptions {
        realtime: false,
        expire_after: None,
    }
}

/// The interpreter Debian's python3-libtorrent is built for.
pub const PYTHON: &str = "/usr/bin/python3";

/// Whether `import libtorrent` works with [`PYTHON`]. When it does not: with
/// `MM_REQUIRE_LIBTORRENT=1` (CI) the test fails; otherwise it prints a loud skip message.
pub fn libtorrent_available(test: &str) -> bool {
    let probe = Command::new(PYTHON)
        .args(["-c", "import libtorrent; print(libtorrent.__version__)"])
        .stdin(Stdio::null())
        .output();
    let why = match probe {
        Ok(o) if o.status.success() => return true,
        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
        Err(e) => format!("{PYTHON}: {e}"),
    };
    if std::env::var("MM_REQUIRE_LIBTORRENT").as_deref() == Ok("1") {
        panic!("{test}: libtorrent missing ({why}) and MM_REQUIRE_LIBTORRENT=1: install python3-libtorrent");
    }
    mm_platform::proto::skip_test(
        test,
        &format!(
            "libtorrent-rasterbar not importable by {PYTHON} ({why}).\n\
             *** Install it with `apt-get install python3-libtorrent`; \
             CI sets MM_REQUIRE_LIBTORRENT=1."
        ),
    );
    false
}
