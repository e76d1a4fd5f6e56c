//! Pure encoders and decoders for every NBD wire structure.
//!
//! This module knows nothing about roles or protocol state: it turns bytes into typed
//! values (`parse`) and typed values into bytes (`emit`), following the layouts of the NBD
//! protocol specification (`doc/proto.md` of NetworkBlockDevice/nbd, including the
//! `extension-ext-header` branch for extended headers).
//!
//! | file | spec section | structures |
//! | --- | --- | --- |
//! | [`handshake`] | "Handshake" | oldstyle hello, newstyle greeting, client flags |
//! | [`opt`] | "Option types" | option request header and every option payload |
//! | [`opt_reply`] | "Option reply types", "Info types" | option replies, info records, `NBD_OPT_EXPORT_NAME` reply |
//! | [`request`] | "Request message" | compact (28 byte) and extended (32 byte) request headers, `NBD_CMD_BLOCK_STATUS` payload |
//! | [`reply`] | "Simple reply message", "Structured reply chunk message" | simple reply, structured and extended chunk headers |
//! | [`chunk`] | "Structured reply types" | chunk payloads: `OFFSET_DATA`, `OFFSET_HOLE`, `BLOCK_STATUS(_EXT)`, `ERROR(_OFFSET)` |
//! | [`extent`] | "Block status" | allocation-free extent iterator and encoder |
//! | [`errno`] | "Error values" | [`Errno`] and host errno mapping |
//! | [`flags`] | all flag fields | typed flag newtypes that keep unknown bits |
//!
//! # Guarantees
//!
//! These hold for every decoder in this module and are checked by the property tests and
//! by the fuzz targets in `fuzz/`:
//!
//! - `parse` never panics, never allocates and never reads past the slice it is given, on
//!   any input.
//! - A buffer that is too short gives [`Error::Truncated`] with the number of further bytes
//!   needed. The count is exact whenever the message length can be known from the bytes
//!   already present (for a variable-length message whose length field has not arrived yet
//!   it is the count needed to reach that field).
//! - Every length taken from the peer is checked, with checked arithmetic, before it is
//!   used to index anything.
//! - Strings (export names, descriptions, messages, context names) are checked at parse
//!   time: valid UTF-8, no NUL byte, at most [`MAX_STRING_LEN`] bytes.
//! - Every code space (options, replies, info types, commands, chunk types, errors) has an
//!   `Unknown(n)` variant: an unknown code is data, never a panic or a silent drop. Flag
//!   fields are newtypes that keep unknown bits.
//! - A successful `parse` followed by `emit` gives back the bytes that were consumed,
//!   except for the fields listed under *Non-canonical input* below.
//! - `emit` never panics. It fails with [`Error::BufferTooSmall`] when the output is
//!   shorter than `buffer_len()`, and with a specific error when the value cannot be
//!   represented on the wire (a string over 4096 bytes, a length over 32 bits in a compact
//!   header, ...).
//!
//! # Non-canonical input
//!
//! Decoders accept, and re-encode differently, only these reserved or ignorable parts:
//!
//! - the 124 reserved bytes of the oldstyle hello and of the `NBD_OPT_EXPORT_NAME` reply,
//!   which the spec says are zero: they are ignored on input and written as zeroes;
//! - data attached to `NBD_OPT_ABORT`, which the spec tells servers to ignore;
//! - fields after the message of an error chunk whose type this crate does not know: the
//!   spec's common prefix (error, message) is decoded, the rest ignored.
//!
//! One value does not round-trip the other way: an [`Errno::Unknown(0)`](Errno::Unknown)
//! built by hand is written as 0 in a simple reply, which reads back as success (decoding
//! never produces it).

pub mod chunk;
pub mod errno;
pub mod extent;
pub mod flags;
pub mod handshake;
pub mod opt;
pub mod opt_reply;
pub mod reply;
pub mod request;

#[cfg(test)]
pub(crate) mod strategies;

