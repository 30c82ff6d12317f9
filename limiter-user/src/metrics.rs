//! `limiter agent --metrics-addr`: the agent's metrics in the Prometheus text format
//! (version 0.0.4), served on `GET /metrics`.
//!
//! Every figure but the tick duration is a total kept elsewhere: verdicts per reason in the
//! per-CPU `STATS` map, per-key packets in `COUNTERS`, store errors and breaker state in the
//! agent's status. So each scrape reads them and builds a fresh registry, and only the tick
//! histogram lives between scrapes. No metric has a per-key label, because a flood of
//! spoofed sources would turn each source into a time series.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    os::fd::AsFd as _,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::IterableMap as _;
use limiter_common::{FlowKey, INNER_TIER_ID_BIT, KeyCounter, UNIT_BYTES};
use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, info, warn};

use crate::{batch, control::AgentStatus, datapath::Maps, stats, store::BreakerState};

/// Upper bounds of the tick duration buckets, in seconds: from 1 ms to 1 s, so a tick at a
/// 100 ms interval, one over it, and one stalled on Redis fall in different buckets.
const TICK_BUCKETS_SECONDS: [f64; 12] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0];

/// Maximum bytes of an HTTP request head. Scrapers send a few hundred.
const MAX_REQUEST_HEAD_BYTES: usize = 8 * 1024;

/// Maximum wait for a request head, so an idle connection does not hold a task.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Metrics the agent records as it runs, shared by the tick loop and the HTTP server.
#[derive(Debug)]
pub struct AgentMetrics {
    tick_duration: Histogram,
    /// The agent's status after its last tick.
    status: Mutex<Option<AgentStatus>>,
    /// Per-rule packet totals, accumulated from `COUNTERS` at each scrape.
    rule_totals: Mutex<RuleTotals>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            tick_duration: Histogram::new(TICK_BUCKETS_SECONDS),
            status: Mutex::new(None),
            rule_totals: Mutex::new(RuleTotals::default()),
        }
    }
}

impl AgentMetrics {
    /// Records one tick that ran for `elapsed` and the status it left.
    pub fn record_tick(&self, elapsed: Duration, status: &AgentStatus) {
        self.tick_duration.observe(elapsed.as_secs_f64());
        *lock(&self.status) = Some(status.clone());
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each guarded value is replaced whole, so a poisoned lock still guards consistent data.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Counts of a rule's keys, summed over every key and CPU: packets, or bytes for a rule that
/// counts bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketTotals {
    pub offered: u64,
    /// Passed, or under a shadow rule, would have passed.
    pub passed: u64,
    /// Units a shadow rule would have dropped, and passed instead.
    pub would_drop: u64,
}

impl PacketTotals {
    /// Dropped: offered, neither passed nor let through by a shadow rule.
    pub fn dropped(&self) -> u64 {
        self.offered.saturating_sub(self.passed).saturating_sub(self.would_drop)
    }

    fn sum(counters: &[KeyCounter]) -> Self {
        counters.iter().fold(Self::default(), |sum, counter| Self {
            offered: sum.offered.saturating_add(counter.offered),
            passed: sum.passed.saturating_add(counter.passed),
            would_drop: sum.would_drop.saturating_add(counter.would_drop),
        })
    }

