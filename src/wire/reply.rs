//! Transmission reply headers (proto.md "Simple reply message", "Structured reply chunk
//! message", and the extended-header variant).
//!
//! ```text
//! Simple (16 bytes):         Structured chunk (20 bytes):   Extended chunk (32 bytes):
//! S: 32 bits 0x67446698      S: 32 bits 0x668e33ef          S: 32 bits 0x6e8a278c
//!    32 bits error              16 bits flags                  16 bits flags
//!    64 bits cookie             16 bits type                   16 bits type
//!    (READ data if error 0)     64 bits cookie                 64 bits cookie
//!                               32 bits length L               64 bits offset (the request's)
//!                               L bytes payload                64 bits length L
//!                                                              L bytes payload
//! ```
//!
//! A simple reply carries no length: a reader must remember which cookies are reads.

use byteorder::{ByteOrder, NetworkEndian};

use super::{
    enum_with_unknown, need, room, Cookie, Errno, Error, Field, ReplyFlags, Result,
    EXTENDED_REPLY_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};

enum_with_unknown! {
    /// A structured reply chunk type (`NBD_REPLY_TYPE_*`, 16 bits).
    pub enum ChunkType(u16) {
        /// `NBD_REPLY_TYPE_NONE` (0): no payload; final chunk of a successful reply.
        None = 0, "NBD_REPLY_TYPE_NONE",
        /// `NBD_REPLY_TYPE_OFFSET_DATA` (1): read data at an offset.
        OffsetData = 1, "NBD_REPLY_TYPE_OFFSET_DATA",
        /// `NBD_REPLY_TYPE_OFFSET_HOLE` (2): a range that reads as zeroes.
        OffsetHole = 2, "NBD_REPLY_TYPE_OFFSET_HOLE",
        /// `NBD_REPLY_TYPE_BLOCK_STATUS` (5): 32-bit extents for one context.
        BlockStatus = 5, "NBD_REPLY_TYPE_BLOCK_STATUS",
        /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` (6): 64-bit extents (extended headers only).
        BlockStatusExt = 6, "NBD_REPLY_TYPE_BLOCK_STATUS_EXT",
        /// `NBD_REPLY_TYPE_ERROR` (2^15 + 1): an error with an optional message.
        Error = 0x8001, "NBD_REPLY_TYPE_ERROR",
        /// `NBD_REPLY_TYPE_ERROR_OFFSET` (2^15 + 2): an error at an offset.
        ErrorOffset = 0x8002, "NBD_REPLY_TYPE_ERROR_OFFSET",
    }
}

impl ChunkType {
    /// True if bit 15 is set: every error chunk type, known or not, has it.
    pub fn is_error(self) -> bool {
        u16::from(self) & 0x8000 != 0
    }
}

mod field {
    use super::Field;
    pub(super) const MAGIC: Field = 0..4;
    // Simple reply.
    pub(super) const ERROR: Field = 4..8;
    pub(super) const SIMPLE_COOKIE: Field = 8..16;
    // Structured and extended chunks.
    pub(super) const FLAGS: Field = 4..6;
    pub(super) const TYPE: Field = 6..8;
    pub(super) const COOKIE: Field = 8..16;
    pub(super) const LENGTH_32: Field = 16..20;
    pub(super) const OFFSET: Field = 16..24;
    pub(super) const LENGTH_64: Field = 24..32;
}

/// A simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SimpleReply {
    /// `None` on success (error field 0).
    pub error: Option<Errno>,
    /// The request's cookie.
    pub cookie: Cookie,
}

impl SimpleReply {
    /// Length on the wire.
    pub const LEN: usize = 16;

    /// Encodes into `buf`, returning the bytes written (16).
    #[inline]
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        room(buf, Self::LEN)?;
        NetworkEndian::write_u32(&mut buf[field::MAGIC], SIMPLE_REPLY_MAGIC);
        NetworkEndian::write_u32(&mut buf[field::ERROR], self.error.map_or(0, Errno::to_wire));
        NetworkEndian::write_u64(&mut buf[field::SIMPLE_COOKIE], self.cookie.0);
        Ok(Self::LEN)
    }
}

/// A structured (20-byte) or extended (32-byte) reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkHeader {
    /// Reply flags (`NBD_REPLY_FLAG_DONE`).
    pub flags: ReplyFlags,
    /// Chunk type.
    pub chunk_type: ChunkType,
    /// The request's cookie.
    pub cookie: Cookie,
    /// `Some(request offset)` for the extended form, `None` for the structured form.
    pub offset: Option<u64>,
    /// Payload length L.
    pub len: u64,
}

impl ChunkHeader {
    /// Length of a structured chunk header.
    pub const STRUCTURED_LEN: usize = 20;
    /// Length of an extended chunk header.
    pub const EXTENDED_LEN: usize = 32;

    /// True for the last chunk of a reply.
    pub fn is_done(&self) -> bool {
        self.flags.contains(ReplyFlags::DONE)
    }

    /// True for the extended form.
    pub fn is_extended(&self) -> bool {
        self.offset.is_some()
    }

    /// Length of the header (20 or 32).
    pub fn buffer_len(&self) -> usize {
        if self.is_extended() {
            Self::EXTENDED_LEN
        } else {
            Self::STRUCTURED_LEN
        }
    }

    /// Encodes into `buf`, returning the bytes written. A structured header cannot carry a
    /// payload length over 32 bits.
    #[inline]
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        let len = self.buffer_len();
        room(buf, len)?;
        match self.offset {
            Some(offset) => {
                NetworkEndian::write_u32(&mut buf[field::MAGIC], EXTENDED_REPLY_MAGIC);
                NetworkEndian::write_u64(&mut buf[field::OFFSET], offset);
                NetworkEndian::write_u64(&mut buf[field::LENGTH_64], self.len);
            }
            None => {
                let short = u32::try_from(self.len).map_err(|_| Error::BadLength {
                    what: "structured chunk length over 32 bits",
                    len: self.len,
                })?;
                NetworkEndian::write_u32(&mut buf[field::MAGIC], STRUCTURED_REPLY_MAGIC);
                NetworkEndian::write_u32(&mut buf[field::LENGTH_32], short);
            }
        }
        NetworkEndian::write_u16(&mut buf[field::FLAGS], self.flags.bits());
        NetworkEndian::write_u16(&mut buf[field::TYPE], self.chunk_type.into());
        NetworkEndian::write_u64(&mut buf[field::COOKIE], self.cookie.0);
        Ok(len)
    }
}

/// Any reply header, told apart by its magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyHeader {
    /// A simple reply.
    Simple(SimpleReply),
    /// A structured or extended chunk header.
    Chunk(ChunkHeader),
}

impl ReplyHeader {
    /// Bytes needed to read the magic.
    pub const MAGIC_LEN: usize = 4;

    /// Decodes a header from the start of `buf`.
    #[inline]
    pub fn parse(buf: &[u8]) -> Result<Self> {
        need(buf, Self::MAGIC_LEN)?;
        match NetworkEndian::read_u32(&buf[field::MAGIC]) {
            SIMPLE_REPLY_MAGIC => {
                need(buf, SimpleReply::LEN)?;
                Ok(Self::Simple(SimpleReply {
                    error: Errno::from_wire(NetworkEndian::read_u32(&buf[field::ERROR])),
                    cookie: Cookie(NetworkEndian::read_u64(&buf[field::SIMPLE_COOKIE])),
                }))
            }
            magic @ (STRUCTURED_REPLY_MAGIC | EXTENDED_REPLY_MAGIC) => {
                let extended = magic == EXTENDED_REPLY_MAGIC;
                need(
                    buf,
                    if extended {
                        ChunkHeader::EXTENDED_LEN
                    } else {
                        ChunkHeader::STRUCTURED_LEN
                    },
                )?;
                let (offset, len) = if extended {
                    (
                        Some(NetworkEndian::read_u64(&buf[field::OFFSET])),
                        NetworkEndian::read_u64(&buf[field::LENGTH_64]),
                    )
                } else {
                    (None, NetworkEndian::read_u32(&buf[field::LENGTH_32]).into())
                };
                Ok(Self::Chunk(ChunkHeader {
                    flags: ReplyFlags::from_bits(NetworkEndian::read_u16(&buf[field::FLAGS])),
                    chunk_type: ChunkType::from(NetworkEndian::read_u16(&buf[field::TYPE])),
                    cookie: Cookie(NetworkEndian::read_u64(&buf[field::COOKIE])),
                    offset,
                    len,
                }))
            }
            found => Err(Error::BadMagic {
                what:
                    "NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC or NBD_EXTENDED_REPLY_MAGIC",
                found: found.into(),
            }),
        }
    }

    /// The cookie of the request this answers.
    pub fn cookie(&self) -> Cookie {
        match self {
            Self::Simple(s) => s.cookie,
            Self::Chunk(c) => c.cookie,
        }
    }

    /// Length of the header (16, 20 or 32).
    pub fn buffer_len(&self) -> usize {
        match self {
            Self::Simple(_) => SimpleReply::LEN,
            Self::Chunk(c) => c.buffer_len(),
        }
    }

    /// Encodes into `buf`, returning the bytes written.
    #[inline]
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        match self {
            Self::Simple(s) => s.emit(buf),
            Self::Chunk(c) => c.emit(buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::strategies::*;
    use proptest::prelude::*;

    fn emitted(h: &ReplyHeader) -> Vec<u8> {
        let mut buf = vec![0xa5; h.buffer_len()];
        assert_eq!(h.emit(&mut buf), Ok(buf.len()));
        buf
    }

    #[test]
    fn simple_vector() {
        // spec-digest 7: simple reply, error 0, cookie 0x0102030405060708.
        let bytes = [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        let h = ReplyHeader::Simple(SimpleReply {
            error: None,
            cookie: Cookie(0x0102030405060708),
        });
        assert_eq!(ReplyHeader::parse(&bytes), Ok(h));
        assert_eq!(emitted(&h), bytes);
        let err = [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 9];
        assert_eq!(
            ReplyHeader::parse(&err),
            Ok(ReplyHeader::Simple(SimpleReply {
                error: Some(Errno::Inval),
                cookie: Cookie(9)
            }))
        );
    }

    #[test]
    fn structured_vectors() {
        // spec-digest 7: NONE, DONE, cookie 1.
        let none = [
            0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0,
        ];
        let h = ReplyHeader::Chunk(ChunkHeader {
            flags: ReplyFlags::DONE,
            chunk_type: ChunkType::None,
            cookie: Cookie(1),
            offset: None,
            len: 0,
        });
        assert_eq!(ReplyHeader::parse(&none), Ok(h));
        assert_eq!(emitted(&h), none);
        // spec-digest 7: extended NONE, DONE, cookie 3, offset 0.
        let ext = [
            0x6e, 0x8a, 0x27, 0x8c, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0,
        ];
        let h = ReplyHeader::Chunk(ChunkHeader {
            flags: ReplyFlags::DONE,
            chunk_type: ChunkType::None,
            cookie: Cookie(3),
            offset: Some(0),
            len: 0,
        });
        assert_eq!(ReplyHeader::parse(&ext), Ok(h));
        assert_eq!(emitted(&h), ext);
    }

    #[test]
    fn chunk_types() {
        assert!(ChunkType::Error.is_error());
        assert!(ChunkType::Unknown(0x8123).is_error());
        assert!(!ChunkType::Unknown(3).is_error());
        assert!(!ChunkType::BlockStatus.is_error());
        assert_eq!(ChunkType::from(5), ChunkType::BlockStatus);
        assert_eq!(ChunkType::from(3), ChunkType::Unknown(3));
    }

    #[test]
    fn truncated_prefixes() {
        let all = [
            ReplyHeader::Simple(SimpleReply {
                error: None,
                cookie: Cookie(1),
            }),
            ReplyHeader::Chunk(ChunkHeader {
                flags: ReplyFlags::empty(),
                chunk_type: ChunkType::OffsetData,
                cookie: Cookie(1),
                offset: None,
                len: 9,
            }),
            ReplyHeader::Chunk(ChunkHeader {
                flags: ReplyFlags::empty(),
                chunk_type: ChunkType::OffsetData,
                cookie: Cookie(1),
                offset: Some(7),
                len: 9,
            }),
        ];
        for h in all {
            let bytes = emitted(&h);
            for k in 0..bytes.len() {
                let want = if k < 4 { 4 - k } else { bytes.len() - k };
                assert_eq!(
                    ReplyHeader::parse(&bytes[..k]),
                    Err(Error::Truncated { needed: want })
                );
            }
        }
    }

    #[test]
    fn structured_length_limit() {
        let h = ChunkHeader {
            flags: ReplyFlags::DONE,
            chunk_type: ChunkType::OffsetData,
            cookie: Cookie(1),
            offset: None,
            len: 1 << 32,
        };
        let mut out = [0u8; 20];
        assert!(matches!(h.emit(&mut out), Err(Error::BadLength { .. })));
        assert!(matches!(
            ReplyHeader::parse(&[0x25, 0x60, 0x95, 0x13]),
            Err(Error::BadMagic { .. })
        ));
    }

    proptest! {
        #[test]
        fn header_roundtrip(h in reply_header()) {
            let bytes = emitted(&h);
            prop_assert_eq!(ReplyHeader::parse(&bytes), Ok(h));
        }

        #[test]
        fn header_arbitrary_bytes(bytes in magic_prefixed(&[SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, EXTENDED_REPLY_MAGIC], 40)) {
            if let Ok(h) = ReplyHeader::parse(&bytes) {
                prop_assert_eq!(emitted(&h), &bytes[..h.buffer_len()]);
            }
        }
    }
}
