//! Pinned maps left by another svclb version (or configuration): the
//! loader checks each pinned map's type, key and value size, max entries
//! and flags against what this version creates, recreates the ones that
//! differ, unpins maps this version no longer has, and reuses the rest with
//! their entries. On the real kernel, in scratch bpffs directories.
//!
//! Needs root (BPF); skipped otherwise.
use std::path::{Path, PathBuf};

use aya::maps::{Array, MapData, MapInfo};
use aya_obj::generated::bpf_map_type::{BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_HASH};
use aya_obj::maps::{bpf_map_def, LegacyMap, PinningType};
use svclb_common::maps::{BACKENDS, CONNTRACK4, CONNTRACK6, REV_NAT, SERVICES, XDP_CONFIG};
use svclb_common::XdpConfig;
use svclb_userspace::dataplane::names::FRONTEND_NAMES;
use svclb_userspace::dataplane::{loader, map_path};

const CT_SIZE: u32 = 1024;

/// A scratch pin directory, removed on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new(tag: &str) -> Option<Self> {
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (BPF)");
            return None;
        }
        let dir = Path::new("/sys/fs/bpf").join(format!("svclb-pins-{tag}-{}", std::process::id()));
        loader::ensure_bpffs(&dir).expect("bpffs");
        Some(PinDir(dir))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn info(dir: &Path, name: &str) -> MapInfo {
    MapData::from_pin(map_path(dir, name))
        .and_then(|m| m.info())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn needed(name: &str) -> loader::MapLayout {
    let layouts = loader::pinned_layouts(CT_SIZE, false).expect("layouts");
    layouts.into_iter().find(|l| l.name == name).expect(name)
}

/// Pin a map as an older version might have: `layout` with changes.
fn pin(dir: &Path, name: &str, map_type: u32, key: u32, value: u32, entries: u32, flags: u32) {
    let def = aya_obj::Map::Legacy(LegacyMap {
        def: bpf_map_def {
            map_type,
            key_size: key,
            value_size: value,
            max_entries: entries,
            map_flags: flags,
            id: 0,
            pinning: PinningType::ByName,
        },
        inner_def: None,
        section_index: 0,
        section_kind: aya_obj::EbpfSectionKind::Maps,
        symbol_index: None,
        data: Vec::new(),
    });
    let map = MapData::create(def, name, None).expect("create");
    map.pin(map_path(dir, name)).expect("pin");
}

fn assert_layout(dir: &Path, name: &str) {
    let (have, want) = (info(dir, name), needed(name));
    assert_eq!(
        (
            have.key_size(),
            have.value_size(),
            have.max_entries(),
            have.map_flags() & !(1 << 7)
        ),
        (want.key_size, want.value_size, want.max_entries, want.flags),
        "{name}"
    );
}

#[test]
fn incompatible_pinned_maps_are_recreated() {
    let Some(dir) = PinDir::new("incompatible") else {
        return;
    };
    let dir = &dir.0;
    let backends = needed(BACKENDS);
    let xdp_config = needed(XDP_CONFIG);
    // BACKENDS with a smaller value (an older Backend struct), XDP_CONFIG
    // with more entries, and a map this version does not have.
    let hash = BPF_MAP_TYPE_HASH as u32;
    let array = BPF_MAP_TYPE_ARRAY as u32;
    pin(
        dir,
        BACKENDS,
        hash,
        4,
        backends.value_size - 4,
        backends.max_entries,
        backends.flags,
    );
    pin(dir, XDP_CONFIG, array, 4, xdp_config.value_size, 2, 0);
    pin(dir, "SVCLB_RETIRED", hash, 4, 4, 16, 1);
    // SERVICES fits, but its slots name backend ids of the old BACKENDS.
    let services = needed(SERVICES);
    pin(
        dir,
        SERVICES,
        services.map_type,
        services.key_size,
        services.value_size,
        services.max_entries,
        services.flags,
    );
    let old_services = info(dir, SERVICES).id();
    // The Service names (no program uses them), keyed by rev-NAT ids.
    pin(dir, FRONTEND_NAMES, hash, 4, 160, 65_536, 1);
    let old_names = info(dir, FRONTEND_NAMES).id();

    let loaded = loader::load_unattached(dir, CT_SIZE).expect("load over old pins");
    for name in [
        BACKENDS, XDP_CONFIG, SERVICES, REV_NAT, CONNTRACK4, CONNTRACK6,
    ] {
        assert_layout(dir, name);
    }
    assert_ne!(
        info(dir, SERVICES).id(),
        old_services,
        "{SERVICES} recreated with {BACKENDS}"
    );
    assert_ne!(
        info(dir, FRONTEND_NAMES).id(),
        old_names,
        "{FRONTEND_NAMES} recreated with {BACKENDS} (ids start over)"
    );
    assert!(
        !map_path(dir, "SVCLB_RETIRED").exists(),
        "a retired map's pin is removed"
    );
    drop(loaded);
}

#[test]
fn compatible_pinned_maps_are_reused_with_their_entries() {
    let Some(dir) = PinDir::new("compatible") else {
        return;
    };
    let dir = &dir.0;
    let first = loader::load_unattached(dir, CT_SIZE).expect("first load");
    let mut xdp_config = first.xdp_config;
    let config = XdpConfig {
        snat_port_min: 61000,
        snat_port_max: 65535,
        ..XdpConfig::default()
    };
    xdp_config.set(0, config, 0).expect("write XDP_CONFIG");
    let layouts = loader::pinned_layouts(CT_SIZE, false).expect("layouts");
    let ids: Vec<(String, u32)> = (layouts.iter())
        .map(|l| (l.name.clone(), info(dir, &l.name).id()))
        .collect();
    let names = info(dir, FRONTEND_NAMES).id();
    drop((first.ebpf, first.writer, xdp_config, first.tx_devices));

    // Same version, another --conntrack-size: only the conntrack maps change.
    let second = loader::load_unattached(dir, CT_SIZE * 2).expect("second load");
    let xdp_config: Array<MapData, XdpConfig> = second.xdp_config;
    assert_eq!(
        xdp_config.get(&0, 0).expect("read XDP_CONFIG"),
        config,
        "entries survive"
    );
    for (name, id) in &ids {
        let conntrack = [CONNTRACK4, CONNTRACK6].contains(&name.as_str());
        let now = info(dir, name).id();
        assert_eq!(
            now != *id,
            conntrack,
            "{name}: only the conntrack maps are recreated"
        );
    }
    assert_eq!(info(dir, CONNTRACK4).max_entries(), CT_SIZE * 2);
    assert_eq!(
        info(dir, FRONTEND_NAMES).id(),
        names,
        "{FRONTEND_NAMES}, pinned by userspace, is kept"
    );
}
