//! The fleet-wide count store: Redis, reached through the scripts in `lua/`.
//!
//! Keys are grouped by rule and by a bucket derived from the flow key, and every Redis key of
//! one group carries the group's hash tag, so each script call touches one cluster slot.

use std::{sync::Arc, time::Duration};

use redis::{
    FromRedisValue, Script, ScriptInvocation,
    aio::ConnectionManager,
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
};

/// How many buckets the keys of one rule are spread over. More buckets spread a rule over
/// more cluster slots; fewer mean fewer, larger script calls.
pub const BUCKETS: u32 = 64;

/// Most flow keys sent in one script call, which bounds how long one call runs in Redis.
pub const MAX_KEYS_PER_CALL: usize = 512;

const SYNC_SCRIPT: &str = include_str!("../../lua/sync.lua");
const RESERVE_SCRIPT: &str = include_str!("../../lua/reserve.lua");
const HEARTBEAT_SCRIPT: &str = include_str!("../../lua/heartbeat.lua");

/// Redis key of the sorted set of live gateways.
pub const GATEWAYS_KEY: &str = "limiter:{fleet}:gateways";

/// A failed store call.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis call timed out after {0:?}")]
    Timeout(Duration),
    #[error("redis call failed: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("invalid reply from the sync script: {0}")]
    Reply(String),
}

/// One gateway's report for one key in a tick.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyDelta {
    /// The key as stored in Redis, such as `198.51.100.7/32` or `2001:db8::/64:53`.
    pub field: String,
    pub passed: u64,
}

/// The fleet's view of one key, as sync.lua returns it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FleetCounts {
    /// Packets the fleet passed in the current and the previous window.
    pub current_passed: u64,
    pub previous_passed: u64,
    /// Packets the other gateways' grants still allow them to pass.
    pub others_outstanding: u64,
    /// Offered packets per second the other gateways reported recently.
    pub others_rate: u64,
}

/// A grant this gateway made for one key, recorded as a lease by reserve.lua.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub field: String,
    pub grant: u64,
    /// Offered packets per second this gateway saw for the key in the last tick.
    pub rate: u64,
}

/// Reply of one sync call: the server's clock and the counts of each key, in request order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncReply {
    pub now_us: u64,
    pub window_id: u64,
    pub counts: Vec<FleetCounts>,
}

/// Returns the Redis keys of a (rule, bucket) group: the even and odd window hashes and the
/// leases hash, all with the group's hash tag.
pub fn group_keys(rule_id: u32, bucket: u32) -> [String; 3] {
    let tag = format!("limiter:{{r{rule_id}b{bucket}}}");
    [format!("{tag}:even"), format!("{tag}:odd"), format!("{tag}:leases")]
}

/// Returns the bucket of a flow key's Redis field: FNV-1a, stable across builds and hosts,
/// so every gateway puts a key in the same group.
pub fn bucket_of(field: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in field.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % BUCKETS
}

/// One (rule, bucket) group of keys and what both scripts need to know about it.
#[derive(Clone, Copy, Debug)]
pub struct Group<'a> {
    pub rule_id: u32,
    pub bucket: u32,
    pub window_us: u64,
    /// Time to live of the group's hashes: a few windows.
    pub ttl_ms: u64,
    pub node_id: &'a str,
}

/// The agent's way to Redis: one server or a cluster.
#[derive(Clone)]
enum Backend {
    /// One server, through a connection that reopens itself in the background.
    Single(ConnectionManager),
    /// A Redis Cluster. The redis crate routes each EVALSHA to the node owning the slot of
    /// its first key, follows MOVED and ASK, and sends SCRIPT LOAD to every node.
    Cluster(Arc<LazyCluster>),
}

/// A cluster connection opened on first use, so an agent starts while the cluster is down.
struct LazyCluster {
    client: ClusterClient,
    connection: tokio::sync::OnceCell<ClusterConnection>,
}

