//! Faults with real peers: injected errors, delays, servers killed mid-transfer, clients
//! that vanish mid-write, and a randomized integrity soak.
//!
//! * [`error_filter_errnos_reach_the_caller_and_data_stays_exact`]: our blocking client
//!   against `nbdkit --filter=error memory` failing 30% of reads, writes, trims, zeroes and
//!   block-status requests, each with its own errno, checked against an in-memory model.
//! * [`failed_flushes_report_eio_and_the_data_stays_exact`]: flushes failing every other
//!   time (nbdkit's `eval` plugin: the 1.32 error filter cannot fail flushes).
//! * [`delay_filter_64_requests_in_flight_complete_once_with_correct_data`]: 64 requests in
//!   flight against `nbdkit --filter=delay`.
//! * [`nbdkit_killed_mid_transfer_fails_every_command_in_flight`] and
//!   [`qemu_nbd_killed_mid_transfer_fails_every_command_in_flight`]: the server is
//!   SIGKILLed with commands outstanding.
//! * [`clients_vanishing_mid_write_do_not_disturb_other_clients`]: our in-process server
//!   (`blocking::server::serve` on a `MemoryBackend`) with clients that hang up in the
//!   middle of a write, while another client keeps working.
//! * [`soak_against_our_server`] and [`soak_against_qemu_nbd`]: a bounded randomized
//!   integrity soak against an in-memory model (`NBD_SOAK_SECS`, `NBD_SOAK_SEED`).
//!
//! Every test is bounded: loops have fixed counts or a deadline, every socket has a read
//! and write timeout ([`IO_TIMEOUT`]), so a bug makes a test fail rather than hang. Nothing
//! asserts on timing. Missing peers make a test skip (or fail with `NBD_INTEROP=required`),
//! see `support`.

mod support;

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nbd_proto::blocking::server::{serve, Export, MemoryBackend, Options};
use nbd_proto::blocking::{errno_of, BlockingClient, NoSink, Sink};
use nbd_proto::client::{ClientConfig, State};
use nbd_proto::wire::extent::STATE_ZERO;
use nbd_proto::wire::{CmdFlags, Command, Cookie, Errno, Request, TransmissionFlags};
use support::{pattern, Peer, TestDir};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Every socket read and write in these tests gives up after this long: a hang becomes a
/// failure (`WouldBlock`/`TimedOut`), never a stuck test. It is a safety net, far above
/// what any step needs.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

type Client = BlockingClient<UnixStream>;

/// A Unix socket with [`IO_TIMEOUT`] on both directions.
fn unix_stream(socket: &Path) -> UnixStream {
    let s =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// Our blocking client on `socket` (default configuration: extended headers and
/// structured replies if the server has them), selecting `contexts`.
fn connect(socket: &Path, contexts: &[&str]) -> Client {
    let mut cfg = ClientConfig::default();
    cfg.meta_contexts = contexts;
    BlockingClient::new(unix_stream(socket), &cfg)
        .unwrap_or_else(|e| panic!("NBD handshake on {}: {e}", socket.display()))
}

// ---------------------------------------------------------------------------------------------
// A small PRNG and the in-memory model of an export
// ---------------------------------------------------------------------------------------------

/// xorshift64*: small, fast, and the same sequence for the same seed everywhere.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let x = seed ^ 0x2545_F491_4F6C_DD1D;
        Rng(if x == 0 { 0x9E37_79B9_7F4A_7C15 } else { x })
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0; the bias is irrelevant here).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `percent`/100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

/// What a successful trim leaves behind, per target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TrimReads {
    /// The trimmed bytes read as zeroes (our `MemoryBackend` zeroes the range: whole pages
    /// are freed, partial pages zero-filled).
    Zeroes,
    /// Each trimmed byte reads as its old value or as zero. proto.md leaves trimmed
    /// contents unspecified until rewritten; this is the narrower truth for the peers used
    /// here, neither of which promises zeroes: qemu-nbd passes a trim to the file as a
    /// hole punch (`--discard=unmap`; without it trims are ignored) which QEMU may shrink
    /// to the discard alignment, and nbdkit's memory plugin frees or zeroes the range.
    /// (On a raw file in tmpfs qemu-nbd was seen to zero exactly, but that is not
    /// asserted.) Neither ever returns bytes other than the old ones or zeroes.
    OldOrZero,
}

/// The expected contents of an export: `data[i]` is what byte `i` reads as, except that a
/// byte with `loose[i]` (trimmed since it was last written) may also read as zero.
struct Model {
    data: Vec<u8>,
    loose: Vec<bool>,
}

impl Model {
    fn new(data: Vec<u8>) -> Model {
        let loose = vec![false; data.len()];
        Model { data, loose }
    }

    fn range(&self, offset: u64, len: usize) -> std::ops::Range<usize> {
        offset as usize..offset as usize + len
    }

    fn write(&mut self, offset: u64, bytes: &[u8]) {
        let r = self.range(offset, bytes.len());
        self.data[r.clone()].copy_from_slice(bytes);
        self.loose[r].fill(false);
    }

    fn zero(&mut self, offset: u64, len: usize) {
        let r = self.range(offset, len);
        self.data[r.clone()].fill(0);
        self.loose[r].fill(false);
    }

    fn trim(&mut self, offset: u64, len: usize, how: TrimReads) {
        match how {
            TrimReads::Zeroes => self.zero(offset, len),
            TrimReads::OldOrZero => {
                let r = self.range(offset, len);
                self.loose[r].fill(true);
            }
        }
    }

    fn may_read_as_zero(&self, i: usize) -> bool {
        self.data[i] == 0 || self.loose[i]
    }

