//! The configuration file with a real agent: `limiter apply` replaces the whole rule set or
//! changes nothing, a rule that stays keeps its id and its keys' counters, and SIGHUP makes
//! the agent read its `--config` file again.

use std::{
    net::SocketAddrV4,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use limiter_tests::{
    Agent, Netns, RedisServer, VethPair, free_port, limiter_binary, subnet_addr, unique_name, unique_subnet,
    traffic::{Source, run_traffic},
    wait_until,
};
use limiter_user::datapath::Maps;
use serde_json::Value;

/// A file under /tmp, removed on drop.
struct TempFile {
    path: PathBuf,
}

impl TempFile {
    fn new(suffix: &str) -> Self {
        Self { path: std::env::temp_dir().join(format!("{}{suffix}", unique_name("lcfg"))) }
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.path, text).unwrap_or_else(|error| panic!("failed to write {}: {error}", self.path.display()));
    }

    fn path(&self) -> &str {
        self.path.to_str().expect("UTF-8 temporary path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Returns the rules of `limit list --json` on `iface`.
fn list_rules(iface: &str) -> Vec<Value> {
    let output = Agent::cli(&["limit", "list", "--iface", iface, "--json"]);
    serde_json::from_str(&output).unwrap_or_else(|error| panic!("limit list --json printed invalid JSON ({error}): {output}"))
}

/// Returns the rule for `protocol` and `port` in `rules`.
fn find_rule<'a>(rules: &'a [Value], protocol: &str, port: Option<u64>) -> Option<&'a Value> {
    rules.iter().find(|rule| rule["protocol"] == protocol && rule["port"].as_u64() == port)
}

fn rule_id(rules: &[Value], protocol: &str, port: Option<u64>) -> u64 {
    let rule = find_rule(rules, protocol, port).unwrap_or_else(|| panic!("no {protocol} {port:?} rule in {rules:?}"));
    rule["id"].as_u64().expect("rule id")
}

/// Returns the packets offered by every key of rule `id`, summed over CPUs, from the pinned
/// COUNTERS map. It only grows while the keys' entries live.
fn offered_packets(iface: &str, id: u64) -> u64 {
    let maps = Maps::open(iface).expect("open the pinned maps");
    maps.counters
        .iter()
        .filter_map(Result::ok)
        .filter(|(key, _)| u64::from(key.rule_id) == id)
        .map(|(_, per_cpu)| per_cpu.iter().map(|counter| counter.offered).sum::<u64>())
        .sum()
}

/// Runs `limiter` with `args` and returns (exit code, standard error).
fn run_limiter(args: &[&str]) -> (i32, String) {
    let output = Command::new(limiter_binary()).args(args).env("RUST_LOG", "error").output().expect("run limiter");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).into_owned())
}

const THREE_RULES: &str = r#"
[[rule]]
rate = "1000/s"
proto = "udp"

[[rule]]
rate = 100
proto = "tcp"
port = 80

[[rule]]
rate = 10
"#;

/// The UDP rule as before, the TCP port 80 rule at a new rate, the `any` rule gone and a
/// rule for TCP port 443 added.
const CHANGED_RULES: &str = r#"
[[rule]]
rate = "1000/s"
proto = "udp"

[[rule]]
rate = 200
proto = "tcp"
port = 80

[[rule]]
rate = 5
proto = "tcp"
port = 443
"#;

