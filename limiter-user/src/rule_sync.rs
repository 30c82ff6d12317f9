//! One rule set for the whole fleet: an agent whose rules change (`limit add`, `limit
//! remove`, `limiter apply`, SIGHUP) publishes its whole set to Redis under a new version,
//! and every agent checks the version each tick and applies a newer set.
//!
//! The published set carries the rule ids, and agents adopt them, because the fleet's
//! counts in Redis are keyed by rule id. The newest version wins: when two gateways publish
//! at about the same time, the later call gets the higher version, and the other gateway
//! replaces its set with that one on its next tick. While Redis is out of reach, a local
//! change applies on its own gateway and is published on the first tick that reaches Redis,
//! where it then wins over any version published meanwhile.

use std::sync::{LazyLock, Mutex};

use redis::Script;
use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};

use crate::{
    agent::lock,
    config::{self, LoadedConfig},
    control::RuleView,
    datapath::Maps,
    rule_table::RuleTable,
    rules::RuleSpec,
    store::{Store, evalsha_command},
};

/// Redis key of the fleet's rule set. It shares its hash tag with the gateway heartbeat key,
/// so in a Redis Cluster both live on one slot.
pub const RULE_SET_KEY: &str = "limiter:{fleet}:rules";

static PUBLISH_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../../lua/rules_publish.lua")));
static FETCH_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../../lua/rules_fetch.lua")));

/// A rule as the fleet's rule set stores it in Redis.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedRule {
    pub id: u32,
    #[serde(flatten)]
    pub spec: RuleSpec,
}

/// Version and origin of a gateway's rule set, as `limiter limit list` shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSetInfo {
    /// Version of the fleet's rule set that this gateway's rules match; 0 before this agent
    /// published or applied any.
    pub version: u64,
    /// Node id of the gateway that published that version.
    pub origin_node: Option<String>,
    /// Redis server time of publication, in milliseconds since the Unix epoch.
    pub origin_time_ms: Option<u64>,
    /// A local change that is not published yet, because Redis was out of reach or the
    /// publish call has not run yet.
    pub publish_pending: bool,
}

/// Counts of the rules that replacing one rule set with another adds, changes, removes and
/// keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleChanges {
    pub added: usize,
    /// Same id and traffic, new limit or key shape.
    pub changed: usize,
    pub removed: usize,
    pub unchanged: usize,
}

impl RuleChanges {
    pub fn any(&self) -> bool {
        self.added + self.changed + self.removed > 0
    }
}

/// The agent's record of the fleet version its rules match, and of local changes not yet
/// published.
#[derive(Debug, Default)]
pub struct FleetRules {
    version: u64,
    origin: Option<(String, u64)>,
    publish_pending: bool,
    /// Local changes so far. A publish or an adoption compares it before and after its Redis
    /// call, to notice a change made meanwhile.
    local_changes: u64,
    /// Newest fleet version this agent failed to apply; it is not fetched again.
    rejected_version: u64,
    publish_failure_logged: bool,
}

impl FleetRules {
    /// Marks the rules as changed on this gateway, to be published.
    pub fn record_local_change(&mut self) {
        self.local_changes += 1;
        self.publish_pending = true;
    }

    pub fn info(&self) -> RuleSetInfo {
        RuleSetInfo {
            version: self.version,
            origin_node: self.origin.as_ref().map(|(node, _)| node.clone()),
            origin_time_ms: self.origin.as_ref().map(|(_, time_ms)| *time_ms),
            publish_pending: self.publish_pending,
        }
    }
}

/// Describes where a gateway's rule set came from, for `limiter limit list`, such as
/// `rule set version 3, published by gw-1 at 2026-12-05T10:00:00Z`.
pub fn describe_rule_set(info: &RuleSetInfo) -> String {
    let mut line = match (&info.origin_node, info.origin_time_ms) {
        (Some(node), Some(time_ms)) if info.version > 0 => {
            let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(time_ms);
            format!("rule set version {}, published by {node} at {}", info.version, humantime::format_rfc3339_seconds(time))
        }
        _ => "rule set not published to the fleet yet".to_owned(),
    };
    if info.publish_pending {
        line += ", and a local change waits to be published (Redis out of reach, or publishing now)";
    }
    line
}

/// The agent state a rule change touches, locked in field order.
pub struct RuleState<'a> {
    pub maps: &'a Mutex<Maps>,
    pub rules: &'a Mutex<RuleTable>,
    pub fleet: &'a Mutex<FleetRules>,
}

