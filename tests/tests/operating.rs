//! The operator's read commands against real traffic: the metrics endpoint scraped over
//! loopback, `limiter top` in a pseudo-terminal, and `limiter explain` held against the
//! verdicts real packets get.
//!
//! Each test runs one gateway (a veth pair with its own agent) and a redis-server, and sends
//! paced UDP from sources inside a namespace.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use limiter_tests::{
    Agent, Netns, RedisServer, VethPair, free_port, limiter_binary, subnet_addr, unique_name, unique_subnet,
    test_run::Frame,
    traffic::{Source, run_traffic, spawn_sender},
};

/// One gateway with an agent and a rule of 100/s per UDP source.
struct Gateway {
    _redis: RedisServer,
    netns: Netns,
    veth: VethPair,
    _agent: Agent,
    gateway_addr: Ipv4Addr,
    subnet: [u8; 3],
}

impl Gateway {
    fn start(extra_agent_args: &[&str], sources: &[u8]) -> Self {
        let redis = RedisServer::start();
        let netns = Netns::new();
        let subnet = unique_subnet();
        let gateway_addr = subnet_addr(subnet, 1);
        let source_addrs: Vec<Ipv4Addr> = sources.iter().map(|host| subnet_addr(subnet, *host)).collect();
        let veth = VethPair::new(&netns, gateway_addr, &source_addrs);
        let mut args = vec!["--sync-interval", "100ms"];
        args.extend_from_slice(extra_agent_args);
        let agent = Agent::start(&veth.host, &redis.url(), &unique_name("gw"), &args);
        Agent::cli(&["limit", "add", "--iface", &veth.host, "--rate", "100/s", "--proto", "udp"]);
        Self { _redis: redis, netns, veth, _agent: agent, gateway_addr, subnet }
    }

    fn iface(&self) -> &str {
        &self.veth.host
    }

    fn source(&self, host: u8) -> Ipv4Addr {
        subnet_addr(self.subnet, host)
    }
}

/// Sends one HTTP/1.1 GET to 127.0.0.1:`port` and returns (status line, body).
fn http_get(port: u16, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_secs(2))
        .unwrap_or_else(|error| panic!("failed to connect to the metrics port {port}: {error}"));
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("set read timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/plain\r\n\r\n").expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or_else(|| panic!("response without a head: {response:?}"));
    (head.lines().next().unwrap_or_default().to_owned(), body.to_owned())
}

/// Returns the value of the sample `series` (name with labels, as printed) in a scrape.
fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {series} in the scrape:\n{body}"))
        .trim()
        .parse()
        .unwrap_or_else(|error| panic!("sample {series} is not a number: {error}"))
}

