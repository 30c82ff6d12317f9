//! Rules as operators write them, validated into the `Rule` entries the XDP program reads.

use std::{fmt, str::FromStr, time::Duration};

use limiter_common::{
    IPPROTO_TCP, IPPROTO_UDP, MAX_WINDOW_NS, MIN_WINDOW_NS, Rule, RuleMatch, STORE_DOWN_CLOSED, STORE_DOWN_LOCAL,
    STORE_DOWN_OPEN, UNIT_BYTES, UNIT_PACKETS,
};
use serde::{Deserialize, Serialize};

/// A rule that failed validation. Each message names the bad value and what is accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("invalid protocol {0:?}: expected any, tcp, udp or an IP protocol number 1-255")]
    Protocol(String),
    #[error("invalid rate 0: a rate must be at least 1 packet per window")]
    ZeroRate,
    #[error("invalid window {0:?}: expected a length between 10ms and 1h, such as 500ms, 1s or 1m")]
    Window(String),
    #[error("invalid IPv4 prefix length {0}: expected 0-32")]
    Ipv4Prefix(u8),
    #[error("invalid IPv6 prefix length {0}: expected 0-128")]
    Ipv6Prefix(u8),
    #[error("invalid port {0} for protocol any: a port needs --proto tcp or --proto udp")]
    PortWithoutProtocol(u16),
    #[error("invalid rate {0:?}: expected packets per window, such as 100 or 100/s, or with --bytes, bytes such as 1M/s or 500KB")]
    Rate(String),
    #[error("invalid rule: --syn selects TCP connection requests and needs --proto tcp, not {0}")]
    SynWithoutTcp(Protocol),
    #[error("invalid byte rate {0}: a byte limit below {MIN_BYTES_PER_WINDOW} bytes per window would drop every full-size Ethernet frame")]
    ByteRateTooLow(u64),
    #[error("invalid inner tier /{inner_v4} /{inner_v6}: its prefixes must be at least the rule's (/{outer_v4} /{outer_v6}) and longer in one family")]
    InnerTierPrefix { inner_v4: u8, inner_v6: u8, outer_v4: u8, outer_v6: u8 },
}

/// Smallest byte limit per window: one full-size Ethernet frame (1500-byte MTU plus the
/// 14-byte header), since a frame is admitted only if all its bytes fit.
pub const MIN_BYTES_PER_WINDOW: u64 = 1514;

/// Transport protocol a rule selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(try_from = "String", into = "String")]
pub enum Protocol {
    #[default]
    Any,
    Tcp,
    Udp,
    Other(u8),
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Any => 0,
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
            Protocol::Other(number) => number,
        }
    }

    pub fn from_number(number: u8) -> Self {
        match number {
            0 => Protocol::Any,
            IPPROTO_TCP => Protocol::Tcp,
            IPPROTO_UDP => Protocol::Udp,
            other => Protocol::Other(other),
        }
    }

    fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp)
    }
}

impl FromStr for Protocol {
    type Err = RuleError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "any" => Ok(Protocol::Any),
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            other => match other.parse::<u8>() {
                Ok(number) if number != 0 => Ok(Protocol::from_number(number)),
                _ => Err(RuleError::Protocol(text.to_owned())),
            },
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Any => f.write_str("any"),
            Protocol::Tcp => f.write_str("tcp"),
            Protocol::Udp => f.write_str("udp"),
            Protocol::Other(number) => write!(f, "{number}"),
        }
    }
}

impl TryFrom<String> for Protocol {
    type Error = RuleError;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<Protocol> for String {
    fn from(protocol: Protocol) -> Self {
        protocol.to_string()
    }
}

/// Parses a window length such as `500ms`, `1s`, `2m` or `1h`.
pub fn parse_window(text: &str) -> Result<Duration, RuleError> {
    let invalid = || RuleError::Window(text.to_owned());
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let window = match unit {
        "ms" => Duration::from_millis(number),
        "s" | "" => Duration::from_secs(number),
        "m" => Duration::from_secs(number.checked_mul(60).ok_or_else(invalid)?),
        "h" => Duration::from_secs(number.checked_mul(3600).ok_or_else(invalid)?),
        _ => return Err(invalid()),
    };
    let nanos = u64::try_from(window.as_nanos()).map_err(|_| invalid())?;
    if !(MIN_WINDOW_NS..=MAX_WINDOW_NS).contains(&nanos) {
        return Err(invalid());
    }
    Ok(window)
}

/// Formats a window length the way `parse_window` reads it.
pub fn format_window(window: Duration) -> String {
    let millis = window.as_millis();
    if millis % 3_600_000 == 0 {
        format!("{}h", millis / 3_600_000)
    } else if millis % 60_000 == 0 {
        format!("{}m", millis / 60_000)
    } else if millis % 1000 == 0 {
        format!("{}s", millis / 1000)
    } else {
        format!("{millis}ms")
    }
}

/// A rate as the operator typed it: packets per window, or packets per second (`100/s`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rate {
    PerWindow(u64),
    PerSecond(u64),
}

