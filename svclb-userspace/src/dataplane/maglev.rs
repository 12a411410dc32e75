//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table
//! of prime size M whose entries name backends, so that a packet's flow hash
//! mod M picks its backend.
//!
//! Two properties matter for a load balancer that runs on every node:
//! - every node must build the identical table from the same backend set,
//!   so a flow keeps its backend whichever node receives it. The hashes are
//!   therefore fixed functions defined here, never std's (randomly seeded)
//!   hashers, and the table depends only on the backends' order, which the
//!   caller makes canonical by sorting;
//! - a change of the set moves few flows: entries of backends that stay
//!   mostly keep their backend.

/// The largest table a frontend gets unless --maglev-table-size says
/// otherwise: a prime above 100 × 160 backends.
pub const DEFAULT_TABLE_SIZE: u32 = 16381;

/// The sizes a frontend's table is chosen from (see [`size_for`]): primes
/// that nearly fill whole 1000-entry chunks (`svclb_common::MAGLEV_CHUNK`;
/// a chunk costs its 4 KiB of kernel memory however few entries it holds),
/// and the default cap.
pub const TABLE_SIZES: [u32; 9] = [997, 1999, 2999, 4999, 9973, 16381, 32749, 65521, 131_071];
const MIN_TABLE_SIZE: u32 = 251;
const MAX_TABLE_SIZE: u32 = 131_071;

/// Seeds of the two hashes: the preferred first slot and the step.
const SEED_OFFSET: u64 = 0x6d61_676c_6576_0001;
const SEED_SKIP: u64 = 0x6d61_676c_6576_0002;

/// A table size must be prime (so that every backend's sequence of slots
/// visits the whole table) and in [251, 131071].
pub fn validate_table_size(m: u32) -> Result<(), String> {
    if !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&m) {
        return Err(format!(
            "Maglev table size {m} must be between {MIN_TABLE_SIZE} and {MAX_TABLE_SIZE}"
        ));
    }
    if !is_prime(m) {
        return Err(format!("Maglev table size {m} must be prime"));
    }
    Ok(())
}

/// The table size of a frontend with `backends` backends: the smallest of
/// [`TABLE_SIZES`] that is >= 100 × backends (so each backend's share is
/// within about 1% of the others'), at most `cap` (a valid table size).
/// A pure function of the backend count and the flag, so every node builds
/// the same table for the same backend set.
pub fn size_for(backends: usize, cap: u32) -> u32 {
    let want = backends.saturating_mul(100);
    let size = TABLE_SIZES
        .iter()
        .copied()
        .find(|&m| m as usize >= want)
        .unwrap_or(MAX_TABLE_SIZE);
    size.min(cap)
}

/// The Maglev table for `backends`: `size` entries, each an index into
/// `backends`. Empty when there are no backends.
///
/// `backends` are canonical byte names (e.g. address bytes followed by the
/// port) that the caller has sorted and de-duplicated: the result depends on
/// their order, so every node must pass the same set in the same order.
///
/// Panics when `size` fails [`validate_table_size`] or there are more than
/// 65536 backends (indices are u16); both are the caller's bugs.
pub fn table(backends: &[Vec<u8>], size: u32) -> Vec<u16> {
    if backends.is_empty() {
        return Vec::new();
    }
    if let Err(e) = validate_table_size(size) {
        panic!("{e}");
    }
    assert!(
        backends.len() <= usize::from(u16::MAX) + 1,
        "{} Maglev backends do not fit u16 indices",
        backends.len()
    );
    let m = size as usize;
    // Backend i prefers slots offset, offset + skip, offset + 2 skip, ...
    // (mod M): with M prime and 0 < skip < M that is a permutation of all
    // slots. `next` holds each backend's next slot to try.
    let mut next: Vec<usize> = Vec::with_capacity(backends.len());
    let mut skip: Vec<usize> = Vec::with_capacity(backends.len());
    for name in backends {
        next.push((hash(SEED_OFFSET, name) % size as u64) as usize);
        skip.push((hash(SEED_SKIP, name) % (size as u64 - 1)) as usize + 1);
    }
    // Backends take turns claiming their next free preferred slot until
    // the table is full, so shares differ by at most one entry.
    let mut entries: Vec<Option<u16>> = vec![None; m];
    let mut filled = 0;
    loop {
        for i in 0..backends.len() {
            while entries[next[i]].is_some() {
                next[i] = (next[i] + skip[i]) % m;
            }
            entries[next[i]] = Some(i as u16);
            filled += 1;
            if filled == m {
                return entries.into_iter().flatten().collect();
            }
        }
    }
}

