//! Division of a key's remaining fleet-wide budget into grants, used by the agent only.
//!
//! Each tick the agent learns a key's fleet-wide estimate, turns it into the budget left in
//! the window, takes this gateway's share in proportion to where the key's traffic arrived,
//! and splits that share across the CPUs that saw the key. Shares are rounded down, so the
//! shares of all gateways never add up to more than the budget when their demands add up to
//! the fleet's.

/// Returns `budget * own / total`, rounded down. Returns 0 when `total` is 0, and the whole
/// budget when `own` is at least `total`.
pub fn proportional_share(budget: u64, own: u64, total: u64) -> u64 {
    if total == 0 {
        return 0;
    }
    let own = own.min(total);
    let share = u128::from(budget) * u128::from(own) / u128::from(total);
    // `own <= total`, so the share is at most `budget` and fits in 64 bits.
    share as u64
}

/// Splits `budget` over the CPUs in proportion to `demand`, writing each CPU's part to
/// `shares` (same length as `demand`).
///
/// The parts add up to exactly `budget`: what rounding leaves over goes to the CPU with the
/// highest demand. With no demand anywhere, the budget is split evenly, so a key that turns
/// up on a new CPU before the next tick still gets some of it.
pub fn split_by_demand(budget: u64, demand: &[u64], shares: &mut [u64]) {
    let cpus = demand.len().min(shares.len());
    if cpus == 0 {
        return;
    }
    let demand = &demand[..cpus];
    let shares = &mut shares[..cpus];
    let total: u128 = demand.iter().map(|d| u128::from(*d)).sum();

    if total == 0 {
        let even = budget / cpus as u64;
        shares.fill(even);
        shares[0] += budget - even * cpus as u64;
        return;
    }

    let mut given = 0u64;
    let mut busiest = 0;
    for (cpu, own) in demand.iter().enumerate() {
        // `own <= total`, so each part is at most `budget` and the parts add up to at most it.
        shares[cpu] = (u128::from(budget) * u128::from(*own) / total) as u64;
        given += shares[cpu];
        if *own > demand[busiest] {
            busiest = cpu;
        }
    }
    shares[busiest] += budget - given;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proportional_share_rounds_down() {
        assert_eq!(proportional_share(100, 1, 3), 33);
        assert_eq!(proportional_share(100, 2, 3), 66);
        assert_eq!(proportional_share(100, 3, 3), 100);
    }

    #[test]
    fn proportional_share_edge_cases() {
        assert_eq!(proportional_share(100, 5, 0), 0);
        assert_eq!(proportional_share(100, 9, 3), 100);
        assert_eq!(proportional_share(u64::MAX, u64::MAX - 1, u64::MAX), u64::MAX - 1);
        assert_eq!(proportional_share(0, 1, 2), 0);
    }

    #[test]
    fn split_by_demand_sums_to_budget() {
        let mut shares = [0u64; 4];
        split_by_demand(100, &[60, 30, 10, 0], &mut shares);
        assert_eq!(shares, [60, 30, 10, 0]);

        split_by_demand(10, &[1, 1, 1, 0], &mut shares);
        assert_eq!(shares.iter().sum::<u64>(), 10);
        assert_eq!(shares, [4, 3, 3, 0]);
    }

    #[test]
    fn split_by_demand_without_demand_is_even() {
        let mut shares = [0u64; 3];
        split_by_demand(10, &[0, 0, 0], &mut shares);
        assert_eq!(shares, [4, 3, 3]);
    }

    #[test]
    fn split_by_demand_gives_remainder_to_busiest() {
        let mut shares = [0u64; 3];
        split_by_demand(10, &[1, 5, 1], &mut shares);
        assert_eq!(shares.iter().sum::<u64>(), 10);
        assert_eq!(shares, [1, 8, 1]);
    }

    #[test]
    fn split_by_demand_handles_huge_demand() {
        let mut shares = [0u64; 2];
        split_by_demand(1000, &[u64::MAX, u64::MAX], &mut shares);
        assert_eq!(shares.iter().sum::<u64>(), 1000);
    }
}
