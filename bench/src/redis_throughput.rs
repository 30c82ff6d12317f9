//! Keys reconciled per second through Redis: the agent's batched scripts against a naive
//! design that makes one script call per packet, each against its own throwaway
//! redis-server on loopback. Also counts the Redis commands each design costs per million
//! packets.
//!
//! Batched: the keys of a tick are grouped by rule and bucket as the agent groups them
//! (`store::bucket_of`), at most `MAX_KEYS_PER_CALL` keys per call. Each group makes a
//! `Store::sync` call then a `Store::reserve` call, with all groups in flight together over
//! one connection, as `Reconciler::tick` does. One key reconciled is one key's delta added to the
//! fleet's counts and its lease recorded.
//!
//! Naive: `NAIVE_SCRIPT` below, called with EVALSHA once per packet by concurrent clients,
//! each on its own connection and waiting for each reply before sending the next call, as a
//! gateway thread that queries Redis before passing a packet would.
//!
//! Commands per million packets: each active key is assumed to see 100 packets per tick, so
//! one tick of 10,000 keys covers 1,000,000 packets. The counts come from INFO commandstats,
//! which counts the commands a script runs as well as the calls that start scripts.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use limiter_tests::RedisServer;
use limiter_user::store::{Group, KeyDelta, Lease, MAX_KEYS_PER_CALL, Store, bucket_of};
use redis::Script;
use serde::Serialize;

use crate::{Scale, ratio};

/// A sliding-window limiter that decides each packet in Redis: one call per packet. This is
/// the design the limiter avoids, written here only as the baseline.
///
/// KEYS[1]: prefix of the key's counters; the script adds `:<window id>` to it.
/// ARGV[1]: window length in microseconds. ARGV[2]: packets per window.
/// Returns 1 when the packet passes, 0 when it is dropped.
///
/// It builds key names inside the script, which Redis Cluster forbids; on one server, as
/// here, that costs nothing.
const NAIVE_SCRIPT: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local window = tonumber(ARGV[1])
local id = math.floor(now / window)
local current_key = KEYS[1] .. ':' .. id
local previous = tonumber(redis.call('GET', KEYS[1] .. ':' .. (id - 1)) or '0')
local current = tonumber(redis.call('GET', current_key) or '0')
local weight = 1 - (now % window) / window
if previous * weight + current >= tonumber(ARGV[2]) then
  return 0
end
redis.call('INCR', current_key)
redis.call('PEXPIRE', current_key, math.floor(window * 2 / 1000))
return 1
";

/// Packets each active key is assumed to see per tick.
const PACKETS_PER_KEY_PER_TICK: u64 = 100;
/// Active keys of the commands-per-million-packets figure: 10,000 keys x 100 packets.
const COMMAND_COUNT_KEYS: usize = 10_000;
const TICK: Duration = Duration::from_millis(100);
/// Maximum wait for the reply to a benchmark call. It is far above the agent's default,
/// because here a slow reply is a figure to report, not a tick to skip.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Maximum run time of the naive clients, whatever their packet count.
const NAIVE_TIME_LIMIT: Duration = Duration::from_secs(20);

#[derive(Clone, Debug, Serialize)]
pub struct RedisThroughput {
    pub batched_keys: usize,
    pub batched_rounds: usize,
    pub batched_script_calls: u64,
    pub batched_seconds: f64,
    pub batched_keys_per_second: f64,
    pub naive_clients: usize,
    pub naive_calls: u64,
    pub naive_seconds: f64,
    /// One call per packet, so also packets per second.
    pub naive_keys_per_second: f64,
    pub keys_per_second_vs_naive: f64,
    /// Packets per second the batched design covers at `PACKETS_PER_KEY_PER_TICK`, against
    /// the naive design's packets per second.
    pub packets_per_second_vs_naive: f64,
    /// Commands per 1,000,000 packets at 10,000 active keys: calls that start scripts
    /// (EVALSHA, EVAL, SCRIPT), and every command including those scripts run.
    pub batched_script_calls_per_million_packets: u64,
    pub batched_commands_per_million_packets: u64,
    pub naive_script_calls_per_million_packets: u64,
    pub naive_commands_per_million_packets: u64,
    /// INFO commandstats deltas of the 10,000-key tick, by command.
    pub batched_commandstats: BTreeMap<String, u64>,
}