use core::fmt;
use core::ops::{Range, RangeFrom};

pub use self::chunk::{BlockStatus, BlockStatusHeader, ErrorChunk, OffsetDataHeader, OffsetHole};
pub use self::errno::Errno;
pub use self::extent::{Extent, Extents};
pub use self::flags::{ClientFlags, CmdFlags, HandshakeFlags, ReplyFlags, TransmissionFlags};
pub use self::handshake::{Greeting, Hello, OldstyleHello};
pub use self::opt::{
    ExportRequest, InfoList, MetaContextRequest, Opt, OptCode, OptHeader, Queries,
};
pub use self::opt_reply::{
    BlockSize, ExportNameReply, Info, InfoType, OptError, OptReply, OptReplyHeader, ReplyType,
};
pub use self::reply::{ChunkHeader, ChunkType, ReplyHeader, SimpleReply};
pub use self::request::{BlockStatusPayload, Command, ContextIds, Request};

/// A byte range inside a fixed layout, as in the spec's field tables.
pub type Field = Range<usize>;
/// The variable part of a layout, from a fixed offset to the end.
pub type Rest = RangeFrom<usize>;

/// `NBDMAGIC` (`0x4e42_444d_4147_4943`, ASCII "NBDMAGIC"): the first 8 bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `cliserv_magic` (`0x0042_0281_8612_53`): second field of the oldstyle hello.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// `IHAVEOPT` (`0x4948_4156_454f_5054`): second field of the newstyle greeting and first
/// field of every option request.
pub const OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
/// `NBD_REP_MAGIC` (`0x0003_e889_0455_65a9`): first field of every option reply.
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC` (`0x2560_9513`): compact 28-byte request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_EXTENDED_REQUEST_MAGIC` (`0x21e4_1c71`): extended 32-byte request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// `NBD_SIMPLE_REPLY_MAGIC` (`0x6744_6698`): simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC` (`0x668e_33ef`): structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// `NBD_EXTENDED_REPLY_MAGIC` (`0x6e8a_278c`): extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Hard upper bound on any string on the wire (spec: "MUST be at most 4096 bytes").
pub const MAX_STRING_LEN: usize = 4096;
/// Length the spec recommends strings stay under ("SHOULD be at most 256 bytes").
pub const SOFT_MAX_STRING_LEN: usize = 256;
/// Largest minimum block size a server may advertise (2^16).
pub const MAX_MIN_BLOCK_SIZE: u32 = 1 << 16;
/// Preferred block size to assume when none was advertised (2^12).
pub const DEFAULT_PREFERRED_BLOCK_SIZE: u32 = 1 << 12;
/// Payload size every server should accept and no peer may treat as a denial of service
/// (2^25 = 32 MiB).
pub const DEFAULT_MAX_PAYLOAD: u32 = 1 << 25;
/// Maximum payload value meaning "no fixed limit".
pub const NO_PAYLOAD_LIMIT: u32 = u32::MAX;
/// Recommended maximum number of extents in one block-status chunk (2^20).
pub const MAX_EXTENTS_PER_CHUNK: usize = 1 << 20;
/// Length of the zero padding after the oldstyle hello and the `NBD_OPT_EXPORT_NAME` reply.
pub const ZERO_PAD_LEN: usize = 124;

/// The opaque 64-bit value a client attaches to a request and a server echoes in every
/// reply to it (called "handle" in older versions of the spec).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Cookie(pub u64);

impl fmt::Debug for Cookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cookie({:#x})", self.0)
    }
}

impl fmt::Display for Cookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Why a string field was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StringError {
    /// Longer than [`MAX_STRING_LEN`] bytes; holds the length found.
    TooLong(usize),
    /// Contains a NUL byte at this index.
    Nul(usize),
    /// Not valid UTF-8; invalid from this byte index on.
    Utf8(usize),
}

