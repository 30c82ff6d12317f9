//! One reconciliation tick: read what each key did on this gateway since the last tick, add
//! it to the fleet-wide counts in Redis, and write each key's new grant into the XDP maps.
//!
//! For each key, the budget the fleet may still pass by the next tick is the limit minus the
//! sliding-window estimate at that time, minus what the other gateways' outstanding grants
//! (their leases) still allow. This gateway takes a share of it in proportion to its offered
//! rate against the other gateways' recent rates. It records the grant as its own lease at
//! once, so the gateways that tick after it do not hand out the same packets again. The
//! grant is split over CPUs and written as a ceiling on each CPU's `passed` counter that
//! expires after a few ticks, so a gateway whose agent stops falls back to the rule's
//! fallback limit instead of keeping a stale grant.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
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
    rules::pace_cap,
    store::{FleetCounts, Group, KeyDelta, Lease, MAX_KEYS_PER_CALL, Store, StoreError, SyncReply, bucket_of},
};

/// Per-key memory of the agent between ticks: each CPU's `passed` and `offered` counters as
/// of the last successful sync, and when that was.
#[derive(Debug, Default)]
struct KeyHistory {
    passed: Vec<u64>,
    offered: Vec<u64>,
    /// `CLOCK_MONOTONIC` time of the read the baseline comes from; `None` for a key never
    /// synced, whose packets all came within the last tick.
    read_at_ns: Option<u64>,
    /// Until this `CLOCK_MONOTONIC` time, the store may be missing packets this gateway
    /// passed (after an outage, or a restart of the agent), so the fleet's estimate is taken
    /// no lower than this gateway's own.
    local_floor_until_ns: u64,
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
    passed_total: u64,
    offered_total: u64,
    /// Microseconds since the key's baseline was read: one tick normally, more after an outage.
    full_span_us: u64,
    /// This gateway's own sliding-window estimate of the key's passed packets, summed over
    /// CPUs from their fallback windows, which count every packet passed; 0 outside the
    /// key's local floor.
    local_estimate: u64,
}

/// Figures from one tick, for logs and `limiter status`.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct TickReport {
    pub keys_tracked: usize,
    pub keys_synced: usize,
    pub script_calls: usize,
    pub failed_calls: usize,
    /// Groups whose leases could not be recorded; their grants still apply here.
    pub failed_reservations: usize,
    pub grants_written: usize,
    /// First store error of the tick, if any call failed.
    pub first_error: Option<String>,
}

/// Timing of the tick that a grant must last until.
#[derive(Clone, Copy, Debug)]
pub struct TickTiming {
    /// Microseconds the deltas were counted over, at most one window: the span sync.lua
    /// splits across a window boundary.
    pub span_us: u64,
    /// Microseconds until the next tick.
    pub interval_us: u64,
}

/// Returns the part of `delta`, counted evenly over `full_span_us`, that fell in the last
/// `span_us`. After an outage of many windows, only the last window's share can still weigh
/// on the sliding estimate; sending the whole delta would put an outage's worth of packets
/// in the current window and stop the key for a window.
pub fn delta_within_span(delta: u64, span_us: u64, full_span_us: u64) -> u64 {
    if full_span_us <= span_us || full_span_us == 0 {
        return delta;
    }
    (u128::from(delta) * u128::from(span_us) / u128::from(full_span_us)) as u64
}

/// Returns the packets this gateway may pass for one key until its next tick.
///
/// The fleet's estimate is never taken below `local_estimate`, this gateway's own recent
/// passes: after an outage, or with a Redis restarted empty, the store misses what passed
/// meanwhile. The fleet's budget is the limit minus the estimate at the next tick, at most the pace cap,
/// minus the other gateways' outstanding leases. Sizing it for the next tick rather than for
/// now hands out the previous window's weight that expires during the coming tick, which
/// would otherwise never be granted. The pace cap keeps a gateway that cannot see the others'
/// demand yet, at a key's first tick, from taking a whole window's limit.
pub fn gateway_budget(
    rule: &Rule,
    counts: &FleetCounts,
    reply: &SyncReply,
    timing: TickTiming,
    own_rate: u64,
    local_estimate: u64,
) -> u64 {
    let window_us = (rule.window_ns / 1000).max(1);
    let fleet = SlidingWindow {
        window_id: reply.window_id,
        current: counts.current_passed,
        previous: counts.previous_passed,
    };
    let next_tick_us = reply.now_us.saturating_add(timing.interval_us);
    let estimate = fleet.estimate_at(next_tick_us, window_us).max(local_estimate);
    let pace = pace_cap(rule.limit, rule.window_ns, Duration::from_micros(timing.interval_us));
    let fleet_budget = window::remaining(rule.limit, estimate).min(pace).saturating_sub(counts.others_outstanding);
    proportional_share(fleet_budget, own_rate, own_rate.saturating_add(counts.others_rate))
}

