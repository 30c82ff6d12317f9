//! The packet fields the XDP program keys and matches on, read in user space: from an
//! Ethernet frame by the same steps as `limiter-ebpf/src/parse.rs`, or from a description
//! such as `udp 192.0.2.1:5353 -> 198.51.100.7:53`.

use std::net::{IpAddr, SocketAddr};

use limiter_common::{
    FAMILY_IPV4, FAMILY_IPV6, IPPROTO_TCP, IPPROTO_UDP, MAX_IPV6_EXTENSION_HEADERS, MAX_VLAN_TAGS, Reason, TCP_FLAG_ACK,
    TCP_FLAG_SYN,
};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const ETHERNET_HEADER_LEN: usize = 14;
const VLAN_TAG_LEN: usize = 4;
const IPV4_HEADER_LEN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;
const IPV6_FRAGMENT_HEADER_LEN: usize = 8;
const TCP_HEADER_LEN: usize = 20;
const UDP_HEADER_LEN: usize = 8;
/// Offset of the flags byte in the TCP header (RFC 9293, 3.1).
const TCP_FLAGS_OFFSET: usize = 13;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTHENTICATION: u8 = 51;
const IPV6_DESTINATION_OPTIONS: u8 = 60;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

/// Fields of a packet that select its rule and key, as the XDP program reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketFields {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Transport protocol: the IPv4 protocol field or the last IPv6 next-header value.
    pub protocol: u8,
    /// TCP or UDP destination port; 0 for other protocols and for every fragment but the first.
    pub dst_port: u16,
    /// TCP flags byte of a first fragment; 0 for anything else.
    pub tcp_flags: u8,
    /// Frame length in bytes, Ethernet header included: what a rule that counts bytes
    /// charges for the packet.
    pub frame_len: u64,
}

impl PacketFields {
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub fn family(&self) -> u8 {
        if self.src.is_ipv4() { FAMILY_IPV4 } else { FAMILY_IPV6 }
    }

    /// Source address as the program stores it: network byte order, IPv4 in the first 4 bytes.
    pub fn src_bytes(&self) -> [u8; 16] {
        let mut bytes = [0u8; 16];
        match self.src {
            IpAddr::V4(addr) => bytes[..4].copy_from_slice(&addr.octets()),
            IpAddr::V6(addr) => bytes = addr.octets(),
        }
        bytes
    }

    /// Returns true for a TCP segment with SYN set and ACK clear: a connection request.
    pub fn is_syn(&self) -> bool {
        self.protocol == IPPROTO_TCP && self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }

    /// Formats the fields as a description that [`parse_description`] reads back.
    pub fn describe(&self) -> String {
        let protocol = match self.protocol {
            IPPROTO_TCP => "tcp".to_owned(),
            IPPROTO_UDP => "udp".to_owned(),
            IPPROTO_ICMP => "icmp".to_owned(),
            IPPROTO_ICMPV6 => "icmpv6".to_owned(),
            number => number.to_string(),
        };
        let mut text = match self.protocol {
            IPPROTO_TCP | IPPROTO_UDP if self.dst_port != 0 => {
                format!("{protocol} {} -> {}", self.src, SocketAddr::new(self.dst, self.dst_port))
            }
            IPPROTO_TCP | IPPROTO_UDP => format!("{protocol} {} -> {} fragment", self.src, self.dst),
            _ => format!("{protocol} {} -> {}", self.src, self.dst),
        };
        if self.is_syn() {
            text += " syn";
        }
        text + &format!(" length {}", self.frame_len)
    }
}

