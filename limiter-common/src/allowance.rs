//! Division of a key's remaining fleet-wide budget into grants, used by the agent only.
//!
//! Each tick the agent learns a key's fleet-wide estimate, turns it into the budget left in
//! the window, takes this gateway's share in proportion to where the key's traffic arrived,
//! and splits that share across the CPUs, mostly where the key was seen. Shares are rounded down, so the
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

/// Part of a gateway's budget spread evenly over all CPUs, in quarters; the rest follows
/// demand. A key's packets can move to another CPU between ticks (RSS changes, or a NIC queue
/// whose polling moves between CPUs), and without a reserve that CPU would drop every packet
/// until the next tick. Reserve left unused stays in the fleet's free budget, so the next
/// tick grants it again: it makes no packet pass beyond the limit.
const EVEN_QUARTERS: u64 = 1;

/// Splits `budget` over the CPUs, writing each CPU's part to `shares` (same length as
/// `demand`): a quarter evenly, three quarters in proportion to `demand`.
///
/// The parts add up to exactly `budget`: what rounding leaves over goes to the CPU with the
/// highest demand. The even quarter is rounded down to whole packets per CPU, so a budget too
/// small to give every CPU a packet goes wholly by demand. With no demand anywhere, the whole
/// budget is split evenly.
pub fn split_by_demand(budget: u64, demand: &[u64], shares: &mut [u64]) {
    let cpus = demand.len().min(shares.len());
    if cpus == 0 {
        return;
    }
    let demand = &demand[..cpus];
    let shares = &mut shares[..cpus];
    let total: u128 = demand.iter().map(|d| u128::from(*d)).sum();

    let even_budget = if total == 0 { budget } else { budget / 4 * EVEN_QUARTERS };
    let even_per_cpu = even_budget / cpus as u64;
    shares.fill(even_per_cpu);
    let demand_budget = budget - even_per_cpu * cpus as u64;

    let mut busiest = 0;
    if total > 0 {
        for (cpu, own) in demand.iter().enumerate() {
            // `own <= total`, so each part is at most `demand_budget` and they add up to at most it.
            shares[cpu] += (u128::from(demand_budget) * u128::from(*own) / total) as u64;
            if *own > demand[busiest] {
                busiest = cpu;
            }
        }
    }
    let given: u64 = shares.iter().sum();
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
        // 25 evenly (6 each), the other 76 by demand: 45, 22, 7, 0, and the 2 left over to
        // the busiest CPU 0.
        split_by_demand(100, &[60, 30, 10, 0], &mut shares);
        assert_eq!(shares, [53, 28, 13, 6]);
        assert_eq!(shares.iter().sum::<u64>(), 100);

        // A quarter of 10 is less than a packet per CPU, so all of it goes by demand.
        split_by_demand(10, &[1, 1, 1, 0], &mut shares);
        assert_eq!(shares.iter().sum::<u64>(), 10);
        assert_eq!(shares, [4, 3, 3, 0]);
    }

    #[test]
    fn split_by_demand_reserves_for_idle_cpus() {
        let mut shares = [0u64; 2];
        split_by_demand(40, &[5, 0], &mut shares);
        assert_eq!(shares, [35, 5]);
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
        // All 10 by demand: 1, 7, 1, and the 1 left over to the busiest CPU 1.
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
