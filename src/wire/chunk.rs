//! Payloads of structured and extended reply chunks (proto.md "Structured reply types").
//! The layouts are the same under both header forms.
//!
//! ```text
//! NBD_REPLY_TYPE_NONE (0):             L = 0
//! NBD_REPLY_TYPE_OFFSET_DATA (1):      64 bits offset, L - 8 bytes data (L >= 9)
//! NBD_REPLY_TYPE_OFFSET_HOLE (2):      64 bits offset, 32 bits hole size (L = 12)
//! NBD_REPLY_TYPE_BLOCK_STATUS (5):     32 bits context ID, n * (32 bits length, 32 bits status)
//!                                      (L = 4 + 8n, n >= 1)
//! NBD_REPLY_TYPE_BLOCK_STATUS_EXT (6): 32 bits context ID, 32 bits count n,
//!                                      n * (64 bits length, 64 bits status) (L = 8 + 16n, n >= 1)
//! NBD_REPLY_TYPE_ERROR (2^15 + 1):     32 bits error, 16 bits message length M, M bytes message
//!                                      (L = 6 + M)
//! NBD_REPLY_TYPE_ERROR_OFFSET (2^15+2): 32 bits error, 16 bits M, M bytes message,
//!                                      64 bits offset (L = 14 + M)
//! ```
//!
//! `OFFSET_DATA` data never passes through this module: [`OffsetDataHeader`] covers the
//! 8-byte offset and reports how many data bytes follow. Error chunk lengths are read
//! strictly (`L = 6 + M`, `L = 14 + M`: the spec gives only upper bounds on `M`, and
//! every peer observed sends exactly these); for error chunk types this crate does not
//! know, the spec's common prefix (error, message) is decoded and any further fields are
//! ignored.

use byteorder::{ByteOrder, NetworkEndian};

use super::{
    check_str, need, parse_str, room, ChunkHeader, ChunkType, Errno, Error, Extents, ReplyHeader,
    Result,
};
use crate::wire::extent::Extent;

/// The fixed part of an `NBD_REPLY_TYPE_OFFSET_DATA` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OffsetDataHeader {
    /// Export offset of the first data byte.
    pub offset: u64,
    /// Number of data bytes after the offset (`L - 8`, at least 1).
    pub data_len: u64,
}

impl OffsetDataHeader {
    /// Length of the fixed part (the offset).
    pub const LEN: usize = 8;

    /// Decodes the offset from the start of `buf`, given the chunk's payload length.
    #[inline]
    pub fn parse(buf: &[u8], chunk_len: u64) -> Result<Self> {
        if chunk_len <= Self::LEN as u64 {
            return Err(Error::BadLength {
                what: "NBD_REPLY_TYPE_OFFSET_DATA must carry at least one data byte",
                len: chunk_len,
            });
        }
        need(buf, Self::LEN)?;
        Ok(Self {
            offset: NetworkEndian::read_u64(&buf[..8]),
            data_len: chunk_len - Self::LEN as u64,
        })
    }

    /// The chunk's payload length (`8 + data_len`), if it fits in 64 bits.
    pub fn chunk_len(&self) -> Option<u64> {
        self.data_len.checked_add(Self::LEN as u64)
    }

    /// Encodes the offset into `buf`, returning the bytes written (8).
    #[inline]
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        room(buf, Self::LEN)?;
        NetworkEndian::write_u64(&mut buf[..8], self.offset);
        Ok(Self::LEN)
    }
}

/// An `NBD_REPLY_TYPE_OFFSET_HOLE` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OffsetHole {
    /// Export offset of the hole.
    pub offset: u64,
    /// Hole length (32 bits even with extended headers; must not be zero).
    pub len: u32,
}

impl OffsetHole {
    /// Payload length.
    pub const LEN: usize = 12;

    /// Decodes a payload of exactly 12 bytes.
    #[inline]
    pub fn parse(payload: &[u8]) -> Result<Self> {
        if payload.len() != Self::LEN {
            return Err(Error::BadLength {
                what: "NBD_REPLY_TYPE_OFFSET_HOLE length must be 12",
                len: payload.len() as u64,
            });
        }
        Ok(Self {
            offset: NetworkEndian::read_u64(&payload[..8]),
            len: NetworkEndian::read_u32(&payload[8..12]),
        })
    }

