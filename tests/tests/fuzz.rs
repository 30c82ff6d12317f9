//! Differential fuzzing of the XDP parser: random and mutated frames run through the loaded
//! program with BPF_PROG_TEST_RUN, and each verdict is compared with a reference parser built
//! on `etherparse` that applies the limiter's documented parsing rules.
//!
//! For every frame the test reads which `STATS` reason grew and, for `passed`, checks that
//! `COUNTERS` contains exactly the key the reference derives, then deletes that key so the map
//! stays empty. Every IP protocol has a rule of its own, whose id is derived from the protocol
//! number, so the key's rule id shows which protocol the program found. No rule ever drops,
//! so the reason depends on parsing alone.
//!
//! The seed is fixed unless `LIMITER_FUZZ_SEED` sets another (`LIMITER_FUZZ_SEED=random`
//! takes one from the clock), so the test suite runs the same frames every time; explore
//! with other seeds by hand. `LIMITER_FUZZ_FRAMES` sets the number of frames. Frame `index`
//! of a run is generated from the seed and the index alone, so a reported frame can be
//! regenerated on its own. Needs root.

use std::{
    os::fd::AsFd as _,
    time::{Duration, Instant},
};

use aya::Ebpf;
use etherparse::{
    EtherType, Ethernet2Header, Ethernet2HeaderSlice, IcmpEchoHeader, Icmpv4Header, Icmpv4Type, Icmpv6Header,
    Icmpv6Type, IpAuthHeader, IpAuthHeaderSlice, IpFragOffset, IpNumber, Ipv4Header, Ipv4HeaderSlice, Ipv6FlowLabel,
    Ipv6FragmentHeader, Ipv6FragmentHeaderSlice, Ipv6Header, Ipv6HeaderSlice, Ipv6RawExtHeader, Ipv6RawExtHeaderSlice,
    SingleVlanHeader, SingleVlanHeaderSlice, TcpHeader, UdpHeader, UdpHeaderSlice, VlanId, VlanPcp, err::ip_auth,
};
use limiter_common::{
    FAMILY_IPV4, FAMILY_IPV6, FlowKey, IPPROTO_TCP, IPPROTO_UDP, MAX_IPV6_EXTENSION_HEADERS, MAX_VLAN_TAGS,
    MAX_WINDOW_NS, REASON_COUNT, Reason, Rule, RuleMatch, STORE_DOWN_LOCAL,
};
use limiter_tests::{
    PinDir,
    test_run::{
        ETHERNET_LEN, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_QINQ, ETHERTYPE_VLAN, IPPROTO_SCTP, XDP_DROP, XDP_PASS,
        run_xdp, run_xdp_with_linear_len,
    },
};
use limiter_user::datapath::{self, Maps};
use rand::{Rng as _, RngExt as _, SeedableRng as _, rngs::StdRng};

/// Frames run when `LIMITER_FUZZ_FRAMES` is unset. The test ran about 70,000 frames/s on
/// a 2-core VM on Linux 6.18 (a release build of this test, pinned to one CPU), so this
/// default takes about 15 s there.
const DEFAULT_FRAMES: u64 = 1_000_000;

/// Seed when `LIMITER_FUZZ_SEED` is unset.
const DEFAULT_SEED: u64 = 0x5eed_2026_1204;
/// Wall-clock bound of one run, whatever the frame count. A run that reaches it stops early
/// and prints how many frames it ran.
const MAX_RUN_TIME: Duration = Duration::from_secs(30 * 60);
/// Disagreements printed in full before the test stops looking for more.
const MAX_REPORTED_DISAGREEMENTS: usize = 20;

/// Rule id of protocol 0's rule, which is also the rule for any protocol. Protocol `p` gets
/// this id plus `p`.
const PROTOCOL_RULE_ID_BASE: u32 = 1000;
/// Minimum number of frames before the test requires every parsing reason to have been seen.
const MIN_FRAMES_FOR_COVERAGE: u64 = 10_000;
/// Reasons the generator must reach in a run of `MIN_FRAMES_FOR_COVERAGE` frames or more,
/// so that a generator that stopped producing some kind of frame fails the test.
const COVERED_REASONS: [Reason; 5] =
    [Reason::Passed, Reason::NotIp, Reason::Malformed, Reason::VlanTooDeep, Reason::Ipv6ChainTooLong];
/// Far above the number of packets any one key can see in a run, so nothing is dropped for
/// being over a limit.
const NEVER_REACHED_LIMIT: u64 = 1 << 40;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTHENTICATION: u8 = 51;
const IPV6_DESTINATION_OPTIONS: u8 = 60;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