impl fmt::Display for StringError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLong(n) => write!(f, "{n} bytes long (the limit is {MAX_STRING_LEN})"),
            Self::Nul(i) => write!(f, "contains a NUL byte at index {i}"),
            Self::Utf8(i) => write!(f, "is not valid UTF-8 from byte {i}"),
        }
    }
}

/// Why bytes could not be decoded, or a value could not be encoded.
///
/// Every variant names what was wrong; the `what` strings name the spec rule in a few
/// words, for error messages and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The input ends too early: at least `needed` more bytes are required. Read more and
    /// try again with the longer buffer.
    Truncated {
        /// How many further bytes are needed (exact when the message length is known).
        needed: usize,
    },
    /// A magic number did not match.
    BadMagic {
        /// Which magic this position must hold, e.g. "NBD_REP_MAGIC".
        what: &'static str,
        /// What was found.
        found: u64,
    },
    /// A length field is inconsistent with the structure it describes.
    BadLength {
        /// Which rule was broken, e.g. "NBD_INFO_EXPORT length must be 12".
        what: &'static str,
        /// The offending length value.
        len: u64,
    },
    /// A string field broke the string rules (UTF-8, no NUL, at most 4096 bytes).
    BadString {
        /// Which field, e.g. "export name".
        what: &'static str,
        /// How it was broken.
        error: StringError,
    },
    /// A field holds a value the spec forbids in this position.
    BadValue {
        /// Which rule was broken, e.g. "error chunk with error value 0".
        what: &'static str,
        /// The offending value.
        value: u64,
    },
    /// The output buffer is shorter than the encoding; nothing was written.
    BufferTooSmall {
        /// The number of bytes the encoding needs.
        required: usize,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Truncated { needed } => write!(f, "truncated: {needed} more bytes needed"),
            Self::BadMagic { what, found } => write!(f, "bad magic {found:#x}: expected {what}"),
            Self::BadLength { what, len } => write!(f, "bad length {len}: {what}"),
            Self::BadString { what, error } => write!(f, "bad {what}: {error}"),
            Self::BadValue { what, value } => write!(f, "bad value {value:#x}: {what}"),
            Self::BufferTooSmall { required } => {
                write!(f, "output buffer too small: {required} bytes required")
            }
        }
    }
}

impl core::error::Error for Error {}

/// Result of a decode or encode in this module.
pub type Result<T> = core::result::Result<T, Error>;

/// Checks that `buf` holds at least `len` bytes, or says how many more are needed: the
/// building block of streaming decoders.
#[inline]
pub fn need(buf: &[u8], len: usize) -> Result<()> {
    match len.checked_sub(buf.len()) {
        None | Some(0) => Ok(()),
        Some(needed) => Err(Error::Truncated { needed }),
    }
}

/// Checks that an output buffer can take `len` bytes.
#[inline]
pub(crate) fn room(buf: &[u8], len: usize) -> Result<()> {
    if buf.len() < len {
        Err(Error::BufferTooSmall { required: len })
    } else {
        Ok(())
    }
}

/// Total length of a message made of a `header`-byte header and a `payload`-byte payload
/// declared by the peer, or an error if that does not fit in memory indices.
#[inline]
pub(crate) fn total_len(header: usize, payload: u64, what: &'static str) -> Result<usize> {
    usize::try_from(payload)
        .ok()
        .and_then(|p| p.checked_add(header))
        .ok_or(Error::BadLength { what, len: payload })
}

/// Checks a string field against the spec's string rules and returns it.
///
/// `what` names the field for the error.
pub fn parse_str<'a>(bytes: &'a [u8], what: &'static str) -> Result<&'a str> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(Error::BadString {
            what,
            error: StringError::TooLong(bytes.len()),
        });
    }
    let s = core::str::from_utf8(bytes).map_err(|e| Error::BadString {
        what,
        error: StringError::Utf8(e.valid_up_to()),
    })?;
    check_str(s, what)?;
    Ok(s)
}

