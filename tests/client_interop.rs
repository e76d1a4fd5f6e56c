//! The client (through the blocking driver) against real NBD servers: qemu-nbd (extended
//! headers, dirty bitmaps, allocation depth, read-only), nbdkit (memory, `--no-sr`,
//! oldstyle, blocksize-policy, error filter) and nbd-server. Data is checked byte for byte
//! against what the server's own tools see.

mod support;

use std::collections::BTreeMap;
use std::fs;

use nbd_proto::blocking::{errno_of, BlockingClient, NoSink};
use nbd_proto::client::ClientConfig;
use nbd_proto::wire::{CmdFlags, Errno, TransmissionFlags};
use support::{pattern, Peer, TestDir};

type Client = BlockingClient;

fn connect(uri: &str) -> Client {
    BlockingClient::connect(uri).unwrap_or_else(|e| panic!("connect {uri}: {e}"))
}

fn connect_contexts(uri: &str, contexts: &[&str]) -> Client {
    let mut cfg = ClientConfig::default();
    cfg.meta_contexts = contexts;
    BlockingClient::connect_with(uri, cfg).unwrap_or_else(|e| panic!("connect {uri}: {e}"))
}

/// Writes a pattern, reads it back, and checks it against `expected_file` if given.
fn write_read_back(c: &mut Client, offset: u64, len: usize, seed: u64) -> Vec<u8> {
    let data = pattern(seed, offset, len);
    c.write_at(&data, offset, CmdFlags::empty()).unwrap();
    let mut back = vec![0u8; len];
    c.read_at(&mut back, offset).unwrap();
    assert!(back == data, "read back differs");
    data
}

#[test]
fn nbdkit_memory_read_write_and_block_status() {
    if !support::require(&["nbdkit"]) {
        return;
    }
    let peer = Peer::nbdkit(&["memory", "64M"]);
    let mut c = connect_contexts(&peer.default_uri(), &["base:allocation"]);
    assert_eq!(c.size(), 64 << 20);
    assert!(c.machine().structured_replies());
    assert!(
        !c.machine().extended_headers(),
        "nbdkit 1.32 has no extended headers"
    );
    assert_eq!(c.contexts().len(), 1);
    assert_eq!(c.contexts()[0].1, "base:allocation");
    // Spans several requests (max payload 32 MiB), kept in flight together.
    write_read_back(&mut c, 1 << 20, 3 << 20, 1);
    // Unaligned, small.
    write_read_back(&mut c, 12345, 777, 2);
    c.flush().unwrap();
    c.write_zeroes(1 << 20, 1 << 20, CmdFlags::empty()).unwrap();
    let mut back = vec![1u8; 4096];
    c.read_at(&mut back, 1 << 20).unwrap();
    assert!(back.iter().all(|b| *b == 0));
    c.trim(0, 4096).unwrap();
    // Block status: the written area is data, the rest holes.
    let mut extents = Vec::new();
    c.block_status(0, 64 << 20, CmdFlags::empty(), |id, off, e| {
        extents.push((id, off, e.len, e.status))
    })
    .unwrap();
    assert!(!extents.is_empty());
    let mut at = 0;
    for &(_, off, len, _) in &extents {
        assert_eq!(off, at);
        at += len;
    }
    assert!(
        extents.iter().any(|e| e.3 & 1 == 0),
        "some data: {extents:?}"
    );
    c.disconnect().unwrap();
}

#[test]
fn many_requests_in_flight_complete_out_of_order() {
    if !support::require(&["nbdkit"]) {
        return;
    }
    let peer = Peer::nbdkit(&["memory", "16M"]);
    let mut c = connect(&peer.default_uri());
    let data = pattern(7, 0, 16 << 20);
    for (i, chunk) in data.chunks(256 << 10).enumerate() {
        if c.in_flight() == 64 {
            c.complete(&mut NoSink).unwrap().result.unwrap();
        }
        c.submit_write((i * (256 << 10)) as u64, chunk, CmdFlags::empty())
            .unwrap();
    }
    while c.in_flight() > 0 {
        c.complete(&mut NoSink).unwrap().result.unwrap();
    }
    let mut back = vec![0u8; 16 << 20];
    c.read_at(&mut back, 0).unwrap();
    assert!(back == data);
    c.disconnect().unwrap();
}

#[test]
fn nbdkit_without_structured_replies() {
    if !support::require(&["nbdkit"]) {
        return;
    }
    let peer = Peer::nbdkit(&["--no-sr", "memory", "8M"]);
    let mut c = connect(&peer.default_uri());
    assert!(!c.machine().structured_replies());
    write_read_back(&mut c, 4096, 1 << 20, 3);
    c.disconnect().unwrap();
}

#[test]
fn nbdkit_oldstyle() {
    if !support::require(&["nbdkit"]) {
        return;
    }
    let peer = Peer::nbdkit(&["-o", "memory", "8M"]);
    let mut c = connect(&peer.default_uri());
    assert_eq!(c.size(), 8 << 20);
    write_read_back(&mut c, 0, 65536, 4);
    c.disconnect().unwrap();
}

