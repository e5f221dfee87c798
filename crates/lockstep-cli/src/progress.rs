//! Progress on stderr for everything that takes more than a few seconds (loading checkpoints,
//! reference runs, each verify phase): an `indicatif` spinner with the elapsed time when stderr
//! is a terminal. When it is not (CI logs, pipes, the Python API), spinners stay quiet; the
//! phased runs ([`Steps`]) print one timestamped line per step instead, as a log.

use indicatif::{ProgressBar, ProgressStyle};
use std::time::{Duration, Instant};

fn spinner(msg: String) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} [{elapsed}] {msg}") {
        bar.set_style(style);
    }
    bar.set_message(msg);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Runs `f` under a spinner showing `msg` (nothing when stderr is not a terminal).
pub fn with_spinner<T>(msg: impl Into<String>, f: impl FnOnce() -> T) -> T {
    let bar = spinner(msg.into());
    let out = f();
    bar.finish_and_clear();
    out
}

/// The steps of a long run: a spinner whose message is the current step on a terminal, else one
/// `[  12.3s] step` line per step.
pub struct Steps {
    bar: ProgressBar,
    t0: Instant,
    log: bool,
}

impl Steps {
    /// Starts the clock (and the spinner, on a terminal).
    pub fn start() -> Self {
        Self {
            bar: spinner(String::new()),
            t0: Instant::now(),
            log: true,
        }
    }

    /// Like [`Steps::start`], but quiet when stderr is not a terminal (no log lines).
    pub fn quiet() -> Self {
        let mut s = Self::start();
        s.log = false;
        s
    }

    /// Reports the step now running.
    pub fn step(&self, msg: &str) {
        let t = self.t0.elapsed().as_secs_f64();
        if self.bar.is_hidden() {
            if self.log {
                eprintln!("[{t:6.1}s] {msg}");
            }
        } else {
            self.bar.set_message(msg.to_string());
        }
    }
}

impl Drop for Steps {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}
