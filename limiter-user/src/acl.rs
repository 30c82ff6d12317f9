//! Allow and deny lists of source CIDRs, in the `ACL_V4` and `ACL_V6` tries that the XDP
//! program checks before any rule. The longest listed prefix that contains a source decides,
//! so `deny 10.0.0.0/8` with `allow 10.1.2.0/24` drops 10/8 except 10.1.2/24.
//!
//! The pinned tries are the lists' only copy: the agent keeps no state about them, so
//! `limiter allow` and `limiter deny` write the maps directly, with or without an agent.
//! Writers hold [`lock_writers`] so that the `ACL_INDEX` flags stay right when two run at once.

use std::{fmt, fs, net::IpAddr, str::FromStr};

use anyhow::{Context as _, bail};
use aya::maps::lpm_trie::Key;
use ipnet::IpNet;
use limiter_common::{ACL_ALLOW, ACL_DENY, AclIndex, MAX_ACL_ENTRIES};
use serde::{Deserialize, Serialize};

use crate::datapath::{Maps, pin_dir};

/// List of a CIDR: allowlist or denylist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AclList {
    /// Passed before any rule, counted as `passed_allowlist`.
    Allow,
    /// Dropped before any rule, counted as `dropped_denylist`.
    Deny,
}

impl AclList {
    fn map_value(self) -> u32 {
        match self {
            AclList::Allow => ACL_ALLOW,
            AclList::Deny => ACL_DENY,
        }
    }

    fn from_map_value(value: u32) -> Option<Self> {
        match value {
            ACL_ALLOW => Some(AclList::Allow),
            ACL_DENY => Some(AclList::Deny),
            _ => None,
        }
    }

    /// Returns the subcommand that edits this list, for messages.
    fn command(self) -> &'static str {
        match self {
            AclList::Allow => "allow",
            AclList::Deny => "deny",
        }
    }
}

impl fmt::Display for AclList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AclList::Allow => "allowlist",
            AclList::Deny => "denylist",
        })
    }
}

/// One listed CIDR, as `allow list` and `deny list` print it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclEntry {
    pub cidr: IpNet,
    pub list: AclList,
}

/// Parses `10.0.0.0/8`, `2001:db8::/32`, or a single address, which stands for its /32 or
/// /128. Rejects a CIDR with bits set after its prefix, which usually is a typo.
pub fn parse_cidr(text: &str) -> anyhow::Result<IpNet> {
    let text = text.trim();
    let cidr = match IpNet::from_str(text) {
        Ok(cidr) => cidr,
        Err(_) => match IpAddr::from_str(text) {
            Ok(addr) => IpNet::from(addr),
            Err(_) => bail!("invalid CIDR {text:?}: expected an address with a prefix length, such as 192.0.2.0/24 or 2001:db8::/32"),
        },
    };
    if cidr.trunc() != cidr {
        bail!("invalid CIDR {text}: it has bits set after the /{} prefix; did you mean {}?", cidr.prefix_len(), cidr.trunc());
    }
    Ok(cidr)
}

/// An exclusive flock(2) on the pin folder of an interface, held until dropped.
pub struct WriterLock {
    _folder: fs::File,
}

/// Waits for other `allow` and `deny` writers on `iface` to finish, and returns the lock.
/// The lock is on the folder of pins, so no lock file is left behind.
pub fn lock_writers(iface: &str) -> anyhow::Result<WriterLock> {
    let dir = pin_dir(iface);
    let folder = fs::File::open(&dir).with_context(|| format!("failed to open {}: run the command as root", dir.display()))?;
    folder.lock().with_context(|| format!("failed to lock {}", dir.display()))?;
    Ok(WriterLock { _folder: folder })
}

/// Adds `cidr` to `list`. Adding a CIDR already in the list changes nothing; a CIDR in the
/// other list must be removed from it first.
pub fn add(maps: &mut Maps, list: AclList, cidr: IpNet) -> anyhow::Result<()> {
    if let Some(existing) = lookup_exact(maps, cidr)? {
        if existing == list {
            return Ok(());
        }
        bail!(
            "{cidr} is in the {existing}: remove it with `limiter {} remove {cidr}` first",
            existing.command()
        );
    }

    // The program skips an empty family's trie, so the flag is raised before the insert.
    let mut index = read_index(maps)?;
    match cidr {
        IpNet::V4(_) => index.ipv4_listed = 1,
        IpNet::V6(_) => index.ipv6_listed = 1,
    }
    maps.acl_index.set(0, index, 0).context("failed to write the ACL_INDEX map")?;

    let value = list.map_value();
    let inserted = match cidr {
        IpNet::V4(net) => maps.acl_v4.insert(&Key::new(u32::from(net.prefix_len()), net.addr().octets()), value, 0),
        IpNet::V6(net) => maps.acl_v6.insert(&Key::new(u32::from(net.prefix_len()), net.addr().octets()), value, 0),
    };
    inserted.with_context(|| {
        format!("failed to add {cidr} to the {list}: each family holds at most {MAX_ACL_ENTRIES} CIDRs")
    })
}

