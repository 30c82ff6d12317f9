//! `cargo xtask vm-test`: the integration tests inside QEMU, once per Debian kernel series.
//!
//! For each kernel the task finds the newest package of the series that apt can reach, and
//! downloads and unpacks it into `target/vm/`, where it stays for later runs. It packs an
//! initramfs with busybox, an init script, the test executables, `limiter`, redis-server and
//! iproute2 with their shared libraries, and the kernel modules the tests need. QEMU boots
//! it with the serial console on standard output. The init script mounts what the tests
//! expect and runs each test as its own process. It prints a line when a test starts and
//! when it ends, then a final line with the totals, and powers off. The task reads those
//! lines, stops QEMU on a kernel panic or a timeout, and reports the failures of every
//! kernel together at the end.

use std::{
    collections::BTreeSet,
    fmt,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{command_output, run};

/// A kernel series the VM tests run on, and the Debian meta-package that depends on the
/// newest kernel package of that series.
struct KernelSeries {
    name: &'static str,
    meta_package: &'static str,
    /// How the name of the package that `meta_package` depends on starts.
    package_prefix: &'static str,
}

/// Both series are in Debian 12: 6.1 is its own kernel and 6.12 comes through its security
/// suite (`linux-6.12`).
const KERNELS: [KernelSeries; 2] = [
    KernelSeries { name: "6.1", meta_package: "linux-image-amd64", package_prefix: "linux-image-6.1." },
    KernelSeries { name: "6.12", meta_package: "linux-image-6.12-amd64", package_prefix: "linux-image-6.12." },
];

/// Kernel modules the tests load, without their dependencies, which are found and loaded
/// first: veth for the veth pairs.
const MODULES: &[&str] = &["veth"];

/// Host programs copied into the guest, with their shared libraries. Busybox provides the
/// shell, mount, sysctl and the rest, but its `ip` cannot create veth pairs or namespaces.
const HOST_PROGRAMS: &[&str] = &["ip", "redis-server", "redis-cli", "setpriv"];

/// Tests left out unless `--all-tests` is given, by the start of `<executable>::<test>`,
/// with the reason. Emulation without KVM runs the guest at a varying fraction of the host's
/// speed, and the agents' Redis calls then outlast their 50 ms timeout now and then, which
/// these tests' timing checks do not allow for. Measured under TCG: `fleet` saw 92 packets
/// in one second against 94-102 (6.12), and two gateways under their limit passed 37/s of
/// 40/s (6.1). `cluster` passed 1115 against at most 1050 during its failover (6.12), and
/// `faults` counted one outage more than it expects (6.12). `cluster` and `lua_sync` test
/// Redis and the agent's store code, which no kernel changes.
const EXCLUDED_BY_DEFAULT: &[(&str, &str)] = &[
    ("fleet::", "two and three gateways, per-second checks within a few percent"),
    ("gateways::two_gateways_share_one_quota", "two gateways, no loss allowed under the limit"),
    ("faults::", "counts outage log lines, which a slow Redis call adds to"),
    ("cluster::", "Redis Cluster failover, kernel-independent, per-second checks"),
    ("lua_sync::", "Lua scripts against redis-server, kernel-independent"),
    ("flood::", "100,000 spoofed frames per second, beyond what emulation sends"),
    ("at_most_once::", "DEBUG SLEEP against 50 ms Redis timeouts, kernel-independent"),
    ("tiers::", "per-second checks of light sources that lose no packet"),
    ("operating::", "top in a pseudo-terminal (script) and explain timing, kernel-independent"),
    ("store_stalls::", "nftables in the guest, Redis stalls, kernel-independent"),
    ("store_tls::", "openssl certificates, Redis TLS, kernel-independent"),
    ("packaging::", "systemd-analyze, completions and man pages, kernel-independent"),
];

/// Frames the fuzz test runs in the guest: enough for its coverage check (10,000 or more).
/// 20,000 took 1.7 s under TCG with Linux 6.12 on a 2-core AMD EPYC host.
const GUEST_FUZZ_FRAMES: u32 = 20_000;

/// Maximum run time of one test inside the guest, after which the init script kills it.
const GUEST_TEST_TIMEOUT: Duration = Duration::from_secs(600);

/// Maximum wait for QEMU to power off after the final line.
const POWER_OFF_TIMEOUT: Duration = Duration::from_secs(30);

/// Maximum wait for the KVM probe's guest to print its line. A working KVM boots it in a
/// second or two, and on machines where KVM hangs it never prints.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// Memory and CPUs of the guest. Two CPUs, because some tests pin senders to CPUs 0 and 1.
const GUEST_MEMORY_MIB: u32 = 2048;
const GUEST_CPUS: u32 = 2;

/// Paths of the test executables and of `limiter` in the guest. `limiter` is one folder up
/// from the tests, as in `target/release/`, because the tests' `limiter_binary()` looks there.
const GUEST_TEST_DIR: &str = "limiter/deps";
const GUEST_LIMITER: &str = "limiter/limiter";

/// Markers that the init script prints and `vm-test` parses from the console.
const MARK_START: &str = "limiter-vm: start ";
const MARK_END: &str = "limiter-vm: end ";
const MARK_DONE: &str = "limiter-vm: done ";
/// Marker of a test that reports itself skipped (see `limiter_tests::skip`).
const MARK_SKIPPED: &str = "limiter-tests: skipped: ";
const PROBE_MARK: &str = "limiter-vm-probe: booted";

/// Options of `cargo xtask vm-test`.
pub struct Options {
    /// `6.1`, `6.12` or `all`.
    pub kernel: String,
    pub all_tests: bool,
    /// Runs only the tests whose `<executable>::<test>` name contains this.
    pub filter: Option<String>,
    /// Maximum run time of one kernel's guest, from boot to power-off.
    pub timeout: Duration,
}

/// Outcome of one test in the guest.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    Passed,
    Failed,
    Skipped,
    TimedOut,
}

