//! The upstream's session directives: `X-Session`, `X-Session-Patch` and
//! `X-Session-Action` response headers, sorted by [`RawDirectives::offer`]
//! and checked by [`RawDirectives::parse`]. The input's first byte picks
//! `session.max_bytes`; the rest is header lines, `name:value`.
//!
//! Invariants: every header named like the protocol is taken (and so
//! stripped), no other; whatever parse accepts is within the limits and
//! survives the trip through the header encoding and the stored form
//! exactly, alone and merged; a refusal says why.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use session_gateway::config::HeaderNames;
use session_gateway::proxy::protocol::{
    is_protocol_header, object_depth, RawDirectives, MAX_DEPTH,
};
use session_gateway::session::record::parse_object;
use session_gateway::session::{merge_patch, SessionRecord, StoredSession};

/// The map survives header encoding, the app echoing it back, and the
/// stored form.
fn round_trips(names: &HeaderNames, data: &Map<String, Value>) {
    assert!(object_depth(data) <= MAX_DEPTH);
    let record = SessionRecord {
        permanent: true,
        data: data.clone(),
    };
    let header = record.header_value();
    assert!(
        header.bytes().all(|b| (0x20..0x7f).contains(&b)),
        "{header}"
    );
    let back = parse_object(header.as_bytes()).expect("header is JSON");
    assert_eq!(&back, data, "{header}");

    let mut echo = RawDirectives::default();
    assert!(echo.offer(&names.data, header.as_bytes(), names));
    let echoed = echo
        .parse(names, usize::MAX)
        .unwrap_or_else(|e| panic!("own header refused: {}: {header}", e.0));
    assert_eq!(echoed.replace.as_ref(), Some(data));

    let stored = StoredSession::decode(record.encode()).expect("own stored form");
    assert_eq!(&stored.header()[..], header.as_bytes());
    assert_eq!(stored.record().expect("own stored form parses"), record);
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let max_bytes = [64, 8192, 1 << 20, 16][usize::from(mode % 4)];
    let names = HeaderNames::new("X-Session");
    let mut raw = RawDirectives::default();
    for line in rest.split(|&b| b == b'\n') {
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &b""[..]),
        };
        let name = String::from_utf8_lossy(name);
        let taken = raw.offer(&name, value, &names);
        let normalized = name.to_ascii_lowercase().replace('_', "-");
        assert_eq!(taken, normalized.starts_with("x-session"), "{name:?}");
        assert_eq!(taken, is_protocol_header(&name, &names.strip_prefix));
    }
    let directives = match raw.parse(&names, max_bytes) {
        Ok(d) => d,
        Err(e) => {
            assert!(!e.0.trim().is_empty(), "refusal without a reason");
            return;
        }
    };
    assert!(raw.any || directives.is_empty());
    if let Some(data) = &directives.replace {
        assert!(raw.data[0].len() <= max_bytes);
        round_trips(&names, data);
    }
    if let Some(patch) = &directives.patch {
        assert!(raw.patch[0].len() <= max_bytes);
        round_trips(&names, patch);
        // What the engine stores after a patch: merged onto the replaced
        // (or any earlier) data; nesting stays within the limit.
        let mut merged = directives.replace.clone().unwrap_or_default();
        merge_patch(&mut merged, patch);
        let mut again = merged.clone();
        merge_patch(&mut again, patch);
        assert_eq!(again, merged, "merge patch is not idempotent");
        round_trips(&names, &merged);
    }
});
