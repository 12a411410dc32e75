//! svclb's eBPF programs. Modules, each using only those below it:
//!
//! - attach points: `sock` (cgroup socket hooks), `xdp` (external traffic),
//!   `tc` (replies of local backends);
//! - logic: `external` (the external path's flows and SNAT), `icmp` (ICMP
//!   errors about flows), `lb` (service lookup, backend choice, Maglev),
//!   `conntrack` (entries, per-family maps), `stats` (counters), `parse`
//!   (header checks shared by XDP and tc), `csum` (checksum arithmetic);
//! - below: `maps` (declarations), `scratch` (XDP working memory), `pkt`
//!   (bounds-checked packet access), `helpers` (context and helper
//!   wrappers), `consts` (wire and kernel constants).
//!
//! `unsafe` lives in `helpers`, `pkt` and `conntrack::CtEntry` only.
#![no_std]
#![no_main]
// Map keys and values go to helpers by reference: passing them by value
// would copy them onto the 512-byte stack first.
#![allow(clippy::needless_borrows_for_generic_args)]

mod conntrack;
mod consts;
mod csum;
mod external;
mod helpers;
mod icmp;
mod lb;
mod maps;
mod parse;
mod pkt;
mod scratch;
mod sock;
mod stats;
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
