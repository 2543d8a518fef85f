//! `cargo bench --bench micro`: the per-request pure work of the gateway,
//! measured with criterion through the library's public API: cookie
//! verification and signing, the `Cookie` header scan, the session record's
//! encodings (stored form and `X-Session` header), parsing the upstream's
//! `X-Session-Patch`, RFC 7396 merge patch on a 1 KiB session, and the
//! combined work of a live-session read (verify + decode + encode), whose
//! target is under 5 µs for 1 KiB.

#[path = "common/data.rs"]
mod data;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use data::record_of;
use serde_json::{Map, Value};
use session_gateway::config::{CookieSettings, HeaderNames, SameSite};
use session_gateway::proxy::cookies;
use session_gateway::proxy::protocol::RawDirectives;
use session_gateway::session::{
    merge_patch, CookieVerifier, SessionId, SessionRecord, StoredSession,
};
use std::hint::black_box;
use std::time::Duration;

const KEY: &[u8] = b"bench-secret-key-0123456789abcdef-0123456789";
const SIZES: [usize; 3] = [100, 1024, 4096];

fn verifier(keys: usize) -> CookieVerifier {
    let keys: Vec<Vec<u8>> = (0..keys)
        .map(|i| {
            let mut k = KEY.to_vec();
            k.push(b'0' + i as u8);
            k
        })
        .collect();
    CookieVerifier::new(&keys, 32)
}

fn cookie_settings() -> CookieSettings {
    CookieSettings {
        name: "session".into(),
        domain: None,
        path: "/".into(),
        secure: true,
        http_only: true,
        same_site: SameSite::Lax,
    }
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => unreachable!("an object literal"),
    }
}

fn cookie(c: &mut Criterion) {
    let mut g = c.benchmark_group("cookie");
    let v = verifier(1);
    let id = SessionId::generate(32);
    let good = v.sign(&id);
    let mut bad = good.clone().into_bytes();
    let last = bad.len() - 1;
    bad[last] = if bad[last] == b'A' { b'B' } else { b'A' };
    let bad = String::from_utf8(bad).expect("ASCII");
    g.bench_function("verify", |b| b.iter(|| v.verify(black_box(&good))));
    g.bench_function("verify_tampered", |b| b.iter(|| v.verify(black_box(&bad))));
    // During a key rotation every cookie is checked against every key.
    let rotated = verifier(2);
    g.bench_function("verify_2_keys", |b| {
        b.iter(|| rotated.verify(black_box(&good)))
    });
    g.bench_function("sign", |b| b.iter(|| v.sign(black_box(&id))));
    let header = format!("_ga=GA1.2.1234567890.1234567890; theme=dark; session={good}; lang=en");
    g.bench_function("find_in_header", |b| {
        b.iter(|| cookies::find([black_box(header.as_bytes())].into_iter(), "session"))
    });
    g.bench_function("strip_from_header", |b| {
        b.iter(|| cookies::without([black_box(header.as_bytes())].into_iter(), "session"))
    });
    let settings = cookie_settings();
    let lifetime = Duration::from_secs(31 * 86_400);
    g.bench_function("set_cookie", |b| {
        b.iter(|| cookies::set_cookie(&settings, black_box(good.clone()), true, lifetime))
    });
    g.finish();
}

fn record(c: &mut Criterion) {
    let mut g = c.benchmark_group("record");
    for size in SIZES {
        let rec = record_of(size);
        let stored = rec.encode();
        let header = rec.header_value();
        g.throughput(Throughput::Bytes(size as u64));
        // Encode: what goes upstream as `X-Session` on every request.
        g.bench_with_input(BenchmarkId::new("encode_header", size), &rec, |b, r| {
            b.iter(|| r.header_value())
        });
        // A read: check the stored form and take the header from it.
        g.bench_with_input(BenchmarkId::new("decode_stored", size), &stored, |b, s| {
            b.iter(|| StoredSession::decode(s.clone()).expect("decodes").header())
        });
        // An update: parse the stored form into a record.
        g.bench_with_input(BenchmarkId::new("parse_stored", size), &stored, |b, s| {
            b.iter(|| SessionRecord::from_stored(s).expect("decodes"))
        });
        g.bench_with_input(BenchmarkId::new("encode_stored", size), &rec, |b, r| {
            b.iter(|| r.encode())
        });
        // An `X-Session` replace from the upstream, as the gateway parses it.
        let names = HeaderNames::new("X-Session");
        g.bench_with_input(BenchmarkId::new("decode_header", size), &header, |b, h| {
            b.iter(|| {
                let mut raw = RawDirectives::default();
                raw.offer("x-session", h.as_bytes(), &names);
                raw.parse(&names, 1 << 20).expect("parses")
            })
        });
    }
    g.finish();
}

