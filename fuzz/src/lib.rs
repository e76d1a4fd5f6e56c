//! The checking functions behind the fuzz targets of `fuzz_targets/`: one per codec
//! family of `nbd_proto::wire` ([`TARGETS`]), and five that drive the client and server
//! state machines ([`MACHINE_TARGETS`], see [`machines`] for what they check).
//!
//! The codec targets take arbitrary bytes and panic if a codec breaks its contract
//! (`src/wire/mod.rs`, "Guarantees"):
//!
//! - decoding never panics;
//! - `Truncated { needed }` is exact and makes progress ([`check::stream`]);
//! - a successful decode re-emits exactly the bytes it consumed, except the documented
//!   non-canonical fields (oldstyle and `NBD_OPT_EXPORT_NAME` reply padding, data attached
//!   to `NBD_OPT_ABORT`, fields after the message of an unknown error chunk type);
//! - `emit` honours its buffer contract ([`check::emitted`]).
//!
//! The same functions run on stable over the committed corpora (`tests/replay.rs`), so CI
//! needs no nightly toolchain to replay them.
//!
//! `nbd-proto` is a dependency with `default-features = false` for every target: the
//! codecs and both machines are fuzzed exactly as a `no_std` user builds them. The
//! machine targets therefore use their own drivers ([`machines`]) rather than
//! `nbd_proto::testing::Pair`, which needs the `_testing` feature and so `std` (cargo
//! would unify it into the codec targets too).
//!
//! Seeds of `client_input` and `server_input` are real sessions: the server's and the
//! client's bytes of qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh and this crate's
//! `nbd-client` example against qemu-nbd (extended headers), nbdkit (structured, `--no-sr`
//! simple, `-o` oldstyle) and this crate's `nbd-server` example, captured with a raw
//! socket proxy, with a selector byte (and for the client a command script) in front
//! (see [`machines::client::setup`], [`machines::server::setup`]).
//!
//! # Running
//!
//! From the repository root:
//!
//! - replay on stable: `cargo test --manifest-path fuzz/Cargo.toml`;
//! - fuzz (nightly): `cargo +nightly fuzz run wire_opt "$(mktemp -d)" fuzz/corpus/wire_opt`
//!   (any target: `cargo +nightly fuzz list`).
//!   libFuzzer writes new inputs into the first directory, so a scratch one keeps
//!   `corpus/` to the hand-picked seeds. A crash lands in `fuzz/artifacts/<target>/`;
//!   once fixed, copy it to `fuzz/regressions/<target>/` so the replay keeps checking it.

pub mod check;
pub mod machines;

pub use machines::client::client_input;
pub use machines::ops::{client_ops, server_ops};
pub use machines::pair::pair;
pub use machines::server::server_input;

use nbd_proto::wire::extent::emit_extents;
use nbd_proto::wire::{chunk::ChunkPayload, ChunkType, ErrorChunk};
use nbd_proto::wire::{
    BlockStatus, BlockStatusHeader, BlockStatusPayload, ChunkHeader, ClientFlags, ExportNameReply,
    Extent, Extents, Greeting, Hello, Info, OldstyleHello, Opt, OptCode, OptReply, ReplyHeader,
    ReplyType, Request, ZERO_PAD_LEN,
};

use check::{emitted, same, stream, whole};

/// A target's checking function: panics on a broken contract, else returns how many of
/// its decoders accepted the input.
pub type Target = fn(&[u8]) -> usize;

/// Every target: its name (as in `fuzz_targets/` and `corpus/`) and its function, which
/// returns how many of its decoders accepted the input (the replay test checks that every
/// seed is accepted by at least one).
pub const TARGETS: &[(&str, Target)] = &[
    ("wire_handshake", wire_handshake),
    ("wire_opt", wire_opt),
    ("wire_opt_reply", wire_opt_reply),
    ("wire_request", wire_request),
    ("wire_reply", wire_reply),
    ("wire_chunk", wire_chunk),
];

/// The state-machine targets ([`machines`]): name and function, which returns the number
/// of events the input produced (the replay test checks that every seed produces some).
/// Their seeds are whole sessions, so the replay runs each whole and at a sample of
/// prefixes rather than at every prefix.
pub const MACHINE_TARGETS: &[(&str, Target)] = &[
    ("client_input", client_input),
    ("server_input", server_input),
    ("client_ops", client_ops),
    ("server_ops", server_ops),
    ("pair", pair),
];

/// Checks `out` against `data`, where bytes `from..` are reserved zero padding.
fn same_padded(out: &[u8], data: &[u8], from: usize) {
    same(&out[..from], &data[..from]);
    assert!(out[from..].iter().all(|&b| b == 0), "padding not zero");
}

