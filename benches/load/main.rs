//! `cargo bench --bench load`: what a session costs. Starts a tiny app and
//! the real gateway binary (one proxy thread), drives keep-alive HTTP/1.1
//! load with a cookie per virtual client, and reports per store and
//! scenario: requests/s, latency percentiles, errors, gateway CPU per
//! request, peak RSS, and the ratio to the baseline of the same run (the
//! same binary with sessions off for every path), so the ratio isolates the
//! session cost from the machine. Results go to a table and to JSON under
//! `<target>/bench-results/`. `--soak D` instead keeps one gateway per store
//! under load for D and samples its RSS and p99. `-- --help` lists the
//! options.

mod alternate;
mod client;
mod hist;
mod options;
mod procs;
mod procstat;
mod report;
mod soak;
mod stores;
mod upstream;
mod work;

use client::{ConnPlan, Tally};
use options::Options;
use report::Outcome;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use stores::StoreEnv;
use tokio::time::Instant;
use upstream::Upstream;

const SECRET: &str = "bench-secret-key-0123456789abcdef-0123456789";

/// One load shape.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub connections: usize,
    pub size: usize,
    pub write_ratio: f64,
    /// No cookie; every request creates a session.
    pub new_visitors: bool,
    /// Paced at this many req/s over all connections instead of as fast as
    /// the gateway answers; 0 = decided when the scenario runs.
    pub rate: Option<f64>,
}

fn scenarios(o: &Options) -> Vec<Scenario> {
    let sc = |name: &str, connections, size, write_ratio, new_visitors| Scenario {
        name: name.to_string(),
        connections,
        size,
        write_ratio,
        new_visitors,
        rate: None,
    };
    o.scenarios
        .iter()
        .map(|name| match name.as_str() {
            "read" => sc(name, o.connections, o.size, 0.0, false),
            "write" => sc(name, o.connections, o.size, o.write_ratio, false),
            "new" => sc(name, o.connections, o.size, 0.0, true),
            "read-4k" => sc(name, o.connections, o.large_size, 0.0, false),
            "read-rate" => Scenario {
                rate: Some(o.rate.unwrap_or(0.0)),
                ..sc(name, o.connections, o.size, 0.0, false)
            },
            _ => sc(name, o.high_connections, o.size, 0.0, false),
        })
        .collect()
}

/// Does `store` run `scenario`? The baseline's read-4k is its read (the
/// session size does not exist for it), read-c256 and read-rate run only
/// for the stores asked for, and the variants (baseline-quiet, *-sealed)
/// only read.
fn runs(o: &Options, store: &str, scenario: &Scenario) -> bool {
    if stores::read_only(store) {
        return scenario.name == "read";
    }
    match scenario.name.as_str() {
        "read-4k" => store != "baseline" || !o.scenarios.iter().any(|s| s == "read"),
        "read-c256" | "read-rate" => o.focus_stores.iter().any(|s| s == store),
        _ => true,
    }
}

/// The gateway's config. Logging is the default one (`log_level: info`,
/// access log on: a line per request, written to the gateway's log file)
/// and `admin` is the admin listener's port, unless the store is quiet
/// (`access_log: false`, no admin listener).
fn gateway_yaml(
    env: &StoreEnv,
    o: &Options,
    upstream: u16,
    port: u16,
    admin: Option<u16>,
    prefix: &str,
) -> String {
    let max_bytes = 8192.max(o.large_size.max(o.size) + 1024);
    let exclude = if env.sessions_off {
        ", exclude: [\"/\"]"
    } else {
        ""
    };
    let seal = match (env.seal, o.seal_cache) {
        (false, _) => String::new(),
        (true, None) => ", seal: true".into(),
        (true, Some(n)) => format!(", seal: true, seal_cache: {n}"),
    };
    let access_log = if env.quiet { "access_log: false\n" } else { "" };
    let admin = admin
        .map(|p| format!("admin: {{listen: \"127.0.0.1:{p}\"}}\n"))
        .unwrap_or_default();
    format!(
        "listen: \"127.0.0.1:{port}\"\n\
         upstream: \"127.0.0.1:{upstream}\"\n\
         secret_keys: [\"{SECRET}\"]\n\
         log_level: info\n\
         {access_log}\
         {admin}\
         server: {{threads: {}, grace_period: 1s}}\n\
         session: {{key_prefix: \"{prefix}\", max_bytes: {max_bytes}{exclude}{seal}}}\n\
         store: {}\n",
        o.gateway_threads, env.yaml
    )
}

