//! BPF_PROG_TEST_RUN for the XDP program, and a builder of the frames the tests run it on.
//!
//! BPF_PROG_TEST_RUN runs a loaded program on a buffer in the calling thread, on the CPU that
//! thread is on, without any interface. aya 0.14 has no wrapper for it, so [`run_xdp`] calls
//! bpf(2) directly.

use std::{
    fmt, io,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, BorrowedFd},
};

use limiter_common::{IPPROTO_TCP, IPPROTO_UDP};

/// `BPF_PROG_TEST_RUN` in `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// `XDP_DROP` and `XDP_PASS` in `enum xdp_action` (include/uapi/linux/bpf.h).
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// The `test` member of the kernel's `union bpf_attr`, which BPF_PROG_TEST_RUN reads and
/// writes back. Field order and sizes follow include/uapi/linux/bpf.h.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    /// Tail padding up to the 8-byte alignment of the union. The kernel rejects the call
    /// with EINVAL unless every byte after `batch_size` is zero.
    _padding: u32,
}

/// What one BPF_PROG_TEST_RUN call returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestRunOutput {
    /// The program's return value, an XDP action such as [`XDP_PASS`].
    pub action: u32,
    /// Mean run time per repetition in nanoseconds, as the kernel measured it.
    pub duration_ns: u32,
}

/// A failed BPF_PROG_TEST_RUN call.
#[derive(Debug)]
pub struct TestRunError {
    /// The errno bpf(2) set.
    pub errno: i32,
    frame_len: usize,
}

impl fmt::Display for TestRunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let error = io::Error::from_raw_os_error(self.errno);
        write!(f, "bpf(BPF_PROG_TEST_RUN) on a {}-byte frame failed: {error} (errno {})", self.frame_len, self.errno)?;
        match self.errno {
            libc::EINVAL => f.write_str(
                "; the kernel rejects XDP test frames shorter than 14 bytes or longer than a page minus XDP \
                 headroom, and a context whose data_end is past the frame",
            ),
            libc::EPERM | libc::EACCES => f.write_str("; run the tests as root"),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for TestRunError {}

/// `struct xdp_md` (include/uapi/linux/bpf.h), the context BPF_PROG_TEST_RUN accepts for XDP.
/// Offsets are relative to the start of the buffer passed in.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// Runs the XDP program `program` on a copy of `frame`, `repeat` times (0 counts as 1), and
/// returns the action of the last run and the mean duration.
///
/// The program reads `frame` as received, with no metadata. Changes it makes to the copy are
/// discarded. Per-CPU map values it writes land in the slot of the CPU the calling thread is
/// on.
pub fn run_xdp(program: BorrowedFd<'_>, frame: &[u8], repeat: u32) -> Result<TestRunOutput, TestRunError> {
    test_run(program, frame, None, repeat)
}

/// Runs the program as [`run_xdp`] does, but with only the first `linear_len` bytes of
/// `frame` in the linear part of the buffer, between `data` and `data_end`, and the rest in a
/// fragment, as a multi-buffer frame arrives.
///
/// The limiter reads only the linear part, so this is how a test shows it fewer than 14
/// bytes: the kernel rejects a whole test frame that short. Linux 6.18 accepts a linear part
/// shorter than the frame. Kernels that require `data_end` to equal the frame length return
/// EINVAL.
pub fn run_xdp_with_linear_len(
    program: BorrowedFd<'_>,
    frame: &[u8],
    linear_len: u32,
    repeat: u32,
) -> Result<TestRunOutput, TestRunError> {
    let context = XdpMd { data: 0, data_end: linear_len, ..XdpMd::default() };
    test_run(program, frame, Some(&context), repeat)
}

fn test_run(
    program: BorrowedFd<'_>,
    frame: &[u8],
    context: Option<&XdpMd>,
    repeat: u32,
) -> Result<TestRunOutput, TestRunError> {
    let frame_len = frame.len();
    let invalid = || TestRunError { errno: libc::EINVAL, frame_len };
    let data_size_in = u32::try_from(frame_len).map_err(|_| invalid())?;
    let prog_fd = u32::try_from(program.as_raw_fd()).map_err(|_| invalid())?;
    let (ctx_in, ctx_size_in) = match context {
        Some(context) => (context as *const XdpMd as u64, size_of::<XdpMd>() as u32),
        None => (0, 0),
    };
    let mut attr = TestRunAttr {
        prog_fd,
        data_size_in,
        data_in: frame.as_ptr() as u64,
        repeat,
        ctx_size_in,
        ctx_in,
        ..TestRunAttr::default()
    };

    // SAFETY: `attr` is a fully initialized `bpf_attr.test` with zeroed padding, and its size
    // is passed along, so the kernel reads and writes only inside it. `data_in` and `ctx_in`
    // point to `frame` and `context` with their sizes, both outlive the call, and the kernel
    // only reads them. No output buffers are passed, so the kernel writes nothing else.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            size_of::<TestRunAttr>() as libc::c_uint,
        )
    };
    if result != 0 {
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        return Err(TestRunError { errno, frame_len });
    }
    Ok(TestRunOutput { action: attr.retval, duration_ns: attr.duration })
}