impl Outcome {
    fn parse(word: &str) -> Option<Self> {
        match word {
            "passed" => Some(Self::Passed),
            "failed" => Some(Self::Failed),
            "skipped" => Some(Self::Skipped),
            "timed-out" => Some(Self::TimedOut),
            _ => None,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Passed => "passed",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
            Self::TimedOut => "timed out",
        })
    }
}

struct TestResult {
    name: String,
    outcome: Outcome,
    seconds: f64,
    /// The reason a skipped test printed.
    skip_reason: Option<String>,
}

/// End of a guest's run.
enum Ending {
    /// The init script printed its final line.
    Finished,
    Panicked(String),
    TimedOut,
    /// QEMU exited before the final line.
    Exited(String),
    /// The guest could not be built or started.
    NotStarted(String),
}

/// Everything `vm-test` reports about one kernel.
struct KernelReport {
    series: &'static str,
    package: String,
    accelerator: &'static str,
    tests: Vec<TestResult>,
    /// The test that was running when the guest stopped without its final line.
    running: Option<String>,
    ending: Ending,
    elapsed: Duration,
}

impl KernelReport {
    fn count(&self, outcome: Outcome) -> usize {
        self.tests.iter().filter(|test| test.outcome == outcome).count()
    }

    fn succeeded(&self) -> bool {
        matches!(self.ending, Ending::Finished)
            && !self.tests.is_empty()
            && self.tests.iter().all(|test| matches!(test.outcome, Outcome::Passed | Outcome::Skipped))
    }
}

/// A kernel unpacked from its Debian package.
struct Kernel {
    package: String,
    image: PathBuf,
    /// `lib/modules/<release>` of the package.
    modules_dir: PathBuf,
}

/// A test executable built by cargo, and the tests of it to run.
struct TestExecutable {
    name: String,
    path: PathBuf,
    tests: Vec<String>,
}

/// Runs the VM tests on the kernels `options.kernel` selects and fails if any test failed
/// on any of them, after reporting all of them.
pub fn vm_test(options: &Options) -> anyhow::Result<()> {
    let series: Vec<&KernelSeries> = match options.kernel.as_str() {
        "all" => KERNELS.iter().collect(),
        name => match KERNELS.iter().find(|series| series.name == name) {
            Some(series) => vec![series],
            None => bail!("unknown kernel {name:?}: expected one of 6.1, 6.12 or all"),
        },
    };

    let vm_dir = PathBuf::from("target/vm");
    fs::create_dir_all(&vm_dir).with_context(|| format!("failed to create {}", vm_dir.display()))?;
    let vm_dir = vm_dir.canonicalize().context("failed to resolve target/vm")?;
    let executables = build_test_executables(options.all_tests, options.filter.as_deref())?;
    let accelerator = probe_kvm(&vm_dir, series[0]);

    let mut reports = Vec::new();
    for series in series {
        let started = Instant::now();
        let report = match prepare_guest(&vm_dir, series, &executables) {
            Ok((kernel, initramfs)) => run_guest(series, &kernel, &initramfs, &vm_dir, accelerator, options.timeout),
            Err(error) => KernelReport {
                series: series.name,
                package: String::from("(none)"),
                accelerator: accelerator.name(),
                tests: Vec::new(),
                running: None,
                ending: Ending::NotStarted(format!("{error:#}")),
                elapsed: started.elapsed(),
            },
        };
        reports.push(report);
    }

    print_summary(&reports);
    if reports.iter().all(KernelReport::succeeded) {
        Ok(())
    } else {
        bail!("VM tests failed; each guest's console is in target/vm/<kernel>/console.log")
    }
}

