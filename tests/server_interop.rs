//! Interop tests for our server (`examples/nbd-server.rs`, on `nbd_proto::blocking::server`)
//! against the real NBD clients on the machine: qemu-img, qemu-io, qemu-nbd -L, nbdinfo,
//! nbdcopy and nbdsh (libnbd).
//!
//! Every test starts its own server on a Unix socket in a fresh temp dir (or on TCP with a
//! kernel-chosen port), drives one or more clients against it, and checks what they report
//! byte for byte: sizes, flags, data read back, extent maps, dirty bitmaps and the errno of
//! every refused request. Servers are stopped (SIGTERM, then SIGKILL) when the test ends,
//! even when it fails, and each test checks that the server logged no failed connection.
//!
//! Missing peers make a test skip (or fail with `NBD_INTEROP=required`), see `support`.

mod support;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use support::{Addr, Spawned, TestDir, Trace};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Our server and the trace proxy
// ---------------------------------------------------------------------------------------------

/// A running `nbd-server` example. Declare it after any data files it serves and before
/// the clients: it is stopped on drop.
struct Server {
    proc: Spawned,
    addr: Addr,
}

impl Server {
    /// `nbd-server --unix DIR/nbd.sock --pid-file DIR/nbd.pid ARGS...`.
    fn unix(args: &[&str]) -> Server {
        let dir = TestDir::named(&format!("{}-srv", support::test_name()));
        let sock = dir.join("nbd.sock");
        let mut cmd = Command::new(support::example_binary("nbd-server"));
        cmd.arg("--unix")
            .arg(&sock)
            .arg("--pid-file")
            .arg(dir.join("nbd.pid"))
            .args(args);
        let mut proc = Spawned::spawn_in(dir, &mut cmd);
        proc.wait_for_unix_socket(&sock);
        Server {
            proc,
            addr: Addr::Unix(sock),
        }
    }

    /// `nbd-server --listen 127.0.0.1:0 ARGS...`: the kernel picks the port, which the
    /// server prints (`serving ... on 127.0.0.1:PORT; ...`), so nothing can race for it.
    fn tcp(args: &[&str]) -> Server {
        let mut cmd = Command::new(support::example_binary("nbd-server"));
        cmd.args(["--listen", "127.0.0.1:0"]).args(args);
        let mut proc = Spawned::spawn_in(
            TestDir::named(&format!("{}-srv", support::test_name())),
            &mut cmd,
        );
        proc.wait_for_stdout("try:");
        let out = proc.stdout();
        let addr = out
            .split(" on ")
            .nth(1)
            .and_then(|s| s.split(';').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("cannot find the listening address in {out:?}"));
        let addr = Addr::Tcp(addr);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !addr.is_listening() {
            assert!(Instant::now() < deadline, "{addr} never listened");
            thread::sleep(Duration::from_millis(10));
        }
        Server { proc, addr }
    }

    fn uri(&self, export: &str) -> String {
        self.addr.uri(export)
    }

    fn socket(&self) -> &Path {
        match &self.addr {
            Addr::Unix(p) => p,
            Addr::Tcp(a) => panic!("server listens on TCP {a}"),
        }
    }

    /// Panics if the server logged a connection that ended in an error (a protocol
    /// violation it detected, or an I/O error such as a client resetting the connection
    /// because it did not like a reply).
    fn assert_clean(&self) {
        let err = self.proc.stderr();
        assert!(
            !err.contains("connection ended"),
            "the server logged failed connections:\n{err}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Client helpers
// ---------------------------------------------------------------------------------------------

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `qemu-io -f raw -c CMD... URI`, which must succeed: exit status 0 and no
/// "failed" (qemu-io prints `Pattern verification failed` or `read failed: ...` and goes on
/// with the next command). Returns stdout.
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let out = qemu_io_raw(uri, cmds);
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success() && !stdout.contains("failed") && !stderr.contains("failed"),
        "qemu-io {cmds:?} {uri} failed ({}):\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}",
        out.status
    );
    stdout
}

fn qemu_io_raw(uri: &str, cmds: &[&str]) -> Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    support::run(&mut c)
}

/// Runs an nbdsh script (`nbdsh -c SCRIPT`, with `h` not yet connected) and returns stdout.
fn nbdsh_script(script: &str) -> String {
    support::run_ok(&mut support::nbdsh(&["-c", script]))
}

/// A Python string literal for `s` (URIs and paths here have no quotes or backslashes).
fn py(s: &str) -> String {
    assert!(!s.contains('\'') && !s.contains('\\'), "{s:?}");
    format!("'{s}'")
}

/// Python that runs `f()` and prints `NAME ok` or `NAME ERRNO` (e.g. `EINVAL`). With the
/// handle dead afterwards, the errno is `None`, which the caller's assertion then shows.
const PY_TRY: &str = r#"
def attempt(name, f):
    try:
        f()
        print(name, "ok")
    except nbd.Error as e:
        print(name, e.errno, "|", e.string)
"#;

/// The lines of `out` that start with `name `, without the message after `|`.
fn outcome(out: &str, name: &str) -> String {
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no line for {name} in:\n{out}"));
    line.split(" |").next().unwrap().to_string()
}

/// One range of a map: `(offset, length, value)`.
type Range = (u64, u64, u64);

/// Merges neighbours with the same value.
fn merge(ranges: impl IntoIterator<Item = Range>) -> Vec<Range> {
    let mut out: Vec<Range> = Vec::new();
    for (off, len, v) in ranges {
        if len == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.2 == v && last.0 + last.1 == off => last.1 += len,
            _ => out.push((off, len, v)),
        }
    }
    out
}

/// Parses `nbdinfo --map` output (`OFFSET LENGTH STATUS DESCRIPTION` per line), merged.
fn parse_nbdinfo_map(out: &str) -> Vec<Range> {
    merge(out.lines().filter(|l| !l.trim().is_empty()).map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let n = |i: usize| -> u64 {
            f.get(i)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad nbdinfo --map line {l:?}"))
        };
        (n(0), n(1), n(2))
    }))
}

/// `"key": VALUE` in one JSON object of qemu-img's output.
fn json_field<'a>(obj: &'a str, key: &str) -> &'a str {
    let pat = format!("\"{key}\":");
    let at = obj
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key:?} in {obj:?}"));
    obj[at + pat.len()..]
        .trim_start()
        .split([',', '}'])
        .next()
        .unwrap()
        .trim()
}

/// Parses `qemu-img map --output=json` into merged ranges with value 1 for data, 0 for
/// zero (and checks that each range is exactly one of them, as for a raw image over NBD).
fn parse_qemu_map(json: &str) -> Vec<Range> {
    merge(json.split('{').skip(1).map(|obj| {
        let num = |k: &str| -> u64 {
            json_field(obj, k)
                .parse()
                .unwrap_or_else(|_| panic!("bad {k:?} in {obj:?}"))
        };
        let data = json_field(obj, "data") == "true";
        let zero = json_field(obj, "zero") == "true";
        assert_ne!(data, zero, "range is neither/both data and zero: {obj:?}");
        (num("start"), num("length"), u64::from(data))
    }))
}