/// How often the bench scrapes an observed gateway's `/metrics`.
const SCRAPE_EVERY: Duration = Duration::from_secs(1);

/// A cookie that looks like ours (same length) for the baseline, where the
/// gateway never verifies it, only strips it.
fn fake_cookie(i: usize) -> String {
    let id = format!("{:0>43}", format!("bench{i}"));
    format!("session={id}.{}", "s".repeat(43))
}

struct Ctx<'a> {
    o: &'a Options,
    upstream: &'a Upstream,
    dir: &'a Path,
    run_id: &'a str,
}

/// A gateway started for one scenario, its sessions created.
struct Launched {
    gateway: procs::Proc,
    addr: SocketAddr,
    /// The admin listener (None for a quiet store).
    admin: Option<SocketAddr>,
    /// The cookies of each connection's virtual clients.
    cookies: Vec<Vec<String>>,
    /// Config and log; removed after the gateway (fields drop in order).
    _dir: tempfile::TempDir,
}

/// Start a fresh gateway for `env` and create the sessions `sc` reads (not
/// measured): one per virtual client.
async fn launch(
    cx: &Ctx<'_>,
    env: &StoreEnv,
    sc: &Scenario,
    seq: usize,
) -> Result<Launched, String> {
    let o = cx.o;
    let gw_dir = tempfile::Builder::new()
        .prefix(&format!("{}-{}-", env.name, sc.name))
        .tempdir_in(cx.dir)
        .map_err(|e| format!("temp dir: {e}"))?;
    let port = procs::free_port();
    let admin_port = (!env.quiet).then(procs::free_port);
    let prefix = format!("bench:{}:{seq}:", cx.run_id);
    let config = gw_dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        gateway_yaml(env, o, cx.upstream.port, port, admin_port, &prefix),
    )
    .map_err(|e| format!("write config: {e}"))?;
    let gateway = procs::start_gateway(&config, gw_dir.path(), port)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let cookies: Vec<Vec<String>> = if sc.new_visitors {
        vec![Vec::new(); sc.connections]
    } else if env.sessions_off {
        (0..sc.connections)
            .map(|c| {
                (0..o.clients)
                    .map(|i| fake_cookie(c * o.clients + i))
                    .collect()
            })
            .collect()
    } else {
        client::precreate(
            addr,
            sc.connections,
            o.clients,
            sc.size,
            Duration::from_secs(120),
        )
        .await
        .map_err(|e| {
            format!(
                "creating {} sessions failed: {e}\n{}",
                sc.connections * o.clients,
                procs::tail(&gateway.log, 5)
            )
        })?
    };
    Ok(Launched {
        gateway,
        addr,
        admin: admin_port.map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
        cookies,
        _dir: gw_dir,
    })
}

/// What each connection sends: its virtual clients' reads and writes, or
/// (new visitors) a session-creating request without a cookie.
fn plans(sc: &Scenario, addr: SocketAddr, cookies: &[Vec<String>]) -> Vec<ConnPlan> {
    let interval = sc
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(sc.connections as f64 / r));
    cookies
        .iter()
        .enumerate()
        .map(|(i, cs)| {
            let start_offset = interval.map_or(Duration::ZERO, |d| {
                d.mul_f64(i as f64 / sc.connections as f64)
            });
            if sc.new_visitors {
                let req = client::get(addr, &format!("/p/{}", sc.size), None);
                ConnPlan {
                    reads: vec![req.clone()],
                    writes: vec![req],
                    write_ratio: 0.0,
                    interval: None,
                    start_offset,
                    gate: None,
                }
            } else {
                ConnPlan {
                    reads: cs
                        .iter()
                        .map(|c| client::get(addr, "/r", Some(c)))
                        .collect(),
                    writes: cs
                        .iter()
                        .map(|c| client::get(addr, "/w", Some(c)))
                        .collect(),
                    write_ratio: sc.write_ratio,
                    interval,
                    start_offset,
                    gate: None,
                }
            }
        })
        .collect()
}

/// Drive every connection's plan over `[start, end]` and merge the tallies.
async fn drive_all(
    addr: SocketAddr,
    plans: Vec<ConnPlan>,
    start: Instant,
    end: Instant,
) -> Result<Tally, String> {
    let tasks: Vec<_> = plans
        .into_iter()
        .map(|plan| tokio::spawn(client::drive(addr, plan, start, end)))
        .collect();
    let mut tally = Tally::default();
    for t in tasks {
        tally.merge(t.await.map_err(|e| format!("load task failed: {e}"))?);
    }
    Ok(tally)
}

