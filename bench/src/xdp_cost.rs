//! XDP cost per packet through BPF_PROG_TEST_RUN: the limiter against `xdp-drop` and
//! `xdp-count` from `bench-ebpf`, all three built and loaded in the same run.
//!
//! Hot key: one UDP frame run `repeat` times in one call, so every run after the first finds
//! its map entries in cache. The kernel returns the mean duration of the runs in whole
//! nanoseconds, and the wall time of the call, divided by `repeat`, gives a finer figure.
//!
//! Many keys: BPF_PROG_TEST_RUN repeats one frame, so distinct keys need one call per frame.
//! Each program runs on every source once, which creates the keys (the new-key figure), then
//! on every source again (the known-key figure), always with `repeat = 1`. Each figure is the
//! mean of the kernel's durations over its pass. With a single repetition, each duration also contains the kernel's two
//! clock reads around the run, a floor that `xdp-drop` measures, so the report gives both the
//! raw ratio and the ratio of the cost above that floor.
//!
//! The limiter runs its production path: a rule for every source keyed by /32, and for each
//! key a grant that never runs out, written from user space as the agent writes it.

use std::{
    net::Ipv4Addr,
    os::fd::{AsFd as _, BorrowedFd},
    time::Instant,
};

use anyhow::{Context as _, anyhow};
use aya::{Ebpf, EbpfLoader, maps::PerCpuValues, programs::Xdp};
use limiter_common::{FAMILY_IPV4, FlowKey, Grant, IPPROTO_UDP, Rule, RuleIndex, RuleMatch};
use limiter_tests::{
    PinDir,
    test_run::{Frame, TestRunOutput, run_xdp},
    traffic::pin_to_cpu,
};
use limiter_user::datapath::{self, Maps};
use serde::Serialize;

use crate::{Scale, median, ratio};

/// The baseline programs, built by `build.rs` from `bench-ebpf`.
static XDP_DROP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-drop"));
static XDP_COUNT_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-count"));

/// Keys one CPU's LRU list can contain in the limiter's key maps and in `xdp-count`'s map: 2^20,
/// so the million keys of the many-keys runs, all on `BENCH_CPU`, fit. Both maps keep a
/// list per CPU, each with an equal part of the map, so the maps are this times the CPUs.
const MAX_KEYS_PER_CPU: u32 = 1_048_576;

/// Entries of a map whose every CPU can contain [`MAX_KEYS_PER_CPU`].
fn map_entries() -> anyhow::Result<u32> {
    let cpus = limiter_user::batch::possible_cpus()? as u32;
    Ok(MAX_KEYS_PER_CPU.saturating_mul(cpus))
}

/// Offset of the IPv4 source address in the untagged frames built here.
const SOURCE_OFFSET: usize = 14 + 12;

const HOT_SOURCE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const DESTINATION: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

/// The CPU every test run is pinned to, so per-CPU values and caches stay on one core.
const BENCH_CPU: usize = 0;

/// Nanoseconds per packet of each program.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct PerProgram {
    pub xdp_drop: f64,
    pub xdp_count: f64,
    pub limiter: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct XdpCost {
    pub repeat: u32,
    pub runs: usize,
    /// Median over `runs` of the kernel's mean duration, whole nanoseconds each.
    pub hot_key_kernel_ns: PerProgram,
    /// Lowest and highest of the `runs` kernel means, for the spread between runs.
    pub hot_key_kernel_min_ns: PerProgram,
    pub hot_key_kernel_max_ns: PerProgram,
    /// Median over `runs` of the call's wall time divided by `repeat`.
    pub hot_key_wall_ns: PerProgram,
    pub hot_key_limiter_vs_count: f64,
    pub hot_key_limiter_vs_drop: f64,
    /// Median kernel mean of the limiter on the hot key when its rule (UDP port 53) is found
    /// at the first of the three rule lookups. The figures above use a rule for all traffic,
    /// found at the third.
    pub hot_key_first_lookup_kernel_ns: f64,
    pub hot_key_first_lookup_min_ns: f64,
    pub hot_key_first_lookup_max_ns: f64,
    pub hot_key_first_lookup_vs_count: f64,
    pub distinct_keys: u32,
    /// Mean kernel duration of the first packet of each new key (the entry is created).
    pub new_key_ns: PerProgram,
    /// Mean kernel duration of a packet of a key already in the map, over every key once.
    pub many_keys_ns: PerProgram,
    pub many_keys_limiter_vs_count: f64,
    /// (limiter - xdp-drop) / (xdp-count - xdp-drop): the ratio without the clock floor.
    pub many_keys_limiter_vs_count_above_floor: f64,
    /// Keys each map held after the runs, as a check that no key was evicted.
    pub limiter_keys_held: usize,
}

