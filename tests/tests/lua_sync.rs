//! The Lua scripts against a real redis-server: sync.lua through `Store::sync`, reserve.lua
//! through `Store::reserve` (both through redis-cli for calls the agent never makes), and
//! heartbeat.lua through `Store::heartbeat`.
//!
//! Each test starts its own redis-server, so tests run in parallel without sharing keys.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use limiter_common::{Rule, SlidingWindow, window};
use limiter_tests::{RedisServer, wait_until};
use limiter_user::{
    reconcile::{TickTiming, gateway_budget},
    rules::PACE,
    store::{FleetCounts, Group, KeyDelta, Lease, Store, SyncReply, group_keys},
};

const RULE_ID: u32 = 3;
const BUCKET: u32 = 17;
/// One hour: a test's calls almost never straddle two windows this long.
const LONG_WINDOW_US: u64 = 3_600_000_000;
/// Short enough to wait for the next window, long enough that polling every 20 ms catches it.
const SHORT_WINDOW_US: u64 = 200_000;
/// Long enough that no hash expires during a test.
const TTL_MS: u64 = 60_000;
/// A span of 1 µs puts the whole delta in the current window, except on the window's very
/// first microsecond, where it belongs to the previous one.
const SHORT_SPAN_US: u64 = 1;
/// A sync interval that no test outlives, so a lease keeps nearly all of its grant.
const LONG_INTERVAL_US: u64 = 60_000_000;
/// A sync interval short enough to wait out twice, and long enough that a call made after
/// polling every 20 ms still runs in the half of the interval it waited for.
const SHORT_INTERVAL_US: u64 = 400_000;
const FIELD: &str = "198.51.100.0/24";
const OTHER_FIELD: &str = "203.0.113.9/32";
const NODE_A: &str = "gateway-a";
const NODE_B: &str = "gateway-b";
const NODE_C: &str = "gateway-c";
const SYNC_SCRIPT_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../lua/sync.lua");
const RESERVE_SCRIPT_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../lua/reserve.lua");

fn connect(redis: &RedisServer) -> Store {
    Store::connect(&[redis.url()], false, Duration::from_secs(5), None)
        .unwrap_or_else(|error| panic!("failed to create a store for {}: {error:#}", redis.url()))
}

/// Returns the test group, with `node_id` as the calling gateway.
fn group(window_us: u64, node_id: &str) -> Group<'_> {
    Group { rule_id: RULE_ID, bucket: BUCKET, window_us, ttl_ms: TTL_MS, node_id }
}

fn delta(field: &str, passed: u64) -> KeyDelta {
    KeyDelta { field: field.to_owned(), passed }
}

fn lease(field: &str, grant: u64, rate: u64) -> Lease {
    Lease { field: field.to_owned(), grant, rate }
}

async fn sync(store: &Store, node_id: &str, window_us: u64, span_us: u64, deltas: &[KeyDelta]) -> SyncReply {
    store
        .sync(&group(window_us, node_id), span_us, deltas)
        .await
        .unwrap_or_else(|error| panic!("sync of {deltas:?} by {node_id} with window {window_us} us failed: {error}"))
}

async fn reserve(store: &Store, node_id: &str, interval_us: u64, leases: &[Lease]) {
    store
        .reserve(&group(LONG_WINDOW_US, node_id), interval_us, leases)
        .await
        .unwrap_or_else(|error| panic!("reserve of {leases:?} by {node_id} with interval {interval_us} us failed: {error}"));
}

fn counts(current_passed: u64, previous_passed: u64, others_outstanding: u64, others_rate: u64) -> FleetCounts {
    FleetCounts { current_passed, previous_passed, others_outstanding, others_rate }
}

/// Returns the Redis key that contains the counts of window `window_id`.
fn key_of_window(window_id: u64) -> String {
    let [even, odd, _] = group_keys(RULE_ID, BUCKET);
    if window_id.is_multiple_of(2) { even } else { odd }
}

fn leases_key() -> String {
    let [_, _, leases] = group_keys(RULE_ID, BUCKET);
    leases
}

/// Returns the value of a RESP integer reply such as `:42\r\n`.
fn integer_reply(reply: &str) -> i64 {
    reply
        .strip_prefix(':')
        .and_then(|rest| rest.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("expected an integer reply, got {reply:?}"))
}

/// Returns the text of a RESP bulk string reply such as `$2\r\n42\r\n`, or `None` for the
/// null reply `$-1\r\n`.
fn bulk_reply(reply: &str) -> Option<&str> {
    if reply.starts_with("$-1\r\n") {
        return None;
    }
    match reply.strip_prefix('$').and_then(|rest| rest.split("\r\n").nth(1)) {
        Some(text) => Some(text),
        None => panic!("expected a bulk string reply, got {reply:?}"),
    }
}

/// Returns the server's clock in microseconds, from TIME.
fn server_time_us(redis: &RedisServer) -> u64 {
    let reply = redis.command("TIME");
    // An array of two bulk strings: seconds, then microseconds.
    let values: Vec<u64> =
        reply.split("\r\n").filter(|line| !line.is_empty() && !line.starts_with(['*', '$'])).filter_map(|line| line.parse().ok()).collect();
    match values[..] {
        [seconds, micros] => seconds * 1_000_000 + micros,
        _ => panic!("expected TIME to return seconds and microseconds, got {reply:?}"),
    }
}

/// Waits until the server's clock is at `at_us` or later.
fn wait_for_server_time(redis: &RedisServer, at_us: u64, description: &str) {
    wait_until(&format!("server time {at_us} us ({description})"), Duration::from_secs(5), || server_time_us(redis) >= at_us);
}

/// Waits until the server's clock is in window `window_id` of `window_us` or a later one.
fn wait_for_window(redis: &RedisServer, window_us: u64, window_id: u64) {
    wait_for_server_time(redis, window_id * window_us, &format!("window {window_id}"));
}

