//! Interop tests for the `nbd-trace` example: a transparent NBD proxy that prints every
//! message it decodes with `nbd_proto::wire`.
//!
//! Each real-peer test starts a server (qemu-nbd, nbdkit or nbd-server), puts `nbd-trace`
//! in front of it, drives a real client through the proxy, and checks both that the client
//! did its job with the right data and that the trace shows the expected messages with no
//! decode anomalies. The scripted tests at the end need no external tool: a fake client and
//! server exchange byte-exact sessions built with the crate's own encoders (also dribbled a
//! few bytes at a time, to exercise the proxy's reassembly), and check that every byte is
//! forwarded unchanged.
//!
//! Missing peers make a test skip (or fail with `NBD_INTEROP=required`), see `support`.

mod support;

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use nbd_proto::wire::extent::emit_extents;
use nbd_proto::wire::{
    BlockSize, BlockStatusHeader, BlockStatusPayload, ChunkHeader, ChunkType, ClientFlags,
    CmdFlags, Command as Cmd, ContextIds, Cookie, Errno, ErrorChunk, ExportNameReply,
    ExportRequest, Extent, Greeting, HandshakeFlags, Hello, Info, InfoList, InfoType,
    MetaContextRequest, OffsetDataHeader, OffsetHole, Opt, OptCode, OptError, OptReply, Queries,
    ReplyFlags, ReplyHeader, Request, SimpleReply, TransmissionFlags,
};
use support::{Peer, Spawned, TestDir};

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// The proxy under test
// ---------------------------------------------------------------------------------------------

/// A running `nbd-trace` writing its trace to a log file. Declare it after the server it
/// forwards to, so that it is stopped first.
struct Trace {
    proc: Spawned,
    log: PathBuf,
    addr: support::Addr,
}

impl Trace {
    /// `nbd-trace --listen unix:DIR/trace.sock --connect CONNECT --log DIR/trace.log`.
    fn start(connect: &str) -> Trace {
        Trace::start_with(connect, false, &[])
    }

    /// Like [`Trace::start`]; `tcp` listens on 127.0.0.1 with a kernel-chosen port instead.
    fn start_with(connect: &str, tcp: bool, extra: &[&str]) -> Trace {
        let dir = TestDir::named(&format!("{}-trace", support::test_name()));
        let log = dir.join("trace.log");
        let listen = if tcp {
            "127.0.0.1:0".to_string()
        } else {
            format!("unix:{}", dir.join("trace.sock").display())
        };
        let mut cmd = Command::new(support::example_binary("nbd-trace"));
        cmd.args(["--listen", &listen, "--connect", connect, "--log"])
            .arg(&log)
            .args(extra);
        let mut proc = Spawned::spawn_in(dir, &mut cmd);
        let log2 = log.clone();
        proc.wait_for("the proxy's `listening on` line", move |p| {
            listening_line(&fs::read_to_string(&log2).unwrap_or_default(), &p.stderr()).is_some()
        });
        // "listening on ADDR, forwarding to ..."
        let first = listening_line(&fs::read_to_string(&log).unwrap(), &proc.stderr()).unwrap();
        let bound = first
            .strip_prefix("listening on ")
            .and_then(|s| s.split(", forwarding to ").next())
            .unwrap_or_else(|| panic!("unexpected first trace line {first:?}"));
        let addr = match bound.strip_prefix("unix:") {
            Some(path) => support::Addr::Unix(PathBuf::from(path)),
            None => support::Addr::Tcp(
                bound
                    .parse::<SocketAddr>()
                    .unwrap_or_else(|e| panic!("bad listen address {bound:?}: {e}")),
            ),
        };
        Trace { proc, log, addr }
    }

    fn uri(&self, export: &str) -> String {
        self.addr.uri(export)
    }