fn patch(c: &mut Criterion) {
    let mut g = c.benchmark_group("patch");
    let names = HeaderNames::new("X-Session");
    let text = r#"{"cart":{"items":3,"total":"42.50"},"last_seen":1700000000,"flash":null}"#;
    g.bench_function("parse_x_session_patch", |b| {
        b.iter(|| {
            let mut raw = RawDirectives::default();
            raw.offer("x-session-patch", black_box(text.as_bytes()), &names);
            raw.parse(&names, 8192).expect("parses")
        })
    });
    let base = record_of(1024);
    let p = object(serde_json::json!({
        "cart": {"items": 3, "total": "42.50"},
        "last_seen": 1_700_000_000u64,
        "k00": null,
        "locale": "de-DE"
    }));
    g.bench_function("merge_patch_1k", |b| {
        b.iter_batched_ref(
            || base.data.clone(),
            |data| merge_patch(data, black_box(&p)),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// The pure work of one live-session read: verify the cookie, check the
/// stored form, take the `X-Session` header from it. Target: < 1.5 µs at
/// 1 KiB.
fn read_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("read_path");
    let v = verifier(1);
    let id = SessionId::generate(32);
    let good = v.sign(&id);
    let settings = cookie_settings();
    let lifetime = Duration::from_secs(31 * 86_400);
    for size in SIZES {
        let stored = record_of(size).encode();
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(
            BenchmarkId::new("verify_decode_encode", size),
            &stored,
            |b, s| {
                b.iter(|| {
                    let id = v.verify(black_box(&good)).expect("verifies");
                    let stored = StoredSession::decode(s.clone()).expect("decodes");
                    (id, stored.header())
                })
            },
        );
        // Plus what `refresh_each_request` adds: re-sign and Set-Cookie.
        g.bench_with_input(
            BenchmarkId::new("verify_decode_encode_refresh", size),
            &stored,
            |b, s| {
                b.iter(|| {
                    let id = v.verify(black_box(&good)).expect("verifies");
                    let stored = StoredSession::decode(s.clone()).expect("decodes");
                    let header = stored.header();
                    let cookie = cookies::set_cookie(&settings, v.sign(&id), true, lifetime);
                    (header, cookie)
                })
            },
        );
    }
    g.finish();
}

/// What `session.seal: true` adds to a read: the hashed store key and
/// opening the sealed value (HKDF + AES-256-GCM), and what it adds with
/// the open cache (`session.seal_cache`): the store key, a lookup and a
/// comparison of the value with the cached one (`cached`: the same memory,
/// as the memory store and the Redis near cache hand out; `cached_copy`:
/// equal bytes elsewhere, as a Redis reply), or on a miss the opening plus
/// an insert (`miss`, which removes the entry first). `key`: the store
/// key alone, which every sealed request computes.
fn sealed(c: &mut Criterion) {
    use bytes::Bytes;
    use session_gateway::session::seal;
    let mut g = c.benchmark_group("sealed");
    let id = SessionId::generate(32);
    let cache = seal::OpenCache::new(10_000).expect("on");
    g.bench_function("key", |b| {
        b.iter(|| seal::store_key("session:", black_box(&id)))
    });
    for size in SIZES {
        let plain = record_of(size).encode();
        let key = seal::store_key("session:", &id);
        let value = seal::seal(&plain, &id, &key);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("key+open", size), &value, |b, v| {
            b.iter(|| {
                let key = seal::store_key("session:", black_box(&id));
                seal::open(black_box(v), &id, &key).unwrap()
            })
        });
        let open_cached = |v: &Bytes| {
            let key = seal::store_key("session:", black_box(&id));
            cache.open(black_box(v), &id, &key).unwrap()
        };
        cache.open(&value, &id, &key).unwrap();
        g.bench_with_input(BenchmarkId::new("key+cached", size), &value, |b, v| {
            b.iter(|| open_cached(v))
        });
        let copy = Bytes::copy_from_slice(&value);
        g.bench_with_input(BenchmarkId::new("key+cached_copy", size), &copy, |b, v| {
            b.iter(|| open_cached(v))
        });
        g.bench_with_input(BenchmarkId::new("key+miss", size), &value, |b, v| {
            b.iter(|| {
                cache.remove(&key);
                open_cached(v)
            })
        });
    }
    g.finish();
}

/// One access log line as a request writes it (`access_log: true`, text
/// format): `direct` is the gateway's path (the target's level check, then
/// the line formatted into the log buffer); `tracing` the same line as a
/// `tracing` event through the fmt layer (the path for coloured terminal
/// output). Run with stderr redirected (`2>/dev/null`): the lines are
/// written there.
fn access_line(c: &mut Criterion) {
    use session_gateway::telemetry::{self, AccessLine};
    telemetry::init("info", false);
    let line = AccessLine {
        request_id: "b1946ac92492d234",
        client: Some("203.0.113.7".parse().unwrap()),
        method: "GET",
        path: "/api/items",
        status: 200,
        duration_us: 412,
        bytes: 1843,
        session: "existing",
        store_us: 35,
        aborted: false,
        error: None,
    };
    let mut g = c.benchmark_group("access_log");
    g.bench_function("direct", |b| {
        b.iter(|| {
            assert!(tracing::enabled!(target: telemetry::ACCESS, tracing::Level::INFO));
            assert!(telemetry::write_access(black_box(&line)))
        })
    });
    g.bench_function("tracing", |b| {
        b.iter(|| telemetry::trace_access(black_box(&line)))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = cookie, record, patch, read_path, sealed, access_line
}
criterion_main!(benches);
