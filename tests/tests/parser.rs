//! The XDP program on crafted frames, through BPF_PROG_TEST_RUN: which headers it parses,
//! which key it stores in `COUNTERS`, and which packets it passes or drops.
//!
//! Each test loads its own copy of the program with maps pinned in its own folder, so tests
//! run in parallel without sharing maps. Needs root.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsFd as _,
    time::Duration,
};

use aya::{Ebpf, maps::PerCpuValues};
use limiter_common::{
    AgentHeartbeat,
    FAMILY_IPV4, FAMILY_IPV6, FlowKey, Grant, IPPROTO_TCP, IPPROTO_UDP, KeyCounter, MAX_WINDOW_NS, REASON_COUNT,
    Reason, Rule, RuleMatch,
};
use limiter_tests::{
    PinDir,
    test_run::{
        ETHERNET_LEN, ETHERTYPE_QINQ, ETHERTYPE_VLAN, Frame, IPPROTO_SCTP, IPV4_LEN, IPV6_LEN, Ipv6Extension, TCP_LEN,
        UDP_LEN, VLAN_TAG_LEN, XDP_DROP, XDP_PASS, run_xdp, run_xdp_with_linear_len,
    },
    wait_until,
};
use limiter_user::{
    datapath::{self, Maps},
    reconcile::flow_key_field,
};

const SRC4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 77);
const DST4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const SRC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x1, 0x2, 0x3, 0x4, 0x5, 0x6);
const DST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const SRC_PORT: u16 = 40_000;
const DNS_PORT: u16 = 53;
const HTTPS_PORT: u16 = 443;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

const RULE_ID: u32 = 7;
/// High enough that no parsing test reaches it.
const HIGH_LIMIT: u64 = 1_000_000;

/// One loaded copy of the program and its maps, pinned in a folder of its own.
struct Datapath {
    ebpf: Ebpf,
    maps: Maps,
    _pin_dir: PinDir,
}

impl Datapath {
    fn load() -> Self {
        let pin_dir = PinDir::new();
        let ebpf = datapath::load(&pin_dir.path, 1024)
            .unwrap_or_else(|error| panic!("failed to load the XDP program (run as root): {error:#}"));
        let maps = Maps::open_dir(&pin_dir.path)
            .unwrap_or_else(|error| panic!("failed to open the maps pinned in {}: {error:#}", pin_dir.path.display()));
        Self { ebpf, maps, _pin_dir: pin_dir }
    }

    fn add_rule(&mut self, rule_match: RuleMatch, rule: Rule) {
        self.maps.rules.insert(rule_match, rule, 0).unwrap_or_else(|error| panic!("failed to write RULES: {error}"));
    }

    /// Runs the program once on `frame` and returns its action.
    fn run(&mut self, frame: &[u8]) -> u32 {
        let program = datapath::xdp_program(&mut self.ebpf).unwrap_or_else(|error| panic!("{error:#}"));
        let fd = program.fd().unwrap_or_else(|error| panic!("the loaded program has no fd: {error}"));
        run_xdp(fd.as_fd(), frame, 1).unwrap_or_else(|error| panic!("{error}")).action
    }

    /// Runs the program once on `frame` with only `linear_len` bytes readable, and returns
    /// its action.
    fn run_linear(&mut self, frame: &[u8], linear_len: usize) -> u32 {
        let program = datapath::xdp_program(&mut self.ebpf).unwrap_or_else(|error| panic!("{error:#}"));
        let fd = program.fd().unwrap_or_else(|error| panic!("the loaded program has no fd: {error}"));
        let linear_len = u32::try_from(linear_len).expect("linear part under 4 GiB");
        run_xdp_with_linear_len(fd.as_fd(), frame, linear_len, 1).unwrap_or_else(|error| panic!("{error}")).action
    }

    /// Returns `STATS` summed over all CPUs, indexed by `Reason`.
    fn reason_counts(&self) -> [u64; REASON_COUNT as usize] {
        let mut counts = [0; REASON_COUNT as usize];
        for reason in Reason::ALL {
            let values = self
                .maps
                .stats
                .get(&(reason as u32), 0)
                .unwrap_or_else(|error| panic!("failed to read STATS[{}]: {error}", reason.name()));
            counts[reason as usize] = values.iter().sum();
        }
        counts
    }

    /// Runs `frame` once and checks that it was counted under `reason` alone and got `action`.
    #[track_caller]
    fn assert_verdict(&mut self, frame: &[u8], action: u32, reason: Reason) {
        let before = self.reason_counts();
        let actual_action = self.run(frame);
        let counted = counted_reasons(&before, &self.reason_counts());
        assert_eq!(counted, vec![(reason.name(), 1)], "reasons counted for the frame");
        assert_eq!(actual_action, action, "action for the frame");
    }

    /// Returns every key in `COUNTERS`, sorted.
    fn keys(&self) -> Vec<FlowKey> {
        let mut keys: Vec<FlowKey> = self
            .maps
            .counters
            .keys()
            .map(|key| key.unwrap_or_else(|error| panic!("failed to walk COUNTERS: {error}")))
            .collect();
        keys.sort();
        keys
    }

    /// Returns the per-CPU counters of `key`.
    fn counters(&self, key: &FlowKey) -> PerCpuValues<KeyCounter> {
        self.maps.counters.get(key, 0).unwrap_or_else(|error| panic!("failed to read COUNTERS[{key:?}]: {error}"))
    }

    /// Returns the offered and passed counts of `key`, summed over all CPUs.
    fn totals(&self, key: &FlowKey) -> (u64, u64) {
        let counters = self.counters(key);
        (counters.iter().map(|counter| counter.offered).sum(), counters.iter().map(|counter| counter.passed).sum())
    }

    fn set_grants(&mut self, key: &FlowKey, grants: Vec<Grant>) {
        let values = PerCpuValues::try_from(grants).unwrap_or_else(|error| panic!("invalid per-CPU grants: {error}"));
        self.maps.grants.insert(key, values, 0).unwrap_or_else(|error| panic!("failed to write GRANTS: {error}"));
    }
}

