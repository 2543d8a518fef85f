//! The real `session-gateway` binary, started on a free port with a
//! generated config, stopped (SIGKILL) on drop. Its stderr goes to a log
//! file that tests can read.

use serde_yaml::{Mapping, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const KEY_A: &str = "test-secret-key-a-0123456789abcdef0123456789";
pub const KEY_B: &str = "test-secret-key-b-0123456789abcdef0123456789";

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_session-gateway")
}

#[derive(Clone)]
pub struct GatewayBuilder {
    config: Mapping,
    /// Listen with TLS (certificate, key) instead of plain HTTP.
    tls: Option<(PathBuf, PathBuf)>,
    /// Extra environment variables of the gateway process.
    env: Vec<(String, String)>,
}

fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).expect("test YAML parses")
}

impl GatewayBuilder {
    /// A gateway in front of `upstream_port` with `store_yaml` as its
    /// `store:` section and test-friendly defaults.
    pub fn new(upstream_port: u16, store_yaml: &str) -> Self {
        let mut config = Mapping::new();
        config.insert("listen".into(), Value::Null);
        config.insert(
            "upstream".into(),
            format!("127.0.0.1:{upstream_port}").into(),
        );
        config.insert("secret_keys".into(), yaml(&format!("[\"{KEY_A}\"]")));
        config.insert("store".into(), yaml(store_yaml));
        config.insert("server".into(), yaml("{threads: 2, grace_period: 10s}"));
        config.insert("log_level".into(), "debug".into());
        GatewayBuilder {
            config,
            tls: None,
            env: Vec::new(),
        }
    }

    /// Listen with TLS: `listen: [{addr, tls: {cert_file, key_file}}]`.
    pub fn tls(mut self, cert_file: &Path, key_file: &Path) -> Self {
        self.tls = Some((cert_file.to_path_buf(), key_file.to_path_buf()));
        self
    }

    /// Set a top-level key to a YAML value.
    pub fn set(mut self, key: &str, value_yaml: &str) -> Self {
        self.config.insert(key.into(), yaml(value_yaml));
        self
    }

    /// Set `section.key` (e.g. `session`, `refresh_each_request`, `false`).
    pub fn section(mut self, section: &str, key: &str, value_yaml: &str) -> Self {
        let entry = self
            .config
            .entry(section.into())
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        if !entry.is_mapping() {
            *entry = Value::Mapping(Mapping::new());
        }
        entry
            .as_mapping_mut()
            .unwrap()
            .insert(key.into(), yaml(value_yaml));
        self
    }

    pub fn session(self, key: &str, value_yaml: &str) -> Self {
        self.section("session", key, value_yaml)
    }

    pub fn cookie(self, key: &str, value_yaml: &str) -> Self {
        self.section("cookie", key, value_yaml)
    }

    /// Set an environment variable of the gateway process (on top of the
    /// test's own environment).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn keys(self, keys: &[&str]) -> Self {
        let list: Vec<Value> = keys.iter().map(|k| Value::String(k.to_string())).collect();
        let mut s = self;
        s.config.insert("secret_keys".into(), Value::Sequence(list));
        s
    }

    /// Write the config and start the gateway; waits until it listens and
    /// panics with its log if it does not come up. A port taken between
    /// [`super::free_port`] and the gateway's bind (another test's server,
    /// an outgoing connection) is replaced by another, up to 5 times.
    pub fn start(&self) -> Gateway {
        let mut last_log = String::new();
        for _ in 0..5 {
            match self.start_on(super::free_port()) {
                Ok(gw) => return gw,
                Err(log) => last_log = log,
            }
        }
        panic!("gateway did not start on any of 5 free ports:\n{last_log}");
    }

    /// Start on `port`; `Err(log)` if the port was taken.
    fn start_on(&self, port: u16) -> Result<Gateway, String> {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = self.config.clone();
        let addr = format!("127.0.0.1:{port}");
        let listen = match &self.tls {
            None => addr.into(),
            Some((cert, key)) => yaml(&format!(
                "[{{addr: \"{addr}\", tls: {{cert_file: \"{}\", key_file: \"{}\"}}}}]",
                cert.display(),
                key.display()
            )),
        };
        config.insert("listen".into(), listen);
        let config_path = dir.path().join("gateway.yaml");
        std::fs::write(&config_path, serde_yaml::to_string(&config).unwrap()).unwrap();
        let mut gw = Gateway {
            port,
            dir,
            config_path,
            child: None,
            builder: self.clone(),
        };
        gw.try_spawn(true).map(|()| gw)
    }
}