/// `--hold`: keep the gateway up for `hold` and say how to reach it.
async fn hold(l: &Launched, env: &StoreEnv, sc: &Scenario, cx: &Ctx<'_>, hold: Duration) {
    let addr = l.addr;
    println!(
        "holding {} / {} for {hold:?}: http://{addr}/r  gateway pid {}  upstream port {}  log {}{}\n  \
         e.g. wrk -c {} -d 10s -H 'Cookie: {}' http://{addr}/r",
        env.name,
        sc.name,
        l.gateway.pid(),
        cx.upstream.port,
        l.gateway.log.display(),
        l.admin
            .map(|a| format!("  metrics http://{a}/metrics"))
            .unwrap_or_default(),
        sc.connections,
        l.cookies
            .first()
            .and_then(|c| c.first())
            .map_or("session=none", |c| c.as_str()),
    );
    tokio::time::sleep(hold).await;
}

/// Run one scenario against one store on a fresh gateway process.
async fn run_one(
    cx: &Ctx<'_>,
    env: &StoreEnv,
    sc: &Scenario,
    seq: usize,
) -> Result<Outcome, String> {
    let o = cx.o;
    let mut l = launch(cx, env, sc, seq).await?;
    if let Some(d) = o.hold {
        hold(&l, env, sc, cx, d).await;
        return Err("held, not measured".into());
    }
    let pid = l.gateway.pid();
    let start = Instant::now() + o.warmup;
    let end = start + o.duration;
    let stats = cx.upstream.stats.clone();
    // A private store server (redis-server, memcached, SecantusDB, moto_server) competes for the
    // same CPUs: its CPU per request is reported too.
    let store_pid = env.server.as_ref().map(|r| r.pid());
    let sampler = tokio::spawn(async move {
        let me = std::process::id();
        tokio::time::sleep_until(start).await;
        let at_start = (
            procstat::cpu_time(pid),
            procstat::cpu_time(me),
            stats
                .reads_writes
                .load(std::sync::atomic::Ordering::Relaxed),
            stats
                .with_session
                .load(std::sync::atomic::Ordering::Relaxed),
            std::time::Instant::now(),
            store_pid.and_then(procstat::cpu_time),
        );
        tokio::time::sleep_until(end).await;
        let at_end = (
            procstat::cpu_time(pid),
            procstat::cpu_time(me),
            stats
                .reads_writes
                .load(std::sync::atomic::Ordering::Relaxed),
            stats
                .with_session
                .load(std::sync::atomic::Ordering::Relaxed),
            std::time::Instant::now(),
            store_pid.and_then(procstat::cpu_time),
        );
        (at_start, at_end)
    });
    let scraper = l
        .admin
        .map(|a| tokio::spawn(client::scrape_metrics(a, SCRAPE_EVERY, start, end)));
    let tally = drive_all(l.addr, plans(sc, l.addr, &l.cookies), start, end).await?;
    let (s0, s1) = sampler.await.map_err(|e| format!("sampler failed: {e}"))?;
    let metrics_scrapes = match scraper {
        Some(t) => Some(t.await.map_err(|e| format!("scraper failed: {e}"))?),
        None => None,
    };
    let peak_rss_kib = procstat::peak_rss_kib(pid);
    if !l.gateway.alive() {
        return Err(format!(
            "the gateway died during the run:\n{}",
            procs::tail(&l.gateway.log, 10)
        ));
    }
    drop(l);

    let wall = (s1.4 - s0.4).as_secs_f64();
    let requests = tally.latency.count();
    let cpu = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a).as_secs_f64()),
        _ => None,
    };
    let gw_cpu = cpu(s0.0, s1.0);
    let store_cpu = cpu(s0.5, s1.5);
    let client_cpu = cpu(s0.1, s1.1);
    let upstream_reads = s1.2 - s0.2;
    let with_session = s1.3 - s0.3;
    let us = |q: f64| tally.latency.quantile(q) as f64 / 1000.0;
    Ok(Outcome {
        store: env.name.clone(),
        scenario: sc.name.clone(),
        connections: sc.connections,
        session_bytes: if env.sessions_off { 0 } else { sc.size },
        write_ratio: sc.write_ratio,
        new_visitors: sc.new_visitors,
        target_rate: sc.rate,
        sessions: if sc.new_visitors || env.sessions_off {
            0
        } else {
            sc.connections * o.clients
        },
        seconds: wall,
        requests,
        writes: tally.writes,
        rps: requests as f64 / wall,
        p50_us: us(0.5),
        p99_us: us(0.99),
        p999_us: us(0.999),
        max_us: tally.latency.max() as f64 / 1000.0,
        mean_us: tally.latency.mean() / 1000.0,
        errors: tally.errors,
        first_error: tally.first_error,
        gateway_cpu_us_per_req: gw_cpu
            .filter(|_| requests > 0)
            .map(|c| c * 1e6 / requests as f64),
        gateway_cpu_cores: gw_cpu.map(|c| c / wall),
        store_cpu_us_per_req: store_cpu
            .filter(|_| requests > 0)
            .map(|c| c * 1e6 / requests as f64),
        client_cpu_cores: client_cpu.map(|c| c / wall),
        peak_rss_mib: peak_rss_kib.map(|k| k as f64 / 1024.0),
        session_hit_ratio: (!sc.new_visitors && !env.sessions_off && upstream_reads > 0)
            .then(|| with_session as f64 / upstream_reads as f64),
        metrics_scrapes,
        rps_ratio: None,
        cpu_ratio: None,
        rps_rounds: Vec::new(),
        round: 0,
        ratio_rounds: Vec::new(),
        p99_delta_us: None,
    })
}

