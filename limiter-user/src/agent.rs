//! `limiter agent`: attaches the program, serves the control socket, and reconciles counts
//! with the fleet every sync interval until SIGINT or SIGTERM.
//!
//! The packet path never waits for the agent: if Redis is slow or gone, grants expire and the
//! program applies each rule's store-down policy until the agent reaches Redis again.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use limiter_common::AgentHeartbeat;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
};
use tracing::{debug, error, info, warn};

use crate::{
    config::LoadedConfig,
    control::{self, AgentStatus, MAX_REQUEST_BYTES, Request, Response},
    datapath::{self, AttachMode, Maps},
    metrics::{self, AgentMetrics},
    reconcile::{self, Reconciler, TickReport},
    rule_sync::{self, FleetRules, RuleChanges, RuleState},
    rule_table::RuleTable,
    store::{BreakerState, BreakerTransition, CircuitBreaker, Store, StoreError},
};

/// Consecutive ticks without Redis before the circuit breaker opens. Grants last three
/// ticks, so the breaker opens, and the agent reports Redis unreachable, about when the
/// first grants expire and the store-down policy takes over.
const BREAKER_FAILURE_TICKS: u32 = 3;

/// Maximum wait between probes of an open breaker, in ticks: reconciliation resumes at most
/// this many ticks after Redis returns, plus the time to connect.
const BREAKER_MAX_BACKOFF_TICKS: u32 = 2;

/// Settings of one agent, from the command line.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub iface: String,
    pub mode: AttachMode,
    /// One Redis URL, or seed nodes of a Redis Cluster with `redis_cluster`.
    pub redis_urls: Vec<String>,
    pub redis_cluster: bool,
    pub sync_interval: Duration,
    pub node_id: String,
    pub max_keys: u32,
    pub redis_timeout: Duration,
    /// PEM file of the certificate authorities trusted for `rediss://` instead of the
    /// system's.
    pub redis_ca: Option<PathBuf>,
    /// Replace an XDP program the limiter did not attach.
    pub force: bool,
    /// The `--config` file as read at start: its rules are applied at start, and SIGHUP
    /// reads it again.
    pub config_file: Option<LoadedConfig>,
    /// Address to serve Prometheus metrics on, if any.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// State shared by the tick loop and the control socket.
struct Shared {
    maps: Mutex<Maps>,
    rules: Mutex<RuleTable>,
    status: Mutex<AgentStatus>,
    fleet_rules: Mutex<FleetRules>,
    /// Wakes the tick loop to publish a local rule change at once instead of next tick.
    rules_changed: tokio::sync::Notify,
    metrics: Arc<AgentMetrics>,
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every guarded update is complete before any call that could panic, so a poisoned lock
    // still guards consistent data.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs the agent until it receives SIGINT or SIGTERM.
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let AgentConfig {
        iface,
        mode,
        redis_urls,
        redis_cluster,
        sync_interval,
        node_id,
        max_keys,
        redis_timeout,
        redis_ca,
        force,
        metrics_addr,
        config_file,
    } = config.clone();

    // Step 1: check the Redis URLs and credentials. Redis may be down now, which the tick
    // loop rides out, but a rejected password stays rejected.
    let root_certificates = match &redis_ca {
        Some(path) => Some(
            std::fs::read(path)
                .with_context(|| format!("failed to read the CA certificates in {}: pass a PEM file to --redis-ca", path.display()))?,
        ),
        None => None,
    };
    let store = Store::connect(&redis_urls, redis_cluster, redis_timeout, root_certificates)?;
    if let Err(error) = store.ping().await {
        if error.is_rejected_credentials() {
            anyhow::bail!("redis rejected the agent's credentials: {error}; check the user name and password in --redis");
        }
        debug!(%error, "redis did not reply to PING at start; the tick loop retries");
    }

    // A taken metrics port stops the agent before it attaches anything.
    let metrics_listener = match metrics_addr {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };

    // Step 2: attach the program, or adopt the one pinned by an earlier run.
    let attachment = datapath::attach(&iface, mode, max_keys, force)?;
    let mut maps = Maps::open(&iface)?;
    let mut rules = RuleTable::load(&maps)?;
    rules.set_sync_interval(sync_interval);
    let fleet_rules = rule_sync::apply_config_at_start(config_file.as_ref(), &mut rules, &mut maps)?;
    let cpus = aya::util::nr_cpus().map_err(|(path, error)| anyhow::anyhow!("failed to read {path}: {error}"))?;
    info!(iface, node_id, %attachment, rules = rules.views().len(), cpus, redis_cluster, "agent started");

