//! Steady state allocates nothing: neither machine, joined in memory, nor the blocking
//! drivers over a Unix socket pair, for reads, writes and block status.
//!
//! A counting global allocator (wrapping `System`) counts the allocations made by the
//! threads taking part in a measurement (the test thread and, for the blocking drivers, the
//! server thread) while the count is armed. Tests take a lock so that measurements do not
//! overlap. Set `NBD_ALLOC_BACKTRACE=K` to print a backtrace at the K-th counted
//! allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use nbd_proto::blocking::server::{serve, Export, MemoryBackend, Options};
use nbd_proto::blocking::BlockingClient;
use nbd_proto::client::ClientConfig;
use nbd_proto::server::ReplyForm;
use nbd_proto::wire::CmdFlags;

#[path = "../benches/support/loopback.rs"]
mod loopback;

use loopback::{Loopback, Op};

struct Counting;

static ARMED: AtomicBool = AtomicBool::new(false);
static COUNT: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
static BACKTRACE_AT: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This thread's allocations are counted while armed.
    static PARTICIPANT: Cell<bool> = const { Cell::new(false) };
    /// Inside the backtrace printer: do not count (or recurse).
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

fn note(size: usize) {
    if !ARMED.load(Relaxed) {
        return;
    }
    let counted = PARTICIPANT.try_with(Cell::get).unwrap_or(false)
        && !IN_HOOK.try_with(Cell::get).unwrap_or(true);
    if !counted {
        return;
    }
    let n = COUNT.fetch_add(1, Relaxed) + 1;
    BYTES.fetch_add(size as u64, Relaxed);
    if n == BACKTRACE_AT.load(Relaxed) {
        IN_HOOK.with(|h| h.set(true));
        let bt = std::backtrace::Backtrace::force_capture();
        eprintln!(
            "allocation #{n} ({size} bytes) on thread {:?}:\n{bt}",
            std::thread::current().name()
        );
        IN_HOOK.with(|h| h.set(false));
    }
}

// SAFETY: every call is forwarded unchanged to `System`; the bookkeeping only touches
// atomics and const-initialised thread-locals (which do not allocate).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Measurements never overlap.
static LOCK: Mutex<()> = Mutex::new(());

fn setup() -> std::sync::MutexGuard<'static, ()> {
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let at = std::env::var("NBD_ALLOC_BACKTRACE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    BACKTRACE_AT.store(at, Relaxed);
    PARTICIPANT.with(|p| p.set(true));
    guard
}

/// Allocations (count, bytes) made by participating threads while `f` runs.
fn count<R>(f: impl FnOnce() -> R) -> (u64, u64, R) {
    COUNT.store(0, Relaxed);
    BYTES.store(0, Relaxed);
    ARMED.store(true, Relaxed);
    let r = f();
    ARMED.store(false, Relaxed);
    (COUNT.load(Relaxed), BYTES.load(Relaxed), r)
}

#[test]
fn the_counter_counts() {
    let _g = setup();
    let (n, bytes, v) = count(|| std::hint::black_box(vec![1u8; 100]));
    drop(v);
    assert_eq!((n, bytes), (1, 100));
}

const DISK: usize = 8 << 20;

fn workloads() -> [(&'static str, Op, u32, usize); 8] {
    [
        ("4 KiB reads, QD1", Op::Read, 4096, 1),
        ("4 KiB reads, QD64", Op::Read, 4096, 64),
        ("256 KiB reads, QD16", Op::Read, 256 << 10, 16),
        ("4 KiB writes, QD1", Op::Write, 4096, 1),
        ("4 KiB writes, QD64", Op::Write, 4096, 64),
        ("256 KiB writes, QD16", Op::Write, 256 << 10, 16),
        ("block status 1 MiB, QD1", Op::BlockStatus, 1 << 20, 1),
        ("block status 1 MiB, QD64", Op::BlockStatus, 1 << 20, 64),
    ]
}

#[test]
fn machines_allocate_nothing_per_request() {
    let _g = setup();
    let mut failures = Vec::new();
    for form in [
        ReplyForm::Simple,
        ReplyForm::Structured,
        ReplyForm::Extended,
    ] {
        let mut l = Loopback::new(form, DISK, 1 << 20);
        for (name, op, len, depth) in workloads() {
            if op == Op::BlockStatus && form == ReplyForm::Simple {
                continue; // no metadata contexts without structured replies
            }
            // Warm up, then count over two run lengths: zero for both, so nothing is
            // per request (and nothing is amortised either).
            l.run(op, len, depth, 200);
            for n in [1_000u64, 4_000] {
                let before = l.stats;
                let (allocs, bytes, done) = count(|| l.run(op, len, depth, n));
                assert_eq!(done, n);
                assert_eq!(l.stats.errors, before.errors, "{form:?} {name}: errors");
                if op == Op::BlockStatus {
                    assert!(l.stats.extents >= before.extents + n, "{form:?} {name}");
                }
                if allocs != 0 {
                    failures.push(format!(
                        "{form:?} {name}: {allocs} allocations ({bytes} bytes) over {n} requests"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn blocking_drivers_allocate_nothing_per_request() {
    let _g = setup();
    const SIZE: u64 = 64 << 20;
    let (ours, theirs) = UnixStream::pair().unwrap();
    let options = Arc::new(Options::new(vec![Export::new(
        "",
        Arc::new(MemoryBackend::new(SIZE)),
    )]));
    let server = std::thread::Builder::new()
        .name("nbd-server".into())
        .spawn(move || {
            PARTICIPANT.with(|p| p.set(true));
            serve(theirs, &options).map_err(|e| e.to_string())
        })
        .unwrap();
    let mut config = ClientConfig::new("");
    config.meta_contexts = &["base:allocation"];
    let mut c: BlockingClient<UnixStream, 64> = BlockingClient::new(ours, &config).unwrap();
    assert!(c.machine().extended_headers());
    assert_eq!(c.contexts().len(), 1);

    // The first write to a page allocates it (the memory backend is sparse): fill the
    // region used below, and run every call once so buffers reach their steady size.
    let region = 4u64 << 20;
    let mut big = vec![0x3cu8; 256 << 10];
    for at in (0..region).step_by(big.len()) {
        c.write_at(&big, at, CmdFlags::empty()).unwrap();
    }
    let mut buf = vec![0u8; 4096];
    let mut extents = 0u64;
    let mut rounds = |c: &mut BlockingClient<UnixStream, 64>, n: u64| {
        for i in 0..n {
            let at = (i * 4096) % region;
            c.read_at(&mut buf, at).unwrap();
            c.write_at(&buf, at, CmdFlags::empty()).unwrap();
            c.read_at(&mut big, (i * (256 << 10)) % region).unwrap();
            c.block_status(at, 1 << 20, CmdFlags::empty(), |_, _, _| extents += 1)
                .unwrap();
        }
    };
    rounds(&mut c, 100);
    let mut results = Vec::new();
    for n in [500u64, 2_000] {
        let (allocs, bytes, ()) = count(|| rounds(&mut c, n));
        results.push((n, allocs, bytes));
    }
    c.disconnect().unwrap();
    server.join().unwrap().unwrap();
    // Each round is a 4 KiB read, a 4 KiB write, a 256 KiB read and a block status.
    for (n, allocs, bytes) in &results {
        assert_eq!(
            *allocs, 0,
            "{allocs} allocations ({bytes} bytes) over {n} rounds of 4 requests: {results:?}"
        );
    }
}
