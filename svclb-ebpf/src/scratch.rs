//! The XDP program's per-packet working memory, a per-CPU map value rather
//! than the 512-byte stack, and the packet tuple it holds.
use svclb_common::{ct_now, Flow, FlowKey, Route};

use crate::helpers;

/// A packet's addresses (IPv4-mapped for IPv4), ports (host order) and
/// protocol: its conntrack key as it is.
pub type Tuple = FlowKey;

/// See `maps::SCRATCH`. (XDP runs to completion on one CPU, so nothing
/// else uses it meanwhile.)
pub struct Scratch {
    pub t: Tuple,
    /// A TCP SYN without ACK: a new connection.
    pub syn: bool,
    /// The `Flow::state` bits this packet sets in its entry (`CT_SEEN`,
    /// and `CT_FIN` / `CT_RST` for TCP flags).
    pub ct_bits: u8,
    /// A flow being set up or looked at (an established flow's entry is
    /// used in place; see `external::Decision::Translate`).
    pub flow: Flow,
    pub key: FlowKey,
    /// A route looked up for this packet.
    pub route: Route,
    /// When the packet arrived (jiffies, low bits) and the backends epoch
    /// then: what a route cached for this packet's flow is stamped with.
    pub now: u32,
    pub epoch: u32,
    /// The conntrack clock then (`svclb_common::ct_now`).
    pub tick: u32,
    pub clock: Clock,
    /// With `external::Decision::Translate`: the flow's cached route may be
    /// used.
    pub fresh: bool,
}

/// This CPU's conntrack clock as last read, and jiffies (all 64 bits) then.
pub struct Clock {
    jiffies: u64,
    tick: u32,
}

impl Clock {
    /// The conntrack clock (`svclb_common::ct_now`), from bpf_ktime_get_ns
    /// only when jiffies moved since this CPU last read it. A tick is 2^30
    /// ns, so a value at most one jiffy (1-10 ms) old is as good, and the
    /// helper call cost ~20 ns of an established packet's ~60.
    #[inline(always)]
    pub fn tick(&mut self) -> u32 {
        let jiffies = helpers::jiffies64();
        if self.jiffies != jiffies || self.tick == 0 {
            self.jiffies = jiffies;
            self.tick = ct_now(helpers::now_ns());
        }
        self.tick
    }
}
