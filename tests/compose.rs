//! docker-compose.yml, checked without a Docker engine: it parses; every
//! store has a profile with a gateway and its server; every config file a
//! gateway runs exists in conf/ (copied into the image) and passes
//! `--test --no-connect` with the compose environment (service names
//! stand in as 127.0.0.1, since they only resolve inside compose).

mod common;

use common::gateway::run_cli_env;
use serde_yaml::{Mapping, Value};
use std::collections::BTreeSet;
use std::path::Path;

const STORES: [&str; 7] = [
    "filesystem",
    "redis",
    "postgres",
    "mariadb",
    "memcached",
    "mongodb",
    "dynamodb",
];

fn compose() -> Mapping {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{root}/docker-compose.yml")).unwrap();
    let mut doc: Value = serde_yaml::from_str(&text).expect("docker-compose.yml parses");
    // `<<: *gateway` merge keys, as compose applies them.
    doc.apply_merge().expect("merge keys resolve");
    doc.as_mapping().unwrap().clone()
}

fn services(doc: &Mapping) -> &Mapping {
    doc["services"].as_mapping().expect("services")
}

fn profiles(service: &Value) -> Vec<String> {
    service
        .get("profiles")
        .and_then(Value::as_sequence)
        .map(|p| p.iter().map(|v| v.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// `${NAME:-default}` / `${NAME:?msg}` / `${NAME}` as compose expands them,
/// with NAME unset except for what `env` gives.
fn expand(text: &str, env: &[(&str, &str)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').unwrap() + start;
        let inner = &rest[start + 2..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, d),
            None => (inner.split(":?").next().unwrap(), ""),
        };
        let value = env
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
            .unwrap_or(default);
        out.push_str(value);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

#[test]
fn every_store_has_a_profile_with_a_gateway_and_its_server() {
    let doc = compose();
    let services = services(&doc);
    for store in STORES {
        let members: Vec<&str> = services
            .iter()
            .filter(|(_, s)| profiles(s).iter().any(|p| p == store))
            .map(|(name, _)| name.as_str().unwrap())
            .collect();
        assert!(
            members.contains(&format!("gateway-{store}").as_str()),
            "profile {store} has no gateway: {members:?}"
        );
        if store != "filesystem" {
            assert!(
                members.len() >= 2,
                "profile {store} has no store server: {members:?}"
            );
        }
    }
    // The example apps: Python always, Node and Go by profile.
    for app in ["app-python", "app-node", "app-go"] {
        assert!(services.contains_key(app), "{app} missing");
    }
    let root = env!("CARGO_MANIFEST_DIR");
    for (name, service) in services {
        for volume in service
            .get("volumes")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let host = volume.as_str().unwrap().split(':').next().unwrap();
            assert!(
                Path::new(root).join(host).exists(),
                "{name:?}: volume source {host} does not exist"
            );
        }
    }
}

#[test]
fn every_gateway_config_exists_and_passes_test() {
    let doc = compose();
    let services = services(&doc);
    let names: BTreeSet<String> = services
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    let root = env!("CARGO_MANIFEST_DIR");
    let mut checked = 0;
    for (name, service) in services {
        let name = name.as_str().unwrap();
        if !name.starts_with("gateway") {
            continue;
        }
        let command: Vec<&str> = service["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let at = command.iter().position(|a| *a == "-c").expect("-c FILE");
        // The Dockerfile copies conf/ to /etc/session-gateway.
        let in_image = command[at + 1];
        let local = in_image
            .strip_prefix("/etc/session-gateway/")
            .unwrap_or_else(|| panic!("{name}: {in_image} is not from conf/"));
        let path = Path::new(root).join("conf").join(local);
        let mut text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{name}: {}: {e}", path.display()));
        // Its environment, as compose sets it (SESSION_SECRET given).
        let secret = "compose-test-secret-0123456789abcdef0123456789";
        let given = [("SESSION_SECRET", secret)];
        let mut env: Vec<(String, String)> = Vec::new();
        for (k, v) in service["environment"].as_mapping().unwrap() {
            let v = expand(v.as_str().unwrap(), &given);
            env.push((k.as_str().unwrap().to_string(), v));
        }
        // Service names resolve only inside compose.
        for service_name in &names {
            text = text.replace(&format!("//{service_name}:"), "//127.0.0.1:");
            text = text.replace(&format!("[{service_name}:"), "[127.0.0.1:");
        }
        let upstream = env.iter_mut().find(|(k, _)| k == "APP_UPSTREAM").unwrap();
        for service_name in &names {
            upstream.1 = upstream
                .1
                .replace(&format!("{service_name}:"), "127.0.0.1:");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gateway.yaml");
        std::fs::write(&file, text).unwrap();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (code, out, err) = run_cli_env(
            &["-c", file.to_str().unwrap(), "--test", "--no-connect"],
            dir.path(),
            &env,
        );
        assert_eq!(code, 0, "{name} ({local}): {out}{err}");
        assert!(out.contains("not contacted"), "{out}");
        checked += 1;
    }
    assert_eq!(checked, STORES.len(), "one gateway per store");
}

#[test]
fn no_connect_still_refuses_bad_configs() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("g.yaml");
    std::fs::write(
        &file,
        "listen: 127.0.0.1:1\nupstream: 127.0.0.1:2\nsecret_keys: [\"compose-test-secret-0123456789abcdef0123456789\"]\nstore: {type: redis, url: \"http://x\"}\n",
    )
    .unwrap();
    let (code, _, err) = run_cli_env(
        &["-c", file.to_str().unwrap(), "--test", "--no-connect"],
        dir.path(),
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.starts_with("error: store.url:"), "{err}");
}
