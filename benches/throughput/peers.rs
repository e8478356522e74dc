//! The peer servers shardgate is compared with, run by re-executing this
//! bench binary as `--serve-peer NAME --listen ADDR --threads N`:
//!
//! - `tokio-tungstenite`: an echo server, one task per connection.
//! - `fastwebsockets`: an echo server; the upgrade is done by hand (httparse
//!   and tungstenite's accept-key helper), echoed frames go out unmasked.
//! - `shared-registry`: the conventional design shardgate avoids, with
//!   tokio-tungstenite and one global `Mutex<HashMap<user, connections>>`;
//!   it speaks the subset of protocol v1 the bench needs (welcome, send ->
//!   message to the user's other connections + ack, ping), JWT HS256 checked
//!   with jsonwebtoken.
//!
//! `--threads 1` runs a current-thread tokio runtime; more runs a
//! multi-threaded one with that many workers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fastwebsockets::{Frame, OpCode, Role, WebSocket};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Entry point for `--serve-peer NAME --listen ADDR --threads N`.
pub fn serve(args: &[String]) {
    let name = args.first().cloned().unwrap_or_default();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let listen: SocketAddr = value("--listen")
        .unwrap_or_else(|| "127.0.0.1:0".into())
        .parse()
        .expect("--listen ADDR");
    let threads: usize = value("--threads").and_then(|t| t.parse().ok()).unwrap_or(1);
    crate::servers::raise_nofile(1 << 20);
    let runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_io()
            .build()
    }
    .expect("tokio runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen).await.expect("bind");
        println!("peer listening on {}", listener.local_addr().unwrap());
        let secret = std::env::var("SHARDGATE_JWT_SECRET").unwrap_or_default();
        let registry = Arc::new(Registry {
            key: jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()).expect("secret"),
            users: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
        });
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            match name.as_str() {
                "tokio-tungstenite" => {
                    tokio::spawn(tungstenite_echo(stream));
                }
                "fastwebsockets" => {
                    tokio::spawn(fastwebsockets_echo(stream));
                }
                "shared-registry" => {
                    tokio::spawn(shared_registry(stream, registry.clone()));
                }
                other => panic!("unknown peer {other}"),
            }
        }
    });
}

async fn tungstenite_echo(stream: TcpStream) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    while let Some(Ok(message)) = ws.next().await {
        if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
            break;
        }
    }
}

