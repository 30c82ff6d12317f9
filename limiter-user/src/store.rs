//! The fleet-wide count store: Redis, reached through the scripts in `lua/`.
//!
//! Keys are grouped by rule and by a bucket derived from the flow key, and every Redis key of
//! one group carries the group's hash tag, so each script call touches one cluster slot.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use redis::{
    FromRedisValue, Script, ServerErrorKind,
    aio::{ConnectionLike, MultiplexedConnection},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
};

/// How many buckets the keys of one rule are spread over. More buckets spread a rule over
/// more cluster slots, so over more masters; fewer mean fewer, larger script calls. With 16,
/// a tick of 10,000 keys makes 32 calls of sync and reserve each, and a rule's keys can
/// reach at most 16 masters of a cluster. Every agent of a fleet must use the same count,
/// because it is part of the Redis key names.
pub const BUCKETS: u32 = 16;

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

/// Kind of a failed store call, as `limiter status` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// No reply within the call's timeout: a hung connection, a black-holed route, or a
    /// server busy with a slow command.
    Timeout,
    /// No usable connection: refused, reset, TLS handshake or credentials rejected, a
    /// cluster without a node for the slot, or a server still loading its data.
    Connection,
    /// Redis replied, but with an error from the script or a reply of the wrong shape.
    Script,
}

impl FailureKind {
    /// Returns true for failures that mean Redis is out of reach, which the circuit breaker
    /// counts. A script error comes from a reachable Redis, and backing off would not fix it.
    pub fn is_unreachable(self) -> bool {
        matches!(self, Self::Timeout | Self::Connection)
    }
}

impl StoreError {
    pub fn kind(&self) -> FailureKind {
        match self {
            Self::Timeout(_) => FailureKind::Timeout,
            Self::Reply(_) => FailureKind::Script,
            Self::Redis(error) if error.is_timeout() => FailureKind::Timeout,
            Self::Redis(error) if is_connection_failure(error) => FailureKind::Connection,
            Self::Redis(_) => FailureKind::Script,
        }
    }

    /// Returns true when Redis rejected this agent's user name or password.
    pub fn is_rejected_credentials(&self) -> bool {
        match self {
            Self::Redis(error) => is_rejected_credentials(error),
            Self::Timeout(_) | Self::Reply(_) => false,
        }
    }
}

fn is_rejected_credentials(error: &redis::RedisError) -> bool {
    error.kind() == redis::ErrorKind::AuthenticationFailed || matches!(error.code(), Some("NOAUTH" | "WRONGPASS"))
}

fn is_connection_failure(error: &redis::RedisError) -> bool {
    use redis::ErrorKind;
    is_rejected_credentials(error)
        || error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || matches!(
            error.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                )
        )
}

/// Store calls that failed, by kind, and scripts loaded again after NOSCRIPT, since the
/// agent started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreCounters {
    pub timeouts: u64,
    pub connection_errors: u64,
    pub script_errors: u64,
    /// EVALSHA calls that returned NOSCRIPT (after a restart, a failover or `SCRIPT FLUSH`),
    /// after which the script was loaded and the call sent again. Not failures.
    pub noscript_reloads: u64,
}

impl StoreCounters {
    /// Returns the calls that failed because Redis was out of reach.
    pub fn unreachable(&self) -> u64 {
        self.timeouts.saturating_add(self.connection_errors)
    }
}

#[derive(Default)]
struct AtomicCounters {
    timeouts: AtomicU64,
    connection_errors: AtomicU64,
    script_errors: AtomicU64,
    noscript_reloads: AtomicU64,
}

/// State of the circuit breaker in front of the store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Every tick calls Redis.
    #[default]
    Closed,
    /// Redis failed on consecutive ticks: ticks skip it until the next probe.
    Open,
    /// This tick probes Redis with one heartbeat call; success closes the breaker.
    HalfOpen,
}

/// A change of breaker state worth one log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerTransition {
    /// Closed to open: Redis is out of reach.
    Opened,
    /// Half-open to closed: a probe reached Redis again.
    Closed,
}