    fn socket(&self) -> &Path {
        match &self.addr {
            support::Addr::Unix(p) => p,
            support::Addr::Tcp(a) => panic!("trace listens on TCP {a}"),
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until every connection the proxy accepted has closed (the clients have exited,
    /// so no new ones come) and returns the trace.
    fn settle(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            let accepted = count(&log, "] accepted ");
            let ended = count(&log, "] closed: ") + count(&log, "] cannot connect");
            if accepted > 0 && ended == accepted {
                return log;
            }
            if Instant::now() >= deadline {
                panic!(
                    "trace did not settle ({accepted} accepted, {ended} closed); proxy stderr:\n{}\ntrace:\n{log}",
                    self.proc.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `listening on ADDR, forwarding to ADDR`: the first line of the trace, or (with `--quiet`,
/// where the trace has only the summary) the line on stderr.
fn listening_line(log: &str, stderr: &str) -> Option<String> {
    let first = log
        .lines()
        .next()
        .filter(|l| l.starts_with("listening on "));
    let on_stderr = || {
        stderr
            .lines()
            .find_map(|l| l.strip_prefix("nbd-trace: "))
            .filter(|l| l.starts_with("listening on ") && l.contains(", forwarding to "))
    };
    first.or_else(on_stderr).map(str::to_string)
}

/// Sends `signal` (e.g. `-TERM`) to `pid` with kill(1).
fn signal(pid: u32, signal: &str) {
    support::run_ok(Command::new("kill").args([signal, &pid.to_string()]));
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// Panics unless some line of the trace contains every one of `parts`.
#[track_caller]
fn expect_line(log: &str, parts: &[&str]) {
    if !log.lines().any(|l| parts.iter().all(|p| l.contains(p))) {
        panic!("no trace line contains all of {parts:?}; trace:\n{log}");
    }
}

/// Panics if some line contains every one of `parts`.
#[track_caller]
fn expect_no_line(log: &str, parts: &[&str]) {
    if let Some(l) = log.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
        panic!("unexpected trace line {l:?} (matches {parts:?}); trace:\n{log}");
    }
}

/// Words the proxy uses only when something did not decode cleanly or broke a rule.
const ANOMALIES: &[&str] = &[
    "decode error",
    "malformed",
    "stream ended",
    "unknown cookie",
    "not negotiated",
    "does not match",
    "too long to decode",
    "should be 0",
    "(invalid",
    "although",
    "panicked",
];

/// Panics if the trace of a session between real peers shows any anomaly.
#[track_caller]
fn expect_clean(log: &str) {
    for a in ANOMALIES {
        expect_no_line(log, &[a]);
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

#[track_caller]
fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

/// `(start, length, data)` of each entry of `qemu-img map --output=json`.
fn qemu_map(json: &str) -> Vec<(u64, u64, bool)> {
    let num = |entry: &str, key: &str| -> u64 {
        let pat = format!("\"{key}\":");
        let rest = &entry[entry
            .find(&pat)
            .unwrap_or_else(|| panic!("{key} in {entry}"))
            + pat.len()..];
        rest.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse()
            .unwrap()
    };
    json.split('{')
        .skip(1)
        .map(|entry| {
            let data = entry.contains("\"data\": true") || entry.contains("\"data\":true");
            (num(entry, "start"), num(entry, "length"), data)
        })
        .collect()
}

/// Lines of `nbdinfo --map` as `(offset, length, type, description)`.
fn nbdinfo_map(text: &str) -> Vec<(u64, u64, u64, String)> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut w = l.split_whitespace();
            let mut n = || w.next().unwrap().parse::<u64>().unwrap();
            let (o, len, t) = (n(), n(), n());
            let desc = l.split_whitespace().skip(3).collect::<Vec<_>>().join(" ");
            (o, len, t, desc)
        })
        .collect()
}

/// A pseudo-random source file of `size` bytes.
fn source(dir: &TestDir, name: &str, size: u64, seed: u64) -> (PathBuf, Vec<u8>) {
    let p = dir.pattern_file(name, size, seed);
    let data = fs::read(&p).unwrap();
    (p, data)
}

// ---------------------------------------------------------------------------------------------
// qemu-nbd with QEMU clients: extended headers
// ---------------------------------------------------------------------------------------------

#[test]
fn qemu_img_info_map_convert_use_extended_headers() {
    if !support::require(&["qemu-nbd", "qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TestDir::new();
    let img = dir.zero_file("disk.raw", 16 * MIB);
    let (src, src_data) = source(&dir, "src.raw", 4 * MIB, 11);
    let out = dir.data_path("out.raw");
    let peer = Peer::qemu_nbd(&img, &["-x", "disk", "-e", "4"]);
    let mut trace = Trace::start(&peer.addr().to_string());
    let uri = trace.uri("disk");

    let info = support::run_ok(Command::new("qemu-img").args(["info", "--output=json", &uri]));
    assert!(
        info.contains("\"virtual-size\": 16777216"),
        "qemu-img info: {info}"
    );
    // Write 4 MiB of data into the sparse export, then look at it and read it back.
    support::run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    let map = support::run_ok(Command::new("qemu-img").args(["map", "--output=json", &uri]));
    let entries = qemu_map(&map);
    let data: u64 = entries.iter().filter(|e| e.2).map(|e| e.1).sum();
    assert_eq!(data, 4 * MIB, "qemu-img map: {map}");
    assert!(
        entries.iter().filter(|e| e.2).all(|e| e.0 + e.1 <= 4 * MIB),
        "data outside the written range: {map}"
    );
    assert_eq!(entries.last().map(|e| e.0 + e.1), Some(16 * MIB), "{map}");
    support::run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&uri)
            .arg(&out),
    );
    let got = fs::read(&out).unwrap();
    assert_eq!(got.len() as u64, 16 * MIB);
    assert_same("copied-out data", &got[..4 * MIB as usize], &src_data);
    assert!(
        got[4 * MIB as usize..].iter().all(|&b| b == 0),
        "tail not zero"
    );
    // One read across the end of the data and into the hole, one read of a hole only.
    let io = support::run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read 3M 2M",
        "-c",
        "read -P 0 8M 1M",
        &uri,
    ]));
    assert!(!io.contains("failed"), "qemu-io: {io}");

    let log = trace.settle();
    expect_clean(&log);
    expect_line(&log, &["C->S NBD_OPT_EXTENDED_HEADERS"]);
    expect_line(
        &log,
        &["S->C NBD_REP_ACK to NBD_OPT_EXTENDED_HEADERS (extended headers on)"],
    );
    expect_line(
        &log,
        &["S->C NBD_REP_ACK to NBD_OPT_GO (transmission starts: extended headers)"],
    );
    expect_line(
        &log,
        &[
            "S->C NBD_REP_INFO to NBD_OPT_GO NBD_INFO_EXPORT size=16777216",
            "BLOCK_STATUS_PAYLOAD",
        ],
    );
    expect_line(
        &log,
        &["S->C NBD_REP_INFO to NBD_OPT_GO NBD_INFO_BLOCK_SIZE min=1 preferred=4096"],
    );
    // QEMU 10.0.2 sends extended writes *without* NBD_CMD_FLAG_PAYLOAD_LEN, which the
    // extended-headers spec requires; qemu-nbd accepts them. The proxy notes it and still
    // frames the payload by the length.
    expect_line(
        &log,
        &[
            "C->S NBD_CMD_WRITE extended",
            "len=2097152",
            "payload=2097152 bytes",
        ],
    );
    expect_line(
        &log,
        &[
            "S->C extended chunk NBD_REPLY_TYPE_NONE",
            "to NBD_CMD_WRITE",
            "len=0 flags=0x1[DONE]",
        ],
    );
    expect_line(
        &log,
        &["C->S NBD_CMD_BLOCK_STATUS extended", "flags=0x8[REQ_ONE]"],
    );
    expect_line(
        &log,
        &[
            "S->C extended chunk NBD_REPLY_TYPE_BLOCK_STATUS_EXT",
            "to NBD_CMD_BLOCK_STATUS",
            "context=0(base:allocation) extents=1",
        ],
    );
    expect_line(
        &log,
        &["C->S NBD_CMD_READ extended", "offset=3145728 len=2097152"],
    );
    expect_line(
        &log,
        &[
            "S->C extended chunk NBD_REPLY_TYPE_OFFSET_DATA",
            "req_offset=3145728",
            "data=",
        ],
    );
    expect_line(
        &log,
        &[
            "S->C extended chunk NBD_REPLY_TYPE_OFFSET_HOLE",
            "req_offset=3145728",
            "offset=4194304 hole=1048576",
        ],
    );
    expect_line(
        &log,
        &[
            "S->C extended chunk NBD_REPLY_TYPE_OFFSET_HOLE",
            "req_offset=8388608",
            "hole=1048576",
        ],
    );
    expect_line(&log, &["C->S NBD_CMD_DISC extended"]);
    // Extended headers forbid the other forms.
    expect_no_line(&log, &["compact"]);
    expect_no_line(&log, &["structured chunk"]);
    expect_no_line(&log, &["simple reply"]);
}

#[test]
fn qemu_dirty_bitmap_and_allocation_depth_contexts() {
    if !support::require(&["qemu-nbd", "qemu-img", "qemu-io", "nbdinfo"]) {
        return;
    }
    let dir = TestDir::new();
    let top = dir.bitmap_image();
    let peer = Peer::qemu_nbd(
        &top,
        &["-f", "qcow2", "-A", "-B", "bm0", "-x", "top", "-e", "4"],
    );
    let mut trace = Trace::start(&peer.addr().to_string());

    // qemu-img reads the bitmap through x-dirty-bitmap (extended headers). It reports dirty
    // areas as "data": false and clean ones as "data": true.
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=top,x-dirty-bitmap=qemu:dirty-bitmap:bm0",
        trace.socket().display()
    );
    let map = support::run_ok(Command::new("qemu-img").args([
        "map",
        "--output=json",
        "--image-opts",
        &opts,
    ]));
    let dirty: Vec<(u64, u64)> = qemu_map(&map)
        .into_iter()
        .filter(|e| !e.2)
        .map(|e| (e.0, e.1))
        .collect();
    assert_eq!(dirty, [(2 * MIB, MIB / 2), (8 * MIB, MIB)], "{map}");

    // libnbd: structured replies, 32-bit block status.
    let bm = support::run_ok(
        Command::new("nbdinfo").args(["--map=qemu:dirty-bitmap:bm0", &trace.uri("top")]),
    );
    let bm = nbdinfo_map(&bm);
    assert!(
        bm.contains(&(2 * MIB, MIB / 2, 1, "dirty".into())),
        "{bm:?}"
    );
    assert!(bm.contains(&(8 * MIB, MIB, 1, "dirty".into())), "{bm:?}");
    assert!(bm.contains(&(0, 2 * MIB, 0, "clean".into())), "{bm:?}");
    let depth = support::run_ok(
        Command::new("nbdinfo").args(["--map=qemu:allocation-depth", &trace.uri("top")]),
    );
    let depth = nbdinfo_map(&depth);
    assert!(
        depth.contains(&(0, 2 * MIB, 2, "backing depth 2".into())),
        "{depth:?}"
    );
    assert!(
        depth.contains(&(2 * MIB, MIB / 2, 1, "local".into())),
        "{depth:?}"
    );

    let log = trace.settle();
    expect_clean(&log);
    expect_line(
        &log,
        &["C->S NBD_OPT_SET_META_CONTEXT export=\"top\" queries=[\"qemu:dirty-bitmap:bm0\"]"],
    );
    expect_line(
        &log,
        &[
            "S->C NBD_REP_META_CONTEXT to NBD_OPT_SET_META_CONTEXT",
            "name=\"qemu:dirty-bitmap:bm0\"",
        ],
    );
    expect_line(
        &log,
        &[
            "S->C NBD_REP_META_CONTEXT to NBD_OPT_SET_META_CONTEXT",
            "name=\"qemu:allocation-depth\"",
        ],
    );
    // The qemu-img session: extended headers, one descriptor per REQ_ONE request.
    expect_line(
        &log,
        &[
            "S->C extended chunk NBD_REPLY_TYPE_BLOCK_STATUS_EXT",
            "(qemu:dirty-bitmap:bm0) extents=1 [(524288,1)]",
        ],
    );
    // The nbdinfo sessions: structured replies, the whole map in one chunk.
    expect_line(
        &log,
        &[
            "S->C structured chunk NBD_REPLY_TYPE_BLOCK_STATUS",
            "(qemu:dirty-bitmap:bm0) extents=5 [(2097152,0) (524288,1) (5767168,0) (1048576,1) ...]",
        ],
    );
    expect_line(
        &log,
        &[
            "S->C structured chunk NBD_REPLY_TYPE_BLOCK_STATUS",
            "(qemu:allocation-depth) extents=5 [(2097152,2) (524288,1)",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// libnbd tools (structured replies) against nbdkit, qemu-nbd and nbd-server
// ---------------------------------------------------------------------------------------------

#[test]
fn libnbd_tools_with_nbdkit_memory() {
    if !support::require(&["nbdkit", "nbdinfo", "nbdcopy"]) {
        return;
    }
    let dir = TestDir::new();
    let (src, src_data) = source(&dir, "src.raw", 8 * MIB, 21);
    let out = dir.data_path("out.raw");
    let peer = Peer::nbdkit(&["memory", "16M"]);
    let mut trace = Trace::start(&peer.addr().to_string());
    let uri = trace.uri("");

    let list = support::run_ok(Command::new("nbdinfo").args(["--list", &uri]));
    assert!(list.contains("export-size: 16777216"), "{list}");
    support::run_ok(Command::new("nbdcopy").arg(&src).arg(&uri));
    let map = nbdinfo_map(&support::run_ok(
        Command::new("nbdinfo").args(["--map", &uri]),
    ));
    assert_eq!(
        map.first(),
        Some(&(0, 8 * MIB, 0, "data".to_string())),
        "{map:?}"
    );
    assert_eq!(
        map.last().map(|m| m.3.as_str()),
        Some("hole,zero"),
        "{map:?}"
    );
    support::run_ok(Command::new("nbdcopy").arg(&uri).arg(&out));
    let got = fs::read(&out).unwrap();
    assert_eq!(got.len() as u64, 16 * MIB);
    assert_same("copied-out data", &got[..8 * MIB as usize], &src_data);
    assert!(got[8 * MIB as usize..].iter().all(|&b| b == 0));

    let log = trace.settle();
    expect_clean(&log);
    expect_line(
        &log,
        &["S->C greeting newstyle, handshake flags 0x3[FIXED_NEWSTYLE|NO_ZEROES]"],
    );
    expect_line(&log, &["C->S client flags 0x3[FIXED_NEWSTYLE|NO_ZEROES]"]);
    expect_line(
        &log,
        &["S->C NBD_REP_ACK to NBD_OPT_STRUCTURED_REPLY (structured replies on)"],
    );
    expect_line(&log, &["C->S NBD_OPT_LIST"]);
    expect_line(&log, &["S->C NBD_REP_SERVER to NBD_OPT_LIST name=\"\""]);
    expect_line(
        &log,
        &["C->S NBD_OPT_INFO name=\"\" info_requests=[NBD_INFO_BLOCK_SIZE,NBD_INFO_NAME,NBD_INFO_DESCRIPTION]"],
    );
    expect_line(
        &log,
        &[
            "S->C NBD_REP_INFO to NBD_OPT_INFO NBD_INFO_EXPORT size=16777216",
            "CAN_MULTI_CONN",
        ],
    );
    expect_line(&log, &["C->S NBD_OPT_ABORT"]);
    expect_line(
        &log,
        &["S->C NBD_REP_ACK to NBD_OPT_GO (transmission starts: structured replies)"],
    );
    expect_line(&log, &["C->S NBD_CMD_WRITE compact", "payload="]);
    expect_line(&log, &["S->C simple reply", "to NBD_CMD_WRITE ok"]);
    expect_line(
        &log,
        &["S->C NBD_REP_META_CONTEXT to NBD_OPT_SET_META_CONTEXT id=1 name=\"base:allocation\""],
    );
    expect_line(
        &log,
        &[
            "S->C structured chunk NBD_REPLY_TYPE_BLOCK_STATUS",
            "context=1(base:allocation)",
            "(8388608,0)",
        ],
    );
    expect_line(&log, &["C->S NBD_CMD_READ compact"]);
    expect_line(
        &log,
        &[
            "S->C structured chunk NBD_REPLY_TYPE_OFFSET_DATA",
            "to NBD_CMD_READ",
            "flags=0x1[DONE]",
            "data=",
        ],
    );
    expect_no_line(&log, &["extended"]);
}

#[test]
fn libnbd_tools_with_qemu_nbd_and_hole_chunks() {
    if !support::require(&["qemu-nbd", "nbdinfo", "nbdcopy", "nbdsh"]) {
        return;
    }
    let dir = TestDir::new();
    let img = dir.zero_file("disk.raw", 8 * MIB);
    let (src, src_data) = source(&dir, "src.raw", 3 * MIB, 31);
    let out = dir.data_path("out.raw");
    let peer = Peer::qemu_nbd(&img, &["-x", "disk", "-D", "traced disk", "-e", "4"]);
    let mut trace = Trace::start(&peer.addr().to_string());
    let uri = trace.uri("disk");

    let list = support::run_ok(Command::new("nbdinfo").args(["--list", &uri]));
    assert!(list.contains("traced disk"), "{list}");
    support::run_ok(Command::new("nbdcopy").arg(&src).arg(&uri));
    // Force reads of the whole export, holes included.
    support::run_ok(
        Command::new("nbdcopy")
            .args(["--no-extents"])
            .arg(&uri)
            .arg(&out),
    );
    let got = fs::read(&out).unwrap();
    assert_same("copied-out data", &got[..3 * MIB as usize], &src_data);
    assert!(got[3 * MIB as usize..].iter().all(|&b| b == 0));
    // One read spanning data and hole.
    let script = format!(
        "buf = h.pread(2 * 1048576, 2 * 1048576)\nprint(buf[:1048576] == open({:?}, 'rb').read()[2*1048576:3*1048576], buf[1048576:] == bytes(1048576))",
        src.display()
    );
    let res = support::run_ok(&mut support::nbdsh(&["-u", &uri, "-c", &script]));
    assert_eq!(res.trim(), "True True");

    let log = trace.settle();
    expect_clean(&log);
    expect_line(
        &log,
        &["S->C NBD_REP_INFO to NBD_OPT_INFO NBD_INFO_DESCRIPTION description=\"traced disk\""],
    );
    expect_line(
        &log,
        &["NBD_INFO_BLOCK_SIZE min=1 preferred=4096 max_payload=33554432"],
    );
    expect_line(
        &log,
        &["S->C NBD_REP_ACK to NBD_OPT_STRUCTURED_REPLY (structured replies on)"],
    );
    expect_line(
        &log,
        &[
            "S->C structured chunk NBD_REPLY_TYPE_OFFSET_HOLE",
            "to NBD_CMD_READ",
            "hole=",
        ],
    );
    expect_line(
        &log,
        &[
            "S->C structured chunk NBD_REPLY_TYPE_OFFSET_DATA",
            "offset=2097152 data=1048576 bytes",
        ],
    );
    expect_line(
        &log,
        &[
            "S->C structured chunk NBD_REPLY_TYPE_OFFSET_HOLE",
            "offset=3145728 hole=1048576",
        ],
    );
    // libnbd 1.14 never asks for extended headers.
    expect_no_line(&log, &["NBD_OPT_EXTENDED_HEADERS"]);
    expect_no_line(&log, &["extended"]);
}

/// `(offset, length, type)` runs of `qemu-img map --output=json` for a raw file, in
/// `base:allocation` terms (0 data, 3 hole and zero), neighbours merged.
fn allocation_runs(json: &str) -> Vec<(u64, u64, u64)> {
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    for (start, len, data) in qemu_map(json) {
        let t = if data { 0 } else { 3 };
        match runs.last_mut() {
            Some(last) if last.0 + last.1 == start && last.2 == t => last.1 += len,
            _ => runs.push((start, len, t)),
        }
    }
    runs
}

#[test]
fn nbdinfo_map_of_a_sparse_qemu_nbd_export() {
    if !support::require(&["qemu-nbd", "qemu-img", "qemu-io", "nbdinfo"]) {
        return;
    }
    let dir = TestDir::new();
    let img = dir.data_path("sparse.raw");
    let i = img.to_str().unwrap();
    support::run_ok(Command::new("qemu-img").args(["create", "-f", "raw", i, "32M"]));
    support::run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xaa 0 1M",
        "-c",
        "write -P 0x55 5M 2M",
        "-c",
        "write -P 0x11 20M 64k",
        i,
    ]));
    let layout = allocation_runs(&support::run_ok(Command::new("qemu-img").args([
        "map",
        "--output=json",
        "-f",
        "raw",
        i,
    ])));
    assert_eq!(
        layout,
        [
            (0, MIB, 0),
            (MIB, 4 * MIB, 3),
            (5 * MIB, 2 * MIB, 0),
            (7 * MIB, 13 * MIB, 3),
            (20 * MIB, 64 << 10, 0),
            (20 * MIB + (64 << 10), 12 * MIB - (64 << 10), 3),
        ],
        "the image's layout"
    );
    let peer = Peer::qemu_nbd(&img, &["-r", "-x", "sparse"]);
    let mut trace = Trace::start(&peer.addr().to_string());
    let map = nbdinfo_map(&support::run_ok(
        Command::new("nbdinfo").args(["--map", &trace.uri("sparse")]),
    ));
    let mut merged: Vec<(u64, u64, u64)> = Vec::new();
    for (o, len, t, desc) in &map {
        let want = if *t == 0 { "data" } else { "hole,zero" };
        assert_eq!(desc, want, "{map:?}");
        match merged.last_mut() {
            Some(last) if last.0 + last.1 == *o && last.2 == *t => last.1 += len,
            _ => merged.push((*o, *len, *t)),
        }
    }
    assert_eq!(merged, layout, "nbdinfo --map: {map:?}");

    let log = trace.settle();
    expect_clean(&log);
    expect_line(
        &log,
        &["C->S NBD_OPT_SET_META_CONTEXT export=\"sparse\" queries=[\"base:allocation\"]"],
    );
    expect_line(
        &log,
        &["S->C NBD_REP_ACK to NBD_OPT_GO (transmission starts: structured replies)"],
    );
    // libnbd 1.14 does not ask for extended headers, so the requests are compact and the
    // status chunks have 32-bit descriptors, the first one for the data at the start.
    expect_line(&log, &["C->S NBD_CMD_BLOCK_STATUS compact", "offset=0"]);
    expect_line(
        &log,
        &[
            "S->C structured chunk NBD_REPLY_TYPE_BLOCK_STATUS ",
            "(base:allocation) extents=",
            "[(1048576,0) (4194304,3) (2097152,0)",
        ],
    );
    expect_no_line(&log, &["NBD_REPLY_TYPE_BLOCK_STATUS_EXT"]);
    expect_no_line(&log, &["NBD_OPT_EXTENDED_HEADERS"]);
    expect_no_line(&log, &["extended"]);
}

#[test]
fn nbdkit_error_filter_gives_error_chunks() {
    if !support::require(&["nbdkit", "nbdsh"]) {
        return;
    }
    // A fresh nbdkit: it may abort if a structured-reply client vanishes mid-read.
    let peer = Peer::nbdkit(&[
        "--filter=error",
        "memory",
        "4M",
        "error=EIO",
        "error-pread-rate=100%",
    ]);
    let mut trace = Trace::start(&peer.addr().to_string());
    let script = "h.pwrite(b'x' * 4096, 0)\ntry:\n    h.pread(4096, 0)\n    print('no error')\nexcept nbd.Error as e:\n    print(e.errno)";
    let out = support::run_ok(&mut support::nbdsh(&["-u", &trace.uri(""), "-c", script]));
    assert_eq!(out.trim(), "EIO");

    let log = trace.settle();
    expect_clean(&log);
    expect_line(&log, &["S->C simple reply", "to NBD_CMD_WRITE ok"]);
    expect_line(
        &log,
        &[
            "S->C structured chunk NBD_REPLY_TYPE_ERROR",
            "to NBD_CMD_READ",
            "flags=0x1[DONE]",
            "error=NBD_EIO message=\"\"",
        ],
    );
}

/// Writes 64 KiB at 4 KiB and reads it back with nbdsh; prints "ok".
const NBDSH_ROUNDTRIP: &str = "data = bytes(range(256)) * 256\nh.pwrite(data, 4096)\nassert h.pread(65536, 4096) == data\nprint('ok')";

#[test]
fn nbdkit_without_structured_replies_gives_simple_replies() {
    if !support::require(&["nbdkit", "nbdsh"]) {
        return;
    }
    let peer = Peer::nbdkit(&["--no-sr", "memory", "1M"]);
    let mut trace = Trace::start(&peer.addr().to_string());
    let out = support::run_ok(&mut support::nbdsh(&[
        "-u",
        &trace.uri(""),
        "-c",
        NBDSH_ROUNDTRIP,
    ]));
    assert_eq!(out.trim(), "ok");

    let log = trace.settle();
    expect_clean(&log);
    expect_line(
        &log,
        &["S->C NBD_REP_ERR_UNSUP to NBD_OPT_STRUCTURED_REPLY"],
    );
    expect_line(
        &log,
        &["S->C NBD_REP_ACK to NBD_OPT_GO (transmission starts: simple replies)"],
    );
    expect_line(
        &log,
        &[
            "C->S NBD_CMD_WRITE compact",
            "offset=4096 len=65536",
            "payload=65536 bytes",
        ],
    );
    expect_line(
        &log,
        &["S->C simple reply", "to NBD_CMD_READ ok data=65536 bytes"],
    );
    expect_no_line(&log, &["chunk"]);
}

#[test]
fn nbdkit_oldstyle_through_a_tcp_listener() {
    if !support::require(&["nbdkit", "nbdsh"]) {
        return;
    }
    // Mixed transports: the proxy listens on TCP and forwards to a Unix socket.
    let peer = Peer::nbdkit(&["-o", "memory", "1M"]);
    let mut trace = Trace::start_with(&peer.addr().to_string(), true, &[]);
    assert!(trace.uri("").starts_with("nbd://127.0.0.1:"));
    let out = support::run_ok(&mut support::nbdsh(&[
        "-u",
        &trace.uri(""),
        "-c",
        NBDSH_ROUNDTRIP,
    ]));
    assert_eq!(out.trim(), "ok");

    let log = trace.settle();
    expect_clean(&log);
    expect_line(
        &log,
        &[
            "S->C oldstyle hello size=1048576 flags=",
            "HAS_FLAGS",
            "(transmission starts: simple replies)",
        ],
    );
    expect_line(
        &log,
        &["S->C simple reply", "to NBD_CMD_READ ok data=65536 bytes"],
    );
    expect_no_line(&log, &["client flags"]);
    expect_no_line(&log, &["NBD_OPT"]);
}

#[test]
fn nbd_server_reference_implementation() {
    if !support::require(&["nbd-server", "nbdinfo", "nbdcopy"]) {
        return;
    }
    let dir = TestDir::new();
    let img = dir.zero_file("disk.raw", 8 * MIB);
    let (src, src_data) = source(&dir, "src.raw", 8 * MIB, 41);
    let out = dir.data_path("out.raw");
    let peer = Peer::nbd_server(&img, &["flush = true", "fua = true", "trim = true"]);
    let mut trace = Trace::start(&peer.addr().to_string());
    let uri = trace.uri("disk");

    let list = support::run_ok(Command::new("nbdinfo").args(["--list", &uri]));
    assert!(list.contains("export=\"disk\""), "{list}");
    support::run_ok(Command::new("nbdcopy").arg(&src).arg(&uri));
    support::run_ok(Command::new("nbdcopy").arg(&uri).arg(&out));
    assert_same("copied-out data", &fs::read(&out).unwrap(), &src_data);
    assert_same("export file", &fs::read(&img).unwrap(), &src_data);

    let log = trace.settle();
    expect_clean(&log);
    expect_line(
        &log,
        &[
            "S->C NBD_REP_ERR_UNSUP to NBD_OPT_STRUCTURED_REPLY",
            "message=",
        ],
    );
    expect_line(&log, &["S->C NBD_REP_SERVER to NBD_OPT_LIST name=\"disk\""]);
    // nbd-server 3.24 reports size 0 to NBD_OPT_INFO, the right size to NBD_OPT_GO.
    expect_line(
        &log,
        &["S->C NBD_REP_INFO to NBD_OPT_INFO NBD_INFO_EXPORT size=0"],
    );
    expect_line(
        &log,
        &["S->C NBD_REP_INFO to NBD_OPT_GO NBD_INFO_EXPORT size=8388608"],
    );
    expect_line(&log, &["C->S NBD_CMD_WRITE compact", "payload="]);
    expect_line(&log, &["S->C simple reply", "to NBD_CMD_READ ok data="]);
    expect_no_line(&log, &["chunk"]);
}

#[test]
fn starttls_is_forwarded_raw() {
    if !support::require(&["nbdkit", "nbdinfo"]) {
        return;
    }
    let config = support::run_ok(Command::new("nbdkit").arg("--dump-config"));
    if !config.lines().any(|l| l == "tls=yes") {
        let msg = format!("{}: nbdkit was built without TLS", support::test_name());
        assert!(!support::interop_required(), "NBD_INTEROP=required: {msg}");
        let _ = writeln!(std::io::stderr(), "SKIP {msg}");
        return;
    }
    let dir = TestDir::new();
    let psk = dir.join("keys.psk");
    let key: String = support::pattern(51, 0, 32)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    fs::write(&psk, format!("alice:{key}\n")).unwrap();
    let psk_arg = format!("--tls-psk={}", psk.display());
    let peer = Peer::nbdkit(&["--tls=require", &psk_arg, "memory", "3M"]);
    let mut trace = Trace::start(&peer.addr().to_string());
    let uri = format!(
        "nbds+unix://alice@/?socket={}&tls-psk-file={}",
        trace.socket().display(),
        psk.display()
    );
    let size = support::run_ok(Command::new("nbdinfo").args(["--size", &uri]));
    assert_eq!(size.trim(), (3 * MIB).to_string());

    let log = trace.settle();
    expect_clean(&log);
    expect_line(&log, &["C->S NBD_OPT_STARTTLS"]);
    expect_line(
        &log,
        &["S->C NBD_REP_ACK to NBD_OPT_STARTTLS (TLS handshake follows: forwarding both directions undecoded from here)"],
    );
    // Everything after the acknowledgement is encrypted: nothing more is decoded.
    expect_no_line(&log, &["NBD_OPT_GO"]);
    expect_no_line(&log, &["NBD_CMD"]);
}

/// A minimal client speaking `NBD_OPT_EXPORT_NAME`, written with the crate's codecs: reads
/// 4 KiB at offset 0 and checks it is zero.
fn export_name_client(socket: &Path, no_zeroes: bool) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; Greeting::LEN];
    s.read_exact(&mut buf).unwrap();
    let Hello::Newstyle(g) = Hello::parse(&buf).unwrap() else {
        panic!("oldstyle")
    };
    assert!(g.flags.contains(HandshakeFlags::NO_ZEROES));
    let mut flags = ClientFlags::FIXED_NEWSTYLE;
    if no_zeroes {
        flags |= ClientFlags::NO_ZEROES;
    }
    s.write_all(&emit(4, |b| flags.emit(b))).unwrap();
    let opt = Opt::ExportName { name: "" };
    s.write_all(&emit(opt.buffer_len(), |b| opt.emit(b)))
        .unwrap();
    let mut reply = vec![
        0u8;
        if no_zeroes {
            ExportNameReply::SHORT_LEN
        } else {
            ExportNameReply::LONG_LEN
        }
    ];
    s.read_exact(&mut reply).unwrap();
    let r = ExportNameReply::parse(&reply, !no_zeroes).unwrap();
    assert_eq!(r.size, MIB);
    let read = Request {
        flags: CmdFlags::empty(),
        command: Cmd::Read,
        cookie: Cookie(7),
        offset: 0,
        len: 4096,
        extended: false,
    };
    s.write_all(&emit(read.buffer_len(), |b| read.emit(b)))
        .unwrap();
    let mut head = [0u8; SimpleReply::LEN];
    s.read_exact(&mut head).unwrap();
    assert_eq!(
        ReplyHeader::parse(&head).unwrap(),
        ReplyHeader::Simple(SimpleReply {
            error: None,
            cookie: Cookie(7)
        })
    );
    let mut data = vec![0xffu8; 4096];
    s.read_exact(&mut data).unwrap();
    assert!(data.iter().all(|&b| b == 0));
    let disc = Request {
        command: Cmd::Disc,
        cookie: Cookie(8),
        len: 0,
        ..read
    };
    s.write_all(&emit(disc.buffer_len(), |b| disc.emit(b)))
        .unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "bytes after NBD_CMD_DISC: {rest:?}");
}

