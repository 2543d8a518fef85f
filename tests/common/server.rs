//! A real server process for a test: started on a free loopback port in
//! a temp dir, waited for until it answers, stopped on drop. Tests can stop
//! it and start it again on the same port and directory (an outage), or
//! freeze it with SIGSTOP (a hung server). Every store fixture (Redis,
//! PostgreSQL, MariaDB, Memcached, MongoDB, DynamoDB) is one of these.
//!
//! A missing binary fails the test with the command that installs it: a
//! skipped store test would read as a passing one.
//!
//! Servers are spawned with `PR_SET_PDEATHSIG`, so they also die if the
//! test binary is killed before their drop runs. That signal follows the
//! spawning *thread*: create servers on the test's own thread (the body of
//! a `#[tokio::test]` runs there), never inside `spawn_blocking`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Builds the command (binary and arguments) for a port and a directory.
pub type CommandFn = Box<dyn Fn(u16, &Path) -> Command + Send + Sync>;
/// Does the server on this port (in this directory) answer yet?
pub type ReadyFn = Box<dyn Fn(u16, &Path) -> bool + Send + Sync>;

/// How to run one kind of server.
pub struct ServerKind {
    /// For messages (`redis-server`).
    pub name: &'static str,
    /// The command (binary and arguments) for a port and a directory.
    pub command: CommandFn,
    /// Does the server on this port answer yet?
    pub ready: ReadyFn,
    /// What to run when the binary is missing (`apt-get install ...`).
    pub install_hint: &'static str,
    /// How long it may take to answer.
    pub start_timeout: Duration,
    /// The signal of a clean stop ([`ServerProcess::stop`]).
    pub stop_signal: i32,
}

pub struct ServerProcess {
    pub port: u16,
    dir: tempfile::TempDir,
    kind: ServerKind,
    child: Option<Child>,
}

impl ServerProcess {
    /// Start on a free port (another one if the port was taken between
    /// probing and binding).
    pub fn start(kind: ServerKind) -> ServerProcess {
        Self::start_in(kind, tempfile::tempdir().expect("temp dir for a server"))
    }

    /// Start with a prepared directory (e.g. an initialized data dir).
    pub fn start_in(kind: ServerKind, dir: tempfile::TempDir) -> ServerProcess {
        let mut server = ServerProcess {
            port: 0,
            dir,
            kind,
            child: None,
        };
        let mut last_log = String::new();
        for _ in 0..5 {
            server.port = super::free_port();
            match server.spawn() {
                Ok(()) => return server,
                Err(log) => last_log = log,
            }
        }
        panic!(
            "{} did not start on any of 5 free ports:\n{last_log}",
            server.kind.name
        );
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// Everything the server printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("server is running").id() as i32
    }

    /// Start the process and wait until it answers; `Err(log)` if it exits.
    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = (self.kind.command)(self.port, self.dir.path());
        cmd.current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        die_with_parent(&mut cmd);
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "`{:?}` not found: this test needs a real {}. {}",
                cmd.get_program(),
                self.kind.name,
                self.kind.install_hint
            ),
            Err(e) => panic!("cannot start {}: {e}", self.kind.name),
        };
        self.child = Some(child);
        let deadline = Instant::now() + self.kind.start_timeout;
        loop {
            if (self.kind.ready)(self.port, self.dir.path()) {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!(
                    "{} exited with {status}:\n{}",
                    self.kind.name,
                    self.log()
                ));
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not answer within {:?}:\n{}",
                    self.kind.name,
                    self.kind.start_timeout,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A clean stop (the kind's stop signal), waited for.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe {
                libc::kill(child.id() as i32, libc::SIGCONT);
                libc::kill(child.id() as i32, self.kind.stop_signal);
            }
            if !wait_exit(&mut child, Duration::from_secs(20)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Kill at once (SIGKILL): a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start again on the same port and directory after a stop.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "{} is still running", self.kind.name);
        if let Err(log) = self.spawn() {
            panic!(
                "{} did not restart on port {}:\n{log}",
                self.kind.name, self.port
            );
        }
    }

    /// Freeze the process (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        unsafe {
            libc::kill(self.pid(), libc::SIGSTOP);
        }
    }

    /// Thaw a [`pause`](Self::pause)d server (SIGCONT).
    pub fn resume(&self) {
        unsafe {
            libc::kill(self.pid(), libc::SIGCONT);
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_exit(child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Kill the child when the spawning thread (or the whole test binary) dies.
pub fn die_with_parent(cmd: &mut Command) {
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// Does anything accept TCP connections on the port?
pub fn accepts(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// A program from an environment variable, else `default`.
pub fn program(env: &str, default: &str) -> String {
    std::env::var(env).unwrap_or_else(|_| default.to_string())
}