#[test]
fn metrics_scrape_counts_rule_verdicts() {
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let gateway = Gateway::start(&["--metrics-addr", &metrics_addr], &[10]);
    let heavy = gateway.source(10);

    // Step 1: a source at 3x its limit for 4 s.
    let destination = SocketAddrV4::new(gateway.gateway_addr, free_port());
    let report = run_traffic(&gateway.netns.name, &[Source { addr: heavy, packets_per_second: 300, cpu: 0 }], destination, Duration::from_secs(4));
    let sent = report.sent[&heavy];
    let received = report.received_total(heavy);
    println!("sent {sent}, received {received}");

    // Step 2: scrape over loopback and check each family of metrics.
    let (status, body) = http_get(metrics_port, "/metrics");
    println!("{body}");
    assert!(status.contains("200"), "scrape returned {status}");

    let passed = sample(&body, "limiter_rule_passed_packets_total{rule=\"1\"}");
    let dropped = sample(&body, "limiter_rule_dropped_packets_total{rule=\"1\"}");
    assert!(
        (passed - received as f64).abs() <= 3.0,
        "rule 1 passed {passed}, but the receiver counted {received} packets"
    );
    assert!(
        (passed + dropped - sent as f64).abs() <= 3.0,
        "rule 1 passed {passed} and dropped {dropped}, but the sender sent {sent}"
    );
    let global_drops = sample(&body, "limiter_packets_total{reason=\"dropped_global_limit\"}");
    let local_drops = sample(&body, "limiter_packets_total{reason=\"dropped_local_limit\"}");
    assert!(global_drops > 0.0, "no packet counted under dropped_global_limit");
    assert_eq!(global_drops + local_drops, dropped, "per-reason drops differ from the rule's drops");

    let ticks = sample(&body, "limiter_tick_duration_seconds_count");
    assert!((20.0..=80.0).contains(&ticks), "{ticks} ticks observed in about 5 s at 100 ms");
    assert_eq!(sample(&body, "limiter_breaker_state{state=\"closed\"}"), 1.0);
    assert_eq!(sample(&body, "limiter_breaker_state{state=\"open\"}"), 0.0);
    assert_eq!(sample(&body, "limiter_store_errors_total{kind=\"connection\"}"), 0.0);
    assert_eq!(sample(&body, "limiter_store_reachable"), 1.0);
    assert!(sample(&body, "limiter_map_entries{map=\"counters\"}") >= 1.0, "the source's key is not counted");
    assert_eq!(sample(&body, "limiter_map_max_entries{map=\"counters\"}"), 65536.0);
    assert_eq!(sample(&body, "limiter_map_entries{map=\"rules\"}"), 1.0);
    assert!(!body.contains(&heavy.to_string()), "a metric carries the source address");

    // Step 3: anything but GET /metrics is rejected.
    let (status, _) = http_get(metrics_port, "/other");
    assert!(status.contains("404"), "GET /other returned {status}");

    // Step 4: the same rule in shadow mode counts would-be drops and drops nothing.
    Agent::cli(&["limit", "add", "--iface", gateway.iface(), "--rate", "100/s", "--proto", "udp", "--shadow"]);
    let report = run_traffic(&gateway.netns.name, &[Source { addr: heavy, packets_per_second: 300, cpu: 0 }], destination, Duration::from_secs(2));
    let (_, shadow_body) = http_get(metrics_port, "/metrics");
    let would_drop = sample(&shadow_body, "limiter_rule_would_drop_packets_total{rule=\"1\"}");
    let passed_shadow = sample(&shadow_body, "limiter_packets_total{reason=\"passed_shadow\"}");
    let dropped_after = sample(&shadow_body, "limiter_rule_dropped_packets_total{rule=\"1\"}");
    println!("shadow: sent {}, received {}, would drop {would_drop}", report.sent[&heavy], report.received_total(heavy));
    assert!(would_drop > 0.0, "a shadow rule over a source at 3x its limit counted no would-be drop");
    assert_eq!(would_drop, passed_shadow, "per-rule would-be drops differ from passed_shadow");
    assert_eq!(dropped_after, dropped, "a shadow rule dropped packets");
    assert_eq!(report.received_total(heavy), report.sent[&heavy], "a shadow rule lost packets");
}

/// Splits the output of `top` into the frames it drew, at each clear-screen sequence.
fn frames(output: &str) -> Vec<&str> {
    output.split("\x1b[H\x1b[2J").skip(1).collect()
}

/// Returns the offered and passed rates of `key` in one frame of `top`, and its state.
fn top_row(frame: &str, key: &str) -> Option<(f64, f64, String)> {
    let line = frame.lines().find(|line| line.split_whitespace().nth(1) == Some(key))?;
    let columns: Vec<&str> = line.split_whitespace().collect();
    Some((columns[2].parse().ok()?, columns[3].parse().ok()?, columns[5].to_owned()))
}

