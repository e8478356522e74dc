//! The scenarios: each builds its frames and tokens before timing, opens its
//! connections, runs warm-up then the measured window on one `Net`, and
//! closes everything (Close handshake, then reset for stragglers).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use crate::loadgen::{Driver, Net, OP_TEXT, client_frame, upgrade_request};
use crate::servers::{self, Alg, Proc};

/// Handshakes in flight per source address: shardgate refuses more than 64
/// in progress from one peer address (503) by default.
const WINDOW_PER_SOURCE: usize = 32;

#[derive(Clone)]
pub struct Settings {
    pub runs: usize,
    pub warmup: Duration,
    pub measure: Duration,
}

/// One server endpoint to drive.
pub struct Target<'a> {
    pub label: String,
    pub proc: &'a Proc,
    pub path: &'static str,
    /// Sends a bearer token in the upgrade request.
    pub auth: bool,
    /// Speaks protocol v1 (welcome, send, message, ack); otherwise echo.
    pub protocol: bool,
    /// Cores the server may use.
    pub cores: f64,
}

/// What one run measured.
#[derive(Clone, Debug, Default)]
pub struct RunResult {
    /// Events per second (round trips, deliveries, handshakes) or, for the
    /// idle scenario, KiB per connection.
    pub value: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub samples: u64,
    /// Server CPU over the measured window, in cores (1.0 = one core).
    pub server_cpu: f64,
    /// The generator thread's CPU over the window, in cores.
    pub gen_cpu: f64,
    /// CPU 0 and 1 busy time not spent by the server or the generator (other
    /// processes on the machine), in cores: high values mean a noisy run.
    pub other_cpu: f64,
    pub errors: u64,
    pub note: Option<String>,
    /// Longest time without progress while work was in flight, in ms.
    pub stall_ms: f64,
    /// Where the in-flight connections were at the first stall.
    pub stall_state: Option<String>,
    pub extra: Vec<(&'static str, f64)>,
}

impl RunResult {
    fn latencies(&mut self, hist: &Histogram<u64>) {
        self.samples = hist.len();
        if hist.is_empty() {
            return;
        }
        self.p50_us = hist.value_at_quantile(0.50) as f64 / 1e3;
        self.p99_us = hist.value_at_quantile(0.99) as f64 / 1e3;
        self.p999_us = hist.value_at_quantile(0.999) as f64 / 1e3;
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

pub fn source(i: usize, sources: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (i % sources) as u8)
}

// ---------------------------------------------------------------- tokens

pub struct Minter {
    alg: Algorithm,
    key: EncodingKey,
    now: u64,
}

impl Minter {
    pub fn new(alg: Alg) -> Minter {
        let (algorithm, key) = match alg {
            Alg::Hs256 => (
                Algorithm::HS256,
                EncodingKey::from_secret(servers::SECRET.as_bytes()).expect("secret"),
            ),
            other => {
                let pem = std::fs::read(other.private_key().unwrap()).expect("private key");
                let key = match other {
                    Alg::Rs256 => EncodingKey::from_rsa_pem(&pem),
                    Alg::Es256 => EncodingKey::from_ec_pem(&pem),
                    _ => EncodingKey::from_ed_pem(&pem),
                }
                .expect("private key PEM");
                (algorithm_of(other), key)
            }
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        Minter {
            alg: algorithm,
            key,
            now,
        }
    }

    pub fn mint(&self, sub: &str) -> String {
        let claims = serde_json::json!({ "sub": sub, "exp": self.now + 7200, "iat": self.now });
        jsonwebtoken::encode(&Header::new(self.alg), &claims, &self.key).expect("mint token")
    }
}

fn algorithm_of(alg: Alg) -> Algorithm {
    match alg {
        Alg::Hs256 => Algorithm::HS256,
        Alg::Rs256 => Algorithm::RS256,
        Alg::Es256 => Algorithm::ES256,
        Alg::EdDsa => Algorithm::EdDSA,
    }
}

/// Upgrade requests for `subs`, minted before any timing.
fn requests(target: &Target, minter: &Minter, subs: impl Iterator<Item = String>) -> Vec<Vec<u8>> {
    subs.map(|sub| {
        let token = target.auth.then(|| minter.mint(&sub));
        upgrade_request(target.path, token.as_deref())
    })
    .collect()
}

static RUN_SERIAL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A prefix that keeps every run's user ids distinct.
fn run_prefix(kind: &str) -> String {
    let n = RUN_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{kind}{n}-")
}

/// `len` bytes of JSON-safe ASCII.
pub fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i % 26) as u8).collect()
}

