//! `--alternate A,B`: two gateways at once, A and B, and one load that
//! switches between them every `--slice` (200 ms by default): while A's
//! connections send, B's wait, and the other way round. Each turn lasts
//! whole pairs of slices, so both get the same time, spread over the same
//! seconds of the machine's life.
//!
//! Why: on a shared VM the speed of a core moves by tens of percent within
//! seconds (the same baseline gateway ran at 11.7k-25.5k req/s in rounds
//! of one run), so two gateways measured one after the other, even a few
//! seconds apart, differ by more than the costs being compared. Taking
//! turns every 200 ms puts the machine's slow and fast seconds on both
//! sides. Only one gateway is under load at any moment (two loaded at once
//! compete for the CPUs, and the scheduler's share becomes the result).
//! Requests in flight when a slice ends finish in the next one (a few ms
//! of overlap, the same for both). `--alternate memory,memory` (A/A) shows
//! what is left of the noise.

use crate::client::{self, Gate, Tally};
use crate::options::Options;
use crate::report::{self, fmt_dur, machine_json, median, Machine, Target};
use crate::stores::StoreEnv;
use crate::{drive_all, launch, plans, procs, procstat, runs, scenarios, Ctx, SCRAPE_EVERY};
use serde::Serialize;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::time::Instant;

/// One gateway's side of a turn.
#[derive(Clone, Debug, Serialize)]
pub struct Side {
    pub store: String,
    /// 2xx responses completed inside the measured window.
    pub requests: u64,
    /// Requests per second of the gateway's own slices (half the window).
    pub rps: f64,
    pub p99_us: f64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Gateway user+system CPU per request over the window.
    pub gateway_cpu_us_per_req: Option<f64>,
}

/// One scenario of one round: A and B taking turns.
#[derive(Clone, Debug, Serialize)]
pub struct Turn {
    pub round: usize,
    pub scenario: String,
    pub connections: usize,
    pub session_bytes: usize,
    pub write_ratio: f64,
    /// The store that had the first slice (A in even rounds, B in odd).
    pub first: String,
    pub a: Side,
    pub b: Side,
    /// B's req/s over A's.
    pub ratio: Option<f64>,
    /// A's CPU per request over B's.
    pub cpu_ratio: Option<f64>,
}

/// `d` rounded up to whole `period`s, at least one.
fn whole(d: Duration, period: Duration) -> Duration {
    let n = d.as_nanos().div_ceil(period.as_nanos()).max(1);
    period * u32::try_from(n).unwrap_or(u32::MAX)
}

fn side(store: &str, t: Tally, seconds: f64, cpu: Option<f64>) -> Side {
    let requests = t.latency.count();
    Side {
        store: store.to_string(),
        requests,
        rps: requests as f64 / seconds,
        p99_us: t.latency.quantile(0.99) as f64 / 1000.0,
        errors: t.errors,
        first_error: t.first_error,
        gateway_cpu_us_per_req: cpu
            .filter(|_| requests > 0)
            .map(|c| c * 1e6 / requests as f64),
    }
}

/// Every round, every scenario both stores run (paced ones excepted: a
/// fixed rate compares latencies, not throughput).
pub async fn run(cx: &Ctx<'_>, a: &StoreEnv, b: &StoreEnv) -> (Vec<Turn>, Vec<String>) {
    let o = cx.o;
    println!();
    println!(
        "{:<5} {:<9} {:<14} {:>9} {:<14} {:>9} {:>6} {:>7} {:>7} {:>6}",
        "round", "scenario", "A", "req/s", "B", "req/s", "B/A", "A µs/r", "B µs/r", "cpu"
    );
    let mut turns = Vec::new();
    let mut failures = Vec::new();
    let mut seq = 0;
    for round in 0..o.rounds {
        for sc in scenarios(o) {
            if sc.rate.is_some() || !runs(o, &a.name, &sc) || !runs(o, &b.name, &sc) {
                continue;
            }
            seq += 2;
            match turn(cx, a, b, &sc, round, seq).await {
                Ok(t) => {
                    println!(
                        "{:<5} {:<9} {:<14} {:>9.0} {:<14} {:>9.0} {:>6} {:>7} {:>7} {:>6}",
                        round + 1,
                        t.scenario,
                        t.a.store,
                        t.a.rps,
                        t.b.store,
                        t.b.rps,
                        report::opt(t.ratio, report::pct),
                        report::opt(t.a.gateway_cpu_us_per_req, |v| format!("{v:.1}")),
                        report::opt(t.b.gateway_cpu_us_per_req, |v| format!("{v:.1}")),
                        report::opt(t.cpu_ratio, |v| format!("{:.0}%", v * 100.0)),
                    );
                    turns.push(t);
                }
                Err(e) => {
                    println!("{:<5} {:<9} FAILED: {e}", round + 1, sc.name);
                    failures.push(format!("round {} {}: {e}", round + 1, sc.name));
                }
            }
        }
    }
    (turns, failures)
}

