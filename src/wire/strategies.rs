#![allow(unreachable_pub)]
//! proptest strategies shared by the codec tests.
//!
//! Values that borrow strings or slices are built from leaked allocations, so that every
//! strategy yields a `'static` `Repr`; the leak is bounded by the number of test cases.

use core::fmt;

use proptest::prelude::*;

use super::*;
use crate::wire::chunk::{BlockStatus, ChunkPayload, ErrorChunk, OffsetDataHeader, OffsetHole};
use crate::wire::extent::{emit_extents, Extent};

fn leak_str(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn leak<T>(v: Vec<T>) -> &'static [T] {
    Box::leak(v.into_boxed_slice())
}

/// A string that obeys the spec's rules: no NUL, at most 4096 bytes.
pub fn nbd_string() -> impl Strategy<Value = &'static str> + Clone {
    prop_oneof![
        8 => "[^\u{0}]{0,24}",
        1 => "[a-z:]{4000,4096}",
    ]
    .prop_map(leak_str)
}

pub fn hello() -> impl Strategy<Value = Hello> {
    prop_oneof![
        any::<u16>().prop_map(|f| Hello::Newstyle(Greeting {
            flags: HandshakeFlags::from_bits(f)
        })),
        (any::<u64>(), any::<u16>(), any::<u16>()).prop_map(|(size, h, t)| Hello::Oldstyle(
            OldstyleHello {
                size,
                handshake_flags: HandshakeFlags::from_bits(h),
                transmission_flags: TransmissionFlags::from_bits(t),
            }
        )),
    ]
}

fn info_type() -> impl Strategy<Value = InfoType> + Clone {
    prop_oneof![
        (0u16..4).prop_map(InfoType::from),
        any::<u16>().prop_map(InfoType::from)
    ]
}

fn unknown_code<T: Copy + fmt::Debug + 'static>(
    known: fn(T) -> bool,
    any_value: impl Strategy<Value = T>,
) -> impl Strategy<Value = T> {
    any_value.prop_filter("known code", move |v| !known(*v))
}

pub fn opt() -> impl Strategy<Value = Opt<'static>> {
    let export =
        (nbd_string(), prop::collection::vec(info_type(), 0..6)).prop_map(|(name, infos)| {
            ExportRequest {
                name,
                infos: InfoList::new(leak(infos)),
            }
        });
    let meta = (nbd_string(), prop::collection::vec(nbd_string(), 0..5)).prop_map(|(export, q)| {
        MetaContextRequest {
            export,
            queries: Queries::new(leak(q)),
        }
    });
    prop_oneof![
        nbd_string().prop_map(|name| Opt::ExportName { name }),
        Just(Opt::Abort),
        Just(Opt::List),
        Just(Opt::StartTls),
        export.clone().prop_map(Opt::Info),
        export.prop_map(Opt::Go),
        Just(Opt::StructuredReply),
        meta.clone().prop_map(Opt::ListMetaContext),
        meta.prop_map(Opt::SetMetaContext),
        Just(Opt::ExtendedHeaders),
        (
            unknown_code(
                |c: u32| !matches!(OptCode::from(c), OptCode::Unknown(_)),
                any::<u32>()
            ),
            prop::collection::vec(any::<u8>(), 0..32)
        )
            .prop_map(|(code, data)| Opt::Unknown {
                code,
                data: leak(data)
            }),
    ]
}

/// `opt()` under the name the tests use for it.
pub fn opt_owned() -> impl Strategy<Value = OptStatic> {
    opt().prop_map(OptStatic)
}

/// An [`Opt`] with `'static` borrows.
#[derive(Debug, Clone)]
pub struct OptStatic(pub Opt<'static>);
impl OptStatic {
    pub fn as_opt(&self) -> Opt<'static> {
        self.0
    }
}

pub fn info() -> impl Strategy<Value = Info<'static>> {
    prop_oneof![
        (any::<u64>(), any::<u16>()).prop_map(|(size, f)| Info::Export {
            size,
            flags: TransmissionFlags::from_bits(f)
        }),
        nbd_string().prop_map(Info::Name),
        nbd_string().prop_map(Info::Description),
        (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(min, preferred, max_payload)| {
            Info::BlockSize(BlockSize {
                min,
                preferred,
                max_payload,
            })
        }),
        (
            unknown_code(|c: u16| c < 4, any::<u16>()),
            prop::collection::vec(any::<u8>(), 0..16)
        )
            .prop_map(|(info, data)| Info::Unknown {
                info,
                data: leak(data)
            }),
    ]
}