/// Returns the reasons whose count grew from `before` to `after`, with the growth.
fn counted_reasons(
    before: &[u64; REASON_COUNT as usize],
    after: &[u64; REASON_COUNT as usize],
) -> Vec<(&'static str, u64)> {
    Reason::ALL
        .iter()
        .map(|reason| (reason.name(), after[*reason as usize] - before[*reason as usize]))
        .filter(|(_, count)| *count > 0)
        .collect()
}

/// Returns a rule keyed by the whole source address, not by port, with `fallback_limit`.
fn rule(id: u32, fallback_limit: u64) -> Rule {
    Rule {
        id,
        ipv4_prefix_len: 32,
        ipv6_prefix_len: 128,
        key_by_dst_port: 0,
        store_down_policy: limiter_common::STORE_DOWN_LOCAL,
        limit: HIGH_LIMIT,
        fallback_limit,
        // Applies only while the agent's heartbeat is fresh, which these tests set themselves.
        new_key_limit: fallback_limit,
        // The maximum window, so that a burst almost never straddles two windows.
        window_ns: MAX_WINDOW_NS,
        ..Rule::default()
    }
}

/// Returns a rule that also keys by destination port.
fn per_port_rule(id: u32) -> Rule {
    Rule { key_by_dst_port: 1, ..rule(id, HIGH_LIMIT) }
}

/// Loads the program with one rule for UDP to port 53 only, keyed by port, so a frame whose
/// port is parsed wrongly finds no rule.
fn load_with_dns_rule() -> Datapath {
    let mut datapath = Datapath::load();
    datapath.add_rule(RuleMatch::new(IPPROTO_UDP, DNS_PORT), per_port_rule(RULE_ID));
    datapath
}

/// Builds the key the agent expects for `addr` under a rule: the address masked to
/// `prefix_len` with integer arithmetic, independent of the program's byte-wise masking.
fn expected_ipv4_key(rule_id: u32, addr: Ipv4Addr, prefix_len: u8, dst_port: u16) -> FlowKey {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix_len)).unwrap_or(0);
    let mut key = FlowKey { rule_id, dst_port, family: FAMILY_IPV4, prefix_len, addr: [0; 16] };
    key.addr[..4].copy_from_slice(&(u32::from(addr) & mask).to_be_bytes());
    key
}

fn expected_ipv6_key(rule_id: u32, addr: Ipv6Addr, prefix_len: u8, dst_port: u16) -> FlowKey {
    let mask = u128::MAX.checked_shl(128 - u32::from(prefix_len)).unwrap_or(0);
    FlowKey { rule_id, dst_port, family: FAMILY_IPV6, prefix_len, addr: (u128::from(addr) & mask).to_be_bytes() }
}

/// Returns `CLOCK_MONOTONIC_COARSE` in nanoseconds, the clock `bpf_ktime_get_coarse_ns` reads.
fn coarse_monotonic_ns() -> u64 {
    let mut time = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `time` is a valid, writable timespec for the duration of the call.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut time) };
    assert_eq!(result, 0, "clock_gettime(CLOCK_MONOTONIC_COARSE) failed: {}", std::io::Error::last_os_error());
    time.tv_sec as u64 * 1_000_000_000 + time.tv_nsec as u64
}

/// Waits until at least `room` is left of the current window of `window_ns`, so a burst
/// cannot straddle two windows, where the previous window's count is weighted in.
fn wait_for_window_room(window_ns: u64, room: Duration) {
    let room_ns = room.as_nanos() as u64;
    wait_until("a window with room for the burst", room + Duration::from_secs(1), || {
        window_ns - coarse_monotonic_ns() % window_ns > room_ns
    });
}

/// Pins the calling thread to the CPU it runs on and returns that CPU, so every
/// BPF_PROG_TEST_RUN from this thread writes the same per-CPU slot.
fn pin_to_current_cpu() -> usize {
    // SAFETY: sched_getcpu takes no arguments and only returns a number.
    let cpu = unsafe { libc::sched_getcpu() };
    assert!(cpu >= 0, "sched_getcpu failed: {}", std::io::Error::last_os_error());
    let cpu = cpu as usize;
    // SAFETY: cpu_set_t is a plain bit array, and all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` came from sched_getcpu, so it is below CPU_SETSIZE and CPU_SET writes
    // inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread, and `set` is valid for the size passed.
    let result = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(result, 0, "sched_setaffinity to CPU {cpu} failed: {}", std::io::Error::last_os_error());
    cpu
}

fn dns_over_ipv4() -> Frame {
    Frame::ipv4(SRC4, DST4).udp(SRC_PORT, DNS_PORT)
}

fn dns_over_ipv6() -> Frame {
    Frame::ipv6(SRC6, DST6).udp(SRC_PORT, DNS_PORT)
}

// Parsing: Ethernet and VLAN tags.

#[test]
fn ipv4_udp_untagged_passes() {
    let mut datapath = load_with_dns_rule();
    datapath.assert_verdict(&dns_over_ipv4().build(), XDP_PASS, Reason::Passed);
    assert_eq!(datapath.keys(), vec![expected_ipv4_key(RULE_ID, SRC4, 32, DNS_PORT)]);
}

#[test]
fn ipv4_one_vlan_tag_passes() {
    let mut datapath = load_with_dns_rule();
    let frame = dns_over_ipv4().vlan(ETHERTYPE_VLAN).build();
    datapath.assert_verdict(&frame, XDP_PASS, Reason::Passed);
    assert_eq!(datapath.keys(), vec![expected_ipv4_key(RULE_ID, SRC4, 32, DNS_PORT)]);
}

#[test]
fn ipv4_two_vlan_tags_pass() {
    let mut datapath = load_with_dns_rule();
    let frame = dns_over_ipv4().vlan(ETHERTYPE_QINQ).vlan(ETHERTYPE_VLAN).build();
    datapath.assert_verdict(&frame, XDP_PASS, Reason::Passed);
    assert_eq!(datapath.keys(), vec![expected_ipv4_key(RULE_ID, SRC4, 32, DNS_PORT)]);
}

