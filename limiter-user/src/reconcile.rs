//! One reconciliation tick: read what each key did on this gateway since the last tick, add
//! it to the fleet-wide counts in Redis, and write each key's new grant into the XDP maps.
//!
//! A grant is this gateway's share of the key's remaining fleet-wide budget, split over the
//! CPUs in proportion to where the key's packets arrived during the tick. It is written as a
//! ceiling on each CPU's `passed` counter and expires after a few ticks, so a gateway whose
//! agent stops falls back to the rule's fallback limit instead of keeping a stale grant.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use aya::maps::PerCpuValues;
use limiter_common::{
    FAMILY_IPV4, FlowKey, Grant, KeyCounter, Rule, SlidingWindow,
    allowance::{proportional_share, split_by_demand},
    window,
};
use tracing::{debug, warn};

use crate::{
    datapath::Maps,
    store::{FleetCounts, KeyDelta, MAX_KEYS_PER_CALL, Store, StoreError, SyncReply, bucket_of},
};

/// Per-key memory of the agent between ticks.
#[derive(Debug, Default)]
struct KeyHistory {
    /// Each CPU's `passed` and `offered` counters as of the last successful sync.
    passed: Vec<u64>,
    offered: Vec<u64>,
    /// Packets this gateway offered for the key, counted in the server's windows exactly as
    /// the fleet's offered count is: its demand, weighed against the fleet's to find its
    /// share of the budget. Using the same windows makes the shares of all gateways add up
    /// to one, and a lone gateway's share exactly one.
    demand: SlidingWindow,
}

/// A key with new traffic this tick, waiting for its group's sync call.
struct PendingKey {
    key: FlowKey,
    rule: Rule,
    field: String,
    passed_now: Vec<u64>,
    offered_now: Vec<u64>,
    /// Per-CPU offered packets since the last sync.
    offered_delta: Vec<u64>,
    delta: KeyDelta,
}

/// Figures from one tick, for logs and `limiter status`.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct TickReport {
    pub keys_tracked: usize,
    pub keys_synced: usize,
    pub script_calls: usize,
    pub failed_calls: usize,
    pub grants_written: usize,
    /// First store error of the tick, if any call failed.
    pub first_error: Option<String>,
}

/// Reconciles this gateway's counts with the fleet's, one tick at a time.
pub struct Reconciler {
    store: Store,
    histories: HashMap<FlowKey, KeyHistory>,
    /// How long a grant stays valid after it is written.
    grant_lifetime: Duration,
    /// Sync interval in microseconds: how long a grant must last until the next tick.
    interval_us: u64,
    /// When the previous tick read the counters, so the script knows the span of the deltas.
    last_read_ns: Option<u64>,
    cpus: usize,
}

impl Reconciler {
    pub fn new(store: Store, interval: Duration, grant_lifetime: Duration, cpus: usize) -> Self {
        Self {
            store,
            histories: HashMap::new(),
            grant_lifetime,
            interval_us: interval.as_micros() as u64,
            last_read_ns: None,
            cpus,
        }
    }

