//! Batched reads and writes of per-CPU hash maps through bpf(2).
//!
//! aya 0.14 walks a map key by key: one syscall to find the next key and one to read its
//! values, so a tick over 100k keys spends 200k syscalls on reading alone.
//! `BPF_MAP_LOOKUP_BATCH` and `BPF_MAP_UPDATE_BATCH` (Linux 5.6) move thousands of entries
//! per syscall instead.
//!
//! A per-CPU value travels as one slot per possible CPU, each slot rounded up to 8 bytes,
//! in the order of the possible-CPU list. The slot count is the number of CPUs in that list,
//! not the highest CPU number plus one: on a machine whose possible CPUs are `0-3,8-11`,
//! each value has 8 slots.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

use bytemuck::Pod;

/// File the kernel lists its possible CPUs in, as ranges such as `0-3,8-11`.
pub const POSSIBLE_CPUS_PATH: &str = "/sys/devices/system/cpu/possible";

/// Entries asked for per lookup syscall. A hash bucket holding more than this makes the
/// kernel return `ENOSPC`, and the read retries with a larger buffer.
const LOOKUP_BATCH: usize = 4096;

// Commands of bpf(2), from include/uapi/linux/bpf.h.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Parses a CPU list such as `0-3,8-11` into the CPU numbers it names, in order.
pub fn parse_cpu_list(text: &str) -> Result<Vec<u32>, String> {
    let mut cpus = Vec::new();
    for range in text.trim().split(',') {
        let bounds = match range.split_once('-') {
            Some((first, last)) => (first.parse::<u32>(), last.parse::<u32>()),
            None => (range.parse::<u32>(), range.parse::<u32>()),
        };
        match bounds {
            (Ok(first), Ok(last)) if first <= last => cpus.extend(first..=last),
            _ => return Err(format!("invalid CPU range {range:?} in {text:?}: expected N or N-M with N <= M")),
        }
    }
    Ok(cpus)
}

/// Returns how many CPUs the kernel may ever bring online: the slots of a per-CPU value.
pub fn possible_cpus() -> anyhow::Result<usize> {
    let text = std::fs::read_to_string(POSSIBLE_CPUS_PATH)
        .map_err(|error| anyhow::anyhow!("failed to read {POSSIBLE_CPUS_PATH}: {error}"))?;
    let cpus = parse_cpu_list(&text).map_err(|error| anyhow::anyhow!("{POSSIBLE_CPUS_PATH}: {error}"))?;
    Ok(cpus.len())
}

/// Bytes one CPU's slot takes in a per-CPU value.
fn slot_size<V>() -> usize {
    std::mem::size_of::<V>().next_multiple_of(8)
}

/// Reads every entry of a per-CPU hash map, `cpus` values per key.
///
/// Entries inserted or removed while the read runs may be missed or seen. Each entry seen
/// is read whole, because the kernel reads a bucket under its lock.
pub fn lookup_all<K: Pod, V: Pod>(map: BorrowedFd<'_>, cpus: usize) -> io::Result<Vec<(K, Vec<V>)>> {
    let slot = slot_size::<V>();
    let mut capacity = LOOKUP_BATCH;
    let mut entries = Vec::new();
    // The kernel's resume token for hash maps is a bucket index; 8 bytes hold it.
    let mut token = 0u64;
    let mut first = true;
    loop {
        let mut keys = vec![K::zeroed(); capacity];
        let mut values = vec![0u8; capacity * cpus * slot];
        let mut next_token = 0u64;
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &token as *const u64 as u64 },
            out_batch: &mut next_token as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: capacity as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let read = attr.count as usize;
        let done = match result {
            Ok(()) => false,
            // ENOENT: the walk reached the end, and `count` is still the number of entries read.
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => true,
            // ENOSPC: one bucket contains more entries than the buffer, so retry with a larger one.
            Err(error) if error.raw_os_error() == Some(libc::ENOSPC) && read == 0 => {
                capacity *= 2;
                continue;
            }
            Err(error) => return Err(error),
        };
        for (index, key) in keys.into_iter().take(read).enumerate() {
            let value = &values[index * cpus * slot..(index + 1) * cpus * slot];
            entries.push((key, decode_per_cpu(value, cpus)));
        }
        if done {
            return Ok(entries);
        }
        token = next_token;
        first = false;
    }
}