#[test]
fn export_name_reply_with_and_without_zero_padding() {
    if !support::require(&["nbdkit"]) {
        return;
    }
    let peer = Peer::nbdkit(&["memory", "1M"]);
    let mut trace = Trace::start(&peer.addr().to_string());
    export_name_client(trace.socket(), true);
    export_name_client(trace.socket(), false);

    let log = trace.settle();
    expect_clean(&log);
    expect_line(
        &log,
        &["[1] C->S client flags 0x3[FIXED_NEWSTYLE|NO_ZEROES]"],
    );
    expect_line(&log, &["[2] C->S client flags 0x1[FIXED_NEWSTYLE]"]);
    expect_line(&log, &["C->S NBD_OPT_EXPORT_NAME name=\"\""]);
    expect_line(
        &log,
        &[
            "[1] S->C NBD_OPT_EXPORT_NAME reply size=1048576",
            "(no zero padding) (transmission starts: simple replies)",
        ],
    );
    expect_line(
        &log,
        &[
            "[2] S->C NBD_OPT_EXPORT_NAME reply size=1048576",
            "(with 124 zero bytes)",
        ],
    );
    for c in ["[1]", "[2]"] {
        expect_line(
            &log,
            &[
                c,
                "S->C simple reply cookie=0x7 to NBD_CMD_READ ok data=4096 bytes",
            ],
        );
        expect_line(&log, &[c, "C->S NBD_CMD_DISC compact cookie=0x8"]);
    }
}

