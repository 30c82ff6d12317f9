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
    os::fd::AsFd as _,
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::Duration,
};

use aya::maps::IterableMap as _;
use limiter_common::{
    FAMILY_IPV4, FlowKey, Grant, KeyCounter, Rule, SlidingWindow,
    allowance::{proportional_share, split_by_demand},
    window,
};
use tracing::{debug, warn};

use crate::{
    batch,
    datapath::Maps,
    rules::pace_cap,
    store::{FleetCounts, Group, KeyDelta, Lease, MAX_KEYS_PER_CALL, Store, StoreError, SyncReply, bucket_of, group_keys},
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
    /// The last tick whose read of COUNTERS found the key; a key not found was evicted.
    seen_in: u64,
}

/// A key with new traffic, before the tick decides whether to sync it.
struct Candidate {
    /// Position of the key in the tick's snapshot of COUNTERS.
    index: usize,
    rule: Rule,
    offered_total: u64,
}

impl Candidate {
    /// Returns how close the key came to its limit in the last tick: its offered packets
    /// against the packets its rule allows per tick, in thousandths.
    fn pressure(&self, interval_us: u64) -> u128 {
        let allowed_per_tick = (u128::from(self.rule.limit) * u128::from(interval_us) * 1000)
            .checked_div(u128::from(self.rule.window_ns))
            .unwrap_or(0)
            .max(1);
        u128::from(self.offered_total) * 1000 / allowed_per_tick
    }
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
    /// Keys with new traffic left for a later tick, because syncing them too would have
    /// run the store phase past half the sync interval.
    pub keys_deferred: usize,
    /// Keys whose sync call failed after it may have reached Redis. Their deltas are not sent
    /// again, so no delta counts twice. The store may miss them instead, which the gateway's
    /// local floor covers for one window.
    pub keys_in_doubt: usize,
    /// Keys the LRU map evicted since the last tick. Packets they passed since their last
    /// sync never reach the store.
    pub keys_evicted: usize,
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
    /// Most keys one tick syncs; `None` syncs every key with new traffic.
    sync_budget: Option<SyncBudget>,
    /// Number of the current tick, which marks the histories of the keys it read.
    generation: u64,
}

/// How many keys a tick may sync: as many as Redis can reconcile in what is left of the
/// tick's share of the interval, going by the time per key measured in recent ticks.
#[derive(Clone, Copy, Debug)]
struct SyncBudget {
    /// Moving average of the store phase's wall time per key synced, once measured.
    nanos_per_key: Option<f64>,
}

