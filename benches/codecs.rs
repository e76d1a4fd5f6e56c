//! Codec throughput, each beside a `memcpy` (`copy_from_slice`) of the same bytes measured
//! in the same run, so the report is a ratio that survives a noisy machine.
//!
//! * Fixed headers (requests, simple replies, structured and extended chunk headers):
//!   4096 messages back to back; decode reads every field, encode writes every message.
//! * Option messages (`NBD_OPT_GO`, `NBD_OPT_SET_META_CONTEXT`) and option replies (the
//!   answer to a GO: four `NBD_REP_INFO` and an ACK, plus `NBD_REP_META_CONTEXT`).
//! * Block status: 2^20 descriptors (32- and 64-bit) parsed and iterated with the codec
//!   (`BlockStatus::parse` + `Extents`), and the same chunk fed to a `Client` machine
//!   (`handle_input`, delivered as `Event::BlockStatus` batches), every extent visited.
//!
//! Goals (issue 6): header decode >= 1/4 of memcpy bandwidth, extent parsing >= 1/2.
//!
//! `cargo bench --bench codecs` (criterion; `-- --quick` or `-- FILTER` as usual).

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};

use nbd_proto::client::Event;
use nbd_proto::server::ReplyForm;
use nbd_proto::wire::{
    BlockSize, BlockStatus, ChunkHeader, ChunkType, CmdFlags, Command, Cookie, Errno,
    ExportRequest, Extent, Info, InfoList, InfoType, MetaContextRequest, Opt, OptCode, OptReply,
    Queries, ReplyFlags, ReplyHeader, Request, SimpleReply, TransmissionFlags,
};
use nbd_proto::Transmit;

#[path = "support/loopback.rs"]
mod loopback;

const COUNT: usize = 4096;

/// A `memcpy` of `len` bytes (the reference every codec is reported against).
fn memcpy(g: &mut BenchmarkGroup<'_, WallTime>, len: usize) {
    let src: Vec<u8> = (0..len).map(|i| i as u8).collect();
    let mut dst = vec![0u8; len];
    g.bench_function("memcpy", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
        })
    });
}

/// A fixed-size header: `encode(i, buf)` writes message `i`, `decode(buf)` reads one back
/// and folds its fields into a number.
fn fixed(
    c: &mut Criterion,
    name: &str,
    len: usize,
    encode: impl Fn(u64, &mut [u8]),
    decode: impl Fn(&[u8]) -> u64,
) {
    let mut buf = vec![0u8; COUNT * len];
    for (i, m) in buf.chunks_exact_mut(len).enumerate() {
        encode(i as u64, m);
    }
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function("decode", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            for m in black_box(&buf).chunks_exact(len) {
                acc = acc.wrapping_add(decode(m));
            }
            acc
        })
    });
    let mut out = vec![0u8; buf.len()];
    g.bench_function("encode", |b| {
        b.iter(|| {
            for (i, m) in out.chunks_exact_mut(len).enumerate() {
                encode(black_box(i as u64), m);
            }
            black_box(&mut out);
        })
    });
    // The encoder reproduces the reference bytes (also when a filter skipped the bench).
    for (i, m) in out.chunks_exact_mut(len).enumerate() {
        encode(i as u64, m);
    }
    assert_eq!(out, buf);
    memcpy(&mut g, buf.len());
    g.finish();
}

fn headers(c: &mut Criterion) {
    for (name, extended) in [("request/compact", false), ("request/extended", true)] {
        let len = if extended {
            Request::EXTENDED_LEN
        } else {
            Request::COMPACT_LEN
        };
        fixed(
            c,
            name,
            len,
            |i, buf| {
                Request {
                    flags: CmdFlags::empty(),
                    command: if i % 2 == 0 {
                        Command::Read
                    } else {
                        Command::Write
                    },
                    cookie: Cookie(i),
                    offset: i * 4096,
                    len: 4096,
                    extended,
                }
                .emit(buf)
                .unwrap();
            },
            |m| {
                let r = Request::parse(m).unwrap();
                r.cookie.0
                    ^ r.offset
                    ^ r.len
                    ^ u64::from(u16::from(r.command))
                    ^ u64::from(r.flags.bits())
            },
        );
    }
    fixed(
        c,
        "reply/simple",
        SimpleReply::LEN,
        |i, buf| {
            SimpleReply {
                error: (i % 16 == 15).then_some(Errno::Io),
                cookie: Cookie(i),
            }
            .emit(buf)
            .unwrap();
        },
        |m| match ReplyHeader::parse(m).unwrap() {
            ReplyHeader::Simple(s) => s.cookie.0 ^ u64::from(s.error.is_some()),
            ReplyHeader::Chunk(_) => unreachable!(),
        },
    );
    for (name, extended) in [
        ("reply/structured-chunk", false),
        ("reply/extended-chunk", true),
    ] {
        let len = if extended {
            ChunkHeader::EXTENDED_LEN
        } else {
            ChunkHeader::STRUCTURED_LEN
        };
        fixed(
            c,
            name,
            len,
            |i, buf| {
                ChunkHeader {
                    flags: ReplyFlags::DONE,
                    chunk_type: ChunkType::OffsetData,
                    cookie: Cookie(i),
                    offset: extended.then_some(i * 4096),
                    len: 4096 + 8,
                }
                .emit(buf)
                .unwrap();
            },
            |m| match ReplyHeader::parse(m).unwrap() {
                ReplyHeader::Chunk(h) => {
                    h.cookie.0
                        ^ h.len
                        ^ h.offset.unwrap_or(0)
                        ^ u64::from(u16::from(h.chunk_type))
                        ^ u64::from(h.flags.bits())
                }
                ReplyHeader::Simple(_) => unreachable!(),
            },
        );
    }
}

