//! A tiered rule with real traffic: one gateway, a veth pair with its own `limiter agent`,
//! and several sources of one /24, counted by a UDP receiver behind the gateway.
//!
//! The first two seconds are the keys' start-up transient (see gateways.rs) and are printed
//! but left out of the checks.

use std::{net::SocketAddrV4, time::Duration};

use limiter_tests::{
    Agent, Netns, RedisServer, VethPair, free_port, subnet_addr, unique_name, unique_subnet,
    traffic::{Source, run_traffic},
};

/// Runs `rates` (packets per second) from addresses 10, 11, ... of one /24 for 8 s through
/// a gateway whose rule limits the /24 to `prefix_rate` and each address to `address_rate`,
/// and returns each source's packets received per second.
fn run_tiered(prefix_rate: &str, address_rate: &str, rates: &[u64]) -> Vec<Vec<u64>> {
    let redis = RedisServer::start();
    let netns = Netns::new();
    let subnet = unique_subnet();
    let gateway_addr = subnet_addr(subnet, 1);
    let source_addrs: Vec<_> = (0..rates.len()).map(|index| subnet_addr(subnet, 10 + index as u8)).collect();
    let veth = VethPair::new(&netns, gateway_addr, &source_addrs);
    let _agent = Agent::start(&veth.host, &redis.url(), &unique_name("gw"), &["--sync-interval", "100ms"]);
    Agent::cli(&[
        "limit", "add", "--iface", &veth.host, "--rate", prefix_rate, "--proto", "udp", "--prefix-v4", "24",
        "--inner-rate", address_rate, "--inner-prefix-v4", "32",
    ]);

    let sources: Vec<Source> = source_addrs
        .iter()
        .zip(rates)
        .enumerate()
        .map(|(index, (addr, rate))| Source { addr: *addr, packets_per_second: *rate, cpu: index % 2 })
        .collect();
    let destination = SocketAddrV4::new(gateway_addr, free_port());
    let report = run_traffic(&netns.name, &sources, destination, Duration::from_secs(8));
    for addr in &source_addrs {
        println!("tiers: source={addr} sent={} received per second={:?}", report.sent[addr], report.received_per_second[addr]);
    }
    // The verdict counters, to tell a drop by the limiter from a loss elsewhere if a check fails.
    println!("tiers: verdicts {}", Agent::cli(&["stats", "--iface", &veth.host, "--json"]).replace('\n', " "));
    source_addrs.iter().map(|addr| report.received_per_second[addr].clone()).collect()
}

/// Returns the packets each source passed in `second`.
fn second_of(received: &[Vec<u64>], second: usize) -> Vec<u64> {
    received.iter().map(|seconds| seconds[second]).collect()
}

#[test]
fn tiered_rule_holds_prefix_limit() {
    // Four addresses at 50/s, each under its 60/s, the /24 at twice its 100/s.
    let received = run_tiered("100/s", "60/s", &[50, 50, 50, 50]);
    for second in 2..received[0].len() {
        let per_source = second_of(&received, second);
        let total: u64 = per_source.iter().sum();
        assert!((90..=106).contains(&total), "second {second}: the /24 passed {total}, expected 100 -10/+6; per source {per_source:?}");
    }
    for (index, seconds) in received.iter().enumerate() {
        assert!(seconds.iter().skip(2).all(|passed| *passed > 0), "source {index} starved: {seconds:?}");
    }
}

#[test]
fn tiered_rule_holds_each_address_limit() {
    // Under a /24 limit of 200/s that 150/s in all never reaches, one address at 150/s is
    // held to its own 60/s, and the others at 30/s pass whole.
    let received = run_tiered("200/s", "60/s", &[30, 30, 30, 150]);
    for second in 2..received[0].len() {
        let per_source = second_of(&received, second);
        let heavy = per_source[3];
        assert!((54..=66).contains(&heavy), "second {second}: the 150/s address passed {heavy}, expected 60 +-6; per source {per_source:?}");
        for light in &per_source[..3] {
            assert!((27..=33).contains(light), "second {second}: a 30/s address passed {light}, expected all; per source {per_source:?}");
        }
    }
}