    /// Checks bytes read at `offset`; describes the first mismatch. Compares 4 KiB at a
    /// time and looks at single bytes only where a piece differs (trimmed bytes that read
    /// as zeroes), which keeps a debug build fast.
    fn check(&self, offset: u64, got: &[u8]) -> Result<(), String> {
        let r = self.range(offset, got.len());
        if got == &self.data[r.clone()] {
            return Ok(());
        }
        const PIECE: usize = 4096;
        let mut bad = 0usize;
        let mut first = None;
        for (n, piece) in got.chunks(PIECE).enumerate() {
            let at = r.start + n * PIECE;
            if piece == &self.data[at..at + piece.len()] {
                continue;
            }
            for (k, &g) in piece.iter().enumerate() {
                let i = at + k;
                if g != self.data[i] && !(g == 0 && self.loose[i]) {
                    bad += 1;
                    first.get_or_insert(i);
                }
            }
        }
        match first {
            None => Ok(()),
            Some(i) => Err(format!(
                "{bad} mismatching byte(s) in the {}-byte read at {offset}; first at offset {i}: \
                 read {:#04x}, expected {:#04x}{}",
                got.len(),
                got[i - r.start],
                self.data[i],
                if self.loose[i] { " or 0 (trimmed)" } else { "" }
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sinks for many requests in flight
// ---------------------------------------------------------------------------------------------

/// Read buffers by cookie: each read lands in its own buffer, which holds export offsets
/// `base..base + len`.
#[derive(Default)]
struct Reads {
    bufs: HashMap<Cookie, (u64, Vec<u8>)>,
}

impl Reads {
    fn expect(&mut self, cookie: Cookie, offset: u64, len: usize) {
        let old = self.bufs.insert(cookie, (offset, vec![0xA5; len]));
        assert!(old.is_none(), "cookie {cookie} reused while in flight");
    }
}

impl Sink for Reads {
    fn read_buf(&mut self, cookie: Cookie, offset: u64, len: usize) -> &mut [u8] {
        // An unknown cookie or a range outside the read gets no buffer: the client then
        // fails with "the sink gave no buffer", which the test reports.
        match self.bufs.get_mut(&cookie) {
            Some((base, buf)) if offset >= *base => {
                let start = (offset - *base) as usize;
                buf.get_mut(start..start + len).unwrap_or(&mut [])
            }
            _ => &mut [],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Our server, in process
// ---------------------------------------------------------------------------------------------

/// `blocking::server::serve` on one shared `MemoryBackend`, a thread per connection, on a
/// Unix socket in a fresh temp dir. Connections are numbered in accept order; each one's
/// `serve` result is kept for the test to inspect.
struct OurServer {
    sock: PathBuf,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    acceptor: Option<JoinHandle<()>>,
    results: mpsc::Receiver<(usize, Result<(), String>)>,
    /// Results received while waiting for another connection's.
    early: HashMap<usize, Result<(), String>>,
    // Last: removed after the acceptor has stopped.
    _dir: TestDir,
}

impl OurServer {
    fn start(size: u64) -> OurServer {
        let dir = TestDir::named(&format!("{}-ours", support::test_name()));
        let sock = dir.join("nbd.sock");
        let listener = UnixListener::bind(&sock).expect("bind the server socket");
        let options = Arc::new(Options::new(vec![Export::new(
            "",
            Arc::new(MemoryBackend::new(size)),
        )]));
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (tx, results) = mpsc::channel();
        let acceptor = {
            let (stop, accepted) = (stop.clone(), accepted.clone());
            thread::Builder::new()
                .name("faults-acceptor".into())
                .spawn(move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(stream) = stream else { continue };
                        // The server side gets the timeouts too: a connection that stalls
                        // ends with an error instead of a thread blocked forever.
                        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
                        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
                        let id = accepted.fetch_add(1, Ordering::SeqCst);
                        let (options, tx) = (options.clone(), tx.clone());
                        thread::Builder::new()
                            .name(format!("faults-conn-{id}"))
                            .spawn(move || {
                                let r = serve(stream, &options).map_err(|e| e.to_string());
                                let _ = tx.send((id, r));
                            })
                            .expect("spawn a connection thread");
                    }
                })
                .expect("spawn the acceptor")
        };
        OurServer {
            sock,
            stop,
            accepted,
            acceptor: Some(acceptor),
            results,
            early: HashMap::new(),
            _dir: dir,
        }
    }

    fn socket(&self) -> &Path {
        &self.sock
    }

    /// Connections accepted so far.
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// What `serve` returned for connection `id`, waiting for it to end (bounded).
    fn result(&mut self, id: usize) -> Result<(), String> {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            if let Some(r) = self.early.remove(&id) {
                return r;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.results.recv_timeout(left) {
                Ok((i, r)) if i == id => return r,
                Ok((i, r)) => {
                    self.early.insert(i, r);
                }
                Err(e) => panic!("connection {id} did not end within {IO_TIMEOUT:?}: {e}"),
            }
        }
    }
}

impl Drop for OurServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor up so that it sees the flag.
        let _ = UnixStream::connect(&self.sock);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. nbdkit's error filter
// ---------------------------------------------------------------------------------------------

/// The operations of the error-filter test. Flush has no `error-flush*` parameter in
/// nbdkit's error filter (1.32 injects into pread, pwrite, trim, zero, extents and cache
/// only), so flushes must always succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Op {
    Read,
    Write,
    Trim,
    Zero,
    BlockStatus,
    Flush,
}

impl Op {
    /// The errno the filter is configured to send for this operation.
    fn injected(self) -> Option<Errno> {
        match self {
            Op::Read => Some(Errno::Io),
            Op::Write => Some(Errno::NoSpc),
            Op::Trim => Some(Errno::Perm),
            Op::Zero => Some(Errno::NoMem),
            Op::BlockStatus => Some(Errno::Inval),
            Op::Flush => None,
        }
    }
}

/// Asserts that `r` is `Ok`, or an NBD error carrying exactly the errno the filter sends
/// for `op`. Returns whether it succeeded.
fn ok_or_injected(op: Op, step: usize, r: io::Result<()>) -> bool {
    match r {
        Ok(()) => true,
        Err(e) => {
            let want = op.injected();
            assert!(
                want.is_some() && errno_of(&e) == want,
                "step {step}: {op:?} failed with {:?} ({e}); the filter only sends {want:?} \
                 for {op:?}",
                errno_of(&e)
            );
            false
        }
    }
}

/// Checks a block-status answer for `[offset, offset + len)`: extents start at `offset`,
/// are contiguous and non-empty, and a range reported as reading zeroes really does in
/// the model.
fn check_extents(model: &Model, offset: u64, len: u64, extents: &[(u32, u64, u64, u64)]) {
    assert!(
        !extents.is_empty(),
        "block status at {offset}+{len}: no extents"
    );
    let mut at = offset;
    for &(_, off, elen, status) in extents {
        assert_eq!(off, at, "extents not contiguous: {extents:?}");
        assert!(elen > 0, "empty extent: {extents:?}");
        if status & STATE_ZERO != 0 {
            let end = (off + elen).min(offset + len).min(model.data.len() as u64);
            if let Some(i) = (off as usize..end as usize).find(|&i| !model.may_read_as_zero(i)) {
                panic!(
                    "block status says {off}+{elen} reads as zeroes, but byte {i} holds {:#04x}: \
                     {extents:?}",
                    model.data[i]
                );
            }
        }
        at += elen;
    }
}

/// A random range inside `size`, `1..=max_len` bytes, at any byte offset.
fn random_range(rng: &mut Rng, size: u64, max_len: u64) -> (u64, usize) {
    let len = 1 + rng.below(max_len);
    let offset = rng.below(size - len + 1);
    (offset, len as usize)
}

/// Our client against `nbdkit --filter=error memory` with 30% error rates on reads, writes,
/// trims, zeroes and block status, a distinct errno each. A few hundred mixed operations
/// run against an in-memory model. The error filter fails a request before the plugin
/// sees it, so only successful writes, trims and zeroes change the model. Asserted:
/// * every failure carries exactly the errno configured for its operation type;
/// * every successful read returns exactly the model's bytes, and block status never calls
///   a range zero that the model says holds data;
/// * every operation type with errors configured saw both successes and failures (so the
///   test cannot pass vacuously), and flushes (which the filter cannot fail) all succeed;
/// * the connection stays usable: after every step the machine is `Ready`, and at the end
///   the whole disk reads back exactly as modelled.
#[test]
fn error_filter_errnos_reach_the_caller_and_data_stays_exact() {
    if !support::require(&["nbdkit"]) {
        return;
    }
    const SIZE: u64 = 4 * MIB;
    const STEPS: usize = 600;
    let peer = Peer::nbdkit(&[
        "--filter=error",
        "memory",
        "4M",
        "error-pread=EIO",
        "error-pread-rate=30%",
        "error-pwrite=ENOSPC",
        "error-pwrite-rate=30%",
        "error-trim=EPERM",
        "error-trim-rate=30%",
        "error-zero=ENOMEM",
        "error-zero-rate=30%",
        "error-extents=EINVAL",
        "error-extents-rate=30%",
    ]);
    let mut c = connect(peer.socket_path().unwrap(), &["base:allocation"]);
    assert_eq!(c.size(), SIZE);
    let flags = c.flags();
    for f in [
        TransmissionFlags::SEND_FLUSH,
        TransmissionFlags::SEND_TRIM,
        TransmissionFlags::SEND_WRITE_ZEROES,
    ] {
        assert!(flags.contains(f), "nbdkit memory lacks {f:?}: {flags:?}");
    }
    assert_eq!(c.contexts().len(), 1, "base:allocation not negotiated");
    // nbdkit's memory plugin starts all zeroes.
    let mut model = Model::new(vec![0; SIZE as usize]);
    let mut rng = Rng::new(0xFA_0175_0001);
    let mut seen: HashMap<Op, (usize, usize)> = HashMap::new();
    for step in 0..STEPS {
        let (offset, len) = random_range(&mut rng, SIZE, 64 * KIB);
        let op = match rng.below(100) {
            0..=27 => Op::Read,
            28..=55 => Op::Write,
            56..=67 => Op::Trim,
            68..=79 => Op::Zero,
            80..=91 => Op::BlockStatus,
            _ => Op::Flush,
        };
        let ok = match op {
            Op::Read => {
                let mut buf = vec![0xA5u8; len];
                let ok = ok_or_injected(op, step, c.read_at(&mut buf, offset));
                if ok {
                    model
                        .check(offset, &buf)
                        .unwrap_or_else(|e| panic!("step {step}: {e}"));
                }
                ok
            }
            Op::Write => {
                let data = rng.bytes(len);
                let fua = if rng.chance(20) {
                    CmdFlags::FUA
                } else {
                    CmdFlags::empty()
                };
                let ok = ok_or_injected(op, step, c.write_at(&data, offset, fua));
                if ok {
                    model.write(offset, &data);
                }
                ok
            }
            Op::Trim => {
                let ok = ok_or_injected(op, step, c.trim(offset, len as u64));
                if ok {
                    model.trim(offset, len, TrimReads::OldOrZero);
                }
                ok
            }
            Op::Zero => {
                let r = c.write_zeroes(offset, len as u64, CmdFlags::empty());
                let ok = ok_or_injected(op, step, r);
                if ok {
                    model.zero(offset, len);
                }
                ok
            }
            Op::BlockStatus => {
                let mut extents = Vec::new();
                let r = c.block_status(offset, len as u64, CmdFlags::empty(), |id, off, e| {
                    extents.push((id, off, e.len, e.status))
                });
                let ok = ok_or_injected(op, step, r);
                if ok {
                    check_extents(&model, offset, len as u64, &extents);
                }
                ok
            }
            Op::Flush => ok_or_injected(op, step, c.flush()),
        };
        let e = seen.entry(op).or_default();
        if ok {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
        assert_eq!(c.machine().state(), State::Ready, "step {step} ({op:?})");
        assert_eq!(c.in_flight(), 0, "step {step} ({op:?})");
    }
    eprintln!("error filter: (successes, failures) per operation: {seen:?}");
    for op in [Op::Read, Op::Write, Op::Trim, Op::Zero, Op::BlockStatus] {
        let (ok, failed) = seen.get(&op).copied().unwrap_or_default();
        assert!(
            ok > 0 && failed > 0,
            "{op:?}: {ok} successes and {failed} failures; both must occur: {seen:?}"
        );
    }
    let (ok, failed) = seen.get(&Op::Flush).copied().unwrap_or_default();
    assert!(ok > 0 && failed == 0, "flush: {ok} ok, {failed} failed");

    // The connection is still fine: the whole disk reads back as modelled. A piece whose
    // read fails (EIO, 30%) is retried; 40 failures in a row would happen once in 10^21.
    let mut buf = vec![0u8; (64 * KIB) as usize];
    for offset in (0..SIZE).step_by(buf.len()) {
        let mut tries = 0;
        while !ok_or_injected(Op::Read, STEPS, c.read_at(&mut buf, offset)) {
            tries += 1;
            assert!(
                tries < 40,
                "the read at {offset} failed {tries} times in a row"
            );
        }
        model
            .check(offset, &buf)
            .unwrap_or_else(|e| panic!("final check: {e}"));
    }
    c.disconnect().unwrap();
}

/// nbdkit 1.32's error filter cannot fail flushes (it has no `error-flush`), so this
/// test serves a disk file through nbdkit's `eval` plugin, whose flush fails every other
/// time with EIO. Writes around the flushes must keep their data.
#[test]
fn failed_flushes_report_eio_and_the_data_stays_exact() {
    if !support::require(&["nbdkit"]) {
        return;
    }
    const SIZE: u64 = MIB;
    const ROUNDS: usize = 20;
    let dir = TestDir::new();
    let disk = dir.zero_file("disk", SIZE);
    let count = dir.join("flushes");
    std::fs::write(&count, "0\n").unwrap();
    let (disk, count) = (disk.display(), count.display());
    let peer = Peer::nbdkit(&[
        "eval",
        &format!("get_size=echo {SIZE}"),
        &format!("pread=dd if={disk} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none"),
        &format!("pwrite=dd of={disk} seek=$4 oflag=seek_bytes conv=notrunc status=none"),
        "can_write=exit 0",
        "can_flush=exit 0",
        &format!(
            "flush=n=$(cat {count}); echo $((n + 1)) > {count}; \
             if [ $((n % 2)) = 0 ]; then echo 'EIO injected flush failure' >&2; exit 1; fi"
        ),
    ]);
    let mut c = connect(peer.socket_path().unwrap(), &[]);
    assert!(c.flags().contains(TransmissionFlags::SEND_FLUSH));
    let mut model = Model::new(vec![0; SIZE as usize]);
    let mut rng = Rng::new(0xF1_05E5);
    let (mut ok, mut failed) = (0, 0);
    for round in 0..ROUNDS {
        let (offset, len) = random_range(&mut rng, SIZE, 16 * KIB);
        let data = rng.bytes(len);
        c.write_at(&data, offset, CmdFlags::empty())
            .unwrap_or_else(|e| panic!("round {round}: write: {e}"));
        model.write(offset, &data);
        match c.flush() {
            Ok(()) => ok += 1,
            Err(e) => {
                assert_eq!(errno_of(&e), Some(Errno::Io), "round {round}: {e}");
                failed += 1;
            }
        }
        assert_eq!(c.machine().state(), State::Ready, "round {round}");
        let mut back = vec![0u8; len];
        c.read_at(&mut back, offset).unwrap();
        model
            .check(offset, &back)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
    // The plugin fails the 1st, 3rd, ... flush: exactly half, in this order.
    assert_eq!((ok, failed), (ROUNDS / 2, ROUNDS / 2));
    c.disconnect().unwrap();
}

// ---------------------------------------------------------------------------------------------
// 2. nbdkit's delay filter: many requests in flight
// ---------------------------------------------------------------------------------------------

/// Completes every command in `pending` (cookie -> what it was), checking that each
/// completes exactly once, successfully, and that no unknown cookie completes. Returns how
/// many completed out of submission order.
fn complete_all(c: &mut Client, pending: &mut HashMap<Cookie, usize>, sink: &mut Reads) -> usize {
    let total = pending.len();
    let mut last = None;
    let mut out_of_order = 0;
    for _ in 0..total {
        let done = c
            .complete(sink)
            .unwrap_or_else(|e| panic!("complete with {} in flight: {e}", c.in_flight()));
        let index = pending
            .remove(&done.cookie)
            .unwrap_or_else(|| panic!("{} completed twice or was never sent", done.cookie));
        done.result
            .unwrap_or_else(|e| panic!("command #{index} ({}) failed: {e}", done.cookie));
        if last.is_some_and(|l| index < l) {
            out_of_order += 1;
        }
        last = Some(index);
    }
    assert!(pending.is_empty(), "never completed: {pending:?}");
    assert_eq!(c.in_flight(), 0);
    out_of_order
}

/// 64 requests in flight (the client's limit) against `nbdkit --filter=delay memory`
/// (20 ms per read and write, served by nbdkit's 16 threads): three rounds, each with all
/// 64 submitted before the first is completed (64 writes; 64 reads of them; 32 writes and
/// 32 reads interleaved). Asserted: every command completes exactly once (no unknown or
/// repeated cookie), successfully, every read returns exactly the bytes written, and a
/// final synchronous read-back of every region matches.
#[test]
fn delay_filter_64_requests_in_flight_complete_once_with_correct_data() {
    if !support::require(&["nbdkit"]) {
        return;
    }
    const N: usize = 64;
    let peer = Peer::nbdkit(&[
        "--filter=delay",
        "memory",
        "32M",
        "delay-read=20ms",
        "delay-write=20ms",
    ]);
    let mut c = connect(peer.socket_path().unwrap(), &[]);
    // 64 disjoint regions of different sizes and alignments.
    let regions: Vec<(u64, usize)> = (0..N as u64)
        .map(|i| (i * 512 * KIB + i * 7, (3 * KIB + i * 1031) as usize))
        .collect();
    let mut contents: Vec<Vec<u8>> = (0..N as u64)
        .map(|i| pattern(0xD1A7 + i, regions[i as usize].0, regions[i as usize].1))
        .collect();
    let mut out_of_order = 0;

    // Round 1: 64 writes in flight.
    let mut pending = HashMap::new();
    for (i, (&(offset, _), data)) in regions.iter().zip(&contents).enumerate() {
        let cookie = c.submit_write(offset, data, CmdFlags::empty()).unwrap();
        assert!(
            pending.insert(cookie, i).is_none(),
            "cookie {cookie} reused"
        );
    }
    assert_eq!(c.in_flight(), N);
    out_of_order += complete_all(&mut c, &mut pending, &mut Reads::default());

    // Round 2: 64 reads of them in flight.
    let mut reads = Reads::default();
    for (i, &(offset, len)) in regions.iter().enumerate() {
        let cookie = c
            .submit_read(offset, len as u32, CmdFlags::empty())
            .unwrap();
        reads.expect(cookie, offset, len);
        pending.insert(cookie, i);
    }
    assert_eq!(c.in_flight(), N);
    let index: HashMap<Cookie, usize> = pending.clone();
    out_of_order += complete_all(&mut c, &mut pending, &mut reads);
    for (cookie, (offset, buf)) in &reads.bufs {
        let i = index[cookie];
        assert!(buf == &contents[i], "read #{i} at {offset}: wrong data");
    }

    // Round 3: new data for the even regions and reads of the odd ones. The writes go
    // first: a blocking client that has read replies owed cannot also push large write
    // payloads (once the read data fills the socket buffers, the server stops reading and
    // the client's send blocks), so reads only follow writes.
    let mut reads = Reads::default();
    let mut index = HashMap::new();
    for i in (0..N).step_by(2).chain((1..N).step_by(2)) {
        let (offset, len) = regions[i];
        let cookie = if i % 2 == 0 {
            contents[i] = pattern(0xBEEF + i as u64, offset, len);
            c.submit_write(offset, &contents[i], CmdFlags::empty())
                .unwrap()
        } else {
            let cookie = c
                .submit_read(offset, len as u32, CmdFlags::empty())
                .unwrap();
            reads.expect(cookie, offset, len);
            cookie
        };
        pending.insert(cookie, i);
        index.insert(cookie, i);
    }
    assert_eq!(c.in_flight(), N);
    out_of_order += complete_all(&mut c, &mut pending, &mut reads);
    for (cookie, (offset, buf)) in &reads.bufs {
        let i = index[cookie];
        assert!(buf == &contents[i], "read #{i} at {offset}: wrong data");
    }

    // Everything as written, read back one by one.
    for (i, &(offset, len)) in regions.iter().enumerate() {
        let mut buf = vec![0u8; len];
        c.read_at(&mut buf, offset).unwrap();
        assert!(buf == contents[i], "region #{i} at {offset}: wrong data");
    }
    eprintln!(
        "delay filter: {out_of_order} of {} completions out of order",
        3 * N
    );
    c.disconnect().unwrap();
}

// ---------------------------------------------------------------------------------------------
// 3. A server killed mid-transfer
// ---------------------------------------------------------------------------------------------

/// How many errors `complete` may return after a kill before the client reports the
/// connection dead: the first one must already have.
const MAX_ERRORS: usize = 1;

/// Submits `writes` then `reads` (all in flight together), SIGKILLs the server, then
/// completes. Asserted:
/// * a command either completes before the kill's end of file arrives (then successfully,
///   a read with exactly `expected(offset, len)`) or is failed: the client returns an
///   error (not a hang: the socket has a timeout, and a timeout is not accepted) and
///   lists it in `abandoned()`. Each command ends exactly one of these ways;
/// * at least one command was failed (the test is not vacuous);
/// * the client then reports the connection dead (`State::Dead`, nothing in flight, every
///   further call fails at once) after at most [`MAX_ERRORS`] calls.
///
/// Returns (completed, abandoned).
fn kill_mid_transfer(
    peer: &Peer,
    c: &mut Client,
    writes: &[(u64, Vec<u8>)],
    reads: &[(u64, u32)],
    expected: impl Fn(u64, usize) -> Vec<u8>,
) -> (usize, usize) {
    let mut pending: HashMap<Cookie, String> = HashMap::new();
    let mut sink = Reads::default();
    for (offset, data) in writes {
        let cookie = c.submit_write(*offset, data, CmdFlags::empty()).unwrap();
        pending.insert(cookie, format!("write {offset}+{}", data.len()));
    }
    for &(offset, len) in reads {
        let cookie = c.submit_read(offset, len, CmdFlags::empty()).unwrap();
        sink.expect(cookie, offset, len as usize);
        pending.insert(cookie, format!("read {offset}+{len}"));
    }
    let total = pending.len();
    assert_eq!(c.in_flight(), total);
    assert!(peer.kill(), "{} survived SIGKILL", peer.command());

    let mut completed = 0;
    let mut errors: Vec<io::Error> = Vec::new();
    // Each iteration completes a command or returns an error; errors end it within
    // `MAX_ERRORS` calls (asserted below): bounded by `total + MAX_ERRORS`.
    for _ in 0..total + MAX_ERRORS {
        if c.machine().state() == State::Dead {
            break;
        }
        match c.complete(&mut sink) {
            Ok(done) => {
                assert!(
                    errors.is_empty(),
                    "{} completed after the connection failed",
                    done.cookie
                );
                let what = pending
                    .remove(&done.cookie)
                    .unwrap_or_else(|| panic!("{} completed twice or was never sent", done.cookie));
                if let Err(e) = done.result {
                    panic!("{what} completed with an NBD error from a server being killed: {e}");
                }
                if let Some((offset, buf)) = sink.bufs.remove(&done.cookie) {
                    assert!(
                        buf == expected(offset, buf.len()),
                        "{what} completed before the kill with wrong data"
                    );
                }
                completed += 1;
            }
            Err(e) => {
                assert!(
                    !matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ),
                    "the client waited for the dead server until the socket timeout: {e}"
                );
                errors.push(e);
            }
        }
    }
    assert!(
        !errors.is_empty(),
        "every command completed although the server was killed"
    );
    let described: Vec<String> = errors
        .iter()
        .map(|e| format!("{e} ({:?})", e.kind()))
        .collect();
    eprintln!(
        "{}: killed with {total} in flight; {completed} completed first, then: {}",
        peer.kind().program(),
        described.join("; then ")
    );
    // The kill shows up as an end of file or as a transport error (on Unix sockets,
    // ECONNRESET, because the dead server left our requests unread); either way the first
    // error already reports the connection dead, with every command in flight abandoned.
    assert!(
        errors.len() <= MAX_ERRORS,
        "{} errors before the client reported the connection dead: {described:?}",
        errors.len()
    );
    // The negotiation's fallback refusals (nbdkit 1.32 refuses extended headers) have
    // nothing to do with a transfer cut short, and must not be quoted as its cause.
    assert!(
        !described.iter().any(|e| e.contains("refused")),
        "stale negotiation refusal in the error: {described:?}"
    );
    assert_eq!(c.machine().state(), State::Dead, "after: {described:?}");
    assert_eq!(c.in_flight(), 0);
    let abandoned: Vec<Cookie> = c.abandoned().to_vec();
    let unique: HashSet<Cookie> = abandoned.iter().copied().collect();
    assert_eq!(
        unique.len(),
        abandoned.len(),
        "abandoned twice: {abandoned:?}"
    );
    let left: HashSet<Cookie> = pending.keys().copied().collect();
    assert_eq!(
        unique, left,
        "the abandoned commands must be exactly those that did not complete"
    );
    assert!(!abandoned.is_empty(), "nothing was in flight at the kill");
    // Dead stays dead, at once (no I/O is attempted, so nothing can block).
    assert!(c.complete(&mut NoSink).is_err());
    assert!(c.submit_read(0, 512, CmdFlags::empty()).is_err());
    let mut buf = [0u8; 512];
    assert!(c.read_at(&mut buf, 0).is_err());
    assert!(c.flush().is_err());
    (completed, abandoned.len())
}

/// nbdkit (memory, 30 s delay on every read and write, so nothing can complete before the
/// kill) is SIGKILLed with 24 writes and 40 reads in flight. Writes are small: nbdkit's 16
/// threads all sleep in the delay filter, nobody reads the socket, and the requests must
/// fit in the socket buffer. nbdkit's abort on a client hanging up mid-read does not apply:
/// here the server is the one that goes.
#[test]
fn nbdkit_killed_mid_transfer_fails_every_command_in_flight() {
    if !support::require(&["nbdkit"]) {
        return;
    }
    let peer = Peer::nbdkit(&[
        "--filter=delay",
        "memory",
        "16M",
        "delay-read=30",
        "delay-write=30",
    ]);
    let mut c = connect(peer.socket_path().unwrap(), &[]);
    let writes: Vec<(u64, Vec<u8>)> = (0..24u64)
        .map(|i| (8 * MIB + i * 4 * KIB, pattern(i, 0, 2048)))
        .collect();
    let reads: Vec<(u64, u32)> = (0..40u64).map(|i| (i * 64 * KIB, 64 * 1024)).collect();
    // The memory plugin starts zeroed, and no write overlaps a read.
    let (completed, abandoned) =
        kill_mid_transfer(&peer, &mut c, &writes, &reads, |_, len| vec![0; len]);
    assert_eq!(completed + abandoned, 64);
}

/// qemu-nbd on a pattern file is SIGKILLed with 16 small writes, 8 small reads and 40
/// reads of 1 MiB in flight. qemu-nbd has no delay filter, but 40 MiB of replies cannot fit
/// in the socket buffers while the client reads nothing, so most reads are still owed at
/// the kill. Reads that complete first must carry the file's bytes. Afterwards each byte of each write's
/// range in the file is either its old or its new value (a write may or may not have
/// landed; nothing else may).
#[test]
fn qemu_nbd_killed_mid_transfer_fails_every_command_in_flight() {
    if !support::require(&["qemu-nbd"]) {
        return;
    }
    const SEED: u64 = 0x4B11;
    let dir = TestDir::new();
    let file = dir.pattern_file("disk.raw", 64 * MIB, SEED);
    let peer = Peer::qemu_nbd(&file, &[]);
    let mut c = connect(peer.socket_path().unwrap(), &[]);
    let writes: Vec<(u64, Vec<u8>)> = (0..16u64)
        .map(|i| {
            let offset = 60 * MIB + i * 8 * KIB;
            (offset, pattern(SEED + 1, offset, 4096))
        })
        .collect();
    // Eight small reads first, whose replies fit in the socket buffer and so may
    // complete before the kill (their data is checked), then 40 reads of 1 MiB.
    let reads: Vec<(u64, u32)> = (0..8u64)
        .map(|i| (i * 4 * KIB + 100, 3000))
        .chain((8..48u64).map(|i| (i * MIB, MIB as u32)))
        .collect();
    let (completed, abandoned) =
        kill_mid_transfer(&peer, &mut c, &writes, &reads, |o, l| pattern(SEED, o, l));
    assert_eq!(completed + abandoned, 64);
    let disk = std::fs::read(&file).unwrap();
    for (offset, data) in &writes {
        let old = pattern(SEED, *offset, data.len());
        let got = &disk[*offset as usize..*offset as usize + data.len()];
        for (i, b) in got.iter().enumerate() {
            assert!(
                *b == old[i] || *b == data[i],
                "byte {} of the file is neither old nor new data",
                offset + i as u64
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Our server with clients that vanish mid-write
// ---------------------------------------------------------------------------------------------

/// Sets the flag when dropped, also on a panic: tells a helper thread to stop.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Waits (bounded) until `counter` exceeds `than`, while `worker` (which counts) runs.
fn wait_for_progress<T>(counter: &AtomicU64, than: u64, worker: &JoinHandle<T>, what: &str) {
    let deadline = Instant::now() + IO_TIMEOUT;
    while counter.load(Ordering::SeqCst) <= than {
        assert!(
            !worker.is_finished(),
            "{what}: its thread ended early (see its panic above)"
        );
        assert!(
            Instant::now() < deadline,
            "{what}: no progress in {IO_TIMEOUT:?}"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// Our in-process server (`serve` on a `MemoryBackend`) with ten clients that each
/// negotiate, send a WRITE header and part of its payload, and hang up: at cut points
/// between requests (after a complete write), mid-header (1, 14 and header-1 bytes),
/// after the header, and 1 byte, 4 KiB, 64 KiB + 1, half and all but one byte into a
/// 300 KiB payload. Half of them close at once; the other half shut down their sending
/// side and listen for a reply. Meanwhile a steady client keeps writing and reading its own
/// region, and is seen to make progress after every vanishing client.
///
/// What the server guarantees, read from `src/blocking/server.rs`, and asserted here:
/// * no partial write is reported as success: the vanishing client receives no reply
///   at all (the server sends nothing after the payload breaks off), and `serve` returns
///   an error for that connection (a clean hang-up between requests returns `Ok`);
/// * a cut inside the header changes nothing: the region reads as its old data;
/// * a cut inside the payload CAN leave part of the write applied: `MemoryBackend::
///   write_from` reads the payload from the socket straight into the backend's pages (in
///   groups of 16 pages), so the bytes that arrived before the hang-up stay written.
///   What holds is a torn prefix: the region reads as new data up to some point `j` and
///   old data after it, with `j` at most the payload bytes sent; never other bytes;
/// * other clients keep being served, with correct data, before, during and after.
#[test]
fn clients_vanishing_mid_write_do_not_disturb_other_clients() {
    const SIZE: u64 = 16 * MIB;
    const PAYLOAD: usize = 300 * 1024 + 77;
    let mut srv = OurServer::start(SIZE);
    let sock = srv.socket().to_path_buf();

    // The steady client: its own region [0, 1 MiB), written and read back in a loop until
    // told to stop (bounded by a step count as well).
    let stop = Arc::new(AtomicBool::new(false));
    let stop_guard = StopOnDrop(stop.clone());
    let steady_ops = Arc::new(AtomicU64::new(0));
    let steady = {
        let (stop, ops, sock) = (stop.clone(), steady_ops.clone(), sock.clone());
        thread::spawn(move || {
            let mut c = connect(&sock, &[]);
            let mut rng = Rng::new(0x57EAD1);
            let mut model = Model::new(vec![0; MIB as usize]);
            for step in 0..200_000u64 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let (offset, len) = random_range(&mut rng, MIB, 32 * KIB);
                let data = rng.bytes(len);
                c.write_at(&data, offset, CmdFlags::empty())
                    .unwrap_or_else(|e| panic!("steady client, step {step}: write: {e}"));
                model.write(offset, &data);
                let (offset, len) = random_range(&mut rng, MIB, 64 * KIB);
                let mut buf = vec![0u8; len];
                c.read_at(&mut buf, offset)
                    .unwrap_or_else(|e| panic!("steady client, step {step}: read: {e}"));
                model
                    .check(offset, &buf)
                    .unwrap_or_else(|e| panic!("steady client, step {step}: {e}"));
                ops.fetch_add(1, Ordering::SeqCst);
            }
            // A final full check of its region.
            let mut buf = vec![0u8; MIB as usize];
            c.read_at(&mut buf, 0).unwrap();
            model.check(0, &buf).unwrap();
            c.disconnect().unwrap();
            ops.load(Ordering::SeqCst)
        })
    };
    wait_for_progress(
        &steady_ops,
        5,
        &steady,
        "the steady client before the vanishing ones",
    );

    // Another client writes the old data of every vanishing client's region and checks
    // them afterwards.
    let mut checker = connect(&sock, &[]);
    let cuts = |h: usize| {
        [
            None,                    // hang up between requests
            Some(1),                 // mid-header
            Some(14),                // mid-header
            Some(h - 1),             // mid-header
            Some(h),                 // header, no payload
            Some(h + 1),             // 1 payload byte
            Some(h + 4096),          // 4 KiB
            Some(h + 64 * 1024 + 1), // across a 64 KiB page boundary
            Some(h + PAYLOAD / 2),   // half
            Some(h + PAYLOAD - 1),   // all but one byte
        ]
    };
    for i in 0..10u64 {
        let offset = (2 + i) * MIB + 333;
        let old = pattern(100 + i, offset, PAYLOAD);
        checker.write_at(&old, offset, CmdFlags::empty()).unwrap();
    }

    for i in 0..10u64 {
        let offset = (2 + i) * MIB + 333;
        let old = pattern(100 + i, offset, PAYLOAD);
        let new = pattern(200 + i, offset, PAYLOAD);
        let id = srv.accepted();
        let stream = unix_stream(&sock);
        let mut raw = stream.try_clone().unwrap();
        let mut c: Client = BlockingClient::new(stream, &ClientConfig::default()).unwrap();
        assert_eq!(srv.accepted(), id + 1, "another client connected meanwhile");
        let extended = c.machine().extended_headers();
        let h = if extended {
            Request::EXTENDED_LEN
        } else {
            Request::COMPACT_LEN
        };
        let cut = cuts(h)[i as usize];
        let mut wire = vec![0u8; h];
        Request {
            // proto.md: an extended WRITE carries PAYLOAD_LEN.
            flags: if extended {
                CmdFlags::PAYLOAD_LEN
            } else {
                CmdFlags::empty()
            },
            command: Command::Write,
            cookie: Cookie(0xF00D_0000 + i),
            offset,
            len: PAYLOAD as u64,
            extended,
        }
        .emit(&mut wire)
        .unwrap();
        wire.extend_from_slice(&new);
        let sent = match cut {
            // A complete write first, then the hang-up at a request boundary.
            None => {
                c.write_at(&new, offset, CmdFlags::empty()).unwrap();
                0
            }
            Some(n) => n,
        };
        drop(c); // `raw` keeps the connection open
        raw.write_all(&wire[..sent]).unwrap();
        if i % 2 == 0 {
            drop(raw);
        } else {
            // Half-close and listen: nothing may come back, least of all a success.
            raw.shutdown(std::net::Shutdown::Write).unwrap();
            let mut reply = Vec::new();
            raw.read_to_end(&mut reply)
                .unwrap_or_else(|e| panic!("client {i}: waiting for the server to close: {e}"));
            assert!(
                reply.is_empty(),
                "client {i} (cut at {sent} bytes) got a reply to a write it never finished: \
                 {reply:02x?}"
            );
        }
        let result = srv.result(id);
        eprintln!(
            "vanishing client {i}: cut at {sent}/{} bytes: serve -> {result:?}",
            h + PAYLOAD
        );
        match cut {
            None => assert_eq!(result, Ok(()), "client {i}: a hang-up between requests"),
            Some(_) => assert!(
                result.is_err(),
                "client {i}: serve returned Ok for a connection cut mid-request"
            ),
        }

        // The steady client is still being served.
        let before = steady_ops.load(Ordering::SeqCst);
        wait_for_progress(&steady_ops, before + 1, &steady, "the steady client");

        // What the region holds now.
        let mut got = vec![0u8; PAYLOAD];
        checker.read_at(&mut got, offset).unwrap();
        match cut {
            None => assert!(got == new, "client {i}: its completed write was lost"),
            Some(n) if n < h => assert!(
                got == old,
                "client {i}: a write cut in its header ({n} of {h} bytes) changed the data"
            ),
            Some(n) => {
                let received = n - h;
                // new[..j] ++ old[j..]: `p` is as far as it can be new, `q` as early as it
                // can be old (they differ where old and new bytes happen to agree).
                let p = got.iter().zip(&new).take_while(|(a, b)| a == b).count();
                let q = PAYLOAD
                    - got
                        .iter()
                        .rev()
                        .zip(old.iter().rev())
                        .take_while(|(a, b)| a == b)
                        .count();
                assert!(
                    q <= p,
                    "client {i}: the region is neither old nor new data at {} (cut after \
                     {received} payload bytes)",
                    offset + p as u64
                );
                assert!(
                    q <= received,
                    "client {i}: {q} bytes of a write applied, but only {received} were sent"
                );
                eprintln!("  {q}..={p} of {received} received payload bytes were applied");
            }
        }
    }

    // A new client after all that is served normally, and the first client's data is intact.
    let mut late = connect(&sock, &[]);
    let data = pattern(0x1A7E, 14 * MIB, 100_000);
    late.write_at(&data, 14 * MIB, CmdFlags::empty()).unwrap();
    let mut back = vec![0u8; data.len()];
    checker.read_at(&mut back, 14 * MIB).unwrap();
    assert!(
        back == data,
        "a late client's write is not visible to another client"
    );
    late.disconnect().unwrap();
    let late_id = srv.accepted() - 1;

    drop(stop_guard);
    let ops = steady.join().expect("the steady client failed");
    eprintln!("steady client: {ops} write+read rounds");
    checker.disconnect().unwrap();
    assert_eq!(srv.result(0), Ok(()), "the steady client's connection");
    assert_eq!(srv.result(1), Ok(()), "the checker's connection");
    assert_eq!(srv.result(late_id), Ok(()), "the late client's connection");
}

// ---------------------------------------------------------------------------------------------
// 5. Randomized integrity soak
// ---------------------------------------------------------------------------------------------

/// Seconds per soak target: `NBD_SOAK_SECS`, default 5.
fn soak_secs() -> f64 {
    std::env::var("NBD_SOAK_SECS")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(5.0)
}

/// The soak seed: `NBD_SOAK_SEED` (decimal or 0x-hex), default a fixed one.
fn soak_seed() -> u64 {
    let Ok(s) = std::env::var("NBD_SOAK_SEED") else {
        return 0x50A4_2024_0005;
    };
    let s = s.trim();
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.unwrap_or_else(|_| panic!("NBD_SOAK_SEED={s:?} is not a number"))
}

/// One soak run: state, and the context printed with any failure.
struct Soak<'a> {
    target: &'a str,
    seed: u64,
    rng: Rng,
    model: Model,
    trim: TrimReads,
    size: u64,
    /// Offsets and lengths are multiples of this (the advertised minimum block size).
    align: u64,
    step: u64,
    history: Vec<String>,
    stats: HashMap<&'static str, u64>,
}

impl Soak<'_> {
    /// Everything needed to reproduce a failure.
    fn context(&self) -> String {
        format!(
            "soak against {} failed at step {} (reproduce with NBD_SOAK_SEED={:#x} and \
             NBD_SOAK_SECS at least as long; last steps, oldest first:\n  {})",
            self.target,
            self.step,
            self.seed,
            self.history.join("\n  ")
        )
    }

    fn note(&mut self, what: String) {
        if self.history.len() == 12 {
            self.history.remove(0);
        }
        self.history.push(what);
    }

    fn ok<T>(&self, what: &str, r: io::Result<T>) -> T {
        r.unwrap_or_else(|e| panic!("{what}: {e}\n{}", self.context()))
    }

    /// A random range: mostly small, sometimes up to 1 MiB; aligned to 512 a third of the
    /// time, and always to the server's minimum block size.
    fn range(&mut self) -> (u64, u64) {
        let max = match self.rng.below(100) {
            0..=49 => 4 * KIB,
            50..=84 => 64 * KIB,
            _ => MIB,
        };
        let mut len = 1 + self.rng.below(max);
        let mut offset = self.rng.below(self.size - len + 1);
        let align = if self.rng.chance(33) {
            self.align.max(512)
        } else {
            self.align
        };
        offset -= offset % align;
        len = (len - len % align).max(align);
        if offset + len > self.size {
            offset = self.size - len;
        }
        (offset, len)
    }

    /// Reads `[offset, offset + len)` and compares it with the model.
    fn verify(&mut self, c: &mut Client, offset: u64, len: u64) {
        let mut buf = vec![0xA5u8; len as usize];
        self.ok("read", c.read_at(&mut buf, offset));
        *self.stats.entry("bytes verified").or_default() += len;
        if let Err(e) = self.model.check(offset, &buf) {
            panic!("MISMATCH: {e}\n{}", self.context());
        }
    }

    /// Verifies a range with some margin around it (clamped to the disk).
    fn verify_around(&mut self, c: &mut Client, offset: u64, len: u64) {
        let from = offset.saturating_sub(700);
        let to = (offset + len + 700).min(self.size);
        self.verify(c, from, to - from);
    }

    fn count(&mut self, what: &'static str) {
        *self.stats.entry(what).or_default() += 1;
    }

    /// One random step, then a check of what it touched and of one random window.
    fn step(&mut self, c: &mut Client) {
        let roll = self.rng.below(100);
        let (offset, len) = self.range();
        match roll {
            0..=29 => {
                let data = self.rng.bytes(len as usize);
                let fua = if self.rng.chance(10) {
                    CmdFlags::FUA
                } else {
                    CmdFlags::empty()
                };
                self.note(format!("write {offset}+{len} {fua:?}"));
                self.ok("write", c.write_at(&data, offset, fua));
                self.model.write(offset, &data);
                self.count("write");
                self.verify_around(c, offset, len);
            }
            30..=49 => {
                self.note(format!("read {offset}+{len}"));
                self.verify(c, offset, len);
                self.count("read");
            }
            50..=61 => {
                self.note(format!("trim {offset}+{len}"));
                self.ok("trim", c.trim(offset, len));
                self.model.trim(offset, len as usize, self.trim);
                self.count("trim");
                self.verify_around(c, offset, len);
            }
            62..=79 => {
                let mut flags = CmdFlags::empty();
                if self.rng.chance(50) {
                    flags |= CmdFlags::NO_HOLE;
                }
                if self.rng.chance(10) {
                    flags |= CmdFlags::FUA;
                }
                self.note(format!("write_zeroes {offset}+{len} {flags:?}"));
                self.ok("write_zeroes", c.write_zeroes(offset, len, flags));
                self.model.zero(offset, len as usize);
                self.count("write_zeroes");
                self.verify_around(c, offset, len);
            }
            80..=84 => {
                self.note("flush".into());
                self.ok("flush", c.flush());
                self.count("flush");
            }
            _ => self.batch(c),
        }
        // And one random window elsewhere.
        let (offset, len) = self.range();
        self.verify(c, offset, len.min(64 * KIB));
    }

    /// Up to 16 requests on disjoint ranges in flight together: writes, reads, zeroes and
    /// trims. Disjoint, so their order does not matter: each read must see the model as it
    /// was before the batch. Writes are submitted first: with read replies owed, a large
    /// write payload could block the client's send (see the delay-filter test).
    fn batch(&mut self, c: &mut Client) {
        enum Kind {
            Write(Vec<u8>),
            Read,
            Zero,
            Trim,
        }
        let n = 2 + self.rng.below(15);
        let mut plan: Vec<(u64, u64, Kind)> = Vec::new();
        for _ in 0..n * 4 {
            if plan.len() as u64 == n {
                break;
            }
            let (o, l) = self.range();
            if plan.iter().all(|&(ro, rl, _)| o + l <= ro || ro + rl <= o) {
                let kind = match self.rng.below(4) {
                    0 => Kind::Write(self.rng.bytes(l as usize)),
                    1 => Kind::Read,
                    2 => Kind::Zero,
                    _ => Kind::Trim,
                };
                plan.push((o, l, kind));
            }
        }
        plan.sort_by_key(|p| !matches!(p.2, Kind::Write(_)));
        let described: Vec<String> = plan
            .iter()
            .map(|(o, l, k)| {
                let k = match k {
                    Kind::Write(_) => "write",
                    Kind::Read => "read",
                    Kind::Zero => "zero",
                    Kind::Trim => "trim",
                };
                format!("{k} {o}+{l}")
            })
            .collect();
        self.note(format!("batch [{}]", described.join(", ")));
        let mut reads = Reads::default();
        for (offset, len, kind) in &plan {
            let (offset, len) = (*offset, *len);
            let r = match kind {
                Kind::Write(data) => c.submit_write(offset, data, CmdFlags::empty()),
                Kind::Read => c.submit_read(offset, len as u32, CmdFlags::empty()),
                Kind::Zero => c.submit_write_zeroes(offset, len, CmdFlags::empty()),
                Kind::Trim => c.submit_trim(offset, len, CmdFlags::empty()),
            };
            let cookie = self.ok("submit", r);
            if let Kind::Read = kind {
                reads.expect(cookie, offset, len as usize);
            }
        }
        let total = c.in_flight();
        assert_eq!(total, plan.len(), "{}", self.context());
        let mut done = HashSet::new();
        for _ in 0..total {
            let completion = self.ok("complete", c.complete(&mut reads));
            if !done.insert(completion.cookie) {
                panic!("{} completed twice\n{}", completion.cookie, self.context());
            }
            if let Err(e) = completion.result {
                panic!(
                    "batch command {}: {e}\n{}",
                    completion.cookie,
                    self.context()
                );
            }
        }
        assert_eq!(c.in_flight(), 0, "{}", self.context());
        for (offset, buf) in reads.bufs.values() {
            if let Err(e) = self.model.check(*offset, buf) {
                panic!("MISMATCH in a batch read: {e}\n{}", self.context());
            }
        }
        for (offset, len, kind) in &plan {
            match kind {
                Kind::Write(data) => self.model.write(*offset, data),
                Kind::Read => {}
                Kind::Zero => self.model.zero(*offset, *len as usize),
                Kind::Trim => self.model.trim(*offset, *len as usize, self.trim),
            }
        }
        self.count("batch");
        *self.stats.entry("batched requests").or_default() += total as u64;
        for &(offset, len, _) in &plan {
            self.verify(c, offset, len);
        }
    }

    fn verify_all(&mut self, c: &mut Client) {
        let mut at = 0;
        while at < self.size {
            let n = MIB.min(self.size - at);
            self.verify(c, at, n);
            at += n;
        }
    }
}

/// Runs the soak on `c` for `NBD_SOAK_SECS` (bounded by a step count too): the disk is
/// first filled with random data, then each step is checked against the model; the whole
/// disk every 200 steps and at the end. Any mismatch fails with the seed and last steps.
fn soak(target: &str, c: &mut Client, trim: TrimReads) -> Model {
    let seed = soak_seed();
    let secs = soak_secs();
    let size = c.size();
    let align = u64::from(c.machine().block_size().min).max(1);
    let mut s = Soak {
        target,
        seed,
        rng: Rng::new(seed),
        model: Model::new(vec![0; size as usize]),
        trim,
        size,
        align,
        step: 0,
        history: Vec::new(),
        stats: HashMap::new(),
    };
    let fill = s.rng.bytes(size as usize);
    s.ok("initial fill", c.write_at(&fill, 0, CmdFlags::empty()));
    s.model.write(0, &fill);
    s.verify_all(c);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    const MAX_STEPS: u64 = 1_000_000;
    while s.step < MAX_STEPS && Instant::now() < deadline {
        s.step += 1;
        s.step(c);
        if s.step.is_multiple_of(200) {
            s.verify_all(c);
        }
    }
    s.verify_all(c);
    let mut stats: Vec<_> = s.stats.iter().collect();
    stats.sort();
    eprintln!(
        "soak against {target}: seed {seed:#x}, {} steps in {secs} s, align {align}, trim \
         {trim:?}, 0 mismatches; {stats:?}",
        s.step
    );
    assert!(s.step > 0 || secs == 0.0, "no soak step ran");
    s.model
}

/// The soak against our server: in-process `serve` on a 16 MiB `MemoryBackend`, over a
/// Unix socket, extended headers. `MemoryBackend::trim` zeroes the range (documented: it
/// punches holes, and holes read as zeroes), so trims are modelled as zeroing exactly.
#[test]
fn soak_against_our_server() {
    let mut srv = OurServer::start(16 * MIB);
    let mut c = connect(srv.socket(), &[]);
    assert!(c.machine().extended_headers());
    assert!(c.flags().contains(TransmissionFlags::SEND_TRIM));
    soak("our server (MemoryBackend)", &mut c, TrimReads::Zeroes);
    c.disconnect().unwrap();
    assert_eq!(srv.result(0), Ok(()));
}

/// The soak against `qemu-nbd --discard=unmap` on a 16 MiB raw file in `/dev/shm` (or the
/// temp dir). Trimmed bytes may read as old data or zeroes (see [`TrimReads::OldOrZero`]).
/// At the end, after a flush, the file itself must match the model too.
#[test]
fn soak_against_qemu_nbd() {
    if !support::require(&["qemu-nbd"]) {
        return;
    }
    let dir = TestDir::new();
    let file = dir.zero_file("soak.raw", 16 * MIB);
    let peer = Peer::qemu_nbd(&file, &["--discard=unmap"]);
    let mut c = connect(peer.socket_path().unwrap(), &[]);
    assert!(c.flags().contains(TransmissionFlags::SEND_TRIM));
    let model = soak("qemu-nbd (raw file)", &mut c, TrimReads::OldOrZero);
    c.flush().unwrap();
    c.disconnect().unwrap();
    let disk = std::fs::read(&file).unwrap();
    if let Err(e) = model.check(0, &disk) {
        panic!(
            "the file differs from the model: {e} (seed {:#x})",
            soak_seed()
        );
    }
}