/// Reconciles this gateway's counts with the fleet's, one tick at a time.
pub struct Reconciler {
    store: Store,
    node_id: Arc<str>,
    histories: HashMap<FlowKey, KeyHistory>,
    /// How long a grant stays valid after it is written.
    grant_lifetime: Duration,
    /// Sync interval in microseconds: how long a grant must last until the next tick.
    interval_us: u64,
    /// Time the previous tick read the counters, from which the script gets the span of the deltas.
    last_read_ns: Option<u64>,
    /// Set when the agent adopted counters from an earlier run: the first tick takes them as
    /// the baseline instead of sending their whole history as one delta.
    baseline_pending: bool,
    cpus: usize,
}

impl Reconciler {
    pub fn new(store: Store, node_id: &str, interval: Duration, grant_lifetime: Duration, cpus: usize) -> Self {
        Self {
            store,
            node_id: Arc::from(node_id),
            histories: HashMap::new(),
            grant_lifetime,
            interval_us: interval.as_micros() as u64,
            last_read_ns: None,
            baseline_pending: false,
            cpus,
        }
    }

    /// Makes the first tick record the counters already in the maps as the baseline,
    /// without syncing them. Without this, an agent that replaces a crashed one would send
    /// every packet each key ever passed as one delta, and the fleet would see every key far
    /// over its limit for a window. What passed while no agent ran never reaches the store, so
    /// for one window each key's estimate is taken no lower than this gateway's own.
    pub fn adopt_existing_counters(&mut self) {
        self.baseline_pending = true;
    }

    /// Runs one tick against `maps`, with `rules` keyed by rule id.
    ///
    /// Keys whose sync call failed keep their old baseline, so their packets are sent again
    /// with the next tick's delta and none is lost.
    // NOTE: a call that timed out after Redis applied it is sent again too, so its delta is
    // counted twice. Applying deltas at most once needs a per-gateway sequence in sync.lua.
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
        if std::mem::take(&mut self.baseline_pending) {
            for (key, counters) in snapshot {
                let history = self.histories.entry(key).or_default();
                history.passed = counters.iter().map(|counter| counter.passed).collect();
                history.offered = counters.iter().map(|counter| counter.offered).collect();
                history.read_at_ns = Some(now_local);
                // What passed while no agent ran never reaches the store.
                let window_ns = rules.get(&key.rule_id).map_or(0, |rule| rule.window_ns);
                history.local_floor_until_ns = now_local.saturating_add(window_ns);
            }
            self.last_read_ns = Some(now_local);
            return report;
        }
        // The deltas of a key new since the last tick span less than this, and those after a
        // failed call span more. The split across a window boundary is an estimate either way.
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
            if let Some(pending) = self.pending_key(key, *rule, &counters, now_local, span_us) {
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

        // Step 3: per group of at most MAX_KEYS_PER_CALL keys, all groups in flight together:
        // sync, size the grants, and record them as leases right away.
        let mut calls = tokio::task::JoinSet::new();
        for ((rule_id, bucket), mut keys) in groups {
            while !keys.is_empty() {
                let chunk: Vec<PendingKey> = keys.drain(..keys.len().min(MAX_KEYS_PER_CALL)).collect();
                let store = self.store.clone();
                let node_id = self.node_id.clone();
                let interval_us = self.interval_us;
                let rule = chunk[0].rule;
                let cpus = self.cpus;
                calls.spawn(async move {
                    let window_us = (rule.window_ns / 1000).max(1);
                    let group = Group {
                        rule_id,
                        bucket,
                        window_us,
                        // Three windows: the current, the previous the estimate reads, and a spare.
                        ttl_ms: (rule.window_ns / 1_000_000).saturating_mul(3).max(1),
                        node_id: &node_id,
                    };
                    let timing = TickTiming { span_us: span_us.min(window_us), interval_us };
                    let outcome = sync_group(&store, &group, timing, cpus, &chunk).await;
                    (chunk, outcome)
                });
                report.script_calls += 1;
            }
        }

        // Step 4: write the grants and move the baselines forward.
        let mut planned = Vec::new();
        while let Some(joined) = calls.join_next().await {
            match joined {
                Ok((chunk, Ok((shares, reservation)))) => {
                    if let Err(error) = reservation {
                        report.failed_reservations += 1;
                        report.first_error.get_or_insert_with(|| error.to_string());
                    }
                    planned.push((chunk, shares));
                }
                Ok((chunk, Err(error))) => {
                    report.failed_calls += 1;
                    debug!(%error, keys = chunk.len(), rule = chunk[0].rule.id, "sync call failed");
                    report.first_error.get_or_insert_with(|| error.to_string());
                }
                Err(error) => {
                    report.failed_calls += 1;
                    report.first_error.get_or_insert_with(|| format!("sync task failed: {error}"));
                }
            }
        }
        let expires_ns = now_local.saturating_add(self.grant_lifetime.as_nanos() as u64);
        let mut maps = lock(maps);
        for (chunk, shares) in planned {
            for (pending, shares) in chunk.into_iter().zip(shares) {
                let grants: Vec<Grant> = pending
                    .passed_now
                    .iter()
                    .zip(shares)
                    .map(|(passed, share)| Grant { passed_ceiling: passed.saturating_add(share), expires_ns })
                    .collect();
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
                history.read_at_ns = Some(now_local);
                report.keys_synced += 1;
            }
        }
        report
    }

