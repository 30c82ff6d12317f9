//! One rule set across a fleet: a change made through any gateway's agent reaches the other
//! gateways, with the same rule ids and version, within two sync intervals. After Redis
//! loses its data, the agents publish their set again under a higher version.

use std::time::{Duration, Instant};

use limiter_tests::{Agent, fleet::Fleet, wait_until};
use limiter_user::control::{self, Request, Response};

const TICK: Duration = Duration::from_millis(100);

/// The rule set one gateway's agent reports: version and origin, and (id, traffic, rate) of
/// each rule. Read through the control socket directly rather than by starting `limiter`,
/// so the time a process takes to start does not blur the convergence times measured.
#[derive(Debug, PartialEq, Eq)]
struct Listing {
    version: Option<u64>,
    origin: Option<String>,
    rules: Vec<(u32, String, u64)>,
}

fn listing(iface: &str) -> Listing {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let (rule_set, views) = runtime.block_on(async {
        let rule_set = match control::request(iface, &Request::RuleSet).await {
            Ok(Response::RuleSet { rule_set }) => rule_set,
            other => panic!("rule set request to the agent on {iface}: {other:?}"),
        };
        let views = match control::request(iface, &Request::LimitList).await {
            Ok(Response::Rules { rules }) => rules,
            other => panic!("limit list request to the agent on {iface}: {other:?}"),
        };
        (rule_set, views)
    });
    let mut rules: Vec<(u32, String, u64)> =
        views.iter().map(|view| (view.id, view.spec.describe_match(), view.spec.rate)).collect();
    rules.sort();
    Listing { version: (rule_set.version > 0).then_some(rule_set.version), origin: rule_set.origin_node, rules }
}

/// Returns the version and origin in the header line of `limiter limit list`, such as
/// "rule set version 3, published by gw0-n123x4 at 2026-12-05T10:00:00Z".
fn listed_header(iface: &str) -> (Option<u64>, Option<String>) {
    let table = Agent::cli(&["limit", "list", "--iface", iface]);
    let header = table.lines().next().unwrap_or_default();
    let published = header.strip_prefix("rule set version ").and_then(|rest| rest.split_once(", published by "));
    let version = published.and_then(|(version, _)| version.parse().ok());
    let origin = published.and_then(|(_, rest)| rest.split(' ').next()).map(str::to_owned);
    (version, origin)
}

/// Waits until every gateway in `others` lists the same version and rules as `origin`, and
/// returns how long that took from `since`.
fn wait_for_convergence(fleet: &Fleet, origin: usize, others: &[usize], since: Instant, bound: Duration) -> Duration {
    let iface = |gateway: usize| fleet.veths[gateway].host.as_str();
    let expected = listing(iface(origin));
    assert!(expected.version.is_some(), "gateway {origin} has not published: {expected:?}");
    let mut last = Vec::new();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until("the other gateways to list the same rule set", bound, || {
            last = others.iter().map(|gateway| listing(iface(*gateway))).collect();
            last.iter().all(|listing| *listing == expected)
        })
    }));
    let elapsed = since.elapsed();
    assert!(outcome.is_ok(), "after {elapsed:?}, gateway {origin} lists {expected:?} but gateways {others:?} list {last:?}");
    elapsed
}

