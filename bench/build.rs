//! Builds the baseline XDP programs of `bench-ebpf` with the nightly toolchain, so the
//! benchmark embeds them next to the limiter it compares them with.
//!
//! Needs what `limiter-user/build.rs` needs: rustup with a nightly toolchain, its `rust-src`
//! component and `bpf-linker` on PATH, which `cargo xtask setup` installs.

use std::path::Path;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let workspace = Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow::anyhow!("bench has no parent folder: {manifest_dir}"))?;
    let ebpf_dir = workspace.join("bench-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("workspace path is not UTF-8"))?;
    let package = aya_build::Package {
        name: "bench-ebpf",
        root_dir: ebpf_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
