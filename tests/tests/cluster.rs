//! The fleet accuracy test on a Redis Cluster of three masters and three replicas, with a
//! failover of the master that owns the hot key's slot in the middle of the run.

use std::{thread, time::Duration};

use limiter_tests::{
    cluster::RedisCluster,
    fleet::{Fleet, Schedule, fleet_totals},
};
use limiter_user::store::{bucket_of, group_keys};

/// The first rule added to a fresh agent gets id 1.
const RULE_ID: u32 = 1;

#[test]
fn cluster_holds_limit_through_failover() {
    let cluster = RedisCluster::start();
    let store_args = vec!["--redis".to_owned(), cluster.urls().join(","), "--redis-cluster".to_owned()];
    let fleet = Fleet::start_with_store(3, "100ms", Some(store_args));
    fleet.add_limit(&["--rate", "1000/s", "--proto", "udp"]);

    // Every Redis key of the hot key's group shares one hash tag, so one master owns it.
    let field = format!("{}/32", fleet.source_addr);
    let [even, _, _] = group_keys(RULE_ID, bucket_of(&field));
    let (master, replica) = cluster.master_and_replica_of(&even);
    println!("hot group {even} lives on the master on port {master}; failing over to port {replica} at about 6 s");

    // 10x the limit, split 60/30/10, for 12 s; the replica takes over about 6 s in.
    let failover = thread::spawn(move || {
        thread::sleep(Duration::from_millis(6200));
        cluster.fail_over_to(replica);
        cluster
    });
    let schedule = Schedule { steps: vec![(Duration::ZERO, vec![6000, 3000, 1000])] };
    let received = fleet.run(&schedule, Duration::from_secs(12));
    let cluster = failover.join().expect("failover thread panicked");

    let per_second = fleet_totals(&received, fleet.source_addr, Duration::from_secs(1), 12);
    println!("fleet total per second: {per_second:?}");

    // Before the failover, as on a single Redis (the first two seconds are the new key's
    // start-up transient).
    for (second, total) in per_second.iter().enumerate().take(6).skip(2) {
        assert!((950..=1020).contains(total), "second {second}: fleet passed {total}, expected 950-1020; {per_second:?}");
    }
    // Through and after the failover, enforcement goes on: never over 1.05x the limit, and
    // never far under it.
    for (second, total) in per_second.iter().enumerate().skip(6) {
        assert!(*total <= 1050, "second {second}: fleet passed {total}, expected at most 1050; {per_second:?}");
        assert!(*total >= 900, "second {second}: fleet passed {total}, expected at least 900; {per_second:?}");
    }

    // Agents first, so they do not report the cluster's shutdown as an outage.
    drop(fleet);
    drop(cluster);
}
