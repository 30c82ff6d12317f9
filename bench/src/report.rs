//! Renders a run's report as BENCHMARKS.md: machine, commands, one section per part with its
//! tables, the ratios against the baselines of the same run, and the targets met or missed.

use std::fmt::Write as _;

use crate::{
    Report, accuracy::Accuracy, plot, redis_throughput::RedisThroughput, tick::TickCost,
    veth_path::VethPath, xdp_cost::XdpCost,
};

/// Targets stated for each figure, checked against the run's ratios.
const HOT_KEY_TARGET: f64 = 1.5;
const MANY_KEYS_TARGET: f64 = 1.2;
const KEYS_PER_SECOND_TARGET: f64 = 10.0;
const COMMANDS_PER_MILLION_TARGET: u64 = 100;
const TICK_100K_TARGET_MS: f64 = 100.0;
const TICK_1M_TARGET_MS: f64 = 1000.0;

pub fn render(report: &Report) -> String {
    let mut out = String::new();
    out.push_str("# Benchmarks\n\n");
    out.push_str(
        "Written by `cargo xtask bench` (the `limiter-bench` binary in `bench/`); the same figures are in \
         `target/bench/report.json`. Every figure below comes from one run on the machine described here, and \
         every ratio is against a baseline measured in that run. Nothing in the test suite checks timings.\n\n",
    );
    render_machine(report, &mut out);
    if let Some(xdp) = &report.xdp_cost {
        render_xdp(xdp, &mut out);
    }
    if let Some(redis) = &report.redis_throughput {
        render_redis(redis, &mut out);
    }
    if let Some(tick) = &report.tick {
        render_tick(tick, &mut out);
    }
    if let Some(accuracy) = &report.accuracy {
        render_accuracy(accuracy, &mut out);
    }
    render_missing(report, &mut out);
    out
}

fn render_machine(report: &Report, out: &mut String) {
    out.push_str("## Machine and commands\n\n");
    if let Some(machine) = &report.machine {
        let _ = writeln!(out, "| fact | value |\n| --- | --- |");
        let _ = writeln!(out, "| `nproc` | {} |", machine.nproc);
        let _ = writeln!(out, "| `uname -r` | {} |", machine.kernel);
        let _ = writeln!(out, "| CPU (/proc/cpuinfo) | {} |", machine.cpu_model);
        let _ = writeln!(out, "| run started | {} |", machine.started_at);
        let _ = writeln!(out, "| commit | {} |\n", machine.commit);
    }
    out.push_str(
        "```sh\ncargo xtask bench                  # setup, build, then: cargo run --release -p limiter-bench\n\
         cargo xtask bench -- --quick       # small key counts, writes only under target/bench\n\
         cargo xtask bench -- --parts tick  # some parts: xdp-cost, redis-throughput, tick, accuracy, veth-path\n```\n\n",
    );
    if report.scale.is_some_and(|scale| scale.quick) {
        out.push_str("**This was a `--quick` run: key counts and durations are smaller than those described below.**\n\n");
    }
    out.push_str(
        "The machine's CPUs may be shared with other work while the benchmark runs (on the development \
         machines they are), which moves single figures by a few percent; the baselines run interleaved \
         with the limiter so that such noise reaches both.\n\n",
    );
}

