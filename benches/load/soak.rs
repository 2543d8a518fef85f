//! `--soak D` (issue 15): one gateway per store under the `write` mix
//! (WRITE-RATIO writes over CONNECTIONS connections, SIZE sessions) for D,
//! sampled every min(D/10, 30 s), at least 10 times: the gateway's RSS
//! (`VmRSS`) and the p99 of the interval. The verdict compares the RSS
//! after warm-up (the first sample at 10% of D) with the last one: flat =
//! at most 10% growth. Bounded by D and by `--soak-max-requests`.

use crate::options::Options;
use crate::report::{fmt_dur, machine_json, ms, opt, Machine, Target};
use crate::stores::StoreEnv;
use crate::{client, procs, procstat, Ctx, Scenario, SCRAPE_EVERY};
use serde::Serialize;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::time::Instant;

/// Most RSS growth from warm-up to the end that still counts as flat.
const FLAT: f64 = 0.10;

/// The gateway's log is emptied above this (an access log line per
/// request adds up over a long soak).
const LOG_CAP: u64 = 64 << 20;

/// One interval of a soak.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// Seconds since the soak started, at the end of the interval.
    pub t_s: f64,
    /// 2xx responses completed inside the interval.
    pub requests: u64,
    pub rps: f64,
    pub p99_us: f64,
    pub errors: u64,
    /// Gateway `VmRSS` at the end of the interval.
    pub rss_mib: Option<f64>,
    pub metrics_scrapes: Option<u64>,
}

/// The soak of one store.
#[derive(Clone, Debug, Serialize)]
pub struct Soak {
    pub store: String,
    pub connections: usize,
    pub session_bytes: usize,
    pub write_ratio: f64,
    /// The planned duration.
    pub seconds: f64,
    pub interval_s: f64,
    pub samples: Vec<Sample>,
    /// Stopped at `--soak-max-requests` before the duration was over.
    pub stopped_by_request_cap: bool,
    /// The sample after warm-up: the first at 10% of the duration or later.
    pub warm_sample: Option<usize>,
    pub warm_rss_mib: Option<f64>,
    pub end_rss_mib: Option<f64>,
    /// end / warm - 1.
    pub rss_growth: Option<f64>,
    pub first_error: Option<String>,
    /// Why it did not run to the end, if it did not.
    pub failed: Option<String>,
}

/// Samples of a soak of `d`: one every 10% of it, or every 30 s when that
/// is shorter, so never fewer than 10.
fn sample_count(d: Duration) -> u32 {
    (d.as_secs_f64() / 30.0).ceil().max(10.0) as u32
}

/// Soak every store in turn, printing each sample as it is taken.
pub async fn run(cx: &Ctx<'_>, envs: &[StoreEnv], d: Duration) -> Vec<Soak> {
    let mut soaks = Vec::new();
    for (seq, env) in envs.iter().enumerate() {
        soaks.push(soak_one(cx, env, d, seq + 1).await);
    }
    soaks
}

fn print_header(s: &Soak, o: &Options) {
    println!();
    println!(
        "soak {}: {} connections x {} clients, {} B sessions, {:.0}% writes, {}, a sample every {}",
        s.store,
        s.connections,
        o.clients,
        s.session_bytes,
        s.write_ratio * 100.0,
        fmt_dur(Duration::from_secs_f64(s.seconds)),
        fmt_dur(Duration::from_secs_f64(s.interval_s)),
    );
    println!(
        "{:>8} {:>9} {:>7} {:>6} {:>8}",
        "time", "req/s", "p99 ms", "errors", "RSS MiB"
    );
}

fn print_sample(x: &Sample) {
    println!(
        "{:>7.0}s {:>9.0} {:>7} {:>6} {:>8}",
        x.t_s,
        x.rps,
        ms(x.p99_us),
        x.errors,
        opt(x.rss_mib, |v| format!("{v:.1}")),
    );
}

/// One store: a gateway, its sessions, then `n` intervals of load.
async fn soak_one(cx: &Ctx<'_>, env: &StoreEnv, d: Duration, seq: usize) -> Soak {
    let o = cx.o;
    let sc = Scenario {
        name: "soak".into(),
        connections: o.connections,
        size: o.size,
        write_ratio: o.write_ratio,
        new_visitors: false,
        rate: None,
    };
    let n = sample_count(d);
    let every = d / n;
    let mut s = Soak {
        store: env.name.clone(),
        connections: sc.connections,
        session_bytes: if env.sessions_off { 0 } else { sc.size },
        write_ratio: sc.write_ratio,
        seconds: d.as_secs_f64(),
        interval_s: every.as_secs_f64(),
        samples: Vec::new(),
        stopped_by_request_cap: false,
        warm_sample: None,
        warm_rss_mib: None,
        end_rss_mib: None,
        rss_growth: None,
        first_error: None,
        failed: None,
    };
    print_header(&s, o);
    if let Err(e) = sample_all(cx, env, &sc, seq, n, every, &mut s).await {
        println!("{:<14} soak FAILED: {e}", env.name);
        s.failed = Some(e);
    }
    verdict(&mut s, n);
    println!("{}", verdict_line(&s));
    s
}