impl Rate {
    /// Returns packets per window for a window of `window_ms`. A per-second rate is
    /// multiplied by the window length, and must come out as a whole number of packets.
    pub fn per_window(self, window_ms: u64) -> Result<u64, RuleError> {
        match self {
            Rate::PerWindow(count) => Ok(count),
            Rate::PerSecond(per_second) => {
                let scaled = u128::from(per_second) * u128::from(window_ms);
                if scaled % 1000 != 0 || scaled == 0 {
                    return Err(RuleError::Rate(format!(
                        "{per_second}/s over a {window_ms}ms window is not a whole number of packets; give packets per window instead"
                    )));
                }
                u64::try_from(scaled / 1000).map_err(|_| RuleError::Rate(format!("{per_second}/s")))
            }
        }
    }
}

/// Parses a rate: `100` per window, or `100/s` per second. The number may carry a decimal
/// multiplier (`k`, `M`, `G`) or a binary one (`Ki`, `Mi`, `Gi`), and a trailing `B` for
/// bytes, as in `1MB/s`. `rate_in_bytes` returns whether the `B` is there.
pub fn parse_rate(text: &str) -> Result<Rate, RuleError> {
    let invalid = || RuleError::Rate(text.to_owned());
    let (number, per_second) = match text.strip_suffix("/s") {
        Some(number) => (number, true),
        None => (text, false),
    };
    let number = number.trim();
    let number = number.strip_suffix('B').unwrap_or(number);
    let split = number.find(|c: char| !c.is_ascii_digit()).unwrap_or(number.len());
    let (digits, multiplier) = number.split_at(split);
    let multiplier: u64 = match multiplier {
        "" => 1,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return Err(invalid()),
    };
    let count = digits.parse::<u64>().map_err(|_| invalid())?.checked_mul(multiplier).ok_or_else(invalid)?;
    match count {
        0 => Err(RuleError::ZeroRate),
        count if per_second => Ok(Rate::PerSecond(count)),
        count => Ok(Rate::PerWindow(count)),
    }
}

/// Returns true when a rate as `parse_rate` reads it ends in `B`, so it is in bytes.
pub fn rate_in_bytes(text: &str) -> bool {
    text.strip_suffix("/s").unwrap_or(text).trim().ends_with('B')
}

/// Unit of a rule's rate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateUnit {
    #[default]
    Packets,
    /// Frame bytes, Ethernet header included.
    Bytes,
}

impl fmt::Display for RateUnit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RateUnit::Packets => "packets",
            RateUnit::Bytes => "bytes",
        })
    }
}

/// Inner keys of a tiered rule: each source is also masked to these longer prefixes, and a
/// packet passes only when both its key and its inner key are within their limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InnerTier {
    /// Limit of each inner key per window, fleet-wide, in the rule's unit.
    pub rate: u64,
    pub ipv4_prefix_len: u8,
    pub ipv6_prefix_len: u8,
}

/// Policy for a rule's keys while the fleet's counts are out of reach (Redis down, or the
/// agent gone) and their grants have expired.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreDownPolicy {
    /// Enforce the limit divided by the number of gateways last seen, on each gateway alone.
    #[default]
    Local,
    /// Pass everything, counted as passed_store_down.
    Open,
    /// Drop everything, counted as dropped_store_down.
    Closed,
}

impl StoreDownPolicy {
    fn to_map_value(self) -> u8 {
        match self {
            StoreDownPolicy::Local => STORE_DOWN_LOCAL,
            StoreDownPolicy::Open => STORE_DOWN_OPEN,
            StoreDownPolicy::Closed => STORE_DOWN_CLOSED,
        }
    }