    /// Encodes into `buf`, returning the bytes written (12).
    #[inline]
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        room(buf, Self::LEN)?;
        NetworkEndian::write_u64(&mut buf[..8], self.offset);
        NetworkEndian::write_u32(&mut buf[8..12], self.len);
        Ok(Self::LEN)
    }
}

/// The fixed part of a block-status payload: the context ID (and, for the 64-bit form,
/// the descriptor count), checked against the chunk length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockStatusHeader {
    /// The metadata context this chunk describes.
    pub context_id: u32,
    /// Number of descriptors that follow (at least 1).
    pub count: u64,
    /// True for `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` (64-bit descriptors).
    pub wide: bool,
}

impl BlockStatusHeader {
    /// Length of the fixed part: 4 (32-bit form) or 8 (64-bit form).
    pub const fn len(wide: bool) -> usize {
        if wide {
            8
        } else {
            4
        }
    }

    /// Decodes the fixed part from the start of `buf`, given the chunk's payload length.
    #[inline]
    pub fn parse(buf: &[u8], wide: bool, chunk_len: u64) -> Result<Self> {
        let fixed = Self::len(wide) as u64;
        let width = Extent::width(wide) as u64;
        let body = chunk_len
            .checked_sub(fixed)
            .filter(|b| *b >= width && b % width == 0);
        let Some(body) = body else {
            return Err(Error::BadLength {
                what: if wide {
                    "NBD_REPLY_TYPE_BLOCK_STATUS_EXT length must be 8 + 16n with n >= 1"
                } else {
                    "NBD_REPLY_TYPE_BLOCK_STATUS length must be 4 + 8n with n >= 1"
                },
                len: chunk_len,
            });
        };
        need(buf, Self::len(wide))?;
        let count = body / width;
        if wide {
            let declared = NetworkEndian::read_u32(&buf[4..8]);
            if u64::from(declared) != count {
                return Err(Error::BadLength {
                    what:
                        "NBD_REPLY_TYPE_BLOCK_STATUS_EXT descriptor count does not match its length",
                    len: declared.into(),
                });
            }
        }
        Ok(Self {
            context_id: NetworkEndian::read_u32(&buf[..4]),
            count,
            wide,
        })
    }

    /// The chunk's payload length for this header's descriptors, if it fits in 64 bits.
    pub fn chunk_len(&self) -> Option<u64> {
        self.count
            .checked_mul(Extent::width(self.wide) as u64)?
            .checked_add(Self::len(self.wide) as u64)
    }

    /// Encodes the fixed part into `buf`, returning the bytes written.
    #[inline]
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        let len = Self::len(self.wide);
        room(buf, len)?;
        NetworkEndian::write_u32(&mut buf[..4], self.context_id);
        if self.wide {
            let count = u32::try_from(self.count).map_err(|_| Error::BadLength {
                what: "more than 2^32 - 1 descriptors in one chunk",
                len: self.count,
            })?;
            NetworkEndian::write_u32(&mut buf[4..8], count);
        }
        Ok(len)
    }
}

/// A whole block-status payload: context ID and descriptors, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus<'a> {
    /// The metadata context this chunk describes.
    pub context_id: u32,
    /// The descriptors.
    pub extents: Extents<'a>,
}

impl<'a> BlockStatus<'a> {
    /// Decodes a whole payload (all `L` bytes) of the 32-bit or 64-bit form.
    pub fn parse(payload: &'a [u8], wide: bool) -> Result<Self> {
        let header = BlockStatusHeader::parse(payload, wide, payload.len() as u64)?;
        Ok(Self {
            context_id: header.context_id,
            extents: Extents::new(&payload[BlockStatusHeader::len(wide)..], wide)?,
        })
    }

    /// Length of the encoding.
    pub fn buffer_len(&self) -> usize {
        BlockStatusHeader::len(self.extents.is_wide()) + self.extents.as_bytes().len()
    }

