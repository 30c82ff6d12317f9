//! `limiter`: the agent and the operator's command-line interface.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use limiter_user::{
    agent::{self, AgentConfig},
    control::{self, Request, Response, RuleView},
    datapath::{self, AttachMode, Maps},
    rule_table::RuleTable,
    rules::{Protocol, Rate, RuleSpec, StoreDownPolicy, format_window, parse_rate, parse_window},
    stats,
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
}

#[derive(Args)]
struct IfaceArg {
    /// Network interface the limiter runs on (or is to be attached to).
    #[arg(long)]
    iface: String,
}

#[derive(Args)]
struct AgentArgs {
    #[command(flatten)]
    iface: IfaceArg,
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    mode: AttachMode,
    /// Redis URL, such as redis://127.0.0.1:6379 or rediss://user:password@host:6380; with
    /// --redis-cluster, one or more cluster nodes, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    redis: Vec<String>,
    /// Treat the --redis URLs as seed nodes of a Redis Cluster.
    #[arg(long)]
    redis_cluster: bool,
    /// Time between reconciliations with the fleet, such as 100ms.
    #[arg(long, default_value = "100ms", value_parser = parse_interval)]
    sync_interval: Duration,
    /// Name of this gateway in the fleet; the host name when not given.
    #[arg(long)]
    node_id: Option<String>,
    /// Keys tracked at once (size of the counter and grant maps).
    #[arg(long, default_value_t = limiter_common::DEFAULT_MAX_KEYS, value_parser = clap::value_parser!(u32).range(1..))]
    max_keys: u32,
    /// Maximum wait for one Redis reply before the tick carries on without it.
    #[arg(long, default_value = "50ms", value_parser = parse_interval)]
    redis_timeout: Duration,
    /// PEM file of the certificate authorities to trust for rediss:// URLs, in place of the
    /// system's trusted roots. Use it for a Redis with a private or self-signed CA.
    #[arg(long, value_name = "FILE")]
    redis_ca: Option<PathBuf>,
    /// Replace an XDP program already on the interface that the limiter did not attach.
    #[arg(long)]
    force: bool,
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
    /// converted to packets per window).
    #[arg(long, value_parser = |text: &str| parse_rate(text))]
    rate: Rate,
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
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|error| format!("invalid duration {text:?}: {error}; expected a value such as 100ms or 1s"))?;
    if duration < Duration::from_millis(1) || duration > Duration::from_secs(60) {
        return Err(format!("invalid duration {text:?}: expected between 1ms and 60s"));
    }
    Ok(duration)
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
            } = args;
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
                iface: iface.iface,
                mode,
                redis_urls: redis,
                redis_cluster,
                sync_interval,
                node_id,
                max_keys,
                redis_timeout,
                redis_ca,
                force,
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
            let LimitAddArgs { iface, rate, window, proto, port, prefix_v4, prefix_v6, per_port, store_down } = args;
            let window_ms = window.as_millis() as u64;
            let spec = RuleSpec {
                protocol: proto,
                port,
                rate: rate.per_window(window_ms)?,
                window_ms,
                ipv4_prefix_len: prefix_v4,
                ipv6_prefix_len: prefix_v6,
                per_port,
                store_down,
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
            println!("rule {}: {} limited to {} per {} per source", view.id, view.spec.describe_match(), view.spec.rate,
                format_window(Duration::from_millis(view.spec.window_ms)));
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
                print!("{}", format_rules(&rules));
            }
            Ok(())
        }
    }
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

fn format_rules(rules: &[RuleView]) -> String {
    let mut table = format!("{:>4}  {:<16} {:>12} {:>8} {:>7} {:>7} {:>8} {:>10} {:>9} {:>8} {:>10}\n", "id", "traffic",
        "rate", "window", "ipv4", "ipv6", "per-port", "store-down", "fallback", "gateways", "max-over");
    for rule in rules {
        table += &format!(
            "{:>4}  {:<16} {:>12} {:>8} {:>7} {:>7} {:>8} {:>10} {:>9} {:>8} {:>10}\n",
            rule.id,
            rule.spec.describe_match(),
            rule.spec.rate,
            format_window(Duration::from_millis(rule.spec.window_ms)),
            format!("/{}", rule.spec.ipv4_prefix_len),
            format!("/{}", rule.spec.ipv6_prefix_len),
            if rule.spec.per_port { "yes" } else { "no" },
            rule.spec.store_down.to_string(),
            rule.fallback_limit,
            rule.gateways,
            rule.max_over_admission,
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