    fn from_map_value(value: u8) -> Self {
        match value {
            STORE_DOWN_OPEN => StoreDownPolicy::Open,
            STORE_DOWN_CLOSED => StoreDownPolicy::Closed,
            _ => StoreDownPolicy::Local,
        }
    }
}

impl fmt::Display for StoreDownPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StoreDownPolicy::Local => "local",
            StoreDownPolicy::Open => "open",
            StoreDownPolicy::Closed => "closed",
        })
    }
}

/// A rule as the operator states it; the agent assigns its id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSpec {
    pub protocol: Protocol,
    /// Destination port, or `None` for any port.
    pub port: Option<u16>,
    /// Packets each key may pass per window, fleet-wide.
    pub rate: u64,
    pub window_ms: u64,
    pub ipv4_prefix_len: u8,
    pub ipv6_prefix_len: u8,
    /// Limit each destination port of a source separately.
    pub per_port: bool,
    #[serde(default)]
    pub store_down: StoreDownPolicy,
    /// Unit of `rate`: packets, or frame bytes.
    #[serde(default)]
    pub unit: RateUnit,
    /// Select only TCP connection requests: SYN set, ACK clear. Needs protocol `tcp`.
    #[serde(default)]
    pub tcp_syn: bool,
    /// Inner keys with longer prefixes and their own limit, checked along with each key.
    #[serde(default)]
    pub inner_tier: Option<InnerTier>,
    /// Count what the rule would drop, per key and as `passed_shadow`, but drop nothing.
    #[serde(default)]
    pub shadow: bool,
}

impl RuleSpec {
    /// Checks every field, returning the first that is out of range.
    pub fn validate(&self) -> Result<(), RuleError> {
        let Self {
            protocol,
            port,
            rate,
            window_ms,
            ipv4_prefix_len,
            ipv6_prefix_len,
            per_port: _,
            store_down: _,
            unit,
            tcp_syn,
            inner_tier,
            shadow: _,
        } = self;
        let inner_rate = inner_tier.map(|tier| tier.rate);
        for rate in std::iter::once(*rate).chain(inner_rate) {
            if rate == 0 {
                return Err(RuleError::ZeroRate);
            }
            if *unit == RateUnit::Bytes && rate < MIN_BYTES_PER_WINDOW {
                return Err(RuleError::ByteRateTooLow(rate));
            }
        }
        if *tcp_syn && *protocol != Protocol::Tcp {
            return Err(RuleError::SynWithoutTcp(*protocol));
        }
        let window_ns = window_ms.saturating_mul(1_000_000);
        if !(MIN_WINDOW_NS..=MAX_WINDOW_NS).contains(&window_ns) {
            return Err(RuleError::Window(format!("{window_ms}ms")));
        }
        if *ipv4_prefix_len > 32 {
            return Err(RuleError::Ipv4Prefix(*ipv4_prefix_len));
        }
        if *ipv6_prefix_len > 128 {
            return Err(RuleError::Ipv6Prefix(*ipv6_prefix_len));
        }
        if let Some(port) = port
            && (!protocol.has_ports() || *port == 0)
        {
            return Err(RuleError::PortWithoutProtocol(*port));
        }
        if let Some(tier) = inner_tier {
            let inside = tier.ipv4_prefix_len <= 32
                && tier.ipv6_prefix_len <= 128
                && tier.ipv4_prefix_len >= *ipv4_prefix_len
                && tier.ipv6_prefix_len >= *ipv6_prefix_len;
            let longer = tier.ipv4_prefix_len > *ipv4_prefix_len || tier.ipv6_prefix_len > *ipv6_prefix_len;
            if !inside || !longer {
                return Err(RuleError::InnerTierPrefix {
                    inner_v4: tier.ipv4_prefix_len,
                    inner_v6: tier.ipv6_prefix_len,
                    outer_v4: *ipv4_prefix_len,
                    outer_v6: *ipv6_prefix_len,
                });
            }
        }
        Ok(())
    }

    pub fn rule_match(&self) -> RuleMatch {
        if self.tcp_syn {
            return RuleMatch::tcp_syn(self.port.unwrap_or(0));
        }
        RuleMatch::new(self.protocol.number(), self.port.unwrap_or(0))
    }