/// Builds `limiter` and the integration test executables, and returns the executables with
/// the tests to run in each.
fn build_test_executables(all_tests: bool, filter: Option<&str>) -> anyhow::Result<Vec<TestExecutable>> {
    crate::build()?;
    println!("vm-test: building the integration test executables");
    let mut cargo = Command::new("cargo");
    cargo.args(["test", "--release", "-p", "limiter-tests", "--tests", "--no-run", "--message-format=json"]);
    let output = cargo.output().context("failed to start cargo")?;
    let messages = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // With JSON output, the compiler's errors are in the JSON messages, not on stderr.
        let errors: Vec<String> = messages
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|message| message["reason"] == "compiler-message" && message["message"]["level"] == "error")
            .filter_map(|message| message["message"]["rendered"].as_str().map(str::to_owned))
            .collect();
        bail!("{cargo:?} failed with {}:\n{}{}", output.status, errors.join(""), String::from_utf8_lossy(&output.stderr));
    }

    let mut executables = Vec::new();
    for line in messages.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if message["reason"] != "compiler-artifact" || message["target"]["kind"] != serde_json::json!(["test"]) {
            continue;
        }
        let (Some(name), Some(path)) = (message["target"]["name"].as_str(), message["executable"].as_str()) else {
            continue;
        };
        let path = PathBuf::from(path);
        let tests: Vec<String> = list_tests(&path)?
            .into_iter()
            .filter(|test| {
                let full_name = format!("{name}::{test}");
                let excluded = !all_tests && EXCLUDED_BY_DEFAULT.iter().any(|(start, _)| full_name.starts_with(start));
                !excluded && filter.is_none_or(|filter| full_name.contains(filter))
            })
            .collect();
        if !tests.is_empty() {
            executables.push(TestExecutable { name: name.to_owned(), path, tests });
        }
    }

    if executables.is_empty() {
        bail!("no integration test selected: check --filter {:?}", filter.unwrap_or_default());
    }
    if !all_tests {
        let excluded: Vec<String> = EXCLUDED_BY_DEFAULT.iter().map(|(name, reason)| format!("{name} ({reason})")).collect();
        println!("vm-test: left out, run with --all-tests: {}", excluded.join(", "));
    }
    executables.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(executables)
}

/// Lists the tests of a test executable. Listing runs none of them.
fn list_tests(executable: &Path) -> anyhow::Result<Vec<String>> {
    let output = command_output(Command::new(executable).args(["--list", "--format", "terse"]))?;
    Ok(output.lines().filter_map(|line| line.strip_suffix(": test")).map(str::to_owned).collect())
}

/// The accelerator QEMU runs the guests with.
#[derive(Clone, Copy)]
enum Accelerator {
    Kvm,
    Tcg,
}

impl Accelerator {
    fn name(self) -> &'static str {
        match self {
            Self::Kvm => "KVM",
            Self::Tcg => "TCG",
        }
    }

    fn qemu_args(self) -> &'static [&'static str] {
        match self {
            Self::Kvm => &["-accel", "kvm", "-cpu", "host"],
            Self::Tcg => &["-accel", "tcg"],
        }
    }
}

/// Boots a guest that only prints one line under KVM and returns KVM if the line arrives in
/// time. On some machines QEMU aborts at once with KVM or hangs with no output, and then
/// the guests run under TCG.
fn probe_kvm(vm_dir: &Path, series: &KernelSeries) -> Accelerator {
    if fs::metadata("/dev/kvm").is_err() {
        println!("vm-test: /dev/kvm is missing, using TCG emulation");
        return Accelerator::Tcg;
    }
    // Ok(None) when the guest booted, Ok(Some(what happened)) when it did not.
    let probe = || -> anyhow::Result<Option<String>> {
        let kernel = fetch_kernel(vm_dir, series, false)?;
        let staging = vm_dir.join("probe/root");
        recreate_dir(&staging)?;
        install_busybox(&staging)?;
        write_executable(&staging.join("init"), &format!(
            "#!/bin/sh\nmount -t proc proc /proc\necho {PROBE_MARK}\npoweroff -f\n"
        ))?;
        let initramfs = vm_dir.join("probe/initramfs.cpio");
        pack_initramfs(&staging, &initramfs)?;

        let mut qemu = spawn_qemu(Accelerator::Kvm, &kernel.image, &initramfs)?;
        let lines = read_console(&mut qemu, None)?;
        let deadline = Instant::now() + KVM_PROBE_TIMEOUT;
        let failure = loop {
            let Some(remaining) = deadline.checked_duration_since(Instant::now()) else {
                break Some(format!("the guest printed nothing within {KVM_PROBE_TIMEOUT:?}"));
            };
            match lines.recv_timeout(remaining) {
                Ok(line) if line.contains(PROBE_MARK) => break None,
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => break Some(format!("the guest printed nothing within {KVM_PROBE_TIMEOUT:?}")),
                Err(mpsc::RecvTimeoutError::Disconnected) => break Some(String::from("QEMU exited before the guest booted")),
            }
        };
        stop_qemu(&mut qemu, if failure.is_none() { POWER_OFF_TIMEOUT } else { Duration::ZERO });
        Ok(failure)
    };
    match probe() {
        Ok(None) => {
            println!("vm-test: KVM works here, using it");
            Accelerator::Kvm
        }
        Ok(Some(failure)) => {
            println!("vm-test: KVM does not work here ({failure}), using TCG emulation");
            Accelerator::Tcg
        }
        Err(error) => {
            println!("vm-test: the KVM probe failed ({error:#}), using TCG emulation");
            Accelerator::Tcg
        }
    }
}

/// Fetches the kernel and builds the initramfs for one series.
fn prepare_guest(vm_dir: &Path, series: &KernelSeries, executables: &[TestExecutable]) -> anyhow::Result<(Kernel, PathBuf)> {
    let kernel = fetch_kernel(vm_dir, series, false)?;
    let guest_dir = vm_dir.join(series.name);
    let staging = guest_dir.join("root");
    recreate_dir(&staging)?;
    stage_guest(&staging, &kernel, executables)?;
    let initramfs = guest_dir.join("initramfs.cpio");
    pack_initramfs(&staging, &initramfs)?;
    Ok((kernel, initramfs))
}

