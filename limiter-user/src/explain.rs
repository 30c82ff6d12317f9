//! `limiter explain`: the rule, key, counts and verdict a packet would get now, read from
//! the pinned maps without writing to them.
//!
//! The verdict follows `limit_packet` in `limiter-ebpf/src/main.rs` step by step. First come
//! the allow and deny lists, then the most specific rule and the masked key (and inner key,
//! for a rule with an inner tier). Each key's grant, new-key pace or store-down policy
//! decides next, and last the rule's shadow mode.
//!
//! The program decides with the counters and grant of the CPU the packet arrives on. So the
//! verdict is worked out for every CPU, and the one shown first is the verdict on the CPU
//! where most of the key's packets arrived.

use std::fmt::Write as _;

use anyhow::{Context as _, bail};
use aya::maps::{MapError, lpm_trie::Key};
use limiter_common::{
    ACL_ALLOW, ACL_DENY, AgentHeartbeat, FAMILY_IPV4, FlowKey, Grant, INNER_TIER_ID_BIT, KeyCounter, Reason, Rule,
    RuleMatch, STORE_DOWN_CLOSED, STORE_DOWN_OPEN, UNIT_BYTES,
};
use serde::Serialize;

use crate::{
    batch::{POSSIBLE_CPUS_PATH, parse_cpu_list},
    datapath::Maps,
    packet::PacketFields,
    reconcile::{flow_key_field, monotonic_ns},
    rules::RuleSpec,
};

/// What decides a key's packets on one CPU at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// A grant from fleet-wide counts that has not expired: pass while `passed` is below its ceiling.
    Grant,
    /// No grant yet while the agent is granting: the rule's new-key pace applies until the next tick.
    NewKey,
    /// The grant expired or the agent is silent, under store-down policy `local`: the
    /// rule's fallback limit applies on this CPU.
    Fallback,
    /// As `Fallback`, under store-down policy `open`: pass.
    Open,
    /// As `Fallback`, under store-down policy `closed`: drop.
    Closed,
}

impl KeyState {
    pub fn name(self) -> &'static str {
        match self {
            KeyState::Grant => "grant",
            KeyState::NewKey => "new_key",
            KeyState::Fallback => "fallback",
            KeyState::Open => "open",
            KeyState::Closed => "closed",
        }
    }
}

/// Returns the state of a key on one CPU, from its grant on that CPU and the agent's heartbeat.
pub fn key_state(rule: &Rule, grant: Option<Grant>, heartbeat: AgentHeartbeat, now_ns: u64) -> KeyState {
    match grant {
        Some(grant) if now_ns < grant.expires_ns => KeyState::Grant,
        None if now_ns < heartbeat.granting_until_ns => KeyState::NewKey,
        _ => match rule.store_down_policy {
            STORE_DOWN_OPEN => KeyState::Open,
            STORE_DOWN_CLOSED => KeyState::Closed,
            _ => KeyState::Fallback,
        },
    }
}

/// Limits of one tier of a rule: the key's own, or its inner key's.
#[derive(Clone, Copy, Debug)]
pub struct TierLimits {
    pub fallback_limit: u64,
    pub new_key_limit: u64,
}

impl TierLimits {
    pub fn outer(rule: &Rule) -> Self {
        Self { fallback_limit: rule.fallback_limit, new_key_limit: rule.new_key_limit }
    }

    pub fn inner(rule: &Rule) -> Self {
        Self { fallback_limit: rule.inner_fallback_limit, new_key_limit: rule.inner_new_key_limit }
    }
}

/// What one key's grant or local limit decides about `cost` more units on one CPU, on a
/// copy of the counter, so nothing is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Judgement {
    pub state: KeyState,
    pub admitted: bool,
    /// `Passed` or `PassedStoreDown` when admitted, else the reason for the drop.
    pub reason: Reason,
}

