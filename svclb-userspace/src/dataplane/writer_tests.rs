//! The writer against in-memory maps that check, after every single map
//! operation, what a concurrent reader could observe.
use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use proptest::prelude::*;

use svclb_common::{
    BACKEND_DRAINING, BACKEND_TERMINATING, SVC_FLAG_DRAINING_MEMBERS, SVC_FLAG_MEMBERS,
};

use super::*;
use crate::dataplane::abi::{addr_from_abi, proto_to_abi};
use crate::model::{
    Backend, Cidr, Frontend, FrontendKey, FrontendKind, Protocol, Scope, ServiceId, WhenEmpty,
};

/// Small tables keep the property test fast; 1009 entries span two chunks.
const TABLE_SIZE: u32 = 1009;

#[derive(Default, Clone)]
struct FakeMaps {
    services: HashMap<ServiceKey, ServiceValue>,
    backends: HashMap<u32, AbiBackend>,
    rev_nat: HashMap<u32, RevNat>,
    affinity_match: BTreeSet<AffinityMatchKey>,
    maglev: HashMap<MaglevKey, MaglevChunk>,
    source_ranges: BTreeSet<SourceRange>,
    /// Per frontend (slot-0 key): every count a reader may still be acting on,
    /// i.e. counts written since the last barrier, plus the current one.
    reader_counts: HashMap<ServiceKey, BTreeSet<u16>>,
    /// Likewise the Maglev tables (rev-NAT id, generation, size) readers may use.
    reader_tables: HashMap<ServiceKey, BTreeSet<(u32, u16, u32)>>,
    ops: usize,
    barriers: usize,
}

impl FakeMaps {
    fn slot_key(k: &ServiceKey, slot: u16) -> ServiceKey {
        ServiceKey { slot, ..*k }
    }

    /// What a reader could do right now must never hit a missing slot or backend.
    fn check_readers(&self) {
        for (k, counts) in &self.reader_counts {
            for &c in counts {
                for s in 1..=c {
                    let slot = self.services.get(&Self::slot_key(k, s));
                    let slot = slot.unwrap_or_else(|| {
                        panic!(
                            "reader with count {c} finds slot {s} of {k:?} missing (op {})",
                            self.ops
                        )
                    });
                    assert!(
                        self.backends.contains_key(&slot.backend_id),
                        "slot {s} of {k:?} names missing backend {} (op {})",
                        slot.backend_id,
                        self.ops
                    );
                }
            }
        }
        for (k, tables) in &self.reader_tables {
            for &(rev_nat_id, generation, size) in tables {
                for c in 0..size.div_ceil(MAGLEV_CHUNK) {
                    let key = MaglevKey {
                        rev_nat_id,
                        generation,
                        chunk: c as u16,
                    };
                    let chunk = self.maglev.get(&key).unwrap_or_else(|| {
                        panic!(
                            "reader of {k:?} finds Maglev chunk {key:?} missing (op {})",
                            self.ops
                        )
                    });
                    let entries = (size - c * MAGLEV_CHUNK).min(MAGLEV_CHUNK) as usize;
                    for (j, id) in chunk.backend_ids[..entries].iter().enumerate() {
                        assert!(
                            self.backends.contains_key(id),
                            "Maglev entry {} of {k:?} names missing backend {id} (op {})",
                            c * MAGLEV_CHUNK + j as u32,
                            self.ops
                        );
                    }
                }
            }
        }
    }

    fn op(&mut self) -> Result<(), DataplaneError> {
        self.ops += 1;
        Ok(())
    }
}

impl MapOps for FakeMaps {
    fn put_service(
        &mut self,
        key: &ServiceKey,
        value: &ServiceValue,
    ) -> Result<(), DataplaneError> {
        self.op()?;
        if key.slot == 0 {
            self.reader_counts
                .entry(*key)
                .or_default()
                .insert(value.count);
            if value.maglev_size > 0 {
                self.reader_tables.entry(*key).or_default().insert((
                    value.rev_nat_id,
                    value.maglev_generation,
                    value.maglev_size,
                ));
            }
        }
        self.services.insert(*key, *value);
        self.check_readers();
        Ok(())
    }
    fn del_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        self.ops += 1;
        assert!(
            self.services.remove(key).is_some(),
            "deleting missing {key:?}"
        );
        self.check_readers();
        Ok(())
    }
    fn put_backend(&mut self, id: u32, backend: &AbiBackend) -> Result<(), DataplaneError> {
        self.op()?;
        self.backends.insert(id, *backend);
        Ok(())
    }
    fn del_backend(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.ops += 1;
        assert!(
            self.backends.remove(&id).is_some(),
            "deleting missing backend {id}"
        );
        self.check_readers();
        Ok(())
    }
    fn put_rev_nat(&mut self, id: u32, rev_nat: &RevNat) -> Result<(), DataplaneError> {
        self.op()?;
        self.rev_nat.insert(id, *rev_nat);
        Ok(())
    }
    fn del_rev_nat(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.ops += 1;
        assert!(
            self.rev_nat.remove(&id).is_some(),
            "deleting missing rev-nat {id}"
        );
        Ok(())
    }
    fn put_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<(), DataplaneError> {
        self.op()?;
        self.affinity_match.insert(*key);
        Ok(())
    }
    fn del_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<(), DataplaneError> {
        self.ops += 1;
        assert!(
            self.affinity_match.remove(key),
            "deleting missing affinity match {key:?}"
        );
        Ok(())
    }
    fn put_maglev(&mut self, key: &MaglevKey, chunk: &MaglevChunk) -> Result<(), DataplaneError> {
        self.op()?;
        self.maglev.insert(*key, *chunk);
        self.check_readers();
        Ok(())
    }
    fn del_maglev(&mut self, key: &MaglevKey) -> Result<(), DataplaneError> {
        self.ops += 1;
        assert!(
            self.maglev.remove(key).is_some(),
            "deleting missing {key:?}"
        );
        self.check_readers();
        Ok(())
    }
    fn put_source_range(&mut self, key: &SourceRange) -> Result<(), DataplaneError> {
        self.op()?;
        self.source_ranges.insert(*key);
        Ok(())
    }
    fn del_source_range(&mut self, key: &SourceRange) -> Result<(), DataplaneError> {
        self.ops += 1;
        assert!(self.source_ranges.remove(key), "deleting missing {key:?}");
        Ok(())
    }
    fn barrier(&mut self) -> Result<(), DataplaneError> {
        self.barriers += 1;
        self.reader_tables = self
            .services
            .iter()
            .filter(|(k, v)| k.slot == 0 && v.maglev_size > 0)
            .map(|(k, v)| {
                let table = (v.rev_nat_id, v.maglev_generation, v.maglev_size);
                (*k, BTreeSet::from([table]))
            })
            .collect();
        // Readers that started before now are done; new ones see current counts.
        self.reader_counts = self
            .services
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .map(|(k, v)| (*k, BTreeSet::from([v.count])))
            .collect();
        Ok(())
    }
    fn read_all(&self) -> Result<MapContents, DataplaneError> {
        Ok(MapContents {
            services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            rev_nat: self.rev_nat.iter().map(|(k, v)| (*k, *v)).collect(),
            affinity_match: self.affinity_match.iter().copied().collect(),
            maglev: self.maglev.keys().copied().collect(),
            source_ranges: self.source_ranges.iter().copied().collect(),
        })
    }
    fn read_maglev(&self, key: &MaglevKey) -> Result<Option<MaglevChunk>, DataplaneError> {
        Ok(self.maglev.get(key).copied())
    }
}