/// The full map of an export of `size` bytes where the (possibly overlapping) `set`
/// ranges have value `on` and the rest `off`.
fn expected_map(size: u64, set: &[(u64, u64)], on: u64, off: u64) -> Vec<Range> {
    let mut set = set.to_vec();
    set.sort();
    let mut out = Vec::new();
    let mut at = 0;
    for (o, l) in set {
        let end = o + l;
        if end <= at {
            continue;
        }
        let start = o.max(at);
        out.push((at, start - at, off));
        out.push((start, end - start, on));
        at = end;
    }
    assert!(at <= size, "range past the end");
    out.push((at, size - at, off));
    merge(out)
}

/// `ranges` widened to whole blocks of `g` bytes.
fn round_to(ranges: &[(u64, u64)], g: u64) -> Vec<(u64, u64)> {
    ranges
        .iter()
        .map(|&(o, l)| {
            let start = o / g * g;
            let end = (o + l).div_ceil(g) * g;
            (start, end - start)
        })
        .collect()
}

fn require(tools: &[&str]) -> bool {
    support::require(tools)
}

// ---------------------------------------------------------------------------------------------
// qemu-img / qemu-io
// ---------------------------------------------------------------------------------------------

/// `qemu-img info` sees the size; its `--trace 'nbd_*'` shows that it negotiated extended
/// headers with our server and the flags it got.
#[test]
fn qemu_img_info_negotiates_extended_headers() {
    if !require(&["qemu-img"]) {
        return;
    }
    let srv = Server::unix(&["--memory", "64M"]);
    let out = support::run(Command::new("qemu-img").args([
        "--trace",
        "nbd_*",
        "info",
        "-f",
        "raw",
        &srv.uri(""),
    ]));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("virtual size: 64 MiB (67108864 bytes)"),
        "{stdout}"
    );
    for needle in [
        "Sending option request 11 (extended headers)",
        "Received option reply 11 (extended headers), type 1 (ack)",
        "Received set meta context mapping of base:allocation to id 0",
        // HAS_FLAGS FLUSH FUA TRIM WRITE_ZEROES DF MULTI_CONN CACHE FAST_ZERO
        // BLOCK_STATUS_PAYLOAD: everything the memory backend offers.
        "Size is 67108864, export flags 0x1ded",
        "Export is ready after go request",
    ] {
        assert!(
            stderr.contains(needle),
            "no {needle:?} in the trace:\n{stderr}"
        );
    }
    srv.assert_clean();
}

/// With `--no-extended-headers` qemu-img falls back to structured replies, over TCP.
#[test]
fn qemu_img_info_falls_back_without_extended_headers_tcp() {
    if !require(&["qemu-img"]) {
        return;
    }
    let srv = Server::tcp(&["--memory", "3M", "--no-extended-headers"]);
    let out = support::run(Command::new("qemu-img").args([
        "--trace",
        "nbd_*",
        "info",
        "-f",
        "raw",
        &srv.uri(""),
    ]));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("(3145728 bytes)"), "{stdout}");
    // 2^31 + 1 = NBD_REP_ERR_UNSUP, then option 8 (structured reply) is acknowledged.
    assert!(
        stderr.contains("Received option reply 11 (extended headers), type 2147483649"),
        "{stderr}"
    );
    assert!(
        stderr.contains("Received option reply 8 (structured reply), type 1 (ack)"),
        "{stderr}"
    );
    // No BLOCK_STATUS_PAYLOAD (0x1000) without extended headers.
    assert!(stderr.contains("export flags 0xded"), "{stderr}");
    srv.assert_clean();
}

/// `qemu-img convert` a pattern file into the export and back out, and `qemu-img compare`
/// the export with the file (identical, then different after a one-byte write).
#[test]
fn qemu_img_convert_both_ways_and_compare() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    const SIZE: u64 = 16 * MIB;
    let dir = TestDir::new();
    let src = dir.pattern_file("src.raw", SIZE, 7);
    let dst = dir.data_path("dst.raw");
    let srv = Server::unix(&["--memory", "16M"]);
    let uri = srv.uri("");
    support::run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    support::run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &uri])
            .arg(&dst),
    );
    let (a, b) = (fs::read(&src).unwrap(), fs::read(&dst).unwrap());
    assert_eq!(b.len() as u64, SIZE);
    assert!(a == b, "data read back differs from what was written");

    let out = support::run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    assert!(out.contains("Images are identical."), "{out}");

    // Flip one byte in the export: compare finds it (at sector granularity).
    let at = 5 * MIB + 12345;
    let old = a[at as usize];
    qemu_io(&uri, &[&format!("write -P {} {at} 1", old ^ 0xff)]);
    let out = support::run(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("Content mismatch at offset {}!", at / 512 * 512)),
        "{stdout}"
    );
    srv.assert_clean();
}

/// `qemu-img map --output=json` on a sparse `--file` export reports exactly the ranges
/// written with dd as data and everything else as zero; `nbdinfo --map` agrees.
#[test]
fn qemu_img_map_sparse_file_export() {
    if !require(&["qemu-img", "nbdinfo", "dd", "truncate"]) {
        return;
    }
    const SIZE: u64 = 40 * MIB;
    let dir = TestDir::new();
    let file = dir.data_path("sparse.raw");
    support::run_ok(
        Command::new("truncate")
            .arg("-s")
            .arg(SIZE.to_string())
            .arg(&file),
    );
    // MiB-aligned ranges, so the file system's allocation granularity does not matter.
    let written = [(2 * MIB, 3 * MIB), (20 * MIB, MIB), (SIZE - MIB, MIB)];
    for (off, len) in written {
        support::run_ok(
            Command::new("dd")
                .arg("if=/dev/urandom")
                .arg(format!("of={}", file.display()))
                .args(["bs=1M", "conv=notrunc", "status=none"])
                .arg(format!("seek={}", off / MIB))
                .arg(format!("count={}", len / MIB)),
        );
    }
    let srv = Server::unix(&["--file", file.to_str().unwrap()]);
    let uri = srv.uri("");
    let json =
        support::run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    let expect = expected_map(SIZE, &written, 1, 0);
    assert_eq!(parse_qemu_map(&json), expect, "qemu-img map:\n{json}");

    // base:allocation: 0 = data, 3 = hole|zero.
    let map = support::run_ok(Command::new("nbdinfo").args(["--map", &uri]));
    assert_eq!(
        parse_nbdinfo_map(&map),
        expected_map(SIZE, &written, 0, 3),
        "nbdinfo --map:\n{map}"
    );

    // Punching a hole through the export (qemu-io discard) shows in the file and the map.
    qemu_io(&uri, &["discard 2M 1M"]);
    let json =
        support::run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    let written2 = [(3 * MIB, 2 * MIB), (20 * MIB, MIB), (SIZE - MIB, MIB)];
    assert_eq!(
        parse_qemu_map(&json),
        expected_map(SIZE, &written2, 1, 0),
        "after discard:\n{json}"
    );
    srv.assert_clean();
}

