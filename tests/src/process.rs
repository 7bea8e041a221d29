//! A child process whose stdout and stderr go to one log file, killed and reaped on drop.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use anyhow::{Context as _, Result};

/// A started program. Dropping it kills it (SIGKILL) and waits for it.
#[derive(Debug)]
pub struct Proc {
    name: String,
    log: PathBuf,
    child: Child,
}

impl Proc {
    /// Starts `cmd` with stdin closed and stdout+stderr appended to `log` (created if
    /// needed; a restart appends, after a marker line).
    ///
    /// # Errors
    /// The log cannot be opened or the program cannot be started.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening the {name} log {}", log.display()))?;
        writeln!(out, "==== harness: starting {name}: {cmd:?}").ok();
        let err = out
            .try_clone()
            .with_context(|| format!("cloning the {name} log handle"))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Self {
            name: name.to_owned(),
            log: log.to_path_buf(),
            child,
        })
    }

    /// The component name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The OS process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// `Some(status)` when the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Kills (SIGKILL) and reaps the process; fine if it already exited.
    pub fn kill(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// Asks the process to stop with SIGTERM, waits up to `timeout_ms` for it to exit,
    /// then kills it.
    pub fn terminate(&mut self, timeout_ms: u64) {
        #[cfg(unix)]
        if self.exited().is_none() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.id().to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = std::time::Instant::now() + std::time::Duration::from_millis(timeout_ms);
            while std::time::Instant::now() < deadline && self.exited().is_none() {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        #[cfg(not(unix))]
        let _ = timeout_ms;
        self.kill();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of a log file (reads at most the last 256 KiB).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return format!("(cannot read {}: {e})", path.display()),
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(256 * 1024);
    let mut buf = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err() || file.read_to_end(&mut buf).is_err() {
        return format!("(cannot read {})", path.display());
    }
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
