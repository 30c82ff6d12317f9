//! The agent's tick at 10k, 100k and 1M active keys: wall time and CPU time of
//! `Reconciler::tick` against a throwaway redis-server on loopback.
//!
//! For each key count: load the limiter into a fresh pin folder with maps sized for the keys,
//! and write that many keys into COUNTERS from user space (100 offered and passed packets
//! each, spread over the CPUs). A first tick follows, in which every key is new to the agent. Then
//! add 100 packets to every key and time a second tick, the steady state of an agent in which
//! every key saw traffic since the last tick. CPU time is the agent process's user plus system
//! time from getrusage (all threads), and Redis's own from INFO cpu.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    os::fd::AsFd as _,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};

use aya::maps::{IterableMap as _, PerCpuValues};
use limiter_common::{FAMILY_IPV4, FlowKey, KeyCounter, Rule, RuleMatch};
use limiter_tests::{PinDir, RedisServer};
use limiter_user::{
    batch,
    datapath::{self, Maps},
    reconcile::{Reconciler, TickReport},
    store::Store,
};
use serde::Serialize;

use crate::{Scale, process_cpu_seconds};

const INTERVAL: Duration = Duration::from_millis(100);
/// Maximum wait for each store call of a tick. The agent's default is 50 ms, under which the
/// largest ticks here would time out instead of being measured.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Packets each key receives between the two ticks.
const PACKETS_PER_TICK: u64 = 100;

