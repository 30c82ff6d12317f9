//! Paced UDP senders inside a network namespace and a receiver that counts what arrives, per
//! source and per second.
//!
//! Each sender thread enters the namespace with setns(2), which moves only that thread, and is
//! pinned to one CPU. On a veth pair the XDP program runs on the sending CPU, so pinning gives
//! each source a stable CPU, as receive-side scaling does on a real NIC.

use std::{
    collections::HashMap,
    fs::File,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{Arc, atomic::{AtomicBool, Ordering}},
    thread,
    time::{Duration, Instant},
};

/// Set by [`request_stop`]: senders return early, so an interrupted run still cleans up.
static STOP: AtomicBool = AtomicBool::new(false);

/// Makes every sender return at its next step. Safe to call from a signal handler.
pub fn request_stop() {
    STOP.store(true, Ordering::Relaxed);
}

pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// One source of test traffic.
#[derive(Clone, Copy, Debug)]
pub struct Source {
    pub addr: Ipv4Addr,
    pub packets_per_second: u64,
    /// CPU the sender thread is pinned to.
    pub cpu: usize,
}

/// What a traffic run measured.
#[derive(Debug, Default)]
pub struct TrafficReport {
    pub sent: HashMap<Ipv4Addr, u64>,
    /// Packets received from each source in each whole second since the start.
    pub received_per_second: HashMap<Ipv4Addr, Vec<u64>>,
    /// Packets received from each source in all, including those still in flight when the
    /// last whole second ended.
    pub received: HashMap<Ipv4Addr, u64>,
}

impl TrafficReport {
    pub fn received_total(&self, addr: Ipv4Addr) -> u64 {
        self.received.get(&addr).copied().unwrap_or(0)
    }
}

/// Packets a [`Receiver`] counted.
#[derive(Debug, Default)]
pub struct Received {
    pub per_second: HashMap<Ipv4Addr, Vec<u64>>,
    pub total: HashMap<Ipv4Addr, u64>,
    /// Every arrival within the run: source and time since the start.
    pub arrivals: Vec<(Ipv4Addr, Duration)>,
}

/// Counts UDP packets arriving at `bind`, per source and per second since `start`.
pub struct Receiver {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<Received>,
}

impl Receiver {
    pub fn start(bind: SocketAddrV4, start: Instant, seconds: usize) -> Self {
        let socket = UdpSocket::bind(bind).unwrap_or_else(|error| panic!("failed to bind receiver on {bind}: {error}"));
        socket.set_read_timeout(Some(Duration::from_millis(50))).expect("set read timeout");
        set_receive_buffer(&socket, 8 << 20);
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let handle = thread::spawn(move || {
            let mut received = Received::default();
            let mut buffer = [0u8; 2048];
            while !stop_flag.load(Ordering::Relaxed) {
                let Ok((_, from)) = socket.recv_from(&mut buffer) else { continue };
                let SocketAddr::V4(from) = from else { continue };
                *received.total.entry(*from.ip()).or_default() += 1;
                let elapsed = Instant::now().saturating_duration_since(start);
                let second = elapsed.as_secs() as usize;
                if second < seconds {
                    received.per_second.entry(*from.ip()).or_insert_with(|| vec![0; seconds])[second] += 1;
                    received.arrivals.push((*from.ip(), elapsed));
                }
            }
            received
        });
        Self { stop, handle }
    }

    pub fn finish(self) -> Received {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("receiver thread panicked")
    }
}

/// Starts a paced sender thread for `source` in `netns`, sending to `destination` from
/// `start` for `duration`. The thread returns the number of packets sent.
pub fn spawn_sender(netns: &str, source: Source, destination: SocketAddrV4, start: Instant, duration: Duration) -> thread::JoinHandle<u64> {
    let netns_path = format!("/var/run/netns/{netns}");
    let steps = [(Duration::ZERO, source.packets_per_second)];
    thread::spawn(move || send_scheduled(&netns_path, source.addr, source.cpu, destination, &steps, start, duration))
}

/// Sends from `source` in the namespace at `netns_path`, pinned to `cpu`, at a
/// piecewise-constant rate: `steps` are (time since `start`, packets per second), in order,
/// and the packets due by now are the integral of the rate up to now. Returns the number of
/// packets sent.
pub fn send_scheduled(
    netns_path: &str,
    source: Ipv4Addr,
    cpu: usize,
    destination: SocketAddrV4,
    steps: &[(Duration, u64)],
    start: Instant,
    duration: Duration,
) -> u64 {
    enter_netns(netns_path);
    pin_to_cpu(cpu);
    let socket = UdpSocket::bind(SocketAddrV4::new(source, 0))
        .unwrap_or_else(|error| panic!("failed to bind sender on {source}: {error}"));
    let payload = [0x5au8; 64];
    let due_by = |elapsed: Duration| -> u64 {
        let mut due = 0.0;
        for (index, (at, rate)) in steps.iter().enumerate() {
            let until = steps.get(index + 1).map_or(elapsed, |(next, _)| (*next).min(elapsed));
            if until > *at {
                due += (until - *at).as_secs_f64() * *rate as f64;
            }
        }
        due as u64
    };
    while Instant::now() < start {
        thread::sleep(Duration::from_micros(200));
    }
    let mut sent = 0u64;
    loop {
        let elapsed = start.elapsed();
        if elapsed >= duration || stop_requested() {
            return sent;
        }
        let due = due_by(elapsed);
        while sent < due {
            let _ = socket.send_to(&payload, destination);
            sent += 1;
        }
        thread::sleep(Duration::from_micros(500));
    }
}

/// Sends from every source for `duration` and counts what arrives at `destination`.
pub fn run_traffic(netns: &str, sources: &[Source], destination: SocketAddrV4, duration: Duration) -> TrafficReport {
    let start = Instant::now() + Duration::from_millis(100);
    let seconds = duration.as_secs() as usize;
    let receiver = Receiver::start(destination, start, seconds);
    let senders: Vec<_> = sources
        .iter()
        .map(|source| (source.addr, spawn_sender(netns, *source, destination, start, duration)))
        .collect();

    let mut report = TrafficReport::default();
    for (addr, sender) in senders {
        *report.sent.entry(addr).or_default() += sender.join().expect("sender thread panicked");
    }
    // Let the last packets drain through the stack before the receiver stops.
    thread::sleep(Duration::from_millis(200));
    let received = receiver.finish();
    report.received_per_second = received.per_second;
    report.received = received.total;
    report
}

pub fn enter_netns(path: &str) {
    let file = File::open(path).unwrap_or_else(|error| panic!("failed to open {path}: {error}"));
    // SAFETY: setns(2) on a namespace file descriptor that stays open for the call; it moves
    // only the calling thread.
    let result = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(result, 0, "setns({path}) failed: {}", std::io::Error::last_os_error());
}

pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: `cpu_set_t` is plain data; CPU_SET writes inside it; sched_setaffinity(0, ...)
    // applies to the calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let result = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(result, 0, "failed to pin sender to CPU {cpu}: {}", std::io::Error::last_os_error());
    }
}

fn set_receive_buffer(socket: &UdpSocket, bytes: libc::c_int) {
    // SAFETY: setsockopt with a pointer to a live c_int and its exact size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}