/// Judges one key on one CPU, as the program's `judge` does.
pub fn judge(
    rule: &Rule,
    limits: TierLimits,
    counter: &KeyCounter,
    grant: Option<Grant>,
    heartbeat: AgentHeartbeat,
    now_ns: u64,
    cost: u64,
) -> Judgement {
    let state = key_state(rule, grant, heartbeat, now_ns);
    let mut window = counter.fallback_window;
    let (admitted, refused) = match state {
        KeyState::Grant => {
            let ceiling = grant.map_or(0, |grant| grant.passed_ceiling);
            (counter.passed.saturating_add(cost) <= ceiling, Reason::DroppedGlobalLimit)
        }
        KeyState::NewKey => (window.admits(now_ns, rule.window_ns, limits.new_key_limit, cost), Reason::DroppedLocalLimit),
        KeyState::Fallback => (window.admits(now_ns, rule.window_ns, limits.fallback_limit, cost), Reason::DroppedLocalLimit),
        KeyState::Open => (true, Reason::Passed),
        KeyState::Closed => (false, Reason::DroppedStoreDown),
    };
    let reason = match (admitted, state) {
        (true, KeyState::Open) => Reason::PassedStoreDown,
        (true, _) => Reason::Passed,
        (false, _) => refused,
    };
    Judgement { state, admitted, reason }
}

/// Turns the judgements of the key and of its inner key, if the rule has an inner tier,
/// into the reason the packet is counted under, as the program's `settle` does. The packet
/// passes when every key admits it. Otherwise the first key that rejected it names the drop,
/// unless the rule is a shadow rule, which passes what it would drop.
pub fn settle(rule: &Rule, outer: Judgement, inner: Option<Judgement>) -> Reason {
    let inner_admitted = inner.is_none_or(|inner| inner.admitted);
    if outer.admitted && inner_admitted {
        let store_down = outer.reason == Reason::PassedStoreDown
            || inner.is_some_and(|inner| inner.reason == Reason::PassedStoreDown);
        return if store_down { Reason::PassedStoreDown } else { Reason::Passed };
    }
    if rule.shadow != 0 {
        return Reason::PassedShadow;
    }
    match inner {
        Some(inner) if outer.admitted => inner.reason,
        _ => outer.reason,
    }
}

/// Builds a key of the rule, as the program's `flow_key` does: the source masked to the
/// prefix length of its family, under `rule_id`, plus the port when the rule keys by port.
pub fn flow_key(rule_id: u32, ipv4_prefix_len: u8, ipv6_prefix_len: u8, rule: &Rule, packet: &PacketFields) -> FlowKey {
    let family = packet.family();
    let prefix_len = if family == FAMILY_IPV4 { ipv4_prefix_len.min(32) } else { ipv6_prefix_len.min(128) };
    let mut addr = packet.src_bytes();
    for (index, byte) in addr.iter_mut().enumerate() {
        let kept_bits = usize::from(prefix_len).saturating_sub(index * 8);
        if kept_bits < 8 {
            *byte &= !(0xffu8 >> kept_bits);
        }
    }
    FlowKey {
        rule_id,
        dst_port: if rule.key_by_dst_port != 0 { packet.dst_port } else { 0 },
        family,
        prefix_len,
        addr,
    }
}

/// The rule a packet falls under.
#[derive(Clone, Debug, Serialize)]
pub struct RuleSummary {
    pub id: u32,
    /// The traffic the rule selects, such as `udp port 53`.
    pub traffic: String,
    /// Limit per key and window, fleet-wide, in `unit`.
    pub rate: u64,
    /// `packets` or `bytes`.
    pub unit: &'static str,
    pub window_ms: u64,
    pub fallback_limit: u64,
    pub new_key_limit: u64,
    /// Whether the rule only counts what it would drop.
    pub shadow: bool,
}

/// A key's state and the verdict on one CPU.
#[derive(Clone, Debug, Serialize)]
pub struct CpuVerdict {
    pub cpu: u32,
    /// The key's counts on this CPU since its counters were created, in the rule's unit.
    pub offered: u64,
    pub passed: u64,
    pub state: KeyState,
    /// Units the grant still allows on this CPU, while the grant is valid.
    pub grant_left: Option<u64>,
    /// Milliseconds until the grant expires, while it is valid.
    pub grant_expires_in_ms: Option<u64>,
    /// Sliding-window estimate of what the fallback window counted, now.
    pub fallback_estimate: u64,
    /// State of the inner key on this CPU, for a rule with an inner tier.
    pub inner_state: Option<KeyState>,
    pub verdict: &'static str,
    pub reason: &'static str,
}