/// Gives each spec the id of the rule that selects the same traffic now, so its keys keep
/// their counts, or else a new id above every id in use.
// NOTE: an id freed by removing the rule with the highest id is given out again, and the
// new rule's keys then read the old rule's fleet counts in Redis until they expire, after
// three windows. `RuleTable::add` numbers new rules the same way.
pub fn assign_ids(current: &[RuleView], specs: &[RuleSpec]) -> Vec<(u32, RuleSpec)> {
    let mut next_id = current.iter().map(|view| view.id).max().unwrap_or(0) + 1;
    specs
        .iter()
        .map(|spec| {
            let existing = current.iter().find(|view| view.spec.rule_match() == spec.rule_match());
            let id = match existing {
                Some(view) => view.id,
                None => {
                    next_id += 1;
                    next_id - 1
                }
            };
            (id, spec.clone())
        })
        .collect()
}

/// Counts what replacing `current` with `desired` adds, changes, removes and keeps. A rule
/// whose traffic gets another id counts as removed and added, because its keys' counts go.
pub fn count_changes(current: &[RuleView], desired: &[(u32, RuleSpec)]) -> RuleChanges {
    let mut changes = RuleChanges::default();
    for (id, spec) in desired {
        let same_rule = current.iter().find(|view| view.id == *id && view.spec.rule_match() == spec.rule_match());
        match same_rule {
            Some(view) if view.spec == *spec => changes.unchanged += 1,
            Some(_) => changes.changed += 1,
            None => changes.added += 1,
        }
    }
    changes.removed = current
        .iter()
        .filter(|view| !desired.iter().any(|(id, spec)| *id == view.id && spec.rule_match() == view.spec.rule_match()))
        .count();
    changes
}

/// Replaces the whole rule set of `table` with `specs`: rules not in `specs` are removed,
/// rules for the same traffic keep their ids, and unchanged rules are not written.
pub fn apply_specs(table: &mut RuleTable, maps: &mut Maps, specs: &[RuleSpec]) -> anyhow::Result<RuleChanges> {
    let current = table.views();
    let desired = assign_ids(&current, specs);
    let changes = count_changes(&current, &desired);
    table.replace_all(&desired, maps)?;
    Ok(changes)
}

/// Applies `specs` as this gateway's whole rule set and marks it for publishing.
pub fn apply_local(state: &RuleState<'_>, specs: &[RuleSpec]) -> anyhow::Result<RuleChanges> {
    let mut maps = lock(state.maps);
    let mut rules = lock(state.rules);
    let changes = apply_specs(&mut rules, &mut maps, specs)?;
    lock(state.fleet).record_local_change();
    Ok(changes)
}

/// Applies the rules of the configuration file the agent starts with, if it has any, and
/// returns the fleet record: a file with rules is published on the first tick, so it wins
/// over the set the fleet had.
pub fn apply_config_at_start(loaded: Option<&LoadedConfig>, table: &mut RuleTable, maps: &mut Maps) -> anyhow::Result<FleetRules> {
    let mut fleet = FleetRules::default();
    let Some(loaded) = loaded else { return Ok(fleet) };
    let Some(specs) = &loaded.contents.rules else { return Ok(fleet) };
    let changes = apply_specs(table, maps, specs)?;
    info!(
        path = %loaded.path.display(),
        added = changes.added,
        changed = changes.changed,
        removed = changes.removed,
        unchanged = changes.unchanged,
        "rules of the configuration file applied"
    );
    fleet.record_local_change();
    Ok(fleet)
}

/// Reads the agent's configuration file again and applies its rules, for SIGHUP. Returns
/// true when the rules were applied, so the caller publishes them. A file that fails to
/// read or check is logged and changes nothing.
pub fn reload(loaded: Option<&LoadedConfig>, state: &RuleState<'_>) -> bool {
    let Some(loaded) = loaded else {
        warn!("received SIGHUP, but the agent was started without --config: nothing to reload");
        return false;
    };
    let path = loaded.path.display().to_string();
    let file = match config::load(&loaded.path) {
        Ok(file) => file,
        Err(error) => {
            error!(path, %error, "failed to reload the configuration, so nothing changed: fix the file and send SIGHUP again");
            return false;
        }
    };
    if file.agent != loaded.contents.agent {
        warn!(path, "the [agent] settings in the configuration changed, and they take effect only when the agent restarts");
    }
    let Some(specs) = file.rules else {
        info!(path, "configuration reloaded without [[rule]] entries, so the rules stay as they are");
        return false;
    };
    match apply_local(state, &specs) {
        Ok(changes) => {
            info!(
                path,
                added = changes.added,
                changed = changes.changed,
                removed = changes.removed,
                unchanged = changes.unchanged,
                "configuration reloaded"
            );
            true
        }
        Err(error) => {
            error!(path, error = format!("{error:#}"), "failed to apply the reloaded rules, so nothing changed");
            false
        }
    }
}

