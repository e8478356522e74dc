//! One user floods its shard; another user on the same shard measures its
//! own round trips. Shows what the per-user rate limit, the abuse close and
//! the one-pending-pong rule buy the other users, and the server's memory
//! before and after.
//!
//! Run with `cargo bench --bench flood`. One shard (everyone shares it), the
//! default limits, the whole server on CPU 0; the victim and the flooders on
//! CPU 1, the flooders at the lowest priority so that the victim's own
//! client is not what is measured. The victim, alice, sends on one connection and times the
//! delivery on her other connection, one message at a time. Figures are
//! printed, never asserted.

mod support;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::{
    Client, client_frame, lower_priority, pin_thread, report, rss_kib, start_server_pinned, token,
    upgrade,
};

const SAMPLES: usize = 2000;
const FLOODERS: usize = 4;

/// What a flooding connection sends, over and over.
#[derive(Clone, Copy)]
enum Flood {
    /// `send` frames far beyond the rate limit, never reading: the server
    /// answers one `rate_limited`, drops the rest and closes with 1008.
    Messages,
    /// WebSocket pings, never reading the pongs.
    Pings,
    /// Invalid JSON, never reading the errors.
    Garbage,
}

fn victim_round_trips(sender: &mut Client, receiver: &mut Client) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        let body = format!(r#"{{"type":"send","id":{i},"data":"probe-{i}"}}"#);
        let start = Instant::now();
        sender.send_text(&body).unwrap();
        let needle = format!("\"probe-{i}\"");
        receiver.read_until(&needle).expect("victim lost a message");
        samples.push(start.elapsed());
        sender.read_until("\"ack\"").expect("victim lost an ack");
        // Stay under alice's own rate limit (100/s, bursts of 200).
        if i % 150 == 149 {
            std::thread::sleep(Duration::from_millis(1600));
        }
    }
    samples.sort();
    samples
}

fn flooder(
    addr: std::net::SocketAddr,
    kind: Flood,
    index: usize,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) {
    pin_thread(1);
    lower_priority();
    let frame = match kind {
        Flood::Messages => client_frame(1, br#"{"type":"send","id":1,"data":"flood"}"#),
        Flood::Pings => client_frame(9, b"flood"),
        Flood::Garbage => client_frame(1, b"{not json"),
    };
    let batch: Vec<u8> = (0..64).flat_map(|_| frame.clone()).collect();
    while !stop.load(Ordering::Relaxed) {
        // Reconnect whenever the server closes the flooder.
        let (mut stream, _) = upgrade(addr, &token(&format!("mallory-{index}")));
        stream
            .set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        while !stop.load(Ordering::Relaxed) {
            if stream.write_all(&batch).is_err() {
                break;
            }
            sent.fetch_add(64, Ordering::Relaxed);
        }
    }
}

fn main() {
    if !support::asked_to_run() {
        return;
    }
    // The server on CPU 0; the victim and the (low-priority) flooders on 1.
    let server = start_server_pinned(&["--shards", "1"], 0);
    pin_thread(1);
    println!("alice's delivery latency (send on one connection, receive on the other)");
    let mut sender = Client::connect(server.addr, &token("alice"));
    let mut receiver = Client::connect(server.addr, &token("alice"));
    sender.read_until("welcome").unwrap();
    receiver.read_until("welcome").unwrap();

    let rss_start = rss_kib(server.pid());
    let quiet = victim_round_trips(&mut sender, &mut receiver);
    report("quiet", &quiet, &format!("rss={rss_start} KiB"));

    for (label, kind) in [
        ("message flood", Flood::Messages),
        ("ping flood", Flood::Pings),
        ("garbage flood", Flood::Garbage),
    ] {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..FLOODERS)
            .map(|i| {
                let (stop, sent) = (stop.clone(), sent.clone());
                let addr = server.addr;
                std::thread::spawn(move || flooder(addr, kind, i, stop, sent))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let samples = victim_round_trips(&mut sender, &mut receiver);
        let rate = sent.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
        let rss_during = rss_kib(server.pid());
        stop.store(true, Ordering::Relaxed);
        for worker in workers {
            let _ = worker.join();
        }
        report(
            label,
            &samples,
            &format!("({rate:.0} flood frames/s written; rss={rss_during} KiB)"),
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    println!(
        "rss after the floods: {} KiB (start {rss_start} KiB)",
        rss_kib(server.pid())
    );
}
