//! Definitions shared by the XDP program (`limiter-ebpf`) and the agent (`limiter-user`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding fields, so both sides agree on
//! the bytes: the kernel hashes map keys byte by byte, and a key with uninitialized padding
//! would never be found again. The `user` feature adds the `aya::Pod` and `bytemuck` impls the
//! agent needs; the XDP program builds this crate without it.

#![no_std]

pub mod window;

#[cfg(feature = "user")]
pub mod allowance;

/// Names of the maps in the XDP object. The agent opens and pins them by these names.
pub mod map_names {
    pub const RULES: &str = "RULES";
    pub const COUNTERS: &str = "COUNTERS";
    pub const GRANTS: &str = "GRANTS";
    pub const STATS: &str = "STATS";
    pub const AGENT: &str = "AGENT";
    pub const RULE_INDEX: &str = "RULE_INDEX";
    pub const ACL_V4: &str = "ACL_V4";
    pub const ACL_V6: &str = "ACL_V6";
    pub const ACL_INDEX: &str = "ACL_INDEX";
}

/// Maximum number of rules the `RULES` map holds.
pub const MAX_RULES: u32 = 256;

/// Maximum number of CIDRs each of the `ACL_V4` and `ACL_V6` tries holds.
pub const MAX_ACL_ENTRIES: u32 = 16_384;

/// Value of an `ACL_V4` or `ACL_V6` entry: pass the source's packets before any rule,
/// counted as `PassedAllowlist`.
pub const ACL_ALLOW: u32 = 1;
/// Value of an `ACL_V4` or `ACL_V6` entry: drop the source's packets before any rule,
/// counted as `DroppedDenylist`.
pub const ACL_DENY: u32 = 2;

/// Default number of keys tracked per gateway; the agent can set another size at load time.
pub const DEFAULT_MAX_KEYS: u32 = 65_536;

/// VLAN tags parsed before a frame counts as `VlanTooDeep`: 802.1Q plus one 802.1ad outer tag.
pub const MAX_VLAN_TAGS: usize = 2;

/// IPv6 extension headers walked before a packet counts as `Ipv6ChainTooLong`.
pub const MAX_IPV6_EXTENSION_HEADERS: usize = 6;

/// Shortest and longest window a rule may have. The upper bound keeps the fixed-point window
/// weight in [`window`] from overflowing 64 bits.
pub const MIN_WINDOW_NS: u64 = 10_000_000;
pub const MAX_WINDOW_NS: u64 = 3_600_000_000_000;

/// IP protocol numbers the parser understands.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Store-down policy: enforce `Rule::fallback_limit` on this gateway alone.
pub const STORE_DOWN_LOCAL: u8 = 0;
/// Store-down policy: pass every packet, counted as `PassedStoreDown`.
pub const STORE_DOWN_OPEN: u8 = 1;
/// Store-down policy: drop every packet, counted as `DroppedStoreDown`.
pub const STORE_DOWN_CLOSED: u8 = 2;

/// Values of [`Rule::unit`]: what `limit`, `offered`, `passed` and grants count.
pub const UNIT_PACKETS: u8 = 0;
/// Frame bytes, from the start of the Ethernet header to the end of the frame.
pub const UNIT_BYTES: u8 = 1;

/// Bit set in the rule id of an inner tier's keys, so they are keys of a rule of their own
/// for the agent: their own limit, Redis keys and grants. Rule ids stay below it.
pub const INNER_TIER_ID_BIT: u32 = 1 << 31;

/// TCP flags, in the 14th byte of the TCP header.
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_ACK: u8 = 0x10;

/// Values of [`FlowKey::family`].
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// Traffic a rule applies to: an IP protocol and a destination port, where 0 means any,
/// and for TCP optionally only connection requests (SYN without ACK).
///
/// The XDP program looks up (protocol, port), then (protocol, any port), then (any, any), so
/// the most specific rule wins. For a TCP SYN without ACK it first looks up the two
/// `tcp_syn` rules, (TCP, port) and (TCP, any port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RuleMatch {
    /// IP protocol number, 0 for any protocol.
    pub protocol: u8,
    /// 1 when the rule selects only TCP segments with SYN set and ACK clear, else 0.
    pub tcp_syn: u8,
    /// Destination port in host byte order, 0 for any port.
    pub dst_port: u16,
}

impl RuleMatch {
    pub const fn new(protocol: u8, dst_port: u16) -> Self {
        Self { protocol, tcp_syn: 0, dst_port }
    }