#[test]
fn apply_replaces_whole_rule_set() {
    let redis = RedisServer::start();
    let netns = Netns::new();
    let subnet = unique_subnet();
    let gateway_addr = subnet_addr(subnet, 1);
    let source_addr = subnet_addr(subnet, 10);
    let veth = VethPair::new(&netns, gateway_addr, &[source_addr]);
    let iface = veth.host.as_str();
    let _agent = Agent::start(iface, &redis.url(), &unique_name("cfg"), &["--sync-interval", "100ms"]);
    let file = TempFile::new(".toml");

    // Step 1: a file of three rules adds all three.
    file.write(THREE_RULES);
    let output = Agent::cli(&["apply", file.path(), "--iface", iface]);
    assert!(output.contains("3 added, 0 changed, 0 removed, 0 unchanged"), "apply printed {output:?}");
    let rules = list_rules(iface);
    assert_eq!(rules.len(), 3, "rules after the first apply: {rules:?}");
    let udp_id = rule_id(&rules, "udp", None);
    let tcp_80_id = rule_id(&rules, "tcp", Some(80));
    assert_eq!(find_rule(&rules, "udp", None).unwrap()["rate"], 1000);

    // Step 2: a little traffic gives the UDP rule's key counters.
    let destination = SocketAddrV4::new(gateway_addr, free_port());
    let source = Source { addr: source_addr, packets_per_second: 50, cpu: 0 };
    let report = run_traffic(&netns.name, &[source], destination, Duration::from_secs(1));
    let offered_before = offered_packets(iface, udp_id);
    println!("sent {:?}, offered to the UDP rule's keys: {offered_before}", report.sent);
    assert!(offered_before >= 40, "the UDP rule's keys counted {offered_before} packets of about 50 sent");

    // Step 3: a file with one invalid rule fails on one line and changes nothing.
    let rules_before = list_rules(iface);
    file.write(&CHANGED_RULES.replace("rate = 5", "rate = \"ten\""));
    let (code, stderr) = run_limiter(&["apply", file.path(), "--iface", iface]);
    assert_ne!(code, 0, "apply of an invalid file succeeded");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "apply of an invalid file printed {} lines: {stderr:?}", lines.len());
    assert!(lines[0].starts_with("error: "), "{stderr:?}");
    assert!(lines[0].contains("rule 3, field rate: invalid rate \"ten\""), "{stderr:?}");
    assert_eq!(list_rules(iface), rules_before, "an invalid file changed the rules");

    // Step 4: the changed file keeps the UDP rule untouched, with its id and counters,
    // replaces the TCP port 80 rule under the same id, removes one rule and adds one.
    file.write(CHANGED_RULES);
    let output = Agent::cli(&["apply", file.path(), "--iface", iface]);
    assert!(output.contains("1 added, 1 changed, 1 removed, 1 unchanged"), "apply printed {output:?}");
    let rules = list_rules(iface);
    assert_eq!(rules.len(), 3, "rules after the second apply: {rules:?}");
    assert_eq!(rule_id(&rules, "udp", None), udp_id, "the unchanged UDP rule got a new id: {rules:?}");
    assert_eq!(rule_id(&rules, "tcp", Some(80)), tcp_80_id, "the changed TCP rule got a new id: {rules:?}");
    assert_eq!(find_rule(&rules, "tcp", Some(80)).unwrap()["rate"], 200);
    assert!(find_rule(&rules, "any", None).is_none(), "the rule the file dropped is still there: {rules:?}");
    assert!(find_rule(&rules, "tcp", Some(443)).is_some(), "the new rule is missing: {rules:?}");
    let offered_after = offered_packets(iface, udp_id);
    println!("offered to the UDP rule's keys after the second apply: {offered_after}");
    assert!(offered_after >= offered_before, "the UDP rule's counters went from {offered_before} to {offered_after}");

    // Step 5: the agent published each set to the fleet, with this gateway as origin.
    let header = || Agent::cli(&["limit", "list", "--iface", iface]).lines().next().unwrap_or_default().to_owned();
    wait_until("limit list to show the published version", Duration::from_secs(2), || {
        header().starts_with("rule set version 2, published by cfg")
    });

    // Step 6: applying the same file again changes nothing, and publishing the same set
    // does not bump the version.
    let output = Agent::cli(&["apply", file.path(), "--iface", iface]);
    assert!(output.contains("0 added, 0 changed, 0 removed, 3 unchanged"), "apply printed {output:?}");
    std::thread::sleep(Duration::from_millis(300));
    let listed = header();
    assert!(listed.starts_with("rule set version 2,"), "limit list header after an unchanged apply: {listed:?}");

    // Step 7: a file without [[rule]] entries is rejected rather than read as "remove all".
    file.write("[agent]\nsync_interval = \"100ms\"\n");
    let (code, stderr) = run_limiter(&["apply", file.path(), "--iface", iface]);
    assert_ne!(code, 0, "apply of a file without rules succeeded");
    assert!(stderr.contains("no [[rule]] entries"), "{stderr:?}");
    assert_eq!(list_rules(iface).len(), 3);
}