/// Returns the group's three hashes, the number of keys and, for each hash, whether its TTL
/// is above [`TTL_MS`], as text.
fn snapshot(redis: &RedisServer) -> String {
    let mut text = String::new();
    for key in group_keys(RULE_ID, BUCKET) {
        let ttl_ms = integer_reply(&redis.command(&format!("PTTL {key}")));
        text += &redis.command(&format!("HGETALL {key}"));
        text += &format!("TTL of {key} above {TTL_MS} ms: {}\n", ttl_ms > TTL_MS as i64);
    }
    text + &redis.command("DBSIZE")
}

/// Sends a script with EVAL through redis-cli, with `keys` and `args`, and returns what
/// redis-cli printed. An error reply starts with "(error)".
fn eval_with_cli(redis: &RedisServer, script_path: &str, keys: &[String], args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["--no-raw", "-p", &redis.port.to_string(), "--eval", script_path])
        .args(keys)
        .arg(",")
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("failed to start redis-cli (is it installed?): {error}"));
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// Sends sync.lua with the test group's three keys and `args`.
fn eval_sync_with_cli(redis: &RedisServer, args: &[&str]) -> String {
    eval_with_cli(redis, SYNC_SCRIPT_PATH, &group_keys(RULE_ID, BUCKET), args)
}

/// Sends reserve.lua with the test group's leases key and `args`.
fn eval_reserve_with_cli(redis: &RedisServer, args: &[&str]) -> String {
    eval_with_cli(redis, RESERVE_SCRIPT_PATH, &[leases_key()], args)
}

/// One entry of a leases field, "node,grant,time_us,interval_us,rate".
#[derive(Debug, PartialEq, Eq)]
struct StoredLease {
    node: String,
    grant: u64,
    time_us: u64,
    interval_us: u64,
    rate: u64,
}

/// Returns the raw leases field of `field`, or `None` if the hash has no such field.
fn stored_leases_text(redis: &RedisServer, field: &str) -> Option<String> {
    let reply = redis.command(&format!("HGET {} {field}", leases_key()));
    bulk_reply(&reply).map(str::to_owned)
}

/// Returns the entries of the leases field of `field`, in stored order.
fn stored_leases(redis: &RedisServer, field: &str) -> Vec<StoredLease> {
    let Some(text) = stored_leases_text(redis, field) else {
        panic!("the leases hash has no field {field}");
    };
    text.split(';').map(parse_stored_lease).collect()
}

fn parse_stored_lease(entry: &str) -> StoredLease {
    let parts: Vec<&str> = entry.split(',').collect();
    let number = |index: usize| -> u64 {
        parts[index].parse().unwrap_or_else(|error| panic!("lease {entry:?}: part {index} is not an integer: {error}"))
    };
    assert_eq!(parts.len(), 5, "lease {entry:?}: expected node,grant,time_us,interval_us,rate");
    StoredLease { node: parts[0].to_owned(), grant: number(1), time_us: number(2), interval_us: number(3), rate: number(4) }
}

/// Returns the only lease of `node` in the leases field of `field`.
fn stored_lease_of(redis: &RedisServer, field: &str, node: &str) -> StoredLease {
    let leases = stored_leases(redis, field);
    let count = leases.iter().filter(|lease| lease.node == node).count();
    assert_eq!(count, 1, "leases of {node} in field {field}: {leases:?}");
    leases.into_iter().find(|lease| lease.node == node).unwrap_or_else(|| panic!("no lease of {node} in field {field}"))
}

/// Returns the nodes with a lease in the leases field of `field`, sorted.
fn nodes_with_lease(redis: &RedisServer, field: &str) -> Vec<String> {
    let mut nodes: Vec<String> = stored_leases(redis, field).into_iter().map(|lease| lease.node).collect();
    nodes.sort();
    nodes
}

/// Returns what a lease still allows by hand: `grant * (interval - age) / interval`, rounded
/// down, and 0 from `age >= interval` on.
fn outstanding_by_hand(grant: u64, interval_us: u64, age_us: u64) -> u64 {
    let time_left = u128::from(interval_us.saturating_sub(age_us));
    (u128::from(grant) * time_left / u128::from(interval_us)) as u64
}

/// Returns the estimate by hand: `current + previous * (1 - elapsed / window)`, rounded down.
fn estimate_by_hand(current: u64, previous: u64, elapsed_us: u64, window_us: u64) -> u64 {
    let time_left = u128::from(window_us - elapsed_us);
    current + (u128::from(previous) * time_left / u128::from(window_us)) as u64
}

/// Returns the estimate by hand at time `at_us`, for counts of window `window_id` and nothing
/// counted after them: one window on, the current count weighs as the previous one.
fn estimate_at_by_hand(current: u64, previous: u64, window_id: u64, at_us: u64, window_us: u64) -> u64 {
    let elapsed_us = at_us % window_us;
    match at_us / window_us - window_id {
        0 => estimate_by_hand(current, previous, elapsed_us, window_us),
        1 => estimate_by_hand(0, current, elapsed_us, window_us),
        _ => 0,
    }
}

// sync.lua

#[tokio::test]
async fn sync_adds_deltas_from_two_gateways() {
    let redis = RedisServer::start();
    let gateway_a = connect(&redis);
    let gateway_b = connect(&redis);

    let reply_a = sync(&gateway_a, NODE_A, LONG_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 5), delta(OTHER_FIELD, 1)]).await;
    let reply_b = sync(&gateway_b, NODE_B, LONG_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 3)]).await;

    assert_eq!(reply_a.window_id, reply_b.window_id, "both calls must land in one window");
    assert_eq!(reply_a.counts, vec![counts(5, 0, 0, 0), counts(1, 0, 0, 0)]);
    assert_eq!(reply_b.counts, vec![counts(8, 0, 0, 0)]);
    let stored = redis.command(&format!("HGET {} p:{FIELD}", key_of_window(reply_b.window_id)));
    assert_eq!(bulk_reply(&stored), Some("8"), "passed count stored in the current window's hash");
}