fn render_xdp(xdp: &XdpCost, out: &mut String) {
    out.push_str("## 1. XDP cost per packet (BPF_PROG_TEST_RUN)\n\n");
    let _ = writeln!(
        out,
        "Three programs are loaded side by side, all from `bench-ebpf/` but the limiter. `xdp-drop` returns \
         XDP_DROP without reading the frame. `xdp-count` reads the IPv4 source, counts it in a per-CPU LRU \
         hash and drops the frame. The limiter has one rule for all traffic keyed by /32 and, for every key, \
         a grant that never runs out, so each packet takes the production path: parse, rule lookup, counter, \
         grant, verdict statistics. All runs are on one pinned CPU, with a 42-byte IPv4/UDP frame.\n"
    );
    let _ = writeln!(
        out,
        "**Hot key.** One frame, `repeat = {}` per call, median of {} calls per program, interleaved. The \
         kernel returns the mean in whole nanoseconds, so the wall time of the call divided by `repeat` is \
         given as a finer check.\n",
        xdp.repeat, xdp.runs
    );
    out.push_str(
        "| program | ns/packet (kernel, median) | kernel, min-max over calls | ns/packet (wall) |\n\
         | --- | ---: | ---: | ---: |\n",
    );
    let rows = [
        (
            "xdp-drop",
            xdp.hot_key_kernel_ns.xdp_drop,
            xdp.hot_key_kernel_min_ns.xdp_drop,
            xdp.hot_key_kernel_max_ns.xdp_drop,
            xdp.hot_key_wall_ns.xdp_drop,
        ),
        (
            "xdp-count",
            xdp.hot_key_kernel_ns.xdp_count,
            xdp.hot_key_kernel_min_ns.xdp_count,
            xdp.hot_key_kernel_max_ns.xdp_count,
            xdp.hot_key_wall_ns.xdp_count,
        ),
        (
            "limiter",
            xdp.hot_key_kernel_ns.limiter,
            xdp.hot_key_kernel_min_ns.limiter,
            xdp.hot_key_kernel_max_ns.limiter,
            xdp.hot_key_wall_ns.limiter,
        ),
        (
            "limiter, rule found at the first lookup",
            xdp.hot_key_first_lookup_kernel_ns,
            xdp.hot_key_first_lookup_min_ns,
            xdp.hot_key_first_lookup_max_ns,
            f64::NAN,
        ),
    ];
    for (name, kernel, min, max, wall) in rows {
        let wall = if wall.is_nan() {
            "not measured".to_owned()
        } else {
            format!("{wall:.1}")
        };
        let _ = writeln!(out, "| {name} | {kernel:.0} | {min:.0}-{max:.0} | {wall} |");
    }
    let wall_ratio = crate::ratio(xdp.hot_key_wall_ns.limiter, xdp.hot_key_wall_ns.xdp_count);
    let _ = writeln!(
        out,
        "\nlimiter / xdp-count: **{:.2}x** (kernel), {wall_ratio:.2}x (wall); limiter / xdp-drop: {:.2}x. \
         Target at most {HOT_KEY_TARGET}x: **{}**.\n",
        xdp.hot_key_limiter_vs_count,
        xdp.hot_key_limiter_vs_drop,
        met(xdp.hot_key_limiter_vs_count <= HOT_KEY_TARGET),
    );
    let _ = writeln!(
        out,
        "The limiter looks up rules from the most specific (protocol and port) to the least (any \
         traffic), skipping the kinds that the RULE_INDEX map says do not exist, as `limiter limit add` \
         keeps it; under the one rule for all traffic that is a single lookup. The last row adds a rule \
         for exactly the packet's traffic (UDP port 53), found at the first lookup: {:.0} ns, **{:.2}x** \
         xdp-count ({}). Compare the two limiter rows with their spread between calls before reading a \
         difference into them.\n",
        xdp.hot_key_first_lookup_kernel_ns,
        xdp.hot_key_first_lookup_vs_count,
        met(xdp.hot_key_first_lookup_vs_count <= HOT_KEY_TARGET),
    );
    let _ = writeln!(
        out,
        "Where the difference comes from, estimated from these figures rather than profiled: `xdp-count` \
         makes one hash lookup per packet, and costs {:.0} ns more than `xdp-drop`. The limiter makes three \
         (one in RULES here, then COUNTERS and GRANTS) plus an array read of RULE_INDEX, reads the clock, \
         and counts the verdict in STATS, so it pays for about two such lookups more.\n",
        xdp.hot_key_kernel_ns.xdp_count - xdp.hot_key_kernel_ns.xdp_drop,
    );

    let _ = writeln!(
        out,
        "**Many keys.** BPF_PROG_TEST_RUN repeats a single frame, so {} distinct sources (10.0.0.1 upwards) \
         take one call each, with `repeat = 1`. A first pass creates every key (\"new key\"). A second pass \
         runs every key again in a map that holds them all (\"known key\"). Each figure is the mean of the \
         kernel's durations over the pass. The limiter's maps and `xdp-count`'s map both keep an LRU list per \
         CPU, each sized for 1,048,576 keys, since every run is on one CPU. With one repetition per call, each duration also contains the kernel's clock reads around the \
         run; `xdp-drop` measures that floor, so the ratio above the floor is given too.\n",
        xdp.distinct_keys
    );
    out.push_str(
        "| program | new key, ns/packet | known key, ns/packet |\n| --- | ---: | ---: |\n",
    );
    let rows = [
        (
            "xdp-drop",
            xdp.new_key_ns.xdp_drop,
            xdp.many_keys_ns.xdp_drop,
        ),
        (
            "xdp-count",
            xdp.new_key_ns.xdp_count,
            xdp.many_keys_ns.xdp_count,
        ),
        ("limiter", xdp.new_key_ns.limiter, xdp.many_keys_ns.limiter),
    ];
    for (name, new_key, known) in rows {
        let _ = writeln!(out, "| {name} | {new_key:.1} | {known:.1} |");
    }
    let _ = writeln!(
        out,
        "\nKnown keys, limiter / xdp-count: **{:.2}x**; above the `xdp-drop` floor: {:.2}x. Target at most \
         {MANY_KEYS_TARGET}x: **{}** (raw ratio), **{}** (above the floor). The limiter's COUNTERS held {} keys \
         afterwards.\n",
        xdp.many_keys_limiter_vs_count,
        xdp.many_keys_limiter_vs_count_above_floor,
        met(xdp.many_keys_limiter_vs_count <= MANY_KEYS_TARGET),
        met(xdp.many_keys_limiter_vs_count_above_floor <= MANY_KEYS_TARGET),
        xdp.limiter_keys_held,
    );
}

