//! A sync call that times out may still run in Redis later. Its deltas must count once:
//! sending them again with the next tick would count the same packets twice and make the
//! fleet hold the key below its limit.

use std::{net::SocketAddrV4, thread, time::Duration};

use limiter_tests::{
    Agent, Netns, RedisServer, VethPair, free_port, subnet_addr, unique_subnet,
    traffic::{Source, run_traffic},
};
use limiter_user::store::bucket_of;

#[test]
fn deltas_of_timed_out_calls_count_once() {
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let netns = Netns::new();
    let subnet = unique_subnet();
    let gateway_addr = subnet_addr(subnet, 1);
    let source = subnet_addr(subnet, 10);
    let veth = VethPair::new(&netns, gateway_addr, &[source]);
    let _agent = Agent::start(&veth.host, &redis.url(), "once", &["--sync-interval", "100ms", "--redis-timeout", "50ms"]);
    // 1000 packets per 10 s window: the source's 240 packets all pass and all land in at
    // most two windows, whose counts the test adds up.
    Agent::cli(&["limit", "add", "--iface", &veth.host, "--rate", "1000", "--window", "10s", "--proto", "udp"]);

    // 6 s at 40/s. Twice, Redis sleeps 300 ms: the calls of about three ticks time out in
    // the agent and run in Redis once it wakes up.
    let destination = SocketAddrV4::new(gateway_addr, free_port());
    let netns_name = netns.name.clone();
    let traffic = thread::spawn(move || {
        run_traffic(&netns_name, &[Source { addr: source, packets_per_second: 40, cpu: 0 }], destination, Duration::from_secs(6))
    });
    for _ in 0..2 {
        thread::sleep(Duration::from_secs(2));
        let reply = redis.command("DEBUG SLEEP 0.3");
        assert!(reply.contains("OK"), "DEBUG SLEEP failed: {reply:?}");
    }
    let report = traffic.join().expect("traffic thread panicked");
    // Two ticks for the last deltas to reach Redis.
    thread::sleep(Duration::from_millis(500));

    let received = report.received_total(source);
    assert_eq!(received, report.sent[&source], "the source is under its limit and should lose nothing");
    let field = format!("{source}/32");
    let tag = format!("limiter:{{r1b{}}}", bucket_of(&field));
    let counted: u64 = ["even", "odd"]
        .iter()
        .map(|parity| {
            let reply = redis.command(&format!("HGET {tag}:{parity} p:{field}"));
            // A bulk reply "$3\r\n240\r\n", or "$-1" for a window without the key.
            reply.lines().nth(1).and_then(|count| count.trim().parse::<u64>().ok()).unwrap_or(0)
        })
        .sum();
    let status = Agent::cli(&["status", "--iface", &veth.host, "--json"]);
    println!("at most once: received {received}, counted in Redis {counted}; status {status}");
    assert_eq!(counted, received, "Redis counted {counted} of the {received} packets passed: a delta was lost or sent twice");
}
