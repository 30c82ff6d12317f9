//! Requests on the agent's control socket that are invalid get one error line each and
//! change nothing, and the connection stays usable after them.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    time::Duration,
};

use limiter_tests::{Agent, Netns, RedisServer, VethPair, subnet_addr, unique_subnet};
use limiter_user::control::{MAX_REQUEST_BYTES, socket_path};

#[test]
fn invalid_requests_get_one_error_line() {
    let redis = RedisServer::start();
    let netns = Netns::new();
    let subnet = unique_subnet();
    let veth = VethPair::new(&netns, subnet_addr(subnet, 1), &[subnet_addr(subnet, 10)]);
    let iface = veth.host.as_str();
    let _agent = Agent::start(iface, &redis.url(), "control", &[]);
    Agent::cli(&["limit", "add", "--iface", iface, "--rate", "100", "--proto", "udp"]);
    let rules_before = Agent::cli(&["limit", "list", "--iface", iface, "--json"]);

    let stream = UnixStream::connect(socket_path(iface)).expect("connect to the control socket");
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("set a read timeout");
    let mut writer = stream.try_clone().expect("clone the stream");
    let mut reader = BufReader::new(stream);
    let mut exchange = |request: &str| -> String {
        writer.write_all(request.as_bytes()).expect("write a request");
        writer.write_all(b"\n").expect("end the request");
        let mut reply = String::new();
        reader.read_line(&mut reply).expect("read the reply line");
        reply
    };

    let cases: &[(&str, &str)] = &[
        ("not json", "invalid request"),
        ("{}", "invalid request"),
        (r#"{"request":"reboot"}"#, "invalid request"),
        (r#"{"request":"limit_remove","id":"one"}"#, "invalid request"),
        (r#"{"request":"limit_remove","id":99}"#, "rule 99 not found"),
        (r#"{"request":"limit_add","rule":{"rate":100}}"#, "missing field"),
        (&rule_request("\"protocol\":\"icmp\",\"rate\":100,\"window_ms\":1000"), "invalid protocol"),
        (&rule_request("\"protocol\":\"udp\",\"rate\":0,\"window_ms\":1000"), "invalid rate 0"),
        (&rule_request("\"protocol\":\"udp\",\"rate\":100,\"window_ms\":0"), "invalid window"),
    ];
    for (request, expected) in cases {
        let reply = exchange(request);
        assert!(reply.contains("\"response\":\"error\""), "{request}: expected an error, got {reply:?}");
        assert!(reply.contains(expected), "{request}: expected {expected:?} in {reply:?}");
        assert_eq!(reply.lines().count(), 1, "{request}: the reply is one line: {reply:?}");
    }

    // A request longer than the limit is refused, and the connection is closed after it.
    let long = format!(r#"{{"request":"status","pad":"{}"}}"#, "x".repeat(MAX_REQUEST_BYTES));
    let reply = exchange(&long);
    assert!(reply.contains("request too long"), "oversized request: {reply:?}");

    let rules_after = Agent::cli(&["limit", "list", "--iface", iface, "--json"]);
    assert_eq!(rules_after, rules_before, "an invalid request changed the rules");
}

/// Returns a `limit_add` request whose rule has `fields` and the defaults of the others.
fn rule_request(fields: &str) -> String {
    format!(
        r#"{{"request":"limit_add","rule":{{{fields},"port":null,"ipv4_prefix_len":32,"ipv6_prefix_len":128,"per_port":false}}}}"#
    )
}

#[test]
fn agent_status_shows_skb_fallback() {
    let redis = RedisServer::start();
    let netns = Netns::new();
    let subnet = unique_subnet();
    let veth = VethPair::new(&netns, subnet_addr(subnet, 1), &[subnet_addr(subnet, 10)]);
    let iface = veth.host.as_str();
    // Native XDP on veth refuses an MTU of 9000 (see attach.rs), so auto mode falls back.
    limiter_tests::run("ip", &["link", "set", iface, "mtu", "9000"]);
    limiter_tests::run("ip", &["-n", &netns.name, "link", "set", &veth.peer, "mtu", "9000"]);
    let _agent = Agent::start(iface, &redis.url(), "skbfallback", &["--mode", "auto"]);

    let status = Agent::cli(&["status", "--iface", iface]);
    assert!(status.contains("skb"), "status names the skb fallback: {status}");
    let json = Agent::cli(&["status", "--iface", iface, "--json"]);
    let json: serde_json::Value = serde_json::from_str(&json).expect("status prints JSON");
    assert!(json["attachment"].to_string().contains("skb"), "status --json names the skb fallback: {}", json["attachment"]);
}