/// Returns the series' newest kernel package that apt can reach, downloading and unpacking
/// it into `target/vm/kernels/` unless an earlier run did. Without apt's package lists, the
/// newest package of the series unpacked by an earlier run is used.
/// `lists_refreshed` is set on the second try, after `apt-get update`.
fn fetch_kernel(vm_dir: &Path, series: &KernelSeries, lists_refreshed: bool) -> anyhow::Result<Kernel> {
    let kernels_dir = vm_dir.join("kernels");
    fs::create_dir_all(&kernels_dir).with_context(|| format!("failed to create {}", kernels_dir.display()))?;

    let (package, version) = match resolve_kernel_package(series) {
        Ok(resolved) => resolved,
        Err(error) => {
            let cached = newest_cached_kernel(&kernels_dir, series)?
                .with_context(|| format!("no {} kernel package found, nor one from an earlier run: {error:#}", series.name))?;
            println!("vm-test: {error:#}; using {cached}, unpacked by an earlier run");
            return open_kernel(&kernels_dir.join(&cached), &cached);
        }
    };

    let label = format!("{package}_{version}");
    let unpacked = kernels_dir.join(&label);
    if unpacked.join(".complete").is_file() {
        return open_kernel(&unpacked, &label);
    }

    println!("vm-test: downloading {package} {version}");
    let download_dir = kernels_dir.join("download");
    recreate_dir(&download_dir)?;
    // The download folder belongs to root, which the _apt user cannot write to, so apt
    // would warn unless it keeps root's privileges for the download.
    if run(Command::new("apt-get")
        .args(["-q", "-o", "APT::Sandbox::User=root", "download", &format!("{package}={version}")])
        .current_dir(&download_dir))
    .is_err()
    {
        if lists_refreshed {
            bail!("failed to download {package} {version}, also after `apt-get update`");
        }
        // Package lists older than the mirror name a kernel it no longer carries once a
        // security update replaced it: refresh them once and resolve the kernel again.
        println!("vm-test: download of {package} {version} failed; running apt-get update and trying again");
        run(Command::new("apt-get").args(["-q", "update"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
        return fetch_kernel(vm_dir, series, true);
    }
    let deb = single_file(&download_dir)?;

    recreate_dir(&unpacked)?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    fs::write(unpacked.join(".complete"), "").context("failed to mark the unpacked kernel complete")?;
    fs::remove_dir_all(&download_dir).with_context(|| format!("failed to remove {}", download_dir.display()))?;
    open_kernel(&unpacked, &label)
}

/// Returns the package and version of the series' newest kernel, from the meta-package's
/// dependency.
fn resolve_kernel_package(series: &KernelSeries) -> anyhow::Result<(String, String)> {
    let depends = command_output(Command::new("apt-cache").args(["depends", series.meta_package]))?;
    let package = depends
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends: "))
        .find(|package| package.starts_with(series.package_prefix))
        .with_context(|| format!("{} depends on no package named {}*", series.meta_package, series.package_prefix))?
        .to_owned();
    let show = command_output(Command::new("apt-cache").args(["show", "--no-all-versions", &package]))?;
    let version = show
        .lines()
        .find_map(|line| line.strip_prefix("Version: "))
        .with_context(|| format!("apt-cache show {package} printed no version"))?
        .to_owned();
    Ok((package, version))
}

/// Returns the folder name of the newest complete kernel of `series` under `kernels_dir`.
fn newest_cached_kernel(kernels_dir: &Path, series: &KernelSeries) -> anyhow::Result<Option<String>> {
    let mut newest: Option<(std::time::SystemTime, String)> = None;
    for entry in fs::read_dir(kernels_dir).with_context(|| format!("failed to read {}", kernels_dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let complete = entry.path().join(".complete");
        if !name.starts_with(series.package_prefix) || !complete.is_file() {
            continue;
        }
        let modified = fs::metadata(&complete)?.modified()?;
        if newest.as_ref().is_none_or(|(time, _)| modified > *time) {
            newest = Some((modified, name));
        }
    }
    Ok(newest.map(|(_, name)| name))
}

fn open_kernel(unpacked: &Path, label: &str) -> anyhow::Result<Kernel> {
    let image = single_file_with_prefix(&unpacked.join("boot"), "vmlinuz-")?;
    let modules_root = unpacked.join("lib/modules");
    let modules_dir = fs::read_dir(&modules_root)
        .with_context(|| format!("failed to read {}", modules_root.display()))?
        .next()
        .with_context(|| format!("{} is empty", modules_root.display()))??
        .path();
    Ok(Kernel { package: label.to_owned(), image, modules_dir })
}

/// Fills the guest's root folder: busybox, host programs and their libraries, the test
/// executables and `limiter`, the kernel modules, a few files under /etc, and /init.
fn stage_guest(staging: &Path, kernel: &Kernel, executables: &[TestExecutable]) -> anyhow::Result<()> {
    install_busybox(staging)?;

    let mut binaries = Vec::new();
    for program in HOST_PROGRAMS {
        let path = find_program(program)?;
        copy_to_same_path(&path, staging)?;
        binaries.push(path);
    }

    let test_dir = staging.join(GUEST_TEST_DIR);
    fs::create_dir_all(&test_dir)?;
    for executable in executables {
        copy_file(&executable.path, &test_dir.join(&executable.name))?;
        binaries.push(executable.path.clone());
    }
    // Cargo puts test executables in <target>/release/deps/ and binaries in <target>/release/.
    let first_test = executables.first().context("no test executable to run")?;
    let limiter = first_test.path.parent().and_then(Path::parent).map(|dir| dir.join("limiter")).unwrap_or_default();
    if !limiter.is_file() {
        bail!("{} is missing: `cargo xtask build` builds it", limiter.display());
    }
    copy_file(&limiter, &staging.join(GUEST_LIMITER))?;
    binaries.push(limiter);
    for library in shared_libraries(&binaries)? {
        copy_to_same_path(&library, staging)?;
    }

    // lua_sync reads the scripts from the source tree's path, fixed at compile time.
    let workspace = std::env::current_dir()?;
    let lua_dir = workspace.join("lua");
    let guest_lua_dir = staging.join(lua_dir.strip_prefix("/")?);
    fs::create_dir_all(&guest_lua_dir)?;
    fs::create_dir_all(staging.join(workspace.join("tests").strip_prefix("/")?))?;
    for entry in fs::read_dir(&lua_dir).with_context(|| format!("failed to read {}", lua_dir.display()))? {
        let entry = entry?;
        copy_file(&entry.path(), &guest_lua_dir.join(entry.file_name()))?;
    }

    let modules = stage_modules(staging, &kernel.modules_dir)?;
    for dir in ["proc", "sys", "dev", "tmp", "run", "etc", "root", "var"] {
        fs::create_dir_all(staging.join(dir))?;
    }
    // The initramfs stays in memory and writable, so /tmp needs no file system of its own.
    // A tmpfs there would also hide the Lua scripts of a workspace under /tmp.
    fs::set_permissions(staging.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    // `ip netns` keeps its namespaces under /var/run/netns, which tests open by that path.
    std::os::unix::fs::symlink("../run", staging.join("var/run")).context("failed to link /var/run to /run")?;
    fs::write(staging.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")?;
    fs::write(staging.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    fs::write(staging.join("etc/hosts"), "127.0.0.1 localhost\n::1 localhost\n")?;
    write_executable(&staging.join("init"), &init_script(&modules, executables))
}

/// Returns the path of `program` on PATH or in the sbin folders, which a user's PATH may
/// leave out.
fn find_program(program: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path.split(':').chain(["/usr/local/sbin", "/usr/sbin", "/sbin"]).filter(|dir| !dir.is_empty());
    for dir in dirs {
        let candidate = Path::new(dir).join(program);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("{program} not found on PATH nor in the sbin folders: run `cargo xtask setup`")
}

/// Copies busybox to /bin and links every applet it has to it, so the guest has a shell.
fn install_busybox(staging: &Path) -> anyhow::Result<()> {
    let busybox = Path::new("/bin/busybox");
    let bin = staging.join("bin");
    fs::create_dir_all(&bin)?;
    copy_file(busybox, &bin.join("busybox"))?;
    let applets = command_output(Command::new(busybox).arg("--list"))?;
    for applet in applets.lines().filter(|applet| *applet != "busybox") {
        std::os::unix::fs::symlink("busybox", bin.join(applet))
            .with_context(|| format!("failed to link busybox applet {applet}"))?;
    }
    Ok(())
}

/// Returns the shared libraries, the dynamic loader included, that `binaries` load, from
/// `ldd`.
fn shared_libraries(binaries: &[PathBuf]) -> anyhow::Result<BTreeSet<PathBuf>> {
    let mut libraries = BTreeSet::new();
    for binary in binaries {
        let output = command_output(Command::new("ldd").arg(binary))?;
        for line in output.lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no file.
            let path = line.split_once("=>").map_or(line, |(_, path)| path).trim();
            let path = path.split_whitespace().next().unwrap_or_default();
            if path.starts_with('/') {
                libraries.insert(PathBuf::from(path));
            } else if line.contains("not found") {
                bail!("{} needs a library that is not installed: {}", binary.display(), line.trim());
            }
        }
    }
    Ok(libraries)
}

/// Copies `MODULES` and the modules they depend on, decompressed, to /lib/modules of the
/// guest, and returns their names in the order to load them.
fn stage_modules(staging: &Path, modules_dir: &Path) -> anyhow::Result<Vec<String>> {
    let guest_dir = staging.join("lib/modules");
    fs::create_dir_all(&guest_dir)?;
    let mut ordered = Vec::new();
    for module in MODULES {
        add_module(module, modules_dir, &guest_dir, &mut ordered, 0)?;
    }
    Ok(ordered)
}

/// Deepest chain of module dependencies followed; real chains are a few modules long.
const MAX_MODULE_DEPTH: usize = 16;

/// Adds `name` after the modules it depends on, reading its `depends=` field.
fn add_module(name: &str, modules_dir: &Path, guest_dir: &Path, ordered: &mut Vec<String>, depth: usize) -> anyhow::Result<()> {
    if ordered.iter().any(|added| added == name) {
        return Ok(());
    }
    if depth > MAX_MODULE_DEPTH {
        bail!("module dependencies deeper than {MAX_MODULE_DEPTH} at {name}: is there a cycle?");
    }
    let path = find_module(modules_dir, name)?
        .with_context(|| format!("module {name} not found under {}", modules_dir.display()))?;
    let contents = read_module(&path)?;
    for dependency in module_dependencies(&contents) {
        add_module(&dependency, modules_dir, guest_dir, ordered, depth + 1)?;
    }
    fs::write(guest_dir.join(format!("{name}.ko")), &contents)?;
    ordered.push(name.to_owned());
    Ok(())
}

/// Finds `<name>.ko`, compressed or not, under `dir`. Module names treat `-` and `_` alike.
fn find_module(dir: &Path, name: &str) -> anyhow::Result<Option<PathBuf>> {
    let normalized_name = name.replace('-', "_");
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("failed to read {}", dir.display()))? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                pending.push(path);
                continue;
            }
            let file_name = entry.file_name().to_string_lossy().replace('-', "_");
            let stem = ["", ".xz", ".zst"].iter().find_map(|suffix| file_name.strip_suffix(&format!(".ko{suffix}")));
            if stem == Some(normalized_name.as_str()) {
                return Ok(Some(path));
            }
        }
    }
    Ok(None)
}

/// Reads a module file, decompressing `.ko.xz` and `.ko.zst`, because busybox's insmod
/// loads only plain modules.
fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    let decompressor = match path.extension().and_then(|extension| extension.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        _ => return fs::read(path).with_context(|| format!("failed to read {}", path.display())),
    };
    let output = Command::new(decompressor)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("failed to start {decompressor} for {}", path.display()))?;
    if !output.status.success() {
        bail!("{decompressor} -dc {} failed with {}", path.display(), output.status);
    }
    Ok(output.stdout)
}

/// Returns the names in a module's `depends=` field of its .modinfo section.
fn module_dependencies(contents: &[u8]) -> Vec<String> {
    const FIELD: &[u8] = b"\0depends=";
    let Some(start) = contents.windows(FIELD.len()).position(|window| window == FIELD) else {
        return Vec::new();
    };
    let value = &contents[start + FIELD.len()..];
    let end = value.iter().position(|byte| *byte == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).split(',').filter(|name| !name.is_empty()).map(str::to_owned).collect()
}

/// Returns the guest's /init: mounts, modules, then each test in its own process, with a
/// line before and after each and a final line with the totals.
fn init_script(modules: &[String], executables: &[TestExecutable]) -> String {
    let timeout = GUEST_TEST_TIMEOUT.as_secs();
    let mut script = format!(
        r#"#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
export LIMITER_FUZZ_FRAMES={GUEST_FUZZ_FRAMES}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
# The agent's default node id is the host name, which must be a valid one.
hostname limiter-vm
for module in {modules}; do
    insmod /lib/modules/$module.ko || echo "limiter-vm: failed to load module $module"
done
echo "limiter-vm: kernel $(uname -r), $(nproc) CPUs"

passed=0 failed=0 skipped=0
run_test() {{
    echo "{MARK_START}$1::$2"
    started=$(cut -d' ' -f1 /proc/uptime)
    {{ timeout -s KILL {timeout} /{GUEST_TEST_DIR}/$1 --exact "$2" --nocapture --test-threads=1; echo $? > /tmp/status; }} 2>&1 | tee /tmp/output
    status=$(cat /tmp/status)
    seconds=$(awk -v started="$started" '{{ printf "%.1f", $1 - started }}' /proc/uptime)
    if [ "$status" = 0 ] && grep -q "{MARK_SKIPPED}" /tmp/output; then
        outcome=skipped skipped=$((skipped + 1))
    elif [ "$status" = 0 ]; then
        outcome=passed passed=$((passed + 1))
    elif [ "$status" = 137 ]; then
        outcome=timed-out failed=$((failed + 1))
    else
        outcome=failed failed=$((failed + 1))
    fi
    echo "{MARK_END}$1::$2 $outcome $seconds"
}}

"#,
        modules = modules.join(" "),
    );
    for executable in executables {
        for test in &executable.tests {
            script.push_str(&format!("run_test {} {}\n", executable.name, test));
        }
    }
    script.push_str(&format!("echo \"{MARK_DONE}passed=$passed failed=$failed skipped=$skipped\"\npoweroff -f\n"));
    script
}

/// Packs `staging` into a newc cpio archive. It stays uncompressed, so the emulated kernel
/// has nothing to decompress.
fn pack_initramfs(staging: &Path, archive: &Path) -> anyhow::Result<()> {
    let file = fs::File::create(archive).with_context(|| format!("failed to create {}", archive.display()))?;
    let mut cpio = Command::new("cpio")
        .args(["--create", "--format=newc", "--null", "--quiet"])
        .current_dir(staging)
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()
        .context("failed to start cpio: run `cargo xtask setup`")?;
    let mut paths = Vec::new();
    let mut pending = vec![PathBuf::from(".")];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(staging.join(&dir))? {
            let entry = entry?;
            let path = dir.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                pending.push(path.clone());
            }
            paths.extend_from_slice(path.as_os_str().as_encoded_bytes());
            paths.push(0);
        }
    }
    cpio.stdin.take().context("cpio's standard input")?.write_all(&paths)?;
    let status = cpio.wait()?;
    if !status.success() {
        bail!("cpio failed with {status} while packing {}", staging.display());
    }
    Ok(())
}

