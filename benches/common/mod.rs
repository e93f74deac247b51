//! What every benchmark binary shares: whether it runs as a benchmark, and the machine line its
//! results start with. Each bench uses a subset (`mod common;`).
#![allow(dead_code)]

/// `cargo bench` passes `--bench`; `cargo test` runs the binary without it (a quick smoke run).
pub fn bench_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test")
}

/// `N cores, <CPU model>`, from `/proc/cpuinfo`.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}")
}