/// qemu-io patterns on a memory export: write/read patterns, discard, write -z (with and
/// without unmap), and zeroes read back from the discarded and zeroed ranges. A pattern
/// that does not match must be reported, so the checks cannot pass vacuously.
#[test]
fn qemu_io_write_read_discard_zero() {
    if !require(&["qemu-io", "qemu-img"]) {
        return;
    }
    let srv = Server::unix(&["--memory", "32M"]);
    let uri = srv.uri("");
    qemu_io(
        &uri,
        &[
            "write -P 0xab 1M 3M",
            "read -P 0xab 1M 3M",
            "write -P 0xcd 10M 1M",
            "write -P 0xee 31M 1M",
            // Unaligned pieces inside the pattern.
            "write -P 0x11 1500000 777",
            "read -P 0x11 1500000 777",
            "read -P 0xab 1M 451424",
            "read -P 0xab 1500777 2693527",
        ],
    );
    qemu_io(
        &uri,
        &[
            "discard 1M 1M",
            "write -z 10M 512k",
            "write -z -u 10752k 512k",
            "read -P 0 1M 1M",
            "read -P 0 10M 1M",
            "read -P 0xab 2M 451424",
            "read -P 0xee 31M 1M",
        ],
    );
    // The checks do detect a wrong pattern.
    let out = qemu_io_raw(&uri, &["read -P 0xab 10M 4k"]);
    let (stdout, stderr) = text(&out);
    assert!(
        !out.status.success() && stdout.contains("Pattern verification failed"),
        "expected a pattern failure ({}):\n{stdout}{stderr}",
        out.status
    );

    // The map: the discarded MiB and the unmapped zeroes are holes (64 KiB pages), the
    // NO_HOLE zeroes stay allocated data.
    let json =
        support::run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    let data = [(2 * MIB, 2 * MIB), (10 * MIB, 512 * KIB), (31 * MIB, MIB)];
    assert_eq!(
        parse_qemu_map(&json),
        expected_map(32 * MIB, &data, 1, 0),
        "{json}"
    );
    srv.assert_clean();
}

/// A `--block-size 4096:4096:1M` export: qemu honours the constraints (unaligned writes
/// become read-modify-write) and the data is right.
#[test]
fn qemu_io_block_size_constrained_export() {
    if !require(&["qemu-io"]) {
        return;
    }
    let srv = Server::unix(&["--memory", "8M", "--block-size", "4096:4096:1M"]);
    let uri = srv.uri("");
    qemu_io(
        &uri,
        &[
            "write -P 0x5a 0 3M",
            "write -P 0xa5 513 1000",
            "read -P 0x5a 0 513",
            "read -P 0xa5 513 1000",
            "read -P 0x5a 1513 3144215",
        ],
    );
    srv.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// nbdinfo / qemu-nbd -L
// ---------------------------------------------------------------------------------------------

const MULTI: &[&str] = &[
    "--export",
    "alpha",
    "--memory",
    "64M",
    "--description",
    "first export",
    "--export",
    "beta",
    "--memory",
    "16M",
    "--read-only",
    "--description",
    "second one",
    "--dirty-bitmap",
    "bm",
    "--export",
    "gamma",
    "--memory",
    "8M",
    "--block-size",
    "4096:4096:1M",
];

/// `nbdinfo --list` shows every export with its description, size, flags, contexts and
/// block sizes.
#[test]
fn nbdinfo_list_several_exports() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let srv = Server::unix(MULTI);
    let out = support::run_ok(Command::new("nbdinfo").args(["--list", &srv.uri("")]));
    assert!(
        out.contains("protocol: newstyle-fixed without TLS, using structured packets"),
        "{out}"
    );
    let sections: Vec<&str> = out.split("export=").skip(1).collect();
    assert_eq!(sections.len(), 3, "{out}");
    let (a, b, c) = (sections[0], sections[1], sections[2]);
    assert!(a.starts_with("\"alpha\":"), "{a}");
    assert!(a.contains("description: first export"), "{a}");
    assert!(a.contains("export-size: 67108864 (64M)"), "{a}");
    assert!(a.contains("is_read_only: false"), "{a}");
    assert!(a.contains("can_multi_conn: true"), "{a}");
    assert!(!a.contains("block_size_minimum"), "{a}");
    assert!(b.starts_with("\"beta\":"), "{b}");
    assert!(b.contains("description: second one"), "{b}");
    assert!(b.contains("export-size: 16777216 (16M)"), "{b}");
    assert!(b.contains("is_read_only: true"), "{b}");
    assert!(
        b.contains("\t\tbase:allocation\n\t\tqemu:dirty-bitmap:bm\n"),
        "{b}"
    );
    assert!(c.starts_with("\"gamma\":"), "{c}");
    assert!(!c.contains("description"), "{c}");
    assert!(c.contains("export-size: 8388608 (8M)"), "{c}");
    assert!(c.contains("block_size_minimum: 4096"), "{c}");
    assert!(c.contains("block_size_preferred: 4096"), "{c}");
    assert!(c.contains("block_size_maximum: 1048576"), "{c}");

    // nbdinfo asks for an export that does not exist: a clean error.
    let out = support::run(Command::new("nbdinfo").arg(srv.uri("nope")));
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("server replied with error to opt_go request"),
        "{stderr}"
    );
    srv.assert_clean();
}

/// qemu's own listing (`qemu-nbd -L`), which uses extended headers.
#[test]
fn qemu_nbd_list_several_exports() {
    if !require(&["qemu-nbd"]) {
        return;
    }
    let srv = Server::unix(MULTI);
    let out = support::run_ok(
        Command::new("qemu-nbd")
            .arg("-L")
            .arg("-k")
            .arg(srv.socket()),
    );
    assert!(out.contains("exports available: 3"), "{out}");
    for needle in [
        " export: 'alpha'\n  description: first export\n  size:  67108864\n  flags: 0xded ( flush fua trim zeroes df multi cache fast-zero )\n  transaction size: 64-bit\n  available meta contexts: 1\n   base:allocation\n",
        " export: 'beta'\n  description: second one\n  size:  16777216\n",
        "  available meta contexts: 2\n   base:allocation\n   qemu:dirty-bitmap:bm\n",
        " export: 'gamma'\n  size:  8388608\n  flags: 0xded ( flush fua trim zeroes df multi cache fast-zero )\n  min block: 4096\n  opt block: 4096\n  max block: 1048576\n",
    ] {
        assert!(out.contains(needle), "no {needle:?} in:\n{out}");
    }
    srv.assert_clean();
}

/// `nbdinfo --json` and the single-fact options.
#[test]
fn nbdinfo_json_and_can() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let srv = Server::unix(&["--memory", "64M", "--description", "json test"]);
    let uri = srv.uri("");
    let out = support::run_ok(Command::new("nbdinfo").args(["--json", &uri]));
    for needle in [
        "\"protocol\": \"newstyle-fixed\"",
        "\"TLS\": false",
        "\"structured\": true",
        "\"export-name\": \"\"",
        "\"description\": \"json test\"",
        "\"export-size\": 67108864",
        "\"is_read_only\": false",
        "\"can_multi_conn\": true",
        "\"can_fast_zero\": true",
        "\"can_trim\": true",
        "\"can_zero\": true",
        "\"can_df\": true",
        "\"base:allocation\"",
    ] {
        assert!(out.contains(needle), "no {needle} in:\n{out}");
    }
    assert_eq!(
        support::run_ok(Command::new("nbdinfo").args(["--size", &uri])).trim(),
        "67108864"
    );
    // --can / --is: exit 0 = true, 2 = false.
    let code = |args: &[&str]| {
        support::run(Command::new("nbdinfo").args(args).arg(&uri))
            .status
            .code()
    };
    assert_eq!(code(&["--can", "multi-conn"]), Some(0));
    assert_eq!(code(&["--can", "fast-zero"]), Some(0));
    assert_eq!(code(&["--is", "read-only"]), Some(2));
    assert_eq!(code(&["--can", "trim"]), Some(0));
    srv.assert_clean();
}