#[test]
fn concurrent_clients_get_their_own_connection() {
    if !support::require(&["nbdkit", "nbdsh"]) {
        return;
    }
    let peer = Peer::nbdkit(&["memory", "4M"]);
    let mut trace = Trace::start(&peer.addr().to_string());
    let uri = trace.uri("");
    let clients: Vec<_> = (0..4u64)
        .map(|i| {
            let uri = uri.clone();
            thread::spawn(move || {
                let script = format!(
                    "import time\ndata = bytes([{}]) * 262144\nfor k in range(4):\n    h.pwrite(data, {} + k * 262144)\n    time.sleep(0.02)\nassert h.pread(1048576, {}) == data * 4\nprint('ok')",
                    i + 1,
                    i * MIB,
                    i * MIB
                );
                support::run_ok(&mut support::nbdsh(&["-u", &uri, "-c", &script]))
            })
        })
        .collect();
    for c in clients {
        assert_eq!(c.join().unwrap().trim(), "ok");
    }
    let log = trace.settle();
    expect_clean(&log);
    for c in 1..=4 {
        let p = format!("[{c}]");
        assert_eq!(
            count(&log, &format!("{p} C->S NBD_CMD_WRITE compact")),
            4,
            "{log}"
        );
        expect_line(
            &log,
            &[
                &p,
                "S->C structured chunk NBD_REPLY_TYPE_OFFSET_DATA",
                "data=1048576 bytes",
            ],
        );
        expect_line(&log, &[&p, "closed:"]);
    }
}