/// Parses a description of the form `PROTOCOL SOURCE -> DESTINATION [fragment] [syn]
/// [length BYTES]`.
///
/// PROTOCOL is `tcp`, `udp`, `icmp`, `icmpv6` or an IP protocol number. For TCP and UDP the
/// destination carries a port (`198.51.100.7:53`, `[2001:db8::1]:53`), unless the word
/// `fragment` follows, which stands for a fragment after the first and so for port 0. The
/// source port may be given and is ignored, as the program ignores it. A TCP segment is
/// taken to carry ACK, as every segment after the handshake's first does, unless `syn`
/// makes it a connection request (SYN without ACK). `length` sets the frame length that
/// rules counting bytes charge; without it, the frame is taken to hold the headers alone.
pub fn parse_description(text: &str) -> Result<PacketFields, String> {
    let expected = "expected PROTOCOL SOURCE -> DESTINATION [fragment] [syn] [length BYTES], such as `udp 192.0.2.1:5353 -> 198.51.100.7:53`";
    let words: Vec<&str> = text.split_whitespace().collect();
    let (protocol, src, dst, options) = match words.as_slice() {
        [protocol, src, "->", dst, options @ ..] => (*protocol, *src, *dst, options),
        _ => return Err(format!("invalid packet description {text:?}: {expected}")),
    };
    let (mut fragment, mut syn, mut frame_len) = (false, false, None);
    let mut options = options.iter();
    while let Some(option) = options.next() {
        match *option {
            "fragment" => fragment = true,
            "syn" => syn = true,
            "length" => {
                let value = options.next().ok_or_else(|| format!("missing value after `length` in {text:?}: {expected}"))?;
                let length = value
                    .parse::<u64>()
                    .ok()
                    .filter(|length| (1..=65_535 + 64).contains(length))
                    .ok_or_else(|| format!("invalid frame length {value:?} in {text:?}: expected bytes from 1 to 65599"))?;
                frame_len = Some(length);
            }
            other => return Err(format!("invalid word {other:?} in {text:?}: {expected}")),
        }
    }

    let protocol = match protocol.to_ascii_lowercase().as_str() {
        "tcp" => IPPROTO_TCP,
        "udp" => IPPROTO_UDP,
        "icmp" => IPPROTO_ICMP,
        "icmpv6" | "ipv6-icmp" => IPPROTO_ICMPV6,
        other => other.parse::<u8>().map_err(|_| {
            format!("invalid protocol {protocol:?} in {text:?}: expected tcp, udp, icmp, icmpv6 or a number from 0 to 255")
        })?,
    };
    let (src, _) = parse_endpoint(src).map_err(|error| format!("invalid source in {text:?}: {error}"))?;
    let (dst, dst_port) = parse_endpoint(dst).map_err(|error| format!("invalid destination in {text:?}: {error}"))?;
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(format!("invalid packet description {text:?}: the source and destination are of different IP versions"));
    }

    let transport = matches!(protocol, IPPROTO_TCP | IPPROTO_UDP);
    let dst_port = match (transport, dst_port, fragment) {
        (true, Some(port), false) => port,
        (true, None, false) => {
            return Err(format!(
                "missing destination port in {text:?}: write DESTINATION:PORT, or add `fragment` for a fragment after the first"
            ));
        }
        (true, Some(_), true) => {
            return Err(format!("invalid packet description {text:?}: a fragment after the first carries no port"));
        }
        (true, None, true) | (false, None, _) => 0,
        (false, Some(_), _) => {
            return Err(format!("invalid packet description {text:?}: only tcp and udp packets have ports"));
        }
    };
    if syn && (protocol != IPPROTO_TCP || fragment) {
        return Err(format!("invalid packet description {text:?}: `syn` needs a tcp packet that is not a later fragment"));
    }

    let tcp_flags = match (protocol, fragment, syn) {
        (IPPROTO_TCP, false, true) => TCP_FLAG_SYN,
        (IPPROTO_TCP, false, false) => TCP_FLAG_ACK,
        _ => 0,
    };
    let headers_len = {
        let ip = if src.is_ipv4() { IPV4_HEADER_LEN } else { IPV6_HEADER_LEN };
        let transport = match (protocol, fragment) {
            (IPPROTO_TCP, false) => TCP_HEADER_LEN,
            (IPPROTO_UDP, false) => UDP_HEADER_LEN,
            _ => 0,
        };
        (ETHERNET_HEADER_LEN + ip + transport) as u64
    };
    let frame_len = frame_len.unwrap_or(headers_len);
    Ok(PacketFields { src, dst, protocol, dst_port, tcp_flags, frame_len })
}

/// Parses `ADDRESS`, `IPV4:PORT` or `[IPV6]:PORT`.
fn parse_endpoint(text: &str) -> Result<(IpAddr, Option<u16>), String> {
    if let Ok(addr) = text.parse::<IpAddr>() {
        return Ok((addr, None));
    }
    match text.parse::<SocketAddr>() {
        Ok(addr) => Ok((addr.ip(), Some(addr.port()))),
        Err(_) => Err(format!("{text:?} is not an address, ADDRESS:PORT or [IPV6]:PORT")),
    }
}