#[test]
fn ipv6_two_vlan_tags_pass() {
    let mut datapath = load_with_dns_rule();
    let frame = dns_over_ipv6().vlan(ETHERTYPE_QINQ).vlan(ETHERTYPE_VLAN).build();
    datapath.assert_verdict(&frame, XDP_PASS, Reason::Passed);
    assert_eq!(datapath.keys(), vec![expected_ipv6_key(RULE_ID, SRC6, 128, DNS_PORT)]);
}

#[test]
fn three_vlan_tags_are_vlan_too_deep() {
    let mut datapath = load_with_dns_rule();
    let frame = dns_over_ipv4().vlan(ETHERTYPE_QINQ).vlan(ETHERTYPE_VLAN).vlan(ETHERTYPE_VLAN).build();
    datapath.assert_verdict(&frame, XDP_DROP, Reason::VlanTooDeep);
    assert_eq!(datapath.keys(), vec![]);
}

#[test]
fn arp_is_not_ip_and_passes() {
    let mut datapath = Datapath::load();
    // A rule for any traffic, which an ARP frame must still not reach.
    datapath.add_rule(RuleMatch::new(0, 0), rule(RULE_ID, 0));
    datapath.assert_verdict(&Frame::arp().build(), XDP_PASS, Reason::NotIp);
    assert_eq!(datapath.keys(), vec![]);
}

// Parsing: IPv4.

#[test]
fn ipv4_ihl_6_options_keep_dst_port() {
    let mut datapath = load_with_dns_rule();
    datapath.assert_verdict(&dns_over_ipv4().ihl(6).build(), XDP_PASS, Reason::Passed);
    assert_eq!(datapath.keys(), vec![expected_ipv4_key(RULE_ID, SRC4, 32, DNS_PORT)]);
}

#[test]
fn ipv4_ihl_15_options_keep_dst_port() {
    let mut datapath = load_with_dns_rule();
    datapath.assert_verdict(&dns_over_ipv4().ihl(15).build(), XDP_PASS, Reason::Passed);
    assert_eq!(datapath.keys(), vec![expected_ipv4_key(RULE_ID, SRC4, 32, DNS_PORT)]);
}

#[test]
fn ipv4_ihl_4_is_malformed() {
    let mut datapath = load_with_dns_rule();
    datapath.assert_verdict(&dns_over_ipv4().ihl(4).build(), XDP_DROP, Reason::Malformed);
}

#[test]
fn ipv4_ihl_0_is_malformed() {
    let mut datapath = load_with_dns_rule();
    datapath.assert_verdict(&dns_over_ipv4().ihl(0).build(), XDP_DROP, Reason::Malformed);
}

#[test]
fn ipv4_total_length_below_header_is_malformed() {
    let mut datapath = load_with_dns_rule();
    let frame = dns_over_ipv4().total_length(IPV4_LEN as u16 - 1).build();
    datapath.assert_verdict(&frame, XDP_DROP, Reason::Malformed);
}

#[test]
fn ipv4_total_length_below_options_is_malformed() {
    let mut datapath = load_with_dns_rule();
    // IHL 6 is a 24-byte header, longer than the 20 bytes the total length claims.
    let frame = dns_over_ipv4().ihl(6).total_length(IPV4_LEN as u16).build();
    datapath.assert_verdict(&frame, XDP_DROP, Reason::Malformed);
}

#[test]
fn ipv4_first_fragment_keeps_port() {
    let mut datapath = load_with_dns_rule();
    datapath.assert_verdict(&dns_over_ipv4().fragment(0, true).build(), XDP_PASS, Reason::Passed);
    assert_eq!(datapath.keys(), vec![expected_ipv4_key(RULE_ID, SRC4, 32, DNS_PORT)]);
}

#[test]
fn ipv4_later_fragment_misses_port_rule() {
    let mut datapath = load_with_dns_rule();
    // The payload starts with bytes that read as a UDP header to port 53, which must not
    // count, because a later fragment carries no transport header.
    let frame = dns_over_ipv4().fragment(185, false).build();
    datapath.assert_verdict(&frame, XDP_PASS, Reason::NoRule);
}

#[test]
fn ipv4_later_fragment_matches_any_port_rule() {
    let mut datapath = load_with_dns_rule();
    let any_port_rule_id = RULE_ID + 1;
    datapath.add_rule(RuleMatch::new(IPPROTO_UDP, 0), per_port_rule(any_port_rule_id));
    datapath.assert_verdict(&dns_over_ipv4().fragment(185, true).build(), XDP_PASS, Reason::Passed);
    assert_eq!(datapath.keys(), vec![expected_ipv4_key(any_port_rule_id, SRC4, 32, 0)]);
}

#[test]
fn ipv4_sctp_has_no_port() {
    let mut datapath = Datapath::load();
    datapath.add_rule(RuleMatch::new(IPPROTO_SCTP, 0), per_port_rule(RULE_ID));
    datapath.assert_verdict(&Frame::ipv4(SRC4, DST4).protocol(IPPROTO_SCTP, &sctp_header()).build(), XDP_PASS, Reason::Passed);
    assert_eq!(datapath.keys(), vec![expected_ipv4_key(RULE_ID, SRC4, 32, 0)]);
}

/// An SCTP common header from port 5000 to port 38412, whose ports sit where TCP and UDP
/// ports do and must still not be read.
fn sctp_header() -> Vec<u8> {
    let mut header = Vec::new();
    header.extend_from_slice(&5000u16.to_be_bytes());
    header.extend_from_slice(&38412u16.to_be_bytes());
    header.extend_from_slice(&[0; 8]); // verification tag, checksum
    header
}

// Parsing: IPv6.

#[test]
fn ipv6_udp_passes() {
    let mut datapath = load_with_dns_rule();
    datapath.assert_verdict(&dns_over_ipv6().build(), XDP_PASS, Reason::Passed);
    assert_eq!(datapath.keys(), vec![expected_ipv6_key(RULE_ID, SRC6, 128, DNS_PORT)]);
}

#[test]
fn ipv6_hop_by_hop_keeps_port() {
    let mut datapath = load_with_dns_rule();
    // 16 bytes long, so a parser that ignores the length field reads the port from the wrong place.
    let frame = dns_over_ipv6().extension(Ipv6Extension::HopByHop { hdr_ext_len: 1 }).build();
    datapath.assert_verdict(&frame, XDP_PASS, Reason::Passed);
    assert_eq!(datapath.keys(), vec![expected_ipv6_key(RULE_ID, SRC6, 128, DNS_PORT)]);
}