/// `nbdinfo --map` after qemu-io writes, trims and zeroes on a memory export (64 KiB
/// pages), and `--map --totals`.
#[test]
fn nbdinfo_map_memory_export() {
    if !require(&["nbdinfo", "qemu-io"]) {
        return;
    }
    let srv = Server::unix(&["--memory", "64M"]);
    let uri = srv.uri("");
    let map = support::run_ok(Command::new("nbdinfo").args(["--map", &uri]));
    assert_eq!(parse_nbdinfo_map(&map), vec![(0, 64 * MIB, 3)], "{map}");
    qemu_io(
        &uri,
        &[
            "write -P 1 1M 1M",
            "write -P 2 5000000 100",
            "write -P 3 63M 1M",
            "discard 63M 512k",
        ],
    );
    let map = support::run_ok(Command::new("nbdinfo").args(["--map", &uri]));
    let data = round_to(
        &[
            (MIB, MIB),
            (5_000_000, 100),
            (63 * MIB + 512 * KIB, 512 * KIB),
        ],
        64 * KIB,
    );
    assert_eq!(
        parse_nbdinfo_map(&map),
        expected_map(64 * MIB, &data, 0, 3),
        "{map}"
    );
    let totals = support::run_ok(Command::new("nbdinfo").args(["--map", "--totals", &uri]));
    let data_bytes: u64 = data.iter().map(|d| d.1).sum();
    assert!(
        totals.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&data_bytes.to_string().as_str()) && f.get(2) == Some(&"0")
        }),
        "expected {data_bytes} bytes of data in:\n{totals}"
    );
    srv.assert_clean();
}

fn dirty_bitmap_case(granularity: u64) {
    let g = granularity.to_string();
    let srv = Server::unix(&[
        "--memory",
        "32M",
        "--dirty-bitmap",
        "bm",
        "--granularity",
        &g,
    ]);
    let uri = srv.uri("");
    let map_arg = "--map=qemu:dirty-bitmap:bm";
    let map = support::run_ok(Command::new("nbdinfo").args([map_arg, &uri]));
    assert_eq!(
        parse_nbdinfo_map(&map),
        vec![(0, 32 * MIB, 0)],
        "clean at start:\n{map}"
    );
    assert!(map.contains("clean"), "{map}");

    // Writes, a discard and zeroes, deliberately unaligned; reads do not dirty anything.
    let touched = [
        (MIB, 512 * KIB),
        (3 * MIB + 100, 10),
        (8 * MIB - 1, 2),
        (12 * MIB, 256 * KIB),
        (20 * MIB + 4096, 8192),
        (32 * MIB - 4096, 4096),
    ];
    qemu_io(
        &uri,
        &[
            "write -P 0x33 1M 512k",
            "write -P 0x34 3145828 10",
            "write -P 0x35 8388607 2",
            "discard 12M 256k",
            "write -z 20975616 8192",
            "write -P 0x36 33550336 4096",
            "read 16M 1M",
        ],
    );
    let map = support::run_ok(Command::new("nbdinfo").args([map_arg, &uri]));
    let expect = expected_map(32 * MIB, &round_to(&touched, granularity), 1, 0);
    assert_eq!(
        parse_nbdinfo_map(&map),
        expect,
        "granularity {granularity}:\n{map}"
    );
    for l in map.lines() {
        let dirty = l.split_whitespace().nth(2) == Some("1");
        assert!(l.ends_with(if dirty { "dirty" } else { "clean" }), "{l:?}");
    }
    // base:allocation is still served beside the bitmap.
    let alloc = support::run_ok(Command::new("nbdinfo").args(["--map", &uri]));
    assert!(
        parse_nbdinfo_map(&alloc).iter().any(|r| r.2 == 0),
        "{alloc}"
    );
    srv.assert_clean();
}

/// `nbdinfo --map=qemu:dirty-bitmap:bm` reports exactly the ranges qemu-io wrote, widened
/// to the bitmap granularity (64 KiB default).
#[test]
fn nbdinfo_dirty_bitmap_64k() {
    if !require(&["nbdinfo", "qemu-io"]) {
        return;
    }
    dirty_bitmap_case(64 * KIB);
}

/// The same with a 4 KiB granularity.
#[test]
fn nbdinfo_dirty_bitmap_4k() {
    if !require(&["nbdinfo", "qemu-io"]) {
        return;
    }
    dirty_bitmap_case(4 * KIB);
}

/// QEMU reads the dirty bitmap the way incremental backup does (`x-dirty-bitmap`): it
/// selects `qemu:dirty-bitmap:bm` (context ID 1) and shows dirty blocks as not present.
#[test]
fn qemu_reads_dirty_bitmap() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let srv = Server::unix(&["--memory", "8M", "--dirty-bitmap", "bm"]);
    qemu_io(&srv.uri(""), &["write -P 1 1M 100k", "write -P 2 5M 1"]);
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:bm",
        srv.socket().display()
    );
    let out = support::run(Command::new("qemu-img").args([
        "--trace",
        "nbd_opt_meta_reply",
        "map",
        "--output=json",
        "--image-opts",
        &opts,
    ]));
    let (json, stderr) = text(&out);
    assert!(out.status.success(), "{json}\n{stderr}");
    assert!(
        stderr.contains("Received set meta context mapping of qemu:dirty-bitmap:bm to id 1"),
        "{stderr}"
    );
    // With x-dirty-bitmap, qemu reports dirty blocks as "data": false.
    let dirty: Vec<Range> = merge(json.split('{').skip(1).map(|obj| {
        let num = |k: &str| json_field(obj, k).parse::<u64>().unwrap();
        (
            num("start"),
            num("length"),
            u64::from(json_field(obj, "data") == "false"),
        )
    }));
    assert_eq!(
        dirty,
        expected_map(8 * MIB, &[(MIB, 128 * KIB), (5 * MIB, 64 * KIB)], 1, 0),
        "{json}"
    );
    srv.assert_clean();
}