#[test]
fn quiet_mode_prints_summaries_and_max_conns_exits() {
    if !support::require(&["nbdkit", "nbdinfo"]) {
        return;
    }
    let peer = Peer::nbdkit_tcp(&["memory", "2M"]);
    let mut trace = Trace::start_with(
        &peer.addr().to_string(),
        true,
        &["--quiet", "--max-conns", "2"],
    );
    for _ in 0..2 {
        let size = support::run_ok(Command::new("nbdinfo").args(["--size", &trace.uri("")]));
        assert_eq!(size.trim(), (2 * MIB).to_string());
    }
    let status = trace
        .proc
        .wait_timeout(Duration::from_secs(20))
        .expect("nbd-trace did not exit after --max-conns connections");
    assert!(status.success(), "{status}");
    let log = trace.log();
    expect_only_totals(&log);
    assert_eq!(log.lines().count(), 3, "{log}");
    expect_line(&log, &["[total] 2 connections"]);
    expect_line(
        &log,
        &["[total] C->S summary:", "NBD_OPT_GO=2", "client flags=2"],
    );
    expect_line(&log, &["[total] S->C summary:", "greeting=2"]);
    // The listening line goes to stderr.
    assert!(
        trace
            .proc
            .stderr()
            .contains("nbd-trace: listening on 127.0.0.1:"),
        "{}",
        trace.proc.stderr()
    );
}

/// Panics unless every line of a `--quiet` trace is a `[total]` summary line.
#[track_caller]
fn expect_only_totals(log: &str) {
    for line in log.lines() {
        assert!(
            line.starts_with("[total] ")
                && (line.contains(" connections") || line.contains(" summary: ")),
            "unexpected line in --quiet output: {line:?}\n{log}"
        );
    }
}

#[test]
fn quiet_mode_prints_the_summary_on_sigterm() {
    if !support::require(&["nbdkit", "nbdinfo", "kill"]) {
        return;
    }
    let peer = Peer::nbdkit(&["memory", "2M"]);
    let mut trace = Trace::start_with(&peer.addr().to_string(), false, &["--quiet"]);
    let size = support::run_ok(Command::new("nbdinfo").args(["--size", &trace.uri("")]));
    assert_eq!(size.trim(), (2 * MIB).to_string());
    // Nothing but the listening line (on stderr) until the proxy exits.
    assert_eq!(trace.log(), "", "--quiet printed before exiting");
    signal(trace.proc.pid(), "-TERM");
    let status = trace
        .proc
        .wait_timeout(Duration::from_secs(20))
        .expect("nbd-trace did not exit on SIGTERM");
    assert_eq!(status.code(), Some(0), "{status}");
    let log = trace.log();
    expect_only_totals(&log);
    assert_eq!(log.lines().count(), 3, "{log}");
    // nbdinfo has its size, so every option and reply up to the GO is counted (the
    // NBD_CMD_DISC may still be on its way).
    expect_line(&log, &["[total] 1 connections"]);
    expect_line(
        &log,
        &[
            "[total] C->S summary:",
            "NBD_OPT_GO=1",
            "NBD_OPT_STRUCTURED_REPLY=1",
            "client flags=1",
        ],
    );
    expect_line(
        &log,
        &[
            "[total] S->C summary:",
            "NBD_REP_ACK=2",
            "NBD_REP_INFO=",
            "greeting=1",
        ],
    );
    expect_no_line(&log, &["decode error"]);
    // The Unix socket is gone with the proxy.
    assert!(!trace.socket().exists(), "socket left behind");
}

// ---------------------------------------------------------------------------------------------
// Scripted sessions: no external peer needed
// ---------------------------------------------------------------------------------------------

/// Encodes with `f` into a fresh buffer of `len` bytes.
fn emit(len: usize, f: impl FnOnce(&mut [u8]) -> nbd_proto::wire::Result<usize>) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let n = f(&mut buf).unwrap();
    assert_eq!(n, len);
    buf
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Client,
    Server,
}

/// A byte-exact session: messages in the order they are sent. Each side sends its own and
/// waits for exactly the bytes of the other's, so the exchange is lock-step.
#[derive(Default)]
struct Script(Vec<(Side, Vec<u8>)>);

impl Script {
    fn c(&mut self, bytes: Vec<u8>) -> &mut Self {
        self.0.push((Side::Client, bytes));
        self
    }

    fn s(&mut self, bytes: Vec<u8>) -> &mut Self {
        self.0.push((Side::Server, bytes));
        self
    }

    fn opt(&mut self, opt: Opt<'_>) -> &mut Self {
        self.c(emit(opt.buffer_len(), |b| opt.emit(b)))
    }

    fn rep(&mut self, code: OptCode, reply: OptReply<'_>) -> &mut Self {
        self.s(emit(reply.buffer_len(), |b| reply.emit(code, b)))
    }

    fn req(&mut self, r: Request, payload: &[u8]) -> &mut Self {
        let mut bytes = emit(r.buffer_len(), |b| r.emit(b));
        bytes.extend_from_slice(payload);
        self.c(bytes)
    }

    fn simple(&mut self, cookie: u64, error: Option<Errno>, data: &[u8]) -> &mut Self {
        let r = SimpleReply {
            error,
            cookie: Cookie(cookie),
        };
        let mut bytes = emit(SimpleReply::LEN, |b| r.emit(b));
        bytes.extend_from_slice(data);
        self.s(bytes)
    }

    /// A chunk (extended when `offset` is `Some`) with an already encoded payload.
    fn chunk(
        &mut self,
        t: ChunkType,
        cookie: u64,
        done: bool,
        offset: Option<u64>,
        payload: &[u8],
    ) -> &mut Self {
        let h = ChunkHeader {
            flags: if done {
                ReplyFlags::DONE
            } else {
                ReplyFlags::empty()
            },
            chunk_type: t,
            cookie: Cookie(cookie),
            offset,
            len: payload.len() as u64,
        };
        let mut bytes = emit(h.buffer_len(), |b| h.emit(b));
        bytes.extend_from_slice(payload);
        self.s(bytes)
    }