type Observed = BTreeMap<FrontendKey, (Vec<(IpAddr, u16, bool, bool)>, Settings, Vec<Cidr>)>;

/// The maps' content as the model would describe it.
fn observed(m: &FakeMaps) -> Observed {
    let mut out = BTreeMap::new();
    for (k, v) in m.services.iter().filter(|(k, _)| k.slot == 0) {
        let record = Settings {
            flags: v.flags,
            affinity_timeout: v.affinity_timeout,
        };
        let backends = (1..=v.count)
            .map(|s| {
                let id = m.services[&FakeMaps::slot_key(k, s)].backend_id;
                let b = m.backends[&id];
                (
                    addr_from_abi(b.addr),
                    b.port,
                    b.state == BACKEND_TERMINATING,
                    b.local != 0,
                )
            })
            .collect();
        let ranges = m
            .source_ranges
            .iter()
            .filter(|r| r.rev_nat_id == v.rev_nat_id)
            .map(SourceRange::cidr)
            .collect();
        out.insert(frontend_key(k).unwrap(), (backends, record, ranges));
    }
    out
}

/// No entry that nothing can reach: slots within counts, referenced backends,
/// rev-NAT entries of live frontends only.
fn assert_no_garbage(m: &FakeMaps) {
    let mut referenced = BTreeSet::new();
    let mut rev_nats = BTreeSet::new();
    for (k, v) in &m.services {
        if k.slot == 0 {
            rev_nats.insert(v.rev_nat_id);
        } else {
            let record = m
                .services
                .get(&FakeMaps::slot_key(k, 0))
                .expect("slot without frontend");
            assert!(k.slot <= record.count, "stale slot {k:?}");
            referenced.insert(v.backend_id);
        }
    }
    // Backends no slot names are kept only as draining.
    let draining: BTreeSet<u32> = m
        .backends
        .iter()
        .filter(|(_, b)| b.state == BACKEND_DRAINING)
        .map(|(id, _)| *id)
        .collect();
    assert!(
        referenced.is_disjoint(&draining),
        "a slot names a draining backend"
    );
    assert_eq!(
        &referenced | &draining,
        m.backends.keys().copied().collect(),
        "unreferenced backends"
    );
    assert_eq!(
        rev_nats,
        m.rev_nat.keys().copied().collect(),
        "stale rev-NAT entries"
    );
    // Members: exactly the backends of frontends with the members flag.
    let members: BTreeSet<AffinityMatchKey> = m
        .services
        .iter()
        .filter(|(k, _)| {
            k.slot != 0 && m.services[&FakeMaps::slot_key(k, 0)].flags & SVC_FLAG_MEMBERS != 0
        })
        .map(|(k, v)| AffinityMatchKey {
            rev_nat_id: m.services[&FakeMaps::slot_key(k, 0)].rev_nat_id,
            backend_id: v.backend_id,
        })
        .collect();
    // ... and, for UDP socket frontends, draining backends (which frontend
    // drains which is not in the maps: any draining one may be listed).
    let may_drain: BTreeSet<u32> = (m.services.iter())
        .filter(|(k, v)| k.slot == 0 && v.flags & SVC_FLAG_DRAINING_MEMBERS != 0)
        .map(|(_, v)| v.rev_nat_id)
        .collect();
    assert!(members.is_subset(&m.affinity_match), "affinity members");
    for k in m.affinity_match.difference(&members) {
        let kept = may_drain.contains(&k.rev_nat_id) && draining.contains(&k.backend_id);
        assert!(kept, "stale affinity member {k:?}");
    }
    // Maglev chunks: exactly the current tables of external frontends with
    // backends, each entry one of the frontend's backends, and as many
    // entries per backend as the Maglev table gives it.
    let mut chunks = BTreeSet::new();
    for (k, v) in m.services.iter().filter(|(k, _)| k.slot == 0) {
        let external = k.scope == svclb_common::SCOPE_EXTERNAL;
        assert_eq!(v.maglev_size > 0, external && v.count > 0, "table of {k:?}");
        if v.maglev_size == 0 {
            continue;
        }
        let slots: BTreeSet<u32> = (1..=v.count)
            .map(|s| m.services[&FakeMaps::slot_key(k, s)].backend_id)
            .collect();
        let mut used = BTreeSet::new();
        for i in 0..v.maglev_size {
            let key = MaglevKey {
                rev_nat_id: v.rev_nat_id,
                generation: v.maglev_generation,
                chunk: (i / MAGLEV_CHUNK) as u16,
            };
            chunks.insert(key);
            used.insert(m.maglev[&key].backend_ids[(i % MAGLEV_CHUNK) as usize]);
        }
        assert_eq!(used, slots, "Maglev entries of {k:?} are its backends");
    }
    assert_eq!(
        chunks,
        m.maglev.keys().copied().collect(),
        "stale Maglev chunks"
    );
    let live: BTreeSet<u32> = m
        .services
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .map(|(_, v)| v.rev_nat_id)
        .collect();
    assert!(
        m.source_ranges.iter().all(|r| live.contains(&r.rev_nat_id)),
        "stale source ranges"
    );
}

/// A backend as the maps identify it: address, port, protocol, locality.
type Identity = (IpAddr, u16, u8, bool);

/// The backends no slot names (after a flush: the draining ones).
fn draining(m: &FakeMaps) -> BTreeSet<Identity> {
    let named: BTreeSet<u32> = m
        .services
        .iter()
        .filter(|(k, _)| k.slot != 0)
        .map(|(_, v)| v.backend_id)
        .collect();
    m.backends
        .iter()
        .filter(|(id, _)| !named.contains(id))
        .map(|(_, b)| (addr_from_abi(b.addr), b.port, b.proto, b.local != 0))
        .collect()
}

/// The draining backends `desired` keeps: those of some frontend's
/// `draining` that no frontend has as a backend.
fn expected_draining(desired: &BTreeMap<ServiceId, Vec<Frontend>>) -> BTreeSet<Identity> {
    let identity =
        |f: &Frontend, b: &Backend| (b.addr, b.port, proto_to_abi(f.key.protocol), b.local);
    let all = desired.values().flatten();
    let named: BTreeSet<Identity> = all
        .clone()
        .flat_map(|f| f.backends.iter().map(move |b| identity(f, b)))
        .collect();
    all.flat_map(|f| f.draining.iter().map(move |b| identity(f, b)))
        .filter(|i| !named.contains(i))
        .collect()
}

fn expected(desired: &BTreeMap<ServiceId, Vec<Frontend>>) -> Observed {
    desired
        .values()
        .flatten()
        .map(|f| {
            let backends = f
                .backends
                .iter()
                .map(|b| (b.addr, b.port, b.terminating, b.local))
                .collect();
            (f.key, (backends, Settings::of(f), f.source_ranges.clone()))
        })
        .collect()
}

fn sid(name: &str) -> ServiceId {
    ServiceId {
        namespace: "default".into(),
        name: name.into(),
    }
}

fn fe(ip: &str, port: u16, protocol: Protocol, backends: &[(&str, u16)]) -> Frontend {
    Frontend::cluster_ip(
        FrontendKey::new(ip.parse().unwrap(), port, protocol),
        backends
            .iter()
            .map(|(a, p)| Backend {
                addr: a.parse().unwrap(),
                port: *p,
                terminating: false,
                local: false,
            })
            .collect(),
    )
}

fn writer() -> Writer<FakeMaps> {
    adopt(FakeMaps::default())
}

