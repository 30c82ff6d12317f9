//! The demo behind `cargo xtask demo`: three sources in a network namespace send UDP through
//! a veth pair into a real XDP program, whose agent reconciles through a throwaway
//! redis-server on loopback, under a limit of 100 packets per second per source.
//!
//! Everything it creates (namespace, veth pair, pins, agent, redis-server) is removed when it
//! ends, also on SIGINT or SIGTERM.

use std::{net::SocketAddrV4, time::Duration};

use limiter_tests::{
    Agent, Netns, RedisServer, VethPair, free_port, subnet_addr, unique_subnet,
    traffic::{Source, request_stop, run_traffic, stop_requested},
};

const LIMIT_PER_SECOND: u64 = 100;
const RATES: [u64; 3] = [50, 200, 1000];
const SECONDS: u64 = 5;

extern "C" fn on_signal(_signal: libc::c_int) {
    request_stop();
}

fn main() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }

    // Step 1: a source namespace, a veth pair into it, a redis-server and an agent.
    let redis = RedisServer::start();
    let netns = Netns::new();
    let subnet = unique_subnet();
    let gateway_addr = subnet_addr(subnet, 1);
    let sources: Vec<Source> = RATES
        .iter()
        .enumerate()
        .map(|(index, rate)| Source { addr: subnet_addr(subnet, 10 + index as u8), packets_per_second: *rate, cpu: index % 2 })
        .collect();
    let source_addrs: Vec<_> = sources.iter().map(|source| source.addr).collect();
    let veth = VethPair::new(&netns, gateway_addr, &source_addrs);
    println!("demo: gateway {} ({gateway_addr}), sources in namespace {}, redis on {}", veth.host, netns.name, redis.url());
    let agent = Agent::start(&veth.host, &redis.url(), "demo-gateway", &["--sync-interval", "100ms"]);

    // Step 2: the limit, pushed through the running agent.
    print!("{}", Agent::cli(&["limit", "add", "--iface", &veth.host, "--rate", &format!("{LIMIT_PER_SECOND}/s"), "--prefix-v4", "32"]));
    print!("{}", Agent::cli(&["limit", "list", "--iface", &veth.host]));
    if stop_requested() {
        return;
    }

    // Step 3: the traffic.
    println!("demo: sending for {SECONDS} s at {RATES:?} packets/s");
    let destination = SocketAddrV4::new(gateway_addr, free_port());
    let report = run_traffic(&netns.name, &sources, destination, Duration::from_secs(SECONDS));

    // Step 4: what arrived, per second and in total.
    println!();
    print!("{:>7}", "second");
    for source in &sources {
        print!(" {:>22}", format!("{} @{}/s", source.addr, source.packets_per_second));
    }
    println!();
    for second in 0..SECONDS as usize {
        print!("{second:>7}");
        for source in &sources {
            let passed = report.received_per_second.get(&source.addr).map_or(0, |seconds| seconds[second]);
            print!(" {passed:>22}");
        }
        println!();
    }
    println!();
    println!("limiter stats --iface {}:", veth.host);
    print!("{}", Agent::cli(&["stats", "--iface", &veth.host]));
    println!();
    for source in &sources {
        let sent = report.sent.get(&source.addr).copied().unwrap_or(0);
        let passed = report.received_total(source.addr);
        let dropped = sent.saturating_sub(passed);
        println!("demo: source={} sent={sent} passed={passed} dropped={dropped} limit={LIMIT_PER_SECOND}/s", source.addr);
    }

    // Step 5: clean up in reverse order of creation.
    drop(agent);
    drop(veth);
    drop(netns);
    drop(redis);
}
