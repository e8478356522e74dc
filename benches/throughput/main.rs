//! Per-core throughput of shardgate against named peers, in one run.
//!
//! `cargo bench --bench throughput` (about 10 minutes);
//! `SHARDGATE_BENCH_QUICK=1` for a one-minute smoke run;
//! `SHARDGATE_BENCH_FILTER=<substring>` to pick scenarios by
//! "scenario config" (for example `round-trip 20B`, `handshake`, `idle`);
//! `SHARDGATE_BENCH_IDLE=100000` for the idle scenario's connection count;
//! `SHARDGATE_BENCH_RUNS=N` and `SHARDGATE_BENCH_MEASURE_MS=MS` override the
//! run count and the measured window (for investigating).
//!
//! Every server under test (shardgate with `--shards 1`, and the peers
//! below, built into this binary and run as child processes by re-executing
//! it with `--serve-peer`) is pinned to CPU 0; the load generator is this
//! process's main thread, pinned to CPU 1: one thread, epoll, non-blocking
//! sockets, no allocation per message (see `loadgen.rs`).
//!
//! Peers: a tokio-tungstenite echo server and a fastwebsockets echo server
//! (current-thread tokio runtimes) for the transport comparison with
//! shardgate's `/ws/echo`, and "shared-registry" (tokio-tungstenite behind
//! one global `Mutex<HashMap<user, connections>>`, protocol v1 subset) for
//! the full-protocol comparison with `/ws`. On one core its mutex is never
//! contended; the "2 cores" rows run it on a multi-threaded runtime beside
//! shardgate `--shards 2`, where the generator shares CPU 1 with them.
//!
//! Each figure is the median of interleaved runs (A B C A B C ...) with
//! its min–max; latencies are the medians of the runs' percentiles. A run
//! whose server used less than 90 % of its cores is flagged client-bound,
//! one whose generator thread used more than 90 % of CPU 1 "generator
//! saturated". The machine may be shared: before each run the bench waits
//! (bounded) for CPUs 0 and 1 to be quiet, measures what other processes
//! used during the window ("other CPU"), repeats a disturbed run (at most
//! twice, within a budget) and flags what stayed disturbed as noisy.
//! Results: a table on stdout and `target/bench-results.json`; server
//! stderr goes to `target/bench-logs/`.
//!
//! Under `cargo test --all-targets` this binary is built and run without
//! `--bench`: it then returns at once.

mod loadgen;
mod peers;
mod report;
mod scenarios;
mod servers;

use std::time::{Duration, Instant};

use report::{Ratio, Report, Row};
use scenarios::{RunResult, Settings, Target};
use servers::{Alg, Proc};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--serve-peer") {
        peers::serve(&args[i + 1..]);
        return;
    }
    // `cargo bench` passes --bench; `cargo test --all-targets` does not.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    Bench::new().run();
}

struct Bench {
    quick: bool,
    settings: Settings,
    filter: Option<String>,
    idle_n: usize,
    report: Report,
    started: Instant,
    /// Seconds spent waiting for a quiet machine.
    quiet_waited: f64,
    /// The commit the shardgate binary was built from (at start).
    commit: String,
    /// Noisy runs repeated so far, and the most allowed.
    retries: usize,
    retry_budget: usize,
}

/// One configuration: its targets run interleaved, `runs` times each.
struct Config<'a> {
    section: &'a str,
    config: String,
    unit: &'static str,
    load: bool,
    /// (shardgate target, peer target) indices for ratios.
    ratios: &'a [(usize, usize)],
}