    fn bytes(&self, side: Side) -> Vec<u8> {
        self.0
            .iter()
            .filter(|m| m.0 == side)
            .flat_map(|m| m.1.clone())
            .collect()
    }
}

fn request(
    command: Cmd,
    cookie: u64,
    offset: u64,
    len: u64,
    flags: CmdFlags,
    extended: bool,
) -> Request {
    Request {
        flags,
        command,
        cookie: Cookie(cookie),
        offset,
        len,
        extended,
    }
}

fn block_status_payload(id: u32, extents: &[Extent], wide: bool) -> Vec<u8> {
    let h = BlockStatusHeader {
        context_id: id,
        count: extents.len() as u64,
        wide,
    };
    let fixed = BlockStatusHeader::len(wide);
    let mut bytes = vec![0u8; fixed + extents.len() * Extent::width(wide)];
    h.emit(&mut bytes).unwrap();
    emit_extents(extents, wide, &mut bytes[fixed..]).unwrap();
    bytes
}

fn offset_data(offset: u64, data: &[u8]) -> Vec<u8> {
    let h = OffsetDataHeader {
        offset,
        data_len: data.len() as u64,
    };
    let mut bytes = emit(OffsetDataHeader::LEN, |b| h.emit(b));
    bytes.extend_from_slice(data);
    bytes
}

fn error_chunk(error: Errno, message: &str, offset: Option<u64>) -> Vec<u8> {
    let e = ErrorChunk {
        error,
        message,
        offset,
    };
    emit(e.buffer_len(), |b| e.emit(b))
}

/// Runs one side of `script` on `s`: sends its messages (in pieces of 1 to 7 bytes when
/// `dribble`), reads exactly the other side's, then half-closes and reads to EOF. Returns
/// everything received.
fn play(mut s: UnixStream, script: &Script, me: Side, dribble: bool) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = Vec::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (me as u64);
    for (side, bytes) in &script.0 {
        if *side == me {
            if dribble {
                let mut at = 0;
                while at < bytes.len() {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let n = (1 + (rng % 7) as usize).min(bytes.len() - at);
                    s.write_all(&bytes[at..at + n]).unwrap();
                    at += n;
                }
            } else {
                s.write_all(bytes).unwrap();
            }
        } else {
            let mut buf = vec![0u8; bytes.len()];
            s.read_exact(&mut buf)
                .unwrap_or_else(|e| panic!("{me:?} waiting for {} bytes: {e}", bytes.len()));
            got.extend_from_slice(&buf);
        }
    }
    s.shutdown(Shutdown::Write).unwrap();
    s.read_to_end(&mut got).unwrap();
    got
}

/// Plays `script` between a fake client and a fake server through `nbd-trace`, checks that
/// every byte arrived unchanged in both directions, and returns the trace.
fn run_script(script: &Script, dribble: bool) -> String {
    let (mut trace, _dir) = run_script_with(script, dribble, &[]);
    trace.settle()
}

/// Like [`run_script`], with `extra` arguments for the proxy; returns it still running (and
/// the fake server's directory), once both fake peers have seen the end of their stream.
fn run_script_with(script: &Script, dribble: bool, extra: &[&str]) -> (Trace, TestDir) {
    let dir = TestDir::new();
    let server_sock = dir.join("fake-server.sock");
    let listener = UnixListener::bind(&server_sock).unwrap();
    let trace = Trace::start_with(&format!("unix:{}", server_sock.display()), false, extra);
    thread::scope(|scope| {
        let server = scope.spawn(|| {
            let (s, _) = listener.accept().unwrap();
            play(s, script, Side::Server, dribble)
        });
        let client = UnixStream::connect(trace.socket()).unwrap();
        let client_got = play(client, script, Side::Client, dribble);
        let server_got = server.join().unwrap();
        assert_same(
            "bytes the client received",
            &client_got,
            &script.bytes(Side::Server),
        );
        assert_same(
            "bytes the server received",
            &server_got,
            &script.bytes(Side::Client),
        );
    });
    (trace, dir)
}

