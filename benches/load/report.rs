//! Results: the per-scenario [`Outcome`], the printed tables, the targets
//! (PASS/MISS), the JSON files under `<target>/bench-results/`, and
//! `--compare` of two such files.

use crate::options::Options;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Outcome {
    pub store: String,
    pub scenario: String,
    pub connections: usize,
    /// Session data size (0 for the baseline).
    pub session_bytes: usize,
    pub write_ratio: f64,
    pub new_visitors: bool,
    /// Offered req/s of a paced scenario (read-rate); None = as fast as
    /// the gateway answers.
    #[serde(default)]
    pub target_rate: Option<f64>,
    /// Distinct live sessions the load cycled through.
    pub sessions: usize,
    /// Measured wall time.
    pub seconds: f64,
    /// 2xx responses completed inside the measured window.
    pub requests: u64,
    pub writes: u64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Gateway user+system CPU per request (all its threads).
    pub gateway_cpu_us_per_req: Option<f64>,
    /// Gateway CPU use in cores (1.0 = its proxy thread was saturated).
    pub gateway_cpu_cores: Option<f64>,
    /// CPU per request of a private store server (redis-server, memcached), which
    /// shares the machine's CPUs with the gateway.
    #[serde(default)]
    pub store_cpu_us_per_req: Option<f64>,
    /// CPU of the bench process (load generator + app), in cores.
    pub client_cpu_cores: Option<f64>,
    /// Gateway VmHWM at the end of the scenario.
    pub peak_rss_mib: Option<f64>,
    /// Share of app requests that arrived with session data (must be 1.0
    /// for read scenarios: proves sessions were really loaded).
    pub session_hit_ratio: Option<f64>,
    /// Successful scrapes of the gateway's `/metrics` during the measured
    /// window (one a second); None: no admin listener (baseline-quiet).
    #[serde(default)]
    pub metrics_scrapes: Option<u64>,
    /// req/s relative to the baseline of the same scenario in this run.
    pub rps_ratio: Option<f64>,
    /// p99 minus the baseline's p99 (same scenario, same connections).
    pub p99_delta_us: Option<f64>,
    /// The baseline's CPU per request over this one's: the req/s ratio to
    /// expect where the gateway's CPU is the limit, and much steadier than
    /// req/s on a busy machine.
    #[serde(default)]
    pub cpu_ratio: Option<f64>,
    /// req/s of every round (with `--rounds`); the outcome is the median.
    #[serde(default)]
    pub rps_rounds: Vec<f64>,
    /// The round (0-based) this outcome was measured in; for a median, the
    /// median round's.
    #[serde(default)]
    pub round: usize,
    /// `rps_ratio` of every round: this round's req/s over the baseline's
    /// of the same round (measured just before it). `rps_ratio` is their
    /// median.
    #[serde(default)]
    pub ratio_rounds: Vec<f64>,
}

/// With several rounds, keep per (store, scenario) the round with the
/// median req/s, noting every round's req/s.
pub fn median_of_rounds(all: Vec<Outcome>) -> Vec<Outcome> {
    let mut groups: Vec<Vec<Outcome>> = Vec::new();
    for r in all {
        match groups
            .iter_mut()
            .find(|g| g[0].store == r.store && g[0].scenario == r.scenario)
        {
            Some(g) => g.push(r),
            None => groups.push(vec![r]),
        }
    }
    groups
        .into_iter()
        .map(|mut g| {
            let rounds: Vec<f64> = g.iter().map(|r| r.rps).collect();
            g.sort_by(|a, b| a.rps.total_cmp(&b.rps));
            let mut median = g.swap_remove(g.len() / 2);
            median.rps_rounds = rounds;
            median
        })
        .collect()
}

pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub loadavg: f64,
    pub git: Option<String>,
}

impl Machine {
    pub fn read() -> Self {
        let git = std::process::Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        Machine {
            cpus: crate::procs::machine_cpus(),
            cpu_model: crate::procstat::cpu_model(),
            kernel: crate::procstat::kernel(),
            loadavg: crate::procstat::loadavg(),
            git,
        }
    }

