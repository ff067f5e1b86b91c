//! Clock faults: a node whose clock runs at another rate than its peers'. Every node of a chaos
//! run shares one machine and so one clock; to give one node its own, the harness starts it with
//! libfaketime preloaded (`LD_PRELOAD`), which makes every clock the process reads — the
//! monotonic one included, which is what Raft's timers, leases and timeouts use — run at
//! `rate` times real time, and scales its sleeps and timed waits the same way. A node at 0.25×
//! sees a quarter of a second pass in every real second: its election timeouts, heartbeats and
//! leases last four times as long as its peers'.
//!
//! Only a rate, no jumps: the store reads wall-clock time for nothing but log lines, and a
//! monotonic clock never jumps. The rate is set when the node starts, so a fault is a restart
//! under libfaketime and its heal a restart without it.
//!
//! Where libfaketime is missing, [`availability`] says why and the clock nemesis is skipped
//! loudly (`./dev.sh test` installs it with apt-get and says so).

use std::path::PathBuf;

/// Where Debian's `libfaketime` package puts the library for multi-threaded programs.
const LIBRARY_PATHS: [&str; 2] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
];

/// Overrides [`LIBRARY_PATHS`]: the path of `libfaketimeMT.so.1` elsewhere.
const LIBRARY_ENV: &str = "STRATA_LIBFAKETIME";

/// The clock rates a clock fault draws from: much slower and much faster than real time, far
/// beyond real clock drift (parts per million), so that whatever depends on equal rates shows.
pub const RATES: [f64; 4] = [0.25, 0.5, 2.0, 4.0];

/// The libfaketime library, or why there is none.
pub fn library() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(LIBRARY_ENV) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("{LIBRARY_ENV}={} is not a file", path.display()))
        };
    }
    LIBRARY_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "libfaketime is not installed (apt-get install libfaketime; looked for {})",
                LIBRARY_PATHS.join(", ")
            )
        })
}

/// Whether clock faults can be injected here; `Err` says why not.
pub fn availability() -> Result<(), String> {
    library().map(|_| ())
}

/// The environment that starts a process with its clocks at `rate` times real time.
pub fn env(rate: f64) -> anyhow::Result<Vec<(String, String)>> {
    anyhow::ensure!(
        rate.is_finite() && rate > 0.0,
        "a clock rate must be positive, not {rate}"
    );
    let library = library().map_err(anyhow::Error::msg)?;
    Ok(vec![
        ("LD_PRELOAD".into(), library.display().to_string()),
        // No offset, only the rate: `+0 x0.25`.
        ("FAKETIME".into(), format!("+0 x{rate}")),
    ])
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::time::{Duration, Instant};

    use super::*;

    /// A child under [`env`] at 0.5× takes twice the real time to sleep one second of its own
    /// time, and at 2× half of it.
    #[test]
    fn a_process_under_the_env_runs_its_clock_at_the_rate() {
        if let Err(why) = availability() {
            eprintln!("SKIPPED: {why}");
            return;
        }
        let real_time_of_one_second = |rate: f64| {
            let started = Instant::now();
            let status = Command::new("sleep")
                .arg("1")
                .envs(env(rate).unwrap())
                .status()
                .unwrap();
            assert!(status.success());
            started.elapsed()
        };
        let slow = real_time_of_one_second(0.5);
        let fast = real_time_of_one_second(2.0);
        assert!(slow >= Duration::from_millis(1800), "0.5×: {slow:?}");
        assert!(fast <= Duration::from_millis(800), "2×: {fast:?}");
    }

    #[test]
    fn a_rate_must_be_positive() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(env(bad).is_err(), "{bad}");
        }
    }
}
