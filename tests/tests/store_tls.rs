//! Redis over TLS with an ACL user: the agent syncs through `rediss://user:password@`, a
//! wrong password stops it with a clear error, and the password never reaches its log or
//! `limiter status`.

use std::{
    net::SocketAddrV4,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use limiter_tests::{
    Agent, Netns, VethPair, free_port, limiter_binary,
    store::TlsRedis,
    subnet_addr, unique_name, unique_subnet, wait_until,
    traffic::{Source, run_traffic},
};

#[test]
fn agent_syncs_over_tls_as_acl_user() {
    let redis = TlsRedis::start();
    let netns = Netns::new();
    let subnet = unique_subnet();
    let gateway_addr = subnet_addr(subnet, 1);
    let source = subnet_addr(subnet, 10);
    let veth = VethPair::new(&netns, gateway_addr, &[source]);
    let log_path = std::env::temp_dir().join(format!("{}.log", unique_name("lag")));
    let log = std::fs::File::create(&log_path).expect("create the agent log");
    let url = redis.url_with_password(&redis.password);
    let ca = redis.ca_path();
    let args = ["--redis", &url, "--redis-ca", ca.to_str().expect("UTF-8 path"), "--sync-interval", "100ms"];
    let agent = Agent::start_logging(&veth.host, "tls", &args, log);
    Agent::cli(&["limit", "add", "--iface", &veth.host, "--rate", "100/s", "--proto", "udp"]);

    let destination = SocketAddrV4::new(gateway_addr, free_port());
    let report = run_traffic(&netns.name, &[Source { addr: source, packets_per_second: 50, cpu: 0 }], destination, Duration::from_secs(2));
    wait_until("the agent to reach Redis over TLS", Duration::from_secs(5), || {
        Agent::cli(&["status", "--iface", &veth.host, "--json"]).contains("\"store_reachable\": true")
    });

    // The key's counts reached the store, under the ACL user.
    let keys = redis.cli(&["--scan", "--pattern", "limiter:*"]);
    assert!(keys.contains("limiter:{fleet}:gateways"), "no gateway heartbeat in Redis: {keys:?}");
    assert!(keys.contains(":even") || keys.contains(":odd"), "no window counts in Redis: {keys:?}");
    assert_eq!(report.received_total(source), report.sent[&source], "a source under its limit lost packets");

    // The password appears in neither form of status nor in the log.
    let status_json = Agent::cli(&["status", "--iface", &veth.host, "--json"]);
    let status_text = Agent::cli(&["status", "--iface", &veth.host]);
    drop(agent);
    let log = std::fs::read_to_string(&log_path).expect("read the agent log");
    let _ = std::fs::remove_file(&log_path);
    println!("tls: status {status_text}");
    assert!(status_json.contains("limiter:***@127.0.0.1"), "status does not show the redacted URL: {status_json}");
    assert!(!status_json.contains(&redis.password), "status --json shows the password: {status_json}");
    assert!(!status_text.contains(&redis.password), "status shows the password: {status_text}");
    assert!(!log.contains(&redis.password), "the agent log shows the password:\n{log}");
    assert!(log.contains("redis reachable"), "no line reporting Redis up:\n{log}");
}

#[test]
fn wrong_password_stops_agent() {
    let redis = TlsRedis::start();
    let netns = Netns::new();
    let subnet = unique_subnet();
    let veth = VethPair::new(&netns, subnet_addr(subnet, 1), &[subnet_addr(subnet, 10)]);
    let wrong_password = format!("wrong-{}", unique_name("s"));
    let url = redis.url_with_password(&wrong_password);
    let ca = redis.ca_path();
    let mut child = Command::new(limiter_binary())
        .args(["agent", "--iface", &veth.host, "--node-id", "tls-wrong", "--redis", &url])
        .args(["--redis-ca", ca.to_str().expect("UTF-8 path")])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("failed to start limiter agent: {error}"));

    // The agent checks its credentials before it attaches anything; give it 10 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the agent") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    println!("wrong password: {stderr}");

    let status = status.unwrap_or_else(|| panic!("the agent kept running with a wrong password:\n{stderr}"));
    assert!(!status.success(), "the agent exited with {status} despite a wrong password");
    assert!(stderr.contains("redis rejected the agent's credentials"), "unclear error:\n{stderr}");
    assert!(!stderr.contains(&wrong_password), "the error shows the password:\n{stderr}");
}
