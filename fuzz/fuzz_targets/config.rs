//! Loading the configuration from arbitrary YAML ([`Config::from_yaml`]).
//! The input is the file's text.
//!
//! Invariants: never a panic; a refusal has a message; an accepted
//! config satisfies every documented range (so validation and the
//! internal model agree).
//!
//! Containment: validation resolves `listen`/`upstream` addresses, so the
//! target moves itself into a network namespace of its own first (no
//! interfaces: name lookups fail at once, nothing leaves the machine), and
//! it skips inputs that set `secret_key_file`, which creates a file at the
//! path given (that path is covered by unit tests).

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_yaml::Value;
use session_gateway::config::{Config, SameSite};
use std::sync::Once;

/// The variables the shipped configs name, so the seeds get past
/// substitution to validation.
const ENV: [(&str, &str); 4] = [
    ("SESSION_SECRET", "fuzz-secret-0123456789abcdef0123456789"),
    ("REDIS_URL", "redis://127.0.0.1:6379/0"),
    ("PGPASSWORD", "fuzz"),
    ("MYSQL_PASSWORD", "fuzz"),
];

fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for (name, value) in ENV {
            if std::env::var_os(name).is_none() {
                std::env::set_var(name, value);
            }
        }
        // Namespaces are per thread; libFuzzer runs inputs on this one.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "config target: cannot enter a network namespace ({}); run it as root \
                 or under `unshare --user --map-root-user`",
                std::io::Error::last_os_error()
            );
            std::process::exit(2);
        }
    });
}

/// Could this set `secret_key_file`? A top-level mapping (tagged or not)
/// with that key in any spelling YAML allows, or a top-level sequence long
/// enough to reach it (serde also fills a struct from a sequence, field by
/// field).
fn sets_secret_key_file(text: &str) -> bool {
    let Ok(mut value) = serde_yaml::from_str::<Value>(text) else {
        return false;
    };
    while let Value::Tagged(tagged) = value {
        value = tagged.value;
    }
    match value {
        Value::Mapping(map) => map
            .keys()
            .any(|k| serde_yaml::to_string(k).is_ok_and(|s| s.contains("secret_key_file"))),
        Value::Sequence(items) => items.len() >= 4,
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    setup();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if sets_secret_key_file(text) {
        return;
    }
    match Config::from_yaml(text) {
        Err(e) => {
            assert!(
                !e.message.trim().is_empty(),
                "error without a message: {e:?}"
            );
            let shown = e.to_string();
            assert!(shown.starts_with(&e.key), "{shown}");
        }
        Ok(c) => {
            assert!(!c.listen.is_empty() && !c.upstreams.is_empty());
            assert!(!c.keys.is_empty() && c.keys.iter().all(|k| k.len() >= 32));
            assert!((16..=64).contains(&c.session.id_bytes));
            assert!((1..=1 << 20).contains(&c.session.max_bytes));
            assert!(c.session.lifetime.as_secs() >= 1);
            assert!(c.session.expiry_update_interval < c.session.lifetime);
            assert!(c.session.exclude.iter().all(|p| p.starts_with('/')));
            assert!(!c.store.timeout.is_zero());
            assert!(!c.cookie.name.is_empty());
            assert!(c.cookie.path.starts_with('/'));
            assert!(c.cookie.secure || c.cookie.same_site != SameSite::None);
            assert!(c
                .session
                .headers
                .data
                .to_ascii_lowercase()
                .starts_with("x-"));
        }
    }
});
