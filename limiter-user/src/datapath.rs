//! Loading, attaching and detaching the XDP program, and opening its pinned maps.
//!
//! Everything lives under `/sys/fs/bpf/limiter/<iface>/`: the four maps, pinned by name, and
//! the XDP link, pinned as `link`. Because the link is pinned, the program stays attached and
//! keeps enforcing when the agent exits or crashes, and the next agent adopts the same maps
//! without resetting any counter.

use std::{
    ffi::CString,
    fmt, fs, io,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuHashMap},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
    },
};
use limiter_common::{AclIndex, AgentHeartbeat, FlowKey, Grant, KeyCounter, Rule, RuleIndex, RuleMatch, map_names};
use tracing::{info, warn};

/// The XDP object, built by `build.rs` from the `limiter-ebpf` crate.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/limiter-ebpf"));

/// Name of the XDP function in the object.
const PROGRAM_NAME: &str = "limiter";

/// Folder under which each interface gets a folder of pins.
pub const PIN_ROOT: &str = "/sys/fs/bpf/limiter";

const LINK_PIN: &str = "link";

/// Attach mode the operator requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native (driver) mode, falling back to skb mode if the driver rejects it.
    Auto,
    /// Native mode only; fail if the driver rejects it.
    Native,
    /// Generic skb mode, which works on every interface but runs after the kernel has
    /// allocated a socket buffer.
    Skb,
}

/// Mode the program ended up attached in.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attachment {
    Native,
    Skb,
    /// Native mode was refused, so skb mode is in use; carries the refusal.
    SkbFallback { native_error: String },
    /// An earlier `limiter attach` or agent left the program attached and pinned.
    Adopted,
}

impl fmt::Display for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attachment::Native => f.write_str("native"),
            Attachment::Skb => f.write_str("skb"),
            Attachment::SkbFallback { native_error } => {
                write!(f, "skb (native mode was refused: {native_error})")
            }
            Attachment::Adopted => f.write_str("adopted from pinned link"),
        }
    }
}

/// Returns the folder of pins for `iface`.
pub fn pin_dir(iface: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(iface)
}

/// Returns the interface index of `iface`, or an error naming it.
pub fn interface_index(iface: &str) -> anyhow::Result<u32> {
    let name = CString::new(iface).map_err(|_| anyhow!("invalid interface name {iface:?}: contains a NUL byte"))?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("interface {iface} not found: list interfaces with `ip link` and pass one of them with --iface");
    }
    Ok(index)
}

