//! The packet path on a veth pair: how many packets per second each per-source limiter
//! disposes of when one sender floods it from many sources, against a bare XDP_DROP program.
//!
//! Both ends of the pair live in namespaces of their own, so the nftables and iptables rules
//! and the XDP programs touch nothing outside them. A sender thread in the first namespace
//! writes prebuilt IPv4/UDP frames from `SOURCES` addresses, round robin, through an AF_PACKET
//! socket as fast as it can for `SECONDS`. On a veth pair the receiving side runs in the
//! softirq of the sending CPU, so the sender's rate is the rate of the whole path, and a more
//! expensive receiver shows as fewer packets sent.
//!
//! Receivers, one at a time, on the second end:
//! - `xdp-drop`: XDP_DROP in native mode, the floor.
//! - the limiter in native mode, one rule for all traffic keyed by /32 at `LIMIT_PER_SECOND`,
//!   without an agent, so the rule's fallback limit applies, as after `limiter attach`.
//! - nftables: a dynamic set with a `limit rate over` per source at the netdev ingress hook,
//!   the earliest point nftables offers.
//! - iptables: `hashlimit` per source in the raw table's PREROUTING chain.
//!
//! Each run reports frames sent per second, and the receiver's own count of what it dropped
//! and passed, read from its counters.

use std::{
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    EbpfLoader,
    programs::{Xdp, XdpMode},
};
use limiter_common::{Reason, Rule, RuleMatch};
use limiter_tests::{
    Netns, PinDir,
    flood::{packet_socket, set_ipv4_source},
    test_run::Frame,
    traffic::{enter_netns, pin_to_cpu},
    unique_name,
};
use limiter_user::datapath::{self, Maps};
use serde::Serialize;

use crate::{Scale, ratio};

/// Distinct source addresses the sender cycles through.
const SOURCES: u32 = 1024;
/// Packets per second each source may pass, in every limiter. It is low so that drops, the
/// work compared here, are nearly all of the traffic, and few packets go up the stack.
const LIMIT_PER_SECOND: u64 = 10;
/// MAC address given to the receiving end, written into every frame.
const RECEIVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const RECEIVER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 1);
/// The CPU the sender, and so the receiving softirq, runs on.
const SENDER_CPU: usize = 1;

static XDP_DROP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-drop"));

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Receiver {
    XdpDrop,
    Limiter,
    Nftables,
    IptablesHashlimit,
}

