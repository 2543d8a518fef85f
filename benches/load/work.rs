//! The per-request pure work of a live-session read, timed in-process with
//! the library's public API: verify the cookie, check the stored record
//! (`StoredSession::decode`: flag, braces, printable ASCII; no JSON
//! parsing), take the `X-Session` header from it (a slice of the stored
//! bytes, no encoding). Store I/O, HTTP and sealing are not in it.
//! `benches/micro.rs` measures the pieces with criterion; this quick copy
//! lets the load bench print the target (1 KiB: < 1.5 µs) next to the
//! others.

#[path = "../common/data.rs"]
mod data;

use data::record_of;
use session_gateway::session::{CookieVerifier, SessionId, StoredSession};
use std::hint::black_box;
use std::time::Instant;

/// Median nanoseconds of verify + check + header of a `bytes` session.
pub fn read_work_ns(bytes: usize) -> f64 {
    let verifier = CookieVerifier::new(
        &[b"bench-secret-key-0123456789abcdef-0123456789".to_vec()],
        32,
    );
    let cookie = verifier.sign(&SessionId::generate(32));
    let stored = record_of(bytes).encode();
    let once = || {
        let id = verifier
            .verify(black_box(&cookie))
            .expect("own cookie verifies");
        let record = StoredSession::decode(black_box(stored.clone())).expect("decodes");
        black_box(id);
        black_box(record.header())
    };
    for _ in 0..2_000 {
        once();
    }
    let mut samples: Vec<f64> = (0..15)
        .map(|_| {
            let n = 2_000;
            let t = Instant::now();
            for _ in 0..n {
                once();
            }
            t.elapsed().as_nanos() as f64 / n as f64
        })
        .collect();
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}