/// Oldstyle hello, newstyle greeting, client flags.
pub fn wire_handshake(data: &[u8]) -> usize {
    let mut ok = 0;
    if let Some((h, n)) = stream(data, Hello::parse) {
        ok += 1;
        let out = emitted(h.buffer_len(), |b| h.emit(b));
        assert_eq!(out.len(), n);
        match h {
            Hello::Newstyle(g) => {
                same(&out, &data[..n]);
                assert_eq!(Greeting::parse(data), Ok(g));
            }
            Hello::Oldstyle(o) => {
                same_padded(&out, &data[..n], OldstyleHello::LEN - ZERO_PAD_LEN);
                assert_eq!(OldstyleHello::parse(data), Ok(o));
            }
        }
    }
    if let Some((g, n)) = stream(data, Greeting::parse) {
        ok += 1;
        same(&emitted(g.buffer_len(), |b| g.emit(b)), &data[..n]);
    }
    if let Some((o, n)) = stream(data, OldstyleHello::parse) {
        ok += 1;
        let out = emitted(o.buffer_len(), |b| o.emit(b));
        assert_eq!(out.len(), n);
        same_padded(&out, &data[..n], OldstyleHello::LEN - ZERO_PAD_LEN);
    }
    if let Some((f, n)) = stream(data, ClientFlags::parse) {
        ok += 1;
        same(&emitted(f.buffer_len(), |b| f.emit(b)), &data[..n]);
    }
    ok
}

fn check_opt_lists(opt: &Opt<'_>) {
    match opt {
        Opt::Info(r) | Opt::Go(r) => assert_eq!(r.infos.iter().count(), r.infos.len()),
        Opt::ListMetaContext(r) | Opt::SetMetaContext(r) => {
            assert_eq!(r.queries.iter().count(), r.queries.len())
        }
        _ => {}
    }
}

/// Option requests: whole messages, and the data of every option type.
pub fn wire_opt(data: &[u8]) -> usize {
    let mut ok = 0;
    if let Some(((opt, n), end)) = stream(data, Opt::parse_message) {
        ok += 1;
        assert_eq!(n, end);
        check_opt_lists(&opt);
        let out = emitted(opt.buffer_len(), |b| opt.emit(b));
        if opt == Opt::Abort {
            // Data attached to NBD_OPT_ABORT is ignored and not sent back.
            same(&out[..12], &data[..12]);
            assert_eq!(out.len(), 16);
        } else {
            same(&out, &data[..n]);
        }
    }
    let unknown = [0, 4, 12, 0x8000_0000, u32::MAX].map(OptCode::from);
    for &code in OptCode::ALL.iter().chain(&unknown) {
        let Some(opt) = whole(data, |d| Opt::parse(code, d)) else {
            continue;
        };
        ok += 1;
        assert_eq!(opt.code(), code);
        check_opt_lists(&opt);
        let out = emitted(opt.buffer_len(), |b| opt.emit(b));
        same(&out[8..12], &u32::from(code).to_be_bytes());
        same(&out[16..], if code == OptCode::Abort { &[] } else { data });
    }
    ok
}

/// Option replies, information records, the `NBD_OPT_EXPORT_NAME` reply.
pub fn wire_opt_reply(data: &[u8]) -> usize {
    let mut ok = 0;
    if let Some(((opt, reply, n), end)) = stream(data, OptReply::parse_message) {
        ok += 1;
        assert_eq!(n, end);
        same(
            &emitted(reply.buffer_len(), |b| reply.emit(opt, b)),
            &data[..n],
        );
    }
    let types = [1, 2, 3, 4, 0, 5, 0x8000_0001, 0x8000_000a, 0x8000_00ff].map(ReplyType::from);
    for t in types {
        if let Some(reply) = whole(data, |d| OptReply::parse(t, d)) {
            ok += 1;
            assert_eq!(reply.reply_type(), t);
            let out = emitted(reply.buffer_len(), |b| reply.emit(OptCode::Go, b));
            same(&out[12..16], &u32::from(t).to_be_bytes());
            same(&out[20..], data);
        }
    }
    if let Some(info) = whole(data, Info::parse) {
        ok += 1;
        same(&emitted(info.buffer_len(), |b| info.emit(b)), data);
    }
    for zeroes in [false, true] {
        if let Some((r, n)) = stream(data, |d| ExportNameReply::parse(d, zeroes)) {
            ok += 1;
            assert_eq!(r.zeroes, zeroes);
            let out = emitted(r.buffer_len(), |b| r.emit(b));
            assert_eq!(out.len(), n);
            same_padded(&out, &data[..n], ExportNameReply::SHORT_LEN);
        }
    }
    ok
}