/// Everything `limiter explain` reports.
#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    /// The packet, as a description `limiter explain` accepts.
    pub packet: Option<String>,
    /// `pass` or `drop`.
    pub verdict: &'static str,
    /// The name the packet would be counted under in `limiter stats`.
    pub reason: &'static str,
    pub rule: Option<RuleSummary>,
    /// The key, as the agent names it in Redis: masked source, prefix length, and the port
    /// when the rule keys by port.
    pub key: Option<String>,
    /// The inner key, for a rule with an inner tier.
    pub inner_key: Option<String>,
    /// False when the key has no counters yet, so its first packet creates them.
    pub key_exists: bool,
    /// CPU the verdict is for: the one where most of the key's packets arrived.
    pub cpu: Option<u32>,
    /// The key's counts on this gateway since its counters were created, in the rule's unit.
    pub offered: u64,
    pub passed: u64,
    pub cpus: Vec<CpuVerdict>,
}

fn action(reason: Reason) -> &'static str {
    if reason.drops() { "drop" } else { "pass" }
}

/// A key's per-CPU counters and grants as the program would find them.
struct KeyValues {
    counters: Vec<KeyCounter>,
    grants: Vec<Option<Grant>>,
    exists: bool,
}

/// Reads a key's counters and grants. A key without counters is new: its first packet
/// creates zeroed counters and removes any grant left from an earlier entry.
fn read_key(maps: &Maps, key: &FlowKey, cpus: usize) -> anyhow::Result<KeyValues> {
    let (counters, exists) = match maps.counters.get(key, 0) {
        Ok(values) => (values.to_vec(), true),
        Err(MapError::KeyNotFound) => (vec![KeyCounter::default(); cpus], false),
        Err(error) => return Err(error).context("failed to read the COUNTERS map"),
    };
    let grants = match maps.grants.get(key, 0) {
        Ok(values) if exists => values.iter().copied().map(Some).collect(),
        Ok(_) | Err(MapError::KeyNotFound) => vec![None; counters.len()],
        Err(error) => return Err(error).context("failed to read the GRANTS map"),
    };
    Ok(KeyValues { counters, grants, exists })
}

