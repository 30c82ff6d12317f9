//! Bad input to the `limiter` command line: each case fails with one line on standard error
//! that names the value and what to do, and leaves the rules as they were.

use std::{net::Ipv4Addr, process::Command};

use limiter_tests::{Agent, Netns, RedisServer, VethPair, limiter_binary, subnet_addr, unique_subnet};

/// Runs `limiter` with `args` and returns (exit code, standard error).
fn run_limiter(args: &[&str]) -> (i32, String) {
    let output = Command::new(limiter_binary()).args(args).env("RUST_LOG", "error").output().expect("run limiter");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn invalid_input_fails_with_one_line() {
    let redis = RedisServer::start();
    let netns = Netns::new();
    let subnet = unique_subnet();
    let veth = VethPair::new(&netns, subnet_addr(subnet, 1), &[Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 10)]);
    let iface = veth.host.as_str();
    let _agent = Agent::start(iface, &redis.url(), "cli-test", &[]);
    Agent::cli(&["limit", "add", "--iface", iface, "--rate", "100", "--proto", "udp"]);
    let rules_before = Agent::cli(&["limit", "list", "--iface", iface, "--json"]);

    let no_agent_iface = "lmnoagent0";
    let cases: &[(&[&str], &str)] = &[
        (&["limit", "add", "--iface", iface, "--rate", "0"], "invalid rate 0"),
        (&["limit", "add", "--iface", iface, "--rate", "ten"], "invalid rate \"ten\""),
        (&["limit", "add", "--iface", iface, "--rate", "100", "--prefix-v4", "33"], "invalid IPv4 prefix length 33"),
        (&["limit", "add", "--iface", iface, "--rate", "100", "--prefix-v6", "129"], "invalid IPv6 prefix length 129"),
        (&["limit", "add", "--iface", iface, "--rate", "100", "--prefix-v4", "10.0.0.0/8"], "invalid value '10.0.0.0/8'"),
        (&["limit", "add", "--iface", iface, "--rate", "100", "--port", "53"], "a port needs --proto tcp or --proto udp"),
        (&["limit", "add", "--iface", iface, "--rate", "100", "--proto", "udp", "--port", "0"], "invalid value '0'"),
        (&["limit", "add", "--iface", iface, "--rate", "100", "--proto", "icmp"], "invalid protocol \"icmp\""),
        (&["limit", "add", "--iface", iface, "--rate", "100", "--window", "0s"], "invalid window \"0s\""),
        (&["limit", "add", "--iface", iface, "--rate", "100", "--window", "2h"], "invalid window \"2h\""),
        (&["limit", "add", "--iface", iface, "--rate", "3/s", "--window", "100ms"], "not a whole number of packets"),
        (&["limit", "remove", "--iface", iface, "99"], "rule 99 not found"),
        (&["limit", "add", "--iface", no_agent_iface, "--rate", "100"], "no limiter is attached to lmnoagent0"),
        (&["status", "--iface", no_agent_iface], "no agent is running on lmnoagent0"),
        (&["stats", "--iface", no_agent_iface], "no limiter is attached to lmnoagent0"),
        (&["agent", "--iface", no_agent_iface, "--redis", "redis://127.0.0.1:1"], "interface lmnoagent0 not found"),
        (&["agent", "--iface", iface, "--redis", "notaurl"], "invalid Redis URL"),
        (&["agent", "--iface", iface, "--redis", &redis.url(), "--node-id", "bad;id"], "invalid node id \"bad;id\""),
        (&["agent", "--iface", iface, "--redis", &redis.url(), "--sync-interval", "0ms"], "invalid duration \"0ms\""),
        (&["agent", "--iface", iface, "--redis", &redis.url()], "another agent is already running"),
        (&["detach", "--iface", iface], "an agent is running on"),
        (&["attach", "--iface", no_agent_iface], "interface lmnoagent0 not found"),
        (&["explain", "--iface", iface, "udp 192.0.2.1 -> 198.51.100.7"], "missing destination port"),
        (&["explain", "--iface", iface, "sctp 192.0.2.1 -> 198.51.100.7"], "invalid protocol \"sctp\""),
        (&["explain", "--iface", iface, "--hex", "0x123"], "invalid hex frame"),
        (&["explain", "--iface", no_agent_iface, "icmp 192.0.2.1 -> 198.51.100.7"], "no limiter is attached to lmnoagent0"),
        (&["top", "--iface", iface, "--interval", "10ms"], "invalid interval \"10ms\""),
        (&["top", "--iface", no_agent_iface], "no limiter is attached to lmnoagent0"),
        (&["agent", "--iface", iface, "--redis", &redis.url(), "--metrics-addr", "localhost"], "invalid value 'localhost'"),
        (
            &["agent", "--iface", iface, "--redis", &redis.url(), "--metrics-addr", &format!("127.0.0.1:{}", redis.port)],
            "failed to bind the metrics address",
        ),
    ];
    for (args, expected) in cases {
        let (code, stderr) = run_limiter(args);
        let command = args.join(" ");
        assert_ne!(code, 0, "`limiter {command}` succeeded");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "`limiter {command}` printed {} lines: {stderr:?}", lines.len());
        assert!(lines[0].starts_with("error: "), "`limiter {command}` printed {stderr:?}");
        assert!(lines[0].contains(expected), "`limiter {command}`: expected {expected:?} in {stderr:?}");
        let rules_after = Agent::cli(&["limit", "list", "--iface", iface, "--json"]);
        assert_eq!(rules_after, rules_before, "`limiter {command}` changed the rules");
    }
}