/// Returns "id N (name)" for each XDP program attached to `iface`, from `ip -json link`,
/// which lists programs attached through netlink as well as through BPF links.
pub fn attached_xdp_programs(iface: &str) -> anyhow::Result<Vec<String>> {
    let output = std::process::Command::new("ip")
        .args(["-json", "-details", "link", "show", "dev", iface])
        .output()
        .context("failed to run `ip` (iproute2) to look for XDP programs already attached")?;
    if !output.status.success() {
        bail!("`ip link show dev {iface}` failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    let links: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("`ip -json link show` printed invalid JSON")?;
    let xdp = &links[0]["xdp"];
    let mut programs: Vec<&serde_json::Value> = xdp["attached"].as_array().map(|list| list.iter().collect()).unwrap_or_default();
    if programs.is_empty() && !xdp.is_null() {
        programs.push(xdp);
    }
    Ok(programs
        .iter()
        .filter_map(|entry| {
            let program = &entry["prog"];
            let id = program["id"].as_u64()?;
            Some(format!("id {id} ({})", program["name"].as_str().unwrap_or("unnamed")))
        })
        .collect())
}

/// Removes XDP programs attached to `iface` through netlink, in every mode. Programs held by
/// a BPF link stay: only their owner can detach them.
fn remove_netlink_xdp(iface: &str) {
    for mode in ["xdpgeneric", "xdpdrv"] {
        let _ = std::process::Command::new("ip").args(["link", "set", "dev", iface, mode, "off"]).output();
    }
}

/// Attaches the program to `iface` and pins it, or adopts an attachment pinned earlier.
///
/// `max_keys` sizes the counter and grant maps when they are created; pinned maps keep the
/// size they were created with. An XDP program that the limiter did not attach is left
/// alone unless `force` is set, which removes it first if it was attached through netlink.
pub fn attach(iface: &str, mode: AttachMode, max_keys: u32, force: bool) -> anyhow::Result<Attachment> {
    interface_index(iface)?;
    let dir = pin_dir(iface);
    let link_path = dir.join(LINK_PIN);

    // Step 1: adopt a link pinned by an earlier run, if it is still alive.
    if link_path.exists() {
        match PinnedLink::from_pin(&link_path) {
            Ok(_) => {
                info!(iface, pin = %link_path.display(), "adopting pinned XDP link and maps");
                return Ok(Attachment::Adopted);
            }
            Err(error) => {
                warn!(iface, %error, "pinned XDP link is stale, attaching afresh");
                fs::remove_file(&link_path)
                    .with_context(|| format!("failed to remove stale pin {}", link_path.display()))?;
            }
        }
    }

    // Step 2: leave another XDP program alone, unless --force is given.
    let foreign = attached_xdp_programs(iface)?;
    if !foreign.is_empty() {
        if !force {
            bail!(
                "interface {iface} already has an XDP program the limiter did not attach: {}; pass --force to replace it",
                foreign.join(", ")
            );
        }
        warn!(iface, programs = foreign.join(", "), "removing the XDP program already attached (--force)");
        remove_netlink_xdp(iface);
        let remaining = attached_xdp_programs(iface)?;
        if !remaining.is_empty() {
            bail!(
                "failed to remove the XDP program on {iface} ({}): it is held by a BPF link, so only the process or pin that owns it can detach it",
                remaining.join(", ")
            );
        }
    }

    // Step 3: load the object, creating the maps or reusing those pinned in `dir`.
    let mut ebpf = load(&dir, max_keys)?;
    let program = xdp_program(&mut ebpf)?;

    // Step 4: attach in the requested mode, falling back from native to skb under `auto`.
    let (link_id, attachment) = match mode {
        AttachMode::Native => {
            let link = program.attach(iface, XdpMode::Driver).map_err(|error| native_refused(iface, error))?;
            (link, Attachment::Native)
        }
        AttachMode::Skb => (program.attach(iface, XdpMode::Skb).with_context(|| attach_failed(iface, "skb"))?, Attachment::Skb),
        AttachMode::Auto => match program.attach(iface, XdpMode::Driver) {
            Ok(link) => (link, Attachment::Native),
            Err(native_error) => {
                let native_error = format!("{:#}", native_refused(iface, native_error));
                warn!(iface, error = %native_error, "native XDP rejected, attaching in skb mode");
                let link = program.attach(iface, XdpMode::Skb).with_context(|| attach_failed(iface, "skb"))?;
                (link, Attachment::SkbFallback { native_error })
            }
        },
    };

    // Step 5: pin the link, so the program outlives this process.
    let link = program.take_link(link_id)?;
    let fd_link = FdLink::try_from(link).context(
        "the kernel attached XDP through netlink instead of a BPF link, which cannot be pinned: Linux 5.9 or later is needed",
    )?;
    fd_link
        .pin(&link_path)
        .with_context(|| format!("failed to pin the XDP link at {}", link_path.display()))?;
    info!(iface, mode = %attachment, "attached XDP program");
    Ok(attachment)
}

/// Loads the object with its maps pinned in `dir`, reusing maps already pinned there, and
/// has the kernel verify the program, without attaching it anywhere.
pub fn load(dir: &Path, max_keys: u32) -> anyhow::Result<Ebpf> {
    // Step 1: refuse a kernel that lacks what the program needs, naming what is missing,
    // rather than leave the operator with a verifier log.
    let release = kernel_release();
    if let Some(missing) = release.as_deref().and_then(missing_kernel_feature) {
        let release = release.as_deref().unwrap_or("unknown");
        bail!("Linux {release} lacks {missing}: run the limiter on Linux {MIN_KERNEL} or later");
    }

    // Step 2: create the maps and load the program.
    ensure_bpf_fs()?;
    fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(dir)
        .map_max_entries(map_names::COUNTERS, max_keys)
        .map_max_entries(map_names::GRANTS, max_keys)
        .load(EBPF_OBJECT)
        .context("failed to load the XDP object: run as root")?;
    if let Err(error) = xdp_program(&mut ebpf)?.load() {
        let too_large = format!("{error:?}").contains("os error 7");
        let release = release.as_deref().unwrap_or("unknown");
        if too_large {
            return Err(anyhow::Error::new(error).context(format!(
                "the XDP program is too large for the verifier of Linux {release} (E2BIG: it explored more than \
                 its limit of states); report this with the kernel release"
            )));
        }
        return Err(anyhow::Error::new(error).context(format!("the verifier of Linux {release} rejected the XDP program")));
    }
    Ok(ebpf)
}

/// Oldest kernel with everything the program uses.
const MIN_KERNEL: &str = "5.11";

/// Returns the running kernel's release, such as `6.1.0-26-amd64`.
fn kernel_release() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|release| release.trim().to_owned())
}

