//! Interop tests for the tokio examples against real peers:
//!
//! - `examples/tokio-server.rs` with `qemu-img convert` (both ways), `nbdinfo --map` and
//!   several connections at once, over Unix sockets and TCP;
//! - `examples/tokio-client.rs` (`info`, `read`, `write`, `copy`) against `nbdkit memory`
//!   and `qemu-nbd`.
//!
//! Every data check is byte for byte. Each test starts its own processes in fresh temp
//! dirs; they are stopped when the test ends, even when it fails. Missing peers make a test
//! skip (or fail with `NBD_INTEROP=required`), see `support`.

mod support;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use support::{Addr, Peer, Spawned, TestDir};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// A running `tokio-server` example, stopped on drop.
struct TokioServer {
    proc: Spawned,
    addr: Addr,
}

impl TokioServer {
    /// `tokio-server --unix DIR/nbd.sock ARGS...`.
    fn unix(args: &[&str]) -> Self {
        let dir = TestDir::named(&format!("{}-tokio", support::test_name()));
        let sock = dir.join("nbd.sock");
        let mut cmd = Command::new(support::example_binary("tokio-server"));
        cmd.arg("--unix").arg(&sock).args(args);
        let mut proc = Spawned::spawn_in(dir, &mut cmd);
        proc.wait_for_unix_socket(&sock);
        Self {
            proc,
            addr: Addr::Unix(sock),
        }
    }

    /// `tokio-server --listen 127.0.0.1:0 ARGS...`: the kernel picks the port, which the
    /// server prints (`listening on 127.0.0.1:PORT`), so nothing can race for it.
    fn tcp(args: &[&str]) -> Self {
        let mut cmd = Command::new(support::example_binary("tokio-server"));
        cmd.args(["--listen", "127.0.0.1:0"]).args(args);
        let dir = TestDir::named(&format!("{}-tokio", support::test_name()));
        let mut proc = Spawned::spawn_in(dir, &mut cmd);
        proc.wait_for_stdout("listening on ");
        let out = proc.stdout();
        let addr = out
            .lines()
            .find_map(|l| l.strip_prefix("listening on "))
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| panic!("no listening address in {out:?}"));
        let addr = Addr::Tcp(addr);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !addr.is_listening() {
            assert!(Instant::now() < deadline, "{addr} never listened");
            thread::sleep(Duration::from_millis(10));
        }
        Self { proc, addr }
    }

    fn uri(&self) -> String {
        self.addr.uri("")
    }

    /// Panics if the server logged a connection that ended in an error.
    fn assert_clean(&self) {
        let err = self.proc.stderr();
        assert!(
            !err.contains("connection ended"),
            "the server logged failed connections:\n{err}"
        );
    }
}

/// Runs `tokio-client ARGS...` and returns its stdout as bytes; panics if it fails.
fn tokio_client(args: &[&str]) -> Vec<u8> {
    let out = support::run(&mut support::command(
        support::example_binary("tokio-client")
            .to_str()
            .expect("path"),
        args,
    ));
    assert!(
        out.status.success(),
        "tokio-client {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn assert_same_file(a: &Path, b: &Path) {
    let (x, y) = (fs::read(a).unwrap(), fs::read(b).unwrap());
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} and {} differ at byte {i}", a.display(), b.display());
    }
}

/// Parses `nbdinfo --map` lines (`offset length type description`) into triples.
fn parse_map(out: &str) -> Vec<(u64, u64, u64)> {
    out.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
            ))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The tokio server against real clients
// ---------------------------------------------------------------------------------------------