    /// Encodes into `buf`, returning the bytes written.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        let len = self.buffer_len();
        room(buf, len)?;
        let wide = self.extents.is_wide();
        let fixed = BlockStatusHeader {
            context_id: self.context_id,
            count: self.extents.len() as u64,
            wide,
        }
        .emit(buf)?;
        buf[fixed..len].copy_from_slice(self.extents.as_bytes());
        Ok(len)
    }
}

/// An error chunk payload: `NBD_REPLY_TYPE_ERROR`, or `NBD_REPLY_TYPE_ERROR_OFFSET` when
/// `offset` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorChunk<'a> {
    /// The error (never 0).
    pub error: Errno,
    /// Human-readable message ("" if none).
    pub message: &'a str,
    /// For `ERROR_OFFSET`: the offset where the error happened.
    pub offset: Option<u64>,
}

impl<'a> ErrorChunk<'a> {
    /// Decodes the payload (all `L` bytes) of an error chunk of type `chunk_type` (bit 15
    /// set). For unknown error types, fields after the message are ignored.
    pub fn parse(chunk_type: ChunkType, payload: &'a [u8]) -> Result<Self> {
        if payload.len() < 6 {
            return Err(Error::BadLength {
                what: "error chunk shorter than 6 bytes",
                len: payload.len() as u64,
            });
        }
        let error = match Errno::from_wire(NetworkEndian::read_u32(&payload[..4])) {
            Some(e) => e,
            None => {
                return Err(Error::BadValue {
                    what: "error chunk with error value 0",
                    value: 0,
                })
            }
        };
        let msg_len = usize::from(NetworkEndian::read_u16(&payload[4..6]));
        let rest = &payload[6..];
        let Some(message) = rest.get(..msg_len) else {
            return Err(Error::BadLength {
                what: "error chunk message longer than the chunk",
                len: msg_len as u64,
            });
        };
        let message = parse_str(message, "error chunk message")?;
        let tail = &rest[msg_len..];
        let offset = match chunk_type {
            ChunkType::ErrorOffset => {
                if tail.len() != 8 {
                    return Err(Error::BadLength {
                        what: "NBD_REPLY_TYPE_ERROR_OFFSET length must be 14 + message length",
                        len: payload.len() as u64,
                    });
                }
                Some(NetworkEndian::read_u64(tail))
            }
            ChunkType::Error if !tail.is_empty() => {
                return Err(Error::BadLength {
                    what: "NBD_REPLY_TYPE_ERROR length must be 6 + message length",
                    len: payload.len() as u64,
                })
            }
            _ => None,
        };
        Ok(Self {
            error,
            message,
            offset,
        })
    }

    /// The chunk type this payload is sent as.
    pub fn chunk_type(&self) -> ChunkType {
        if self.offset.is_some() {
            ChunkType::ErrorOffset
        } else {
            ChunkType::Error
        }
    }

    /// Length of the encoding.
    pub fn buffer_len(&self) -> usize {
        6 + self.message.len() + if self.offset.is_some() { 8 } else { 0 }
    }

    /// Encodes into `buf`, returning the bytes written.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        let len = self.buffer_len();
        room(buf, len)?;
        check_str(self.message, "error chunk message")?;
        if self.error.to_wire() == 0 {
            return Err(Error::BadValue {
                what: "error chunk with error value 0",
                value: 0,
            });
        }
        NetworkEndian::write_u32(&mut buf[..4], self.error.to_wire());
        // invariant: check_str bounded the message to 4096 bytes.
        NetworkEndian::write_u16(&mut buf[4..6], self.message.len() as u16);
        buf[6..6 + self.message.len()].copy_from_slice(self.message.as_bytes());
        if let Some(offset) = self.offset {
            NetworkEndian::write_u64(&mut buf[len - 8..len], offset);
        }
        Ok(len)
    }
}