/// 16384 alternating extents (a 4 KiB-granularity bitmap with every other block dirty)
/// do not fit one block-status reply: the server sends as many as fit its buffer, libnbd
/// asks again from where the reply ended, and `nbdinfo --map` still shows every extent.
#[test]
fn many_extents_span_several_block_status_replies() {
    if !require(&["nbdinfo", "nbdsh"]) {
        return;
    }
    let srv = Server::unix(&[
        "--memory",
        "64M",
        "--dirty-bitmap",
        "bm",
        "--granularity",
        "4K",
    ]);
    let mut trace = Trace::start(&Addr::Unix(srv.socket().to_path_buf()));
    let uri = trace.uri("");
    let script = format!(
        r#"
h.connect_uri({uri})
b = b"\x01" * 4096
for i in range(0, 64 << 20, 8192):
    h.aio_pwrite(b, i)
    if h.aio_in_flight() > 32:
        h.poll(-1)
while h.aio_in_flight() > 0:
    h.poll(-1)
print("written")
"#,
        uri = py(&uri)
    );
    assert!(nbdsh_script(&script).contains("written"));
    let map = support::run_ok(Command::new("nbdinfo").args(["--map=qemu:dirty-bitmap:bm", &uri]));
    let got = parse_nbdinfo_map(&map);
    let want: Vec<(u64, u64)> = (0..8192).map(|i| (i * 8192, 4096)).collect();
    assert_eq!(got.len(), 16384);
    assert!(
        got == expected_map(64 * MIB, &want, 1, 0),
        "wrong map:\n{map}"
    );
    let log = trace.settle();
    let requests = log.matches("C->S NBD_CMD_BLOCK_STATUS").count();
    assert!(
        requests >= 2,
        "expected the map to take several requests:\n{log}"
    );
    assert!(!log.contains("decode error"), "{log}");
    srv.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// nbdcopy
// ---------------------------------------------------------------------------------------------

/// nbdcopy file -> server -> file, over Unix and over TCP.
#[test]
fn nbdcopy_both_ways() {
    if !require(&["nbdcopy"]) {
        return;
    }
    const SIZE: u64 = 12 * MIB + 4097; // not a multiple of anything
    let dir = TestDir::new();
    let src = dir.pattern_file("src.raw", SIZE, 11);
    let unix = Server::unix(&["--memory", &SIZE.to_string()]);
    let tcp = Server::tcp(&["--memory", &SIZE.to_string()]);
    for (i, srv) in [&unix, &tcp].into_iter().enumerate() {
        let dst = dir.data_path(format!("dst{i}.raw"));
        support::run_ok(Command::new("nbdcopy").arg(&src).arg(srv.uri("")));
        support::run_ok(Command::new("nbdcopy").arg(srv.uri("")).arg(&dst));
        assert!(
            fs::read(&src).unwrap() == fs::read(&dst).unwrap(),
            "{} differs",
            dst.display()
        );
        srv.assert_clean();
    }
}

/// `nbdcopy --connections 2`: the server advertises CAN_MULTI_CONN, so nbdcopy opens two
/// connections each way (counted through the trace proxy), and the data survives. The
/// source is sparse and larger than nbdcopy's 128 MiB work unit, so the holes are copied
/// as zeroes and skipped on the way back (block status).
#[test]
fn nbdcopy_two_connections() {
    if !require(&["nbdcopy", "nbdinfo", "truncate", "dd"]) {
        return;
    }
    const SIZE: u64 = 144 * MIB;
    let dir = TestDir::new();
    let src = dir.data_path("src.raw");
    let dst = dir.data_path("dst.raw");
    support::run_ok(
        Command::new("truncate")
            .arg("-s")
            .arg(SIZE.to_string())
            .arg(&src),
    );
    for seek in ["0", "130"] {
        support::run_ok(
            Command::new("dd")
                .arg("if=/dev/urandom")
                .arg(format!("of={}", src.display()))
                .args(["bs=1M", "count=4", "conv=notrunc", "status=none"])
                .arg(format!("seek={seek}")),
        );
    }
    let srv = Server::unix(&["--memory", "144M"]);
    assert_eq!(
        support::run(Command::new("nbdinfo").args(["--can", "multi-conn", &srv.uri("")]))
            .status
            .code(),
        Some(0)
    );
    let mut trace = Trace::start(&Addr::Unix(srv.socket().to_path_buf()));
    support::run_ok(
        Command::new("nbdcopy")
            .args(["--connections", "2"])
            .arg(&src)
            .arg(trace.uri("")),
    );
    support::run_ok(
        Command::new("nbdcopy")
            .args(["--connections", "2"])
            .arg(trace.uri(""))
            .arg(&dst),
    );
    assert!(
        fs::read(&src).unwrap() == fs::read(&dst).unwrap(),
        "data differs"
    );
    let log = trace.settle();
    assert_eq!(log.matches("] accepted ").count(), 4, "{log}");
    assert_eq!(log.matches("C->S NBD_OPT_GO").count(), 4, "{log}");
    assert!(log.contains("NBD_CMD_WRITE"), "{log}");
    assert!(log.contains("NBD_CMD_BLOCK_STATUS"), "{log}");
    assert!(!log.contains("decode error"), "{log}");
    srv.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// nbdsh: edge requests and their errno
// ---------------------------------------------------------------------------------------------

/// Out-of-range requests with libnbd's client-side checks off: read, trim, cache and block
/// status past the end get EINVAL, writes and write-zeroes past the end ENOSPC, and the
/// connection stays usable.
#[test]
fn nbdsh_past_the_end() {
    if !require(&["nbdsh"]) {
        return;
    }
    let srv = Server::unix(&["--memory", "4M"]);
    let script = format!(
        r#"{PY_TRY}
h.add_meta_context("base:allocation")
h.connect_uri({uri})
h.set_strict_mode(0)
size = h.get_size()
attempt("read", lambda: h.pread(512, size - 256))
attempt("read_at_end", lambda: h.pread(1, size))
attempt("write", lambda: h.pwrite(b"x" * 512, size - 256))
attempt("zero", lambda: h.zero(4096, size))
attempt("trim", lambda: h.trim(8192, size - 4096))
attempt("cache", lambda: h.cache(8192, size - 4096))
attempt("block_status", lambda: h.block_status(4096, size, lambda *a: 0))
attempt("read_last", lambda: h.pread(512, size - 512))
h.pwrite(b"y" * 512, size - 512)
assert h.pread(512, size - 512) == b"y" * 512
print("alive")
"#,
        uri = py(&srv.uri(""))
    );
    let out = nbdsh_script(&script);
    for (name, want) in [
        ("read", "EINVAL"),
        ("read_at_end", "EINVAL"),
        ("write", "ENOSPC"),
        ("zero", "ENOSPC"),
        ("trim", "EINVAL"),
        ("cache", "EINVAL"),
        ("block_status", "EINVAL"),
        ("read_last", "ok"),
    ] {
        assert_eq!(outcome(&out, name), format!("{name} {want}"), "{out}");
    }
    assert!(out.contains("alive"), "{out}");
    srv.assert_clean();
}

/// Writes, trims and zeroes on a `--read-only` export: EPERM; reads work.
#[test]
fn nbdsh_read_only_export() {
    if !require(&["nbdsh"]) {
        return;
    }
    let srv = Server::unix(&["--memory", "4M", "--read-only"]);
    let script = format!(
        r#"{PY_TRY}
h.connect_uri({uri})
print("read_only", h.is_read_only())
h.set_strict_mode(0)
attempt("write", lambda: h.pwrite(b"x" * 4096, 0))
attempt("write_fua", lambda: h.pwrite(b"x" * 512, 4096, nbd.CMD_FLAG_FUA))
attempt("trim", lambda: h.trim(65536, 0))
attempt("zero", lambda: h.zero(65536, 0))
attempt("flush", lambda: h.flush())
attempt("read", lambda: h.pread(4096, 0))
assert h.pread(4096, 0) == bytes(4096)
"#,
        uri = py(&srv.uri(""))
    );
    let out = nbdsh_script(&script);
    assert!(out.contains("read_only True"), "{out}");
    for (name, want) in [
        ("write", "EPERM"),
        ("write_fua", "EPERM"),
        ("trim", "EPERM"),
        ("zero", "EPERM"),
        ("flush", "ok"),
        ("read", "ok"),
    ] {
        assert_eq!(outcome(&out, name), format!("{name} {want}"), "{out}");
    }
    srv.assert_clean();
}

/// BLOCK_STATUS with REQ_ONE: exactly one extent per selected context, starting at the
/// request offset and no longer than the request; without REQ_ONE the extents cover the
/// request. Without a selected context: EINVAL.
#[test]
fn nbdsh_block_status_req_one() {
    if !require(&["nbdsh"]) {
        return;
    }
    let srv = Server::unix(&["--memory", "16M", "--dirty-bitmap", "bm"]);
    let uri = py(&srv.uri(""));
    let script = format!(
        r#"
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:dirty-bitmap:bm")
h.connect_uri({uri})
h.pwrite(b"z" * 65536, 1 << 20)
h.pwrite(b"z" * 65536, 3 << 20)
def run(name, length, offset, flags=0):
    seen = []
    def cb(ctx, off, entries, err):
        seen.append((ctx, off, list(entries)))
        return 0
    h.block_status(length, offset, cb, flags)
    for ctx, off, e in sorted(seen):
        print(name, ctx, off, e)
run("one", 8 << 20, 0, nbd.CMD_FLAG_REQ_ONE)
run("one_mid", 4096, (1 << 20) + 100, nbd.CMD_FLAG_REQ_ONE)
run("one_at_data", 8 << 20, 1 << 20, nbd.CMD_FLAG_REQ_ONE)
run("all", 4 << 20, 0)
"#
    );
    let out = nbdsh_script(&script);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "one base:allocation 0 [1048576, 3]",
            "one qemu:dirty-bitmap:bm 0 [1048576, 0]",
            "one_mid base:allocation 1048676 [4096, 0]",
            "one_mid qemu:dirty-bitmap:bm 1048676 [4096, 1]",
            "one_at_data base:allocation 1048576 [65536, 0]",
            "one_at_data qemu:dirty-bitmap:bm 1048576 [65536, 1]",
            "all base:allocation 0 [1048576, 3, 65536, 0, 2031616, 3, 65536, 0, 983040, 3]",
            "all qemu:dirty-bitmap:bm 0 [1048576, 0, 65536, 1, 2031616, 0, 65536, 1, 983040, 0]",
        ],
        "{out}"
    );

    // No context negotiated: the server refuses block status with EINVAL.
    let script = format!(
        r#"{PY_TRY}
h.connect_uri({uri})
h.set_strict_mode(0)
attempt("no_context", lambda: h.block_status(4096, 0, lambda *a: 0))
print(len(h.pread(10, 0)))
"#
    );
    let out = nbdsh_script(&script);
    assert_eq!(outcome(&out, "no_context"), "no_context EINVAL", "{out}");
    srv.assert_clean();
}