#[test]
fn ipv6_options_headers_keep_tcp_port() {
    let mut datapath = Datapath::load();
    datapath.add_rule(RuleMatch::new(IPPROTO_TCP, HTTPS_PORT), per_port_rule(RULE_ID));
    let frame = Frame::ipv6(SRC6, DST6)
        .extension(Ipv6Extension::HopByHop { hdr_ext_len: 0 })
        .extension(Ipv6Extension::DestinationOptions { hdr_ext_len: 2 })
        .tcp(SRC_PORT, HTTPS_PORT)
        .build();
    datapath.assert_verdict(&frame, XDP_PASS, Reason::Passed);
    assert_eq!(datapath.keys(), vec![expected_ipv6_key(RULE_ID, SRC6, 128, HTTPS_PORT)]);
}

#[test]
fn ipv6_authentication_header_keeps_port() {
    let mut datapath = load_with_dns_rule();
    // Payload length 4 is a 24-byte header, in 4-byte units minus 2. Read in 8-byte units
    // like the other extension headers, it would be 40 bytes.
    let frame = dns_over_ipv6().extension(Ipv6Extension::Authentication { payload_len: 4 }).build();
    datapath.assert_verdict(&frame, XDP_PASS, Reason::Passed);
    assert_eq!(datapath.keys(), vec![expected_ipv6_key(RULE_ID, SRC6, 128, DNS_PORT)]);
}

#[test]
fn ipv6_routing_header_keeps_port() {
    let mut datapath = load_with_dns_rule();
    let frame = dns_over_ipv6().extension(Ipv6Extension::Routing { hdr_ext_len: 2 }).build();
    datapath.assert_verdict(&frame, XDP_PASS, Reason::Passed);
    assert_eq!(datapath.keys(), vec![expected_ipv6_key(RULE_ID, SRC6, 128, DNS_PORT)]);
}

#[test]
fn ipv6_first_fragment_keeps_port() {
    let mut datapath = load_with_dns_rule();
    let frame = dns_over_ipv6().extension(Ipv6Extension::Fragment { offset: 0, more_fragments: true }).build();
    datapath.assert_verdict(&frame, XDP_PASS, Reason::Passed);
    assert_eq!(datapath.keys(), vec![expected_ipv6_key(RULE_ID, SRC6, 128, DNS_PORT)]);
}

#[test]
fn ipv6_later_fragment_misses_port_rule() {
    let mut datapath = load_with_dns_rule();
    let frame = dns_over_ipv6().extension(Ipv6Extension::Fragment { offset: 185, more_fragments: false }).build();
    datapath.assert_verdict(&frame, XDP_PASS, Reason::NoRule);
}

#[test]
fn ipv6_later_fragment_matches_any_port_rule() {
    let mut datapath = load_with_dns_rule();
    let any_port_rule_id = RULE_ID + 1;
    datapath.add_rule(RuleMatch::new(IPPROTO_UDP, 0), per_port_rule(any_port_rule_id));
    let frame = dns_over_ipv6().extension(Ipv6Extension::Fragment { offset: 185, more_fragments: true }).build();
    datapath.assert_verdict(&frame, XDP_PASS, Reason::Passed);
    assert_eq!(datapath.keys(), vec![expected_ipv6_key(any_port_rule_id, SRC6, 128, 0)]);
}

/// Six extension headers of every kind the program walks, with a first fragment in the
/// middle.
fn six_extension_headers() -> Frame {
    dns_over_ipv6()
        .extension(Ipv6Extension::HopByHop { hdr_ext_len: 0 })
        .extension(Ipv6Extension::DestinationOptions { hdr_ext_len: 1 })
        .extension(Ipv6Extension::Routing { hdr_ext_len: 0 })
        .extension(Ipv6Extension::Fragment { offset: 0, more_fragments: true })
        .extension(Ipv6Extension::Authentication { payload_len: 4 })
        .extension(Ipv6Extension::DestinationOptions { hdr_ext_len: 0 })
}

#[test]
fn ipv6_six_extension_headers_keep_port() {
    let mut datapath = load_with_dns_rule();
    datapath.assert_verdict(&six_extension_headers().build(), XDP_PASS, Reason::Passed);
    assert_eq!(datapath.keys(), vec![expected_ipv6_key(RULE_ID, SRC6, 128, DNS_PORT)]);
}

#[test]
fn ipv6_seven_extension_headers_are_too_long() {
    let mut datapath = load_with_dns_rule();
    let frame = six_extension_headers().extension(Ipv6Extension::DestinationOptions { hdr_ext_len: 0 }).build();
    datapath.assert_verdict(&frame, XDP_DROP, Reason::Ipv6ChainTooLong);
    assert_eq!(datapath.keys(), vec![]);
}

#[test]
fn ipv6_sctp_has_no_port() {
    let mut datapath = Datapath::load();
    datapath.add_rule(RuleMatch::new(IPPROTO_SCTP, 0), per_port_rule(RULE_ID));
    let frame = Frame::ipv6(SRC6, DST6)
        .extension(Ipv6Extension::HopByHop { hdr_ext_len: 0 })
        .protocol(IPPROTO_SCTP, &sctp_header())
        .build();
    datapath.assert_verdict(&frame, XDP_PASS, Reason::Passed);
    assert_eq!(datapath.keys(), vec![expected_ipv6_key(RULE_ID, SRC6, 128, 0)]);
}

// Parsing: frames cut short inside a header. The frame is built whole and then truncated.

#[test]
fn cut_in_ethernet_is_malformed() {
    let mut datapath = load_with_dns_rule();
    // The kernel rejects test frames under 14 bytes, so the program is shown only the first
    // 13 bytes of a whole frame, as the linear part of a multi-buffer frame.
    let before = datapath.reason_counts();
    let action = datapath.run_linear(&dns_over_ipv4().build(), ETHERNET_LEN - 1);
    assert_eq!(counted_reasons(&before, &datapath.reason_counts()), vec![(Reason::Malformed.name(), 1)]);
    assert_eq!(action, XDP_DROP);
}