    /// Builds the map entry, with the fallback and new-key limits for `gateways` gateways
    /// and, with an agent, its sync interval.
    pub fn to_rule(&self, id: u32, gateways: u64, sync_interval: Option<std::time::Duration>) -> Rule {
        let window_ns = self.window_ms.saturating_mul(1_000_000);
        // Both tiers derive their fallback and new-key limits from their own rate alike.
        let local_limits = |rate: u64| {
            let fallback = fallback_limit(rate, gateways);
            let new_key = match sync_interval {
                Some(interval) => new_key_limit(rate, window_ns, interval, gateways).min(fallback),
                None => fallback,
            };
            (fallback, new_key)
        };
        let (fallback, new_key) = local_limits(self.rate);
        let mut rule = Rule {
            id,
            ipv4_prefix_len: self.ipv4_prefix_len,
            ipv6_prefix_len: self.ipv6_prefix_len,
            key_by_dst_port: u8::from(self.per_port),
            store_down_policy: self.store_down.to_map_value(),
            limit: self.rate,
            fallback_limit: fallback,
            new_key_limit: new_key,
            window_ns,
            unit: match self.unit {
                RateUnit::Packets => UNIT_PACKETS,
                RateUnit::Bytes => UNIT_BYTES,
            },
            shadow: u8::from(self.shadow),
            ..Rule::default()
        };
        if let Some(tier) = self.inner_tier {
            let (inner_fallback, inner_new_key) = local_limits(tier.rate);
            rule.inner_tier = 1;
            rule.inner_ipv4_prefix_len = tier.ipv4_prefix_len;
            rule.inner_ipv6_prefix_len = tier.ipv6_prefix_len;
            rule.inner_limit = tier.rate;
            rule.inner_fallback_limit = inner_fallback;
            rule.inner_new_key_limit = inner_new_key;
        }
        rule
    }

    /// Rebuilds the spec from a map entry, for rules the agent finds pinned at start.
    pub fn from_rule(rule_match: &RuleMatch, rule: &Rule) -> Self {
        Self {
            protocol: Protocol::from_number(rule_match.protocol),
            port: (rule_match.dst_port != 0).then_some(rule_match.dst_port),
            rate: rule.limit,
            window_ms: rule.window_ns / 1_000_000,
            ipv4_prefix_len: rule.ipv4_prefix_len,
            ipv6_prefix_len: rule.ipv6_prefix_len,
            per_port: rule.key_by_dst_port != 0,
            store_down: StoreDownPolicy::from_map_value(rule.store_down_policy),
            unit: if rule.unit == UNIT_BYTES { RateUnit::Bytes } else { RateUnit::Packets },
            tcp_syn: rule_match.tcp_syn != 0,
            inner_tier: (rule.inner_tier != 0).then_some(InnerTier {
                rate: rule.inner_limit,
                ipv4_prefix_len: rule.inner_ipv4_prefix_len,
                ipv6_prefix_len: rule.inner_ipv6_prefix_len,
            }),
            shadow: rule.shadow != 0,
        }
    }

    /// Describes the traffic the rule selects, such as `udp port 53`, `tcp syn` or `any`.
    pub fn describe_match(&self) -> String {
        let protocol = if self.tcp_syn { format!("{} syn", self.protocol) } else { self.protocol.to_string() };
        match self.port {
            Some(port) => format!("{protocol} port {port}"),
            None => protocol,
        }
    }
}

/// Returns the limit each of `gateways` gateways enforces on its own while it has no grant.
///
/// Rounded up, so a small limit never becomes 0; the fleet may then pass up to
/// `gateways - 1` packets more than the limit per window while the store is unreachable.
pub fn fallback_limit(limit: u64, gateways: u64) -> u64 {
    limit.div_ceil(gateways.max(1))
}

/// Maximum the fleet may be granted for one key in one tick, as a multiple (numerator,
/// denominator) of one tick's worth at the steady rate. Twice the rate lets demand that moves
/// or recovers from a dip catch up within a few ticks. A new key then fills its first window
/// over half of it instead of at once. At 3/2 a pair of gateways each under the
/// limit lost 2-3% in tests, because every tick's budget was spent to the cap.
pub const PACE: (u64, u64) = (2, 1);