fn render_redis(redis: &RedisThroughput, out: &mut String) {
    out.push_str("## 3. Redis: keys reconciled per second, and commands per million packets\n\n");
    let _ = writeln!(
        out,
        "Each design runs against its own throwaway `redis-server` on loopback.\n\n\
         - **Batched (the agent's design).** {} keys, {} rounds. Each round is one tick: keys grouped by \
         rule and bucket as the agent groups them, at most 512 per call, each group calling `Store::sync` \
         (lua/sync.lua) then `Store::reserve` (lua/reserve.lua), all groups in flight together over one \
         connection. A key reconciled is one key's delta added to the fleet counts and its lease recorded.\n\
         - **Naive.** One EVALSHA per packet of a sliding-window script, `NAIVE_SCRIPT` in \
         `bench/src/redis_throughput.rs` (TIME, two GETs, INCR, PEXPIRE). {} concurrent clients call it, each \
         on its own connection and waiting for each reply, as a gateway that asks Redis before passing a \
         packet would. Each call reconciles one key for one packet.\n",
        redis.batched_keys, redis.batched_rounds, redis.naive_clients
    );

    out.push_str("| design | keys reconciled | script calls | seconds | keys/s |\n| --- | ---: | ---: | ---: | ---: |\n");
    let _ = writeln!(
        out,
        "| batched | {} | {} | {:.2} | {:.0} |",
        redis.batched_keys * redis.batched_rounds,
        redis.batched_script_calls,
        redis.batched_seconds,
        redis.batched_keys_per_second
    );
    let _ = writeln!(
        out,
        "| naive | {} | {} | {:.2} | {:.0} |",
        redis.naive_calls, redis.naive_calls, redis.naive_seconds, redis.naive_keys_per_second
    );
    let _ = writeln!(
        out,
        "\nBatched / naive keys/s: **{:.1}x**. Target at least {KEYS_PER_SECOND_TARGET}x: **{}**. Counting \
         packets instead (a key reconciled covers 100 packets in the assumption below, a naive call one): \
         {:.0}x.\n",
        redis.keys_per_second_vs_naive,
        met(redis.keys_per_second_vs_naive >= KEYS_PER_SECOND_TARGET),
        redis.packets_per_second_vs_naive,
    );

    let _ = writeln!(
        out,
        "**Commands per million packets** at 10,000 active keys, assuming each key sees 100 packets per tick, \
         so one tick covers 1,000,000 packets. Counted with INFO commandstats around the second tick on a fresh \
         server (the first loads the scripts). INFO commandstats counts the commands a script runs under their \
         own names, so two figures are given: calls that start scripts, and all commands.\n"
    );
    out.push_str("| design | script calls per 1M packets | all commands per 1M packets |\n| --- | ---: | ---: |\n");
    let _ = writeln!(
        out,
        "| batched | {} | {} |",
        redis.batched_script_calls_per_million_packets, redis.batched_commands_per_million_packets
    );
    let _ = writeln!(
        out,
        "| naive | {} | {} |",
        redis.naive_script_calls_per_million_packets, redis.naive_commands_per_million_packets
    );

    let stats: Vec<String> = redis
        .batched_commandstats
        .iter()
        .map(|(name, calls)| format!("{name} {calls}"))
        .collect();
    let _ = writeln!(
        out,
        "\nBatched tick, by command: {}. Target at most {COMMANDS_PER_MILLION_TARGET} commands per million \
         packets: **{}** for calls that start scripts, **{}** counting every command scripts run.",
        stats.join(", "),
        met(redis.batched_script_calls_per_million_packets <= COMMANDS_PER_MILLION_TARGET),
        met(redis.batched_commands_per_million_packets <= COMMANDS_PER_MILLION_TARGET),
    );
    let _ = write!(
        out,
        "A tick makes two script calls per group of at most `MAX_KEYS_PER_CALL` keys with traffic (sync, then \
         reserve), and 10,000 keys fill all {buckets} buckets of a rule (`store::BUCKETS`), so the call count of \
         a tick of one rule depends on its keys, not its packets. Per million packets it falls with more \
         packets per key and rises with more rules. The agent's heartbeat adds one call per tick, not counted \
         here. Inside the scripts, each key costs a few hash commands (a HINCRBY of its count, HGETs of the \
         previous window and of the leases in sync.lua, and a HGET and HSET of the leases in reserve.lua), \
         which is why all commands scale with keys rather than packets: no design that keeps per-key leases \
         can reach 100 of those per million packets at 10,000 keys.\n\n",
        buckets = limiter_user::store::BUCKETS,
    );
}