/// A loaded program and what keeps it loaded.
struct Loaded {
    ebpf: Ebpf,
    program_name: &'static str,
    /// The limiter's pins, removed on drop.
    _pins: Option<PinDir>,
}

impl Loaded {
    fn fd(&self) -> anyhow::Result<BorrowedFd<'_>> {
        let program: &Xdp = self
            .ebpf
            .program(self.program_name)
            .ok_or_else(|| anyhow!("the object has no program named {}", self.program_name))?
            .try_into()?;
        Ok(program
            .fd()
            .context("the loaded program has no file descriptor")?
            .as_fd())
    }
}

/// Runs both measurements on a thread pinned to one CPU.
pub fn run(scale: &Scale) -> anyhow::Result<XdpCost> {
    let scale = *scale;
    std::thread::spawn(move || {
        pin_to_cpu(BENCH_CPU);
        measure(&scale)
    })
    .join()
    .map_err(|panic| anyhow!(crate::panic_message(panic.as_ref())))?
}

fn measure(scale: &Scale) -> anyhow::Result<XdpCost> {
    let drop = load_baseline(XDP_DROP_OBJECT, "xdp_drop")?;
    let count = load_baseline(XDP_COUNT_OBJECT, "xdp_count")?;
    let (limiter, mut maps) = load_limiter()?;
    let cpus =
        aya::util::nr_cpus().map_err(|(path, error)| anyhow!("failed to read {path}: {error}"))?;

    // Step 1: the hot key, with its grant, run `repeat` times per call.
    let hot_frame = Frame::ipv4(HOT_SOURCE, DESTINATION).udp(40_000, 53).build();
    insert_grant(&mut maps, HOT_SOURCE, cpus)?;
    let mut kernel = [Vec::new(), Vec::new(), Vec::new()];
    let mut wall = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..scale.runs_per_program() {
        for (index, loaded) in [&drop, &count, &limiter].into_iter().enumerate() {
            let started = Instant::now();
            let output = test_run(loaded, &hot_frame, scale.xdp_repeat)?;
            wall[index].push(started.elapsed().as_nanos() as f64 / f64::from(scale.xdp_repeat));
            kernel[index].push(f64::from(output.duration_ns));
        }
    }
    let per_program = |figures: &[Vec<f64>; 3]| PerProgram {
        xdp_drop: median(&figures[0]),
        xdp_count: median(&figures[1]),
        limiter: median(&figures[2]),
    };
    let hot_key_kernel_ns = per_program(&kernel);
    let hot_key_wall_ns = per_program(&wall);
    let extreme = |figures: &[Vec<f64>; 3], pick: fn(f64, f64) -> f64| PerProgram {
        xdp_drop: figures[0].iter().copied().reduce(pick).unwrap_or(0.0),
        xdp_count: figures[1].iter().copied().reduce(pick).unwrap_or(0.0),
        limiter: figures[2].iter().copied().reduce(pick).unwrap_or(0.0),
    };
    let hot_key_kernel_min_ns = extreme(&kernel, f64::min);
    let hot_key_kernel_max_ns = extreme(&kernel, f64::max);

    // Step 2: the same hot key under a rule for exactly its traffic, UDP port 53, which the
    // program finds at its first rule lookup. Same rule id, so the
    // key and its grant stay the same.
    let specific = RuleMatch::new(IPPROTO_UDP, 53);
    write_rule_index(&mut maps, RuleIndex { port_rules: 1, any_rules: 1, valid: 1, ..RuleIndex::default() })?;
    maps.rules
        .insert(specific, limiter_rule(), 0)
        .context("failed to insert the UDP port 53 rule")?;
    let mut specific_kernel = Vec::new();
    for _ in 0..scale.runs_per_program() {
        specific_kernel.push(f64::from(
            test_run(&limiter, &hot_frame, scale.xdp_repeat)?.duration_ns,
        ));
    }
    maps.rules
        .remove(&specific)
        .context("failed to remove the UDP port 53 rule")?;
    write_rule_index(&mut maps, RuleIndex { any_rules: 1, valid: 1, ..RuleIndex::default() })?;
    let hot_key_first_lookup_kernel_ns = median(&specific_kernel);

    // Step 3: grants for every distinct key, as the agent would have written them.
    let sources: Vec<Ipv4Addr> = (0..scale.xdp_distinct_keys).map(distinct_source).collect();
    for source in &sources {
        insert_grant(&mut maps, *source, cpus)?;
    }

    // Step 4: one pass that creates every key, then the timed pass over keys in the map.
    let mut frame = Frame::ipv4(HOT_SOURCE, DESTINATION).udp(40_000, 53).build();
    let mut new_key = PerProgram::default();
    let mut many_keys = PerProgram::default();
    for (loaded, new_key_slot, many_keys_slot) in [
        (&drop, &mut new_key.xdp_drop, &mut many_keys.xdp_drop),
        (&count, &mut new_key.xdp_count, &mut many_keys.xdp_count),
        (&limiter, &mut new_key.limiter, &mut many_keys.limiter),
    ] {
        *new_key_slot = mean_over_sources(loaded, &mut frame, &sources)?;
        *many_keys_slot = mean_over_sources(loaded, &mut frame, &sources)?;
    }
    let limiter_keys_held = maps.counters.keys().filter(Result::is_ok).count();

    Ok(XdpCost {
        repeat: scale.xdp_repeat,
        runs: scale.runs_per_program(),
        hot_key_limiter_vs_count: ratio(hot_key_kernel_ns.limiter, hot_key_kernel_ns.xdp_count),
        hot_key_limiter_vs_drop: ratio(hot_key_kernel_ns.limiter, hot_key_kernel_ns.xdp_drop),
        hot_key_kernel_ns,
        hot_key_kernel_min_ns,
        hot_key_kernel_max_ns,
        hot_key_wall_ns,
        hot_key_first_lookup_min_ns: specific_kernel
            .iter()
            .copied()
            .reduce(f64::min)
            .unwrap_or(0.0),
        hot_key_first_lookup_max_ns: specific_kernel
            .iter()
            .copied()
            .reduce(f64::max)
            .unwrap_or(0.0),
        hot_key_first_lookup_vs_count: ratio(
            hot_key_first_lookup_kernel_ns,
            hot_key_kernel_ns.xdp_count,
        ),
        hot_key_first_lookup_kernel_ns,
        distinct_keys: scale.xdp_distinct_keys,
        new_key_ns: new_key,
        many_keys_limiter_vs_count: ratio(many_keys.limiter, many_keys.xdp_count),
        many_keys_limiter_vs_count_above_floor: ratio(
            many_keys.limiter - many_keys.xdp_drop,
            many_keys.xdp_count - many_keys.xdp_drop,
        ),
        many_keys_ns: many_keys,
        limiter_keys_held,
    })
}

