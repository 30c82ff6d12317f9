//! The Lua scripts against a real redis-server: sync.lua through `Store::sync` (and through
//! redis-cli for calls the agent never makes), heartbeat.lua through `Store::heartbeat`.
//!
//! Each test starts its own redis-server, so tests run in parallel without sharing keys.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use limiter_common::{SlidingWindow, window};
use limiter_tests::{RedisServer, wait_until};
use limiter_user::store::{FleetCounts, KeyDelta, Store, SyncReply, group_keys};

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
const FIELD: &str = "198.51.100.0/24";
const SYNC_SCRIPT_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../lua/sync.lua");

fn connect(redis: &RedisServer) -> Store {
    Store::connect(&redis.url(), Duration::from_secs(5))
        .unwrap_or_else(|error| panic!("failed to create a store for {}: {error:#}", redis.url()))
}

fn delta(field: &str, passed: u64, offered: u64) -> KeyDelta {
    KeyDelta { field: field.to_owned(), passed, offered }
}

async fn sync(store: &Store, window_us: u64, span_us: u64, deltas: &[KeyDelta]) -> SyncReply {
    store
        .sync(RULE_ID, BUCKET, window_us, TTL_MS, span_us, deltas)
        .await
        .unwrap_or_else(|error| panic!("sync of {deltas:?} with window {window_us} us failed: {error}"))
}

fn counts(current_passed: u64, previous_passed: u64, current_offered: u64, previous_offered: u64) -> FleetCounts {
    FleetCounts { current_passed, previous_passed, current_offered, previous_offered }
}

/// Returns the Redis key that contains the counts of window `window_id`.
fn key_of_window(window_id: u64) -> String {
    let [even, odd] = group_keys(RULE_ID, BUCKET);
    if window_id.is_multiple_of(2) { even } else { odd }
}

/// Returns the value of a RESP integer reply such as `:42\r\n`.
fn integer_reply(reply: &str) -> i64 {
    reply
        .strip_prefix(':')
        .and_then(|rest| rest.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("expected an integer reply, got {reply:?}"))
}

/// Returns the text of a RESP bulk string reply such as `$2\r\n42\r\n`.
fn bulk_reply(reply: &str) -> &str {
    match reply.strip_prefix('$').and_then(|rest| rest.split("\r\n").nth(1)) {
        Some(text) => text,
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

/// Waits until the server's clock is in window `window_id` of `window_us` or a later one.
fn wait_for_window(redis: &RedisServer, window_us: u64, window_id: u64) {
    wait_until(&format!("server window {window_id}"), Duration::from_secs(5), || {
        server_time_us(redis) / window_us >= window_id
    });
}

/// Returns both hashes of the test group and the number of keys, as raw replies.
fn snapshot(redis: &RedisServer) -> String {
    let [even, odd] = group_keys(RULE_ID, BUCKET);
    format!("{}{}{}", redis.command(&format!("HGETALL {even}")), redis.command(&format!("HGETALL {odd}")), redis.command("DBSIZE"))
}

/// Sends sync.lua with EVAL through redis-cli, with the test group's keys and `args`, and
/// returns what redis-cli printed. An error reply starts with "(error)".
fn eval_sync_with_cli(redis: &RedisServer, args: &[&str]) -> String {
    let [even, odd] = group_keys(RULE_ID, BUCKET);
    let output = Command::new("redis-cli")
        .args(["--no-raw", "-p", &redis.port.to_string(), "--eval", SYNC_SCRIPT_PATH, &even, &odd, ","])
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("failed to start redis-cli (is it installed?): {error}"));
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// Returns the estimate by hand: `current + previous * (1 - elapsed / window)`, rounded down.
fn estimate_by_hand(current: u64, previous: u64, elapsed_us: u64, window_us: u64) -> u64 {
    let time_left = u128::from(window_us - elapsed_us);
    current + (u128::from(previous) * time_left / u128::from(window_us)) as u64
}

// sync.lua

#[tokio::test]
async fn sync_adds_deltas_from_two_gateways() {
    let redis = RedisServer::start();
    let gateway_a = connect(&redis);
    let gateway_b = connect(&redis);

    let reply_a = sync(&gateway_a, LONG_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 5, 7), delta("203.0.113.9/32", 1, 1)]).await;
    let reply_b = sync(&gateway_b, LONG_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 3, 10)]).await;

    assert_eq!(reply_a.window_id, reply_b.window_id, "both calls must land in one window");
    assert_eq!(reply_a.counts, vec![counts(5, 0, 7, 0), counts(1, 0, 1, 0)]);
    assert_eq!(reply_b.counts, vec![counts(8, 0, 17, 0)]);
    let stored = redis.command(&format!("HGET {} p:{FIELD}", key_of_window(reply_b.window_id)));
    assert_eq!(bulk_reply(&stored), "8", "passed count stored in the current window's hash");
}