/// Part of the interval by which the store phase should end. The grants are written after
/// it, and the machine that floods the agent with keys also slows it down.
const STORE_PHASE_END: f64 = 0.5;
/// Keys a tick syncs before a cost per key is known.
const UNMEASURED_SYNC_KEYS: usize = 4096;
/// Keys a tick syncs however long the tick has taken already, so the keys closest to their
/// limit keep their grants even when reading the maps alone fills the interval.
const MIN_SYNC_KEYS: usize = 1024;
/// Keys a tick must sync for its time per key to count: below that, the round trip
/// dominates and overstates the cost.
const MIN_MEASURED_KEYS: usize = 512;

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
            sync_budget: Some(SyncBudget { nanos_per_key: None }),
            generation: 0,
        }
    }

    /// Makes every tick sync every key with new traffic, however long that takes. The
    /// benchmarks use this to measure the cost of a full tick.
    pub fn sync_every_key(&mut self) {
        self.sync_budget = None;
    }

    /// Returns how many keys this tick may sync, `elapsed` into it.
    fn sync_budget(&self, elapsed: Duration) -> usize {
        let Some(SyncBudget { nanos_per_key }) = self.sync_budget else {
            return usize::MAX;
        };
        let Some(nanos) = nanos_per_key.filter(|nanos| *nanos > 0.0) else {
            return UNMEASURED_SYNC_KEYS;
        };
        let left_ns = self.interval_us as f64 * 1000.0 * STORE_PHASE_END - elapsed.as_nanos() as f64;
        ((left_ns / nanos).max(0.0) as usize).max(MIN_SYNC_KEYS)
    }

    /// Updates the time per key from a store phase that synced `keys` keys.
    fn record_sync_cost(&mut self, elapsed: Duration, keys: usize) {
        let Some(budget) = self.sync_budget.as_mut() else {
            return;
        };
        if keys < MIN_MEASURED_KEYS {
            return;
        }
        let sample = elapsed.as_nanos() as f64 / keys as f64;
        budget.nanos_per_key = Some(match budget.nanos_per_key {
            Some(average) => (average + sample) / 2.0,
            None => sample,
        });
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
    /// Keys whose sync call failed before it reached Redis keep their old baseline, so their
    /// packets are sent again with the next tick's delta and none is lost. Keys whose call
    /// may have run (a timeout, a connection broken mid-call) move past their deltas instead:
    /// each delta is applied at most once.
    pub async fn tick(&mut self, maps: &std::sync::Mutex<Maps>, rules: &HashMap<u32, Rule>) -> TickReport {
        let mut report = TickReport::default();
        let started = std::time::Instant::now();

        // Step 1: read every key's per-CPU counters and keep those with new traffic.
        let snapshot = match read_counters(maps, self.cpus) {
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

        self.generation = self.generation.wrapping_add(1);
        let mut candidates = Vec::new();
        for (index, (key, counters)) in snapshot.iter().enumerate() {
            let history = self.histories.entry(*key).or_default();
            history.seen_in = self.generation;
            let Some(rule) = rules.get(&key.rule_id) else {
                // Counters of a removed rule are deleted with the rule; a leftover is skipped.
                continue;
            };
            let offered_total: u64 = counters
                .iter()
                .enumerate()
                .map(|(cpu, counter)| cpu_delta(counter.offered, history.offered.get(cpu).copied()))
                .sum();
            if offered_total > 0 {
                candidates.push(Candidate { index, rule: *rule, offered_total });
            }
        }

        // Step 2: keep the tick within its interval. Under a flood of spoofed sources, more
        // keys see traffic than Redis can reconcile in one interval. The keys closest to
        // their limit go first, and the rest keep their baselines for a later tick.
        let budget = self.sync_budget(started.elapsed());
        if candidates.len() > budget {
            let interval_us = self.interval_us;
            candidates.select_nth_unstable_by_key(budget, |candidate| std::cmp::Reverse(candidate.pressure(interval_us)));
            report.keys_deferred = candidates.len() - budget;
            candidates.truncate(budget);
        }
        let mut groups: BTreeMap<(u32, u32), Vec<PendingKey>> = BTreeMap::new();
        for candidate in candidates {
            let (key, counters) = &snapshot[candidate.index];
            let pending = self.pending_key(*key, candidate.rule, counters, now_local, span_us);
            groups.entry((candidate.rule.id, bucket_of(&pending.field))).or_default().push(pending);
        }

        // Step 3: forget keys the LRU map evicted. Their grants stay until the LRU map evicts
        // them too: the program drops a key's grant whenever it creates the key's counters
        // anew, so an old grant is never applied to new counts.
        let before = self.histories.len();
        let generation = self.generation;
        self.histories.retain(|_, history| history.seen_in == generation);
        report.keys_evicted = before - self.histories.len();

        // Step 4: per group of at most MAX_KEYS_PER_CALL keys, all groups in flight together:
        // sync, size the grants, and record them as leases right away.
        let store_started = std::time::Instant::now();
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

        // Step 5: write the grants and move the baselines forward.
        let mut planned = Vec::new();
        while let Some(joined) = calls.join_next().await {
            match joined {
                Ok((chunk, Ok((shares, reservation)))) => {
                    if let Err(error) = reservation {
                        report.failed_reservations += 1;
                        debug!(%error, keys = chunk.len(), rule = chunk[0].rule.id, "reserve call failed");
                        report.first_error.get_or_insert_with(|| describe_call_error(&error, &chunk));
                    }
                    planned.push((chunk, shares));
                }
                Ok((chunk, Err(error))) => {
                    report.failed_calls += 1;
                    debug!(%error, keys = chunk.len(), rule = chunk[0].rule.id, "sync call failed");
                    report.first_error.get_or_insert_with(|| describe_call_error(&error, &chunk));
                    if may_have_applied(&error) {
                        report.keys_in_doubt += chunk.len();
                        self.forget_deltas(chunk, now_local);
                    }
                }
                Err(error) => {
                    report.failed_calls += 1;
                    report.first_error.get_or_insert_with(|| format!("sync task failed: {error}"));
                }
            }
        }
        self.record_sync_cost(store_started.elapsed(), planned.iter().map(|(chunk, _)| chunk.len()).sum());
        let expires_ns = now_local.saturating_add(self.grant_lifetime.as_nanos() as u64);
        let mut grant_keys = Vec::new();
        let mut grants = Vec::new();
        for (chunk, shares) in planned {
            for (pending, shares) in chunk.into_iter().zip(shares) {
                grant_keys.push(pending.key);
                grants.extend(
                    pending
                        .passed_now
                        .iter()
                        .zip(shares)
                        .map(|(passed, share)| Grant { passed_ceiling: passed.saturating_add(share), expires_ns }),
                );
                let history = self.histories.entry(pending.key).or_default();
                history.passed = pending.passed_now;
                history.offered = pending.offered_now;
                history.read_at_ns = Some(now_local);
                report.keys_synced += 1;
            }
        }
        let maps = lock(maps);
        match batch::update_all(maps.grants.map().fd().as_fd(), self.cpus, &grant_keys, &grants) {
            Ok(()) => report.grants_written = grant_keys.len(),
            Err((written, error)) => {
                // The keys after the failed one keep their old grant until it expires, and
                // then the fallback limit; the next tick writes them again.
                warn!(%error, written, keys = grant_keys.len(), "failed to write grants");
                report.grants_written = written;
                report.first_error.get_or_insert_with(|| format!("failed to write GRANTS: {error}"));
            }
        }
        report
    }

    /// Moves the baselines of keys whose sync call may have been applied past their deltas,
    /// so each delta is applied at most once. For a window, each key's estimate is kept no
    /// lower than this gateway's own passes, in case the call never ran.
    fn forget_deltas(&mut self, chunk: Vec<PendingKey>, now_local: u64) {
        for pending in chunk {
            let history = self.histories.entry(pending.key).or_default();
            history.passed = pending.passed_now;
            history.offered = pending.offered_now;
            history.read_at_ns = Some(now_local);
            history.local_floor_until_ns = now_local.saturating_add(pending.rule.window_ns);
        }
    }

    /// Computes the key's deltas since the last sync, or `None` if it saw no new packet.
    fn pending_key(&mut self, key: FlowKey, rule: Rule, counters: &[KeyCounter], now_local: u64, tick_span_us: u64) -> PendingKey {
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
        PendingKey {
            key,
            rule,
            field: flow_key_field(&key),
            passed_now,
            offered_now,
            offered_delta,
            passed_total,
            offered_total,
            full_span_us,
            local_estimate,
        }
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

/// Describes a failed script call with the group's Redis key and its first flow key, so an
/// error that names neither (an OOM, a CROSSSLOT) can still be traced to the keys it hit.
fn describe_call_error(error: &StoreError, chunk: &[PendingKey]) -> String {
    let [window_key, _, _] = group_keys(chunk[0].rule.id, bucket_of(&chunk[0].field));
    format!("{error} (Redis key {window_key}, flow key {}, {} keys)", chunk[0].field, chunk.len())
}

/// Returns true if a failed sync call may still have run in Redis: it timed out, or its
/// connection broke after the request could have been sent. Calls refused before sending,
/// and script errors, which the scripts raise before writing anything, ran nowhere.
fn may_have_applied(error: &StoreError) -> bool {
    match error {
        StoreError::Timeout(_) => true,
        StoreError::Redis(error) => !error.is_connection_refusal() && (error.is_timeout() || error.is_io_error() || error.is_connection_dropped()),
        // A reply of the wrong shape comes from a script that ran.
        StoreError::Reply(_) => true,
    }
}

fn lock(maps: &std::sync::Mutex<Maps>) -> std::sync::MutexGuard<'_, Maps> {
    // A panic while holding the lock leaves the maps themselves intact, since every write is
    // a single syscall, so a poisoned lock is still safe to use.
    maps.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read_counters(maps: &std::sync::Mutex<Maps>, cpus: usize) -> anyhow::Result<Vec<(FlowKey, Vec<KeyCounter>)>> {
    let maps = lock(maps);
    Ok(batch::lookup_all(maps.counters.map().fd().as_fd(), cpus)?)
}

/// Returns `now - before` per CPU. A counter below its baseline means the LRU map evicted
/// and re-created the key, so everything it counted since is new.
fn per_cpu_delta(now: &[u64], before: &[u64]) -> Vec<u64> {
    now.iter().enumerate().map(|(cpu, value)| cpu_delta(*value, before.get(cpu).copied())).collect()
}

/// Returns one CPU's `now - before`, or all of `now` if the counter restarted below its
/// baseline or has none.
fn cpu_delta(now: u64, before: Option<u64>) -> u64 {
    match before {
        Some(previous) if now >= previous => now - previous,
        _ => now,
    }
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

    fn candidate(limit: u64, offered_total: u64) -> Candidate {
        Candidate { index: 0, rule: rule(limit), offered_total }
    }

    #[test]
    fn pressure_ranks_keys_by_their_own_limit() {
        // 100 ms ticks: a 1000/s rule allows 100 a tick, a 10/s rule 1.
        assert_eq!(candidate(1000, 100).pressure(100_000), 1000);
        assert_eq!(candidate(1000, 1).pressure(100_000), 10);
        assert_eq!(candidate(10, 3).pressure(100_000), 3000);
        // A limit below one packet per tick still counts as one.
        assert_eq!(candidate(1, 2).pressure(100_000), 2000);
    }

    #[tokio::test]
    async fn sync_budget_fits_the_rest_of_the_interval() {
        let store = Store::connect(&["redis://127.0.0.1:1".to_string()], false, Duration::from_millis(10), None).unwrap();
        let mut reconciler = Reconciler::new(store, "gw", Duration::from_millis(100), Duration::from_millis(300), 2);
        let start = Duration::ZERO;
        assert_eq!(reconciler.sync_budget(start), UNMEASURED_SYNC_KEYS, "before any measurement");
        // 10,000 keys in 40 ms: 4 µs each. The store phase should end 50 ms into the tick:
        // 12,500 keys fit at its start, 7,500 after 20 ms spent reading the maps.
        reconciler.record_sync_cost(Duration::from_millis(40), 10_000);
        assert_eq!(reconciler.sync_budget(start), 12_500);
        assert_eq!(reconciler.sync_budget(Duration::from_millis(20)), 7_500);
        // Past the end, the keys closest to their limit still get their grants.
        assert_eq!(reconciler.sync_budget(Duration::from_millis(90)), MIN_SYNC_KEYS);
        // Too few keys to measure: the round trip would dominate.
        reconciler.record_sync_cost(Duration::from_millis(40), 10);
        assert_eq!(reconciler.sync_budget(start), 12_500);
        // A slow phase moves the average halfway toward it: 4 and 12 µs make 8.
        reconciler.record_sync_cost(Duration::from_millis(12), 1_000);
        assert_eq!(reconciler.sync_budget(start), 6_250);
        reconciler.sync_every_key();
        assert_eq!(reconciler.sync_budget(Duration::from_millis(90)), usize::MAX);
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
