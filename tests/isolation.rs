//! Per-user isolation, end to end: with users chosen on different shards and
//! on the same shard (placement read from `/api/v1/presence`, never assumed),
//! each holding several connections, every client `send` reaches exactly the
//! sender's sibling connections, with one consecutive sequence per user and
//! epoch; a frame naming another user is refused as `forbidden` and delivers
//! nothing anywhere; one user's connection cap never affects another user;
//! and a user's epoch changes once all its connections have closed.
//!
//! "Nothing else arrived" is proven with a sentinel: an API publish to each
//! user after the traffic, which must be the very next frame on every
//! connection, with the next sequence number.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// Three users: `a` and `c` on the same shard, `b` on the other one.
fn three_users(server: &Server, prefix: &str) -> (String, String, String) {
    let a = user_on_shard(server, prefix, 0, &[]);
    let b = user_on_shard(server, prefix, 1, &[]);
    let c = user_on_shard(server, prefix, 0, &[&a]);
    assert_eq!(presence(server, &a).1, presence(server, &c).1);
    assert_ne!(presence(server, &a).1, presence(server, &b).1);
    (a, b, c)
}

/// Publishes a sentinel to `user` and asserts that it is the next frame on
/// every one of `clients`, with sequence `seq` in `epoch`.
fn assert_next_is_sentinel(
    server: &Server,
    user: &str,
    clients: &mut [Client],
    epoch: u64,
    seq: u64,
) {
    let data = json!({ "sentinel": user });
    let reply = publish(server, user, &data);
    assert_eq!(
        reply,
        json!({ "delivered": clients.len(), "epoch": epoch, "seq": seq }),
        "sentinel publish to {user}"
    );
    let expected = json!({
        "type": "message", "epoch": epoch, "seq": seq, "source": "server", "data": data,
    });
    for (i, client) in clients.iter_mut().enumerate() {
        assert_eq!(client.recv_json(), expected, "{user} connection {i}");
    }
}

#[test]
fn welcome_comes_first_with_user_conn_epoch_and_seq() {
    let server = Server::builder().shards(2).start();
    let user = "welcome-user";

    let (mut first, welcome) = connect_user(&server, user);
    let epoch = welcome["epoch"].as_u64().expect("epoch is a number");
    assert!(epoch > 0 && epoch < (1 << 53), "epoch {epoch}");
    assert_eq!(welcome["seq"], 0, "no number assigned yet");
    let first_conn = welcome["conn"].as_u64().expect("conn is a number");
    let keys: Vec<&String> = welcome.as_object().unwrap().keys().collect();
    assert_eq!(
        keys.len(),
        5,
        "exactly type, user, conn, epoch, seq: {welcome}"
    );

    // Two messages later, a new connection joins the same epoch and learns
    // the last number assigned.
    first.send_data(&json!(1), &json!("one"));
    first.recv_type("ack");
    publish(&server, user, &json!("two"));
    assert_eq!(first.recv_json()["seq"], 2);

    let (_second, welcome) = connect_user(&server, user);
    assert_eq!(welcome["epoch"], epoch);
    assert_eq!(welcome["seq"], 2);
    assert_ne!(welcome["conn"].as_u64().unwrap(), first_conn);
}

#[test]
fn sends_reach_exactly_the_senders_siblings() {
    let server = Server::builder().shards(2).start();
    let (a, b, c) = three_users(&server, "sib");
    let mut users = Vec::new();
    for user in [&a, &b, &c] {
        let (clients, epoch) = connect_many(&server, user, 3);
        users.push((user.clone(), clients, epoch));
    }

    // Each connection of each user sends twice, in turn; users interleave.
    let rounds = 2;
    let mut next_seq = vec![1u64; users.len()];
    for round in 0..rounds {
        for sender in 0..3 {
            for (u, (user, clients, epoch)) in users.iter_mut().enumerate() {
                let id = json!(format!("{user}/{sender}/{round}"));
                let data = json!({ "from": user, "conn": sender, "round": round });
                clients[sender].send_data(&id, &data);

                let seq = next_seq[u];
                next_seq[u] += 1;
                let ack = clients[sender].recv_json();
                assert_eq!(
                    ack,
                    json!({ "type": "ack", "id": id, "epoch": *epoch, "seq": seq })
                );
                let expected = json!({
                    "type": "message", "epoch": *epoch, "seq": seq,
                    "source": "client", "data": data,
                });
                for (i, sibling) in clients.iter_mut().enumerate() {
                    if i != sender {
                        assert_eq!(sibling.recv_json(), expected, "{user} conn {i}");
                    }
                }
            }
        }
    }

    // Nothing else is queued anywhere: the sentinel is next everywhere.
    for (u, (user, clients, epoch)) in users.iter_mut().enumerate() {
        assert_next_is_sentinel(&server, user, clients, *epoch, next_seq[u]);
    }
    for (_, clients, _) in users.iter_mut() {
        clients[0].expect_silence(Duration::from_millis(150));
    }
}