/// Request headers, compact and extended, and the block-status payload after them.
pub fn wire_request(data: &[u8]) -> usize {
    let mut ok = 0;
    let mut payload = data;
    if let Some((r, n)) = stream(data, Request::parse) {
        ok += 1;
        same(&emitted(r.buffer_len(), |b| r.emit(b)), &data[..n]);
        payload = &data[n..];
    }
    if let Some(p) = whole(payload, BlockStatusPayload::parse) {
        ok += 1;
        assert_eq!(p.ids.iter().count(), p.ids.len());
        same(&emitted(p.buffer_len(), |b| p.emit(b)), payload);
    }
    ok
}

/// Simple reply, structured and extended chunk headers.
pub fn wire_reply(data: &[u8]) -> usize {
    let mut ok = 0;
    if let Some((h, n)) = stream(data, ReplyHeader::parse) {
        ok += 1;
        same(&emitted(h.buffer_len(), |b| h.emit(b)), &data[..n]);
        if let ReplyHeader::Chunk(c) = h {
            assert_eq!(c.is_extended(), n == ChunkHeader::EXTENDED_LEN);
        }
    }
    ok
}

fn check_extents(ex: Extents<'_>) {
    let v: Vec<Extent> = ex.iter().collect();
    assert_eq!((v.len(), ex.iter().len()), (ex.len(), ex.len()));
    for (i, e) in v.iter().enumerate() {
        assert_eq!(ex.get(i), Some(*e));
    }
    assert_eq!(ex.get(v.len()), None);
    let wide = ex.is_wide();
    same(
        &emitted(ex.as_bytes().len(), |b| emit_extents(&v, wide, b)),
        ex.as_bytes(),
    );
}

fn check_error_chunk(t: ChunkType, e: &ErrorChunk<'_>, payload: &[u8]) {
    let out = emitted(e.buffer_len(), |b| e.emit(b));
    if t == e.chunk_type() {
        same(&out, payload);
    } else {
        // An unknown error type: only the error and message are decoded and re-encoded.
        assert!(matches!(t, ChunkType::Unknown(_)) && t.is_error(), "{t:?}");
        assert_eq!(e.offset, None);
        same(&out, &payload[..out.len()]);
    }
}

/// Chunk payloads: whole chunks, error payloads, block-status payloads and headers,
/// extents.
pub fn wire_chunk(data: &[u8]) -> usize {
    let mut ok = 0;
    if let Some(((h, p, n), end)) = stream(data, ChunkPayload::parse_message) {
        ok += 1;
        assert_eq!(n, end);
        let start = h.buffer_len();
        same(&emitted(start, |b| h.emit(b)), &data[..start]);
        assert_eq!((n - start) as u64, ChunkPayload::buffered_len(&h));
        let payload = &data[start..n];
        match p {
            ChunkPayload::None => assert!(payload.is_empty()),
            ChunkPayload::OffsetData(d) => {
                assert_eq!(d.chunk_len(), Some(h.len));
                same(&emitted(8, |b| d.emit(b)), payload);
            }
            ChunkPayload::OffsetHole(x) => same(&emitted(12, |b| x.emit(b)), payload),
            ChunkPayload::BlockStatus(b) => {
                check_extents(b.extents);
                same(&emitted(b.buffer_len(), |o| b.emit(o)), payload);
            }
            ChunkPayload::Error(e) => check_error_chunk(h.chunk_type, &e, payload),
            ChunkPayload::Unknown(raw) => {
                assert!(!h.chunk_type.is_error());
                same(raw, payload);
            }
        }
    }
    let error_types = [0x8001, 0x8002, 0x8003, 0xffff].map(ChunkType::from);
    for t in error_types {
        if let Some(e) = whole(data, |d| ErrorChunk::parse(t, d)) {
            ok += 1;
            check_error_chunk(t, &e, data);
        }
    }
    for wide in [false, true] {
        if let Some(b) = whole(data, |d| BlockStatus::parse(d, wide)) {
            ok += 1;
            assert_eq!(b.extents.is_wide(), wide);
            check_extents(b.extents);
            same(&emitted(b.buffer_len(), |o| b.emit(o)), data);
        }
        if let Some(ex) = whole(data, |d| Extents::new(d, wide)) {
            ok += 1;
            check_extents(ex);
        }
        // A chunk length (first 8 bytes), then the start of a block-status payload.
        if let Some((len, rest)) = data.split_first_chunk::<8>() {
            let chunk_len = u64::from_be_bytes(*len);
            let parse = |b| BlockStatusHeader::parse(b, wide, chunk_len);
            if let Some((h, n)) = stream(rest, parse) {
                ok += 1;
                assert_eq!((h.wide, h.chunk_len()), (wide, Some(chunk_len)));
                same(
                    &emitted(BlockStatusHeader::len(wide), |b| h.emit(b)),
                    &rest[..n],
                );
            }
        }
    }
    ok
}
