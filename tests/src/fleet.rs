//! A fleet of gateways for accuracy tests: each gateway is a veth pair with its own agent,
//! and one source address sends through every gateway from a namespace per gateway, so all
//! gateways count the same key. The agents share one redis-server.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    thread,
    time::{Duration, Instant},
};

use crate::{
    Agent, Netns, RedisServer, VethPair, free_port, subnet_addr, unique_name, unique_subnet,
    traffic::{Receiver, Received, send_scheduled},
};

/// Gateways, agents and the redis-server they share; everything is removed on drop.
pub struct Fleet {
    pub source_addr: Ipv4Addr,
    pub gateway_addrs: Vec<Ipv4Addr>,
    // Dropped in declaration order: agents first, then interfaces and namespaces.
    pub agents: Vec<Agent>,
    pub veths: Vec<VethPair>,
    pub namespaces: Vec<Netns>,
    pub redis: RedisServer,
}

impl Fleet {
    /// Starts `gateways` gateways with agents ticking every `sync_interval`, sharing a
    /// redis-server of the fleet's own.
    pub fn start(gateways: usize, sync_interval: &str) -> Self {
        Self::start_with_store(gateways, sync_interval, None)
    }

    /// Starts the fleet with agents that reach the store through `store_args` (such as
    /// `--redis URLS --redis-cluster`) instead of the fleet's own redis-server, which then
    /// stays idle.
    pub fn start_with_store(gateways: usize, sync_interval: &str, store_args: Option<Vec<String>>) -> Self {
        let redis = RedisServer::start();
        let store_args = store_args.unwrap_or_else(|| vec!["--redis".to_owned(), redis.url()]);
        let subnet = unique_subnet();
        let source_addr = subnet_addr(subnet, 200);
        let gateway_addrs: Vec<Ipv4Addr> = (0..gateways).map(|index| subnet_addr(subnet, 1 + index as u8)).collect();
        let namespaces: Vec<Netns> = (0..gateways).map(|_| Netns::new()).collect();
        let veths: Vec<VethPair> =
            namespaces.iter().zip(&gateway_addrs).map(|(netns, addr)| VethPair::new(netns, *addr, &[source_addr])).collect();
        let agents: Vec<Agent> = veths
            .iter()
            .enumerate()
            .map(|(index, veth)| {
                let node_id = format!("gw{index}-{}", unique_name("n"));
                let mut args: Vec<&str> = vec!["--sync-interval", sync_interval];
                args.extend(store_args.iter().map(String::as_str));
                Agent::start_with_args(&veth.host, &node_id, &args)
            })
            .collect();
        Self { source_addr, gateway_addrs, agents, veths, namespaces, redis }
    }

    /// Adds the same rule on every gateway through its agent.
    pub fn add_limit(&self, args: &[&str]) {
        for veth in &self.veths {
            let mut command = vec!["limit", "add", "--iface", veth.host.as_str()];
            command.extend_from_slice(args);
            Agent::cli(&command);
        }
    }

    /// Sends from the source through each gateway at the rates `schedule` gives over time,
    /// for `duration`, and returns what each gateway's receiver counted.
    pub fn run(&self, schedule: &Schedule, duration: Duration) -> Vec<Received> {
        let port = free_port();
        let start = Instant::now() + Duration::from_millis(200);
        let seconds = duration.as_secs() as usize;
        let receivers: Vec<Receiver> = self
            .gateway_addrs
            .iter()
            .map(|addr| Receiver::start(SocketAddrV4::new(*addr, port), start, seconds))
            .collect();
        let senders: Vec<_> = (0..self.gateway_addrs.len())
            .map(|gateway| {
                let netns_path = format!("/var/run/netns/{}", self.namespaces[gateway].name);
                let source = self.source_addr;
                let destination = SocketAddrV4::new(self.gateway_addrs[gateway], port);
                let steps: Vec<(Duration, u64)> =
                    schedule.steps.iter().map(|(at, rates)| (*at, rates[gateway])).collect();
                // Two CPUs on the test machine: spread the senders over both.
                let cpu = gateway % 2;
                thread::spawn(move || send_scheduled(&netns_path, source, cpu, destination, &steps, start, duration))
            })
            .collect();
        for sender in senders {
            sender.join().expect("sender thread panicked");
        }
        thread::sleep(Duration::from_millis(200));
        receivers.into_iter().map(Receiver::finish).collect()
    }
}

/// Packets per second per gateway, changing at given times since the start.
pub struct Schedule {
    /// (time since start, rate per gateway), in order of time; the first entry is at zero.
    pub steps: Vec<(Duration, Vec<u64>)>,
}

/// Returns the fleet total per bucket of `bucket` length, from every receiver's arrivals of
/// `source`.
pub fn fleet_totals(received: &[Received], source: Ipv4Addr, bucket: Duration, buckets: usize) -> Vec<u64> {
    let mut totals = vec![0u64; buckets];
    for receiver in received {
        for (addr, at) in &receiver.arrivals {
            if *addr != source {
                continue;
            }
            let index = (at.as_secs_f64() / bucket.as_secs_f64()) as usize;
            if index < buckets {
                totals[index] += 1;
            }
        }
    }
    totals
}