#[test]
fn concurrent_senders_stay_isolated() {
    let server = Server::builder().shards(2).start();
    let (a, b, c) = three_users(&server, "conc");
    const CONNS: usize = 3;
    const PER_CONN: u64 = 40;

    let mut threads = Vec::new();
    for user in [a, b, c] {
        let (clients, epoch) = connect_many(&server, &user, CONNS);
        for (index, mut client) in clients.into_iter().enumerate() {
            let user = user.clone();
            threads.push(std::thread::spawn(move || {
                // Send everything first, then read: acks for our own sends
                // and the siblings' messages, in any interleaving.
                for n in 0..PER_CONN {
                    let data = json!({ "user": user, "conn": index, "n": n });
                    client.send_data(&json!(n), &data);
                }
                let expected = PER_CONN * CONNS as u64;
                let mut seen = Vec::new();
                let mut last_seq = 0;
                let mut acks = 0;
                let mut from_siblings = [0u64; CONNS];
                while seen.len() < expected as usize {
                    let frame = client.recv_json();
                    assert_eq!(frame["epoch"], epoch, "{frame}");
                    let seq = frame["seq"].as_u64().expect("seq");
                    assert!(seq > last_seq, "sequence not increasing: {frame}");
                    last_seq = seq;
                    seen.push(seq);
                    match frame["type"].as_str() {
                        Some("ack") => {
                            assert_eq!(frame["id"], acks, "acks in order");
                            acks += 1;
                        }
                        Some("message") => {
                            assert_eq!(frame["source"], "client");
                            let data = &frame["data"];
                            assert_eq!(data["user"], user, "another user's data: {frame}");
                            let from = data["conn"].as_u64().unwrap() as usize;
                            assert_ne!(from, index, "echoed to the sender: {frame}");
                            assert_eq!(data["n"], from_siblings[from], "order per sender");
                            from_siblings[from] += 1;
                        }
                        _ => panic!("unexpected frame {frame}"),
                    }
                }
                // Every connection saw every number of its user, 1..=N.
                let all: Vec<u64> = (1..=expected).collect();
                assert_eq!(seen, all, "{user} conn {index}");
                (user, client, epoch)
            }));
        }
    }

    let mut finished: Vec<(String, Vec<Client>, u64)> = Vec::new();
    for thread in threads {
        let (user, client, epoch) = thread.join().expect("client thread");
        match finished.iter_mut().find(|(u, _, _)| *u == user) {
            Some((_, clients, _)) => clients.push(client),
            None => finished.push((user, vec![client], epoch)),
        }
    }
    let next = PER_CONN * CONNS as u64 + 1;
    for (user, clients, epoch) in finished.iter_mut() {
        assert_next_is_sentinel(&server, user, clients, *epoch, next);
    }
}

#[test]
fn a_foreign_user_id_is_forbidden_and_delivers_nothing() {
    let server = Server::builder().shards(2).start();
    let (a, b, c) = three_users(&server, "forbid");
    let (mut a_clients, a_epoch) = connect_many(&server, &a, 2);
    let (mut b_clients, b_epoch) = connect_many(&server, &b, 1);
    let (mut c_clients, c_epoch) = connect_many(&server, &c, 1);

    let upper = a.to_uppercase();
    let spaced = format!("{a} ");
    let claimed = [
        json!(b),
        json!(c),
        json!(upper),
        json!(spaced),
        json!(7),
        json!(null),
    ];
    for (i, user_id) in claimed.iter().enumerate() {
        let id = 100 + i as u64;
        let frame = json!({
            "type": "send", "id": id, "data": { "stolen": i }, "user_id": user_id,
        });
        a_clients[0].send_json(&frame);
        let error = a_clients[0].recv_json();
        assert_eq!(error["type"], "error", "user_id {user_id}: {error}");
        assert_eq!(error["code"], "forbidden", "user_id {user_id}: {error}");
        assert_eq!(error["id"], id, "user_id {user_id}: {error}");
        let detail = error["detail"].as_str().expect("detail is a string");
        assert!(
            !detail.contains(&b) && !detail.contains(&c),
            "detail echoes input"
        );
    }

    // Checked before anything else: even a malformed frame is forbidden.
    a_clients[0].send_json(&json!({ "type": "nope", "user_id": b, "extra": 1 }));
    assert_eq!(a_clients[0].recv_json()["code"], "forbidden");

    // The refused frames took no sequence number and reached nobody.
    a_clients[0].send_data(&json!("ok"), &json!("legit"));
    assert_eq!(
        a_clients[0].recv_json(),
        json!({ "type": "ack", "id": "ok", "epoch": a_epoch, "seq": 1 })
    );
    assert_eq!(
        a_clients[1].recv_json(),
        json!({
            "type": "message", "epoch": a_epoch, "seq": 1, "source": "client", "data": "legit",
        })
    );
    assert_next_is_sentinel(&server, &a, &mut a_clients, a_epoch, 2);
    assert_next_is_sentinel(&server, &b, &mut b_clients, b_epoch, 1);
    assert_next_is_sentinel(&server, &c, &mut c_clients, c_epoch, 1);
}