/// Makes this tick's one rule-set call: publishes a local change, or else fetches a newer
/// fleet set and applies it.
pub async fn sync_tick(store: &Store, node_id: &str, state: &RuleState<'_>) {
    let publish_pending = lock(state.fleet).publish_pending;
    if publish_pending {
        publish(store, node_id, state).await;
    } else {
        adopt_newer(store, state).await;
    }
}

/// Publishes this gateway's rule set if a local change is pending.
pub async fn publish(store: &Store, node_id: &str, state: &RuleState<'_>) {
    let (rules_json, rule_count, base_version, local_changes) = {
        let rules = lock(state.rules);
        let fleet = lock(state.fleet);
        if !fleet.publish_pending {
            return;
        }
        let published: Vec<PublishedRule> =
            rules.views().into_iter().map(|view| PublishedRule { id: view.id, spec: view.spec }).collect();
        let json = match serde_json::to_string(&published) {
            Ok(json) => json,
            Err(error) => {
                error!(%error, "failed to serialize the rule set for publishing");
                return;
            }
        };
        (json, published.len(), fleet.version, fleet.local_changes)
    };

    let mut command = evalsha_command(&PUBLISH_SCRIPT, &[RULE_SET_KEY]);
    command.arg(&rules_json).arg(node_id).arg(base_version);
    let reply: Result<(u64, u64, String, u64), _> = store.invoke(&PUBLISH_SCRIPT, &command).await;

    let mut fleet = lock(state.fleet);
    match reply {
        Ok((version, written, origin_node, origin_time_ms)) => {
            if written == 1 {
                info!(version, rules = rule_count, "rule set published to the fleet");
            } else {
                debug!(version, origin = origin_node, "the fleet already has this rule set");
            }
            fleet.version = version;
            fleet.origin = Some((origin_node, origin_time_ms));
            // A change made while the call ran is still pending, for the next call.
            if fleet.local_changes == local_changes {
                fleet.publish_pending = false;
            }
            fleet.publish_failure_logged = false;
        }
        Err(error) => {
            if !fleet.publish_failure_logged {
                warn!(%error, "failed to publish the rule set, which applies on this gateway and is published once Redis is reachable");
                fleet.publish_failure_logged = true;
            }
        }
    }
}

/// Fetches the fleet's rule set if its version is newer than this gateway's, and applies it
/// with its ids. Asks this gateway to publish its own set when Redis has an older version,
/// as after Redis lost its data.
async fn adopt_newer(store: &Store, state: &RuleState<'_>) {
    let (known_version, local_changes) = {
        let fleet = lock(state.fleet);
        (fleet.version.max(fleet.rejected_version), fleet.local_changes)
    };
    let mut command = evalsha_command(&FETCH_SCRIPT, &[RULE_SET_KEY]);
    command.arg(known_version);
    let reply: Result<(u64, String, String, u64), _> = store.invoke(&FETCH_SCRIPT, &command).await;
    let (version, rules_json, origin_node, origin_time_ms) = match reply {
        Ok(reply) => reply,
        Err(error) => {
            debug!(%error, "rule set version check failed");
            return;
        }
    };

    if version < known_version {
        let mut fleet = lock(state.fleet);
        if version < fleet.version && !fleet.publish_pending {
            info!(stored = version, local = fleet.version, "redis has an older rule set than this gateway, so this gateway publishes its own");
            fleet.publish_pending = true;
        }
        return;
    }
    if version == known_version {
        return;
    }

    let desired = parse_published(&rules_json);
    let mut maps = lock(state.maps);
    let mut rules = lock(state.rules);
    let mut fleet = lock(state.fleet);
    if fleet.local_changes != local_changes {
        debug!(version, "rules changed here during the fetch, so this gateway's set is published instead");
        return;
    }
    let outcome = desired.and_then(|desired| {
        let changes = count_changes(&rules.views(), &desired);
        if changes.any() {
            rules.replace_all(&desired, &mut maps)?;
        }
        Ok(changes)
    });
    match outcome {
        Ok(changes) => {
            info!(
                version,
                origin = origin_node,
                added = changes.added,
                changed = changes.changed,
                removed = changes.removed,
                unchanged = changes.unchanged,
                "rule set of the fleet applied"
            );
            fleet.version = version;
            fleet.origin = Some((origin_node, origin_time_ms));
        }
        Err(error) => {
            error!(
                version,
                origin = origin_node,
                error = format!("{error:#}"),
                "failed to apply the fleet's rule set, so this gateway keeps its rules until a newer version arrives"
            );
            fleet.rejected_version = version;
        }
    }
}