/// Variable-length messages: `messages` are encoded back to back (repeated up to about
/// COUNT messages); decode walks the buffer with `decode(buf) -> (value, consumed)`.
fn variable(
    c: &mut Criterion,
    name: &str,
    messages: usize,
    encode: impl Fn(usize, &mut [u8]) -> usize,
    decode: impl Fn(&[u8]) -> (u64, usize),
) {
    let mut buf = vec![0u8; 1 << 22];
    let mut at = 0;
    for i in 0..COUNT {
        at += encode(i % messages, &mut buf[at..]);
    }
    buf.truncate(at);
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function("decode", |b| {
        b.iter(|| {
            let (mut acc, mut at) = (0u64, 0);
            let buf = black_box(&buf[..]);
            while at < buf.len() {
                let (v, n) = decode(&buf[at..]);
                acc = acc.wrapping_add(v);
                at += n;
            }
            acc
        })
    });
    let mut out = vec![0u8; buf.len()];
    g.bench_function("encode", |b| {
        b.iter(|| {
            let mut at = 0;
            for i in 0..COUNT {
                at += encode(black_box(i % messages), &mut out[at..]);
            }
            black_box(&mut out);
        })
    });
    let mut at = 0;
    for i in 0..COUNT {
        at += encode(i % messages, &mut out[at..]);
    }
    assert_eq!(out, buf);
    memcpy(&mut g, buf.len());
    g.finish();
}

fn options(c: &mut Criterion) {
    const INFOS: [InfoType; 3] = [InfoType::Name, InfoType::Description, InfoType::BlockSize];
    variable(
        c,
        "option/go",
        1,
        |_, buf| {
            Opt::Go(ExportRequest {
                name: "disk",
                infos: InfoList::new(&INFOS),
            })
            .emit(buf)
            .unwrap()
        },
        |buf| match Opt::parse_message(buf).unwrap() {
            (Opt::Go(r), n) => {
                let infos: u64 = r.infos.iter().map(|t| u64::from(u16::from(t))).sum();
                (r.name.len() as u64 + infos, n)
            }
            _ => unreachable!(),
        },
    );
    const QUERIES: [&str; 2] = ["base:allocation", "qemu:dirty-bitmap:bitmap0"];
    variable(
        c,
        "option/set-meta-context",
        1,
        |_, buf| {
            Opt::SetMetaContext(MetaContextRequest {
                export: "disk",
                queries: Queries::new(&QUERIES),
            })
            .emit(buf)
            .unwrap()
        },
        |buf| match Opt::parse_message(buf).unwrap() {
            (Opt::SetMetaContext(r), n) => {
                let q: u64 = r.queries.iter().map(|q| q.len() as u64).sum();
                (r.export.len() as u64 + q, n)
            }
            _ => unreachable!(),
        },
    );
    // The replies to a GO with NAME, DESCRIPTION and BLOCK_SIZE, and a META_CONTEXT.
    let replies = [
        (
            OptCode::Go,
            OptReply::Info(Info::Export {
                size: 1 << 30,
                flags: TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_FLUSH,
            }),
        ),
        (OptCode::Go, OptReply::Info(Info::Name("disk"))),
        (
            OptCode::Go,
            OptReply::Info(Info::Description("a test disk")),
        ),
        (
            OptCode::Go,
            OptReply::Info(Info::BlockSize(BlockSize {
                min: 1,
                preferred: 4096,
                max_payload: 32 << 20,
            })),
        ),
        (OptCode::Go, OptReply::Ack),
        (
            OptCode::SetMetaContext,
            OptReply::MetaContext {
                id: 1,
                name: "base:allocation",
            },
        ),
    ];
    variable(
        c,
        "option/replies",
        replies.len(),
        |i, buf| replies[i].1.emit(replies[i].0, buf).unwrap(),
        |buf| {
            let (code, reply, n) = OptReply::parse_message(buf).unwrap();
            let v = match reply {
                OptReply::Info(Info::Export { size, .. }) => size,
                OptReply::Info(Info::Name(s) | Info::Description(s)) => s.len() as u64,
                OptReply::Info(Info::BlockSize(b)) => u64::from(b.max_payload),
                OptReply::MetaContext { id, name } => u64::from(id) + name.len() as u64,
                _ => 1,
            };
            (v ^ u64::from(u32::from(code)), n)
        },
    );
}

