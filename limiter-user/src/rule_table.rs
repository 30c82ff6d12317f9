//! The rule set in the `RULES` map, with the ids and fallback limits the agent manages.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context as _, bail};
use limiter_common::{FlowKey, INNER_TIER_ID_BIT, MAX_RULES, Rule, RuleIndex, RuleMatch};

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
        if id & INNER_TIER_ID_BIT != 0 {
            bail!("rule id {id} is too large (inner tiers use ids from {INNER_TIER_ID_BIT}): remove the rules with the largest ids and add them again");
        }
        let rule = spec.to_rule(id, self.gateways, self.sync_interval);
        // The index counts the new rule before the program can find it.
        let mut after = self.rules.clone();
        after.insert(rule_match, rule);
        write_index(&after, maps)?;
        maps.rules.insert(rule_match, rule, 0).context("failed to write the RULES map")?;
        self.rules = after;
        Ok(self.view(&rule_match, &rule))
    }

    /// Removes rule `id` with the counters and grants of its keys and of its inner tier's keys.
    pub fn remove(&mut self, id: u32, maps: &mut Maps) -> anyhow::Result<()> {
        let Some(rule_match) = self.rules.iter().find(|(_, rule)| rule.id == id).map(|(m, _)| *m) else {
            bail!("rule {id} not found: list rules with `limiter limit list`");
        };
        maps.rules.remove(&rule_match).context("failed to remove the rule from the RULES map")?;
        self.rules.remove(&rule_match);
        // Lowered only after the rule is gone, so no lookup for it is skipped meanwhile.
        write_index(&self.rules, maps)?;

        let keys: Vec<FlowKey> =
            maps.counters.keys().filter_map(Result::ok).filter(|key| key.rule_id & !INNER_TIER_ID_BIT == id).collect();
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

    /// Returns the rules by id, with each inner tier as a rule of its own under the id its
    /// keys carry (`id | INNER_TIER_ID_BIT`), so the agent reconciles inner keys against
    /// the inner limit.
    pub fn by_id(&self) -> HashMap<u32, Rule> {
        let mut rules = HashMap::new();
        for rule in self.rules.values() {
            rules.insert(rule.id, *rule);
            if rule.inner_tier != 0 {
                let inner = rule.inner_tier_rule();
                rules.insert(inner.id, inner);
            }
        }
        rules
    }

    /// Returns an id no rule has; ids stay below `INNER_TIER_ID_BIT`, which marks inner keys.
    fn next_id(&self) -> u32 {
        // MAX_RULES bounds the table, so the largest id stays far below INNER_TIER_ID_BIT
        // unless a pinned map from another writer contains such ids.
        self.rules.values().map(|rule| rule.id).max().map_or(1, |id| id + 1)
    }
}

/// Writes the count of each kind of rule in `rules` to the `RULE_INDEX` map.
fn write_index(rules: &BTreeMap<RuleMatch, Rule>, maps: &mut Maps) -> anyhow::Result<()> {
    let mut index = RuleIndex { valid: 1, ..Default::default() };
    for rule_match in rules.keys() {
        match (rule_match.tcp_syn != 0, rule_match.protocol, rule_match.dst_port) {
            (true, _, 0) => index.syn_protocol_rules += 1,
            (true, _, _) => index.syn_port_rules += 1,
            (false, 0, _) => index.any_rules += 1,
            (false, _, 0) => index.protocol_rules += 1,
            (false, _, _) => index.port_rules += 1,
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

impl RuleTable {
    /// Replaces the whole rule set with `desired` (id and spec of each rule). A rule whose
    /// traffic and id stay keeps its keys' counters, and one whose spec also stays is not
    /// written at all. A rule that is gone, or whose traffic now has another id, is removed
    /// with the counters and grants of its keys.
    ///
    /// Every rule is checked before any map is written. If a map write fails midway, the
    /// table is read back from the `RULES` map, so it shows what the program enforces.
    pub fn replace_all(&mut self, desired: &[(u32, RuleSpec)], maps: &mut Maps) -> anyhow::Result<()> {
        let after = self.checked_rule_set(desired)?;
        let outcome = self.write_rule_set(&after, maps);
        if outcome.is_err() {
            let reread = Self::load(maps).map(|table| table.rules);
            self.rules = reread.unwrap_or_default();
            let _ = write_index(&self.rules, maps);
        }
        outcome
    }

    fn checked_rule_set(&self, desired: &[(u32, RuleSpec)]) -> anyhow::Result<BTreeMap<RuleMatch, Rule>> {
        if desired.len() > MAX_RULES as usize {
            bail!("too many rules ({}): the rule table takes at most {MAX_RULES}; remove rules or merge them", desired.len());
        }
        let mut after = BTreeMap::new();
        let mut ids = std::collections::HashSet::new();
        for (id, spec) in desired {
            spec.validate().with_context(|| format!("rule {id} ({})", spec.describe_match()))?;
            if *id == 0 || *id & INNER_TIER_ID_BIT != 0 || !ids.insert(*id) {
                bail!("invalid rule id {id}: expected each rule's own id, from 1 to {}", INNER_TIER_ID_BIT - 1);
            }
            let rule = spec.to_rule(*id, self.gateways, self.sync_interval);
            if after.insert(spec.rule_match(), rule).is_some() {
                bail!("two rules select {}: each selection has one rule", spec.describe_match());
            }
        }
        Ok(after)
    }

    /// Writes `after` to the maps in an order in which every lookup the program makes in
    /// between finds a rule from one set or the other.
    fn write_rule_set(&mut self, after: &BTreeMap<RuleMatch, Rule>, maps: &mut Maps) -> anyhow::Result<()> {
        // The index counts the rules of both sets until the end, so no lookup for a rule
        // that is written meanwhile is skipped.
        let mut both = self.rules.clone();
        both.extend(after.iter().map(|(rule_match, rule)| (*rule_match, *rule)));
        write_index(&both, maps)?;

        // A rule whose traffic keeps its id is overwritten below. Any other rule of the old
        // set goes, and its keys' counts with it, because they counted another rule.
        let stale: Vec<(RuleMatch, u32)> = self
            .rules
            .iter()
            .filter(|(rule_match, rule)| after.get(rule_match).map(|kept| kept.id) != Some(rule.id))
            .map(|(rule_match, rule)| (*rule_match, rule.id))
            .collect();
        for (rule_match, _) in &stale {
            if !after.contains_key(rule_match) {
                maps.rules.remove(rule_match).context("failed to remove a rule from the RULES map")?;
            }
        }
        let stale_ids: std::collections::HashSet<u32> = stale.iter().map(|(_, id)| *id).collect();
        if !stale_ids.is_empty() {
            // An inner tier's keys carry the rule's id with INNER_TIER_ID_BIT set.
            let keys: Vec<FlowKey> = maps
                .counters
                .keys()
                .filter_map(Result::ok)
                .filter(|key| stale_ids.contains(&(key.rule_id & !INNER_TIER_ID_BIT)))
                .collect();
            for key in &keys {
                let _ = maps.counters.remove(key);
                let _ = maps.grants.remove(key);
            }
        }

        for (rule_match, rule) in after {
            if self.rules.get(rule_match) != Some(rule) {
                maps.rules.insert(rule_match, rule, 0).context("failed to write the RULES map")?;
            }
        }
        self.rules = after.clone();
        write_index(&self.rules, maps)
    }
}
