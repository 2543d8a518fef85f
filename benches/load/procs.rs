//! Child processes of the bench: the gateway under test (the same binary
//! users run, built by `cargo bench`) and private store servers
//! (`redis-server`, `memcached`, SecantusDB for MongoDB, moto's `moto_server`
//! for DynamoDB). Every
//! child is killed on drop and also when the bench process dies
//! (`PR_SET_PDEATHSIG`), so an interrupted run leaves nothing behind.

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The gateway under test: the binary `cargo bench` built (the same one
/// users run), unless `--gateway PATH` chose another build to compare.
pub fn gateway_binary() -> &'static str {
    GATEWAY
        .get()
        .map(String::as_str)
        .unwrap_or(env!("CARGO_BIN_EXE_session-gateway"))
}

static GATEWAY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Use `path` as the gateway binary for this run.
pub fn set_gateway_binary(path: String) {
    let _ = GATEWAY.set(path);
}

/// With `--pin`: the CPU the gateway runs on, and how many CPUs this
/// process could use before pinning itself to the others.
static PINNED: std::sync::OnceLock<(usize, usize)> = std::sync::OnceLock::new();

/// Pin the gateway to the last CPU this process may use and this process
/// (load generator, app, and the store servers it starts) to the others.
/// Call before any thread or child is started: they inherit the calling
/// thread's CPUs. Needs at least two CPUs.
pub fn pin() -> Result<(), String> {
    let allowed = affinity().map_err(|e| format!("sched_getaffinity: {e}"))?;
    let Some((&gateway, others)) = allowed.split_last().filter(|(_, o)| !o.is_empty()) else {
        return Err(format!("{} CPU(s) only", allowed.len()));
    };
    set_affinity(others).map_err(|e| format!("sched_setaffinity: {e}"))?;
    let _ = PINNED.set((gateway, allowed.len()));
    Ok(())
}

/// CPUs this process could use before it pinned itself to fewer.
pub fn machine_cpus() -> usize {
    PINNED.get().map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |&(_, cpus)| cpus,
    )
}

/// The gateway's CPU, if pinned.
pub fn gateway_cpu() -> Option<usize> {
    PINNED.get().map(|&(cpu, _)| cpu)
}

/// The CPUs the calling thread may run on.
fn affinity() -> std::io::Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set, filled in by
    // sched_getaffinity for this thread; CPU_ISSET only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect())
    }
}

/// Restrict the calling thread (and what it starts later) to `cpus`.
fn set_affinity(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and
    // sched_setaffinity only touch it and this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral loopback port")
}

/// Spawn with the child dying with us; stdout and stderr go to `log`, a
/// file (never a pipe nobody reads), opened for appending so that
/// [`trim_log`] can empty it under a running process.
fn spawn(cmd: &mut Command, log: &Path) -> std::io::Result<Child> {
    let _ = std::fs::remove_file(log);
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: prctl is async-signal-safe and touches only this process.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn()
}

fn wait_listening(child: &mut Child, port: u16, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status} at start"));
        }
        if Instant::now() > deadline {
            return Err(format!("did not listen within {within:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An access log line (text or JSON): one per request, no diagnosis.
fn is_access_line(line: &str) -> bool {
    line.contains(" INFO access ") || line.contains("\"message\":\"access\"")
}

/// The last `n` lines of a log file other than access log lines, for
/// error reports.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !is_access_line(l)).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Empty a log file above `max` bytes (like logrotate's `copytruncate`):
/// a long soak writes an access log line per request. The writer appends,
/// so it goes on at the new end.
pub fn trim_log(path: &Path, max: u64) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > max) {
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(path) {
            let _ = f.set_len(0);
        }
    }
}

/// A running process, killed on drop.
pub struct Proc {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `session-gateway -c <config> --test`: does the store start? Bounded to
/// 30 s; the error is the gateway's own one-line message.
pub fn check_config(config: &Path, dir: &Path) -> Result<(), String> {
    let log = dir.join("check.log");
    let mut child = spawn(
        Command::new(gateway_binary())
            .arg("-c")
            .arg(config)
            .arg("--test")
            .current_dir(dir)
            .env_remove("RUST_LOG"),
        &log,
    )
    .map_err(|e| format!("cannot run {}: {e}", gateway_binary()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(_)) => {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let line = text
                    .lines()
                    .rev()
                    .find(|l| l.starts_with("error"))
                    .or_else(|| text.lines().last())
                    .unwrap_or("no output")
                    .to_string();
                return Err(format!("`--test` failed: {line}"));
            }
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("`--test` did not finish within 30s".into());
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for `--test`: {e}")),
        }
    }
}

/// Start the gateway with the config at `config` (which must listen on
/// `port`), working directory `dir`.
pub fn start_gateway(config: &Path, dir: &Path, port: u16) -> Result<Proc, String> {
    let log = dir.join("gateway.log");
    let mut cmd = Command::new(gateway_binary());
    cmd.arg("-c")
        .arg(config)
        .current_dir(dir)
        .env_remove("RUST_LOG");
    if let Some(cpu) = gateway_cpu() {
        // SAFETY: sched_setaffinity is a system call, async-signal-safe.
        unsafe {
            cmd.pre_exec(move || set_affinity(&[cpu]));
        }
    }
    let mut child =
        spawn(&mut cmd, &log).map_err(|e| format!("cannot run {}: {e}", gateway_binary()))?;
    match wait_listening(&mut child, port, Duration::from_secs(20)) {
        Ok(()) => Ok(Proc { child, port, log }),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("gateway {e}:\n{}", tail(&log, 10)))
        }
    }
}