/// A circuit breaker counted in ticks of the agent.
///
/// Closed, it opens after `failure_threshold` consecutive ticks in which Redis was out of
/// reach. Open, it lets one tick in every backoff probe Redis (half-open). The backoff
/// starts at one tick and doubles up to `max_backoff_ticks`, so reconciliation resumes at
/// most that many ticks after Redis returns. A successful probe closes the breaker, and a
/// failed one opens it again.
#[derive(Clone, Debug)]
pub struct CircuitBreaker {
    state: BreakerState,
    failure_threshold: u32,
    max_backoff_ticks: u32,
    consecutive_failures: u32,
    backoff_ticks: u32,
    ticks_until_probe: u32,
    openings: u64,
}

impl CircuitBreaker {
    pub fn new(failure_threshold: u32, max_backoff_ticks: u32) -> Self {
        Self {
            state: BreakerState::Closed,
            failure_threshold: failure_threshold.max(1),
            max_backoff_ticks: max_backoff_ticks.max(1),
            consecutive_failures: 0,
            backoff_ticks: 1,
            ticks_until_probe: 0,
            openings: 0,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Times the breaker went from closed to open.
    pub fn openings(&self) -> u64 {
        self.openings
    }

    /// Starts a tick: returns whether it may call Redis. An open breaker whose backoff has
    /// run out turns half-open and admits the tick as a probe.
    pub fn admit_tick(&mut self) -> bool {
        match self.state {
            BreakerState::Closed | BreakerState::HalfOpen => true,
            BreakerState::Open if self.ticks_until_probe > 0 => {
                self.ticks_until_probe -= 1;
                false
            }
            BreakerState::Open => {
                self.state = BreakerState::HalfOpen;
                true
            }
        }
    }

    /// Records a tick that reached Redis.
    pub fn record_success(&mut self) -> Option<BreakerTransition> {
        self.consecutive_failures = 0;
        self.backoff_ticks = 1;
        let was = std::mem::replace(&mut self.state, BreakerState::Closed);
        (was != BreakerState::Closed).then_some(BreakerTransition::Closed)
    }

    /// Records a tick in which Redis was out of reach.
    pub fn record_failure(&mut self) -> Option<BreakerTransition> {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        match self.state {
            BreakerState::Closed if self.consecutive_failures < self.failure_threshold => None,
            BreakerState::Closed => {
                self.openings += 1;
                self.open();
                Some(BreakerTransition::Opened)
            }
            BreakerState::Open | BreakerState::HalfOpen => {
                self.backoff_ticks = (self.backoff_ticks * 2).min(self.max_backoff_ticks);
                self.open();
                None
            }
        }
    }

    fn open(&mut self) {
        self.state = BreakerState::Open;
        // A backoff of one tick probes on the next tick; of two, on every other tick.
        self.ticks_until_probe = self.backoff_ticks - 1;
    }
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
enum Backend {
    /// One server, through one multiplexed connection that the store opens on first use and
    /// drops after a timeout or connection error, so the next call opens a fresh one. Kept
    /// after a timeout, a connection whose packets were dropped would resume only at TCP's
    /// next retransmission, seconds after the route came back.
    Single { client: redis::Client, connection: tokio::sync::Mutex<Option<(u64, MultiplexedConnection)>> },
    /// A Redis Cluster. The redis crate routes each EVALSHA to the node owning the slot of
    /// its first key, follows MOVED and ASK, and sends SCRIPT LOAD to every node.
    // NOTE: unlike the single server's, the cluster connection is kept after timeouts, so a
    // node whose packets were dropped for a while may reply again only at TCP's next
    // retransmission. No test covers a black-holed cluster node.
    Cluster { client: ClusterClient, connection: tokio::sync::OnceCell<ClusterConnection> },
}

/// State shared by every clone of a [`Store`].
struct Shared {
    backend: Backend,
    counters: AtomicCounters,
    /// Serial number of the single server's current connection.
    connections_opened: AtomicU64,
    /// End of the current tick's time for store calls, set by the agent; no call waits past it.
    deadline: Mutex<Option<Instant>>,
}

/// A connection to Redis with the scripts loaded on demand.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
    sync_script: Script,
    reserve_script: Script,
    heartbeat_script: Script,
    timeout: Duration,
}

impl Store {
    /// Connects lazily: the first call opens the connection, and a lost connection is
    /// reopened, so an agent can start while Redis is down. With `cluster`, `urls` are seed
    /// nodes of a Redis Cluster; without it, `urls` must name exactly one server.
    /// `root_certificates` (PEM) replace the system's trusted roots for `rediss://` URLs.
    pub fn connect(
        urls: &[String],
        cluster: bool,
        timeout: Duration,
        root_certificates: Option<Vec<u8>>,
    ) -> anyhow::Result<Self> {
        let certificates =
            root_certificates.map(|root_cert| redis::TlsCertificates { client_tls: None, root_cert: Some(root_cert) });
        let backend = if cluster {
            let mut builder = redis::cluster::ClusterClientBuilder::new(urls.to_vec())
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(1);
            if let Some(certificates) = certificates {
                builder = builder.certs(certificates);
            }
            let client = builder.build().map_err(|error| {
                anyhow::anyhow!("invalid Redis Cluster URLs: {error}; expected redis://host:port of one or more nodes")
            })?;
            Backend::Cluster { client, connection: tokio::sync::OnceCell::new() }
        } else {
            let [url] = urls else {
                anyhow::bail!(
                    "{} Redis URLs given for a single server: pass one URL, or add --redis-cluster for a cluster",
                    urls.len()
                );
            };
            let client = match certificates {
                Some(certificates) => redis::Client::build_with_tls(url.as_str(), certificates),
                None => redis::Client::open(url.as_str()),
            }
            .map_err(|error| {
                anyhow::anyhow!(
                    "invalid Redis URL or CA certificate: {error}; expected redis://[user:password@]host:port[/db], \
                     or rediss:// with --redis-ca"
                )
            })?;
            Backend::Single { client, connection: tokio::sync::Mutex::new(None) }
        };
        Ok(Self {
            shared: Arc::new(Shared {
                backend,
                counters: AtomicCounters::default(),
                connections_opened: AtomicU64::new(0),
                deadline: Mutex::new(None),
            }),
            sync_script: Script::new(SYNC_SCRIPT),
            reserve_script: Script::new(RESERVE_SCRIPT),
            heartbeat_script: Script::new(HEARTBEAT_SCRIPT),
            timeout,
        })
    }

    /// Returns the failed calls and NOSCRIPT reloads counted since the store was created.
    pub fn counters(&self) -> StoreCounters {
        let counters = &self.shared.counters;
        StoreCounters {
            timeouts: counters.timeouts.load(Ordering::Relaxed),
            connection_errors: counters.connection_errors.load(Ordering::Relaxed),
            script_errors: counters.script_errors.load(Ordering::Relaxed),
            noscript_reloads: counters.noscript_reloads.load(Ordering::Relaxed),
        }
    }

    /// Makes every call until `deadline` end by then, whatever the store's timeout leaves;
    /// `None` leaves only the timeout.
    pub fn set_deadline(&self, deadline: Option<Instant>) {
        *self.shared.deadline.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = deadline;
    }

    /// Sends PING, to check the URL and credentials before the first tick.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let budget = self.call_budget();
        let mut generation = None;
        let call = async {
            let reply: String = match &self.shared.backend {
                Backend::Single { client, connection } => {
                    let (serial, mut connection) = self.single_connection(client, connection).await?;
                    generation = Some(serial);
                    redis::cmd("PING").query_async(&mut connection).await?
                }
                Backend::Cluster { client, connection } => {
                    let connection = connection.get_or_try_init(|| client.get_async_connection()).await?;
                    redis::cmd("PING").query_async(&mut connection.clone()).await?
                }
            };
            Ok::<_, StoreError>(reply)
        };
        let outcome = tokio::time::timeout(budget, call).await.unwrap_or(Err(StoreError::Timeout(budget)));
        self.record(outcome.as_ref().err(), generation);
        outcome.map(|_| ())
    }

    /// Returns the time a call may take now: the store's timeout, cut to the deadline.
    fn call_budget(&self) -> Duration {
        let deadline = *self.shared.deadline.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match deadline {
            Some(deadline) => self.timeout.min(deadline.saturating_duration_since(Instant::now())),
            None => self.timeout,
        }
    }

    /// Returns the single server's connection and its serial number, opening one if there is
    /// none. Concurrent callers wait for one connection attempt.
    async fn single_connection(
        &self,
        client: &redis::Client,
        slot: &tokio::sync::Mutex<Option<(u64, MultiplexedConnection)>>,
    ) -> Result<(u64, MultiplexedConnection), StoreError> {
        let mut slot = slot.lock().await;
        if let Some((serial, connection)) = slot.as_ref() {
            return Ok((*serial, connection.clone()));
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let opened = client.get_multiplexed_async_connection_with_config(&config).await?;
        let serial = self.shared.connections_opened.fetch_add(1, Ordering::Relaxed) + 1;
        *slot = Some((serial, opened.clone()));
        Ok((serial, opened))
    }

    /// Counts a failed call, and drops the single server's connection `generation` after a
    /// timeout or connection error so the next call opens a new one.
    fn record(&self, error: Option<&StoreError>, generation: Option<u64>) {
        let Some(error) = error else { return };
        let counters = &self.shared.counters;
        let kind = error.kind();
        match kind {
            FailureKind::Timeout => counters.timeouts.fetch_add(1, Ordering::Relaxed),
            FailureKind::Connection => counters.connection_errors.fetch_add(1, Ordering::Relaxed),
            FailureKind::Script => counters.script_errors.fetch_add(1, Ordering::Relaxed),
        };
        if !kind.is_unreachable() {
            return;
        }
        if let (Backend::Single { connection, .. }, Some(generation)) = (&self.shared.backend, generation) {
            // A call still waiting for the connection lock finds a newer connection, or none;
            // either way it has nothing of this one's to drop.
            if let Ok(mut slot) = connection.try_lock()
                && slot.as_ref().is_some_and(|(serial, _)| *serial == generation)
            {
                *slot = None;
            }
        }
    }

    /// Runs a script within the call budget: EVALSHA, and on NOSCRIPT (a restarted or
    /// failed-over node, or `SCRIPT FLUSH`) SCRIPT LOAD and EVALSHA once more, counting the
    /// reload.
    pub(crate) async fn invoke<T: FromRedisValue>(&self, script: &Script, command: &redis::Cmd) -> Result<T, StoreError> {
        let budget = self.call_budget();
        let mut generation = None;
        let call = async {
            match &self.shared.backend {
                Backend::Single { client, connection } => {
                    let (serial, mut connection) = self.single_connection(client, connection).await?;
                    generation = Some(serial);
                    self.evalsha(script, command, &mut connection).await
                }
                Backend::Cluster { client, connection } => {
                    let connection = connection.get_or_try_init(|| client.get_async_connection()).await?;
                    self.evalsha(script, command, &mut connection.clone()).await
                }
            }
        };
        let outcome = tokio::time::timeout(budget, call).await.unwrap_or(Err(StoreError::Timeout(budget)));
        self.record(outcome.as_ref().err(), generation);
        outcome
    }

    async fn evalsha<T: FromRedisValue>(
        &self,
        script: &Script,
        command: &redis::Cmd,
        connection: &mut impl ConnectionLike,
    ) -> Result<T, StoreError> {
        match command.query_async(connection).await {
            Err(error) if error.kind() == redis::ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.shared.counters.noscript_reloads.fetch_add(1, Ordering::Relaxed);
                script.load_async(connection).await?;
                Ok(command.query_async(connection).await?)
            }
            outcome => Ok(outcome?),
        }
    }

    /// Adds `deltas` of one (rule, bucket) group, counted over the last `span_us`, and
    /// returns the fleet's counts and the other gateways' leases.
    pub async fn sync(&self, group: &Group<'_>, span_us: u64, deltas: &[KeyDelta]) -> Result<SyncReply, StoreError> {
        let mut command = evalsha_command(&self.sync_script, &group_keys(group.rule_id, group.bucket));
        command.arg(group.window_us).arg(group.ttl_ms).arg(span_us.max(1)).arg(group.node_id);
        for delta in deltas {
            command.arg(&delta.field).arg(delta.passed);
        }
        let reply: Vec<i64> = self.invoke(&self.sync_script, &command).await?;
        parse_sync_reply(&reply, deltas.len())
    }

    /// Records this gateway's new grants of one group as leases.
    pub async fn reserve(&self, group: &Group<'_>, interval_us: u64, leases: &[Lease]) -> Result<(), StoreError> {
        let [_, _, leases_key] = group_keys(group.rule_id, group.bucket);
        let mut command = evalsha_command(&self.reserve_script, &[leases_key]);
        command.arg(group.node_id).arg(interval_us.max(1)).arg(group.ttl_ms);
        for lease in leases {
            command.arg(&lease.field).arg(lease.grant).arg(lease.rate);
        }
        let written: i64 = self.invoke(&self.reserve_script, &command).await?;
        if written != leases.len() as i64 {
            return Err(StoreError::Reply(format!("reserve wrote {written} leases, expected {}", leases.len())));
        }
        Ok(())
    }

    /// Records this gateway as alive and returns the number of gateways alive.
    pub async fn heartbeat(&self, node_id: &str, alive: Duration) -> Result<u64, StoreError> {
        let mut command = evalsha_command(&self.heartbeat_script, &[GATEWAYS_KEY]);
        command.arg(node_id).arg(alive.as_millis().max(1) as u64);
        let count: i64 = self.invoke(&self.heartbeat_script, &command).await?;
        u64::try_from(count)
            .ok()
            .filter(|count| *count >= 1)
            .ok_or_else(|| StoreError::Reply(format!("heartbeat returned {count} gateways, expected at least 1")))
    }
}

/// Returns `EVALSHA sha numkeys keys...` for `script`; the caller appends ARGV. The cluster
/// client routes it by its first key.
pub(crate) fn evalsha_command(script: &Script, keys: &[impl AsRef<str>]) -> redis::Cmd {
    let mut command = redis::cmd("EVALSHA");
    command.arg(script.get_hash()).arg(keys.len());
    for key in keys {
        command.arg(key.as_ref());
    }
    command
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
    fn breaker_opens_after_consecutive_failures() {
        let mut breaker = CircuitBreaker::new(3, 2);
        assert!(breaker.admit_tick());
        assert_eq!(breaker.record_failure(), None);
        assert_eq!(breaker.record_failure(), None);
        // A success in between starts the count again.
        assert_eq!(breaker.record_success(), None);
        assert_eq!(breaker.record_failure(), None);
        assert_eq!(breaker.record_failure(), None);
        assert_eq!(breaker.record_failure(), Some(BreakerTransition::Opened));
        assert_eq!(breaker.state(), BreakerState::Open);
        assert_eq!(breaker.openings(), 1);
    }

    #[test]
    fn breaker_probes_every_other_tick_at_most() {
        let mut breaker = CircuitBreaker::new(1, 2);
        assert_eq!(breaker.record_failure(), Some(BreakerTransition::Opened));
        // First probe on the next tick.
        assert!(breaker.admit_tick());
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        // A failed probe reopens without a new opening, and the backoff doubles to its cap.
        assert_eq!(breaker.record_failure(), None);
        for _ in 0..5 {
            assert!(!breaker.admit_tick(), "skipped tick");
            assert!(breaker.admit_tick(), "probe");
            assert_eq!(breaker.record_failure(), None);
        }
        assert_eq!(breaker.openings(), 1);
    }

    #[test]
    fn breaker_closes_on_successful_probe() {
        let mut breaker = CircuitBreaker::new(1, 2);
        breaker.record_failure();
        assert!(breaker.admit_tick());
        assert_eq!(breaker.record_success(), Some(BreakerTransition::Closed));
        assert_eq!(breaker.state(), BreakerState::Closed);
        // Closed again, one failure reopens it and counts a second opening.
        assert_eq!(breaker.record_failure(), Some(BreakerTransition::Opened));
        assert_eq!(breaker.openings(), 2);
    }

    #[test]
    fn failure_kinds_separate_unreachable_from_script_errors() {
        assert_eq!(StoreError::Timeout(Duration::from_millis(50)).kind(), FailureKind::Timeout);
        let refused = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(StoreError::Redis(refused).kind(), FailureKind::Connection);
        let script = redis::RedisError::from((redis::ErrorKind::Server(ServerErrorKind::ResponseError), "script error"));
        assert_eq!(StoreError::Redis(script).kind(), FailureKind::Script);
        assert_eq!(StoreError::Reply("short".into()).kind(), FailureKind::Script);
        assert!(!FailureKind::Script.is_unreachable());
        let wrong_password = redis::RedisError::from((redis::ErrorKind::AuthenticationFailed, "WRONGPASS"));
        assert!(StoreError::Redis(wrong_password).is_rejected_credentials());
    }

    #[test]
    fn sync_reply_rejects_negative_counts() {
        assert!(matches!(parse_sync_reply(&[1, 2, -1, 0, 0, 0], 1), Err(StoreError::Reply(_))));
    }
}
