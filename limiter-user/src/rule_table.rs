//! The rule set in the `RULES` map, with the ids and fallback limits the agent manages.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context as _, bail};
use limiter_common::{FlowKey, MAX_RULES, Rule, RuleIndex, RuleMatch};

use crate::{
    control::RuleView,
    datapath::Maps,
    rules::{RuleSpec, max_over_admission},
};

/// Rules by the traffic they select, mirrored in the `RULES` map.
#[derive(Debug, Default)]
pub struct RuleTable {
    rules: BTreeMap<RuleMatch, Rule>,
    /// Gateways last seen alive, which sets each rule's fallback limit.
    gateways: u64,
    /// The agent's sync interval, which paces new keys; `None` without an agent.
    sync_interval: Option<std::time::Duration>,
}

impl RuleTable {
    /// Reads the rules already in the map, so a restarted agent keeps their ids and counters.
    pub fn load(maps: &Maps) -> anyhow::Result<Self> {
        let mut rules = BTreeMap::new();
        for entry in maps.rules.iter() {
            let (rule_match, rule) = entry.context("failed to read the RULES map")?;
            rules.insert(rule_match, rule);
        }
        Ok(Self { rules, gateways: 1, sync_interval: None })
    }

    /// Makes new and updated rules pace new keys for an agent syncing every `interval`.
    pub fn set_sync_interval(&mut self, interval: std::time::Duration) {
        self.sync_interval = Some(interval);
    }

    /// Adds a rule, or changes the limit of the rule that selects the same traffic. A changed
    /// rule keeps its id, so its keys keep their counts.
    pub fn add(&mut self, spec: &RuleSpec, maps: &mut Maps) -> anyhow::Result<RuleView> {
        spec.validate()?;
        let rule_match = spec.rule_match();
        let id = match self.rules.get(&rule_match) {
            Some(existing) => existing.id,
            None => {
                if self.rules.len() >= MAX_RULES as usize {
                    bail!("rule table is full ({MAX_RULES} rules): remove a rule with `limiter limit remove ID` first");
                }
                self.next_id()
            }
        };
        let rule = spec.to_rule(id, self.gateways, self.sync_interval);
        // The index counts the new rule before the program can find it.
        let mut after = self.rules.clone();
        after.insert(rule_match, rule);
        write_index(&after, maps)?;
        maps.rules.insert(rule_match, rule, 0).context("failed to write the RULES map")?;
        self.rules = after;
        Ok(self.view(&rule_match, &rule))
    }

    /// Removes rule `id` with the counters and grants of its keys.
    pub fn remove(&mut self, id: u32, maps: &mut Maps) -> anyhow::Result<()> {
        let Some(rule_match) = self.rules.iter().find(|(_, rule)| rule.id == id).map(|(m, _)| *m) else {
            bail!("rule {id} not found: list rules with `limiter limit list`");
        };
        maps.rules.remove(&rule_match).context("failed to remove the rule from the RULES map")?;
        self.rules.remove(&rule_match);
        // Lowered only after the rule is gone, so no lookup for it is skipped meanwhile.
        write_index(&self.rules, maps)?;

        let keys: Vec<FlowKey> =
            maps.counters.keys().filter_map(Result::ok).filter(|key| key.rule_id == id).collect();
        for key in &keys {
            let _ = maps.counters.remove(key);
            let _ = maps.grants.remove(key);
        }
        Ok(())
    }

    /// Updates every rule's fallback and new-key limits for `gateways` gateways.
    pub fn set_gateways(&mut self, gateways: u64, maps: &mut Maps) -> anyhow::Result<()> {
        self.gateways = gateways.max(1);
        for (rule_match, rule) in self.rules.iter_mut() {
            let updated = RuleSpec::from_rule(rule_match, rule).to_rule(rule.id, self.gateways, self.sync_interval);
            if updated != *rule {
                *rule = updated;
                maps.rules.insert(*rule_match, *rule, 0).context("failed to write the RULES map")?;
            }
        }
        Ok(())
    }

    pub fn gateways(&self) -> u64 {
        self.gateways
    }

    pub fn views(&self) -> Vec<RuleView> {
        let mut views: Vec<RuleView> = self.rules.iter().map(|(m, rule)| self.view(m, rule)).collect();
        views.sort_by_key(|view| view.id);
        views
    }

    pub fn by_id(&self) -> HashMap<u32, Rule> {
        self.rules.values().map(|rule| (rule.id, *rule)).collect()
    }

    fn next_id(&self) -> u32 {
        self.rules.values().map(|rule| rule.id).max().map_or(1, |id| id + 1)
    }
}

/// Writes the count of each kind of rule in `rules` to the `RULE_INDEX` map.
fn write_index(rules: &BTreeMap<RuleMatch, Rule>, maps: &mut Maps) -> anyhow::Result<()> {
    let mut index = RuleIndex { valid: 1, ..Default::default() };
    for rule_match in rules.keys() {
        match (rule_match.protocol, rule_match.dst_port) {
            (0, _) => index.any_rules += 1,
            (_, 0) => index.protocol_rules += 1,
            _ => index.port_rules += 1,
        }
    }
    maps.rule_index.set(0, index, 0).context("failed to write the RULE_INDEX map")
}

impl RuleTable {
    fn view(&self, rule_match: &RuleMatch, rule: &Rule) -> RuleView {
        RuleView {
            id: rule.id,
            spec: RuleSpec::from_rule(rule_match, rule),
            fallback_limit: rule.fallback_limit,
            gateways: self.gateways,
            max_over_admission: max_over_admission(rule.limit, rule.window_ns, self.sync_interval, self.gateways),
        }
    }
}