fn render_tick(tick: &TickCost, out: &mut String) {
    out.push_str("## 4. Agent tick duration and CPU\n\n");
    let _ = writeln!(
        out,
        "For each key count, the limiter is loaded into a fresh pin folder, and COUNTERS is filled from user \
         space with that many /32 keys of one rule (100 packets each, spread over the CPUs). A `Reconciler` \
         (`limiter_user::reconcile`, {} ms interval) runs against a throwaway `redis-server`: a first tick in \
         which every key is new, then, after 100 more packets are written to every key, the steady tick, \
         which the targets apply to. Agent CPU is user plus system time of the benchmark process (getrusage, all threads); Redis CPU \
         is `used_cpu_user + used_cpu_sys` from INFO cpu. Store calls may wait 30 s here, against the agent's \
         default of 50 ms.\n",
        tick.interval_ms
    );
    out.push_str(
        "| keys | tick | wall ms | agent CPU ms | Redis CPU ms | keys synced | script calls | failed calls |\n\
         | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for run in &tick.runs {
        for (name, figures) in [("first", &run.first_tick), ("steady", &run.steady_tick)] {
            let _ = writeln!(
                out,
                "| {} | {name} | {:.1} | {:.1} | {:.1} | {} | {} | {} |",
                run.keys,
                figures.wall_ms,
                figures.agent_cpu_ms,
                figures.redis_cpu_ms,
                figures.keys_synced,
                figures.script_calls,
                figures.failed_calls
            );
        }
    }
    out.push('\n');
    for run in &tick.runs {
        let keys = f64::from(run.keys.max(1));
        let _ = writeln!(
            out,
            "- {} keys: reading COUNTERS in batches takes {:.1} ms ({:.2} µs per key), {:.2}x the {:.1} ms of a \
             walk key by key; Redis spends {:.2} µs of CPU per key in the steady tick, and the agent process {:.2} µs.",
            run.keys,
            run.counters_batch_ms,
            run.counters_batch_ms * 1e3 / keys,
            run.counters_batch_ms / run.counters_walk_ms.max(1e-9),
            run.counters_walk_ms,
            run.steady_tick.redis_cpu_ms * 1e3 / keys,
            run.steady_tick.agent_cpu_ms * 1e3 / keys,
        );
    }
    for (keys, target) in [
        (100_000, TICK_100K_TARGET_MS),
        (1_000_000, TICK_1M_TARGET_MS),
    ] {
        if let Some(run) = tick.runs.iter().find(|run| run.keys == keys) {
            let _ = writeln!(
                out,
                "- {keys} keys: steady tick {:.0} ms, target at most {target:.0} ms: **{}**.",
                run.steady_tick.wall_ms,
                met(run.steady_tick.wall_ms <= target)
            );
        }
    }
    for run in &tick.runs {
        if let Some(error) = &run.steady_tick.first_error {
            let _ = writeln!(
                out,
                "- {} keys: first store error of the steady tick: {error}",
                run.keys
            );
        }
    }
    out.push_str(
        "\nThe tick reads COUNTERS and writes GRANTS with `BPF_MAP_LOOKUP_BATCH` and `BPF_MAP_UPDATE_BATCH` \
         (`limiter-user/src/batch.rs`; aya 0.14 has no batched operations for per-CPU hash maps), but still \
         sends every key with new traffic to Redis, so its wall time grows linearly with keys. Redis runs the scripts on one thread, so its CPU time \
         per key times the key count is a floor under the tick that no change in the agent removes. Meeting \
         the targets needs less work per key in lua/sync.lua and lua/reserve.lua, or keys spread over \
         several Redis servers.\n\n",
    );
}