async fn turn(
    cx: &Ctx<'_>,
    a: &StoreEnv,
    b: &StoreEnv,
    sc: &crate::Scenario,
    round: usize,
    seq: usize,
) -> Result<Turn, String> {
    let o = cx.o;
    // A goes first in even rounds (started first, first slice, its load
    // tasks spawned first), B in odd ones: an A/A pair showed A ahead by
    // 1.5% when A always went first.
    let a_first = round.is_multiple_of(2);
    let (mut la, mut lb) = if a_first {
        let la = launch(cx, a, sc, seq).await?;
        (la, launch(cx, b, sc, seq + 1).await?)
    } else {
        let lb = launch(cx, b, sc, seq + 1).await?;
        (launch(cx, a, sc, seq).await?, lb)
    };
    let period = o.slice * 2;
    let anchor = Instant::now();
    let start = anchor + whole(o.warmup, period);
    let end = start + whole(o.duration, period);
    let a_phase = u32::from(!a_first);
    let gated = |mut ps: Vec<client::ConnPlan>, phase: u32| {
        for p in &mut ps {
            p.gate = Some(Gate {
                anchor,
                slice: o.slice,
                phase,
            });
        }
        ps
    };
    let (pa, pb) = (la.gateway.pid(), lb.gateway.pid());
    let sampler = tokio::spawn(async move {
        tokio::time::sleep_until(start).await;
        let s0 = (procstat::cpu_time(pa), procstat::cpu_time(pb));
        tokio::time::sleep_until(end).await;
        let s1 = (procstat::cpu_time(pa), procstat::cpu_time(pb));
        (s0, s1)
    });
    let scrapers: Vec<_> = [la.admin, lb.admin]
        .into_iter()
        .flatten()
        .map(|admin| tokio::spawn(client::scrape_metrics(admin, SCRAPE_EVERY, start, end)))
        .collect();
    let fa = drive_all(
        la.addr,
        gated(plans(sc, la.addr, &la.cookies), a_phase),
        start,
        end,
    );
    let fb = drive_all(
        lb.addr,
        gated(plans(sc, lb.addr, &lb.cookies), 1 - a_phase),
        start,
        end,
    );
    let (ta, tb) = if a_first {
        tokio::join!(fa, fb)
    } else {
        let (tb, ta) = tokio::join!(fb, fa);
        (ta, tb)
    };
    let (ta, tb) = (ta?, tb?);
    let (s0, s1) = sampler.await.map_err(|e| format!("sampler failed: {e}"))?;
    for s in scrapers {
        s.await.map_err(|e| format!("scraper failed: {e}"))?;
    }
    for l in [&mut la, &mut lb] {
        if !l.gateway.alive() {
            return Err(format!(
                "a gateway died during the run:\n{}",
                procs::tail(&l.gateway.log, 10)
            ));
        }
    }
    drop((la, lb));
    let cpu = |x: Option<Duration>, y: Option<Duration>| match (x, y) {
        (Some(x), Some(y)) => Some(y.saturating_sub(x).as_secs_f64()),
        _ => None,
    };
    // Each gateway had half of the window.
    let seconds = (end - start).as_secs_f64() / 2.0;
    let a_side = side(&a.name, ta, seconds, cpu(s0.0, s1.0));
    let b_side = side(&b.name, tb, seconds, cpu(s0.1, s1.1));
    Ok(Turn {
        round,
        scenario: sc.name.clone(),
        connections: sc.connections,
        session_bytes: if b.sessions_off { 0 } else { sc.size },
        write_ratio: sc.write_ratio,
        first: if a_phase == 0 { &a.name } else { &b.name }.clone(),
        ratio: (a_side.rps > 0.0).then(|| b_side.rps / a_side.rps),
        cpu_ratio: a_side
            .gateway_cpu_us_per_req
            .zip(b_side.gateway_cpu_us_per_req)
            .map(|(x, y)| x / y),
        a: a_side,
        b: b_side,
    })
}

