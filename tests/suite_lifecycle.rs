//! Isolation suite, category 4 — lifecycle: nothing outlives its user.
//! Managers, connections, queued frames and file descriptors return to
//! their baseline however a connection ends.
//!
//! * Clients that reset the TCP connection (`SO_LINGER` 0, then close) in
//!   the middle of the request head, right after sending the upgrade, right
//!   after the 101, in the middle of a frame and while being published to,
//!   or that vanish with a FIN and no Close frame, leave every shard at zero
//!   users, connections and queued frames in `/metrics`, and the server's
//!   descriptor count (`/proc/<pid>/fd`) back at its baseline; bystanders on
//!   every shard receive exactly their own frames meanwhile.
//! * A user's manager lives exactly as long as its connections, on every
//!   path out (close, reset, API disconnect, revocation, token expiry):
//!   the shard's user gauge follows, later publishes reach nobody, and the
//!   next connection starts a new epoch.
//! * Frames queued for a reader that stalled are released when it resets,
//!   and another user of the same shard is served while it stalls.
//! * A panic in the middle of a delivery (fault-injection builds) drops the
//!   user's manager and connections, and only those.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::model::*;
use common::probe::*;
use common::*;
use serde_json::{Value, json};

/// How long cleanup may take after the clients are gone.
const CLEANUP: Duration = Duration::from_secs(10);

