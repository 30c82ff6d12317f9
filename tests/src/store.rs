//! redis-server set-ups for store fault tests: a server in a network namespace of its own,
//! whose port the test can black-hole with nftables, and a TLS-only server with an ACL user.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{Netns, VethPair, redis_command_at, run, subnet_addr, unique_name, unique_subnet, wait_until};

/// Port of the namespaced server; the namespace is the test's own, so no other server uses it.
const NAMESPACED_PORT: u16 = 6379;

/// A redis-server inside a network namespace of its own, reached from the current namespace
/// through a veth pair. Its nftables rules live in that namespace only.
pub struct NamespacedRedis {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// Name of the nftables table that black-holes the port, while it exists.
    black_hole: Option<String>,
    // Dropped in declaration order: the server first, then its link and namespace.
    child: Child,
    _veth: VethPair,
    netns: Netns,
}

impl NamespacedRedis {
    /// Starts the server with extra redis-server arguments and waits until it replies to PING.
    pub fn start(extra_args: &[&str]) -> Self {
        let netns = Netns::new();
        let subnet = unique_subnet();
        let addr = subnet_addr(subnet, 2);
        let veth = VethPair::new(&netns, subnet_addr(subnet, 1), &[addr]);
        let port = NAMESPACED_PORT.to_string();
        let bind = addr.to_string();
        let child = Command::new("ip")
            .args(["netns", "exec", &netns.name, "redis-server"])
            .args(["--port", &port, "--bind", &bind, "--save", "", "--appendonly", "no"])
            // Protected mode accepts only loopback clients of a server without a password.
            // Only this test's veth pair reaches the namespace.
            .args(["--protected-mode", "no"])
            .args(extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("failed to start redis-server in {}: {error}", netns.name));
        let server = Self { addr, port: NAMESPACED_PORT, black_hole: None, child, _veth: veth, netns };
        wait_until("the namespaced redis-server to answer PING", Duration::from_secs(10), || {
            server.command("PING").contains("PONG")
        });
        server
    }

    pub fn url(&self) -> String {
        format!("redis://{}:{}", self.addr, self.port)
    }

    /// Sends one inline command and returns the raw reply, or an empty string on failure.
    pub fn command(&self, line: &str) -> String {
        redis_command_at(self.addr, self.port, line)
    }

    /// Drops every TCP packet to and from the server's port inside its namespace, so open
    /// connections hang and new ones never complete, as behind a failed route.
    pub fn black_hole(&mut self) {
        assert!(self.black_hole.is_none(), "the port is already black-holed");
        let table = unique_name("lbh");
        let port = self.port;
        let rules = format!(
            "add table inet {table}; \
             add chain inet {table} input {{ type filter hook input priority 0; policy accept; }}; \
             add chain inet {table} output {{ type filter hook output priority 0; policy accept; }}; \
             add rule inet {table} input tcp dport {port} drop; \
             add rule inet {table} output tcp sport {port} drop"
        );
        run("ip", &["netns", "exec", &self.netns.name, "nft", &rules]);
        self.black_hole = Some(table);
    }

    /// Removes the rules that [`black_hole`](Self::black_hole) added.
    pub fn restore(&mut self) {
        if let Some(table) = self.black_hole.take() {
            run("ip", &["netns", "exec", &self.netns.name, "nft", "delete", "table", "inet", &table]);
        }
    }
}

impl Drop for NamespacedRedis {
    fn drop(&mut self) {
        // The nftables table goes with the namespace.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A redis-server on 127.0.0.1 that accepts only TLS, with a certificate from a throwaway
/// CA, and one ACL user; the default user is disabled. Killed, and its folder removed, on
/// drop.
pub struct TlsRedis {
    pub port: u16,
    pub user: String,
    pub password: String,
    /// Folder of the CA, the server's key and certificate.
    pub dir: PathBuf,
    child: Child,
}

impl TlsRedis {
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(unique_name("ltls"));
        std::fs::create_dir(&dir).unwrap_or_else(|error| panic!("failed to create {}: {error}", dir.display()));
        make_certificates(&dir);

        let port = crate::free_port();
        let user = "limiter".to_owned();
        let password = format!("pw-{}", unique_name("s"));
        let path = |name: &str| dir.join(name).to_str().expect("UTF-8 temp path").to_owned();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--tls-cert-file", &path("server.crt"), "--tls-key-file", &path("server.key")])
            .args(["--tls-ca-cert-file", &path("ca.crt"), "--tls-auth-clients", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--user", "default", "off"])
            .args(["--user", &user, "on", &format!(">{password}"), "~*", "&*", "+@all"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("failed to start redis-server with TLS: {error}"));
        let server = Self { port, user, password, dir, child };
        wait_until("the TLS redis-server to answer PING", Duration::from_secs(10), || {
            server.cli(&["PING"]).contains("PONG")
        });
        server
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Returns `rediss://user:password@127.0.0.1:port` with `password` in place of the
    /// server's.
    pub fn url_with_password(&self, password: &str) -> String {
        format!("rediss://{}:{password}@127.0.0.1:{}", self.user, self.port)
    }

    /// Runs redis-cli over TLS as the ACL user and returns its output, or an empty string if
    /// it failed.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["--tls", "--cacert", self.ca_path().to_str().expect("UTF-8 temp path")])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "--user", &self.user, "--pass", &self.password])
            .arg("--no-auth-warning")
            .args(args)
            .stdin(Stdio::null())
            .output();
        match output {
            Ok(output) if output.status.success() => String::from_utf8_lossy(&output.stdout).into_owned(),
            _ => String::new(),
        }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes a CA (`ca.crt`) and a server key and certificate for IP 127.0.0.1 (`server.key`,
/// `server.crt`) into `dir`, valid for one day.
fn make_certificates(dir: &Path) {
    let path = |name: &str| dir.join(name).to_str().expect("UTF-8 temp path").to_owned();
    let extensions = path("server.ext");
    std::fs::write(&extensions, "subjectAltName = IP:127.0.0.1\nbasicConstraints = CA:FALSE\n")
        .unwrap_or_else(|error| panic!("failed to write {extensions}: {error}"));
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];

    let mut ca = vec!["req", "-x509", "-days", "1", "-subj", "/CN=limiter test CA"];
    ca.extend(ec);
    let (ca_key, ca_crt) = (path("ca.key"), path("ca.crt"));
    ca.extend(["-keyout", &ca_key, "-out", &ca_crt]);
    run("openssl", &ca);

    let mut request = vec!["req", "-subj", "/CN=127.0.0.1"];
    request.extend(ec);
    let (server_key, server_csr, server_crt) = (path("server.key"), path("server.csr"), path("server.crt"));
    request.extend(["-keyout", &server_key, "-out", &server_csr]);
    run("openssl", &request);
    run(
        "openssl",
        &[
            "x509", "-req", "-days", "1", "-in", &server_csr, "-CA", &ca_crt, "-CAkey", &ca_key, "-CAcreateserial",
            "-extfile", &extensions, "-out", &server_crt,
        ],
    );
}
