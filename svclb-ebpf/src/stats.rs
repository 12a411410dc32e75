//! The per-CPU event counters (`svclb_common::stats`) the agent reports.
use crate::{helpers, maps::STATS};

/// Bump one of the `svclb_common::stats` counters (per CPU, no atomics).
#[inline(always)]
pub fn count(stat: u32) {
    if let Some(n) = helpers::this_cpu(&STATS, stat) {
        *n += 1;
    }
}