fn raw_connect(server: &Server) -> TcpStream {
    let stream = TcpStream::connect_timeout(&server.addr(), IO_TIMEOUT).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

/// Reads a response head byte by byte (nothing after it is consumed).
fn read_response_head(stream: &mut TcpStream) -> String {
    use std::io::Read;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert!(head.len() < 4096, "response head too long");
        let n = stream.read(&mut byte).expect("read the response head");
        assert_eq!(n, 1, "connection ended in the response head");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn upgrade_for(user: &str) -> Vec<u8> {
    upgrade_request(
        "/ws",
        &[("Authorization", &format!("Bearer {}", token(user)))],
    )
}

/// The next frame, which must arrive.
fn next(ws: &mut Ws, what: &str) -> Value {
    match ws.read(IO_TIMEOUT) {
        Got::Frame(frame) => frame,
        other => panic!("{what}: expected a frame, got {other:?}"),
    }
}

/// A connected user with its epoch, from the welcome.
fn join(server: &Server, user: &str) -> (Ws, u64) {
    let (ws, welcome) = Ws::connect_user(server.addr(), user).expect("connect");
    assert_eq!(welcome["user"], user, "{welcome}");
    (ws, welcome["epoch"].as_u64().expect("epoch"))
}

/// Publishes a sentinel to `user`, which must be the next frame on `ws`
/// with number `seq`.
fn sentinel_next(server: &Server, user: &str, ws: &mut Ws, epoch: u64, seq: u64) {
    let data = json!({ "sentinel": user });
    let reply = publish(server, user, &data);
    assert_eq!(
        reply,
        json!({ "delivered": 1, "epoch": epoch, "seq": seq }),
        "{user}"
    );
    let frame = next(ws, user);
    assert_eq!(
        frame,
        json!({ "type": "message", "epoch": epoch, "seq": seq, "source": "server", "data": data }),
        "{user}: something arrived before the sentinel"
    );
}

/// Brings a fresh server to a steady state (one connection per shard and
/// an API call have come and gone) and returns its descriptor baseline.
fn warm_up(server: &Server, shards: u64) -> usize {
    for shard in 0..shards {
        let user = user_on_shard(server, "warm", shard, &[]);
        let (mut ws, _) = join(server, &user);
        ws.close(1000).expect("close");
    }
    assert_all_shards_idle(server, CLEANUP);
    stable_fd_count(server.pid())
}

#[test]
fn resets_at_every_stage_leave_no_user_connection_or_descriptor_behind() {
    let server = Server::builder()
        .shards(2)
        .args(["--rate-limit", "0"])
        .start();
    let baseline = warm_up(&server, 2);

    // A bystander on each shard, connected through all of it.
    let bystanders: Vec<(String, Ws, u64)> = (0..2)
        .map(|shard| {
            let user = user_on_shard(&server, "bystander", shard, &[]);
            let (ws, epoch) = join(&server, &user);
            (user, ws, epoch)
        })
        .collect();
    let users: Vec<String> = (0..16).map(|i| format!("racer-{i}")).collect();
    let targets: Vec<String> = (0..8).map(|i| format!("published-{i}")).collect();

    std::thread::scope(|scope| {
        let mut threads = Vec::new();
        for (t, chunk) in users.chunks(4).enumerate() {
            let server = &server;
            threads.push(scope.spawn(move || {
                for (i, user) in chunk.iter().enumerate() {
                    let request = upgrade_for(user);
                    for round in 0..4 {
                        // Half the request head, then a reset.
                        let mut s = raw_connect(server);
                        let cut = request.len() / 2 + round * 7;
                        s.write_all(&request[..cut]).expect("write");
                        reset(s);

                        // The whole upgrade, reset before reading anything.
                        let mut s = raw_connect(server);
                        s.write_all(&request).expect("write");
                        reset(s);

                        // Reset right after the 101 arrived.
                        let mut s = raw_connect(server);
                        s.write_all(&request).expect("write");
                        let head = read_response_head(&mut s);
                        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
                        reset(s);

                        // Half a frame, then a reset.
                        let (mut ws, _) = join(server, user);
                        let text = json!({ "type": "send", "id": round, "data": { "u": user } });
                        let whole = frame(true, OP_TEXT, text.to_string().as_bytes());
                        let cut = 1 + (t + i + round) % (whole.len() - 1);
                        ws.stream().write_all(&whole[..cut]).expect("write");
                        ws.reset();

                        // Gone without a Close frame: FIN only.
                        let (ws, _) = join(server, user);
                        drop(ws);
                    }
                }
            }));
        }

        // Users reset while the API publishes to them.
        let conns: Vec<Vec<Ws>> = targets
            .iter()
            .map(|user| (0..2).map(|_| join(&server, user).0).collect())
            .collect();
        let (server, targets) = (&server, &targets);
        let publisher = scope.spawn(move || {
            let mut api = HttpConn::open(server.api_addr());
            for n in 0..400 {
                let user = &targets[n % targets.len()];
                let body = json!({ "user": user, "data": { "u": user, "n": n } });
                let (status, answer) = api_on(&mut api, "/api/v1/publish", &body, Some(API_KEY));
                assert_eq!(status, 200, "{answer}");
            }
        });
        for (u, mine) in conns.into_iter().enumerate() {
            let user = &targets[u];
            threads.push(scope.spawn(move || {
                for (c, mut ws) in mine.into_iter().enumerate() {
                    // Read a few of the user's messages, then vanish.
                    for _ in 0..(u + c) % 5 {
                        if let Got::Frame(frame) = ws.read(Duration::from_millis(500)) {
                            assert_eq!(frame_user(&frame), Some(user.as_str()), "{frame}");
                        }
                    }
                    ws.reset();
                }
            }));
        }
        publisher.join().expect("publisher");
        for thread in threads {
            thread.join().expect("racer thread");
        }
    });

    // The bystanders received nothing at all, then leave.
    for (user, mut ws, epoch) in bystanders {
        sentinel_next(&server, &user, &mut ws, epoch, 1);
        ws.close(1000).expect("close");
    }
    assert_all_shards_idle(&server, CLEANUP);
    assert_fds_back_to(&server, baseline, CLEANUP);
    for user in &users {
        assert_eq!(presence(&server, user).0, 0, "{user}");
    }
}

/// Waits until `user` has no connection and its shard's gauges are back to
/// `before`.
fn assert_user_gone(server: &Server, user: &str, shard: u64, before: ShardGauges) {
    wait_presence(server, user, 0);
    let (back, last) = wait_scrape(server.addr(), CLEANUP, |s| {
        let g = s.shard(shard);
        g.users == before.users && g.connections == before.connections && g.queued == 0
    });
    assert!(
        back,
        "{user}: shard {shard} at {:?}, before {before:?}",
        last.shard(shard)
    );
}

#[test]
fn a_manager_lives_exactly_as_long_as_its_connections() {
    let server = Server::builder()
        .shards(2)
        .args(["--jwt-leeway", "0"])
        .start();
    let paths = [
        "close",
        "reset",
        "api-disconnect",
        "mixed",
        "revoke",
        "expiry",
    ];
    for path in paths {
        let user = format!("life-{path}");
        let shard = presence(&server, &user).1;
        let before = scrape(server.addr()).shard(shard);
        let now = now();
        let token = match path {
            "expiry" => token_with(
                &json!({ "sub": user, "iat": now, "exp": now + 2 }),
                jsonwebtoken::Algorithm::HS256,
                &hs_key(),
            ),
            "revoke" => token_with(
                &json!({ "sub": user, "iat": now - 100, "exp": now + 3600 }),
                jsonwebtoken::Algorithm::HS256,
                &hs_key(),
            ),
            _ => common::token(&user),
        };
        let mut conns = Vec::new();
        let mut epoch = None;
        for _ in 0..2 {
            let mut ws = Ws::connect(server.addr(), "/ws", &token).expect("connect");
            let welcome = next(&mut ws, &user);
            let e = welcome["epoch"].as_u64().expect("epoch");
            assert_eq!(*epoch.get_or_insert(e), e, "{path}");
            conns.push(ws);
        }
        let epoch = epoch.unwrap();
        let during = scrape(server.addr()).shard(shard);
        assert_eq!(during.users, before.users + 1, "{path}: one manager");
        assert_eq!(during.connections, before.connections + 2, "{path}");

        match path {
            "close" => {
                for mut ws in conns {
                    assert_eq!(ws.close(1000).unwrap(), [json!({ "close": 1000 })]);
                }
            }
            "reset" => conns.into_iter().for_each(Ws::reset),
            "api-disconnect" => {
                let answer = api_ok(&server, "/api/v1/disconnect", &json!({ "user": user }));
                assert_eq!(answer, json!({ "closed": 2 }));
                for mut ws in conns {
                    assert_eq!(next(&mut ws, &user), json!({ "close": 4003 }));
                }
            }
            "mixed" => {
                let mut first = conns.remove(0);
                first.close(1000).unwrap();
                // The manager stays while one connection does.
                wait_presence(&server, &user, 1);
                assert_eq!(scrape(server.addr()).shard(shard).users, before.users + 1);
                conns.remove(0).reset();
            }
            "revoke" => {
                let body = json!({ "user": user, "issued_before": now - 50 });
                assert_eq!(
                    api_ok(&server, "/api/v1/revoke", &body),
                    json!({ "closed": 2 })
                );
                for mut ws in conns {
                    assert_eq!(next(&mut ws, &user), json!({ "close": 4003 }));
                }
            }
            "expiry" => {
                for mut ws in conns {
                    match ws.read(Duration::from_secs(8)) {
                        Got::Frame(frame) => assert_eq!(frame, json!({ "close": 4001 })),
                        other => panic!("expiry: {other:?}"),
                    }
                }
            }
            _ => unreachable!(),
        }
        assert_user_gone(&server, &user, shard, before);
        assert_eq!(
            publish(&server, &user, &json!("after")),
            json!({ "delivered": 0 }),
            "{path}: a publish after the last connection reaches nobody"
        );

        // The next connection is a new manager: new epoch, numbers from 0.
        let (mut ws, welcome) = Ws::connect_user(server.addr(), &user).expect("reconnect");
        assert_ne!(welcome["epoch"], epoch, "{path}: a new epoch");
        assert_eq!(welcome["seq"], 0, "{path}");
        ws.close(1000).unwrap();
        assert_user_gone(&server, &user, shard, before);
    }
    assert_all_shards_idle(&server, CLEANUP);
}

/// Sets a small receive buffer, so that the kernel holds little of what the
/// server sends and the rest stays queued in the server.
fn shrink_receive_buffer(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 4096;
    // SAFETY: setsockopt on an open descriptor owned by `stream`, with a
    // pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt(SO_RCVBUF)");
}

#[test]
fn frames_queued_for_a_stalled_reader_are_released_when_it_resets() {
    let server = Server::builder()
        .shards(1)
        .args([
            "--rate-limit",
            "0",
            "--outbound-queue-messages",
            "100000",
            "--outbound-queue-bytes",
            "268435456",
        ])
        .start();
    let baseline = warm_up(&server, 1);
    let (mut stalled, _) = join(&server, "stalled");
    shrink_receive_buffer(stalled.stream());
    let (mut neighbour, n_epoch) = join(&server, "neighbour");

    let payload = "q".repeat(64 * 1024);
    let mut api = HttpConn::open(server.api_addr());
    let mut neighbour_seq = 0;
    for n in 0..400u64 {
        let body = json!({ "user": "stalled", "data": { "u": "stalled", "n": n, "p": payload } });
        let (status, answer) = api_on(&mut api, "/api/v1/publish", &body, Some(API_KEY));
        assert_eq!(status, 200, "{answer}");
        assert_eq!(
            answer["delivered"], 1,
            "not cut off as a slow consumer: {answer}"
        );
        if n % 50 == 49 {
            // The neighbour is served while the other reader stalls.
            neighbour_seq += 1;
            let data = json!({ "u": "neighbour", "n": n });
            publish(&server, "neighbour", &data);
            let frame = next(&mut neighbour, "neighbour");
            assert_eq!(frame["data"], data);
            assert_eq!(frame["seq"], neighbour_seq);
        }
    }
    drop(api);
    let (queued, now) = wait_scrape(server.addr(), POLL_TIMEOUT, |s| s.shard(0).queued > 0);
    assert!(
        queued,
        "nothing queued for the stalled reader: {:?}",
        now.shards
    );
    assert_eq!(now.shard(0).users, 2);

    stalled.reset();
    let (released, now) = wait_scrape(server.addr(), CLEANUP, |s| {
        s.shard(0)
            == ShardGauges {
                users: 1,
                connections: 1,
                queued: 0,
                echo: 0,
            }
    });
    assert!(released, "after the reset: {:?}", now.shards);
    assert_eq!(presence(&server, "stalled").0, 0);
    sentinel_next(
        &server,
        "neighbour",
        &mut neighbour,
        n_epoch,
        neighbour_seq + 1,
    );
    neighbour.close(1000).unwrap();
    assert_all_shards_idle(&server, CLEANUP);
    assert_fds_back_to(&server, baseline, CLEANUP);
}

/// With fault injection, a `data` of this string makes the shard panic in
/// the middle of a fan-out.
#[cfg(feature = "fault-injection")]
const FAULT_IN_DELIVERY: &str = "__shardgate_fault_in_delivery__";

#[cfg(feature = "fault-injection")]
#[test]
fn a_panic_in_the_middle_of_a_delivery_drops_that_user_and_no_other() {
    let server = Server::builder().shards(2).start();
    let baseline = warm_up(&server, 2);
    let faulty = user_on_shard(&server, "fault", 0, &[]);
    let neighbour = user_on_shard(&server, "fault", 0, &[&faulty]);
    let (mut n_ws, n_epoch) = join(&server, &neighbour);
    let (mut a, epoch) = join(&server, &faulty);
    let (mut b, _) = join(&server, &faulty);
    let (mut c, _) = join(&server, &faulty);
    let before = scrape(server.addr()).shard(0);
    assert_eq!((before.users, before.connections), (2, 4));

    a.send_json(&json!({ "type": "send", "id": 1, "data": FAULT_IN_DELIVERY }))
        .unwrap();
    // Every connection of the faulty user is closed (1011), nobody gets the
    // half-delivered message.
    for (name, ws) in [("a", &mut a), ("b", &mut b), ("c", &mut c)] {
        assert_eq!(next(ws, name), json!({ "close": 1011 }), "{name}");
    }
    assert_user_gone(
        &server,
        &faulty,
        0,
        ShardGauges {
            users: 1,
            connections: 1,
            queued: 0,
            echo: 0,
        },
    );
    let (mut again, welcome) = Ws::connect_user(server.addr(), &faulty).unwrap();
    assert_ne!(welcome["epoch"], epoch, "a new manager after the panic");
    assert_eq!(welcome["seq"], 0);
    again.close(1000).unwrap();

    sentinel_next(&server, &neighbour, &mut n_ws, n_epoch, 1);
    n_ws.close(1000).unwrap();
    assert_all_shards_idle(&server, CLEANUP);
    assert_fds_back_to(&server, baseline, CLEANUP);
}