/// Writes `entries`, creating or replacing each key with its per-CPU values.
///
/// Every entry must hold exactly `cpus` values. Returns how many entries were written
/// before an error, with the error.
pub fn update_all<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    cpus: usize,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, io::Error)> {
    if values.len() != keys.len() * cpus {
        let message = format!("{} per-CPU values for {} keys on {cpus} CPUs", values.len(), keys.len());
        return Err((0, io::Error::new(io::ErrorKind::InvalidInput, message)));
    }
    let slot = slot_size::<V>();
    let mut written = 0;
    for (key_chunk, value_chunk) in keys.chunks(LOOKUP_BATCH).zip(values.chunks(LOOKUP_BATCH * cpus)) {
        let mut packed = vec![0u8; value_chunk.len() * slot];
        for (index, value) in value_chunk.iter().enumerate() {
            packed[index * slot..index * slot + std::mem::size_of::<V>()].copy_from_slice(bytemuck::bytes_of(value));
        }
        let mut attr = BatchAttr {
            keys: key_chunk.as_ptr() as u64,
            values: packed.as_ptr() as u64,
            count: key_chunk.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        if let Err(error) = bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
            return Err((written + attr.count as usize, error));
        }
        written += key_chunk.len();
    }
    Ok(())
}

/// Splits one per-CPU value into its `cpus` slots.
pub fn decode_per_cpu<V: Pod>(bytes: &[u8], cpus: usize) -> Vec<V> {
    let slot = slot_size::<V>();
    (0..cpus)
        .map(|cpu| bytemuck::pod_read_unaligned(&bytes[cpu * slot..cpu * slot + std::mem::size_of::<V>()]))
        .collect()
}

fn bpf(command: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr` prefix of the size passed; the kernel zero-fills
    // the rest of the union. Every pointer in it refers to a live buffer of the size its
    // count implies.
    let result = unsafe {
        libc::syscall(libc::SYS_bpf, command, attr as *mut BatchAttr, std::mem::size_of::<BatchAttr>() as libc::c_uint)
    };
    if result < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use limiter_common::KeyCounter;

    #[test]
    fn cpu_lists_count_only_listed_cpus() {
        assert_eq!(parse_cpu_list("0-3,8-11\n").unwrap(), vec![0, 1, 2, 3, 8, 9, 10, 11]);
        assert_eq!(parse_cpu_list("0").unwrap(), vec![0]);
        assert_eq!(parse_cpu_list("0-1,5").unwrap(), vec![0, 1, 5]);
        assert!(parse_cpu_list("3-1").unwrap_err().contains("3-1"));
        assert!(parse_cpu_list("0-x").is_err());
        assert!(parse_cpu_list("").is_err());
    }

    #[test]
    fn decode_sparse_cpu_list() {
        // The kernel lays a per-CPU value out as one slot per possible CPU, in list order:
        // with CPUs 0-3 and 8-11, the slot of CPU 8 is the fifth, and there is no slot for
        // CPUs 4-7. Slot `i` contains i + 1 passed packets, so all 8 slots sum to 36.
        let cpus = parse_cpu_list("0-3,8-11").unwrap().len();
        let mut bytes = Vec::new();
        for slot in 0..cpus as u64 {
            let counter = KeyCounter { offered: 10 * (slot + 1), passed: slot + 1, ..Default::default() };
            bytes.extend_from_slice(bytemuck::bytes_of(&counter));
        }
        let counters: Vec<KeyCounter> = decode_per_cpu(&bytes, cpus);
        assert_eq!(counters.len(), 8);
        assert_eq!(counters.iter().map(|counter| counter.passed).sum::<u64>(), 36);
        assert_eq!(counters.iter().map(|counter| counter.offered).sum::<u64>(), 360);
        assert_eq!(counters[4].passed, 5, "the slot after CPU 3 belongs to CPU 8");
    }

    #[test]
    fn slots_round_up_to_eight_bytes() {
        assert_eq!(slot_size::<u32>(), 8);
        assert_eq!(slot_size::<u64>(), 8);
        assert_eq!(slot_size::<KeyCounter>(), std::mem::size_of::<KeyCounter>().next_multiple_of(8));
        // A 4-byte value is read from the front of its 8-byte slot.
        let bytes = [1u8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(decode_per_cpu::<u32>(&bytes, 2), vec![1, 2]);
    }
}