pub fn opt_error() -> impl Strategy<Value = OptError> {
    prop_oneof![
        (0x8000_0001u32..=0x8000_000a).prop_map(OptError::from),
        (0x8000_0000u32..).prop_map(OptError::from)
    ]
}

pub fn opt_reply() -> impl Strategy<Value = OptReply<'static>> {
    prop_oneof![
        Just(OptReply::Ack),
        (nbd_string(), nbd_string())
            .prop_map(|(name, description)| OptReply::Server { name, description }),
        info().prop_map(OptReply::Info),
        (any::<u32>(), nbd_string()).prop_map(|(id, name)| OptReply::MetaContext { id, name }),
        (opt_error(), nbd_string()).prop_map(|(error, message)| OptReply::Error { error, message }),
        (
            (5u32..0x8000_0000),
            prop::collection::vec(any::<u8>(), 0..16)
        )
            .prop_map(|(reply, data)| OptReply::Unknown {
                reply,
                data: leak(data)
            }),
    ]
}

/// An [`OptReply`] with `'static` borrows.
#[derive(Debug, Clone)]
pub struct OptReplyStatic(pub OptReply<'static>);
impl OptReplyStatic {
    pub fn as_reply(&self) -> OptReply<'static> {
        self.0
    }
}

pub fn opt_reply_owned() -> impl Strategy<Value = OptReplyStatic> {
    opt_reply().prop_map(OptReplyStatic)
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        (0u16..9).prop_map(Command::from),
        any::<u16>().prop_map(Command::from)
    ]
}

pub fn request() -> impl Strategy<Value = Request> {
    (
        any::<u16>(),
        command(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(|(flags, command, cookie, offset, len, extended)| Request {
            flags: CmdFlags::from_bits(flags),
            command,
            cookie: Cookie(cookie),
            offset,
            len: if extended { len } else { len & 0xffff_ffff },
            extended,
        })
}

fn chunk_type() -> impl Strategy<Value = ChunkType> {
    prop_oneof![
        prop::sample::select(ChunkType::ALL.to_vec()),
        any::<u16>().prop_map(ChunkType::from),
    ]
}

pub fn reply_header() -> impl Strategy<Value = ReplyHeader> {
    let simple = (any::<u32>(), any::<u64>()).prop_map(|(e, c)| {
        ReplyHeader::Simple(SimpleReply {
            error: Errno::from_wire(e),
            cookie: Cookie(c),
        })
    });
    let chunk = (
        any::<u16>(),
        chunk_type(),
        any::<u64>(),
        prop::option::of(any::<u64>()),
        any::<u64>(),
    )
        .prop_map(|(flags, chunk_type, cookie, offset, len)| {
            ReplyHeader::Chunk(ChunkHeader {
                flags: ReplyFlags::from_bits(flags),
                chunk_type,
                cookie: Cookie(cookie),
                offset,
                len: if offset.is_some() {
                    len
                } else {
                    len & 0xffff_ffff
                },
            })
        });
    prop_oneof![simple, chunk]
}

pub fn error_chunk() -> impl Strategy<Value = ErrorChunk<'static>> {
    (1u32.., nbd_string(), prop::option::of(any::<u64>())).prop_map(|(e, message, offset)| {
        ErrorChunk {
            error: Errno::from(e),
            message,
            offset,
        }
    })
}

/// An [`ErrorChunk`] with `'static` borrows.
#[derive(Debug, Clone)]
pub struct ErrorChunkStatic(pub ErrorChunk<'static>);
impl ErrorChunkStatic {
    pub fn as_chunk(&self) -> ErrorChunk<'static> {
        self.0
    }
}

pub fn error_chunk_owned() -> impl Strategy<Value = ErrorChunkStatic> {
    error_chunk().prop_map(ErrorChunkStatic)
}

/// A block-status payload of either form: 1 to 32 descriptors (lengths and statuses kept
/// to 32 bits in the narrow form).
pub fn block_status() -> impl Strategy<Value = BlockStatus<'static>> {
    (
        any::<u32>(),
        any::<bool>(),
        prop::collection::vec((any::<u64>(), any::<u64>()), 1..32),
    )
        .prop_map(|(context_id, wide, v)| {
            let mask = if wide { u64::MAX } else { 0xffff_ffff };
            let v: Vec<Extent> = v
                .into_iter()
                .map(|(len, status)| Extent {
                    len: len & mask,
                    status: status & mask,
                })
                .collect();
            let mut bytes = vec![0; v.len() * Extent::width(wide)];
            emit_extents(&v, wide, &mut bytes).unwrap();
            BlockStatus {
                context_id,
                extents: Extents::new(leak(bytes), wide).unwrap(),
            }
        })
}