#[derive(Clone, Debug, Serialize)]
pub struct TickCost {
    pub interval_ms: u64,
    pub runs: Vec<TickRun>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TickRun {
    pub keys: u32,
    /// Time to write the keys into COUNTERS from user space, not part of any tick.
    pub fill_seconds: f64,
    pub first_tick: TickFigures,
    /// Time to walk COUNTERS key by key through aya (one syscall for the next key, one for
    /// its per-CPU values), measured alone just before the steady tick: the baseline of
    /// `counters_batch_ms`.
    pub counters_walk_ms: f64,
    /// Time to read COUNTERS with `BPF_MAP_LOOKUP_BATCH`, as the tick's first step does.
    pub counters_batch_ms: f64,
    pub steady_tick: TickFigures,
}

#[derive(Clone, Debug, Serialize)]
pub struct TickFigures {
    pub wall_ms: f64,
    /// User plus system CPU time of the agent process during the tick.
    pub agent_cpu_ms: f64,
    /// User plus system CPU time of redis-server during the tick.
    pub redis_cpu_ms: f64,
    pub keys_tracked: usize,
    pub keys_synced: usize,
    pub script_calls: usize,
    pub failed_calls: usize,
    pub grants_written: usize,
    pub first_error: Option<String>,
}

pub async fn run(scale: &Scale) -> anyhow::Result<TickCost> {
    let mut runs = Vec::new();
    for &keys in scale.tick_keys {
        eprintln!("bench: tick at {keys} keys");
        runs.push(
            run_one(keys)
                .await
                .with_context(|| format!("tick benchmark at {keys} keys failed"))?,
        );
    }
    Ok(TickCost {
        interval_ms: INTERVAL.as_millis() as u64,
        runs,
    })
}

async fn run_one(keys: u32) -> anyhow::Result<TickRun> {
    // Step 1: the program and its maps. COUNTERS keeps an LRU list per CPU, each with an
    // equal part of the map. The keys written here all go to the list of the writing CPU,
    // so every CPU's part has room for `keys` and a quarter more.
    let pins = PinDir::new();
    let cpus = batch::possible_cpus()?;
    let max_keys = keys
        .saturating_add(keys / 4)
        .saturating_mul(cpus as u32)
        .max(limiter_common::DEFAULT_MAX_KEYS);
    let _ebpf = datapath::load(&pins.path, max_keys)?;
    let mut maps = Maps::open_dir(&pins.path)?;
    let rule = Rule {
        id: 1,
        ipv4_prefix_len: 32,
        ipv6_prefix_len: 128,
        limit: 1_000,
        fallback_limit: 1_000,
        new_key_limit: 200,
        window_ns: 1_000_000_000,
        ..Rule::default()
    };
    maps.rules
        .insert(RuleMatch::new(0, 0), rule, 0)
        .context("failed to insert the benchmark rule")?;

    // Step 2: the keys, as if each had seen 100 packets.
    let started = Instant::now();
    write_counters(&mut maps, keys, cpus, PACKETS_PER_TICK)?;
    let fill_seconds = started.elapsed().as_secs_f64();

    // Step 3: the two ticks.
    let redis = RedisServer::start();
    let store = Store::connect(&[redis.url()], false, CALL_TIMEOUT, None)?;
    let mut reconciler = Reconciler::new(store, "bench-gw", INTERVAL, INTERVAL * 3, cpus);
    // The agent syncs at most what fits in half an interval per tick; the benchmark times
    // a tick that syncs every key.
    reconciler.sync_every_key();
    let maps = Mutex::new(maps);
    let rules = HashMap::from([(rule.id, rule)]);
    let first_tick = timed_tick(&mut reconciler, &maps, &rules, &redis).await;
    let (counters_walk_ms, counters_batch_ms) = {
        let mut maps = maps
            .lock()
            .map_err(|_| anyhow!("the maps lock is poisoned"))?;
        write_counters(&mut maps, keys, cpus, 2 * PACKETS_PER_TICK)?;
        let started = Instant::now();
        let walked = maps.counters.iter().filter(Result::is_ok).count();
        let walk_ms = started.elapsed().as_secs_f64() * 1e3;
        let started = Instant::now();
        let batched = batch::lookup_all::<FlowKey, KeyCounter>(maps.counters.map().fd().as_fd(), cpus)
            .context("BPF_MAP_LOOKUP_BATCH on COUNTERS failed")?
            .len();
        let batch_ms = started.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(
            walked >= keys as usize && batched == walked,
            "COUNTERS holds {walked} keys walked and {batched} read in batches after writing {keys}: the LRU map evicted some"
        );
        (walk_ms, batch_ms)
    };
    let steady_tick = timed_tick(&mut reconciler, &maps, &rules, &redis).await;
    Ok(TickRun {
        keys,
        fill_seconds,
        first_tick,
        counters_walk_ms,
        counters_batch_ms,
        steady_tick,
    })
}

/// Writes `keys` keys into COUNTERS, each with `packets` offered and passed, spread evenly
/// over the CPUs.
fn write_counters(maps: &mut Maps, keys: u32, cpus: usize, packets: u64) -> anyhow::Result<()> {
    let per_cpu = packets / cpus.max(1) as u64;
    let counter = KeyCounter {
        offered: per_cpu,
        passed: per_cpu,
        ..KeyCounter::default()
    };
    for index in 0..keys {
        let source = Ipv4Addr::from(0x0a00_0001u32.wrapping_add(index));
        let mut key = FlowKey {
            rule_id: 1,
            family: FAMILY_IPV4,
            prefix_len: 32,
            ..FlowKey::default()
        };
        key.addr[..4].copy_from_slice(&source.octets());
        let values = PerCpuValues::try_from(vec![counter; cpus])
            .context("failed to build per-CPU counters")?;
        maps.counters
            .insert(key, values, 0)
            .with_context(|| format!("failed to write the counters of {source}"))?;
    }
    Ok(())
}

async fn timed_tick(
    reconciler: &mut Reconciler,
    maps: &Mutex<Maps>,
    rules: &HashMap<u32, Rule>,
    redis: &RedisServer,
) -> TickFigures {
    let redis_cpu_before = redis_cpu_seconds(redis);
    let cpu_before = process_cpu_seconds();
    let started = Instant::now();
    let report: TickReport = reconciler.tick(maps, rules).await;
    let wall_ms = started.elapsed().as_secs_f64() * 1e3;
    let agent_cpu_ms = (process_cpu_seconds() - cpu_before) * 1e3;
    let redis_cpu_ms = (redis_cpu_seconds(redis) - redis_cpu_before) * 1e3;
    TickFigures {
        wall_ms,
        agent_cpu_ms,
        redis_cpu_ms,
        keys_tracked: report.keys_tracked,
        keys_synced: report.keys_synced,
        script_calls: report.script_calls,
        failed_calls: report.failed_calls,
        grants_written: report.grants_written,
        first_error: report.first_error,
    }
}

/// Returns redis-server's `used_cpu_user + used_cpu_sys` from INFO cpu, or NaN if the reply
/// lacks them.
fn redis_cpu_seconds(redis: &RedisServer) -> f64 {
    let info = redis.command("INFO cpu");
    let field = |name: &str| {
        info.lines()
            .find_map(|line| {
                line.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(':'))
            })
            .and_then(|value| value.trim().parse::<f64>().ok())
    };
    match (field("used_cpu_user"), field("used_cpu_sys")) {
        (Some(user), Some(system)) => user + system,
        _ => f64::NAN,
    }
}