/// `--alternate A,B`: both stores must start; then the turns, the
/// targets and the results file.
async fn alternate_run(
    cx: &Ctx<'_>,
    envs: Vec<StoreEnv>,
    skipped: &[(String, String)],
    machine: &report::Machine,
    started: u64,
) -> i32 {
    let o = cx.o;
    if let Some((name, e)) = skipped.first() {
        eprintln!("error: --alternate needs both stores; {name} did not start: {e}");
        clean_up(envs).await;
        return 1;
    }
    println!("{}", alternate::describe(o));
    let (turns, failures) = alternate::run(cx, &envs[0], &envs[1]).await;
    clean_up(envs).await;
    println!();
    let targets = alternate::targets(&turns, o);
    report::print_targets(&targets);
    let json = alternate::to_json(machine, o, started, &turns, &failures, &targets);
    match report::write_json(o, "alternate", started, &json) {
        Ok(paths) => println!("\nresults: {paths}"),
        Err(e) => eprintln!("error: writing results: {e}"),
    }
    i32::from(!failures.is_empty())
}

fn main() {
    let options = match Options::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if let Some(path) = &options.gateway {
        procs::set_gateway_binary(path.display().to_string());
    }
    // Before the runtime's threads exist: they inherit this thread's CPUs.
    if options.pin && options.compare.is_none() {
        if let Err(e) = procs::pin() {
            eprintln!("warning: not pinned ({e}); the gateway shares CPUs with the load");
        }
    }
    if let Some((old, new)) = &options.compare {
        std::process::exit(match report::compare(old, new) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("error: {e}");
                1
            }
        });
    }
    let runtime = if options.client_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(options.client_threads)
            .enable_all()
            .build()
    }
    .expect("tokio runtime");
    // Child processes are started from this (the main) thread, so their
    // parent-death signal fires only when the bench itself exits.
    let code = runtime.block_on(run(options));
    std::process::exit(code);
}

/// Every store is prepared and checked (`--test`) once, up front; one
/// that fails is reported and skipped, the others go on.
fn prepare_all(
    names: &[String],
    o: &Options,
    dir: &Path,
    run_id: &str,
    upstream: u16,
) -> (Vec<StoreEnv>, Vec<(String, String)>) {
    let mut envs: Vec<StoreEnv> = Vec::new();
    let mut skipped: Vec<(String, String)> = Vec::new();
    for name in names {
        let env = stores::prepare(name, dir, run_id).and_then(|env| {
            let check_dir = dir.join(format!("check-{name}"));
            std::fs::create_dir_all(&check_dir).map_err(|e| e.to_string())?;
            let config = check_dir.join("gateway.yaml");
            let admin = (!env.quiet).then(procs::free_port);
            let yaml = gateway_yaml(&env, o, upstream, procs::free_port(), admin, "bench:check:");
            std::fs::write(&config, yaml).map_err(|e| e.to_string())?;
            procs::check_config(&config, &check_dir)?;
            Ok(env)
        });
        match env {
            Ok(env) => envs.push(env),
            Err(e) => {
                println!("store {name}: SKIPPED: {e}");
                skipped.push((name.clone(), e));
            }
        }
    }
    (envs, skipped)
}