impl Bench {
    fn new() -> Bench {
        let quick = std::env::var("SHARDGATE_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let filter = std::env::var("SHARDGATE_BENCH_FILTER")
            .ok()
            .filter(|f| !f.is_empty());
        let idle_n = std::env::var("SHARDGATE_BENCH_IDLE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if quick { 2_000 } else { 10_000 });
        let settings = if quick {
            Settings {
                runs: 3,
                warmup: Duration::from_millis(100),
                measure: Duration::from_millis(500),
            }
        } else {
            Settings {
                runs: 5,
                warmup: Duration::from_millis(250),
                measure: Duration::from_millis(1000),
            }
        };
        // Overrides for investigating (longer windows, more runs).
        let mut settings = settings;
        if let Some(runs) = env_number("SHARDGATE_BENCH_RUNS") {
            settings.runs = runs.max(1) as usize;
        }
        if let Some(ms) = env_number("SHARDGATE_BENCH_MEASURE_MS") {
            settings.measure = Duration::from_millis(ms.max(100));
        }
        Bench {
            quick,
            settings,
            filter,
            idle_n,
            report: Report::default(),
            started: Instant::now(),
            quiet_waited: 0.0,
            commit: git_head(),
            retries: 0,
            retry_budget: if quick { 15 } else { 80 },
        }
    }

    fn selected(&self, section: &str, config: &str) -> bool {
        match &self.filter {
            Some(f) => format!("{section} {config}").contains(f.as_str()),
            None => true,
        }
    }

    fn section_selected(&self, section: &str, configs: &[String]) -> bool {
        configs.iter().any(|c| self.selected(section, c))
    }

    fn run(mut self) {
        if !servers::pin_current_thread(1) {
            println!("warning: cannot pin the generator to CPU 1 (fewer than 2 CPUs?)");
        }
        // The server logs of this run only.
        let _ = std::fs::remove_dir_all(servers::target_dir().join("bench-logs"));
        let nofile = servers::raise_nofile((self.idle_n as u64 + 20_000).max(65_536));
        // The generator and each server hold one descriptor per connection:
        // without CAP_SYS_RESOURCE the hard limit caps the idle scenario.
        let cap = (nofile as usize).saturating_sub(1_000);
        if self.idle_n > cap {
            let note = format!(
                "idle: {} connections asked for, but RLIMIT_NOFILE cannot be raised above \
                 {nofile} here (hard limit; raising it needs CAP_SYS_RESOURCE), so the idle \
                 scenario uses {cap}",
                self.idle_n
            );
            println!("warning: {note}");
            self.report.notes.push(note);
            self.idle_n = cap;
        }
        println!(
            "throughput bench: {} mode, {} runs of {} ms (+{} ms warm-up) per figure, \
             generator on CPU 1, servers on CPU 0, RLIMIT_NOFILE {nofile}",
            if self.quick { "quick" } else { "full" },
            self.settings.runs,
            self.settings.measure.as_millis(),
            self.settings.warmup.as_millis()
        );
        println!("shardgate commit {}", self.commit);
        println!("{}", report::HEADER);
        self.round_trip();
        self.round_trip_two_cores();
        self.fan_out();
        self.publish();
        self.handshakes();
        self.idle();
        self.finish();
    }

    /// Runs `f` for every target, interleaved, and records the rows.
    fn interleave(
        &mut self,
        cfg: Config,
        targets: &[Target],
        mut f: impl FnMut(&Target) -> RunResult,
    ) {
        let mut runs: Vec<Vec<RunResult>> = vec![Vec::new(); targets.len()];
        for _ in 0..self.settings.runs {
            for (i, target) in targets.iter().enumerate() {
                // A run disturbed by other processes is repeated (at most
                // twice, within a global budget); the last attempt counts.
                let mut attempt = 0;
                let result = loop {
                    self.wait_for_quiet();
                    let result = f(target);
                    attempt += 1;
                    if result.other_cpu <= report::NOISE_CORES
                        || attempt == 3
                        || self.retries >= self.retry_budget
                    {
                        break result;
                    }
                    self.retries += 1;
                };
                runs[i].push(result);
            }
        }
        for (target, runs) in targets.iter().zip(runs) {
            let row = Row {
                section: cfg.section.to_string(),
                config: cfg.config.clone(),
                target: target.label.clone(),
                unit: cfg.unit,
                cores: target.cores,
                load: cfg.load,
                runs,
            };
            println!("{}", Report::row_line(&row));
            self.report.rows.push(row);
        }
        for &(a, b) in cfg.ratios {
            let ratio = Ratio {
                section: cfg.section.to_string(),
                config: cfg.config.clone(),
                num: targets[a].label.clone(),
                den: targets[b].label.clone(),
            };
            if let Some(line) = self.report.ratio_line(&ratio) {
                println!("{line}");
            }
            self.report.ratios.push(ratio);
        }
        self.save();
    }

    fn round_trip(&mut self) {
        let section = "round-trip";
        let configs: Vec<(usize, usize)> = if self.quick {
            vec![(20, 100), (16384, 10)]
        } else {
            [20, 1024, 16384]
                .into_iter()
                .flat_map(|size| [10, 100, 500].into_iter().map(move |c| (size, c)))
                .collect()
        };
        let labels: Vec<String> = configs.iter().map(|&(s, c)| rt_label(s, c)).collect();
        if !self.section_selected(section, &labels) {
            return;
        }
        let sg = servers::shardgate(1, &[0], Alg::Hs256, "shardgate");
        let sr = servers::peer("shared-registry", 1, &[0], "shared-registry");
        let tt = servers::peer("tokio-tungstenite", 1, &[0], "tokio-tungstenite");
        let fws = servers::peer("fastwebsockets", 1, &[0], "fastwebsockets");
        let targets = [
            protocol_target("shardgate /ws (protocol)", &sg, 1.0),
            protocol_target("shared-registry (1 core, mutex uncontended)", &sr, 1.0),
            echo_target("shardgate /ws/echo", &sg, "/ws/echo", true),
            echo_target("tokio-tungstenite echo", &tt, "/", false),
            echo_target("fastwebsockets echo", &fws, "/", false),
        ];
        for ((size, conns), label) in configs.into_iter().zip(labels) {
            if !self.selected(section, &label) {
                continue;
            }
            let cfg = Config {
                section,
                config: label,
                unit: "rt/s",
                load: true,
                ratios: &[(0, 1), (2, 3), (2, 4), (0, 3), (0, 4)],
            };
            let settings = self.settings.clone();
            self.interleave(cfg, &targets, |t| {
                scenarios::round_trip(t, size, conns, &settings)
            });
        }
    }

    fn round_trip_two_cores(&mut self) {
        let section = "round-trip-2core";
        let (size, conns) = (20, 100);
        let label = rt_label(size, conns);
        if !self.selected(section, &label) {
            return;
        }
        let sg = servers::shardgate(2, &[0, 1], Alg::Hs256, "shardgate-2-shards");
        let sr = servers::peer("shared-registry", 2, &[0, 1], "shared-registry-mt2");
        let targets = [
            protocol_target("shardgate /ws (2 cores, --shards 2)", &sg, 2.0),
            protocol_target("shared-registry (2 cores, multi-thread runtime)", &sr, 2.0),
        ];
        let cfg = Config {
            section,
            config: label,
            unit: "rt/s",
            load: true,
            ratios: &[(0, 1)],
        };
        let settings = self.settings.clone();
        self.interleave(cfg, &targets, |t| {
            scenarios::round_trip(t, size, conns, &settings)
        });
        self.report.notes.push(
            "round-trip-2core: both servers span CPUs 0 and 1 and the generator shares CPU 1 \
             with them, so these runs are client-bound by construction"
                .into(),
        );
    }

    fn fan_out(&mut self) {
        let section = "fan-out";
        let users = 50;
        let ks: Vec<usize> = if self.quick { vec![8] } else { vec![2, 8] };
        let labels: Vec<String> = ks
            .iter()
            .map(|k| format!("20B {users} users × k={k}"))
            .collect();
        if !self.section_selected(section, &labels) {
            return;
        }
        let sg = servers::shardgate(1, &[0], Alg::Hs256, "shardgate");
        let sr = servers::peer("shared-registry", 1, &[0], "shared-registry");
        let targets = [
            protocol_target("shardgate /ws (protocol)", &sg, 1.0),
            protocol_target("shared-registry (1 core, mutex uncontended)", &sr, 1.0),
        ];
        for (k, label) in ks.into_iter().zip(labels) {
            if !self.selected(section, &label) {
                continue;
            }
            let cfg = Config {
                section,
                config: label,
                unit: "deliv/s",
                load: true,
                ratios: &[(0, 1)],
            };
            let settings = self.settings.clone();
            self.interleave(cfg, &targets, |t| {
                scenarios::fan_out(t, users, k, &settings)
            });
        }
    }

    fn publish(&mut self) {
        let section = "publish";
        let (users, clients) = (100, 16);
        let label = format!("20B {users} users × 2 conns, {clients} API conns");
        if !self.selected(section, &label) {
            return;
        }
        let sg = servers::shardgate(1, &[0], Alg::Hs256, "shardgate");
        let targets = [protocol_target("shardgate /api/v1/publish", &sg, 1.0)];
        let cfg = Config {
            section,
            config: label,
            unit: "deliv/s",
            load: true,
            ratios: &[],
        };
        let settings = self.settings.clone();
        self.interleave(cfg, &targets, |t| {
            scenarios::publish(t, users, clients, &settings)
        });
        self.report.notes.push(
            "publish: latency is the API round trip (request written to response read); \
             throughput counts WebSocket deliveries (2 per publish)"
                .into(),
        );
    }

    fn handshakes(&mut self) {
        let section = "handshake";
        let label = "new conn → welcome → Close".to_string();
        if !self.selected(section, &label) {
            return;
        }
        let algs: Vec<Alg> = if self.quick {
            vec![Alg::Hs256, Alg::EdDsa]
        } else {
            vec![Alg::Hs256, Alg::Rs256, Alg::Es256, Alg::EdDsa]
        };
        let procs: Vec<Proc> = algs
            .iter()
            .map(|&alg| servers::shardgate(1, &[0], alg, &format!("shardgate-{}", alg.name())))
            .collect();
        let sr = servers::peer("shared-registry", 1, &[0], "shared-registry");
        let mut targets: Vec<Target> = algs
            .iter()
            .zip(&procs)
            .map(|(alg, proc)| protocol_target(&format!("shardgate {}", alg.name()), proc, 1.0))
            .collect();
        targets.push(protocol_target("shared-registry HS256 (1 core)", &sr, 1.0));
        let mut algs_of_targets = algs.clone();
        algs_of_targets.push(Alg::Hs256);
        // Pre-minted, one distinct user per connection within a run (pools
        // are reused across runs). Sized above what one run can use.
        let window = self.settings.warmup + self.settings.measure;
        let minted = Instant::now();
        let pools: Vec<Vec<Vec<u8>>> = targets
            .iter()
            .zip(&algs_of_targets)
            .map(|(t, &alg)| {
                // Above what each can do here, except RS256, whose signing
                // (about 4 ms a token) would dominate the bench: its run
                // ends early, with a note, if the pool runs out.
                let per_sec = match alg {
                    Alg::Hs256 => 40_000.0,
                    Alg::Rs256 => 6_000.0,
                    _ => 15_000.0,
                };
                let count = (per_sec * window.as_secs_f64()) as usize;
                scenarios::handshake_pool(t, alg, count)
            })
            .collect();
        println!(
            "(handshake tokens minted in {:.1} s, before timing)",
            minted.elapsed().as_secs_f64()
        );
        let cfg = Config {
            section,
            config: label,
            unit: "conn/s",
            load: true,
            ratios: &[(0, algs.len())],
        };
        let settings = self.settings.clone();
        let labels: Vec<String> = targets.iter().map(|t| t.label.clone()).collect();
        self.interleave(cfg, &targets, |t| {
            let i = labels.iter().position(|l| *l == t.label).unwrap();
            scenarios::handshakes(t, &pools[i], &settings)
        });
    }

    fn idle(&mut self) {
        let section = "idle";
        let n = self.idle_n;
        // tungstenite keeps a 128 KiB read buffer per connection: cap the
        // tungstenite-based peers so a 100,000 run stays within memory.
        let peer_n = n.min(20_000);
        let label = format!("{n} conns, 1 message each");
        if !self.selected(section, &label) {
            return;
        }
        type Spawn = fn() -> Proc;
        let specs: [(&str, Spawn, &str, bool, bool, usize); 5] = [
            (
                "shardgate /ws (protocol)",
                || servers::shardgate(1, &[0], Alg::Hs256, "shardgate-idle"),
                "/ws",
                true,
                true,
                n,
            ),
            (
                "shardgate /ws/echo",
                || servers::shardgate(1, &[0], Alg::Hs256, "shardgate-idle"),
                "/ws/echo",
                true,
                false,
                n,
            ),
            (
                "shared-registry",
                || servers::peer("shared-registry", 1, &[0], "shared-registry-idle"),
                "/ws",
                true,
                true,
                peer_n,
            ),
            (
                "tokio-tungstenite echo",
                || servers::peer("tokio-tungstenite", 1, &[0], "tokio-tungstenite-idle"),
                "/",
                false,
                false,
                peer_n,
            ),
            (
                "fastwebsockets echo",
                || servers::peer("fastwebsockets", 1, &[0], "fastwebsockets-idle"),
                "/",
                false,
                false,
                peer_n,
            ),
        ];
        let mut runs: Vec<Vec<RunResult>> = vec![Vec::new(); specs.len()];
        for _ in 0..self.settings.runs {
            for (i, (label, spawn, path, auth, protocol, count)) in specs.iter().enumerate() {
                let proc = spawn();
                let target = Target {
                    label: label.to_string(),
                    proc: &proc,
                    path,
                    auth: *auth,
                    protocol: *protocol,
                    cores: 1.0,
                };
                runs[i].push(scenarios::idle(&target, *count));
            }
        }
        for ((label, _, _, _, _, count), runs) in specs.iter().zip(runs) {
            let row = Row {
                section: section.to_string(),
                config: if *count == n {
                    label_n(n)
                } else {
                    label_n(*count)
                },
                target: label.to_string(),
                unit: "KiB/conn",
                cores: 1.0,
                load: false,
                runs,
            };
            println!("{}", Report::row_line(&row));
            self.report.rows.push(row);
        }
        self.report.notes.push(
            "idle: server RSS growth (VmRSS after all connections exchanged one message and \
             settled 0.5 s, minus before) / connections; each run starts a fresh server; \
             latency columns are empty and server CPU is over the open+exchange phase"
                .into(),
        );
        self.save();
    }

    /// Other processes share this machine (tests, builds): before a run,
    /// wait until CPUs 0 and 1 are quiet (under 10 % busy over 100 ms, our
    /// own servers being idle then), at most 3 s per run and a bounded
    /// total, and go ahead regardless after that. Runs that were still
    /// disturbed are flagged "noisy" from their own measurement.
    fn wait_for_quiet(&mut self) {
        let budget = if self.quick { 20.0 } else { 150.0 };
        let started = Instant::now();
        while self.quiet_waited + started.elapsed().as_secs_f64() < budget
            && started.elapsed() < Duration::from_secs(3)
        {
            let busy0 = servers::cpus_busy_seconds(&[0, 1]);
            let t0 = Instant::now();
            std::thread::sleep(Duration::from_millis(100));
            let busy = (servers::cpus_busy_seconds(&[0, 1]) - busy0) / t0.elapsed().as_secs_f64();
            if busy < 0.10 {
                break;
            }
        }
        self.quiet_waited += started.elapsed().as_secs_f64();
    }

    fn settings_json(&self) -> serde_json::Value {
        serde_json::json!({
            "quick": self.quick,
            "runs": self.settings.runs,
            "warmup_ms": self.settings.warmup.as_millis() as u64,
            "measure_ms": self.settings.measure.as_millis() as u64,
            "filter": self.filter,
            "idle_connections": self.idle_n,
            "server_cpus": [0],
            "generator_cpu": 1,
            "commit": self.commit,
        })
    }

    fn save(&self) {
        let path = servers::target_dir().join("bench-results.json");
        self.report.write_json(&path, self.settings_json());
    }

    fn finish(mut self) {
        // Server logs: count WARN / ERROR lines as anomalies worth a look.
        let logs = servers::target_dir().join("bench-logs");
        if let Ok(entries) = std::fs::read_dir(&logs) {
            let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            paths.sort();
            for path in paths {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let warns = text.lines().filter(|l| l.contains("WARN")).count();
                let errors = text.lines().filter(|l| l.contains("ERROR")).count();
                let panics = text.lines().filter(|l| l.contains("panicked")).count();
                if warns + errors + panics > 0 {
                    self.report.notes.push(format!(
                        "server log {}: {warns} WARN, {errors} ERROR, {panics} panic lines",
                        path.display()
                    ));
                }
            }
        }
        self.report.notes.push(format!(
            "waited {:.0} s in all for a quiet machine before runs; \
             repeated {} noisy runs (budget {})",
            self.quiet_waited, self.retries, self.retry_budget
        ));
        let table = self.report.table();
        println!(
            "
== summary ({:.0} s)

{table}",
            self.started.elapsed().as_secs_f64()
        );
        for note in &self.report.notes {
            println!("note: {note}");
        }
        self.save();
        println!(
            "
results: {}",
            servers::target_dir().join("bench-results.json").display()
        );
    }
}

/// The commit under test, with "-dirty" when the work tree differs.
fn git_head() -> String {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let head = run(&["rev-parse", "--short", "HEAD"]);
    let dirty = !run(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    if dirty { format!("{head}-dirty") } else { head }
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn rt_label(size: usize, conns: usize) -> String {
    let size = match size {
        s if s >= 1024 => format!("{}KiB", s / 1024),
        s => format!("{s}B"),
    };
    format!("{size} c={conns}")
}

fn label_n(n: usize) -> String {
    format!("{} conns, 1 message each", report::num(n as f64))
}

fn protocol_target<'a>(label: &str, proc: &'a Proc, cores: f64) -> Target<'a> {
    Target {
        label: label.to_string(),
        proc,
        path: "/ws",
        auth: true,
        protocol: true,
        cores,
    }
}

fn echo_target<'a>(label: &str, proc: &'a Proc, path: &'static str, auth: bool) -> Target<'a> {
    Target {
        label: label.to_string(),
        proc,
        path,
        auth,
        protocol: false,
        cores: 1.0,
    }
}