#[tokio::test]
async fn sync_reports_previous_window_counts() {
    let redis = RedisServer::start();
    let store = connect(&redis);

    let first = sync(&store, NODE_A, SHORT_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 4)]).await;
    wait_for_window(&redis, SHORT_WINDOW_US, first.window_id + 1);
    let second = sync(&store, NODE_A, SHORT_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 2)]).await;

    assert_eq!(second.window_id, first.window_id + 1, "the second call must land in the next window");
    assert_eq!(second.counts, vec![counts(2, 4, 0, 0)]);
}

#[tokio::test]
async fn sync_reads_two_windows_back_as_zero() {
    let redis = RedisServer::start();
    let store = connect(&redis);

    let first = sync(&store, NODE_A, SHORT_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 4)]).await;
    wait_for_window(&redis, SHORT_WINDOW_US, first.window_id + 2);
    let later = sync(&store, NODE_A, SHORT_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 2)]).await;

    assert!(later.window_id >= first.window_id + 2, "window {} is not two after {}", later.window_id, first.window_id);
    assert_eq!(later.counts, vec![counts(2, 0, 0, 0)]);
}

#[tokio::test]
async fn sync_reads_stale_previous_hash_as_zero() {
    let redis = RedisServer::start();
    let store = connect(&redis);

    // Both hashes get counts. Three windows on, the hash of the previous window's parity
    // still contains an older window, which must not be read as the previous one.
    let first = sync(&store, NODE_A, SHORT_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 4)]).await;
    wait_for_window(&redis, SHORT_WINDOW_US, first.window_id + 1);
    let second = sync(&store, NODE_A, SHORT_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 2)]).await;
    wait_for_window(&redis, SHORT_WINDOW_US, first.window_id + 3);
    let later = sync(&store, NODE_A, SHORT_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 1)]).await;

    assert_eq!(second.window_id, first.window_id + 1, "the second call must land in the next window");
    assert!(later.window_id >= first.window_id + 3, "window {} is not three after {}", later.window_id, first.window_id);
    assert_eq!(later.counts, vec![counts(1, 0, 0, 0)]);
}

#[tokio::test]
async fn sync_sets_ttl_on_both_hashes() {
    let redis = RedisServer::start();
    let store = connect(&redis);

    let first = sync(&store, NODE_A, SHORT_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 4)]).await;
    wait_for_window(&redis, SHORT_WINDOW_US, first.window_id + 1);
    let second = sync(&store, NODE_A, SHORT_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 2)]).await;

    assert_ne!(key_of_window(first.window_id), key_of_window(second.window_id), "the calls must use both hashes");
    for window_id in [first.window_id, second.window_id] {
        let key = key_of_window(window_id);
        let ttl_ms = integer_reply(&redis.command(&format!("PTTL {key}")));
        assert!((1..=TTL_MS as i64).contains(&ttl_ms), "PTTL of {key} is {ttl_ms}, expected 1 to {TTL_MS}");
    }
}

#[tokio::test]
async fn sync_window_id_is_server_time_over_window() {
    let redis = RedisServer::start();
    let store = connect(&redis);

    for window_us in [1, 7, SHORT_WINDOW_US, 1_000_000, LONG_WINDOW_US] {
        let before_us = server_time_us(&redis);
        let reply = sync(&store, NODE_A, window_us, SHORT_SPAN_US, &[delta(FIELD, 1)]).await;
        let after_us = server_time_us(&redis);

        assert!(
            (before_us..=after_us).contains(&reply.now_us),
            "now_us {} is outside the server's TIME {before_us}..={after_us}",
            reply.now_us
        );
        assert_eq!(reply.window_id, reply.now_us / window_us, "window id for a {window_us} us window");
    }
}

#[tokio::test]
async fn sync_rejects_invalid_arguments_without_writing() {
    let redis = RedisServer::start();
    let store = connect(&redis);
    sync(&store, NODE_A, LONG_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 4)]).await;
    let before = snapshot(&redis);

    // Arguments after the three keys: window_us, ttl_ms, span_us, node id, then pairs. The
    // error names the argument that is wrong. The TTL of the valid calls is ten times the one
    // above, so a PEXPIRE by a rejected call shows in the snapshot.
    let cases: [(&str, &[&str], &str); 12] = [
        ("window 0", &["0", "600000", "1", NODE_A, FIELD, "1"], "invalid window length 0"),
        ("negative window", &["-5", "600000", "1", NODE_A, FIELD, "1"], "invalid window length -5"),
        ("fractional window", &["1.5", "600000", "1", NODE_A, FIELD, "1"], "invalid window length 1.5"),
        ("ttl 0", &["3600000000", "0", "1", NODE_A, FIELD, "1"], "invalid ttl 0"),
        ("fractional ttl", &["3600000000", "1.5", "1", NODE_A, FIELD, "1"], "invalid ttl 1.5"),
        ("span 0", &["3600000000", "600000", "0", NODE_A, FIELD, "1"], "invalid span 0"),
        ("empty node id", &["3600000000", "600000", "1", "", FIELD, "1"], "missing node id"),
        ("no node id", &["3600000000", "600000", "1"], "missing node id"),
        ("negative delta", &["3600000000", "600000", "1", NODE_A, FIELD, "-1"], "invalid delta for key"),
        ("non-numeric delta", &["3600000000", "600000", "1", NODE_A, FIELD, "one"], "invalid delta for key"),
        ("incomplete pair", &["3600000000", "600000", "1", NODE_A, FIELD], "invalid argument count 5"),
        ("no span", &["3600000000", "600000"], "invalid span nil"),
    ];
    for (case, args, message) in cases {
        let output = eval_sync_with_cli(&redis, args);
        assert!(output.starts_with(&format!("(error) {message}")), "{case}: expected an error reply {message:?}, got {output:?}");
        assert_eq!(snapshot(&redis), before, "{case}: the call changed the stored counts");
    }
}

