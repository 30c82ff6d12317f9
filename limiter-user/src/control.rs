//! The agent's control socket: one JSON request per line, one JSON response per line.
//!
//! The socket is `/run/limiter/<iface>.sock`, mode 0600, and the agent also checks that each
//! peer runs as root, because a peer on it can lift any limit.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

use crate::{
    datapath::Attachment,
    reconcile::TickReport,
    rule_sync::{RuleChanges, RuleSetInfo},
    rules::RuleSpec,
    store::{BreakerState, StoreCounters},
};

/// Folder of the agents' control sockets.
pub const SOCKET_DIR: &str = "/run/limiter";

/// Maximum length of the requests on one connection, in bytes. Longer input is rejected.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Returns the control socket path of the agent on `iface`.
pub fn socket_path(iface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{iface}.sock"))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    LimitAdd { rule: RuleSpec },
    LimitRemove { id: u32 },
    LimitList,
    Status,
    /// Replace the whole rule set, as `limiter apply` does: rules not listed are removed.
    Apply { rules: Vec<RuleSpec> },
    /// The version of the rule set and the gateway that published it.
    RuleSet,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    Rule { rule: RuleView },
    Removed { id: u32 },
    Rules { rules: Vec<RuleView> },
    Status { status: Box<AgentStatus> },
    Error { message: String },
    Applied { changes: RuleChanges },
    RuleSet { rule_set: RuleSetInfo },
}

/// A rule as `limit list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleView {
    pub id: u32,
    #[serde(flatten)]
    pub spec: RuleSpec,
    /// Limit this gateway enforces alone while it has no grant.
    pub fallback_limit: u64,
    /// Gateways seen alive when the view was made.
    pub gateways: u64,
    /// Estimated packets per window the fleet can pass over the limit in steady traffic,
    /// from the gateways seen and the sync interval; see `rules::max_over_admission`.
    pub max_over_admission: u64,
}

/// State of a running agent, as `limiter status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentStatus {
    pub iface: String,
    pub node_id: String,
    pub attachment: Attachment,
    /// Redis URLs, comma-separated, with any password replaced by `***`.
    pub redis_url: String,
    /// Whether the URLs are seed nodes of a Redis Cluster.
    #[serde(default)]
    pub redis_cluster: bool,
    pub store_reachable: bool,
    pub sync_interval_ms: u64,
    pub gateways_seen: u64,
    pub ticks: u64,
    pub last_tick_ms: f64,
    pub last_tick: TickReport,
    pub failed_ticks: u64,
    /// Maximum tick duration since the agent started.
    #[serde(default)]
    pub max_tick_ms: f64,
    /// Ticks that took longer than the sync interval since the agent started.
    #[serde(default)]
    pub ticks_over_interval: u64,
    /// State of the circuit breaker in front of Redis: `closed`, `open` or `half_open`.
    #[serde(default)]
    pub breaker: BreakerState,
    /// Times the breaker opened since the agent started.
    #[serde(default)]
    pub breaker_openings: u64,
    /// Failed Redis calls by kind, and NOSCRIPT reloads, since the agent started.
    #[serde(default)]
    pub store_errors: StoreCounters,
    /// Keys left for a later tick because the tick's sync budget was spent, summed over
    /// every tick since the agent started: under a flood of sources, the keys that could not
    /// be reconciled in time.
    #[serde(default)]
    pub keys_deferred_total: u64,
    /// Keys the LRU map evicted since the agent started.
    #[serde(default)]
    pub keys_evicted_total: u64,
    /// Keys whose sync call failed after it may have run, and whose deltas were therefore
    /// not sent again, since the agent started.
    #[serde(default)]
    pub keys_in_doubt_total: u64,
    /// Version and origin of the rule set, as the first line of `limiter limit list` shows.
    #[serde(default)]
    pub rule_set: RuleSetInfo,
}

/// Sends one request to the agent on `iface` and returns its response.
pub async fn request(iface: &str, request: &Request) -> anyhow::Result<Response> {
    let path = socket_path(iface);
    let stream = match UnixStream::connect(&path).await {
        Ok(stream) => stream,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => bail!(
            "no agent is running on {iface} ({} does not exist): start one with `limiter agent --iface {iface} --redis URL`",
            path.display()
        ),
        Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
            bail!("permission denied on {}: run the command as root", path.display())
        }
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => bail!(
            "no agent is listening on {} (a stale socket): start `limiter agent --iface {iface}`",
            path.display()
        ),
        Err(error) => return Err(error).with_context(|| format!("failed to connect to {}", path.display())),
    };

    let (reader, mut writer) = stream.into_split();
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    writer.write_all(line.as_bytes()).await?;

    let mut response = String::new();
    let mut reader = BufReader::new(reader);
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut response))
        .await
        .context("the agent did not respond within 10 s: check its log")??;
    if response.is_empty() {
        bail!("the agent closed the connection without a response: check its log");
    }
    serde_json::from_str(&response).with_context(|| format!("invalid response from the agent: {response:?}"))
}

/// Replaces the password of a Redis URL with `***`, so it never reaches a log or `status`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        None => format!("{scheme}://***@{host}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_hides_passwords() {
        assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact_url("redis://user:secret@host:6379/0"), "redis://user:***@host:6379/0");
        assert_eq!(redact_url("rediss://:secret@host"), "rediss://:***@host");
        assert_eq!(redact_url("redis://secret@host"), "redis://***@host");
        assert_eq!(redact_url("redis://u:p@ss@host"), "redis://u:***@host");
    }

    #[test]
    fn request_wire_format_is_tagged() {
        let json = serde_json::to_string(&Request::LimitRemove { id: 3 }).unwrap();
        assert_eq!(json, r#"{"request":"limit_remove","id":3}"#);
        let parsed: Request = serde_json::from_str(r#"{"request":"status"}"#).unwrap();
        assert_eq!(parsed, Request::Status);
    }
}
