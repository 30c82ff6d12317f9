//! Header parsing: one helper per header, each checking bounds against the frame's end,
//! advancing the cursor, and returning what comes next.

use aya_ebpf::programs::XdpContext;
use core::mem::size_of;
use limiter_common::{
    FAMILY_IPV4, FAMILY_IPV6, IPPROTO_TCP, IPPROTO_UDP, MAX_IPV6_EXTENSION_HEADERS,
    MAX_VLAN_TAGS, Reason,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTHENTICATION: u8 = 51;
const IPV6_DESTINATION_OPTIONS: u8 = 60;

/// Minimum header lengths read before trusting a port.
const TCP_HEADER_LEN: usize = 20;
const UDP_HEADER_LEN: usize = 8;

/// Offset of the flags byte in the TCP header (RFC 9293, 3.1).
const TCP_FLAGS_OFFSET: usize = 13;

/// Fields of a parsed packet that the limiter keys and matches on.
pub struct Packet {
    pub family: u8,
    /// Source address in network byte order; IPv4 fills the first 4 bytes.
    pub src_addr: [u8; 16],
    /// Transport protocol: the last IPv6 next-header value, or the IPv4 protocol field.
    pub protocol: u8,
    /// TCP or UDP destination port in host byte order; 0 for other protocols and for every
    /// fragment but the first, whose payload carries no transport header.
    pub dst_port: u16,
    /// TCP flags byte (CWR to FIN) of a TCP first fragment; 0 for anything else.
    pub tcp_flags: u8,
}

/// Position of the next header in the frame.
struct Cursor {
    offset: usize,
}

/// VLAN tag after the Ethernet addresses: TCI, then the next EtherType.
#[repr(C)]
struct VlanTag {
    _tci: [u8; 2],
    ether_type: [u8; 2],
}

/// Start of every IPv6 extension header but the fragment header.
#[repr(C)]
struct Ipv6Extension {
    next_header: u8,
    length: u8,
}

/// IPv6 fragment header.
#[repr(C)]
struct Ipv6Fragment {
    next_header: u8,
    _reserved: u8,
    offset_and_flags: [u8; 2],
    _identification: [u8; 4],
}

/// Returns a pointer to a `T` at `offset` bytes into the frame, if all of it lies inside.
#[inline(always)]
fn header_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, Reason> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(Reason::Malformed);
    }
    Ok((start + offset) as *const T)
}

/// Parses the frame up to the transport ports.
#[inline(always)]
pub fn parse_packet(ctx: &XdpContext) -> Result<Packet, Reason> {
    let mut cursor = Cursor { offset: 0 };
    let ether_type = parse_ethernet(ctx, &mut cursor)?;
    match ether_type {
        ETH_P_IPV4 => parse_ipv4(ctx, &mut cursor),
        ETH_P_IPV6 => parse_ipv6(ctx, &mut cursor),
        _ => Err(Reason::NotIp),
    }
}