#[test]
fn the_own_user_id_is_accepted() {
    let server = Server::builder().shards(2).start();
    let user = "self-naming";
    let (mut clients, epoch) = connect_many(&server, user, 2);

    clients[0].send_json(&json!({
        "type": "send", "id": 1, "data": { "k": "v" }, "user_id": user,
    }));
    assert_eq!(
        clients[0].recv_json(),
        json!({ "type": "ack", "id": 1, "epoch": epoch, "seq": 1 })
    );
    assert_eq!(
        clients[1].recv_json(),
        json!({
            "type": "message", "epoch": epoch, "seq": 1, "source": "client",
            "data": { "k": "v" },
        })
    );

    clients[1].send_json(&json!({ "type": "ping", "id": 2, "user_id": user }));
    assert_eq!(clients[1].recv_json(), json!({ "type": "pong", "id": 2 }));
}

#[test]
fn the_epoch_changes_after_all_connections_close() {
    let server = Server::builder().shards(2).start();
    let user = "epoch-user";
    let (mut clients, first_epoch) = connect_many(&server, user, 3);
    clients[0].send_data(&json!(1), &json!("x"));
    clients[0].recv_type("ack");
    for client in &mut clients[1..] {
        client.recv_type("message");
    }

    // While one connection stays, a newcomer keeps the epoch and sequence.
    for mut client in clients.drain(1..) {
        assert_eq!(client.close(1000), 1000);
    }
    wait_presence(&server, user, 1);
    let (newcomer, welcome) = connect_user(&server, user);
    assert_eq!(welcome["epoch"], first_epoch);
    assert_eq!(welcome["seq"], 1);

    // Once every connection is gone, the user comes back in a new epoch.
    clients.push(newcomer);
    for mut client in clients.drain(..) {
        assert_eq!(client.close(1000), 1000);
    }
    wait_presence(&server, user, 0);
    let (mut back, welcome) = connect_user(&server, user);
    let second_epoch = welcome["epoch"].as_u64().expect("epoch");
    assert_ne!(second_epoch, first_epoch, "a new manager means a new epoch");
    assert_eq!(welcome["seq"], 0);

    // Numbering restarts at 1 in the new epoch.
    back.send_data(&json!(2), &json!("y"));
    assert_eq!(
        back.recv_json(),
        json!({ "type": "ack", "id": 2, "epoch": second_epoch, "seq": 1 })
    );
}

#[test]
fn one_users_connection_cap_does_not_affect_another_user() {
    let server = Server::builder()
        .shards(2)
        .args(["--max-connections-per-user", "2"])
        .start();
    let a = user_on_shard(&server, "cap", 0, &[]);
    let c = user_on_shard(&server, "cap", 0, &[&a]);
    let (mut a_clients, _) = connect_many(&server, &a, 2);

    let refused = upgrade_with(&server, "/ws", Carrier::Header, &token(&a));
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(presence(&server, &a).0, 2);

    // Another user of the same shard is unaffected.
    let (mut c_clients, _) = connect_many(&server, &c, 2);
    c_clients[0].ping_pong(1);

    // Room again once one of a's connections has gone.
    let mut gone = a_clients.pop().unwrap();
    assert_eq!(gone.close(1000), 1000);
    wait_presence(&server, &a, 1);
    let (_again, _) = connect_user(&server, &a);
    a_clients[0].ping_pong(2);
}

#[test]
fn lookalike_user_ids_are_different_users() {
    let server = Server::builder().shards(2).start();
    // Case, whitespace, escapes and Unicode normalisation all differ.
    let ids = [
        "alice",
        "Alice",
        "alice ",
        " alice",
        "al\"ice",
        "\u{e9}va",
        "e\u{301}va",
    ];
    let mut users = Vec::new();
    for id in ids {
        let (clients, epoch) = connect_many(&server, id, 2);
        assert_eq!(presence(&server, id).0, 2, "{id:?}");
        users.push((id, clients, epoch));
    }

    for (id, clients, epoch) in users.iter_mut() {
        clients[0].send_data(&json!(1), &json!({ "owner": id }));
        assert_eq!(
            clients[0].recv_json(),
            json!({ "type": "ack", "id": 1, "epoch": *epoch, "seq": 1 }),
            "{id:?}"
        );
        assert_eq!(clients[1].recv_json()["data"]["owner"], *id, "{id:?}");
    }
    for (id, clients, epoch) in users.iter_mut() {
        assert_next_is_sentinel(&server, id, clients, *epoch, 2);
    }
}

