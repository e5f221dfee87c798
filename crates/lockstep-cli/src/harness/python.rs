//! Finding and running the Python reference (`reference/lockstep_reference`, pinned torch +
//! transformers in the project's `.venv`, or `LOCKSTEP_PYTHON`; from an installed wheel, the
//! python of the environment the `lockstep` binary was installed into).

use super::{HarnessError, HarnessResult};
use crate::cli_error::{CliError, CliResult};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// The reference environment: a python and the folder holding the `lockstep_reference` package.
#[derive(Debug, Clone)]
pub struct ReferenceEnv {
    /// The python interpreter.
    pub python: PathBuf,
    /// The `reference/` folder of the repository (put on `PYTHONPATH`); `None` when the python
    /// has `lockstep_reference` installed (the wheel) and no repository was found.
    pub package_dir: Option<PathBuf>,
}

/// The repository root: searched upward from the binary, then from the current directory.
pub fn repo_root() -> Option<PathBuf> {
    let mut starts = vec![];
    if let Ok(exe) = std::env::current_exe() {
        starts.push(exe);
    }
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    for s in starts {
        for dir in s.ancestors() {
            if dir
                .join("reference/lockstep_reference/__init__.py")
                .exists()
            {
                return Some(dir.to_path_buf());
            }
        }
    }
    None
}