#[tokio::test]
async fn sync_rejects_fractional_delta_without_writing() {
    let redis = RedisServer::start();
    let store = connect(&redis);
    sync(&store, NODE_A, LONG_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 4)]).await;
    let before = snapshot(&redis);

    // A valid pair first, so a partial write shows.
    let output = eval_sync_with_cli(&redis, &["3600000000", "60000", "1", NODE_A, FIELD, "1", OTHER_FIELD, "1.5"]);

    assert!(output.starts_with("(error) invalid delta for key"), "expected an error reply, got {output:?}");
    assert_eq!(snapshot(&redis), before, "the rejected call changed the stored counts");
}

#[tokio::test]
async fn store_sync_with_zero_window_fails() {
    let redis = RedisServer::start();
    let store = connect(&redis);

    let result = store.sync(&group(0, NODE_A), SHORT_SPAN_US, &[delta(FIELD, 1)]).await;

    assert!(result.is_err(), "expected an error for window 0, got {result:?}");
    assert_eq!(integer_reply(&redis.command("DBSIZE")), 0, "the rejected call wrote keys");
}

#[tokio::test]
async fn sync_survives_script_flush() {
    let redis = RedisServer::start();
    let store = connect(&redis);
    let first = sync(&store, NODE_A, LONG_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 4)]).await;

    let flushed = redis.command("SCRIPT FLUSH");
    assert_eq!(flushed, "+OK\r\n", "SCRIPT FLUSH");
    let second = store.sync(&group(LONG_WINDOW_US, NODE_A), SHORT_SPAN_US, &[delta(FIELD, 2)]).await;

    let second = second.unwrap_or_else(|error| panic!("sync after SCRIPT FLUSH failed: {error}"));
    assert_eq!(second.window_id, first.window_id, "both calls must land in one window");
    assert_eq!(second.counts, vec![counts(6, 0, 0, 0)]);
}

#[tokio::test]
async fn sync_splits_delta_across_window_start() {
    const PASSED: u64 = 1000;
    let redis = RedisServer::start();
    let store = connect(&redis);

    // A span of a whole window always reaches back across the window's start.
    let span_us = SHORT_WINDOW_US;
    let reply = sync(&store, NODE_A, SHORT_WINDOW_US, span_us, &[delta(FIELD, PASSED)]).await;
    let elapsed_us = reply.now_us - reply.window_id * SHORT_WINDOW_US;

    // By hand: the part of the span before the window start, in proportion, rounded down.
    let before_us = u128::from(span_us - elapsed_us);
    let passed_before = (u128::from(PASSED) * before_us / u128::from(span_us)) as u64;
    assert_eq!(reply.counts, vec![counts(PASSED - passed_before, passed_before, 0, 0)]);
    assert_eq!(window::part_before_window(PASSED, span_us, elapsed_us), passed_before, "agent's split of passed");
}

#[tokio::test]
async fn sync_estimate_matches_hand_computation() {
    // A power of two up to 2^20: the 20-bit fixed-point weight of the previous window then
    // loses nothing, so the agent's estimate must equal the exact value rounded down.
    const PREVIOUS: u64 = 1024;
    const CURRENT: u64 = 10;
    let redis = RedisServer::start();
    let store = connect(&redis);

    let first = sync(&store, NODE_A, SHORT_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, PREVIOUS)]).await;
    let window_id = first.window_id + 1;
    wait_for_window(&redis, SHORT_WINDOW_US, window_id);
    let mut replies = vec![sync(&store, NODE_A, SHORT_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, CURRENT)]).await];
    // Zero deltas read the counts again at later points of the same window.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        replies.push(sync(&store, NODE_A, SHORT_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 0)]).await);
    }
    replies.retain(|reply| reply.window_id == window_id);

    assert!(!replies.is_empty(), "no reply landed in window {window_id}");
    for reply in replies {
        let counts = reply.counts[0];
        let elapsed_us = reply.now_us - reply.window_id * SHORT_WINDOW_US;
        let estimate = SlidingWindow { window_id: reply.window_id, current: counts.current_passed, previous: counts.previous_passed }
            .estimate(elapsed_us, SHORT_WINDOW_US);
        assert_eq!(
            estimate,
            estimate_by_hand(CURRENT, PREVIOUS, elapsed_us, SHORT_WINDOW_US),
            "estimate {elapsed_us} us into the window, from {counts:?}"
        );
    }
}

// sync.lua reading the leases of reserve.lua