/// Length of an Ethernet header without VLAN tags.
pub const ETHERNET_LEN: usize = 14;
/// Length of one 802.1Q or 802.1ad tag.
pub const VLAN_TAG_LEN: usize = 4;
/// Length of an IPv4 header without options.
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
pub const UDP_LEN: usize = 8;
/// Length of a TCP header without options.
pub const TCP_LEN: usize = 20;

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV6: u16 = 0x86DD;
/// Tag protocol identifier of an 802.1Q (customer) VLAN tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// Tag protocol identifier of an 802.1ad (service, QinQ) VLAN tag.
pub const ETHERTYPE_QINQ: u16 = 0x88A8;

pub const IPPROTO_SCTP: u8 = 132;

/// TCP flags (RFC 9293, 3.1).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
/// IPv6 "No Next Header", written as the protocol of a frame built without a transport.
pub const IPPROTO_NONE: u8 = 59;

/// An IPv6 extension header as the frame builder writes it.
#[derive(Clone, Copy, Debug)]
pub enum Ipv6Extension {
    /// Hop-by-Hop Options (next header 0), `(hdr_ext_len + 1) * 8` bytes long, filled with
    /// Pad1 options.
    HopByHop { hdr_ext_len: u8 },
    /// Routing header (43) of an experimental routing type with no segments left,
    /// `(hdr_ext_len + 1) * 8` bytes long.
    Routing { hdr_ext_len: u8 },
    /// Fragment header (44). `offset` is in 8-byte units.
    Fragment { offset: u16, more_fragments: bool },
    /// Destination Options (60), laid out as Hop-by-Hop Options.
    DestinationOptions { hdr_ext_len: u8 },
    /// Authentication Header (51), `(payload_len + 2) * 4` bytes long. For IPv6 the total
    /// must be a multiple of 8, so `payload_len` must be even.
    Authentication { payload_len: u8 },
}

impl Ipv6Extension {
    fn next_header_value(self) -> u8 {
        match self {
            Ipv6Extension::HopByHop { .. } => 0,
            Ipv6Extension::Routing { .. } => 43,
            Ipv6Extension::Fragment { .. } => 44,
            Ipv6Extension::DestinationOptions { .. } => 60,
            Ipv6Extension::Authentication { .. } => 51,
        }
    }

    /// Appends the header, with `next_header` as the type of what follows it.
    fn write(self, next_header: u8, bytes: &mut Vec<u8>) {
        match self {
            Ipv6Extension::HopByHop { hdr_ext_len } | Ipv6Extension::DestinationOptions { hdr_ext_len } => {
                let len = (usize::from(hdr_ext_len) + 1) * 8;
                bytes.extend_from_slice(&[next_header, hdr_ext_len]);
                // Each zero byte is a Pad1 option.
                bytes.resize(bytes.len() + len - 2, 0);
            }
            Ipv6Extension::Routing { hdr_ext_len } => {
                let len = (usize::from(hdr_ext_len) + 1) * 8;
                // Routing type 253, which is reserved for experiments, with no segments left.
                bytes.extend_from_slice(&[next_header, hdr_ext_len, 253, 0]);
                bytes.resize(bytes.len() + len - 4, 0);
            }
            Ipv6Extension::Fragment { offset, more_fragments } => {
                assert!(offset < 1 << 13, "fragment offset {offset} does not fit in 13 bits");
                let offset_and_flags = (offset << 3) | u16::from(more_fragments);
                bytes.extend_from_slice(&[next_header, 0]);
                bytes.extend_from_slice(&offset_and_flags.to_be_bytes());
                bytes.extend_from_slice(&0x1234_5678u32.to_be_bytes());
            }
            Ipv6Extension::Authentication { payload_len } => {
                let len = (usize::from(payload_len) + 2) * 4;
                assert!(len >= 12, "an Authentication Header is at least 12 bytes, got payload_len {payload_len}");
                bytes.extend_from_slice(&[next_header, payload_len, 0, 0]);
                bytes.extend_from_slice(&0x100u32.to_be_bytes()); // SPI
                bytes.extend_from_slice(&1u32.to_be_bytes()); // sequence number
                bytes.resize(bytes.len() + len - 12, 0); // integrity check value
            }
        }
    }
}

