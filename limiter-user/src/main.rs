//! `limiter`: the agent and the operator's command-line interface.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use limiter_user::{
    agent::{self, AgentConfig},
    config::{self, LoadedConfig},
    control::{self, Request, Response, RuleView},
    datapath::{self, AttachMode, Maps},
    rule_table::RuleTable,
    rules::{
        InnerTier, Protocol, Rate, RateUnit, RuleSpec, StoreDownPolicy, format_window, parse_rate, parse_window,
        rate_in_bytes,
    },
    stats,
};
use limiter_user::{
    acl::{self, AclList},
    explain, manual, packet, top,
};

#[derive(Parser)]
#[command(name = "limiter", version, about = "Per-key packet rate limiter in XDP with one quota across a fleet of gateways")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the program and reconcile counts with the fleet through Redis until stopped.
    Agent(AgentArgs),
    /// Attach the program without an agent; each rule's fallback limit then applies alone.
    Attach {
        #[command(flatten)]
        iface: IfaceArg,
        #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
        mode: AttachMode,
        /// Keys tracked at once (size of the counter and grant maps).
        #[arg(long, default_value_t = limiter_common::DEFAULT_MAX_KEYS, value_parser = clap::value_parser!(u32).range(1..))]
        max_keys: u32,
        /// Replace an XDP program already on the interface that the limiter did not attach.
        #[arg(long)]
        force: bool,
    },
    /// Detach the program and remove its pinned maps.
    Detach {
        #[command(flatten)]
        iface: IfaceArg,
    },
    /// Add, change, remove or list limits.
    #[command(subcommand)]
    Limit(LimitCommand),
    /// Make the [[rule]] entries of a TOML file the whole rule set, all or nothing.
    ///
    /// Checks every rule first, then removes rules the file lacks, keeps unchanged ones with
    /// their counters, and replaces changed ones.
    Apply {
        /// Configuration file, as for `limiter agent --config`.
        file: PathBuf,
        /// Network interface; the file's [agent] iface when not given.
        #[arg(long)]
        iface: Option<String>,
    },
    /// Pass sources in a CIDR before any rule (the longest listed prefix decides).
    #[command(subcommand)]
    Allow(AclCommand),
    /// Drop sources in a CIDR before any rule (the longest listed prefix decides).
    #[command(subcommand)]
    Deny(AclCommand),
    /// Show packet counts per verdict reason.
    Stats {
        #[command(flatten)]
        iface: IfaceArg,
        /// Print JSON instead of a table, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Show the state of the running agent.
    Status {
        #[command(flatten)]
        iface: IfaceArg,
        /// Print JSON instead of a table, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Show the keys with the most packets per second on this gateway, refreshed in place.
    Top(TopArgs),
    /// Show the rule, key, counts and verdict a packet would get now, without counting it.
    Explain(ExplainArgs),
    /// Print the completion script for a shell.
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
    /// Write a man page for each command into a folder.
    #[command(hide = true)]
    Man { dir: PathBuf },
}

#[derive(Args)]
struct IfaceArg {
    /// Network interface the limiter runs on (or is to be attached to).
    #[arg(long)]
    iface: String,
}

#[derive(Args)]
struct AgentArgs {
    /// TOML file of agent settings ([agent]) and rules ([[rule]]); an option given on the
    /// command line takes precedence over the file. SIGHUP reads the rules again.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Network interface to attach to; required unless --config sets it.
    #[arg(long)]
    iface: Option<String>,
    /// XDP attach mode [default: auto]
    #[arg(long, value_enum)]
    mode: Option<AttachMode>,
    /// Redis URL, such as redis://127.0.0.1:6379 or rediss://user:password@host:6380; with
    /// --redis-cluster, one or more cluster nodes, comma-separated. Required unless --config
    /// sets it.
    #[arg(long, value_delimiter = ',')]
    redis: Option<Vec<String>>,
    /// Treat the --redis URLs as seed nodes of a Redis Cluster.
    #[arg(long)]
    redis_cluster: bool,
    /// Time between reconciliations with the fleet, such as 100ms [default: 100ms]
    #[arg(long, value_parser = parse_interval)]
    sync_interval: Option<Duration>,
    /// Name of this gateway in the fleet; the host name when not given.
    #[arg(long)]
    node_id: Option<String>,
    /// Keys tracked at once (size of the counter and grant maps) [default: 65536]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_keys: Option<u32>,
    /// Maximum wait for one Redis reply before the tick carries on without it [default: 50ms]
    #[arg(long, value_parser = parse_interval)]
    redis_timeout: Option<Duration>,
    /// PEM file of the certificate authorities to trust for rediss:// URLs, in place of the
    /// system's trusted roots. Use it for a Redis with a private or self-signed CA.
    #[arg(long, value_name = "FILE")]
    redis_ca: Option<PathBuf>,
    /// Replace an XDP program already on the interface that the limiter did not attach.
    #[arg(long)]
    force: bool,
    /// Serve Prometheus metrics over HTTP at http://ADDR:PORT/metrics, such as 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Subcommand)]
enum LimitCommand {
    /// Limit each source of the selected traffic; replaces the rule for the same traffic.
    Add(LimitAddArgs),
    /// Remove a rule by id.
    Remove {
        #[command(flatten)]
        iface: IfaceArg,
        /// Rule id, as `limiter limit list` shows it.
        id: u32,
    },
    /// List the rules.
    List {
        #[command(flatten)]
        iface: IfaceArg,
        /// Print JSON instead of a table, for scripts.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct LimitAddArgs {
    #[command(flatten)]
    iface: IfaceArg,
    /// Packets each source key may pass per window, fleet-wide (100), or per second (100/s,
    /// converted to packets per window). With --bytes, frame bytes, such as 1MB/s or 64KiB;
    /// k, M and G multiply by powers of 1000, Ki, Mi and Gi by powers of 1024.
    #[arg(long, value_parser = parse_rate_arg)]
    rate: (Rate, bool),
    /// Window length, from 10ms to 1h.
    #[arg(long, default_value = "1s", value_parser = |text: &str| parse_window(text))]
    window: Duration,
    /// Protocol the rule selects: any, tcp, udp or an IP protocol number.
    #[arg(long, default_value = "any", value_parser = |text: &str| text.parse::<Protocol>())]
    proto: Protocol,
    /// Destination port the rule selects; needs --proto tcp or udp.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    port: Option<u16>,
    /// Prefix length IPv4 sources are grouped by (32 limits each address, 24 each /24).
    #[arg(long, default_value_t = 32)]
    prefix_v4: u8,
    /// Prefix length IPv6 sources are grouped by (128 limits each address, 64 each /64).
    #[arg(long, default_value_t = 128)]
    prefix_v6: u8,
    /// Limit each destination port of a source separately.
    #[arg(long)]
    per_port: bool,
    /// Policy for keys while Redis or the agent is out of reach: local (the limit divided by
    /// the gateways last seen), open (pass) or closed (drop).
    #[arg(long, value_enum, default_value_t = StoreDownPolicy::Local)]
    store_down: StoreDownPolicy,
    /// Count frame bytes (Ethernet header included) against --rate and --inner-rate
    /// instead of packets.
    #[arg(long)]
    bytes: bool,
    /// Select only TCP connection requests (SYN without ACK), to limit new connections per
    /// window; needs --proto tcp. Other TCP packets go to the other rules.
    #[arg(long)]
    syn: bool,
    /// Also limit each inner key, the source grouped by --inner-prefix-v4/-v6, to this rate.
    /// A packet passes only when both its key and its inner key are within their limits.
    #[arg(long, value_parser = parse_rate_arg)]
    inner_rate: Option<(Rate, bool)>,
    /// Prefix length IPv4 sources are grouped by for --inner-rate.
    #[arg(long, default_value_t = 32)]
    inner_prefix_v4: u8,
    /// Prefix length IPv6 sources are grouped by for --inner-rate.
    #[arg(long, default_value_t = 128)]
    inner_prefix_v6: u8,
    /// Drop nothing: count per key, and as passed_shadow, the packets the rule would drop.
    #[arg(long)]
    shadow: bool,
}

/// Parses a rate and whether it is written in bytes (`1MB/s`).
fn parse_rate_arg(text: &str) -> Result<(Rate, bool), limiter_user::rules::RuleError> {
    parse_rate(text).map(|rate| (rate, rate_in_bytes(text)))
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    config::parse_interval(text)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    // Errors fit on one line: clap's hint to try --help follows a blank line and is dropped.
    // Help and version output go to standard output unchanged.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) if error.use_stderr() => {
            let message = error.to_string();
            eprintln!("{}", message.lines().next().unwrap_or("error: invalid arguments"));
            return ExitCode::from(2);
        }
        Err(error) => error.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: failed to start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Agent(args) => {
            let AgentArgs {
                config: config_path,
                iface,
                mode,
                redis,
                redis_cluster,
                sync_interval,
                node_id,
                max_keys,
                redis_timeout,
                redis_ca,
                force,
                metrics_addr,
            } = args;

            // Each setting comes from the command line, else the --config file, else its default.
            let config_file = match config_path {
                Some(path) => Some(LoadedConfig { contents: config::load(&path)?, path }),
                None => None,
            };
            let config::AgentSettings {
                iface: file_iface,
                mode: file_mode,
                redis: file_redis,
                redis_cluster: file_redis_cluster,
                redis_ca: file_redis_ca,
                sync_interval: file_sync_interval,
                node_id: file_node_id,
                max_keys: file_max_keys,
                redis_timeout: file_redis_timeout,
            } = config_file.as_ref().map(|loaded| loaded.contents.agent.clone()).unwrap_or_default();
            let iface = iface
                .or(file_iface)
                .context("missing interface: pass --iface IF, or set iface in the [agent] table of the --config file")?;
            let redis = redis
                .or(file_redis)
                .context("missing Redis URL: pass --redis URL, or set redis in the [agent] table of the --config file")?;
            let mode = mode.or(file_mode).unwrap_or(AttachMode::Auto);
            let redis_cluster = redis_cluster || file_redis_cluster.unwrap_or(false);
            let sync_interval = sync_interval.or(file_sync_interval).unwrap_or(Duration::from_millis(100));
            let node_id = node_id.or(file_node_id);
            let max_keys = max_keys.or(file_max_keys).unwrap_or(limiter_common::DEFAULT_MAX_KEYS);
            let redis_timeout = redis_timeout.or(file_redis_timeout).unwrap_or(Duration::from_millis(50));
            let redis_ca = redis_ca.or(file_redis_ca);

            let node_id = match node_id {
                Some(node_id) => node_id,
                None => host_name().context("failed to read the host name: pass --node-id NAME")?,
            };
            let valid_node_id = |id: &str| {
                (1..=64).contains(&id.len())
                    && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            };
            if !valid_node_id(&node_id) {
                bail!("invalid node id {node_id:?}: expected 1-64 letters, digits, '.', '_' or '-'; pass --node-id NAME");
            }
            agent::run(AgentConfig {
                iface,
                mode,
                redis_urls: redis,
                redis_cluster,
                sync_interval,
                node_id,
                max_keys,
                redis_timeout,
                redis_ca,
                force,
                metrics_addr,
                config_file,
            })
            .await
        }
        Command::Attach { iface, mode, max_keys, force } => {
            let attachment = datapath::attach(&iface.iface, mode, max_keys, force)?;
            println!("attached to {} ({attachment})", iface.iface);
            Ok(())
        }
        Command::Detach { iface } => {
            if control::socket_path(&iface.iface).exists() {
                bail!(
                    "an agent is running on {0}: stop it first, or it would keep serving without a program",
                    iface.iface
                );
            }
            if datapath::detach(&iface.iface)? {
                println!("detached from {}", iface.iface);
            } else {
                println!("nothing attached to {}", iface.iface);
            }
            Ok(())
        }
        Command::Limit(command) => run_limit(command).await,
        Command::Apply { file, iface } => {
            println!("{}", config::apply_file(&file, iface).await?);
            Ok(())
        }
        Command::Allow(command) => run_acl(AclList::Allow, command),
        Command::Deny(command) => run_acl(AclList::Deny, command),
        Command::Top(args) => {
            let TopArgs { iface, interval, count, refreshes, json } = args;
            top::run(top::TopOptions { iface: iface.iface, interval, count, refreshes, json }).await
        }
        Command::Explain(args) => run_explain(args),
        Command::Completions { shell } => {
            manual::write_completions(<Cli as clap::CommandFactory>::command(), shell, &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir } => {
            for path in manual::write_man_pages(<Cli as clap::CommandFactory>::command(), &dir)? {
                println!("{}", path.display());
            }
            Ok(())
        }
        Command::Stats { iface, json } => {
            let maps = Maps::open(&iface.iface)?;
            let counts = stats::reason_counts(&maps)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&counts)?);
            } else {
                print!("{}", stats::format_reason_counts(&counts));
            }
            Ok(())
        }
        Command::Status { iface, json } => {
            let Response::Status { status } = expect_ok(control::request(&iface.iface, &Request::Status).await?)? else {
                bail!("unexpected response from the agent");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                println!("iface:          {}", status.iface);
                println!("node id:        {}", status.node_id);
                println!("attachment:     {}", status.attachment);
                let store_kind = if status.redis_cluster { "cluster, " } else { "" };
                let reachable = if status.store_reachable { "reachable" } else { "unreachable" };
                println!("redis:          {} ({store_kind}{reachable})", status.redis_url);
                println!("sync interval:  {} ms", status.sync_interval_ms);
                println!("gateways seen:  {}", status.gateways_seen);
                println!("ticks:          {} ({} failed)", status.ticks, status.failed_ticks);
                println!("last tick:      {:.2} ms, {} keys tracked, {} synced in {} calls", status.last_tick_ms,
                    status.last_tick.keys_tracked, status.last_tick.keys_synced, status.last_tick.script_calls);
            }
            Ok(())
        }
    }
}