    pub fn describe(&self, o: &Options) -> String {
        let timing = match o.soak {
            Some(d) => format!("soak: {} per store", fmt_dur(d)),
            None => format!(
                "{} per scenario after {} warm-up, {} round(s)",
                fmt_dur(o.duration),
                fmt_dur(o.warmup),
                o.rounds
            ),
        };
        let placement = match crate::procs::gateway_cpu() {
            Some(cpu) => format!(
                "gateway pinned to CPU {cpu}, load generator + app + store servers to the others (--no-pin: anywhere)"
            ),
            None => "not pinned: the kernel places gateway and load generator".into(),
        };
        format!(
            "session-gateway load bench ({})\n\
             machine: {} CPU(s), {}, Linux {}, load average {:.2} at start\n\
             gateway: {} ({} proxy thread(s)); load generator + app: {} thread(s) in this process\n\
             {placement}\n\
             {timing}; {} virtual clients per connection",
            self.git.as_deref().unwrap_or("unknown commit"),
            self.cpus,
            self.cpu_model,
            self.kernel,
            self.loadavg,
            crate::procs::gateway_binary(),
            o.gateway_threads,
            o.client_threads,
            o.clients,
        )
    }
}

pub fn fmt_dur(d: std::time::Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

pub fn ms(us: f64) -> String {
    format!("{:.2}", us / 1000.0)
}

pub fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or("-".into(), f)
}

pub fn progress_header() -> String {
    format!(
        "{:<14} {:<9} {:>5} {:>5} {:>4} {:>9} {:>7} {:>7} {:>7} {:>6} {:>7} {:>5} {:>6} {:>5}",
        "store",
        "scenario",
        "conns",
        "bytes",
        "wr%",
        "req/s",
        "p50 ms",
        "p99 ms",
        "p99.9",
        "errors",
        "µs/req",
        "gwCPU",
        "RSS MB",
        "sess%"
    )
}

pub fn progress_line(r: &Outcome) -> String {
    format!(
        "{:<14} {:<9} {:>5} {:>5} {:>4} {:>9.0} {:>7} {:>7} {:>7} {:>6} {:>7} {:>5} {:>6} {:>5}",
        r.store,
        r.scenario,
        r.connections,
        if r.new_visitors || r.session_bytes > 0 {
            r.session_bytes.to_string()
        } else {
            "-".into()
        },
        if r.new_visitors {
            "new".to_string()
        } else {
            format!("{:.0}", r.write_ratio * 100.0)
        },
        r.rps,
        ms(r.p50_us),
        ms(r.p99_us),
        ms(r.p999_us),
        r.errors,
        opt(r.gateway_cpu_us_per_req, |v| format!("{v:.1}")),
        opt(r.gateway_cpu_cores, |v| format!("{v:.2}")),
        opt(r.peak_rss_mib, |v| format!("{v:.1}")),
        opt(r.session_hit_ratio, |v| format!("{:.0}", v * 100.0)),
    )
}

/// The baseline outcome a store's outcome is compared with: the same
/// scenario, or (read-4k, which the baseline does not run) its `read` at
/// the same number of connections.
fn baseline_for<'a>(all: &'a [Outcome], r: &Outcome) -> Option<&'a Outcome> {
    let base = |name: &str| {
        all.iter()
            .find(|b| b.store == "baseline" && b.scenario == name && b.connections == r.connections)
    };
    base(&r.scenario).or_else(|| base("read").filter(|_| !r.new_visitors && r.write_ratio == 0.0))
}

/// The median of `values` (the mean of the middle two for an even count);
/// None for none.
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// `f(a, b)` for every round in which both `a` and `b` (found among that
/// round's outcomes) were measured, in round order.
fn per_round(
    rounds: &[Outcome],
    a: impl Fn(&Outcome) -> bool,
    b: impl Fn(&Outcome) -> bool,
    f: impl Fn(&Outcome, &Outcome) -> Option<f64>,
) -> Vec<f64> {
    rounds
        .iter()
        .filter(|x| a(x))
        .filter_map(|x| {
            let y = rounds.iter().find(|y| y.round == x.round && b(y))?;
            f(x, y)
        })
        .collect()
}