#[tokio::test]
async fn sync_outstanding_decays_over_interval() {
    const GRANT: u64 = 1000;
    let redis = RedisServer::start();
    let gateway_a = connect(&redis);
    let gateway_b = connect(&redis);

    reserve(&gateway_a, NODE_A, SHORT_INTERVAL_US, &[lease(FIELD, GRANT, 700)]).await;
    let granted_us = stored_lease_of(&redis, FIELD, NODE_A).time_us;
    let fresh = sync(&gateway_b, NODE_B, LONG_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 0), delta(OTHER_FIELD, 0)]).await;
    wait_for_server_time(&redis, granted_us + SHORT_INTERVAL_US / 2, "half the lease's interval");
    let half = sync(&gateway_b, NODE_B, LONG_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 0)]).await;
    wait_for_server_time(&redis, granted_us + SHORT_INTERVAL_US, "the lease's interval");
    let expired = sync(&gateway_b, NODE_B, LONG_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 0)]).await;

    // Right after the reserve, the lease allows nearly all of its grant. The age comes from
    // the server's clock in both calls, so the value is exact.
    let fresh_age_us = fresh.now_us - granted_us;
    let fresh_outstanding = fresh.counts[0].others_outstanding;
    assert_eq!(fresh_outstanding, outstanding_by_hand(GRANT, SHORT_INTERVAL_US, fresh_age_us), "{fresh_age_us} us after the reserve");
    assert_eq!(fresh.counts[1], counts(0, 0, 0, 0), "a key without leases");

    // Half an interval on, at most half of the grant is left. Without the decay it would
    // still be the whole grant.
    let half_age_us = half.now_us - granted_us;
    let half_outstanding = half.counts[0].others_outstanding;
    assert!(half_age_us < SHORT_INTERVAL_US, "the second sync ran {half_age_us} us after the reserve, too late to see the decay");
    assert!(half_outstanding <= GRANT / 2, "{half_outstanding} outstanding {half_age_us} us after a grant of {GRANT}");
    assert_eq!(half_outstanding, outstanding_by_hand(GRANT, SHORT_INTERVAL_US, half_age_us), "{half_age_us} us after the reserve");

    assert_eq!(expired.counts[0].others_outstanding, 0, "{} us after the reserve", expired.now_us - granted_us);
}

#[tokio::test]
async fn sync_rate_counts_for_two_intervals() {
    const RATE: u64 = 700;
    let redis = RedisServer::start();
    let gateway_a = connect(&redis);
    let gateway_b = connect(&redis);

    reserve(&gateway_a, NODE_A, SHORT_INTERVAL_US, &[lease(FIELD, 1000, RATE)]).await;
    let granted_us = stored_lease_of(&redis, FIELD, NODE_A).time_us;
    let fresh = sync(&gateway_b, NODE_B, LONG_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 0)]).await;
    wait_for_server_time(&redis, granted_us + SHORT_INTERVAL_US, "the lease's interval");
    let one_interval = sync(&gateway_b, NODE_B, LONG_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 0)]).await;
    wait_for_server_time(&redis, granted_us + 2 * SHORT_INTERVAL_US, "two of the lease's intervals");
    let two_intervals = sync(&gateway_b, NODE_B, LONG_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 0)]).await;

    assert_eq!(fresh.counts[0].others_rate, RATE, "right after the reserve");
    let one_interval_age_us = one_interval.now_us - granted_us;
    assert!(
        one_interval_age_us < 2 * SHORT_INTERVAL_US,
        "the second sync ran {one_interval_age_us} us after the reserve, too late to see the rate"
    );
    assert_eq!(one_interval.counts[0].others_rate, RATE, "{one_interval_age_us} us after the reserve");
    assert_eq!(two_intervals.counts[0].others_rate, 0, "{} us after the reserve", two_intervals.now_us - granted_us);
}

#[tokio::test]
async fn sync_ignores_own_lease() {
    const GRANT_B: u64 = 400;
    const RATE_B: u64 = 90;
    let redis = RedisServer::start();
    let gateway_a = connect(&redis);
    let gateway_b = connect(&redis);

    reserve(&gateway_a, NODE_A, LONG_INTERVAL_US, &[lease(FIELD, 1000, 700)]).await;
    let alone = sync(&gateway_a, NODE_A, LONG_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 0)]).await;
    reserve(&gateway_b, NODE_B, LONG_INTERVAL_US, &[lease(FIELD, GRANT_B, RATE_B)]).await;
    let with_other = sync(&gateway_a, NODE_A, LONG_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 0)]).await;

    assert_eq!(alone.counts, vec![counts(0, 0, 0, 0)], "node A's sync with only its own lease");
    let age_us = with_other.now_us - stored_lease_of(&redis, FIELD, NODE_B).time_us;
    let expected = counts(0, 0, outstanding_by_hand(GRANT_B, LONG_INTERVAL_US, age_us), RATE_B);
    assert_eq!(with_other.counts, vec![expected], "node A's sync with its own and node B's lease");
}

#[tokio::test]
async fn sync_floors_sum_of_leases_once() {
    let redis = RedisServer::start();
    let store = connect(&redis);

    // Each lease of 1 packet, a moment old, allows a little less than 1: 0 if each were
    // rounded down alone, 1 if their sum is.
    reserve(&store, NODE_A, LONG_INTERVAL_US, &[lease(FIELD, 1, 20)]).await;
    reserve(&store, NODE_B, LONG_INTERVAL_US, &[lease(FIELD, 1, 30)]).await;
    let reply = sync(&store, NODE_C, LONG_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 0)]).await;

    let oldest_age_us = reply.now_us - stored_lease_of(&redis, FIELD, NODE_A).time_us;
    assert!(oldest_age_us < LONG_INTERVAL_US / 2, "the sync ran {oldest_age_us} us after the first reserve");
    assert_eq!(reply.counts, vec![counts(0, 0, 1, 50)]);
}

// reserve.lua

#[tokio::test]
async fn reserve_replaces_own_lease() {
    let redis = RedisServer::start();
    let store = connect(&redis);

    reserve(&store, NODE_A, LONG_INTERVAL_US, &[lease(FIELD, 100, 10)]).await;
    reserve(&store, NODE_B, LONG_INTERVAL_US, &[lease(FIELD, 200, 20)]).await;
    reserve(&store, NODE_A, LONG_INTERVAL_US, &[lease(FIELD, 300, 30)]).await;
    let reply = sync(&store, NODE_C, LONG_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 0)]).await;

    let leases = stored_leases(&redis, FIELD);
    assert_eq!(leases.len(), 2, "one lease per node: {leases:?}");
    let lease_a = stored_lease_of(&redis, FIELD, NODE_A);
    assert_eq!((lease_a.grant, lease_a.interval_us, lease_a.rate), (300, LONG_INTERVAL_US, 30), "node A's second lease");
    let lease_b = stored_lease_of(&redis, FIELD, NODE_B);
    assert_eq!((lease_b.grant, lease_b.interval_us, lease_b.rate), (200, LONG_INTERVAL_US, 20), "node B's lease");
    assert_eq!(reply.counts[0].others_rate, 50, "node C's sync adds the rates of the stored leases only");
}