/// Skips the Ethernet header and up to [`MAX_VLAN_TAGS`] VLAN tags, returning the
/// EtherType of what follows in host byte order.
#[inline(always)]
fn parse_ethernet(ctx: &XdpContext, cursor: &mut Cursor) -> Result<u16, Reason> {
    let eth: *const EthHdr = header_at(ctx, cursor.offset)?;
    // SAFETY: `header_at` checked that the whole header lies inside the frame.
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    cursor.offset += EthHdr::LEN;

    // The verifier needs a constant bound on this loop; a third tag is rare enough to drop.
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            return Ok(ether_type);
        }
        let tag: *const VlanTag = header_at(ctx, cursor.offset)?;
        // SAFETY: `header_at` checked that the whole tag lies inside the frame.
        ether_type = u16::from_be_bytes(unsafe { (*tag).ether_type });
        cursor.offset += size_of::<VlanTag>();
    }

    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        return Err(Reason::VlanTooDeep);
    }
    Ok(ether_type)
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, cursor: &mut Cursor) -> Result<Packet, Reason> {
    let ip: *const Ipv4Hdr = header_at(ctx, cursor.offset)?;
    // SAFETY: `header_at` checked that the fixed 20-byte header lies inside the frame.
    let (version_ihl, total_len, fragment, src) = unsafe {
        ((*ip).vihl, u16::from_be_bytes((*ip).tot_len), u16::from_be_bytes((*ip).frags), (*ip).src_addr)
    };
    // SAFETY: as above. The protocol is read as a byte because not every value of the byte
    // is a variant of `IpProto`.
    let protocol = unsafe { *(core::ptr::addr_of!((*ip).proto) as *const u8) };

    let header_len = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || header_len < Ipv4Hdr::LEN || (total_len as usize) < header_len {
        return Err(Reason::Malformed);
    }
    // Options must be inside the frame too, even though only the fixed part is read.
    if ctx.data() + cursor.offset + header_len > ctx.data_end() {
        return Err(Reason::Malformed);
    }
    cursor.offset += header_len;

    let mut packet = Packet { family: FAMILY_IPV4, src_addr: [0; 16], protocol, dst_port: 0, tcp_flags: 0 };
    packet.src_addr[..4].copy_from_slice(&src);

    let fragment_offset = fragment & 0x1fff;
    if fragment_offset == 0 {
        // NOTE: the transport header is checked against the frame, not against the total
        // length, so a header in Ethernet padding past the IPv4 packet still gives a port.
        (packet.dst_port, packet.tcp_flags) = parse_transport(ctx, cursor, protocol)?;
    }
    Ok(packet)
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, cursor: &mut Cursor) -> Result<Packet, Reason> {
    let ip: *const Ipv6Hdr = header_at(ctx, cursor.offset)?;
    // SAFETY: `header_at` checked that the 40-byte header lies inside the frame.
    let (version, src) = unsafe { ((*ip).vcf[0] >> 4, (*ip).src_addr) };
    // SAFETY: as above; read as a byte because not every value is an `IpProto` variant.
    let mut next_header = unsafe { *(core::ptr::addr_of!((*ip).next_hdr) as *const u8) };
    if version != 6 {
        return Err(Reason::Malformed);
    }
    cursor.offset += Ipv6Hdr::LEN;

    let mut packet = Packet { family: FAMILY_IPV6, src_addr: src, protocol: 0, dst_port: 0, tcp_flags: 0 };
    let mut first_fragment = true;

    // The verifier needs a constant bound on this walk. Real traffic carries two or three
    // extension headers at most, so a longer chain is dropped rather than left unlimited.
    for _ in 0..MAX_IPV6_EXTENSION_HEADERS {
        match next_header {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DESTINATION_OPTIONS => {
                let extension: *const Ipv6Extension = header_at(ctx, cursor.offset)?;
                // SAFETY: `header_at` checked the two bytes read here.
                let (next, length) = unsafe { ((*extension).next_header, (*extension).length) };
                next_header = next;
                // Length in 8-byte units, not counting the first 8 bytes (RFC 8200, 4.3).
                cursor.offset += (length as usize + 1) * 8;
            }
            IPV6_AUTHENTICATION => {
                let extension: *const Ipv6Extension = header_at(ctx, cursor.offset)?;
                // SAFETY: `header_at` checked the two bytes read here.
                let (next, length) = unsafe { ((*extension).next_header, (*extension).length) };
                next_header = next;
                // Length in 4-byte units, minus 2 (RFC 4302, 2.2).
                cursor.offset += (length as usize + 2) * 4;
            }
            IPV6_FRAGMENT => {
                let fragment: *const Ipv6Fragment = header_at(ctx, cursor.offset)?;
                // SAFETY: `header_at` checked that the 8-byte header lies inside the frame.
                let (next, offset_and_flags) =
                    unsafe { ((*fragment).next_header, u16::from_be_bytes((*fragment).offset_and_flags)) };
                next_header = next;
                // Any later fragment header makes the packet a later fragment: a second header
                // with offset 0 must not let its payload be read as a transport header.
                first_fragment &= offset_and_flags >> 3 == 0;
                cursor.offset += size_of::<Ipv6Fragment>();
            }
            _ => break,
        }
        // Only the first bytes of an extension header were read, but the whole header must
        // be inside the frame, even when nothing after it is read.
        if ctx.data() + cursor.offset > ctx.data_end() {
            return Err(Reason::Malformed);
        }
    }

    if is_ipv6_extension(next_header) {
        return Err(Reason::Ipv6ChainTooLong);
    }
    packet.protocol = next_header;
    if first_fragment {
        (packet.dst_port, packet.tcp_flags) = parse_transport(ctx, cursor, next_header)?;
    }
    Ok(packet)
}

#[inline(always)]
fn is_ipv6_extension(next_header: u8) -> bool {
    matches!(
        next_header,
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_FRAGMENT | IPV6_AUTHENTICATION | IPV6_DESTINATION_OPTIONS
    )
}

/// Returns the destination port of a TCP or UDP header at the cursor and the TCP flags
/// (0 for UDP), (0, 0) for any other protocol, and `Malformed` when the header is cut short.
#[inline(always)]
fn parse_transport(ctx: &XdpContext, cursor: &Cursor, protocol: u8) -> Result<(u16, u8), Reason> {
    let header_len = match protocol {
        IPPROTO_TCP => TCP_HEADER_LEN,
        IPPROTO_UDP => UDP_HEADER_LEN,
        _ => return Ok((0, 0)),
    };
    if ctx.data() + cursor.offset + header_len > ctx.data_end() {
        return Err(Reason::Malformed);
    }
    // Both TCP and UDP start with the source port, then the destination port.
    let ports: *const [u8; 4] = header_at(ctx, cursor.offset)?;
    // SAFETY: the transport header, and so its first four bytes, lies inside the frame.
    let ports = unsafe { *ports };
    let dst_port = u16::from_be_bytes([ports[2], ports[3]]);
    if protocol != IPPROTO_TCP {
        return Ok((dst_port, 0));
    }

    let flags: *const u8 = header_at(ctx, cursor.offset + TCP_FLAGS_OFFSET)?;
    // SAFETY: the byte lies inside the 20-byte TCP header checked above.
    Ok((dst_port, unsafe { *flags }))
}