/// Reads the upgrade request by hand and answers 101.
async fn fastwebsockets_echo(mut stream: TcpStream) {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let key = loop {
        let Ok(n) = stream.read(&mut buf).await else {
            return;
        };
        if n == 0 || head.len() > 16 * 1024 {
            return;
        }
        head.extend_from_slice(&buf[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {
                let key = request
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"))
                    .map(|h| h.value.to_vec());
                match key {
                    Some(key) => break key,
                    None => return,
                }
            }
            Ok(httparse::Status::Partial) => continue,
            Err(_) => return,
        }
    };
    let accept = tungstenite::handshake::derive_accept_key(&key);
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    let mut ws = WebSocket::after_handshake(stream, Role::Server);
    ws.set_auto_close(true);
    ws.set_auto_pong(true);
    loop {
        let Ok(frame) = ws.read_frame().await else {
            return;
        };
        match frame.opcode {
            OpCode::Close => return,
            OpCode::Text | OpCode::Binary => {
                // A fresh frame: the one read still carries the client's
                // mask key, and a server must not mask.
                let echo = Frame::new(true, frame.opcode, None, frame.payload);
                if ws.write_frame(echo).await.is_err() {
                    return;
                }
            }
            _ => {}
        }
    }
}

struct UserEntry {
    epoch: u64,
    seq: u64,
    conns: Vec<(u64, mpsc::UnboundedSender<Message>)>,
}

struct Registry {
    key: jsonwebtoken::DecodingKey,
    /// The one global registry: every send on every core takes this lock.
    users: Mutex<HashMap<String, UserEntry>>,
    next_conn: AtomicU64,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFrame<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

fn epoch_for(conn: u64) -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(conn) & ((1 << 53) - 1)
}

// tungstenite's callback returns its (large) ErrorResponse by value.
#[allow(clippy::result_large_err)]
async fn shared_registry(stream: TcpStream, registry: Arc<Registry>) {
    let mut user = None;
    let callback = |request: &Request, response: Response| {
        let token = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        match token.and_then(|t| jsonwebtoken::decode::<Claims>(t, &registry.key, &validation).ok())
        {
            Some(data) => {
                user = Some(data.claims.sub);
                Ok(response)
            }
            None => {
                let mut refusal = ErrorResponse::new(Some("unauthorized".into()));
                *refusal.status_mut() =
                    tokio_tungstenite::tungstenite::http::StatusCode::UNAUTHORIZED;
                Err(refusal)
            }
        }
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    let Some(user) = user else { return };
    let conn = registry.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let welcome = {
        let mut users = registry.users.lock().unwrap();
        let entry = users.entry(user.clone()).or_insert_with(|| UserEntry {
            epoch: epoch_for(conn),
            seq: 0,
            conns: Vec::new(),
        });
        entry.conns.push((conn, tx.clone()));
        format!(
            r#"{{"type":"welcome","user":{},"conn":{conn},"epoch":{},"seq":{}}}"#,
            serde_json::to_string(&user).unwrap(),
            entry.epoch,
            entry.seq
        )
    };
    let _ = tx.send(Message::Text(welcome.into()));

    let (mut sink, mut stream) = ws.split();
    let writer = tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            if sink.feed(message).await.is_err() {
                return;
            }
            while let Ok(message) = rx.try_recv() {
                if sink.feed(message).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });

    while let Some(Ok(message)) = stream.next().await {
        let Message::Text(text) = message else {
            if message.is_binary() {
                let _ = tx.send(error_frame("null"));
            }
            continue;
        };
        let Ok(frame) = serde_json::from_str::<ClientFrame>(text.as_str()) else {
            let _ = tx.send(error_frame("null"));
            continue;
        };
        match (frame.kind, frame.id, frame.data) {
            ("send", Some(id), Some(data)) => {
                let mut users = registry.users.lock().unwrap();
                let Some(entry) = users.get_mut(&user) else {
                    continue;
                };
                entry.seq += 1;
                let delivery: Utf8Bytes = format!(
                    r#"{{"type":"message","epoch":{},"seq":{},"source":"client","data":{}}}"#,
                    entry.epoch,
                    entry.seq,
                    data.get()
                )
                .into();
                for (other, sender) in &entry.conns {
                    if *other != conn {
                        let _ = sender.send(Message::Text(delivery.clone()));
                    }
                }
                let ack = format!(
                    r#"{{"type":"ack","id":{},"epoch":{},"seq":{}}}"#,
                    id.get(),
                    entry.epoch,
                    entry.seq
                );
                let _ = tx.send(Message::Text(ack.into()));
            }
            ("ping", Some(id), None) => {
                let pong = format!(r#"{{"type":"pong","id":{}}}"#, id.get());
                let _ = tx.send(Message::Text(pong.into()));
            }
            (_, id, _) => {
                let _ = tx.send(error_frame(id.map(|i| i.get()).unwrap_or("null")));
            }
        }
    }

    {
        let mut users = registry.users.lock().unwrap();
        if let Some(entry) = users.get_mut(&user) {
            entry.conns.retain(|(c, _)| *c != conn);
            if entry.conns.is_empty() {
                users.remove(&user);
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

fn error_frame(id: &str) -> Message {
    Message::Text(
        format!(r#"{{"type":"error","code":"bad_message","id":{id},"detail":"bad frame"}}"#).into(),
    )
}