pub async fn run(scale: &Scale) -> anyhow::Result<RedisThroughput> {
    // Step 1: batched scripts, `redis_rounds` ticks of `redis_keys` keys.
    let redis = RedisServer::start();
    let store = Store::connect(&[redis.url()], false, CALL_TIMEOUT, None)?;
    let fields: Vec<String> = (0..scale.redis_keys).map(key_field).collect();
    let rounds = scale.redis_rounds.max(1);
    let started = Instant::now();
    let mut batched_script_calls = 0;
    for _ in 0..rounds {
        batched_script_calls += reconcile_once(&store, &fields).await?;
    }
    let batched_seconds = started.elapsed().as_secs_f64();
    let batched_keys_per_second = (fields.len() * rounds) as f64 / batched_seconds;
    drop(redis);

    // Step 2: one tick of 10,000 keys on a fresh server, counted by INFO commandstats.
    let redis = RedisServer::start();
    let store = Store::connect(&[redis.url()], false, CALL_TIMEOUT, None)?;
    let fields: Vec<String> = (0..COMMAND_COUNT_KEYS).map(key_field).collect();
    // The first tick loads the scripts (a NOSCRIPT reply, then SCRIPT LOAD). The counted tick
    // is the second, as in an agent that has run for a while.
    reconcile_once(&store, &fields).await?;
    let mut info = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    reset_stats(&mut info).await?;
    reconcile_once(&store, &fields).await?;
    let batched_commandstats = commandstats(&mut info).await?;
    let packets = COMMAND_COUNT_KEYS as u64 * PACKETS_PER_KEY_PER_TICK;
    let (batched_script_calls_per_tick, batched_commands_per_tick) =
        split_counts(&batched_commandstats);
    drop(redis);

    // Step 3: the naive design, one EVALSHA per packet from concurrent clients.
    let redis = RedisServer::start();
    let naive = run_naive(&redis, scale).await?;
    let (naive_script_calls, naive_commands) = split_counts(&naive.commandstats);
    drop(redis);

    let naive_keys_per_second = naive.calls as f64 / naive.seconds;
    let batched_packets_per_second = batched_keys_per_second * PACKETS_PER_KEY_PER_TICK as f64;
    Ok(RedisThroughput {
        batched_keys: scale.redis_keys,
        batched_rounds: rounds,
        batched_script_calls,
        batched_seconds,
        batched_keys_per_second,
        naive_clients: scale.naive_clients,
        naive_calls: naive.calls,
        naive_seconds: naive.seconds,
        naive_keys_per_second,
        keys_per_second_vs_naive: ratio(batched_keys_per_second, naive_keys_per_second),
        packets_per_second_vs_naive: ratio(batched_packets_per_second, naive_keys_per_second),
        batched_script_calls_per_million_packets: per_million(
            batched_script_calls_per_tick,
            packets,
        ),
        batched_commands_per_million_packets: per_million(batched_commands_per_tick, packets),
        naive_script_calls_per_million_packets: per_million(naive_script_calls, naive.calls),
        naive_commands_per_million_packets: per_million(naive_commands, naive.calls),
        batched_commandstats,
    })
}

/// Returns the Redis field of the `index`-th benchmark key: a /32 in 10.0.0.0/8.
fn key_field(index: usize) -> String {
    let addr = std::net::Ipv4Addr::from(0x0a00_0001u32.wrapping_add(index as u32));
    format!("{addr}/32")
}

fn per_million(count: u64, packets: u64) -> u64 {
    count
        .saturating_mul(1_000_000)
        .checked_div(packets)
        .unwrap_or(0)
}