#[tokio::test]
async fn reserve_drops_other_lease_after_two_intervals() {
    let redis = RedisServer::start();
    let gateway_a = connect(&redis);
    let gateway_b = connect(&redis);

    reserve(&gateway_b, NODE_B, SHORT_INTERVAL_US, &[lease(FIELD, 200, 20)]).await;
    let granted_b_us = stored_lease_of(&redis, FIELD, NODE_B).time_us;

    // Between one and two of B's intervals, B's lease allows no more packets, but its rate
    // still counts, so A's reserve keeps it.
    wait_for_server_time(&redis, granted_b_us + SHORT_INTERVAL_US, "node B's interval");
    reserve(&gateway_a, NODE_A, LONG_INTERVAL_US, &[lease(FIELD, 100, 10)]).await;
    let lease_b_age_us = stored_lease_of(&redis, FIELD, NODE_A).time_us - granted_b_us;
    let nodes_after_one_interval = nodes_with_lease(&redis, FIELD);

    wait_for_server_time(&redis, granted_b_us + 2 * SHORT_INTERVAL_US, "two of node B's intervals");
    reserve(&gateway_a, NODE_A, LONG_INTERVAL_US, &[lease(FIELD, 100, 10)]).await;
    let nodes_after_two_intervals = nodes_with_lease(&redis, FIELD);

    assert!(lease_b_age_us < 2 * SHORT_INTERVAL_US, "node A's first reserve ran {lease_b_age_us} us after node B's, too late");
    assert_eq!(nodes_after_one_interval, vec![NODE_A, NODE_B], "nodes with a lease {lease_b_age_us} us after node B's reserve");
    assert_eq!(nodes_after_two_intervals, vec![NODE_A], "nodes with a lease two of node B's intervals after its reserve");
}

#[tokio::test]
async fn reserve_stores_time_with_all_digits() {
    let redis = RedisServer::start();
    let store = connect(&redis);

    let before_us = server_time_us(&redis);
    reserve(&store, NODE_A, LONG_INTERVAL_US, &[lease(FIELD, 100, 10)]).await;
    let after_us = server_time_us(&redis);

    let text = stored_leases_text(&redis, FIELD).unwrap_or_else(|| panic!("the leases hash has no field {FIELD}"));
    let time_text = text.split(',').nth(2).unwrap_or_else(|| panic!("lease {text:?} has no time"));
    // Server time in microseconds has 16 digits from 2001-09-09 until 2286.
    assert_eq!(time_text.len(), 16, "time {time_text:?} in lease {text:?}");
    assert!(time_text.bytes().all(|byte| byte.is_ascii_digit()), "time {time_text:?} in lease {text:?}");
    let time_us: u64 = time_text.parse().unwrap_or_else(|error| panic!("time {time_text:?} is not an integer: {error}"));
    assert!((before_us..=after_us).contains(&time_us), "time {time_us} is outside the server's TIME {before_us}..={after_us}");
}

#[tokio::test]
async fn reserve_writes_one_field_per_key() {
    let redis = RedisServer::start();
    let store = connect(&redis);

    let output = eval_reserve_with_cli(&redis, &[NODE_A, "60000000", "60000", FIELD, "100", "10", OTHER_FIELD, "5", "1"]);

    assert_eq!(output.trim_end(), "(integer) 2", "reply of a reserve of two keys");
    let lease_field = stored_lease_of(&redis, FIELD, NODE_A);
    assert_eq!((lease_field.grant, lease_field.rate), (100, 10), "lease of {FIELD}");
    let lease_other = stored_lease_of(&redis, OTHER_FIELD, NODE_A);
    assert_eq!((lease_other.grant, lease_other.rate), (5, 1), "lease of {OTHER_FIELD}");
    let reply = sync(&store, NODE_B, LONG_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 0), delta(OTHER_FIELD, 0)]).await;
    assert_eq!(reply.counts[1].others_rate, 1, "node B's sync of {OTHER_FIELD}");
}

#[tokio::test]
async fn reserve_sets_ttl_on_leases_hash() {
    let redis = RedisServer::start();
    let store = connect(&redis);

    reserve(&store, NODE_A, LONG_INTERVAL_US, &[lease(FIELD, 100, 10)]).await;

    let key = leases_key();
    let ttl_ms = integer_reply(&redis.command(&format!("PTTL {key}")));
    assert!((1..=TTL_MS as i64).contains(&ttl_ms), "PTTL of {key} is {ttl_ms}, expected 1 to {TTL_MS}");
}