/// qemu-img writes a pattern file into the server (many requests in flight), reads it back
/// into another file, and both match the original byte for byte.
#[test]
fn qemu_img_convert_both_ways_unix() {
    if !support::require(&["qemu-img"]) {
        return;
    }
    let dir = TestDir::new();
    let src = dir.pattern_file("src.img", 16 * MIB, 7);
    let server = TokioServer::unix(&["--size", "16M"]);
    let uri = server.uri();
    support::run_ok(
        support::command(
            "qemu-img",
            &["convert", "-n", "-W", "-m", "16", "-f", "raw", "-O", "raw"],
        )
        .arg(&src)
        .arg(&uri),
    );
    let back = dir.data_path("back.img");
    support::run_ok(
        support::command(
            "qemu-img",
            &["convert", "-W", "-m", "16", "-f", "raw", "-O", "raw"],
        )
        .arg(&uri)
        .arg(&back),
    );
    assert_same_file(&src, &back);
    server.assert_clean();
}

/// The same over TCP, with a sparse source: the zero regions stay holes on the server
/// (qemu-img skips them), and `nbdinfo --map` reports exactly the written 64 KiB pages as
/// data; the data read back by qemu-img is byte-identical.
#[test]
fn qemu_img_and_nbdinfo_map_tcp() {
    if !support::require(&["qemu-img", "nbdinfo"]) {
        return;
    }
    let dir = TestDir::new();
    let src = dir.zero_file("src.img", 8 * MIB);
    // Data at [1 MiB, 1 MiB + 128 KiB) and [5 MiB, 5 MiB + 64 KiB).
    let mut bytes = fs::read(&src).unwrap();
    bytes[MIB as usize..(MIB + 128 * KIB) as usize].copy_from_slice(&support::pattern(
        1,
        0,
        128 * KIB as usize,
    ));
    bytes[(5 * MIB) as usize..(5 * MIB + 64 * KIB) as usize].copy_from_slice(&support::pattern(
        2,
        0,
        64 * KIB as usize,
    ));
    fs::write(&src, &bytes).unwrap();
    let server = TokioServer::tcp(&["--size", "8M"]);
    let uri = server.uri();
    support::run_ok(
        support::command("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    let map = parse_map(&support::run_ok(&mut support::command(
        "nbdinfo",
        &["--map", &uri],
    )));
    assert_eq!(
        map,
        [
            (0, MIB, 3),
            (MIB, 128 * KIB, 0),
            (MIB + 128 * KIB, 4 * MIB - 128 * KIB, 3),
            (5 * MIB, 64 * KIB, 0),
            (5 * MIB + 64 * KIB, 3 * MIB - 64 * KIB, 3),
        ],
        "nbdinfo --map"
    );
    let back = dir.data_path("back.img");
    support::run_ok(
        support::command("qemu-img", &["convert", "-f", "raw", "-O", "raw"])
            .arg(&uri)
            .arg(&back),
    );
    assert_same_file(&src, &back);
    server.assert_clean();
}

