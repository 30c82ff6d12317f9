//! Rule kinds beyond packets per window, through BPF_PROG_TEST_RUN on the loaded program:
//! byte limits, TCP SYN rules, tiered keys, allow and deny lists, and shadow mode.
//!
//! Each test loads its own copy of the program with maps pinned in its own folder, and pins
//! its thread to one CPU, because counters, grants and fallback windows are per CPU. Needs
//! root.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsFd as _,
    time::Duration,
};

use aya::{Ebpf, maps::PerCpuValues};
use limiter_common::{
    FAMILY_IPV4, FAMILY_IPV6, FlowKey, Grant, INNER_TIER_ID_BIT, IPPROTO_TCP, IPPROTO_UDP, KeyCounter, MAX_WINDOW_NS,
    REASON_COUNT, Reason, Rule, RuleMatch, STORE_DOWN_LOCAL, UNIT_BYTES,
};
use limiter_tests::{
    PinDir,
    test_run::{ETHERNET_LEN, Frame, IPV4_LEN, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, UDP_LEN, XDP_DROP, XDP_PASS, run_xdp},
    wait_until,
};
use limiter_user::{
    acl::{self, AclList},
    datapath::{self, Maps},
    reconcile::flow_key_field,
    rule_table::RuleTable,
    rules::{InnerTier, Protocol, RateUnit, RuleSpec, StoreDownPolicy},
};

const SRC4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 77);
const DST4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const SRC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x1, 0x2, 0x3, 0x4, 0x5, 0x6);
const DST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const SRC_PORT: u16 = 40_000;
const SSH_PORT: u16 = 22;
const HTTP_PORT: u16 = 80;
const RULE_ID: u32 = 7;
/// High enough that no test reaches it.
const HIGH_LIMIT: u64 = 1_000_000;

/// One loaded copy of the program and its maps, pinned in a folder of its own.
struct Datapath {
    ebpf: Ebpf,
    maps: Maps,
    /// The CPU every run of this test lands on.
    cpu: usize,
    _pin_dir: PinDir,
}

impl Datapath {
    /// Loads the program and pins the calling thread to the CPU it is on.
    fn load() -> Self {
        let cpu = pin_to_current_cpu();
        let pin_dir = PinDir::new();
        let ebpf = datapath::load(&pin_dir.path, 1024)
            .unwrap_or_else(|error| panic!("failed to load the XDP program (run as root): {error:#}"));
        let maps = Maps::open_dir(&pin_dir.path)
            .unwrap_or_else(|error| panic!("failed to open the maps pinned in {}: {error:#}", pin_dir.path.display()));
        Self { ebpf, maps, cpu, _pin_dir: pin_dir }
    }

    fn add_rule(&mut self, rule_match: RuleMatch, rule: Rule) {
        self.maps.rules.insert(rule_match, rule, 0).unwrap_or_else(|error| panic!("failed to write RULES: {error}"));
    }

    fn run(&mut self, frame: &[u8]) -> u32 {
        let program = datapath::xdp_program(&mut self.ebpf).unwrap_or_else(|error| panic!("{error:#}"));
        let fd = program.fd().unwrap_or_else(|error| panic!("the loaded program has no fd: {error}"));
        run_xdp(fd.as_fd(), frame, 1).unwrap_or_else(|error| panic!("{error}")).action
    }