impl Scale {
    fn runs_per_program(&self) -> usize {
        self.xdp_runs.max(1)
    }
}

/// Returns the `index`-th source of the many-keys runs: 10.0.0.1 upwards.
fn distinct_source(index: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0001u32.wrapping_add(index))
}

/// Runs `frame` once with each source written into it, and returns the mean kernel duration.
fn mean_over_sources(
    loaded: &Loaded,
    frame: &mut [u8],
    sources: &[Ipv4Addr],
) -> anyhow::Result<f64> {
    let mut total_ns = 0u64;
    for source in sources {
        frame[SOURCE_OFFSET..SOURCE_OFFSET + 4].copy_from_slice(&source.octets());
        total_ns += u64::from(test_run(loaded, frame, 1)?.duration_ns);
    }
    Ok(total_ns as f64 / sources.len().max(1) as f64)
}

fn test_run(loaded: &Loaded, frame: &[u8], repeat: u32) -> anyhow::Result<TestRunOutput> {
    run_xdp(loaded.fd()?, frame, repeat)
        .with_context(|| format!("BPF_PROG_TEST_RUN of {} failed", loaded.program_name))
}

fn load_baseline(object: &[u8], program_name: &'static str) -> anyhow::Result<Loaded> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries("SOURCE_COUNTS", map_entries()?)
        .load(object)
        .with_context(|| format!("failed to load the {program_name} object: run as root"))?;
    let program: &mut Xdp = ebpf
        .program_mut(program_name)
        .ok_or_else(|| anyhow!("the baseline object has no program named {program_name}"))?
        .try_into()?;
    program
        .load()
        .with_context(|| format!("the kernel verifier rejected {program_name}"))?;
    Ok(Loaded {
        ebpf,
        program_name,
        _pins: None,
    })
}

