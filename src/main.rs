//! The `shardgate` binary: `serve` runs the server, `token` mints a token.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use shardgate::auth::{self, Algorithm, AuthConfig, KeyMaterial, Verifier};
use shardgate::config::{Config, Limits};
use shardgate::server::{self, Bound};

#[derive(Parser)]
#[command(
    name = "shardgate",
    version,
    about = "Sharded, thread-per-core WebSocket server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server. With no JWT key configured it runs in demo mode.
    Serve(Box<ServeArgs>),
    /// Mint an HS* token with the configured secret, for trying the server.
    Token(TokenArgs),
}

#[derive(Args)]
struct KeyArgs {
    /// File holding the HMAC secret (instead of SHARDGATE_JWT_SECRET).
    #[arg(long, value_name = "FILE")]
    jwt_secret_file: Option<PathBuf>,
    /// PEM public key for RS256, ES256 or EdDSA tokens.
    #[arg(long, value_name = "FILE", conflicts_with = "jwt_secret_file")]
    jwt_public_key: Option<PathBuf>,
    /// The one JWT algorithm accepted: HS256, HS384, HS512, RS256, ES256, EdDSA.
    /// Default HS256 with a secret, RS256 with a public key.
    #[arg(long, value_name = "ALG")]
    jwt_alg: Option<String>,
}

#[derive(Args)]
struct ServeArgs {
    /// Address for WebSocket upgrades, health, and (without --api-listen) the
    /// API and metrics.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    listen: SocketAddr,
    /// Private address serving only the API, metrics and health.
    #[arg(long, value_name = "ADDR")]
    api_listen: Option<SocketAddr>,
    /// Number of shards [default: one per CPU this process may use].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    shards: Option<u16>,
    /// Largest WebSocket message accepted, in bytes (close 1009 beyond).
    #[arg(long, default_value_t = 65536, value_name = "BYTES")]
    max_message_size: usize,
    /// Most frames one fragmented message may span.
    #[arg(long, default_value_t = 64, value_name = "N")]
    max_fragments: usize,
    /// Open connections one user may hold (429 beyond).
    #[arg(long, default_value_t = 32, value_name = "N")]
    max_connections_per_user: usize,
    /// Open connections one shard may hold (503 beyond) [default: derived
    /// from RLIMIT_NOFILE].
    #[arg(long, value_name = "N")]
    max_connections_per_shard: Option<usize>,
    /// Time allowed from accept to the 101 answer, in milliseconds.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    handshake_timeout_ms: u64,
    /// Frames queued for one connection before it counts as a slow consumer
    /// (close 4008).
    #[arg(long, default_value_t = 1024, value_name = "N")]
    outbound_queue_messages: usize,
    /// Bytes queued for one connection before it counts as a slow consumer.
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES")]
    outbound_queue_bytes: usize,
    /// Messages per second one user may send over all its connections (0: no
    /// limit). Beyond it frames get `rate_limited`.
    #[arg(long, default_value_t = 100, value_name = "N")]
    rate_limit: u32,
    /// Messages a user may send in one burst above the rate.
    #[arg(long, default_value_t = 200, value_name = "N")]
    rate_burst: u32,
    /// Rate-limited messages in a row after which a connection is closed
    /// with 1008.
    #[arg(long, default_value_t = 200, value_name = "N")]
    abuse_limit: u32,
    /// Deepest JSON nesting accepted in a client frame. The envelope object
    /// itself is depth 1, so 0 is taken as 1.
    #[arg(long, default_value_t = 32, value_name = "N")]
    max_json_depth: usize,
    /// Handshakes in progress at once (503 beyond).
    #[arg(long, default_value_t = 4096, value_name = "N")]
    max_handshakes: usize,
    /// Handshakes in progress from one peer address (503 beyond).
    #[arg(long, default_value_t = 64, value_name = "N")]
    max_handshakes_per_peer: usize,
    /// Origins allowed to open WebSockets (repeatable; exact match such as
    /// https://app.example.com). Unlisted origins get 403; requests without
    /// Origin are allowed. Default: any origin.
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    allowed_origins: Vec<String>,
    /// Proxies (address or CIDR, repeatable) whose X-Forwarded-For header and
    /// PROXY protocol v1 line give the client address for per-peer caps and
    /// audit events. Default: none, the TCP peer is the client.
    #[arg(long = "trusted-proxy", value_name = "ADDR[/PREFIX]")]
    trusted_proxies: Vec<shardgate::config::ProxyNet>,
    /// Refused tokens per second one client address may present before its
    /// upgrades are refused (503) without verifying; bursts of five times
    /// this are allowed; 0 turns it off.
    #[arg(long, default_value_t = 20, value_name = "N")]
    refusals_per_peer: u32,
    /// Silence, in milliseconds, after which the server pings a connection.
    #[arg(long, default_value_t = 25_000, value_name = "MS")]
    ping_interval_ms: u64,
    /// Time, in milliseconds, a ping may go unanswered before the connection
    /// is dropped as dead.
    #[arg(long, default_value_t = 20_000, value_name = "MS")]
    pong_timeout_ms: u64,
    /// Time, in milliseconds, the server waits for the peer's Close after
    /// sending its own.
    #[arg(long, default_value_t = 5_000, value_name = "MS")]
    close_timeout_ms: u64,
    /// On SIGINT/SIGTERM, time in milliseconds queued messages may take to
    /// drain before every connection gets Close 1001.
    #[arg(long, default_value_t = 5_000, value_name = "MS")]
    drain_timeout_ms: u64,
    /// Longest stretch, in microseconds, an executor runs tasks before it
    /// looks at its rings and cross-thread wake-ups again. Lower: hand-offs
    /// and other sockets are noticed sooner by a busy shard; higher: less
    /// overhead.
    #[arg(long, default_value_t = 1000, value_name = "US")]
    preempt_timer_us: u64,
    /// Serve /ws/echo (conformance tests and raw benchmarks).
    #[arg(long)]
    enable_echo: bool,
    /// Do not pin shards to CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Accepted `aud` values; when none is given, tokens carrying `aud` are
    /// refused. Repeatable.
    #[arg(long = "jwt-audience", value_name = "AUD")]
    jwt_audience: Vec<String>,
    /// Accepted `iss` values; not checked when none is given. Repeatable.
    #[arg(long = "jwt-issuer", value_name = "ISS")]
    jwt_issuer: Vec<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    jwt_leeway: u64,
    #[command(flatten)]
    key: KeyArgs,
}

