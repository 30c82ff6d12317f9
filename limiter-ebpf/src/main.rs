//! XDP program that limits packets per source key.
//!
//! For each frame: parse up to the transport ports, check the source against the allow and
//! deny lists, find the most specific rule, and mask the source into the rule's key (and
//! into its inner key for a tiered rule). Each key admits the packet against its grant from
//! the agent, or against the rule's fallback limit when the grant is missing or expired.
//! Every verdict is counted once, under its reason, in `STATS`.

#![no_std]
#![no_main]

mod parse;

use aya_ebpf::{
    bindings::{BPF_F_NO_COMMON_LRU, BPF_NOEXIST, xdp_action},
    helpers::bpf_ktime_get_coarse_ns,
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, LruPerCpuHashMap, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use limiter_common::{
    ACL_ALLOW, ACL_DENY, AclIndex, AgentHeartbeat, DEFAULT_MAX_KEYS, FAMILY_IPV4, FlowKey, Grant, INNER_TIER_ID_BIT,
    IPPROTO_TCP, KeyCounter, MAX_ACL_ENTRIES, MAX_RULES, REASON_COUNT, Reason, Rule, RuleIndex, RuleMatch,
    STORE_DOWN_CLOSED, STORE_DOWN_OPEN, TCP_FLAG_ACK, TCP_FLAG_SYN, UNIT_BYTES,
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
/// other CPUs created recently, whether they are in use or not. A flood of spoofed sources
/// on one CPU then evicts a heavy source's key on another again and again, and each new
/// entry starts its windows afresh. With a list per CPU, a flood evicts only keys its
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

/// Allow and deny lists of IPv4 source CIDRs: `ACL_ALLOW` or `ACL_DENY` by prefix. The
/// longest listed prefix that contains the source decides. Written by `limiter allow` and
/// `limiter deny`.
#[map]
static ACL_V4: LpmTrie<[u8; 4], u32> = LpmTrie::pinned(MAX_ACL_ENTRIES, 0);

/// The same for IPv6 sources.
#[map]
static ACL_V6: LpmTrie<[u8; 16], u32> = LpmTrie::pinned(MAX_ACL_ENTRIES, 0);

/// Whether each ACL trie has entries, so packets skip the trie lookups while it is empty.
#[map]
static ACL_INDEX: Array<AclIndex> = Array::pinned(1, 0);

/// The agent's heartbeat: whether new keys can expect a grant soon.
#[map]
static AGENT: Array<AgentHeartbeat> = Array::pinned(1, 0);

/// Packets per verdict reason, indexed by `Reason`.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(REASON_COUNT, 0);

#[xdp]
pub fn limiter(ctx: XdpContext) -> u32 {
    let reason = match parse_packet(&ctx) {
        Ok(packet) => limit_packet(&packet, (ctx.data_end() - ctx.data()) as u64),
        Err(reason) => reason,
    };

    if let Some(count) = STATS.get_ptr_mut(reason as u32) {
        // SAFETY: `STATS` is per-CPU and XDP runs one program at a time on each CPU, so no
        // other writer touches this CPU's slot during the increment.
        unsafe { *count += 1 };
    }
    if reason.drops() { xdp_action::XDP_DROP } else { xdp_action::XDP_PASS }
}

/// Decides one parsed packet of `frame_len` bytes and returns the reason for its verdict.
///
/// Steps: the allow and deny lists, then the rule, then the key's counter and, for a tiered
/// rule, the inner key's. Each key is judged against its grant or fallback limit without
/// counting yet. The packet passes only if every key admits it, and only then is it counted
/// as passed in every key, so a packet one tier drops uses none of the other tier's allowance.
#[inline(always)]
fn limit_packet(packet: &Packet, frame_len: u64) -> Reason {
    if let Some(reason) = check_acl(packet) {
        return reason;
    }
    let Some(rule) = find_rule(packet) else {
        return Reason::NoRule;
    };
    let cost = if rule.unit == UNIT_BYTES { frame_len } else { 1 };

    let key = flow_key(rule.id, rule.ipv4_prefix_len, rule.ipv6_prefix_len, &rule, packet);
    let Some(counter) = find_or_insert_counter(&key) else {
        return Reason::Untracked;
    };
    // SAFETY: the value is this CPU's slot of a per-CPU map, and XDP runs one program at a
    // time on each CPU, so nothing else writes it while this reference lives.
    let counter = unsafe { &mut *counter };
    counter.offered += cost;

    // SAFETY: coarse monotonic time, no arguments; available to XDP since Linux 5.11.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let judgement = judge(counter, &key, &rule, rule.fallback_limit, rule.new_key_limit, now, cost);

    if rule.inner_tier == 0 {
        return settle(&rule, now, cost, (counter, judgement), None);
    }

    let inner_id = rule.id | INNER_TIER_ID_BIT;
    let inner_key = flow_key(inner_id, rule.inner_ipv4_prefix_len, rule.inner_ipv6_prefix_len, &rule, packet);
    let Some(inner_counter) = find_or_insert_counter(&inner_key) else {
        return Reason::Untracked;
    };
    // SAFETY: as for `counter`; the inner key's rule id has `INNER_TIER_ID_BIT` set, so it
    // is never the same entry as `counter`.
    let inner_counter = unsafe { &mut *inner_counter };
    inner_counter.offered += cost;
    let inner_judgement =
        judge(inner_counter, &inner_key, &rule, rule.inner_fallback_limit, rule.inner_new_key_limit, now, cost);
    settle(&rule, now, cost, (counter, judgement), Some((inner_counter, inner_judgement)))
}

/// What one key's grant or fallback limit decides about a packet, before it is counted.
#[derive(Clone, Copy)]
struct Judgement {
    admitted: bool,
    /// The verdict's reason if this key alone decided: `Passed` or `PassedStoreDown` when
    /// admitted, else why the key drops the packet.
    reason: Reason,
    /// Whether an admitted packet also counts in the key's fallback window, so an expired
    /// grant does not open a fresh window on top of what the grant already admitted.
    counts_window: bool,
}

impl Judgement {
    /// Judgement of a grant or window limit, which counts what it admits in the window.
    #[inline(always)]
    fn of_limit(admitted: bool, drop_reason: Reason) -> Self {
        let reason = if admitted { Reason::Passed } else { drop_reason };
        Judgement { admitted, reason, counts_window: true }
    }
}

/// Judges `cost` more units of the key against its grant, or, without a valid grant,
/// against `new_key_limit` or the rule's store-down policy with `fallback_limit`. Moves the
/// fallback window to `now` but counts nothing.
#[inline(always)]
fn judge(
    counter: &mut KeyCounter,
    key: &FlowKey,
    rule: &Rule,
    fallback_limit: u64,
    new_key_limit: u64,
    now: u64,
    cost: u64,
) -> Judgement {
    // SAFETY: `GRANTS` values are plain integers written whole by the agent. A torn read
    // during its update yields an old or new ceiling, both of which are valid grants.
    let grant = unsafe { GRANTS.get(key) }.copied();
    match grant {
        Some(grant) if now < grant.expires_ns => {
            // For packets (cost 1) this is `passed < passed_ceiling`.
            // NOTE: a frame larger than what this CPU's grant has left waits for a larger
            // grant, so a byte limit whose per-CPU share of a tick is below one frame
            // passes no such frames while grants are valid.
            let admitted = counter.passed.saturating_add(cost) <= grant.passed_ceiling;
            Judgement::of_limit(admitted, Reason::DroppedGlobalLimit)
        }
        // A key never granted, while the agent is granting, waits at most a tick for its
        // grant, so it passes a paced amount.
        None if agent_granting(now) => {
            let admitted = counter.fallback_window.admits(now, rule.window_ns, new_key_limit, cost);
            Judgement::of_limit(admitted, Reason::DroppedLocalLimit)
        }
        // An expired grant, or a silent agent, means the fleet is out of reach: the rule's
        // store-down policy applies.
        _ => match rule.store_down_policy {
            STORE_DOWN_OPEN => Judgement { admitted: true, reason: Reason::PassedStoreDown, counts_window: false },
            STORE_DOWN_CLOSED => Judgement { admitted: false, reason: Reason::DroppedStoreDown, counts_window: false },
            _ => {
                let admitted = counter.fallback_window.admits(now, rule.window_ns, fallback_limit, cost);
                Judgement::of_limit(admitted, Reason::DroppedLocalLimit)
            }
        },
    }
}

/// Turns the judgements of the key and of the inner key, if any, into the verdict. When all
/// admit the packet, counts it as passed in every key. Otherwise, under a shadow rule, the
/// packet passes and counts as a would-be drop in each key that refused it.
#[inline(always)]
fn settle(
    rule: &Rule,
    now: u64,
    cost: u64,
    outer: (&mut KeyCounter, Judgement),
    inner: Option<(&mut KeyCounter, Judgement)>,
) -> Reason {
    let (counter, judgement) = outer;
    let inner_admitted = match &inner {
        Some((_, inner_judgement)) => inner_judgement.admitted,
        None => true,
    };

    if judgement.admitted && inner_admitted {
        // `PassedStoreDown` when either key passed only under the store-down policy `open`.
        let mut reason = judgement.reason;
        count_passed(counter, &judgement, rule, now, cost);
        if let Some((inner_counter, inner_judgement)) = inner {
            count_passed(inner_counter, &inner_judgement, rule, now, cost);
            if inner_judgement.reason == Reason::PassedStoreDown {
                reason = Reason::PassedStoreDown;
            }
        }
        return reason;
    }

    // The outer key's reason comes first, because it limits the larger group of sources.
    let mut drop_reason = judgement.reason;
    if rule.shadow != 0 && !judgement.admitted {
        counter.would_drop += cost;
    }
    if let Some((inner_counter, inner_judgement)) = inner
        && !inner_judgement.admitted
    {
        if judgement.admitted {
            drop_reason = inner_judgement.reason;
        }
        if rule.shadow != 0 {
            inner_counter.would_drop += cost;
        }
    }
    if rule.shadow != 0 { Reason::PassedShadow } else { drop_reason }
}

/// Counts an admitted packet of `cost` units in the key's counter.
#[inline(always)]
fn count_passed(counter: &mut KeyCounter, judgement: &Judgement, rule: &Rule, now: u64, cost: u64) {
    if judgement.counts_window {
        counter.fallback_window.count_cost(now, rule.window_ns, cost);
    }
    counter.passed += cost;
}

/// Returns the reason for a source in the allow or deny list, or `None` for an unlisted
/// source, which goes on to the rules. Skips the trie of a family whose list is empty.
#[inline(always)]
fn check_acl(packet: &Packet) -> Option<Reason> {
    let index = ACL_INDEX.get(0)?;
    let action = if packet.family == FAMILY_IPV4 {
        if index.ipv4_listed == 0 {
            return None;
        }
        let addr = [packet.src_addr[0], packet.src_addr[1], packet.src_addr[2], packet.src_addr[3]];
        *ACL_V4.get(Key::new(32, addr))?
    } else {
        if index.ipv6_listed == 0 {
            return None;
        }
        *ACL_V6.get(Key::new(128, packet.src_addr))?
    };
    match action {
        ACL_ALLOW => Some(Reason::PassedAllowlist),
        ACL_DENY => Some(Reason::DroppedDenylist),
        _ => None,
    }
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
/// port), then (any protocol, any port). A TCP SYN without ACK first tries the SYN rules for
/// (TCP, port) and (TCP, any port).
#[inline(always)]
fn find_rule(packet: &Packet) -> Option<Rule> {
    // Without a valid index, every kind may exist.
    let (port_rules, protocol_rules, any_rules, syn_port_rules, syn_protocol_rules) = match RULE_INDEX.get(0) {
        Some(index) if index.valid != 0 => (
            index.port_rules != 0,
            index.protocol_rules != 0,
            index.any_rules != 0,
            index.syn_port_rules != 0,
            index.syn_protocol_rules != 0,
        ),
        _ => (true, true, true, true, true),
    };
    let syn = packet.protocol == IPPROTO_TCP && packet.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
    let candidates = [
        (syn && syn_port_rules && packet.dst_port != 0, RuleMatch::tcp_syn(packet.dst_port)),
        (syn && syn_protocol_rules, RuleMatch::tcp_syn(0)),
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

/// Builds a key of the rule: the source masked to the prefix length of its family, under
/// `rule_id`, plus the port when the rule keys by port. Every byte is set, so the agent's
/// keys compare equal.
#[inline(always)]
fn flow_key(rule_id: u32, ipv4_prefix_len: u8, ipv6_prefix_len: u8, rule: &Rule, packet: &Packet) -> FlowKey {
    let prefix_len = if packet.family == FAMILY_IPV4 { ipv4_prefix_len.min(32) } else { ipv6_prefix_len.min(128) };
    let mut key = FlowKey {
        rule_id,
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
    // A table lookup, not a branch per byte on the prefix length. Each such branch splits
    // the verifier's state by the length's range, once for every parse path, so Linux 6.1
    // gives up at its limit of one million instructions.
    let mask = &PREFIX_MASKS[(prefix_len as usize).min(128)];
    for (byte, mask) in addr.iter_mut().zip(mask) {
        *byte &= *mask;
    }
}

/// The mask of each prefix length from 0 to 128, as 16 bytes in network order.
static PREFIX_MASKS: [[u8; 16]; 129] = prefix_masks();

const fn prefix_masks() -> [[u8; 16]; 129] {
    let mut masks = [[0u8; 16]; 129];
    let mut prefix_len: usize = 0;
    while prefix_len <= 128 {
        let mut index = 0;
        while index < 16 {
            let kept_bits = prefix_len.saturating_sub(index * 8);
            masks[prefix_len][index] = if kept_bits >= 8 { 0xff } else { !(0xffu8 >> kept_bits) };
            index += 1;
        }
        prefix_len += 1;
    }
    masks
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
        // from zero, so it would pass a grant's worth again and again. The key starts over
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
