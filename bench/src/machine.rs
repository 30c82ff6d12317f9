//! Facts about the machine a run measured, written at the top of the report.

use std::{fs, process::Command};

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// Output of `nproc`: CPUs this process may run on.
    pub nproc: String,
    /// Output of `uname -r`.
    pub kernel: String,
    /// First `model name` line of /proc/cpuinfo.
    pub cpu_model: String,
    /// Output of `date -u` when the run started.
    pub started_at: String,
    /// `git rev-parse --short HEAD`, with `-dirty` when the work tree has changes.
    pub commit: String,
}

impl Machine {
    /// Collects the facts; a fact that cannot be read is recorded as `unknown (reason)`.
    pub fn collect() -> Self {
        let cpu_model = match fs::read_to_string("/proc/cpuinfo") {
            Ok(cpuinfo) => cpuinfo
                .lines()
                .find_map(|line| {
                    line.strip_prefix("model name")
                        .and_then(|rest| rest.split_once(':'))
                })
                .map_or_else(
                    || "unknown (no model name in /proc/cpuinfo)".to_owned(),
                    |(_, model)| model.trim().to_owned(),
                ),
            Err(error) => format!("unknown (failed to read /proc/cpuinfo: {error})"),
        };
        let mut commit = command_output("git", &["rev-parse", "--short", "HEAD"]);
        if !command_output("git", &["status", "--porcelain"]).is_empty() {
            commit.push_str("-dirty");
        }
        Self {
            nproc: command_output("nproc", &[]),
            kernel: command_output("uname", &["-r"]),
            cpu_model,
            started_at: command_output("date", &["-u"]),
            commit,
        }
    }
}

fn command_output(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(output) if output.status.success() => {
            String::from_utf8_lossy(&output.stdout).trim().to_owned()
        }
        Ok(output) => format!("unknown ({program} failed with {})", output.status),
        Err(error) => format!("unknown (failed to start {program}: {error})"),
    }
}