/// The masked `send` frame carrying `data` as a JSON string.
fn send_frame(id: usize, data: &[u8]) -> Vec<u8> {
    let mut text = format!(r#"{{"type":"send","id":{id},"data":""#).into_bytes();
    text.extend_from_slice(data);
    text.extend_from_slice(b"\"}");
    client_frame(OP_TEXT, &text)
}

/// How a `message` frame carrying `data` ends.
fn message_tail(data: &[u8]) -> Vec<u8> {
    let mut tail = b"\"data\":\"".to_vec();
    tail.extend_from_slice(data);
    tail.extend_from_slice(b"\"}");
    tail
}

fn kind(payload: &[u8]) -> &'static str {
    const KINDS: [(&[u8], &str); 5] = [
        (b"{\"type\":\"message\"", "message"),
        (b"{\"type\":\"ack\"", "ack"),
        (b"{\"type\":\"welcome\"", "welcome"),
        (b"{\"type\":\"error\"", "error"),
        (b"{\"type\":\"pong\"", "pong"),
    ];
    KINDS
        .iter()
        .find(|(prefix, _)| payload.starts_with(prefix))
        .map(|(_, k)| *k)
        .unwrap_or("other")
}

#[derive(Default)]
struct Problems {
    count: u64,
    first: Option<String>,
}

impl Problems {
    fn add(&mut self, what: &str, payload: &[u8]) {
        self.count += 1;
        if self.first.is_none() {
            let shown = &payload[..payload.len().min(160)];
            self.first = Some(format!("{what}: {}", String::from_utf8_lossy(shown)));
        }
    }
}

// ---------------------------------------------------------------- phases

/// What every load tracks in the same way while it is started, measured,
/// stopped and drained.
#[derive(Default)]
struct Phase {
    /// Each completed unit of work starts the next one; false once stopped.
    running: bool,
    /// Completions are counted and timed (the measured window).
    measuring: bool,
    /// Units of work started and not yet completed.
    in_flight: usize,
    /// Completed units of work so far (warm-up included): a stall is a gap
    /// without progress while work is in flight.
    events: u64,
}

/// The common shape of a load.
trait Load: Driver {
    fn phase(&self) -> &Phase;
    fn phase_mut(&mut self) -> &mut Phase;
    /// Starts the first units of work (`running` is already set).
    fn start(&mut self, net: &mut Net, now: Instant);
}

/// A gap without progress this long is reported as a stall.
const STALL: Duration = Duration::from_millis(200);

/// Polls until `done(driver, net)` or the deadline; false on time-out.
fn poll_until<D: Driver>(
    net: &mut Net,
    driver: &mut D,
    deadline: Instant,
    done: impl Fn(&D, &Net) -> bool,
) -> bool {
    while !done(driver, net) {
        if Instant::now() >= deadline {
            return false;
        }
        net.poll(driver, 1);
    }
    true
}

/// Opens one WebSocket per request, in order (slot i = request i), with at
/// most `WINDOW_PER_SOURCE` handshakes per source address in flight.
fn open_all<D: Driver>(
    net: &mut Net,
    driver: &mut D,
    dst: SocketAddr,
    requests: &[Vec<u8>],
    sources: usize,
    deadline: Instant,
) -> Result<(), String> {
    let window = WINDOW_PER_SOURCE * sources;
    for (i, request) in requests.iter().enumerate() {
        if !poll_until(net, driver, deadline, |_, net| net.handshaking < window) {
            return Err(format!("time-out opening connection {i}"));
        }
        let idx = net
            .connect(source(i, sources), dst, Some(request))
            .map_err(|e| format!("connect {i}: {e}"))?;
        if idx != i {
            return Err(format!("connection {idx} failed during set-up"));
        }
    }
    if !poll_until(net, driver, deadline, |_, net| net.handshaking == 0) {
        return Err("time-out waiting for upgrades".into());
    }
    if net.live != requests.len() {
        return Err(format!(
            "{} of {} connections failed during set-up: {:?}",
            requests.len() - net.live,
            requests.len(),
            net.stats
        ));
    }
    Ok(())
}