    /// Runs `frame` `count` times and returns the actions.
    fn run_many(&mut self, frame: &[u8], count: usize) -> Vec<u32> {
        (0..count).map(|_| self.run(frame)).collect()
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
        assert_eq!(counted_reasons(&before, &self.reason_counts()), vec![(reason.name(), 1)], "reasons counted");
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

    /// Returns this test's CPU's counter of `key`.
    fn counter(&self, key: &FlowKey) -> KeyCounter {
        let values = self.maps.counters.get(key, 0).unwrap_or_else(|error| panic!("failed to read COUNTERS[{key:?}]: {error}"));
        values[self.cpu]
    }

    fn set_grants(&mut self, key: &FlowKey, grants: Vec<Grant>) {
        let values = PerCpuValues::try_from(grants).unwrap_or_else(|error| panic!("invalid per-CPU grants: {error}"));
        self.maps.grants.insert(key, values, 0).unwrap_or_else(|error| panic!("failed to write GRANTS: {error}"));
    }
}

/// Returns the reasons whose count grew from `before` to `after`, with the growth.
fn counted_reasons(before: &[u64; REASON_COUNT as usize], after: &[u64; REASON_COUNT as usize]) -> Vec<(&'static str, u64)> {
    Reason::ALL
        .iter()
        .map(|reason| (reason.name(), after[*reason as usize] - before[*reason as usize]))
        .filter(|(_, count)| *count > 0)
        .collect()
}

/// Returns a packets rule keyed by the whole source address, with `fallback_limit`, and the
/// maximum window, so a burst almost never straddles two windows.
fn rule(id: u32, fallback_limit: u64) -> Rule {
    Rule {
        id,
        ipv4_prefix_len: 32,
        ipv6_prefix_len: 128,
        store_down_policy: STORE_DOWN_LOCAL,
        limit: HIGH_LIMIT,
        fallback_limit,
        new_key_limit: fallback_limit,
        window_ns: MAX_WINDOW_NS,
        ..Rule::default()
    }
}

fn ipv4_key(rule_id: u32, addr: Ipv4Addr, prefix_len: u8) -> FlowKey {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix_len)).unwrap_or(0);
    let mut key = FlowKey { rule_id, dst_port: 0, family: FAMILY_IPV4, prefix_len, addr: [0; 16] };
    key.addr[..4].copy_from_slice(&(u32::from(addr) & mask).to_be_bytes());
    key
}

fn ipv6_key(rule_id: u32, addr: Ipv6Addr, prefix_len: u8) -> FlowKey {
    let mask = u128::MAX.checked_shl(128 - u32::from(prefix_len)).unwrap_or(0);
    FlowKey { rule_id, dst_port: 0, family: FAMILY_IPV6, prefix_len, addr: (u128::from(addr) & mask).to_be_bytes() }
}

/// Returns `CLOCK_MONOTONIC_COARSE` in nanoseconds, the clock `bpf_ktime_get_coarse_ns` reads.
fn coarse_monotonic_ns() -> u64 {
    let mut time = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `time` is a valid, writable timespec for the duration of the call.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut time) };
    assert_eq!(result, 0, "clock_gettime(CLOCK_MONOTONIC_COARSE) failed: {}", std::io::Error::last_os_error());
    time.tv_sec as u64 * 1_000_000_000 + time.tv_nsec as u64
}

/// Waits until at least 5 s are left of the current maximum-length window, so a burst
/// cannot straddle two windows, where the previous window's count is weighted in.
fn wait_for_window_room() {
    let room = Duration::from_secs(5);
    wait_until("a window with room for the burst", room + Duration::from_secs(1), || {
        MAX_WINDOW_NS - coarse_monotonic_ns() % MAX_WINDOW_NS > room.as_nanos() as u64
    });
}

/// Pins the calling thread to the CPU it runs on and returns that CPU.
fn pin_to_current_cpu() -> usize {
    // SAFETY: sched_getcpu takes no arguments and only returns a number.
    let cpu = unsafe { libc::sched_getcpu() };
    assert!(cpu >= 0, "sched_getcpu failed: {}", std::io::Error::last_os_error());
    let cpu = cpu as usize;
    // SAFETY: cpu_set_t is a plain bit array, and all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` came from sched_getcpu, so it is below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread, and `set` is valid for the size passed.
    let result = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(result, 0, "sched_setaffinity to CPU {cpu} failed: {}", std::io::Error::last_os_error());
    cpu
}

/// Builds a UDP frame of exactly `len` bytes from `src`.
fn udp_frame_of_len(src: Ipv4Addr, len: usize) -> Vec<u8> {
    let headers = ETHERNET_LEN + IPV4_LEN + UDP_LEN;
    let frame = Frame::ipv4(src, DST4).udp(SRC_PORT, 53).payload(len - headers).build();
    assert_eq!(frame.len(), len);
    frame
}