/// Returns what a kernel of `release` lacks, or `None` if it has all the program uses or its
/// version cannot be read. BPF links for XDP came in 5.9, `bpf_ktime_get_coarse_ns` in 5.11.
pub fn missing_kernel_feature(release: &str) -> Option<&'static str> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter(|part| !part.is_empty());
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    match (major, minor) {
        version if version < (5, 9) => Some("BPF links for XDP (5.9) and bpf_ktime_get_coarse_ns (5.11)"),
        version if version < (5, 11) => Some("bpf_ktime_get_coarse_ns (5.11)"),
        _ => None,
    }
}

/// Returns the limiter's XDP program in a loaded object.
pub fn xdp_program(ebpf: &mut Ebpf) -> anyhow::Result<&mut Xdp> {
    Ok(ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or_else(|| anyhow!("the XDP object has no program named {PROGRAM_NAME}"))?
        .try_into()?)
}

/// Mounts the BPF file system on /sys/fs/bpf unless it is mounted already, as bpftool does;
/// pins cannot live anywhere else.
fn ensure_bpf_fs() -> anyhow::Result<()> {
    const BPF_FS: &str = "/sys/fs/bpf";
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

    let path = CString::new(BPF_FS).expect("constant path has no NUL byte");
    // SAFETY: `statfs` is plain data that the call fills in; `path` is NUL-terminated.
    let mut info: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call.
    if unsafe { libc::statfs(path.as_ptr(), &mut info) } == 0 && info.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    let fs_type = CString::new("bpf").expect("constant has no NUL byte");
    // SAFETY: all strings are NUL-terminated and outlive the call; no mount data is passed.
    if unsafe { libc::mount(fs_type.as_ptr(), path.as_ptr(), fs_type.as_ptr(), 0, std::ptr::null()) } != 0 {
        let error = io::Error::last_os_error();
        bail!("the BPF file system is not mounted on {BPF_FS} and mounting it failed: {error}; run `mount -t bpf bpf {BPF_FS}` as root");
    }
    info!(path = BPF_FS, "mounted the BPF file system");
    Ok(())
}

fn native_refused(iface: &str, error: aya::programs::ProgramError) -> anyhow::Error {
    anyhow::Error::new(error).context(format!(
        "failed to attach XDP to {iface} in native mode: the driver may lack native XDP, or the MTU may be \
         too large for it (veth without multi-buffer XDP needs frames that fit in one page); try --mode skb"
    ))
}

fn attach_failed(iface: &str, mode: &str) -> String {
    format!("failed to attach XDP to {iface} in {mode} mode: is another XDP program attached? check `ip link show {iface}`")
}

/// Detaches the program from `iface` and removes its pins. Returns false if nothing was pinned.
pub fn detach(iface: &str) -> anyhow::Result<bool> {
    let removed = remove_pins(&pin_dir(iface))?;
    if removed {
        info!(iface, "detached XDP program");
    }
    Ok(removed)
}

