//! Fixtures for the privileged integration tests: network namespaces, veth pairs, pin
//! folders and redis-server processes, each named uniquely per run and removed on drop, so a
//! failing test cleans up and two runs never collide.
//!
//! These tests need root, a kernel with XDP and BPF_PROG_TEST_RUN, and `redis-server` and
//! `ip` on PATH; `cargo xtask test` installs and runs them.

use std::{
    net::{Ipv4Addr, TcpListener, TcpStream},
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub mod cluster;
pub mod fleet;
pub mod flood;
pub mod store;
pub mod test_run;
pub mod traffic;

/// Returns a name unique to this process and call, at most 15 bytes (the limit of an
/// interface name): `prefix` (up to 4 bytes), the process id, and a counter.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let prefix = &prefix[..prefix.len().min(4)];
    let name = format!("{prefix}{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    assert!(name.len() <= 15, "name {name} is longer than an interface name may be");
    name
}

/// Returns a /24 of 198.18.0.0/15 (set aside for network benchmarks by RFC 2544) for one
/// test, such as 198.18.37.0, varying with the process id and call, so concurrent runs and
/// tests rarely share one. Nothing outside the test's own veth pairs uses these addresses.
pub fn unique_subnet() -> [u8; 3] {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let index = (std::process::id() * 8 + NEXT.fetch_add(1, Ordering::Relaxed)) % 512;
    [198, 18 + (index / 256) as u8, (index % 256) as u8]
}

/// Returns host `host` of `subnet`.
pub fn subnet_addr(subnet: [u8; 3], host: u8) -> Ipv4Addr {
    Ipv4Addr::new(subnet[0], subnet[1], subnet[2], host)
}

/// Runs a command and panics with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("failed to start {program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {} failed with {}: {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Polls `check` every 20 ms until it returns true, panicking with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reports the running test `test` as skipped because of `reason`, such as a kernel
/// feature that it needs and the kernel lacks. The test returns right after. The line goes
/// to standard error directly, past the test harness's output capture, so `cargo test`
/// shows it even for a test that passes. `cargo xtask vm-test` counts the test as skipped.
pub fn skip(test: &str, reason: &str) {
    let _ = writeln!(std::io::stderr(), "limiter-tests: skipped: {test}: {reason}");
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Self {
        let name = unique_name("lns");
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A veth pair whose `host` end stays in the current namespace (where the XDP program goes)
/// and whose `peer` end is moved into a namespace where test traffic starts. Deleting the
/// host end on drop deletes both.
pub struct VethPair {
    pub host: String,
    pub peer: String,
}

impl VethPair {
    /// Creates the pair, puts `host_addr/24` on the host end and each of `peer_addrs` on the
    /// peer end inside `netns`, and brings both up.
    pub fn new(netns: &Netns, host_addr: Ipv4Addr, peer_addrs: &[Ipv4Addr]) -> Self {
        let host = unique_name("lvh");
        let peer = unique_name("lvp");
        run("ip", &["link", "add", &host, "type", "veth", "peer", "name", &peer]);
        let pair = Self { host, peer };
        run("ip", &["link", "set", &pair.peer, "netns", &netns.name]);
        run("ip", &["addr", "add", &format!("{host_addr}/24"), "dev", &pair.host]);
        // Two gateways of one test may share a subnet; the source check must not drop what
        // arrives on the second one.
        run("sysctl", &["-q", "-w", &format!("net.ipv4.conf.{}.rp_filter=0", pair.host)]);
        run("ip", &["link", "set", &pair.host, "up"]);
        for addr in peer_addrs {
            run("ip", &["-n", &netns.name, "addr", "add", &format!("{addr}/24"), "dev", &pair.peer]);
        }
        run("ip", &["-n", &netns.name, "link", "set", &pair.peer, "up"]);

        // A permanent neighbour entry for the gateway: otherwise the first packets of every
        // source wait for ARP in a queue of a few packets, and a fast source's overflow
        // drops a slow source's packets before they reach the program under test.
        let mac_path = format!("/sys/class/net/{}/address", pair.host);
        let mac = std::fs::read_to_string(&mac_path).unwrap_or_else(|error| panic!("failed to read {mac_path}: {error}"));
        run("ip", &["-n", &netns.name, "neigh", "replace", &host_addr.to_string(), "lladdr", mac.trim(), "dev", &pair.peer, "nud", "permanent"]);
        pair
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.host]).status();
        // Also remove what the limiter pinned for this interface, in case a test stopped
        // before detaching.
        let _ = limiter_user::datapath::remove_pins(&limiter_user::datapath::pin_dir(&self.host));
    }
}

/// A folder under /sys/fs/bpf for a program loaded by a test, removed with its pins on drop.
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    pub fn new() -> Self {
        Self { path: Path::new("/sys/fs/bpf").join(unique_name("ltst")) }
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = limiter_user::datapath::remove_pins(&self.path);
    }
}

