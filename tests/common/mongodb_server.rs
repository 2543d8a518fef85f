//! A private MongoDB-compatible server for tests: SecantusDB
//! (`secantusd-py`, PyPI package `SecantusDB`, pinned in
//! scripts/test-requirements.txt) on a free loopback port with its data in
//! a temp dir, killed on drop, that a test can stop and start again on the
//! same port and data (an outage) or freeze (SIGSTOP). MongoDB itself has
//! no Debian package; SecantusDB speaks its wire protocol and presents
//! itself as a one-node replica set.
//!
//! The binary is `$SGW_TEST_VENV/bin/secantusd-py` (default
//! `$CARGO_MANIFEST_DIR/target/test-venv`, read at run time), the virtual
//! environment `./scripts/test` creates.

use super::server::{accepts, ServerKind, ServerProcess};
use mongodb::bson::{doc, Document};
use mongodb::options::ClientOptions;
use mongodb::Client;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// `secantusd-py` in the test virtual environment.
pub fn server_bin() -> PathBuf {
    let venv = std::env::var("SGW_TEST_VENV")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target/test-venv").into());
    Path::new(&venv).join("bin").join("secantusd-py")
}

/// The server process: `stop` kills it (an outage; its data stays in
/// its directory), `start_again`, `pause`, `resume`, `port`, `log` come
/// from [`ServerProcess`].
pub struct MongoServer(ServerProcess);

impl std::ops::Deref for MongoServer {
    type Target = ServerProcess;
    fn deref(&self) -> &ServerProcess {
        &self.0
    }
}

impl std::ops::DerefMut for MongoServer {
    fn deref_mut(&mut self) -> &mut ServerProcess {
        &mut self.0
    }
}

impl MongoServer {
    pub fn start() -> MongoServer {
        let process = ServerProcess::start(ServerKind {
            name: "secantusd-py (SecantusDB)",
            command: Box::new(|port, dir| {
                // An explicit (empty) config file: without one the server
                // reads ./secantusd.toml, ~/.secantus/ or /etc/secantus/.
                let config = dir.join("empty.toml");
                std::fs::write(&config, "").unwrap();
                let mut cmd = Command::new(server_bin());
                cmd.arg("--config")
                    .arg(config)
                    .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                    .arg("--storage-path")
                    .arg(dir.join("data"))
                    .args(["--log-level", "WARNING"]);
                // Set by `start_with_user` once the user exists: SecantusDB
                // has no localhost exception to create the first user.
                if dir.join("auth").exists() {
                    cmd.arg("--auth");
                }
                cmd
            }),
            // It listens only once its storage is open.
            ready: Box::new(|port, _| accepts(port)),
            install_hint: "Run ./scripts/test (it creates the virtual environment), or \
                 `python3 -m venv target/test-venv && target/test-venv/bin/pip install \
                 -r scripts/test-requirements.txt`, or set SGW_TEST_VENV to a venv with SecantusDB",
            start_timeout: Duration::from_secs(20),
            // Killing is safe for its data (WiredTiger replays its log on
            // the next start) and immediate; SIGTERM takes about 4 s.
            stop_signal: libc::SIGKILL,
        });
        MongoServer(process)
    }

    /// A server that requires authentication, with `user` (password
    /// `password`, `readWrite` on `session_gateway`) in `admin`.
    pub async fn start_with_user(user: &str, password: &str) -> MongoServer {
        let mut server = Self::start();
        let admin = server.client().await.database("admin");
        admin
            .run_command(doc! {
                "createUser": user,
                "pwd": password,
                "roles": [{"role": "readWrite", "db": "session_gateway"}],
            })
            .await
            .unwrap();
        // With `writeConcern: {j: true}` on createUser itself the user was
        // still lost to the kill below; a journaled write after it flushes
        // SecantusDB's log, user included.
        admin
            .run_command(doc! {
                "insert": "sgw_fixture",
                "documents": [{}],
                "writeConcern": {"w": "majority", "j": true},
            })
            .await
            .unwrap();
        server.stop();
        std::fs::write(server.dir().join("auth"), "").unwrap();
        server.start_again();
        server
    }

    /// `mongodb://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("mongodb://127.0.0.1:{}/", self.port)
    }

    /// A driver client for inspecting the server from a test, with short
    /// timeouts so a stopped server cannot hang a test.
    pub async fn client(&self) -> Client {
        let mut options = ClientOptions::parse(self.url()).await.unwrap();
        options.server_selection_timeout = Some(Duration::from_secs(5));
        options.connect_timeout = Some(Duration::from_secs(5));
        Client::with_options(options).unwrap()
    }

    /// The raw documents of `database.collection`, by `_id`.
    pub async fn documents(&self, database: &str, collection: &str) -> Vec<Document> {
        let coll = self
            .client()
            .await
            .database(database)
            .collection::<Document>(collection);
        let mut cursor = coll.find(doc! {}).sort(doc! {"_id": 1}).await.unwrap();
        let mut out = Vec::new();
        while cursor.advance().await.unwrap() {
            out.push(cursor.deserialize_current().unwrap());
        }
        out
    }
}
