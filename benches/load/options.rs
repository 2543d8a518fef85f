//! Command-line options of the load bench (the arguments after `--` in
//! `cargo bench --bench load -- ...`). `--help` prints them.

use std::path::PathBuf;
use std::time::Duration;

pub const HELP: &str = "\
session-gateway load benchmark: what a session costs, next to a bare proxy

usage: cargo bench --bench load -- [options]

  --stores LIST         stores to run, comma-separated; `baseline` (the same
                        gateway with sessions off on every path) always runs
                        first unless --no-baseline
                        [baseline,memory,filesystem,redis,sqlite,postgres,mysql]
  --scenarios LIST      read,write,new,read-4k,read-rate,read-c256 [all]
                          read       live session, read-only (the common case)
                          write      like read, WRITE-RATIO of requests patch
                          new        no cookie; the app creates a session
                          read-4k    read with LARGE-SIZE sessions
                          read-rate  read at a fixed request rate (RATE), so
                                     every store is compared at the same load
                          read-c256  read over HIGH-CONNECTIONS connections
  --focus-stores LIST   stores that also run read-rate and read-c256
                        [baseline,memory,redis]
  --rate N              req/s of read-rate [half the baseline's read req/s
                        in this run, or 5000 without one]
  --duration D          measured time per scenario [4s]
  --warmup D            unmeasured load before it [1s]
  --connections N       connections of the standard scenarios [64]
  --high-connections N  connections of read-c256 [256]
  --clients N           virtual clients (sessions) per connection [16]
  --size BYTES          session data size [100]
  --large-size BYTES    session data size of read-4k [4096]
  --write-ratio R       share of writes in `write`, 0..1 [0.1]
  --gateway-threads N   `server.threads` of the gateway [1]
  --client-threads N    threads of the load generator + app [1]
  --rounds N            run the whole matrix N times (baseline and stores
                        interleaved) and report each scenario's median [1]
  --gateway PATH        test another build of the gateway (e.g. an older
                        commit's target/release/session-gateway)
  --out DIR             where JSON results go [<target>/bench-results]
  --quick               --duration 2s --warmup 500ms
  --no-baseline         skip the baseline (no ratios)
  --hold D              instead of measuring, keep each gateway up for D with
                        its sessions created and print its address, pid and
                        a cookie (for wrk, perf, valgrind by hand)
  --compare OLD NEW     compare two result files and exit
  -h, --help            this text

Durations: 500ms, 2s, 1m. Everything listens on 127.0.0.1; a private
redis-server is started on a free port; SQL stores use a table of their own
(postgres://postgres@127.0.0.1:5432/test, mysql://root@127.0.0.1:3306/test,
a temporary SQLite file). A store that does not start is reported and
skipped.
";

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
}