fn tcp_frame(src: Ipv4Addr, dst_port: u16, flags: u8) -> Vec<u8> {
    Frame::ipv4(src, DST4).tcp_with_flags(SRC_PORT, dst_port, flags).build()
}

/// Returns `count` actions: `passes` times XDP_PASS, then XDP_DROP.
fn passes_then_drops(passes: usize, count: usize) -> Vec<u32> {
    let mut actions = vec![XDP_PASS; passes];
    actions.resize(count, XDP_DROP);
    actions
}

// Bytes per window.

#[test]
fn byte_rule_admits_frames_until_bytes_run_out() {
    let mut datapath = Datapath::load();
    // 1100 bytes per window: five 200-byte frames fit (1000), a sixth does not (1200), but a
    // 100-byte frame still does (1100).
    datapath.add_rule(RuleMatch::new(IPPROTO_UDP, 0), Rule { unit: UNIT_BYTES, ..rule(RULE_ID, 1100) });
    let large = udp_frame_of_len(SRC4, 200);
    let small = udp_frame_of_len(SRC4, 100);
    wait_for_window_room();

    let before = datapath.reason_counts();
    assert_eq!(datapath.run_many(&large, 7), passes_then_drops(5, 7));
    assert_eq!(datapath.run(&small), XDP_PASS, "a 100-byte frame fits in the 100 bytes left");
    assert_eq!(datapath.run(&small), XDP_DROP, "nothing is left");
    assert_eq!(
        counted_reasons(&before, &datapath.reason_counts()),
        vec![(Reason::Passed.name(), 6), (Reason::DroppedLocalLimit.name(), 3)]
    );

    let counter = datapath.counter(&ipv4_key(RULE_ID, SRC4, 32));
    assert_eq!(counter.offered, 7 * 200 + 2 * 100, "offered bytes");
    assert_eq!(counter.passed, 1100, "passed bytes");
    assert_eq!(counter.fallback_window.current, 1100, "bytes in the fallback window");
}

#[test]
fn byte_rule_grant_is_a_ceiling_in_bytes() {
    let mut datapath = Datapath::load();
    datapath.add_rule(RuleMatch::new(IPPROTO_UDP, 0), Rule { unit: UNIT_BYTES, ..rule(RULE_ID, 1000) });
    let frame = udp_frame_of_len(SRC4, 200);
    let key = ipv4_key(RULE_ID, SRC4, 32);
    wait_for_window_room();

    // One frame creates the key. Then a grant of 500 more bytes admits two more frames
    // (400) but not a third (600), although the fallback limit has 800 bytes left.
    assert_eq!(datapath.run(&frame), XDP_PASS);
    let expires_ns = coarse_monotonic_ns() + 60_000_000_000;
    let cpus = aya::util::nr_cpus().unwrap_or_else(|(path, error)| panic!("failed to read {path}: {error}"));
    datapath.set_grants(&key, vec![Grant { passed_ceiling: 200 + 500, expires_ns }; cpus]);

    let before = datapath.reason_counts();
    assert_eq!(datapath.run_many(&frame, 4), passes_then_drops(2, 4));
    assert_eq!(
        counted_reasons(&before, &datapath.reason_counts()),
        vec![(Reason::Passed.name(), 2), (Reason::DroppedGlobalLimit.name(), 2)]
    );
    assert_eq!(datapath.counter(&key).passed, 600, "passed bytes");
}

#[test]
fn packet_rule_counts_one_per_frame() {
    let mut datapath = Datapath::load();
    datapath.add_rule(RuleMatch::new(IPPROTO_UDP, 0), rule(RULE_ID, 3));
    wait_for_window_room();
    assert_eq!(datapath.run_many(&udp_frame_of_len(SRC4, 500), 4), passes_then_drops(3, 4));
    let counter = datapath.counter(&ipv4_key(RULE_ID, SRC4, 32));
    assert_eq!((counter.offered, counter.passed), (4, 3));
}

// New TCP connections.

