//! Store faults with real traffic: Redis killed and restarted empty, and its scripts flushed,
//! while one source sends at 3x its limit and another well under it.

use std::{net::SocketAddrV4, thread, time::{Duration, Instant}};

use limiter_tests::{
    Agent, Netns, RedisServer, VethPair, free_port, subnet_addr, unique_name, unique_subnet, wait_until,
    traffic::{Source, run_traffic},
};

#[test]
fn redis_outage_keeps_enforcing() {
    let mut redis = RedisServer::start();
    let netns = Netns::new();
    let subnet = unique_subnet();
    let gateway_addr = subnet_addr(subnet, 1);
    let heavy = subnet_addr(subnet, 10);
    let light = subnet_addr(subnet, 11);
    let veth = VethPair::new(&netns, gateway_addr, &[heavy, light]);
    let log_path = std::env::temp_dir().join(format!("{}.log", unique_name("lag")));
    let log = std::fs::File::create(&log_path).expect("create the agent log");
    let _agent = Agent::start_logging(&veth.host, "faults", &["--redis", &redis.url(), "--sync-interval", "100ms"], log);
    Agent::cli(&["limit", "add", "--iface", &veth.host, "--rate", "100/s", "--proto", "udp"]);

    // 20 s of traffic: Redis dies at about 4 s, comes back empty at about 14 s, and its
    // scripts are flushed at about 17 s.
    let destination = SocketAddrV4::new(gateway_addr, free_port());
    let netns_name = netns.name.clone();
    let traffic = thread::spawn(move || {
        let sources = [
            Source { addr: heavy, packets_per_second: 300, cpu: 0 },
            Source { addr: light, packets_per_second: 30, cpu: 1 },
        ];
        run_traffic(&netns_name, &sources, destination, Duration::from_secs(20))
    });
    thread::sleep(Duration::from_millis(4100));
    redis.stop();
    thread::sleep(Duration::from_secs(10));
    redis.restart();
    let restarted = Instant::now();
    wait_until("the agent to reach Redis again", Duration::from_secs(5), || {
        Agent::cli(&["status", "--iface", &veth.host, "--json"]).contains("\"store_reachable\": true")
    });
    let recovery = restarted.elapsed();
    thread::sleep(Duration::from_secs(3));
    let reloads_before_flush = noscript_reloads(&veth.host);
    assert!(redis.command("SCRIPT FLUSH").contains("OK"), "SCRIPT FLUSH failed");

    let report = traffic.join().expect("traffic thread panicked");
    let reloads_after_flush = noscript_reloads(&veth.host);
    let log = std::fs::read_to_string(&log_path).expect("read the agent log");
    let _ = std::fs::remove_file(&log_path);
    let heavy_seconds = &report.received_per_second[&heavy];
    println!("redis outage: heavy source per second {heavy_seconds:?}; reconciling again {recovery:?} after the restart");

    // The light source loses nothing, through the outage, the restart and the flush.
    assert_eq!(report.received_total(light), report.sent[&light], "the light source lost packets");
    // The heavy source never passes more than its policy allows: the local policy on one
    // gateway is the whole limit. The key's start-up transient, which can ring into second
    // 2 on a loaded machine, is not what this test is about, so the check starts at second 3.
    // NOTE: the local policy is enforced per CPU, in windows of the gateway's clock. In the
    // second where grants hand over to it, up to 1.07x the limit was measured (two senders
    // share the veth's queue, so the key reaches both CPUs at times); 1.10x is allowed.
    for (second, passed) in heavy_seconds.iter().enumerate().skip(3) {
        assert!(*passed <= 110, "second {second}: heavy source passed {passed}, expected at most 110; {heavy_seconds:?}");
    }
    // One log line per state change, and a flushed script is reloaded, not reported as down.
    let down = log.matches("redis unreachable").count();
    let up = log.matches("redis reachable").count();
    assert_eq!(down, 1, "lines reporting Redis down: {down}\n{log}");
    assert_eq!(up, 2, "lines reporting Redis up (start and recovery): {up}\n{log}");
    // Each of the three scripts is loaded again once the flush makes EVALSHA fail. More
    // than one call of a tick can meet the same flushed script, so there can be more.
    assert!(
        reloads_after_flush >= reloads_before_flush + 3,
        "NOSCRIPT reloads went from {reloads_before_flush} to {reloads_after_flush} across SCRIPT FLUSH"
    );
    // Two ticks of backoff at most, plus the reconnect.
    assert!(recovery < Duration::from_millis(1000), "reconciliation resumed {recovery:?} after the restart");
}

/// Returns the agent's count of scripts loaded again after NOSCRIPT.
fn noscript_reloads(iface: &str) -> u64 {
    let output = Agent::cli(&["status", "--iface", iface, "--json"]);
    let status: serde_json::Value =
        serde_json::from_str(&output).unwrap_or_else(|error| panic!("invalid status JSON ({error}): {output}"));
    status["store_errors"]["noscript_reloads"].as_u64().unwrap_or_else(|| panic!("no NOSCRIPT count in status: {output}"))
}