/// Removes `cidr` from `list`. Fails when the list does not have exactly this CIDR.
pub fn remove(maps: &mut Maps, list: AclList, cidr: IpNet) -> anyhow::Result<()> {
    if lookup_exact(maps, cidr)? != Some(list) {
        bail!("{cidr} is not in the {list}: list it with `limiter {} list`", list.command());
    }
    let removed = match cidr {
        IpNet::V4(net) => maps.acl_v4.remove(&Key::new(u32::from(net.prefix_len()), net.addr().octets())),
        IpNet::V6(net) => maps.acl_v6.remove(&Key::new(u32::from(net.prefix_len()), net.addr().octets())),
    };
    removed.with_context(|| format!("failed to remove {cidr} from the {list}"))?;

    // Lowered only after the family's last CIDR is gone.
    let mut index = read_index(maps)?;
    match cidr {
        IpNet::V4(_) if maps.acl_v4.keys().next().is_none() => index.ipv4_listed = 0,
        IpNet::V6(_) if maps.acl_v6.keys().next().is_none() => index.ipv6_listed = 0,
        _ => return Ok(()),
    }
    maps.acl_index.set(0, index, 0).context("failed to write the ACL_INDEX map")
}

/// Returns every listed CIDR, IPv4 first.
pub fn entries(maps: &Maps) -> anyhow::Result<Vec<AclEntry>> {
    let mut entries = Vec::new();
    for entry in maps.acl_v4.iter() {
        let (key, value) = entry.context("failed to read the ACL_V4 map")?;
        let net = ipnet::Ipv4Net::new(key.data().into(), key.prefix_len() as u8)
            .context("invalid prefix in the ACL_V4 map: longer than 32")?;
        if let Some(list) = AclList::from_map_value(value) {
            entries.push(AclEntry { cidr: IpNet::V4(net), list });
        }
    }
    for entry in maps.acl_v6.iter() {
        let (key, value) = entry.context("failed to read the ACL_V6 map")?;
        let net = ipnet::Ipv6Net::new(key.data().into(), key.prefix_len() as u8)
            .context("invalid prefix in the ACL_V6 map: longer than 128")?;
        if let Some(list) = AclList::from_map_value(value) {
            entries.push(AclEntry { cidr: IpNet::V6(net), list });
        }
    }
    Ok(entries)
}

/// Returns the list holding exactly `cidr`, not a shorter prefix that contains it.
fn lookup_exact(maps: &Maps, cidr: IpNet) -> anyhow::Result<Option<AclList>> {
    // A trie lookup returns the longest match, so the prefix length must be compared.
    let matched = entries(maps)?.into_iter().find(|entry| entry.cidr == cidr);
    Ok(matched.map(|entry| entry.list))
}

fn read_index(maps: &Maps) -> anyhow::Result<AclIndex> {
    maps.acl_index.get(&0, 0).context("failed to read the ACL_INDEX map")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parses_prefixes_and_addresses() {
        assert_eq!(parse_cidr("192.0.2.0/24").unwrap().to_string(), "192.0.2.0/24");
        assert_eq!(parse_cidr("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
        assert_eq!(parse_cidr("2001:db8::/32").unwrap().to_string(), "2001:db8::/32");
        assert_eq!(parse_cidr("2001:db8::1").unwrap().to_string(), "2001:db8::1/128");
    }

    #[test]
    fn cidr_rejects_host_bits_and_garbage() {
        let error = parse_cidr("192.0.2.7/24").unwrap_err().to_string();
        assert!(error.contains("did you mean 192.0.2.0/24"), "{error}");
        assert!(parse_cidr("192.0.2.0/33").is_err());
        assert!(parse_cidr("example.com").is_err());
        assert!(parse_cidr("").is_err());
    }
}