    /// Runs one tick against `maps`, with `rules` keyed by rule id.
    ///
    /// Keys whose sync call failed keep their old baseline, so their packets are sent again
    /// with the next tick's delta and none is lost.
    pub async fn tick(&mut self, maps: &std::sync::Mutex<Maps>, rules: &HashMap<u32, Rule>) -> TickReport {
        let mut report = TickReport::default();

        // Step 1: read every key's per-CPU counters and keep those with new traffic.
        let snapshot = match read_counters(maps) {
            Ok(snapshot) => snapshot,
            Err(error) => {
                warn!(%error, "failed to read the COUNTERS map");
                report.first_error = Some(format!("failed to read COUNTERS: {error:#}"));
                return report;
            }
        };
        report.keys_tracked = snapshot.len();
        let now_local = monotonic_ns();
        // The deltas of a key new since the last tick span less than this, and those after a
        // failed call more; the split across a window boundary is an estimate either way.
        let span_us = match self.last_read_ns.replace(now_local) {
            Some(last) => now_local.saturating_sub(last) / 1000,
            None => self.interval_us,
        }
        .max(1);

        let mut seen = HashSet::with_capacity(snapshot.len());
        let mut groups: BTreeMap<(u32, u32), Vec<PendingKey>> = BTreeMap::new();
        for (key, counters) in snapshot {
            seen.insert(key);
            let Some(rule) = rules.get(&key.rule_id) else {
                // Counters of a removed rule are deleted with the rule; a leftover is skipped.
                continue;
            };
            if let Some(pending) = self.pending_key(key, *rule, &counters) {
                groups.entry((rule.id, bucket_of(&pending.field))).or_default().push(pending);
            }
        }

        // Step 2: forget keys the LRU map evicted, and their grants.
        let evicted: Vec<FlowKey> = self.histories.keys().filter(|key| !seen.contains(key)).copied().collect();
        if !evicted.is_empty() {
            let mut maps = lock(maps);
            for key in &evicted {
                self.histories.remove(key);
                let _ = maps.grants.remove(key);
            }
        }

        // Step 3: one script call per group of at most MAX_KEYS_PER_CALL keys, all in flight
        // together.
        let mut calls = tokio::task::JoinSet::new();
        for ((rule_id, bucket), mut keys) in groups {
            while !keys.is_empty() {
                let chunk: Vec<PendingKey> = keys.drain(..keys.len().min(MAX_KEYS_PER_CALL)).collect();
                let rule = chunk[0].rule;
                let store = self.store.clone();
                let window_us = (rule.window_ns / 1000).max(1);
                // Three windows: the current, the previous the estimate reads, and one spare.
                let ttl_ms = (rule.window_ns / 1_000_000).saturating_mul(3).max(1);
                calls.spawn(async move {
                    let deltas: Vec<KeyDelta> = chunk.iter().map(|pending| pending.delta.clone()).collect();
                    let reply = store.sync(rule_id, bucket, window_us, ttl_ms, span_us.min(window_us), &deltas).await;
                    (chunk, reply)
                });
                report.script_calls += 1;
            }
        }

        // Step 4: turn each reply into grants and move the baselines forward.
        let mut replies = Vec::new();
        while let Some(joined) = calls.join_next().await {
            match joined {
                Ok((chunk, Ok(reply))) => replies.push((chunk, reply)),
                Ok((chunk, Err(error))) => {
                    report.failed_calls += 1;
                    debug!(%error, keys = chunk.len(), rule = chunk[0].rule.id, "sync call failed");
                    report.first_error.get_or_insert_with(|| describe_store_error(&error));
                }
                Err(error) => {
                    report.failed_calls += 1;
                    report.first_error.get_or_insert_with(|| format!("sync task failed: {error}"));
                }
            }
        }
        let expires_ns = now_local.saturating_add(self.grant_lifetime.as_nanos() as u64);
        let mut maps = lock(maps);
        for (chunk, reply) in replies {
            for (pending, counts) in chunk.into_iter().zip(reply.counts.iter()) {
                let grants = self.grants_for(&pending, counts, &reply, span_us, expires_ns);
                match PerCpuValues::try_from(grants) {
                    Ok(values) => match maps.grants.insert(pending.key, values, 0) {
                        Ok(()) => report.grants_written += 1,
                        Err(error) => warn!(%error, key = %pending.field, "failed to write grant"),
                    },
                    Err(error) => warn!(%error, key = %pending.field, "failed to build per-CPU grant"),
                }
                let history = self.histories.entry(pending.key).or_default();
                history.passed = pending.passed_now;
                history.offered = pending.offered_now;
                report.keys_synced += 1;
            }
        }
        report
    }

    /// Computes the key's deltas since the last sync, or `None` if it saw no new packet.
    fn pending_key(&mut self, key: FlowKey, rule: Rule, counters: &PerCpuValues<KeyCounter>) -> Option<PendingKey> {
        let history = self.histories.entry(key).or_default();
        let passed_now: Vec<u64> = counters.iter().map(|counter| counter.passed).collect();
        let offered_now: Vec<u64> = counters.iter().map(|counter| counter.offered).collect();
        let passed_delta = per_cpu_delta(&passed_now, &history.passed);
        let offered_delta = per_cpu_delta(&offered_now, &history.offered);
        let offered_total: u64 = offered_delta.iter().sum();
        if offered_total == 0 {
            return None;
        }
        let field = flow_key_field(&key);
        let delta = KeyDelta { field: field.clone(), passed: passed_delta.iter().sum(), offered: offered_total };
        Some(PendingKey { key, rule, field, passed_now, offered_now, offered_delta, delta })
    }