fn adopt(maps: FakeMaps) -> Writer<FakeMaps> {
    let mut w = Writer::adopt(maps, Capacity::default()).unwrap();
    w.set_maglev_size(TABLE_SIZE);
    w
}

#[test]
fn creates_updates_and_removes_a_service() {
    let mut w = writer();
    let a = sid("a");
    let v1 = vec![fe(
        "198.19.0.10",
        80,
        Protocol::Tcp,
        &[("198.18.1.2", 8080), ("198.18.1.3", 8080)],
    )];
    w.apply(&a, &v1).unwrap();
    assert_eq!(
        observed(w.maps()),
        expected(&BTreeMap::from([(a.clone(), v1)]))
    );
    assert_no_garbage(w.maps());

    let v2 = vec![fe(
        "198.19.0.10",
        80,
        Protocol::Tcp,
        &[("198.18.1.3", 8080)],
    )];
    let barriers = w.maps().barriers;
    w.apply(&a, &v2).unwrap();
    assert_eq!(
        observed(w.maps()),
        expected(&BTreeMap::from([(a.clone(), v2)]))
    );
    assert_eq!(
        w.maps().barriers,
        barriers,
        "the new set is visible before any wait"
    );
    w.flush().unwrap();
    assert_eq!(
        w.maps().barriers,
        barriers + 1,
        "shrinking waits for readers once"
    );
    assert_no_garbage(w.maps());

    w.apply(&a, &[]).unwrap();
    w.flush().unwrap();
    assert!(
        w.maps().services.is_empty() && w.maps().backends.is_empty() && w.maps().rev_nat.is_empty()
    );
}

/// A UDP socket frontend lists its draining backends among its members, so
/// that a socket's flow stays on a backend that turned terminating but
/// still serves (as conntrack keeps a UDP flow); across a restart too, and
/// until the frontend lets go of it. An external frontend with affinity
/// does not: new connections of an affine client avoid a draining backend.
#[test]
fn udp_socket_flows_keep_draining_backends_as_members() {
    let udp = |backends: &[(&str, u16)], draining: &[(&str, u16)]| {
        let mut f = fe("198.19.0.1", 53, Protocol::Udp, backends);
        f.draining = fe("198.19.0.1", 53, Protocol::Udp, draining).backends;
        f
    };
    let member_hosts = |m: &FakeMaps| -> BTreeSet<IpAddr> {
        (m.affinity_match.iter())
            .map(|k| addr_from_abi(m.backends[&k.backend_id].addr))
            .collect()
    };
    let hosts =
        |hs: &[[u8; 4]]| -> BTreeSet<IpAddr> { hs.iter().map(|h| IpAddr::from(*h)).collect() };
    let a = sid("a");
    let mut w = writer();
    w.apply(&a, &[udp(&[("198.18.1.1", 53), ("198.18.1.2", 53)], &[])])
        .unwrap();
    // 198.18.1.1 terminates while serving: no slot, still a member.
    let rolled = vec![udp(&[("198.18.1.2", 53)], &[("198.18.1.1", 53)])];
    w.apply(&a, &rolled).unwrap();
    w.flush().unwrap();
    assert_eq!(
        member_hosts(w.maps()),
        hosts(&[[198, 18, 1, 1], [198, 18, 1, 2]])
    );
    assert_no_garbage(w.maps());
    let mut restarted = adopt(w.maps().clone());
    let ops = restarted.maps().ops;
    restarted.apply(&a, &rolled).unwrap();
    restarted.prune_unclaimed().unwrap();
    assert_eq!(restarted.maps().ops, ops, "nothing to rewrite");
    // Gone: no longer a member, and its entry goes.
    restarted
        .apply(&a, &[udp(&[("198.18.1.2", 53)], &[])])
        .unwrap();
    restarted.flush().unwrap();
    assert_eq!(member_hosts(restarted.maps()), hosts(&[[198, 18, 1, 2]]));
    assert_no_garbage(restarted.maps());

    // External with affinity: members are the slots only.
    let mut ext = fe("198.19.0.2", 80, Protocol::Tcp, &[("198.18.2.2", 80)]);
    ext.key.scope = Scope::External;
    ext.affinity_timeout = Some(60);
    ext.draining = fe("198.19.0.2", 80, Protocol::Tcp, &[("198.18.2.1", 80)]).backends;
    let mut w = writer();
    w.apply(&sid("b"), &[ext]).unwrap();
    w.flush().unwrap();
    assert_eq!(member_hosts(w.maps()), hosts(&[[198, 18, 2, 2]]));
    assert_no_garbage(w.maps());
}

/// Graceful termination: a backend that leaves the slots of an external
/// frontend but still serves keeps its entry and id (established flows
/// hold the id; no deletion, so no epoch bump) for as long as the frontend
/// lists it as draining, also across a restart; it goes once the
/// frontend lets go of it.
#[test]
fn a_draining_backend_keeps_its_entry_until_let_go() {
    let external = |backends: &[(&str, u16)], draining: &[(&str, u16)]| {
        let mut f = fe("198.19.0.1", 80, Protocol::Tcp, backends);
        f.key.scope = Scope::External;
        f.draining = fe("198.19.0.1", 80, Protocol::Tcp, draining).backends;
        f
    };
    let id_of = |m: &FakeMaps, host: [u8; 4]| -> Option<(u32, u8)> {
        m.backends
            .iter()
            .find(|(_, b)| addr_from_abi(b.addr) == IpAddr::from(host))
            .map(|(id, b)| (*id, b.state))
    };
    let a = sid("a");
    let mut w = writer();
    w.apply(&a, &[external(&[("198.18.1.1", 80)], &[])])
        .unwrap();
    let (old_id, _) = id_of(w.maps(), [198, 18, 1, 1]).unwrap();
    // Rolled: a new backend serves new flows, the old one drains.
    let rolled = vec![external(&[("198.18.1.2", 80)], &[("198.18.1.1", 80)])];
    w.apply(&a, &rolled).unwrap();
    w.flush().unwrap();
    assert_eq!(
        id_of(w.maps(), [198, 18, 1, 1]),
        Some((old_id, BACKEND_DRAINING)),
        "same entry, marked draining"
    );
    assert_no_garbage(w.maps());
    // A restart keeps it (the maps alone say it drains) with its id.
    let mut restarted = adopt(w.maps().clone());
    let ops = restarted.maps().ops;
    restarted.apply(&a, &rolled).unwrap();
    assert_eq!(restarted.maps().ops, ops, "nothing to rewrite");
    restarted.prune_unclaimed().unwrap();
    restarted.flush().unwrap();
    assert_eq!(
        id_of(restarted.maps(), [198, 18, 1, 1]),
        Some((old_id, BACKEND_DRAINING))
    );
    // A restart into a state that no longer drains it: gone after the prune.
    let mut again = adopt(restarted.maps().clone());
    assert!(id_of(again.maps(), [198, 18, 1, 1]).is_some());
    again
        .apply(&a, &[external(&[("198.18.1.2", 80)], &[])])
        .unwrap();
    again.prune_unclaimed().unwrap();
    assert_eq!(id_of(again.maps(), [198, 18, 1, 1]), None);
    assert_no_garbage(again.maps());
    // Ready again: back in the slots with the same entry.
    restarted
        .apply(
            &a,
            &[external(&[("198.18.1.1", 80), ("198.18.1.2", 80)], &[])],
        )
        .unwrap();
    restarted.flush().unwrap();
    assert_eq!(
        id_of(restarted.maps(), [198, 18, 1, 1]),
        Some((old_id, svclb_common::BACKEND_ACTIVE))
    );
    // Let go of (stopped serving): deleted.
    restarted
        .apply(&a, &[external(&[("198.18.1.2", 80)], &[])])
        .unwrap();
    restarted.flush().unwrap();
    assert_eq!(id_of(restarted.maps(), [198, 18, 1, 1]), None);
    assert_no_garbage(restarted.maps());
}