    /// Selects TCP SYN segments without ACK to `dst_port`, or to any port for 0.
    pub const fn tcp_syn(dst_port: u16) -> Self {
        Self { protocol: IPPROTO_TCP, tcp_syn: 1, dst_port }
    }
}

/// A limit on each source key of the traffic one [`RuleMatch`] selects.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Rule {
    /// Identifier the agent assigns; part of every [`FlowKey`] of this rule.
    pub id: u32,
    /// Prefix length an IPv4 source is masked to (0..=32).
    pub ipv4_prefix_len: u8,
    /// Prefix length an IPv6 source is masked to (0..=128).
    pub ipv6_prefix_len: u8,
    /// 1 when each destination port of a source is limited separately, else 0.
    pub key_by_dst_port: u8,
    /// Store-down policy for keys without a valid grant while the fleet is out of reach:
    /// one of the `STORE_DOWN_*` values.
    pub store_down_policy: u8,
    /// Packets each key may pass per window, fleet-wide.
    pub limit: u64,
    /// Packets each key may pass per window on this gateway while it has no valid grant
    /// from the agent: the limit divided by the number of gateways last seen.
    pub fallback_limit: u64,
    /// Packets a key never granted yet may pass per window on each CPU while the agent is
    /// alive: about two ticks' worth of this gateway's part of the limit. A new key gets
    /// its first grant within a tick, and passing the whole fallback limit before that would
    /// let a flood's first window overshoot on every gateway at once.
    pub new_key_limit: u64,
    /// Window length in nanoseconds, within [`MIN_WINDOW_NS`, `MAX_WINDOW_NS`].
    pub window_ns: u64,
    /// [`UNIT_PACKETS`] or [`UNIT_BYTES`]: what the limits and the keys' counters count.
    pub unit: u8,
    /// 1 when the rule only counts: a packet it would drop passes, counted as `PassedShadow`
    /// and in the key's `KeyCounter::would_drop`.
    pub shadow: u8,
    /// 1 when each key also has inner keys with longer prefixes, limited by the `inner_*`
    /// fields. A packet passes only when both its key and its inner key admit it.
    pub inner_tier: u8,
    /// Prefix length an IPv4 source is masked to for the inner key (0..=32).
    pub inner_ipv4_prefix_len: u8,
    /// Prefix length an IPv6 source is masked to for the inner key (0..=128).
    pub inner_ipv6_prefix_len: u8,
    pub _padding: [u8; 3],
    /// `limit`, `fallback_limit` and `new_key_limit` of the inner keys.
    pub inner_limit: u64,
    pub inner_fallback_limit: u64,
    pub inner_new_key_limit: u64,
}

impl Rule {
    /// Returns the rule the agent reconciles the inner keys under: id
    /// `id | INNER_TIER_ID_BIT`, with the inner prefixes and limits.
    pub const fn inner_tier_rule(&self) -> Rule {
        Rule {
            id: self.id | INNER_TIER_ID_BIT,
            ipv4_prefix_len: self.inner_ipv4_prefix_len,
            ipv6_prefix_len: self.inner_ipv6_prefix_len,
            limit: self.inner_limit,
            fallback_limit: self.inner_fallback_limit,
            new_key_limit: self.inner_new_key_limit,
            inner_tier: 0,
            inner_ipv4_prefix_len: 0,
            inner_ipv6_prefix_len: 0,
            inner_limit: 0,
            inner_fallback_limit: 0,
            inner_new_key_limit: 0,
            ..*self
        }
    }
}

/// The unit a rule limits: one masked source address, plus the destination port for rules keyed by port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FlowKey {
    pub rule_id: u32,
    /// Destination port in host byte order when the rule keys by port, else 0.
    pub dst_port: u16,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    pub prefix_len: u8,
    /// Source address in network byte order, masked to `prefix_len`. An IPv4 address fills
    /// the first 4 bytes and the rest stays zero.
    pub addr: [u8; 16],
}

/// A sliding-window counter: packets counted in the current and the previous window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SlidingWindow {
    /// Index of the current window: time divided by the window length.
    pub window_id: u64,
    pub current: u64,
    pub previous: u64,
}