fn spawn_qemu(accelerator: Accelerator, image: &Path, initramfs: &Path) -> anyhow::Result<Child> {
    Command::new("qemu-system-x86_64")
        .args(accelerator.qemu_args())
        .args(["-m", &GUEST_MEMORY_MIB.to_string(), "-smp", &GUEST_CPUS.to_string()])
        .args(["-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(image)
        .arg("-initrd")
        .arg(initramfs)
        // panic=-1 reboots at once on a panic, and -no-reboot turns that into an exit.
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4 rdinit=/init"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("failed to start qemu-system-x86_64: is Debian's qemu-system-x86 package installed?")
}

/// Sends each console line of `qemu` through the returned channel, and writes it to `log`
/// if given. The channel closes when QEMU closes its output.
fn read_console(qemu: &mut Child, log: Option<fs::File>) -> anyhow::Result<mpsc::Receiver<String>> {
    let output = qemu.stdout.take().context("QEMU's standard output")?;
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut log = log;
        let mut reader = BufReader::new(output);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|read| read > 0) {
            let text = String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_owned();
            line.clear();
            if let Some(log) = log.as_mut() {
                let _ = writeln!(log, "{text}");
            }
            if sender.send(text).is_err() {
                break;
            }
        }
    });
    Ok(receiver)
}