/// req/s of (`store`, `scenario`) over `of`'s in the same scenario, round
/// by round: each pair was measured minutes apart at most (the stores of a
/// scenario run one after the other in each round), so a change in the
/// machine's speed between rounds, which moves req/s by tens of percent on
/// a shared VM, cancels out of each ratio.
pub fn paired_rps_ratios(rounds: &[Outcome], store: &str, of: &str, scenario: &str) -> Vec<f64> {
    per_round(
        rounds,
        |x| x.store == store && x.scenario == scenario,
        |y| y.store == of && y.scenario == scenario,
        |x, y| (y.rps > 0.0).then(|| x.rps / y.rps),
    )
}

/// Relate every (median) outcome to the baseline, from the outcomes of
/// every round: `rps_ratio`, `cpu_ratio` and `p99_delta_us` are medians of
/// the per-round comparisons with the baseline measured in the same round
/// (see [`paired_rps_ratios`]), not comparisons of the medians.
pub fn relate_to_baseline(all: &mut [Outcome], rounds: &[Outcome]) {
    let snapshot = all.to_vec();
    for r in all.iter_mut() {
        let Some(b) = baseline_for(&snapshot, r) else {
            continue;
        };
        let mine = |x: &Outcome| x.store == r.store && x.scenario == r.scenario;
        let base = |y: &Outcome| {
            y.store == b.store && y.scenario == b.scenario && y.connections == b.connections
        };
        r.ratio_rounds = per_round(rounds, mine, base, |x, y| {
            (y.rps > 0.0).then(|| x.rps / y.rps)
        });
        r.rps_ratio = median(r.ratio_rounds.clone());
        r.p99_delta_us = median(per_round(rounds, mine, base, |x, y| {
            Some(x.p99_us - y.p99_us)
        }));
        r.cpu_ratio = median(per_round(rounds, mine, base, |x, y| {
            Some(y.gateway_cpu_us_per_req? / x.gateway_cpu_us_per_req?)
        }));
    }
}

pub fn print_table(all: &[Outcome], o: &Options) {
    println!(
        "{:<14} {:<9} {:>5} {:>5} {:>4} {:>9} {:>6} {:>5} {:>7} {:>7} {:>7} {:>7} {:>6} {:>7} {:>6} {:>5}",
        "store",
        "scenario",
        "conns",
        "bytes",
        "wr%",
        "req/s",
        "ratio",
        "cpu",
        "p50 ms",
        "p99 ms",
        "Δp99",
        "p99.9",
        "errors",
        "µs/req",
        "RSS MB",
        "sess%"
    );
    for name in &o.scenarios {
        for r in all.iter().filter(|r| &r.scenario == name) {
            println!(
                "{:<14} {:<9} {:>5} {:>5} {:>4} {:>9.0} {:>6} {:>5} {:>7} {:>7} {:>7} {:>7} {:>6} {:>7} {:>6} {:>5}",
                r.store,
                r.scenario,
                r.connections,
                if r.session_bytes > 0 {
                    r.session_bytes.to_string()
                } else {
                    "-".into()
                },
                if r.new_visitors {
                    "new".to_string()
                } else {
                    format!("{:.0}", r.write_ratio * 100.0)
                },
                r.rps,
                opt(r.rps_ratio, |v| format!("{:.0}%", v * 100.0)),
                opt(r.cpu_ratio, |v| format!("{:.0}%", v * 100.0)),
                ms(r.p50_us),
                ms(r.p99_us),
                opt(r.p99_delta_us, |v| format!("{:+.2}", v / 1000.0)),
                ms(r.p999_us),
                r.errors,
                opt(r.gateway_cpu_us_per_req, |v| format!("{v:.1}")),
                opt(r.peak_rss_mib, |v| format!("{v:.1}")),
                opt(r.session_hit_ratio, |v| format!("{:.0}", v * 100.0)),
            );
        }
    }
    println!(
        "ratio: req/s as a share of the baseline's (same gateway, sessions off), taken in each round against the baseline measured just before, median over rounds; \
         cpu: the baseline's CPU per request over this one's; Δp99: p99 minus the baseline's p99 (ms) (both also per round, median); \
         req/s, p50, p99, µs/req, RSS: the round with the median req/s; µs/req: gateway CPU per request; RSS: gateway peak (VmHWM); sess%: app requests that carried the session"
    );
    for r in all.iter().filter(|r| r.ratio_rounds.len() > 1) {
        let rounds: Vec<String> = r
            .ratio_rounds
            .iter()
            .map(|v| format!("{:.0}%", v * 100.0))
            .collect();
        println!(
            "ratio by round: {} / {}: {}",
            r.store,
            r.scenario,
            rounds.join(" ")
        );
    }
    if let Some(rate) = all.iter().find_map(|r| r.target_rate) {
        println!("note: read-rate offers {rate:.0} req/s (paced) to every store, so its latencies compare at the same load");
    }
    for r in all.iter().filter(|r| r.errors > 0) {
        println!(
            "note: {} / {}: {} error(s), first: {}",
            r.store,
            r.scenario,
            r.errors,
            r.first_error.as_deref().unwrap_or("?")
        );
    }
    for r in all.iter().filter(|r| r.store_cpu_us_per_req.is_some()) {
        println!(
            "note: {} / {}: the store server itself used {:.1} µs CPU per request on the same CPUs",
            r.store,
            r.scenario,
            r.store_cpu_us_per_req.unwrap_or(0.0)
        );
    }
    println!(
        "logging: every gateway writes its access log (log_level: info) to a file and serves /metrics, \
         scraped once a second; baseline-quiet has access_log: false and no admin listener"
    );
    for r in all.iter().filter(|r| r.metrics_scrapes == Some(0)) {
        println!(
            "warning: {} / {}: no /metrics scrape succeeded during the run",
            r.store, r.scenario
        );
    }
    for r in all
        .iter()
        .filter(|r| r.session_hit_ratio.is_some_and(|h| h < 0.999))
    {
        println!(
            "warning: {} / {}: only {:.1}% of requests reached the app with their session",
            r.store,
            r.scenario,
            r.session_hit_ratio.unwrap_or(0.0) * 100.0
        );
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub name: String,
    pub measured: String,
    /// `PASS`, `MISS`, `NOT RUN`, or `INFO`: measured, but not under the
    /// conditions the target is stated for (the measured text says which).
    pub status: &'static str,
}

fn status(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "MISS"
    }
}