#[test]
fn cut_in_vlan_tag_is_malformed() {
    let mut datapath = load_with_dns_rule();
    let frame = dns_over_ipv4().vlan(ETHERTYPE_VLAN).build();
    datapath.assert_verdict(&frame[..ETHERNET_LEN + VLAN_TAG_LEN - 1], XDP_DROP, Reason::Malformed);
}

#[test]
fn cut_in_second_vlan_tag_is_malformed() {
    let mut datapath = load_with_dns_rule();
    let frame = dns_over_ipv4().vlan(ETHERTYPE_QINQ).vlan(ETHERTYPE_VLAN).build();
    datapath.assert_verdict(&frame[..ETHERNET_LEN + 2 * VLAN_TAG_LEN - 1], XDP_DROP, Reason::Malformed);
}

#[test]
fn cut_in_ipv4_header_is_malformed() {
    let mut datapath = load_with_dns_rule();
    let frame = dns_over_ipv4().build();
    datapath.assert_verdict(&frame[..ETHERNET_LEN + IPV4_LEN - 1], XDP_DROP, Reason::Malformed);
}

#[test]
fn cut_in_ipv4_options_is_malformed() {
    let mut datapath = Datapath::load();
    datapath.add_rule(RuleMatch::new(0, 0), rule(RULE_ID, HIGH_LIMIT));
    // IHL 8 is a 32-byte header. ICMP has no ports, so nothing after the options is read,
    // and only the header length shows that the frame ends inside them.
    let frame = Frame::ipv4(SRC4, DST4).ihl(8).protocol(ICMP, &[8, 0, 0, 0, 0, 1, 0, 1]).build();
    datapath.assert_verdict(&frame[..ETHERNET_LEN + 32 - 1], XDP_DROP, Reason::Malformed);
}

#[test]
fn cut_in_ipv6_header_is_malformed() {
    let mut datapath = load_with_dns_rule();
    let frame = dns_over_ipv6().build();
    datapath.assert_verdict(&frame[..ETHERNET_LEN + IPV6_LEN - 1], XDP_DROP, Reason::Malformed);
}

#[test]
fn cut_in_extension_header_before_udp_is_malformed() {
    let mut datapath = load_with_dns_rule();
    // Length 1 is a 16-byte header.
    let frame = dns_over_ipv6().extension(Ipv6Extension::HopByHop { hdr_ext_len: 1 }).build();
    datapath.assert_verdict(&frame[..ETHERNET_LEN + IPV6_LEN + 16 - 1], XDP_DROP, Reason::Malformed);
}

#[test]
fn cut_in_extension_header_before_icmpv6_is_malformed() {
    let mut datapath = Datapath::load();
    datapath.add_rule(RuleMatch::new(0, 0), rule(RULE_ID, HIGH_LIMIT));
    // ICMPv6 has no ports, so nothing after the 16-byte Hop-by-Hop header is read. Only the
    // header's own length shows that the frame ends inside it.
    let frame = Frame::ipv6(SRC6, DST6)
        .extension(Ipv6Extension::HopByHop { hdr_ext_len: 1 })
        .protocol(ICMPV6, &[128, 0, 0, 0, 0, 1, 0, 1])
        .build();
    datapath.assert_verdict(&frame[..ETHERNET_LEN + IPV6_LEN + 16 - 1], XDP_DROP, Reason::Malformed);
}

#[test]
fn cut_in_authentication_header_before_icmpv6_is_malformed() {
    let mut datapath = Datapath::load();
    datapath.add_rule(RuleMatch::new(0, 0), rule(RULE_ID, HIGH_LIMIT));
    // Payload length 4 is a 24-byte header.
    let frame = Frame::ipv6(SRC6, DST6)
        .extension(Ipv6Extension::Authentication { payload_len: 4 })
        .protocol(ICMPV6, &[128, 0, 0, 0, 0, 1, 0, 1])
        .build();
    datapath.assert_verdict(&frame[..ETHERNET_LEN + IPV6_LEN + 24 - 1], XDP_DROP, Reason::Malformed);
}

#[test]
fn cut_in_fragment_header_is_malformed() {
    let mut datapath = load_with_dns_rule();
    let frame = dns_over_ipv6().extension(Ipv6Extension::Fragment { offset: 185, more_fragments: false }).build();
    datapath.assert_verdict(&frame[..ETHERNET_LEN + IPV6_LEN + 8 - 1], XDP_DROP, Reason::Malformed);
}

#[test]
fn cut_in_tcp_header_is_malformed() {
    let mut datapath = Datapath::load();
    datapath.add_rule(RuleMatch::new(IPPROTO_TCP, HTTPS_PORT), per_port_rule(RULE_ID));
    // Both ports are inside the frame, but the rest of the 20-byte header is not.
    let frame = Frame::ipv4(SRC4, DST4).tcp(SRC_PORT, HTTPS_PORT).build();
    datapath.assert_verdict(&frame[..ETHERNET_LEN + IPV4_LEN + TCP_LEN - 1], XDP_DROP, Reason::Malformed);
}

#[test]
fn cut_in_udp_header_is_malformed() {
    let mut datapath = load_with_dns_rule();
    // Both ports are inside the frame, but the length and checksum are not.
    let frame = dns_over_ipv4().build();
    datapath.assert_verdict(&frame[..ETHERNET_LEN + IPV4_LEN + UDP_LEN - 1], XDP_DROP, Reason::Malformed);
}

#[test]
fn cut_in_ipv6_udp_header_is_malformed() {
    let mut datapath = load_with_dns_rule();
    let frame = dns_over_ipv6().build();
    datapath.assert_verdict(&frame[..ETHERNET_LEN + IPV6_LEN + UDP_LEN - 1], XDP_DROP, Reason::Malformed);
}

// Keys.

