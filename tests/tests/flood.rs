//! A flood of spoofed sources, far more than the maps hold, next to one heavy source.
//! The maps stay within their size, the agent's ticks within their interval and the heavy
//! source within its limit, and the keys the agent could not reconcile are counted.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsFd as _,
    thread,
    time::{Duration, Instant},
};

use aya::maps::IterableMap as _;
use limiter_common::{FlowKey, KeyCounter};
use limiter_tests::{
    flood::{IsolatedGateway, SpoofedFlood},
    unique_name,
    traffic::{Receiver, Source, spawn_sender},
};
use limiter_user::{batch, datapath::Maps};

/// Distinct spoofed sources: 10.64.0.0 upwards, sixteen times the map size.
const SPOOFED_SOURCES: u32 = 1_000_000;
const FLOOD_SECONDS: u64 = 10;
/// Keys the maps hold.
const MAX_KEYS: u32 = 65_536;
const LIMIT_PER_SECOND: u64 = 100;

#[test]
fn spoofed_flood_stays_bounded() {
    let gateway = IsolatedGateway::new(&[10]);
    let heavy = gateway.host_addr(10);
    let log_path = std::env::temp_dir().join(format!("{}.log", unique_name("lfl")));
    let log = std::fs::File::create(&log_path).expect("create the agent log");
    let agent = gateway.start_agent("flood", &["--sync-interval", "100ms", "--max-keys", &MAX_KEYS.to_string()], log);
    gateway.cli(&["limit", "add", "--iface", &gateway.iface, "--rate", &format!("{LIMIT_PER_SECOND}/s"), "--proto", "udp"]);

    // Step 1: a receiver for the heavy source and a sink for the flood, both inside the
    // gateway namespace. The sink is never read: once its buffer is full the kernel drops
    // what passes, without a reply to the spoofed sources.
    let heavy_destination = SocketAddrV4::new(gateway.gateway_addr, 9000);
    let flood_destination = SocketAddrV4::new(gateway.gateway_addr, 9001);
    let start = Instant::now() + Duration::from_millis(300);
    let seconds = FLOOD_SECONDS as usize;
    let (receiver, sink) = gateway.in_gateway(move || {
        let sink = std::net::UdpSocket::bind(flood_destination).expect("bind the flood sink");
        (Receiver::start(heavy_destination, start, seconds), sink)
    });

    // Step 2: the heavy source at 3x its limit on one CPU, the flood on the other.
    let rss_before = vm_rss_kib(agent.pid());
    let heavy_sender = spawn_sender(
        &gateway.senders.name,
        Source { addr: heavy, packets_per_second: 3 * LIMIT_PER_SECOND, cpu: 0 },
        heavy_destination,
        start,
        Duration::from_secs(FLOOD_SECONDS),
    );
    while Instant::now() < start {
        thread::sleep(Duration::from_millis(10));
    }
    let flood = SpoofedFlood {
        netns: gateway.senders.name.clone(),
        iface: gateway.peer.clone(),
        destination_mac: gateway.gateway_mac,
        destination: flood_destination,
        first_source: Ipv4Addr::new(10, 64, 0, 0),
        sources: SPOOFED_SOURCES,
        packets_per_second: u64::from(SPOOFED_SOURCES) / FLOOD_SECONDS,
        cpu: 1,
    }
    .spawn(Duration::from_secs(FLOOD_SECONDS));
    let flood_sent = flood.join().expect("flood thread panicked");
    let heavy_sent = heavy_sender.join().expect("heavy sender panicked");
    thread::sleep(Duration::from_millis(300));
    let received = receiver.finish();
    drop(sink);

    // Step 3: what the maps, the agent and the heavy source show.
    let maps = Maps::open(&gateway.iface).expect("open the pinned maps");
    let cpus = batch::possible_cpus().unwrap();
    let tracked = batch::lookup_all::<FlowKey, KeyCounter>(maps.counters.map().fd().as_fd(), cpus).unwrap().len();
    let status = gateway.cli(&["status", "--iface", &gateway.iface, "--json"]);
    let status: serde_json::Value = serde_json::from_str(&status).expect("status prints JSON");
    let rss_after = vm_rss_kib(agent.pid());
    let heavy_seconds = received.per_second.get(&heavy).cloned().unwrap_or_default();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    println!(
        "flood: {flood_sent} spoofed frames in {FLOOD_SECONDS} s; heavy sent {heavy_sent}, per second {heavy_seconds:?}; \
         COUNTERS holds {tracked} of {MAX_KEYS}; agent RSS {rss_before} KiB before, {rss_after} KiB after; \
         max tick {} ms, {} of {} ticks over the interval, keys deferred {}, evicted {}",
        status["max_tick_ms"], status["ticks_over_interval"], status["ticks"], status["keys_deferred_total"], status["keys_evicted_total"],
    );

    assert!(flood_sent >= u64::from(SPOOFED_SOURCES) * 9 / 10, "the flood sent only {flood_sent} frames");
    // Memory: the maps never hold more than their size, and the agent's memory grows by
    // what it keeps per tracked key, not per source seen.
    assert!(tracked <= MAX_KEYS as usize, "COUNTERS holds {tracked} keys, more than its {MAX_KEYS}");
    assert!(rss_after < rss_before + 128 * 1024, "agent RSS grew from {rss_before} KiB to {rss_after} KiB");
    // The tick stays within its interval: it syncs what fits in half of it and defers the
    // rest. NOTE: on 2 cores, with the flood's softirq filling one and the heavy source,
    // Redis, the agent and the test sharing the other, a tick can still run over now and
    // then: 0, 0, 1, 1 and 2 of about 107 ticks did in five runs, the longest 162 ms. Up to
    // 3 may, and none by a whole interval.
    let max_tick_ms = status["max_tick_ms"].as_f64().expect("max_tick_ms in status");
    let over = status["ticks_over_interval"].as_u64().expect("ticks_over_interval in status");
    let ticks = status["ticks"].as_u64().expect("ticks in status");
    assert!(over <= 3, "{over} of {ticks} ticks took longer than the 100 ms interval\n{log}");
    assert!(max_tick_ms < 200.0, "the longest tick took {max_tick_ms} ms, two intervals\n{log}");
    // The keys that could not be reconciled are counted, not silently dropped.
    let evicted = status["keys_evicted_total"].as_u64().expect("keys_evicted_total in status");
    assert!(evicted > u64::from(SPOOFED_SOURCES) / 2, "only {evicted} keys counted as evicted");
    // The heavy source stays limited in every whole second after its first.
    for (second, passed) in heavy_seconds.iter().enumerate().skip(2) {
        assert!(
            *passed <= LIMIT_PER_SECOND * 11 / 10,
            "second {second}: the heavy source passed {passed}, expected at most 110; {heavy_seconds:?}"
        );
        assert!(*passed >= LIMIT_PER_SECOND * 7 / 10, "second {second}: the heavy source passed only {passed}; {heavy_seconds:?}");
    }
}

/// Resident memory of a process in KiB, from /proc/PID/status.
fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read the agent's /proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc status")
}