#[tokio::test]
async fn sync_reports_previous_window_counts() {
    let redis = RedisServer::start();
    let store = connect(&redis);

    let first = sync(&store, SHORT_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 4, 6)]).await;
    wait_for_window(&redis, SHORT_WINDOW_US, first.window_id + 1);
    let second = sync(&store, SHORT_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 2, 3)]).await;

    assert_eq!(second.window_id, first.window_id + 1, "the second call must land in the next window");
    assert_eq!(second.counts, vec![counts(2, 4, 3, 6)]);
}

#[tokio::test]
async fn sync_reads_two_windows_back_as_zero() {
    let redis = RedisServer::start();
    let store = connect(&redis);

    let first = sync(&store, SHORT_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 4, 6)]).await;
    wait_for_window(&redis, SHORT_WINDOW_US, first.window_id + 2);
    let later = sync(&store, SHORT_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 2, 3)]).await;

    assert!(later.window_id >= first.window_id + 2, "window {} is not two after {}", later.window_id, first.window_id);
    assert_eq!(later.counts, vec![counts(2, 0, 3, 0)]);
}

#[tokio::test]
async fn sync_reads_stale_previous_hash_as_zero() {
    let redis = RedisServer::start();
    let store = connect(&redis);

    // Both hashes get counts. Three windows on, the hash of the previous window's parity
    // still contains an older window, which must not be read as the previous one.
    let first = sync(&store, SHORT_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 4, 6)]).await;
    wait_for_window(&redis, SHORT_WINDOW_US, first.window_id + 1);
    let second = sync(&store, SHORT_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 2, 3)]).await;
    wait_for_window(&redis, SHORT_WINDOW_US, first.window_id + 3);
    let later = sync(&store, SHORT_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 1, 1)]).await;

    assert_eq!(second.window_id, first.window_id + 1, "the second call must land in the next window");
    assert!(later.window_id >= first.window_id + 3, "window {} is not three after {}", later.window_id, first.window_id);
    assert_eq!(later.counts, vec![counts(1, 0, 1, 0)]);
}

#[tokio::test]
async fn sync_sets_ttl_on_both_hashes() {
    let redis = RedisServer::start();
    let store = connect(&redis);

    let first = sync(&store, SHORT_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 4, 6)]).await;
    wait_for_window(&redis, SHORT_WINDOW_US, first.window_id + 1);
    let second = sync(&store, SHORT_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 2, 3)]).await;

    assert_ne!(key_of_window(first.window_id), key_of_window(second.window_id), "the calls must use both hashes");
    for key in group_keys(RULE_ID, BUCKET) {
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
        let reply = sync(&store, window_us, SHORT_SPAN_US, &[delta(FIELD, 1, 1)]).await;
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
    sync(&store, LONG_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 4, 6)]).await;
    let before = snapshot(&redis);

    // Arguments after the two keys: window_us, ttl_ms, span_us, then triples. The error
    // names the argument that is wrong.
    let cases: [(&str, &[&str], &str); 9] = [
        ("window 0", &["0", "60000", "1", FIELD, "1", "1"], "invalid window length 0"),
        ("fractional window", &["1.5", "60000", "1", FIELD, "1", "1"], "invalid window length 1.5"),
        ("ttl 0", &["3600000000", "0", "1", FIELD, "1", "1"], "invalid ttl 0"),
        ("span 0", &["3600000000", "60000", "0", FIELD, "1", "1"], "invalid span 0"),
        ("negative passed delta", &["3600000000", "60000", "1", FIELD, "-1", "1"], "invalid deltas for key"),
        ("negative offered delta", &["3600000000", "60000", "1", FIELD, "1", "-1"], "invalid deltas for key"),
        ("non-numeric delta", &["3600000000", "60000", "1", FIELD, "one", "1"], "invalid deltas for key"),
        ("incomplete triple", &["3600000000", "60000", "1", FIELD, "1"], "invalid argument count 5"),
        ("no span", &["3600000000", "60000"], "invalid span nil"),
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
    sync(&store, LONG_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 4, 6)]).await;
    let before = snapshot(&redis);

    // A valid triple first, so a partial write shows.
    let output = eval_sync_with_cli(&redis, &["3600000000", "60000", "1", FIELD, "1", "1", "203.0.113.9/32", "1.5", "0"]);

    assert!(output.starts_with("(error)"), "expected an error reply, got {output:?}");
    assert_eq!(snapshot(&redis), before, "the rejected call changed the stored counts");
}