/// The transport part of a frame.
#[derive(Clone, Debug)]
enum Transport {
    Udp { src_port: u16, dst_port: u16 },
    /// `flags` is the TCP flags byte, such as [`TCP_SYN`].
    Tcp { src_port: u16, dst_port: u16, flags: u8 },
    /// Any other protocol, followed by `payload`.
    Other { protocol: u8, payload: Vec<u8> },
}

impl Transport {
    fn protocol(&self) -> u8 {
        match self {
            Transport::Udp { .. } => IPPROTO_UDP,
            Transport::Tcp { .. } => IPPROTO_TCP,
            Transport::Other { protocol, .. } => *protocol,
        }
    }

    fn write(&self, bytes: &mut Vec<u8>) {
        match self {
            Transport::Udp { src_port, dst_port } => {
                bytes.extend_from_slice(&src_port.to_be_bytes());
                bytes.extend_from_slice(&dst_port.to_be_bytes());
                bytes.extend_from_slice(&(UDP_LEN as u16).to_be_bytes());
                bytes.extend_from_slice(&[0, 0]); // checksum
            }
            Transport::Tcp { src_port, dst_port, flags } => {
                bytes.extend_from_slice(&src_port.to_be_bytes());
                bytes.extend_from_slice(&dst_port.to_be_bytes());
                bytes.extend_from_slice(&1u32.to_be_bytes()); // sequence number
                bytes.extend_from_slice(&0u32.to_be_bytes()); // acknowledgment number
                bytes.extend_from_slice(&[5 << 4, *flags]); // data offset 5 words, flags
                bytes.extend_from_slice(&0xffffu16.to_be_bytes()); // window
                bytes.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
            }
            Transport::Other { payload, .. } => bytes.extend_from_slice(payload),
        }
    }
}

#[derive(Clone, Debug)]
enum Network {
    Ipv4 {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        /// Header length in 4-byte words, as written in the header.
        ihl: u8,
        /// Fragment offset in 8-byte units.
        fragment_offset: u16,
        more_fragments: bool,
        /// Total length to write instead of the real one.
        total_length: Option<u16>,
    },
    Ipv6 {
        src: Ipv6Addr,
        dst: Ipv6Addr,
        extensions: Vec<Ipv6Extension>,
    },
    Arp,
}

/// A test frame: Ethernet, VLAN tags, IPv4, IPv6 or ARP, then a transport header. Checksums
/// are 0, because the XDP program does not check them.
///
/// ```ignore
/// let frame = Frame::ipv4(source, destination).vlan(ETHERTYPE_VLAN).udp(40_000, 53).build();
/// ```
#[derive(Clone, Debug)]
pub struct Frame {
    /// Tag protocol identifiers, outermost first.
    vlan_tags: Vec<u16>,
    network: Network,
    transport: Transport,
    /// Zero bytes after the transport header.
    payload_len: usize,
}

