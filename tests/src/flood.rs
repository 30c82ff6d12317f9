//! A gateway in a network namespace of its own, and a flood of frames from spoofed sources.
//!
//! Spoofed sources get replies that must never leave the machine: ICMP errors, and
//! connection tracking entries in whatever namespace the frames reach. So the flooded gateway
//! is not the current namespace: its veth end, its agent, and its redis-server all live in
//! a namespace whose only link is the veth pair to the senders' namespace. The agent enters
//! that namespace's network only (nsenter --net), so it shares the pin folder in
//! /sys/fs/bpf and the control socket folder in /run with the test.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{
    Agent, Netns, limiter_binary, redis_command, run, subnet_addr, unique_name, unique_subnet,
    test_run::Frame,
    traffic::{enter_netns, pin_to_cpu, stop_requested},
    wait_until,
};

/// Port of the gateway's redis-server, on the gateway namespace's own loopback.
const REDIS_PORT: u16 = 6379;

/// A gateway namespace with a veth pair to a senders' namespace and a redis-server.
pub struct IsolatedGateway {
    /// The veth end the XDP program goes on, inside `gateway`.
    pub iface: String,
    /// The senders' end, inside `senders`.
    pub peer: String,
    pub gateway_addr: Ipv4Addr,
    pub gateway_mac: [u8; 6],
    // Dropped in declaration order: the server first, then the namespaces, which take the
    // veth pair with them.
    redis: Child,
    pub gateway: Netns,
    pub senders: Netns,
}

impl IsolatedGateway {
    /// Creates both namespaces and the pair, with the gateway at host 1 of a fresh /24 and
    /// the senders at `source_hosts` of it, and starts the redis-server.
    pub fn new(source_hosts: &[u8]) -> Self {
        let gateway = Netns::new();
        let senders = Netns::new();
        let subnet = unique_subnet();
        let gateway_addr = subnet_addr(subnet, 1);
        let iface = unique_name("lgi");
        let peer = unique_name("lgp");
        run("ip", &["link", "add", &iface, "netns", &gateway.name, "type", "veth", "peer", "name", &peer, "netns", &senders.name]);
        run("ip", &["-n", &gateway.name, "addr", "add", &format!("{gateway_addr}/24"), "dev", &iface]);
        run("ip", &["-n", &gateway.name, "link", "set", "lo", "up"]);
        run("ip", &["-n", &gateway.name, "link", "set", &iface, "up"]);
        for host in source_hosts {
            let addr = subnet_addr(subnet, *host);
            run("ip", &["-n", &senders.name, "addr", "add", &format!("{addr}/24"), "dev", &peer]);
        }
        run("ip", &["-n", &senders.name, "link", "set", &peer, "up"]);
        let gateway_mac = link_mac(&gateway.name, &iface);
        let mac_text = gateway_mac.iter().map(|byte| format!("{byte:02x}")).collect::<Vec<_>>().join(":");
        run("ip", &["-n", &senders.name, "neigh", "replace", &gateway_addr.to_string(), "lladdr", &mac_text, "dev", &peer, "nud", "permanent"]);

        let redis = in_netns_command(&gateway.name, "redis-server")
            .args(["--port", &REDIS_PORT.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("failed to start redis-server in {}: {error}", gateway.name));
        let isolated = Self { iface, peer, gateway_addr, gateway_mac, redis, gateway, senders };
        wait_until("the gateway's redis-server to answer PING", Duration::from_secs(10), || {
            isolated.redis_command("PING").contains("PONG")
        });
        isolated
    }

    /// Address of host `host` in the pair's subnet, such as a sender's.
    pub fn host_addr(&self, host: u8) -> Ipv4Addr {
        let [a, b, c, _] = self.gateway_addr.octets();
        Ipv4Addr::new(a, b, c, host)
    }

    /// URL of the redis-server, as seen from inside the gateway namespace.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{REDIS_PORT}")
    }

    /// Runs `work` on a thread inside the gateway namespace; threads it starts stay there.
    pub fn in_gateway<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.gateway.name);
        thread::spawn(move || {
            enter_netns(&path);
            work()
        })
        .join()
        .expect("thread in the gateway namespace panicked")
    }

    /// Sends one inline command to the gateway's redis-server.
    pub fn redis_command(&self, line: &str) -> String {
        let line = line.to_owned();
        self.in_gateway(move || redis_command(REDIS_PORT, &line))
    }

    /// Starts an agent on the gateway's veth end, inside the gateway namespace, with its
    /// log (standard error) going to `log`.
    pub fn start_agent(&self, node_id: &str, args: &[&str], log: std::fs::File) -> Agent {
        let child = in_netns_command(&self.gateway.name, limiter_binary().to_str().expect("UTF-8 path"))
            .args(["agent", "--iface", &self.iface, "--node-id", node_id, "--redis", &self.redis_url()])
            .args(args)
            .env("RUST_LOG", "info")
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|error| panic!("failed to start limiter agent: {error}"));
        Agent::adopt_child(&self.iface, child)
    }

    /// Runs a `limiter` CLI command inside the gateway namespace and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let limiter = limiter_binary();
        let mut full = vec![format!("--net=/var/run/netns/{}", self.gateway.name), limiter.to_str().expect("UTF-8 path").to_owned()];
        full.extend(args.iter().map(|arg| (*arg).to_owned()));
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        run("nsenter", &full)
    }
}