#[tokio::test]
async fn sync_rejects_fractional_ttl_without_writing() {
    let redis = RedisServer::start();
    let store = connect(&redis);
    sync(&store, LONG_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 4, 6)]).await;
    let before = snapshot(&redis);

    let output = eval_sync_with_cli(&redis, &["3600000000", "1.5", "1", FIELD, "1", "1"]);

    assert!(output.starts_with("(error)"), "expected an error reply, got {output:?}");
    assert_eq!(snapshot(&redis), before, "the rejected call changed the stored counts");
}

#[tokio::test]
async fn store_sync_with_zero_window_fails() {
    let redis = RedisServer::start();
    let store = connect(&redis);

    let result = store.sync(RULE_ID, BUCKET, 0, TTL_MS, SHORT_SPAN_US, &[delta(FIELD, 1, 1)]).await;

    assert!(result.is_err(), "expected an error for window 0, got {result:?}");
    assert_eq!(integer_reply(&redis.command("DBSIZE")), 0, "the rejected call wrote keys");
}

#[tokio::test]
async fn sync_survives_script_flush() {
    let redis = RedisServer::start();
    let store = connect(&redis);
    let first = sync(&store, LONG_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 4, 6)]).await;

    let flushed = redis.command("SCRIPT FLUSH");
    assert_eq!(flushed, "+OK\r\n", "SCRIPT FLUSH");
    let second = store.sync(RULE_ID, BUCKET, LONG_WINDOW_US, TTL_MS, SHORT_SPAN_US, &[delta(FIELD, 2, 3)]).await;

    let second = second.unwrap_or_else(|error| panic!("sync after SCRIPT FLUSH failed: {error}"));
    assert_eq!(second.window_id, first.window_id, "both calls must land in one window");
    assert_eq!(second.counts, vec![counts(6, 0, 9, 0)]);
}

#[tokio::test]
async fn sync_splits_delta_across_window_start() {
    const PASSED: u64 = 1000;
    const OFFERED: u64 = 3000;
    let redis = RedisServer::start();
    let store = connect(&redis);

    // A span of a whole window always reaches back across the window's start.
    let span_us = SHORT_WINDOW_US;
    let reply = sync(&store, SHORT_WINDOW_US, span_us, &[delta(FIELD, PASSED, OFFERED)]).await;
    let elapsed_us = reply.now_us - reply.window_id * SHORT_WINDOW_US;

    // By hand: the part of the span before the window start, in proportion, rounded down.
    let before_us = u128::from(span_us - elapsed_us);
    let passed_before = (u128::from(PASSED) * before_us / u128::from(span_us)) as u64;
    let offered_before = (u128::from(OFFERED) * before_us / u128::from(span_us)) as u64;
    assert_eq!(reply.counts, vec![counts(PASSED - passed_before, passed_before, OFFERED - offered_before, offered_before)]);
    assert_eq!(window::part_before_window(PASSED, span_us, elapsed_us), passed_before, "agent's split of passed");
    assert_eq!(window::part_before_window(OFFERED, span_us, elapsed_us), offered_before, "agent's split of offered");
}

#[tokio::test]
async fn sync_estimate_matches_hand_computation() {
    // A power of two up to 2^20: the 20-bit fixed-point weight of the previous window then
    // loses nothing, so the agent's estimate must equal the exact value rounded down.
    const PREVIOUS: u64 = 1024;
    const CURRENT: u64 = 10;
    let redis = RedisServer::start();
    let store = connect(&redis);

    let first = sync(&store, SHORT_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, PREVIOUS, PREVIOUS)]).await;
    let window_id = first.window_id + 1;
    wait_for_window(&redis, SHORT_WINDOW_US, window_id);
    let mut replies = vec![sync(&store, SHORT_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, CURRENT, CURRENT)]).await];
    // Zero deltas read the counts again at later points of the same window.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        replies.push(sync(&store, SHORT_WINDOW_US, SHORT_SPAN_US, &[delta(FIELD, 0, 0)]).await);
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