#[test]
fn a_backend_turning_terminating_is_updated_in_place() {
    let mut w = writer();
    let mut v = vec![fe(
        "198.19.0.10",
        80,
        Protocol::Tcp,
        &[("198.18.1.2", 8080)],
    )];
    w.apply(&sid("a"), &v).unwrap();
    v[0].backends[0].terminating = true;
    let stats = w.apply(&sid("a"), &v).unwrap();
    assert_eq!(
        stats,
        ApplyStats {
            writes: 1,
            deletes: 0
        },
        "only the backend record changes"
    );
    assert_eq!(
        observed(w.maps()),
        expected(&BTreeMap::from([(sid("a"), v)]))
    );
}

#[test]
fn switching_affinity_on_and_off_updates_members() {
    let mut w = writer();
    let mut v = vec![fe(
        "198.19.0.10",
        80,
        Protocol::Tcp,
        &[("198.18.1.2", 80), ("198.18.1.3", 80)],
    )];
    v[0].affinity_timeout = Some(10_800);
    w.apply(&sid("a"), &v).unwrap();
    assert_eq!(w.maps().affinity_match.len(), 2);
    assert_eq!(
        observed(w.maps()),
        expected(&BTreeMap::from([(sid("a"), v.clone())]))
    );
    v[0].affinity_timeout = None;
    w.apply(&sid("a"), &v).unwrap();
    w.flush().unwrap();
    assert!(w.maps().affinity_match.is_empty());
    assert_no_garbage(w.maps());
}

/// The programs keep an unconnected UDP socket on its backend while the
/// members list it; a backend's slot moves when one before it leaves.
#[test]
fn udp_socket_frontends_list_their_members() {
    let mut w = writer();
    let mut v = vec![
        fe(
            "198.19.0.53",
            53,
            Protocol::Udp,
            &[("198.18.1.2", 53), ("198.18.1.3", 53), ("198.18.1.4", 53)],
        ),
        fe("198.19.0.80", 80, Protocol::Tcp, &[("198.18.1.2", 80)]),
    ];
    w.apply(&sid("a"), &v).unwrap();
    let ids = |w: &Writer<FakeMaps>| -> BTreeSet<u32> {
        w.maps()
            .affinity_match
            .iter()
            .map(|k| k.backend_id)
            .collect()
    };
    assert_eq!(
        ids(&w).len(),
        3,
        "the UDP frontend's three, not the TCP one's"
    );
    let id_of = |w: &Writer<FakeMaps>, addr: &str| -> u32 {
        let ip: IpAddr = addr.parse().unwrap();
        *w.maps()
            .backends
            .iter()
            .find(|(_, b)| addr_from_abi(b.addr) == ip && b.port == 53)
            .unwrap()
            .0
    };
    let kept = [id_of(&w, "198.18.1.3"), id_of(&w, "198.18.1.4")];
    v[0].backends.remove(0);
    w.apply(&sid("a"), &v).unwrap();
    w.flush().unwrap();
    assert_eq!(
        ids(&w),
        BTreeSet::from(kept),
        "the staying backends keep their ids"
    );
    assert_no_garbage(w.maps());
}

#[test]
fn unchanged_service_writes_nothing() {
    let mut w = writer();
    let v = vec![fe(
        "198.19.0.10",
        80,
        Protocol::Tcp,
        &[("198.18.1.2", 8080)],
    )];
    w.apply(&sid("a"), &v).unwrap();
    let ops = w.maps().ops;
    assert_eq!(w.apply(&sid("a"), &v).unwrap(), ApplyStats::default());
    assert_eq!(w.maps().ops, ops);
}

#[test]
fn restart_adopts_the_maps_and_rewrites_nothing() {
    let mut w = writer();
    let a = vec![fe(
        "198.19.0.10",
        80,
        Protocol::Tcp,
        &[("198.18.1.2", 8080), ("198.18.1.3", 8080)],
    )];
    let b = vec![fe("fd00:5::b", 53, Protocol::Udp, &[("fd00::1:2", 5353)])];
    w.apply(&sid("a"), &a).unwrap();
    w.apply(&sid("b"), &b).unwrap();
    let maps = w.maps().clone();

    let mut restarted = adopt(maps);
    let ops = restarted.maps().ops;
    assert_eq!(
        restarted.apply(&sid("a"), &a).unwrap(),
        ApplyStats::default()
    );
    assert_eq!(
        restarted.maps().ops,
        ops,
        "a restart must not rewrite what is right"
    );
    // b was deleted while no agent ran: pruned once the sources synced.
    restarted.prune_unclaimed().unwrap();
    assert_eq!(
        observed(restarted.maps()),
        expected(&BTreeMap::from([(sid("a"), a)]))
    );
    assert_no_garbage(restarted.maps());
}

/// Two services whose slices disagree about an endpoint's node: each
/// keeps the locality it asked for (the backend is stored twice), instead of
/// the last one written flipping the other's.
#[test]
fn backend_locality_is_per_frontend() {
    let mut w = writer();
    let mut a = fe("198.19.0.1", 80, Protocol::Tcp, &[("198.18.1.2", 8080)]);
    a.key.scope = Scope::External;
    a.backends[0].local = true;
    let mut b = fe("198.19.0.2", 80, Protocol::Tcp, &[("198.18.1.2", 8080)]);
    b.key.scope = Scope::External;
    w.apply(&sid("a"), std::slice::from_ref(&a)).unwrap();
    w.apply(&sid("b"), std::slice::from_ref(&b)).unwrap();
    w.flush().unwrap();
    let desired = BTreeMap::from([(sid("a"), vec![a]), (sid("b"), vec![b])]);
    assert_eq!(observed(w.maps()), expected(&desired));
    assert_eq!(w.maps().backends.len(), 2);
    assert_no_garbage(w.maps());
}

#[test]
fn adopt_drops_half_written_frontends_and_garbage() {
    let mut m = FakeMaps::default();
    let fk = FrontendKey::new("198.19.0.10".parse().unwrap(), 80, Protocol::Tcp);
    // Slot 0 says two backends, slot 2 names a backend that doesn't exist.
    m.services.insert(
        service_key(&fk, 0),
        ServiceValue {
            count: 2,
            rev_nat_id: 1,
            ..Default::default()
        },
    );
    m.services.insert(
        service_key(&fk, 1),
        ServiceValue {
            backend_id: 7,
            ..Default::default()
        },
    );
    m.services.insert(
        service_key(&fk, 2),
        ServiceValue {
            backend_id: 8,
            ..Default::default()
        },
    );
    m.services.insert(
        service_key(&fk, 9),
        ServiceValue {
            backend_id: 7,
            ..Default::default()
        },
    );
    m.backends.insert(
        7,
        backend_to_abi(
            &("198.18.1.2".parse().unwrap(), 8080, Protocol::Tcp, false),
            0,
        ),
    );
    m.rev_nat.insert(1, RevNat::default());
    let w = Writer::adopt(m, Capacity::default()).unwrap();
    assert!(w.maps().services.is_empty(), "{:?}", w.maps().services);
    assert!(w.maps().backends.is_empty() && w.maps().rev_nat.is_empty());
}