/// A throwaway redis-server on a free loopback port, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Child,
    extra_args: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra redis-server arguments, such as `--requirepass`.
    pub fn start_with(extra_args: &[&str]) -> Self {
        let port = free_port();
        let extra_args: Vec<String> = extra_args.iter().map(|arg| (*arg).to_owned()).collect();
        let server = Self { port, child: spawn_redis(port, &extra_args), extra_args };
        server.wait_ready();
        server
    }

    /// Kills the server, as a crash would. `restart` brings up an empty one on the same port.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a new, empty server on the same port after `stop`.
    pub fn restart(&mut self) {
        self.child = spawn_redis(self.port, &self.extra_args);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        // A server with a password replies NOAUTH to an unauthenticated PING, which also
        // shows it is up.
        wait_until("redis-server to answer PING", Duration::from_secs(10), || {
            let reply = self.command("PING");
            reply.contains("PONG") || reply.contains("NOAUTH")
        });
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends one inline command and returns the raw reply, or an empty string on failure.
    pub fn command(&self, line: &str) -> String {
        redis_command(self.port, line)
    }
}

/// Sends one inline command to the redis-server on `port` of 127.0.0.1 and returns the raw
/// reply, or an empty string on failure.
pub fn redis_command(port: u16, line: &str) -> String {
    redis_command_at(Ipv4Addr::LOCALHOST, port, line)
}

/// Sends one inline command to the redis-server on `addr:port` and returns the raw reply, or
/// an empty string on failure.
pub fn redis_command_at(addr: Ipv4Addr, port: u16, line: &str) -> String {
    let Ok(mut stream) = TcpStream::connect_timeout(&(addr, port).into(), Duration::from_secs(2)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(format!("{line}\r\n").as_bytes()).is_err() {
        return String::new();
    }
    // Replies here are small, but a bulk reply can arrive in several reads.
    let mut reply = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    while let Ok(read) = stream.read(&mut buffer) {
        if read == 0 {
            break;
        }
        reply.extend_from_slice(&buffer[..read]);
        if is_complete(&reply) {
            break;
        }
    }
    String::from_utf8_lossy(&reply).into_owned()
}

/// Returns true when `reply` contains a whole RESP reply of the kinds these commands return.
fn is_complete(reply: &[u8]) -> bool {
    let text = String::from_utf8_lossy(reply);
    if let Some(rest) = text.strip_prefix('$') {
        let Some((length, body)) = rest.split_once("\r\n") else { return false };
        // "$-1" is a nil reply, complete with its line.
        if length == "-1" {
            return true;
        }
        return length.parse::<usize>().is_ok_and(|length| body.len() >= length + 2);
    }
    text.ends_with("\r\n")
}

/// Starts a redis-server on `port` of 127.0.0.1 without persistence.
fn spawn_redis(port: u16, extra_args: &[String]) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(extra_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|error| panic!("failed to start redis-server (is it installed?): {error}"))
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("failed to bind a loopback port");
    listener.local_addr().expect("bound socket has an address").port()
}

/// Returns the path of the `limiter` binary of the same build profile as this executable:
/// `target/<profile>/limiter`, found from a test (`target/<profile>/deps/<test>`) or from a
/// binary (`target/<profile>/<binary>`).
pub fn limiter_binary() -> PathBuf {
    let executable = std::env::current_exe().expect("path of the running executable");
    let candidates = executable.ancestors().skip(1).take(2).map(|dir| dir.join("limiter"));
    for candidate in candidates {
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("limiter binary not found near {}: build it first with `cargo build --release -p limiter-user`", executable.display())
}

/// A running `limiter agent`, sent SIGTERM on drop so it removes its control socket.
pub struct Agent {
    pub iface: String,
    child: Child,
}

impl Agent {
    /// Starts an agent on `iface` and waits for its control socket.
    pub fn start(iface: &str, redis_url: &str, node_id: &str, extra_args: &[&str]) -> Self {
        let mut args = vec!["--redis", redis_url];
        args.extend_from_slice(extra_args);
        Self::start_with_args(iface, node_id, &args)
    }

    /// Starts an agent on `iface` with `args` naming its store, and waits for its socket.
    pub fn start_with_args(iface: &str, node_id: &str, args: &[&str]) -> Self {
        Self::spawn(iface, node_id, args, Stdio::inherit())
    }

    /// Starts an agent whose log (standard error) goes to `log`.
    pub fn start_logging(iface: &str, node_id: &str, args: &[&str], log: std::fs::File) -> Self {
        Self::spawn(iface, node_id, args, Stdio::from(log))
    }

    fn spawn(iface: &str, node_id: &str, args: &[&str], stderr: Stdio) -> Self {
        let child = Command::new(limiter_binary())
            .args(["agent", "--iface", iface, "--node-id", node_id])
            .args(args)
            .env("RUST_LOG", "info")
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|error| panic!("failed to start limiter agent: {error}"));
        Self::adopt_child(iface, child)
    }

    /// Takes over an agent process started elsewhere, such as inside a namespace, and waits
    /// for its control socket.
    pub fn adopt_child(iface: &str, child: Child) -> Self {
        let agent = Self { iface: iface.to_owned(), child };
        // A crashed agent leaves its socket file behind, so wait for a connection, not a file.
        let socket = limiter_user::control::socket_path(iface);
        wait_until("the agent's control socket", Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        agent
    }

    /// Runs a `limiter` CLI command and returns its standard output, panicking on failure.
    pub fn cli(args: &[&str]) -> String {
        run(limiter_binary().to_str().expect("UTF-8 path"), args)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the agent with SIGKILL, as a crash would, and reaps it. Its control socket is
    /// left behind, as after a real crash.
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on the pid of a child this fixture started and has not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
