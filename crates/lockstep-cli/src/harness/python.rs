//! Finding and running the Python reference (`reference/lockstep_reference`, pinned torch +
//! transformers in the project's `.venv`, or `LOCKSTEP_PYTHON`).

use super::{HarnessError, HarnessResult};
use crate::cli_error::{CliError, CliResult};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The reference environment: a python and the folder holding the `lockstep_reference` package.
#[derive(Debug, Clone)]
pub struct ReferenceEnv {
    /// The python interpreter.
    pub python: PathBuf,
    /// The `reference/` folder of the repository.
    pub package_dir: PathBuf,
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

const HOW: &str = "create it with `bash scripts/setup.sh` in the lockstep repository, or point LOCKSTEP_PYTHON at a python with torch==2.15.0 and transformers==5.24.0";

impl ReferenceEnv {
    /// Locates the reference environment, with a clear error naming the fix when it is missing.
    pub fn find() -> CliResult<Self> {
        let root = repo_root().ok_or_else(|| {
            CliError::input(format!(
                "cannot find the lockstep repository's reference/ package; {HOW}"
            ))
        })?;
        let python = match std::env::var_os("LOCKSTEP_PYTHON") {
            Some(p) => PathBuf::from(p),
            None => root.join(".venv/bin/python"),
        };
        if !python.exists() {
            return Err(CliError::input(format!(
                "the reference environment is missing ({} not found); {HOW}",
                python.display()
            )));
        }
        Ok(ReferenceEnv {
            python,
            package_dir: root.join("reference"),
        })
    }

    /// A `python -m lockstep_reference ARGS` command.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.python);
        c.arg("-m").arg("lockstep_reference").args(args);
        let mut pp = self.package_dir.as_os_str().to_owned();
        if let Some(old) = std::env::var_os("PYTHONPATH") {
            pp.push(":");
            pp.push(old);
        }
        c.env("PYTHONPATH", pp);
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