#[test]
fn sighup_reloads_config_rules() {
    let redis = RedisServer::start();
    let netns = Netns::new();
    let subnet = unique_subnet();
    let veth = VethPair::new(&netns, subnet_addr(subnet, 1), &[subnet_addr(subnet, 10)]);
    let iface = veth.host.as_str();
    let file = TempFile::new(".toml");
    let log = TempFile::new(".log");
    let agent_table = format!("[agent]\nredis = \"{}\"\nsync_interval = \"200ms\"\n", redis.url());

    // The agent reads its settings and rules from the file; the command line names only
    // the interface and node id.
    file.write(&format!("{agent_table}\n[[rule]]\nrate = 100\nproto = \"udp\"\n"));
    let log_file = std::fs::File::create(&log.path).expect("create the agent log");
    let node_id = unique_name("hup");
    let agent = Agent::start_logging(iface, &node_id, &["--config", file.path()], log_file);
    let rules = list_rules(iface);
    assert_eq!(rules.len(), 1, "rules from the file at start: {rules:?}");
    let udp_id = rule_id(&rules, "udp", None);
    let status: Value = serde_json::from_str(&Agent::cli(&["status", "--iface", iface, "--json"])).expect("status JSON");
    assert_eq!(status["sync_interval_ms"], 200, "sync_interval from the file: {status}");

    // The rules of the file were published at start, as `status --json` shows.
    wait_until("the agent to publish the file's rules", Duration::from_secs(2), || {
        let status: Value = serde_json::from_str(&Agent::cli(&["status", "--iface", iface, "--json"])).expect("status JSON");
        status["rule_set"]["version"] == 1 && status["rule_set"]["origin_node"] == node_id.as_str()
    });

    // A changed file: the UDP rule gets a new rate under its id, and a TCP rule is added.
    file.write(&format!("{agent_table}\n[[rule]]\nrate = 300\nproto = \"udp\"\n\n[[rule]]\nrate = 20\nproto = \"tcp\"\n"));
    let sent = Instant::now();
    send_sighup(agent.pid());
    wait_until("the agent to apply the reloaded rules", Duration::from_secs(5), || list_rules(iface).len() == 2);
    println!("rules reloaded {:?} after SIGHUP", sent.elapsed());
    let rules = list_rules(iface);
    assert_eq!(rule_id(&rules, "udp", None), udp_id, "the UDP rule got a new id: {rules:?}");
    assert_eq!(find_rule(&rules, "udp", None).unwrap()["rate"], 300);
    let log_text = std::fs::read_to_string(&log.path).unwrap_or_default();
    let reloaded: Vec<&str> = log_text.lines().filter(|line| line.contains("configuration reloaded")).collect();
    assert_eq!(reloaded.len(), 1, "expected one reload line in the log: {log_text}");
    assert!(reloaded[0].contains("added=1"), "{}", reloaded[0]);
    assert!(reloaded[0].contains("changed=1"), "{}", reloaded[0]);

    // A bad file: one error line in the log, and the rules stay.
    file.write(&format!("{agent_table}\n[[rule]]\nrate = \"ten\"\n"));
    send_sighup(agent.pid());
    wait_until("the agent to log the failed reload", Duration::from_secs(5), || {
        std::fs::read_to_string(&log.path).unwrap_or_default().contains("failed to reload the configuration")
    });
    let log_text = std::fs::read_to_string(&log.path).unwrap_or_default();
    let failed = log_text.lines().find(|line| line.contains("failed to reload the configuration")).unwrap_or_default();
    assert!(failed.contains("rule 1, field rate: invalid rate"), "{failed}");
    assert_eq!(list_rules(iface), rules, "a bad file changed the rules");
}

fn send_sighup(pid: u32) {
    // SAFETY: plain kill(2) on the pid of an agent this test started and has not reaped.
    let result = unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    assert_eq!(result, 0, "kill -HUP {pid} failed: {}", std::io::Error::last_os_error());
}