#[test]
fn rule_changes_reach_every_gateway() {
    let fleet = Fleet::start(3, "100ms");
    let iface = |gateway: usize| fleet.veths[gateway].host.clone();

    // Step 1: a rule added through gateway 1 (index 0) reaches gateways 2 and 3. Each wait
    // gives up after 1 s (ten ticks), so a slow run shows its listings. The two-tick bound
    // is checked on the measured times at the end.
    Agent::cli(&["limit", "add", "--iface", &iface(0), "--rate", "500/s", "--proto", "udp"]);
    let added = Instant::now();
    wait_until("gateway 1 to publish its rule set", Duration::from_secs(1), || listing(&iface(0)).version.is_some());
    let first = wait_for_convergence(&fleet, 0, &[1, 2], added, Duration::from_secs(1));
    let after_add = listing(&iface(1));
    println!("limit add through gateway 1 reached gateways 2 and 3 within {first:?}: {after_add:?}");
    assert_eq!(after_add.rules.len(), 1, "{after_add:?}");
    assert!(after_add.origin.as_deref().is_some_and(|origin| origin.starts_with("gw0-")), "origin: {after_add:?}");
    for gateway in 0..3 {
        let header = listed_header(&iface(gateway));
        assert_eq!(header, (after_add.version, after_add.origin.clone()), "`limit list` header on gateway {}", gateway + 1);
    }

    // Step 2: a later change through gateway 3 (index 2) reaches gateways 1 and 2, under a
    // higher version, and both rules keep one id across the fleet.
    Agent::cli(&["limit", "add", "--iface", &iface(2), "--rate", "50", "--proto", "tcp", "--port", "22"]);
    let changed = Instant::now();
    wait_until("gateway 3 to publish its change", Duration::from_secs(1), || {
        listing(&iface(2)).version > after_add.version
    });
    let second = wait_for_convergence(&fleet, 2, &[0, 1], changed, Duration::from_secs(1));
    let after_change = listing(&iface(0));
    println!("limit add through gateway 3 reached gateways 1 and 2 within {second:?}: {after_change:?}");
    assert_eq!(after_change.rules.len(), 2, "{after_change:?}");
    assert!(after_change.origin.as_deref().is_some_and(|origin| origin.starts_with("gw2-")), "origin: {after_change:?}");
    assert!(after_change.rules.contains(&after_add.rules[0]), "the UDP rule changed id or rate: {after_change:?}");

    // Step 3: a removal through gateway 2 (index 1) reaches the others.
    let udp_id = after_add.rules[0].0.to_string();
    assert!(after_add.rules[0].1 == "udp", "{after_add:?}");
    Agent::cli(&["limit", "remove", "--iface", &iface(1), &udp_id]);
    let removed = Instant::now();
    wait_until("gateway 2 to publish the removal", Duration::from_secs(1), || {
        listing(&iface(1)).version > after_change.version
    });
    let third = wait_for_convergence(&fleet, 1, &[0, 2], removed, Duration::from_secs(1));
    let after_remove = listing(&iface(2));
    println!("limit remove through gateway 2 reached gateways 1 and 3 within {third:?}: {after_remove:?}");
    assert_eq!(after_remove.rules.len(), 1, "{after_remove:?}");

    // Step 4: two gateways change their rules at the same time. Each publishes its whole
    // set, and the newest version wins, so all three end up with one set under one version.
    let racers: Vec<_> = [(0, "17"), (1, "18")]
        .into_iter()
        .map(|(gateway, port)| {
            let iface = iface(gateway);
            std::thread::spawn(move || {
                Agent::cli(&["limit", "add", "--iface", &iface, "--rate", "30", "--proto", "udp", "--port", port])
            })
        })
        .collect();
    for racer in racers {
        racer.join().expect("limit add thread panicked");
    }
    let raced = Instant::now();
    let mut last = Vec::new();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until("the gateways to agree after concurrent changes", Duration::from_secs(2), || {
            last = (0..3).map(|gateway| listing(&iface(gateway))).collect();
            last.iter().all(|listing| *listing == last[0] && listing.version > after_remove.version)
        })
    }));
    assert!(outcome.is_ok(), "after concurrent changes the gateways list {last:?}");
    println!("concurrent changes through gateways 1 and 2 settled within {:?}: {:?}", raced.elapsed(), last[0]);

    for elapsed in [first, second, third] {
        // Polling adds up to 20 ms, and the agents' ticks may run late on a loaded machine.
        assert!(elapsed <= 2 * TICK + Duration::from_millis(100), "convergence took {elapsed:?}, more than two ticks");
    }
}

#[test]
fn agents_republish_after_redis_loses_rules() {
    let mut fleet = Fleet::start(3, "100ms");
    let iface = |gateway: usize| fleet.veths[gateway].host.clone();
    Agent::cli(&["limit", "add", "--iface", &iface(0), "--rate", "500/s", "--proto", "udp"]);
    wait_until("gateway 1 to publish its rule set", Duration::from_secs(1), || listing(&iface(0)).version.is_some());
    wait_for_convergence(&fleet, 0, &[1, 2], Instant::now(), Duration::from_secs(1));
    let before = listing(&iface(0));

    // A restarted, empty Redis has no rule set. The agents find an older version there than
    // their own, so they publish theirs again, one version higher, with the same rules.
    fleet.redis.stop();
    fleet.redis.restart();
    let restarted = Instant::now();
    // HMGET, because the fixture's reader waits out its 2 s timeout on a nil bulk reply,
    // which HGET of a missing field returns, but not on an array.
    let version_in_redis = || {
        let reply = fleet.redis.command("HMGET limiter:{fleet}:rules version");
        reply.lines().nth(2).and_then(|line| line.trim().parse::<u64>().ok())
    };
    wait_until("the agents to publish their rule set again", Duration::from_secs(5), || {
        version_in_redis().is_some_and(|version| Some(version) > before.version)
    });
    println!("rule set back in Redis {:?} after the restart, as version {:?}", restarted.elapsed(), version_in_redis());
    let fleet_ref = &fleet;
    wait_until("every gateway to list the republished version", Duration::from_secs(2), || {
        (0..3).all(|gateway| listing(&fleet_ref.veths[gateway].host).version == version_in_redis())
    });
    for gateway in 0..3 {
        let after = listing(&fleet.veths[gateway].host);
        assert_eq!(after.rules, before.rules, "gateway {gateway} rules changed across the Redis restart");
    }
}