impl Frame {
    /// Starts an IPv4 frame with a 20-byte header, not fragmented, carrying no transport.
    pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        let network =
            Network::Ipv4 { src, dst, ihl: 5, fragment_offset: 0, more_fragments: false, total_length: None };
        Self::new(network)
    }

    /// Starts an IPv6 frame with no extension headers, carrying no transport.
    pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr) -> Self {
        Self::new(Network::Ipv6 { src, dst, extensions: Vec::new() })
    }

    /// Builds an ARP request for 192.0.2.1 from 192.0.2.2.
    pub fn arp() -> Self {
        Self::new(Network::Arp)
    }

    fn new(network: Network) -> Self {
        Self {
            vlan_tags: Vec::new(),
            network,
            transport: Transport::Other { protocol: IPPROTO_NONE, payload: Vec::new() },
            payload_len: 0,
        }
    }

    /// Adds a VLAN tag inside those added before, with `tpid` such as [`ETHERTYPE_VLAN`].
    pub fn vlan(mut self, tpid: u16) -> Self {
        self.vlan_tags.push(tpid);
        self
    }

    /// Sets the IPv4 header length in 4-byte words. Options past the 20-byte header are
    /// No-Operation bytes. Below 5, the header is still 20 bytes, with `words` in its IHL field.
    pub fn ihl(mut self, words: u8) -> Self {
        assert!(words <= 15, "IHL {words} does not fit in 4 bits");
        match &mut self.network {
            Network::Ipv4 { ihl, .. } => *ihl = words,
            other => panic!("ihl() needs an IPv4 frame, not {other:?}"),
        }
        self
    }

    /// Marks an IPv4 frame as a fragment at `offset` 8-byte units.
    pub fn fragment(mut self, offset: u16, more: bool) -> Self {
        assert!(offset < 1 << 13, "fragment offset {offset} does not fit in 13 bits");
        match &mut self.network {
            Network::Ipv4 { fragment_offset, more_fragments, .. } => {
                *fragment_offset = offset;
                *more_fragments = more;
            }
            other => panic!("fragment() needs an IPv4 frame, not {other:?}; use Ipv6Extension::Fragment"),
        }
        self
    }

    /// Writes `length` as the IPv4 total length instead of the real length.
    pub fn total_length(mut self, length: u16) -> Self {
        match &mut self.network {
            Network::Ipv4 { total_length, .. } => *total_length = Some(length),
            other => panic!("total_length() needs an IPv4 frame, not {other:?}"),
        }
        self
    }

    /// Adds an IPv6 extension header after those added before.
    pub fn extension(mut self, extension: Ipv6Extension) -> Self {
        match &mut self.network {
            Network::Ipv6 { extensions, .. } => extensions.push(extension),
            other => panic!("extension() needs an IPv6 frame, not {other:?}"),
        }
        self
    }

    pub fn udp(mut self, src_port: u16, dst_port: u16) -> Self {
        self.transport = Transport::Udp { src_port, dst_port };
        self
    }

    /// Carries a TCP SYN segment.
    pub fn tcp(self, src_port: u16, dst_port: u16) -> Self {
        self.tcp_with_flags(src_port, dst_port, TCP_SYN)
    }

    /// Carries a TCP segment with the flags byte `flags`, such as `TCP_SYN | TCP_ACK`.
    pub fn tcp_with_flags(mut self, src_port: u16, dst_port: u16, flags: u8) -> Self {
        self.transport = Transport::Tcp { src_port, dst_port, flags };
        self
    }

    /// Appends `len` zero bytes after the transport header, counted in the IP lengths.
    pub fn payload(mut self, len: usize) -> Self {
        self.payload_len = len;
        self
    }

    /// Carries `payload` as IP protocol `protocol`.
    pub fn protocol(mut self, protocol: u8, payload: &[u8]) -> Self {
        self.transport = Transport::Other { protocol, payload: payload.to_vec() };
        self
    }

    /// Returns the frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(128);
        bytes.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // destination MAC
        bytes.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // source MAC
        for (index, tpid) in self.vlan_tags.iter().enumerate() {
            bytes.extend_from_slice(&tpid.to_be_bytes());
            let vlan_id = 100 + index as u16;
            bytes.extend_from_slice(&vlan_id.to_be_bytes());
        }

        match &self.network {
            Network::Ipv4 { src, dst, ihl, fragment_offset, more_fragments, total_length } => {
                bytes.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
                let header_len = usize::from(*ihl).max(5) * 4;
                let mut transport = Vec::new();
                self.transport.write(&mut transport);
                transport.resize(transport.len() + self.payload_len, 0);
                let real_length = u16::try_from(header_len + transport.len()).expect("IPv4 packet under 64 KiB");
                let flags_and_offset = (u16::from(*more_fragments) << 13) | fragment_offset;

                bytes.extend_from_slice(&[0x40 | ihl, 0]);
                bytes.extend_from_slice(&total_length.unwrap_or(real_length).to_be_bytes());
                bytes.extend_from_slice(&0x1234u16.to_be_bytes()); // identification
                bytes.extend_from_slice(&flags_and_offset.to_be_bytes());
                bytes.extend_from_slice(&[64, self.transport.protocol(), 0, 0]); // TTL, protocol, checksum
                bytes.extend_from_slice(&src.octets());
                bytes.extend_from_slice(&dst.octets());
                bytes.resize(bytes.len() + header_len - IPV4_LEN, 1); // No-Operation options
                bytes.extend_from_slice(&transport);
            }
            Network::Ipv6 { src, dst, extensions } => {
                bytes.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
                let mut payload = Vec::new();
                for (index, extension) in extensions.iter().enumerate() {
                    let next_header = match extensions.get(index + 1) {
                        Some(next) => next.next_header_value(),
                        None => self.transport.protocol(),
                    };
                    extension.write(next_header, &mut payload);
                }
                self.transport.write(&mut payload);
                payload.resize(payload.len() + self.payload_len, 0);
                let first_header = match extensions.first() {
                    Some(first) => first.next_header_value(),
                    None => self.transport.protocol(),
                };

                bytes.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, no traffic class or flow label
                bytes.extend_from_slice(&u16::try_from(payload.len()).expect("IPv6 payload under 64 KiB").to_be_bytes());
                bytes.extend_from_slice(&[first_header, 64]); // next header, hop limit
                bytes.extend_from_slice(&src.octets());
                bytes.extend_from_slice(&dst.octets());
                bytes.extend_from_slice(&payload);
            }
            Network::Arp => {
                bytes.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
                bytes.extend_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
                bytes.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes()); // protocol type
                bytes.extend_from_slice(&[6, 4]); // address lengths
                bytes.extend_from_slice(&1u16.to_be_bytes()); // operation: request
                bytes.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 192, 0, 2, 2]); // sender
                bytes.extend_from_slice(&[0, 0, 0, 0, 0, 0, 192, 0, 2, 1]); // target
            }
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
    const DST4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

    #[test]
    fn attr_matches_kernel_layout() {
        // The 15 fields of bpf_attr.test end at byte 76, and the union is 8-byte aligned.
        assert_eq!(size_of::<TestRunAttr>(), 80);
        assert_eq!(std::mem::offset_of!(TestRunAttr, data_in), 16);
        assert_eq!(std::mem::offset_of!(TestRunAttr, ctx_in), 48);
        assert_eq!(std::mem::offset_of!(TestRunAttr, batch_size), 72);
    }

    #[test]
    fn ipv4_udp_frame_layout() {
        let frame = Frame::ipv4(SRC4, DST4).udp(40_000, 53).build();
        assert_eq!(frame.len(), ETHERNET_LEN + IPV4_LEN + UDP_LEN);
        assert_eq!(&frame[12..14], &[0x08, 0x00]);
        assert_eq!(frame[14], 0x45);
        assert_eq!(&frame[16..18], &28u16.to_be_bytes());
        assert_eq!(frame[23], IPPROTO_UDP);
        assert_eq!(&frame[26..30], &SRC4.octets());
        assert_eq!(&frame[36..38], &53u16.to_be_bytes());
    }

    #[test]
    fn ipv4_options_are_padded_with_nops() {
        let frame = Frame::ipv4(SRC4, DST4).ihl(6).udp(40_000, 53).build();
        assert_eq!(frame[14], 0x46);
        assert_eq!(&frame[34..38], &[1, 1, 1, 1]);
        assert_eq!(&frame[40..42], &53u16.to_be_bytes());
    }

    #[test]
    fn ipv4_fragment_fields() {
        let frame = Frame::ipv4(SRC4, DST4).fragment(185, true).build();
        assert_eq!(u16::from_be_bytes([frame[20], frame[21]]), 0x2000 | 185);
    }

    #[test]
    fn vlan_tags_come_outermost_first() {
        let frame = Frame::ipv4(SRC4, DST4).vlan(ETHERTYPE_QINQ).vlan(ETHERTYPE_VLAN).build();
        assert_eq!(&frame[12..14], &ETHERTYPE_QINQ.to_be_bytes());
        assert_eq!(&frame[16..18], &ETHERTYPE_VLAN.to_be_bytes());
        assert_eq!(&frame[20..22], &ETHERTYPE_IPV4.to_be_bytes());
    }

    #[test]
    fn ipv6_extension_chain_links_next_headers() {
        let frame = Frame::ipv6(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST)
            .extension(Ipv6Extension::HopByHop { hdr_ext_len: 1 })
            .extension(Ipv6Extension::Authentication { payload_len: 4 })
            .tcp(40_000, 443)
            .build();
        let ip = ETHERNET_LEN;
        let hop_by_hop = ip + IPV6_LEN;
        let authentication = hop_by_hop + 16;
        let tcp = authentication + 24;
        assert_eq!(frame.len(), tcp + TCP_LEN);
        assert_eq!(u16::from_be_bytes([frame[ip + 4], frame[ip + 5]]) as usize, 16 + 24 + TCP_LEN);
        assert_eq!(frame[ip + 6], 0);
        assert_eq!(frame[hop_by_hop], 51);
        assert_eq!(frame[authentication], IPPROTO_TCP);
        assert_eq!(&frame[tcp + 2..tcp + 4], &443u16.to_be_bytes());
    }

    #[test]
    fn arp_frame_is_42_bytes() {
        let frame = Frame::arp().build();
        assert_eq!(frame.len(), 42);
        assert_eq!(&frame[12..14], &ETHERTYPE_ARP.to_be_bytes());
    }
}
