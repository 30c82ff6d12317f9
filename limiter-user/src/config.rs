//! The configuration file (TOML): agent settings in an `[agent]` table and the rule set in
//! `[[rule]]` entries, read by `limiter agent --config`, by `limiter apply` and on SIGHUP.
//!
//! Every value is checked before any is used. Each error is one line that names the entry
//! and field, the bad value, and what is expected, so a bad file changes nothing.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::ValueEnum as _;
use limiter_common::MAX_RULES;
use toml::{Table, Value};

use crate::{
    control::{self, Request, Response},
    datapath::{AttachMode, Maps},
    rule_sync::{self, RuleChanges},
    rule_table::RuleTable,
    rules::{
        InnerTier, Protocol, Rate, RateUnit, RuleError, RuleSpec, StoreDownPolicy, parse_rate, parse_window, rate_in_bytes,
    },
};

/// Keys of the `[agent]` table.
const AGENT_KEYS: &[&str] =
    &["iface", "mode", "redis", "redis_cluster", "redis_ca", "sync_interval", "node_id", "max_keys", "redis_timeout"];

/// Keys of a `[[rule]]` entry, named like the options of `limiter limit add`.
const RULE_KEYS: &[&str] = &[
    "rate",
    "window",
    "proto",
    "port",
    "prefix_v4",
    "prefix_v6",
    "per_port",
    "store_down",
    "bytes",
    "syn",
    "inner_rate",
    "inner_prefix_v4",
    "inner_prefix_v6",
    "shadow",
];

/// Agent settings from the `[agent]` table. A setting the file leaves out is `None`, and a
/// command-line option given for the same setting takes precedence over the file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentSettings {
    pub iface: Option<String>,
    pub mode: Option<AttachMode>,
    pub redis: Option<Vec<String>>,
    pub redis_cluster: Option<bool>,
    /// Resolved against the configuration file's folder when relative.
    pub redis_ca: Option<PathBuf>,
    pub sync_interval: Option<Duration>,
    pub node_id: Option<String>,
    pub max_keys: Option<u32>,
    pub redis_timeout: Option<Duration>,
}

/// A checked configuration file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigFile {
    pub agent: AgentSettings,
    /// The whole rule set, in file order; `None` when the file has no `rule` key, which
    /// leaves the rules as they are. `rule = []` is an empty rule set.
    pub rules: Option<Vec<RuleSpec>>,
}

/// A configuration file and the path it was read from, kept by the agent for SIGHUP.
#[derive(Clone, Debug)]
pub struct LoadedConfig {
    pub path: PathBuf,
    pub contents: ConfigFile,
}

/// A configuration file that could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    pub path: String,
    /// Location in the file, the problem, and the expected value.
    pub message: String,
}

/// Parses a time between reconciliations or a Redis timeout, such as `100ms` or `1s`.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|error| format!("invalid duration {text:?}: {error}; expected a value such as 100ms or 1s"))?;
    if duration < Duration::from_millis(1) || duration > Duration::from_secs(60) {
        return Err(format!("invalid duration {text:?}: expected between 1ms and 60s"));
    }
    Ok(duration)
}

/// Reads and checks the configuration file at `path`.
pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
    let error = |message: String| ConfigError { path: path.display().to_string(), message };
    let text = std::fs::read_to_string(path)
        .map_err(|read_error| error(format!("failed to read the file: {read_error}; check the path given")))?;
    let folder = path.parent().unwrap_or(Path::new("."));
    parse(&text, folder).map_err(error)
}