    /// Returns each CPU's grant for a key, given the fleet's counts.
    fn grants_for(
        &mut self,
        pending: &PendingKey,
        counts: &FleetCounts,
        reply: &SyncReply,
        span_us: u64,
        expires_ns: u64,
    ) -> Vec<Grant> {
        let rule = &pending.rule;

        // The fleet's estimate, in the server's windows and microseconds.
        let window_us = (rule.window_ns / 1000).max(1);
        let elapsed_us = reply.now_us.saturating_sub(reply.window_id.saturating_mul(window_us));
        let fleet_offered = SlidingWindow {
            window_id: reply.window_id,
            current: counts.current_offered,
            previous: counts.previous_offered,
        }
        .estimate(elapsed_us, window_us);
        // The grant is spent until the next tick, so it is the budget the window will have
        // then. Granting only what is free now would never hand out the previous window's
        // weight that expires during the last tick of each window.
        let next_tick_us = reply.now_us.saturating_add(self.interval_us);
        let fleet_passed_next_tick = SlidingWindow {
            window_id: reply.window_id,
            current: counts.current_passed,
            previous: counts.previous_passed,
        }
        .estimate_at(next_tick_us, window_us);
        let budget = window::remaining(rule.limit, fleet_passed_next_tick);

        // This gateway's demand, in the same windows and with the same split as the fleet's.
        let history = self.histories.entry(pending.key).or_default();
        // The script received the span capped at one window; split with the same value.
        let offered_before = window::part_before_window(pending.delta.offered, span_us.min(window_us), elapsed_us);
        history.demand.advance(reply.window_id);
        history.demand.previous = history.demand.previous.saturating_add(offered_before);
        history.demand.current = history.demand.current.saturating_add(pending.delta.offered - offered_before);
        let own_demand = history.demand.estimate(elapsed_us, window_us);

        let gateway_budget = proportional_share(budget, own_demand, fleet_offered.max(own_demand));
        let mut shares = vec![0u64; self.cpus];
        split_by_demand(gateway_budget, &pending.offered_delta, &mut shares);

        pending
            .passed_now
            .iter()
            .zip(shares)
            .map(|(passed, share)| Grant { passed_ceiling: passed.saturating_add(share), expires_ns })
            .collect()
    }

    /// Drops the agent's memory of every key of `rule_id`, after the rule is removed.
    pub fn forget_rule(&mut self, rule_id: u32) {
        self.histories.retain(|key, _| key.rule_id != rule_id);
    }
}

fn lock(maps: &std::sync::Mutex<Maps>) -> std::sync::MutexGuard<'_, Maps> {
    // A panic while holding the lock leaves the maps themselves intact, since every write is
    // a single syscall, so a poisoned lock is still safe to use.
    maps.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read_counters(maps: &std::sync::Mutex<Maps>) -> anyhow::Result<Vec<(FlowKey, PerCpuValues<KeyCounter>)>> {
    let maps = lock(maps);
    // TODO: iterating key by key costs two syscalls per key; batched lookups would cut the
    // tick at 100k keys and more, which aya 0.14 does not offer for per-CPU hash maps.
    let mut snapshot = Vec::new();
    for entry in maps.counters.iter() {
        match entry {
            Ok(entry) => snapshot.push(entry),
            // A key evicted between the key walk and its lookup is simply gone.
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(snapshot)
}

/// Returns `now - before` per CPU. A counter below its baseline means the LRU map evicted
/// and re-created the key, so everything it counted since is new.
fn per_cpu_delta(now: &[u64], before: &[u64]) -> Vec<u64> {
    now.iter()
        .enumerate()
        .map(|(cpu, value)| match before.get(cpu) {
            Some(previous) if value >= previous => value - previous,
            _ => *value,
        })
        .collect()
}

/// Formats a flow key as its Redis field: the masked source with prefix length, and the
/// destination port when the rule keys by port.
pub fn flow_key_field(key: &FlowKey) -> String {
    let addr = flow_key_addr(key);
    if key.dst_port != 0 {
        format!("{addr}/{}:{}", key.prefix_len, key.dst_port)
    } else {
        format!("{addr}/{}", key.prefix_len)
    }
}

/// Returns the masked source address of a flow key.
pub fn flow_key_addr(key: &FlowKey) -> IpAddr {
    if key.family == FAMILY_IPV4 {
        IpAddr::V4(Ipv4Addr::new(key.addr[0], key.addr[1], key.addr[2], key.addr[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(key.addr))
    }
}

fn describe_store_error(error: &StoreError) -> String {
    error.to_string()
}

/// Returns `CLOCK_MONOTONIC` in nanoseconds, the clock `bpf_ktime_get_coarse_ns` follows.
pub fn monotonic_ns() -> u64 {
    let mut time = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `time` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut time) };
    (time.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(time.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use limiter_common::FAMILY_IPV6;

    #[test]
    fn per_cpu_delta_handles_recreated_entries() {
        assert_eq!(per_cpu_delta(&[10, 5], &[4, 5]), vec![6, 0]);
        assert_eq!(per_cpu_delta(&[3, 5], &[40, 5]), vec![3, 0]);
        assert_eq!(per_cpu_delta(&[3, 5], &[]), vec![3, 5]);
    }

    #[test]
    fn flow_key_field_formats_both_families() {
        let mut key = FlowKey { rule_id: 1, family: FAMILY_IPV4, prefix_len: 24, ..Default::default() };
        key.addr[..4].copy_from_slice(&[198, 51, 100, 0]);
        assert_eq!(flow_key_field(&key), "198.51.100.0/24");
        key.dst_port = 53;
        assert_eq!(flow_key_field(&key), "198.51.100.0/24:53");

        let mut key = FlowKey { rule_id: 1, family: FAMILY_IPV6, prefix_len: 64, ..Default::default() };
        key.addr[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(flow_key_field(&key), "2001:db8::/64");
    }
}
