//! Isolation suite, category 5 — load: the isolation guarantees hold at the
//! largest load the CI machine sustains in about 20 seconds. Correctness
//! only: nothing here asserts a time (figures are printed; the cost of
//! isolation is measured by `cargo bench --bench isolation_cost`).
//!
//! * 500 users with 2 connections each (1,000 WebSockets) on a 4-shard
//!   server, then thousands of sends, publishes, forged frames and pings from
//!   16 threads: every frame of every connection is exactly what the
//!   reference model predicts (the checker of the randomized test), a
//!   sentinel barrier proves nothing else arrived, and after everyone leaves
//!   every shard is back to zero and the server's descriptors to baseline.
//! * The same on a single shard holding every user (a hot shard).
//!
//! Scale with `SHARDGATE_LOAD_USERS`, `SHARDGATE_LOAD_CONNS` (per user),
//! `SHARDGATE_LOAD_OPS` (traffic operations) and `SHARDGATE_LOAD_WORKERS`.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::model::*;
use common::probe::*;
use common::*;

struct Load {
    users: usize,
    conns: usize,
    ops: usize,
    workers: usize,
}

fn load(default: Load) -> Load {
    Load {
        users: env_usize("SHARDGATE_LOAD_USERS", default.users),
        conns: env_usize("SHARDGATE_LOAD_CONNS", default.conns),
        ops: env_usize("SHARDGATE_LOAD_OPS", default.ops),
        workers: env_usize("SHARDGATE_LOAD_WORKERS", default.workers),
    }
}

/// The load tests take the machine one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn run_load(name: &str, shards: u16, load: Load) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let seed = seed_from_env();
    let server = Server::builder()
        .shards(shards)
        .args([
            "--rate-limit",
            "0",
            "--max-connections-per-user",
            &(load.conns + 1).max(32).to_string(),
        ])
        .start();
    assert_all_shards_idle(&server, POLL_TIMEOUT);
    let baseline = stable_fd_count(server.pid());

    let ops = generate_load(seed, load.users, load.conns, load.ops);
    let mut config = RunConfig::new(load.users, load.workers, "load-");
    config.max_conns_per_user = load.conns;
    config.time_bound = Duration::from_secs(600);
    println!(
        "{name}: seed {seed} (replay: SHARDGATE_SEED={seed}), {} users x {} connections \
         on {shards} shards, {} traffic operations, {} workers",
        load.users, load.conns, load.ops, load.workers
    );
    let report = run(&server, &ops, &config);
    println!(
        "{name}: {} operations in {:.2?} ({:.0}/s); {} frames and API answers checked; \
         {} connections opened, {} open at once",
        report.ops_done,
        report.op_time,
        report.ops_per_sec(),
        report.frames_checked,
        report.connections_opened,
        report.peak_open,
    );
    if let Some(failure) = &report.failure {
        panic!("{name}, seed {seed}: {}", failure.message);
    }
    assert_eq!(report.ops_done, ops.len());
    assert_eq!(
        report.peak_open,
        load.users * load.conns,
        "everyone was connected at once"
    );
    assert_all_shards_idle(&server, Duration::from_secs(20));
    assert_fds_back_to(&server, baseline, Duration::from_secs(20));
}

#[test]
fn a_thousand_connections_of_500_users_get_exactly_their_own_traffic() {
    run_load(
        "load",
        4,
        load(Load {
            users: 500,
            conns: 2,
            ops: 10_000,
            workers: 16,
        }),
    );
}

#[test]
fn a_single_shard_holding_every_user_keeps_them_apart() {
    run_load(
        "hot shard",
        1,
        load(Load {
            users: 200,
            conns: 3,
            ops: 5_000,
            workers: 12,
        }),
    );
}