/// Reconciles every key once, as one agent tick does, and returns the script calls made.
async fn reconcile_once(store: &Store, fields: &[String]) -> anyhow::Result<u64> {
    let mut buckets: BTreeMap<u32, Vec<&String>> = BTreeMap::new();
    for field in fields {
        buckets.entry(bucket_of(field)).or_default().push(field);
    }

    let mut calls = tokio::task::JoinSet::new();
    for (bucket, fields) in buckets {
        for chunk in fields.chunks(MAX_KEYS_PER_CALL) {
            let deltas: Vec<KeyDelta> = chunk
                .iter()
                .map(|field| KeyDelta {
                    field: (*field).clone(),
                    passed: PACKETS_PER_KEY_PER_TICK,
                })
                .collect();
            let store = store.clone();
            calls.spawn(async move {
                let group = Group {
                    rule_id: 1,
                    bucket,
                    window_us: 1_000_000,
                    ttl_ms: 3_000,
                    node_id: "bench-gw",
                };
                let interval_us = TICK.as_micros() as u64;
                let reply = store.sync(&group, interval_us, &deltas).await?;
                let leases: Vec<Lease> = deltas
                    .iter()
                    .zip(&reply.counts)
                    .map(|(delta, _)| Lease {
                        field: delta.field.clone(),
                        grant: PACKETS_PER_KEY_PER_TICK,
                        rate: PACKETS_PER_KEY_PER_TICK * 10,
                    })
                    .collect();
                store.reserve(&group, interval_us, &leases).await?;
                anyhow::Ok(())
            });
        }
    }

    let mut script_calls = 0;
    while let Some(joined) = calls.join_next().await {
        joined
            .context("a batched call task panicked")?
            .context("a batched store call failed")?;
        script_calls += 2;
    }
    Ok(script_calls)
}

struct NaiveRun {
    calls: u64,
    seconds: f64,
    commandstats: BTreeMap<String, u64>,
}

/// Runs `naive_clients` clients that each call the naive script for their share of
/// `naive_packets`, stopping early at `NAIVE_TIME_LIMIT`.
async fn run_naive(redis: &RedisServer, scale: &Scale) -> anyhow::Result<NaiveRun> {
    let client = redis::Client::open(redis.url())?;
    let script = Script::new(NAIVE_SCRIPT);
    let mut info = client.get_multiplexed_async_connection().await?;
    // Load the script once, so the counted calls are all plain EVALSHA.
    let _: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(NAIVE_SCRIPT)
        .query_async(&mut info)
        .await?;
    reset_stats(&mut info).await?;

    let clients = scale.naive_clients.max(1);
    let per_client = scale.naive_packets / clients as u64;
    let calls = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + NAIVE_TIME_LIMIT;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for client_index in 0..clients {
        let mut connection = client.get_multiplexed_async_connection().await?;
        let script = script.clone();
        let calls = calls.clone();
        tasks.spawn(async move {
            for packet in 0..per_client {
                if Instant::now() >= deadline {
                    break;
                }
                let key = format!(
                    "naive:{}",
                    (client_index as u64 * per_client + packet) % COMMAND_COUNT_KEYS as u64
                );
                let _passed: i64 = script
                    .key(key)
                    .arg(1_000_000)
                    .arg(1_000)
                    .invoke_async(&mut connection)
                    .await?;
                calls.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined
            .context("a naive client task panicked")?
            .context("a naive script call failed")?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let commandstats = commandstats(&mut info).await?;
    Ok(NaiveRun {
        calls: calls.load(Ordering::Relaxed),
        seconds,
        commandstats,
    })
}

async fn reset_stats(connection: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<()> {
    let _: String = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(connection)
        .await
        .context("CONFIG RESETSTAT failed")?;
    Ok(())
}

/// Returns the calls per command since the last CONFIG RESETSTAT, without INFO itself.
async fn commandstats(
    connection: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(connection)
        .await
        .context("INFO commandstats failed")?;
    let mut counts = BTreeMap::new();
    // Lines look like `cmdstat_evalsha:calls=128,usec=...,...`.
    for line in info.lines() {
        let Some((name, fields)) = line
            .strip_prefix("cmdstat_")
            .and_then(|rest| rest.split_once(':'))
        else {
            continue;
        };
        if name == "info" || name.starts_with("config") {
            continue;
        }
        let calls = fields
            .split(',')
            .find_map(|field| field.strip_prefix("calls="))
            .ok_or_else(|| anyhow!("INFO commandstats line without calls=: {line}"))?
            .parse::<u64>()
            .with_context(|| format!("invalid calls= in INFO commandstats line: {line}"))?;
        counts.insert(name.to_owned(), calls);
    }
    Ok(counts)
}

/// Splits command counts into calls that start scripts and all commands.
fn split_counts(counts: &BTreeMap<String, u64>) -> (u64, u64) {
    let script_calls = counts
        .iter()
        .filter(|(name, _)| {
            matches!(name.as_str(), "evalsha" | "eval" | "evalsha_ro" | "eval_ro")
                || name.starts_with("script")
        })
        .map(|(_, calls)| calls)
        .sum();
    (script_calls, counts.values().sum())
}
