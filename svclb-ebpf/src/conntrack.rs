//! The external path's conntrack: entries read and updated in place, and
//! the choice of map by family. The programs work on `FlowKey`s (IPv4
//! addresses mapped); IPv4 entries are stored under the shorter `FlowKey4`,
//! in their own map.
use core::ptr::NonNull;

use svclb_common::{Flow, FlowKey, FlowKey4, Route, CT_FIN, CT_RST, CT_SEEN};

use crate::maps::{CONNTRACK4, CONNTRACK6};

/// A conntrack entry in the map, read and updated in place: an
/// established packet copies nothing.
#[derive(Clone, Copy)]
pub struct CtEntry(NonNull<Flow>);

impl CtEntry {
    #[inline(always)]
    pub fn flow(&self) -> &Flow {
        // SAFETY: a pointer from a successful lookup in this program run.
        // LRU map elements are preallocated and live as long as the map (which
        // the program holds), so the memory stays a valid Flow for the run.
        // If the entry were evicted and reused meanwhile (it was just marked
        // recently used), one packet would see a mix of two flows: the same
        // exposure as copying it out, which could also be torn.
        unsafe { self.0.as_ref() }
    }

    /// Copy the entry out (for code that builds other entries from it).
    #[inline(always)]
    pub fn copy_to(&self, out: &mut Flow) {
        // SAFETY: as in `flow`; copy_nonoverlapping compiles to word copies,
        // where a plain assignment may become a byte-by-byte memmove call.
        unsafe { core::ptr::copy_nonoverlapping(self.0.as_ptr(), out, 1) };
    }

    /// Note a packet at `now` that shows `bits` (`Flow::state`). Writes
    /// only what changed: last-seen once per tick, the state on a new flag,
    /// so an established flow's packets mostly leave the entry clean.
    /// (Two CPUs adding different bits at once may lose one: a FIN or RST
    /// is retransmitted, or the flow times out by its older state.)
    /// True when the packet added a FIN or RST.
    #[inline(always)]
    pub fn touch(&self, now: u32, bits: u8) -> bool {
        let f = self.flow();
        let (seen, state) = (f.last_seen, f.state);
        // SAFETY: as in `flow`; plain stores of fields no reader needs
        // consistent with each other.
        unsafe {
            if seen != now {
                (*self.0.as_ptr()).last_seen = now;
            }
            if state | bits != state {
                (*self.0.as_ptr()).state = state | bits;
            }
        }
        bits & !state & (CT_FIN | CT_RST) != 0
    }

    /// Add `bits` to the entry's state.
    #[inline(always)]
    pub fn mark(&self, bits: u8) {
        // SAFETY: as in `touch`.
        unsafe { (*self.0.as_ptr()).state |= bits };
    }

    /// A new connection on the entry's tuple (a SYN): its state starts over.
    #[inline(always)]
    pub fn restart(&self, now: u32, bits: u8) {
        // SAFETY: as in `touch`.
        unsafe {
            (*self.0.as_ptr()).last_seen = now;
            (*self.0.as_ptr()).state = bits | CT_SEEN;
        }
    }

    /// Cache `route` in the entry.
    #[inline(always)]
    pub fn set_route(&self, route: &Route) {
        // SAFETY: as in `flow`; a racing writer (another CPU refreshing the
        // same flow) stores an equally valid route.
        unsafe { (*self.0.as_ptr()).route = *route };
    }
}

/// The conntrack entry for `key`.
#[inline(always)]
pub fn entry(key: &FlowKey, v6: bool) -> Option<CtEntry> {
    let p = if v6 {
        CONNTRACK6.get_ptr_mut(key)
    } else {
        CONNTRACK4.get_ptr_mut(&FlowKey4::from_mapped(key))
    };
    p.and_then(NonNull::new).map(CtEntry)
}

/// Add or replace (`flags` 0) or only add (BPF_NOEXIST) an entry; false
/// when the map refused it.
#[inline(always)]
pub fn insert(key: &FlowKey, flow: &Flow, flags: u64, v6: bool) -> bool {
    if v6 {
        CONNTRACK6.insert(key, flow, flags).is_ok()
    } else {
        CONNTRACK4
            .insert(&FlowKey4::from_mapped(key), flow, flags)
            .is_ok()
    }
}

#[inline(always)]
pub fn remove(key: &FlowKey, v6: bool) {
    let _ = if v6 {
        CONNTRACK6.remove(key)
    } else {
        CONNTRACK4.remove(&FlowKey4::from_mapped(key))
    };
}