fn render_accuracy(accuracy: &Accuracy, out: &mut String) {
    out.push_str("## 5. Accuracy: three gateways, one limit\n\n");
    let _ = writeln!(
        out,
        "`limiter_tests::fleet::Fleet`: three veth pairs, each with its own agent ticking every {} ms, sharing \
         one `redis-server`; one source address sends real UDP packets through all three from network \
         namespaces. Limit {}/s (`--rate {}/s --proto udp`). Offered: 10,000/s split 60/30/10 for {} s, then \
         all 10,000/s through the third gateway for {} s. Offered figures are the senders' schedule; passed \
         figures are what arrived behind each gateway.\n",
        accuracy.sync_interval_ms,
        accuracy.limit_per_second,
        accuracy.limit_per_second,
        accuracy.split_seconds,
        accuracy.moved_seconds
    );
    out.push_str(
        "| second | offered gw1 | offered gw2 | offered gw3 | passed gw1 | passed gw2 | passed gw3 | passed total | over limit |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for (second, total) in accuracy.passed_total.iter().enumerate() {
        let cell = |rows: &[Vec<u64>], gateway: usize| {
            rows.get(gateway)
                .and_then(|row| row.get(second))
                .copied()
                .unwrap_or(0)
        };
        let _ = writeln!(
            out,
            "| {second} | {} | {} | {} | {} | {} | {} | {total} | {} |",
            cell(&accuracy.offered_per_gateway, 0),
            cell(&accuracy.offered_per_gateway, 1),
            cell(&accuracy.offered_per_gateway, 2),
            cell(&accuracy.passed_per_gateway, 0),
            cell(&accuracy.passed_per_gateway, 1),
            cell(&accuracy.passed_per_gateway, 2),
            accuracy.over_admission.get(second).copied().unwrap_or(0),
        );
    }
    let _ = writeln!(
        out,
        "\nOver-admission per second, all seconds: max {}, mean {:.1} packets. From second 2 on (after the new \
         key's start-up, see the README's \"A new key's first two seconds\"): max {}, mean {:.1}; the fleet \
         passed {:.3}x the limit on average.\n",
        accuracy.max_over_admission,
        accuracy.mean_over_admission,
        accuracy.steady_max_over_admission,
        accuracy.steady_mean_over_admission,
        accuracy.steady_mean_passed_vs_limit,
    );
    let _ = writeln!(
        out,
        "![offered and passed packets per second]({})\n\n\
         The plot has no text. Both panels share the time axis, one vertical grid line per second. Top: \
         offered packets per second; horizontal grid lines every 1000/s. Bottom: passed packets per second, \
         with the limit as a thick grey line; horizontal grid lines every 250/s. In both, gateway 1 is red, \
         gateway 2 blue, gateway 3 green and the fleet total black, each second's figure drawn at the middle \
         of that second.\n",
        plot::ACCURACY_PLOT
    );
}