#[test]
fn ipv4_key_masks_source_to_24() {
    let mut datapath = Datapath::load();
    datapath.add_rule(RuleMatch::new(IPPROTO_UDP, 0), Rule { ipv4_prefix_len: 24, ..rule(RULE_ID, HIGH_LIMIT) });
    // Two sources in one /24 share one key.
    datapath.assert_verdict(&dns_over_ipv4().build(), XDP_PASS, Reason::Passed);
    let neighbour = Frame::ipv4(Ipv4Addr::new(198, 51, 100, 200), DST4).udp(SRC_PORT, HTTPS_PORT).build();
    datapath.assert_verdict(&neighbour, XDP_PASS, Reason::Passed);

    let keys = datapath.keys();
    let mut expected = FlowKey { rule_id: RULE_ID, dst_port: 0, family: 4, prefix_len: 24, addr: [0; 16] };
    expected.addr[..4].copy_from_slice(&[198, 51, 100, 0]);
    assert_eq!(keys, vec![expected]);
    assert_eq!(bytemuck::bytes_of(&keys[0]), bytemuck::bytes_of(&expected));
    assert_eq!(flow_key_field(&keys[0]), "198.51.100.0/24");
    assert_eq!(datapath.totals(&expected), (2, 2));
}

#[test]
fn ipv4_key_masks_inside_a_byte() {
    let mut datapath = Datapath::load();
    datapath.add_rule(RuleMatch::new(IPPROTO_UDP, 0), Rule { ipv4_prefix_len: 20, ..rule(RULE_ID, HIGH_LIMIT) });
    datapath.assert_verdict(&dns_over_ipv4().build(), XDP_PASS, Reason::Passed);

    let keys = datapath.keys();
    let expected = expected_ipv4_key(RULE_ID, SRC4, 20, 0);
    assert_eq!(keys, vec![expected]);
    assert_eq!(bytemuck::bytes_of(&keys[0]), bytemuck::bytes_of(&expected));
    assert_eq!(flow_key_field(&keys[0]), "198.51.96.0/20");
}

#[test]
fn ipv6_key_masks_source_to_64() {
    let mut datapath = Datapath::load();
    datapath.add_rule(RuleMatch::new(IPPROTO_UDP, 0), Rule { ipv6_prefix_len: 64, ..rule(RULE_ID, HIGH_LIMIT) });
    datapath.assert_verdict(&dns_over_ipv6().build(), XDP_PASS, Reason::Passed);
    let neighbour = Frame::ipv6(Ipv6Addr::new(0x2001, 0xdb8, 0x1, 0x2, 0xffff, 0, 0, 9), DST6).udp(SRC_PORT, DNS_PORT);
    datapath.assert_verdict(&neighbour.build(), XDP_PASS, Reason::Passed);

    let keys = datapath.keys();
    let mut expected = FlowKey { rule_id: RULE_ID, dst_port: 0, family: 6, prefix_len: 64, addr: [0; 16] };
    expected.addr[..8].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0x00, 0x01, 0x00, 0x02]);
    assert_eq!(keys, vec![expected]);
    assert_eq!(bytemuck::bytes_of(&keys[0]), bytemuck::bytes_of(&expected));
    assert_eq!(flow_key_field(&keys[0]), "2001:db8:1:2::/64");
    assert_eq!(datapath.totals(&expected), (2, 2));
}

#[test]
fn ipv6_key_masks_inside_a_byte() {
    let mut datapath = Datapath::load();
    datapath.add_rule(RuleMatch::new(IPPROTO_UDP, 0), Rule { ipv6_prefix_len: 57, ..rule(RULE_ID, HIGH_LIMIT) });
    let source = Ipv6Addr::new(0x2001, 0xdb8, 0x1, 0x2ff, 0x3, 0x4, 0x5, 0x6);
    datapath.assert_verdict(&Frame::ipv6(source, DST6).udp(SRC_PORT, DNS_PORT).build(), XDP_PASS, Reason::Passed);

    let keys = datapath.keys();
    let expected = expected_ipv6_key(RULE_ID, source, 57, 0);
    assert_eq!(keys, vec![expected]);
    assert_eq!(bytemuck::bytes_of(&keys[0]), bytemuck::bytes_of(&expected));
    assert_eq!(flow_key_field(&keys[0]), "2001:db8:1:280::/57");
}

#[test]
fn per_port_rule_keys_each_port() {
    let mut datapath = Datapath::load();
    datapath.add_rule(RuleMatch::new(IPPROTO_UDP, 0), Rule { ipv4_prefix_len: 24, ..per_port_rule(RULE_ID) });
    datapath.assert_verdict(&dns_over_ipv4().build(), XDP_PASS, Reason::Passed);
    datapath.assert_verdict(&Frame::ipv4(SRC4, DST4).udp(SRC_PORT, 123).build(), XDP_PASS, Reason::Passed);

    // Sorted as `keys()` returns them: by rule id, then port.
    let keys = datapath.keys();
    let expected = vec![expected_ipv4_key(RULE_ID, SRC4, 24, DNS_PORT), expected_ipv4_key(RULE_ID, SRC4, 24, 123)];
    assert_eq!(keys, expected);
    assert_eq!(bytemuck::cast_slice::<FlowKey, u8>(&keys), bytemuck::cast_slice::<FlowKey, u8>(&expected));
    assert_eq!(flow_key_field(&keys[0]), "198.51.100.0/24:53");
}

#[test]
fn key_prefers_port_rule_over_any_port_rule() {
    let mut datapath = load_with_dns_rule();
    let any_port_rule_id = RULE_ID + 1;
    let any_protocol_rule_id = RULE_ID + 2;
    datapath.add_rule(RuleMatch::new(IPPROTO_UDP, 0), rule(any_port_rule_id, HIGH_LIMIT));
    datapath.add_rule(RuleMatch::new(0, 0), rule(any_protocol_rule_id, HIGH_LIMIT));
    datapath.assert_verdict(&dns_over_ipv4().build(), XDP_PASS, Reason::Passed);
    datapath.assert_verdict(&Frame::ipv4(SRC4, DST4).udp(SRC_PORT, 123).build(), XDP_PASS, Reason::Passed);
    datapath.assert_verdict(&Frame::ipv4(SRC4, DST4).tcp(SRC_PORT, DNS_PORT).build(), XDP_PASS, Reason::Passed);

    let mut expected = vec![
        expected_ipv4_key(RULE_ID, SRC4, 32, DNS_PORT),
        expected_ipv4_key(any_port_rule_id, SRC4, 32, 0),
        expected_ipv4_key(any_protocol_rule_id, SRC4, 32, 0),
    ];
    expected.sort();
    assert_eq!(datapath.keys(), expected);
}