/// A target on `value` (None: not run). `caveat`: why the run does not
/// meet the target's conditions, which makes it INFO instead of PASS/MISS.
pub fn target(
    name: String,
    value: Option<f64>,
    shown: impl Fn(f64) -> String,
    pass: impl Fn(f64) -> bool,
    caveat: Option<String>,
) -> Target {
    match (value, caveat) {
        (None, _) => Target {
            name,
            measured: "-".into(),
            status: "NOT RUN",
        },
        (Some(v), Some(why)) => Target {
            name,
            measured: format!("{} ({why})", shown(v)),
            status: "INFO",
        },
        (Some(v), None) => Target {
            name,
            measured: shown(v),
            status: status(pass(v)),
        },
    }
}

/// The conditions issue 12 states its ratio and p99 targets under: medians
/// of at least 3 interleaved rounds, 64 connections, one gateway thread;
/// with `sized`, 1 KiB sessions and (writes) 10% writes. The first one the
/// run does not meet, if any.
fn off_conditions(r: &Outcome, o: &Options, sized: bool) -> Option<String> {
    off_conditions_of(o, r.connections, r.session_bytes, r.write_ratio, sized)
}

/// [`off_conditions`] of a run with these connections, session size and
/// share of writes.
pub fn off_conditions_of(
    o: &Options,
    connections: usize,
    session_bytes: usize,
    write_ratio: f64,
    sized: bool,
) -> Option<String> {
    if o.rounds < 3 {
        Some(format!("{} round(s), needs --rounds 3", o.rounds))
    } else if connections != 64 {
        Some(format!("{connections} connections, needs 64"))
    } else if o.gateway_threads != 1 {
        Some(format!("{} gateway threads, needs 1", o.gateway_threads))
    } else if sized && session_bytes != 1024 {
        Some(format!("{session_bytes} B sessions, needs --size 1024"))
    } else if sized && write_ratio > 0.0 && (write_ratio - 0.1).abs() > 1e-9 {
        Some(format!(
            "{:.0}% writes, needs --write-ratio 0.1",
            write_ratio * 100.0
        ))
    } else {
        None
    }
}

