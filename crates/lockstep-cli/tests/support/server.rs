//! A `lockstep serve` child process for the integration tests.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `lockstep serve` on 127.0.0.1 and a free port.
pub struct Server {
    /// The process.
    pub child: Child,
    /// The port it listens on.
    pub port: u16,
    /// What it printed on stderr so far.
    pub stderr: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `lockstep serve --model MODEL --port 0 EXTRA...` and waits until it listens.
    pub fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lockstep"))
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start lockstep serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = BufReader::new(child.stderr.take().unwrap());
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in lines.lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on http://") {
                    let _ = tx.send(addr.rsplit(':').next().unwrap().parse::<u16>().unwrap());
                }
                log.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("lockstep serve did not start: {}", stderr.lock().unwrap())
            });
        Server {
            child,
            port,
            stderr,
        }
    }

    /// Its OpenAI base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// Waits for the server to exit (after a SIGINT); its exit success and stderr.
    pub fn wait(mut self, limit: Duration) -> (bool, String) {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                return (status.success(), self.stderr.lock().unwrap().clone());
            }
            assert!(
                t0.elapsed() < limit,
                "lockstep serve did not exit: {}",
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends it SIGINT.
    pub fn interrupt(&self) {
        let ok = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -INT failed");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