/// Waits up to `grace` for QEMU to exit by itself, then kills it by its pid.
fn stop_qemu(qemu: &mut Child, grace: Duration) {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = qemu.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = qemu.kill();
    let _ = qemu.wait();
}

/// Boots one guest and follows its console until the final line, a panic, QEMU's exit or
/// `timeout`.
fn run_guest(series: &KernelSeries, kernel: &Kernel, initramfs: &Path, vm_dir: &Path, accelerator: Accelerator, timeout: Duration) -> KernelReport {
    let started = Instant::now();
    let mut report = KernelReport {
        series: series.name,
        package: kernel.package.clone(),
        accelerator: accelerator.name(),
        tests: Vec::new(),
        running: None,
        ending: Ending::TimedOut,
        elapsed: Duration::ZERO,
    };
    println!("vm-test: booting {} under {} (at most {:?})", kernel.package, accelerator.name(), timeout);

    let log_path = vm_dir.join(series.name).join("console.log");
    let started_qemu = fs::File::create(&log_path)
        .with_context(|| format!("failed to create {}", log_path.display()))
        .and_then(|log| {
            let mut qemu = spawn_qemu(accelerator, &kernel.image, initramfs)?;
            let lines = read_console(&mut qemu, Some(log))?;
            Ok((qemu, lines))
        });
    let (mut qemu, lines) = match started_qemu {
        Ok(started) => started,
        Err(error) => {
            report.ending = Ending::NotStarted(format!("{error:#}"));
            return report;
        }
    };

    let deadline = started + timeout;
    let mut skip_reason = None;
    loop {
        let Some(remaining) = deadline.checked_duration_since(Instant::now()) else {
            report.ending = Ending::TimedOut;
            break;
        };
        let line = match lines.recv_timeout(remaining) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                report.ending = Ending::TimedOut;
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = qemu.wait().map_or_else(|error| error.to_string(), |status| status.to_string());
                report.ending = Ending::Exited(status);
                break;
            }
        };
        println!("[{}] {line}", series.name);
        if line.contains("Kernel panic") {
            report.ending = Ending::Panicked(line);
            break;
        }
        if let Some(test) = line.strip_prefix(MARK_START) {
            report.running = Some(test.to_owned());
        } else if let Some((_, reason)) = line.split_once(MARK_SKIPPED) {
            // The harness prints "test NAME ... " without a line break before the marker.
            skip_reason = Some(reason.to_owned());
        } else if let Some(mut result) = line.strip_prefix(MARK_END).and_then(parse_end_line) {
            result.skip_reason = skip_reason.take();
            report.tests.push(result);
            report.running = None;
        } else if line.starts_with(MARK_DONE) {
            report.ending = Ending::Finished;
            break;
        }
    }

    // The guest powers off after its final line; on a panic or a timeout it is killed now.
    let grace = if matches!(report.ending, Ending::Finished) { POWER_OFF_TIMEOUT } else { Duration::ZERO };
    stop_qemu(&mut qemu, grace);
    report.elapsed = started.elapsed();
    report
}