pub struct Gateway {
    pub port: u16,
    dir: tempfile::TempDir,
    pub config_path: PathBuf,
    child: Option<Child>,
    builder: GatewayBuilder,
}

impl Gateway {
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("gateway.log")
    }

    /// Start the process again on `self.port` (a restart: the port is
    /// this gateway's, so a bind that finds it in use is waited out, as
    /// pingora does); panics if it does not come up.
    fn spawn(&mut self) {
        if let Err(log) = self.try_spawn(false) {
            panic!("gateway could not listen on port {}:\n{log}", self.port);
        }
    }

    /// Start the process and wait until it listens on `self.port` itself
    /// (not merely: something accepts there). With `give_up_if_taken`,
    /// `Err(log)` as soon as the gateway finds the port in use; panics on
    /// any other failure to come up.
    fn try_spawn(&mut self, give_up_if_taken: bool) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(binary())
            .arg("-c")
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .env_remove("RUST_LOG")
            .envs(self.builder.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start session-gateway");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let pid = self.child.as_ref().unwrap().id();
        loop {
            if listens(pid, self.port) {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("gateway exited with {status} at start:\n{}", self.log());
            }
            // pingora retries a bind to a port in use for 30 s, saying so.
            // (Only a first start gives up, and its log is new.)
            if give_up_if_taken && self.log().contains("is in use, will try again") {
                let mut child = self.child.take().unwrap();
                let _ = child.kill();
                let _ = child.wait();
                return Err(self.log());
            }
            if Instant::now() > deadline {
                panic!("gateway did not listen within 20s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The URL of `path` on the gateway (`https://` on a TLS listener).
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.builder.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}{path}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the gateway logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The first log line matching `pred`, waiting up to 5 s for it: the
    /// gateway writes its log from a thread of its own, so a line can land
    /// a moment after the response it belongs to.
    pub fn wait_log_line(&self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| pred(l)) {
                return line.to_string();
            }
            if Instant::now() > deadline {
                panic!("no matching log line within 5s:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `ERROR` line logged for a request id (waits like
    /// [`Self::wait_log_line`]).
    pub fn error_line_for(&self, request_id: &str) -> String {
        self.wait_log_line(|l| l.contains(request_id) && l.contains("ERROR"))
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// SIGTERM and wait for the process to exit; returns its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "gateway did not exit within 30s of SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stop (SIGTERM) and start again on the same port, config and dir.
    pub fn restart(&mut self) {
        self.terminate();
        self.spawn();
    }

    pub fn builder(&self) -> &GatewayBuilder {
        &self.builder
    }
}

/// Does process `pid` hold a socket listening on TCP `port`? Read from
/// `/proc`: a connect that succeeds proves nothing, since another process
/// may have taken the port, or a connect to a port nobody listens on can
/// connect to itself (TCP simultaneous open, when the kernel picks the
/// same port as the local one).
fn listens(pid: u32, port: u16) -> bool {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ... inode (column 9)
            let (Some(local), Some(state), Some(inode)) = (cols.get(1), cols.get(3), cols.get(9))
            else {
                continue;
            };
            let local_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if *state == "0A" && local_port == Some(port) {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Run the binary with arguments (for `--test`, `cleanup`), returning
/// (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], cwd: &Path) -> (i32, String, String) {
    run_cli_env(args, cwd, &[])
}

/// [`run_cli`] with extra environment variables.
pub fn run_cli_env(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(binary())
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run session-gateway");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--test` on a shipped config (`conf/<name>`) with `edits` applied, each
/// `(text in the file, replacement)`, and its `${SESSION_SECRET}` filled
/// in: (exit code, stdout, stderr). Fails if the file no longer contains a
/// text to replace.
pub fn check_shipped(name: &str, edits: &[(&str, &str)]) -> (i32, String, String) {
    let shipped = format!("{}/conf/{name}", env!("CARGO_MANIFEST_DIR"));
    let mut text = std::fs::read_to_string(&shipped).unwrap();
    for (from, to) in edits {
        assert!(
            text.contains(from),
            "conf/{name} no longer contains {from:?}"
        );
        text = text.replace(from, to);
    }
    let text = text.replace("${SESSION_SECRET}", KEY_A);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    run_cli(&["-c", path.to_str().unwrap(), "--test"], dir.path())
}