    /// Computes the key's deltas since the last sync, or `None` if it saw no new packet.
    fn pending_key(
        &mut self,
        key: FlowKey,
        rule: Rule,
        counters: &PerCpuValues<KeyCounter>,
        now_local: u64,
        tick_span_us: u64,
    ) -> Option<PendingKey> {
        let history = self.histories.entry(key).or_default();
        let full_span_us = match history.read_at_ns {
            Some(read_at) => (now_local.saturating_sub(read_at) / 1000).max(1),
            None => tick_span_us,
        };
        // A key out of sync for more than two ticks passed packets that the store never saw.
        // The floor covers the window in which they still count.
        if full_span_us > 2 * self.interval_us {
            history.local_floor_until_ns = now_local.saturating_add(rule.window_ns);
        }
        let floor_active = now_local < history.local_floor_until_ns;
        let passed_now: Vec<u64> = counters.iter().map(|counter| counter.passed).collect();
        let offered_now: Vec<u64> = counters.iter().map(|counter| counter.offered).collect();
        let passed_total = per_cpu_delta(&passed_now, &history.passed).iter().sum();
        let offered_delta = per_cpu_delta(&offered_now, &history.offered);
        let offered_total: u64 = offered_delta.iter().sum();
        if offered_total == 0 {
            return None;
        }
        let field = flow_key_field(&key);
        // Outside the floor this stays 0: the gateway's windows are out of phase with the
        // store's, and the larger of two estimates would hold every key a few percent under.
        let local_estimate = if floor_active {
            counters
                .iter()
                .map(|counter| counter.fallback_window.estimate_at(now_local, rule.window_ns))
                .fold(0u64, u64::saturating_add)
        } else {
            0
        };
        Some(PendingKey {
            key,
            rule,
            field,
            passed_now,
            offered_now,
            offered_delta,
            passed_total,
            offered_total,
            full_span_us,
            local_estimate,
        })
    }

}

/// Syncs one group, sizes each key's gateway budget and splits it over the CPUs, and records
/// the budgets as leases. Returns each key's per-CPU shares, in the chunk's order, and the
/// outcome of recording the leases.
///
/// A lease counts only the shares of CPUs that saw the key in the last tick. The reserve on
/// idle CPUs is rarely spent, and counting it would make the other gateways hold back
/// packets that no gateway passes. When a key does move to an idle CPU, the fleet can pass
/// up to that reserve more than the limit for one tick.
async fn sync_group(
    store: &Store,
    group: &Group<'_>,
    timing: TickTiming,
    cpus: usize,
    chunk: &[PendingKey],
) -> Result<(Vec<Vec<u64>>, Result<(), StoreError>), StoreError> {
    let deltas: Vec<KeyDelta> = chunk
        .iter()
        .map(|pending| KeyDelta {
            field: pending.field.clone(),
            passed: delta_within_span(pending.passed_total, timing.span_us, pending.full_span_us),
        })
        .collect();
    let reply = store.sync(group, timing.span_us, &deltas).await?;

    let mut all_shares = Vec::with_capacity(chunk.len());
    let mut leases = Vec::with_capacity(chunk.len());
    for (pending, counts) in chunk.iter().zip(&reply.counts) {
        // Per tick span, not the key's: a key idle for seconds got its new packets within
        // the last tick, and spreading them over the idle time would shrink its share to
        // nothing. After an outage this overstates the rate for one tick, which the pace
        // cap and the local floor bound.
        let own_rate = pending.offered_total.saturating_mul(1_000_000) / timing.span_us.max(1);
        let budget = gateway_budget(&pending.rule, counts, &reply, timing, own_rate, pending.local_estimate);
        let mut shares = vec![0u64; cpus];
        split_by_demand(budget, &pending.offered_delta, &mut shares);
        let leased: u64 =
            shares.iter().zip(&pending.offered_delta).filter(|(_, demand)| **demand > 0).map(|(share, _)| share).sum();
        leases.push(Lease { field: pending.field.clone(), grant: leased, rate: own_rate });
        all_shares.push(shares);
    }
    let reservation = store.reserve(group, timing.interval_us, &leases).await;
    Ok((all_shares, reservation))
}