#[tokio::test]
async fn reserve_rejects_invalid_arguments_without_writing() {
    let redis = RedisServer::start();
    let store = connect(&redis);
    reserve(&store, NODE_A, LONG_INTERVAL_US, &[lease(FIELD, 100, 10)]).await;
    let before = snapshot(&redis);

    // Arguments after the key: node id, interval_us, ttl_ms, then triples. The error names
    // the argument that is wrong. The TTL of the valid calls is ten times the one above, so
    // a PEXPIRE by a rejected call shows in the snapshot.
    let cases: [(&str, &[&str], &str); 17] = [
        ("node id with ';'", &["gw;1", "400000", "600000", FIELD, "1", "1"], "invalid node id gw;1"),
        ("node id with ','", &["gw,1", "400000", "600000", FIELD, "1", "1"], "invalid node id gw,1"),
        ("node id with a space", &["gw 1", "400000", "600000", FIELD, "1", "1"], "invalid node id gw 1"),
        ("empty node id", &["", "400000", "600000", FIELD, "1", "1"], "invalid node id"),
        ("no arguments", &[], "invalid node id nil"),
        ("interval 0", &[NODE_B, "0", "600000", FIELD, "1", "1"], "invalid interval 0"),
        ("negative interval", &[NODE_B, "-1", "600000", FIELD, "1", "1"], "invalid interval -1"),
        ("fractional interval", &[NODE_B, "1.5", "600000", FIELD, "1", "1"], "invalid interval 1.5"),
        ("ttl 0", &[NODE_B, "400000", "0", FIELD, "1", "1"], "invalid ttl 0"),
        ("fractional ttl", &[NODE_B, "400000", "1.5", FIELD, "1", "1"], "invalid ttl 1.5"),
        ("no ttl", &[NODE_B, "400000"], "invalid ttl nil"),
        ("negative grant", &[NODE_B, "400000", "600000", FIELD, "-1", "1"], "invalid grant or rate for key"),
        ("fractional grant", &[NODE_B, "400000", "600000", FIELD, "1.5", "1"], "invalid grant or rate for key"),
        ("non-numeric grant", &[NODE_B, "400000", "600000", FIELD, "one", "1"], "invalid grant or rate for key"),
        ("negative rate", &[NODE_B, "400000", "600000", FIELD, "1", "-1"], "invalid grant or rate for key"),
        ("incomplete triple", &[NODE_B, "400000", "600000", FIELD, "1"], "invalid argument count 5"),
        // A valid triple first, so a partial write shows.
        ("second triple invalid", &[NODE_B, "400000", "600000", FIELD, "1", "1", OTHER_FIELD, "1", "x"], "invalid grant or rate for key"),
    ];
    for (case, args, message) in cases {
        let output = eval_reserve_with_cli(&redis, args);
        assert!(output.starts_with(&format!("(error) {message}")), "{case}: expected an error reply {message:?}, got {output:?}");
        assert_eq!(snapshot(&redis), before, "{case}: the call changed the stored leases");
    }
}

#[tokio::test]
async fn reserve_writes_only_leases_sync_reads() {
    let redis = RedisServer::start();
    let store = connect(&redis);

    // Each of these is 1000 (and 7 for the rate) to Lua's tonumber(), but none is a plain
    // decimal integer. reserve.lua must either reject it or store a lease that sync.lua
    // reads as that grant and rate, and that another node's reserve keeps. Every case runs
    // before the check, so a failure lists all the notations that went wrong.
    let cases = [
        ("exponent grant", "1e3", "7"),
        ("fractional-notation grant", "1000.0", "7"),
        ("hexadecimal grant", "0x3e8", "7"),
        ("grant with leading space", " 1000", "7"),
        ("exponent rate", "1000", "7e0"),
        ("negative-exponent rate", "1000", "70e-1"),
    ];
    let mut misread = Vec::new();
    for (index, (case, grant, rate)) in cases.into_iter().enumerate() {
        let field = format!("198.51.100.{index}/32");
        let output = eval_reserve_with_cli(&redis, &[NODE_A, "60000000", "60000", &field, grant, rate]);

        if output.starts_with("(error)") {
            assert_eq!(stored_leases_text(&redis, &field), None, "{case}: the rejected call wrote a lease");
            continue;
        }
        let stored = stored_leases_text(&redis, &field).unwrap_or_else(|| panic!("{case}: reserve replied {output:?} but wrote no lease"));
        let reply = sync(&store, NODE_B, LONG_WINDOW_US, SHORT_SPAN_US, &[delta(&field, 0)]).await;
        // The time is the third part however the grant is written.
        let granted_us: u64 = match stored.split(',').nth(2).map(str::parse) {
            Some(Ok(time_us)) => time_us,
            _ => panic!("{case}: no time in the stored lease {stored:?}"),
        };
        let expected = counts(0, 0, outstanding_by_hand(1000, LONG_INTERVAL_US, reply.now_us - granted_us), 7);
        if reply.counts[0] != expected {
            misread.push(format!("{case}: stored {stored:?}, sync read {:?}, expected {expected:?}", reply.counts[0]));
        }

        reserve(&store, NODE_C, LONG_INTERVAL_US, &[lease(&field, 1, 1)]).await;
        let after_other = stored_leases_text(&redis, &field).unwrap_or_default();
        if !after_other.split(';').any(|entry| entry.starts_with(&format!("{NODE_A},"))) {
            misread.push(format!("{case}: stored {stored:?}, and node C's reserve dropped it, leaving {after_other:?}"));
        }
    }

    assert!(misread.is_empty(), "reserve accepted leases that sync misreads:\n{}", misread.join("\n"));
}

#[tokio::test]
async fn store_reserve_with_bad_node_id_fails() {
    let redis = RedisServer::start();
    let store = connect(&redis);

    let result = store.reserve(&group(LONG_WINDOW_US, "gw;1"), LONG_INTERVAL_US, &[lease(FIELD, 100, 10)]).await;

    assert!(result.is_err(), "expected an error for node id gw;1, got {result:?}");
    assert_eq!(integer_reply(&redis.command("DBSIZE")), 0, "the rejected call wrote keys");
}

#[tokio::test]
async fn reserve_survives_script_flush() {
    let redis = RedisServer::start();
    let store = connect(&redis);
    reserve(&store, NODE_A, LONG_INTERVAL_US, &[lease(FIELD, 100, 10)]).await;

    let flushed = redis.command("SCRIPT FLUSH");
    assert_eq!(flushed, "+OK\r\n", "SCRIPT FLUSH");
    let result = store.reserve(&group(LONG_WINDOW_US, NODE_A), LONG_INTERVAL_US, &[lease(FIELD, 300, 30)]).await;

    assert!(result.is_ok(), "reserve after SCRIPT FLUSH failed: {result:?}");
    let lease_a = stored_lease_of(&redis, FIELD, NODE_A);
    assert_eq!(lease_a.grant, 300, "node A's lease after the second reserve");
}

