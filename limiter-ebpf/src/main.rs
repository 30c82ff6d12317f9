//! XDP program that limits packets per source key.
//!
//! For each frame: parse up to the transport ports, find the most specific rule, mask the
//! source into the rule's key, and admit the packet against the key's grant from the agent,
//! or against the rule's fallback limit when the grant is missing or expired. Every verdict is
//! counted once, under its reason, in `STATS`.

#![no_std]
#![no_main]

mod parse;

use aya_ebpf::{
    bindings::{BPF_F_NO_COMMON_LRU, BPF_NOEXIST, xdp_action},
    helpers::bpf_ktime_get_coarse_ns,
    macros::{map, xdp},
    maps::{Array, HashMap, LruPerCpuHashMap, PerCpuArray},
    programs::XdpContext,
};
use limiter_common::{
    AgentHeartbeat, DEFAULT_MAX_KEYS, FAMILY_IPV4, FlowKey, Grant, KeyCounter, MAX_RULES, REASON_COUNT,
    Reason, Rule, RuleIndex, RuleMatch, STORE_DOWN_CLOSED, STORE_DOWN_OPEN,
};
use parse::{Packet, parse_packet};

/// Rules by the traffic they select. Written by the agent or `limiter limit add`.
#[map]
static RULES: HashMap<RuleMatch, Rule> = HashMap::pinned(MAX_RULES, 0);

/// Per-CPU counters of each key. LRU, so a flood of new sources evicts the least recently
/// seen keys instead of failing inserts. The agent may resize it at load time.
///
/// Each CPU keeps its own LRU list (`BPF_F_NO_COMMON_LRU`), with an equal part of the
/// entries. With one common list, a CPU short of free entries takes them from the entries
/// other CPUs created recently, ignoring whether they are in use: a flood of spoofed
/// sources on one CPU then evicts a heavy source's key on another, over and over, and each
/// new entry starts its windows afresh. With a list per CPU, a flood evicts only keys its
/// own CPUs created and left unused the longest.
#[map]
static COUNTERS: LruPerCpuHashMap<FlowKey, KeyCounter> =
    LruPerCpuHashMap::pinned(DEFAULT_MAX_KEYS, BPF_F_NO_COMMON_LRU);

/// Per-CPU grants the agent computes from fleet-wide counts each tick.
#[map]
static GRANTS: LruPerCpuHashMap<FlowKey, Grant> = LruPerCpuHashMap::pinned(DEFAULT_MAX_KEYS, 0);

/// How many rules of each kind exist, so lookups that cannot hit are skipped.
#[map]
static RULE_INDEX: Array<RuleIndex> = Array::pinned(1, 0);

/// The agent's heartbeat: whether new keys can expect a grant soon.
#[map]
static AGENT: Array<AgentHeartbeat> = Array::pinned(1, 0);

/// Packets per verdict reason, indexed by `Reason`.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(REASON_COUNT, 0);

#[xdp]
pub fn limiter(ctx: XdpContext) -> u32 {
    let reason = match parse_packet(&ctx) {
        Ok(packet) => limit_packet(&packet),
        Err(reason) => reason,
    };

    if let Some(count) = STATS.get_ptr_mut(reason as u32) {
        // SAFETY: `STATS` is per-CPU and XDP runs one program at a time on each CPU, so no
        // other writer touches this CPU's slot during the increment.
        unsafe { *count += 1 };
    }
    if reason.drops() { xdp_action::XDP_DROP } else { xdp_action::XDP_PASS }
}

/// Decides one parsed packet and returns the reason for its verdict.
#[inline(always)]
fn limit_packet(packet: &Packet) -> Reason {
    let Some(rule) = find_rule(packet) else {
        return Reason::NoRule;
    };
    let key = flow_key(&rule, packet);
    let Some(counter) = find_or_insert_counter(&key) else {
        return Reason::Untracked;
    };
    // SAFETY: the value is this CPU's slot of a per-CPU map, and XDP runs one program at a
    // time on each CPU, so nothing else writes it while this reference lives.
    let counter = unsafe { &mut *counter };
    counter.offered += 1;

    // SAFETY: coarse monotonic time, no arguments; available to XDP since Linux 5.11.
    let now = unsafe { bpf_ktime_get_coarse_ns() };

    // SAFETY: `GRANTS` values are plain integers written whole by the agent. A torn read
    // during its update yields an old or new ceiling, both of which are valid grants.
    let grant = unsafe { GRANTS.get(&key) }.copied();
    let (admitted, drop_reason) = match grant {
        Some(grant) if now < grant.expires_ns => {
            let admitted = counter.passed < grant.passed_ceiling;
            if admitted {
                // Keep the fallback window current, so an expired grant does not open a
                // fresh window on top of what the grant already admitted.
                counter.fallback_window.count(now, rule.window_ns);
            }
            (admitted, Reason::DroppedGlobalLimit)
        }
        // A key never granted, while the agent is granting, waits at most a tick for its
        // grant, so it passes a paced amount.
        None if agent_granting(now) => {
            let admitted = counter.fallback_window.try_admit(now, rule.window_ns, rule.new_key_limit);
            (admitted, Reason::DroppedLocalLimit)
        }
        // An expired grant, or a silent agent, means the fleet is out of reach: the rule's
        // store-down policy applies.
        _ => match rule.store_down_policy {
            STORE_DOWN_OPEN => {
                counter.passed += 1;
                return Reason::PassedStoreDown;
            }
            STORE_DOWN_CLOSED => return Reason::DroppedStoreDown,
            _ => {
                let admitted = counter.fallback_window.try_admit(now, rule.window_ns, rule.fallback_limit);
                (admitted, Reason::DroppedLocalLimit)
            }
        },
    };

    if !admitted {
        return drop_reason;
    }
    counter.passed += 1;
    Reason::Passed
}

