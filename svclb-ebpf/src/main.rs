//! svclb's eBPF programs. One module per attach point; `lb` holds the service
//! lookup and backend selection they share; `maps` declares the maps; `ctx`
//! is the only place that touches the kernel context with `unsafe`.
#![no_std]
#![no_main]

mod ctx;
mod lb;
mod maps;
mod sock;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
