//! A throwaway Redis Cluster on loopback: three masters with one replica each, made with
//! `redis-cli --cluster create`, killed and deleted on drop.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{free_port, redis_command as command, run, unique_name, wait_until};

/// Nodes of the cluster: three masters and three replicas.
const NODES: usize = 6;

/// A Redis Cluster of six redis-server processes.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    children: Vec<Child>,
    dir: PathBuf,
}

impl RedisCluster {
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(unique_name("lrc"));
        std::fs::create_dir_all(&dir).unwrap_or_else(|error| panic!("failed to create {}: {error}", dir.display()));
        let mut cluster = Self { ports: Vec::new(), children: Vec::new(), dir };

        // Step 1: six servers in cluster mode, each with its own node file.
        for _ in 0..NODES {
            let port = free_port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .arg("--dir")
                .arg(&cluster.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|error| panic!("failed to start redis-server (is it installed?): {error}"));
            cluster.ports.push(port);
            cluster.children.push(child);
        }
        for port in cluster.ports.clone() {
            wait_until(&format!("redis-server on port {port} to answer PING"), Duration::from_secs(10), || {
                command(port, "PING").contains("PONG")
            });
        }

        // Step 2: join them into a cluster, the first three as masters.
        let addresses: Vec<String> = cluster.ports.iter().map(|port| format!("127.0.0.1:{port}")).collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addresses.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"]);
        run("redis-cli", &args);
        for port in cluster.ports.clone() {
            wait_until(&format!("cluster node on port {port} to report cluster_state:ok"), Duration::from_secs(20), || {
                command(port, "CLUSTER INFO").contains("cluster_state:ok")
            });
        }
        // Replicas are announced by gossip, after the slots are: wait until the first node
        // lists all three, since failover tests look them up there.
        wait_until("the first node to list three replicas", Duration::from_secs(20), || {
            command(cluster.ports[0], "CLUSTER NODES").lines().filter(|line| line.contains(" slave ")).count() == NODES / 2
        });
        cluster
    }

    /// Returns the URLs of every node, for `--redis` with `--redis-cluster`.
    pub fn urls(&self) -> Vec<String> {
        self.ports.iter().map(|port| format!("redis://127.0.0.1:{port}")).collect()
    }

    /// Returns the port of the master that owns the slot of `key`, and of one of its replicas.
    pub fn master_and_replica_of(&self, key: &str) -> (u16, u16) {
        let slot: u64 = integer(&command(self.ports[0], &format!("CLUSTER KEYSLOT {key}")));
        let nodes = command(self.ports[0], "CLUSTER NODES");
        // Lines: id address flags master-id ping pong epoch state slot-ranges...
        let mut master: Option<(String, u16)> = None;
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") {
                continue;
            }
            let owns = fields[8..].iter().any(|range| {
                let (start, end) = range.split_once('-').unwrap_or((range, range));
                match (start.parse::<u64>(), end.parse::<u64>()) {
                    (Ok(start), Ok(end)) => (start..=end).contains(&slot),
                    _ => false,
                }
            });
            if owns {
                master = Some((fields[0].to_owned(), port_of(fields[1])));
            }
        }
        let (master_id, master_port) = master.unwrap_or_else(|| panic!("no master owns slot {slot}: {nodes}"));
        let replica_port = nodes
            .lines()
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
            .find(|fields| fields.len() >= 4 && fields[2].contains("slave") && fields[3] == master_id)
            .map(|fields| port_of(fields[1]))
            .unwrap_or_else(|| panic!("master {master_id} has no replica: {nodes}"));
        (master_port, replica_port)
    }

    /// Promotes the replica on `port` with CLUSTER FAILOVER, which it coordinates with its
    /// master, and waits until it reports itself as master.
    pub fn fail_over_to(&self, port: u16) {
        let reply = command(port, "CLUSTER FAILOVER");
        assert!(reply.contains("OK"), "CLUSTER FAILOVER on port {port} replied {reply:?}");
        wait_until(&format!("node on port {port} to become master"), Duration::from_secs(10), || {
            command(port, "ROLE").contains("master")
        });
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn integer(reply: &str) -> u64 {
    reply.trim().trim_start_matches(':').parse().unwrap_or_else(|_| panic!("expected an integer reply, got {reply:?}"))
}

/// Returns the port of a CLUSTER NODES address such as `127.0.0.1:7000@17000`.
fn port_of(address: &str) -> u16 {
    let host_port = address.split('@').next().unwrap_or(address);
    host_port.rsplit(':').next().and_then(|port| port.parse().ok()).unwrap_or_else(|| panic!("no port in {address:?}"))
}
