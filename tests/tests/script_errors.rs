//! Redis reachable but failing every script call: a full Redis (`maxmemory` reached under
//! the `noeviction` policy) rejects the scripts' writes with an OOM error. A failed call must
//! never read as "under the limit", and it is not an outage either.

use std::{net::SocketAddrV4, thread, time::Duration};

use limiter_tests::{
    Agent, Netns, RedisServer, VethPair, free_port, subnet_addr, unique_name, unique_subnet, wait_until,
    traffic::{Source, run_traffic},
};

#[test]
fn script_errors_fall_back_to_policy() {
    let redis = RedisServer::start_with(&["--maxmemory-policy", "noeviction"]);
    let netns = Netns::new();
    let subnet = unique_subnet();
    let gateway_addr = subnet_addr(subnet, 1);
    let heavy = subnet_addr(subnet, 10);
    let light = subnet_addr(subnet, 11);
    let veth = VethPair::new(&netns, gateway_addr, &[heavy, light]);
    let log_path = std::env::temp_dir().join(format!("{}.log", unique_name("lse")));
    let log = std::fs::File::create(&log_path).expect("create the agent log");
    let _agent = Agent::start_logging(&veth.host, "scripterr", &["--redis", &redis.url(), "--sync-interval", "100ms"], log);
    Agent::cli(&["limit", "add", "--iface", &veth.host, "--rate", "100/s", "--proto", "udp"]);

    // 14 s of traffic. From about 4 s to about 9 s, every script call fails with OOM.
    let destination = SocketAddrV4::new(gateway_addr, free_port());
    let netns_name = netns.name.clone();
    let traffic = thread::spawn(move || {
        let sources = [
            Source { addr: heavy, packets_per_second: 300, cpu: 0 },
            Source { addr: light, packets_per_second: 30, cpu: 1 },
        ];
        run_traffic(&netns_name, &sources, destination, Duration::from_secs(14))
    });
    thread::sleep(Duration::from_millis(4100));
    assert!(redis.command("CONFIG SET maxmemory 1").contains("OK"), "CONFIG SET maxmemory failed");
    thread::sleep(Duration::from_secs(5));
    let during = Agent::cli(&["status", "--iface", &veth.host, "--json"]);
    assert!(redis.command("CONFIG SET maxmemory 0").contains("OK"), "CONFIG SET maxmemory failed");
    wait_until("grants to flow again", Duration::from_secs(2), || {
        let status = Agent::cli(&["status", "--iface", &veth.host, "--json"]);
        status.contains("\"failed_calls\": 0") && status.contains("\"grants_written\": 2")
    });

    let report = traffic.join().expect("traffic thread panicked");
    let log = std::fs::read_to_string(&log_path).expect("read the agent log");
    let _ = std::fs::remove_file(&log_path);
    let heavy_seconds = &report.received_per_second[&heavy];
    let during: serde_json::Value = serde_json::from_str(&during).expect("status prints JSON");
    println!("script errors: heavy source per second {heavy_seconds:?}; store errors while full {}", during["store_errors"]);

    // Failed calls are counted as script errors, and Redis is never reported down.
    let script_errors = during["store_errors"]["script_errors"].as_u64().expect("script_errors in status");
    assert!(script_errors >= 10, "only {script_errors} script errors counted in 5 s of failing calls");
    assert_eq!(during["store_reachable"], true, "a Redis that answers with errors is reachable");
    assert_eq!(log.matches("redis unreachable").count(), 0, "Redis reported down:\n{log}");
    assert_eq!(log.matches("redis script calls failed").count(), 1, "one line when script calls start failing:\n{log}");
    let failed = log.lines().find(|line| line.contains("redis script calls failed")).unwrap_or_default();
    assert!(failed.contains("OOM"), "the line names Redis's error: {failed}");
    assert!(failed.contains("Redis key limiter:{r1b"), "the line names the group's Redis key: {failed}");
    assert!(
        failed.contains(&format!("flow key {heavy}/32")) || failed.contains(&format!("flow key {light}/32")),
        "the line names a flow key the failed call carried: {failed}"
    );
    assert_eq!(log.matches("redis script calls succeed again").count(), 1, "one line when they recover:\n{log}");
    // The light source loses nothing, and the heavy source never passes more than its
    // policy: with failed calls no grant is renewed, so once grants expire the local
    // policy (the whole limit, on one gateway) applies. See faults.rs for the 1.10x.
    assert_eq!(report.received_total(light), report.sent[&light], "the light source lost packets");
    for (second, passed) in heavy_seconds.iter().enumerate().skip(3) {
        assert!(*passed <= 110, "second {second}: heavy source passed {passed}, expected at most 110; {heavy_seconds:?}");
    }
}