async fn run_limit(command: LimitCommand) -> anyhow::Result<()> {
    match command {
        LimitCommand::Add(args) => {
            let LimitAddArgs {
                iface,
                rate,
                window,
                proto,
                port,
                prefix_v4,
                prefix_v6,
                per_port,
                store_down,
                bytes,
                syn,
                inner_rate,
                inner_prefix_v4,
                inner_prefix_v6,
                shadow,
            } = args;
            let window_ms = window.as_millis() as u64;
            let written_in_bytes = rate.1 || inner_rate.is_some_and(|(_, in_bytes)| in_bytes);
            if written_in_bytes && !bytes {
                bail!("a rate in bytes (ending in B) needs --bytes, which makes the rule count frame bytes");
            }
            let inner_tier = match inner_rate {
                Some((inner_rate, _)) => Some(InnerTier {
                    rate: inner_rate.per_window(window_ms)?,
                    ipv4_prefix_len: inner_prefix_v4,
                    ipv6_prefix_len: inner_prefix_v6,
                }),
                None => None,
            };
            let spec = RuleSpec {
                protocol: proto,
                port,
                rate: rate.0.per_window(window_ms)?,
                window_ms,
                ipv4_prefix_len: prefix_v4,
                ipv6_prefix_len: prefix_v6,
                per_port,
                store_down,
                unit: if bytes { RateUnit::Bytes } else { RateUnit::Packets },
                tcp_syn: syn,
                inner_tier,
                shadow,
            };
            spec.validate()?;
            let view = if agent_running(&iface.iface) {
                match expect_ok(control::request(&iface.iface, &Request::LimitAdd { rule: spec }).await?)? {
                    Response::Rule { rule } => rule,
                    _ => bail!("unexpected response from the agent"),
                }
            } else {
                let mut maps = Maps::open(&iface.iface)?;
                RuleTable::load(&maps)?.add(&spec, &mut maps)?
            };
            println!("rule {}: {} limited to {} per {} per source{}{}", view.id, view.spec.describe_match(),
                format_amount(view.spec.rate, view.spec.unit), format_window(Duration::from_millis(view.spec.window_ms)),
                view.spec.inner_tier.map_or(String::new(), |tier| format!(", {} per inner key (/{} /{})",
                    format_amount(tier.rate, view.spec.unit), tier.ipv4_prefix_len, tier.ipv6_prefix_len)),
                if view.spec.shadow { ", in shadow mode (counts, drops nothing)" } else { "" });
            Ok(())
        }
        LimitCommand::Remove { iface, id } => {
            if agent_running(&iface.iface) {
                expect_ok(control::request(&iface.iface, &Request::LimitRemove { id }).await?)?;
            } else {
                let mut maps = Maps::open(&iface.iface)?;
                RuleTable::load(&maps)?.remove(id, &mut maps)?;
            }
            println!("rule {id} removed");
            Ok(())
        }
        LimitCommand::List { iface, json } => {
            let rules = if agent_running(&iface.iface) {
                match expect_ok(control::request(&iface.iface, &Request::LimitList).await?)? {
                    Response::Rules { rules } => rules,
                    _ => bail!("unexpected response from the agent"),
                }
            } else {
                RuleTable::load(&Maps::open(&iface.iface)?)?.views()
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&rules)?);
            } else {
                if agent_running(&iface.iface)
                    && let Response::RuleSet { rule_set } =
                        expect_ok(control::request(&iface.iface, &Request::RuleSet).await?)?
                {
                    println!("{}", limiter_user::rule_sync::describe_rule_set(&rule_set));
                }
                print!("{}", format_rules(&rules));
            }
            Ok(())
        }
    }
}

