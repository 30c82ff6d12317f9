//! Batched map operations against the kernel's own maps: what `BPF_MAP_LOOKUP_BATCH` reads
//! and `BPF_MAP_UPDATE_BATCH` writes must match aya's key-by-key access exactly, on every
//! possible CPU.

use std::{collections::HashMap, net::Ipv4Addr, os::fd::AsFd as _};

use aya::maps::{IterableMap as _, PerCpuValues};
use limiter_common::{FAMILY_IPV4, FlowKey, Grant, KeyCounter, SlidingWindow};
use limiter_tests::PinDir;
use limiter_user::{
    batch,
    datapath::{self, Maps},
};

/// More keys than one lookup batch holds, so the read has to resume from the kernel's token.
const KEYS: u32 = 10_000;

fn flow_key(index: u32) -> FlowKey {
    let mut key = FlowKey { rule_id: 1, family: FAMILY_IPV4, prefix_len: 32, ..FlowKey::default() };
    key.addr[..4].copy_from_slice(&Ipv4Addr::from(0x0a00_0000u32 + index).octets());
    key
}

/// Returns a counter whose every field differs by key and by CPU, so a value read from the wrong
/// slot or the wrong key cannot go unnoticed.
fn counter(index: u32, cpu: usize) -> KeyCounter {
    let base = u64::from(index) * 1000 + cpu as u64;
    KeyCounter {
        offered: base + 7,
        passed: base,
        fallback_window: SlidingWindow { window_id: base + 1, current: base + 2, previous: base + 3 },
        would_drop: base + 4,
    }
}

#[test]
fn batch_ops_match_aya_access() {
    let pins = PinDir::new();
    // Room for every key in the LRU list of whichever CPU the writes run on.
    let _ebpf = datapath::load(&pins.path, KEYS * 2 * batch::possible_cpus().unwrap() as u32).expect("load the limiter");
    let mut maps = Maps::open_dir(&pins.path).expect("open the pinned maps");
    let cpus = batch::possible_cpus().expect("read the possible CPUs");
    assert_eq!(cpus, aya::util::nr_cpus().expect("aya's CPU count"), "both count possible CPUs alike");

    // Step 1: write counters key by key through aya, read them back in batches.
    for index in 0..KEYS {
        let values = PerCpuValues::try_from((0..cpus).map(|cpu| counter(index, cpu)).collect::<Vec<_>>()).unwrap();
        maps.counters.insert(flow_key(index), values, 0).expect("insert a counter");
    }
    let read: HashMap<FlowKey, Vec<KeyCounter>> =
        batch::lookup_all(maps.counters.map().fd().as_fd(), cpus).expect("batched lookup").into_iter().collect();
    assert_eq!(read.len(), KEYS as usize, "keys read in batches");
    for index in 0..KEYS {
        let expected: Vec<KeyCounter> = (0..cpus).map(|cpu| counter(index, cpu)).collect();
        assert_eq!(read[&flow_key(index)], expected, "counters of key {index}");
    }
    let passed: u64 = read.values().flatten().map(|counter| counter.passed).sum();
    let expected: u64 = (0..KEYS).flat_map(|index| (0..cpus).map(move |cpu| counter(index, cpu).passed)).sum();
    assert_eq!(passed, expected, "passed packets summed over every key and CPU");

    // Step 2: write grants in batches, read them back key by key through aya.
    let keys: Vec<FlowKey> = (0..KEYS).map(flow_key).collect();
    let grants: Vec<Grant> = (0..KEYS)
        .flat_map(|index| {
            (0..cpus).map(move |cpu| Grant { passed_ceiling: u64::from(index) * 10 + cpu as u64, expires_ns: 99 })
        })
        .collect();
    batch::update_all(maps.grants.map().fd().as_fd(), cpus, &keys, &grants).expect("batched update");
    for index in [0, 1, KEYS / 2, KEYS - 1] {
        let values = maps.grants.get(&flow_key(index), 0).expect("grant written in a batch");
        for (cpu, grant) in values.iter().enumerate() {
            assert_eq!(grant.passed_ceiling, u64::from(index) * 10 + cpu as u64, "grant of key {index} on CPU {cpu}");
            assert_eq!(grant.expires_ns, 99);
        }
    }

    // A value count that does not match keys times CPUs is refused before any syscall.
    let error = batch::update_all(maps.grants.map().fd().as_fd(), cpus, &keys[..2], &grants[..1]).unwrap_err();
    assert_eq!(error.0, 0);
    assert!(error.1.to_string().contains("per-CPU values for 2 keys"), "{}", error.1);
}