/// FAST_ZERO: what the server advertises and what it does must agree. A memory export
/// advertises it and zeroes fast; a `--file` export (tmpfs) does not advertise it, so the
/// flag is refused with EINVAL (libnbd refuses it client-side too); plain zeroing works.
#[test]
fn nbdsh_fast_zero() {
    if !require(&["nbdsh"]) {
        return;
    }
    let dir = TestDir::new();
    let file = dir.pattern_file("f.raw", 4 * MIB, 3);
    let mem = Server::unix(&["--memory", "4M"]);
    let fil = Server::unix(&["--file", file.to_str().unwrap()]);
    let script = |uri: &str| {
        format!(
            r#"{PY_TRY}
h.connect_uri({uri})
fast = h.can_fast_zero()
print("can_fast_zero", fast, h.can_zero())
h.pwrite(b"q" * 131072, 0)
attempt("strict", lambda: h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO))
h.set_strict_mode(0)
attempt("fast", lambda: h.zero(65536, 65536, nbd.CMD_FLAG_FAST_ZERO))
attempt("fast_nohole", lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE))
attempt("plain", lambda: h.zero(65536, 1 << 20))
attempt("nohole", lambda: h.zero(65536, 2 << 20, nbd.CMD_FLAG_NO_HOLE))
print("plain_zeroed", h.pread(65536, 1 << 20) == bytes(65536))
print("nohole_zeroed", h.pread(65536, 2 << 20) == bytes(65536))
print("fast_zeroed", h.pread(65536, 65536) == bytes(65536))
"#,
            uri = py(uri)
        )
    };
    let out = nbdsh_script(&script(&mem.uri("")));
    assert!(out.contains("can_fast_zero True True"), "{out}");
    for (name, want) in [
        ("strict", "ok"),
        ("fast", "ok"),
        ("plain", "ok"),
        ("nohole", "ok"),
    ] {
        assert_eq!(
            outcome(&out, name),
            format!("{name} {want}"),
            "memory:\n{out}"
        );
    }
    // Allocated zeroes on memory are a memset: fast or ENOTSUP are both allowed.
    let fnh = outcome(&out, "fast_nohole");
    assert!(
        fnh == "fast_nohole ok" || fnh == "fast_nohole ENOTSUP",
        "{out}"
    );
    assert!(out.contains("fast_zeroed True"), "{out}");
    assert!(
        out.contains("plain_zeroed True") && out.contains("nohole_zeroed True"),
        "{out}"
    );

    let out = nbdsh_script(&script(&fil.uri("")));
    let advertised = out.contains("can_fast_zero True True");
    assert!(
        advertised || out.contains("can_fast_zero False True"),
        "{out}"
    );
    if advertised {
        // Hole punching on tmpfs is fast.
        assert_eq!(outcome(&out, "fast"), "fast ok", "{out}");
        assert!(out.contains("fast_zeroed True"), "{out}");
        // Allocated zeroes are not faster than a write.
        assert_eq!(outcome(&out, "fast_nohole"), "fast_nohole ENOTSUP", "{out}");
    } else {
        // libnbd refuses the unadvertised flag itself; the server refuses it with EINVAL.
        assert_eq!(outcome(&out, "strict"), "strict EINVAL", "{out}");
        assert_eq!(outcome(&out, "fast"), "fast EINVAL", "{out}");
        assert!(
            out.contains("fast_zeroed False"),
            "refused zeroing changed data:\n{out}"
        );
    }
    assert_eq!(outcome(&out, "plain"), "plain ok", "{out}");
    assert_eq!(outcome(&out, "nohole"), "nohole ok", "{out}");
    assert!(
        out.contains("plain_zeroed True") && out.contains("nohole_zeroed True"),
        "{out}"
    );
    fil.assert_clean();
    drop(fil);
    // The zeroing reached the file.
    let data = fs::read(&file).unwrap();
    assert!(data[MIB as usize..(MIB + 65536) as usize]
        .iter()
        .all(|b| *b == 0));
    assert_eq!(
        data[(MIB + 65536) as usize..(MIB + 65540) as usize],
        support::pattern(3, MIB + 65536, 4)[..]
    );
    mem.assert_clean();
}