/// A connection to Redis with the scripts loaded on demand.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    sync_script: Script,
    reserve_script: Script,
    heartbeat_script: Script,
    timeout: Duration,
}

impl Store {
    /// Connects lazily: the first call opens the connection, and a lost connection is
    /// reopened, so an agent can start while Redis is down. With `cluster`, `urls` are seed
    /// nodes of a Redis Cluster; without it, `urls` must name exactly one server.
    pub fn connect(urls: &[String], cluster: bool, timeout: Duration) -> anyhow::Result<Self> {
        let backend = if cluster {
            let client = redis::cluster::ClusterClientBuilder::new(urls.to_vec())
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(1)
                .build()
                .map_err(|error| {
                    anyhow::anyhow!("invalid Redis Cluster URLs: {error}; expected redis://host:port of one or more nodes")
                })?;
            Backend::Cluster(Arc::new(LazyCluster { client, connection: tokio::sync::OnceCell::new() }))
        } else {
            let [url] = urls else {
                anyhow::bail!(
                    "{} Redis URLs given for a single server: pass one URL, or add --redis-cluster for a cluster",
                    urls.len()
                );
            };
            let client = redis::Client::open(url.as_str()).map_err(|error| {
                anyhow::anyhow!("invalid Redis URL: {error}; expected redis://[user:password@]host:port[/db]")
            })?;
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1);
            Backend::Single(ConnectionManager::new_lazy_with_config(client, config)?)
        };
        Ok(Self {
            backend,
            sync_script: Script::new(SYNC_SCRIPT),
            reserve_script: Script::new(RESERVE_SCRIPT),
            heartbeat_script: Script::new(HEARTBEAT_SCRIPT),
            timeout,
        })
    }

    /// Runs a script invocation within the store's timeout. `invoke_async` sends EVALSHA
    /// and, on NOSCRIPT (a restarted or failed-over node), loads the script and retries once.
    async fn invoke<T: FromRedisValue>(&self, invocation: &ScriptInvocation<'_>) -> Result<T, StoreError> {
        let call = async {
            match &self.backend {
                Backend::Single(connection) => invocation.invoke_async(&mut connection.clone()).await,
                Backend::Cluster(cluster) => {
                    let connection =
                        cluster.connection.get_or_try_init(|| cluster.client.get_async_connection()).await?;
                    invocation.invoke_async(&mut connection.clone()).await
                }
            }
        };
        Ok(tokio::time::timeout(self.timeout, call).await.map_err(|_| StoreError::Timeout(self.timeout))??)
    }

    /// Adds `deltas` of one (rule, bucket) group, counted over the last `span_us`, and
    /// returns the fleet's counts and the other gateways' leases.
    ///
    pub async fn sync(&self, group: &Group<'_>, span_us: u64, deltas: &[KeyDelta]) -> Result<SyncReply, StoreError> {
        let [even, odd, leases] = group_keys(group.rule_id, group.bucket);
        let mut invocation = self.sync_script.key(even);
        invocation.key(odd).key(leases).arg(group.window_us).arg(group.ttl_ms).arg(span_us.max(1)).arg(group.node_id);
        for delta in deltas {
            invocation.arg(&delta.field).arg(delta.passed);
        }
        let reply: Vec<i64> = self.invoke(&invocation).await?;
        parse_sync_reply(&reply, deltas.len())
    }

    /// Records this gateway's new grants of one group as leases.
    pub async fn reserve(&self, group: &Group<'_>, interval_us: u64, leases: &[Lease]) -> Result<(), StoreError> {
        let [_, _, leases_key] = group_keys(group.rule_id, group.bucket);
        let mut invocation = self.reserve_script.key(leases_key);
        invocation.arg(group.node_id).arg(interval_us.max(1)).arg(group.ttl_ms);
        for lease in leases {
            invocation.arg(&lease.field).arg(lease.grant).arg(lease.rate);
        }
        let written: i64 = self.invoke(&invocation).await?;
        if written != leases.len() as i64 {
            return Err(StoreError::Reply(format!("reserve wrote {written} leases, expected {}", leases.len())));
        }
        Ok(())
    }

    /// Records this gateway as alive and returns the number of gateways alive.
    pub async fn heartbeat(&self, node_id: &str, alive: Duration) -> Result<u64, StoreError> {
        let mut invocation = self.heartbeat_script.key(GATEWAYS_KEY);
        invocation.arg(node_id).arg(alive.as_millis().max(1) as u64);
        let count: i64 = self.invoke(&invocation).await?;
        u64::try_from(count)
            .ok()
            .filter(|count| *count >= 1)
            .ok_or_else(|| StoreError::Reply(format!("heartbeat returned {count} gateways, expected at least 1")))
    }
}