    let shared = Arc::new(Shared {
        maps: Mutex::new(maps),
        rules: Mutex::new(rules),
        status: Mutex::new(AgentStatus {
            iface: iface.clone(),
            node_id: node_id.clone(),
            attachment,
            redis_url: redis_urls.iter().map(|url| control::redact_url(url)).collect::<Vec<_>>().join(","),
            redis_cluster,
            store_reachable: false,
            sync_interval_ms: sync_interval.as_millis() as u64,
            gateways_seen: 1,
            ticks: 0,
            last_tick_ms: 0.0,
            last_tick: Default::default(),
            failed_ticks: 0,
            max_tick_ms: 0.0,
            ticks_over_interval: 0,
            breaker: BreakerState::Closed,
            breaker_openings: 0,
            store_errors: Default::default(),
            keys_deferred_total: 0,
            keys_evicted_total: 0,
            keys_in_doubt_total: 0,
            rule_set: Default::default(),
        }),
        fleet_rules: Mutex::new(fleet_rules),
        rules_changed: tokio::sync::Notify::new(),
        metrics: Arc::new(AgentMetrics::default()),
    });

    // Step 3: serve the control socket.
    let listener = bind_control_socket(&iface)?;
    let socket_path = control::socket_path(&iface);
    let server = tokio::spawn(serve_control(listener, shared.clone()));
    let metrics_server =
        metrics_listener.map(|listener| tokio::spawn(metrics::serve(listener, iface.clone(), shared.metrics.clone())));

    // Step 4: reconcile every interval until SIGINT or SIGTERM.
    let adopted = matches!(lock(&shared.status).attachment, datapath::Attachment::Adopted);
    let result = tick_loop(&config, &store, shared, cpus, adopted).await;

    server.abort();
    if let Some(metrics_server) = metrics_server {
        metrics_server.abort();
    }
    let _ = std::fs::remove_file(&socket_path);
    info!(iface, "agent stopped; the program stays attached and enforces fallback limits until `limiter detach`");
    result
}

