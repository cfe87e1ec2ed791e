//! The JavaScript test peers of `tests/js/` (genuine 1tp, curvecp, protobufjs, tweetnacl,
//! ed2curve from the npm registry, installed by `.ci/run` with `npm ci --ignore-scripts`):
//! finding node and the packages, skipping loudly without them, and a peer process driven by
//! JSON lines on stdin and stdout (the protocol is described at the top of `tests/js/peer.js`).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Whether `node` and the installed test packages are there (see [`super::js_dir`]: a loud
/// skip without them, a failure with `MM_REQUIRE_JS=1`).
pub fn js_available(test: &str) -> bool {
    super::js_dir(test).is_some()
}

/// A running `tests/js/peer.js`, killed when dropped.
pub struct JsPeer {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<Value>,
    /// Events read and not yet taken by [`JsPeer::wait_for`].
    pub backlog: Vec<Value>,
    /// Its nodeInfo, from its `ready` event.
    pub node_info: Value,
}

impl JsPeer {
    /// Starts `peer.js` with `args` and waits (at most 20 s) for its `ready` event.
    pub fn spawn(args: &[&str]) -> JsPeer {
        let mut child = Command::new("node")
            .arg(
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("tests")
                    .join("js")
                    .join("peer.js"),
            )
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start node tests/js/peer.js");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                    Err(_) => eprintln!("peer.js (not JSON): {line}"),
                }
            }
        });
        let mut peer = JsPeer {
            child,
            stdin,
            lines,
            backlog: Vec::new(),
            node_info: Value::Null,
        };
        let ready = peer.wait_for(Duration::from_secs(20), || {}, |v| v["event"] == "ready");
        peer.node_info = ready["nodeInfo"].clone();
        peer
    }

    /// Its boxId (how JavaScript nodes are addressed).
    pub fn box_id(&self) -> String {
        self.node_info["boxId"].as_str().expect("boxId").to_owned()
    }

    /// Its signId.
    pub fn sign_id(&self) -> String {
        self.node_info["signId"]
            .as_str()
            .expect("signId")
            .to_owned()
    }

    /// Sends one command line.
    pub fn cmd(&mut self, v: Value) {
        let mut line = serde_json::to_string(&v).expect("json");
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .expect("write to peer.js");
        self.stdin.flush().expect("flush peer.js stdin");
    }

    /// Reads what arrived (without blocking) into the backlog; panics on a `fatal` event (the
    /// JavaScript process crashed).
    pub fn drain(&mut self) {
        while let Ok(v) = self.lines.try_recv() {
            self.take(v);
        }
    }

    fn take(&mut self, v: Value) {
        if v["event"] == "fatal" {
            panic!("peer.js crashed: {}", v["error"]);
        }
        self.backlog.push(v);
    }

    /// Waits at most `limit` for an event matching `pred` (removed from the backlog and
    /// returned), calling `pump` (e.g. polling a platform) between reads; panics on time-out.
    pub fn wait_for(
        &mut self,
        limit: Duration,
        mut pump: impl FnMut(),
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(i) = self.backlog.iter().position(&pred) {
                return self.backlog.remove(i);
            }
            if Instant::now() > deadline {
                panic!(
                    "peer.js: no matching event within {limit:?}; last events: {:?}",
                    &self.backlog[self.backlog.len().saturating_sub(5)..]
                );
            }
            pump();
            match self.lines.recv_timeout(Duration::from_millis(2)) {
                Ok(v) => self.take(v),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let st = self.child.wait().ok();
                    panic!("peer.js exited ({st:?}) while waiting");
                }
            }
        }
    }

    /// Whether the process is still running (it did not crash).
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }

    /// Waits (at most `limit`) for the process to exit; whether it did.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let end = std::time::Instant::now() + limit;
        while std::time::Instant::now() < end {
            if !self.alive() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for JsPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