// Decisions.

#[test]
fn fallback_limit_passes_exactly_n() {
    const FALLBACK_LIMIT: u64 = 10;
    // Each CPU keeps its own fallback window, so every run must land on one CPU.
    pin_to_current_cpu();
    let mut datapath = Datapath::load();
    // The fleet-wide limit is far higher, so only the fallback limit can stop the burst.
    datapath.add_rule(RuleMatch::new(IPPROTO_UDP, 0), rule(RULE_ID, FALLBACK_LIMIT));
    let frame = dns_over_ipv4().build();
    wait_for_window_room(MAX_WINDOW_NS, Duration::from_secs(5));

    let before = datapath.reason_counts();
    let actions: Vec<u32> = (0..FALLBACK_LIMIT + 5).map(|_| datapath.run(&frame)).collect();
    let mut expected_actions = vec![XDP_PASS; FALLBACK_LIMIT as usize];
    expected_actions.extend([XDP_DROP; 5]);
    assert_eq!(actions, expected_actions);
    assert_eq!(
        counted_reasons(&before, &datapath.reason_counts()),
        vec![(Reason::Passed.name(), FALLBACK_LIMIT), (Reason::DroppedLocalLimit.name(), 5)]
    );
    let key = expected_ipv4_key(RULE_ID, SRC4, 32, 0);
    assert_eq!(datapath.totals(&key), (FALLBACK_LIMIT + 5, FALLBACK_LIMIT));
}

#[test]
fn new_key_limit_applies_while_agent_grants() {
    const FALLBACK_LIMIT: u64 = 10;
    const NEW_KEY_LIMIT: u64 = 3;
    pin_to_current_cpu();
    let mut datapath = Datapath::load();
    datapath.add_rule(RuleMatch::new(IPPROTO_UDP, 0), Rule { new_key_limit: NEW_KEY_LIMIT, ..rule(RULE_ID, FALLBACK_LIMIT) });
    let first = dns_over_ipv4().build();
    let second = Frame::ipv4(Ipv4Addr::new(198, 51, 100, 78), DST4).udp(SRC_PORT, DNS_PORT).build();
    wait_for_window_room(MAX_WINDOW_NS, Duration::from_secs(5));

    // With the agent's heartbeat fresh, a key never granted passes the new-key limit.
    let heartbeat = AgentHeartbeat { granting_until_ns: limiter_user::reconcile::monotonic_ns() + 60_000_000_000 };
    datapath.maps.agent.set(0, heartbeat, 0).expect("write AGENT");
    let paced = (0..FALLBACK_LIMIT).filter(|_| datapath.run(&first) == XDP_PASS).count();
    assert_eq!(paced, NEW_KEY_LIMIT as usize);

    // With the heartbeat stale, the agent is gone and a new key gets the fallback limit.
    datapath.maps.agent.set(0, AgentHeartbeat { granting_until_ns: 0 }, 0).expect("write AGENT");
    let unpaced = (0..FALLBACK_LIMIT + 2).filter(|_| datapath.run(&second) == XDP_PASS).count();
    assert_eq!(unpaced, FALLBACK_LIMIT as usize);
}

#[test]
fn fallback_limit_applies_per_key() {
    const FALLBACK_LIMIT: u64 = 3;
    pin_to_current_cpu();
    let mut datapath = Datapath::load();
    datapath.add_rule(RuleMatch::new(IPPROTO_UDP, 0), rule(RULE_ID, FALLBACK_LIMIT));
    let first = dns_over_ipv4().build();
    let second = Frame::ipv4(Ipv4Addr::new(198, 51, 100, 78), DST4).udp(SRC_PORT, DNS_PORT).build();
    wait_for_window_room(MAX_WINDOW_NS, Duration::from_secs(5));

    let first_passed = (0..FALLBACK_LIMIT + 2).filter(|_| datapath.run(&first) == XDP_PASS).count();
    let second_passed = (0..FALLBACK_LIMIT + 2).filter(|_| datapath.run(&second) == XDP_PASS).count();
    assert_eq!(first_passed, FALLBACK_LIMIT as usize);
    assert_eq!(second_passed, FALLBACK_LIMIT as usize);
}

#[test]
fn grant_admits_exactly_k_more() {
    const FALLBACK_LIMIT: u64 = 3;
    const GRANTED: u64 = 10;
    // Counters and grants are per CPU, so every run must land on the CPU whose slot is read.
    let cpu = pin_to_current_cpu();
    let mut datapath = Datapath::load();
    datapath.add_rule(RuleMatch::new(IPPROTO_UDP, 0), rule(RULE_ID, FALLBACK_LIMIT));
    let frame = dns_over_ipv4().build();
    let key = expected_ipv4_key(RULE_ID, SRC4, 32, 0);
    wait_for_window_room(MAX_WINDOW_NS, Duration::from_secs(5));

    // Two packets under the fallback limit create the key.
    datapath.assert_verdict(&frame, XDP_PASS, Reason::Passed);
    datapath.assert_verdict(&frame, XDP_PASS, Reason::Passed);
    let counters = datapath.counters(&key);
    assert_eq!(counters[cpu].passed, 2, "passed on CPU {cpu}");

    // GRANTED is above what the fallback limit has left, so only the grant can admit it all.
    let expires_ns = coarse_monotonic_ns() + 60_000_000_000;
    let grants = counters.iter().map(|counter| Grant { passed_ceiling: counter.passed + GRANTED, expires_ns }).collect();
    datapath.set_grants(&key, grants);

    let before = datapath.reason_counts();
    let actions: Vec<u32> = (0..GRANTED + 5).map(|_| datapath.run(&frame)).collect();
    let mut expected_actions = vec![XDP_PASS; GRANTED as usize];
    expected_actions.extend([XDP_DROP; 5]);
    assert_eq!(actions, expected_actions);
    assert_eq!(
        counted_reasons(&before, &datapath.reason_counts()),
        vec![(Reason::Passed.name(), GRANTED), (Reason::DroppedGlobalLimit.name(), 5)]
    );
    assert_eq!(datapath.counters(&key)[cpu].passed, 2 + GRANTED, "passed on CPU {cpu}");
}