/// Works out the verdict for `packet`, or for a frame the program stops parsing with `Err(reason)`.
pub fn explain(maps: &Maps, packet: Result<PacketFields, Reason>) -> anyhow::Result<Explanation> {
    let unmatched = |packet: Option<String>, reason: Reason| Explanation {
        packet,
        verdict: action(reason),
        reason: reason.name(),
        rule: None,
        key: None,
        inner_key: None,
        key_exists: false,
        cpu: None,
        offered: 0,
        passed: 0,
        cpus: Vec::new(),
    };

    // Step 1: frames the program does not parse to the end get their parser's verdict, and
    // listed sources the list's.
    let packet = match packet {
        Ok(packet) => packet,
        Err(reason) => return Ok(unmatched(None, reason)),
    };
    let description = Some(packet.describe());
    if let Some(reason) = check_acl(maps, &packet)? {
        return Ok(unmatched(description, reason));
    }

    // Step 2: the most specific rule, as the program looks it up.
    let Some((rule_match, rule)) = find_rule(maps, &packet)? else {
        return Ok(unmatched(description, Reason::NoRule));
    };
    let summary = RuleSummary {
        id: rule.id,
        traffic: RuleSpec::from_rule(&rule_match, &rule).describe_match(),
        rate: rule.limit,
        unit: if rule.unit == UNIT_BYTES { "bytes" } else { "packets" },
        window_ms: rule.window_ns / 1_000_000,
        fallback_limit: rule.fallback_limit,
        new_key_limit: rule.new_key_limit,
        shadow: rule.shadow != 0,
    };
    let cost = if rule.unit == UNIT_BYTES { packet.frame_len } else { 1 };

    // Step 3: the key's per-CPU counters and grants, and the inner key's.
    let cpu_ids = possible_cpu_ids()?;
    let key = flow_key(rule.id, rule.ipv4_prefix_len, rule.ipv6_prefix_len, &rule, &packet);
    let outer = read_key(maps, &key, cpu_ids.len())?;
    let inner_key = (rule.inner_tier != 0).then(|| {
        flow_key(rule.id | INNER_TIER_ID_BIT, rule.inner_ipv4_prefix_len, rule.inner_ipv6_prefix_len, &rule, &packet)
    });
    let inner = match &inner_key {
        Some(inner_key) => Some(read_key(maps, inner_key, cpu_ids.len())?),
        None => None,
    };
    let heartbeat = maps.agent.get(&0, 0).context("failed to read the AGENT map")?;
    let now = monotonic_ns();

    // Step 4: the verdict on each CPU, and the CPU where most of the key's packets arrived.
    let mut cpus = Vec::with_capacity(outer.counters.len());
    for (slot, (counter, grant)) in outer.counters.iter().zip(&outer.grants).enumerate() {
        let judgement = judge(&rule, TierLimits::outer(&rule), counter, *grant, heartbeat, now, cost);
        let inner_judgement = inner.as_ref().map(|inner| {
            let counter = inner.counters.get(slot).copied().unwrap_or_default();
            let grant = inner.grants.get(slot).copied().flatten();
            judge(&rule, TierLimits::inner(&rule), &counter, grant, heartbeat, now, cost)
        });
        let reason = settle(&rule, judgement, inner_judgement);
        let valid_grant = grant.filter(|_| judgement.state == KeyState::Grant);
        cpus.push(CpuVerdict {
            cpu: cpu_ids.get(slot).copied().unwrap_or(slot as u32),
            offered: counter.offered,
            passed: counter.passed,
            state: judgement.state,
            grant_left: valid_grant.map(|grant| grant.passed_ceiling.saturating_sub(counter.passed)),
            grant_expires_in_ms: valid_grant.map(|grant| grant.expires_ns.saturating_sub(now) / 1_000_000),
            fallback_estimate: counter.fallback_window.estimate_at(now, rule.window_ns),
            inner_state: inner_judgement.map(|judgement| judgement.state),
            verdict: action(reason),
            reason: reason.name(),
        });
    }
    let busiest = cpus.iter().enumerate().max_by_key(|(slot, cpu)| (cpu.offered, std::cmp::Reverse(*slot))).map(|(slot, _)| slot);
    let Some(busiest) = busiest else {
        bail!("the COUNTERS map returned no per-CPU values for key {}", flow_key_field(&key));
    };
    Ok(Explanation {
        packet: description,
        verdict: cpus[busiest].verdict,
        reason: cpus[busiest].reason,
        rule: Some(summary),
        key: Some(flow_key_field(&key)),
        inner_key: inner_key.as_ref().map(flow_key_field),
        key_exists: outer.exists,
        cpu: Some(cpus[busiest].cpu),
        offered: cpus.iter().map(|cpu| cpu.offered).sum(),
        passed: cpus.iter().map(|cpu| cpu.passed).sum(),
        cpus,
    })
}

/// Returns the reason for a source in the allow or deny list, or `None` for an unlisted
/// source, as the program's `check_acl` does.
fn check_acl(maps: &Maps, packet: &PacketFields) -> anyhow::Result<Option<Reason>> {
    let index = maps.acl_index.get(&0, 0).context("failed to read the ACL_INDEX map")?;
    let source = packet.src_bytes();
    let found = if packet.family() == FAMILY_IPV4 {
        if index.ipv4_listed == 0 {
            return Ok(None);
        }
        maps.acl_v4.get(&Key::new(32, [source[0], source[1], source[2], source[3]]), 0)
    } else {
        if index.ipv6_listed == 0 {
            return Ok(None);
        }
        maps.acl_v6.get(&Key::new(128, source), 0)
    };
    match found {
        Ok(ACL_ALLOW) => Ok(Some(Reason::PassedAllowlist)),
        Ok(ACL_DENY) => Ok(Some(Reason::DroppedDenylist)),
        Ok(_) | Err(MapError::KeyNotFound) => Ok(None),
        Err(error) => Err(error).context("failed to read the allow and deny lists"),
    }
}