/// Checks the file at `path` and makes its rules the whole rule set of `iface` (or of the
/// file's `iface`): through the agent when one runs, else in the pinned maps. Returns a line
/// that counts what changed.
pub async fn apply_file(path: &Path, iface: Option<String>) -> anyhow::Result<String> {
    let file = load(path)?;
    let Some(specs) = file.rules else {
        bail!("{}: no [[rule]] entries: write the rules to apply, or `rule = []` to remove every rule", path.display());
    };
    let iface = iface.or(file.agent.iface).with_context(|| {
        format!("missing interface: pass --iface IF, or set iface in the [agent] table of {}", path.display())
    })?;

    let changes = if control::socket_path(&iface).exists() {
        match control::request(&iface, &Request::Apply { rules: specs }).await? {
            Response::Applied { changes } => changes,
            Response::Error { message } => bail!("{message}"),
            _ => bail!("unexpected response from the agent"),
        }
    } else {
        let mut maps = Maps::open(&iface)?;
        rule_sync::apply_specs(&mut RuleTable::load(&maps)?, &mut maps, &specs)?
    };
    let RuleChanges { added, changed, removed, unchanged } = changes;
    Ok(format!(
        "applied {} to {iface}: {added} added, {changed} changed, {removed} removed, {unchanged} unchanged",
        path.display()
    ))
}

/// Parses and checks the text of a configuration file. `folder` is where relative paths in
/// it start from.
pub fn parse(text: &str, folder: &Path) -> Result<ConfigFile, String> {
    let table: Table = text.parse().map_err(|error: toml::de::Error| syntax_message(text, &error))?;
    for key in table.keys() {
        if key != "agent" && key != "rule" {
            return Err(format!("unknown key `{key}`: expected an [agent] table or [[rule]] entries"));
        }
    }

    let agent = match table.get("agent") {
        None => AgentSettings::default(),
        Some(Value::Table(agent)) => parse_agent(&Entry { table: agent, location: "[agent]".into() }, folder)?,
        Some(_) => return Err("`agent` is not a table: write the agent settings under an [agent] header".into()),
    };

    let rules = match table.get("rule") {
        None => None,
        Some(Value::Array(entries)) => Some(parse_rules(entries)?),
        Some(_) => return Err("`rule` is not an array of tables: write each rule under a [[rule]] header".into()),
    };
    Ok(ConfigFile { agent, rules })
}

/// Returns toml's error on one line, with the line number of where parsing stopped.
fn syntax_message(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().lines().next().unwrap_or("invalid TOML").trim_end_matches('.');
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("invalid TOML at line {line}: {message}")
        }
        None => format!("invalid TOML: {message}"),
    }
}

fn parse_agent(entry: &Entry<'_>, folder: &Path) -> Result<AgentSettings, String> {
    entry.check_keys(AGENT_KEYS)?;

    let mode = match entry.string("mode")? {
        Some(text) => Some(
            AttachMode::from_str(text, true)
                .map_err(|_| entry.invalid("mode", &format!("{text:?}"), "auto, native or skb"))?,
        ),
        None => None,
    };
    let redis = match entry.table.get("redis") {
        None => None,
        Some(Value::String(urls)) => Some(urls.split(',').map(|url| url.trim().to_owned()).collect::<Vec<_>>()),
        Some(Value::Array(urls)) => Some(
            urls.iter()
                .map(|url| url.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| entry.invalid("redis", &Value::Array(urls.clone()).to_string(), "an array of URL strings"))?,
        ),
        Some(other) => return Err(entry.invalid("redis", &other.to_string(), "a URL string or an array of them")),
    };
    if redis.as_ref().is_some_and(|urls| urls.is_empty() || urls.iter().any(String::is_empty)) {
        return Err(entry.invalid("redis", "an empty URL", "redis://host:port, or several for a cluster"));
    }
    let duration = |key: &str| -> Result<Option<Duration>, String> {
        entry.string(key)?.map(|text| parse_interval(text).map_err(|message| entry.at(key, &message))).transpose()
    };
    let max_keys = match entry.integer("max_keys")? {
        Some(count) => Some(
            u32::try_from(count)
                .ok()
                .filter(|count| *count >= 1)
                .ok_or_else(|| entry.invalid("max_keys", &count.to_string(), "an integer from 1 to 4294967295"))?,
        ),
        None => None,
    };

    Ok(AgentSettings {
        iface: entry.nonempty_string("iface")?,
        mode,
        redis,
        redis_cluster: entry.boolean("redis_cluster")?,
        redis_ca: entry.nonempty_string("redis_ca")?.map(|path| folder.join(path)),
        sync_interval: duration("sync_interval")?,
        node_id: entry.nonempty_string("node_id")?,
        max_keys,
        redis_timeout: duration("redis_timeout")?,
    })
}