impl Receiver {
    pub const ALL: [Receiver; 4] = [
        Receiver::XdpDrop,
        Receiver::Limiter,
        Receiver::Nftables,
        Receiver::IptablesHashlimit,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Receiver::XdpDrop => "xdp-drop",
            Receiver::Limiter => "limiter (XDP)",
            Receiver::Nftables => "nftables netdev ingress",
            Receiver::IptablesHashlimit => "iptables hashlimit (raw PREROUTING)",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct VethPath {
    pub seconds: f64,
    pub sources: u32,
    pub limit_per_second: u64,
    pub runs: Vec<ReceiverRun>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReceiverRun {
    pub receiver: Receiver,
    pub sent: u64,
    /// Frames the veth pair refused because the receiver's queue was full.
    pub send_failures: u64,
    pub sent_per_second: f64,
    /// Packets the receiver counted as dropped and as passed, or None for `xdp-drop`, which
    /// counts nothing.
    pub dropped: Option<u64>,
    pub passed: Option<u64>,
    pub vs_xdp_drop: f64,
}

pub fn run(scale: &Scale) -> anyhow::Result<VethPath> {
    let seconds = if scale.quick { 1.0 } else { 3.0 };
    let mut runs: Vec<ReceiverRun> = Vec::new();
    for receiver in Receiver::ALL {
        eprintln!("bench: veth path through {}", receiver.name());
        let run = run_receiver(receiver, Duration::from_secs_f64(seconds))
            .with_context(|| format!("veth path benchmark of {} failed", receiver.name()))?;
        runs.push(run);
    }
    let floor = runs.first().map_or(0.0, |run| run.sent_per_second);
    for run in &mut runs {
        run.vs_xdp_drop = ratio(run.sent_per_second, floor);
    }
    Ok(VethPath {
        seconds,
        sources: SOURCES,
        limit_per_second: LIMIT_PER_SECOND,
        runs,
    })
}

/// Runs one receiver on a fresh pair of namespaces, which are deleted, with everything in
/// them, when this returns.
fn run_receiver(receiver: Receiver, duration: Duration) -> anyhow::Result<ReceiverRun> {
    let sender_netns = Netns::new();
    let receiver_netns = Netns::new();
    let sender_if = unique_name("lbs");
    let receiver_if = unique_name("lbr");
    ip(&[
        "-n",
        &sender_netns.name,
        "link",
        "add",
        &sender_if,
        "type",
        "veth",
        "peer",
        "name",
        &receiver_if,
        "netns",
        &receiver_netns.name,
    ])?;
    let mac = RECEIVER_MAC.map(|byte| format!("{byte:02x}")).join(":");
    ip(&[
        "-n",
        &receiver_netns.name,
        "link",
        "set",
        &receiver_if,
        "address",
        &mac,
    ])?;
    ip(&[
        "-n",
        &receiver_netns.name,
        "addr",
        "add",
        &format!("{RECEIVER_ADDR}/24"),
        "dev",
        &receiver_if,
    ])?;
    ip(&[
        "-n",
        &receiver_netns.name,
        "link",
        "set",
        &receiver_if,
        "up",
    ])?;
    ip(&["-n", &sender_netns.name, "link", "set", &sender_if, "up"])?;

    let receiver_path = format!("/var/run/netns/{}", receiver_netns.name);
    let sender_path = format!("/var/run/netns/{}", sender_netns.name);
    match receiver {
        Receiver::XdpDrop | Receiver::Limiter => {
            // XDP attaches in the thread's network namespace, so a thread enters the
            // receiver's namespace, attaches, sends, and detaches when its objects drop.
            let receiver_if = receiver_if.clone();
            thread::spawn(move || {
                enter_netns(&receiver_path);
                run_xdp_receiver(receiver, &receiver_if, &sender_path, &sender_if, duration)
            })
            .join()
            .map_err(|panic| anyhow!(crate::panic_message(panic.as_ref())))?
        }
        Receiver::Nftables => {
            install_nftables(&receiver_netns.name, &receiver_if)?;
            let (sent, send_failures, elapsed) = send_flood(&sender_path, &sender_if, duration)?;
            let (dropped, passed) = nftables_counters(&receiver_netns.name)?;
            Ok(run_figures(
                receiver,
                sent,
                send_failures,
                elapsed,
                Some(dropped),
                Some(passed),
            ))
        }
        Receiver::IptablesHashlimit => {
            install_hashlimit(&receiver_netns.name, &receiver_if)?;
            let (sent, send_failures, elapsed) = send_flood(&sender_path, &sender_if, duration)?;
            let (dropped, passed) = hashlimit_counters(&receiver_netns.name)?;
            Ok(run_figures(
                receiver,
                sent,
                send_failures,
                elapsed,
                Some(dropped),
                Some(passed),
            ))
        }
    }
}

fn run_figures(
    receiver: Receiver,
    sent: u64,
    send_failures: u64,
    elapsed: Duration,
    dropped: Option<u64>,
    passed: Option<u64>,
) -> ReceiverRun {
    ReceiverRun {
        receiver,
        sent,
        send_failures,
        sent_per_second: sent as f64 / elapsed.as_secs_f64(),
        dropped,
        passed,
        vs_xdp_drop: f64::NAN,
    }
}

/// Attaches `xdp-drop` or the limiter to `receiver_if` in native mode, floods it, and reads
/// the limiter's verdict counters. Runs inside the receiver's namespace.
fn run_xdp_receiver(
    receiver: Receiver,
    receiver_if: &str,
    sender_path: &str,
    sender_if: &str,
    duration: Duration,
) -> anyhow::Result<ReceiverRun> {
    if receiver == Receiver::XdpDrop {
        let mut ebpf = EbpfLoader::new()
            .load(XDP_DROP_OBJECT)
            .context("failed to load xdp-drop")?;
        let program: &mut Xdp = ebpf
            .program_mut("xdp_drop")
            .ok_or_else(|| anyhow!("the xdp-drop object has no program xdp_drop"))?
            .try_into()?;
        program
            .load()
            .context("the kernel verifier rejected xdp-drop")?;
        program
            .attach(receiver_if, XdpMode::Driver)
            .with_context(|| {
                format!("failed to attach xdp-drop to {receiver_if} in native mode")
            })?;
        let (sent, send_failures, elapsed) = send_flood(sender_path, sender_if, duration)?;
        return Ok(run_figures(
            receiver,
            sent,
            send_failures,
            elapsed,
            None,
            None,
        ));
    }

    let pins = PinDir::new();
    let mut ebpf = datapath::load(&pins.path, limiter_common::DEFAULT_MAX_KEYS)?;
    let mut maps = Maps::open_dir(&pins.path)?;
    let rule = Rule {
        id: 1,
        ipv4_prefix_len: 32,
        ipv6_prefix_len: 128,
        limit: LIMIT_PER_SECOND,
        fallback_limit: LIMIT_PER_SECOND,
        new_key_limit: LIMIT_PER_SECOND,
        window_ns: 1_000_000_000,
        ..Rule::default()
    };
    maps.rules
        .insert(RuleMatch::new(0, 0), rule, 0)
        .context("failed to insert the benchmark rule")?;
    datapath::xdp_program(&mut ebpf)?
        .attach(receiver_if, XdpMode::Driver)
        .with_context(|| format!("failed to attach the limiter to {receiver_if} in native mode"))?;
    let (sent, send_failures, elapsed) = send_flood(sender_path, sender_if, duration)?;

    let reason_total = |reason: Reason| -> anyhow::Result<u64> {
        let values = maps
            .stats
            .get(&(reason as u32), 0)
            .with_context(|| format!("failed to read STATS[{}]", reason.name()))?;
        Ok(values.iter().sum())
    };
    let dropped =
        reason_total(Reason::DroppedLocalLimit)? + reason_total(Reason::DroppedGlobalLimit)?;
    let passed = reason_total(Reason::Passed)?;
    Ok(run_figures(
        receiver,
        sent,
        send_failures,
        elapsed,
        Some(dropped),
        Some(passed),
    ))
}

/// Sends frames from `SOURCES` sources round robin out of `sender_if`, from a thread in the
/// sender's namespace pinned to `SENDER_CPU`, for `duration`. Returns frames sent, frames the
/// interface refused, and the time taken.
fn send_flood(
    sender_path: &str,
    sender_if: &str,
    duration: Duration,
) -> anyhow::Result<(u64, u64, Duration)> {
    let frames = build_frames();
    let sender_path = sender_path.to_owned();
    let sender_if = sender_if.to_owned();
    let sender = thread::spawn(move || -> anyhow::Result<(u64, u64, Duration)> {
        enter_netns(&sender_path);
        pin_to_cpu(SENDER_CPU);
        let socket = packet_socket(&sender_if);
        let started = Instant::now();
        let mut sent = 0u64;
        let mut failures = 0u64;
        // Bounded by `duration`, checked after each pass over the frames.
        while started.elapsed() < duration {
            for frame in &frames {
                // SAFETY: the socket is open and `frame` is a live buffer of the given length.
                let result = unsafe {
                    libc::send(socket.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0)
                };
                if result < 0 { failures += 1 } else { sent += 1 }
            }
        }
        Ok((sent, failures, started.elapsed()))
    });
    sender
        .join()
        .map_err(|panic| anyhow!(crate::panic_message(panic.as_ref())))?
}

/// Returns one IPv4/UDP frame per source, 10.1.0.0 upwards, to `RECEIVER_ADDR` at
/// `RECEIVER_MAC`, with a valid IPv4 header checksum so the stack accepts what passes.
fn build_frames() -> Vec<Vec<u8>> {
    (0..SOURCES)
        .map(|index| {
            let source = Ipv4Addr::from(0x0a01_0000u32 + index);
            let mut frame = Frame::ipv4(source, RECEIVER_ADDR).udp(40_000, 9).build();
            frame[..6].copy_from_slice(&RECEIVER_MAC);
            // Sets the source again only to fill in the header checksum.
            set_ipv4_source(&mut frame, source);
            frame
        })
        .collect()
}

fn install_nftables(netns: &str, iface: &str) -> anyhow::Result<()> {
    let ruleset = format!(
        "table netdev lbench {{\n\
         \x20 set sources {{ type ipv4_addr; size 65536; flags dynamic,timeout; timeout 10s; }}\n\
         \x20 chain ingress {{\n\
         \x20   type filter hook ingress device \"{iface}\" priority 0; policy accept;\n\
         \x20   ip saddr 10.0.0.0/8 update @sources {{ ip saddr limit rate over {LIMIT_PER_SECOND}/second burst {LIMIT_PER_SECOND} packets }} counter drop\n\
         \x20   ip saddr 10.0.0.0/8 counter\n\
         \x20 }}\n\
         }}\n"
    );
    let path = std::env::temp_dir().join(format!("{}.nft", unique_name("lbn")));
    std::fs::write(&path, ruleset)
        .with_context(|| format!("failed to write {}", path.display()))?;
    let path_text = path.to_string_lossy().into_owned();
    let outcome = command("ip", &["netns", "exec", netns, "nft", "-f", &path_text]);
    let _ = std::fs::remove_file(&path);
    outcome.map(|_| ())
}

/// Returns (dropped, passed) from the two rule counters of the nftables chain.
fn nftables_counters(netns: &str) -> anyhow::Result<(u64, u64)> {
    let output = command(
        "ip",
        &[
            "netns", "exec", netns, "nft", "-j", "list", "chain", "netdev", "lbench", "ingress",
        ],
    )?;
    let json: serde_json::Value =
        serde_json::from_str(&output).context("nft -j printed invalid JSON")?;
    let counters: Vec<u64> = json["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item["rule"]["expr"].as_array())
        .flat_map(|exprs| {
            exprs
                .iter()
                .filter_map(|expr| expr["counter"]["packets"].as_u64())
        })
        .collect();
    match counters[..] {
        [dropped, passed] => Ok((dropped, passed)),
        _ => bail!("expected two counters in the nftables chain, found {counters:?}"),
    }
}

fn install_hashlimit(netns: &str, iface: &str) -> anyhow::Result<()> {
    let limit = format!("{LIMIT_PER_SECOND}/sec");
    let burst = LIMIT_PER_SECOND.to_string();
    let prefix = [
        "netns",
        "exec",
        netns,
        "iptables",
        "-t",
        "raw",
        "-A",
        "PREROUTING",
        "-i",
        iface,
    ];
    let mut drop_rule = prefix.to_vec();
    drop_rule.extend_from_slice(&[
        "-m",
        "hashlimit",
        "--hashlimit-above",
        &limit,
        "--hashlimit-burst",
        &burst,
        "--hashlimit-mode",
        "srcip",
        "--hashlimit-name",
        "lbench",
        "-j",
        "DROP",
    ]);
    command("ip", &drop_rule)?;
    let mut count_rule = prefix.to_vec();
    count_rule.extend_from_slice(&["-j", "ACCEPT"]);
    command("ip", &count_rule).map(|_| ())
}

/// Returns (dropped, passed) from the packet counters of the two raw PREROUTING rules.
fn hashlimit_counters(netns: &str) -> anyhow::Result<(u64, u64)> {
    let output = command(
        "ip",
        &[
            "netns",
            "exec",
            netns,
            "iptables",
            "-t",
            "raw",
            "-L",
            "PREROUTING",
            "-vnx",
        ],
    )?;
    // Two header lines, then one line per rule starting with its packet count.
    let counters: Vec<u64> = output
        .lines()
        .skip(2)
        .filter_map(|line| line.split_whitespace().next()?.parse().ok())
        .collect();
    match counters[..] {
        [dropped, passed] => Ok((dropped, passed)),
        _ => {
            bail!("expected two rules in raw PREROUTING, found counters {counters:?} in:\n{output}")
        }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    command("ip", args)
}

fn command(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("failed to start {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed with {}: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