fn render_veth(veth: &VethPath, out: &mut String) {
    out.push_str("## 2. Packet path on a veth pair\n\n");
    let _ = writeln!(
        out,
        "Both ends of one veth pair in network namespaces of their own. A sender thread pinned to one CPU \
         writes 42-byte IPv4/UDP frames from {} source addresses, round robin, through an AF_PACKET socket \
         as fast as it can for {:.0} s. On a veth pair the receiving side runs in the softirq of the sending \
         CPU, so the rate the sender reaches is the rate of the whole path, and a more expensive receiver \
         shows as fewer packets sent. Each per-source limiter allows {}/s per source (burst {} for nftables \
         and hashlimit), so most packets are dropped; the table gives each receiver's own counts. The limiter runs without an agent, on its \
         fallback limit, as after `limiter attach`. XDP programs are attached in native mode.\n",
        veth.sources, veth.seconds, veth.limit_per_second, veth.limit_per_second
    );
    out.push_str(
        "| receiver | packets/s sent | vs xdp-drop | dropped (its count) | passed (its count) | refused by veth |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for run in &veth.runs {
        let count = |value: Option<u64>| {
            value.map_or_else(|| "not counted".to_owned(), |value| value.to_string())
        };
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.2}x | {} | {} | {} |",
            run.receiver.name(),
            run.sent_per_second,
            run.vs_xdp_drop,
            count(run.dropped),
            count(run.passed),
            run.send_failures
        );
    }
    out.push_str(
        "\nThe sender's own cost (an AF_PACKET send per frame) is in every figure, so these are ratios \
         between receivers at one sender, not the line rate of any of them. Drops by nftables and iptables \
         happen after the kernel has allocated a socket buffer for the frame, and hashlimit's after IPv4 \
         header validation as well. On a veth pair, though, frames sent from a socket already are socket \
         buffers when the XDP program runs on them, so here XDP does not skip that allocation as it does in a \
         NIC driver. The order of the limiter and nftables in this table therefore says little about a NIC.\n\n",
    );
}

fn render_missing(report: &Report, out: &mut String) {
    if let Some(veth) = &report.veth_path {
        render_veth(veth, out);
    } else {
        render_veth_missing(out);
    }
    render_failures(report, out);
}

fn render_veth_missing(out: &mut String) {
    out.push_str("## 2. Packet path on a veth pair (not measured in this run)\n\n");
    out.push_str(
        "This run did not include the veth part (`--parts veth-path`), which compares the packets per \
         second a flood through a veth pair reaches with the limiter, a bare XDP_DROP program, an nftables \
         per-source limit and iptables hashlimit as the receiver.\n\n",
    );
}

fn render_failures(report: &Report, out: &mut String) {
    if !report.failures.is_empty() || !report.skipped.is_empty() {
        out.push_str("## Parts that did not run\n\n");
        for (part, error) in &report.failures {
            let _ = writeln!(out, "- {part:?} failed: {error}");
        }
        for part in &report.skipped {
            let _ = writeln!(out, "- {part:?} was not selected with --parts");
        }
        out.push('\n');
    }
}

fn met(condition: bool) -> &'static str {
    if condition { "met" } else { "not met" }
}