#[test]
fn syn_rule_selects_syn_without_ack_only() {
    const SYN_RULE_ID: u32 = 1;
    const TCP_RULE_ID: u32 = 2;
    let mut datapath = Datapath::load();
    datapath.add_rule(RuleMatch::tcp_syn(SSH_PORT), rule(SYN_RULE_ID, HIGH_LIMIT));
    datapath.add_rule(RuleMatch::new(IPPROTO_TCP, 0), rule(TCP_RULE_ID, HIGH_LIMIT));

    // (flags, destination port, rule whose key the segment must land in)
    let cases = [
        ("SYN to 22", TCP_SYN, SSH_PORT, SYN_RULE_ID),
        ("SYN-ACK to 22", TCP_SYN | TCP_ACK, SSH_PORT, TCP_RULE_ID),
        ("ACK to 22", TCP_ACK, SSH_PORT, TCP_RULE_ID),
        ("FIN-ACK to 22", TCP_FIN | TCP_ACK, SSH_PORT, TCP_RULE_ID),
        ("RST to 22", TCP_RST, SSH_PORT, TCP_RULE_ID),
        ("SYN to 80", TCP_SYN, HTTP_PORT, TCP_RULE_ID),
    ];
    for (name, flags, port, rule_id) in cases {
        let before = datapath.keys();
        datapath.assert_verdict(&tcp_frame(SRC4, port, flags), XDP_PASS, Reason::Passed);
        let key = ipv4_key(rule_id, SRC4, 32);
        let new_count = datapath.counter(&key).offered;
        assert!(datapath.keys().contains(&key), "{name}: key of rule {rule_id} missing; keys before {before:?}");
        assert!(new_count > 0, "{name}: rule {rule_id} counted nothing");
    }
    assert_eq!(datapath.counter(&ipv4_key(SYN_RULE_ID, SRC4, 32)).offered, 1, "only the SYN to 22 is a new connection");
    assert_eq!(datapath.counter(&ipv4_key(TCP_RULE_ID, SRC4, 32)).offered, 5);
}

#[test]
fn syn_rule_limits_new_connections_per_window() {
    const SYN_LIMIT: u64 = 3;
    let mut datapath = Datapath::load();
    // Every port, IPv4 and IPv6, with no rule for the other TCP segments.
    datapath.add_rule(RuleMatch::tcp_syn(0), rule(RULE_ID, SYN_LIMIT));
    wait_for_window_room();

    assert_eq!(datapath.run_many(&tcp_frame(SRC4, HTTP_PORT, TCP_SYN), 5), passes_then_drops(3, 5));
    // Segments of connections already open find no rule and pass.
    datapath.assert_verdict(&tcp_frame(SRC4, HTTP_PORT, TCP_ACK), XDP_PASS, Reason::NoRule);
    let syn6 = Frame::ipv6(SRC6, DST6).tcp_with_flags(SRC_PORT, SSH_PORT, TCP_SYN).build();
    assert_eq!(datapath.run_many(&syn6, 4), passes_then_drops(3, 4));
    assert_eq!(datapath.counter(&ipv6_key(RULE_ID, SRC6, 128)).passed, SYN_LIMIT);
}

#[test]
fn syn_rules_counted_in_rule_index() {
    let mut datapath = Datapath::load();
    let spec = |protocol: Protocol, port: Option<u16>, tcp_syn: bool| RuleSpec {
        protocol,
        port,
        rate: HIGH_LIMIT,
        window_ms: 1000,
        ipv4_prefix_len: 32,
        ipv6_prefix_len: 128,
        per_port: false,
        store_down: StoreDownPolicy::Local,
        unit: RateUnit::Packets,
        tcp_syn,
        inner_tier: None,
        shadow: false,
    };
    let mut table = RuleTable::load(&datapath.maps).expect("read RULES");
    let ssh = table.add(&spec(Protocol::Tcp, Some(SSH_PORT), true), &mut datapath.maps).expect("add the SSH SYN rule");
    let any = table.add(&spec(Protocol::Any, None, false), &mut datapath.maps).expect("add the rule for all traffic");
    let index = datapath.maps.rule_index.get(&0, 0).expect("read RULE_INDEX");
    assert_eq!((index.syn_port_rules, index.syn_protocol_rules, index.port_rules, index.any_rules), (1, 0, 0, 1));

    datapath.run(&tcp_frame(SRC4, SSH_PORT, TCP_SYN));
    datapath.run(&tcp_frame(SRC4, SSH_PORT, TCP_ACK));
    let rule_ids: Vec<u32> = datapath.keys().iter().map(|key| key.rule_id).collect();
    assert_eq!(rule_ids, vec![ssh.id, any.id]);
    assert_eq!(ssh.spec.describe_match(), "tcp syn port 22");

    table.remove(ssh.id, &mut datapath.maps).expect("remove the SSH SYN rule");
    let index = datapath.maps.rule_index.get(&0, 0).expect("read RULE_INDEX");
    assert_eq!(index.syn_port_rules, 0);
}

