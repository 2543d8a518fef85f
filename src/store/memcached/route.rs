//! Which server holds a key: rendezvous (highest random weight) hashing
//! over the configured `host:port` strings.
//!
//! Every key scores every server and goes to the highest score, so adding
//! a server moves only the keys the new server wins (about 1/n of them)
//! and removing one moves only its own keys; the order of the list does
//! not matter. The hash is fixed here (FNV-1a, then the SplitMix64
//! finalizer), not `std`'s `DefaultHasher`, whose algorithm may change
//! between Rust releases: gateways built with different toolchains must
//! agree on where a session lives.

/// Picks a server index for a key.
#[derive(Clone, Debug)]
pub struct Rendezvous {
    /// One mixed hash per configured server identity.
    seeds: Vec<u64>,
}

impl Rendezvous {
    /// Route over these server identities (the addresses as configured).
    pub fn new<S: AsRef<str>>(servers: &[S]) -> Rendezvous {
        Rendezvous {
            seeds: servers
                .iter()
                .map(|s| mix(fnv1a(s.as_ref().as_bytes())))
                .collect(),
        }
    }

    /// The index of the server that holds `key`.
    pub fn route(&self, key: &[u8]) -> usize {
        let key_hash = mix(fnv1a(key));
        let mut best = (0, 0u64);
        for (i, seed) in self.seeds.iter().enumerate() {
            let score = mix(key_hash ^ seed);
            // Ties (astronomically rare) go to the earlier server.
            if i == 0 || score > best.1 {
                best = (i, score);
            }
        }
        best.0
    }
}

/// 64-bit FNV-1a.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The SplitMix64 finalizer: spreads FNV's weak low bits over the word,
/// so scores of similar keys and similar addresses are unrelated.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{}:11211", i + 1)).collect()
    }

    fn keys() -> impl Iterator<Item = String> {
        (0..10_000).map(|i| format!("session:{i:043}"))
    }

    #[test]
    fn the_hash_is_fixed() {
        // Published FNV-1a test vectors: a change of the function (and so
        // of every session's server) fails here, not in production.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
        // And fixed keys stay on fixed servers for a fixed list.
        let r = Rendezvous::new(&["127.0.0.1:11211", "127.0.0.1:11212", "127.0.0.1:11213"]);
        let placed: Vec<usize> = ["session:a", "session:b", "session:c", "session:d", "x"]
            .iter()
            .map(|k| r.route(k.as_bytes()))
            .collect();
        assert_eq!(placed, GOLDEN);
    }

    /// Computed once with this implementation; see `the_hash_is_fixed`.
    const GOLDEN: [usize; 5] = [0, 0, 2, 1, 2];

    #[test]
    fn keys_spread_evenly() {
        let r = Rendezvous::new(&servers(4));
        let mut counts = [0usize; 4];
        for k in keys() {
            counts[r.route(k.as_bytes())] += 1;
        }
        for c in counts {
            assert!((2_200..=2_800).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn adding_a_server_moves_about_one_in_n_keys_only_to_it() {
        let four = Rendezvous::new(&servers(4));
        let five = Rendezvous::new(&servers(5));
        let mut moved = 0;
        for k in keys() {
            let (before, after) = (four.route(k.as_bytes()), five.route(k.as_bytes()));
            if before != after {
                assert_eq!(after, 4, "{k} moved between old servers");
                moved += 1;
            }
        }
        // 1/5 of 10 000.
        assert!((1_700..=2_300).contains(&moved), "{moved} keys moved");
    }

    #[test]
    fn removing_a_server_moves_only_its_keys() {
        let all = servers(4);
        let mut without = all.clone();
        without.remove(1);
        let (r4, r3) = (Rendezvous::new(&all), Rendezvous::new(&without));
        for k in keys() {
            let before = &all[r4.route(k.as_bytes())];
            let after = &without[r3.route(k.as_bytes())];
            if before != &all[1] {
                assert_eq!(before, after, "{k} moved off a live server");
            }
        }
    }

    #[test]
    fn list_order_does_not_matter() {
        let all = servers(5);
        let mut reversed = all.clone();
        reversed.reverse();
        let (a, b) = (Rendezvous::new(&all), Rendezvous::new(&reversed));
        for k in keys().take(1000) {
            assert_eq!(all[a.route(k.as_bytes())], reversed[b.route(k.as_bytes())]);
        }
        assert_eq!(Rendezvous::new(&["only:1"]).route(b"k"), 0);
    }
}
