//! The client (through the blocking driver) against real NBD servers: qemu-nbd (extended
//! headers, dirty bitmaps, allocation depth, read-only), nbdkit (memory, `--no-sr`,
//! oldstyle, blocksize-policy, error filter) and nbd-server. Data is checked byte for byte
//! against what the server's own tools see.

mod support;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::thread;
use std::time::Duration;

use nbd_proto::blocking::{errno_of, BlockingClient, NoSink};
use nbd_proto::client::ClientConfig;
use nbd_proto::wire::{
    CmdFlags, Cookie, Errno, HandshakeFlags, OldstyleHello, Request, SimpleReply, TransmissionFlags,
};
use support::{pattern, Peer, TestDir, Trace};

const MIB: u64 = 1 << 20;

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
    let e = BlockingClient::connect(&peer.uri("nope")).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("NBD_REP_ERR_UNKNOWN"), "{text}");
}

/// `(start, length, data, zero)` of every object in JSON output, from the keys `start` or
/// `offset`, `length`, and either `data`/`zero` (qemu-img) or `type` (ours, nbdinfo).
fn json_runs(json: &str) -> Vec<(u64, u64, u64)> {
    let field = |obj: &str, key: &str| -> Option<String> {
        let at = obj.find(&format!("\"{key}\":"))? + key.len() + 3;
        let rest = obj[at..].trim_start();
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        Some(rest[..end].trim().to_owned())
    };
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    for obj in json.split('{').skip(1) {
        let start: u64 = field(obj, "start")
            .or_else(|| field(obj, "offset"))
            .unwrap()
            .parse()
            .unwrap();
        let len: u64 = field(obj, "length").unwrap().parse().unwrap();
        let status = match field(obj, "type") {
            Some(t) => t.parse().unwrap(),
            None => {
                let data = field(obj, "data").unwrap() == "true";
                let zero = field(obj, "zero").unwrap() == "true";
                u64::from(!data) | (u64::from(zero) << 1)
            }
        };
        match runs.last_mut() {
            Some(last) if last.0 + last.1 == start && last.2 == status => last.1 += len,
            _ => runs.push((start, len, status)),
        }
    }
    runs
}

fn example(args: &[&str]) -> std::process::Output {
    let bin = support::example_binary("nbd-client");
    support::run(&mut support::command(bin.to_str().unwrap(), args))
}

