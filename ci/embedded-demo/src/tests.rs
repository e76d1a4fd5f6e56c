//! Host tests: the same code as the firmware build, with std only for the test harness.

use std::fmt::Write as _;
use std::vec::Vec;

use super::*;

/// Runs the exchange and returns the bytes each side sent.
fn record() -> (Vec<u8>, Vec<u8>) {
    let mut exchange = Exchange::new().expect("client configuration");
    let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
    exchange
        .run(&mut |direction, bytes| match direction {
            Direction::ToServer => to_server.extend_from_slice(bytes),
            Direction::ToClient => to_client.extend_from_slice(bytes),
        })
        .expect("the exchange completes");
    assert_eq!(exchange.client.read_data(), &WRITE_DATA[..]);
    assert_eq!(
        &exchange.server.disk()[DATA_OFFSET as usize..][..DATA_LEN],
        &WRITE_DATA[..]
    );
    assert!(exchange.client.machine().extended_headers());
    (to_server, to_client)
}

fn rust_array(name: &str, doc: &str, bytes: &[u8]) -> String {
    let mut s = format!("/// {doc}\npub static {name}: [u8; {}] = [\n", bytes.len());
    for line in bytes.chunks(16) {
        s.push_str("   ");
        for b in line {
            write!(s, " 0x{b:02x},").unwrap();
        }
        s.push('\n');
    }
    s.push_str("];\n");
    s
}

#[test]
fn exchange_writes_and_reads_back_and_matches_the_transcript() {
    let (to_server, to_client) = record();
    if std::env::var_os("REGENERATE_TRANSCRIPT").is_some() {
        let text = format!(
            "{}\n{}\n{}",
            "//! The bytes each side sends in [`Exchange::run`](crate::Exchange), recorded from a run\n\
             //! (regenerate with `REGENERATE_TRANSCRIPT=1 cargo test`). A single-role build plays the\n\
             //! other side from here.",
            rust_array("TO_SERVER", "Client to server.", &to_server),
            rust_array("TO_CLIENT", "Server to client.", &to_client),
        );
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/transcript.rs");
        std::fs::write(path, text).unwrap();
        return;
    }
    assert!(
        to_server == transcript::TO_SERVER && to_client == transcript::TO_CLIENT,
        "the machines no longer send the recorded bytes; if the change is intended, run \
         `REGENERATE_TRANSCRIPT=1 cargo test` in ci/embedded-demo and commit src/transcript.rs"
    );
}

#[test]
fn client_alone_against_the_recorded_server() {
    let mut client = client_side::ClientSide::new().unwrap();
    run_client_against_transcript(&mut client).unwrap();
    assert_eq!(client.read_data(), &WRITE_DATA[..]);
}

#[test]
fn server_alone_against_the_recorded_client() {
    let mut server = server_side::ServerSide::new();
    run_server_against_transcript(&mut server).unwrap();
    assert_eq!(
        &server.disk()[DATA_OFFSET as usize..][..DATA_LEN],
        &WRITE_DATA[..]
    );
}

#[test]
fn exported_entry_point_succeeds() {
    assert_eq!(nbd_demo_run(), 0);
}

/// The same sides over a transport of 48 bytes per direction: payloads and replies cross
/// in many pieces, and the machines wait for room instead of failing.
#[test]
fn tiny_transport() {
    let mut client = client_side::ClientSide::new().unwrap();
    let mut server = server_side::ServerSide::new();
    let (mut c2s, mut s2c) = (Pipe::<48>::new(), Pipe::<48>::new());
    for _ in 0..MAX_ROUNDS {
        let a = client.step(&mut s2c, &mut c2s).unwrap();
        let b = server.step(&mut c2s, &mut s2c).unwrap();
        if server.is_done() && !s2c.is_closed() {
            s2c.close();
        }
        if client.is_done() {
            break;
        }
        assert!(a || b || s2c.is_closed(), "stalled");
    }
    assert!(client.is_done() && server.is_done());
    assert_eq!(client.read_data(), &WRITE_DATA[..]);
}

/// A corrupted byte from the peer is an error, never a panic.
#[test]
fn corrupted_transcripts_fail_cleanly() {
    for i in (0..transcript::TO_CLIENT.len()).step_by(7) {
        let mut bytes = transcript::TO_CLIENT;
        bytes[i] ^= 0x41;
        let mut client = client_side::ClientSide::new().unwrap();
        let mut c2s = Pipe::<PIPE_LEN>::new();
        let mut s2c = Pipe::<PIPE_LEN>::new();
        let mut fed = 0;
        for _ in 0..1000 {
            fed += s2c.push(&bytes[fed..]);
            if fed == bytes.len() {
                s2c.close();
            }
            c2s.consume(c2s.data().len());
            match client.step(&mut s2c, &mut c2s) {
                Ok(true) => {}
                Ok(false) | Err(_) => break,
            }
        }
    }
}

/// Prints the sizes quoted in the README (`cargo test -- --nocapture sizes`).
#[test]
fn sizes() {
    use core::mem::size_of;
    use nbd_proto::client::Client;
    use nbd_proto::server::Server;
    let rows = [
        ("Client (N = 64, default)", size_of::<Client>()),
        ("Client<4>", size_of::<Client<4>>()),
        ("Server (N = 64, B = 65536, default)", size_of::<Server>()),
        ("Server<4, 1024>", size_of::<Server<4, 1024>>()),
        ("ClientSide (demo)", size_of::<client_side::ClientSide>()),
        (
            "ServerSide (demo, 8 KiB disk)",
            size_of::<server_side::ServerSide>(),
        ),
        ("Exchange (demo, all of it)", size_of::<Exchange>()),
    ];
    for (what, size) in rows {
        println!("size_of {what}: {size} bytes");
    }
    // Budgets: a change that grows the machines should be noticed (and the README updated).
    assert!(size_of::<Client<4>>() < 12 * 1024);
    assert!(size_of::<Server<4, 1024>>() < 4 * 1024);
}