/// Byte values a field mutation writes besides random ones: header lengths around the
/// limits, the IP versions, extension header numbers, transport protocols and the first
/// bytes of the VLAN and IP EtherTypes.
const INTERESTING_BYTES: [u8; 22] =
    [0, 1, 2, 3, 4, 5, 6, 15, 0x40, 0x45, 0x4f, 0x60, 0x86, 0xdd, 0x81, 0x88, 0xa8, 17, 43, 44, 51, 60];

#[test]
fn parser_agrees_with_etherparse_reference() {
    let seed = match std::env::var("LIMITER_FUZZ_SEED").as_deref() {
        Ok("random") => seed_from_clock(),
        _ => env_u64("LIMITER_FUZZ_SEED").unwrap_or(DEFAULT_SEED),
    };
    let frames = env_u64("LIMITER_FUZZ_FRAMES").unwrap_or(DEFAULT_FRAMES);
    println!("fuzz: seed {seed} (replay with LIMITER_FUZZ_SEED={seed}), {frames} frames");

    let cpu = pin_to_current_cpu();
    let mut datapath = Datapath::load();
    datapath.add_protocol_rules();

    let started = Instant::now();
    let mut stats = datapath.reason_counts();
    let mut tally = [0u64; REASON_COUNT as usize];
    let mut disagreements = Vec::new();
    let mut user_space_disagreements = Vec::new();
    let mut ran = 0;
    for index in 0..frames {
        if started.elapsed() > MAX_RUN_TIME {
            println!("fuzz: stopped after {MAX_RUN_TIME:?}, {ran} of {frames} frames run");
            break;
        }
        let frame = generate_frame(seed, index);
        let expected = reference_outcome(&frame);
        // `limiter explain --hex` parses frames in user space, which must agree as well.
        let user_space = user_space_outcome(&frame);
        if user_space != expected && user_space_disagreements.len() < MAX_REPORTED_DISAGREEMENTS {
            user_space_disagreements.push(Disagreement { index, frame: frame.clone(), expected: expected.clone(), actual: user_space });
        }
        let actual = datapath.run_and_observe(&frame, &mut stats);
        ran += 1;
        if let Some(reason) = actual.reason {
            tally[reason as usize] += 1;
        }
        if actual != expected {
            disagreements.push(Disagreement { index, frame, expected, actual });
            datapath.clear_counters();
            if disagreements.len() == MAX_REPORTED_DISAGREEMENTS {
                break;
            }
        }
    }

    let elapsed = started.elapsed();
    println!(
        "fuzz: {ran} frames in {:.1} s on CPU {cpu}: {:.0} frames/s",
        elapsed.as_secs_f64(),
        ran as f64 / elapsed.as_secs_f64()
    );
    for reason in Reason::ALL {
        if tally[reason as usize] > 0 {
            println!("fuzz:   {:<20} {}", reason.name(), tally[reason as usize]);
        }
    }
    for disagreement in &disagreements {
        println!("{}", disagreement.describe(seed));
    }
    assert!(
        disagreements.is_empty(),
        "{} frames (of {ran}, seed {seed}) where the program and the reference disagree, listed above",
        disagreements.len()
    );
    for disagreement in &user_space_disagreements {
        println!("user-space parser {}", disagreement.describe(seed));
    }
    assert!(
        user_space_disagreements.is_empty(),
        "frames (seed {seed}) where limiter_user::packet::parse_frame and the reference disagree, listed above"
    );
    if ran >= MIN_FRAMES_FOR_COVERAGE {
        for reason in COVERED_REASONS {
            assert!(tally[reason as usize] > 0, "no frame of {ran} was counted as {}", reason.name());
        }
    }
}

/// A later fragment whose fragment header is followed by a second one with offset 0 still
/// carries no transport header, so the program must not read a port from its payload.
#[test]
fn ipv6_nested_later_fragment_has_no_port() {
    let udp = UdpHeader { source_port: 40_000, destination_port: 53, length: 8, checksum: 0 };
    let inner = Ipv6FragmentHeader::new(IpNumber(IPPROTO_UDP), IpFragOffset::ZERO, false, 1);
    let outer_offset = IpFragOffset::try_new(185).expect("offset below 2^13");
    let outer = Ipv6FragmentHeader::new(IpNumber(IPV6_FRAGMENT), outer_offset, true, 1);
    let ip = Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::ZERO,
        payload_length: (2 * Ipv6FragmentHeader::LEN + UdpHeader::LEN) as u16,
        next_header: IpNumber(IPV6_FRAGMENT),
        hop_limit: 64,
        source: [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7],
        destination: [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    };
    let ethernet = Ethernet2Header { source: [2; 6], destination: [4; 6], ether_type: EtherType(ETHERTYPE_IPV6) };
    let mut frame = ethernet.to_bytes().to_vec();
    frame.extend_from_slice(&ip.to_bytes());
    frame.extend_from_slice(&outer.to_bytes());
    frame.extend_from_slice(&inner.to_bytes());
    frame.extend_from_slice(&udp.to_bytes());

    let expected = reference_outcome(&frame);
    assert_eq!(expected.key.map(|key| key.dst_port), Some(0), "reference port of a later fragment");
    let mut datapath = Datapath::load();
    datapath.add_protocol_rules();
    let mut stats = datapath.reason_counts();
    let actual = datapath.run_and_observe(&frame, &mut stats);
    assert_eq!(actual, expected, "program (left) and reference (right) on a nested later fragment");
}

