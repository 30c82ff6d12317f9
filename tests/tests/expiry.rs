//! Redis keys written for traffic expire once the traffic stops, so a flood of sources does
//! not leave the store growing.

use std::{net::SocketAddrV4, time::Duration};

use limiter_tests::{
    Agent, Netns, RedisServer, VethPair, free_port, subnet_addr, unique_subnet, wait_until,
    traffic::{Source, run_traffic},
};
use limiter_user::{rule_sync::RULE_SET_KEY, store::GATEWAYS_KEY};

#[test]
fn store_keys_expire_after_traffic() {
    let redis = RedisServer::start();
    let netns = Netns::new();
    let subnet = unique_subnet();
    let gateway_addr = subnet_addr(subnet, 1);
    let sources: Vec<Source> = (0..3)
        .map(|index| Source { addr: subnet_addr(subnet, 10 + index), packets_per_second: 200, cpu: index as usize % 2 })
        .collect();
    let addrs: Vec<_> = sources.iter().map(|source| source.addr).collect();
    let veth = VethPair::new(&netns, gateway_addr, &addrs);
    let _agent = Agent::start(&veth.host, &redis.url(), "expiry", &["--sync-interval", "100ms"]);
    Agent::cli(&["limit", "add", "--iface", &veth.host, "--rate", "100/s", "--proto", "udp"]);

    run_traffic(&netns.name, &sources, SocketAddrV4::new(gateway_addr, free_port()), Duration::from_secs(2));
    let keys_during = redis.command("DBSIZE");
    assert!(integer(&keys_during) > 1, "the traffic wrote no window or lease keys: DBSIZE {keys_during:?}");

    // Window hashes and leases live three windows (3 s here). Only the live agent's
    // heartbeat set and the fleet's rule set, which is configuration and never expires,
    // should remain after that.
    wait_until("every key but the heartbeat and rule sets to expire", Duration::from_secs(6), || {
        integer(&redis.command("DBSIZE")) == 2
    });
    let remaining = redis.command("KEYS *");
    assert!(remaining.contains(GATEWAYS_KEY), "the heartbeat set remains: {remaining:?}");
    assert!(remaining.contains(RULE_SET_KEY), "the rule set remains: {remaining:?}");
}

/// Parses an inline integer reply such as `:3\r\n`.
fn integer(reply: &str) -> i64 {
    reply.trim().trim_start_matches(':').parse().unwrap_or_else(|_| panic!("expected an integer reply, got {reply:?}"))
}
