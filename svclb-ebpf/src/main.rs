//! svclb's eBPF programs. One module per attach point (`sock`: cgroup socket
//! hooks, `xdp`: external traffic, `tc`: replies of local backends); `lb`
//! and `external` hold the lookups and backend choice they use; `csum` is
//! checksum arithmetic; `maps` declares the maps. `ctx` and `pkt` are the
//! only modules with `unsafe` (kernel context, packet memory, helpers).
#![no_std]
#![no_main]
// Map keys and values go to helpers by reference: passing them by value
// would copy them onto the 512-byte stack first.
#![allow(clippy::needless_borrows_for_generic_args)]

mod csum;
mod ctx;
mod external;
mod icmp;
mod lb;
mod maps;
mod pkt;
mod sock;
mod tc;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
