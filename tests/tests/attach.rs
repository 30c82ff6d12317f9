//! `limiter attach` and `detach` without an agent: modes, fallback, idempotence, clean-up.

use std::process::Command;

use limiter_tests::{Netns, VethPair, limiter_binary, run, subnet_addr, unique_subnet};

/// Runs `limiter` and returns (success, standard output, standard error).
fn limiter(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(limiter_binary()).args(args).env("RUST_LOG", "error").output().expect("run limiter");
    (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// Returns the id of the XDP program attached to `iface`, from `ip link`.
fn xdp_program_id(iface: &str) -> Option<String> {
    let output = run("ip", &["link", "show", iface]);
    let (_, rest) = output.split_once("prog/xdp id ")?;
    rest.split_whitespace().next().map(str::to_owned)
}

#[test]
fn attach_falls_back_and_is_idempotent() {
    let netns = Netns::new();
    let subnet = unique_subnet();
    let veth = VethPair::new(&netns, subnet_addr(subnet, 1), &[subnet_addr(subnet, 10)]);
    let iface = veth.host.as_str();
    // Native XDP on veth without multi-buffer support needs frames that fit in one page,
    // and veth checks the MTU of the peer that sends them.
    run("ip", &["link", "set", iface, "mtu", "9000"]);
    run("ip", &["-n", &netns.name, "link", "set", &veth.peer, "mtu", "9000"]);

    let (ok, _, stderr) = limiter(&["attach", "--iface", iface, "--mode", "native"]);
    assert!(!ok, "native attach with MTU 9000 succeeded");
    assert!(stderr.contains(iface), "error names the interface: {stderr}");
    assert!(stderr.contains("native mode"), "error names the mode: {stderr}");
    assert!(stderr.contains("os error"), "error carries the errno: {stderr}");
    assert!(stderr.contains("MTU"), "error names the likely cause: {stderr}");
    assert_eq!(xdp_program_id(iface), None, "a failed attach left a program behind");

    let (ok, stdout, stderr) = limiter(&["attach", "--iface", iface, "--mode", "auto"]);
    assert!(ok, "auto attach failed: {stderr}");
    assert!(stdout.contains("skb (native mode was refused"), "auto attach says it fell back: {stdout}");
    let first_id = xdp_program_id(iface).expect("a program is attached");

    let (ok, stdout, stderr) = limiter(&["attach", "--iface", iface, "--mode", "auto"]);
    assert!(ok, "second attach failed: {stderr}");
    assert!(stdout.contains("adopted"), "second attach adopts the first: {stdout}");
    assert_eq!(xdp_program_id(iface), Some(first_id), "second attach replaced the program");

    let (ok, stdout, _) = limiter(&["detach", "--iface", iface]);
    assert!(ok, "detach failed");
    assert!(stdout.contains("detached"), "detach output: {stdout}");
    assert_eq!(xdp_program_id(iface), None, "detach left the program attached");
    assert!(!limiter_user::datapath::pin_dir(iface).exists(), "detach left the pin folder");

    let (ok, stdout, _) = limiter(&["detach", "--iface", iface]);
    assert!(ok, "second detach failed");
    assert!(stdout.contains("nothing attached"), "second detach output: {stdout}");
}

#[test]
fn attach_refuses_foreign_program() {
    let netns = Netns::new();
    let subnet = unique_subnet();
    let veth = VethPair::new(&netns, subnet_addr(subnet, 1), &[subnet_addr(subnet, 10)]);
    let iface = veth.host.as_str();

    // Another XDP program on the interface, held by a BPF link of this test process.
    let pin_dir = limiter_tests::PinDir::new();
    let mut foreign = limiter_user::datapath::load(&pin_dir.path, 1024).expect("load a program to attach");
    limiter_user::datapath::xdp_program(&mut foreign)
        .expect("find the XDP program")
        .attach(iface, aya::programs::XdpMode::Skb)
        .expect("attach the foreign program");
    let foreign_id = xdp_program_id(iface).expect("the foreign program is attached");

    let (ok, _, stderr) = limiter(&["attach", "--iface", iface]);
    assert!(!ok, "attach over a foreign program succeeded");
    assert!(stderr.contains("already has an XDP program"), "refusal names the cause: {stderr}");
    assert!(stderr.contains(&format!("id {foreign_id}")), "refusal names the program: {stderr}");
    assert!(stderr.contains("--force"), "refusal says how to override: {stderr}");

    let (ok, _, stderr) = limiter(&["attach", "--iface", iface, "--force"]);
    assert!(!ok, "--force removed a program held by a BPF link");
    assert!(stderr.contains("held by a BPF link"), "--force explains why it cannot: {stderr}");
    assert_eq!(xdp_program_id(iface), Some(foreign_id), "the foreign program must stay");

    // Once its owner lets go, the interface is free again.
    drop(foreign);
    let (ok, _, stderr) = limiter(&["attach", "--iface", iface]);
    assert!(ok, "attach after the foreign program left failed: {stderr}");
    let (ok, _, _) = limiter(&["detach", "--iface", iface]);
    assert!(ok, "detach failed");
}