#[test]
fn top_redraws_heavy_keys_in_terminal() {
    let gateway = Gateway::start(&[], &[10, 11]);
    let (heavy, light) = (gateway.source(10), gateway.source(11));
    let destination = SocketAddrV4::new(gateway.gateway_addr, free_port());
    let start = Instant::now() + Duration::from_millis(100);
    let duration = Duration::from_secs(9);
    let senders = [
        spawn_sender(&gateway.netns.name, Source { addr: heavy, packets_per_second: 300, cpu: 0 }, destination, start, duration),
        spawn_sender(&gateway.netns.name, Source { addr: light, packets_per_second: 20, cpu: 1 }, destination, start, duration),
    ];
    // Past the heavy key's first two seconds, whose pace differs from the steady state.
    std::thread::sleep(Duration::from_millis(2500));

    // Step 1: `top` in a pseudo-terminal from script(1), three refreshes a second apart.
    let command = format!("{} top --iface {} --interval 1s --refreshes 3", limiter_binary().display(), gateway.iface());
    let mut child = Command::new("script")
        .args(["-qfec", &command, "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("failed to start script(1) from util-linux");
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().expect("wait for script").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("limiter top did not exit after 3 refreshes within 15 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut output = String::new();
    child.stdout.take().expect("piped stdout").read_to_string(&mut output).expect("read top output");
    assert!(child.wait().expect("script status").success(), "limiter top failed: {output}");

    // Step 2: three frames, each drawn over the last, each with both sources.
    let frames = frames(&output);
    assert_eq!(frames.len(), 3, "expected 3 frames drawn in place, got {}: {output:?}", frames.len());
    assert!(output.contains("\x1b[?25h"), "the cursor was not shown again on exit");
    for (index, frame) in frames.iter().enumerate() {
        println!("frame {index}:\n{frame}");
        let (offered, passed, state) =
            top_row(frame, &format!("{heavy}/32")).unwrap_or_else(|| panic!("frame {index} lacks {heavy}: {frame}"));
        assert!((240.0..=360.0).contains(&offered), "frame {index}: heavy source offered {offered}/s, sent 300/s");
        assert!((70.0..=130.0).contains(&passed), "frame {index}: heavy source passed {passed}/s, limit 100/s");
        assert_eq!(state, "grant", "frame {index}: heavy source in state {state}");
        let (light_offered, _, _) =
            top_row(frame, &format!("{light}/32")).unwrap_or_else(|| panic!("frame {index} lacks {light}: {frame}"));
        assert!((10.0..=30.0).contains(&light_offered), "frame {index}: light source offered {light_offered}/s, sent 20/s");
        let heavy_line = frame.find(&format!("{heavy}/32")).expect("heavy row");
        let light_line = frame.find(&format!("{light}/32")).expect("light row");
        assert!(heavy_line < light_line, "frame {index}: the heavier key is not listed first");
    }

    // Step 3: `--json` prints one view and exits.
    let json = Agent::cli(&["top", "--iface", gateway.iface(), "--interval", "1s", "--json"]);
    let view: serde_json::Value = serde_json::from_str(&json).expect("top --json prints JSON");
    let first = &view["keys"][0];
    assert_eq!(first["key"], format!("{heavy}/32"), "{json}");
    let offered = first["offered_per_second"].as_f64().expect("offered rate");
    assert!((240.0..=360.0).contains(&offered), "top --json: heavy source offered {offered}/s");

    for sender in senders {
        sender.join().expect("sender thread");
    }
}

/// Runs `limiter explain --json` with `args` after the interface and returns its output.
fn explain(iface: &str, args: &[&str]) -> serde_json::Value {
    let mut command = vec!["explain", "--iface", iface, "--json"];
    command.extend_from_slice(args);
    let output = Agent::cli(&command);
    serde_json::from_str(&output).unwrap_or_else(|error| panic!("explain printed invalid JSON ({error}): {output}"))
}

/// Returns the packets counted under `reason` in `limiter stats`.
fn stat(iface: &str, reason: &str) -> u64 {
    let stats: serde_json::Value = serde_json::from_str(&Agent::cli(&["stats", "--iface", iface, "--json"])).expect("stats JSON");
    stats[reason].as_u64().unwrap_or_else(|| panic!("no reason {reason} in {stats}"))
}

/// Reasons a packet of a rule's key is counted under.
const KEY_REASONS: [&str; 4] = ["passed", "dropped_local_limit", "dropped_global_limit", "passed_shadow"];

/// Explains `packet` `samples` times, 40 ms apart. Returns the share of the outputs that
/// name `reason`, and the share of the real packets counted under `reason` meanwhile.
///
/// A source over its limit is dropped only once its grant for the tick is spent, so one
/// output may rightly be "pass". What must agree is how often each verdict comes up.
fn verdict_shares(iface: &str, packet: &str, reason: &str, samples: usize) -> (f64, f64) {
    let before: Vec<u64> = KEY_REASONS.iter().map(|name| stat(iface, name)).collect();
    // Spread over about 1.2 s, so the real share comes from hundreds of packets.
    let mut matches = 0;
    for _ in 0..samples {
        matches += usize::from(explain(iface, &[packet])["reason"] == reason);
        std::thread::sleep(Duration::from_millis(40));
    }
    let after: Vec<u64> = KEY_REASONS.iter().map(|name| stat(iface, name)).collect();
    let deltas: Vec<u64> = after.iter().zip(&before).map(|(after, before)| after - before).collect();
    let index = KEY_REASONS.iter().position(|name| *name == reason).expect("a reason of KEY_REASONS");
    let real = deltas[index] as f64 / deltas.iter().sum::<u64>().max(1) as f64;
    let explained = matches as f64 / samples as f64;
    println!("{reason}: {matches} of {samples} outputs, real share {real:.2} of {deltas:?}");
    (explained, real)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[test]
fn explain_agrees_with_real_verdicts() {
    let gateway = Gateway::start(&[], &[10, 11]);
    let iface = gateway.iface().to_owned();
    let (heavy, fresh) = (gateway.source(10), gateway.source(11));
    let port = free_port();
    let destination = SocketAddrV4::new(gateway.gateway_addr, port);
    let heavy_packet = format!("udp {heavy}:40000 -> {}:{port}", gateway.gateway_addr);
    let fresh_packet = format!("udp {fresh}:40000 -> {}:{port}", gateway.gateway_addr);

    // Step 1: a source no packet came from yet is a new key, and explaining it creates nothing.
    // Only UDP can change these; the kernel's own IPv6 neighbour discovery on a new veth
    // counts under no_rule and not_ip meanwhile.
    let udp_reasons = ["passed", "dropped_local_limit", "dropped_global_limit", "untracked"];
    let stats_before: Vec<u64> = udp_reasons.iter().map(|reason| stat(&iface, reason)).collect();
    let fresh_view = explain(&iface, &[&fresh_packet]);
    println!("{fresh_view:#}");
    assert_eq!(fresh_view["verdict"], "pass");
    assert_eq!(fresh_view["reason"], "passed");
    assert_eq!(fresh_view["key"], format!("{fresh}/32"));
    assert_eq!(fresh_view["key_exists"], false);
    assert_eq!(fresh_view["rule"]["id"], 1);
    assert!(fresh_view["cpus"].as_array().expect("cpus").iter().all(|cpu| cpu["state"] == "new_key"), "{fresh_view}");
    assert_eq!(explain(&iface, &[&fresh_packet])["key_exists"], false, "explain created the key's counters");
    let stats_after: Vec<u64> = udp_reasons.iter().map(|reason| stat(&iface, reason)).collect();
    assert_eq!(stats_after, stats_before, "explain changed a verdict counter of {udp_reasons:?}");

    // Step 2: a source at 3x its limit, explained while its packets are being dropped.
    let start = Instant::now() + Duration::from_millis(100);
    let sender = spawn_sender(
        &gateway.netns.name,
        Source { addr: heavy, packets_per_second: 300, cpu: 0 },
        destination,
        start,
        Duration::from_secs(5),
    );
    std::thread::sleep(Duration::from_millis(2000));
    let (explained, real) = verdict_shares(&iface, &heavy_packet, "dropped_global_limit", 30);
    assert!(explained >= 0.4, "explain said drop in {explained:.2} of its outputs for a source at 3x its limit");
    assert!((explained - real).abs() <= 0.3, "explain said drop in {explained:.2} of its outputs, real packets: {real:.2}");
    let heavy_view = explain(&iface, &[&heavy_packet]);
    let frame = Frame::ipv4(heavy, gateway.gateway_addr).udp(40000, port).build();
    let hex_view = explain(&iface, &["--hex", &hex(&frame)]);
    println!("{heavy_view:#}");
    assert_eq!(heavy_view["cpu"], 0, "the sender is pinned to CPU 0");
    assert_eq!(heavy_view["key_exists"], true);
    assert_eq!(heavy_view["cpus"][0]["state"], "grant");
    assert!(heavy_view["offered"].as_u64().expect("offered") > heavy_view["passed"].as_u64().expect("passed"));
    assert_eq!(hex_view["key"], heavy_view["key"], "the frame of the same packet: {hex_view}");
    assert_eq!(hex_view["rule"]["id"], 1);
    let text = Agent::cli(&["explain", "--iface", &iface, &heavy_packet]);
    println!("{text}");
    assert!(text.contains(&format!("key:      {heavy}/32")), "{text}");
    assert!(text.lines().any(|line| line.starts_with("verdict:  ")), "{text}");
    sender.join().expect("sender thread");

    // Step 3: the fresh source's packets pass, as explained in step 1.
    let report = run_traffic(&gateway.netns.name, &[Source { addr: fresh, packets_per_second: 20, cpu: 1 }], destination, Duration::from_secs(1));
    assert_eq!(report.received_total(fresh), report.sent[&fresh], "explain said pass, but packets of a new key were lost");

    // Step 4: traffic no rule selects, and frames the parser rejects.
    let no_rule = explain(&iface, &[&format!("tcp {heavy}:40000 -> {}:80", gateway.gateway_addr)]);
    assert_eq!((no_rule["verdict"].as_str(), no_rule["reason"].as_str()), (Some("pass"), Some("no_rule")), "{no_rule}");
    let mut cut = Frame::ipv4(heavy, gateway.gateway_addr).udp(40000, port).build();
    cut.truncate(14 + 20 + 4);
    let malformed = explain(&iface, &["--hex", &hex(&cut)]);
    assert_eq!((malformed["verdict"].as_str(), malformed["reason"].as_str()), (Some("drop"), Some("malformed")));

    // Step 5: a denied source, then a shadow rule over the heavy source: each explained,
    // then checked against what its packets get.
    Agent::cli(&["deny", "add", "--iface", &iface, &format!("{fresh}/32")]);
    let denied = explain(&iface, &[&fresh_packet]);
    assert_eq!((denied["verdict"].as_str(), denied["reason"].as_str()), (Some("drop"), Some("dropped_denylist")), "{denied}");
    let report = run_traffic(&gateway.netns.name, &[Source { addr: fresh, packets_per_second: 20, cpu: 1 }], destination, Duration::from_secs(1));
    assert_eq!(report.received_total(fresh), 0, "explain said the denied source is dropped, but its packets arrived");
    Agent::cli(&["deny", "remove", "--iface", &iface, &format!("{fresh}/32")]);

    Agent::cli(&["limit", "add", "--iface", &iface, "--rate", "100/s", "--proto", "udp", "--shadow"]);
    let sender = spawn_sender(
        &gateway.netns.name,
        Source { addr: heavy, packets_per_second: 300, cpu: 0 },
        destination,
        Instant::now(),
        Duration::from_secs(4),
    );
    std::thread::sleep(Duration::from_millis(1500));
    let shadowed = explain(&iface, &[&heavy_packet]);
    assert_eq!(shadowed["rule"]["shadow"], true, "{shadowed}");
    let (explained, real) = verdict_shares(&iface, &heavy_packet, "passed_shadow", 30);
    sender.join().expect("sender thread");
    assert!(explained >= 0.4, "explain said passed_shadow in {explained:.2} of its outputs for a source at 3x its limit");
    assert!((explained - real).abs() <= 0.3, "explain said passed_shadow in {explained:.2} of its outputs, real packets: {real:.2}");
}