/// Loads the limiter into a fresh pin folder with `limiter_rule` for all traffic.
fn load_limiter() -> anyhow::Result<(Loaded, Maps)> {
    let pins = PinDir::new();
    let ebpf = datapath::load(&pins.path, map_entries()?)?;
    let mut maps = Maps::open_dir(&pins.path)?;
    // The rule index, as `limiter limit add` writes it, so the program skips the lookups
    // that cannot find a rule, as in production.
    write_rule_index(&mut maps, RuleIndex { any_rules: 1, valid: 1, ..RuleIndex::default() })?;
    maps.rules
        .insert(RuleMatch::new(0, 0), limiter_rule(), 0)
        .context("failed to insert the benchmark rule")?;
    Ok((
        Loaded {
            ebpf,
            program_name: "limiter",
            _pins: Some(pins),
        },
        maps,
    ))
}

fn write_rule_index(maps: &mut Maps, index: RuleIndex) -> anyhow::Result<()> {
    maps.rule_index.set(0, index, 0).context("failed to write the RULE_INDEX map")
}

/// Returns rule 1: sources keyed by /32, with limits no benchmark reaches.
fn limiter_rule() -> Rule {
    let unreachable = 1 << 40;
    Rule {
        id: 1,
        ipv4_prefix_len: 32,
        ipv6_prefix_len: 128,
        limit: unreachable,
        fallback_limit: unreachable,
        new_key_limit: unreachable,
        window_ns: 1_000_000_000,
        ..Rule::default()
    }
}

/// Writes a grant for `source` under rule 1 that never runs out or expires.
fn insert_grant(maps: &mut Maps, source: Ipv4Addr, cpus: usize) -> anyhow::Result<()> {
    let mut key = FlowKey {
        rule_id: 1,
        family: FAMILY_IPV4,
        prefix_len: 32,
        ..FlowKey::default()
    };
    key.addr[..4].copy_from_slice(&source.octets());
    let grant = Grant {
        passed_ceiling: u64::MAX,
        expires_ns: u64::MAX,
    };
    let values =
        PerCpuValues::try_from(vec![grant; cpus]).context("failed to build a per-CPU grant")?;
    maps.grants
        .insert(key, values, 0)
        .with_context(|| format!("failed to write the grant of {source}"))
}