/// Close handshake on every open connection, then resets for what remains.
fn close_all<D: Driver>(net: &mut Net, driver: &mut D) {
    for idx in 0..net.conns.len() {
        net.close_ws(idx);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    poll_until(net, driver, deadline, |_, net| net.live == 0);
    net.abort_all();
}

struct Window {
    t0: Instant,
    elapsed: f64,
    server_cpu: f64,
    gen_cpu: f64,
    other_cpu: f64,
    stall_ms: f64,
    stall_state: Option<String>,
}

/// Polls until `until`, tracking the longest gap in `load.progress()`.
struct StallWatch {
    last: u64,
    since: Instant,
    longest: Duration,
    state: Option<String>,
}

impl StallWatch {
    fn run<L: Load>(&mut self, net: &mut Net, load: &mut L, until: Instant) {
        loop {
            let now = Instant::now();
            if now >= until {
                return;
            }
            net.poll(load, 1);
            let progress = load.phase().events;
            let now = Instant::now();
            if progress != self.last || load.phase().in_flight == 0 {
                self.last = progress;
                self.since = now;
                continue;
            }
            let gap = now.duration_since(self.since);
            if gap > self.longest {
                self.longest = gap;
            }
            if gap >= STALL && self.state.is_none() {
                self.state = Some(net.snapshot());
            }
        }
    }
}

/// Warm-up, then the measured window; then stop and drain.
fn run_phases<L: Load>(net: &mut Net, load: &mut L, pid: i32, settings: &Settings) -> Window {
    let start = Instant::now();
    load.phase_mut().running = true;
    load.start(net, start);
    let mut watch = StallWatch {
        last: load.phase().events,
        since: start,
        longest: Duration::ZERO,
        state: None,
    };
    watch.run(net, load, start + settings.warmup);
    load.phase_mut().measuring = true;
    let cpu0 = servers::cpu_seconds(pid);
    let gen0 = servers::thread_cpu_seconds();
    let busy0 = servers::cpus_busy_seconds(&[0, 1]);
    let t0 = Instant::now();
    watch.run(net, load, t0 + settings.measure);
    load.phase_mut().measuring = false;
    let elapsed = t0.elapsed().as_secs_f64();
    let server_cpu = (servers::cpu_seconds(pid) - cpu0) / elapsed;
    let gen_cpu = (servers::thread_cpu_seconds() - gen0) / elapsed;
    let busy = (servers::cpus_busy_seconds(&[0, 1]) - busy0) / elapsed;
    let other_cpu = (busy - server_cpu - gen_cpu).max(0.0);
    load.phase_mut().running = false;
    let deadline = Instant::now() + Duration::from_secs(2);
    poll_until(net, load, deadline, |load, _| load.phase().in_flight == 0);
    Window {
        t0,
        elapsed,
        server_cpu,
        gen_cpu,
        other_cpu,
        stall_ms: watch.longest.as_secs_f64() * 1e3,
        stall_state: watch.state,
    }
}

fn finish(net: &Net, problems: &Problems, result: &mut RunResult) {
    result.errors = problems.count + net.stats.total();
    result.note = problems.first.clone().or_else(|| {
        net.stats
            .first_refusal
            .clone()
            .or_else(|| net.stats.first_close.clone())
    });
}

// ---------------------------------------------------------------- round trip

/// One message in flight per connection (echo) or per user (protocol: A
/// sends, B receives and sends it back, A receives).
struct RoundTrip {
    protocol: bool,
    frame: Vec<u8>,
    tail: Vec<u8>,
    sent_at: Vec<Instant>,
    units: usize,
    welcomed: usize,
    phase: Phase,
    hist: Histogram<u64>,
    done: u64,
    acks: u64,
    problems: Problems,
}

impl RoundTrip {
    fn complete(&mut self, net: &mut Net, idx: usize, unit: usize, now: Instant) {
        self.phase.in_flight -= 1;
        self.phase.events += 1;
        if self.phase.measuring {
            self.done += 1;
            self.hist
                .saturating_record(nanos(now.duration_since(self.sent_at[unit])));
        }
        if self.phase.running {
            self.sent_at[unit] = now;
            self.phase.in_flight += 1;
            net.send(idx, &self.frame);
        }
    }
}

impl Driver for RoundTrip {
    fn on_open(&mut self, _net: &mut Net, _idx: usize, _now: Instant) {}

    fn on_frame(&mut self, net: &mut Net, idx: usize, _op: u8, payload: &[u8], now: Instant) {
        if !self.protocol {
            if payload == self.tail.as_slice() {
                self.complete(net, idx, idx, now);
            } else {
                self.problems.add("unexpected echo", payload);
            }
            return;
        }
        match kind(payload) {
            "message" if payload.ends_with(&self.tail) => {
                if idx % 2 == 1 {
                    // B: straight back, the same way.
                    net.send(idx, &self.frame);
                } else {
                    self.complete(net, idx, idx / 2, now);
                }
            }
            "ack" => self.acks += 1,
            "welcome" => self.welcomed += 1,
            other => self.problems.add(other, payload),
        }
    }
}

impl Load for RoundTrip {
    fn phase(&self) -> &Phase {
        &self.phase
    }
    fn phase_mut(&mut self) -> &mut Phase {
        &mut self.phase
    }
    fn start(&mut self, net: &mut Net, now: Instant) {
        for unit in 0..self.units {
            let idx = if self.protocol { unit * 2 } else { unit };
            self.sent_at[unit] = now;
            self.phase.in_flight += 1;
            net.send(idx, &self.frame);
        }
    }
}

/// `conns` connections; protocol targets pair them into `conns / 2` users.
pub fn round_trip(target: &Target, size: usize, conns: usize, settings: &Settings) -> RunResult {
    let data = payload(size);
    let protocol = target.protocol;
    let (frame, tail, units) = if protocol {
        (send_frame(1, &data), message_tail(&data), conns / 2)
    } else {
        (client_frame(OP_TEXT, &data), data.clone(), conns)
    };
    let minter = Minter::new(Alg::Hs256);
    let prefix = run_prefix("rt");
    let reqs = requests(
        target,
        &minter,
        (0..conns).map(|i| format!("{prefix}{}", if protocol { i / 2 } else { i })),
    );
    let mut net = Net::new((size + 256).max(4096) * 2);
    let mut rt = RoundTrip {
        protocol,
        frame,
        tail,
        sent_at: vec![Instant::now(); units],
        units,
        welcomed: 0,
        phase: Phase::default(),
        hist: histogram(),
        done: 0,
        acks: 0,
        problems: Problems::default(),
    };
    let mut result = RunResult::default();
    let deadline = Instant::now() + Duration::from_secs(20);
    if let Err(e) = open_all(&mut net, &mut rt, target.proc.addr, &reqs, 8, deadline) {
        result.errors = 1;
        result.note = Some(e);
        return result;
    }
    if protocol && !poll_until(&mut net, &mut rt, deadline, |rt, _| rt.welcomed == conns) {
        result.errors = 1;
        result.note = Some(format!("only {} of {conns} welcomes", rt.welcomed));
        return result;
    }
    let window = run_phases(&mut net, &mut rt, target.proc.pid, settings);
    result.value = rt.done as f64 / window.elapsed;
    result.server_cpu = window.server_cpu;
    result.gen_cpu = window.gen_cpu;
    result.other_cpu = window.other_cpu;
    result.stall_ms = window.stall_ms;
    result.stall_state = window.stall_state.clone();
    result.latencies(&rt.hist);
    if rt.phase.in_flight > 0 {
        rt.problems.count += rt.phase.in_flight as u64;
        rt.problems
            .first
            .get_or_insert_with(|| format!("{} round trips never completed", rt.phase.in_flight));
    }
    close_all(&mut net, &mut rt);
    finish(&net, &rt.problems, &mut result);
    result
}

// ---------------------------------------------------------------- fan-out

/// `users` users with `k` connections each; connection 0 of each user sends
/// (one message in flight per user), the k-1 siblings receive.
struct FanOut {
    k: usize,
    frame: Vec<u8>,
    tail: Vec<u8>,
    sent_at: Vec<Instant>,
    remaining: Vec<usize>,
    welcomed: usize,
    phase: Phase,
    hist: Histogram<u64>,
    deliveries: u64,
    sends: u64,
    problems: Problems,
}

impl Driver for FanOut {
    fn on_open(&mut self, _net: &mut Net, _idx: usize, _now: Instant) {}

    fn on_frame(&mut self, net: &mut Net, idx: usize, _op: u8, payload: &[u8], now: Instant) {
        let user = idx / self.k;
        match kind(payload) {
            "message" if !idx.is_multiple_of(self.k) && payload.ends_with(&self.tail) => {
                if self.phase.measuring {
                    self.deliveries += 1;
                    self.hist
                        .saturating_record(nanos(now.duration_since(self.sent_at[user])));
                }
                self.phase.events += 1;
                self.remaining[user] -= 1;
                if self.remaining[user] == 0 {
                    self.phase.in_flight -= 1;
                    if self.phase.running {
                        self.send(net, user, now);
                    }
                }
            }
            "ack" if idx.is_multiple_of(self.k) => {}
            "welcome" => self.welcomed += 1,
            other => self.problems.add(other, payload),
        }
    }
}

impl FanOut {
    fn send(&mut self, net: &mut Net, user: usize, now: Instant) {
        self.sent_at[user] = now;
        self.remaining[user] = self.k - 1;
        self.phase.in_flight += 1;
        if self.phase.measuring {
            self.sends += 1;
        }
        net.send(user * self.k, &self.frame);
    }
}

impl Load for FanOut {
    fn phase(&self) -> &Phase {
        &self.phase
    }
    fn phase_mut(&mut self) -> &mut Phase {
        &mut self.phase
    }
    fn start(&mut self, net: &mut Net, now: Instant) {
        for user in 0..self.remaining.len() {
            self.send(net, user, now);
        }
    }
}

pub fn fan_out(target: &Target, users: usize, k: usize, settings: &Settings) -> RunResult {
    let data = payload(20);
    let minter = Minter::new(Alg::Hs256);
    let prefix = run_prefix("fan");
    let conns = users * k;
    let reqs = requests(
        target,
        &minter,
        (0..conns).map(|i| format!("{prefix}{}", i / k)),
    );
    let mut net = Net::new(8192);
    let mut fan = FanOut {
        k,
        frame: send_frame(1, &data),
        tail: message_tail(&data),
        sent_at: vec![Instant::now(); users],
        remaining: vec![0; users],
        welcomed: 0,
        phase: Phase::default(),
        hist: histogram(),
        deliveries: 0,
        sends: 0,
        problems: Problems::default(),
    };
    let mut result = RunResult::default();
    let deadline = Instant::now() + Duration::from_secs(20);
    if let Err(e) = open_all(&mut net, &mut fan, target.proc.addr, &reqs, 8, deadline) {
        result.errors = 1;
        result.note = Some(e);
        return result;
    }
    if !poll_until(&mut net, &mut fan, deadline, |f, _| f.welcomed == conns) {
        result.errors = 1;
        result.note = Some(format!("only {} of {conns} welcomes", fan.welcomed));
        return result;
    }
    let window = run_phases(&mut net, &mut fan, target.proc.pid, settings);
    result.value = fan.deliveries as f64 / window.elapsed;
    result.server_cpu = window.server_cpu;
    result.gen_cpu = window.gen_cpu;
    result.other_cpu = window.other_cpu;
    result.stall_ms = window.stall_ms;
    result.stall_state = window.stall_state.clone();
    result.latencies(&fan.hist);
    result
        .extra
        .push(("sends_per_s", fan.sends as f64 / window.elapsed));
    if fan.phase.in_flight > 0 {
        fan.problems.count += fan.phase.in_flight as u64;
        fan.problems
            .first
            .get_or_insert_with(|| format!("{} fan-outs never completed", fan.phase.in_flight));
    }
    close_all(&mut net, &mut fan);
    finish(&net, &fan.problems, &mut result);
    result
}

// ---------------------------------------------------------------- publish

/// HTTP/1.1 keep-alive API clients, one request in flight each, publishing
/// to random users who each hold two WebSocket connections.
struct Publish {
    ws_conns: usize,
    requests: Vec<Vec<u8>>,
    rng: u64,
    sent_at: Vec<Instant>,
    tail: Vec<u8>,
    welcomed: usize,
    http_open: usize,
    phase: Phase,
    hist: Histogram<u64>,
    deliveries: u64,
    publishes: u64,
    misses: u64,
    problems: Problems,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Publish {
    fn publish(&mut self, net: &mut Net, idx: usize, now: Instant) {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let user = (r >> 33) as usize % self.requests.len();
        self.sent_at[idx - self.ws_conns] = now;
        self.phase.in_flight += 1;
        net.send(idx, &self.requests[user]);
    }
}

impl Driver for Publish {
    fn on_open(&mut self, _net: &mut Net, idx: usize, _now: Instant) {
        if idx >= self.ws_conns {
            self.http_open += 1;
        }
    }

    fn on_frame(&mut self, _net: &mut Net, _idx: usize, _op: u8, payload: &[u8], _now: Instant) {
        match kind(payload) {
            "message" if payload.ends_with(&self.tail) => {
                if self.phase.measuring {
                    self.deliveries += 1;
                }
            }
            "welcome" => self.welcomed += 1,
            other => self.problems.add(other, payload),
        }
    }

    fn on_raw(&mut self, net: &mut Net, idx: usize, data: &[u8], now: Instant) -> usize {
        let Some(end) = find(data, b"\r\n\r\n") else {
            return 0;
        };
        let head = &data[..end];
        let length = head
            .split(|&b| b == b'\n')
            .filter_map(|line| {
                let colon = line.iter().position(|&b| b == b':')?;
                let (name, value) = line.split_at(colon);
                name.eq_ignore_ascii_case(b"content-length").then(|| {
                    std::str::from_utf8(&value[1..])
                        .ok()
                        .and_then(|v| v.trim().parse::<usize>().ok())
                })?
            })
            .next()
            .unwrap_or(0);
        if data.len() < end + 4 + length {
            return 0;
        }
        let body = &data[end + 4..end + 4 + length];
        if !head.starts_with(b"HTTP/1.1 200") {
            self.problems.add("publish refused", head);
        } else if find(body, b"\"delivered\":2").is_none() {
            self.misses += 1;
        }
        self.phase.in_flight -= 1;
        self.phase.events += 1;
        if self.phase.measuring {
            self.publishes += 1;
            let sent = self.sent_at[idx - self.ws_conns];
            self.hist.saturating_record(nanos(now.duration_since(sent)));
        }
        if self.phase.running {
            self.publish(net, idx, now);
        }
        end + 4 + length
    }
}

impl Load for Publish {
    fn phase(&self) -> &Phase {
        &self.phase
    }
    fn phase_mut(&mut self) -> &mut Phase {
        &mut self.phase
    }
    fn start(&mut self, net: &mut Net, now: Instant) {
        for i in 0..self.sent_at.len() {
            self.publish(net, self.ws_conns + i, now);
        }
    }
}

pub fn publish(target: &Target, users: usize, clients: usize, settings: &Settings) -> RunResult {
    let data = payload(20);
    let minter = Minter::new(Alg::Hs256);
    let prefix = run_prefix("pub");
    let ws_conns = users * 2;
    let reqs = requests(
        target,
        &minter,
        (0..ws_conns).map(|i| format!("{prefix}{}", i / 2)),
    );
    let api = (0..users)
        .map(|u| {
            let body = format!(
                r#"{{"user":"{prefix}{u}","data":"{}"}}"#,
                String::from_utf8_lossy(&data)
            );
            format!(
                "POST /api/v1/publish HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                 Authorization: Bearer {}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                servers::API_KEY,
                body.len()
            )
            .into_bytes()
        })
        .collect();
    let mut net = Net::new(8192);
    let mut publisher = Publish {
        ws_conns,
        requests: api,
        rng: 0x9e37_79b9_7f4a_7c15,
        sent_at: vec![Instant::now(); clients],
        tail: message_tail(&data),
        welcomed: 0,
        http_open: 0,
        phase: Phase::default(),
        hist: histogram(),
        deliveries: 0,
        publishes: 0,
        misses: 0,
        problems: Problems::default(),
    };
    let mut result = RunResult::default();
    let deadline = Instant::now() + Duration::from_secs(20);
    let dst = target.proc.addr;
    if let Err(e) = open_all(&mut net, &mut publisher, dst, &reqs, 8, deadline) {
        result.errors = 1;
        result.note = Some(e);
        return result;
    }
    for i in 0..clients {
        match net.connect(Ipv4Addr::new(127, 0, 0, 1), dst, None) {
            Ok(idx) if idx == ws_conns + i => {}
            other => {
                result.errors = 1;
                result.note = Some(format!("API client {i}: {other:?}"));
                return result;
            }
        }
    }
    if !poll_until(&mut net, &mut publisher, deadline, |p, _| {
        p.welcomed == ws_conns && p.http_open == clients
    }) {
        result.errors = 1;
        result.note = Some("set-up time-out".into());
        return result;
    }
    let window = run_phases(&mut net, &mut publisher, target.proc.pid, settings);
    result.value = publisher.deliveries as f64 / window.elapsed;
    result.server_cpu = window.server_cpu;
    result.gen_cpu = window.gen_cpu;
    result.other_cpu = window.other_cpu;
    result.stall_ms = window.stall_ms;
    result.stall_state = window.stall_state.clone();
    result.latencies(&publisher.hist);
    result.extra.push((
        "publishes_per_s",
        publisher.publishes as f64 / window.elapsed,
    ));
    if publisher.misses > 0 {
        publisher.problems.count += publisher.misses;
        publisher.problems.first.get_or_insert_with(|| {
            format!("{} publishes delivered to fewer than 2", publisher.misses)
        });
    }
    for idx in ws_conns..ws_conns + clients {
        net.abort(idx);
    }
    close_all(&mut net, &mut publisher);
    finish(&net, &publisher.problems, &mut result);
    result
}

// ---------------------------------------------------------------- handshakes

/// New authenticated connections, each a distinct pre-minted token, counted
/// at `welcome`, then closed with a Close handshake.
struct Handshakes<'r> {
    requests: &'r [Vec<u8>],
    next: usize,
    window: usize,
    sources: usize,
    dst: SocketAddr,
    /// `in_flight` counts connections awaiting their welcome.
    phase: Phase,
    hist: Histogram<u64>,
    done: u64,
    last_done: Instant,
    exhausted: Option<Instant>,
    problems: Problems,
}

impl Handshakes<'_> {
    fn refill(&mut self, net: &mut Net) {
        while self.phase.running && self.phase.in_flight < self.window {
            if self.next == self.requests.len() {
                self.exhausted.get_or_insert_with(Instant::now);
                return;
            }
            let src = source(self.next, self.sources);
            match net.connect(src, self.dst, Some(&self.requests[self.next])) {
                Ok(_) => {
                    self.next += 1;
                    self.phase.in_flight += 1;
                }
                Err(e) => {
                    self.problems.add("connect", e.to_string().as_bytes());
                    return;
                }
            }
        }
    }
}