// Tiered keys.

/// Returns a rule that limits each /24 to `outer` and each /32 in it to `inner`.
fn tiered_rule(outer: u64, inner: u64) -> Rule {
    Rule {
        ipv4_prefix_len: 24,
        ipv6_prefix_len: 64,
        inner_tier: 1,
        inner_ipv4_prefix_len: 32,
        inner_ipv6_prefix_len: 128,
        inner_limit: HIGH_LIMIT,
        inner_fallback_limit: inner,
        inner_new_key_limit: inner,
        ..rule(RULE_ID, outer)
    }
}

#[test]
fn tiered_rule_limits_the_prefix_across_sources() {
    let mut datapath = Datapath::load();
    datapath.add_rule(RuleMatch::new(0, 0), tiered_rule(10, 3));
    wait_for_window_room();

    // Five sources of one /24, each at its /32 limit of 3: the /24 passes 10 of the 15.
    let before = datapath.reason_counts();
    let mut passed_per_source = Vec::new();
    for host in 1..=5 {
        let frame = Frame::ipv4(Ipv4Addr::new(198, 51, 100, host), DST4).udp(SRC_PORT, 53).build();
        passed_per_source.push(datapath.run_many(&frame, 3).iter().filter(|action| **action == XDP_PASS).count());
    }
    assert_eq!(passed_per_source, vec![3, 3, 3, 1, 0]);
    assert_eq!(
        counted_reasons(&before, &datapath.reason_counts()),
        vec![(Reason::Passed.name(), 10), (Reason::DroppedLocalLimit.name(), 5)]
    );

    // A packet the /24 dropped counts as offered in its /32, but uses none of its allowance.
    let outer = datapath.counter(&ipv4_key(RULE_ID, SRC4, 24));
    assert_eq!((outer.offered, outer.passed), (15, 10));
    let inner_id = RULE_ID | INNER_TIER_ID_BIT;
    let fifth = datapath.counter(&ipv4_key(inner_id, Ipv4Addr::new(198, 51, 100, 5), 32));
    assert_eq!((fifth.offered, fifth.passed, fifth.fallback_window.current), (3, 0, 0));
    let inner_passed: u64 =
        (1..=5).map(|host| datapath.counter(&ipv4_key(inner_id, Ipv4Addr::new(198, 51, 100, host), 32)).passed).sum();
    assert_eq!(inner_passed, 10);
}

#[test]
fn tiered_rule_limits_each_source_inside() {
    let mut datapath = Datapath::load();
    datapath.add_rule(RuleMatch::new(0, 0), tiered_rule(10, 3));
    wait_for_window_room();

    let frame = Frame::ipv4(SRC4, DST4).udp(SRC_PORT, 53).build();
    assert_eq!(datapath.run_many(&frame, 5), passes_then_drops(3, 5));
    // The /32's drops use none of the /24's allowance: a neighbour still gets its 3.
    let outer = datapath.counter(&ipv4_key(RULE_ID, SRC4, 24));
    assert_eq!((outer.offered, outer.passed, outer.fallback_window.current), (5, 3, 3));
    let neighbour = Frame::ipv4(Ipv4Addr::new(198, 51, 100, 78), DST4).udp(SRC_PORT, 53).build();
    assert_eq!(datapath.run_many(&neighbour, 4), passes_then_drops(3, 4));

    let inner_key = ipv4_key(RULE_ID | INNER_TIER_ID_BIT, SRC4, 32);
    assert_eq!(datapath.keys().len(), 3, "one /24 key and two /32 keys: {:?}", datapath.keys());
    assert_eq!(flow_key_field(&inner_key), "198.51.100.77/32");
    let inner = datapath.counter(&inner_key);
    assert_eq!((inner.offered, inner.passed), (5, 3));
}