impl Default for Options {
    fn default() -> Self {
        let list = |s: &[&str]| s.iter().map(|x| x.to_string()).collect();
        Options {
            stores: list(&crate::stores::ALL),
            scenarios: list(&SCENARIOS),
            focus_stores: list(&["baseline", "memory", "redis"]),
            rate: None,
            duration: Duration::from_secs(4),
            warmup: Duration::from_secs(1),
            connections: 64,
            high_connections: 256,
            clients: 16,
            size: 100,
            large_size: 4096,
            write_ratio: 0.1,
            gateway_threads: 1,
            client_threads: 1,
            out: None,
            baseline: true,
            compare: None,
            hold: None,
            rounds: 1,
            gateway: None,
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

fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|x| x.trim().to_ascii_lowercase())
        .filter(|x| !x.is_empty())
        .collect()
}

impl Options {
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Options>, String> {
        let mut o = Options::default();
        let mut args = args.into_iter();
        let mut explicit_duration = false;
        let mut explicit_warmup = false;
        let mut quick = false;
        while let Some(arg) = args.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            let number = |v: String| {
                v.parse::<usize>()
                    .map_err(|_| format!("{name}: `{v}` is not a number"))
            };
            match name.as_str() {
                "-h" | "--help" => return Ok(None),
                // cargo bench passes --bench to every bench binary.
                "--bench" => {}
                "--stores" => o.stores = list(&value()?),
                "--scenarios" => {
                    o.scenarios = list(&value()?)
                        .into_iter()
                        .map(|s| if s == "c256" { "read-c256".into() } else { s })
                        .collect()
                }
                "--focus-stores" => o.focus_stores = list(&value()?),
                "--rate" => {
                    let v = value()?;
                    o.rate = Some(
                        v.parse::<f64>()
                            .ok()
                            .filter(|r| *r >= 1.0 && *r <= 1e6)
                            .ok_or_else(|| format!("--rate: `{v}` is not in 1..1000000"))?,
                    );
                }
                "--duration" => {
                    o.duration = parse_duration(&value()?)?;
                    explicit_duration = true;
                }
                "--warmup" => {
                    o.warmup = parse_duration(&value()?)?;
                    explicit_warmup = true;
                }
                "--connections" => o.connections = number(value()?)?,
                "--high-connections" => o.high_connections = number(value()?)?,
                "--clients" => o.clients = number(value()?)?,
                "--size" => o.size = number(value()?)?,
                "--large-size" => o.large_size = number(value()?)?,
                "--write-ratio" => {
                    let v = value()?;
                    o.write_ratio = v
                        .parse::<f64>()
                        .ok()
                        .filter(|r| (0.0..=1.0).contains(r))
                        .ok_or_else(|| format!("--write-ratio: `{v}` is not in 0..1"))?;
                }
                "--gateway-threads" => o.gateway_threads = number(value()?)?,
                "--client-threads" => o.client_threads = number(value()?)?,
                "--rounds" => o.rounds = number(value()?)?,
                "--gateway" => o.gateway = Some(PathBuf::from(value()?)),
                "--out" => o.out = Some(PathBuf::from(value()?)),
                "--quick" => quick = true,
                "--no-baseline" => o.baseline = false,
                "--hold" => o.hold = Some(parse_duration(&value()?)?),
                "--compare" => {
                    let old = PathBuf::from(value()?);
                    let new = PathBuf::from(
                        args.next()
                            .ok_or("--compare needs two files: OLD.json NEW.json")?,
                    );
                    o.compare = Some((old, new));
                }
                other => return Err(format!("unknown option `{other}` (see --help)")),
            }
        }
        if quick {
            if !explicit_duration {
                o.duration = Duration::from_secs(2);
            }
            if !explicit_warmup {
                o.warmup = Duration::from_millis(500);
            }
        }
        for s in o.stores.iter().chain(&o.focus_stores) {
            if !crate::stores::ALL.contains(&s.as_str()) {
                return Err(format!(
                    "unknown store `{s}` (known: {})",
                    crate::stores::ALL.join(", ")
                ));
            }
        }
        for s in &o.scenarios {
            if !SCENARIOS.contains(&s.as_str()) {
                return Err(format!(
                    "unknown scenario `{s}` (known: {})",
                    SCENARIOS.join(", ")
                ));
            }
        }
        if o.connections == 0 || o.high_connections == 0 || o.clients == 0 {
            return Err(
                "--connections, --high-connections and --clients must be at least 1".into(),
            );
        }
        if o.rounds == 0 || o.rounds > 20 {
            return Err("--rounds must be in 1..=20".into());
        }
        if o.gateway_threads == 0 || o.client_threads == 0 {
            return Err("thread counts must be at least 1".into());
        }
        if o.duration.is_zero() {
            return Err("--duration must be more than 0".into());
        }
        if o.size > 60_000 || o.large_size > 60_000 {
            return Err("session sizes above 60000 bytes exceed what a header carries".into());
        }
        // The baseline runs first; it is never a store under test twice.
        o.stores.retain(|s| s != "baseline");
        if o.baseline {
            o.stores.insert(0, "baseline".into());
        }
        o.stores.dedup();
        Ok(Some(o))
    }
}