#[test]
fn expired_grant_falls_back_to_fallback_limit() {
    const FALLBACK_LIMIT: u64 = 4;
    pin_to_current_cpu();
    let mut datapath = Datapath::load();
    datapath.add_rule(RuleMatch::new(IPPROTO_UDP, 0), rule(RULE_ID, FALLBACK_LIMIT));
    let frame = dns_over_ipv4().build();
    let key = expected_ipv4_key(RULE_ID, SRC4, 32, 0);

    // A ceiling no CPU reaches, which expired a second ago.
    let expires_ns = coarse_monotonic_ns().saturating_sub(1_000_000_000);
    let cpus = aya::util::nr_cpus().unwrap_or_else(|(path, error)| panic!("failed to read {path}: {error}"));
    datapath.set_grants(&key, vec![Grant { passed_ceiling: u64::MAX, expires_ns }; cpus]);
    wait_for_window_room(MAX_WINDOW_NS, Duration::from_secs(5));

    let before = datapath.reason_counts();
    let actions: Vec<u32> = (0..FALLBACK_LIMIT + 5).map(|_| datapath.run(&frame)).collect();
    let mut expected_actions = vec![XDP_PASS; FALLBACK_LIMIT as usize];
    expected_actions.extend([XDP_DROP; 5]);
    assert_eq!(actions, expected_actions);
    assert_eq!(
        counted_reasons(&before, &datapath.reason_counts()),
        vec![(Reason::Passed.name(), FALLBACK_LIMIT), (Reason::DroppedLocalLimit.name(), 5)]
    );
}

/// Runs `frames` packets of one key whose grant expired a second ago, under a rule with
/// `policy`, and returns the reasons counted.
fn run_with_expired_grant(policy: u8, frames: u64) -> Vec<(&'static str, u64)> {
    const FALLBACK_LIMIT: u64 = 4;
    pin_to_current_cpu();
    let mut datapath = Datapath::load();
    datapath.add_rule(RuleMatch::new(IPPROTO_UDP, 0), Rule { store_down_policy: policy, ..rule(RULE_ID, FALLBACK_LIMIT) });
    let frame = dns_over_ipv4().build();
    let key = expected_ipv4_key(RULE_ID, SRC4, 32, 0);
    let expires_ns = coarse_monotonic_ns().saturating_sub(1_000_000_000);
    let cpus = aya::util::nr_cpus().unwrap_or_else(|(path, error)| panic!("failed to read {path}: {error}"));
    datapath.set_grants(&key, vec![Grant { passed_ceiling: u64::MAX, expires_ns }; cpus]);
    wait_for_window_room(MAX_WINDOW_NS, Duration::from_secs(5));

    let before = datapath.reason_counts();
    for _ in 0..frames {
        datapath.run(&frame);
    }
    counted_reasons(&before, &datapath.reason_counts())
}

#[test]
fn store_down_open_passes_and_counts() {
    let reasons = run_with_expired_grant(limiter_common::STORE_DOWN_OPEN, 10);
    assert_eq!(reasons, vec![(Reason::PassedStoreDown.name(), 10)]);
}

#[test]
fn store_down_closed_drops_and_counts() {
    let reasons = run_with_expired_grant(limiter_common::STORE_DOWN_CLOSED, 10);
    assert_eq!(reasons, vec![(Reason::DroppedStoreDown.name(), 10)]);
}

#[test]
fn store_down_local_enforces_fallback() {
    let reasons = run_with_expired_grant(limiter_common::STORE_DOWN_LOCAL, 10);
    assert_eq!(reasons, vec![(Reason::Passed.name(), 4), (Reason::DroppedLocalLimit.name(), 6)]);
}

#[test]
fn rule_index_keeps_every_rule_found() {
    use limiter_user::{rule_table::RuleTable, rules::{Protocol, RuleSpec, StoreDownPolicy}};

    let mut datapath = Datapath::load();
    let spec = |protocol: Protocol, port: Option<u16>| RuleSpec {
        protocol,
        port,
        rate: HIGH_LIMIT,
        window_ms: 1000,
        ipv4_prefix_len: 32,
        ipv6_prefix_len: 128,
        per_port: false,
        store_down: StoreDownPolicy::Local,
        unit: limiter_user::rules::RateUnit::Packets,
        tcp_syn: false,
        inner_tier: None,
        shadow: false,
    };
    // Through the rule table, as `limiter limit add` does, which keeps RULE_INDEX.
    let mut table = RuleTable::load(&datapath.maps).expect("read RULES");
    let dns = table.add(&spec(Protocol::Udp, Some(DNS_PORT)), &mut datapath.maps).expect("add the DNS rule");
    let any = table.add(&spec(Protocol::Any, None), &mut datapath.maps).expect("add the rule for all traffic");
    let index = datapath.maps.rule_index.get(&0, 0).expect("read RULE_INDEX");
    assert_eq!((index.port_rules, index.protocol_rules, index.any_rules, index.valid), (1, 0, 1, 1));

    // The DNS packet finds the port rule; another port skips the empty protocol kind and
    // finds the rule for all traffic.
    datapath.run(&dns_over_ipv4().build());
    datapath.run(&Frame::ipv4(SRC4, DST4).udp(SRC_PORT, HTTPS_PORT).build());
    let mut rule_ids: Vec<u32> = datapath.keys().iter().map(|key| key.rule_id).collect();
    rule_ids.sort();
    assert_eq!(rule_ids, vec![dns.id, any.id]);

    // After the port rule is removed, DNS falls to the rule for all traffic.
    table.remove(dns.id, &mut datapath.maps).expect("remove the DNS rule");
    let index = datapath.maps.rule_index.get(&0, 0).expect("read RULE_INDEX");
    assert_eq!((index.port_rules, index.any_rules), (0, 1));
    let before = datapath.reason_counts();
    datapath.run(&dns_over_ipv4().build());
    assert_eq!(counted_reasons(&before, &datapath.reason_counts()), vec![(Reason::Passed.name(), 1)]);
}