#[derive(Args)]
struct TokenArgs {
    /// The user id (`sub`).
    #[arg(long)]
    sub: String,
    /// Lifetime: a number with s, m, h or d (e.g. 90s, 30m, 1h, 7d).
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    ttl: Duration,
    #[command(flatten)]
    key: KeyArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Token(args) => token(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("shardgate: {message}");
            ExitCode::FAILURE
        }
    }
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("invalid ttl {text:?}"))?;
    let seconds = match unit {
        "s" => number,
        "m" => number * 60,
        "h" => number * 3600,
        "d" => number * 86_400,
        _ => return Err(format!("invalid ttl unit in {text:?}; use s, m, h or d")),
    };
    if seconds == 0 {
        return Err("ttl must be positive".into());
    }
    Ok(Duration::from_secs(seconds))
}

fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    match name {
        "HS256" => Ok(Algorithm::HS256),
        "HS384" => Ok(Algorithm::HS384),
        "HS512" => Ok(Algorithm::HS512),
        "RS256" => Ok(Algorithm::RS256),
        "ES256" => Ok(Algorithm::ES256),
        "EdDSA" => Ok(Algorithm::EdDSA),
        other => Err(format!(
            "unsupported --jwt-alg {other:?}; use HS256, HS384, HS512, RS256, ES256 or EdDSA"
        )),
    }
}

/// The key from the flags and environment; `None` when nothing is configured.
fn key_material(args: &KeyArgs) -> Result<Option<(Algorithm, KeyMaterial)>, String> {
    if let Some(path) = &args.jwt_public_key {
        let pem =
            std::fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
        let alg = parse_algorithm(args.jwt_alg.as_deref().unwrap_or("RS256"))?;
        return Ok(Some((alg, KeyMaterial::PublicKeyPem(pem))));
    }
    let secret = match &args.jwt_secret_file {
        Some(path) => {
            let mut bytes = std::fs::read(path)
                .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
            // A trailing newline from an editor is not part of the secret.
            while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                bytes.pop();
            }
            Some(bytes)
        }
        None => std::env::var_os("SHARDGATE_JWT_SECRET")
            .filter(|s| !s.is_empty())
            .map(|s| s.into_encoded_bytes()),
    };
    let Some(secret) = secret else {
        return Ok(None);
    };
    let alg = parse_algorithm(args.jwt_alg.as_deref().unwrap_or("HS256"))?;
    Ok(Some((alg, KeyMaterial::Secret(secret))))
}