/// True when `python` can import torch, transformers and `lockstep_reference` (looked up with
/// `importlib.util.find_spec`, which imports nothing: a fraction of a second).
fn has_reference_modules(python: &std::path::Path) -> bool {
    Command::new(python)
        .args([
            "-c",
            "import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in ('torch', 'transformers', 'lockstep_reference')) else 1)",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

const HOW: &str = "create it with `bash scripts/setup.sh` in the lockstep repository, or point LOCKSTEP_PYTHON at a python with torch==2.15.0 and transformers==5.24.0";

impl ReferenceEnv {
    /// Locates the reference environment, with a clear error naming the fix when it is missing:
    /// `LOCKSTEP_PYTHON` when set; else the repository's `.venv` (the binary or the current
    /// folder inside a lockstep checkout); else, for a binary installed from the wheel, the
    /// python next to it when torch, transformers and `lockstep_reference` are importable there.
    pub fn find() -> CliResult<Self> {
        let root = repo_root();
        let package_dir = root.as_ref().map(|r| r.join("reference"));
        if let Some(p) = std::env::var_os("LOCKSTEP_PYTHON") {
            let python = PathBuf::from(p);
            if !python.exists() {
                return Err(CliError::input(format!(
                    "the reference environment is missing (LOCKSTEP_PYTHON={} not found); {HOW}",
                    python.display()
                )));
            }
            return Ok(ReferenceEnv {
                python,
                package_dir,
            });
        }
        if let Some(root) = &root {
            let python = root.join(".venv/bin/python");
            if !python.exists() {
                return Err(CliError::input(format!(
                    "the reference environment is missing ({} not found); {HOW}",
                    python.display()
                )));
            }
            return Ok(ReferenceEnv {
                python,
                package_dir,
            });
        }
        let sibling = std::env::current_exe().ok().and_then(|exe| {
            let dir = exe.parent()?.to_path_buf();
            ["python", "python3"]
                .into_iter()
                .map(|n| dir.join(n))
                .find(|p| p.exists())
        });
        match sibling {
            Some(python) if has_reference_modules(&python) => Ok(ReferenceEnv {
                python,
                package_dir: None,
            }),
            Some(python) => Err(CliError::input(format!(
                "the python next to lockstep ({}) lacks torch, transformers or lockstep_reference; install them there (pip install 'lockstep[reference]') or {HOW}",
                python.display()
            ))),
            None => Err(CliError::input(format!(
                "cannot find the reference environment (no lockstep repository here and no python next to the lockstep binary); {HOW}"
            ))),
        }
    }

    /// A `python -m lockstep_reference ARGS` command.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.python);
        c.arg("-m").arg("lockstep_reference").args(args);
        if let Some(dir) = &self.package_dir {
            let mut pp = dir.as_os_str().to_owned();
            if let Some(old) = std::env::var_os("PYTHONPATH") {
                pp.push(":");
                pp.push(old);
            }
            c.env("PYTHONPATH", pp);
        }
        c
    }

    /// Runs the reference; its progress goes to our stderr, its stdout is returned. A failure
    /// becomes one line, [`HarnessError::Reference`]: the last line the reference printed on
    /// stderr.
    pub fn run(&self, args: &[&str]) -> HarnessResult<String> {
        let out = self
            .command(args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| {
                HarnessError::reference(format!("cannot run {}: {e}", self.python.display()))
            })?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let last = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no message");
            return Err(HarnessError::reference(last.trim()));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// How many of the reference's last stderr lines a [`ReferenceServer`] keeps, to name why it died.
const STDERR_TAIL: usize = 20;

/// One `python -m lockstep_reference serve` process running the reference's commands one after
/// another (`reference/lockstep_reference/serve.py`): torch and transformers are imported once
/// instead of once per command (~7 s of one core each on 2026-12-03's 2-core machine; a 7B
/// `verify` runs six commands). A command's answer is what a one-shot [`ReferenceEnv::run`] of it
/// returns; its progress on stderr is kept (the last lines) only to explain a failure. Dropping the
/// server ends the process.
pub struct ReferenceServer {
    child: Child,
    requests: ChildStdin,
    answers: BufReader<ChildStdout>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    stderr_reader: Option<JoinHandle<()>>,
}

/// The server's answer to one request (serve.py's protocol).
#[derive(serde::Deserialize)]
struct ServeAnswer {
    ok: bool,
    #[serde(default)]
    stdout: String,
    #[serde(default)]
    error: String,
}

impl ReferenceEnv {
    /// Starts a [`ReferenceServer`] with this environment's python.
    pub fn serve(&self) -> HarnessResult<ReferenceServer> {
        let mut child = self
            .command(&["serve"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                HarnessError::reference(format!("cannot run {}: {e}", self.python.display()))
            })?;
        let (Some(requests), Some(answers), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HarnessError::reference(
                "the reference process has no pipes",
            ));
        };
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let tail = Arc::clone(&stderr_tail);
        let stderr_reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.trim().is_empty() {
                    continue;
                }
                let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                if t.len() == STDERR_TAIL {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });
        Ok(ReferenceServer {
            child,
            requests,
            answers: BufReader::new(answers),
            stderr_tail,
            stderr_reader: Some(stderr_reader),
        })
    }
}

impl ReferenceServer {
    /// Runs the reference command `args` in the server; its stdout, or its one-line error
    /// ([`HarnessError::Reference`]). When the process itself is gone (killed, crashed) the error
    /// says so with its exit status and the last line it printed on stderr; [`Self::is_alive`]
    /// is then false.
    pub fn run(&mut self, args: &[&str]) -> HarnessResult<String> {
        let request =
            serde_json::to_string(args).map_err(|e| HarnessError::reference(e.to_string()))?;
        let sent = writeln!(self.requests, "{request}").and_then(|_| self.requests.flush());
        let mut line = String::new();
        let read = match sent {
            Ok(()) => self.answers.read_line(&mut line),
            Err(e) => Err(e),
        };
        if !matches!(read, Ok(n) if n > 0) {
            return Err(self.died(args.first().copied().unwrap_or("")));
        }
        let answer: ServeAnswer = serde_json::from_str(&line).map_err(|e| {
            HarnessError::reference(format!(
                "unexpected answer from the reference ({e}): {line}"
            ))
        })?;
        if answer.ok {
            Ok(answer.stdout)
        } else {
            Err(HarnessError::reference(answer.error.trim()))
        }
    }

    /// Whether the process is still running.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The error for a process that stopped answering during `command`: as for a one-shot run,
    /// the last line it printed on stderr (a Python failure's last traceback line); for a process
    /// killed by a signal (the kernel's out-of-memory killer) that fact first.
    fn died(&mut self, command: &str) -> HarnessError {
        use std::os::unix::process::ExitStatusExt;
        let status = self.child.wait();
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
        let tail = self.stderr_tail.lock().unwrap_or_else(|p| p.into_inner());
        let last = tail.back().map(|l| l.trim().to_string());
        HarnessError::reference(match (status, last) {
            (Ok(s), last) if s.signal().is_some() => format!(
                "the reference process was killed ({s}) during {command}; its last message: {}",
                last.as_deref().unwrap_or("none")
            ),
            (_, Some(last)) => last,
            (Ok(s), None) => format!("the reference process ended ({s}) during {command}"),
            (Err(e), None) => format!("the reference process ended during {command}: {e}"),
        })
    }
}

impl Drop for ReferenceServer {
    /// Ends the process: between commands it only waits for its next request.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A [`ReferenceEnv`] whose "python" is the shell script `body` (it gets `-m
    /// lockstep_reference serve` as arguments).
    fn fake_env(name: &str, body: &str) -> ReferenceEnv {
        use std::os::unix::fs::PermissionsExt;
        let dir =
            std::env::temp_dir().join(format!("lockstep-serve-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let python = dir.join("python");
        std::fs::write(&python, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
        ReferenceEnv {
            python,
            package_dir: None,
        }
    }

    /// [`ReferenceEnv::serve`], again while the script is busy ("Text file busy": a test on
    /// another thread forked while this one's script was still open for writing).
    fn serve(env: &ReferenceEnv) -> ReferenceServer {
        for _ in 0..100 {
            match env.serve() {
                Err(e) if e.to_string().contains("Text file busy") => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                r => return r.unwrap(),
            }
        }
        panic!("{} stayed busy", env.python.display())
    }

    #[test]
    fn one_process_answers_every_command_and_its_errors() {
        // Answers each request with its own pid; a request naming "fail" with an error.
        let env = fake_env(
            "answers",
            r#"while read -r line; do
  case "$line" in
    *fail*) echo '{"ok": false, "error": "ValueError: no such model "}' ;;
    *) echo "{\"ok\": true, \"stdout\": \"$$\"}" ;;
  esac
done"#,
        );
        let mut server = serve(&env);
        let first = server.run(&["tokenize-batch", "--model", "m"]).unwrap();
        let err = server.run(&["weights", "--model", "fail"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            HarnessError::reference("ValueError: no such model").to_string()
        );
        assert!(server.is_alive());
        let second = server.run(&["trace-batch", "jobs.json"]).unwrap();
        assert_eq!(first, second, "one process for every command");
        assert!(!first.is_empty());
    }

    #[test]
    fn a_dead_process_is_named_with_its_last_message() {
        let env = fake_env(
            "exits",
            "read -r line; echo 'loading' >&2; echo 'RuntimeError: out of luck' >&2; exit 1",
        );
        let mut server = serve(&env);
        let err = server.run(&["trace-batch", "jobs.json"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            HarnessError::reference("RuntimeError: out of luck").to_string()
        );
        assert!(!server.is_alive());

        let env = fake_env("killed", "read -r line; echo 'layer 3/28' >&2; kill -9 $$");
        let mut server = serve(&env);
        let err = server
            .run(&["ops-batch", "jobs.json"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("was killed") && err.contains("during ops-batch"),
            "{err}"
        );
        assert!(err.contains("its last message: layer 3/28"), "{err}");
    }
}
