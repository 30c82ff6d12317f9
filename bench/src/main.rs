//! The benchmarks behind `cargo xtask bench`. Every figure is measured against a baseline
//! measured in the same run on the same machine, and reported as a ratio to it:
//!
//! - `xdp_cost`: XDP cost per packet through BPF_PROG_TEST_RUN, the limiter against an
//!   XDP_DROP program and a minimal count-and-drop program (`bench-ebpf`).
//! - `redis_throughput`: keys reconciled per second by the agent's batched scripts against a
//!   script call per packet, and Redis commands per million packets.
//! - `tick`: the agent's tick duration and CPU time at 10k, 100k and 1M active keys.
//! - `accuracy`: three gateways holding one fleet-wide limit while traffic moves, with a plot.
//! - `veth_path`: packets per second a flood through a veth pair achieves with the limiter,
//!   a bare XDP_DROP program, nftables and iptables hashlimit as the per-source limit.
//!
//! Each part that fails is recorded with its error in the report, and the others still run.
//! The results go to `target/bench/report.json` and `target/bench/BENCHMARKS.md`. A full
//! run (without `--quick`) also writes `docs/BENCHMARKS.md` and the plot under `docs/`.
//!
//! Needs root, `redis-server` and `ip` on PATH, and `target/release/limiter` (the fleet part
//! starts real agents); `cargo xtask bench` provides all of them.

mod accuracy;
mod machine;
mod plot;
mod redis_throughput;
mod report;
mod tick;
mod veth_path;
mod xdp_cost;

use std::{
    fs,
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "limiter-bench",
    about = "Benchmarks of the limiter against baselines measured in the same run"
)]
struct Cli {
    /// Small key counts, few repetitions and a short fleet run, for checking that the
    /// benchmarks work. Writes only under target/bench, never docs/.
    #[arg(long)]
    quick: bool,
    /// Parts to run, in the order given (default: all). A subset writes only under
    /// target/bench, never docs/.
    #[arg(long, value_enum, value_delimiter = ',')]
    parts: Vec<Part>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    XdpCost,
    RedisThroughput,
    Tick,
    Accuracy,
    VethPath,
}

/// Sizes of one run: the full run, or the small one `--quick` selects.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Scale {
    pub quick: bool,
    /// BPF_PROG_TEST_RUN repetitions of one frame for the hot-key figures.
    pub xdp_repeat: u32,
    /// Hot-key measurements per program; the report keeps their median.
    pub xdp_runs: usize,
    /// Distinct source addresses for the many-keys figures.
    pub xdp_distinct_keys: u32,
    /// Active keys for the batched Redis figures.
    pub redis_keys: usize,
    /// Ticks' worth of batched calls, each covering every key once.
    pub redis_rounds: usize,
    /// Script calls the naive design makes in all, over its concurrent clients.
    pub naive_packets: u64,
    pub naive_clients: usize,
    /// Active keys of each agent tick measurement.
    pub tick_keys: &'static [u32],
    /// Seconds of the fleet scenario before and after the traffic moves.
    pub fleet_split_seconds: u64,
    pub fleet_moved_seconds: u64,
}

impl Scale {
    const FULL: Scale = Scale {
        quick: false,
        xdp_repeat: 1_000_000,
        xdp_runs: 11,
        xdp_distinct_keys: 1_000_000,
        redis_keys: 100_000,
        redis_rounds: 5,
        naive_packets: 500_000,
        naive_clients: 50,
        tick_keys: &[10_000, 100_000, 1_000_000],
        fleet_split_seconds: 10,
        fleet_moved_seconds: 5,
    };

    const QUICK: Scale = Scale {
        quick: true,
        xdp_repeat: 1_000_000,
        xdp_runs: 1,
        xdp_distinct_keys: 20_000,
        redis_keys: 10_000,
        redis_rounds: 1,
        naive_packets: 20_000,
        naive_clients: 50,
        tick_keys: &[10_000],
        fleet_split_seconds: 3,
        fleet_moved_seconds: 2,
    };
}