/// Start the gateway and take the samples into `s`. Each interval drives
/// fresh connections (a short pause at each sample, no warm-up needed:
/// the verdict starts at 10% of the time).
async fn sample_all(
    cx: &Ctx<'_>,
    env: &StoreEnv,
    sc: &Scenario,
    seq: usize,
    n: u32,
    every: Duration,
    s: &mut Soak,
) -> Result<(), String> {
    let mut l = crate::launch(cx, env, sc, seq).await?;
    let pid = l.gateway.pid();
    let began = Instant::now();
    let mut total: u64 = 0;
    for k in 1..=n {
        let (start, end) = (Instant::now(), began + every * k);
        let scraper = l
            .admin
            .map(|a| tokio::spawn(client::scrape_metrics(a, SCRAPE_EVERY, start, end)));
        let plans = crate::plans(sc, l.addr, &l.cookies);
        let tally = crate::drive_all(l.addr, plans, start, end).await?;
        let scrapes = match scraper {
            Some(t) => Some(t.await.map_err(|e| format!("scraper failed: {e}"))?),
            None => None,
        };
        if !l.gateway.alive() {
            return Err(format!(
                "the gateway died during the soak:\n{}",
                procs::tail(&l.gateway.log, 10)
            ));
        }
        let wall = (Instant::now() - start).as_secs_f64().max(1e-9);
        let requests = tally.latency.count();
        let sample = Sample {
            t_s: (Instant::now() - began).as_secs_f64(),
            requests,
            rps: requests as f64 / wall,
            p99_us: tally.latency.quantile(0.99) as f64 / 1000.0,
            errors: tally.errors,
            rss_mib: procstat::rss_kib(pid).map(|k| k as f64 / 1024.0),
            metrics_scrapes: scrapes,
        };
        print_sample(&sample);
        s.samples.push(sample);
        if s.first_error.is_none() {
            s.first_error = tally.first_error;
        }
        procs::trim_log(&l.gateway.log, LOG_CAP);
        total += requests;
        if total >= cx.o.soak_max_requests && k < n {
            s.stopped_by_request_cap = true;
            println!(
                "(stopped: {total} requests reached --soak-max-requests {})",
                cx.o.soak_max_requests
            );
            break;
        }
    }
    Ok(())
}

/// RSS after warm-up (sample ceil(n/10), the first at 10% of the time)
/// against the last sample.
fn verdict(s: &mut Soak, n: u32) {
    let warm = (n as usize).div_ceil(10).max(1) - 1;
    let last = s.samples.len().checked_sub(1);
    if let (Some(w), Some(e)) = (s.samples.get(warm), last.map(|i| &s.samples[i])) {
        s.warm_sample = Some(warm);
        s.warm_rss_mib = w.rss_mib;
        s.end_rss_mib = e.rss_mib;
        if let (Some(a), Some(b)) = (w.rss_mib, e.rss_mib) {
            s.rss_growth = Some(b / a - 1.0);
        }
    }
}

fn verdict_line(s: &Soak) -> String {
    match (s.warm_sample, s.rss_growth) {
        (Some(w), Some(g)) => format!(
            "{}: RSS {:.1} MiB after warm-up ({:.0}s) -> {:.1} MiB at the end ({:.0}s): {:+.1}% \
             (flat: at most +{:.0}%) {}",
            s.store,
            s.warm_rss_mib.unwrap_or(0.0),
            s.samples[w].t_s,
            s.end_rss_mib.unwrap_or(0.0),
            s.samples.last().map_or(0.0, |x| x.t_s),
            g * 100.0,
            FLAT * 100.0,
            if g <= FLAT { "FLAT" } else { "GROWING" },
        ),
        _ => format!("{}: no verdict (no sample after warm-up)", s.store),
    }
}

/// One target per store: RSS flat after warm-up.
pub fn targets(soaks: &[Soak]) -> Vec<Target> {
    soaks
        .iter()
        .map(|s| {
            let name = format!(
                "{} soak: RSS at the end <= RSS after warm-up + {:.0}% (flat)",
                s.store,
                FLAT * 100.0
            );
            match s.rss_growth {
                Some(g) => Target {
                    name,
                    measured: format!(
                        "{:.1} -> {:.1} MiB ({:+.1}%{})",
                        s.warm_rss_mib.unwrap_or(0.0),
                        s.end_rss_mib.unwrap_or(0.0),
                        g * 100.0,
                        if s.failed.is_some() || s.stopped_by_request_cap {
                            ", ended early"
                        } else {
                            ""
                        }
                    ),
                    status: if g <= FLAT { "PASS" } else { "MISS" },
                },
                None => Target {
                    name,
                    measured: "-".into(),
                    status: "NOT RUN",
                },
            }
        })
        .collect()
}

pub fn to_json(
    m: &Machine,
    o: &Options,
    started: u64,
    soaks: &[Soak],
    skipped: &[(String, String)],
    targets: &[Target],
) -> Value {
    json!({
        "schema": 1,
        "bench": "session-gateway soak",
        "unix_time": started,
        "git": m.git,
        "machine": machine_json(m),
        "options": {
            "stores": o.soak_stores,
            "soak_s": o.soak.map(|d| d.as_secs_f64()),
            "soak_max_requests": o.soak_max_requests,
            "connections": o.connections,
            "clients_per_connection": o.clients,
            "size": o.size,
            "write_ratio": o.write_ratio,
            "gateway_threads": o.gateway_threads,
            "client_threads": o.client_threads,
        },
        "soaks": soaks,
        "skipped": skipped.iter().map(|(s, e)| json!({"store": s, "reason": e})).collect::<Vec<_>>(),
        "targets": targets,
    })
}