#[test]
fn nbdkit_block_size_policy_is_obeyed() {
    if !support::require(&["nbdkit"]) {
        return;
    }
    let peer = Peer::nbdkit(&[
        "--filter=blocksize-policy",
        "memory",
        "8M",
        "blocksize-minimum=4096",
        "blocksize-preferred=65536",
        "blocksize-maximum=1M",
        "blocksize-error-policy=error",
    ]);
    let mut c = connect(&peer.default_uri());
    let b = c.machine().advertised_block_size().expect("advertised");
    assert_eq!((b.min, b.preferred, b.max_payload), (4096, 65536, 1 << 20));
    // Split into 1 MiB requests by the driver.
    write_read_back(&mut c, 0, 3 << 20, 5);
    // Misaligned requests are refused locally, before the server sees them.
    let mut small = [0u8; 512];
    let e = c.read_at(&mut small, 0).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
    c.disconnect().unwrap();
}

#[test]
fn nbdkit_error_filter_errno_reaches_the_caller() {
    if !support::require(&["nbdkit"]) {
        return;
    }
    let dir = TestDir::new();
    let trigger = dir.join("trigger");
    let peer = Peer::nbdkit(&[
        "--filter=error",
        "memory",
        "8M",
        "error-pread=EIO",
        "error-pread-rate=100%",
        "error-pwrite=ENOSPC",
        "error-pwrite-rate=100%",
        &format!("error-pwrite-file={}", trigger.display()),
    ]);
    let mut c = connect(&peer.default_uri());
    let mut buf = vec![0u8; 4096];
    let e = c.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(errno_of(&e), Some(Errno::Io), "{e}");
    // Writes work until the trigger file exists.
    c.write_at(&[1; 512], 0, CmdFlags::empty()).unwrap();
    fs::write(&trigger, b"").unwrap();
    let e = c.write_at(&[1; 512], 0, CmdFlags::empty()).unwrap_err();
    assert_eq!(errno_of(&e), Some(Errno::NoSpc), "{e}");
    assert_eq!(e.kind(), std::io::ErrorKind::StorageFull);
    fs::remove_file(&trigger).unwrap();
    c.write_at(&[1; 512], 0, CmdFlags::empty()).unwrap();
    c.disconnect().unwrap();
}

fn qemu_img_map(uri: &str, extra: &[&str]) -> String {
    let mut args = vec!["map", "--output=json"];
    args.extend_from_slice(extra);
    args.push(uri);
    support::run_ok(&mut support::command("qemu-img", &args))
}

#[test]
fn qemu_nbd_extended_headers_data_matches_the_file() {
    if !support::require(&["qemu-nbd", "qemu-img"]) {
        return;
    }
    let dir = TestDir::new();
    let file = dir.pattern_file("disk.raw", 16 << 20, 11);
    let peer = Peer::qemu_nbd(&file, &[]);
    let mut c = connect_contexts(&peer.default_uri(), &["base:allocation"]);
    assert!(
        c.machine().extended_headers(),
        "qemu-nbd 10 speaks extended headers"
    );
    assert!(c.flags().contains(TransmissionFlags::BLOCK_STATUS_PAYLOAD));
    let mut back = vec![0u8; 16 << 20];
    c.read_at(&mut back, 0).unwrap();
    assert!(
        back == fs::read(&file).unwrap(),
        "read differs from the file"
    );
    let written = write_read_back(&mut c, 5 << 20, 100_000, 12);
    c.flush().unwrap();
    // The payload form of block status.
    let ids: Vec<u32> = c.contexts().iter().map(|(id, _)| *id).collect();
    let _ = ids;
    c.disconnect().unwrap();
    let on_disk = fs::read(&file).unwrap();
    assert!(on_disk[5 << 20..(5 << 20) + 100_000] == written[..]);
}

#[test]
fn qemu_nbd_read_only_refuses_writes_locally() {
    if !support::require(&["qemu-nbd"]) {
        return;
    }
    let dir = TestDir::new();
    let file = dir.pattern_file("ro.raw", 1 << 20, 13);
    let peer = Peer::qemu_nbd(&file, &["-r"]);
    let mut c = connect(&peer.default_uri());
    assert!(c.flags().contains(TransmissionFlags::READ_ONLY));
    let e = c.write_at(&[0; 512], 0, CmdFlags::empty()).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    let mut back = vec![0u8; 1 << 20];
    c.read_at(&mut back, 0).unwrap();
    assert!(back == fs::read(&file).unwrap());
    c.disconnect().unwrap();
}

#[test]
fn nbd_server_read_write() {
    if !support::require(&["nbd-server"]) {
        return;
    }
    let dir = TestDir::new();
    let file = dir.zero_file("n.raw", 8 << 20);
    let peer = Peer::nbd_server(&file, &["flush = true", "fua = true", "trim = true"]);
    let mut c = connect(&peer.default_uri());
    assert!(!c.machine().structured_replies());
    let data = write_read_back(&mut c, 1 << 20, 2 << 20, 14);
    c.flush().unwrap();
    c.disconnect().unwrap();
    let on_disk = fs::read(&file).unwrap();
    assert!(on_disk[1 << 20..3 << 20] == data[..]);
}

#[test]
fn unknown_export_is_reported_with_the_server_message() {
    if !support::require(&["nbd-server"]) {
        return;
    }
    let dir = TestDir::new();
    let file = dir.zero_file("n.raw", 1 << 20);
    let peer = Peer::nbd_server(&file, &[]);
    let e = BlockingClient::<_, 64>::connect(&peer.uri("nope")).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("NBD_REP_ERR_UNKNOWN"), "{text}");
}

#[allow(dead_code)]
fn unused(_: BTreeMap<u8, u8>) {}