/// Several clients at once on one server: each writes its own region, then each reads
/// every region back.
#[test]
fn many_connections_at_once() {
    if !support::require(&["qemu-img"]) {
        return;
    }
    let dir = TestDir::new();
    let server = TokioServer::unix(&["--size", "8M"]);
    let uri = server.uri();
    let parts: Vec<_> = (0..4)
        .map(|i| dir.pattern_file(&format!("part{i}"), 2 * MIB, 10 + i))
        .collect();
    thread::scope(|s| {
        for (i, part) in parts.iter().enumerate() {
            let uri = &uri;
            s.spawn(move || {
                let offset = (i as u64 * 2 * MIB).to_string();
                tokio_client(&[
                    "write",
                    uri,
                    &offset,
                    part.to_str().unwrap(),
                    "--requests",
                    "8",
                ]);
            });
        }
    });
    thread::scope(|s| {
        for (i, part) in parts.iter().enumerate() {
            let uri = &uri;
            s.spawn(move || {
                let offset = (i as u64 * 2 * MIB).to_string();
                let data = tokio_client(&["read", uri, &offset, "2M", "--request-size", "64K"]);
                assert!(data == fs::read(part).unwrap(), "region {i} differs");
            });
        }
    });
    // And a real client sees the same disk.
    let back = dir.data_path("back.img");
    support::run_ok(
        support::command("qemu-img", &["convert", "-f", "raw", "-O", "raw"])
            .arg(&uri)
            .arg(&back),
    );
    let mut expected = Vec::new();
    for part in &parts {
        expected.extend(fs::read(part).unwrap());
    }
    assert!(
        fs::read(&back).unwrap() == expected,
        "qemu-img read back other data"
    );
    server.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// The tokio client against real servers
// ---------------------------------------------------------------------------------------------

/// Against `nbdkit memory`: info, an unaligned write, reads that cross it, and a copy of
/// the whole export with many reads in flight, all checked against what was written.
#[test]
fn tokio_client_against_nbdkit_memory() {
    if !support::require(&["nbdkit"]) {
        return;
    }
    let dir = TestDir::new();
    let server = Peer::nbdkit(&["memory", "4M"]);
    let uri = server.default_uri();
    let info = String::from_utf8(tokio_client(&["info", &uri])).unwrap();
    assert!(info.contains("size: 4194304"), "{info}");

    let data = dir.pattern_file("data", 300 * KIB + 123, 3);
    let offset = 1000 * KIB + 17;
    tokio_client(&["write", &uri, &offset.to_string(), data.to_str().unwrap()]);
    let mut expected = vec![0u8; 4 * MIB as usize];
    let written = fs::read(&data).unwrap();
    expected[offset as usize..offset as usize + written.len()].copy_from_slice(&written);

    let got = tokio_client(&["read", &uri, "1000000", "500000", "--request-size", "4K"]);
    assert!(got == expected[1_000_000..1_500_000], "read differs");

    let copy = dir.data_path("copy.img");
    tokio_client(&[
        "copy",
        &uri,
        copy.to_str().unwrap(),
        "--requests",
        "32",
        "--request-size",
        "64K",
    ]);
    assert!(fs::read(&copy).unwrap() == expected, "copy differs");
}

/// Against `qemu-nbd` on a pattern file (Unix socket): copy the export and compare with
/// the file; write into it and check the file itself; read across the write.
#[test]
fn tokio_client_against_qemu_nbd() {
    if !support::require(&["qemu-nbd"]) {
        return;
    }
    let dir = TestDir::new();
    let image = dir.pattern_file("disk.img", 8 * MIB, 5);
    let server = Peer::qemu_nbd(&image, &[]);
    let uri = server.default_uri();
    let info = String::from_utf8(tokio_client(&["info", &uri])).unwrap();
    assert!(info.contains("size: 8388608"), "{info}");

    let copy = dir.data_path("copy.img");
    tokio_client(&["copy", &uri, copy.to_str().unwrap(), "--requests", "16"]);
    assert_same_file(&image, &copy);

    let data = dir.pattern_file("data", MIB + 511, 6);
    tokio_client(&["write", &uri, "3000001", data.to_str().unwrap()]);
    let mut expected = support::pattern(5, 0, 8 * MIB as usize);
    let written = fs::read(&data).unwrap();
    expected[3_000_001..3_000_001 + written.len()].copy_from_slice(&written);
    let got = tokio_client(&["read", &uri, "2900000", "1500000"]);
    assert!(got == expected[2_900_000..4_400_000], "read differs");
    drop(server);
    assert!(
        fs::read(&image).unwrap() == expected,
        "the image file differs"
    );
}

/// Against `qemu-nbd` over TCP, copying to stdout.
#[test]
fn tokio_client_copy_to_stdout_from_qemu_nbd_tcp() {
    if !support::require(&["qemu-nbd"]) {
        return;
    }
    let dir = TestDir::new();
    let image = dir.pattern_file("disk.img", 4 * MIB + 4 * KIB, 8);
    let server = Peer::qemu_nbd_tcp(&image, &["-r"]);
    let got = tokio_client(&[
        "copy",
        &server.default_uri(),
        "-",
        "--requests",
        "64",
        "--request-size",
        "32K",
    ]);
    assert!(got == fs::read(&image).unwrap(), "copy differs");
}
