//! Helpers shared by the tasks: the workspace root and running commands.

use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{bail, Context as _, Result};

/// The workspace root (`xtask/..`).
pub fn root() -> PathBuf {
    idemgate_e2e::workspace_root()
}

/// `cargo` as invoked by `cargo xtask` (`$CARGO`), or `cargo` from `PATH`.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Prints the command, runs it with inherited stdout/stderr and stdin closed, and returns
/// its exit status.
///
/// # Errors
/// The program cannot be started.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    eprintln!("$ {}", display(cmd));
    cmd.stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))
}

/// Like [`status`], but a non-zero exit is an error.
///
/// # Errors
/// The program cannot be started or exits unsuccessfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let st = status(cmd)?;
    if !st.success() {
        bail!("`{}` failed ({st})", display(cmd));
    }
    Ok(())
}

/// Runs quietly and returns stdout when the program exits successfully.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command line as text, for messages.
pub fn display(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| {
        let s = a.to_string_lossy();
        if s.is_empty() || s.contains(' ') {
            format!("'{s}'")
        } else {
            s.into_owned()
        }
    }));
    parts.join(" ")
}