/// Issue 12's throughput targets: (store, scenario, least share of the
/// baseline's req/s), 1 KiB sessions.
const SHARES: [(&str, &str, f64); 7] = [
    ("memory", "read", 0.92),
    ("redis-near", "read", 0.90),
    ("redis", "read", 0.80),
    ("postgres", "read", 0.60),
    ("postgres-near", "read", 0.60),
    ("memory", "write", 0.85),
    ("redis", "write", 0.80),
];

/// Pairs whose req/s ratio has a target (issue 16: sealing; issue 13: the
/// access log and /metrics): (A, B, least share of A's req/s that B keeps).
const PAIRS: [(&str, &str, f64); 3] = [
    ("memory", "memory-sealed", 0.97),
    ("redis", "redis-sealed", 0.97),
    ("baseline-quiet", "baseline", 0.97),
];

fn share_label(store: &str, scenario: &str, min: f64) -> String {
    let what = if scenario == "read" {
        "read (live 1 KiB session)"
    } else {
        "10% writes"
    };
    format!("{store} {what} req/s >= {:.0}% of baseline", min * 100.0)
}

/// The target on B's req/s as a share of A's in `scenario`, if the pair
/// has one: its label and least share.
pub fn pair_target(a: &str, b: &str, scenario: &str) -> Option<(String, f64)> {
    if a == "baseline" {
        return SHARES
            .iter()
            .find(|(s, sc, _)| *s == b && *sc == scenario)
            .map(|(s, sc, min)| (share_label(s, sc, *min), *min));
    }
    PAIRS
        .iter()
        .find(|(x, y, _)| *x == a && *y == b && scenario == "read")
        .map(|(x, y, min)| {
            (
                format!("{y} read req/s >= {:.0}% of {x}'s", min * 100.0),
                *min,
            )
        })
}

/// Whether a pair's target is stated for 1 KiB sessions (those against the
/// baseline are; sealing and logging costs are shares of another store).
pub fn pair_sized(a: &str) -> bool {
    a == "baseline"
}

pub fn pct(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}

/// The lowest and highest of per-round ratios, as percentages.
pub fn spread(ratios: &[f64]) -> String {
    let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{} in {:.0}-{:.0}%", ratios.len(), lo * 100.0, hi * 100.0)
}

