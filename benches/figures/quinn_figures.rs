//! The `compare_quinn` group: our bulk transfer over UDP and over TCP against quinn 0.11 on the
//! same machine, in the same run. The quinn side is the separate crate
//! `benches/quinn-compare/` (its own workspace, so that nothing else ever compiles quinn), built
//! here with `cargo build --release --manifest-path` into `target/quinn-compare/` and run as a
//! subprocess: a sink and a sender in one tokio runtime with two workers, 100 MiB on one stream
//! of a fresh connection over 127.0.0.1, timed from connect until the sink read the end.
//!
//! Only when asked for: `MM_BENCH_QUINN=1 cargo bench --bench figures`, or a FILTER naming the
//! group (`cargo bench --bench figures -- compare_quinn`). Three interleaved rounds (ours UDP,
//! ours TCP, quinn), each figure the median of its three; the ratios are ours over quinn.

use std::path::PathBuf;
use std::process::Command;

use mm_platform::proto::transport::TransportKind;

use super::cc::bulk_once;
use super::Bench;

const NAMES: [&str; 5] = [
    "compare_quinn_bulk",
    "compare_quinn_ours_udp_bulk",
    "compare_quinn_ours_tcp_bulk",
    "compare_quinn_udp_ratio",
    "compare_quinn_tcp_ratio",
];

fn asked(bench: &Bench) -> bool {
    let by_env = std::env::var_os("MM_BENCH_QUINN").is_some_and(|v| v != "0");
    let by_filter = bench.filter.as_deref().is_some_and(|f| !f.is_empty());
    NAMES.iter().any(|n| bench.wants(n)) && (by_env || by_filter)
}

/// Builds the quinn side; returns the path of its binary.
fn build() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = root.join("target").join("quinn-compare");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let ok = Command::new(cargo)
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(root.join("benches/quinn-compare/Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| target.join("release").join("quinn-compare"))
}

fn quinn_once(bin: &PathBuf) -> Option<f64> {
    let out = Command::new(bin).output().ok()?;
    if !out.status.success() {
        eprintln!(
            "compare_quinn: quinn-compare failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    line["value"].as_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The 1-minute load average, for the record.
pub fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Ours (UDP, TCP) and quinn's bulk, three interleaved rounds, medians and ratios.
pub fn compare_quinn(bench: &Bench) {
    if !asked(bench) {
        return;
    }
    let Some(bin) = build() else {
        eprintln!("compare_quinn: building benches/quinn-compare failed; skipped");
        return;
    };
    let (mut udp, mut tcp, mut quinn) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..3 {
        let u = bulk_once(TransportKind::Udp, 100_000_000);
        let t = bulk_once(TransportKind::Tcp, 100_000_000);
        let Some(q) = quinn_once(&bin) else {
            return;
        };
        eprintln!(
            "compare_quinn round {round}: ours udp {u:.1} MB/s, ours tcp {t:.1} MB/s, quinn \
             {q:.1} MB/s (load {})",
            load()
        );
        udp.push(u);
        tcp.push(t);
        quinn.push(q);
    }
    let (u, t, q) = (median(udp), median(tcp), median(quinn));
    bench.emit(NAMES[0], q, "MB/s");
    bench.emit(NAMES[1], u, "MB/s");
    bench.emit(NAMES[2], t, "MB/s");
    bench.emit(NAMES[3], u / q, "x");
    bench.emit(NAMES[4], t / q, "x");
}