/// FNV-1a 64 over the seed's bytes and then `bytes`, followed by murmur3's
/// fmix64 so that every input bit affects every output bit (plain FNV mixes
/// the last bytes poorly, and names often differ only in the port).
/// Defined here bit for bit: its values must never change.
fn hash(seed: u64, bytes: &[u8]) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    for &b in seed.to_le_bytes().iter().chain(bytes) {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Backend i as its caller would name it: IPv4 address bytes + port.
    fn name(i: u32) -> Vec<u8> {
        let mut n = vec![198, 18, (i >> 8) as u8, i as u8];
        n.extend_from_slice(&8080u16.to_be_bytes());
        n
    }

    fn names(range: std::ops::Range<u32>) -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = range.map(name).collect();
        v.sort();
        v
    }

    /// Each entry as the backend's name rather than its index, so tables
    /// over different sets compare.
    fn by_name(backends: &[Vec<u8>], size: u32) -> Vec<Vec<u8>> {
        let t = table(backends, size);
        t.iter()
            .map(|&i| backends[usize::from(i)].clone())
            .collect()
    }

    #[test]
    fn table_sizes() {
        for ok in [251, 16381, 65521, 131_071] {
            assert_eq!(validate_table_size(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            (0, "between"),
            (241, "between"),
            (131_101, "between"),
            (16383, "prime"),
            (256, "prime"),
        ] {
            let err = validate_table_size(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        assert_eq!(validate_table_size(DEFAULT_TABLE_SIZE), Ok(()));
    }

    #[test]
    fn sizes_follow_the_backend_count() {
        for m in TABLE_SIZES {
            assert_eq!(validate_table_size(m), Ok(()), "{m}");
        }
        let cap = DEFAULT_TABLE_SIZE;
        for (backends, want) in [
            (1, 997),
            (3, 997),
            (9, 997),
            (10, 1999),
            (29, 2999),
            (30, 4999),
        ] {
            assert_eq!(size_for(backends, cap), want, "{backends} backends");
        }
        // At most the flag: with more backends, or a smaller flag.
        assert_eq!(size_for(1000, cap), cap);
        assert_eq!(size_for(1000, 65521), 65521);
        assert_eq!(size_for(5000, MAX_TABLE_SIZE), MAX_TABLE_SIZE);
        assert_eq!(size_for(3, 251), 251);
    }

    /// Maglev's disruption bound at every size a table can get, with as
    /// many backends as that size is chosen for and with 3: removing a
    /// backend keeps the other backends' entries but a few per cent, and
    /// adding one moves its share, 1/(N+1), of the entries and at most 3%
    /// more (Maglev trades that for balance; 100 entries per backend
    /// measured 1.5-2.5% here).
    #[test]
    fn disruption_bound_at_every_size() {
        for m in TABLE_SIZES {
            let most = m / 100;
            for n in [3.min(most), most] {
                let all = names(0..n);
                let before = by_name(&all, m);
                let removed = &all[(n / 2) as usize];
                let rest: Vec<Vec<u8>> = all.iter().filter(|b| *b != removed).cloned().collect();
                let after = by_name(&rest, m);
                let survivors = before.iter().filter(|b| *b != removed).count();
                let kept = (before.iter().zip(&after))
                    .filter(|(b, a)| *b != removed && b == a)
                    .count() as f64
                    / survivors as f64;
                let grown = by_name(&names(0..n + 1), m);
                let moved =
                    before.iter().zip(&grown).filter(|(b, a)| b != a).count() as f64 / f64::from(m);
                let share = 1.0 / f64::from(n + 1);
                println!("M={m} N={n}: removal keeps {kept:.3}, addition moves {moved:.3} (share {share:.3})");
                assert!(kept >= 0.95, "M={m} N={n}: removal keeps only {kept:.3}");
                assert!(
                    moved <= share + 0.03,
                    "M={m} N={n}: addition moves {moved:.3}, share {share:.3}"
                );
            }
        }
    }

    #[test]
    fn no_backends_no_table() {
        assert!(table(&[], DEFAULT_TABLE_SIZE).is_empty());
    }

    #[test]
    fn every_backend_gets_its_share() {
        let m = DEFAULT_TABLE_SIZE;
        for n in [1u32, 2, 3, 10, 100] {
            let backends = names(0..n);
            let t = table(&backends, m);
            assert_eq!(t.len(), m as usize);
            let mut counts = vec![0usize; n as usize];
            for &i in &t {
                counts[usize::from(i)] += 1;
            }
            let share = f64::from(m) / f64::from(n);
            for (i, &c) in counts.iter().enumerate() {
                let c = c as f64;
                assert!(
                    (0.9 * share..=1.1 * share).contains(&c),
                    "N={n}: backend {i} has {c} entries, share {share:.1}"
                );
            }
        }
    }

    #[test]
    fn removing_a_backend_keeps_the_others_entries() {
        let m = DEFAULT_TABLE_SIZE;
        let all = names(0..10);
        let before = by_name(&all, m);
        for removed in &all {
            let rest: Vec<Vec<u8>> = all.iter().filter(|b| *b != removed).cloned().collect();
            let after = by_name(&rest, m);
            let survivors = before.iter().filter(|b| *b != removed).count();
            let kept = (before.iter().zip(&after))
                .filter(|(b, a)| *b != removed && b == a)
                .count();
            let kept = kept as f64 / survivors as f64;
            assert!(kept >= 0.97, "only {kept:.3} of surviving entries kept");
        }
    }

    #[test]
    fn adding_a_backend_moves_about_its_share() {
        let m = DEFAULT_TABLE_SIZE;
        let before = by_name(&names(0..10), m);
        let after = by_name(&names(0..11), m);
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        let moved = moved as f64 / f64::from(m);
        assert!(moved <= 1.0 / 11.0 + 0.03, "{moved:.3} of entries moved");
    }

    /// Pins the hash and the population order: if this fails, tables built
    /// by different svclb versions disagree, and flows move on upgrade.
    /// The values come from an independent implementation (a few lines of
    /// Python) of the same definitions.
    #[test]
    fn golden() {
        assert_eq!(hash(0, b""), 8922497616986557598);
        assert_eq!(hash(SEED_OFFSET, b"a"), 4599893466037833837);
        let backends = vec![
            vec![198, 18, 0, 1, 0x1f, 0x90],
            vec![198, 18, 0, 2, 0x1f, 0x90],
            vec![198, 18, 0, 3, 0x1f, 0x90],
        ];
        let t = table(&backends, DEFAULT_TABLE_SIZE);
        assert_eq!(t[..16], [2, 1, 2, 2, 1, 0, 1, 0, 2, 2, 1, 0, 2, 0, 2, 2]);
    }

    proptest! {
        #[test]
        fn a_pure_function_of_the_sorted_set(
            set in prop::collection::btree_set(prop::collection::vec(any::<u8>(), 0..20), 1..40),
            shuffle in any::<u64>(),
        ) {
            let sorted: Vec<Vec<u8>> = set.into_iter().collect();
            // The caller's job: any arrival order, sorted, gives one table.
            let mut shuffled = sorted.clone();
            let k = (shuffle as usize) % shuffled.len();
            shuffled.rotate_left(k);
            shuffled.reverse();
            shuffled.sort();
            let t = table(&sorted, 251);
            prop_assert_eq!(&t, &table(&shuffled, 251));
            // Shares differ by at most one entry.
            let mut counts = vec![0usize; sorted.len()];
            for &i in &t {
                counts[usize::from(i)] += 1;
            }
            let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            prop_assert!(hi - lo <= 1, "counts {:?}", counts);
        }
    }
}
