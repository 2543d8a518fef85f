//! Command-line options of the load bench (the arguments after `--` in
//! `cargo bench --bench load -- ...`), through clap. `--help` prints them.

use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

pub const SCENARIOS: [&str; 6] = ["read", "write", "new", "read-4k", "read-rate", "read-c256"];

#[derive(Clone, Debug)]
pub struct Options {
    pub stores: Vec<String>,
    pub scenarios: Vec<String>,
    pub focus_stores: Vec<String>,
    pub rate: Option<f64>,
    pub duration: Duration,
    pub warmup: Duration,
    pub connections: usize,
    pub high_connections: usize,
    pub clients: usize,
    pub size: usize,
    pub large_size: usize,
    pub write_ratio: f64,
    pub gateway_threads: usize,
    pub client_threads: usize,
    pub out: Option<PathBuf>,
    pub baseline: bool,
    pub compare: Option<(PathBuf, PathBuf)>,
    pub hold: Option<Duration>,
    pub rounds: usize,
    pub gateway: Option<PathBuf>,
    /// `--soak D`: soak `soak_stores` for D each instead of the matrix.
    pub soak: Option<Duration>,
    pub soak_stores: Vec<String>,
    pub soak_max_requests: u64,
    /// `--alternate A,B`: only A and B, taking turns every `slice`; then
    /// `stores` is `[A, B]`.
    pub alternate: bool,
    pub slice: Duration,
    /// Gateway on a CPU of its own, everything else on the others.
    pub pin: bool,
    /// `session.seal_cache` of the sealed variants (None: the default).
    pub seal_cache: Option<usize>,
}