#[test]
fn a_full_map_refuses_the_service_and_leaves_others_intact() {
    let mut w = Writer::adopt(
        FakeMaps::default(),
        Capacity {
            services: 6,
            backends: 100,
            maglev_chunks: 100,
        },
    )
    .unwrap();
    let a = vec![fe(
        "198.19.0.10",
        80,
        Protocol::Tcp,
        &[("198.18.1.2", 80), ("198.18.1.3", 80)],
    )];
    w.apply(&sid("a"), &a).unwrap();
    let before = w.maps().services.clone();
    let big = vec![fe(
        "198.19.0.11",
        80,
        Protocol::Tcp,
        &[("198.18.1.4", 80), ("198.18.1.5", 80), ("198.18.1.6", 80)],
    )];
    let err = w.apply(&sid("big"), &big).unwrap_err();
    assert!(
        err.to_string().contains("default/big") && err.to_string().contains("full"),
        "{err}"
    );
    assert_eq!(w.maps().services, before);
    assert_eq!(
        observed(w.maps()),
        expected(&BTreeMap::from([(sid("a"), a)]))
    );
}

#[test]
fn a_frontend_owned_by_another_service_is_not_taken_over() {
    let mut w = writer();
    let a = vec![fe("198.19.0.10", 80, Protocol::Tcp, &[("198.18.1.2", 80)])];
    w.apply(&sid("a"), &a).unwrap();
    let err = w
        .apply(
            &sid("b"),
            &[fe("198.19.0.10", 80, Protocol::Tcp, &[("198.18.1.9", 80)])],
        )
        .unwrap_err();
    assert!(matches!(err, DataplaneError::Conflict { .. }), "{err}");
    assert_eq!(
        observed(w.maps()),
        expected(&BTreeMap::from([(sid("a"), a)]))
    );
}

fn arb_frontends() -> impl Strategy<Value = Vec<Frontend>> {
    // Few addresses so services share backends and frontends move around.
    // Like the model's output: one entry per backend address and port, and a
    // backend's state is the endpoint's (the same in every service): here
    // hosts 4 and 5 are terminating.
    let backends =
        prop::collection::btree_set((0u8..6, prop::sample::select(vec![80u16, 8080])), 0..6);
    let frontend = (
        0u8..3,
        prop::sample::select(vec![Protocol::Tcp, Protocol::Udp]),
        backends,
        prop::sample::select(vec![None, Some(10), Some(10_800)]),
        any::<bool>(),
        any::<bool>(),
        prop::collection::btree_set(prop::sample::select(vec![15u8, 16, 24]), 0..3),
        prop::collection::btree_set((0u8..6, prop::sample::select(vec![80u16, 8080])), 0..3),
    )
        .prop_map(
            |(h, protocol, backends, affinity_timeout, drop, external, ranges, draining)| {
                // As the model: external frontends only, none a backend.
                let draining: Vec<(u8, u16)> = draining
                    .into_iter()
                    .filter(|d| external && !backends.contains(d))
                    .collect();
                Frontend {
                    key: FrontendKey {
                        addr: IpAddr::from([198, 19, 0, h]),
                        port: 80,
                        protocol,
                        scope: if external {
                            Scope::External
                        } else {
                            Scope::Socket
                        },
                    },
                    source_ranges: if external {
                        ranges
                            .into_iter()
                            .map(|prefix| Cidr {
                                addr: IpAddr::from([198, 18, 0, 0]),
                                prefix,
                            })
                            .collect()
                    } else {
                        Vec::new()
                    },
                    kind: if h == 2 {
                        FrontendKind::ExternalIp
                    } else {
                        FrontendKind::ClusterIp
                    },
                    backends: backends
                        .into_iter()
                        .map(|(b, port)| Backend {
                            addr: IpAddr::from([198, 18, 1, b]),
                            port,
                            terminating: b >= 4,
                            local: b % 2 == 0,
                        })
                        .collect(),
                    when_empty: if drop {
                        WhenEmpty::Drop
                    } else {
                        WhenEmpty::Refuse
                    },
                    affinity_timeout,
                    draining: draining
                        .into_iter()
                        .map(|(b, port)| Backend {
                            addr: IpAddr::from([198, 18, 1, b]),
                            port,
                            terminating: b >= 4,
                            local: b % 2 == 0,
                        })
                        .collect(),
                    port_name: String::new(),
                }
            },
        );
    prop::collection::vec(frontend, 0..4).prop_map(|mut v| {
        v.sort_by_key(|f| f.key);
        v.dedup_by_key(|f| f.key);
        v
    })
}

proptest! {
    /// Any sequence of updates: readers never see a missing slot or backend
    /// (checked after every map operation), the maps end up exactly as
    /// desired with no garbage, and a restart adopts them without writes.
    #[test]
    fn any_update_sequence_is_consistent(steps in prop::collection::vec((0usize..3, arb_frontends(), any::<bool>()), 1..12)) {
        let mut w = writer();
        let mut desired: BTreeMap<ServiceId, Vec<Frontend>> = BTreeMap::new();
        // Flushes come after some updates only: entries waiting for a flush
        // may become live again before it.
        for (svc, frontends, flush) in steps {
            let id = sid(&format!("s{svc}"));
            // Keys owned by another service are conflicts, which the writer skips.
            let owned_elsewhere: BTreeSet<FrontendKey> =
                desired.iter().filter(|(o, _)| **o != id).flat_map(|(_, fs)| fs.iter().map(|f| f.key)).collect();
            let conflict = frontends.iter().any(|f| owned_elsewhere.contains(&f.key));
            let result = w.apply(&id, &frontends);
            prop_assert_eq!(result.is_err(), conflict);
            let kept: Vec<Frontend> = frontends.into_iter().filter(|f| !owned_elsewhere.contains(&f.key)).collect();
            desired.insert(id, kept);
            prop_assert_eq!(observed(w.maps()), expected(&desired));
            if flush {
                w.flush().unwrap();
                assert_no_garbage(w.maps());
                prop_assert_eq!(draining(w.maps()), expected_draining(&desired));
            }
        }
        w.flush().unwrap();
        assert_no_garbage(w.maps());
        prop_assert_eq!(draining(w.maps()), expected_draining(&desired));
        let maps = w.maps().clone();
        let mut restarted = adopt(maps);
        let ops = restarted.maps().ops;
        for (id, fs) in &desired {
            restarted.apply(id, fs).unwrap();
        }
        prop_assert_eq!(restarted.maps().ops, ops);
    }
}