/// Per scenario: the median of the rounds' B/A ratios, and the target that
/// pair has, if any.
pub fn targets(turns: &[Turn], o: &Options) -> Vec<Target> {
    // Scenarios in the order they ran; turns repeat them round by round.
    let mut names: Vec<&str> = Vec::new();
    for t in turns {
        if !names.contains(&t.scenario.as_str()) {
            names.push(&t.scenario);
        }
    }
    let mut out = Vec::new();
    for name in names {
        let these: Vec<&Turn> = turns.iter().filter(|t| t.scenario == name).collect();
        let ratios: Vec<f64> = these.iter().filter_map(|t| t.ratio).collect();
        let Some(first) = these.first() else { continue };
        let (a, b) = (&first.a.store, &first.b.store);
        let caveat = report::off_conditions_of(
            o,
            first.connections,
            first.session_bytes,
            first.write_ratio,
            report::pair_sized(a),
        );
        let (label, min) = report::pair_target(a, b, name).map_or_else(
            || (format!("{b} {name} req/s as a share of {a}'s"), 0.0),
            |(label, min)| (format!("{label} (alternating)"), min),
        );
        let shown = |v: f64| format!("{} (rounds: {})", report::pct(v), report::spread(&ratios));
        let mut t = report::target(label, median(ratios.clone()), shown, |v| v >= min, caveat);
        if min == 0.0 && t.status != "NOT RUN" {
            t.status = "INFO";
        }
        out.push(t);
        let cpu: Vec<f64> = these.iter().filter_map(|t| t.cpu_ratio).collect();
        if let Some(c) = median(cpu) {
            println!(
                "{name}: {a}'s CPU per request over {b}'s, median of {} rounds: {:.1}%",
                these.len(),
                c * 100.0
            );
        }
    }
    out
}

pub fn to_json(
    m: &Machine,
    o: &Options,
    started: u64,
    turns: &[Turn],
    failures: &[String],
    targets: &[Target],
) -> Value {
    json!({
        "schema": 1,
        "bench": "session-gateway load --alternate",
        "unix_time": started,
        "git": m.git,
        "machine": machine_json(m),
        "options": {
            "stores": o.stores,
            "scenarios": o.scenarios,
            "duration_s": o.duration.as_secs_f64(),
            "warmup_s": o.warmup.as_secs_f64(),
            "slice_s": o.slice.as_secs_f64(),
            "rounds": o.rounds,
            "connections": o.connections,
            "clients_per_connection": o.clients,
            "size": o.size,
            "write_ratio": o.write_ratio,
            "gateway_threads": o.gateway_threads,
            "gateway_cpu": crate::procs::gateway_cpu(),
        },
        "turns": turns,
        "failures": failures,
        "targets": targets,
    })
}

/// The line that says what a run of this mode does.
pub fn describe(o: &Options) -> String {
    format!(
        "alternating {} and {} every {} ({} per turn after {} warm-up, both gateways up)",
        o.stores[0],
        o.stores[1],
        fmt_dur(o.slice),
        fmt_dur(whole(o.duration, o.slice * 2)),
        fmt_dur(whole(o.warmup, o.slice * 2)),
    )
}