#[test]
fn tiered_spec_gives_agent_a_rule_per_tier() {
    let mut datapath = Datapath::load();
    let spec = RuleSpec {
        protocol: Protocol::Udp,
        port: None,
        rate: 100,
        window_ms: 1000,
        ipv4_prefix_len: 24,
        ipv6_prefix_len: 64,
        per_port: false,
        store_down: StoreDownPolicy::Local,
        unit: RateUnit::Packets,
        tcp_syn: false,
        inner_tier: Some(InnerTier { rate: 60, ipv4_prefix_len: 32, ipv6_prefix_len: 128 }),
        shadow: false,
    };
    let mut table = RuleTable::load(&datapath.maps).expect("read RULES");
    let view = table.add(&spec, &mut datapath.maps).expect("add the tiered rule");
    let by_id = table.by_id();
    let outer = by_id[&view.id];
    let inner = by_id[&(view.id | INNER_TIER_ID_BIT)];
    assert_eq!((outer.limit, outer.ipv4_prefix_len), (100, 24));
    assert_eq!((inner.limit, inner.ipv4_prefix_len, inner.ipv6_prefix_len), (60, 32, 128));

    // Removing the rule removes the inner tier's keys too.
    datapath.run(&Frame::ipv4(SRC4, DST4).udp(SRC_PORT, 53).build());
    assert_eq!(datapath.keys().len(), 2);
    table.remove(view.id, &mut datapath.maps).expect("remove the tiered rule");
    assert_eq!(datapath.keys(), vec![]);
}

// Allow and deny lists.

#[test]
fn acl_decides_before_any_rule() {
    let mut datapath = Datapath::load();
    // A rule that drops every packet: fallback limit 0.
    datapath.add_rule(RuleMatch::new(0, 0), rule(RULE_ID, 0));
    let listed = Frame::ipv4(SRC4, DST4).udp(SRC_PORT, 53).build();
    let neighbour = Frame::ipv4(Ipv4Addr::new(198, 51, 100, 78), DST4).udp(SRC_PORT, 53).build();
    let outsider = Frame::ipv4(Ipv4Addr::new(192, 0, 2, 1), DST4).udp(SRC_PORT, 53).build();
    let ipv6 = Frame::ipv6(SRC6, DST6).udp(SRC_PORT, 53).build();
    let cidr = |text: &str| acl::parse_cidr(text).expect("valid CIDR");

    // Deny the /24 but allow one address in it: the longest prefix decides.
    acl::add(&mut datapath.maps, AclList::Deny, cidr("198.51.100.0/24")).expect("deny the /24");
    acl::add(&mut datapath.maps, AclList::Allow, cidr("198.51.100.77")).expect("allow one address");
    acl::add(&mut datapath.maps, AclList::Deny, cidr("2001:db8:1::/48")).expect("deny an IPv6 /48");
    datapath.assert_verdict(&listed, XDP_PASS, Reason::PassedAllowlist);
    datapath.assert_verdict(&neighbour, XDP_DROP, Reason::DroppedDenylist);
    datapath.assert_verdict(&ipv6, XDP_DROP, Reason::DroppedDenylist);
    datapath.assert_verdict(&outsider, XDP_DROP, Reason::DroppedLocalLimit);
    assert_eq!(datapath.keys(), vec![ipv4_key(RULE_ID, Ipv4Addr::new(192, 0, 2, 1), 32)], "listed sources get no key");

    // The same CIDR cannot be in both lists.
    let error = acl::add(&mut datapath.maps, AclList::Allow, cidr("198.51.100.0/24")).unwrap_err().to_string();
    assert!(error.contains("is in the denylist"), "{error}");
    let listed_entries = acl::entries(&datapath.maps).expect("list the ACLs");
    assert_eq!(listed_entries.len(), 3, "{listed_entries:?}");

    // Without the allow entry the address is denied with its /24; without both, the rule decides.
    acl::remove(&mut datapath.maps, AclList::Allow, cidr("198.51.100.77/32")).expect("remove the allow entry");
    datapath.assert_verdict(&listed, XDP_DROP, Reason::DroppedDenylist);
    acl::remove(&mut datapath.maps, AclList::Deny, cidr("198.51.100.0/24")).expect("remove the deny entry");
    let index = datapath.maps.acl_index.get(&0, 0).expect("read ACL_INDEX");
    assert_eq!((index.ipv4_listed, index.ipv6_listed), (0, 1), "flags after the last IPv4 CIDR is gone");
    datapath.assert_verdict(&listed, XDP_DROP, Reason::DroppedLocalLimit);
    let error = acl::remove(&mut datapath.maps, AclList::Deny, cidr("198.51.100.0/24")).unwrap_err().to_string();
    assert!(error.contains("is not in the denylist"), "{error}");
}