/// A decoded chunk payload (without `OFFSET_DATA` data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkPayload<'a> {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`: the offset; `data_len` bytes of data follow.
    OffsetData(OffsetDataHeader),
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    OffsetHole(OffsetHole),
    /// `NBD_REPLY_TYPE_BLOCK_STATUS` or `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`.
    BlockStatus(BlockStatus<'a>),
    /// `NBD_REPLY_TYPE_ERROR`, `NBD_REPLY_TYPE_ERROR_OFFSET`, or an unknown type with bit
    /// 15 set.
    Error(ErrorChunk<'a>),
    /// An unknown type without bit 15 (a client must hard-disconnect on it).
    Unknown(&'a [u8]),
}

impl<'a> ChunkPayload<'a> {
    /// Decodes the payload of the chunk described by `header`. For `OFFSET_DATA`, `payload`
    /// holds at least the 8-byte offset; for every other type it holds exactly `L` bytes.
    pub fn parse(header: &ChunkHeader, payload: &'a [u8]) -> Result<Self> {
        let exact = |what| {
            if payload.len() as u64 == header.len {
                Ok(())
            } else {
                Err(Error::BadLength {
                    what,
                    len: header.len,
                })
            }
        };
        if header.chunk_type != ChunkType::OffsetData {
            exact("payload does not match the chunk length")?;
        }
        Ok(match header.chunk_type {
            ChunkType::None => {
                if header.len != 0 {
                    return Err(Error::BadLength {
                        what: "NBD_REPLY_TYPE_NONE length must be 0",
                        len: header.len,
                    });
                }
                Self::None
            }
            ChunkType::OffsetData => {
                Self::OffsetData(OffsetDataHeader::parse(payload, header.len)?)
            }
            ChunkType::OffsetHole => Self::OffsetHole(OffsetHole::parse(payload)?),
            ChunkType::BlockStatus => Self::BlockStatus(BlockStatus::parse(payload, false)?),
            ChunkType::BlockStatusExt => Self::BlockStatus(BlockStatus::parse(payload, true)?),
            t if t.is_error() => Self::Error(ErrorChunk::parse(t, payload)?),
            _ => Self::Unknown(payload),
        })
    }

    /// How many payload bytes a decoder must buffer for a chunk: all of them, except the
    /// data of `OFFSET_DATA`, of which only the 8-byte offset.
    pub fn buffered_len(header: &ChunkHeader) -> u64 {
        match header.chunk_type {
            ChunkType::OffsetData => OffsetDataHeader::LEN as u64,
            _ => header.len,
        }
    }

    /// Decodes a chunk header and its payload from the start of `buf`, returning the
    /// header, the payload and the bytes consumed (for `OFFSET_DATA`, up to and including
    /// the offset: the data follows).
    ///
    /// Simple reply headers are refused with [`Error::BadMagic`]; use
    /// [`ReplyHeader::parse`] to accept either.
    pub fn parse_message(buf: &'a [u8]) -> Result<(ChunkHeader, Self, usize)> {
        let header = match ReplyHeader::parse(buf)? {
            ReplyHeader::Chunk(c) => c,
            ReplyHeader::Simple(_) => {
                return Err(Error::BadMagic {
                    what: "NBD_STRUCTURED_REPLY_MAGIC or NBD_EXTENDED_REPLY_MAGIC",
                    found: super::SIMPLE_REPLY_MAGIC.into(),
                })
            }
        };
        let start = header.buffer_len();
        if header.chunk_type == ChunkType::OffsetData && header.len <= OffsetDataHeader::LEN as u64
        {
            // Report the length error before asking for bytes that will never be valid.
            OffsetDataHeader::parse(&[], header.len)?;
        }
        let end = super::total_len(
            start,
            Self::buffered_len(&header),
            "chunk length does not fit in memory",
        )?;
        need(buf, end)?;
        Ok((header, Self::parse(&header, &buf[start..end])?, end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::strategies::*;
    use crate::wire::{Cookie, ReplyFlags};
    use proptest::prelude::*;

    #[test]
    fn hole_vector() {
        // spec-digest 7: OFFSET_HOLE, DONE, cookie 1, offset 4096, 512 bytes.
        let bytes = [
            0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0x0c, 0, 0, 0, 0,
            0, 0, 0x10, 0, 0, 0, 2, 0,
        ];
        let (h, p, n) = ChunkPayload::parse_message(&bytes).unwrap();
        assert_eq!(n, 32);
        assert_eq!(h.chunk_type, ChunkType::OffsetHole);
        assert!(h.is_done());
        assert_eq!(
            p,
            ChunkPayload::OffsetHole(OffsetHole {
                offset: 4096,
                len: 512
            })
        );
        let mut out = [0xa5; 12];
        OffsetHole {
            offset: 4096,
            len: 512,
        }
        .emit(&mut out)
        .unwrap();
        assert_eq!(out, bytes[20..]);
        for k in 0..32 {
            let want = match k {
                0..4 => 4 - k,
                4..20 => 20 - k,
                _ => 32 - k,
            };
            assert_eq!(
                ChunkPayload::parse_message(&bytes[..k]),
                Err(Error::Truncated { needed: want })
            );
        }
    }

    #[test]
    fn error_vectors() {
        // spec-digest 7: ERROR, DONE, cookie 1, EINVAL, "bad".
        let bytes = [
            0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9, 0, 0, 0,
            0x16, 0, 3, b'b', b'a', b'd',
        ];
        let (_, p, n) = ChunkPayload::parse_message(&bytes).unwrap();
        assert_eq!(n, 29);
        let e = ErrorChunk {
            error: Errno::Inval,
            message: "bad",
            offset: None,
        };
        assert_eq!(p, ChunkPayload::Error(e));
        let mut out = [0xa5; 9];
        assert_eq!(e.emit(&mut out), Ok(9));
        assert_eq!(out, bytes[20..]);
        // spec-digest 7: ERROR_OFFSET, not DONE, EIO, no message, offset 8192.
        let bytes = [
            0x66, 0x8e, 0x33, 0xef, 0, 0, 0x80, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0x0e, 0, 0, 0,
            5, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0,
        ];
        let (h, p, _) = ChunkPayload::parse_message(&bytes).unwrap();
        assert!(!h.is_done());
        let e = ErrorChunk {
            error: Errno::Io,
            message: "",
            offset: Some(8192),
        };
        assert_eq!(p, ChunkPayload::Error(e));
        assert_eq!(e.chunk_type(), ChunkType::ErrorOffset);
        let mut out = [0xa5; 14];
        assert_eq!(e.emit(&mut out), Ok(14));
        assert_eq!(out, bytes[20..]);
    }

    #[test]
    fn error_chunk_rules() {
        // Message longer than the chunk: the stream cannot be trusted.
        assert!(matches!(
            ErrorChunk::parse(ChunkType::Error, &[0, 0, 0, 5, 0, 9, b'x']),
            Err(Error::BadLength {
                what: "error chunk message longer than the chunk",
                ..
            })
        ));
        // Error value 0.
        assert!(matches!(
            ErrorChunk::parse(ChunkType::Error, &[0, 0, 0, 0, 0, 0]),
            Err(Error::BadValue { .. })
        ));
        // Trailing bytes after an ERROR message.
        assert!(matches!(
            ErrorChunk::parse(ChunkType::Error, &[0, 0, 0, 5, 0, 0, 1]),
            Err(Error::BadLength { .. })
        ));
        // Unknown error type: extra fields ignored.
        assert_eq!(
            ErrorChunk::parse(ChunkType::Unknown(0x8123), &[0, 0, 0, 5, 0, 1, b'x', 1, 2]),
            Ok(ErrorChunk {
                error: Errno::Io,
                message: "x",
                offset: None
            })
        );
        assert!(matches!(
            ErrorChunk::parse(ChunkType::Error, &[0, 0, 0, 5, 0, 1, 0]),
            Err(Error::BadString { .. })
        ));
        let mut out = [0u8; 6];
        let zero = ErrorChunk {
            error: Errno::Unknown(0),
            message: "",
            offset: None,
        };
        assert!(matches!(zero.emit(&mut out), Err(Error::BadValue { .. })));
    }

    #[test]
    fn block_status_vectors() {
        // spec-digest 7: BLOCK_STATUS, DONE, cookie 1, ctx 1, (4096, 3), (8192, 0).
        let bytes = [
            0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0x14, 0, 0, 0, 1,
            0, 0, 0x10, 0, 0, 0, 0, 3, 0, 0, 0x20, 0, 0, 0, 0, 0,
        ];
        let (_, p, n) = ChunkPayload::parse_message(&bytes).unwrap();
        assert_eq!(n, 40);
        let ChunkPayload::BlockStatus(bs) = p else {
            panic!()
        };
        assert_eq!(bs.context_id, 1);
        assert_eq!(
            bs.extents.iter().collect::<Vec<_>>(),
            [
                Extent {
                    len: 4096,
                    status: 3
                },
                Extent {
                    len: 8192,
                    status: 0
                }
            ]
        );
        let mut out = [0xa5; 20];
        assert_eq!(bs.emit(&mut out), Ok(20));
        assert_eq!(out, bytes[20..]);
        // spec-digest 7: extended BLOCK_STATUS_EXT, ctx 1, count 1, (2^33, 3).
        let bytes = [
            0x6e, 0x8a, 0x27, 0x8c, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0x18, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 3,
        ];
        let (h, p, n) = ChunkPayload::parse_message(&bytes).unwrap();
        assert_eq!((h.offset, n), (Some(0), 56));
        let ChunkPayload::BlockStatus(bs) = p else {
            panic!()
        };
        assert_eq!(
            bs.extents.iter().collect::<Vec<_>>(),
            [Extent {
                len: 1 << 33,
                status: 3
            }]
        );
        let mut out = [0xa5; 24];
        assert_eq!(bs.emit(&mut out), Ok(24));
        assert_eq!(out, bytes[32..]);
    }

    #[test]
    fn block_status_lengths() {
        assert!(matches!(
            BlockStatus::parse(&[0, 0, 0, 1], false),
            Err(Error::BadLength { .. })
        ));
        assert!(matches!(
            BlockStatus::parse(&[0; 13], false),
            Err(Error::BadLength { .. })
        ));
        // Count disagreeing with the length.
        let mut wide = [0u8; 24];
        wide[7] = 2;
        assert!(matches!(
            BlockStatus::parse(&wide, true),
            Err(Error::BadLength { .. })
        ));
        wide[7] = 1;
        assert!(BlockStatus::parse(&wide, true).is_ok());
        // A 4 GiB declared chunk length is refused before anything is buffered.
        assert!(BlockStatusHeader::parse(&[0; 4], false, 4 + 8 * 3).is_ok());
        assert_eq!(
            BlockStatusHeader::parse(&[0; 2], false, u32::MAX as u64 - 3),
            Err(Error::Truncated { needed: 2 })
        );
    }

    #[test]
    fn offset_data() {
        let h = ChunkHeader {
            flags: ReplyFlags::DONE,
            chunk_type: ChunkType::OffsetData,
            cookie: Cookie(7),
            offset: None,
            len: 8 + 512,
        };
        let mut buf = [0u8; 28];
        h.emit(&mut buf).unwrap();
        OffsetDataHeader {
            offset: 4096,
            data_len: 512,
        }
        .emit(&mut buf[20..])
        .unwrap();
        let (_, p, n) = ChunkPayload::parse_message(&buf).unwrap();
        assert_eq!(n, 28);
        assert_eq!(
            p,
            ChunkPayload::OffsetData(OffsetDataHeader {
                offset: 4096,
                data_len: 512
            })
        );
        let short = ChunkHeader { len: 8, ..h };
        short.emit(&mut buf).unwrap();
        assert!(matches!(
            ChunkPayload::parse_message(&buf[..20]),
            Err(Error::BadLength { .. })
        ));
        let none = ChunkHeader {
            chunk_type: ChunkType::None,
            len: 1,
            ..h
        };
        none.emit(&mut buf).unwrap();
        assert!(matches!(
            ChunkPayload::parse_message(&buf[..21]),
            Err(Error::BadLength { .. })
        ));
    }

    proptest! {
        #[test]
        fn error_chunk_roundtrip(e in error_chunk_owned()) {
            let chunk = e.as_chunk();
            let mut out = vec![0; chunk.buffer_len()];
            chunk.emit(&mut out).unwrap();
            prop_assert_eq!(ErrorChunk::parse(chunk.chunk_type(), &out), Ok(chunk));
        }

        #[test]
        fn chunk_payload_roundtrip(
            p in chunk_payload_owned(),
            extended in any::<bool>(),
            done in any::<bool>(),
            cookie in any::<u64>(),
        ) {
            // Header and payload encoded as a peer would send them (OFFSET_DATA without its
            // data), decoded back, and every strict prefix reports the bytes still needed.
            let p = p.0;
            let (chunk_type, len) = match p {
                ChunkPayload::None => (ChunkType::None, 0),
                ChunkPayload::OffsetData(d) => (ChunkType::OffsetData, d.chunk_len().unwrap()),
                ChunkPayload::OffsetHole(_) => (ChunkType::OffsetHole, OffsetHole::LEN as u64),
                ChunkPayload::BlockStatus(b) => (
                    if b.extents.is_wide() { ChunkType::BlockStatusExt } else { ChunkType::BlockStatus },
                    b.buffer_len() as u64,
                ),
                ChunkPayload::Error(e) => (e.chunk_type(), e.buffer_len() as u64),
                ChunkPayload::Unknown(_) => unreachable!("not generated"),
            };
            // A compact chunk header carries a 32-bit length.
            prop_assume!(extended || len <= u64::from(u32::MAX));
            let header = ChunkHeader {
                flags: if done { ReplyFlags::DONE } else { ReplyFlags::empty() },
                chunk_type,
                cookie: Cookie(cookie),
                offset: extended.then_some(0),
                len,
            };
            let hlen = header.buffer_len();
            let end = hlen + ChunkPayload::buffered_len(&header) as usize;
            let mut buf = vec![0xa5; end];
            header.emit(&mut buf).unwrap();
            let written = match p {
                ChunkPayload::None => 0,
                ChunkPayload::OffsetData(d) => d.emit(&mut buf[hlen..]).unwrap(),
                ChunkPayload::OffsetHole(x) => x.emit(&mut buf[hlen..]).unwrap(),
                ChunkPayload::BlockStatus(b) => b.emit(&mut buf[hlen..]).unwrap(),
                ChunkPayload::Error(e) => e.emit(&mut buf[hlen..]).unwrap(),
                ChunkPayload::Unknown(_) => unreachable!(),
            };
            prop_assert_eq!(hlen + written, end);
            prop_assert_eq!(ChunkPayload::parse_message(&buf), Ok((header, p, end)));
            prop_assert_eq!(ChunkPayload::parse(&header, &buf[hlen..]), Ok(p));
            for k in 0..end {
                let needed = if k < 4 { 4 - k } else if k < hlen { hlen - k } else { end - k };
                prop_assert_eq!(
                    ChunkPayload::parse_message(&buf[..k]),
                    Err(Error::Truncated { needed }),
                    "prefix of {} bytes", k
                );
            }
        }

        #[test]
        fn chunk_arbitrary_bytes(bytes in chunk_bytes()) {
            if let Ok((h, p, n)) = ChunkPayload::parse_message(&bytes) {
                let mut out = vec![0u8; n];
                let at = h.emit(&mut out).unwrap();
                match p {
                    ChunkPayload::None => {}
                    ChunkPayload::OffsetData(d) => { d.emit(&mut out[at..]).unwrap(); }
                    ChunkPayload::OffsetHole(x) => { x.emit(&mut out[at..]).unwrap(); }
                    ChunkPayload::BlockStatus(b) => { b.emit(&mut out[at..]).unwrap(); }
                    ChunkPayload::Error(e) => {
                        if h.chunk_type != e.chunk_type() {
                            // Unknown error type: only the common prefix is re-encoded.
                            return Ok(());
                        }
                        e.emit(&mut out[at..]).unwrap();
                    }
                    ChunkPayload::Unknown(raw) => out[at..].copy_from_slice(raw),
                }
                prop_assert_eq!(&out[..], &bytes[..n]);
            }
        }
    }
}
