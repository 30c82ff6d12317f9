//! Baseline: the least a per-source limiter must do. Reads the IPv4 source of an untagged
//! Ethernet frame, counts it in a per-CPU LRU hash, and drops the frame. No rule lookup, no
//! window arithmetic, no grant and no verdict statistics.
//!
//! Frames that are not untagged IPv4, or too short to hold the source address, pass.

#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_NO_COMMON_LRU, BPF_NOEXIST, xdp_action},
    macros::{map, xdp},
    maps::LruPerCpuHashMap,
    programs::XdpContext,
};

/// Offset of the IPv4 source address in an untagged Ethernet frame.
const IPV4_SOURCE_OFFSET: usize = 14 + 12;
const ETHERTYPE_OFFSET: usize = 12;
const ETHERTYPE_IPV4: u16 = 0x0800;

/// Packets per IPv4 source, keyed by the address in network byte order. Sized like the
/// limiter's default `COUNTERS`, with an LRU list per CPU as there, and resized by the
/// benchmark at load time.
#[map]
static SOURCE_COUNTS: LruPerCpuHashMap<u32, u64> = LruPerCpuHashMap::with_max_entries(65_536, BPF_F_NO_COMMON_LRU);

#[xdp]
pub fn xdp_count(ctx: XdpContext) -> u32 {
    match count_source(&ctx) {
        Some(()) => xdp_action::XDP_DROP,
        None => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn count_source(ctx: &XdpContext) -> Option<()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + IPV4_SOURCE_OFFSET + 4 > end {
        return None;
    }
    // SAFETY: the check above keeps both reads inside [data, data_end), and the
    // unaligned reads make no assumption about where the frame starts.
    let (ethertype, source) = unsafe {
        (
            core::ptr::read_unaligned((start + ETHERTYPE_OFFSET) as *const u16),
            core::ptr::read_unaligned((start + IPV4_SOURCE_OFFSET) as *const u32),
        )
    };
    if u16::from_be(ethertype) != ETHERTYPE_IPV4 {
        return None;
    }

    if let Some(count) = SOURCE_COUNTS.get_ptr_mut(&source) {
        // SAFETY: the value is this CPU's slot of a per-CPU map, and XDP runs one program
        // at a time on each CPU, so nothing else writes it during the increment.
        unsafe { *count += 1 };
    } else {
        // BPF_NOEXIST, so another CPU's entry created meanwhile is not zeroed.
        let _ = SOURCE_COUNTS.insert(&source, &1, BPF_NOEXIST as u64);
    }
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects programs that can reach a panic, so this is never loaded.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