// gateway_budget fed by the scripts

#[tokio::test]
async fn gateway_budget_from_real_reply_matches_hand() {
    // Powers of two up to 2^20, so the fixed-point weight of the previous window loses
    // nothing and the estimate equals the exact value rounded down.
    const PREVIOUS: u64 = 1024;
    const CURRENT: u64 = 512;
    const LIMIT: u64 = 2000;
    const OTHER_GRANT: u64 = 300;
    const OTHER_RATE: u64 = 900;
    const OWN_RATE: u64 = 300;
    const WINDOW_US: u64 = 500_000;
    // A tick of 200 ms puts the pace cap at 1600. While the next tick falls in the same
    // window, the estimate is at least CURRENT, so the limit leaves at most 1488 and the
    // estimate, not the cap, limits the budget.
    let timing = TickTiming { span_us: SHORT_SPAN_US, interval_us: 200_000 };
    let rule = Rule { id: RULE_ID, limit: LIMIT, fallback_limit: LIMIT, window_ns: WINDOW_US * 1000, ..Default::default() };
    let redis = RedisServer::start();
    let gateway_a = connect(&redis);
    let gateway_b = connect(&redis);

    // Gateway B passed PREVIOUS in one window and CURRENT in the next, and gateway A holds a
    // lease when B syncs the second time.
    let first = sync(&gateway_b, NODE_B, WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, PREVIOUS)]).await;
    wait_for_window(&redis, WINDOW_US, first.window_id + 1);
    reserve(&gateway_a, NODE_A, LONG_INTERVAL_US, &[lease(FIELD, OTHER_GRANT, OTHER_RATE)]).await;
    let reply = sync(&gateway_b, NODE_B, WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, CURRENT)]).await;
    let counts = reply.counts[0];
    let lease_age_us = reply.now_us - stored_lease_of(&redis, FIELD, NODE_A).time_us;

    assert_eq!(reply.window_id, first.window_id + 1, "the second call must land in the next window");
    assert_eq!((counts.current_passed, counts.previous_passed), (CURRENT, PREVIOUS), "counts in {counts:?}");
    assert_eq!(counts.others_outstanding, outstanding_by_hand(OTHER_GRANT, LONG_INTERVAL_US, lease_age_us), "A's lease {lease_age_us} us old");
    assert_eq!(counts.others_rate, OTHER_RATE, "A's rate");

    // By hand: the limit less the estimate at the next tick, capped at PACE times a tick's
    // worth of the limit (rounded up), less what A's lease still allows, shared by rate.
    let next_tick_us = reply.now_us + timing.interval_us;
    let estimate = estimate_at_by_hand(CURRENT, PREVIOUS, reply.window_id, next_tick_us, WINDOW_US);
    let remaining = LIMIT.saturating_sub(estimate);
    let pace = (LIMIT * timing.interval_us * PACE.0).div_ceil(WINDOW_US * PACE.1);
    let fleet_budget = remaining.min(pace).saturating_sub(counts.others_outstanding);
    let expected = fleet_budget * OWN_RATE / (OWN_RATE + OTHER_RATE);
    assert!(remaining < pace, "the estimate {estimate} must limit the budget, not the pace cap {pace}");
    assert!(expected > 0, "the case must leave a budget to share: estimate {estimate}, counts {counts:?}");
    assert_eq!(gateway_budget(&rule, &counts, &reply, timing, OWN_RATE, 0), expected, "estimate {estimate} at the next tick, {counts:?}");
}

// heartbeat.lua

#[tokio::test]
async fn heartbeat_counts_two_nodes() {
    let redis = RedisServer::start();
    let store = connect(&redis);
    let alive = Duration::from_secs(60);

    let first = store.heartbeat("gateway-a", alive).await.unwrap_or_else(|error| panic!("heartbeat failed: {error}"));
    let second = store.heartbeat("gateway-b", alive).await.unwrap_or_else(|error| panic!("heartbeat failed: {error}"));
    let repeated = store.heartbeat("gateway-a", alive).await.unwrap_or_else(|error| panic!("heartbeat failed: {error}"));

    assert_eq!(first, 1);
    assert_eq!(second, 2);
    assert_eq!(repeated, 2, "a node's second heartbeat counts it once");
}

#[tokio::test]
async fn heartbeat_forgets_node_after_alive_time() {
    let redis = RedisServer::start();
    let store = connect(&redis);
    let alive = Duration::from_millis(300);

    let started = Instant::now();
    store.heartbeat("gateway-a", alive).await.unwrap_or_else(|error| panic!("heartbeat failed: {error}"));
    let both = store.heartbeat("gateway-b", alive).await.unwrap_or_else(|error| panic!("heartbeat failed: {error}"));
    assert_eq!(both, 2, "gateway-a counts while it is alive");

    // gateway-b keeps sending heartbeats, and gateway-a must drop out once its alive time
    // has passed.
    let mut alone = 0;
    for _ in 0..100 {
        alone = store.heartbeat("gateway-b", alive).await.unwrap_or_else(|error| panic!("heartbeat failed: {error}"));
        if alone == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dropped_after = started.elapsed();

    assert_eq!(alone, 1, "gateway-a still counted {dropped_after:?} after its last heartbeat");
    // The server's scores have millisecond resolution, so allow 1 ms of rounding.
    assert!(dropped_after + Duration::from_millis(1) >= alive, "gateway-a dropped out after {dropped_after:?}, before its alive time {alive:?}");
}