/// `--block-size 4096:4096:1M`: libnbd sees the advertised sizes; misaligned requests get
/// EINVAL, reads over the maximum EOVERFLOW; aligned I/O works.
#[test]
fn nbdsh_block_size_constraints() {
    if !require(&["nbdsh"]) {
        return;
    }
    let srv = Server::unix(&["--memory", "8M", "--block-size", "4096:4096:1M"]);
    let script = format!(
        r#"{PY_TRY}
h.connect_uri({uri})
print("sizes", h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED), h.get_block_size(nbd.SIZE_MAXIMUM))
h.set_strict_mode(0)
attempt("read_len", lambda: h.pread(512, 0))
attempt("read_off", lambda: h.pread(4096, 512))
attempt("write_small", lambda: h.pwrite(b"x" * 512, 0))
attempt("write_off", lambda: h.pwrite(b"x" * 4096, 100))
attempt("trim_len", lambda: h.trim(100, 0))
attempt("zero_off", lambda: h.zero(4096, 2048))
attempt("read_big", lambda: h.pread(2 << 20, 0))
attempt("read_max", lambda: h.pread(1 << 20, 0))
attempt("write_ok", lambda: h.pwrite(b"w" * 8192, 4096))
attempt("zero_big", lambda: h.zero(4 << 20, 4 << 20))
assert h.pread(8192, 4096) == b"w" * 8192
print("alive")
"#,
        uri = py(&srv.uri(""))
    );
    let out = nbdsh_script(&script);
    assert!(out.contains("sizes 4096 4096 1048576"), "{out}");
    for (name, want) in [
        ("read_len", "EINVAL"),
        ("read_off", "EINVAL"),
        ("write_small", "EINVAL"),
        ("write_off", "EINVAL"),
        ("trim_len", "EINVAL"),
        ("zero_off", "EINVAL"),
        ("read_big", "EOVERFLOW"),
        ("read_max", "ok"),
        ("write_ok", "ok"),
        // Effect lengths above the maximum payload are fine for payload-less commands.
        ("zero_big", "ok"),
    ] {
        assert_eq!(outcome(&out, name), format!("{name} {want}"), "{out}");
    }
    assert!(out.contains("alive"), "{out}");
    srv.assert_clean();
}

