//! Shutdown, as the public contract describes it: on SIGTERM the server
//! drains, closing every open connection with 1001 ("server shutting down")
//! rather than dropping sockets, and then exits successfully.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn sigterm_closes_every_connection_with_1001_and_exits() {
    let mut server = Server::builder().shards(2).start();
    let a = user_on_shard(&server, "term", 0, &[]);
    let b = user_on_shard(&server, "term", 1, &[]);
    let (mut clients, _) = connect_many(&server, &a, 2);
    clients.extend(connect_many(&server, &b, 2).0);

    server.signal(libc::SIGTERM);
    for client in &mut clients {
        client.expect_close(1001);
    }
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("the server should exit after draining");
    assert!(status.success(), "exit status {status:?}");
}