    fn add(&mut self, other: Self) {
        self.offered = self.offered.saturating_add(other.offered);
        self.passed = self.passed.saturating_add(other.passed);
        self.would_drop = self.would_drop.saturating_add(other.would_drop);
    }
}

/// Running per-rule totals built from snapshots of `COUNTERS`.
///
/// A key's counters only grow while its entry lives, so the totals grow by each key's
/// growth since the last snapshot. A key whose counts fell was evicted and created again,
/// and its whole new count is growth.
///
/// NOTE: packets a key counted after the last snapshot and before the LRU map evicted it
/// are missing from these totals, as are keys that lived wholly between two snapshots. Under
/// a flood of new sources the per-rule totals therefore undercount; `limiter_packets_total`
/// from `STATS` counts every packet.
#[derive(Debug, Default)]
pub struct RuleTotals {
    last_seen: HashMap<FlowKey, PacketTotals>,
    totals: BTreeMap<u32, PacketTotals>,
}

impl RuleTotals {
    /// Adds the growth in `snapshot` since the previous one and returns the totals per rule id.
    pub fn update(&mut self, snapshot: &[(FlowKey, Vec<KeyCounter>)]) -> &BTreeMap<u32, PacketTotals> {
        let mut seen = HashMap::with_capacity(snapshot.len());
        for (key, per_cpu) in snapshot {
            // An inner tier's keys count the same packets as their rule's keys again.
            if key.rule_id & INNER_TIER_ID_BIT != 0 {
                continue;
            }
            let now = PacketTotals::sum(per_cpu);
            let before = self.last_seen.get(key).copied().unwrap_or_default();
            let restarted = now.offered < before.offered || now.passed < before.passed || now.would_drop < before.would_drop;
            let growth = if restarted {
                now
            } else {
                PacketTotals {
                    offered: now.offered - before.offered,
                    passed: now.passed - before.passed,
                    would_drop: now.would_drop - before.would_drop,
                }
            };
            self.totals.entry(key.rule_id).or_default().add(growth);
            seen.insert(*key, now);
        }
        self.last_seen = seen;
        &self.totals
    }
}

/// Map occupancy: entries in use and the map's size.
#[derive(Clone, Copy, Debug, Default)]
struct MapFill {
    entries: u64,
    max_entries: u64,
}

/// Everything one scrape reads from the pinned maps.
struct MapSnapshot {
    reasons: BTreeMap<&'static str, u64>,
    rules: BTreeMap<u32, PacketTotals>,
    /// Ids of the rules that count bytes rather than packets.
    byte_rules: Vec<u32>,
    counters: MapFill,
    grants: MapFill,
    rule_table: MapFill,
}

/// Reads verdict counts, per-rule totals and map fill levels from the pinned maps.
fn read_maps(maps: &Maps, cpus: usize, rule_totals: &Mutex<RuleTotals>) -> anyhow::Result<MapSnapshot> {
    let reasons = stats::reason_counts(maps)?;

    let counters: Vec<(FlowKey, Vec<KeyCounter>)> =
        batch::lookup_all(maps.counters.map().fd().as_fd(), cpus).context("failed to read the COUNTERS map")?;
    let grants: Vec<(FlowKey, Vec<limiter_common::Grant>)> =
        batch::lookup_all(maps.grants.map().fd().as_fd(), cpus).context("failed to read the GRANTS map")?;
    let mut rule_entries = 0;
    let mut byte_rules = Vec::new();
    for entry in maps.rules.iter() {
        let (_, rule) = entry.context("failed to read the RULES map")?;
        rule_entries += 1;
        if rule.unit == UNIT_BYTES {
            byte_rules.push(rule.id);
        }
    }
    let rules = lock(rule_totals).update(&counters).clone();

    let max_entries = |info: Result<aya::maps::MapInfo, aya::maps::MapError>| -> anyhow::Result<u64> {
        Ok(u64::from(info.context("failed to read map information")?.max_entries()))
    };
    Ok(MapSnapshot {
        reasons,
        rules,
        byte_rules,
        counters: MapFill { entries: counters.len() as u64, max_entries: max_entries(maps.counters.map().info())? },
        grants: MapFill { entries: grants.len() as u64, max_entries: max_entries(maps.grants.map().info())? },
        rule_table: MapFill { entries: rule_entries as u64, max_entries: max_entries(maps.rules.map().info())? },
    })
}

type Labels = Vec<(&'static str, String)>;

/// Registers a family of counters with the given totals.
fn register_counters(registry: &mut Registry, name: &str, help: &str, values: impl IntoIterator<Item = (Labels, u64)>) {
    let family = Family::<Labels, Counter>::default();
    for (labels, value) in values {
        family.get_or_create(&labels).inc_by(value);
    }
    registry.register(name, help, family);
}

/// Registers a family of gauges with the given values.
fn register_gauges(registry: &mut Registry, name: &str, help: &str, values: impl IntoIterator<Item = (Labels, i64)>) {
    let family = Family::<Labels, Gauge>::default();
    for (labels, value) in values {
        family.get_or_create(&labels).set(value);
    }
    registry.register(name, help, family);
}

fn label(name: &'static str, value: impl ToString) -> Labels {
    vec![(name, value.to_string())]
}

/// Encodes every metric in the Prometheus text format.
fn encode(metrics: &AgentMetrics, maps: &MapSnapshot) -> anyhow::Result<String> {
    let mut registry = Registry::with_prefix("limiter");

    // Verdicts: per reason for every packet, per rule for packets a rule selected.
    register_counters(
        &mut registry,
        "packets",
        "Packets by verdict reason, summed over every CPU",
        maps.reasons.iter().map(|(reason, count)| (label("reason", reason), *count)),
    );
    // A rule that counts bytes has byte totals, under names of their own.
    for (unit, counts_bytes) in [("packets", false), ("bytes", true)] {
        let rules: Vec<(&u32, &PacketTotals)> =
            maps.rules.iter().filter(|(id, _)| maps.byte_rules.contains(id) == counts_bytes).collect();
        let per_rule = |value: fn(&PacketTotals) -> u64| -> Vec<(Labels, u64)> {
            rules.iter().map(|(id, totals)| (label("rule", id), value(totals))).collect()
        };
        register_counters(
            &mut registry,
            &format!("rule_passed_{unit}"),
            &format!("Each rule's passed {unit}, from the per-key counters"),
            per_rule(|totals| totals.passed),
        );
        register_counters(
            &mut registry,
            &format!("rule_dropped_{unit}"),
            &format!("Each rule's dropped {unit}, from the per-key counters"),
            per_rule(PacketTotals::dropped),
        );
        register_counters(
            &mut registry,
            &format!("rule_would_drop_{unit}"),
            &format!("Each shadow rule's {unit} that it would have dropped and passed instead"),
            per_rule(|totals| totals.would_drop),
        );
    }

    // Map fill levels.
    let fills = [("counters", maps.counters), ("grants", maps.grants), ("rules", maps.rule_table)];
    register_gauges(
        &mut registry,
        "map_entries",
        "Entries in use in each map",
        fills.iter().map(|(map, fill)| (label("map", map), fill.entries as i64)),
    );
    register_gauges(
        &mut registry,
        "map_max_entries",
        "Size of each map in entries",
        fills.iter().map(|(map, fill)| (label("map", map), fill.max_entries as i64)),
    );

    // The tick loop and the store, once the agent has ticked.
    registry.register("tick_duration_seconds", "Duration of each reconciliation tick", metrics.tick_duration.clone());
    if let Some(status) = lock(&metrics.status).clone() {
        register_status(&mut registry, &status);
    }

    let mut text = String::new();
    prometheus_text::encode(&mut text, &registry).context("failed to encode metrics")?;
    Ok(text)
}

/// Registers the counters and gauges of the agent's status.
fn register_status(registry: &mut Registry, status: &AgentStatus) {
    let errors = status.store_errors;
    register_counters(
        registry,
        "store_errors",
        "Failed Redis calls by kind",
        [
            (label("kind", "timeout"), errors.timeouts),
            (label("kind", "connection"), errors.connection_errors),
            (label("kind", "script"), errors.script_errors),
        ],
    );
    register_counters(
        registry,
        "store_noscript_reloads",
        "Scripts loaded again after Redis replied NOSCRIPT",
        [(Labels::new(), errors.noscript_reloads)],
    );

    let states = [BreakerState::Closed, BreakerState::Open, BreakerState::HalfOpen];
    register_gauges(
        registry,
        "breaker_state",
        "State of the circuit breaker in front of Redis: 1 for the current state, 0 for the others",
        states.iter().map(|state| (label("state", breaker_name(*state)), i64::from(status.breaker == *state))),
    );
    register_counters(registry, "breaker_openings", "Times the circuit breaker opened", [(Labels::new(), status.breaker_openings)]);

    register_gauges(
        registry,
        "store_reachable",
        "1 while the last tick reached Redis, else 0",
        [(Labels::new(), i64::from(status.store_reachable))],
    );
    register_gauges(registry, "gateways", "Gateways seen alive in the fleet", [(Labels::new(), status.gateways_seen as i64)]);

    register_counters(registry, "ticks", "Reconciliation ticks", [(Labels::new(), status.ticks)]);
    register_counters(
        registry,
        "ticks_failed",
        "Ticks in which Redis was out of reach or a store call failed",
        [(Labels::new(), status.failed_ticks)],
    );
    register_counters(
        registry,
        "ticks_over_interval",
        "Ticks that took longer than the sync interval",
        [(Labels::new(), status.ticks_over_interval)],
    );

    register_counters(
        registry,
        "keys_unsynced",
        "Keys whose counts missed their tick's sync, by cause: deferred to a later tick, in doubt after a failed call, or evicted from the counter map",
        [
            (label("cause", "deferred"), status.keys_deferred_total),
            (label("cause", "evicted"), status.keys_evicted_total),
            (label("cause", "in_doubt"), status.keys_in_doubt_total),
        ],
    );
    register_gauges(
        registry,
        "keys_tracked",
        "Keys in the counter map at the last tick",
        [(Labels::new(), status.last_tick.keys_tracked as i64)],
    );
}

fn breaker_name(state: BreakerState) -> &'static str {
    match state {
        BreakerState::Closed => "closed",
        BreakerState::Open => "open",
        BreakerState::HalfOpen => "half_open",
    }
}

/// Binds `addr` and serves `GET /metrics` until the task is aborted.
///
/// Binding happens before this returns, so a taken port stops the agent at start.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to bind the metrics address {addr}: pick a free port with --metrics-addr ADDR:PORT"))
}