/// Returns the most packets the fleet may be granted for one key in one sync interval:
/// [`PACE`] times one interval's worth of the limit, rounded up, at least 1.
pub fn pace_cap(limit: u64, window_ns: u64, interval: std::time::Duration) -> u64 {
    let interval_ns = interval.as_nanos().min(u128::from(u64::MAX)) as u64;
    let cap = u128::from(limit) * u128::from(interval_ns) * u128::from(PACE.0);
    let cap = cap.div_ceil(u128::from(window_ns.max(1)) * u128::from(PACE.1));
    u64::try_from(cap).unwrap_or(u64::MAX).clamp(1, limit.max(1))
}

/// Returns the estimated most packets per window that `gateways` gateways syncing every
/// `interval` can pass over `limit`, once a key is past its first window.
///
/// Each tick the fleet grants at most the pace cap. A gateway counts the others' grants as
/// leases assumed spent evenly over their tick. So what another gateway already spent but
/// has not reported yet is counted short by up to its whole grant, until its next report
/// corrects the estimate. Over a tick, that is at most the others' part of the pace cap. A
/// single gateway has no one else to miss, and so no over-admission.
pub fn max_over_admission(limit: u64, window_ns: u64, interval: Option<std::time::Duration>, gateways: u64) -> u64 {
    let Some(interval) = interval else { return 0 };
    let gateways = gateways.max(1);
    let cap = u128::from(pace_cap(limit, window_ns, interval));
    (cap * u128::from(gateways - 1)).div_ceil(u128::from(gateways)) as u64
}