impl Driver for Handshakes<'_> {
    fn on_open(&mut self, _net: &mut Net, _idx: usize, _now: Instant) {}

    fn on_frame(&mut self, net: &mut Net, idx: usize, _op: u8, payload: &[u8], now: Instant) {
        if kind(payload) != "welcome" {
            self.problems.add("expected welcome", payload);
            return;
        }
        self.phase.in_flight -= 1;
        self.phase.events += 1;
        if self.phase.measuring {
            self.done += 1;
            self.last_done = now;
            let started = net.conns[idx].started;
            self.hist
                .saturating_record(nanos(now.duration_since(started)));
        }
        net.close_ws(idx);
        self.refill(net);
    }

    fn on_gone(&mut self, net: &mut Net, _idx: usize, clean: bool) {
        if !clean {
            // Failed before its welcome.
            self.phase.in_flight -= 1;
            self.refill(net);
        }
    }
}

impl Load for Handshakes<'_> {
    fn phase(&self) -> &Phase {
        &self.phase
    }
    fn phase_mut(&mut self) -> &mut Phase {
        &mut self.phase
    }
    fn start(&mut self, net: &mut Net, _now: Instant) {
        self.refill(net);
    }
}

/// Pre-minted upgrade requests for the handshake scenario, signed on two
/// threads (RS256 signing takes milliseconds per token).
pub fn handshake_pool(target: &Target, alg: Alg, count: usize) -> Vec<Vec<u8>> {
    let minter = Minter::new(alg);
    let prefix = run_prefix(&format!("hs-{}-", alg.name()));
    let half = count / 2;
    let (path, auth) = (target.path, target.auth);
    let mint = |range: std::ops::Range<usize>| -> Vec<Vec<u8>> {
        range
            .map(|i| {
                let token = auth.then(|| minter.mint(&format!("{prefix}{i}")));
                upgrade_request(path, token.as_deref())
            })
            .collect()
    };
    std::thread::scope(|scope| {
        let second = scope.spawn(|| mint(half..count));
        let mut pool = mint(0..half);
        pool.extend(second.join().expect("minting thread"));
        pool
    })
}