/// Checks the shape of a sync reply. A reply that does not match the request is an error,
/// never read as zero counts, because zero would mean "under the limit".
pub fn parse_sync_reply(reply: &[i64], keys: usize) -> Result<SyncReply, StoreError> {
    let expected = 2 + 4 * keys;
    if reply.len() != expected {
        return Err(StoreError::Reply(format!("{} integers for {keys} keys, expected {expected}", reply.len())));
    }
    let non_negative = |value: i64, what: &str| {
        u64::try_from(value).map_err(|_| StoreError::Reply(format!("negative {what}: {value}")))
    };
    let now_us = non_negative(reply[0], "time")?;
    let window_id = non_negative(reply[1], "window id")?;
    let counts = reply[2..]
        .chunks_exact(4)
        .map(|chunk| {
            Ok(FleetCounts {
                current_passed: non_negative(chunk[0], "count")?,
                previous_passed: non_negative(chunk[1], "count")?,
                others_outstanding: non_negative(chunk[2], "outstanding grant")?,
                others_rate: non_negative(chunk[3], "rate")?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(SyncReply { now_us, window_id, counts })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_keys_share_hash_tag() {
        let [even, odd, leases] = group_keys(3, 17);
        assert_eq!(even, "limiter:{r3b17}:even");
        assert_eq!(odd, "limiter:{r3b17}:odd");
        assert_eq!(leases, "limiter:{r3b17}:leases");
    }

    #[test]
    fn bucket_is_stable_and_in_range() {
        assert_eq!(bucket_of("198.51.100.7/32"), bucket_of("198.51.100.7/32"));
        let buckets: std::collections::HashSet<u32> =
            (0..1000).map(|i| bucket_of(&format!("198.18.{}.{}/32", i / 256, i % 256))).collect();
        assert!(buckets.iter().all(|bucket| *bucket < BUCKETS));
        assert_eq!(buckets.len(), BUCKETS as usize, "1000 keys should reach every bucket");
    }

    #[test]
    fn sync_reply_parses_counts() {
        let reply = parse_sync_reply(&[5_000_000, 5, 10, 20, 30, 40], 1).unwrap();
        assert_eq!(reply.now_us, 5_000_000);
        assert_eq!(reply.window_id, 5);
        assert_eq!(
            reply.counts,
            vec![FleetCounts { current_passed: 10, previous_passed: 20, others_outstanding: 30, others_rate: 40 }]
        );
    }

    #[test]
    fn sync_reply_rejects_wrong_length() {
        assert!(matches!(parse_sync_reply(&[1, 2, 3], 1), Err(StoreError::Reply(_))));
        assert!(matches!(parse_sync_reply(&[1, 2, 0, 0, 0, 0, 0], 1), Err(StoreError::Reply(_))));
    }

    #[test]
    fn sync_reply_rejects_negative_counts() {
        assert!(matches!(parse_sync_reply(&[1, 2, -1, 0, 0, 0], 1), Err(StoreError::Reply(_))));
    }
}
