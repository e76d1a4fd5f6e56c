//! The client (through the blocking driver) against real NBD servers: qemu-nbd (extended
//! headers, dirty bitmaps, allocation depth, read-only), nbdkit (memory, `--no-sr`,
//! oldstyle, blocksize-policy, error filter) and nbd-server. Data is checked byte for byte
//! against what the server's own tools see.

mod support;

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
    let base = dir.join("base.raw");
    let top = dir.join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    let qi = |args: &[&str]| support::run_ok(&mut support::command("qemu-img", args));
    let qio = |args: &[&str]| support::run_ok(&mut support::command("qemu-io", args));
    qi(&["create", "-f", "raw", b, "64M"]);
    qio(&["-f", "raw", "-c", "write -P 0xaa 0 1M", b]);
    qi(&["create", "-f", "qcow2", "-F", "raw", "-b", b, t, "64M"]);
    qi(&["bitmap", "--add", t, "bm0"]);
    qio(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 0xbb 2M 512k",
        "-c",
        "write -z 8M 1M",
        t,
    ]);
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
    if !support::require(&["qemu-nbd", "qemu-img", "qemu-io", "nbdkit", "nbdcopy"]) {
        return;
    }
    let dir = TestDir::new();
    let file = sparse_image(&dir);
    let src = Peer::qemu_nbd(&file, &["-r", "-e", "4"]);
    let dst = Peer::nbdkit(&["memory", "64M"]);
    let (su, du) = (src.default_uri(), dst.default_uri());
    // NBD -> NBD, skipping zeroes; then compare what nbdcopy reads back.
    example_ok(&["copy", &su, &du, "--requests", "8", "--request-size", "64k"]);
    let back = dir.join("back.raw");
    support::run_ok(&mut support::command(
        "nbdcopy",
        &[&du, back.to_str().unwrap()],
    ));
    assert!(fs::read(&back).unwrap() == fs::read(&file).unwrap());
    // NBD -> file.
    let out = dir.join("out.raw");
    example_ok(&["copy", &su, out.to_str().unwrap(), "--progress"]);
    assert!(fs::read(&out).unwrap() == fs::read(&file).unwrap());
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

#[test]
fn copy_with_several_connections() {
    if !support::require(&["qemu-nbd", "qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TestDir::new();
    let file = dir.pattern_file("src.raw", 24 << 20, 31);
    let target = dir.zero_file("dst.raw", 24 << 20);
    let src = Peer::qemu_nbd(&file, &["-r", "-e", "4"]);
    let dst = Peer::qemu_nbd(&target, &["-e", "4"]);
    example_ok(&[
        "copy",
        &src.default_uri(),
        &dst.default_uri(),
        "--connections",
        "3",
        "--requests",
        "16",
    ]);
    drop(dst);
    assert!(fs::read(&target).unwrap() == fs::read(&file).unwrap());
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
    let info = example_ok(&["info", &peer.uri("ro"), "--json"]);
    assert!(info.contains("\"export-size\": 1048576"), "{info}");
    assert!(info.contains("\"read_only\": true"), "{info}");
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
}

#[test]
fn example_errors_are_one_line_and_non_zero() {
    if !support::require(&["nbdkit"]) {
        return;
    }
    let peer = Peer::nbdkit(&[
        "--filter=error",
        "memory",
        "1M",
        "error-pread=EIO",
        "error-pread-rate=100%",
    ]);
    let o = example(&["read", &peer.default_uri(), "0", "4096"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("input/output error"), "{err}");
    let o = example(&["read", "nbd+unix:///?socket=/nonexistent.sock", "0", "1"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent.sock"));
    let o = example(&["read", &peer.default_uri(), "1048576", "1"]);
    assert!(!o.status.success());
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