#[derive(Subcommand)]
enum AclCommand {
    /// Add a CIDR, such as 192.0.2.0/24, 2001:db8::/32 or one address.
    Add {
        #[command(flatten)]
        iface: IfaceArg,
        cidr: String,
    },
    /// Remove a CIDR added before.
    Remove {
        #[command(flatten)]
        iface: IfaceArg,
        cidr: String,
    },
    /// List the CIDRs.
    List {
        #[command(flatten)]
        iface: IfaceArg,
        /// Print JSON instead of one CIDR per line, for scripts.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `allow` and `deny`. The lists live only in the pinned maps, so these write them
/// directly, also while an agent runs.
fn run_acl(list: AclList, command: AclCommand) -> anyhow::Result<()> {
    match command {
        AclCommand::Add { iface, cidr } => {
            let cidr = acl::parse_cidr(&cidr)?;
            let mut maps = Maps::open(&iface.iface)?;
            let _lock = acl::lock_writers(&iface.iface)?;
            acl::add(&mut maps, list, cidr)?;
            println!("{cidr} added to the {list}");
        }
        AclCommand::Remove { iface, cidr } => {
            let cidr = acl::parse_cidr(&cidr)?;
            let mut maps = Maps::open(&iface.iface)?;
            let _lock = acl::lock_writers(&iface.iface)?;
            acl::remove(&mut maps, list, cidr)?;
            println!("{cidr} removed from the {list}");
        }
        AclCommand::List { iface, json } => {
            let entries: Vec<acl::AclEntry> =
                acl::entries(&Maps::open(&iface.iface)?)?.into_iter().filter(|entry| entry.list == list).collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                for entry in entries {
                    println!("{}", entry.cidr);
                }
            }
        }
    }
    Ok(())
}

fn agent_running(iface: &str) -> bool {
    control::socket_path(iface).exists()
}

fn expect_ok(response: Response) -> anyhow::Result<Response> {
    match response {
        Response::Error { message } => bail!("{message}"),
        other => Ok(other),
    }
}

/// Formats a rate in its unit: packets as a bare number, bytes with a `B`.
fn format_amount(amount: u64, unit: RateUnit) -> String {
    match unit {
        RateUnit::Packets => amount.to_string(),
        RateUnit::Bytes => format!("{amount}B"),
    }
}

fn format_rules(rules: &[RuleView]) -> String {
    let mut table = format!("{:>4}  {:<16} {:>12} {:>8} {:>7} {:>7} {:>8} {:>10} {:>9} {:>8} {:>10} {:>16} {:>6}\n", "id",
        "traffic", "rate", "window", "ipv4", "ipv6", "per-port", "store-down", "fallback", "gateways", "max-over", "inner",
        "shadow");
    for rule in rules {
        let unit = rule.spec.unit;
        // An inner tier shows as its prefixes and rate, such as /32/128:60.
        let inner = match rule.spec.inner_tier {
            Some(tier) => format!("/{}/{}:{}", tier.ipv4_prefix_len, tier.ipv6_prefix_len, format_amount(tier.rate, unit)),
            None => "-".to_owned(),
        };
        table += &format!(
            "{:>4}  {:<16} {:>12} {:>8} {:>7} {:>7} {:>8} {:>10} {:>9} {:>8} {:>10} {:>16} {:>6}\n",
            rule.id,
            rule.spec.describe_match(),
            format_amount(rule.spec.rate, unit),
            format_window(Duration::from_millis(rule.spec.window_ms)),
            format!("/{}", rule.spec.ipv4_prefix_len),
            format!("/{}", rule.spec.ipv6_prefix_len),
            if rule.spec.per_port { "yes" } else { "no" },
            rule.spec.store_down.to_string(),
            format_amount(rule.fallback_limit, unit),
            rule.gateways,
            format_amount(rule.max_over_admission, unit),
            inner,
            if rule.spec.shadow { "yes" } else { "no" },
        );
    }
    table
}

fn host_name() -> anyhow::Result<String> {
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is writable for its whole length, which is passed along.
    if unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let end = buffer.iter().position(|byte| *byte == 0).unwrap_or(buffer.len());
    Ok(String::from_utf8_lossy(&buffer[..end]).into_owned())
}

#[derive(Args)]
struct TopArgs {
    #[command(flatten)]
    iface: IfaceArg,
    /// Time between refreshes, and the span each rate is measured over, such as 1s.
    #[arg(long, default_value = "1s", value_parser = parse_top_interval)]
    interval: Duration,
    /// Keys shown, heaviest first.
    #[arg(long, default_value_t = 20)]
    count: usize,
    /// Refreshes before exiting; without it, top runs until interrupted.
    #[arg(long, value_name = "N")]
    refreshes: Option<u64>,
    /// Print the keys of one interval as JSON and exit, for scripts.
    #[arg(long)]
    json: bool,
}

fn parse_top_interval(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|error| format!("invalid interval {text:?}: {error}; expected a value such as 500ms or 2s"))?;
    if duration < Duration::from_millis(100) || duration > Duration::from_secs(3600) {
        return Err(format!("invalid interval {text:?}: expected between 100ms and 1h"));
    }
    Ok(duration)
}

