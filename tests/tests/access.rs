//! Who may talk to the agent, and that a Redis password never shows.

use std::{os::unix::fs::PermissionsExt as _, process::Command, time::Duration};

use limiter_tests::{Agent, Netns, RedisServer, VethPair, limiter_binary, subnet_addr, unique_name, unique_subnet, wait_until};

const PASSWORD: &str = "s3cret-pw-for-test";

#[test]
fn socket_is_root_only_and_password_hidden() {
    let redis = RedisServer::start_with(&["--requirepass", PASSWORD]);
    let netns = Netns::new();
    let subnet = unique_subnet();
    let veth = VethPair::new(&netns, subnet_addr(subnet, 1), &[subnet_addr(subnet, 10)]);
    let iface = veth.host.as_str();
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{}", redis.port);
    let log_path = std::env::temp_dir().join(format!("{}.log", unique_name("lac")));
    let log = std::fs::File::create(&log_path).expect("create the agent log");
    let agent = Agent::start_logging(iface, "access", &["--redis", &url], log);

    // AUTH works: the agent reaches Redis with the password from the URL.
    let mut status = String::new();
    wait_until("the agent to reach Redis with AUTH", Duration::from_secs(5), || {
        status = Agent::cli(&["status", "--iface", iface, "--json"]);
        status.contains("\"store_reachable\": true")
    });
    assert!(!status.contains(PASSWORD), "status shows the password: {status}");
    assert!(status.contains(":***@"), "status shows the redacted URL: {status}");
    let text_status = Agent::cli(&["status", "--iface", iface]);
    assert!(!text_status.contains(PASSWORD), "status shows the password: {text_status}");

    // Only root may open the control socket: mode 0600, so another user is turned away.
    let socket = limiter_user::control::socket_path(iface);
    let mode = std::fs::metadata(&socket).expect("socket metadata").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");
    // A copy in a world-readable folder, since the checkout may sit where user 65534 cannot go.
    let copy_dir = std::env::temp_dir().join(unique_name("lbin"));
    std::fs::create_dir_all(&copy_dir).expect("create a folder for the binary");
    std::fs::set_permissions(&copy_dir, std::fs::Permissions::from_mode(0o755)).expect("chmod the folder");
    let binary = copy_dir.join("limiter");
    std::fs::copy(limiter_binary(), &binary).expect("copy the limiter binary");
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&binary)
        .args(["status", "--iface", iface])
        .output()
        .expect("run limiter as nobody");
    let _ = std::fs::remove_dir_all(&copy_dir);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a non-root user read the status");
    assert!(stderr.contains("permission denied"), "non-root error: {stderr}");

    drop(agent);
    let log = std::fs::read_to_string(&log_path).expect("read the agent log");
    let _ = std::fs::remove_file(&log_path);
    assert!(!log.contains(PASSWORD), "the agent log shows the password:\n{log}");
}