/// Checks a string the application wants to send: no NUL, at most 4096 bytes.
pub fn check_str(s: &str, what: &'static str) -> Result<()> {
    if s.len() > MAX_STRING_LEN {
        return Err(Error::BadString {
            what,
            error: StringError::TooLong(s.len()),
        });
    }
    if let Some(i) = s.bytes().position(|b| b == 0) {
        return Err(Error::BadString {
            what,
            error: StringError::Nul(i),
        });
    }
    Ok(())
}

/// Declares a code space with named values and an `Unknown(n)` variant that keeps every
/// other value (smoltcp's `enum_with_unknown!`).
macro_rules! enum_with_unknown {
    (
        $(#[$enum_attr:meta])*
        pub enum $name:ident($ty:ty) {
            $(
                $(#[$variant_attr:meta])*
                $variant:ident = $value:expr, $spec:literal
            ),+ $(,)?
        }
    ) => {
        $(#[$enum_attr])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $(
                $(#[$variant_attr])*
                $variant,
            )+
            /// A value this crate does not know; kept as received.
            Unknown($ty),
        }

        impl ::core::convert::From<$ty> for $name {
            #[inline]
            fn from(value: $ty) -> Self {
                match value {
                    $( $value => $name::$variant, )+
                    other => $name::Unknown(other),
                }
            }
        }

        impl ::core::convert::From<$name> for $ty {
            #[inline]
            fn from(value: $name) -> Self {
                match value {
                    $( $name::$variant => $value, )+
                    $name::Unknown(other) => other,
                }
            }
        }

        impl $name {
            /// Every named value, in wire order.
            pub const ALL: &'static [$name] = &[ $( $name::$variant ),+ ];

            /// The spec's name for this value (`"NBD_..."`), or `None` for `Unknown`.
            pub fn spec_name(self) -> Option<&'static str> {
                match self {
                    $( $name::$variant => Some($spec), )+
                    $name::Unknown(_) => None,
                }
            }
        }

        impl ::core::fmt::Display for $name {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                match self.spec_name() {
                    Some(name) => f.write_str(name),
                    None => write!(f, "unknown({:#x})", <$ty>::from(*self)),
                }
            }
        }
    };
}
pub(crate) use enum_with_unknown;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_follow_the_spec_rules() {
        assert_eq!(parse_str(b"disk", "name"), Ok("disk"));
        assert_eq!(parse_str(b"", "name"), Ok(""));
        assert_eq!(
            parse_str(b"a\0b", "name"),
            Err(Error::BadString {
                what: "name",
                error: StringError::Nul(1)
            })
        );
        assert_eq!(
            parse_str(b"ab\xff", "name"),
            Err(Error::BadString {
                what: "name",
                error: StringError::Utf8(2)
            })
        );
        let long = [b'x'; MAX_STRING_LEN + 1];
        assert_eq!(
            parse_str(&long, "name"),
            Err(Error::BadString {
                what: "name",
                error: StringError::TooLong(4097)
            })
        );
        assert!(parse_str(&long[..MAX_STRING_LEN], "name").is_ok());
    }

    #[test]
    fn need_reports_missing_bytes() {
        assert_eq!(need(&[0; 3], 8), Err(Error::Truncated { needed: 5 }));
        assert_eq!(need(&[0; 8], 8), Ok(()));
        assert_eq!(need(&[0; 9], 8), Ok(()));
    }

    #[test]
    fn total_len_rejects_overflow() {
        assert_eq!(total_len(20, 5, "x"), Ok(25));
        assert!(total_len(20, u64::MAX, "x").is_err());
    }

    #[test]
    fn magics_match_their_ascii() {
        assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&OPTS_MAGIC.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(
            REP_MAGIC.to_be_bytes(),
            [0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]
        );
        assert_eq!(
            OLDSTYLE_MAGIC.to_be_bytes(),
            [0, 0, 0x42, 0x02, 0x81, 0x86, 0x12, 0x53]
        );
    }
}