/// Every decodable chunk payload except [`ChunkPayload::Unknown`] (whose type is not
/// in the value): `OFFSET_DATA` with 1 byte to 2^64 - 9 bytes of data declared.
pub fn chunk_payload() -> impl Strategy<Value = ChunkPayload<'static>> {
    prop_oneof![
        Just(ChunkPayload::None),
        (any::<u64>(), 1..=u64::MAX - 8).prop_map(|(offset, data_len)| {
            ChunkPayload::OffsetData(OffsetDataHeader { offset, data_len })
        }),
        (any::<u64>(), any::<u32>())
            .prop_map(|(offset, len)| ChunkPayload::OffsetHole(OffsetHole { offset, len })),
        block_status().prop_map(ChunkPayload::BlockStatus),
        error_chunk().prop_map(ChunkPayload::Error),
    ]
}

/// A [`ChunkPayload`] with `'static` borrows.
#[derive(Debug, Clone)]
pub struct ChunkPayloadStatic(pub ChunkPayload<'static>);

pub fn chunk_payload_owned() -> impl Strategy<Value = ChunkPayloadStatic> {
    chunk_payload().prop_map(ChunkPayloadStatic)
}

/// Flips or overwrites a few bytes of a valid encoding, or truncates it.
fn mutate(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = valid.len().max(1);
    (
        prop::collection::vec((0..len, any::<u8>()), 0..3),
        0..=valid.len(),
        any::<bool>(),
    )
        .prop_map(move |(edits, cut, truncate)| {
            let mut v = valid.clone();
            for (at, byte) in edits {
                if let Some(b) = v.get_mut(at) {
                    *b = byte;
                }
            }
            if truncate {
                v.truncate(cut);
            }
            v
        })
}

/// A magic from `magics`, then up to `max` random bytes.
pub fn magic_prefixed(magics: &'static [u32], max: usize) -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(magics),
        prop::collection::vec(any::<u8>(), 0..max),
    )
        .prop_map(|(m, rest)| {
            let mut v = m.to_be_bytes().to_vec();
            v.extend(rest);
            v
        })
}

/// Option requests: valid encodings with a few bytes changed, or random bytes after the
/// magic.
pub fn option_bytes() -> impl Strategy<Value = Vec<u8>> {
    let valid = opt().prop_flat_map(|o| {
        let mut buf = vec![0; o.buffer_len()];
        o.emit(&mut buf).unwrap();
        mutate(buf)
    });
    let random = (0u32..13, prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(code, data)| {
        let mut v = OPTS_MAGIC.to_be_bytes().to_vec();
        v.extend(code.to_be_bytes());
        v.extend((data.len() as u32).to_be_bytes());
        v.extend(data);
        v
    });
    prop_oneof![valid, random]
}

/// Option replies: valid encodings with a few bytes changed, or random data.
pub fn option_reply_bytes() -> impl Strategy<Value = Vec<u8>> {
    let valid = (any::<u32>(), opt_reply()).prop_flat_map(|(o, r)| {
        let mut buf = vec![0; r.buffer_len()];
        r.emit(OptCode::from(o), &mut buf).unwrap();
        mutate(buf)
    });
    let random = (
        any::<u32>(),
        prop_oneof![1u32..5, Just(0x8000_0001)],
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(opt, ty, data)| {
            let mut v = REP_MAGIC.to_be_bytes().to_vec();
            v.extend(opt.to_be_bytes());
            v.extend(ty.to_be_bytes());
            v.extend((data.len() as u32).to_be_bytes());
            v.extend(data);
            v
        });
    prop_oneof![valid, random]
}

/// Chunk headers with plausible payloads of every type, then mutated.
pub fn chunk_bytes() -> impl Strategy<Value = Vec<u8>> {
    (
        reply_header(),
        chunk_type(),
        prop::collection::vec(any::<u8>(), 0..80),
        any::<bool>(),
    )
        .prop_flat_map(|(h, ty, payload, wide)| {
            let header = match h {
                ReplyHeader::Chunk(c) => ChunkHeader {
                    chunk_type: ty,
                    len: payload.len() as u64,
                    ..c
                },
                ReplyHeader::Simple(s) => ChunkHeader {
                    flags: ReplyFlags::DONE,
                    chunk_type: ty,
                    cookie: s.cookie,
                    offset: if wide { Some(0) } else { None },
                    len: payload.len() as u64,
                },
            };
            let mut buf = vec![0; header.buffer_len()];
            header.emit(&mut buf).unwrap();
            buf.extend(payload);
            mutate(buf)
        })
}
