//! `limiter top`: the keys with the most packets per second on this gateway, from two reads
//! of the pinned maps an interval apart.
//!
//! Rates are this gateway's alone: offered and passed packets per second per key (bytes for
//! a rule that counts bytes), from the growth of its per-CPU counters. The state column names what decides the key's packets
//! now, as `limiter explain` works it out: a valid grant from fleet-wide counts, the new-key
//! pace, or the rule's store-down policy.

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::{IsTerminal as _, Write as _},
    os::fd::AsFd as _,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::IterableMap as _;
use limiter_common::{AgentHeartbeat, FlowKey, Grant, INNER_TIER_ID_BIT, KeyCounter, Rule, UNIT_BYTES};
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    batch,
    datapath::Maps,
    explain::{KeyState, key_state},
    reconcile::{flow_key_field, monotonic_ns},
};

/// Clears the screen and moves the cursor to its top left corner (ECMA-48 ED and CUP).
const CLEAR_SCREEN: &str = "\x1b[H\x1b[2J";
const HIDE_CURSOR: &str = "\x1b[?25l";
const SHOW_CURSOR: &str = "\x1b[?25h";

/// One read of the maps.
struct Snapshot {
    read_at: Instant,
    counters: HashMap<FlowKey, Vec<KeyCounter>>,
    grants: HashMap<FlowKey, Vec<Grant>>,
    rules: HashMap<u32, Rule>,
    heartbeat: AgentHeartbeat,
    now_ns: u64,
}

fn read_snapshot(maps: &Maps, cpus: usize) -> anyhow::Result<Snapshot> {
    let counters = batch::lookup_all::<FlowKey, KeyCounter>(maps.counters.map().fd().as_fd(), cpus)
        .context("failed to read the COUNTERS map")?;
    let grants =
        batch::lookup_all::<FlowKey, Grant>(maps.grants.map().fd().as_fd(), cpus).context("failed to read the GRANTS map")?;
    let mut rules = HashMap::new();
    for entry in maps.rules.iter() {
        let (_, rule) = entry.context("failed to read the RULES map")?;
        rules.insert(rule.id, rule);
    }
    Ok(Snapshot {
        read_at: Instant::now(),
        counters: counters.into_iter().collect(),
        grants: grants.into_iter().collect(),
        rules,
        heartbeat: maps.agent.get(&0, 0).context("failed to read the AGENT map")?,
        now_ns: monotonic_ns(),
    })
}

/// One key's rates between two reads.
#[derive(Clone, Debug, Serialize)]
pub struct KeyRate {
    pub rule: u32,
    /// Masked source with prefix length, and the port when the rule keys by port.
    pub key: String,
    /// Whether this is an inner key of a rule with an inner tier.
    pub inner: bool,
    /// `packets` or `bytes`: what the rates count.
    pub unit: &'static str,
    pub offered_per_second: f64,
    pub passed_per_second: f64,
    pub dropped_per_second: f64,
    /// What decides the key's packets on the CPU where most of them arrived: `grant`,
    /// `new_key`, `fallback`, `open` or `closed`.
    pub state: &'static str,
    /// Packets the key's grant still allows, summed over the CPUs where it is valid.
    pub grant_left: Option<u64>,
}

/// The heaviest keys between two reads, as `top --json` prints them.
#[derive(Clone, Debug, Serialize)]
pub struct TopView {
    pub iface: String,
    pub interval_ms: u64,
    /// Keys in the counter map at the second read.
    pub keys_tracked: usize,
    /// Keys with offered packets between the reads.
    pub keys_active: usize,
    pub keys: Vec<KeyRate>,
}

/// Returns the growth of the summed counters of one key. A key whose counts fell was
/// evicted and created again, so all of its counts are new.
fn growth(before: Option<&Vec<KeyCounter>>, after: &[KeyCounter]) -> (u64, u64) {
    let sum = |counters: &[KeyCounter]| {
        counters.iter().fold((0u64, 0u64), |(offered, passed), counter| {
            (offered.saturating_add(counter.offered), passed.saturating_add(counter.passed))
        })
    };
    let (offered, passed) = sum(after);
    let (offered_before, passed_before) = before.map_or((0, 0), |counters| sum(counters));
    if offered < offered_before || passed < passed_before {
        (offered, passed)
    } else {
        (offered - offered_before, passed - passed_before)
    }
}