/// Lets a test keep the maps when a `Writer::adopt` over them fails.
impl<M: MapOps> MapOps for &mut M {
    fn put_service(
        &mut self,
        key: &ServiceKey,
        value: &ServiceValue,
    ) -> Result<(), DataplaneError> {
        (**self).put_service(key, value)
    }
    fn del_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        (**self).del_service(key)
    }
    fn put_backend(&mut self, id: u32, backend: &AbiBackend) -> Result<(), DataplaneError> {
        (**self).put_backend(id, backend)
    }
    fn del_backend(&mut self, id: u32) -> Result<(), DataplaneError> {
        (**self).del_backend(id)
    }
    fn put_rev_nat(&mut self, id: u32, rev_nat: &RevNat) -> Result<(), DataplaneError> {
        (**self).put_rev_nat(id, rev_nat)
    }
    fn del_rev_nat(&mut self, id: u32) -> Result<(), DataplaneError> {
        (**self).del_rev_nat(id)
    }
    fn put_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<(), DataplaneError> {
        (**self).put_affinity_match(key)
    }
    fn del_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<(), DataplaneError> {
        (**self).del_affinity_match(key)
    }
    fn put_maglev(&mut self, key: &MaglevKey, chunk: &MaglevChunk) -> Result<(), DataplaneError> {
        (**self).put_maglev(key, chunk)
    }
    fn del_maglev(&mut self, key: &MaglevKey) -> Result<(), DataplaneError> {
        (**self).del_maglev(key)
    }
    fn put_source_range(&mut self, key: &SourceRange) -> Result<(), DataplaneError> {
        (**self).put_source_range(key)
    }
    fn del_source_range(&mut self, key: &SourceRange) -> Result<(), DataplaneError> {
        (**self).del_source_range(key)
    }
    fn barrier(&mut self) -> Result<(), DataplaneError> {
        (**self).barrier()
    }
    fn read_all(&self) -> Result<MapContents, DataplaneError> {
        (**self).read_all()
    }
    fn read_maglev(&self, key: &MaglevKey) -> Result<Option<MaglevChunk>, DataplaneError> {
        (**self).read_maglev(key)
    }
}

/// Maps whose operation number `fail_at` (counting every `MapOps` call from
/// 0, reads and barriers included) fails once, before it changes anything,
/// as a failed syscall does.
struct FaultyMaps<M: MapOps> {
    inner: M,
    calls: std::cell::Cell<usize>,
    fail_at: Option<usize>,
}

impl<M: MapOps> FaultyMaps<M> {
    fn new(inner: M, fail_at: Option<usize>) -> Self {
        FaultyMaps {
            inner,
            calls: std::cell::Cell::new(0),
            fail_at,
        }
    }

    fn call(&self, map: &'static str, op: &'static str) -> Result<(), DataplaneError> {
        let n = self.calls.get();
        self.calls.set(n + 1);
        if self.fail_at == Some(n) {
            return Err(DataplaneError::Map {
                map,
                op,
                source: aya::maps::MapError::KeyNotFound,
            });
        }
        Ok(())
    }
}

impl<M: MapOps> MapOps for FaultyMaps<M> {
    fn put_service(
        &mut self,
        key: &ServiceKey,
        value: &ServiceValue,
    ) -> Result<(), DataplaneError> {
        self.call(maps::SERVICES, "update")?;
        self.inner.put_service(key, value)
    }
    fn del_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        self.call(maps::SERVICES, "delete")?;
        self.inner.del_service(key)
    }
    fn put_backend(&mut self, id: u32, backend: &AbiBackend) -> Result<(), DataplaneError> {
        self.call(maps::BACKENDS, "update")?;
        self.inner.put_backend(id, backend)
    }
    fn del_backend(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.call(maps::BACKENDS, "delete")?;
        self.inner.del_backend(id)
    }
    fn put_rev_nat(&mut self, id: u32, rev_nat: &RevNat) -> Result<(), DataplaneError> {
        self.call(maps::REV_NAT, "update")?;
        self.inner.put_rev_nat(id, rev_nat)
    }
    fn del_rev_nat(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.call(maps::REV_NAT, "delete")?;
        self.inner.del_rev_nat(id)
    }
    fn put_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<(), DataplaneError> {
        self.call(maps::AFFINITY_MATCH, "update")?;
        self.inner.put_affinity_match(key)
    }
    fn del_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<(), DataplaneError> {
        self.call(maps::AFFINITY_MATCH, "delete")?;
        self.inner.del_affinity_match(key)
    }
    fn put_maglev(&mut self, key: &MaglevKey, chunk: &MaglevChunk) -> Result<(), DataplaneError> {
        self.call(maps::MAGLEV, "update")?;
        self.inner.put_maglev(key, chunk)
    }
    fn del_maglev(&mut self, key: &MaglevKey) -> Result<(), DataplaneError> {
        self.call(maps::MAGLEV, "delete")?;
        self.inner.del_maglev(key)
    }
    fn put_source_range(&mut self, key: &SourceRange) -> Result<(), DataplaneError> {
        self.call(maps::SOURCE_RANGES, "update")?;
        self.inner.put_source_range(key)
    }
    fn del_source_range(&mut self, key: &SourceRange) -> Result<(), DataplaneError> {
        self.call(maps::SOURCE_RANGES, "delete")?;
        self.inner.del_source_range(key)
    }
    fn barrier(&mut self) -> Result<(), DataplaneError> {
        if self.fail_at == Some(self.calls.get()) {
            self.calls.set(self.calls.get() + 1);
            return Err(DataplaneError::Barrier(std::io::Error::other("injected")));
        }
        self.calls.set(self.calls.get() + 1);
        self.inner.barrier()
    }
    fn read_all(&self) -> Result<MapContents, DataplaneError> {
        self.call("all maps", "read")?;
        self.inner.read_all()
    }
    fn read_maglev(&self, key: &MaglevKey) -> Result<Option<MaglevChunk>, DataplaneError> {
        self.inner.read_maglev(key)
    }
}

/// The maps hold exactly `desired`, nothing else, and the writer's counts
/// are what the maps hold.
fn assert_exact<M: MapOps>(w: &Writer<FaultyMaps<M>>, m: &FakeMaps, desired: &Desired) {
    assert_eq!(observed(m), expected(desired));
    assert_no_garbage(m);
    assert_eq!(draining(m), expected_draining(desired), "draining backends");
    assert_eq!(
        w.usage(),
        (m.services.len(), m.backends.len()),
        "entries counted in use"
    );
    assert_eq!(w.maglev_chunks, m.maglev.len(), "Maglev chunks counted");
}

type Desired = BTreeMap<ServiceId, Vec<Frontend>>;
type Steps = Vec<(usize, Vec<Frontend>, bool)>;

/// Update sequences where each service has its own frontend addresses (so no
/// conflicts, whose outcome depends on which apply went first) and shares
/// backends with the others.
fn arb_steps_without_conflicts() -> impl Strategy<Value = Steps> {
    prop::collection::vec((0usize..3, arb_frontends(), any::<bool>()), 1..8).prop_map(|steps| {
        steps
            .into_iter()
            .map(|(svc, mut frontends, flush)| {
                for f in &mut frontends {
                    if let IpAddr::V4(a) = f.key.addr {
                        let [x, y, _, h] = a.octets();
                        f.key.addr = IpAddr::from([x, y, svc as u8, h]);
                    }
                }
                (svc, frontends, flush)
            })
            .collect()
    })
}

/// Applies and flushes as the steps say, ignoring failures; returns the last
/// desired state of every service.
fn run(w: &mut Writer<FaultyMaps<FakeMaps>>, steps: &Steps) -> Desired {
    let mut desired = BTreeMap::new();
    for (svc, frontends, flush) in steps {
        let id = sid(&format!("s{svc}"));
        let _ = w.apply(&id, frontends);
        desired.insert(id, frontends.clone());
        if *flush {
            let _ = w.flush();
        }
    }
    desired
}

