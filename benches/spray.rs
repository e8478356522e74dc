//! Honest handshake latency while one address sprays forged tokens whose
//! signatures are expensive to check (RS256, ES256).
//!
//! Run with `cargo bench --bench spray`. For each algorithm the server runs
//! with one shard; honest clients connect from 127.0.0.1 with valid tokens,
//! one at a time, while sprayer threads on 127.0.0.2 present well-formed
//! tokens with bad signatures as fast as they can. The run is repeated with
//! the per-address refusal budget on (the default) and off, to show what
//! the budget buys. Figures are printed, never asserted.

mod support;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey};
use support::{report, start_server, token_with, upgrade_from};

const PROBES: usize = 400;
const SPRAYERS: usize = 4;

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A token whose signature has the right length but is wrong.
fn forged(valid: &str) -> String {
    let (rest, signature) = valid.rsplit_once('.').unwrap();
    let flipped: String = signature
        .chars()
        .map(|c| if c == 'A' { 'B' } else { 'A' })
        .collect();
    format!("{rest}.{flipped}")
}

fn probes(addr: std::net::SocketAddr, tokens: &[String]) -> Vec<Duration> {
    let mut samples: Vec<Duration> = tokens
        .iter()
        .map(|token| {
            let (stream, status, elapsed) = upgrade_from(None, addr, token);
            assert_eq!(status, 101, "honest upgrade refused");
            drop(stream);
            elapsed
        })
        .collect();
    samples.sort();
    samples
}

fn main() {
    if !support::asked_to_run() {
        return;
    }
    let algorithms = [
        ("RS256", Algorithm::RS256, "rsa"),
        ("ES256", Algorithm::ES256, "ec"),
    ];
    println!("honest upgrade latency (connect to answer) during a forged-token spray");
    for (name, algorithm, key) in algorithms {
        let private = std::fs::read(fixture(&format!("{key}_private.pem"))).unwrap();
        let encoding = match algorithm {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&private).unwrap(),
            _ => EncodingKey::from_ec_pem(&private).unwrap(),
        };
        let public = fixture(&format!("{key}_public.pem"));
        let honest: Vec<String> = (0..PROBES)
            .map(|i| token_with(&format!("honest-{i}"), algorithm, &encoding))
            .collect();
        let bogus = forged(&token_with("mallory", algorithm, &encoding));

        for (label, extra) in [("budget on", "20"), ("budget off", "0")] {
            let server = start_server(&[
                "--shards",
                "1",
                "--jwt-public-key",
                &public,
                "--jwt-alg",
                name,
                "--refusals-per-peer",
                extra,
            ]);
            let quiet = probes(server.addr, &honest);

            let stop = Arc::new(AtomicBool::new(false));
            let sprayed = Arc::new(AtomicU64::new(0));
            let workers: Vec<_> = (0..SPRAYERS)
                .map(|_| {
                    let (stop, sprayed, bogus) = (stop.clone(), sprayed.clone(), bogus.clone());
                    let addr = server.addr;
                    let source: IpAddr = "127.0.0.2".parse().unwrap();
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            let _ = upgrade_from(Some(source), addr, &bogus);
                            sprayed.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_millis(300));
            let started = Instant::now();
            let before = sprayed.load(Ordering::Relaxed);
            let busy = probes(server.addr, &honest);
            let rate =
                (sprayed.load(Ordering::Relaxed) - before) as f64 / started.elapsed().as_secs_f64();
            stop.store(true, Ordering::Relaxed);
            for worker in workers {
                let _ = worker.join();
            }

            report(&format!("{name} {label}, quiet"), &quiet, "");
            report(
                &format!("{name} {label}, spray"),
                &busy,
                &format!("({rate:.0} forged upgrades/s answered)"),
            );
        }
    }
}
