//! The client and server machines joined in memory (no sockets, no allocation: see
//! `support/loopback.rs`): requests per second for 4 KiB reads and writes at queue depths
//! 1, 16 and 64, and 256 KiB reads, with extended headers (what two instances of this crate
//! negotiate) and, for 4 KiB reads at QD 64, structured and simple replies too.
//!
//! Each payload is copied twice, as through a socket (disk -> pipe -> client buffer, or the
//! reverse); `memcpy-2x` measures two copies of the same bytes in the same run, so the
//! machines' own cost per request is the difference.
//!
//! `cargo bench --bench machines`

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use nbd_proto::server::ReplyForm;

#[path = "support/loopback.rs"]
mod loopback;

use loopback::{Loopback, Op};

/// Requests per iteration.
const BATCH: u64 = 1024;

fn machines(c: &mut Criterion) {
    let cases: [(&str, ReplyForm, Op, u32, usize); 12] = [
        ("read-4k-qd1", ReplyForm::Extended, Op::Read, 4096, 1),
        ("read-4k-qd16", ReplyForm::Extended, Op::Read, 4096, 16),
        ("read-4k-qd64", ReplyForm::Extended, Op::Read, 4096, 64),
        (
            "read-4k-qd64-structured",
            ReplyForm::Structured,
            Op::Read,
            4096,
            64,
        ),
        ("read-4k-qd64-simple", ReplyForm::Simple, Op::Read, 4096, 64),
        ("write-4k-qd1", ReplyForm::Extended, Op::Write, 4096, 1),
        ("write-4k-qd16", ReplyForm::Extended, Op::Write, 4096, 16),
        ("write-4k-qd64", ReplyForm::Extended, Op::Write, 4096, 64),
        ("read-256k-qd1", ReplyForm::Extended, Op::Read, 256 << 10, 1),
        (
            "read-256k-qd16",
            ReplyForm::Extended,
            Op::Read,
            256 << 10,
            16,
        ),
        (
            "read-256k-qd64",
            ReplyForm::Extended,
            Op::Read,
            256 << 10,
            64,
        ),
        (
            "block-status-qd64",
            ReplyForm::Extended,
            Op::BlockStatus,
            1 << 20,
            64,
        ),
    ];
    // 64 MiB disk: 256 KiB x 1024 requests stays out of the L3 cache like a real export.
    const DISK: usize = 64 << 20;
    let mut g = c.benchmark_group("machines");
    g.throughput(Throughput::Elements(BATCH));
    for (name, form, op, len, depth) in cases {
        let mut l = Loopback::new(form, DISK, 1 << 20);
        l.run(op, len, depth, BATCH);
        g.bench_function(name, |b| b.iter(|| l.run(op, len, depth, BATCH)));
        assert_eq!(l.stats.errors, 0);
    }
    // Two copies of each payload, as the loop does, for 4 KiB and 256 KiB requests.
    for (name, len) in [("memcpy-2x-4k", 4096usize), ("memcpy-2x-256k", 256 << 10)] {
        let disk = vec![0x5au8; DISK];
        let mut pipe = vec![0u8; len];
        let mut mirror = vec![0u8; DISK];
        let mut at = 0;
        g.bench_function(name, |b| {
            b.iter(|| {
                for _ in 0..BATCH {
                    if at + len > DISK {
                        at = 0;
                    }
                    pipe.copy_from_slice(black_box(&disk[at..at + len]));
                    mirror[at..at + len].copy_from_slice(black_box(&pipe));
                    at += len;
                }
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = machines
}
criterion_main!(benches);