/// Runs one tick every sync interval until SIGINT or SIGTERM.
///
/// A circuit breaker keeps a hung or dead Redis from stretching the ticks. Each tick starts
/// with the heartbeat call. When that finds Redis out of reach, the tick skips the sync
/// calls, because each would wait out the same timeout. After a few such ticks the breaker
/// opens, and only one tick in every backoff probes Redis with a heartbeat. No store call
/// outlives its tick's interval.
async fn tick_loop(config: &AgentConfig, store: &Store, shared: Arc<Shared>, cpus: usize, adopted: bool) -> anyhow::Result<()> {
    // Grants outlive a few missed ticks, so one slow Redis reply does not reset every key
    // to its fallback limit.
    let grant_lifetime = config.sync_interval * 3;
    let gateway_alive = (config.sync_interval * 10).max(Duration::from_secs(2));
    let mut reconciler = Reconciler::new(store.clone(), &config.node_id, config.sync_interval, grant_lifetime, cpus);
    if adopted {
        reconciler.adopt_existing_counters();
    }

    let mut interval = tokio::time::interval(config.sync_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut terminate = signal(SignalKind::terminate()).context("failed to install the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("failed to install the SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("failed to install the SIGHUP handler")?;
    let rule_state = RuleState { maps: &shared.maps, rules: &shared.rules, fleet: &shared.fleet_rules };

    let mut breaker = CircuitBreaker::new(BREAKER_FAILURE_TICKS, BREAKER_MAX_BACKOFF_TICKS);
    // Whether "redis reachable" was logged once; later changes follow the breaker.
    let mut reported_reachable = false;
    let mut script_errors_reported = false;
    let mut max_tick = Duration::ZERO;
    // Ticks longer than the interval so far, and their count when the current run of them began.
    let mut overruns = 0u64;
    let mut overrun_since: Option<u64> = None;

    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
            _ = hangup.recv() => {
                if rule_sync::reload(config.config_file.as_ref(), &rule_state) {
                    shared.rules_changed.notify_one();
                }
                continue;
            }
            // Publishing between ticks lets the other gateways apply a change on their next
            // tick rather than a tick later. An open breaker leaves it for the first tick
            // that reaches Redis.
            _ = shared.rules_changed.notified() => {
                if breaker.state() == BreakerState::Closed {
                    rule_sync::publish(store, &config.node_id, &rule_state).await;
                }
                continue;
            }
        }
        if !breaker.admit_tick() {
            let mut status = lock(&shared.status);
            status.ticks += 1;
            status.failed_ticks += 1;
            status.store_reachable = false;
            continue;
        }
        let started = Instant::now();
        let before = store.counters();
        store.set_deadline(Some(started + config.sync_interval));

        // The heartbeat counts live gateways, which sets each rule's fallback limit.
        let heartbeat = store.heartbeat(&config.node_id, gateway_alive).await;
        match &heartbeat {
            Ok(gateways) => {
                let gateways = *gateways;
                let mut maps = lock(&shared.maps);
                let mut rules = lock(&shared.rules);
                if gateways != rules.gateways() {
                    info!(gateways, "gateway count changed, updating fallback limits");
                    if let Err(error) = rules.set_gateways(gateways, &mut maps) {
                        error!(error = format!("{error:#}"), "failed to update fallback limits");
                    }
                }
            }
            Err(error) => debug!(%error, "heartbeat call failed"),
        }
        let heartbeat_unreachable = heartbeat.as_ref().err().is_some_and(|error| error.kind().is_unreachable());
        let report = if heartbeat_unreachable {
            TickReport { failed_calls: 1, first_error: heartbeat.as_ref().err().map(StoreError::to_string), ..Default::default() }
        } else {
            // The rule set call comes first, so this tick reconciles under the rules it applies.
            rule_sync::sync_tick(store, &config.node_id, &rule_state).await;
            let rules_by_id = lock(&shared.rules).by_id();
            reconciler.tick(&shared.maps, &rules_by_id).await
        };
        store.set_deadline(None);
        let elapsed = started.elapsed();
        max_tick = max_tick.max(elapsed);
        let after = store.counters();
        let reached = after.unreachable() == before.unreachable();

        // While grants flow, new keys are paced until their first grant; once the agent
        // stops renewing this, new keys get the fallback limit.
        if heartbeat.is_ok() && report.failed_calls == 0 {
            let heartbeat = AgentHeartbeat {
                granting_until_ns: reconcile::monotonic_ns().saturating_add(grant_lifetime.as_nanos() as u64),
            };
            if let Err(error) = lock(&shared.maps).agent.set(0, heartbeat, 0) {
                warn!(%error, "failed to write the AGENT heartbeat");
            }
        }

        // Log store state changes once, not per tick or per key.
        let transition = if reached { breaker.record_success() } else { breaker.record_failure() };
        match transition {
            Some(BreakerTransition::Closed) => {
                info!(keys = report.keys_synced, "redis reachable, reconciling fleet-wide counts");
            }
            None if reached && !reported_reachable => {
                info!(keys = report.keys_synced, "redis reachable, reconciling fleet-wide counts");
            }
            Some(BreakerTransition::Opened) => {
                let error = heartbeat.as_ref().err().map(StoreError::to_string).or(report.first_error.clone());
                warn!(
                    error = error.unwrap_or_default(),
                    failed_ticks = BREAKER_FAILURE_TICKS,
                    "redis unreachable; grants will expire and fallback limits apply until it returns"
                );
            }
            None => {}
        }
        reported_reachable |= reached;
        let script_errors = after.script_errors > before.script_errors;
        if script_errors && !script_errors_reported {
            let heartbeat_error = heartbeat.as_ref().err().map(StoreError::to_string).unwrap_or_default();
            let sync_error = report.first_error.clone().unwrap_or_default();
            warn!(
                heartbeat_error,
                sync_error,
                "redis script calls failed; keys without a new grant fall back when their grant expires"
            );
        } else if !script_errors && script_errors_reported && reached {
            info!("redis script calls succeed again");
        }
        script_errors_reported = script_errors;

        // One line when ticks start running over, and one when they stop.
        let over = elapsed > config.sync_interval;
        if over && overrun_since.is_none() {
            warn!(
                elapsed_ms = elapsed.as_millis() as u64,
                keys = report.keys_tracked,
                deferred = report.keys_deferred,
                "ticks take longer than the sync interval; grants age and keys wait longer for their first grant"
            );
            overrun_since = Some(overruns);
        } else if !over && let Some(first) = overrun_since.take() {
            info!(ticks = overruns - first, "ticks fit the sync interval again");
        }
        overruns += u64::from(over);
        debug!(elapsed_us = elapsed.as_micros() as u64, ?report, breaker = ?breaker.state(), "tick");

        let mut status = lock(&shared.status);
        status.store_reachable = reached;
        status.gateways_seen = lock(&shared.rules).gateways();
        status.ticks += 1;
        status.failed_ticks += u64::from(!reached || report.failed_calls > 0);
        status.last_tick_ms = elapsed.as_secs_f64() * 1000.0;
        status.max_tick_ms = max_tick.as_secs_f64() * 1000.0;
        status.ticks_over_interval = overruns;
        status.breaker = breaker.state();
        status.breaker_openings = breaker.openings();
        status.store_errors = after;
        status.keys_deferred_total += report.keys_deferred as u64;
        status.keys_evicted_total += report.keys_evicted as u64;
        status.keys_in_doubt_total += report.keys_in_doubt as u64;
        status.last_tick = report;
        shared.metrics.record_tick(elapsed, &status);
    }
}