/// What one frame led to: the reason counted and, for `passed`, the key stored in `COUNTERS`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Outcome {
    /// `None` when the program counted no reason, or more than one.
    reason: Option<Reason>,
    key: Option<FlowKey>,
    /// Set by the program side only: what went wrong beyond the reason and key.
    anomaly: Option<String>,
}

impl Outcome {
    fn from_reason(reason: Reason) -> Self {
        Self { reason: Some(reason), key: None, anomaly: None }
    }
}

struct Disagreement {
    index: u64,
    frame: Vec<u8>,
    expected: Outcome,
    actual: Outcome,
}

impl Disagreement {
    fn describe(&self, seed: u64) -> String {
        let hex: String = self.frame.iter().map(|byte| format!("{byte:02x}")).collect();
        format!(
            "disagreement: seed {seed}, frame {index}, {len} bytes\n  frame:     {hex}\n  reference: {expected:?}\n  program:   {actual:?}",
            index = self.index,
            len = self.frame.len(),
            expected = self.expected,
            actual = self.actual,
        )
    }
}

// The program side.

/// One loaded copy of the program and its maps, pinned in a folder of its own.
struct Datapath {
    ebpf: Ebpf,
    maps: Maps,
    _pin_dir: PinDir,
}

impl Datapath {
    fn load() -> Self {
        let pin_dir = PinDir::new();
        // Every passed key is deleted after its check, so the map contains one key at a time.
        let ebpf = datapath::load(&pin_dir.path, 1024)
            .unwrap_or_else(|error| panic!("failed to load the XDP program (run as root): {error:#}"));
        let maps = Maps::open_dir(&pin_dir.path)
            .unwrap_or_else(|error| panic!("failed to open the maps pinned in {}: {error:#}", pin_dir.path.display()));
        Self { ebpf, maps, _pin_dir: pin_dir }
    }

    /// Adds a rule for each IP protocol, and for protocol 0 the rule for any protocol, all
    /// keyed by the whole source address and the destination port, that never drop. The
    /// 256 rules fill `RULES` exactly.
    fn add_protocol_rules(&mut self) {
        for protocol in 0..=u8::MAX {
            let rule = Rule { id: protocol_rule_id(protocol), ..any_port_rule() };
            self.maps
                .rules
                .insert(RuleMatch::new(protocol, 0), rule, 0)
                .unwrap_or_else(|error| panic!("failed to write RULES for protocol {protocol}: {error}"));
        }
    }

    /// Runs the program on `frame` and returns the reason it counted and the key it stored.
    /// `stats` contains `STATS` as of the previous frame and is updated to the current counts.
    fn run_and_observe(&mut self, frame: &[u8], stats: &mut [u64; REASON_COUNT as usize]) -> Outcome {
        let action = self.run(frame);
        let after = self.reason_counts();
        let grown: Vec<(Reason, u64)> = Reason::ALL
            .iter()
            .map(|reason| (*reason, after[*reason as usize] - stats[*reason as usize]))
            .filter(|(_, growth)| *growth > 0)
            .collect();
        *stats = after;

        let [(reason, 1)] = grown[..] else {
            return Outcome { reason: None, key: None, anomaly: Some(format!("STATS grew by {grown:?}")) };
        };
        let expected_action = if reason.drops() { XDP_DROP } else { XDP_PASS };
        if action != expected_action {
            let anomaly = format!("action {action} for reason {}", reason.name());
            return Outcome { reason: Some(reason), key: None, anomaly: Some(anomaly) };
        }
        if reason != Reason::Passed {
            return Outcome::from_reason(reason);
        }
        self.take_only_key(reason)
    }

