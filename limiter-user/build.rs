//! Builds the XDP program with the nightly toolchain, so the `limiter` binary embeds it.
//!
//! Needs `rustup` with a nightly toolchain, its `rust-src` component and `bpf-linker` on
//! PATH; `cargo xtask setup` installs them. Set `AYA_BUILD_SKIP=1` to skip the build (the
//! binary then fails to compile, since it embeds the object).

use std::path::Path;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let workspace = Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow::anyhow!("limiter-user has no parent folder: {manifest_dir}"))?;
    let ebpf_dir = workspace.join("limiter-ebpf");
    let common_dir = workspace.join("limiter-common");

    // aya-build watches the eBPF crate; the shared types it compiles in change it too.
    println!("cargo:rerun-if-changed={}", common_dir.display());

    let ebpf_dir = ebpf_dir.to_str().ok_or_else(|| anyhow::anyhow!("workspace path is not UTF-8"))?;
    let package = aya_build::Package { name: "limiter-ebpf", root_dir: ebpf_dir, ..Default::default() };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