/// Checks every `[[rule]]` entry, then the set: one rule per traffic selection, and at most
/// [`MAX_RULES`] rules.
fn parse_rules(entries: &[Value]) -> Result<Vec<RuleSpec>, String> {
    let mut specs = Vec::with_capacity(entries.len());
    let mut first_index_by_match = BTreeMap::new();
    for (index, value) in entries.iter().enumerate() {
        let number = index + 1;
        let Value::Table(table) = value else {
            return Err(format!("rule {number} is not a table: write each rule under a [[rule]] header"));
        };
        let spec = parse_rule(&Entry { table, location: format!("rule {number}") })?;
        if let Some(first) = first_index_by_match.insert(spec.rule_match(), number) {
            return Err(format!(
                "rule {number}: selects the same traffic ({}) as rule {first}: each selection has one rule, so merge or remove one",
                spec.describe_match()
            ));
        }
        specs.push(spec);
    }
    if specs.len() > MAX_RULES as usize {
        return Err(format!("{} rules: expected at most {MAX_RULES}", specs.len()));
    }
    Ok(specs)
}

fn parse_rule(entry: &Entry<'_>) -> Result<RuleSpec, String> {
    entry.check_keys(RULE_KEYS)?;

    let Some(rate) = entry.rate("rate")? else {
        return Err(entry.at("rate", "missing: expected packets per window, such as 100, or per second, such as \"100/s\""));
    };
    let inner_rate = entry.rate("inner_rate")?;
    let bytes = entry.boolean("bytes")?.unwrap_or(false);
    for (key, (_, in_bytes)) in [("rate", rate)].into_iter().chain(inner_rate.map(|rate| ("inner_rate", rate))) {
        if in_bytes && !bytes {
            return Err(entry.at(key, "a rate in bytes (ending in B) needs `bytes = true`, which makes the rule count frame bytes"));
        }
    }
    let window = match entry.string("window")? {
        Some(text) => parse_window(text).map_err(|error| entry.at("window", &error.to_string()))?,
        None => Duration::from_secs(1),
    };
    let protocol = match entry.table.get("proto") {
        None => Protocol::Any,
        Some(Value::String(text)) => text.parse().map_err(|error: RuleError| entry.at("proto", &error.to_string()))?,
        Some(Value::Integer(number)) => {
            number.to_string().parse().map_err(|error: RuleError| entry.at("proto", &error.to_string()))?
        }
        Some(other) => return Err(entry.invalid("proto", &other.to_string(), "any, tcp, udp or an IP protocol number 1-255")),
    };
    let port = match entry.integer("port")? {
        Some(port) => Some(
            u16::try_from(port)
                .ok()
                .filter(|port| *port != 0)
                .ok_or_else(|| entry.invalid("port", &port.to_string(), "a port from 1 to 65535"))?,
        ),
        None => None,
    };
    let prefix = |key: &str, default: u8, max: u8| -> Result<u8, String> {
        match entry.integer(key)? {
            Some(length) => u8::try_from(length)
                .ok()
                .filter(|length| *length <= max)
                .ok_or_else(|| entry.invalid(key, &length.to_string(), &format!("a prefix length from 0 to {max}"))),
            None => Ok(default),
        }
    };
    let store_down = match entry.string("store_down")? {
        Some(text) => StoreDownPolicy::from_str(text, true)
            .map_err(|_| entry.invalid("store_down", &format!("{text:?}"), "local, open or closed"))?,
        None => StoreDownPolicy::Local,
    };

    let window_ms = window.as_millis() as u64;
    let per_window = |key: &str, rate: Rate| rate.per_window(window_ms).map_err(|error| entry.at(key, &error.to_string()));
    let inner_tier = match inner_rate {
        Some((inner_rate, _)) => Some(InnerTier {
            rate: per_window("inner_rate", inner_rate)?,
            ipv4_prefix_len: prefix("inner_prefix_v4", 32, 32)?,
            ipv6_prefix_len: prefix("inner_prefix_v6", 128, 128)?,
        }),
        None if entry.table.contains_key("inner_prefix_v4") || entry.table.contains_key("inner_prefix_v6") => {
            return Err(entry.at("inner_rate", "missing: inner_prefix_v4 and inner_prefix_v6 need an inner_rate"));
        }
        None => None,
    };
    let spec = RuleSpec {
        protocol,
        port,
        rate: per_window("rate", rate.0)?,
        window_ms,
        ipv4_prefix_len: prefix("prefix_v4", 32, 32)?,
        ipv6_prefix_len: prefix("prefix_v6", 128, 128)?,
        per_port: entry.boolean("per_port")?.unwrap_or(false),
        store_down,
        unit: if bytes { RateUnit::Bytes } else { RateUnit::Packets },
        tcp_syn: entry.boolean("syn")?.unwrap_or(false),
        inner_tier,
        shadow: entry.boolean("shadow")?.unwrap_or(false),
    };
    spec.validate().map_err(|error| {
        let field = match error {
            RuleError::Protocol(_) => "proto",
            RuleError::ZeroRate | RuleError::Rate(_) => "rate",
            RuleError::Window(_) => "window",
            RuleError::Ipv4Prefix(_) => "prefix_v4",
            RuleError::Ipv6Prefix(_) => "prefix_v6",
            RuleError::PortWithoutProtocol(_) => "port",
            RuleError::SynWithoutTcp(_) => "syn",
            RuleError::ByteRateTooLow(_) => "rate",
            RuleError::InnerTierPrefix { .. } => "inner_prefix_v4",
        };
        entry.at(field, &error.to_string())
    })?;
    Ok(spec)
}