fn example_ok(args: &[&str]) -> String {
    let out = example(args);
    assert!(
        out.status.success(),
        "nbd-client {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A raw image with data, written zeroes and holes.
fn sparse_image(dir: &TestDir) -> std::path::PathBuf {
    let file = dir.join("sparse.raw");
    support::run_ok(&mut support::command(
        "qemu-img",
        &["create", "-f", "raw", file.to_str().unwrap(), "64M"],
    ));
    support::run_ok(&mut support::command(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xaa 0 1M",
            "-c",
            "write -P 0x55 10M 3M",
            "-c",
            "write -P 0x11 40M 64k",
            file.to_str().unwrap(),
        ],
    ));
    file
}

#[test]
fn map_json_agrees_with_qemu_img_map() {
    if !support::require(&["qemu-nbd", "qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TestDir::new();
    let file = sparse_image(&dir);
    let peer = Peer::qemu_nbd(&file, &["-e", "4"]);
    let uri = peer.default_uri();
    let ours = json_runs(&example_ok(&["map", &uri, "--json"]));
    let theirs = json_runs(&qemu_img_map(&uri, &["-f", "raw"]));
    assert!(ours.len() >= 4, "{ours:?}");
    assert_eq!(ours, theirs);
}

#[test]
fn map_dirty_bitmap_and_allocation_depth_agree_with_nbdinfo() {
    if !support::require(&["qemu-nbd", "qemu-img", "qemu-io", "nbdinfo"]) {
        return;
    }
    let dir = TestDir::new();
    let top = dir.bitmap_image();
    let peer = Peer::qemu_nbd(&top, &["-f", "qcow2", "-A", "-B", "bm0", "-x", "top"]);
    let uri = peer.uri("top");
    let dirty = json_runs(&example_ok(&[
        "map",
        &uri,
        "--context",
        "qemu:dirty-bitmap:bm0",
        "--json",
    ]));
    assert!(dirty.contains(&(2 << 20, 512 << 10, 1)), "{dirty:?}");
    assert!(dirty.contains(&(8 << 20, 1 << 20, 1)), "{dirty:?}");
    for context in [
        "qemu:dirty-bitmap:bm0",
        "qemu:allocation-depth",
        "base:allocation",
    ] {
        let ours = json_runs(&example_ok(&["map", &uri, "--context", context, "--json"]));
        let theirs = json_runs(&support::run_ok(&mut support::command(
            "nbdinfo",
            &[&format!("--map={context}"), "--json", &uri],
        )));
        assert_eq!(ours, theirs, "{context}");
    }
    // Text output names the states as nbdinfo does.
    let text = example_ok(&["map", &uri, "--context", "qemu:allocation-depth"]);
    assert!(
        text.contains("local") && text.contains("backing depth 2"),
        "{text}"
    );
}

#[test]
fn block_status_payload_form_against_qemu_nbd() {
    if !support::require(&["qemu-nbd", "qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TestDir::new();
    let file = sparse_image(&dir);
    let peer = Peer::qemu_nbd(&file, &["-A"]);
    let mut c = connect_contexts(
        &peer.default_uri(),
        &["base:allocation", "qemu:allocation-depth"],
    );
    assert!(c.flags().contains(TransmissionFlags::BLOCK_STATUS_PAYLOAD));
    let ids: Vec<(u32, String)> = c
        .contexts()
        .iter()
        .map(|(id, n)| (*id, n.to_string()))
        .collect();
    assert_eq!(ids.len(), 2);
    let alloc = ids.iter().find(|(_, n)| n == "base:allocation").unwrap().0;
    let mut seen = Vec::new();
    c.block_status_for(0, 64 << 20, CmdFlags::empty(), &[alloc], |id, off, e| {
        seen.push((id, off, e.len, e.status))
    })
    .unwrap();
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|s| s.0 == alloc), "only the asked context");
    assert_eq!(seen[0], (alloc, 0, 1 << 20, 0));
    // Both contexts without the payload form.
    let mut both = std::collections::BTreeSet::new();
    c.block_status(0, 64 << 20, CmdFlags::REQ_ONE, |id, _, _| {
        both.insert(id);
    })
    .unwrap();
    assert_eq!(both.len(), 2);
    c.disconnect().unwrap();
}

#[test]
fn copy_between_servers_files_and_pipes() {
    if !support::require(&["qemu-nbd", "qemu-img", "qemu-io", "nbdkit"]) {
        return;
    }
    let dir = TestDir::new();
    let file = sparse_image(&dir);
    let src = Peer::qemu_nbd(&file, &["-r", "-e", "4"]);
    let su = src.default_uri();
    // NBD -> file: an existing file with other data is replaced, holes included.
    let out = dir.pattern_file("out.raw", 80 << 20, 20);
    let err = example_stderr_ok(&["copy", &su, out.to_str().unwrap(), "--progress"]);
    assert!(fs::read(&out).unwrap() == fs::read(&file).unwrap());
    // --progress on a non-terminal: whole lines, the last one at 100%.
    assert!(
        err.lines().count() >= 1
            && err
                .lines()
                .all(|l| l.starts_with("nbd-client: copy: ") && l.ends_with(" bytes)")),
        "{err:?}"
    );
    assert!(
        err.ends_with("nbd-client: copy: 100.0% (67108864 / 67108864 bytes)\n"),
        "{err:?}"
    );
    // Without --progress, and stderr not a terminal: nothing.
    let err = example_stderr_ok(&["copy", &su, out.to_str().unwrap()]);
    assert_eq!(err, "");
    // file -> NBD, then NBD -> stdout.
    let pat = dir.pattern_file("pat.raw", 8 << 20, 21);
    let dst2 = Peer::nbdkit(&["memory", "8M"]);
    example_ok(&["copy", pat.to_str().unwrap(), &dst2.default_uri()]);
    let bin = support::example_binary("nbd-client");
    let o = support::run(&mut support::command(
        bin.to_str().unwrap(),
        &["copy", &dst2.default_uri(), "-"],
    ));
    assert!(o.status.success());
    assert!(o.stdout == fs::read(&pat).unwrap());
}

/// `(offset, length)`.
type Range = (u64, u64);

/// The `(offset, length)` runs of `file` (raw) that read as zeroes, and those with data, by
/// `qemu-img map`.
fn zero_and_data_runs(file: &Path) -> (Vec<Range>, Vec<Range>) {
    let runs = json_runs(&support::run_ok(&mut support::command(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", file.to_str().unwrap()],
    )));
    let (zero, data): (Vec<_>, Vec<_>) = runs.iter().partition(|r| r.2 & 2 != 0);
    let pairs = |v: Vec<&(u64, u64, u64)>| v.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>();
    (pairs(zero), pairs(data))
}

/// Copies the sparse image into an nbdkit memory disk that already holds other data,
/// through the proxy: the holes of the source are not read, and not written with
/// NBD_CMD_WRITE either (NBD_CMD_WRITE_ZEROES instead: the destination is not known to be
/// zero), the data is; the result is the source byte for byte.
#[test]
fn copy_nbd_to_nbd_writes_zeroes_over_the_source_holes() {
    if !support::require(&["qemu-nbd", "qemu-img", "qemu-io", "nbdkit", "nbdcopy"]) {
        return;
    }
    let dir = TestDir::new();
    let file = sparse_image(&dir);
    let (zero, data) = zero_and_data_runs(&file);
    assert!(zero.len() >= 3 && data.len() >= 3, "{zero:?} {data:?}");
    let junk = dir.pattern_file("junk.raw", 64 << 20, 22);
    let src = Peer::qemu_nbd(&file, &["-r", "-e", "4"]);
    let dst = Peer::nbdkit(&["memory", "64M"]);
    let du = dst.default_uri();
    support::run_ok(&mut support::command(
        "nbdcopy",
        &[junk.to_str().unwrap(), &du],
    ));
    let mut src_trace = Trace::start(src.addr());
    let mut dst_trace = Trace::start(dst.addr());
    example_ok(&[
        "copy",
        &src_trace.uri(""),
        &dst_trace.uri(""),
        "--requests",
        "8",
        "--request-size",
        "64k",
    ]);
    let (src_log, dst_log) = (src_trace.settle_clean(), dst_trace.settle_clean());
    let writes = requests(&dst_log, "NBD_CMD_WRITE");
    let zeroes = requests(&dst_log, "NBD_CMD_WRITE_ZEROES");
    let reads = requests(&src_log, "NBD_CMD_READ");
    let overlaps = |(o, l): (u64, u64), (s, n): (u64, u64)| o < s + n && s < o + l;
    for &z in &zero {
        for w in &writes {
            assert!(
                !overlaps((w.1, w.2), z),
                "NBD_CMD_WRITE {w:?} over the zero run {z:?}"
            );
        }
        for r in &reads {
            assert!(
                !overlaps((r.1, r.2), z),
                "NBD_CMD_READ {r:?} of the zero run {z:?}"
            );
        }
        let zeroed = union(zeroes.iter().map(|w| (w.1, w.2)));
        assert_covered(&zeroed, z.0, z.0 + z.1, "NBD_CMD_WRITE_ZEROES");
    }
    let written = union(writes.iter().map(|w| (w.1, w.2)));
    for &(o, l) in &data {
        assert_covered(&written, o, o + l, "NBD_CMD_WRITE");
    }
    let back = dir.data_path("back.raw");
    support::run_ok(&mut support::command(
        "nbdcopy",
        &[&du, back.to_str().unwrap()],
    ));
    assert!(fs::read(&back).unwrap() == fs::read(&file).unwrap());
}

/// A destination without NBD_CMD_WRITE_ZEROES (`nbdkit --filter=nozero`) that holds other
/// data: the source's holes are written as blocks of zeroes.
#[test]
fn copy_to_nbd_without_write_zeroes_writes_zero_blocks() {
    if !support::require(&["qemu-nbd", "qemu-img", "qemu-io", "nbdkit", "nbdcopy"]) {
        return;
    }
    let dir = TestDir::new();
    let file = sparse_image(&dir);
    let junk = dir.pattern_file("junk.raw", 64 << 20, 23);
    let src = Peer::qemu_nbd(&file, &["-r"]);
    let dst = Peer::nbdkit(&["--filter=nozero", "memory", "64M"]);
    let du = dst.default_uri();
    support::run_ok(&mut support::command(
        "nbdcopy",
        &[junk.to_str().unwrap(), &du],
    ));
    let mut dst_trace = Trace::start(dst.addr());
    example_ok(&["copy", &src.default_uri(), &dst_trace.uri("")]);
    let log = dst_trace.settle_clean();
    assert!(!log.contains("SEND_WRITE_ZEROES"), "{log}");
    assert!(requests(&log, "NBD_CMD_WRITE_ZEROES").is_empty(), "{log}");
    let writes = requests(&log, "NBD_CMD_WRITE");
    assert_eq!(union(writes.iter().map(|w| (w.1, w.2))), [(0, 64 << 20)]);
    let back = dir.data_path("back.raw");
    support::run_ok(&mut support::command(
        "nbdcopy",
        &[&du, back.to_str().unwrap()],
    ));
    assert!(fs::read(&back).unwrap() == fs::read(&file).unwrap());
}

/// A source of unknown size (stdin) over an existing, longer file full of other data: the
/// result is exactly the input, zero blocks and a zero tail included.
#[test]
fn copy_from_stdin_replaces_an_existing_file() {
    if !support::require(&["sh"]) {
        return;
    }
    let dir = TestDir::new();
    let mut input = vec![0u8; (3 << 20) + 1000];
    input[..MIB as usize].fill(0xaa);
    input[(2 << 20) + 5..(2 << 20) + 70_000].copy_from_slice(&pattern(24, 0, 69_995));
    let input_file = dir.data_path("in.raw");
    fs::write(&input_file, &input).unwrap();
    let out = dir.pattern_file("out.raw", 8 << 20, 25);
    let bin = support::example_binary("nbd-client");
    support::run_ok(&mut support::command(
        "sh",
        &[
            "-c",
            r#"exec "$0" copy - "$1" --request-size 64k < "$2""#,
            bin.to_str().unwrap(),
            out.to_str().unwrap(),
            input_file.to_str().unwrap(),
        ],
    ));
    let got = fs::read(&out).unwrap();
    assert_eq!(got.len(), input.len());
    assert!(got == input, "contents differ");
}

// ---------------------------------------------------------------------------------------------
// The example's copies, watched through the `nbd-trace` proxy
// ---------------------------------------------------------------------------------------------

/// `(connection, offset, length)` of every `command` request (e.g. `NBD_CMD_WRITE`) in a
/// trace.
fn requests(log: &str, command: &str) -> Vec<(usize, u64, u64)> {
    let needle = format!(" C->S {command} ");
    let field = |line: &str, key: &str| -> u64 {
        let at = line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len();
        line[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    log.lines()
        .filter(|l| l.contains(&needle))
        .map(|l| {
            let conn = l[1..l.find(']').unwrap()].parse().unwrap();
            (conn, field(l, " offset="), field(l, " len="))
        })
        .collect()
}

/// The ranges `[start, end)` covered by `ranges` (`(offset, length)`), merged.
fn union(ranges: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges
        .into_iter()
        .filter(|r| r.1 > 0)
        .map(|(o, l)| (o, o + l))
        .collect();
    v.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Panics unless `covered` (merged `[start, end)` ranges) contains all of `[start, end)`.
#[track_caller]
fn assert_covered(covered: &[(u64, u64)], start: u64, end: u64, what: &str) {
    assert!(
        covered.iter().any(|&(s, e)| s <= start && end <= e),
        "{what}: [{start}, {end}) not covered by {covered:?}"
    );
}

/// Runs the example, which must succeed; returns its stderr.
fn example_stderr_ok(args: &[&str]) -> String {
    let out = example(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "nbd-client {args:?} failed: {err}");
    err
}

/// The copy's three connections are observed through a proxy on each side: each opens an
/// export (`NBD_OPT_GO`) and carries reads (source) or writes (destination), together the
/// whole image.
#[test]
fn copy_with_several_connections() {
    if !support::require(&["qemu-nbd", "qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TestDir::new();
    let file = dir.pattern_file("src.raw", 24 << 20, 31);
    let target = dir.zero_file("dst.raw", 24 << 20);
    // -e 4: several clients, so both advertise CAN_MULTI_CONN.
    let src = Peer::qemu_nbd(&file, &["-r", "-e", "4"]);
    let dst = Peer::qemu_nbd(&target, &["-e", "4"]);
    let mut src_trace = Trace::start(src.addr());
    let mut dst_trace = Trace::start(dst.addr());
    let err = example_stderr_ok(&[
        "copy",
        &src_trace.uri(""),
        &dst_trace.uri(""),
        "--connections",
        "3",
        "--requests",
        "16",
    ]);
    assert_eq!(err, "", "nothing on stderr");
    let (src_log, dst_log) = (src_trace.settle_clean(), dst_trace.settle_clean());
    for (log, side) in [(&src_log, "source"), (&dst_log, "destination")] {
        assert_eq!(log.matches("] accepted ").count(), 3, "{side}:\n{log}");
        assert_eq!(
            log.matches(" C->S NBD_OPT_GO ").count(),
            3,
            "{side}:\n{log}"
        );
        assert!(log.contains("CAN_MULTI_CONN"), "{side}:\n{log}");
    }
    let reads = requests(&src_log, "NBD_CMD_READ");
    let writes = requests(&dst_log, "NBD_CMD_WRITE");
    for conn in 1..=3 {
        assert!(
            reads.iter().any(|r| r.0 == conn),
            "no reads on source connection {conn}:\n{src_log}"
        );
        assert!(
            writes.iter().any(|w| w.0 == conn),
            "no writes on destination connection {conn}:\n{dst_log}"
        );
    }
    let whole = [(0, 24 << 20)];
    assert_eq!(union(reads.iter().map(|r| (r.1, r.2))), whole);
    assert_eq!(union(writes.iter().map(|w| (w.1, w.2))), whole);
    assert_eq!(
        reads.iter().map(|r| r.2).sum::<u64>(),
        24 << 20,
        "each byte read once"
    );
    drop(dst_trace);
    drop(dst);
    assert!(fs::read(&target).unwrap() == fs::read(&file).unwrap());
}

/// `--connections 3` where one side does not advertise CAN_MULTI_CONN (qemu-nbd without
/// `-e`): one connection each way, and one line on stderr saying why.
#[test]
fn copy_falls_back_to_one_connection_without_multi_conn() {
    if !support::require(&["qemu-nbd", "qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TestDir::new();
    let file = dir.pattern_file("src.raw", 8 << 20, 32);
    for (single_src, side) in [(false, "destination"), (true, "source")] {
        let target = dir.zero_file("dst.raw", 8 << 20);
        let src = Peer::qemu_nbd(
            &file,
            if single_src {
                &["-r"]
            } else {
                &["-r", "-e", "4"]
            },
        );
        let dst = Peer::qemu_nbd(&target, if single_src { &["-e", "4"] } else { &[] });
        let mut src_trace = Trace::start(src.addr());
        let mut dst_trace = Trace::start(dst.addr());
        let (su, du) = (src_trace.uri(""), dst_trace.uri(""));
        let err = example_stderr_ok(&["copy", &su, &du, "--connections", "3"]);
        let named = if single_src { &su } else { &du };
        assert_eq!(
            err,
            format!(
                "nbd-client: copy: using 1 connection instead of 3: {side} {named}: the server does not offer CAN_MULTI_CONN\n"
            )
        );
        let (src_log, dst_log) = (src_trace.settle_clean(), dst_trace.settle_clean());
        let (single, multi) = if single_src {
            (&src_log, &dst_log)
        } else {
            (&dst_log, &src_log)
        };
        // The trace agrees about who offers what.
        assert!(
            !single.contains("CAN_MULTI_CONN") && multi.contains("CAN_MULTI_CONN"),
            "{side} should be the one without CAN_MULTI_CONN:\n{single}\n{multi}"
        );
        for log in [&src_log, &dst_log] {
            assert_eq!(log.matches("] accepted ").count(), 1, "{log}");
            assert_eq!(log.matches(" C->S NBD_OPT_GO ").count(), 1, "{log}");
        }
        assert_eq!(
            union(
                requests(&dst_log, "NBD_CMD_WRITE")
                    .iter()
                    .map(|w| (w.1, w.2))
            ),
            [(0, 8 << 20)]
        );
        drop(dst_trace);
        drop(dst);
        assert!(fs::read(&target).unwrap() == fs::read(&file).unwrap());
    }
}

/// The `(value, names)` of an `info` text output's `flags:` line, checked against each other
/// with the crate's flag names.
#[track_caller]
fn text_flags(info: &str) -> (u16, Vec<String>) {
    let line = info
        .lines()
        .find_map(|l| l.strip_prefix("\tflags: 0x"))
        .unwrap_or_else(|| panic!("no flags line: {info}"));
    let (hex, names) = line.split_once(" (").unwrap();
    let bits = u16::from_str_radix(hex, 16).unwrap();
    let names: Vec<String> = names
        .strip_suffix(')')
        .unwrap()
        .split(' ')
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect();
    let mut want = TransmissionFlags::HAS_FLAGS;
    for n in &names {
        let (_, f) = TransmissionFlags::NAMES
            .iter()
            .find(|(name, _)| name == n)
            .unwrap_or_else(|| panic!("unknown flag name {n} in {info}"));
        want |= *f;
    }
    assert_eq!(
        bits,
        want.bits(),
        "flag names do not match the value: {info}"
    );
    (bits, names)
}

#[test]
fn info_and_list() {
    if !support::require(&["nbd-server", "qemu-nbd"]) {
        return;
    }
    let dir = TestDir::new();
    let file = dir.zero_file("n.raw", 1 << 20);
    let peer = Peer::nbd_server(
        &file,
        &[
            "[ro]",
            &format!("exportname = {}", file.display()),
            "readonly = true",
        ],
    );
    let listed = example_ok(&["list", &peer.default_uri(), "--json"]);
    assert!(listed.contains("\"export-name\": \"disk\""), "{listed}");
    assert!(listed.contains("\"export-name\": \"ro\""), "{listed}");
    let listed = example_ok(&["list", &peer.default_uri()]);
    let names: Vec<&str> = listed
        .lines()
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    assert_eq!(names, ["disk", "ro"], "{listed}");
    let info = example_ok(&["info", &peer.uri("ro"), "--json"]);
    assert!(info.contains("\"export-size\": 1048576"), "{info}");
    assert!(info.contains("\"read_only\": true"), "{info}");
    // Text: the flags by name, with the value they add up to.
    let info = example_ok(&["info", &peer.uri("ro")]);
    assert!(info.contains("\n\texport-size: 1048576\n"), "{info}");
    let (_, names) = text_flags(&info);
    assert!(names.iter().any(|n| n == "READ_ONLY"), "{info}");
    // Not configured (`trim = true`, `flush = true`).
    assert!(
        !names.iter().any(|n| n == "SEND_TRIM" || n == "SEND_FLUSH"),
        "{info}"
    );

    // qemu-nbd with a description and extended headers.
    let q = Peer::qemu_nbd(&file, &["-x", "d", "-D", "a \"quoted\" disk"]);
    let info = example_ok(&["info", &q.uri("d"), "--json"]);
    assert!(
        info.contains("\"transaction\": \"extended headers\""),
        "{info}"
    );
    assert!(
        info.contains(r#""description": "a \"quoted\" disk""#),
        "{info}"
    );
    assert!(info.contains("\"base:allocation\""), "{info}");
    for want in [
        "\"block_size_minimum\": 1,",
        "\"block_size_preferred\": 4096,",
        "\"block_size_maximum\": 33554432,",
        "\"read_only\": false,",
        "\"send_write_zeroes\": true,",
    ] {
        assert!(info.contains(want), "{want} in {info}");
    }
    let info = example_ok(&["info", &q.uri("d")]);
    for want in [
        "protocol: newstyle-fixed without TLS, using extended headers\n",
        "export=\"d\":\n",
        "\n\tdescription: a \"quoted\" disk\n",
        "\n\texport-size: 1048576\n",
        "\n\tblock_size_minimum: 1\n\tblock_size_preferred: 4096\n\tblock_size_maximum: 33554432\n",
        "\n\tcontexts:\n\t\tbase:allocation\n",
    ] {
        assert!(info.contains(want), "{want:?} in {info}");
    }
    let (_, names) = text_flags(&info);
    for f in ["SEND_FLUSH", "SEND_FUA", "SEND_TRIM", "SEND_WRITE_ZEROES"] {
        assert!(names.iter().any(|n| n == f), "{f} in {info}");
    }
    assert!(!names.iter().any(|n| n == "READ_ONLY"), "{info}");
    // The description in the export list.
    let listed = example_ok(&["list", &q.uri("")]);
    assert_eq!(listed, "d\ta \"quoted\" disk\t1048576\n");
    let listed = example_ok(&["list", &q.uri(""), "--json"]);
    assert!(
        listed.contains(
            r#"{ "export-name": "d", "description": "a \"quoted\" disk", "export-size": 1048576 }"#
        ),
        "{listed}"
    );
}

/// `info --context qemu:` sends the prefix query to the server (NBD_OPT_LIST_META_CONTEXT)
/// and lists what it answers: both of qemu-nbd's `qemu:` contexts, not `base:allocation`.
#[test]
fn info_lists_meta_contexts_matching_a_prefix_query() {
    if !support::require(&["qemu-nbd", "qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TestDir::new();
    let top = dir.bitmap_image();
    let peer = Peer::qemu_nbd(&top, &["-f", "qcow2", "-A", "-B", "bm0", "-x", "top"]);
    let mut trace = Trace::start(peer.addr());
    let uri = trace.uri("top");
    let contexts = |json: &str| -> Vec<String> {
        let line = json
            .lines()
            .find_map(|l| l.trim().strip_prefix("\"contexts\": ["))
            .unwrap_or_else(|| panic!("no contexts in {json}"));
        let mut v: Vec<String> = line
            .trim_end_matches(']')
            .split(", ")
            .map(|c| c.trim_matches('"').to_owned())
            .collect();
        v.sort();
        v
    };
    let qemu = contexts(&example_ok(&["info", &uri, "--context", "qemu:", "--json"]));
    assert_eq!(qemu, ["qemu:allocation-depth", "qemu:dirty-bitmap:bm0"]);
    let all = contexts(&example_ok(&["info", &uri, "--json"]));
    assert_eq!(
        all,
        [
            "base:allocation",
            "qemu:allocation-depth",
            "qemu:dirty-bitmap:bm0"
        ]
    );
    let text = example_ok(&["info", &uri, "--context", "qemu:"]);
    assert!(
        text.contains("\tcontexts:\n\t\tqemu:") && !text.contains("base:allocation"),
        "{text}"
    );
    // The server did the matching.
    let log = trace.settle_clean();
    assert!(
        log.contains(" C->S NBD_OPT_LIST_META_CONTEXT export=\"top\" queries=[\"qemu:\"]"),
        "{log}"
    );
    for name in ["qemu:allocation-depth", "qemu:dirty-bitmap:bm0"] {
        let reply = format!("name=\"{name}\"");
        assert!(
            log.lines().any(|l| l
                .contains(" S->C NBD_REP_META_CONTEXT to NBD_OPT_LIST_META_CONTEXT")
                && l.contains(&reply)),
            "{name}: {log}"
        );
    }
}

/// Runs the example, which must fail with exactly one line on stderr; returns the line.
#[track_caller]
fn one_line_failure(args: &[&str]) -> String {
    one_line_failure_of(example(args), &format!("{args:?}"))
}

#[track_caller]
fn one_line_failure_of(o: std::process::Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{what}: {err}");
    assert_eq!(err.lines().count(), 1, "{what}: {err}");
    assert!(err.starts_with("nbd-client: "), "{what}: {err}");
    err
}

/// `nbd-client write URI 0` with `data` on stdin.
fn example_write(uri: &str, data: &str) -> std::process::Output {
    let bin = support::example_binary("nbd-client");
    support::run(&mut support::command(
        "sh",
        &[
            "-c",
            r#"printf %s "$2" | exec "$0" write "$1" 0"#,
            bin.to_str().unwrap(),
            uri,
            data,
        ],
    ))
}

/// A one-connection oldstyle server of `size` bytes on `socket` that answers the first
/// request (reading its payload first) with a simple reply for a cookie the client never
/// sent, then reads until the client hangs up.
fn lying_server(socket: &Path, size: u64, writable: bool) -> thread::JoinHandle<()> {
    let listener = UnixListener::bind(socket).unwrap();
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut flags = TransmissionFlags::HAS_FLAGS;
        if !writable {
            flags |= TransmissionFlags::READ_ONLY;
        }
        let hello = OldstyleHello {
            size,
            handshake_flags: HandshakeFlags::empty(),
            transmission_flags: flags,
        };
        let mut buf = vec![0u8; OldstyleHello::LEN];
        hello.emit(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
        let mut head = [0u8; Request::COMPACT_LEN];
        s.read_exact(&mut head).unwrap();
        let r = Request::parse(&head).unwrap();
        let mut payload = vec![0u8; r.payload_len() as usize];
        s.read_exact(&mut payload).unwrap();
        let lie = SimpleReply {
            error: None,
            cookie: Cookie(r.cookie.0 ^ 0x5a5a),
        };
        let mut reply = [0u8; SimpleReply::LEN];
        lie.emit(&mut reply).unwrap();
        s.write_all(&reply).unwrap();
        // Until the client hangs up (or the read times out).
        let _ = s.read_to_end(&mut Vec::new());
    })
}

#[test]
fn example_errors_are_one_line_and_non_zero() {
    if !support::require(&["nbdkit", "sh"]) {
        return;
    }
    let dir = TestDir::new();
    let small = dir.pattern_file("small.raw", 1 << 20, 26);
    let small = small.to_str().unwrap();
    let out = dir.data_path("out.raw");
    let out = out.to_str().unwrap();
    let peer = Peer::nbdkit(&[
        "--filter=error",
        "memory",
        "1M",
        "error-pread=EIO",
        "error-pread-rate=100%",
        "error-pwrite=ENOSPC",
        "error-pwrite-rate=100%",
    ]);
    let uri = peer.default_uri();
    // Every line names the server and the errno or rule.
    let err = one_line_failure(&["read", &uri, "0", "4096"]);
    assert_eq!(
        err,
        format!("nbd-client: {uri}: read of 4096 bytes at 0: input/output error (NBD_EIO)\n")
    );
    let err = one_line_failure_of(example_write(&uri, "hello"), "write");
    assert_eq!(
        err,
        format!("nbd-client: {uri}: write of 5 bytes at 0: no space left on device (NBD_ENOSPC)\n")
    );
    let err = one_line_failure(&["read", &uri, "1048576", "1"]);
    assert!(
        err.starts_with(&format!("nbd-client: {uri}: read of 1 bytes at 1048576: ")),
        "{err}"
    );
    assert!(err.contains("outside the export"), "{err}");
    let err = one_line_failure(&["map", &uri, "--context", "foo:bar"]);
    assert!(err.starts_with(&format!("nbd-client: {uri}: ")), "{err}");
    assert!(err.contains("\"foo:bar\""), "{err}");
    let gone = "nbd+unix:///?socket=/nonexistent.sock";
    for cmd in [
        &["read", gone, "0", "1"][..],
        &["info", gone],
        &["list", gone],
        &["map", gone],
    ] {
        let err = one_line_failure(cmd);
        assert!(err.starts_with(&format!("nbd-client: {gone}: ")), "{err}");
    }
    // Copies name the side.
    let err = one_line_failure(&["copy", gone, out]);
    assert!(
        err.starts_with(&format!("nbd-client: source {gone}: ")),
        "{err}"
    );
    let err = one_line_failure(&["copy", small, &uri]);
    assert_eq!(
        err,
        format!("nbd-client: destination {uri}: write: no space left on device (NBD_ENOSPC)\n")
    );
    let pattern = Peer::nbdkit(&[
        "--filter=error",
        "pattern",
        "1M",
        "error-pread=EIO",
        "error-pread-rate=100%",
    ]);
    let pu = pattern.default_uri();
    let err = one_line_failure(&["copy", &pu, out, "--request-size", "64k"]);
    assert!(
        err.starts_with(&format!("nbd-client: source {pu}: read of 65536 bytes at ")),
        "{err}"
    );
    assert!(err.ends_with(": input/output error (NBD_EIO)\n"), "{err}");
    // Transport errors while waiting for replies: the server dies on the first read, or
    // the first write.
    let dies = |method: &str| {
        Peer::nbdkit(&[
            "eval",
            "get_size=echo 4M",
            "can_write=exit 0",
            &format!("{method}=kill -9 $PPID; sleep 1"),
        ])
    };
    let dying = dies("pread");
    let du = dying.default_uri();
    let err = one_line_failure(&["copy", &du, out]);
    assert!(
        err.starts_with(&format!("nbd-client: source {du}: ")),
        "{err}"
    );
    let dying = dies("pwrite");
    let du = dying.default_uri();
    let err = one_line_failure(&["copy", small, &du]);
    assert!(
        err.starts_with(&format!("nbd-client: destination {du}: ")),
        "{err}"
    );
    // A flush that fails.
    let flaky = Peer::nbdkit(&[
        "eval",
        "get_size=echo 4M",
        "can_write=exit 0",
        "pwrite=cat >/dev/null",
        "can_flush=exit 0",
        "flush=echo EIO flush failed >&2; exit 1",
    ]);
    let fu = flaky.default_uri();
    let err = one_line_failure(&["copy", small, &fu]);
    assert_eq!(
        err,
        format!("nbd-client: destination {fu}: flush: input/output error (NBD_EIO)\n")
    );
    // A server breaking a rule of the protocol: a reply to a cookie never sent.
    for (as_source, side) in [(true, "source"), (false, "destination")] {
        let socket = dir.join(format!("liar-{side}.sock"));
        let server = lying_server(&socket, 1 << 20, !as_source);
        let lu = format!("nbd+unix:///?socket={}", socket.display());
        let err = if as_source {
            one_line_failure(&["copy", &lu, out])
        } else {
            one_line_failure(&["copy", small, &lu])
        };
        assert!(
            err.starts_with(&format!("nbd-client: {side} {lu}: ")),
            "{err}"
        );
        assert!(
            err.contains(": peer broke the protocol: reply for unknown cookie "),
            "{err}"
        );
        server.join().unwrap();
    }
    let o = example(&["bogus"]);
    assert!(!o.status.success());
}

#[test]
fn tcp_transport_and_write_via_stdin() {
    if !support::require(&["nbdkit"]) {
        return;
    }
    let peer = Peer::nbdkit_tcp(&["memory", "1M"]);
    let uri = peer.default_uri();
    assert!(uri.starts_with("nbd://"), "{uri}");
    let bin = support::example_binary("nbd-client");
    let mut child = std::process::Command::new(&bin)
        .args(["write", &uri, "4096"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"through tcp")
        .unwrap();
    assert!(child.wait().unwrap().success());
    let got = example_ok(&["read", &uri, "4096", "11"]);
    assert_eq!(got, "through tcp");
}

#[test]
fn tls_policies_against_nbdkit_requiring_tls() {
    if !support::require(&["nbdkit"]) {
        return;
    }
    let dir = TestDir::new();
    let psk = dir.join("keys.psk");
    fs::write(&psk, "alice:000102030405060708090a0b0c0d0e0f\n").unwrap();
    let psk_arg = format!("--tls-psk={}", psk.display());
    let peer = Peer::nbdkit(&["--tls=require", &psk_arg, "memory", "1M"]);
    let uri = peer.default_uri();
    // TLS off: the server's NBD_REP_ERR_TLS_REQD ends the session politely.
    let e = BlockingClient::connect(&uri).unwrap_err();
    assert!(e.to_string().contains("requires TLS"), "{e}");
    assert!(e.to_string().contains("NBD_REP_ERR_TLS_REQD"), "{e}");
    // TLS required without a connector: refused before connecting (TLS itself, with
    // certificates, is tested in client_tls.rs).
    let mut cfg = ClientConfig::default();
    cfg.tls = nbd_proto::TlsPolicy::Required;
    let e = BlockingClient::connect_with(&uri, cfg).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("no TLS connector"), "{e}");
}