/// Parses the rest of an end line: `<executable>::<test> <outcome> <seconds>`.
fn parse_end_line(rest: &str) -> Option<TestResult> {
    let mut fields = rest.split_whitespace();
    let name = fields.next()?.to_owned();
    let outcome = Outcome::parse(fields.next()?)?;
    let seconds = fields.next()?.parse().ok()?;
    Some(TestResult { name, outcome, seconds, skip_reason: None })
}

/// Prints each kernel's results, then every failure and skip by name, then the totals.
fn print_summary(reports: &[KernelReport]) {
    println!();
    println!("vm-test results:");
    for report in reports {
        let verdict = if report.succeeded() { "ok" } else { "FAILED" };
        println!(
            "  {:<5} {verdict:<6} {} passed, {} failed, {} skipped in {:.0} s ({}, {})",
            report.series,
            report.count(Outcome::Passed),
            report.count(Outcome::Failed) + report.count(Outcome::TimedOut),
            report.count(Outcome::Skipped),
            report.elapsed.as_secs_f64(),
            report.package,
            report.accelerator,
        );
        match &report.ending {
            Ending::Finished => {}
            Ending::Panicked(line) => println!("        the kernel panicked: {line}"),
            Ending::TimedOut => println!("        timed out, QEMU killed"),
            Ending::Exited(status) => println!("        QEMU exited ({status}) before the guest's final line"),
            Ending::NotStarted(error) => println!("        guest not started: {error}"),
        }
        if let Some(running) = &report.running {
            println!("        {running} was running when the guest stopped");
        }
        if matches!(report.ending, Ending::Finished) && report.tests.is_empty() {
            println!("        no test ran");
        }
        for test in &report.tests {
            match test.outcome {
                Outcome::Passed => {}
                Outcome::Skipped => println!(
                    "        skipped: {} ({})",
                    test.name,
                    test.skip_reason.as_deref().unwrap_or("no reason printed")
                ),
                Outcome::Failed | Outcome::TimedOut => println!("        {}: {} after {:.1} s", test.outcome, test.name, test.seconds),
            }
        }
    }
    // A guest that stopped before its final line counts as one more failure.
    let stopped = reports.iter().filter(|report| !matches!(report.ending, Ending::Finished)).count();
    let total = |outcome| reports.iter().map(|report| report.count(outcome)).sum::<usize>();
    println!(
        "vm-test: {} passed, {} failed, {} skipped",
        total(Outcome::Passed),
        total(Outcome::Failed) + total(Outcome::TimedOut) + stopped,
        total(Outcome::Skipped)
    );
}

