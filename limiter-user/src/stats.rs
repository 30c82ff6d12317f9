//! Verdict counters from the `STATS` map, summed over every possible CPU.

use std::collections::BTreeMap;

use anyhow::Context as _;
use limiter_common::Reason;

use crate::datapath::Maps;

/// Returns the packets counted under each reason, by reason name.
pub fn reason_counts(maps: &Maps) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    let mut counts = BTreeMap::new();
    for reason in Reason::ALL {
        let per_cpu = maps
            .stats
            .get(&(reason as u32), 0)
            .with_context(|| format!("failed to read STATS entry {}", reason.name()))?;
        counts.insert(reason.name(), per_cpu.iter().fold(0u64, |sum, count| sum.saturating_add(*count)));
    }
    Ok(counts)
}

/// Formats the counts as a two-column table, in the order of `Reason`.
pub fn format_reason_counts(counts: &BTreeMap<&'static str, u64>) -> String {
    let mut table = String::new();
    for reason in Reason::ALL {
        let action = if reason.drops() { "drop" } else { "pass" };
        let count = counts.get(reason.name()).copied().unwrap_or(0);
        table += &format!("{:<22} {action:<5} {count:>14}\n", reason.name());
    }
    table
}
