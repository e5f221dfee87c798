//! Finding and running the Python reference (`reference/lockstep_reference`, pinned torch +
//! transformers in the project's `.venv`, or `LOCKSTEP_PYTHON`; from an installed wheel, the
//! python of the environment the `lockstep` binary was installed into).

use super::{HarnessError, HarnessResult};
use crate::cli_error::{CliError, CliResult};
use std::path::PathBuf;
use std::process::{Command, Stdio};

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
