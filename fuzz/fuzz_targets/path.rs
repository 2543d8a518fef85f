//! Path normalization for `session.exclude`. The input is a request
//! target, optionally followed by a newline and an exclude prefix.
//!
//! Invariants: the normalized path starts with `/`, holds no `.` or `..`
//! segment and no `?` or `#`, and is its own normal form; exclusion is a
//! whole-segment prefix match on the normalized path.

#![no_main]

use libfuzzer_sys::fuzz_target;
use session_gateway::proxy::path::{is_excluded, normalize};

fn under_prefix_reference(path: &str, prefix: &str) -> bool {
    let prefix: Vec<&str> = prefix.trim_end_matches('/').split('/').collect();
    let path: Vec<&str> = path.split('/').collect();
    path.starts_with(&prefix)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (target, prefix) = text.split_once('\n').unwrap_or((text, "/static/"));
    let path = normalize(target);
    assert!(path.starts_with('/'), "{target:?} -> {path:?}");
    assert!(
        path.split('/').all(|s| s != "." && s != ".."),
        "{target:?} -> {path:?}"
    );
    assert!(!path.contains(['?', '#']), "{target:?} -> {path:?}");
    assert_eq!(normalize(&path), path, "{target:?}");

    let prefix = normalize(&format!("/{prefix}"));
    let expected = under_prefix_reference(&path, &prefix);
    let exclude = [prefix];
    assert_eq!(
        is_excluded(target, &exclude),
        expected,
        "{target:?} {exclude:?}"
    );
    assert_eq!(
        is_excluded(&path, &exclude),
        expected,
        "{path:?} {exclude:?}"
    );
});