/// Removes `dir` with everything in it, if it exists, and creates it empty.
fn recreate_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("failed to remove {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))
}

fn write_executable(path: &Path, contents: &str) -> anyhow::Result<()> {
    fs::write(path, contents).with_context(|| format!("failed to write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).with_context(|| format!("failed to make {} executable", path.display()))
}

/// Copies a file's contents, following symbolic links, and creates the parent folders.
fn copy_file(from: &Path, to: &Path) -> anyhow::Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).with_context(|| format!("failed to create {}", parent.display()))?;
    }
    fs::copy(from, to).with_context(|| format!("failed to copy {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// Copies the host file at absolute `path` to the same path under `staging`.
fn copy_to_same_path(path: &Path, staging: &Path) -> anyhow::Result<()> {
    let relative = path.strip_prefix("/").with_context(|| format!("{} is not an absolute path", path.display()))?;
    copy_file(path, &staging.join(relative))
}

/// Returns the one file in `dir`.
fn single_file(dir: &Path) -> anyhow::Result<PathBuf> {
    single_file_with_prefix(dir, "")
}

/// Returns the one file in `dir` whose name starts with `prefix`.
fn single_file_with_prefix(dir: &Path, prefix: &str) -> anyhow::Result<PathBuf> {
    let mut matches = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("failed to read {}", dir.display()))? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            matches.push(entry.path());
        }
    }
    match <[PathBuf; 1]>::try_from(matches) {
        Ok([path]) => Ok(path),
        Err(matches) => bail!("expected one file named {prefix}* in {}, found {}", dir.display(), matches.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_line_parses_name_outcome_seconds() {
        let result = parse_end_line("parser::arp_is_not_ip_and_passes timed-out 600.2").expect("a valid end line");
        assert_eq!(result.name, "parser::arp_is_not_ip_and_passes");
        assert_eq!(result.outcome, Outcome::TimedOut);
        assert!((result.seconds - 600.2).abs() < 1e-9, "seconds: {}", result.seconds);
    }

    #[test]
    fn end_line_rejects_unknown_outcome() {
        assert!(parse_end_line("parser::a_test crashed 1.0").is_none());
        assert!(parse_end_line("parser::a_test passed").is_none());
    }

    #[test]
    fn module_dependencies_read_from_modinfo() {
        let contents = b"\x7fELF...\0license=GPL\0depends=nf_tables,nfnetlink\0vermagic=6.1.0\0";
        assert_eq!(module_dependencies(contents), ["nf_tables", "nfnetlink"]);
        assert!(module_dependencies(b"\0license=GPL\0depends=\0vermagic=6.1.0\0").is_empty());
        assert!(module_dependencies(b"\0license=GPL\0").is_empty());
    }

    #[test]
    fn init_script_runs_each_test_and_loads_modules() {
        let executables = [TestExecutable {
            name: String::from("attach"),
            path: PathBuf::from("/nonexistent/attach-0123"),
            tests: vec![String::from("attach_falls_back_and_is_idempotent"), String::from("attach_refuses_foreign_program")],
        }];
        let script = init_script(&[String::from("veth")], &executables);
        assert!(script.starts_with("#!/bin/sh\n"));
        assert!(script.contains("for module in veth; do"));
        assert!(script.contains("run_test attach attach_falls_back_and_is_idempotent\n"));
        assert!(script.contains("run_test attach attach_refuses_foreign_program\n"));
        assert!(script.contains("mount -t bpf bpf /sys/fs/bpf"));
        assert!(script.trim_end().ends_with("poweroff -f"));
    }
}
