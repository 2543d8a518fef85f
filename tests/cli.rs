//! The command line: `--test`/`check` on good and bad configs (every error
//! names its YAML key, in one line), and the embedded default config.

mod common;

use common::gateway::{run_cli, KEY_A};
use std::os::unix::fs::PermissionsExt;

fn check(yaml: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.yaml");
    std::fs::write(&path, yaml).unwrap();
    run_cli(&["-c", path.to_str().unwrap(), "--test"], dir.path())
}

/// `--test` refuses `yaml` with one line that names `key` first.
fn assert_refused_naming(yaml: &str, key: &str) {
    let (code, out, err) = check(yaml);
    assert_ne!(code, 0, "accepted:\n{yaml}\n{out}");
    let line = err.trim();
    assert_eq!(line.lines().count(), 1, "expected one line, got:\n{err}");
    assert!(
        line.starts_with(&format!("error: {key}:")),
        "error for {key} should name it first; got: {line}\n---\n{yaml}"
    );
}

fn base(extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:6188\nupstream: 127.0.0.1:8000\nsecret_keys: [\"{KEY_A}\"]\nstore: {{type: memory}}\n{extra}"
    )
}

#[test]
fn valid_config_passes_and_describes_itself() {
    let (code, out, err) = check(&base("session: {same_site_is_not_here: 1}").replace(
        "session: {same_site_is_not_here: 1}",
        "cookie: {same_site: STRICT}",
    ));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("configuration OK"), "{out}");
    assert!(out.contains("127.0.0.1:8000"), "{out}");
    assert!(out.contains("memory"), "{out}");
    assert!(out.contains("Strict"), "{out}");
}

#[test]
fn valid_prefixed_cookies_and_headers_pass() {
    for extra in [
        "cookie: {name: __Host-session, secure: true}",
        "cookie: {name: __Secure-session, secure: true, domain: example.com, path: /app}",
        "session: {header: X-App-Session}",
        "session: {header: x-s}",
        "server: {trusted_proxies: [10.0.0.0/8, 192.0.2.7, 'fd00::/8']}",
    ] {
        let (code, out, err) = check(&base(extra));
        assert_eq!(code, 0, "{extra}: {out}{err}");
    }
}

#[test]
fn check_subcommand_is_the_same_as_test_flag() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.yaml");
    std::fs::write(&path, base("")).unwrap();
    let (code, out, _) = run_cli(&["-c", path.to_str().unwrap(), "check"], dir.path());
    assert_eq!(code, 0);
    assert!(out.contains("configuration OK"));
}

#[test]
fn every_config_error_names_its_key() {
    let cases: Vec<(String, &str)> = vec![
        (base("").replace(KEY_A, "short"), "secret_keys[0]"),
        (base("bogus: 1"), "bogus"),
        (base("cookie: {nmae: x}"), "cookie.nmae"),
        (base("session: {lifetime: [1]}"), "session.lifetime"),
        (base("session: {lifetime: 10parsecs}"), "session.lifetime"),
        (base("session: {max_bytes: lots}"), "session.max_bytes"),
        (
            base("").replace("upstream: 127.0.0.1:8000\n", ""),
            "upstream",
        ),
        (
            base("").replace("{type: memory}", "{type: cassandra}"),
            "store.type",
        ),
        (
            base("").replace("{type: memory}", "{dir: /tmp}"),
            "store.type",
        ),
        (
            base("").replace("{type: memory}", "{type: memory, colour: blue}"),
            "store.colour",
        ),
        (base("cookie: {same_site: sideways}"), "cookie.same_site"),
        (base("cookie: {same_site: none}"), "cookie.same_site"),
        (
            base("session: {on_store_error: shrug}"),
            "session.on_store_error",
        ),
        (base("session: {exclude: [static]}"), "session.exclude[0]"),
        (base("session: {id_bytes: 4}"), "session.id_bytes"),
        (base("session: {seal_cache: -1}"), "session.seal_cache"),
        (base("session: {seal_cache: lots}"), "session.seal_cache"),
        (base("session: {seal_cache: 1000001}"), "session.seal_cache"),
        (
            base("").replace("127.0.0.1:6188", "not-an-address"),
            "listen",
        ),
        (
            base("").replace(&format!("\"{KEY_A}\""), "\"${SGW_SURELY_UNSET_VAR}\""),
            "secret_keys[0]",
        ),
        (
            base("").replace(&format!("[\"{KEY_A}\"]"), "[]"),
            "secret_keys",
        ),
        (base("server: {threads: 0}"), "server.threads"),
        (
            base("server: {trusted_proxies: [10.0.0.0/8, 10.0.0.0/99]}"),
            "server.trusted_proxies[1]",
        ),
        (
            base("server: {trusted_proxies: [lb.internal]}"),
            "server.trusted_proxies[0]",
        ),
        // Cookies browsers would drop: sessions would never stick.
        (base("cookie: {name: __Host-session}"), "cookie.secure"),
        (base("cookie: {name: __secure-sid}"), "cookie.secure"),
        (
            base("cookie: {name: __Host-session, secure: true, domain: example.com}"),
            "cookie.domain",
        ),
        (
            base("cookie: {name: __HOST-session, secure: true, path: /app}"),
            "cookie.path",
        ),
        // Protocol header names that would strip unrelated headers.
        (base("session: {header: Content}"), "session.header"),
        (base("session: {header: Cookie}"), "session.header"),
        (base("session: {header: X}"), "session.header"),
        (base("session: {header: X-}"), "session.header"),
        (base("session: {header: X-Forwarded}"), "session.header"),
        (base("session: {header: x_request}"), "session.header"),
        (base("session: {header: X-Sess ion}"), "session.header"),
        (base("log_level: loud"), "log_level"),
        (
            base("").replace("{type: memory}", "{type: filesystem, dir: /proc/version/x}"),
            "store.dir",
        ),
    ];
    for (yaml, key) in cases {
        assert_refused_naming(&yaml, key);
    }
}