pub fn targets(all: &[Outcome], rounds: &[Outcome], pure_ns: f64, o: &Options) -> Vec<Target> {
    let mut t = Vec::new();
    let find = |store: &str, scenario: &str| {
        all.iter()
            .find(|r| r.store == store && r.scenario == scenario)
    };
    // Issue 12: req/s as a share of the baseline's, 1 KiB sessions.
    for (store, scenario, min) in SHARES {
        let r = find(store, scenario);
        let ratios = r.map(|r| r.ratio_rounds.clone()).unwrap_or_default();
        t.push(target(
            share_label(store, scenario, min),
            r.and_then(|r| r.rps_ratio),
            |v| format!("{} (rounds: {})", pct(v), spread(&ratios)),
            |v| v >= min,
            r.and_then(|r| off_conditions(r, o, true)),
        ));
    }
    // Issue 12: p99 at the same paced load.
    for store in ["memory", "redis"] {
        let r = find(store, "read-rate");
        t.push(target(
            format!(
                "{store} p99 <= baseline p99 + 0.5 ms at the same load (read-rate{})",
                r.and_then(|r| r.target_rate)
                    .map(|rate| format!(" {rate:.0} req/s"))
                    .unwrap_or_default()
            ),
            r.and_then(|r| r.p99_delta_us),
            |v| format!("{:+.2} ms", v / 1000.0),
            |v| v <= 500.0,
            r.and_then(|r| off_conditions(r, o, true)),
        ));
    }
    t.push(target(
        "pure work of a read (verify cookie + check record + X-Session, 1 KiB) < 1.5 µs".into(),
        Some(pure_ns),
        |v| format!("{:.2} µs", v / 1000.0),
        |v| v < 1500.0,
        None,
    ));
    // Issue 16: sealing costs at most 3% of read req/s, same run.
    for (plain, sealed, min) in &PAIRS[..2] {
        let s = find(sealed, "read");
        let ratios = paired_rps_ratios(rounds, sealed, plain, "read");
        t.push(target(
            format!("{sealed} read req/s >= {:.0}% of {plain}'s", min * 100.0),
            median(ratios.clone()),
            |v| format!("{} (rounds: {})", pct(v), spread(&ratios)),
            |v| v >= *min,
            s.and_then(|s| off_conditions(s, o, false)),
        ));
    }
    // Issue 13: the access log and /metrics cost at most 3% of read req/s.
    let (b, q) = (find("baseline", "read"), find("baseline-quiet", "read"));
    t.push(target(
        "baseline (access log + /metrics) read req/s >= 97% of baseline-quiet".into(),
        median(paired_rps_ratios(
            rounds,
            "baseline",
            "baseline-quiet",
            "read",
        )),
        |v| match q.and_then(|q| q.cpu_ratio) {
            // The quiet one's cpu_ratio is the baseline's CPU per request
            // over its own: the inverse is the share to expect from CPU.
            Some(c) if c > 0.0 => format!("{} (by CPU per request: {})", pct(v), pct(1.0 / c)),
            _ => pct(v),
        },
        |v| v >= 0.97,
        b.and_then(|b| off_conditions(b, o, false)),
    ));
    let high: Vec<&Outcome> = all
        .iter()
        .filter(|r| r.connections >= 256 && r.store != "baseline")
        .collect();
    for r in &high {
        t.push(Target {
            name: format!(
                "{} {} peak RSS < 64 MiB at {} conns",
                r.store, r.scenario, r.connections
            ),
            measured: opt(r.peak_rss_mib, |v| format!("{v:.1} MiB")),
            status: r.peak_rss_mib.map_or("NOT RUN", |v| status(v < 64.0)),
        });
    }
    if high.is_empty() {
        t.push(Target {
            name: format!(
                "peak RSS < 64 MiB at 256 conns (run read-c256; --high-connections {})",
                o.high_connections
            ),
            measured: "-".into(),
            status: "NOT RUN",
        });
    }
    t
}

pub fn print_targets(targets: &[Target]) {
    println!("targets:");
    for t in targets {
        println!("  {:<7} {:<84} {}", t.status, t.name, t.measured);
    }
}

/// The `machine` object of every results file.
pub fn machine_json(m: &Machine) -> Value {
    json!({
        "cpus": m.cpus,
        "cpu_model": m.cpu_model,
        "kernel": m.kernel,
        "loadavg_at_start": m.loadavg,
    })
}

#[allow(clippy::too_many_arguments)]
pub fn to_json(
    m: &Machine,
    o: &Options,
    started: u64,
    all: &[Outcome],
    skipped: &[(String, String)],
    failures: &[(String, String, String)],
    targets: &[Target],
    pure_ns: f64,
) -> Value {
    json!({
        "schema": 1,
        "bench": "session-gateway load",
        "unix_time": started,
        "git": m.git,
        "machine": machine_json(m),
        "options": {
            "gateway_cpu": crate::procs::gateway_cpu(),
            "stores": o.stores,
            "scenarios": o.scenarios,
            "duration_s": o.duration.as_secs_f64(),
            "warmup_s": o.warmup.as_secs_f64(),
            "connections": o.connections,
            "high_connections": o.high_connections,
            "clients_per_connection": o.clients,
            "size": o.size,
            "large_size": o.large_size,
            "write_ratio": o.write_ratio,
            "gateway_threads": o.gateway_threads,
            "client_threads": o.client_threads,
            "rounds": o.rounds,
            "logging": "access log on (log_level info) to a file, /metrics scraped every 1s; baseline-quiet: access_log false, no admin listener",
        },
        "results": all,
        "skipped": skipped.iter().map(|(s, e)| json!({"store": s, "reason": e})).collect::<Vec<_>>(),
        "failed": failures.iter().map(|(s, sc, e)| json!({"store": s, "scenario": sc, "error": e})).collect::<Vec<_>>(),
        "pure_work_1k_ns": pure_ns,
        "targets": targets,
    })
}