/// Returns true while the agent's last heartbeat promises grants for new keys.
#[inline(always)]
fn agent_granting(now: u64) -> bool {
    match AGENT.get(0) {
        Some(heartbeat) => now < heartbeat.granting_until_ns,
        None => false,
    }
}

/// Returns the most specific rule for the packet: (protocol, port), then (protocol, any
/// port), then (any protocol, any port).
#[inline(always)]
fn find_rule(packet: &Packet) -> Option<Rule> {
    // Without a valid index, every kind may exist.
    let (port_rules, protocol_rules, any_rules) = match RULE_INDEX.get(0) {
        Some(index) if index.valid != 0 => (index.port_rules != 0, index.protocol_rules != 0, index.any_rules != 0),
        _ => (true, true, true),
    };
    let candidates = [
        (port_rules && packet.dst_port != 0, RuleMatch::new(packet.protocol, packet.dst_port)),
        (protocol_rules, RuleMatch::new(packet.protocol, 0)),
        (any_rules, RuleMatch::new(0, 0)),
    ];
    for (may_exist, candidate) in candidates {
        if !may_exist {
            continue;
        }
        // SAFETY: rules are read-only to the program; a copy is taken at once.
        if let Some(rule) = unsafe { RULES.get(&candidate) } {
            return Some(*rule);
        }
    }
    None
}

/// Builds the key the rule limits: the source masked to the rule's prefix, plus the port
/// when the rule keys by port. Every byte is set, so the agent's keys compare equal.
#[inline(always)]
fn flow_key(rule: &Rule, packet: &Packet) -> FlowKey {
    let prefix_len = if packet.family == FAMILY_IPV4 {
        rule.ipv4_prefix_len.min(32)
    } else {
        rule.ipv6_prefix_len.min(128)
    };
    let mut key = FlowKey {
        rule_id: rule.id,
        dst_port: if rule.key_by_dst_port != 0 { packet.dst_port } else { 0 },
        family: packet.family,
        prefix_len,
        addr: packet.src_addr,
    };
    mask_address(&mut key.addr, prefix_len);
    key
}

/// Clears every bit of `addr` after the first `prefix_len`.
#[inline(always)]
fn mask_address(addr: &mut [u8; 16], prefix_len: u8) {
    for (index, byte) in addr.iter_mut().enumerate() {
        let kept_bits = (prefix_len as usize).saturating_sub(index * 8);
        if kept_bits < 8 {
            // `kept_bits` is below 8, so the shift neither overflows nor loses meaning.
            *byte &= !(0xffu8 >> kept_bits);
        }
    }
}

/// Returns this CPU's counter of `key`, creating the entry if it is new.
#[inline(always)]
fn find_or_insert_counter(key: &FlowKey) -> Option<*mut KeyCounter> {
    if let Some(counter) = COUNTERS.get_ptr_mut(key) {
        return Some(counter);
    }
    // BPF_NOEXIST, because another CPU may have created the entry meanwhile, and replacing
    // it would zero that CPU's counts. Either way the lookup below finds the entry.
    if COUNTERS.insert(key, &KeyCounter::default(), BPF_NOEXIST as u64).is_ok() {
        // The LRU map may have evicted an earlier entry of this key whose grant is still
        // there. That grant is a ceiling on the old counts, which the new entry restarts
        // from zero, so it would pass a grant's worth again and again; the key starts over
        // as a new one instead.
        let _ = GRANTS.remove(key);
    }
    COUNTERS.get_ptr_mut(key)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects programs that can reach a panic, so this is never loaded.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
