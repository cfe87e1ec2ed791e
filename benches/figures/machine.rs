//! Where a figure was measured: the host name, the CPU model and core count, and the commit,
//! printed with every figure line of `benches/figures.rs` and `benches/nat.rs`.

/// (hostname, CPU model and count, commit), read once.
pub fn machine() -> &'static (String, String, String) {
    static M: std::sync::OnceLock<(String, String, String)> = std::sync::OnceLock::new();
    M.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = info
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map_or("unknown", str::trim)
            .to_string();
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let commit = std::process::Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        (host, format!("{model} x{cores}"), commit)
    })
}