/// Returns the most specific rule. A TCP SYN without ACK looks up the SYN rules for (TCP,
/// port) and (TCP, any port) first. Every packet then looks up (protocol, port), (protocol,
/// any port) and any.
fn find_rule(maps: &Maps, packet: &PacketFields) -> anyhow::Result<Option<(RuleMatch, Rule)>> {
    let syn = packet.is_syn();
    let candidates = [
        (syn && packet.dst_port != 0, RuleMatch::tcp_syn(packet.dst_port)),
        (syn, RuleMatch::tcp_syn(0)),
        (packet.dst_port != 0, RuleMatch::new(packet.protocol, packet.dst_port)),
        (true, RuleMatch::new(packet.protocol, 0)),
        (true, RuleMatch::new(0, 0)),
    ];
    for (may_exist, candidate) in candidates {
        if !may_exist {
            continue;
        }
        match maps.rules.get(&candidate, 0) {
            Ok(rule) => return Ok(Some((candidate, rule))),
            Err(MapError::KeyNotFound) => {}
            Err(error) => return Err(error).context("failed to read the RULES map"),
        }
    }
    Ok(None)
}

/// Returns the CPU numbers of the per-CPU slots, in slot order.
fn possible_cpu_ids() -> anyhow::Result<Vec<u32>> {
    let text = std::fs::read_to_string(POSSIBLE_CPUS_PATH).with_context(|| format!("failed to read {POSSIBLE_CPUS_PATH}"))?;
    parse_cpu_list(&text).map_err(|error| anyhow::anyhow!("{POSSIBLE_CPUS_PATH}: {error}"))
}

/// Says in words why a packet gets `reason`.
fn reason_text(reason: &str) -> &'static str {
    match reason {
        "passed" => "within the key's grant or local limit",
        "no_rule" => "no rule selects this traffic",
        "not_ip" => "not an IPv4 or IPv6 frame",
        "dropped_local_limit" => "over the new-key or fallback limit while the key has no valid grant",
        "dropped_global_limit" => "over the grant computed from fleet-wide counts",
        "malformed" => "a header is cut short or inconsistent",
        "vlan_too_deep" => "more than two VLAN tags",
        "ipv6_chain_too_long" => "more than six IPv6 extension headers",
        "passed_store_down" => "no valid grant while the fleet is out of reach, under --store-down open",
        "dropped_store_down" => "no valid grant while the fleet is out of reach, under --store-down closed",
        "untracked" => "the counter map is full",
        "passed_allowlist" => "the source is in the allow list",
        "dropped_denylist" => "the source is in the deny list",
        "passed_shadow" => "the rule would drop it, but only counts in shadow mode",
        _ => "",
    }
}