/// At most `n` fault positions out of `total`, spread evenly, shifted by
/// `offset` so that different cases cover different ones.
fn fault_positions(total: usize, n: usize, offset: usize) -> Vec<usize> {
    if total <= n {
        return (0..total).collect();
    }
    let step = total / n;
    (0..n).map(|i| i * step + offset % step).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    /// Whichever single map operation fails: readers never see a missing
    /// slot, backend or Maglev chunk (checked after every operation), and
    /// once faults stop, applying every service's last desired state again
    /// leaves the maps exactly as desired, with nothing leaked and the
    /// writer's counts equal to what the maps hold.
    #[test]
    fn any_single_failed_map_operation_is_recovered(
        steps in arb_steps_without_conflicts(),
        offset in any::<usize>(),
    ) {
        let mut clean = Writer::adopt(FaultyMaps::new(FakeMaps::default(), None), Capacity::default()).unwrap();
        clean.set_maglev_size(TABLE_SIZE);
        let start = clean.maps().calls.get();
        run(&mut clean, &steps);
        let total = clean.maps().calls.get() - start;
        for k in fault_positions(total, 40, offset) {
            let mut w = Writer::adopt(FaultyMaps::new(FakeMaps::default(), Some(start + k)), Capacity::default()).unwrap();
            w.set_maglev_size(TABLE_SIZE);
            let desired = run(&mut w, &steps);
            for (id, frontends) in &desired {
                w.apply(id, frontends).unwrap();
            }
            w.flush().unwrap();
            assert_exact(&w, &w.maps().inner, &desired);
        }
    }
}

/// A restarted agent whose adopt, apply, prune or flush hits a failed map
/// operation (any one of them) gets to the desired state by retrying.
#[test]
fn restart_survives_a_fault_at_any_operation() {
    let external = |ip: &str, backends: &[(&str, u16)]| {
        let mut f = fe(ip, 80, Protocol::Tcp, backends);
        f.key.scope = Scope::External;
        f.affinity_timeout = Some(10_800);
        f.source_ranges = vec![Cidr {
            addr: IpAddr::from([198, 18, 0, 0]),
            prefix: 16,
        }];
        f
    };
    let a_old = vec![
        fe(
            "198.19.0.1",
            80,
            Protocol::Tcp,
            &[("198.18.1.1", 80), ("198.18.1.2", 80)],
        ),
        external("198.19.0.1", &[("198.18.1.1", 80), ("198.18.1.2", 80)]),
    ];
    let mut a_new = vec![
        fe(
            "198.19.0.1",
            80,
            Protocol::Tcp,
            &[("198.18.1.2", 80), ("198.18.1.3", 80)],
        ),
        external("198.19.0.1", &[("198.18.1.3", 80)]),
    ];
    // The external frontend drains a backend only the pruned service named.
    a_new[1].draining = fe("198.19.0.1", 80, Protocol::Tcp, &[("198.18.1.4", 80)]).backends;
    let b = vec![external(
        "198.19.0.2",
        &[("198.18.1.1", 80), ("198.18.1.4", 80)],
    )];
    let mut before = writer();
    before.apply(&sid("a"), &a_old).unwrap();
    before.apply(&sid("b"), &b).unwrap();
    before.flush().unwrap();
    let left = before.maps().clone();

    let restart = |m: &mut FakeMaps, fail_at: Option<usize>| -> usize {
        let mut w = match Writer::adopt(FaultyMaps::new(&mut *m, fail_at), Capacity::default()) {
            Ok(w) => w,
            // The maps keep what the failed adopt did; adopt them again.
            Err(_) => Writer::adopt(FaultyMaps::new(&mut *m, None), Capacity::default()).unwrap(),
        };
        w.set_maglev_size(TABLE_SIZE);
        let a = sid("a");
        w.apply(&a, &a_new)
            .or_else(|_| w.apply(&a, &a_new))
            .unwrap();
        w.prune_unclaimed()
            .or_else(|_| w.prune_unclaimed())
            .unwrap();
        w.flush().or_else(|_| w.flush()).unwrap();
        let calls = w.maps().calls.get();
        let desired = BTreeMap::from([(a, a_new.clone())]);
        assert_exact(&w, w.maps().inner, &desired);
        calls
    };
    let total = restart(&mut left.clone(), None);
    assert!(total > 20, "the restart does some work: {total} operations");
    for k in 0..total {
        restart(&mut left.clone(), Some(k));
    }
}

/// An update of an external frontend fails at any operation, for instance
/// after overwriting a slot in place but before slot 0: the live Maglev table
/// still names the old backends, which must outlive the rebuild, and the
/// retry must replace that table even if the slots are already right.
#[test]
fn a_failed_update_keeps_the_backends_of_the_live_maglev_table() {
    let external = |backends: &[(&str, u16)]| {
        let mut f = fe("198.19.0.1", 80, Protocol::Tcp, backends);
        f.key.scope = Scope::External;
        f.affinity_timeout = Some(10);
        vec![f]
    };
    let a = sid("a");
    let old = external(&[("198.18.1.1", 80), ("198.18.1.2", 80)]);
    let new = external(&[("198.18.1.3", 80), ("198.18.1.4", 80)]);
    let update = |fail_after: Option<usize>| {
        let mut w = Writer::adopt(
            FaultyMaps::new(FakeMaps::default(), None),
            Capacity::default(),
        )
        .unwrap();
        w.set_maglev_size(TABLE_SIZE);
        w.apply(&a, &old).unwrap();
        w.flush().unwrap();
        let start = w.maps().calls.get();
        w.maps.fail_at = fail_after.map(|k| start + k);
        let failed = w.apply(&a, &new).is_err();
        // The rebuild (and its deletions) run before the next operation.
        let _ = w.flush();
        w.apply(&a, &new).unwrap();
        w.flush().unwrap();
        assert_exact(
            &w,
            &w.maps().inner,
            &BTreeMap::from([(a.clone(), new.clone())]),
        );
        (failed, w.maps().calls.get() - start)
    };
    let (_, total) = update(None);
    for k in 0..total {
        update(Some(k));
    }
    // Two backend writes, slot 1, then slot 2.
    assert!(update(Some(3)).0, "the update itself failed");
}

// Drift: the maps changed behind the writer's back.