/// Ranks the keys by offered rate between two snapshots and keeps the first `count`.
fn rank(iface: &str, before: &Snapshot, after: &Snapshot, count: usize) -> TopView {
    let seconds = after.read_at.duration_since(before.read_at).as_secs_f64().max(1e-3);
    let mut keys: Vec<KeyRate> = Vec::new();
    for (key, counters) in &after.counters {
        let (offered, passed) = growth(before.counters.get(key), counters);
        if offered == 0 {
            continue;
        }
        let inner = key.rule_id & INNER_TIER_ID_BIT != 0;
        let Some(base_rule) = after.rules.get(&(key.rule_id & !INNER_TIER_ID_BIT)) else {
            continue;
        };
        let rule = &if inner { base_rule.inner_tier_rule() } else { *base_rule };
        let grants = after.grants.get(key);
        let busiest = counters.iter().enumerate().max_by_key(|(_, counter)| counter.offered).map_or(0, |(slot, _)| slot);
        let grant_on = |slot: usize| grants.and_then(|grants| grants.get(slot)).copied();
        let state = key_state(rule, grant_on(busiest), after.heartbeat, after.now_ns);
        let grant_left: u64 = counters
            .iter()
            .enumerate()
            .filter_map(|(slot, counter)| {
                let grant = grant_on(slot)?;
                (after.now_ns < grant.expires_ns).then(|| grant.passed_ceiling.saturating_sub(counter.passed))
            })
            .sum();
        keys.push(KeyRate {
            rule: base_rule.id,
            key: flow_key_field(key),
            inner,
            unit: if rule.unit == UNIT_BYTES { "bytes" } else { "packets" },
            offered_per_second: offered as f64 / seconds,
            passed_per_second: passed as f64 / seconds,
            dropped_per_second: offered.saturating_sub(passed) as f64 / seconds,
            state: state.name(),
            grant_left: (state == KeyState::Grant).then_some(grant_left),
        });
    }
    let keys_active = keys.len();
    keys.sort_by(|a, b| b.offered_per_second.total_cmp(&a.offered_per_second).then_with(|| a.key.cmp(&b.key)));
    keys.truncate(count);
    TopView {
        iface: iface.to_owned(),
        interval_ms: (seconds * 1000.0).round() as u64,
        keys_tracked: after.counters.len(),
        keys_active,
        keys,
    }
}

/// Formats the view as a table with a one-line header.
pub fn format_view(view: &TopView) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "limiter top: {}, {} keys tracked, {} active in the last {} ms (Ctrl-C to quit)\n",
        view.iface, view.keys_tracked, view.keys_active, view.interval_ms
    );
    let _ = writeln!(
        text,
        "{:>5}  {:<52} {:>11} {:>11} {:>11}  {:<9} {:>10}  unit",
        "rule", "key", "offered/s", "passed/s", "dropped/s", "state", "grant-left"
    );
    for key in &view.keys {
        let grant_left = key.grant_left.map_or_else(|| "-".to_owned(), |left| left.to_string());
        let name = if key.inner { format!("{} (inner)", key.key) } else { key.key.clone() };
        let _ = writeln!(
            text,
            "{:>5}  {:<52} {:>11.1} {:>11.1} {:>11.1}  {:<9} {:>10}  {}",
            key.rule, name, key.offered_per_second, key.passed_per_second, key.dropped_per_second, key.state, grant_left,
            key.unit
        );
    }
    if view.keys.is_empty() {
        text += "(no key offered packets in this interval)\n";
    }
    text
}

/// Settings of `limiter top`.
#[derive(Clone, Debug)]
pub struct TopOptions {
    pub iface: String,
    pub interval: Duration,
    /// Keys shown.
    pub count: usize,
    /// Refreshes before returning; `None` runs until SIGINT or SIGTERM.
    pub refreshes: Option<u64>,
    /// Print one view as JSON and return.
    pub json: bool,
}