impl Default for Options {
    fn default() -> Self {
        let list = |s: &[&str]| s.iter().map(|x| x.to_string()).collect();
        Options {
            stores: list(&crate::stores::ALL),
            scenarios: list(&SCENARIOS),
            focus_stores: list(&["baseline", "memory", "redis", "redis-near"]),
            rate: None,
            duration: Duration::from_secs(4),
            warmup: Duration::from_secs(1),
            connections: 64,
            high_connections: 256,
            clients: 16,
            size: 1024,
            large_size: 4096,
            write_ratio: 0.1,
            gateway_threads: 1,
            client_threads: 1,
            out: None,
            baseline: true,
            compare: None,
            hold: None,
            rounds: 3,
            alternate: false,
            slice: Duration::from_millis(200),
            pin: true,
            seal_cache: None,
            gateway: None,
            soak: None,
            soak_stores: list(&["memory", "redis"]),
            soak_max_requests: 50_000_000,
        }
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (500ms, 2s, 1m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("`{s}`: unit must be ms, s or m")),
    };
    if !(0.0..=3600.0).contains(&secs) {
        return Err(format!("`{s}` is out of range (0..1h)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// What the rest of the bench reads: `Args` after defaults and checks.
#[derive(Parser, Debug)]
#[command(
    name = "cargo bench --bench load --",
    about = "session-gateway load benchmark: what a session costs, next to a bare proxy",
    after_help = "Durations: 500ms, 2s, 1m. Everything listens on 127.0.0.1; a private \
redis-server, memcached or moto_server (dynamodb) is started on a free port; SQL stores use a table of their own \
(postgres://postgres@127.0.0.1:5432/test, mysql://root@127.0.0.1:3306/test, \
a temporary SQLite file). A store that does not start is reported and skipped."
)]
struct Args {
    /// Stores to run, comma-separated; `baseline` (the same gateway with
    /// sessions off on every path) always runs first unless --no-baseline.
    /// Every gateway runs with the default logging (access log on, to a
    /// file) and an admin listener whose /metrics the bench scrapes once a
    /// second. Variants that run `read` only: baseline-quiet (the baseline
    /// with access_log: false and no admin listener), memory-sealed and
    /// redis-sealed (memory and redis with session.seal: true). With
    /// --soak: the stores to soak [default: every store; with --soak:
    /// memory,redis]
    #[arg(long, value_delimiter = ',')]
    stores: Option<Vec<String>>,
    /// read, write, new, read-4k, read-rate, read-c256 [default: all].
    /// read: live session, read-only; write: like read, WRITE-RATIO of
    /// requests patch; new: no cookie, the app creates a session; read-4k:
    /// read with LARGE-SIZE sessions; read-rate: read at a fixed RATE, so
    /// every store is compared at the same load; read-c256: read over
    /// HIGH-CONNECTIONS connections
    #[arg(long, value_delimiter = ',')]
    scenarios: Option<Vec<String>>,
    /// Stores that also run read-rate and read-c256
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "baseline,memory,redis,redis-near"
    )]
    focus_stores: Vec<String>,
    /// Req/s of read-rate [default: half the baseline's read req/s in this
    /// run, or 5000 without one]
    #[arg(long, value_parser = rate)]
    rate: Option<f64>,
    /// Measured time per scenario [default: 4s, 2s with --quick]
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Unmeasured load before it [default: 1s, 500ms with --quick]
    #[arg(long, value_parser = parse_duration)]
    warmup: Option<Duration>,
    /// Connections of the standard scenarios
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    connections: usize,
    /// Connections of read-c256
    #[arg(long, default_value_t = 256, value_parser = at_least_one)]
    high_connections: usize,
    /// Virtual clients (sessions) per connection
    #[arg(long, default_value_t = 16, value_parser = at_least_one)]
    clients: usize,
    /// Session data size in bytes. 1024 (1 KiB) by default because the
    /// read and write targets are stated for 1 KiB sessions; with another
    /// size they are printed as INFO, not PASS/MISS
    #[arg(long, default_value_t = 1024, value_parser = session_size)]
    size: usize,
    /// Session data size of read-4k
    #[arg(long, default_value_t = 4096, value_parser = session_size)]
    large_size: usize,
    /// Share of writes in `write`, 0..1
    #[arg(long, default_value_t = 0.1, value_parser = ratio)]
    write_ratio: f64,
    /// `server.threads` of the gateway
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    gateway_threads: usize,
    /// Threads of the load generator + app
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    client_threads: usize,
    /// Run the whole matrix N times (baseline and stores interleaved) and
    /// report each scenario's median; the req/s and p99 targets need at
    /// least 3 (fewer: printed as INFO) [default: 3, 1 with --quick]
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=20))]
    rounds: Option<u8>,
    /// Test another build of the gateway (e.g. an older commit's
    /// target/release/session-gateway)
    #[arg(long)]
    gateway: Option<PathBuf>,
    /// Where JSON results go [default: <target>/bench-results]
    #[arg(long)]
    out: Option<PathBuf>,
    /// --duration 2s --warmup 500ms --rounds 1 (a quick look: the targets
    /// are then INFO)
    #[arg(long)]
    quick: bool,
    /// Skip the baseline (no ratios)
    #[arg(long)]
    no_baseline: bool,
    /// Instead of measuring, keep each gateway up for D with its sessions
    /// created and print its address, pid and a cookie (for wrk, perf,
    /// valgrind by hand)
    #[arg(long, value_parser = parse_duration)]
    hold: Option<Duration>,
    /// Instead of the matrix, soak each store of --stores (default:
    /// memory,redis) in turn for D (e.g. 10m) with the `write` mix
    /// (WRITE-RATIO writes, CONNECTIONS connections, SIZE sessions), one
    /// gateway per store; every min(D/10, 30s) print the gateway's RSS
    /// (VmRSS) and the p99 of that interval, then the verdict: RSS at the
    /// end vs after warm-up (the first sample at 10% of D), flat = at most
    /// 10% growth
    #[arg(long, value_parser = parse_duration)]
    soak: Option<Duration>,
    /// A soak also ends at the first sample after this many requests
    #[arg(long, default_value_t = 50_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    soak_max_requests: u64,
    /// Instead of the matrix, run two gateways at once, A and B, under one
    /// load that switches between them every SLICE, for every scenario of
    /// --scenarios they both run (not read-rate), ROUNDS times: each turn
    /// reports B's req/s as a share of A's over the same seconds, which
    /// cancels the machine's changes of speed that separate runs suffer
    /// (A,A shows the noise left). E.g. --alternate baseline,memory or
    /// memory,memory-sealed. Results: alternate-<time>.json
    #[arg(long, value_delimiter = ',', num_args = 1, value_names = ["A,B"])]
    alternate: Option<Vec<String>>,
    /// Length of each gateway's turn with --alternate
    #[arg(long, value_parser = parse_duration, default_value = "200ms")]
    slice: Duration,
    /// Let the kernel place the gateway and the load generator on any CPU.
    /// By default (with 2 CPUs or more) the gateway runs on the last CPU
    /// and the bench (load generator, app, store servers) on the others:
    /// left to the scheduler, the two share a CPU part of the time, and on
    /// a 2-CPU VM that made two runs of the same gateway differ by up to
    /// 35% (an A/A pair: 84-119% unpinned, 95-104% pinned)
    #[arg(long)]
    no_pin: bool,
    /// `session.seal_cache` of memory-sealed and redis-sealed [default: the
    /// gateway's default, 0 (off)]
    #[arg(long)]
    seal_cache: Option<usize>,
    /// Compare two result files and exit
    #[arg(long, num_args = 2, value_names = ["OLD", "NEW"])]
    compare: Option<Vec<PathBuf>>,
    /// Passed to every bench binary by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{s}` is not a number of at least 1")),
    }
}