#[test]
fn acl_trie_skipped_while_index_says_empty() {
    let mut datapath = Datapath::load();
    // Written behind the index's back, the entry is not looked up: this is what keeps
    // traffic cheap while the lists are empty.
    let key = aya::maps::lpm_trie::Key::new(24, [198, 51, 100, 0]);
    datapath.maps.acl_v4.insert(&key, limiter_common::ACL_DENY, 0).expect("write ACL_V4");
    let frame = Frame::ipv4(SRC4, DST4).udp(SRC_PORT, 53).build();
    datapath.assert_verdict(&frame, XDP_PASS, Reason::NoRule);
    let index = limiter_common::AclIndex { ipv4_listed: 1, ipv6_listed: 0 };
    datapath.maps.acl_index.set(0, index, 0).expect("write ACL_INDEX");
    datapath.assert_verdict(&frame, XDP_DROP, Reason::DroppedDenylist);
}

// Shadow mode.

#[test]
fn shadow_rule_passes_and_counts_would_drop() {
    let mut datapath = Datapath::load();
    datapath.add_rule(RuleMatch::new(IPPROTO_UDP, 0), Rule { shadow: 1, ..rule(RULE_ID, 3) });
    let frame = Frame::ipv4(SRC4, DST4).udp(SRC_PORT, 53).build();
    wait_for_window_room();

    let before = datapath.reason_counts();
    assert_eq!(datapath.run_many(&frame, 5), vec![XDP_PASS; 5]);
    assert_eq!(
        counted_reasons(&before, &datapath.reason_counts()),
        vec![(Reason::Passed.name(), 3), (Reason::PassedShadow.name(), 2)]
    );
    // `passed` contains what enforcing would have passed, so the fleet's counts are the same.
    let counter = datapath.counter(&ipv4_key(RULE_ID, SRC4, 32));
    assert_eq!((counter.offered, counter.passed, counter.would_drop), (5, 3, 2));
    assert_eq!(counter.fallback_window.current, 3);
}

#[test]
fn shadow_tiers_count_refusing_key() {
    let mut datapath = Datapath::load();
    let shadow = Rule { shadow: 1, unit: UNIT_BYTES, ..tiered_rule(100_000, 1000) };
    datapath.add_rule(RuleMatch::new(0, 0), shadow);
    let frame = udp_frame_of_len(SRC4, 300);
    wait_for_window_room();

    let before = datapath.reason_counts();
    assert_eq!(datapath.run_many(&frame, 5), vec![XDP_PASS; 5]);
    assert_eq!(
        counted_reasons(&before, &datapath.reason_counts()),
        vec![(Reason::Passed.name(), 3), (Reason::PassedShadow.name(), 2)]
    );
    let outer = datapath.counter(&ipv4_key(RULE_ID, SRC4, 24));
    assert_eq!((outer.offered, outer.passed, outer.would_drop), (1500, 900, 0));
    let inner = datapath.counter(&ipv4_key(RULE_ID | INNER_TIER_ID_BIT, SRC4, 32));
    assert_eq!((inner.offered, inner.passed, inner.would_drop), (1500, 900, 600));
}