/// Runs `limiter top`: one JSON view, or a table redrawn in place every interval.
pub async fn run(options: TopOptions) -> anyhow::Result<()> {
    let TopOptions { iface, interval, count, refreshes, json } = options;
    let maps = Maps::open(&iface)?;
    let cpus = batch::possible_cpus()?;
    let mut before = read_snapshot(&maps, cpus)?;

    if json {
        tokio::time::sleep(interval).await;
        let after = read_snapshot(&maps, cpus)?;
        println!("{}", serde_json::to_string_pretty(&rank(&iface, &before, &after, count))?);
        return Ok(());
    }

    // Redraw in place only on a terminal; piped output gets one table after another.
    let terminal = std::io::stdout().is_terminal();
    let mut stdout = std::io::stdout();
    if terminal {
        write!(stdout, "{HIDE_CURSOR}")?;
    }
    let mut terminate = signal(SignalKind::terminate()).context("failed to install the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("failed to install the SIGINT handler")?;
    let result: anyhow::Result<()> = async {
        let mut refreshed = 0u64;
        while refreshes.is_none_or(|limit| refreshed < limit) {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = interrupt.recv() => break,
                _ = terminate.recv() => break,
            }
            let after = read_snapshot(&maps, cpus)?;
            let table = format_view(&rank(&iface, &before, &after, count));
            if terminal {
                write!(stdout, "{CLEAR_SCREEN}{table}")?;
            } else {
                writeln!(stdout, "{table}")?;
            }
            stdout.flush()?;
            before = after;
            refreshed += 1;
        }
        Ok(())
    }
    .await;
    if terminal {
        write!(stdout, "{SHOW_CURSOR}")?;
        stdout.flush()?;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(last_byte: u8) -> FlowKey {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[192, 0, 2, last_byte]);
        FlowKey { rule_id: 1, family: limiter_common::FAMILY_IPV4, prefix_len: 32, addr, ..Default::default() }
    }

    fn counters(offered: u64, passed: u64) -> Vec<KeyCounter> {
        vec![KeyCounter { offered, passed, ..Default::default() }, KeyCounter::default()]
    }

    fn snapshot(read_at: Instant, counters: &[(FlowKey, Vec<KeyCounter>)], grants: &[(FlowKey, Vec<Grant>)]) -> Snapshot {
        let rule = Rule { id: 1, limit: 100, fallback_limit: 100, new_key_limit: 20, window_ns: 1_000_000_000, ..Default::default() };
        Snapshot {
            read_at,
            counters: counters.iter().cloned().collect(),
            grants: grants.iter().cloned().collect(),
            rules: HashMap::from([(1, rule)]),
            heartbeat: AgentHeartbeat { granting_until_ns: 2_000 },
            now_ns: 1_000,
        }
    }

    #[test]
    fn rank_orders_by_offered_rate() {
        let start = Instant::now();
        let before = snapshot(start, &[(key(1), counters(100, 100)), (key(2), counters(0, 0))], &[]);
        let grant = Grant { passed_ceiling: 150, expires_ns: 5_000 };
        let after = snapshot(
            start + Duration::from_secs(2),
            &[(key(1), counters(700, 300)), (key(2), counters(50, 50)), (key(3), counters(0, 0))],
            &[(key(1), vec![grant, grant])],
        );
        let view = rank("eth1", &before, &after, 10);
        assert_eq!(view.keys_tracked, 3);
        assert_eq!(view.keys_active, 2, "a key without new packets is left out");
        assert_eq!(view.keys[0].key, "192.0.2.1/32");
        assert_eq!(view.keys[0].offered_per_second, 300.0);
        assert_eq!(view.keys[0].passed_per_second, 100.0);
        assert_eq!(view.keys[0].dropped_per_second, 200.0);
        assert_eq!(view.keys[0].state, "grant");
        assert_eq!(view.keys[0].grant_left, Some(150), "0 left on CPU 0 (passed 300), 150 on CPU 1");
        assert_eq!(view.keys[1].state, "new_key");
        assert_eq!(rank("eth1", &before, &after, 1).keys.len(), 1);
    }

    #[test]
    fn growth_restarts_for_recreated_key() {
        assert_eq!(growth(Some(&counters(100, 90)), &counters(130, 95)), (30, 5));
        assert_eq!(growth(Some(&counters(100, 90)), &counters(10, 10)), (10, 10));
        assert_eq!(growth(None, &counters(10, 4)), (10, 4));
    }
}
