//! The writer against in-memory maps that check, after every single map
//! operation, what a concurrent reader could observe.
use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use proptest::prelude::*;

use svclb_common::{BACKEND_TERMINATING, SVC_FLAG_AFFINITY};

use super::*;
use crate::dataplane::abi::addr_from_abi;
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
                for i in 0..size {
                    let key = MaglevKey {
                        rev_nat_id,
                        generation,
                        chunk: (i / MAGLEV_CHUNK) as u16,
                    };
                    let chunk = self.maglev.get(&key).unwrap_or_else(|| {
                        panic!(
                            "reader of {k:?} finds Maglev chunk {key:?} missing (op {})",
                            self.ops
                        )
                    });
                    let id = chunk.backend_ids[(i % MAGLEV_CHUNK) as usize];
                    assert!(
                        self.backends.contains_key(&id),
                        "Maglev entry {i} of {k:?} names missing backend {id} (op {})",
                        self.ops
                    );
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
    assert_eq!(
        referenced,
        m.backends.keys().copied().collect(),
        "unreferenced backends"
    );
    assert_eq!(
        rev_nats,
        m.rev_nat.keys().copied().collect(),
        "stale rev-NAT entries"
    );
    // Affinity members: exactly the backends of affinity frontends.
    let members: BTreeSet<AffinityMatchKey> = m
        .services
        .iter()
        .filter(|(k, _)| {
            k.slot != 0 && m.services[&FakeMaps::slot_key(k, 0)].flags & SVC_FLAG_AFFINITY != 0
        })
        .map(|(k, v)| AffinityMatchKey {
            rev_nat_id: m.services[&FakeMaps::slot_key(k, 0)].rev_nat_id,
            backend_id: v.backend_id,
        })
        .collect();
    assert_eq!(members, m.affinity_match, "affinity members");
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
    )
        .prop_map(
            |(h, protocol, backends, affinity_timeout, drop, external, ranges)| Frontend {
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
            }
        }
        w.flush().unwrap();
        assert_no_garbage(w.maps());
        let maps = w.maps().clone();
        let mut restarted = adopt(maps);
        let ops = restarted.maps().ops;
        for (id, fs) in &desired {
            restarted.apply(id, fs).unwrap();
        }
        prop_assert_eq!(restarted.maps().ops, ops);
    }
}