pub fn handshakes(target: &Target, pool: &[Vec<u8>], settings: &Settings) -> RunResult {
    // 32 handshakes in flight keep the router busy without long queues.
    let sources = 4;
    let mut net = Net::new(1024);
    let mut hs = Handshakes {
        requests: pool,
        next: 0,
        window: 8 * sources,
        sources,
        dst: target.proc.addr,
        phase: Phase::default(),
        hist: histogram(),
        done: 0,
        last_done: Instant::now(),
        exhausted: None,
        problems: Problems::default(),
    };
    let window = run_phases(&mut net, &mut hs, target.proc.pid, settings);
    let t0 = window.t0;
    if hs.phase.in_flight > 0 {
        hs.problems.count += hs.phase.in_flight as u64;
        hs.problems.first.get_or_insert_with(|| {
            format!(
                "{} handshakes unanswered 2 s after the window ({})",
                hs.phase.in_flight,
                net.snapshot()
            )
        });
    }
    let mut result = RunResult::default();
    let mut elapsed = window.elapsed;
    if let Some(when) = hs.exhausted
        && when < t0 + settings.measure
    {
        elapsed = hs.last_done.saturating_duration_since(t0).as_secs_f64();
        hs.problems.first.get_or_insert_with(|| {
            format!(
                "token pool of {} ran out: window cut to {elapsed:.2} s",
                pool.len()
            )
        });
    }
    result.value = if elapsed > 0.0 {
        hs.done as f64 / elapsed
    } else {
        0.0
    };
    result.server_cpu = window.server_cpu;
    result.gen_cpu = window.gen_cpu;
    result.other_cpu = window.other_cpu;
    result.stall_ms = window.stall_ms;
    result.stall_state = window.stall_state.clone();
    result.latencies(&hs.hist);
    close_all(&mut net, &mut hs);
    finish(&net, &hs.problems, &mut result);
    result
}