/// `base` with `listen` replaced.
fn with_listen(listen: &str, extra: &str) -> String {
    base(extra).replace("listen: 127.0.0.1:6188", &format!("listen: {listen}"))
}

#[test]
fn tls_listeners_upstream_urls_and_health_checks() {
    let ca = common::tls::TestCa::new();
    let leaf = ca.issue(&["DNS:localhost"]);
    let other = ca.issue(&["DNS:localhost"]);
    let tls = |cert: &std::path::Path, key: &std::path::Path| {
        format!(
            "[127.0.0.1:6188, {{addr: 127.0.0.1:6443, tls: {{cert_file: '{}', key_file: '{}'}}}}]",
            cert.display(),
            key.display()
        )
    };
    let garbage = ca.dir().join("garbage.pem");
    std::fs::write(&garbage, "not PEM at all\n").unwrap();
    let ca_file = ca.cert().display().to_string();

    let valid = [
        with_listen(&tls(&leaf.cert, &leaf.key), ""),
        base("").replace(
            "upstream: 127.0.0.1:8000",
            "upstream: [\"https://localhost:8443\", \"http://127.0.0.1:8000/\", 127.0.0.1:8001]",
        ),
        base(&format!("server: {{upstream_ca_file: '{ca_file}'}}")),
        base("server: {upstream_health_check: null}"),
        base("server: {upstream_health_check: {interval: 1s, path: /healthz, timeout: 500ms}}"),
    ];
    for yaml in &valid {
        let (code, out, err) = check(yaml);
        assert_eq!(code, 0, "{yaml}\n{out}{err}");
    }
    let (_, out, _) = check(&valid[0]);
    assert!(out.contains("https://127.0.0.1:6443"), "{out}");

    let refused: Vec<(String, &str)> = vec![
        (
            with_listen(&tls(&ca.dir().join("missing.pem"), &leaf.key), ""),
            "listen[1].tls.cert_file",
        ),
        (
            with_listen(&tls(&garbage, &leaf.key), ""),
            "listen[1].tls.cert_file",
        ),
        (
            with_listen(&tls(&leaf.cert, &garbage), ""),
            "listen[1].tls.key_file",
        ),
        // A key that is not the certificate's.
        (
            with_listen(&tls(&leaf.cert, &other.key), ""),
            "listen[1].tls.key_file",
        ),
        (
            with_listen(
                "{addr: 127.0.0.1:6443, tls: {cert_file: a, key_file: b, ciphers: all}}",
                "",
            ),
            "listen.tls.ciphers",
        ),
        (
            with_listen("[{adress: 127.0.0.1:1}]", ""),
            "listen[0].adress",
        ),
        (
            with_listen("[{addr: 127.0.0.1:1, tls: {cert_file: a}}]", ""),
            "listen[0].tls.key_file",
        ),
        (with_listen("[{addr: nowhere}]", ""), "listen[0].addr"),
        (
            base("").replace("upstream: 127.0.0.1:8000", "upstream: ftp://127.0.0.1:21"),
            "upstream",
        ),
        (
            base("").replace(
                "upstream: 127.0.0.1:8000",
                "upstream: [127.0.0.1:8000, \"https://127.0.0.1:8443/app\"]",
            ),
            "upstream[1]",
        ),
        (
            base("").replace(
                "upstream: 127.0.0.1:8000",
                "upstream: [127.0.0.1:8000, \"http://127.0.0.1:8000\"]",
            ),
            "upstream[1]",
        ),
        (
            base("server: {upstream_ca_file: /nonexistent/ca.pem}"),
            "server.upstream_ca_file",
        ),
        (
            base(&format!(
                "server: {{upstream_ca_file: '{}'}}",
                garbage.display()
            )),
            "server.upstream_ca_file",
        ),
        (
            base("server: {upstream_health_check: {interval: 0}}"),
            "server.upstream_health_check.interval",
        ),
        (
            base("server: {upstream_health_check: {path: healthz}}"),
            "server.upstream_health_check.path",
        ),
        (
            base("server: {upstream_health_check: {every: 5s}}"),
            "server.upstream_health_check.every",
        ),
    ];
    for (yaml, key) in refused {
        assert_refused_naming(&yaml, key);
    }
}