/// How many rules of each kind `RULES` has, the single entry of the `RULE_INDEX` array. The
/// program skips the lookups that cannot find a rule: a packet under a rule for all traffic
/// would otherwise miss two hash lookups first.
///
/// Writers keep it an over-count while rules change (raised before a rule is added, lowered
/// after one is removed), so a lookup is never skipped for a rule that exists.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RuleIndex {
    /// Rules for a protocol and a destination port.
    pub port_rules: u32,
    /// Rules for a protocol and any port.
    pub protocol_rules: u32,
    /// Rules for any traffic (0 or 1).
    pub any_rules: u32,
    /// 1 once a writer that maintains the index has written it. While 0, as in maps written
    /// by other tools, the program does every lookup.
    pub valid: u32,
    /// Rules for TCP SYN without ACK to one destination port.
    pub syn_port_rules: u32,
    /// Rules for TCP SYN without ACK to any port (0 or 1).
    pub syn_protocol_rules: u32,
}

/// Whether the `ACL_V4` and `ACL_V6` tries have entries, the single entry of the
/// `ACL_INDEX` array, so packets skip the trie lookups while the lists are empty.
///
/// Writers set a family's flag before they insert its first CIDR and clear it only after
/// they removed its last one, so a lookup is never skipped for a CIDR that is listed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct AclIndex {
    /// 1 while `ACL_V4` may have entries, else 0.
    pub ipv4_listed: u32,
    /// 1 while `ACL_V6` may have entries, else 0.
    pub ipv6_listed: u32,
}

/// Liveness of the agent, the single entry of the `AGENT` array, written every tick while
/// the agent reaches Redis.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct AgentHeartbeat {
    /// `CLOCK_MONOTONIC` time in nanoseconds until which new keys are expected to receive a
    /// grant soon, and so are held to `Rule::new_key_limit` instead of the fallback limit.
    pub granting_until_ns: u64,
}

/// Per-CPU state of one key in `COUNTERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct KeyCounter {
    /// Packets of this key seen on this CPU since the entry was created. Only grows, so the
    /// agent takes deltas between ticks without resetting anything.
    pub offered: u64,
    /// Packets of this key passed on this CPU since the entry was created. Under a shadow
    /// rule, the packets that would have passed.
    pub passed: u64,
    /// Window this CPU enforces on its own while the key has no valid grant.
    pub fallback_window: SlidingWindow,
    /// Packets this key would have dropped on this CPU under a shadow rule, since the entry
    /// was created. Like `offered` and `passed`, in bytes for a rule that counts bytes.
    pub would_drop: u64,
}

/// Per-CPU admission grant of one key in `GRANTS`, written by the agent every tick.
///
/// The CPU may pass packets while its `KeyCounter::passed` is below `passed_ceiling`. Stating
/// the grant as a ceiling on a counter that only grows, rather than as a fresh allowance,
/// means packets passed between the agent's read and its write are not passed twice.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Grant {
    pub passed_ceiling: u64,
    /// `CLOCK_MONOTONIC` time in nanoseconds after which the grant no longer counts and the
    /// CPU falls back to the rule's `fallback_limit`.
    pub expires_ns: u64,
}

/// Reason for a verdict of the program. Each packet is counted once, under one reason, in
/// the per-CPU `STATS` array indexed by this value.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Within its grant or fallback limit: `XDP_PASS`.
    Passed = 0,
    /// IP traffic that no rule selects: `XDP_PASS`.
    NoRule = 1,
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): `XDP_PASS`.
    NotIp = 2,
    /// Over the rule's fallback or new-key limit while the key has no valid grant: `XDP_DROP`.
    DroppedLocalLimit = 3,
    /// Over the grant the agent computed from fleet-wide counts: `XDP_DROP`.
    DroppedGlobalLimit = 4,
    /// A header is cut short or inconsistent (IHL below 5, total length below the header):
    /// `XDP_DROP`, because the kernel would discard the packet anyway.
    Malformed = 5,
    /// More than [`MAX_VLAN_TAGS`] VLAN tags: `XDP_DROP`.
    VlanTooDeep = 6,
    /// More than [`MAX_IPV6_EXTENSION_HEADERS`] extension headers: `XDP_DROP`.
    Ipv6ChainTooLong = 7,
    /// The `COUNTERS` map rejected a new key: `XDP_PASS`, counted so the operator can see
    /// traffic that went unlimited and grow the map.
    Untracked = 8,
    /// No valid grant while the fleet is out of reach, under a rule whose store-down policy
    /// is `open`: `XDP_PASS`.
    PassedStoreDown = 9,
    /// No valid grant while the fleet is out of reach, under a rule whose store-down policy
    /// is `closed`: `XDP_DROP`.
    DroppedStoreDown = 10,
    /// The source is in an allowlisted CIDR, checked before any rule: `XDP_PASS`.
    PassedAllowlist = 11,
    /// The source is in a denylisted CIDR, checked before any rule: `XDP_DROP`.
    DroppedDenylist = 12,
    /// A shadow rule would have dropped the packet: `XDP_PASS`, also counted in the key's
    /// `KeyCounter::would_drop`.
    PassedShadow = 13,
}