/// A private `redis-server` on a free port in `dir`: nothing saved, no
/// append-only file. Never the shared one on 6379.
pub fn start_redis(dir: &Path) -> Result<Proc, String> {
    start_server("redis-server", dir, |port| {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--protected-mode", "yes"])
            .arg("--dir")
            .arg(dir);
        cmd
    })
}

/// A private `memcached` on a free port: one worker thread (like Redis),
/// 256 MiB so no session is evicted during a run. Never a shared one on
/// 11211.
pub fn start_memcached(dir: &Path) -> Result<Proc, String> {
    start_server("memcached", dir, |port| {
        let mut cmd = Command::new("memcached");
        // As root memcached insists on -u; `root` keeps our credentials
        // and with them the parent-death signal.
        if unsafe { libc::geteuid() } == 0 {
            cmd.args(["-u", "root"]);
        }
        cmd.args(["-l", "127.0.0.1", "-p", &port.to_string()])
            .args(["-U", "0", "-m", "256", "-t", "1"]);
        cmd
    })
}

/// A private `moto_server` (moto's DynamoDB stand-in, all state in its
/// memory) on a free port, from the Python environment `./scripts/test`
/// creates (`SGW_TEST_VENV`, default `target/test-venv`).
pub fn start_moto(dir: &Path) -> Result<Proc, String> {
    let venv = std::env::var_os("SGW_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv"));
    let bin = venv.join("bin/moto_server");
    if !bin.exists() {
        return Err(format!(
            "no {}: ./scripts/test creates that environment (or set SGW_TEST_VENV)",
            bin.display()
        ));
    }
    start_server("moto_server", dir, |port| {
        let mut cmd = Command::new(&bin);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        cmd
    })
}

/// Start the store server `program` (also its Debian package) as
/// `command(port)` on a free port, logging to `dir/<program>.log`, and
/// wait until it listens.
fn start_server(
    program: &str,
    dir: &Path,
    command: impl Fn(u16) -> Command,
) -> Result<Proc, String> {
    let port = free_port();
    let log = dir.join(format!("{program}.log"));
    let mut child = spawn(command(port).current_dir(dir), &log).map_err(|e| {
        format!(
            "cannot run {program} ({e}); install it (scripts/test does: apt-get install {program})"
        )
    })?;
    match wait_listening(&mut child, port, Duration::from_secs(10)) {
        Ok(()) => Ok(Proc { child, port, log }),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("{program} {e}:\n{}", tail(&log, 5)))
        }
    }
}

/// A private SecantusDB (`secantusd-py`, a MongoDB wire-compatible server)
/// on a free port with its data in `dir`, from the Python environment
/// `./scripts/test` creates (`SGW_TEST_VENV`, default `target/test-venv`).
pub fn start_secantus(dir: &Path) -> Result<Proc, String> {
    let venv = std::env::var_os("SGW_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv"));
    let bin = venv.join("bin/secantusd-py");
    // An explicit empty config: otherwise it reads ./secantusd.toml or
    // ~/.secantus/secantusd.toml if there is one.
    let config = dir.join("empty.toml");
    std::fs::write(&config, "").map_err(|e| e.to_string())?;
    let port = free_port();
    let log = dir.join("secantusd.log");
    let mut child = spawn(
        Command::new(&bin)
            .arg("--config")
            .arg(&config)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--storage-path")
            .arg(dir.join("data"))
            .args(["--log-level", "WARNING"])
            .current_dir(dir),
        &log,
    )
    .map_err(|e| {
        format!(
            "cannot run {} ({e}); ./scripts/test creates that environment (or set SGW_TEST_VENV)",
            bin.display()
        )
    })?;
    match wait_listening(&mut child, port, Duration::from_secs(20)) {
        Ok(()) => Ok(Proc { child, port, log }),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("secantusd-py {e}:\n{}", tail(&log, 5)))
        }
    }
}