/// Serves scrapes on `listener`, reading the maps pinned for `iface`.
pub async fn serve(listener: TcpListener, iface: String, metrics: Arc<AgentMetrics>) {
    let addr = listener.local_addr().map(|addr| addr.to_string()).unwrap_or_default();
    info!(iface, addr, "serving metrics on /metrics");
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                warn!(%error, "failed to accept a metrics connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let iface = iface.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(error) = serve_connection(stream, &iface, metrics).await {
                debug!(error = format!("{error:#}"), "metrics connection ended with an error");
            }
        });
    }
}

/// Serves one HTTP request, then closes the connection.
async fn serve_connection(mut stream: TcpStream, iface: &str, metrics: Arc<AgentMetrics>) -> anyhow::Result<()> {
    let head = tokio::time::timeout(REQUEST_TIMEOUT, read_request_head(&mut stream))
        .await
        .context("timed out waiting for the request")??;
    let request_line = head.lines().next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();

    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => match scrape(iface, &metrics).await {
            Ok(text) => ("200 OK", prometheus_text::CONTENT_TYPE, text),
            Err(error) => {
                warn!(iface, error = format!("{error:#}"), "failed to collect metrics");
                ("500 Internal Server Error", "text/plain; charset=utf-8", format!("failed to collect metrics: {error:#}\n"))
            }
        },
        (_, "/metrics") => ("405 Method Not Allowed", "text/plain; charset=utf-8", "only GET is allowed\n".to_owned()),
        _ => ("404 Not Found", "text/plain; charset=utf-8", "not found: metrics are at /metrics\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

/// Reads up to the blank line that ends an HTTP request head.
async fn read_request_head(stream: &mut TcpStream) -> anyhow::Result<String> {
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            anyhow::bail!("connection closed before the request head ended");
        }
        head.extend_from_slice(&buffer[..read]);
        if head.len() > MAX_REQUEST_HEAD_BYTES {
            anyhow::bail!("request head longer than {MAX_REQUEST_HEAD_BYTES} bytes");
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Reads the maps and encodes every metric. The map reads are system calls, so they run on
/// the blocking pool, off the tick loop's threads.
async fn scrape(iface: &str, metrics: &Arc<AgentMetrics>) -> anyhow::Result<String> {
    let iface = iface.to_owned();
    let metrics = metrics.clone();
    tokio::task::spawn_blocking(move || {
        let maps = Maps::open(&iface)?;
        let cpus = batch::possible_cpus()?;
        let snapshot = read_maps(&maps, cpus, &metrics.rule_totals)?;
        encode(&metrics, &snapshot)
    })
    .await
    .context("the metrics task panicked")?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(rule_id: u32, last_byte: u8) -> FlowKey {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[192, 0, 2, last_byte]);
        FlowKey { rule_id, family: limiter_common::FAMILY_IPV4, prefix_len: 32, addr, ..Default::default() }
    }

    fn counters(per_cpu: &[(u64, u64)]) -> Vec<KeyCounter> {
        per_cpu.iter().map(|(offered, passed)| KeyCounter { offered: *offered, passed: *passed, ..Default::default() }).collect()
    }

    #[test]
    fn rule_totals_add_growth_per_rule() {
        let mut totals = RuleTotals::default();
        let first = totals.update(&[(key(1, 1), counters(&[(10, 5), (2, 2)])), (key(2, 1), counters(&[(4, 4)]))]).clone();
        assert_eq!(first[&1], PacketTotals { offered: 12, passed: 7, would_drop: 0 });
        assert_eq!(first[&2], PacketTotals { offered: 4, passed: 4, would_drop: 0 });

        let second = totals.update(&[(key(1, 1), counters(&[(20, 6), (2, 2)])), (key(1, 2), counters(&[(3, 3)]))]).clone();
        assert_eq!(second[&1], PacketTotals { offered: 25, passed: 11, would_drop: 0 }, "growth of 10/1 plus a new key's 3/3");
        assert_eq!(second[&1].dropped(), 14);
        assert_eq!(second[&2], PacketTotals { offered: 4, passed: 4, would_drop: 0 }, "a rule whose keys went keeps its total");
    }

    #[test]
    fn rule_totals_skip_inner_tier_keys() {
        let mut totals = RuleTotals::default();
        let inner = FlowKey { rule_id: 1 | INNER_TIER_ID_BIT, ..key(1, 1) };
        let after = totals.update(&[(key(1, 1), counters(&[(10, 5)])), (inner, counters(&[(10, 5)]))]).clone();
        assert_eq!(after.len(), 1);
        assert_eq!(after[&1].offered, 10, "the inner key counts the same packets again");
    }

    #[test]
    fn rule_totals_count_recreated_key_from_zero() {
        let mut totals = RuleTotals::default();
        totals.update(&[(key(1, 1), counters(&[(100, 50)]))]);
        let after = totals.update(&[(key(1, 1), counters(&[(7, 7)]))]).clone();
        assert_eq!(after[&1], PacketTotals { offered: 107, passed: 57, would_drop: 0 });
    }

    #[test]
    fn encoded_metrics_have_no_key_labels() {
        let metrics = AgentMetrics::default();
        metrics.tick_duration.observe(0.004);
        let snapshot = MapSnapshot {
            reasons: BTreeMap::from([("passed", 5), ("dropped_global_limit", 2)]),
            rules: BTreeMap::from([
                (3, PacketTotals { offered: 9, passed: 6, would_drop: 0 }),
                (4, PacketTotals { offered: 5000, passed: 3000, would_drop: 2000 }),
            ]),
            byte_rules: vec![4],
            counters: MapFill { entries: 2, max_entries: 65536 },
            grants: MapFill { entries: 1, max_entries: 65536 },
            rule_table: MapFill { entries: 1, max_entries: 256 },
        };
        let text = encode(&metrics, &snapshot).unwrap();
        assert!(text.contains("limiter_packets_total{reason=\"dropped_global_limit\"} 2\n"), "{text}");
        assert!(text.contains("limiter_rule_passed_packets_total{rule=\"3\"} 6\n"), "{text}");
        assert!(text.contains("limiter_rule_dropped_packets_total{rule=\"3\"} 3\n"), "{text}");
        assert!(text.contains("limiter_rule_would_drop_bytes_total{rule=\"4\"} 2000\n"), "{text}");
        assert!(text.contains("limiter_rule_dropped_bytes_total{rule=\"4\"} 0\n"), "{text}");
        assert!(!text.contains("limiter_rule_passed_packets_total{rule=\"4\"}"), "{text}");
        assert!(text.contains("limiter_map_entries{map=\"counters\"} 2\n"), "{text}");
        assert!(text.contains("limiter_tick_duration_seconds_bucket{le=\"0.005\"} 1\n"), "{text}");
        assert!(!text.contains("192.0.2"), "no metric carries a source address: {text}");
    }
}