#[test]
fn environment_variables_fill_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.yaml");
    std::fs::write(
        &path,
        base("").replace(&format!("\"{KEY_A}\""), "\"${SGW_TEST_SECRET}\""),
    )
    .unwrap();
    let out = std::process::Command::new(common::gateway::binary())
        .args(["-c", path.to_str().unwrap(), "--test"])
        .env("SGW_TEST_SECRET", KEY_A)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn embedded_default_config_generates_and_reuses_a_private_key() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = run_cli(&["--test"], dir.path());
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("filesystem"), "{out}");
    let key_file = dir.path().join("session-gateway.key");
    let key = std::fs::read_to_string(&key_file).unwrap();
    assert!(key.trim().len() >= 32);
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (code, _, _) = run_cli(&["--test"], dir.path());
    assert_eq!(code, 0);
    assert_eq!(
        std::fs::read_to_string(&key_file).unwrap(),
        key,
        "the key must be reused"
    );
    // Each installation gets its own key.
    let other = tempfile::tempdir().unwrap();
    run_cli(&["--test"], other.path());
    assert_ne!(
        std::fs::read_to_string(other.path().join("session-gateway.key")).unwrap(),
        key
    );
}

#[test]
fn shipped_configs_are_valid() {
    // conf/*.yaml that need no external server; store-specific ones are
    // checked by their store's test binary against a real server.
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = run_cli(
        &["-c", &format!("{root}/conf/gateway.yaml"), "--test"],
        dir.path(),
    );
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn demo_mode_serves_a_visit_counter() {
    let dir = tempfile::tempdir().unwrap();
    let gw_port = common::free_port();
    let app_port = common::free_port();
    let yaml = format!(
        "listen: 127.0.0.1:{gw_port}\nupstream: 127.0.0.1:{app_port}\nsecret_keys: [\"{KEY_A}\"]\nstore: {{type: memory}}\n"
    );
    let path = dir.path().join("g.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut child = std::process::Command::new(common::gateway::binary())
        .args(["-c", path.to_str().unwrap(), "--demo"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let result = rt.block_on(async {
        let jar = std::sync::Arc::new(reqwest::cookie::Jar::default());
        let client = reqwest::Client::builder()
            .cookie_provider(jar)
            .build()
            .unwrap();
        let url = format!("http://127.0.0.1:{gw_port}/");
        for _ in 0..200 {
            if client.get(&url).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        let mut texts = Vec::new();
        for _ in 0..2 {
            texts.push(client.get(&url).send().await.unwrap().text().await.unwrap());
        }
        texts
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        result[1].contains("visited 3 time(s)") || result[1].contains("visited 2 time(s)"),
        "{result:?}"
    );
    assert!(result[1].contains("\"visits\""), "{result:?}");
}