const EXTENTS: usize = 1 << 20;

/// The descriptors of a block-status payload: `EXTENTS` extents of `piece` bytes,
/// alternating data and hole.
fn extent_bytes(wide: bool, piece: u64) -> Vec<u8> {
    let w = Extent::width(wide);
    let mut v = vec![0u8; EXTENTS * w];
    for (i, d) in v.chunks_exact_mut(w).enumerate() {
        Extent {
            len: piece,
            status: (i as u64 % 2) * 3,
        }
        .emit(d, wide)
        .unwrap();
    }
    v
}

fn extents(c: &mut Criterion) {
    for wide in [false, true] {
        let bits = if wide { 64 } else { 32 };
        // 32-bit: 2^20 x 512 B = 512 MiB (fits a compact request); 64-bit: 2^20 x 4 KiB.
        let piece: u64 = if wide { 4096 } else { 512 };
        let descriptors = extent_bytes(wide, piece);

        // The codec alone: a whole payload (context ID [+ count] + descriptors).
        let mut payload = vec![0u8; 8];
        payload[..4].copy_from_slice(&1u32.to_be_bytes());
        if wide {
            payload[4..8].copy_from_slice(&(EXTENTS as u32).to_be_bytes());
        } else {
            payload.truncate(4);
        }
        payload.extend_from_slice(&descriptors);
        let mut g = c.benchmark_group(format!("block-status/{bits}-bit-2^20"));
        g.throughput(Throughput::Bytes(payload.len() as u64));
        g.sample_size(20);
        g.bench_function("parse+iterate", |b| {
            b.iter(|| {
                let bs = BlockStatus::parse(black_box(&payload), wide).unwrap();
                let (mut n, mut sum) = (0u64, 0u64);
                for e in bs.extents {
                    n += 1;
                    sum = sum.wrapping_add(e.len ^ e.status);
                }
                assert_eq!(n, EXTENTS as u64);
                sum
            })
        });

        // The same chunk through a Client machine in transmission (structured replies for
        // 32-bit descriptors, extended headers for 64-bit ones).
        let form = if wide {
            ReplyForm::Extended
        } else {
            ReplyForm::Structured
        };
        let total = piece * EXTENTS as u64;
        let mut l = loopback::Loopback::with_export_size(form, 1 << 20, 1 << 40, 1 << 16);
        let header = ChunkHeader {
            flags: ReplyFlags::DONE,
            chunk_type: if wide {
                ChunkType::BlockStatusExt
            } else {
                ChunkType::BlockStatus
            },
            cookie: Cookie(0),
            offset: wide.then_some(0),
            len: payload.len() as u64,
        };
        let mut chunk = vec![0u8; header.buffer_len()];
        header.emit(&mut chunk).unwrap();
        chunk.extend_from_slice(&payload);
        let mut scratch = vec![0u8; 4096];
        g.bench_function("client-machine", |b| {
            b.iter(|| {
                let cookie = l.client.block_status(0, total, CmdFlags::empty()).unwrap();
                while let Some(t) = l.client.poll_transmit(&mut scratch).unwrap() {
                    assert!(matches!(t, Transmit::Bytes(_)));
                }
                chunk[8..16].copy_from_slice(&cookie.0.to_be_bytes());
                let (mut at, mut n, mut sum) = (0, 0u64, 0u64);
                loop {
                    let h = l.client.handle_input(&chunk[at..]).unwrap();
                    at += h.consumed;
                    match h.event {
                        Some(Event::BlockStatus { extents, .. }) => {
                            for e in extents {
                                n += 1;
                                sum = sum.wrapping_add(e.len ^ e.status);
                            }
                        }
                        Some(Event::Done { result, .. }) => {
                            result.unwrap();
                            break;
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
                assert_eq!((n, at), (EXTENTS as u64, chunk.len()));
                sum
            })
        });
        memcpy(&mut g, payload.len());
        g.finish();
    }
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = headers, options, extents
}
criterion_main!(benches);