/// Removes the link and map pins in `dir`, then `dir` if it is empty. Returns false if `dir`
/// did not exist.
pub fn remove_pins(dir: &Path) -> anyhow::Result<bool> {
    if !dir.exists() {
        return Ok(false);
    }
    // Removing the link pin drops the last reference to the link, which detaches the
    // program. Only the names this program pins are removed, nothing else in the folder.
    for name in [
        LINK_PIN,
        map_names::RULES,
        map_names::COUNTERS,
        map_names::GRANTS,
        map_names::STATS,
        map_names::AGENT,
        map_names::RULE_INDEX,
        map_names::ACL_V4,
        map_names::ACL_V6,
        map_names::ACL_INDEX,
    ] {
        let path = dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error).with_context(|| format!("failed to remove {}", path.display())),
        }
    }
    if let Err(error) = fs::remove_dir(dir) {
        warn!(dir = %dir.display(), %error, "left the pin folder in place because it is not empty");
    }
    Ok(true)
}

/// The program's maps, opened from their pins.
pub struct Maps {
    pub rules: HashMap<MapData, RuleMatch, Rule>,
    pub counters: PerCpuHashMap<MapData, FlowKey, KeyCounter>,
    pub grants: PerCpuHashMap<MapData, FlowKey, Grant>,
    pub stats: PerCpuArray<MapData, u64>,
    pub agent: Array<MapData, AgentHeartbeat>,
    pub rule_index: Array<MapData, RuleIndex>,
    /// Allow and deny lists by source CIDR: `ACL_ALLOW` or `ACL_DENY`.
    pub acl_v4: LpmTrie<MapData, [u8; 4], u32>,
    pub acl_v6: LpmTrie<MapData, [u8; 16], u32>,
    pub acl_index: Array<MapData, AclIndex>,
}

impl Maps {
    /// Opens the maps pinned for `iface`.
    pub fn open(iface: &str) -> anyhow::Result<Self> {
        let dir = pin_dir(iface);
        if !dir.join(map_names::RULES).exists() {
            bail!(
                "no limiter is attached to {iface} ({} has no pinned maps): start `limiter agent --iface {iface} --redis URL` or run `limiter attach --iface {iface}`",
                dir.display()
            );
        }
        Self::open_dir(&dir)
    }

    /// Opens the maps pinned in `dir`.
    pub fn open_dir(dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            rules: open_pinned(dir, map_names::RULES)?.try_into()?,
            counters: open_pinned(dir, map_names::COUNTERS)?.try_into()?,
            grants: open_pinned(dir, map_names::GRANTS)?.try_into()?,
            stats: open_pinned(dir, map_names::STATS)?.try_into()?,
            agent: open_pinned(dir, map_names::AGENT)?.try_into()?,
            rule_index: open_pinned(dir, map_names::RULE_INDEX)?.try_into()?,
            acl_v4: open_pinned(dir, map_names::ACL_V4)?.try_into()?,
            acl_v6: open_pinned(dir, map_names::ACL_V6)?.try_into()?,
            acl_index: open_pinned(dir, map_names::ACL_INDEX)?.try_into()?,
        })
    }
}

fn open_pinned(dir: &Path, name: &str) -> anyhow::Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("failed to open pinned map {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_kernels_name_what_they_lack() {
        assert_eq!(missing_kernel_feature("5.4.0-150-generic"), Some("BPF links for XDP (5.9) and bpf_ktime_get_coarse_ns (5.11)"));
        assert_eq!(missing_kernel_feature("5.10.0-28-amd64"), Some("bpf_ktime_get_coarse_ns (5.11)"));
        assert_eq!(missing_kernel_feature("5.11.0"), None);
        assert_eq!(missing_kernel_feature("6.1.0-26-amd64"), None);
        assert_eq!(missing_kernel_feature("6.12.118+deb12-amd64"), None);
        assert_eq!(missing_kernel_feature("unknown"), None, "an unreadable version is left to the loader");
    }
}