impl Drop for IsolatedGateway {
    fn drop(&mut self) {
        let _ = self.redis.kill();
        let _ = self.redis.wait();
        // The namespaces take the veth pair with them; the pins of the limiter attached to
        // it live in the shared /sys/fs/bpf and are removed here.
        let _ = limiter_user::datapath::remove_pins(&limiter_user::datapath::pin_dir(&self.iface));
    }
}

/// Returns a command that runs `program` in the network namespace `netns` only. It keeps
/// the test's mounts, so /sys/fs/bpf and /run are the ones the test uses.
fn in_netns_command(netns: &str, program: &str) -> Command {
    let mut command = Command::new("nsenter");
    command.arg(format!("--net=/var/run/netns/{netns}")).arg(program);
    command
}

/// Reads the MAC address of `iface` in `netns`.
fn link_mac(netns: &str, iface: &str) -> [u8; 6] {
    let output = run("ip", &["-n", netns, "-json", "link", "show", "dev", iface]);
    let links: serde_json::Value = serde_json::from_str(&output).expect("`ip -json link show` printed JSON");
    let text = links[0]["address"].as_str().expect("the link has an address");
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(part, 16).expect("MAC address in hex");
    }
    mac
}

/// A flood of IPv4/UDP frames, one per spoofed source, written through an AF_PACKET socket.
#[derive(Clone, Debug)]
pub struct SpoofedFlood {
    /// Namespace and link the frames leave from.
    pub netns: String,
    pub iface: String,
    pub destination_mac: [u8; 6],
    pub destination: SocketAddrV4,
    /// First source address; each frame takes the next one, `sources` in all, then wraps.
    pub first_source: Ipv4Addr,
    pub sources: u32,
    pub packets_per_second: u64,
    pub cpu: usize,
}

impl SpoofedFlood {
    /// Sends paced frames for `duration` from a thread in the flood's namespace. Returns
    /// the frames sent.
    pub fn spawn(self, duration: Duration) -> thread::JoinHandle<u64> {
        thread::spawn(move || {
            enter_netns(&format!("/var/run/netns/{}", self.netns));
            pin_to_cpu(self.cpu);
            let socket = packet_socket(&self.iface);
            let mut frame = Frame::ipv4(self.first_source, *self.destination.ip()).udp(40_000, self.destination.port()).build();
            frame[..6].copy_from_slice(&self.destination_mac);
            let first = u32::from(self.first_source);
            let started = Instant::now();
            let mut sent = 0u64;
            // Bounded by `duration`; the pace is checked every 64 frames.
            while started.elapsed() < duration && !stop_requested() {
                let due = (started.elapsed().as_secs_f64() * self.packets_per_second as f64) as u64;
                if sent >= due {
                    thread::sleep(Duration::from_micros(200));
                    continue;
                }
                for _ in 0..(due - sent).min(64) {
                    let source = Ipv4Addr::from(first.wrapping_add((sent % u64::from(self.sources)) as u32));
                    set_ipv4_source(&mut frame, source);
                    // SAFETY: the socket is open and `frame` is a live buffer of the given length.
                    unsafe { libc::send(socket.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
                    sent += 1;
                }
            }
            sent
        })
    }
}

/// Writes `source` into an untagged IPv4 frame and recomputes the header checksum.
pub fn set_ipv4_source(frame: &mut [u8], source: Ipv4Addr) {
    frame[26..30].copy_from_slice(&source.octets());
    frame[24..26].copy_from_slice(&[0, 0]);
    let checksum = ipv4_header_checksum(&frame[14..34]);
    frame[24..26].copy_from_slice(&checksum.to_be_bytes());
}

/// Returns the RFC 791 checksum of an IPv4 header whose checksum field is zero.
pub fn ipv4_header_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header.chunks(2).map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Opens an AF_PACKET socket bound to `iface` in the calling thread's namespace.
pub fn packet_socket(iface: &str) -> OwnedFd {
    let index = limiter_user::datapath::interface_index(iface).unwrap_or_else(|error| panic!("{error:#}"));
    // SAFETY: plain socket(2); the descriptor is owned by the OwnedFd below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(fd >= 0, "socket(AF_PACKET) failed: {}; run as root", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new, valid descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `sockaddr_ll` is plain data; zeroed is a valid value.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = (libc::ETH_P_IP as u16).to_be();
    address.sll_ifindex = index as i32;
    // SAFETY: `address` is a valid sockaddr_ll and its size is passed along.
    let result = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&address as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(result, 0, "bind(AF_PACKET) to {iface} failed: {}", std::io::Error::last_os_error());
    socket
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_a_known_header() {
        // The example header of RFC 1071's usual walk-through: checksum 0xb861.
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        assert_eq!(ipv4_header_checksum(&header), 0xb861);
    }
}
