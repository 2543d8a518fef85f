//! The filesystem store: the store contract, the protocol suite, restart
//! and rotation, plus what is specific to files (permissions, store
//! failures through a broken directory, the cleanup command).

mod common;

use common::gateway::run_cli;
use common::protocol::{setup, Browser};
use common::StoreFixture;
use serde_json::json;
use std::os::unix::fs::PermissionsExt;

async fn fixture() -> StoreFixture {
    let dir = tempfile::tempdir().unwrap();
    // A generous timeout: 50 concurrent patches of one session queue on
    // its lock, and CI machines are busy.
    let yaml = format!(
        "{{type: filesystem, dir: {:?}, timeout: 5s}}",
        dir.path().join("sessions")
    );
    StoreFixture::new(yaml, dir)
}

store_suites!(fixture);
sealed_suite!(fixture);
persistence_suite!(fixture);

fn sessions_dir(s: &common::protocol::Setup) -> std::path::PathBuf {
    let dir: &tempfile::TempDir = s.fx.guard.downcast_ref().unwrap();
    dir.path().join("sessions")
}

/// Break the store: replace the session directory by a plain file.
fn break_store(s: &common::protocol::Setup) {
    let dir = sessions_dir(s);
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, b"not a directory").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_files_are_private() {
    let s = setup(fixture().await, |b| b).await;
    Browser::new(&s.gw).patch("/", json!({"a": 1})).await;
    let dir = sessions_dir(&s);
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    assert_eq!(files.len(), 1);
    assert_eq!(
        files[0].metadata().unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_failure_fail_closed_answers_503_without_upstream() {
    let s = setup(fixture().await, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    break_store(&s);
    let hits = s.up.hits();
    let r = b.get("/", &[]).await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert!(r.text.contains("session store unavailable"));
    assert_eq!(
        s.up.hits(),
        hits,
        "fail_closed must not contact the upstream"
    );
    let id = r.header("x-request-id").unwrap();
    s.gw.error_line_for(&id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_failure_fail_open_forwards_without_session() {
    let s = setup(fixture().await, |b| {
        b.session("on_store_error", "fail_open")
    })
    .await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    break_store(&s);
    let r = b.patch("/", json!({"b": 2})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.session(), json!({}));
    assert_eq!(
        r.upstream_header("x-session-error").as_deref(),
        Some("store-unavailable")
    );
    assert_eq!(r.session_cookie(), None, "fail_open writes nothing back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_failure_after_upstream_answers_503() {
    let s = setup(fixture().await, |b| b).await;
    let b = Browser::new(&s.gw);
    break_store(&s);
    // New visitor: nothing to load, the failure happens on the write.
    let r = b.patch("/", json!({"a": 1})).await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert!(
        !r.text.contains("\"headers\""),
        "the upstream's body must not be forwarded"
    );
    assert_eq!(r.session_cookie(), None);
    let id = r.header("x-request-id").unwrap();
    s.gw.error_line_for(&id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_command_purges_expired_files() {
    let s = setup(fixture().await, |b| b.session("lifetime", "1")).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    Browser::new(&s.gw).patch("/", json!({"b": 1})).await;
    assert_eq!(std::fs::read_dir(sessions_dir(&s)).unwrap().count(), 2);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (code, out, err) = run_cli(
        &["-c", s.gw.config_path.to_str().unwrap(), "cleanup"],
        s.gw.dir(),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("removed 2 expired session(s)"), "{out}");
    assert_eq!(std::fs::read_dir(sessions_dir(&s)).unwrap().count(), 0);
}