/// Formats an explanation for a terminal.
pub fn format_explanation(explanation: &Explanation) -> String {
    let mut text = String::new();
    if let Some(packet) = &explanation.packet {
        let _ = writeln!(text, "packet:   {packet}");
    }
    if let Some(rule) = &explanation.rule {
        let shadow = if rule.shadow { ", shadow mode" } else { "" };
        let _ = writeln!(
            text,
            "rule:     {} ({}), {} {} per {} ms per key; fallback {}, new keys {} per CPU{shadow}",
            rule.id, rule.traffic, rule.rate, rule.unit, rule.window_ms, rule.fallback_limit, rule.new_key_limit
        );
    }
    if let Some(key) = &explanation.key {
        let existence = if explanation.key_exists { "" } else { " (new: no counters yet)" };
        let _ = writeln!(text, "key:      {key}{existence}");
        if let Some(inner_key) = &explanation.inner_key {
            let _ = writeln!(text, "inner:    {inner_key}");
        }
        let _ = writeln!(
            text,
            "counts:   {} offered, {} passed on this gateway since the key's counters were created",
            explanation.offered, explanation.passed
        );
    }
    let cpu = explanation.cpu.map(|cpu| format!(" on CPU {cpu}, where most of the key's packets arrived")).unwrap_or_default();
    let _ = writeln!(
        text,
        "verdict:  {} ({}): {}{cpu}",
        explanation.verdict,
        explanation.reason,
        reason_text(explanation.reason)
    );
    if !explanation.cpus.is_empty() {
        let _ = writeln!(
            text,
            "\n{:>4}  {:<9} {:>12} {:>12} {:>10} {:>11} {:>9}  verdict",
            "cpu", "state", "offered", "passed", "grant-left", "expires-ms", "fallback"
        );
        for cpu in &explanation.cpus {
            let optional = |value: Option<u64>| value.map_or_else(|| "-".to_owned(), |value| value.to_string());
            let _ = writeln!(
                text,
                "{:>4}  {:<9} {:>12} {:>12} {:>10} {:>11} {:>9}  {} ({})",
                cpu.cpu,
                cpu.state.name(),
                cpu.offered,
                cpu.passed,
                optional(cpu.grant_left),
                optional(cpu.grant_expires_in_ms),
                cpu.fallback_estimate,
                cpu.verdict,
                cpu.reason
            );
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use limiter_common::{SlidingWindow, STORE_DOWN_LOCAL};

    const SECOND: u64 = 1_000_000_000;
    const NOW: u64 = 1_000 * SECOND + SECOND / 2;

    fn rule(store_down_policy: u8) -> Rule {
        Rule {
            id: 7,
            ipv4_prefix_len: 24,
            ipv6_prefix_len: 64,
            key_by_dst_port: 0,
            store_down_policy,
            limit: 100,
            fallback_limit: 50,
            new_key_limit: 20,
            window_ns: SECOND,
            ..Default::default()
        }
    }

    fn granting() -> AgentHeartbeat {
        AgentHeartbeat { granting_until_ns: NOW + SECOND }
    }

    /// Returns the state and reason for one packet of a rule without an inner tier.
    fn decide(rule: &Rule, counter: &KeyCounter, grant: Option<Grant>, heartbeat: AgentHeartbeat, now: u64) -> (KeyState, Reason) {
        let judgement = judge(rule, TierLimits::outer(rule), counter, grant, heartbeat, now, 1);
        (judgement.state, settle(rule, judgement, None))
    }

    #[test]
    fn decide_follows_the_grant() {
        let counter = KeyCounter { offered: 30, passed: 10, ..Default::default() };
        let open = Grant { passed_ceiling: 11, expires_ns: NOW + 1 };
        assert_eq!(decide(&rule(STORE_DOWN_LOCAL), &counter, Some(open), granting(), NOW), (KeyState::Grant, Reason::Passed));
        let spent = Grant { passed_ceiling: 10, expires_ns: NOW + 1 };
        assert_eq!(
            decide(&rule(STORE_DOWN_LOCAL), &counter, Some(spent), granting(), NOW),
            (KeyState::Grant, Reason::DroppedGlobalLimit)
        );
    }

    #[test]
    fn decide_new_key_is_paced() {
        let fresh = KeyCounter::default();
        assert_eq!(decide(&rule(STORE_DOWN_LOCAL), &fresh, None, granting(), NOW), (KeyState::NewKey, Reason::Passed));
        let window = SlidingWindow { window_id: NOW / SECOND, current: 20, previous: 0 };
        let paced = KeyCounter { offered: 40, passed: 20, fallback_window: window, ..Default::default() };
        assert_eq!(
            decide(&rule(STORE_DOWN_LOCAL), &paced, None, granting(), NOW),
            (KeyState::NewKey, Reason::DroppedLocalLimit)
        );
    }

    #[test]
    fn decide_expired_grant_uses_store_down_policy() {
        let counter = KeyCounter::default();
        let expired = Some(Grant { passed_ceiling: 1000, expires_ns: NOW });
        let silent = AgentHeartbeat::default();
        assert_eq!(decide(&rule(STORE_DOWN_LOCAL), &counter, expired, granting(), NOW), (KeyState::Fallback, Reason::Passed));
        assert_eq!(decide(&rule(STORE_DOWN_OPEN), &counter, None, silent, NOW), (KeyState::Open, Reason::PassedStoreDown));
        assert_eq!(decide(&rule(STORE_DOWN_CLOSED), &counter, expired, silent, NOW), (KeyState::Closed, Reason::DroppedStoreDown));
        let window = SlidingWindow { window_id: NOW / SECOND, current: 50, previous: 0 };
        let full = KeyCounter { fallback_window: window, ..Default::default() };
        assert_eq!(decide(&rule(STORE_DOWN_LOCAL), &full, None, silent, NOW), (KeyState::Fallback, Reason::DroppedLocalLimit));
    }

    #[test]
    fn judge_charges_bytes_against_ceiling() {
        let bytes_rule = Rule { unit: UNIT_BYTES, ..rule(STORE_DOWN_LOCAL) };
        let counter = KeyCounter { offered: 2000, passed: 900, ..Default::default() };
        let grant = Some(Grant { passed_ceiling: 1000, expires_ns: NOW + 1 });
        let fits = judge(&bytes_rule, TierLimits::outer(&bytes_rule), &counter, grant, granting(), NOW, 100);
        assert!(fits.admitted);
        let too_big = judge(&bytes_rule, TierLimits::outer(&bytes_rule), &counter, grant, granting(), NOW, 101);
        assert_eq!((too_big.admitted, too_big.reason), (false, Reason::DroppedGlobalLimit));
    }

    #[test]
    fn settle_shadow_and_inner_tier() {
        let rejected = Judgement { state: KeyState::Grant, admitted: false, reason: Reason::DroppedGlobalLimit };
        let admitted = Judgement { state: KeyState::Grant, admitted: true, reason: Reason::Passed };
        let inner_rejected = Judgement { state: KeyState::NewKey, admitted: false, reason: Reason::DroppedLocalLimit };
        let inner_open = Judgement { state: KeyState::Open, admitted: true, reason: Reason::PassedStoreDown };
        let plain = rule(STORE_DOWN_LOCAL);
        let shadow = Rule { shadow: 1, ..plain };

        assert_eq!(settle(&shadow, rejected, None), Reason::PassedShadow);
        assert_eq!(settle(&shadow, admitted, None), Reason::Passed);
        assert_eq!(settle(&plain, admitted, Some(inner_rejected)), Reason::DroppedLocalLimit, "the inner key refused");
        assert_eq!(settle(&plain, rejected, Some(inner_rejected)), Reason::DroppedGlobalLimit, "the outer key names the drop");
        assert_eq!(settle(&shadow, admitted, Some(inner_rejected)), Reason::PassedShadow);
        assert_eq!(settle(&plain, admitted, Some(inner_open)), Reason::PassedStoreDown);
    }

    #[test]
    fn flow_key_masks_to_rule_prefix() {
        let packet = crate::packet::parse_description("udp 192.0.2.77:5353 -> 198.51.100.7:53").unwrap();
        let key = flow_key(7, 24, 64, &rule(STORE_DOWN_LOCAL), &packet);
        assert_eq!((key.rule_id, key.family, key.prefix_len, key.dst_port), (7, FAMILY_IPV4, 24, 0));
        assert_eq!(&key.addr[..4], &[192, 0, 2, 0]);
        assert_eq!(flow_key_field(&key), "192.0.2.0/24");

        let per_port = Rule { key_by_dst_port: 1, ipv6_prefix_len: 60, ..rule(STORE_DOWN_LOCAL) };
        let packet = crate::packet::parse_description("tcp [2001:db8:1:ffff::1]:1000 -> [2001:db8::2]:443").unwrap();
        assert_eq!(flow_key_field(&flow_key(7, 24, 60, &per_port, &packet)), "2001:db8:1:fff0::/60:443");
    }
}