/// Reads a published rule set. A rule with a field this agent does not know is rejected,
/// because applying it without that field could enforce what the field turns off, such as a
/// shadow rule.
pub fn parse_published(json: &str) -> anyhow::Result<Vec<(u32, RuleSpec)>> {
    let values: Vec<serde_json::Value> = serde_json::from_str(json)?;
    let mut rules = Vec::with_capacity(values.len());
    for value in values {
        let rule: PublishedRule = serde_json::from_value(value.clone())?;
        let known = serde_json::to_value(&rule)?;
        let unknown: Vec<&String> = value
            .as_object()
            .map(|fields| fields.keys().filter(|key| known.get(key.as_str()).is_none()).collect())
            .unwrap_or_default();
        if !unknown.is_empty() {
            anyhow::bail!("rule {} has fields this agent does not know ({unknown:?}): upgrade this agent", rule.id);
        }
        rules.push((rule.id, rule.spec));
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{Protocol, RateUnit, StoreDownPolicy};

    fn spec(protocol: Protocol, port: Option<u16>, rate: u64) -> RuleSpec {
        RuleSpec {
            protocol,
            port,
            rate,
            window_ms: 1000,
            ipv4_prefix_len: 32,
            ipv6_prefix_len: 128,
            per_port: false,
            store_down: StoreDownPolicy::Local,
            unit: RateUnit::Packets,
            tcp_syn: false,
            inner_tier: None,
            shadow: false,
        }
    }

    fn view(id: u32, spec: RuleSpec) -> RuleView {
        RuleView { id, spec, fallback_limit: 0, gateways: 1, max_over_admission: 0 }
    }

    #[test]
    fn assign_ids_keeps_ids_by_traffic() {
        let current = vec![view(1, spec(Protocol::Udp, None, 100)), view(4, spec(Protocol::Tcp, Some(80), 10))];
        let specs = vec![spec(Protocol::Any, None, 5), spec(Protocol::Tcp, Some(80), 20), spec(Protocol::Tcp, None, 7)];
        let ids: Vec<u32> = assign_ids(&current, &specs).into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, vec![5, 4, 6]);
    }

    #[test]
    fn count_changes_sorts_each_rule() {
        let current = vec![
            view(1, spec(Protocol::Udp, None, 100)),
            view(2, spec(Protocol::Tcp, None, 10)),
            view(3, spec(Protocol::Any, None, 1)),
        ];
        let desired = vec![
            (1, spec(Protocol::Udp, None, 100)),
            (2, spec(Protocol::Tcp, None, 20)),
            (7, spec(Protocol::Tcp, Some(22), 3)),
        ];
        assert_eq!(count_changes(&current, &desired), RuleChanges { added: 1, changed: 1, removed: 1, unchanged: 1 });
    }

    #[test]
    fn count_changes_treats_new_id_as_replacement() {
        let current = vec![view(1, spec(Protocol::Udp, None, 100))];
        let desired = vec![(2, spec(Protocol::Udp, None, 100))];
        assert_eq!(count_changes(&current, &desired), RuleChanges { added: 1, changed: 0, removed: 1, unchanged: 0 });
    }

    #[test]
    fn parse_published_rejects_unknown_fields() {
        let json = serde_json::to_string(&[PublishedRule { id: 3, spec: spec(Protocol::Udp, None, 100) }]).unwrap();
        assert_eq!(parse_published(&json).unwrap(), vec![(3, spec(Protocol::Udp, None, 100))]);
        let newer = json.replace(r#""id":3,"#, r#""id":3,"quantum":true,"#);
        let error = parse_published(&newer).unwrap_err().to_string();
        assert!(error.contains("rule 3 has fields this agent does not know"), "{error}");
        assert!(error.contains("quantum"), "{error}");
    }

    #[test]
    fn published_rule_round_trips_with_id() {
        let rule = PublishedRule { id: 3, spec: spec(Protocol::Udp, Some(53), 100) };
        let json = serde_json::to_string(&rule).unwrap();
        assert!(json.starts_with(r#"{"id":3,"protocol":"udp","port":53"#), "{json}");
        assert_eq!(serde_json::from_str::<PublishedRule>(&json).unwrap(), rule);
    }
}