fn bind_control_socket(iface: &str) -> anyhow::Result<UnixListener> {
    let path = control::socket_path(iface);
    std::fs::create_dir_all(control::SOCKET_DIR)
        .with_context(|| format!("failed to create {}", control::SOCKET_DIR))?;
    if path.exists() {
        // A live agent accepts the connection. A socket without a listener is left by a crash.
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            anyhow::bail!("another agent is already running on {iface} ({} accepts connections): stop it first", path.display());
        }
        std::fs::remove_file(&path).with_context(|| format!("failed to remove stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(&path).with_context(|| format!("failed to bind {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("failed to set mode 0600 on {}", path.display()))?;
    Ok(listener)
}

async fn serve_control(listener: UnixListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                warn!(%error, "failed to accept a control connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(error) = serve_connection(stream, shared).await {
                debug!(%error, "control connection ended with an error");
            }
        });
    }
}

async fn serve_connection(stream: UnixStream, shared: Arc<Shared>) -> anyhow::Result<()> {
    // The socket's mode already keeps others out; the credential check also covers a socket
    // whose mode someone loosened.
    let uid = stream.peer_cred()?.uid();
    let (reader, mut writer) = stream.into_split();
    if uid != 0 {
        warn!(uid, "rejected control connection from a non-root user");
        let response = Response::Error { message: "permission denied: run the command as root".into() };
        write_response(&mut writer, &response).await?;
        return Ok(());
    }

    let mut reader = BufReader::new(reader.take(MAX_REQUEST_BYTES as u64 + 1));
    let mut line = String::new();
    while reader.read_line(&mut line).await? > 0 {
        let response = if line.len() > MAX_REQUEST_BYTES || !line.ends_with('\n') {
            Response::Error { message: format!("request too long or unterminated: the limit is {MAX_REQUEST_BYTES} bytes") }
        } else {
            match serde_json::from_str::<Request>(&line) {
                Ok(request) => handle_request(request, &shared),
                Err(error) => Response::Error { message: format!("invalid request: {error}") },
            }
        };
        write_response(&mut writer, &response).await?;
        if matches!(response, Response::Error { .. }) && line.len() > MAX_REQUEST_BYTES {
            break;
        }
        line.clear();
    }
    Ok(())
}

async fn write_response(writer: &mut tokio::net::unix::OwnedWriteHalf, response: &Response) -> anyhow::Result<()> {
    let mut line = serde_json::to_string(response)?;
    line.push('\n');
    writer.write_all(line.as_bytes()).await?;
    Ok(())
}

fn handle_request(request: Request, shared: &Shared) -> Response {
    let outcome = match request {
        Request::LimitAdd { rule } => {
            let mut maps = lock(&shared.maps);
            lock(&shared.rules).add(&rule, &mut maps).map(|view| {
                info!(rule = view.id, traffic = view.spec.describe_match(), rate = view.spec.rate, "rule set");
                Response::Rule { rule: view }
            })
        }
        Request::LimitRemove { id } => {
            let mut maps = lock(&shared.maps);
            lock(&shared.rules).remove(id, &mut maps).map(|()| {
                info!(rule = id, "rule removed");
                Response::Removed { id }
            })
        }
        Request::LimitList => Ok(Response::Rules { rules: lock(&shared.rules).views() }),
        Request::Status => {
            let mut status = lock(&shared.status).clone();
            status.rule_set = lock(&shared.fleet_rules).info();
            Ok(Response::Status { status: Box::new(status) })
        }
        Request::Apply { rules } => {
            let mut maps = lock(&shared.maps);
            rule_sync::apply_specs(&mut lock(&shared.rules), &mut maps, &rules).map(|changes| {
                let RuleChanges { added, changed, removed, unchanged } = changes;
                info!(added, changed, removed, unchanged, "rule set applied");
                Response::Applied { changes }
            })
        }
        Request::RuleSet => Ok(Response::RuleSet { rule_set: lock(&shared.fleet_rules).info() }),
    };

    // Every change made here goes to the rest of the fleet.
    if matches!(outcome, Ok(Response::Rule { .. } | Response::Removed { .. } | Response::Applied { .. })) {
        lock(&shared.fleet_rules).record_local_change();
        shared.rules_changed.notify_one();
    }
    outcome.unwrap_or_else(|error| Response::Error { message: format!("{error:#}") })
}