/// Returns the limit a key never granted yet has on each CPU of one of `gateways` gateways:
/// its part of the pace cap, rounded up, at least 1.
pub fn new_key_limit(limit: u64, window_ns: u64, interval: std::time::Duration, gateways: u64) -> u64 {
    pace_cap(limit, window_ns, interval).div_ceil(gateways.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RuleSpec {
        RuleSpec {
            protocol: Protocol::Udp,
            port: Some(53),
            rate: 100,
            window_ms: 1000,
            ipv4_prefix_len: 32,
            ipv6_prefix_len: 128,
            per_port: false,
            store_down: StoreDownPolicy::Local,
            unit: RateUnit::Packets,
            tcp_syn: false,
            inner_tier: None,
            shadow: false,
        }
    }

    #[test]
    fn window_parses_units() {
        assert_eq!(parse_window("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_window("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_window("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_window("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_window("1h"), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn window_rejects_out_of_range() {
        for text in ["0s", "5ms", "2h", "", "1x", "-1s", "99999999999999999999h"] {
            assert_eq!(parse_window(text), Err(RuleError::Window(text.to_owned())), "{text}");
        }
    }

    #[test]
    fn window_format_round_trips() {
        for text in ["500ms", "1s", "90s", "1m", "1h", "1500ms"] {
            assert_eq!(format_window(parse_window(text).unwrap()), text);
        }
    }

    #[test]
    fn rate_per_second_scales_with_window() {
        assert_eq!(Rate::PerSecond(100).per_window(1000), Ok(100));
        assert_eq!(Rate::PerSecond(100).per_window(10_000), Ok(1000));
        assert_eq!(Rate::PerSecond(100).per_window(500), Ok(50));
        assert!(Rate::PerSecond(3).per_window(100).is_err(), "0.3 packets per window");
        assert_eq!(Rate::PerWindow(7).per_window(10_000), Ok(7));
    }

    #[test]
    fn rate_parses_and_rejects() {
        assert_eq!(parse_rate("100"), Ok(Rate::PerWindow(100)));
        assert_eq!(parse_rate("100/s"), Ok(Rate::PerSecond(100)));
        assert_eq!(parse_rate("0"), Err(RuleError::ZeroRate));
        assert_eq!(parse_rate("ten"), Err(RuleError::Rate("ten".into())));
        assert_eq!(parse_rate("-5"), Err(RuleError::Rate("-5".into())));
    }

    #[test]
    fn protocol_parses_names_and_numbers() {
        assert_eq!("UDP".parse(), Ok(Protocol::Udp));
        assert_eq!("tcp".parse(), Ok(Protocol::Tcp));
        assert_eq!("any".parse(), Ok(Protocol::Any));
        assert_eq!("132".parse(), Ok(Protocol::Other(132)));
        assert_eq!("6".parse(), Ok(Protocol::Tcp));
        assert_eq!("0".parse::<Protocol>(), Err(RuleError::Protocol("0".into())));
        assert_eq!("256".parse::<Protocol>(), Err(RuleError::Protocol("256".into())));
        assert_eq!("icmp".parse::<Protocol>(), Err(RuleError::Protocol("icmp".into())));
    }

    #[test]
    fn validate_rejects_each_bad_field() {
        assert_eq!(spec().validate(), Ok(()));
        assert_eq!(RuleSpec { rate: 0, ..spec() }.validate(), Err(RuleError::ZeroRate));
        assert_eq!(
            RuleSpec { window_ms: 0, ..spec() }.validate(),
            Err(RuleError::Window("0ms".into()))
        );
        assert_eq!(
            RuleSpec { ipv4_prefix_len: 33, ..spec() }.validate(),
            Err(RuleError::Ipv4Prefix(33))
        );
        assert_eq!(
            RuleSpec { ipv6_prefix_len: 129, ..spec() }.validate(),
            Err(RuleError::Ipv6Prefix(129))
        );
        assert_eq!(
            RuleSpec { protocol: Protocol::Any, ..spec() }.validate(),
            Err(RuleError::PortWithoutProtocol(53))
        );
        assert_eq!(RuleSpec { port: Some(0), ..spec() }.validate(), Err(RuleError::PortWithoutProtocol(0)));
    }

    #[test]
    fn rule_round_trips_through_map_entry() {
        let spec = RuleSpec { per_port: true, ipv4_prefix_len: 24, store_down: StoreDownPolicy::Closed, ..spec() };
        let rule = spec.to_rule(7, 3, Some(std::time::Duration::from_millis(100)));
        assert_eq!(rule.id, 7);
        assert_eq!(rule.limit, 100);
        assert_eq!(rule.fallback_limit, 34);
        // Two 100 ms ticks of 100/s is 20, a third of it per gateway, rounded up.
        assert_eq!(rule.new_key_limit, 7);
        assert_eq!(rule.window_ns, 1_000_000_000);
        assert_eq!(rule.key_by_dst_port, 1);
        assert_eq!(RuleSpec::from_rule(&spec.rule_match(), &rule), spec);
    }

    #[test]
    fn pace_cap_is_two_ticks_of_limit() {
        let second = 1_000_000_000;
        let tick = std::time::Duration::from_millis(100);
        assert_eq!(pace_cap(1000, second, tick), 200);
        assert_eq!(pace_cap(100, second, tick), 20);
        assert_eq!(pace_cap(1, second, tick), 1);
        assert_eq!(pace_cap(100, second, std::time::Duration::from_secs(5)), 100);
        // (2^64 - 1) / 5 is exact, so rounding up adds nothing.
        assert_eq!(pace_cap(u64::MAX, second, tick), u64::MAX / 5);
    }

    #[test]
    fn max_over_admission_grows_with_gateways() {
        let second = 1_000_000_000;
        let tick = Some(std::time::Duration::from_millis(100));
        assert_eq!(max_over_admission(1000, second, tick, 1), 0);
        assert_eq!(max_over_admission(1000, second, tick, 2), 100);
        assert_eq!(max_over_admission(1000, second, tick, 3), 134);
        assert_eq!(max_over_admission(1000, second, None, 3), 0);
    }

    #[test]
    fn rate_parses_multipliers_and_bytes() {
        assert_eq!(parse_rate("1MB/s"), Ok(Rate::PerSecond(1_000_000)));
        assert_eq!(parse_rate("500KB"), Ok(Rate::PerWindow(500_000)));
        assert_eq!(parse_rate("2k/s"), Ok(Rate::PerSecond(2_000)));
        assert_eq!(parse_rate("1MiB/s"), Ok(Rate::PerSecond(1 << 20)));
        assert_eq!(parse_rate("3G"), Ok(Rate::PerWindow(3_000_000_000)));
        assert_eq!(parse_rate("0MB"), Err(RuleError::ZeroRate));
        assert_eq!(parse_rate("1TB"), Err(RuleError::Rate("1TB".into())));
        assert_eq!(parse_rate("MB"), Err(RuleError::Rate("MB".into())));
        assert_eq!(parse_rate("99999999999G"), Err(RuleError::Rate("99999999999G".into())));
        assert!(rate_in_bytes("1MB/s"));
        assert!(rate_in_bytes("1500B"));
        assert!(!rate_in_bytes("1M/s"));
    }

    #[test]
    fn validate_rejects_bad_kinds() {
        let tcp = RuleSpec { protocol: Protocol::Tcp, port: None, ..spec() };
        assert_eq!(RuleSpec { tcp_syn: true, ..tcp.clone() }.validate(), Ok(()));
        assert_eq!(
            RuleSpec { tcp_syn: true, ..spec() }.validate(),
            Err(RuleError::SynWithoutTcp(Protocol::Udp))
        );
        assert_eq!(
            RuleSpec { unit: RateUnit::Bytes, rate: 1000, ..spec() }.validate(),
            Err(RuleError::ByteRateTooLow(1000))
        );
        assert_eq!(RuleSpec { unit: RateUnit::Bytes, rate: 1514, ..spec() }.validate(), Ok(()));

        let outer = RuleSpec { ipv4_prefix_len: 24, ipv6_prefix_len: 64, ..spec() };
        let tier = |rate, ipv4_prefix_len, ipv6_prefix_len| Some(InnerTier { rate, ipv4_prefix_len, ipv6_prefix_len });
        assert_eq!(RuleSpec { inner_tier: tier(60, 32, 128), ..outer.clone() }.validate(), Ok(()));
        assert_eq!(RuleSpec { inner_tier: tier(60, 24, 128), ..outer.clone() }.validate(), Ok(()));
        assert_eq!(RuleSpec { inner_tier: tier(0, 32, 128), ..outer.clone() }.validate(), Err(RuleError::ZeroRate));
        let not_inside = RuleError::InnerTierPrefix { inner_v4: 16, inner_v6: 128, outer_v4: 24, outer_v6: 64 };
        assert_eq!(RuleSpec { inner_tier: tier(60, 16, 128), ..outer.clone() }.validate(), Err(not_inside));
        let not_longer = RuleError::InnerTierPrefix { inner_v4: 24, inner_v6: 64, outer_v4: 24, outer_v6: 64 };
        assert_eq!(RuleSpec { inner_tier: tier(60, 24, 64), ..outer.clone() }.validate(), Err(not_longer));
        let too_long = RuleError::InnerTierPrefix { inner_v4: 33, inner_v6: 128, outer_v4: 24, outer_v6: 64 };
        assert_eq!(RuleSpec { inner_tier: tier(60, 33, 128), ..outer }.validate(), Err(too_long));
    }

    #[test]
    fn new_kinds_round_trip_through_map_entry() {
        let spec = RuleSpec {
            protocol: Protocol::Tcp,
            port: Some(22),
            rate: 1_000_000,
            ipv4_prefix_len: 24,
            ipv6_prefix_len: 64,
            unit: RateUnit::Bytes,
            tcp_syn: true,
            inner_tier: Some(InnerTier { rate: 200_000, ipv4_prefix_len: 32, ipv6_prefix_len: 128 }),
            shadow: true,
            ..spec()
        };
        assert_eq!(spec.validate(), Ok(()));
        assert_eq!(spec.rule_match(), RuleMatch::tcp_syn(22));
        assert_eq!(spec.describe_match(), "tcp syn port 22");

        let rule = spec.to_rule(5, 2, Some(Duration::from_millis(100)));
        assert_eq!((rule.unit, rule.shadow, rule.inner_tier), (UNIT_BYTES, 1, 1));
        assert_eq!((rule.limit, rule.fallback_limit, rule.new_key_limit), (1_000_000, 500_000, 100_000));
        // Two 100 ms ticks of 200,000 per second is 40,000, half of it per gateway.
        assert_eq!((rule.inner_limit, rule.inner_fallback_limit, rule.inner_new_key_limit), (200_000, 100_000, 20_000));
        assert_eq!(RuleSpec::from_rule(&spec.rule_match(), &rule), spec);
    }

    #[test]
    fn spec_without_new_fields_still_parses() {
        let json = r#"{"protocol":"udp","port":53,"rate":100,"window_ms":1000,"ipv4_prefix_len":32,
            "ipv6_prefix_len":128,"per_port":false}"#;
        let parsed: RuleSpec = serde_json::from_str(json).expect("a spec written before rule kinds existed");
        assert_eq!(parsed, spec());
    }

    #[test]
    fn fallback_limit_rounds_up() {
        assert_eq!(fallback_limit(100, 0), 100);
        assert_eq!(fallback_limit(100, 1), 100);
        assert_eq!(fallback_limit(100, 3), 34);
        assert_eq!(fallback_limit(1, 5), 1);
    }
}