/// Parses a frame given as hexadecimal digits, which may be split by spaces or colons and
/// start with `0x`.
pub fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits: String = text
        .trim()
        .trim_start_matches("0x")
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ':')
        .collect();
    if !digits.len().is_multiple_of(2) {
        return Err(format!("invalid hex frame: {} digits, expected an even number", digits.len()));
    }
    (0..digits.len())
        .step_by(2)
        .map(|index| {
            u8::from_str_radix(&digits[index..index + 2], 16)
                .map_err(|_| format!("invalid hex frame: {:?} at digit {index} is not a hex byte", &digits[index..index + 2]))
        })
        .collect()
}

/// Reads the fields the program matches on from an Ethernet frame, or returns the reason the
/// program gives a frame it does not parse to the end (`NotIp`, `Malformed`, `VlanTooDeep`,
/// `Ipv6ChainTooLong`).
///
/// Each step mirrors the helper of the same header in `limiter-ebpf/src/parse.rs`, including
/// which bytes must lie inside the frame.
pub fn parse_frame(frame: &[u8]) -> Result<PacketFields, Reason> {
    let mut offset = 0;
    let ether_type = parse_ethernet(frame, &mut offset)?;
    let mut fields = match ether_type {
        ETH_P_IPV4 => parse_ipv4(frame, offset),
        ETH_P_IPV6 => parse_ipv6(frame, offset),
        _ => Err(Reason::NotIp),
    }?;
    fields.frame_len = frame.len() as u64;
    Ok(fields)
}

/// Returns `frame[offset..offset + len]`, or `Malformed` when it does not lie inside the frame.
fn bytes_at(frame: &[u8], offset: usize, len: usize) -> Result<&[u8], Reason> {
    frame.get(offset..offset + len).ok_or(Reason::Malformed)
}

fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn parse_ethernet(frame: &[u8], offset: &mut usize) -> Result<u16, Reason> {
    let ethernet = bytes_at(frame, 0, ETHERNET_HEADER_LEN)?;
    let mut ether_type = be16(ethernet, 12);
    *offset = ETHERNET_HEADER_LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            return Ok(ether_type);
        }
        let tag = bytes_at(frame, *offset, VLAN_TAG_LEN)?;
        ether_type = be16(tag, 2);
        *offset += VLAN_TAG_LEN;
    }
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        return Err(Reason::VlanTooDeep);
    }
    Ok(ether_type)
}

fn parse_ipv4(frame: &[u8], offset: usize) -> Result<PacketFields, Reason> {
    let header = bytes_at(frame, offset, IPV4_HEADER_LEN)?;
    let version_ihl = header[0];
    let total_len = usize::from(be16(header, 2));
    let fragment = be16(header, 6);
    let protocol = header[9];
    let src: [u8; 4] = [header[12], header[13], header[14], header[15]];
    let dst: [u8; 4] = [header[16], header[17], header[18], header[19]];

    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_len < IPV4_HEADER_LEN || total_len < header_len {
        return Err(Reason::Malformed);
    }
    bytes_at(frame, offset, header_len)?;

    let (dst_port, tcp_flags) =
        if fragment & 0x1fff == 0 { parse_transport(frame, offset + header_len, protocol)? } else { (0, 0) };
    Ok(PacketFields { src: IpAddr::from(src), dst: IpAddr::from(dst), protocol, dst_port, tcp_flags, frame_len: 0 })
}

fn parse_ipv6(frame: &[u8], offset: usize) -> Result<PacketFields, Reason> {
    let header = bytes_at(frame, offset, IPV6_HEADER_LEN)?;
    let version = header[0] >> 4;
    let mut next_header = header[6];
    let mut src = [0u8; 16];
    src.copy_from_slice(&header[8..24]);
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&header[24..40]);
    if version != 6 {
        return Err(Reason::Malformed);
    }
    let mut offset = offset + IPV6_HEADER_LEN;
    let mut first_fragment = true;

    for _ in 0..MAX_IPV6_EXTENSION_HEADERS {
        match next_header {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DESTINATION_OPTIONS => {
                let extension = bytes_at(frame, offset, 2)?;
                next_header = extension[0];
                offset += (usize::from(extension[1]) + 1) * 8;
            }
            IPV6_AUTHENTICATION => {
                let extension = bytes_at(frame, offset, 2)?;
                next_header = extension[0];
                offset += (usize::from(extension[1]) + 2) * 4;
            }
            IPV6_FRAGMENT => {
                let fragment = bytes_at(frame, offset, IPV6_FRAGMENT_HEADER_LEN)?;
                next_header = fragment[0];
                first_fragment &= be16(fragment, 2) >> 3 == 0;
                offset += IPV6_FRAGMENT_HEADER_LEN;
            }
            _ => break,
        }
        if offset > frame.len() {
            return Err(Reason::Malformed);
        }
    }

    if matches!(next_header, IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_FRAGMENT | IPV6_AUTHENTICATION | IPV6_DESTINATION_OPTIONS) {
        return Err(Reason::Ipv6ChainTooLong);
    }
    let (dst_port, tcp_flags) = if first_fragment { parse_transport(frame, offset, next_header)? } else { (0, 0) };
    Ok(PacketFields { src: IpAddr::from(src), dst: IpAddr::from(dst), protocol: next_header, dst_port, tcp_flags, frame_len: 0 })
}