/// The lines of one direction of connection 1, without the stream-end bookkeeping.
fn direction(log: &str, dir: &str) -> Vec<String> {
    let prefix = format!("[1] {dir} ");
    log.lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// A structured-reply session with every message type real peers rarely or never send.
fn structured_script() -> Script {
    let payload: Vec<u8> = support::pattern(61, 0, 20_000);
    let extents: Vec<Extent> = (0..9000u64)
        .map(|i| Extent {
            len: 4096,
            status: i % 4,
        })
        .collect();
    let big_option = vec![0x5au8; 70_000];
    let mut s = Script::default();
    s.s(emit(Greeting::LEN, |b| {
        Greeting {
            flags: HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES,
        }
        .emit(b)
    }))
    .c(emit(4, |b| {
        (ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES).emit(b)
    }))
    .opt(Opt::Unknown {
        code: 99,
        data: b"xyz",
    })
    .rep(
        OptCode::Unknown(99),
        OptReply::Error {
            error: OptError::Unsup,
            message: "what is 99?",
        },
    )
    .opt(Opt::StructuredReply)
    .rep(OptCode::StructuredReply, OptReply::Ack)
    .opt(Opt::List)
    .rep(
        OptCode::List,
        OptReply::Server {
            name: "disk",
            description: "a test disk",
        },
    )
    .rep(OptCode::List, OptReply::Ack)
    .opt(Opt::ListMetaContext(MetaContextRequest {
        export: "disk",
        queries: Queries::new(&["base:"]),
    }))
    .rep(
        OptCode::ListMetaContext,
        OptReply::MetaContext {
            id: 0,
            name: "base:allocation",
        },
    )
    .rep(OptCode::ListMetaContext, OptReply::Ack)
    .opt(Opt::SetMetaContext(MetaContextRequest {
        export: "disk",
        queries: Queries::new(&["base:allocation", "qemu:dirty-bitmap:bm0"]),
    }))
    .rep(
        OptCode::SetMetaContext,
        OptReply::MetaContext {
            id: 1,
            name: "base:allocation",
        },
    )
    .rep(
        OptCode::SetMetaContext,
        OptReply::MetaContext {
            id: 2,
            name: "qemu:dirty-bitmap:bm0",
        },
    )
    .rep(OptCode::SetMetaContext, OptReply::Ack)
    .opt(Opt::Info(ExportRequest {
        name: "disk",
        infos: InfoList::new(&[
            InfoType::Name,
            InfoType::Description,
            InfoType::BlockSize,
            InfoType::Unknown(42),
        ]),
    }))
    .rep(
        OptCode::Info,
        OptReply::Info(Info::Export {
            size: 1 << 30,
            flags: TransmissionFlags::HAS_FLAGS
                | TransmissionFlags::SEND_FLUSH
                | TransmissionFlags::SEND_DF,
        }),
    )
    .rep(OptCode::Info, OptReply::Info(Info::Name("disk")))
    .rep(
        OptCode::Info,
        OptReply::Info(Info::Description("a test disk")),
    )
    .rep(
        OptCode::Info,
        OptReply::Info(Info::BlockSize(BlockSize {
            min: 512,
            preferred: 4096,
            max_payload: 1 << 25,
        })),
    )
    .rep(
        OptCode::Info,
        OptReply::Info(Info::Unknown {
            info: 42,
            data: b"??",
        }),
    )
    .rep(OptCode::Info, OptReply::Ack)
    .opt(Opt::Unknown {
        code: 100,
        data: &big_option,
    })
    .rep(
        OptCode::Unknown(100),
        OptReply::Error {
            error: OptError::TooBig,
            message: "",
        },
    )
    .opt(Opt::Go(ExportRequest {
        name: "disk",
        infos: InfoList::new(&[InfoType::BlockSize]),
    }))
    .rep(
        OptCode::Go,
        OptReply::Info(Info::Export {
            size: 1 << 30,
            flags: TransmissionFlags::HAS_FLAGS,
        }),
    )
    .rep(OptCode::Go, OptReply::Ack)
    // Transmission.
    .req(
        request(Cmd::Write, 1, 0, 20_000, CmdFlags::FUA, false),
        &payload,
    )
    .simple(1, None, &[])
    .req(
        request(Cmd::Read, 2, 0, 30_000, CmdFlags::empty(), false),
        &[],
    )
    .chunk(
        ChunkType::OffsetData,
        2,
        false,
        None,
        &offset_data(0, &payload),
    )
    .chunk(
        ChunkType::OffsetHole,
        2,
        true,
        None,
        &emit(12, |b| {
            OffsetHole {
                offset: 20_000,
                len: 10_000,
            }
            .emit(b)
        }),
    )
    .req(request(Cmd::Read, 3, 8192, 4096, CmdFlags::DF, false), &[])
    .chunk(
        ChunkType::ErrorOffset,
        3,
        false,
        None,
        &error_chunk(Errno::Io, "bad sector", Some(8192)),
    )
    .chunk(ChunkType::None, 3, true, None, &[])
    .req(
        request(Cmd::BlockStatus, 4, 0, 1 << 30, CmdFlags::empty(), false),
        &[],
    )
    .chunk(
        ChunkType::BlockStatus,
        4,
        false,
        None,
        &block_status_payload(1, &extents, false),
    )
    .chunk(
        ChunkType::BlockStatus,
        4,
        true,
        None,
        &block_status_payload(
            2,
            &[Extent {
                len: 1 << 20,
                status: 1,
            }],
            false,
        ),
    )
    .req(
        request(Cmd::Unknown(99), 5, 0, 0, CmdFlags::empty(), false),
        &[],
    )
    .chunk(ChunkType::Unknown(0x77), 5, false, None, b"hello")
    .chunk(
        ChunkType::Error,
        5,
        true,
        None,
        &error_chunk(Errno::Inval, "unknown command", None),
    )
    .req(request(Cmd::Trim, 6, 0, 4096, CmdFlags::FUA, false), &[])
    .simple(6, Some(Errno::Perm), &[])
    // A simple read reply carries data whose length only the request knows.
    .req(
        request(Cmd::Read, 7, 512, 3000, CmdFlags::empty(), false),
        &[],
    )
    .simple(7, None, &payload[..3000])
    .req(request(Cmd::Disc, 8, 0, 0, CmdFlags::empty(), false), &[]);
    s
}

fn check_structured_trace(log: &str) {
    let c = |parts: &[&str]| expect_line(log, parts);
    c(&["[1] C->S client flags 0x3[FIXED_NEWSTYLE|NO_ZEROES]"]);
    c(&["[1] C->S unknown(0x63) data=3 bytes"]);
    c(&["[1] S->C NBD_REP_ERR_UNSUP to unknown(0x63) message=\"what is 99?\""]);
    c(&["[1] S->C NBD_REP_SERVER to NBD_OPT_LIST name=\"disk\" description=\"a test disk\""]);
    c(&["[1] C->S NBD_OPT_LIST_META_CONTEXT export=\"disk\" queries=[\"base:\"]"]);
    c(&[
        "[1] S->C NBD_REP_META_CONTEXT to NBD_OPT_LIST_META_CONTEXT id=0 name=\"base:allocation\"",
    ]);
    c(&["[1] C->S NBD_OPT_SET_META_CONTEXT export=\"disk\" queries=[\"base:allocation\",\"qemu:dirty-bitmap:bm0\"]"]);
    c(&["[1] C->S NBD_OPT_INFO name=\"disk\" info_requests=[NBD_INFO_NAME,NBD_INFO_DESCRIPTION,NBD_INFO_BLOCK_SIZE,unknown(0x2a)]"]);
    c(&["[1] S->C NBD_REP_INFO to NBD_OPT_INFO NBD_INFO_EXPORT size=1073741824 flags=0x85[HAS_FLAGS|SEND_FLUSH|SEND_DF]"]);
    c(&["[1] S->C NBD_REP_INFO to NBD_OPT_INFO NBD_INFO_NAME name=\"disk\""]);
    c(&["[1] S->C NBD_REP_INFO to NBD_OPT_INFO NBD_INFO_DESCRIPTION description=\"a test disk\""]);
    c(&["[1] S->C NBD_REP_INFO to NBD_OPT_INFO NBD_INFO_BLOCK_SIZE min=512 preferred=4096 max_payload=33554432"]);
    c(&["[1] S->C NBD_REP_INFO to NBD_OPT_INFO unknown(0x2a) data=2 bytes"]);
    c(&["[1] C->S unknown(0x64) with 70000 bytes of data (too long to decode, skipped)"]);
    c(&["[1] S->C NBD_REP_ERR_TOO_BIG to unknown(0x64) message=\"\""]);
    c(&["[1] S->C NBD_REP_ACK to NBD_OPT_GO (transmission starts: structured replies)"]);
    c(&["[1] C->S NBD_CMD_WRITE compact cookie=0x1 offset=0 len=20000 flags=0x1[FUA] payload=20000 bytes"]);
    c(&["[1] S->C simple reply cookie=0x1 to NBD_CMD_WRITE ok"]);
    c(&["[1] S->C structured chunk NBD_REPLY_TYPE_OFFSET_DATA cookie=0x2 to NBD_CMD_READ len=20008 flags=0 offset=0 data=20000 bytes"]);
    c(&["[1] S->C structured chunk NBD_REPLY_TYPE_OFFSET_HOLE cookie=0x2 to NBD_CMD_READ len=12 flags=0x1[DONE] offset=20000 hole=10000"]);
    c(&["[1] C->S NBD_CMD_READ compact cookie=0x3 offset=8192 len=4096 flags=0x4[DF]"]);
    c(&["[1] S->C structured chunk NBD_REPLY_TYPE_ERROR_OFFSET cookie=0x3 to NBD_CMD_READ len=24 flags=0 error=NBD_EIO message=\"bad sector\" offset=8192"]);
    c(&["[1] S->C structured chunk NBD_REPLY_TYPE_NONE cookie=0x3 to NBD_CMD_READ len=0 flags=0x1[DONE]"]);
    c(&["[1] S->C structured chunk NBD_REPLY_TYPE_BLOCK_STATUS cookie=0x4 to NBD_CMD_BLOCK_STATUS len=72004 flags=0 context=1(base:allocation) extents=9000 [(4096,0) (4096,1) (4096,2) (4096,3) ...]"]);
    c(&["[1] S->C structured chunk NBD_REPLY_TYPE_BLOCK_STATUS cookie=0x4 to NBD_CMD_BLOCK_STATUS len=12 flags=0x1[DONE] context=2(qemu:dirty-bitmap:bm0) extents=1 [(1048576,1)]"]);
    c(&["[1] C->S unknown(0x63) compact cookie=0x5"]);
    c(&["[1] S->C structured chunk unknown(0x77) cookie=0x5 to unknown(0x63) len=5 flags=0 payload=5 bytes"]);
    c(&["[1] S->C structured chunk NBD_REPLY_TYPE_ERROR cookie=0x5 to unknown(0x63) len=21 flags=0x1[DONE] error=NBD_EINVAL message=\"unknown command\""]);
    c(&["[1] S->C simple reply cookie=0x6 to NBD_CMD_TRIM error=NBD_EPERM"]);
    c(&["[1] S->C simple reply cookie=0x7 to NBD_CMD_READ ok data=3000 bytes"]);
    c(&["[1] C->S NBD_CMD_DISC compact cookie=0x8"]);
    c(&["[1] C->S end of stream after"]);
    c(&["[1] S->C end of stream after"]);
    // Only the oversized option is expected among the anomaly words.
    for a in ANOMALIES {
        if *a != "too long to decode" {
            expect_no_line(log, &[a]);
        }
    }
    assert_eq!(count(log, "too long to decode"), 1, "{log}");
}

#[test]
fn scripted_structured_session_decodes_every_message() {
    let script = structured_script();
    let log = run_script(&script, false);
    check_structured_trace(&log);
    // The same bytes in pieces of 1 to 7 bytes give the same trace.
    let dribbled = run_script(&script, true);
    check_structured_trace(&dribbled);
    for dir in ["C->S", "S->C"] {
        assert_eq!(
            direction(&log, dir),
            direction(&dribbled, dir),
            "{dir} differs when dribbled"
        );
    }
}

fn extended_script() -> Script {
    let payload = support::pattern(71, 0, 5000);
    let ids = [1u32, 2];
    let bs = BlockStatusPayload {
        effect_len: 1 << 20,
        ids: ContextIds::new(&ids),
    };
    let bs_bytes = emit(bs.buffer_len(), |b| bs.emit(b));
    let mut s = Script::default();
    s.s(emit(Greeting::LEN, |b| {
        Greeting {
            flags: HandshakeFlags::FIXED_NEWSTYLE,
        }
        .emit(b)
    }))
    // The server did not offer NO_ZEROES; the client asks anyway (the trace just shows it).
    .c(emit(4, |b| ClientFlags::FIXED_NEWSTYLE.emit(b)))
    .opt(Opt::ExtendedHeaders)
    .rep(OptCode::ExtendedHeaders, OptReply::Ack)
    .opt(Opt::SetMetaContext(MetaContextRequest {
        export: "",
        queries: Queries::new(&["base:allocation", "qemu:allocation-depth"]),
    }))
    .rep(
        OptCode::SetMetaContext,
        OptReply::MetaContext {
            id: 1,
            name: "base:allocation",
        },
    )
    .rep(
        OptCode::SetMetaContext,
        OptReply::MetaContext {
            id: 2,
            name: "qemu:allocation-depth",
        },
    )
    .rep(OptCode::SetMetaContext, OptReply::Ack)
    .opt(Opt::Go(ExportRequest {
        name: "",
        infos: InfoList::new(&[]),
    }))
    .rep(
        OptCode::Go,
        OptReply::Info(Info::Export {
            size: 1 << 40,
            flags: TransmissionFlags::HAS_FLAGS | TransmissionFlags::BLOCK_STATUS_PAYLOAD,
        }),
    )
    .rep(OptCode::Go, OptReply::Ack)
    .req(
        request(
            Cmd::BlockStatus,
            1,
            0,
            bs_bytes.len() as u64,
            CmdFlags::PAYLOAD_LEN,
            true,
        ),
        &bs_bytes,
    )
    .chunk(
        ChunkType::BlockStatusExt,
        1,
        false,
        Some(0),
        &block_status_payload(
            1,
            &[
                Extent {
                    len: 5 << 30,
                    status: 0,
                },
                Extent {
                    len: 1 << 20,
                    status: 3,
                },
            ],
            true,
        ),
    )
    .chunk(
        ChunkType::BlockStatusExt,
        1,
        true,
        Some(0),
        &block_status_payload(
            2,
            &[Extent {
                len: 1 << 40,
                status: 2,
            }],
            true,
        ),
    )
    .req(
        request(
            Cmd::Write,
            2,
            1 << 35,
            payload.len() as u64,
            CmdFlags::PAYLOAD_LEN,
            true,
        ),
        &payload,
    )
    .chunk(ChunkType::None, 2, true, Some(1 << 35), &[])
    .req(
        request(Cmd::Read, 3, 1 << 35, 5000, CmdFlags::empty(), true),
        &[],
    )
    .chunk(
        ChunkType::OffsetData,
        3,
        true,
        Some(1 << 35),
        &offset_data(1 << 35, &payload),
    )
    .req(
        request(Cmd::Read, 4, 0, 8 << 30, CmdFlags::empty(), true),
        &[],
    )
    .chunk(
        ChunkType::OffsetHole,
        4,
        false,
        Some(0),
        &emit(12, |b| {
            OffsetHole {
                offset: 0,
                len: 1 << 31,
            }
            .emit(b)
        }),
    )
    .chunk(
        ChunkType::Error,
        4,
        true,
        Some(0),
        &error_chunk(Errno::Overflow, "too big", None),
    )
    .req(request(Cmd::Disc, 5, 0, 0, CmdFlags::empty(), true), &[]);
    s
}

fn check_extended_trace(log: &str) {
    let c = |parts: &[&str]| expect_line(log, parts);
    c(&["[1] S->C greeting newstyle, handshake flags 0x1[FIXED_NEWSTYLE]"]);
    c(&["[1] C->S client flags 0x1[FIXED_NEWSTYLE]"]);
    c(&["[1] S->C NBD_REP_ACK to NBD_OPT_EXTENDED_HEADERS (extended headers on)"]);
    c(&["[1] C->S NBD_OPT_GO name=\"\" info_requests=[]"]);
    c(&["[1] S->C NBD_REP_INFO to NBD_OPT_GO NBD_INFO_EXPORT size=1099511627776 flags=0x1001[HAS_FLAGS|BLOCK_STATUS_PAYLOAD]"]);
    c(&["[1] S->C NBD_REP_ACK to NBD_OPT_GO (transmission starts: extended headers)"]);
    c(&["[1] C->S NBD_CMD_BLOCK_STATUS extended cookie=0x1 offset=0 len=16 flags=0x20[PAYLOAD_LEN] payload: effect_len=1048576 context_ids=[1,2]"]);
    c(&["[1] S->C extended chunk NBD_REPLY_TYPE_BLOCK_STATUS_EXT cookie=0x1 to NBD_CMD_BLOCK_STATUS req_offset=0 len=40 flags=0 context=1(base:allocation) extents=2 [(5368709120,0) (1048576,3)]"]);
    c(&["[1] S->C extended chunk NBD_REPLY_TYPE_BLOCK_STATUS_EXT cookie=0x1 to NBD_CMD_BLOCK_STATUS req_offset=0 len=24 flags=0x1[DONE] context=2(qemu:allocation-depth) extents=1 [(1099511627776,2)]"]);
    c(&["[1] C->S NBD_CMD_WRITE extended cookie=0x2 offset=34359738368 len=5000 flags=0x20[PAYLOAD_LEN] payload=5000 bytes"]);
    c(&["[1] S->C extended chunk NBD_REPLY_TYPE_NONE cookie=0x2 to NBD_CMD_WRITE req_offset=34359738368 len=0 flags=0x1[DONE]"]);
    c(&["[1] S->C extended chunk NBD_REPLY_TYPE_OFFSET_DATA cookie=0x3 to NBD_CMD_READ req_offset=34359738368 len=5008 flags=0x1[DONE] offset=34359738368 data=5000 bytes"]);
    c(&["[1] C->S NBD_CMD_READ extended cookie=0x4 offset=0 len=8589934592 flags=0"]);
    c(&["[1] S->C extended chunk NBD_REPLY_TYPE_OFFSET_HOLE cookie=0x4 to NBD_CMD_READ req_offset=0 len=12 flags=0 offset=0 hole=2147483648"]);
    c(&["[1] S->C extended chunk NBD_REPLY_TYPE_ERROR cookie=0x4 to NBD_CMD_READ req_offset=0 len=13 flags=0x1[DONE] error=NBD_EOVERFLOW message=\"too big\""]);
    c(&["[1] C->S NBD_CMD_DISC extended cookie=0x5"]);
    expect_clean(log);
}

#[test]
fn scripted_extended_session_decodes_every_message() {
    let script = extended_script();
    let log = run_script(&script, false);
    check_extended_trace(&log);
    let dribbled = run_script(&script, true);
    check_extended_trace(&dribbled);
    for dir in ["C->S", "S->C"] {
        assert_eq!(
            direction(&log, dir),
            direction(&dribbled, dir),
            "{dir} differs when dribbled"
        );
    }
}

/// A session whose server answers NBD_OPT_GO with bytes that are not NBD: the S->C decode
/// error is at byte 18.
fn undecodable_script() -> Script {
    let junk = b"THIS IS NOT AN NBD OPTION REPLY, BUT IT MUST STILL REACH THE CLIENT".to_vec();
    let mut s = Script::default();
    s.s(emit(Greeting::LEN, |b| {
        Greeting {
            flags: HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES,
        }
        .emit(b)
    }))
    .c(emit(4, |b| {
        (ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES).emit(b)
    }))
    .opt(Opt::Go(ExportRequest {
        name: "x",
        infos: InfoList::new(&[]),
    }))
    .s(junk.clone())
    // More junk after the error: not decoded any more, still forwarded.
    .s(vec![0xff; 100_000])
    // The other direction keeps decoding.
    .opt(Opt::Abort)
    // Half an option header, then the client closes.
    .c(b"IHAVEOPT".to_vec());
    s
}

#[test]
fn undecodable_bytes_are_reported_once_and_forwarded_unchanged() {
    let s = undecodable_script();
    for dribble in [false, true] {
        let log = run_script(&s, dribble);
        expect_line(
            &log,
            &["[1] S->C decode error at byte 18: bad magic 0x5448495320495320: expected NBD_REP_MAGIC; forwarding the rest of this direction undecoded"],
        );
        assert_eq!(count(&log, "decode error at byte"), 1, "{log}");
        expect_line(&log, &["[1] C->S NBD_OPT_GO name=\"x\" info_requests=[]"]);
        expect_line(&log, &["[1] C->S NBD_OPT_ABORT"]);
        expect_line(
            &log,
            &["[1] C->S stream ended at byte 43 inside a message (8 bytes of it received)"],
        );
        expect_line(&log, &["[1] S->C end of stream after 100085 bytes"]);
        expect_line(
            &log,
            &["[1] closed: C->S 51 bytes (0 payload), S->C 100085 bytes (0 payload)"],
        );
        expect_line(&log, &["[1] S->C summary:", "decode error=1"]);
    }
}

#[test]
fn a_server_that_cannot_be_reached_closes_the_client() {
    let dir = TestDir::new();
    let missing = dir.join("nobody-listens.sock");
    let mut trace = Trace::start(&format!("unix:{}", missing.display()));
    let mut c = UnixStream::connect(trace.socket()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert!(got.is_empty());
    let log = trace.settle();
    expect_line(
        &log,
        &["[1] cannot connect to unix:", "nobody-listens.sock"],
    );
}

#[test]
fn quiet_mode_keeps_decode_errors_and_prints_the_summary_on_sigint() {
    if !support::require(&["kill"]) {
        return;
    }
    let (mut trace, _dir) = run_script_with(&undecodable_script(), false, &["--quiet"]);
    // Both fake peers saw the end of their streams: everything has been decoded.
    signal(trace.proc.pid(), "-INT");
    let status = trace
        .proc
        .wait_timeout(Duration::from_secs(20))
        .expect("nbd-trace did not exit on SIGINT");
    assert_eq!(status.code(), Some(0), "{status}");
    let log = trace.log();
    let mut lines = log.lines();
    assert_eq!(
        lines.next(),
        Some("[1] S->C decode error at byte 18: bad magic 0x5448495320495320: expected NBD_REP_MAGIC; forwarding the rest of this direction undecoded"),
        "{log}"
    );
    expect_only_totals(&lines.collect::<Vec<_>>().join("\n"));
    assert_eq!(log.lines().count(), 4, "{log}");
    expect_line(&log, &["[total] 1 connections"]);
    expect_line(
        &log,
        &["[total] C->S summary:", "NBD_OPT_ABORT=1", "NBD_OPT_GO=1"],
    );
    expect_line(&log, &["[total] S->C summary: decode error=1 greeting=1"]);
}
