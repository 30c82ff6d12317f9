//! Project tasks: `cargo xtask setup | build | demo | test | dist | vm-test | bench`.
//!
//! Every task that builds runs `setup` first, so a fresh machine needs nothing installed by
//! hand. xtask itself depends on nothing that needs the eBPF toolchain, so it builds before
//! that toolchain exists.

mod dist;
mod setup;
mod vm;

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Build, demo, test and benchmark tasks of the limiter")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the Debian packages, nightly rust-src and bpf-linker, where missing.
    Setup,
    /// Build the `limiter` binary (release) with the XDP program embedded.
    Build,
    /// Run the demo: real packets through a real XDP program, one agent, one redis-server.
    Demo,
    /// Run the unit tests, the privileged integration tests (needs root), then the VM
    /// tests on Linux 6.1, the oldest kernel supported.
    Test {
        /// Leave out the VM tests, for a quicker run on a developer's machine.
        #[arg(long)]
        skip_vm: bool,
    },
    /// Build the binary and write it to target/dist with shell completions, man pages and
    /// the systemd unit.
    Dist,
    /// Run the integration tests in QEMU guests on Debian's 6.1 and 6.12 kernels; without
    /// `--all-tests`, all but the multi-gateway, Redis outage and Redis-only tests.
    VmTest {
        /// Kernel series to boot: 6.1, 6.12 or all.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Also run the multi-gateway and Redis outage tests, whose timing checks fail now
        /// and then under emulation, and the Redis Cluster and Lua script tests.
        #[arg(long)]
        all_tests: bool,
        /// Run only the tests whose `<file>::<test>` name contains this, such as `parser::`.
        #[arg(long)]
        filter: Option<String>,
        /// Maximum run time of one guest, from boot to power-off, in seconds.
        #[arg(long, default_value_t = 1800)]
        timeout: u64,
    },
    /// Run the benchmarks (needs root) and write target/bench/report.json and
    /// docs/BENCHMARKS.md. Arguments after `--` go to limiter-bench, such as `--quick`.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    std::env::set_current_dir(workspace_root()).context("failed to enter the workspace")?;
    match cli.task {
        Task::Setup => setup::setup(),
        Task::Build => {
            setup::setup()?;
            build()
        }
        Task::Demo => {
            setup::setup()?;
            build()?;
            require_root("the demo creates network namespaces and attaches XDP")?;
            run(Command::new("cargo").args(["run", "--release", "--quiet", "-p", "limiter-tests", "--bin", "limiter-demo"]))
        }
        Task::Test { skip_vm } => {
            setup::setup()?;
            test()?;
            if skip_vm {
                return Ok(());
            }
            // The host runs a recent kernel; operators run older ones. Debian 12's 6.1 is
            // the oldest kernel the VM tests boot.
            setup::setup_vm()?;
            vm::vm_test(&vm::Options {
                kernel: "6.1".to_owned(),
                all_tests: false,
                filter: None,
                timeout: Duration::from_secs(1800),
            })
        }
        Task::Dist => {
            setup::setup()?;
            build()?;
            let out = dist::dist(&workspace_root())?;
            println!("wrote {}", out.display());
            Ok(())
        }
        Task::VmTest { kernel, all_tests, filter, timeout } => {
            setup::setup()?;
            setup::setup_vm()?;
            vm::vm_test(&vm::Options { kernel, all_tests, filter, timeout: Duration::from_secs(timeout) })
        }
        Task::Bench { args } => {
            setup::setup()?;
            // The fleet benchmark starts real agents from target/release/limiter.
            build()?;
            require_root("the benchmarks load XDP programs, create network namespaces and pin maps")?;
            run(Command::new("cargo").args(["run", "--release", "--quiet", "-p", "limiter-bench", "--"]).args(&args))
        }
    }
}

pub(crate) fn build() -> anyhow::Result<()> {
    run(Command::new("cargo").args(["build", "--release", "-p", "limiter-user"]))
}

fn test() -> anyhow::Result<()> {
    // Unit tests need no privileges: window arithmetic, allowances, rule parsing, replies.
    run(Command::new("cargo").args(["test", "--release", "-p", "limiter-common", "--features", "user"]))?;
    run(Command::new("cargo").args(["test", "--release", "-p", "limiter-user", "-p", "xtask"]))?;

    // Integration tests load XDP programs, create namespaces and start agents and
    // redis-servers. One at a time: the traffic tests measure per-second rates on 2 cores.
    require_root("the integration tests load XDP programs and create network namespaces")?;
    build()?;
    run(Command::new("cargo").args(["test", "--release", "-p", "limiter-tests", "--", "--test-threads=1"]))
}

fn require_root(why: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc_geteuid() } != 0 {
        bail!("run as root: {why}");
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives inside the workspace").to_path_buf()
}

/// Runs a command with inherited output, failing with its command line if it fails.
pub(crate) fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command.status().with_context(|| format!("failed to start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

/// Runs a command and returns its standard output.
pub(crate) fn command_output(command: &mut Command) -> anyhow::Result<String> {
    let output = command.output().with_context(|| format!("failed to start {command:?}"))?;
    if !output.status.success() {
        bail!("{command:?} failed with {}: {}", output.status, String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