fn random_hex(bytes: usize) -> Result<String, String> {
    let mut buf = vec![0u8; bytes];
    // SAFETY: getrandom writes at most `buf.len()` bytes into owned memory.
    let got = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if got != buf.len() as isize {
        return Err("cannot read random bytes from the kernel".into());
    }
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn serve(args: ServeArgs) -> Result<(), String> {
    auth::check_crypto_provider().map_err(|err| err.to_string())?;

    let api_key = std::env::var("SHARDGATE_API_KEY")
        .ok()
        .filter(|k| !k.is_empty());
    let (algorithm, key, demo) = match key_material(&args.key)? {
        Some((algorithm, key)) => (algorithm, key, None),
        None => {
            let secret = random_hex(32)?;
            let api_key = match &api_key {
                Some(key) => key.clone(),
                None => random_hex(24)?,
            };
            (
                Algorithm::HS256,
                KeyMaterial::Secret(secret.clone().into_bytes()),
                Some((secret, api_key)),
            )
        }
    };
    let api_key = match &demo {
        Some((_, demo_key)) => Some(demo_key.clone()),
        None => api_key,
    };

    let verifier = Verifier::new(&AuthConfig {
        algorithm,
        key,
        audience: (!args.jwt_audience.is_empty()).then(|| args.jwt_audience.clone()),
        issuer: (!args.jwt_issuer.is_empty()).then(|| args.jwt_issuer.clone()),
        leeway_secs: args.jwt_leeway,
    })
    .map_err(|err| err.to_string())?;

    let shards = match args.shards {
        Some(n) => usize::from(n),
        None => shardgate::system::allowed_cpus().len(),
    };
    let limits = Limits {
        max_message_size: args.max_message_size,
        max_fragments: args.max_fragments.max(1),
        max_connections_per_user: args.max_connections_per_user,
        max_connections_per_shard: args.max_connections_per_shard.unwrap_or(usize::MAX),
        handshake_timeout: Duration::from_millis(args.handshake_timeout_ms),
        outbound_queue_messages: args.outbound_queue_messages.max(2),
        outbound_queue_bytes: args.outbound_queue_bytes,
        jwt_leeway_secs: args.jwt_leeway,
        rate_per_sec: args.rate_limit,
        refusals_per_peer_per_sec: args.refusals_per_peer,
        refusal_burst_per_peer: args.refusals_per_peer.saturating_mul(5),
        rate_burst: args.rate_burst.max(1),
        abuse_limit: args.abuse_limit.max(1),
        max_json_depth: args.max_json_depth.max(1),
        max_handshakes: args.max_handshakes.max(1),
        max_handshakes_per_peer: args.max_handshakes_per_peer.max(1),
        ping_interval: Duration::from_millis(args.ping_interval_ms.max(10)),
        pong_timeout: Duration::from_millis(args.pong_timeout_ms.max(10)),
        close_timeout: Duration::from_millis(args.close_timeout_ms),
        drain_timeout: Duration::from_millis(args.drain_timeout_ms),
        preempt_timer: Duration::from_micros(args.preempt_timer_us.max(50)),
        ..Limits::default()
    };
    let config = Config {
        listen: args.listen,
        api_listen: args.api_listen,
        shards,
        api_key,
        enable_echo: args.enable_echo,
        pin_shards: !args.no_pin,
        allowed_origins: (!args.allowed_origins.is_empty()).then(|| args.allowed_origins.clone()),
        trusted_proxies: args.trusted_proxies.clone(),
        limits,
    };
    tracing::info!(algorithm = ?algorithm, "token verification");
    if demo.is_some() {
        tracing::warn!(
            "DEMO MODE: no JWT key configured, so a random secret and API key were \
             generated for this run only. Do not use demo mode in production; set \
             SHARDGATE_JWT_SECRET or --jwt-public-key"
        );
    }

    let given_cap = args.max_connections_per_shard.is_some();
    server::run(config, verifier, given_cap, |bound| {
        print_banner(bound, demo.as_ref())
    })
    .map_err(|err| err.to_string())
}

/// Tells stdout where the server listens (scripts and tests read this line)
/// and, in demo mode, how to try it. Tokens go to stdout only, never the log.
fn print_banner(bound: Bound, demo: Option<&(String, String)>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "shardgate listening on http://{}", bound.listen);
    if let Some(api) = bound.api_listen {
        let _ = writeln!(out, "shardgate api listening on http://{api}");
    }
    if let Some((secret, api_key)) = demo {
        let ws = format!("ws://{}/ws", bound.listen);
        let api = bound.api_listen.unwrap_or(bound.listen);
        let mint = |sub| auth::mint(secret.as_bytes(), Algorithm::HS256, sub, 3600);
        if let (Ok(alice), Ok(bob)) = (mint("alice"), mint("bob")) {
            let _ = writeln!(out, "\ndemo mode: tokens valid for one hour");
            let _ = writeln!(out, "  alice: {ws}?token={alice}");
            let _ = writeln!(out, "  bob:   {ws}?token={bob}");
            let _ = writeln!(out, "  API key: {api_key}");
            let _ = writeln!(
                out,
                "  publish: curl -s -H 'Authorization: Bearer {api_key}' \
                 -d '{{\"user\":\"alice\",\"data\":\"hello\"}}' http://{api}/api/v1/publish"
            );
        }
    }
    let _ = out.flush();
}

fn token(args: TokenArgs) -> Result<(), String> {
    auth::check_crypto_provider().map_err(|err| err.to_string())?;
    let Some((algorithm, KeyMaterial::Secret(secret))) = key_material(&args.key)? else {
        return Err(
            "no HMAC secret: set SHARDGATE_JWT_SECRET or --jwt-secret-file \
                    (tokens for public-key algorithms are minted by your issuer)"
                .into(),
        );
    };
    shardgate::config::check_user_id(&args.sub).map_err(|err| format!("--sub: {err}"))?;
    let token = auth::mint(&secret, algorithm, &args.sub, args.ttl.as_secs())
        .map_err(|err| err.to_string())?;
    println!("{token}");
    Ok(())
}