#[test]
fn a_slow_consumer_is_closed_with_4008_and_nobody_else_suffers() {
    let server = Server::builder()
        .shards(2)
        .args([
            "--outbound-queue-messages",
            "8",
            "--outbound-queue-bytes",
            "262144",
        ])
        .start();
    let user = user_on_shard(&server, "slow", 0, &[]);
    let neighbour = user_on_shard(&server, "slow", 0, &[&user]);
    let (mut clients, epoch) = connect_many(&server, &user, 2);
    let (mut neighbours, _) = connect_many(&server, &neighbour, 1);
    let mut slow = clients.pop().unwrap();
    let mut fast = clients.pop().unwrap();

    // The fast connection reads everything, in its own thread, up to "end".
    let reader = std::thread::spawn(move || {
        let mut seqs = Vec::new();
        loop {
            let frame = fast.recv_json();
            assert_eq!(frame["epoch"], epoch);
            seqs.push(frame["seq"].as_u64().expect("seq"));
            if frame["data"] == "end" {
                return seqs;
            }
        }
    });

    // Publish 32 KiB messages until the slow connection, which reads
    // nothing, is dropped from the deliveries (bounded: 64 MiB at most).
    let payload = "s".repeat(32 * 1024);
    let mut api_conn = HttpConn::open(server.api_addr());
    let mut published = 0;
    for _ in 0..2000 {
        let body = json!({ "user": user, "data": payload });
        let (status, answer) = api_on(&mut api_conn, "/api/v1/publish", &body, Some(API_KEY));
        assert_eq!(status, 200, "{answer}");
        published += 1;
        assert_eq!(answer["seq"], published);
        if answer["delivered"] == 1 {
            break;
        }
        assert_eq!(answer["delivered"], 2, "{answer}");
    }
    assert!(published < 2000, "the slow consumer was never cut off");
    let end = publish(&server, &user, &json!("end"));
    assert_eq!(end["delivered"], 1, "{end}");

    // The reader lost nothing, in order.
    let seqs = reader.join().expect("fast reader");
    assert_eq!(seqs, (1..=published + 1).collect::<Vec<_>>());

    // The slow one gets what was queued, in order, then close 4008.
    let mut last = 0;
    let close = loop {
        match slow.try_recv(IO_TIMEOUT).expect("slow read") {
            Some(tungstenite::Message::Text(text)) => {
                let frame: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
                let seq = frame["seq"].as_u64().expect("seq");
                assert!(seq > last && seq <= published, "seq {seq} after {last}");
                last = seq;
            }
            Some(tungstenite::Message::Close(frame)) => break frame.expect("close code"),
            Some(other) => panic!("unexpected {other:?}"),
            None => panic!("no close 4008 within {IO_TIMEOUT:?}"),
        }
    };
    assert_eq!(u16::from(close.code), 4008);
    neighbours[0].ping_pong(1);
    wait_presence(&server, &user, 0);
}

#[test]
fn a_duplicated_user_id_naming_another_user_is_forbidden() {
    let server = Server::builder().shards(2).start();
    let (a, b, _) = three_users(&server, "dup");
    let (mut a_clients, a_epoch) = connect_many(&server, &a, 2);
    let (mut b_clients, b_epoch) = connect_many(&server, &b, 1);

    // Serialised by hand: JSON objects built by serde cannot repeat a key.
    let frames = [
        format!(r#"{{"type":"send","id":1,"data":"x","user_id":"{b}","user_id":"{a}"}}"#),
        format!(r#"{{"type":"send","id":2,"data":"x","user_id":"{a}","user_id":"{b}"}}"#),
    ];
    for (i, text) in frames.iter().enumerate() {
        a_clients[0].send_text(text);
        let error = a_clients[0].recv_json();
        assert_eq!(error["type"], "error", "{text}: {error}");
        assert_eq!(error["code"], "forbidden", "{text}: {error}");
        assert_eq!(error["id"], i + 1, "{text}: {error}");
    }

    assert_next_is_sentinel(&server, &a, &mut a_clients, a_epoch, 1);
    assert_next_is_sentinel(&server, &b, &mut b_clients, b_epoch, 1);
}