fn session_size(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n <= 60_000 => Ok(n),
        _ => Err(format!(
            "`{s}`: sessions above 60000 bytes exceed what a header carries"
        )),
    }
}

fn ratio(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|r| (0.0..=1.0).contains(r))
        .ok_or_else(|| format!("`{s}` is not in 0..1"))
}

fn rate(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|r| (1.0..=1e6).contains(r))
        .ok_or_else(|| format!("`{s}` is not in 1..1000000"))
}

fn lower(list: Vec<String>) -> Vec<String> {
    list.into_iter()
        .map(|x| x.trim().to_ascii_lowercase())
        .filter(|x| !x.is_empty())
        .collect()
}

fn known(what: &str, given: &[String], known: &[&str]) -> Result<(), String> {
    match given.iter().find(|s| !known.contains(&s.as_str())) {
        Some(s) => Err(format!(
            "unknown {what} `{s}` (known: {})",
            known.join(", ")
        )),
        None => Ok(()),
    }
}

impl Options {
    /// Parse the bench's arguments; `--help` prints and exits.
    pub fn parse() -> Result<Options, String> {
        Self::from_args(Args::parse())
    }

    fn from_args(a: Args) -> Result<Options, String> {
        let d = Options::default();
        let (duration, warmup, rounds) = if a.quick {
            (Duration::from_secs(2), Duration::from_millis(500), 1)
        } else {
            (d.duration, d.warmup, d.rounds)
        };
        let stores = a.stores.map(lower);
        let mut o = Options {
            soak_stores: stores.clone().unwrap_or(d.soak_stores),
            stores: stores.unwrap_or(d.stores),
            scenarios: a
                .scenarios
                .map(|l| {
                    lower(l)
                        .into_iter()
                        .map(|s| if s == "c256" { "read-c256".into() } else { s })
                        .collect()
                })
                .unwrap_or(d.scenarios),
            focus_stores: lower(a.focus_stores),
            rate: a.rate,
            duration: a.duration.unwrap_or(duration),
            warmup: a.warmup.unwrap_or(warmup),
            connections: a.connections,
            high_connections: a.high_connections,
            clients: a.clients,
            size: a.size,
            large_size: a.large_size,
            write_ratio: a.write_ratio,
            gateway_threads: a.gateway_threads,
            client_threads: a.client_threads,
            out: a.out,
            baseline: !a.no_baseline,
            compare: a.compare.map(|pair| (pair[0].clone(), pair[1].clone())),
            hold: a.hold,
            rounds: a.rounds.map_or(rounds, usize::from),
            gateway: a.gateway,
            soak: a.soak,
            soak_max_requests: a.soak_max_requests,
            alternate: a.alternate.is_some(),
            slice: a.slice,
            pin: !a.no_pin,
            seal_cache: a.seal_cache,
        };
        known("store", &o.stores, &crate::stores::ALL)?;
        if o.soak.is_some_and(|d| d < Duration::from_secs(1)) {
            return Err("--soak must be at least 1s".into());
        }
        known("store", &o.focus_stores, &crate::stores::ALL)?;
        known("scenario", &o.scenarios, &SCENARIOS)?;
        if o.duration.is_zero() {
            return Err("--duration must be more than 0".into());
        }
        if let Some(pair) = a.alternate.map(lower) {
            if pair.len() != 2 {
                return Err("--alternate takes two stores: A,B".into());
            }
            known("store", &pair, &crate::stores::ALL)?;
            if o.slice < Duration::from_millis(10) {
                return Err("--slice must be at least 10ms".into());
            }
            // Just the pair, in the order given (A,A allowed).
            o.stores = pair;
            return Ok(o);
        }
        // The baseline runs first; it is never a store under test twice.
        o.stores.retain(|s| s != "baseline");
        if o.baseline {
            o.stores.insert(0, "baseline".into());
        }
        o.stores.dedup();
        Ok(o)
    }
}