/// Returns the destination port and, for TCP, the flags byte of the transport header.
fn parse_transport(frame: &[u8], offset: usize, protocol: u8) -> Result<(u16, u8), Reason> {
    let header_len = match protocol {
        IPPROTO_TCP => TCP_HEADER_LEN,
        IPPROTO_UDP => UDP_HEADER_LEN,
        _ => return Ok((0, 0)),
    };
    let header = bytes_at(frame, offset, header_len)?;
    let tcp_flags = if protocol == IPPROTO_TCP { header[TCP_FLAGS_OFFSET] } else { 0 };
    Ok((be16(header, 2), tcp_flags))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// Builds an Ethernet frame with `vlan_tags` 802.1Q tags around an IP packet.
    fn ethernet(vlan_tags: usize, ether_type: u16, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0u8; 12];
        for _ in 0..vlan_tags {
            frame.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            frame.extend_from_slice(&[0, 1]);
        }
        frame.extend_from_slice(&ether_type.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    fn ipv4_udp(fragment_field: u16, ihl: u8) -> Vec<u8> {
        let header_len = usize::from(ihl) * 4;
        let mut packet = vec![0u8; header_len.max(IPV4_HEADER_LEN)];
        packet[0] = 0x40 | ihl;
        packet[2..4].copy_from_slice(&((header_len + 8) as u16).to_be_bytes());
        packet[6..8].copy_from_slice(&fragment_field.to_be_bytes());
        packet[9] = IPPROTO_UDP;
        packet[12..16].copy_from_slice(&[192, 0, 2, 1]);
        packet[16..20].copy_from_slice(&[198, 51, 100, 7]);
        packet.extend_from_slice(&[0x14, 0xe9, 0, 53, 0, 8, 0, 0]);
        packet
    }

    fn ipv6(next_header: u8, extensions: &[u8], transport: &[u8]) -> Vec<u8> {
        let mut packet = vec![0u8; 40];
        packet[0] = 0x60;
        packet[6] = next_header;
        packet[8..24].copy_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        packet[24..40].copy_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        packet.extend_from_slice(extensions);
        packet.extend_from_slice(transport);
        packet
    }

    #[test]
    fn frame_ipv4_udp_gives_port() {
        let fields = parse_frame(&ethernet(0, ETH_P_IPV4, &ipv4_udp(0, 5))).unwrap();
        assert_eq!(fields.src, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(fields.protocol, IPPROTO_UDP);
        assert_eq!(fields.dst_port, 53);
        assert_eq!(fields.frame_len, 14 + 20 + 8);
        assert_eq!(fields.describe(), "udp 192.0.2.1 -> 198.51.100.7:53 length 42");
    }

    #[test]
    fn frame_ipv4_options_and_vlans() {
        let with_options = parse_frame(&ethernet(2, ETH_P_IPV4, &ipv4_udp(0, 6))).unwrap();
        assert_eq!(with_options.dst_port, 53);
        assert_eq!(parse_frame(&ethernet(3, ETH_P_IPV4, &ipv4_udp(0, 5))), Err(Reason::VlanTooDeep));
        assert_eq!(parse_frame(&ethernet(0, ETH_P_IPV4, &ipv4_udp(0, 4))), Err(Reason::Malformed));
        assert_eq!(parse_frame(&ethernet(0, 0x0806, &[0; 28])), Err(Reason::NotIp));
        assert_eq!(parse_frame(&[0u8; 10]), Err(Reason::Malformed));
    }

    #[test]
    fn frame_later_fragment_has_no_port() {
        let fields = parse_frame(&ethernet(0, ETH_P_IPV4, &ipv4_udp(100, 5))).unwrap();
        assert_eq!(fields.dst_port, 0);
    }

    #[test]
    fn frame_cut_transport_header_is_malformed() {
        let mut frame = ethernet(0, ETH_P_IPV4, &ipv4_udp(0, 5));
        frame.truncate(frame.len() - 5);
        assert_eq!(parse_frame(&frame), Err(Reason::Malformed));
    }

    #[test]
    fn frame_ipv6_extension_chain() {
        let tcp = [0u8, 80, 1, 187, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, TCP_FLAG_SYN, 0, 0, 0, 0, 0, 0];
        // Hop-by-hop (8 bytes) then a first fragment, then TCP to port 443.
        let mut extensions = vec![IPV6_FRAGMENT, 0, 0, 0, 0, 0, 0, 0];
        extensions.extend_from_slice(&[IPPROTO_TCP, 0, 0, 0, 0, 0, 0, 1]);
        let fields = parse_frame(&ethernet(0, ETH_P_IPV6, &ipv6(IPV6_HOP_BY_HOP, &extensions, &tcp))).unwrap();
        assert_eq!((fields.protocol, fields.dst_port), (IPPROTO_TCP, 443));
        assert!(fields.is_syn());

        let chain: Vec<u8> = (0..7).flat_map(|_| [IPV6_DESTINATION_OPTIONS, 0, 0, 0, 0, 0, 0, 0]).collect();
        let too_long = ethernet(0, ETH_P_IPV6, &ipv6(IPV6_DESTINATION_OPTIONS, &chain, &tcp));
        assert_eq!(parse_frame(&too_long), Err(Reason::Ipv6ChainTooLong));
    }

    #[test]
    fn description_forms() {
        let udp = parse_description("udp 192.0.2.1:5353 -> 198.51.100.7:53").unwrap();
        assert_eq!((udp.protocol, udp.dst_port, udp.family()), (IPPROTO_UDP, 53, FAMILY_IPV4));
        let tcp = parse_description("tcp [2001:db8::1]:40000 -> [2001:db8::2]:443").unwrap();
        assert_eq!((tcp.protocol, tcp.dst_port, tcp.family()), (IPPROTO_TCP, 443, FAMILY_IPV6));
        let icmp = parse_description("icmp 192.0.2.1 -> 198.51.100.7").unwrap();
        assert_eq!((icmp.protocol, icmp.dst_port), (IPPROTO_ICMP, 0));
        let gre = parse_description("47 192.0.2.1 -> 198.51.100.7").unwrap();
        assert_eq!(gre.protocol, 47);
        let fragment = parse_description("udp 192.0.2.1 -> 198.51.100.7 fragment").unwrap();
        assert_eq!((fragment.dst_port, fragment.frame_len), (0, 34));
        let syn = parse_description("tcp 192.0.2.1 -> 198.51.100.7:443 syn length 74").unwrap();
        assert!(syn.is_syn());
        assert_eq!(syn.frame_len, 74);
        assert!(!tcp.is_syn(), "a tcp segment without `syn` carries ACK");
        assert_eq!(parse_description(&udp.describe()).unwrap(), udp);
    }

    #[test]
    fn description_errors_name_the_problem() {
        let cases = [
            ("udp 192.0.2.1 -> 198.51.100.7", "missing destination port"),
            ("icmp 192.0.2.1 -> 198.51.100.7:53", "only tcp and udp packets have ports"),
            ("sctp 192.0.2.1 -> 198.51.100.7", "invalid protocol \"sctp\""),
            ("udp 192.0.2.1 -> [2001:db8::2]:53", "different IP versions"),
            ("udp 192.0.2.1 198.51.100.7:53", "expected PROTOCOL SOURCE -> DESTINATION"),
            ("udp 192.0.2.300 -> 198.51.100.7:53", "invalid source"),
            ("udp 192.0.2.1 -> 198.51.100.7:53 syn", "`syn` needs a tcp packet"),
            ("udp 192.0.2.1 -> 198.51.100.7:53 length", "missing value after `length`"),
            ("udp 192.0.2.1 -> 198.51.100.7:53 length 0", "invalid frame length \"0\""),
            ("udp 192.0.2.1 -> 198.51.100.7:53 loud", "invalid word \"loud\""),
        ];
        for (text, expected) in cases {
            let error = parse_description(text).unwrap_err();
            assert!(error.contains(expected), "{text:?}: expected {expected:?} in {error:?}");
        }
    }

    #[test]
    fn hex_accepts_separators() {
        assert_eq!(parse_hex("0x00 11:22\nff").unwrap(), vec![0x00, 0x11, 0x22, 0xff]);
        assert!(parse_hex("abc").unwrap_err().contains("even number"));
        assert!(parse_hex("zz").unwrap_err().contains("not a hex byte"));
    }
}