#[derive(Args)]
struct ExplainArgs {
    #[command(flatten)]
    iface: IfaceArg,
    /// The packet, as PROTOCOL SOURCE -> DESTINATION, such as 'udp 192.0.2.1:5353 -> 198.51.100.7:53',
    /// 'tcp [2001:db8::1]:40000 -> [2001:db8::2]:443' or 'icmp 192.0.2.1 -> 198.51.100.7'.
    #[arg(required_unless_present = "hex", conflicts_with = "hex")]
    packet: Option<String>,
    /// The packet as an Ethernet frame in hexadecimal, such as a line of `tcpdump -xx`
    /// output with the offsets removed.
    #[arg(long, value_name = "FRAME")]
    hex: Option<String>,
    /// Print JSON instead of text, for scripts.
    #[arg(long)]
    json: bool,
}

fn run_explain(args: ExplainArgs) -> anyhow::Result<()> {
    let ExplainArgs { iface, packet: description, hex, json } = args;
    let fields = match (description, hex) {
        (Some(description), _) => Ok(packet::parse_description(&description).map_err(anyhow::Error::msg)?),
        (None, Some(hex)) => packet::parse_frame(&packet::parse_hex(&hex).map_err(anyhow::Error::msg)?),
        (None, None) => bail!("missing packet: pass a description such as 'udp 192.0.2.1:5353 -> 198.51.100.7:53' or --hex FRAME"),
    };
    let maps = Maps::open(&iface.iface)?;
    let explanation = explain::explain(&maps, fields)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&explanation)?);
    } else {
        print!("{}", explain::format_explanation(&explanation));
    }
    Ok(())
}