/// Everything one run measured, as written to `report.json`.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub machine: Option<machine::Machine>,
    pub scale: Option<Scale>,
    pub xdp_cost: Option<xdp_cost::XdpCost>,
    pub redis_throughput: Option<redis_throughput::RedisThroughput>,
    pub tick: Option<tick::TickCost>,
    pub accuracy: Option<accuracy::Accuracy>,
    pub veth_path: Option<veth_path::VethPath>,
    /// Parts that failed, with their errors.
    pub failures: Vec<(Part, String)>,
    /// Parts not run in this run.
    pub skipped: Vec<Part>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "run as root: the benchmarks load XDP programs, create network namespaces and pin maps"
        );
    }
    let workspace = workspace_root()?;
    let scale = if cli.quick { Scale::QUICK } else { Scale::FULL };
    let all = [
        Part::XdpCost,
        Part::RedisThroughput,
        Part::Tick,
        Part::Accuracy,
        Part::VethPath,
    ];
    let parts: Vec<Part> = if cli.parts.is_empty() {
        all.to_vec()
    } else {
        cli.parts.clone()
    };

    let mut report = Report {
        machine: Some(machine::Machine::collect()),
        scale: Some(scale),
        ..Report::default()
    };
    report.skipped = all
        .iter()
        .copied()
        .filter(|part| !parts.contains(part))
        .collect();
    let runtime = tokio::runtime::Runtime::new().context("failed to start the tokio runtime")?;
    let output_dir = workspace.join("target/bench");
    fs::create_dir_all(&output_dir)
        .with_context(|| format!("failed to create {}", output_dir.display()))?;

    for part in parts {
        eprintln!("bench: running {part:?}");
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            run_part(part, &scale, &runtime, &output_dir, &mut report)
        }));
        let error = match outcome {
            Ok(Ok(())) => continue,
            Ok(Err(error)) => format!("{error:#}"),
            // The fixtures of limiter-tests panic on failure, with the reason as the message.
            Err(panic) => panic_message(panic.as_ref()),
        };
        eprintln!("bench: {part:?} failed: {error}");
        report.failures.push((part, error));
    }

    write_outputs(&workspace, &output_dir, &report)
}

fn run_part(
    part: Part,
    scale: &Scale,
    runtime: &tokio::runtime::Runtime,
    output_dir: &Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    match part {
        Part::XdpCost => report.xdp_cost = Some(xdp_cost::run(scale)?),
        Part::RedisThroughput => {
            report.redis_throughput = Some(runtime.block_on(redis_throughput::run(scale))?)
        }
        Part::Tick => report.tick = Some(runtime.block_on(tick::run(scale))?),
        Part::Accuracy => {
            let accuracy = accuracy::run(scale)?;
            plot::draw_accuracy(&accuracy, &output_dir.join(plot::ACCURACY_PLOT))?;
            report.accuracy = Some(accuracy);
        }
        Part::VethPath => report.veth_path = Some(veth_path::run(scale)?),
    }
    Ok(())
}

fn write_outputs(workspace: &Path, output_dir: &Path, report: &Report) -> anyhow::Result<()> {
    let json_path = output_dir.join("report.json");
    let json = serde_json::to_string_pretty(report).context("failed to serialize the report")?;
    fs::write(&json_path, json)
        .with_context(|| format!("failed to write {}", json_path.display()))?;
    let markdown = report::render(report);
    let markdown_path = output_dir.join("BENCHMARKS.md");
    fs::write(&markdown_path, &markdown)
        .with_context(|| format!("failed to write {}", markdown_path.display()))?;
    eprintln!(
        "bench: wrote {} and {}",
        json_path.display(),
        markdown_path.display()
    );

    // docs/ contains the page of a full run only: a quick run or a subset of the parts would
    // replace the committed figures with fewer of them.
    if report.scale.is_some_and(|scale| scale.quick) || !report.skipped.is_empty() {
        return Ok(());
    }
    let docs = workspace.join("docs");
    fs::create_dir_all(&docs).with_context(|| format!("failed to create {}", docs.display()))?;
    fs::write(docs.join("BENCHMARKS.md"), &markdown)
        .context("failed to write docs/BENCHMARKS.md")?;
    let plot = output_dir.join(plot::ACCURACY_PLOT);
    if plot.exists() {
        fs::copy(&plot, docs.join(plot::ACCURACY_PLOT))
            .with_context(|| format!("failed to copy {} to docs/", plot.display()))?;
    }
    eprintln!("bench: wrote docs/BENCHMARKS.md");
    Ok(())
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else {
        "panicked without a message".to_owned()
    }
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("the bench crate has no parent folder: run it from the limiter workspace")
}

/// Returns the median of `values`, or 0 for none.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        len if len % 2 == 1 => sorted[len / 2],
        len => (sorted[len / 2 - 1] + sorted[len / 2]) / 2.0,
    }
}

/// Returns `numerator / denominator`, or NaN when the baseline is zero.
pub fn ratio(numerator: f64, denominator: f64) -> f64 {
    if denominator == 0.0 {
        f64::NAN
    } else {
        numerator / denominator
    }
}

/// User plus system CPU time of this process, all threads, in seconds.
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: `rusage` is plain data that getrusage fills in; RUSAGE_SELF always exists.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is valid for the duration of the call.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}