/// Change the maps as another program (or a person with bpftool) might:
/// `what` picks the kind of change, `at` the entry.
fn corrupt(m: &mut FakeMaps, what: usize, at: prop::sample::Index) {
    fn pick<T: Clone>(v: Vec<T>, at: prop::sample::Index) -> Option<T> {
        (!v.is_empty()).then(|| v[at.index(v.len())].clone())
    }
    let mut slot_zeros: Vec<ServiceKey> =
        m.services.keys().filter(|k| k.slot == 0).copied().collect();
    slot_zeros.sort_by_key(|k| (k.addr, k.port, k.proto, k.scope));
    let mut slots: Vec<ServiceKey> = m.services.keys().filter(|k| k.slot != 0).copied().collect();
    slots.sort_by_key(|k| (k.addr, k.port, k.proto, k.scope, k.slot));
    let mut backends: Vec<u32> = m.backends.keys().copied().collect();
    backends.sort_unstable();
    let mut rev_nats: Vec<u32> = m.rev_nat.keys().copied().collect();
    rev_nats.sort_unstable();
    let mut chunks: Vec<MaglevKey> = m.maglev.keys().copied().collect();
    chunks.sort_unstable();
    match what {
        0 => pick(slots, at).map(|k| m.services.remove(&k)).map(drop),
        1 => pick(slot_zeros, at)
            .map(|k| m.services.remove(&k))
            .map(drop),
        2 => pick(backends, at).map(|id| m.backends.get_mut(&id).unwrap().port ^= 1),
        4 => pick(backends, at)
            .map(|id| m.backends.remove(&id))
            .map(drop),
        5 => pick(rev_nats, at).map(|id| m.rev_nat.remove(&id)).map(drop),
        6 => pick(rev_nats, at).map(|id| m.rev_nat.get_mut(&id).unwrap().port ^= 1),
        7 => pick(chunks, at).map(|k| m.maglev.remove(&k)).map(drop),
        8 => pick(chunks, at).map(|k| {
            let chunk = m.maglev.get_mut(&k).unwrap();
            let i = at.index(MAGLEV_CHUNK as usize);
            chunk.backend_ids[i] = chunk.backend_ids[i].wrapping_add(1);
        }),
        9 => {
            let fk = FrontendKey::new("198.19.9.9".parse().unwrap(), 99, Protocol::Tcp);
            let record = FrontendRecord {
                count: 0,
                rev_nat_id: 4242,
                settings: Settings {
                    flags: 0,
                    affinity_timeout: 0,
                },
                table: None,
            };
            m.services.insert(service_key(&fk, 0), record.to_abi());
            Some(())
        }
        10 => {
            let addr = (IpAddr::from([198, 18, 9, 9]), 80, Protocol::Tcp, false);
            m.backends.insert(99_999, backend_to_abi(&addr, 0));
            Some(())
        }
        11 => pick(m.source_ranges.iter().copied().collect(), at)
            .map(|r| m.source_ranges.remove(&r))
            .map(drop),
        12 => pick(rev_nats, at).map(|rev_nat_id| {
            let c = Cidr {
                addr: IpAddr::from([203, 0, 113, 0]),
                prefix: 24,
            };
            m.source_ranges.insert(SourceRange::of(rev_nat_id, &c));
        }),
        13 => pick(m.affinity_match.iter().copied().collect(), at)
            .map(|k| m.affinity_match.remove(&k))
            .map(drop),
        14 => pick(slot_zeros, at)
            .map(|k| m.services.get_mut(&k).unwrap().flags ^= svclb_common::SVC_FLAG_DROP_EMPTY),
        15 => pick(slot_zeros, at).map(|k| {
            let v = m.services.get_mut(&k).unwrap();
            v.count = if at.index(2) == 0 {
                v.count.saturating_sub(1)
            } else {
                v.count + 1
            };
        }),
        _ => unreachable!(),
    };
    // Readers start over from what is there now: the check after each
    // writer operation covers what the writer writes from here.
    m.reader_counts.clear();
    m.reader_tables.clear();
}

/// Everything in the maps, for telling whether a corruption changed anything.
fn raw(m: &FakeMaps) -> String {
    let mut services: Vec<_> = m
        .services
        .iter()
        .map(|(k, v)| format!("{k:?}={v:?}"))
        .collect();
    services.sort();
    let mut backends: Vec<_> = m
        .backends
        .iter()
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect();
    backends.sort();
    let mut rev_nat: Vec<_> = m
        .rev_nat
        .iter()
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect();
    rev_nat.sort();
    let mut maglev: Vec<_> = m
        .maglev
        .iter()
        .map(|(k, v)| format!("{k:?}={:?}", &v.backend_ids[..]))
        .collect();
    maglev.sort();
    format!(
        "{services:?}{backends:?}{rev_nat:?}{:?}{maglev:?}{:?}",
        m.affinity_match, m.source_ranges
    )
}

fn drift(
    w: &Writer<FakeMaps>,
    desired: &BTreeMap<ServiceId, Vec<Frontend>>,
) -> Vec<super::super::drift::Difference> {
    use super::super::drift;
    let wanted: drift::Wanted = desired
        .iter()
        .map(|(id, fs)| (id.clone(), std::sync::Arc::new(fs.clone())))
        .collect();
    let observed = drift::Observed::read(w.maps()).unwrap();
    drift::differences(&drift::wanted_frontends(&wanted), &observed)
}

proptest! {
    /// Whatever is changed in the maps behind the writer's back is reported
    /// as a difference, and distrusting the bookkeeping, applying every
    /// service again and pruning (what the agent's periodic check does)
    /// brings the maps back to exactly the desired state, with no garbage.
    #[test]
    fn any_drift_is_reported_and_repaired(
        services in prop::collection::vec(arb_frontends(), 1..4),
        corruptions in prop::collection::vec((0usize..16, any::<prop::sample::Index>()).prop_filter("state is not compared", |(w, _)| *w != 3), 1..4),
    ) {
        let mut w = writer();
        let mut desired: BTreeMap<ServiceId, Vec<Frontend>> = BTreeMap::new();
        for (i, frontends) in services.into_iter().enumerate() {
            let taken: BTreeSet<FrontendKey> = desired.values().flatten().map(|f| f.key).collect();
            let kept: Vec<Frontend> = frontends.into_iter().filter(|f| !taken.contains(&f.key)).collect();
            let id = sid(&format!("s{i}"));
            w.apply(&id, &kept).unwrap();
            desired.insert(id, kept);
        }
        w.flush().unwrap();
        prop_assert_eq!(drift(&w, &desired), vec![]);

        let before = raw(w.maps());
        for (what, at) in corruptions {
            corrupt(&mut w.maps, what, at);
        }
        let found = drift(&w, &desired);
        if raw(w.maps()) != before {
            prop_assert!(!found.is_empty(), "a change went unreported");
        }

        let tables: Vec<FrontendKey> = found.iter().filter_map(|d| d.distrusts_table()).collect();
        w.distrust(&tables);
        for (id, fs) in &desired {
            w.apply(id, fs).unwrap();
        }
        w.flush().unwrap();
        w.prune_unclaimed().unwrap();
        prop_assert_eq!(drift(&w, &desired), vec![]);
        prop_assert_eq!(observed(w.maps()), expected(&desired));
        assert_no_garbage(w.maps());
        prop_assert_eq!(draining(w.maps()), expected_draining(&desired));
    }
}

/// A table is sized from its frontend's backend count: when the count
/// crosses a size, the new table (of the new size) goes in the other
/// generation and the old one is deleted after the barrier, as for any
/// change.
#[test]
fn a_table_changes_size_with_its_backend_count() {
    let mut w = Writer::adopt(FakeMaps::default(), Capacity::default()).unwrap();
    w.set_maglev_size(maglev::DEFAULT_TABLE_SIZE);
    let a = sid("a");
    let external = |n: usize| {
        let addrs: Vec<String> = (1..=n).map(|i| format!("198.18.1.{i}")).collect();
        let backends: Vec<(&str, u16)> = addrs.iter().map(|a| (a.as_str(), 80)).collect();
        let mut f = fe("198.19.0.1", 80, Protocol::Tcp, &backends);
        f.key.scope = Scope::External;
        vec![f]
    };
    let table = |w: &Writer<FakeMaps>| {
        let (_, v) = w
            .maps()
            .services
            .iter()
            .find(|(k, _)| k.slot == 0)
            .expect("slot 0");
        (v.maglev_generation, v.maglev_size)
    };
    let mut last = None;
    for (n, size) in [(3, 997), (10, 1999), (9, 997), (200, 16381)] {
        w.apply(&a, &external(n)).unwrap();
        let (generation, got) = table(&w);
        assert_eq!(got, size, "{n} backends");
        if let Some(g) = last {
            assert_ne!(
                generation, g,
                "{n} backends: a new table in the other generation"
            );
        }
        last = Some(generation);
        w.flush().unwrap();
        assert_eq!(
            observed(w.maps()),
            expected(&BTreeMap::from([(a.clone(), external(n))]))
        );
        assert_no_garbage(w.maps());
    }
}