fn lock(maps: &std::sync::Mutex<Maps>) -> std::sync::MutexGuard<'_, Maps> {
    // A panic while holding the lock leaves the maps themselves intact, since every write is
    // a single syscall, so a poisoned lock is still safe to use.
    maps.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read_counters(maps: &std::sync::Mutex<Maps>) -> anyhow::Result<Vec<(FlowKey, PerCpuValues<KeyCounter>)>> {
    let maps = lock(maps);
    // TODO: iterating key by key costs two syscalls per key. Batched lookups would cut the
    // tick at 100k keys and more, but aya 0.14 does not offer them for per-CPU hash maps.
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

    fn rule(limit: u64) -> Rule {
        Rule { id: 1, limit, fallback_limit: limit, window_ns: 1_000_000_000, ..Default::default() }
    }

    fn reply_at(now_us: u64) -> SyncReply {
        SyncReply { now_us, window_id: now_us / 1_000_000, counts: vec![] }
    }

    const TIMING: TickTiming = TickTiming { span_us: 100_000, interval_us: 100_000 };

    #[test]
    fn delta_within_span_keeps_last_window_share() {
        assert_eq!(delta_within_span(1000, 1_000_000, 10_000_000), 100);
        assert_eq!(delta_within_span(30, 100_000, 100_000), 30);
        assert_eq!(delta_within_span(30, 1_000_000, 100_000), 30);
        assert_eq!(delta_within_span(7, 1_000_000, 0), 7);
    }

    #[test]
    fn gateway_budget_counts_decay_until_next_tick() {
        // 0.5 s into window 10: previous 600 weighs 300 now and 240 at the next tick (239
        // after the fixed-point weight rounds down), so 1000 - 239 - 700 = 61 is free by then.
        let counts = FleetCounts { current_passed: 700, previous_passed: 600, ..Default::default() };
        assert_eq!(gateway_budget(&rule(1000), &counts, &reply_at(10_500_000), TIMING, 100, 0), 61);
    }

    #[test]
    fn gateway_budget_subtracts_other_leases() {
        let counts = FleetCounts { current_passed: 700, previous_passed: 600, others_outstanding: 60, others_rate: 0 };
        assert_eq!(gateway_budget(&rule(1000), &counts, &reply_at(10_500_000), TIMING, 100, 0), 1);
    }

    #[test]
    fn gateway_budget_shares_by_rate() {
        // 61 free, this gateway offers 300/s of the fleet's 300 + 900: 15.25, rounded down.
        let counts = FleetCounts { current_passed: 700, previous_passed: 600, others_outstanding: 0, others_rate: 900 };
        assert_eq!(gateway_budget(&rule(1000), &counts, &reply_at(10_500_000), TIMING, 300, 0), 15);
    }

    #[test]
    fn gateway_budget_never_below_local_passes() {
        // Redis restarted empty has no counts, but this gateway passed 950 in the window.
        let counts = FleetCounts::default();
        assert_eq!(gateway_budget(&rule(1000), &counts, &reply_at(10_500_000), TIMING, 100, 950), 50);
    }

    #[test]
    fn gateway_budget_is_paced() {
        // A fresh key has the whole limit free, but one tick grants at most two ticks' worth.
        let counts = FleetCounts::default();
        assert_eq!(gateway_budget(&rule(1000), &counts, &reply_at(10_500_000), TIMING, 100, 0), 200);
    }

    #[test]
    fn gateway_budget_is_zero_over_limit() {
        let counts = FleetCounts { current_passed: 1500, previous_passed: 0, others_outstanding: 0, others_rate: 0 };
        assert_eq!(gateway_budget(&rule(1000), &counts, &reply_at(10_500_000), TIMING, 100, 0), 0);
        let counts = FleetCounts { current_passed: 900, previous_passed: 0, others_outstanding: 500, others_rate: 0 };
        assert_eq!(gateway_budget(&rule(1000), &counts, &reply_at(10_500_000), TIMING, 100, 0), 0);
    }

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