/// Drop the SQL tables the stores created on shared servers, then stop
/// the private servers.
async fn clean_up(envs: Vec<StoreEnv>) {
    for env in &envs {
        if let Some((url, table)) = &env.sql_table {
            stores::drop_table(url, table).await;
        }
    }
    drop(envs);
}

/// The req/s of read-rate, decided once per run so every round paces at
/// the same load: --rate, else half of what the bare proxy managed in the
/// first round's read (a load every store should carry, so p99 shows
/// per-request cost, not queueing), else 5000.
fn paced_rate(outcomes: &[Outcome]) -> f64 {
    outcomes
        .iter()
        .find(|r| r.store == "baseline" && r.scenario == "read")
        .map_or(5000.0, |r| (r.rps / 2.0).round())
}

/// The matrix: every round, scenario by scenario, the baseline right
/// before the stores, so a change in background load hits both sides of
/// each ratio alike. Returns the outcomes of every round and the failures.
async fn matrix(cx: &Ctx<'_>, envs: &[StoreEnv]) -> (Vec<Outcome>, Vec<(String, String, String)>) {
    let o = cx.o;
    println!();
    println!("{}", report::progress_header());
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut failures: Vec<(String, String, String)> = Vec::new();
    let mut seq = 0;
    let mut rate: Option<f64> = None;
    for round in 0..o.rounds {
        for mut sc in scenarios(o) {
            if sc.rate == Some(0.0) {
                sc.rate = Some(*rate.get_or_insert_with(|| paced_rate(&outcomes)));
            }
            for env in envs {
                if !runs(o, &env.name, &sc) {
                    continue;
                }
                seq += 1;
                match run_one(cx, env, &sc, seq).await {
                    Ok(mut out) => {
                        out.round = round;
                        println!("{}", report::progress_line(&out));
                        outcomes.push(out);
                    }
                    Err(e) => {
                        println!("{:<14} {:<9} FAILED: {e}", env.name, sc.name);
                        failures.push((env.name.clone(), sc.name.clone(), e));
                    }
                }
            }
        }
    }
    (outcomes, failures)
}

async fn run(o: Options) -> i32 {
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let run_id = format!("{started}_{}", std::process::id());
    let dir = match tempfile::Builder::new().prefix("sgw-bench-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: temp dir: {e}");
            return 1;
        }
    };
    let machine = report::Machine::read();
    println!("{}", machine.describe(&o));
    let upstream = match Upstream::start().await {
        Ok(u) => u,
        Err(e) => {
            eprintln!("error: cannot start the upstream: {e}");
            return 1;
        }
    };
    let names = if o.soak.is_some() {
        &o.soak_stores
    } else {
        &o.stores
    };
    let (envs, skipped) = prepare_all(names, &o, dir.path(), &run_id, upstream.port);
    let cx = Ctx {
        o: &o,
        upstream: &upstream,
        dir: dir.path(),
        run_id: &run_id,
    };
    if let Some(d) = o.soak {
        let soaks = soak::run(&cx, &envs, d).await;
        clean_up(envs).await;
        let targets = soak::targets(&soaks);
        println!();
        report::print_targets(&targets);
        let json = soak::to_json(&machine, &o, started, &soaks, &skipped, &targets);
        match report::write_json(&o, "soak", started, &json) {
            Ok(paths) => println!("\nresults: {paths}"),
            Err(e) => eprintln!("error: writing results: {e}"),
        }
        return 0;
    }

    if o.alternate {
        return alternate_run(&cx, envs, &skipped, &machine, started).await;
    }

    let (outcomes, failures) = matrix(&cx, &envs).await;
    let rounds = outcomes.clone();
    let mut outcomes = report::median_of_rounds(outcomes);
    clean_up(envs).await;

    report::relate_to_baseline(&mut outcomes, &rounds);
    let pure_ns = work::read_work_ns(1024);
    let targets = report::targets(&outcomes, &rounds, pure_ns, &o);
    println!();
    report::print_table(&outcomes, &o);
    println!();
    report::print_targets(&targets);
    println!(
        "note: stores measured one after the other see a shared machine at different speeds; \
         for a ratio to trust there, take turns: --alternate baseline,memory (or memory,memory-sealed, ...)"
    );
    let json = report::to_json(
        &machine, &o, started, &outcomes, &skipped, &failures, &targets, pure_ns,
    );
    match report::write_json(&o, "load", started, &json) {
        Ok(paths) => println!("\nresults: {paths}"),
        Err(e) => eprintln!("error: writing results: {e}"),
    }
    0
}
