//! The XDP program's per-packet working memory, a per-CPU map value rather
//! than the 512-byte stack, and the packet tuple it holds.
use svclb_common::{Flow, FlowKey, Route};

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
    /// With `external::Decision::Translate`: the flow's cached route may be
    /// used.
    pub fresh: bool,
}