// ---------------------------------------------------------------- idle

/// Every connection exchanges one message: on protocol targets user u's two
/// connections each send one `send` (each gets the other's message and its
/// own ack); on echo targets each connection gets its echo.
struct Exchange {
    protocol: bool,
    frame: Vec<u8>,
    tail: Vec<u8>,
    seen: Vec<u8>,
    welcomed: usize,
    complete: usize,
    problems: Problems,
}

impl Driver for Exchange {
    fn on_open(&mut self, _net: &mut Net, _idx: usize, _now: Instant) {}

    fn on_frame(&mut self, _net: &mut Net, idx: usize, _op: u8, payload: &[u8], _now: Instant) {
        let counts = if self.protocol {
            match kind(payload) {
                "welcome" => {
                    self.welcomed += 1;
                    false
                }
                "ack" => true,
                "message" if payload.ends_with(&self.tail) => true,
                other => {
                    self.problems.add(other, payload);
                    false
                }
            }
        } else if payload == self.tail.as_slice() {
            true
        } else {
            self.problems.add("unexpected echo", payload);
            false
        };
        if counts {
            self.seen[idx] += 1;
            let needed = if self.protocol { 2 } else { 1 };
            if self.seen[idx] == needed {
                self.complete += 1;
            }
        }
    }
}