/// Large requests at the default limits: a 32 MiB write and read (the maximum payload),
/// FUA, flush, cache, and zero/trim of the whole export.
#[test]
fn nbdsh_large_requests_and_flags() {
    if !require(&["nbdsh"]) {
        return;
    }
    let srv = Server::unix(&["--memory", "40M"]);
    let script = format!(
        r#"
h.connect_uri({uri})
print("max", h.get_block_size(nbd.SIZE_MAXIMUM))
buf = bytes(range(256)) * (128 << 10)
h.pwrite(buf, 4096, nbd.CMD_FLAG_FUA)
assert h.pread(32 << 20, 4096) == buf
h.flush()
h.cache(1 << 20, 0)
assert h.pread(4096, 0) == bytes(4096)
h.zero(40 << 20, 0, nbd.CMD_FLAG_FUA)
assert h.pread(1 << 20, 8 << 20) == bytes(1 << 20)
h.pwrite(b"a" * 4096, 0)
h.trim(40 << 20, 0, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 0) == bytes(4096)
print("done")
"#,
        uri = py(&srv.uri(""))
    );
    let out = nbdsh_script(&script);
    assert!(out.contains("done"), "{out}");
    srv.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// Negotiation variants
// ---------------------------------------------------------------------------------------------

/// `--oldstyle`: nbdinfo (libnbd speaks oldstyle) sees the size and simple replies, and
/// nbdsh reads and writes.
#[test]
fn oldstyle_nbdinfo_and_nbdsh() {
    if !require(&["nbdinfo", "nbdsh"]) {
        return;
    }
    let srv = Server::unix(&["--oldstyle", "--memory", "16M"]);
    let uri = srv.uri("");
    let out = support::run_ok(Command::new("nbdinfo").arg(&uri));
    assert!(
        out.contains("protocol: oldstyle without TLS, using simple packets"),
        "{out}"
    );
    assert!(out.contains("export-size: 16777216 (16M)"), "{out}");
    assert!(out.contains("can_df: false"), "{out}");
    let json = support::run_ok(Command::new("nbdinfo").args(["--json", &uri]));
    assert!(json.contains("\"protocol\": \"oldstyle\""), "{json}");
    assert!(json.contains("\"export-size\": 16777216"), "{json}");
    let script = format!(
        r#"{PY_TRY}
h.connect_uri({uri})
print(h.get_protocol(), h.get_structured_replies_negotiated())
h.pwrite(b"old" * 1000, 12345)
assert h.pread(3000, 12345) == b"old" * 1000
h.set_strict_mode(0)
attempt("past_end", lambda: h.pread(512, h.get_size()))
print(bytes(h.pread(3, 12345)))
"#,
        uri = py(&uri)
    );
    let out = nbdsh_script(&script);
    assert!(out.contains("oldstyle False"), "{out}");
    assert_eq!(outcome(&out, "past_end"), "past_end EINVAL", "{out}");
    assert!(out.contains("b'old'"), "{out}");
    srv.assert_clean();
}

/// `--no-structured-replies`: libnbd gets simple replies; reads, writes and errors work.
#[test]
fn no_structured_replies_nbdsh() {
    if !require(&["nbdsh", "nbdinfo"]) {
        return;
    }
    let srv = Server::unix(&["--no-structured-replies", "--memory", "16M"]);
    let uri = srv.uri("");
    let script = format!(
        r#"{PY_TRY}
h.add_meta_context("base:allocation")
h.connect_uri({uri})
print("sr", h.get_structured_replies_negotiated(), "df", h.can_df(), "ctx", h.can_meta_context("base:allocation"))
data = bytes(range(256)) * 4096
h.pwrite(data, 65536)
assert h.pread(len(data), 65536) == data
assert h.pread(65536, 0) == bytes(65536)
h.set_strict_mode(0)
attempt("past_end", lambda: h.pread(512, h.get_size() - 256))
attempt("write_past_end", lambda: h.pwrite(b"x" * 512, h.get_size()))
attempt("block_status", lambda: h.block_status(4096, 0, lambda *a: 0))
assert h.pread(4, 65536) == data[:4]
print("alive")
"#,
        uri = py(&uri)
    );
    let out = nbdsh_script(&script);
    assert!(out.contains("sr False df False ctx False"), "{out}");
    assert_eq!(outcome(&out, "past_end"), "past_end EINVAL", "{out}");
    assert_eq!(
        outcome(&out, "write_past_end"),
        "write_past_end ENOSPC",
        "{out}"
    );
    assert_eq!(
        outcome(&out, "block_status"),
        "block_status EINVAL",
        "{out}"
    );
    assert!(out.contains("alive"), "{out}");
    let info = support::run_ok(Command::new("nbdinfo").arg(&uri));
    assert!(info.contains("using simple packets"), "{info}");
    srv.assert_clean();
}

/// QEMU negotiates extended headers with our server: the trace proxy between qemu-io /
/// qemu-img and the server shows the option, 32-byte requests and extended reply chunks
/// (including 64-bit block status) and nothing it could not decode.
#[test]
fn qemu_extended_headers_through_trace_proxy() {
    if !require(&["qemu-io", "qemu-img"]) {
        return;
    }
    let srv = Server::unix(&["--memory", "8G"]);
    let mut trace = Trace::start(&Addr::Unix(srv.socket().to_path_buf()));
    let uri = trace.uri("");
    qemu_io(
        &uri,
        &[
            "write -P 0xab 5G 64k",
            "read -P 0xab 5G 64k",
            "write -z 1M 64k",
            "read -P 0 1M 64k",
        ],
    );
    let json =
        support::run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    assert_eq!(
        parse_qemu_map(&json),
        expected_map(8 << 30, &[(MIB, 64 * KIB), (5 << 30, 64 * KIB)], 1, 0),
        "{json}"
    );
    let log = trace.settle();
    for needle in [
        "C->S NBD_OPT_EXTENDED_HEADERS",
        "S->C NBD_REP_ACK to NBD_OPT_EXTENDED_HEADERS",
        "transmission starts: extended headers",
        "C->S NBD_CMD_WRITE extended cookie=",
        "C->S NBD_CMD_READ extended cookie=",
        "C->S NBD_CMD_WRITE_ZEROES extended cookie=",
        "C->S NBD_CMD_BLOCK_STATUS extended cookie=",
        "S->C extended chunk NBD_REPLY_TYPE_NONE",
        "S->C extended chunk NBD_REPLY_TYPE_OFFSET_DATA",
        "S->C extended chunk NBD_REPLY_TYPE_BLOCK_STATUS_EXT",
    ] {
        assert!(log.contains(needle), "no {needle:?} in the trace:\n{log}");
    }
    // A hole longer than 4 GiB in one 64-bit descriptor: `extents=N [(LEN,STATUS), ...]`.
    let wide = log
        .lines()
        .filter(|l| l.contains("NBD_REPLY_TYPE_BLOCK_STATUS_EXT"))
        .flat_map(|l| l.split('(').skip(1))
        .filter_map(|d| d.split(',').next()?.parse::<u64>().ok())
        .any(|len| len > u64::from(u32::MAX));
    assert!(wide, "no extent over 4 GiB in the trace:\n{log}");
    for bad in [
        "decode error",
        "simple reply",
        "structured chunk",
        "not negotiated",
        "does not match",
    ] {
        assert!(!log.contains(bad), "{bad:?} in the trace:\n{log}");
    }
    srv.assert_clean();
}

/// Option negotiation driven step by step with libnbd's option mode:
/// `NBD_OPT_LIST_META_CONTEXT` query semantics (prefix queries list, `x:` and names
/// without a namespace select nothing), `NBD_OPT_INFO` with the canonical name and a UTF-8
/// description, an unknown export (ENOENT), SET_META_CONTEXT for an export without the
/// context, and STARTTLS refused by a server without TLS.
#[test]
fn nbdsh_option_negotiation() {
    if !require(&["nbdsh"]) {
        return;
    }
    let srv = Server::unix(&[
        "--export",
        "ünï cödé",
        "--memory",
        "1M",
        "--description",
        "日本語 desc",
        "--dirty-bitmap",
        "bm",
        "--export",
        "",
        "--memory",
        "2M",
    ]);
    let sock = py(srv.socket().to_str().unwrap());
    let script = format!(
        r#"
h.set_opt_mode(True)
h.set_full_info(True)
h.connect_unix({sock})
h.set_export_name("ünï cödé")
for q in [[], ["qemu:"], ["base:"], ["qemu:dirty-bitmap:"], ["x:"], ["nocolon"], ["base:allocation", "qemu:dirty-bitmap:bm", "base:allocation2"]]:
    h.clear_meta_contexts()
    for c in q:
        h.add_meta_context(c)
    got = []
    n = h.opt_list_meta_context(lambda name: got.append(name))
    print("list", q, n, got)
h.clear_meta_contexts()
h.set_export_name("nope")
try:
    h.opt_info()
except nbd.Error as e:
    print("info nope", e.errno)
h.set_export_name("ünï cödé")
h.opt_info()
print("info", h.get_size(), h.get_canonical_export_name(), h.get_export_description())
h.set_export_name("")
h.add_meta_context("qemu:dirty-bitmap:bm")
h.opt_go()
print("go", h.get_size(), h.can_meta_context("qemu:dirty-bitmap:bm"))
"#
    );
    let out = nbdsh_script(&script);
    let want = [
        "list [] 2 ['base:allocation', 'qemu:dirty-bitmap:bm']",
        "list ['qemu:'] 1 ['qemu:dirty-bitmap:bm']",
        "list ['base:'] 1 ['base:allocation']",
        "list ['qemu:dirty-bitmap:'] 1 ['qemu:dirty-bitmap:bm']",
        "list ['x:'] 0 []",
        "list ['nocolon'] 0 []",
        "list ['base:allocation', 'qemu:dirty-bitmap:bm', 'base:allocation2'] 2 ['base:allocation', 'qemu:dirty-bitmap:bm']",
        "info nope ENOENT",
        "info 1048576 ünï cödé 日本語 desc",
        // The default export has no bitmap: nothing is selected.
        "go 2097152 False",
    ];
    assert_eq!(out.lines().collect::<Vec<_>>(), want, "{out}");

    let script = format!(
        r#"
h.set_tls(nbd.TLS_ALLOW)
h.connect_unix({sock})
print("allow", h.get_tls_negotiated(), h.get_size())
h.shutdown()
h2 = nbd.NBD()
h2.set_tls(nbd.TLS_REQUIRE)
try:
    h2.connect_unix({sock})
except nbd.Error as e:
    print("require", e.errno, "server refused TLS" in e.string)
"#
    );
    let out = nbdsh_script(&script);
    assert!(out.contains("allow False 2097152"), "{out}");
    assert!(out.contains("require ENOTSUP True"), "{out}");
    srv.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------------

/// Several clients at once on one export: two qemu-io processes write different regions
/// while an nbdcopy reads the export, then each region is checked.
#[test]
fn concurrent_clients() {
    if !require(&["qemu-io", "nbdcopy"]) {
        return;
    }
    let dir = TestDir::new();
    let srv = Server::unix(&["--memory", "32M"]);
    let uri = srv.uri("");
    let writer = |pattern: u8, base: u64| {
        let uri = uri.clone();
        thread::spawn(move || {
            // 64 writes of 128 KiB, each read back at once.
            let cmds: Vec<String> = (0..64)
                .flat_map(|i| {
                    let off = base + i * 128 * KIB;
                    [
                        format!("write -P {pattern} {off} 128k"),
                        format!("read -P {pattern} {off} 128k"),
                    ]
                })
                .collect();
            let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
            qemu_io(&uri, &refs);
        })
    };
    let sink = dir.data_path("copy.raw");
    let reader = {
        let uri = uri.clone();
        let sink = sink.clone();
        thread::spawn(move || {
            for _ in 0..3 {
                support::run_ok(Command::new("nbdcopy").arg(&uri).arg(&sink));
            }
        })
    };
    let a = writer(0x61, 0);
    let b = writer(0x62, 16 * MIB);
    a.join().expect("writer A");
    b.join().expect("writer B");
    reader.join().expect("reader");
    qemu_io(
        &uri,
        &[
            "read -P 0x61 0 8M",
            "read -P 0 8M 8M",
            "read -P 0x62 16M 8M",
            "read -P 0 24M 8M",
        ],
    );
    srv.assert_clean();
}
