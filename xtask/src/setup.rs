//! Installs what building and testing need on a fresh Debian machine, skipping each step
//! whose result is already there, so repeated runs take a second.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{command_output, run};

/// Debian packages: LLVM 22 for bpf-linker (it must match the LLVM of nightly rustc),
/// redis-server for the agent's store in tests and the demo, iproute2 for namespaces and veth
/// pairs, procps for sysctl, nftables and iptables for the benchmark's baselines (nftables
/// also black-holes Redis in a fault test), and openssl for the TLS test's certificates.
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "redis-server",
    "redis-tools",
    "iproute2",
    "procps",
    "nftables",
    "iptables",
    "openssl",
];

/// Debian packages that only `vm-test` needs: QEMU, a static busybox for the guest's init
/// and shell, cpio to pack the initramfs, and xz to unpack the kernels' compressed modules.
const VM_DEBIAN_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "cpio", "xz-utils"];

/// bpf-linker releases that link with LLVM 22.
const BPF_LINKER_VERSION: &str = "^0.13";

pub fn setup() -> anyhow::Result<()> {
    install_debian_packages(DEBIAN_PACKAGES)?;
    install_nightly_rust_src()?;
    install_bpf_linker()?;
    Ok(())
}

/// Installs what `vm-test` needs on top of [`setup`].
pub fn setup_vm() -> anyhow::Result<()> {
    install_debian_packages(VM_DEBIAN_PACKAGES)
}

fn install_debian_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|package| !debian_package_installed(package)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("apt-get install failed: setup needs root and access to Debian's package mirrors")
}

fn debian_package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).contains("install ok installed"))
}

fn install_nightly_rust_src() -> anyhow::Result<()> {
    let toolchains = command_output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup not found: the eBPF build needs rustup with a nightly toolchain")?;
    if !toolchains.lines().any(|line| line.starts_with("nightly")) {
        eprintln!("setup: installing the nightly toolchain");
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let components = command_output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))?;
    if !components.lines().any(|line| line.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to nightly (needed by -Z build-std=core)");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

fn install_bpf_linker() -> anyhow::Result<()> {
    if Command::new("bpf-linker").arg("--version").output().is_ok_and(|output| output.status.success()) {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    // Debian 12 also ships LLVM 14's llvm-config in /usr/bin; LLVM 22's must come first.
    let path = format!("/usr/lib/llvm-22/bin:{}", std::env::var("PATH").unwrap_or_default());
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--no-default-features", "--features", "llvm-22"])
        .env("PATH", path))?;
    if Command::new("bpf-linker").arg("--version").output().is_err() {
        bail!("bpf-linker was installed but is not on PATH: add ~/.cargo/bin to PATH");
    }
    Ok(())
}