/// Opens `n` connections to a fresh server, exchanges one message on each,
/// and reports the server's RSS growth per connection in KiB.
pub fn idle(target: &Target, n: usize) -> RunResult {
    let data = payload(20);
    let protocol = target.protocol;
    let minter = Minter::new(Alg::Hs256);
    let prefix = run_prefix("idle");
    let reqs = requests(
        target,
        &minter,
        (0..n).map(|i| format!("{prefix}{}", if protocol { i / 2 } else { i })),
    );
    let (frame, tail) = if protocol {
        (send_frame(1, &data), message_tail(&data))
    } else {
        (client_frame(OP_TEXT, &data), data.clone())
    };
    let mut ex = Exchange {
        protocol,
        frame,
        tail,
        seen: vec![0; n],
        welcomed: 0,
        complete: 0,
        problems: Problems::default(),
    };
    let pid = target.proc.pid;
    std::thread::sleep(Duration::from_millis(300));
    let before = servers::rss_kib(pid);
    let cpu0 = servers::cpu_seconds(pid);
    let t0 = Instant::now();
    // Keep each source address well under the default local port range.
    let sources = (n / 10_000 + 1).max(8);
    let mut net = Net::new(512);
    let mut result = RunResult::default();
    let deadline = Instant::now() + Duration::from_secs(30 + n as u64 / 1000);
    if let Err(e) = open_all(
        &mut net,
        &mut ex,
        target.proc.addr,
        &reqs,
        sources,
        deadline,
    ) {
        result.errors = 1;
        result.note = Some(e);
        return result;
    }
    let opened = t0.elapsed().as_secs_f64();
    if protocol && !poll_until(&mut net, &mut ex, deadline, |ex, _| ex.welcomed == n) {
        result.errors = 1;
        result.note = Some(format!("only {} of {n} welcomes", ex.welcomed));
        return result;
    }
    for idx in 0..n {
        net.send(idx, &ex.frame);
        if idx % 256 == 255 {
            net.poll(&mut ex, 0);
        }
    }
    if !poll_until(&mut net, &mut ex, deadline, |ex, _| ex.complete == n) {
        ex.problems.add(
            "exchange incomplete",
            format!("{} of {n}", ex.complete).as_bytes(),
        );
    }
    let busy = t0.elapsed().as_secs_f64();
    let cpu = servers::cpu_seconds(pid) - cpu0;
    // Let the server settle, still polling so nothing queues up on our side.
    let settle = Instant::now() + Duration::from_millis(500);
    poll_until(&mut net, &mut ex, settle, |_, _| false);
    let after = servers::rss_kib(pid);
    result.value = (after as f64 - before as f64) / n as f64;
    result.server_cpu = cpu / busy;
    result.extra.push(("rss_before_kib", before as f64));
    result.extra.push(("rss_after_kib", after as f64));
    result.extra.push(("connections_per_s", n as f64 / opened));
    net.abort_all();
    finish(&net, &ex.problems, &mut result);
    result
}
