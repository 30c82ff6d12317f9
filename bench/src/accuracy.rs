//! Fleet accuracy: three gateways with their own agents (100 ms ticks) hold one limit of
//! 1000 packets per second for a source that sends 10,000 per second through them, split
//! 60/30/10, then all through the third gateway. Real UDP packets through veth pairs, counted
//! behind each gateway per second.
//!
//! Offered rates are the senders' schedule, which they keep to within a packet; passed
//! counts are what each gateway's receiver counted.

use std::time::Duration;

use limiter_tests::fleet::{Fleet, Schedule, fleet_totals};
use serde::Serialize;

use crate::Scale;

pub const LIMIT_PER_SECOND: u64 = 1_000;
const OFFERED_PER_SECOND: u64 = 10_000;
/// Percent of the offered rate sent through each gateway before the move.
const SPLIT_PERCENT: [u64; 3] = [60, 30, 10];
/// Seconds after which a new key's start-up no longer shows (see the README's
/// "A new key's first two seconds"), used for the steady-state figures.
const START_UP_SECONDS: usize = 2;

#[derive(Clone, Debug, Serialize)]
pub struct Accuracy {
    pub limit_per_second: u64,
    pub sync_interval_ms: u64,
    pub split_seconds: u64,
    pub moved_seconds: u64,
    /// Offered packets per second through each gateway, per second.
    pub offered_per_gateway: Vec<Vec<u64>>,
    /// Packets passed through each gateway, per second.
    pub passed_per_gateway: Vec<Vec<u64>>,
    pub passed_total: Vec<u64>,
    /// Packets above the limit, per second (0 for seconds under it).
    pub over_admission: Vec<u64>,
    pub max_over_admission: u64,
    pub mean_over_admission: f64,
    /// The same two figures from second 2 on, after the key's start-up.
    pub steady_max_over_admission: u64,
    pub steady_mean_over_admission: f64,
    /// Mean packets passed per second from second 2 on, as a fraction of the limit.
    pub steady_mean_passed_vs_limit: f64,
}

pub fn run(scale: &Scale) -> anyhow::Result<Accuracy> {
    let gateways = SPLIT_PERCENT.len();
    let fleet = Fleet::start(gateways, "100ms");
    fleet.add_limit(&["--rate", &format!("{LIMIT_PER_SECOND}/s"), "--proto", "udp"]);

    let split: Vec<u64> = SPLIT_PERCENT
        .iter()
        .map(|percent| OFFERED_PER_SECOND * percent / 100)
        .collect();
    let mut moved = vec![0; gateways];
    moved[gateways - 1] = OFFERED_PER_SECOND;
    let schedule = Schedule {
        steps: vec![
            (Duration::ZERO, split.clone()),
            (
                Duration::from_secs(scale.fleet_split_seconds),
                moved.clone(),
            ),
        ],
    };
    let seconds = (scale.fleet_split_seconds + scale.fleet_moved_seconds) as usize;
    let received = fleet.run(&schedule, Duration::from_secs(seconds as u64));

    let second = Duration::from_secs(1);
    let passed_per_gateway: Vec<Vec<u64>> = received
        .iter()
        .map(|one| {
            fleet_totals(
                std::slice::from_ref(one),
                fleet.source_addr,
                second,
                seconds,
            )
        })
        .collect();
    let passed_total = fleet_totals(&received, fleet.source_addr, second, seconds);
    let offered_per_gateway: Vec<Vec<u64>> = (0..gateways)
        .map(|gateway| {
            (0..seconds)
                .map(|index| {
                    if (index as u64) < scale.fleet_split_seconds {
                        split[gateway]
                    } else {
                        moved[gateway]
                    }
                })
                .collect()
        })
        .collect();

    let over_admission: Vec<u64> = passed_total
        .iter()
        .map(|passed| passed.saturating_sub(LIMIT_PER_SECOND))
        .collect();
    let steady = over_admission.get(START_UP_SECONDS..).unwrap_or(&[]);
    let steady_passed = passed_total.get(START_UP_SECONDS..).unwrap_or(&[]);
    Ok(Accuracy {
        limit_per_second: LIMIT_PER_SECOND,
        sync_interval_ms: 100,
        split_seconds: scale.fleet_split_seconds,
        moved_seconds: scale.fleet_moved_seconds,
        offered_per_gateway,
        passed_per_gateway,
        max_over_admission: over_admission.iter().copied().max().unwrap_or(0),
        mean_over_admission: mean(&over_admission),
        steady_max_over_admission: steady.iter().copied().max().unwrap_or(0),
        steady_mean_over_admission: mean(steady),
        steady_mean_passed_vs_limit: mean(steady_passed) / LIMIT_PER_SECOND as f64,
        over_admission,
        passed_total,
    })
}

fn mean(values: &[u64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<u64>() as f64 / values.len() as f64
    }
}