/// `<target>/bench-results`, found from this executable's own path
/// (`<target>/release/deps/load-…`).
fn default_out_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf()))
        .filter(|t| t.join("release").is_dir() || t.join("debug").is_dir())
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench-results")
}

/// Write `<kind>-<unix time>.json` and `<kind>-latest.json` (kind: `load`
/// or `soak`); returns both paths.
pub fn write_json(o: &Options, kind: &str, started: u64, json: &Value) -> std::io::Result<String> {
    let dir = o.out.clone().unwrap_or_else(default_out_dir);
    std::fs::create_dir_all(&dir)?;
    let text = serde_json::to_string_pretty(json).expect("JSON serializes");
    let stamped = dir.join(format!("{kind}-{started}.json"));
    let latest = dir.join(format!("{kind}-latest.json"));
    std::fs::write(&stamped, &text)?;
    std::fs::write(&latest, &text)?;
    Ok(format!("{} (and {})", stamped.display(), latest.display()))
}

fn load_results(path: &Path) -> Result<(Value, Vec<Outcome>), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let results: Vec<Outcome> = serde_json::from_value(v["results"].clone())
        .map_err(|e| format!("{}: results: {e}", path.display()))?;
    Ok((v, results))
}

/// Print NEW next to OLD for every (store, scenario) in either file.
pub fn compare(old: &Path, new: &Path) -> Result<(), String> {
    let (ov, o) = load_results(old)?;
    let (nv, n) = load_results(new)?;
    let describe = |v: &Value| {
        format!(
            "{} (commit {}, {} CPUs, load {:.2})",
            v["unix_time"],
            v["git"].as_str().unwrap_or("?"),
            v["machine"]["cpus"],
            v["machine"]["loadavg_at_start"].as_f64().unwrap_or(0.0)
        )
    };
    println!("old: {} {}", old.display(), describe(&ov));
    println!("new: {} {}", new.display(), describe(&nv));
    println!(
        "{:<14} {:<9} {:>9} {:>9} {:>7} {:>6} {:>6} {:>8} {:>8} {:>7} {:>7}",
        "store",
        "scenario",
        "old req/s",
        "new req/s",
        "change",
        "old r",
        "new r",
        "old p99",
        "new p99",
        "old µs",
        "new µs"
    );
    let key = |r: &Outcome| (r.store.clone(), r.scenario.clone());
    let old_by: HashMap<_, _> = o.iter().map(|r| (key(r), r)).collect();
    let mut seen = std::collections::HashSet::new();
    let pct = |r: Option<f64>| opt(r, |v| format!("{:.0}%", v * 100.0));
    for r in n.iter().chain(o.iter()) {
        if !seen.insert(key(r)) {
            continue;
        }
        let (a, b) = (
            old_by.get(&key(r)).copied(),
            n.iter().find(|x| key(x) == key(r)),
        );
        let rps = |x: Option<&Outcome>| opt(x.map(|x| x.rps), |v| format!("{v:.0}"));
        let change = match (a, b) {
            (Some(a), Some(b)) if a.rps > 0.0 => format!("{:+.1}%", (b.rps / a.rps - 1.0) * 100.0),
            _ => "-".into(),
        };
        println!(
            "{:<14} {:<9} {:>9} {:>9} {:>7} {:>6} {:>6} {:>8} {:>8} {:>7} {:>7}",
            r.store,
            r.scenario,
            rps(a),
            rps(b),
            change,
            pct(a.and_then(|x| x.rps_ratio)),
            pct(b.and_then(|x| x.rps_ratio)),
            opt(a.map(|x| x.p99_us), ms),
            opt(b.map(|x| x.p99_us), ms),
            opt(a.and_then(|x| x.gateway_cpu_us_per_req), |v| format!(
                "{v:.1}"
            )),
            opt(b.and_then(|x| x.gateway_cpu_us_per_req), |v| format!(
                "{v:.1}"
            )),
        );
    }
    println!("r: req/s as a share of the same run's baseline (compare these across machines and busy periods; raw req/s only on the same quiet machine)");
    Ok(())
}