/// One table of the file, with where it is for error messages.
struct Entry<'a> {
    table: &'a Table,
    /// Such as `[agent]` or `rule 2`.
    location: String,
}

impl Entry<'_> {
    /// Returns `message` about field `key` of this entry.
    fn at(&self, key: &str, message: &str) -> String {
        format!("{}, field {key}: {message}", self.location)
    }

    /// Returns a message that field `key` has the bad value `value` and what is expected.
    fn invalid(&self, key: &str, value: &str, expected: &str) -> String {
        self.at(key, &format!("invalid value {value}: expected {expected}"))
    }

    /// Rejects keys not in `known`, which are most often misspelt ones.
    fn check_keys(&self, known: &[&str]) -> Result<(), String> {
        match self.table.keys().find(|key| !known.contains(&key.as_str())) {
            Some(key) => Err(format!("{}: unknown field `{key}`: expected one of {}", self.location, known.join(", "))),
            None => Ok(()),
        }
    }

    /// Reads a rate: an integer of packets per window, or a string as `limit add --rate`
    /// takes it. Returns it with whether it is written in bytes.
    fn rate(&self, key: &str) -> Result<Option<(Rate, bool)>, String> {
        match self.table.get(key) {
            None => Ok(None),
            Some(Value::Integer(count)) => match u64::try_from(*count) {
                Ok(0) => Err(self.at(key, &RuleError::ZeroRate.to_string())),
                Ok(count) => Ok(Some((Rate::PerWindow(count), false))),
                Err(_) => Err(self.at(key, &RuleError::Rate(count.to_string()).to_string())),
            },
            Some(Value::String(text)) => {
                let rate = parse_rate(text).map_err(|error| self.at(key, &error.to_string()))?;
                Ok(Some((rate, rate_in_bytes(text))))
            }
            Some(other) => Err(self.invalid(key, &other.to_string(), "an integer such as 100 or a string such as \"100/s\"")),
        }
    }

    fn string(&self, key: &str) -> Result<Option<&str>, String> {
        match self.table.get(key) {
            None => Ok(None),
            Some(Value::String(text)) => Ok(Some(text)),
            Some(other) => Err(self.invalid(key, &other.to_string(), "a string")),
        }
    }

    fn nonempty_string(&self, key: &str) -> Result<Option<String>, String> {
        match self.string(key)? {
            Some("") => Err(self.invalid(key, "\"\"", "a non-empty string")),
            other => Ok(other.map(str::to_owned)),
        }
    }

    fn integer(&self, key: &str) -> Result<Option<i64>, String> {
        match self.table.get(key) {
            None => Ok(None),
            Some(Value::Integer(number)) => Ok(Some(*number)),
            Some(other) => Err(self.invalid(key, &other.to_string(), "an integer")),
        }
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>, String> {
        match self.table.get(key) {
            None => Ok(None),
            Some(Value::Boolean(flag)) => Ok(Some(*flag)),
            Some(other) => Err(self.invalid(key, &other.to_string(), "true or false")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_text(text: &str) -> Result<ConfigFile, String> {
        parse(text, Path::new("/etc/limiter"))
    }

    #[test]
    fn full_file_parses() {
        let file = parse_text(
            r#"
            [agent]
            iface = "eth1"
            mode = "skb"
            redis = ["redis://10.0.0.5:6379", "redis://10.0.0.6:6379"]
            redis_cluster = true
            redis_ca = "ca.pem"
            sync_interval = "200ms"
            node_id = "gw-1"
            max_keys = 1000
            redis_timeout = "20ms"

            [[rule]]
            rate = "100/s"
            window = "10s"
            proto = "udp"
            port = 53
            prefix_v4 = 24
            prefix_v6 = 64
            per_port = true
            store_down = "closed"

            [[rule]]
            rate = 50
            "#,
        )
        .unwrap();
        let agent = file.agent;
        assert_eq!(agent.iface.as_deref(), Some("eth1"));
        assert_eq!(agent.mode, Some(AttachMode::Skb));
        assert_eq!(agent.redis.unwrap().len(), 2);
        assert_eq!(agent.redis_cluster, Some(true));
        assert_eq!(agent.redis_ca, Some(PathBuf::from("/etc/limiter/ca.pem")));
        assert_eq!(agent.sync_interval, Some(Duration::from_millis(200)));
        assert_eq!(agent.max_keys, Some(1000));
        assert_eq!(agent.redis_timeout, Some(Duration::from_millis(20)));
        let rules = file.rules.unwrap();
        assert_eq!(
            rules[0],
            RuleSpec {
                protocol: Protocol::Udp,
                port: Some(53),
                rate: 1000,
                window_ms: 10_000,
                ipv4_prefix_len: 24,
                ipv6_prefix_len: 64,
                per_port: true,
                store_down: StoreDownPolicy::Closed,
                unit: RateUnit::Packets,
                tcp_syn: false,
                inner_tier: None,
                shadow: false,
            }
        );
        assert_eq!(rules[1].protocol, Protocol::Any);
        assert_eq!(rules[1].rate, 50);
        assert_eq!(rules[1].window_ms, 1000);
        assert_eq!(rules[1].ipv4_prefix_len, 32);
    }

    #[test]
    fn rule_kinds_parse() {
        let file = parse_text(
            r#"
            [[rule]]
            rate = "1MB/s"
            bytes = true
            proto = "tcp"
            syn = true
            prefix_v4 = 24
            inner_rate = "64KiB"
            inner_prefix_v4 = 32
            shadow = true
            "#,
        )
        .unwrap();
        let rule = &file.rules.unwrap()[0];
        assert_eq!(rule.unit, RateUnit::Bytes);
        assert_eq!(rule.rate, 1_000_000);
        assert!(rule.tcp_syn);
        assert!(rule.shadow);
        assert_eq!(rule.inner_tier, Some(InnerTier { rate: 65_536, ipv4_prefix_len: 32, ipv6_prefix_len: 128 }));
    }

    #[test]
    fn rule_kind_errors_name_field() {
        let cases = [
            ("[[rule]]\nrate = \"1MB/s\"\n", "rule 1, field rate: a rate in bytes (ending in B) needs `bytes = true`"),
            ("[[rule]]\nrate = 10\nproto = \"udp\"\nsyn = true\n", "rule 1, field syn: invalid rule"),
            ("[[rule]]\nrate = 10\ninner_prefix_v4 = 32\n", "rule 1, field inner_rate: missing"),
            ("[[rule]]\nrate = 10\nshadow = \"yes\"\n", "rule 1, field shadow: invalid value \"yes\": expected true or false"),
        ];
        for (text, expected) in cases {
            let message = parse_text(text).unwrap_err();
            assert!(message.contains(expected), "{text:?}: expected {expected:?} in {message:?}");
        }
    }

    #[test]
    fn missing_rule_key_differs_from_empty_set() {
        assert_eq!(parse_text("[agent]\niface = \"eth1\"\n").unwrap().rules, None);
        assert_eq!(parse_text("rule = []\n").unwrap().rules, Some(vec![]));
    }

    #[test]
    fn errors_name_entry_field_value_and_expectation() {
        let cases = [
            ("[[rule]]\nrate = 10\n[[rule]]\nrate = \"ten\"\n", "rule 2, field rate: invalid rate \"ten\": expected packets per window"),
            ("[[rule]]\nrate = 0\n", "rule 1, field rate: invalid rate 0"),
            ("[[rule]]\nrate = 10\nwindow = \"2h\"\n", "rule 1, field window: invalid window \"2h\""),
            ("[[rule]]\nrate = 10\nport = 53\n", "rule 1, field port: invalid port 53 for protocol any"),
            ("[[rule]]\nrate = 10\nproto = \"icmp\"\n", "rule 1, field proto: invalid protocol \"icmp\""),
            ("[[rule]]\nrate = 10\nprefix_v4 = 33\n", "rule 1, field prefix_v4: invalid value 33: expected a prefix length from 0 to 32"),
            ("[[rule]]\nrate = 10\nstore_down = \"maybe\"\n", "rule 1, field store_down: invalid value \"maybe\": expected local, open or closed"),
            ("[[rule]]\nrate = 10\nrat = 5\n", "rule 1: unknown field `rat`: expected one of rate, window"),
            ("[[rule]]\nwindow = \"1s\"\n", "rule 1, field rate: missing"),
            ("[[rule]]\nrate = \"3/s\"\nwindow = \"100ms\"\n", "not a whole number of packets"),
            ("[[rule]]\nrate = 1\nproto = \"udp\"\n[[rule]]\nrate = 2\nproto = \"udp\"\n", "rule 2: selects the same traffic (udp) as rule 1"),
            ("[agent]\nsync_interval = \"0ms\"\n", "[agent], field sync_interval: invalid duration \"0ms\""),
            ("[agent]\nmax_keys = 0\n", "[agent], field max_keys: invalid value 0"),
            ("[agent]\nmode = \"fast\"\n", "[agent], field mode: invalid value \"fast\": expected auto, native or skb"),
            ("[agent]\nredis = 5\n", "[agent], field redis: invalid value 5"),
            ("[agents]\n", "unknown key `agents`"),
            ("[[rule]]\nrate = \n", "invalid TOML at line 2"),
        ];
        for (text, expected) in cases {
            let message = parse_text(text).unwrap_err();
            assert!(message.contains(expected), "{text:?}: expected {expected:?} in {message:?}");
            assert_eq!(message.lines().count(), 1, "{text:?}: {message:?}");
        }
    }

    #[test]
    fn too_many_rules_rejected() {
        let text: String = (1..=MAX_RULES + 1).map(|port| format!("[[rule]]\nrate = 1\nproto = \"udp\"\nport = {port}\n")).collect();
        let message = parse_text(&text).unwrap_err();
        assert!(message.contains(&format!("expected at most {MAX_RULES}")), "{message}");
    }

    #[test]
    fn load_names_the_file() {
        let error = load(Path::new("/nonexistent/limiter.toml")).unwrap_err();
        assert!(error.to_string().starts_with("/nonexistent/limiter.toml: failed to read the file"), "{error}");
    }
}
