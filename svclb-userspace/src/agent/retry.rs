//! What failed to reach the maps, and when to try it again: exponential
//! backoff, bounded and jittered, per item. Nothing is ever dropped; only
//! a success takes an item out. Pure (the caller passes the time), so the
//! tests drive it with a fake clock.
use std::collections::hash_map::RandomState;
use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

/// The delay after the first failure; it doubles with each further one.
pub const FIRST_DELAY: Duration = Duration::from_millis(100);
/// The longest delay between two attempts.
pub const MAX_DELAY: Duration = Duration::from_secs(30);
/// Each delay is scaled by a random factor in 1 ± JITTER, so that agents
/// (and items) that failed together do not retry in lockstep.
pub const JITTER: f64 = 0.2;

pub struct RetrySet<K> {
    items: BTreeMap<K, Attempt>,
    /// Random keys: hashing a counter with them gives the jitter.
    random: RandomState,
    draws: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Attempt {
    /// Failures in a row.
    failures: u32,
    next_try: Instant,
}

impl<K: Ord + Clone> Default for RetrySet<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Ord + Clone> RetrySet<K> {
    pub fn new() -> Self {
        RetrySet {
            items: BTreeMap::new(),
            random: RandomState::new(),
            draws: 0,
        }
    }

    /// `item` failed at `now`: try again after a backoff that grows with
    /// its failures in a row. Returns that delay.
    pub fn fail(&mut self, item: &K, now: Instant) -> Duration {
        let failures = self.items.get(item).map_or(0, |a| a.failures) + 1;
        let delay = self.jittered(backoff(failures));
        let next_try = now + delay;
        self.items
            .insert(item.clone(), Attempt { failures, next_try });
        delay
    }

    /// Whether `item` is waiting for a retry.
    pub fn contains(&self, item: &K) -> bool {
        self.items.contains_key(item)
    }

    /// `item` reached the maps: forget its failures.
    pub fn succeed(&mut self, item: &K) {
        self.items.remove(item);
    }

    /// The items whose next try is due at `now`.
    pub fn due(&self, now: Instant) -> Vec<K> {
        (self.items.iter())
            .filter(|(_, a)| a.next_try <= now)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The earliest next try, if anything is waiting.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.items.values().map(|a| a.next_try).min()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// `delay` scaled by a factor in [1 - JITTER, 1 + JITTER].
    fn jittered(&mut self, delay: Duration) -> Duration {
        self.draws += 1;
        let bits = self.random.hash_one(self.draws);
        let unit = (bits >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
        delay.mul_f64(1.0 - JITTER + 2.0 * JITTER * unit)
    }
}

/// The delay before the next try after `failures` failures in a row
/// (without jitter): FIRST_DELAY doubled per further failure, at most MAX_DELAY.
pub fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    FIRST_DELAY.saturating_mul(1 << doublings).min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within_jitter(delay: Duration, base: Duration) -> bool {
        delay >= base.mul_f64(1.0 - JITTER) && delay <= base.mul_f64(1.0 + JITTER)
    }

    #[test]
    fn backoff_doubles_up_to_the_bound() {
        let ms = |n| Duration::from_millis(n);
        assert_eq!(backoff(1), ms(100));
        assert_eq!(backoff(2), ms(200));
        assert_eq!(backoff(3), ms(400));
        assert_eq!(backoff(9), ms(25_600));
        assert_eq!(backoff(10), MAX_DELAY);
        assert_eq!(backoff(1_000), MAX_DELAY);
        assert_eq!(backoff(u32::MAX), MAX_DELAY);
    }

    #[test]
    fn failures_wait_longer_each_time_until_a_success() {
        let t0 = Instant::now();
        let mut set = RetrySet::new();
        assert_eq!(set.next_deadline(), None);

        let first = set.fail(&"a", t0);
        assert!(within_jitter(first, FIRST_DELAY), "{first:?}");
        assert_eq!(set.next_deadline(), Some(t0 + first));
        assert!(set.due(t0).is_empty(), "not before the backoff");
        assert_eq!(set.due(t0 + first), ["a"]);

        // Still failing: the next wait is about twice as long.
        let t1 = t0 + first;
        let second = set.fail(&"a", t1);
        assert!(within_jitter(second, backoff(2)), "{second:?}");
        assert!(set.due(t1 + first).is_empty());
        assert_eq!(set.due(t1 + second), ["a"]);

        // Kept however often it fails, never longer apart than the bound.
        let mut t = t1 + second;
        for _ in 0..40 {
            let d = set.fail(&"a", t);
            assert!(d <= MAX_DELAY.mul_f64(1.0 + JITTER), "{d:?}");
            t += d;
        }
        assert!(within_jitter(set.fail(&"a", t), MAX_DELAY));
        assert_eq!(set.len(), 1);

        // A success forgets it; a new failure starts from the first delay.
        set.succeed(&"a");
        assert!(set.is_empty() && set.due(t + MAX_DELAY * 2).is_empty());
        assert!(within_jitter(set.fail(&"a", t), FIRST_DELAY));
    }

    #[test]
    fn items_back_off_independently() {
        let t0 = Instant::now();
        let mut set = RetrySet::new();
        for _ in 0..5 {
            set.fail(&"old", t0);
        }
        let new = set.fail(&"new", t0);
        assert_eq!(set.len(), 2);
        assert_eq!(set.next_deadline(), Some(t0 + new));
        assert_eq!(set.due(t0 + new), ["new"]);
        assert_eq!(set.due(t0 + MAX_DELAY * 2), ["new", "old"]);
        set.succeed(&"new");
        assert_eq!(set.due(t0 + MAX_DELAY * 2), ["old"]);
    }

    #[test]
    fn jitter_spreads_retries() {
        let t0 = Instant::now();
        let mut set = RetrySet::new();
        let delays: std::collections::BTreeSet<Duration> = (0..20)
            .map(|i| {
                let d = set.fail(&i, t0);
                assert!(within_jitter(d, FIRST_DELAY), "{d:?}");
                d
            })
            .collect();
        assert!(delays.len() > 10, "{delays:?}");
    }
}