    /// Removes and returns the one key in `COUNTERS`, which must have counted one packet.
    fn take_only_key(&mut self, reason: Reason) -> Outcome {
        let keys = self.keys();
        let [key] = keys[..] else {
            self.clear_counters();
            return Outcome { reason: Some(reason), key: None, anomaly: Some(format!("COUNTERS holds {keys:?}")) };
        };
        let counters =
            self.maps.counters.get(&key, 0).unwrap_or_else(|error| panic!("failed to read COUNTERS[{key:?}]: {error}"));
        let offered: u64 = counters.iter().map(|counter| counter.offered).sum();
        self.maps.counters.remove(&key).unwrap_or_else(|error| panic!("failed to delete COUNTERS[{key:?}]: {error}"));
        let anomaly = (offered != 1).then(|| format!("key offered {offered} packets, expected 1"));
        Outcome { reason: Some(reason), key: Some(key), anomaly }
    }

    fn run(&mut self, frame: &[u8]) -> u32 {
        let program = datapath::xdp_program(&mut self.ebpf).unwrap_or_else(|error| panic!("{error:#}"));
        let fd = program.fd().unwrap_or_else(|error| panic!("the loaded program has no fd: {error}"));
        let output = if frame.len() >= ETHERNET_LEN {
            run_xdp(fd.as_fd(), frame, 1)
        } else {
            // The kernel rejects test frames shorter than an Ethernet header, so a shorter
            // frame is passed as the linear part of a padded multi-buffer frame, the only
            // part the program reads.
            let mut padded = frame.to_vec();
            padded.resize(ETHERNET_LEN, 0);
            run_xdp_with_linear_len(fd.as_fd(), &padded, frame.len() as u32, 1)
        };
        output.unwrap_or_else(|error| panic!("{error}")).action
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

    fn keys(&self) -> Vec<FlowKey> {
        self.maps
            .counters
            .keys()
            .map(|key| key.unwrap_or_else(|error| panic!("failed to walk COUNTERS: {error}")))
            .collect()
    }

    fn clear_counters(&mut self) {
        for key in self.keys() {
            // A key that the LRU map evicted meanwhile is already gone.
            let _ = self.maps.counters.remove(&key);
        }
    }
}

fn protocol_rule_id(protocol: u8) -> u32 {
    PROTOCOL_RULE_ID_BASE + u32::from(protocol)
}

/// Returns a rule keyed by the whole source address and the destination port whose limits
/// no run reaches.
fn any_port_rule() -> Rule {
    Rule {
        id: 0,
        ipv4_prefix_len: 32,
        ipv6_prefix_len: 128,
        key_by_dst_port: 1,
        store_down_policy: STORE_DOWN_LOCAL,
        limit: NEVER_REACHED_LIMIT,
        fallback_limit: NEVER_REACHED_LIMIT,
        new_key_limit: NEVER_REACHED_LIMIT,
        window_ns: MAX_WINDOW_NS,
        ..Rule::default()
    }
}

// The reference side.

/// Fields the limiter keys on, as the reference parser finds them.
struct ParsedPacket {
    family: u8,
    src_addr: [u8; 16],
    protocol: u8,
    dst_port: u16,
}

/// Returns the reason and key the program should produce for `frame` under the rules of
/// `Datapath::add_protocol_rules`.
fn reference_outcome(frame: &[u8]) -> Outcome {
    match reference_parse(frame) {
        Ok(packet) => {
            let key = FlowKey {
                rule_id: protocol_rule_id(packet.protocol),
                dst_port: packet.dst_port,
                family: packet.family,
                prefix_len: if packet.family == FAMILY_IPV4 { 32 } else { 128 },
                addr: packet.src_addr,
            };
            Outcome { reason: Some(Reason::Passed), key: Some(key), anomaly: None }
        }
        Err(reason) => Outcome::from_reason(reason),
    }
}

/// Returns the outcome the user-space parser of `limiter explain --hex` derives for `frame`
/// under the rules of `Datapath::add_protocol_rules`.
fn user_space_outcome(frame: &[u8]) -> Outcome {
    match limiter_user::packet::parse_frame(frame) {
        Ok(fields) => {
            let family = fields.family();
            let key = FlowKey {
                rule_id: protocol_rule_id(fields.protocol),
                dst_port: fields.dst_port,
                family,
                prefix_len: if family == FAMILY_IPV4 { 32 } else { 128 },
                addr: fields.src_bytes(),
            };
            Outcome { reason: Some(Reason::Passed), key: Some(key), anomaly: None }
        }
        Err(reason) => Outcome::from_reason(reason),
    }
}

/// Parses `frame` with etherparse's header slices, applying the limiter's rules where they
/// differ from etherparse's.
///
/// Only 0x8100 and 0x88A8 are VLAN tags, and at most `MAX_VLAN_TAGS` are skipped. The IPv4
/// total length must cover the header, but neither it nor the IPv6 payload length is checked
/// against the frame. At most `MAX_IPV6_EXTENSION_HEADERS` extension headers are walked, and
/// a transport header needs only its fixed part inside the frame.
fn reference_parse(frame: &[u8]) -> Result<ParsedPacket, Reason> {
    let ethernet = Ethernet2HeaderSlice::from_slice(frame).map_err(|_| Reason::Malformed)?;
    let mut ether_type = ethernet.ether_type();
    let mut offset = Ethernet2Header::LEN;

    let mut tags = 0;
    while ether_type == EtherType(ETHERTYPE_VLAN) || ether_type == EtherType(ETHERTYPE_QINQ) {
        // The program gives up before reading a third tag, so its bytes need not exist.
        if tags == MAX_VLAN_TAGS {
            return Err(Reason::VlanTooDeep);
        }
        let tag = SingleVlanHeaderSlice::from_slice(&frame[offset..]).map_err(|_| Reason::Malformed)?;
        ether_type = tag.ether_type();
        offset += SingleVlanHeader::LEN;
        tags += 1;
    }

    match ether_type {
        EtherType(ETHERTYPE_IPV4) => reference_parse_ipv4(frame, offset),
        EtherType(ETHERTYPE_IPV6) => reference_parse_ipv6(frame, offset),
        _ => Err(Reason::NotIp),
    }
}

fn reference_parse_ipv4(frame: &[u8], offset: usize) -> Result<ParsedPacket, Reason> {
    // Rejects a version other than 4, an IHL below 5 and options past the frame.
    let ip = Ipv4HeaderSlice::from_slice(&frame[offset..]).map_err(|_| Reason::Malformed)?;
    let header_len = ip.slice().len();
    if usize::from(ip.total_len()) < header_len {
        return Err(Reason::Malformed);
    }

    let mut src_addr = [0; 16];
    src_addr[..4].copy_from_slice(&ip.source());
    let protocol = ip.protocol().0;
    let dst_port =
        if ip.fragments_offset().value() == 0 { reference_dst_port(frame, offset + header_len, protocol)? } else { 0 };
    Ok(ParsedPacket { family: FAMILY_IPV4, src_addr, protocol, dst_port })
}

fn reference_parse_ipv6(frame: &[u8], offset: usize) -> Result<ParsedPacket, Reason> {
    let ip = Ipv6HeaderSlice::from_slice(&frame[offset..]).map_err(|_| Reason::Malformed)?;
    let mut next_header = ip.next_header().0;
    let mut offset = offset + Ipv6Header::LEN;
    let mut later_fragment = false;

    for _ in 0..MAX_IPV6_EXTENSION_HEADERS {
        let rest = &frame[offset..];
        let header_len = match next_header {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DESTINATION_OPTIONS => {
                let extension = Ipv6RawExtHeaderSlice::from_slice(rest).map_err(|_| Reason::Malformed)?;
                next_header = extension.next_header().0;
                extension.slice().len()
            }
            IPV6_AUTHENTICATION => {
                let (next, header_len) = reference_authentication_header(rest)?;
                next_header = next;
                header_len
            }
            IPV6_FRAGMENT => {
                let fragment = Ipv6FragmentHeaderSlice::from_slice(rest).map_err(|_| Reason::Malformed)?;
                next_header = fragment.next_header().0;
                // Any fragment header with a nonzero offset makes this a later fragment, whose
                // payload starts inside the transport data of the original packet.
                later_fragment |= fragment.fragment_offset().value() != 0;
                Ipv6FragmentHeader::LEN
            }
            _ => break,
        };
        offset += header_len;
    }

    if is_ipv6_extension(next_header) {
        return Err(Reason::Ipv6ChainTooLong);
    }
    let dst_port = if later_fragment { 0 } else { reference_dst_port(frame, offset, next_header)? };
    Ok(ParsedPacket { family: FAMILY_IPV6, src_addr: ip.source(), protocol: next_header, dst_port })
}

/// Returns the next header and length of the authentication header at the start of `rest`.
///
/// etherparse rejects a payload length of 0, and needs 12 bytes before it reads the length.
/// The program applies the length formula (n + 2) * 4 to every value, so it skips 8 bytes
/// for 0, and the reference does the same.
fn reference_authentication_header(rest: &[u8]) -> Result<(u8, usize), Reason> {
    match IpAuthHeaderSlice::from_slice(rest) {
        Ok(header) => Ok((header.next_header().0, header.slice().len())),
        Err(ip_auth::HeaderSliceError::Content(ip_auth::HeaderError::ZeroPayloadLen)) => Ok((rest[0], 8)),
        Err(_) if rest.len() >= 8 && rest[1] == 0 => Ok((rest[0], 8)),
        Err(_) => Err(Reason::Malformed),
    }
}

fn is_ipv6_extension(next_header: u8) -> bool {
    matches!(
        next_header,
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_FRAGMENT | IPV6_AUTHENTICATION | IPV6_DESTINATION_OPTIONS
    )
}

/// Returns the destination port of a TCP or UDP header at `offset`, and 0 for any other
/// protocol.
///
/// Only the fixed part of a TCP header must be inside the frame. etherparse's `TcpHeaderSlice`
/// also rejects a data offset below 5 and options past the frame, which the program does not
/// look at, so the TCP port is read from the fixed part directly.
fn reference_dst_port(frame: &[u8], offset: usize, protocol: u8) -> Result<u16, Reason> {
    let rest = &frame[offset.min(frame.len())..];
    match protocol {
        IPPROTO_TCP => match rest {
            [_, _, high, low, ..] if rest.len() >= TcpHeader::MIN_LEN => Ok(u16::from_be_bytes([*high, *low])),
            _ => Err(Reason::Malformed),
        },
        IPPROTO_UDP => {
            let udp = UdpHeaderSlice::from_slice(rest).map_err(|_| Reason::Malformed)?;
            Ok(udp.destination_port())
        }
        _ => Ok(0),
    }
}

// Frame generation.

/// A generated frame and the offsets of the header fields worth mutating.
struct GeneratedFrame {
    bytes: Vec<u8>,
    fields: Vec<usize>,
}

/// Builds frame `index` of the run with `seed`: a valid frame, a mutated valid frame, or
/// random bytes.
fn generate_frame(seed: u64, index: u64) -> Vec<u8> {
    // Golden-ratio stride, so neighbouring indexes get unrelated generator states.
    let mut rng = StdRng::seed_from_u64(seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    match rng.random_range(0..100) {
        0..40 => build_valid_frame(&mut rng).bytes,
        40..85 => {
            let mut frame = build_valid_frame(&mut rng);
            for _ in 0..rng.random_range(1..=3) {
                mutate(&mut rng, &mut frame);
            }
            frame.bytes
        }
        _ => random_bytes(&mut rng),
    }
}

/// Returns up to 200 random bytes, whose EtherType is often set to IP or VLAN so the
/// program parses past the Ethernet header.
fn random_bytes(rng: &mut StdRng) -> Vec<u8> {
    let mut bytes = vec![0; rng.random_range(0..=200)];
    rng.fill_bytes(&mut bytes);
    if bytes.len() >= ETHERNET_LEN && rng.random_bool(0.7) {
        let ether_type = [ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_VLAN, ETHERTYPE_QINQ][rng.random_range(0..4)];
        bytes[12..14].copy_from_slice(&ether_type.to_be_bytes());
    }
    bytes
}

/// Applies one mutation: truncation, a random byte, or an interesting value in a header field.
fn mutate(rng: &mut StdRng, frame: &mut GeneratedFrame) {
    let len = frame.bytes.len();
    match rng.random_range(0..10) {
        0..2 => frame.bytes.truncate(rng.random_range(0..=len)),
        2..4 if len > 0 => frame.bytes[rng.random_range(0..len)] = rng.random(),
        _ => {
            let fields: Vec<usize> = frame.fields.iter().copied().filter(|offset| *offset < len).collect();
            if fields.is_empty() {
                return;
            }
            let offset = fields[rng.random_range(0..fields.len())];
            frame.bytes[offset] = if rng.random_bool(0.7) {
                INTERESTING_BYTES[rng.random_range(0..INTERESTING_BYTES.len())]
            } else {
                rng.random()
            };
        }
    }
}

/// Builds a valid Ethernet frame with 0 to 3 VLAN tags (3 being one too many for the
/// program) and an IPv4 or IPv6 packet.
fn build_valid_frame(rng: &mut StdRng) -> GeneratedFrame {
    let mut frame = GeneratedFrame { bytes: Vec::with_capacity(512), fields: Vec::new() };
    let ip_ether_type = if rng.random_bool(0.5) { ETHERTYPE_IPV4 } else { ETHERTYPE_IPV6 };
    let tags = [0, 0, 0, 1, 1, 2, 2, 3][rng.random_range(0..8)];
    let tpids: Vec<u16> =
        (0..tags).map(|_| if rng.random_bool(0.5) { ETHERTYPE_VLAN } else { ETHERTYPE_QINQ }).collect();

    let ethernet = Ethernet2Header {
        source: rng.random(),
        destination: rng.random(),
        ether_type: EtherType(tpids.first().copied().unwrap_or(ip_ether_type)),
    };
    frame.fields.extend([12, 13]);
    frame.bytes.extend_from_slice(&ethernet.to_bytes());
    for (position, _) in tpids.iter().enumerate() {
        let ether_type = tpids.get(position + 1).copied().unwrap_or(ip_ether_type);
        let tag = SingleVlanHeader {
            pcp: VlanPcp::try_new(rng.random_range(0..8)).expect("PCP below 8"),
            drop_eligible_indicator: rng.random(),
            vlan_id: VlanId::try_new(rng.random_range(0..=VlanId::MAX_U16)).expect("VLAN id in range"),
            ether_type: EtherType(ether_type),
        };
        let start = frame.bytes.len();
        frame.fields.extend([start + 2, start + 3]);
        frame.bytes.extend_from_slice(&tag.to_bytes());
    }

    if ip_ether_type == ETHERTYPE_IPV4 {
        append_ipv4(rng, &mut frame);
    } else {
        append_ipv6(rng, &mut frame);
    }
    frame
}

/// Returns a transport protocol number and its header plus payload: TCP, UDP, ICMP or
/// ICMPv6 as `icmp` selects, SCTP, or another protocol with random bytes. The ports are the
/// first four bytes for TCP, UDP and SCTP.
fn build_transport(rng: &mut StdRng, icmp: u8) -> (u8, Vec<u8>) {
    let mut payload = vec![0; rng.random_range(0..48)];
    rng.fill_bytes(&mut payload);
    let (protocol, mut bytes) = match rng.random_range(0..10) {
        0..3 => {
            let mut tcp = TcpHeader::new(rng.random(), rng.random(), rng.random(), rng.random());
            tcp.syn = rng.random();
            if rng.random_bool(0.3) {
                let mut options = vec![1u8; 4 * rng.random_range(1..=10)];
                options[0] = 2;
                options[1] = 4;
                tcp.set_options_raw(&options).expect("options are a multiple of 4 bytes, at most 40");
            }
            (IPPROTO_TCP, tcp.to_bytes().to_vec())
        }
        3..6 => {
            let udp = UdpHeader {
                source_port: rng.random(),
                destination_port: rng.random(),
                length: (UdpHeader::LEN + payload.len()) as u16,
                checksum: 0,
            };
            (IPPROTO_UDP, udp.to_bytes().to_vec())
        }
        6..8 => {
            let echo = IcmpEchoHeader { id: rng.random(), seq: rng.random() };
            if icmp == ICMP {
                (ICMP, Icmpv4Header::new(Icmpv4Type::EchoRequest(echo)).to_bytes().to_vec())
            } else {
                (ICMPV6, Icmpv6Header::new(Icmpv6Type::EchoRequest(echo)).to_bytes().to_vec())
            }
        }
        8 => {
            // etherparse has no SCTP type. The common header is source port, destination
            // port, verification tag and checksum.
            let mut sctp = vec![0; 12];
            rng.fill_bytes(&mut sctp);
            (IPPROTO_SCTP, sctp)
        }
        _ => {
            let protocol = loop {
                let protocol: u8 = rng.random();
                if !is_ipv6_extension(protocol) {
                    break protocol;
                }
            };
            (protocol, Vec::new())
        }
    };
    bytes.extend_from_slice(&payload);
    (protocol, bytes)
}

fn append_ipv4(rng: &mut StdRng, frame: &mut GeneratedFrame) {
    let (protocol, transport) = build_transport(rng, ICMP);
    let mut ip = Ipv4Header::new(transport.len() as u16, rng.random(), IpNumber(protocol), rng.random(), rng.random())
        .expect("payload far below 64 KiB");
    if rng.random_bool(0.3) {
        // NOP options, 4 to 40 bytes.
        let options = vec![1u8; 4 * rng.random_range(1..=10)];
        ip.options = options[..].try_into().expect("options are a multiple of 4 bytes, at most 40");
        ip.total_len += options.len() as u16;
    }
    if rng.random_bool(0.2) {
        let offset = if rng.random_bool(0.5) { 0 } else { rng.random_range(1..=IpFragOffset::MAX_U16) };
        ip.fragment_offset = IpFragOffset::try_new(offset).expect("offset below 2^13");
        ip.more_fragments = rng.random();
        ip.dont_fragment = false;
    }
    ip.header_checksum = ip.calc_header_checksum();

    let start = frame.bytes.len();
    // Version and IHL, total length, flags and fragment offset, protocol.
    frame.fields.extend([start, start + 2, start + 3, start + 6, start + 7, start + 9]);
    frame.bytes.extend_from_slice(&ip.to_bytes());
    push_transport(frame, &transport);
}

/// An IPv6 extension header the generator can chain.
#[derive(Clone, Copy)]
enum Extension {
    Options(u8),
    Authentication,
    Fragment,
}

fn append_ipv6(rng: &mut StdRng, frame: &mut GeneratedFrame) {
    let (protocol, transport) = build_transport(rng, ICMPV6);
    // Up to 8 headers, so some chains exceed the 6 the program walks.
    let chain_len = [0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8][rng.random_range(0..11)];
    let chain: Vec<Extension> = (0..chain_len)
        .map(|_| match rng.random_range(0..6) {
            0 => Extension::Options(IPV6_HOP_BY_HOP),
            1 => Extension::Options(IPV6_ROUTING),
            2 => Extension::Options(IPV6_DESTINATION_OPTIONS),
            3 => Extension::Authentication,
            _ => Extension::Fragment,
        })
        .collect();
    let numbers: Vec<u8> = chain
        .iter()
        .map(|extension| match extension {
            Extension::Options(number) => *number,
            Extension::Authentication => IPV6_AUTHENTICATION,
            Extension::Fragment => IPV6_FRAGMENT,
        })
        .chain([protocol])
        .collect();

    let mut extensions = Vec::new();
    let mut extension_fields = Vec::new();
    for (position, extension) in chain.iter().enumerate() {
        let next_header = IpNumber(numbers[position + 1]);
        let start = extensions.len();
        match extension {
            Extension::Options(_) => {
                let mut payload = vec![0; 6 + 8 * rng.random_range(0..4)];
                rng.fill_bytes(&mut payload);
                let header = Ipv6RawExtHeader::new_raw(next_header, &payload).expect("payload of 6 + 8n bytes");
                extensions.extend_from_slice(&header.to_bytes());
                extension_fields.extend([start, start + 1]);
            }
            Extension::Authentication => {
                let mut icv = vec![0; 4 * rng.random_range(0..5)];
                rng.fill_bytes(&mut icv);
                let header = IpAuthHeader::new(next_header, rng.random(), rng.random(), &icv).expect("ICV of 4n bytes");
                extensions.extend_from_slice(&header.to_bytes());
                extension_fields.extend([start, start + 1]);
            }
            Extension::Fragment => {
                let offset = if rng.random_bool(0.5) { 0 } else { rng.random_range(1..=IpFragOffset::MAX_U16) };
                let header = Ipv6FragmentHeader::new(
                    next_header,
                    IpFragOffset::try_new(offset).expect("offset below 2^13"),
                    rng.random(),
                    rng.random(),
                );
                extensions.extend_from_slice(&header.to_bytes());
                extension_fields.extend([start, start + 2, start + 3]);
            }
        }
    }

    let ip = Ipv6Header {
        traffic_class: rng.random(),
        flow_label: Ipv6FlowLabel::try_new(rng.random_range(0..=Ipv6FlowLabel::MAX_U32)).expect("20-bit label"),
        payload_length: (extensions.len() + transport.len()) as u16,
        next_header: IpNumber(numbers[0]),
        hop_limit: rng.random(),
        source: rng.random(),
        destination: rng.random(),
    };
    let start = frame.bytes.len();
    // Version, payload length, next header.
    frame.fields.extend([start, start + 4, start + 5, start + 6]);
    frame.bytes.extend_from_slice(&ip.to_bytes());
    let extensions_start = frame.bytes.len();
    frame.fields.extend(extension_fields.iter().map(|offset| extensions_start + offset));
    frame.bytes.extend_from_slice(&extensions);
    push_transport(frame, &transport);
}

/// Appends a transport header, marking its ports and the TCP data offset as fields.
fn push_transport(frame: &mut GeneratedFrame, transport: &[u8]) {
    let start = frame.bytes.len();
    frame.fields.extend([start, start + 1, start + 2, start + 3, start + 12]);
    frame.bytes.extend_from_slice(transport);
}

// Process setup.

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(value.parse().unwrap_or_else(|error| panic!("{name}={value:?} is not an unsigned integer: {error}")))
}

fn seed_from_clock() -> u64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_else(|error| panic!("the system clock is before 1970: {error}"));
    since_epoch.as_nanos() as u64
}

/// Pins the calling thread to the CPU it runs on and returns that CPU, so the per-CPU map
/// slots the program writes stay on one CPU for the whole run.
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