/// Number of [`Reason`] values, and so the size of the `STATS` array.
pub const REASON_COUNT: u32 = 14;

impl Reason {
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Reason::Passed,
        Reason::NoRule,
        Reason::NotIp,
        Reason::DroppedLocalLimit,
        Reason::DroppedGlobalLimit,
        Reason::Malformed,
        Reason::VlanTooDeep,
        Reason::Ipv6ChainTooLong,
        Reason::Untracked,
        Reason::PassedStoreDown,
        Reason::DroppedStoreDown,
        Reason::PassedAllowlist,
        Reason::DroppedDenylist,
        Reason::PassedShadow,
    ];

    /// Name used in `limiter stats` and in metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Passed => "passed",
            Reason::NoRule => "no_rule",
            Reason::NotIp => "not_ip",
            Reason::DroppedLocalLimit => "dropped_local_limit",
            Reason::DroppedGlobalLimit => "dropped_global_limit",
            Reason::Malformed => "malformed",
            Reason::VlanTooDeep => "vlan_too_deep",
            Reason::Ipv6ChainTooLong => "ipv6_chain_too_long",
            Reason::Untracked => "untracked",
            Reason::PassedStoreDown => "passed_store_down",
            Reason::DroppedStoreDown => "dropped_store_down",
            Reason::PassedAllowlist => "passed_allowlist",
            Reason::DroppedDenylist => "dropped_denylist",
            Reason::PassedShadow => "passed_shadow",
        }
    }

    /// Returns true when packets counted under this reason are dropped.
    pub const fn drops(self) -> bool {
        matches!(
            self,
            Reason::DroppedLocalLimit
                | Reason::DroppedGlobalLimit
                | Reason::Malformed
                | Reason::VlanTooDeep
                | Reason::Ipv6ChainTooLong
                | Reason::DroppedStoreDown
                | Reason::DroppedDenylist
        )
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is `#[repr(C)]`, made only of integers and byte arrays, with every
    // padding byte spelled out as a field, so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::RuleMatch {}
    unsafe impl aya::Pod for super::Rule {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::KeyCounter {}
    unsafe impl aya::Pod for super::Grant {}
    unsafe impl aya::Pod for super::AgentHeartbeat {}
    unsafe impl aya::Pod for super::RuleIndex {}
    unsafe impl aya::Pod for super::AclIndex {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn map_types_have_no_implicit_padding() {
        assert_eq!(size_of::<RuleMatch>(), 4);
        assert_eq!(size_of::<Rule>(), 72);
        assert_eq!(size_of::<AgentHeartbeat>(), 8);
        assert_eq!(size_of::<RuleIndex>(), 24);
        assert_eq!(size_of::<AclIndex>(), 8);
        assert_eq!(size_of::<FlowKey>(), 24);
        assert_eq!(size_of::<SlidingWindow>(), 24);
        assert_eq!(size_of::<KeyCounter>(), 48);
        assert_eq!(size_of::<Grant>(), 16);
    }

    #[test]
    fn inner_tier_rule_takes_inner_limits() {
        let rule = Rule {
            id: 3,
            ipv4_prefix_len: 24,
            ipv6_prefix_len: 48,
            limit: 1000,
            fallback_limit: 500,
            new_key_limit: 100,
            window_ns: MIN_WINDOW_NS,
            unit: UNIT_BYTES,
            shadow: 1,
            inner_tier: 1,
            inner_ipv4_prefix_len: 32,
            inner_ipv6_prefix_len: 64,
            inner_limit: 60,
            inner_fallback_limit: 30,
            inner_new_key_limit: 6,
            ..Rule::default()
        };
        let inner = rule.inner_tier_rule();
        assert_eq!(inner.id, 3 | INNER_TIER_ID_BIT);
        assert_eq!((inner.ipv4_prefix_len, inner.ipv6_prefix_len), (32, 64));
        assert_eq!((inner.limit, inner.fallback_limit, inner.new_key_limit), (60, 30, 6));
        assert_eq!((inner.window_ns, inner.unit, inner.shadow), (MIN_WINDOW_NS, UNIT_BYTES, 1));
        assert_eq!(inner.inner_tier, 0);
    }

    #[test]
    fn reason_table_matches_discriminants() {
        for (index, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, index, "{}", reason.name());
        }
    }
}
