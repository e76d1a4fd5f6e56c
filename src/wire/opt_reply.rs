//! Option replies, sent by the server during fixed-newstyle negotiation, the information
//! records they carry, and the reply to `NBD_OPT_EXPORT_NAME` (proto.md "Option reply
//! types", "Information types").
//!
//! ```text
//! S: 64 bits  0x3e889045565a9 (NBD_REP_MAGIC)
//!    32 bits  option being answered
//!    32 bits  reply type
//!    32 bits  length of reply data L
//!    L bytes  reply data
//!
//! NBD_REP_SERVER:        32 bits name length N (N <= L - 4), N bytes name, L-4-N bytes details
//! NBD_REP_INFO:          16 bits information type, L-2 bytes information
//!   NBD_INFO_EXPORT:      64 bits size, 16 bits transmission flags        (L = 12)
//!   NBD_INFO_NAME:        L-2 bytes canonical name
//!   NBD_INFO_DESCRIPTION: L-2 bytes description
//!   NBD_INFO_BLOCK_SIZE:  32 bits minimum, 32 bits preferred, 32 bits maximum payload (L = 14)
//! NBD_REP_META_CONTEXT:  32 bits context id, L-4 bytes context name
//! NBD_REP_ERR_*:         L bytes optional message
//!
//! Reply to NBD_OPT_EXPORT_NAME (no header):
//!    64 bits  export size
//!    16 bits  transmission flags
//!   124 bytes zeroes (omitted when both sides set NO_ZEROES)
//! ```

use byteorder::{ByteOrder, NetworkEndian};

use super::opt::split_u32;
use super::{
    check_str, enum_with_unknown, need, parse_str, room, total_len, Error, Field, OptCode, Result,
    TransmissionFlags, REP_MAGIC, ZERO_PAD_LEN,
};

enum_with_unknown! {
    /// An option error reply type (`NBD_REP_ERR_*`, bit 31 set).
    pub enum OptError(u32) {
        /// `NBD_REP_ERR_UNSUP` (2^31 + 1): the option is unknown to this server.
        Unsup = 0x8000_0001, "NBD_REP_ERR_UNSUP",
        /// `NBD_REP_ERR_POLICY` (2^31 + 2): forbidden by the server's configuration.
        Policy = 0x8000_0002, "NBD_REP_ERR_POLICY",
        /// `NBD_REP_ERR_INVALID` (2^31 + 3): syntactically or semantically invalid.
        Invalid = 0x8000_0003, "NBD_REP_ERR_INVALID",
        /// `NBD_REP_ERR_PLATFORM` (2^31 + 4): not available on this platform or build.
        Platform = 0x8000_0004, "NBD_REP_ERR_PLATFORM",
        /// `NBD_REP_ERR_TLS_REQD` (2^31 + 5): TLS must be started first.
        TlsReqd = 0x8000_0005, "NBD_REP_ERR_TLS_REQD",
        /// `NBD_REP_ERR_UNKNOWN` (2^31 + 6): the export does not exist.
        UnknownExport = 0x8000_0006, "NBD_REP_ERR_UNKNOWN",
        /// `NBD_REP_ERR_SHUTDOWN` (2^31 + 7): the server is shutting down.
        Shutdown = 0x8000_0007, "NBD_REP_ERR_SHUTDOWN",
        /// `NBD_REP_ERR_BLOCK_SIZE_REQD` (2^31 + 8): request `NBD_INFO_BLOCK_SIZE` first.
        BlockSizeReqd = 0x8000_0008, "NBD_REP_ERR_BLOCK_SIZE_REQD",
        /// `NBD_REP_ERR_TOO_BIG` (2^31 + 9): the request or the reply would be too large.
        TooBig = 0x8000_0009, "NBD_REP_ERR_TOO_BIG",
        /// `NBD_REP_ERR_EXT_HEADER_REQD` (2^31 + 10): extended headers are required first,
        /// or cannot be downgraded.
        ExtHeaderReqd = 0x8000_000a, "NBD_REP_ERR_EXT_HEADER_REQD",
    }
}

/// An option reply type (`NBD_REP_*`, 32 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyType {
    /// `NBD_REP_ACK` (1): the option succeeded (final reply).
    Ack,
    /// `NBD_REP_SERVER` (2): one export, in answer to `NBD_OPT_LIST`.
    Server,
    /// `NBD_REP_INFO` (3): one information record, in answer to `NBD_OPT_INFO`/`GO`.
    Info,
    /// `NBD_REP_META_CONTEXT` (4): one metadata context.
    MetaContext,
    /// Any value with bit 31 set: an error (final reply).
    Error(OptError),
    /// Any other value without bit 31.
    Unknown(u32),
}

impl ReplyType {
    /// Bit 31: every reply type with it set is an error.
    pub const ERROR_BIT: u32 = 1 << 31;

    /// True for error replies (bit 31 set).
    pub fn is_error(self) -> bool {
        matches!(self, Self::Error(_))
    }
}

impl From<u32> for ReplyType {
    fn from(v: u32) -> Self {
        match v {
            1 => Self::Ack,
            2 => Self::Server,
            3 => Self::Info,
            4 => Self::MetaContext,
            v if v & Self::ERROR_BIT != 0 => Self::Error(OptError::from(v)),
            v => Self::Unknown(v),
        }
    }
}

impl From<ReplyType> for u32 {
    fn from(t: ReplyType) -> u32 {
        match t {
            ReplyType::Ack => 1,
            ReplyType::Server => 2,
            ReplyType::Info => 3,
            ReplyType::MetaContext => 4,
            ReplyType::Error(e) => e.into(),
            ReplyType::Unknown(v) => v,
        }
    }
}

impl core::fmt::Display for ReplyType {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Ack => f.write_str("NBD_REP_ACK"),
            Self::Server => f.write_str("NBD_REP_SERVER"),
            Self::Info => f.write_str("NBD_REP_INFO"),
            Self::MetaContext => f.write_str("NBD_REP_META_CONTEXT"),
            Self::Error(e) => e.fmt(f),
            Self::Unknown(v) => write!(f, "unknown({v:#x})"),
        }
    }
}

enum_with_unknown! {
    /// An information type (`NBD_INFO_*`, 16 bits), requested in `NBD_OPT_INFO`/`GO` and
    /// carried by `NBD_REP_INFO`.
    pub enum InfoType(u16) {
        /// `NBD_INFO_EXPORT` (0): size and transmission flags (always sent).
        Export = 0, "NBD_INFO_EXPORT",
        /// `NBD_INFO_NAME` (1): canonical export name.
        Name = 1, "NBD_INFO_NAME",
        /// `NBD_INFO_DESCRIPTION` (2): human-readable description.
        Description = 2, "NBD_INFO_DESCRIPTION",
        /// `NBD_INFO_BLOCK_SIZE` (3): block-size constraints.
        BlockSize = 3, "NBD_INFO_BLOCK_SIZE",
    }
}

mod field {
    use super::Field;
    pub(super) const MAGIC: Field = 0..8;
    pub(super) const OPTION: Field = 8..12;
    pub(super) const TYPE: Field = 12..16;
    pub(super) const LENGTH: Field = 16..20;
}

/// The 20-byte header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptReplyHeader {
    /// The option being answered.
    pub opt: OptCode,
    /// The reply type.
    pub reply: ReplyType,
    /// Length of the reply data that follows.
    pub len: u32,
}

impl OptReplyHeader {
    /// Length on the wire.
    pub const LEN: usize = 20;

    /// Decodes a header from the start of `buf`.
    pub fn parse(buf: &[u8]) -> Result<Self> {
        need(buf, Self::LEN)?;
        match NetworkEndian::read_u64(&buf[field::MAGIC]) {
            REP_MAGIC => {}
            found => {
                return Err(Error::BadMagic {
                    what: "NBD_REP_MAGIC",
                    found,
                })
            }
        }
        Ok(Self {
            opt: OptCode::from(NetworkEndian::read_u32(&buf[field::OPTION])),
            reply: ReplyType::from(NetworkEndian::read_u32(&buf[field::TYPE])),
            len: NetworkEndian::read_u32(&buf[field::LENGTH]),
        })
    }

    /// Length of the header plus its data.
    pub fn message_len(&self) -> Result<usize> {
        total_len(
            Self::LEN,
            self.len.into(),
            "option reply length does not fit in memory",
        )
    }

    /// Encodes into `buf`, returning the bytes written (20).
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        room(buf, Self::LEN)?;
        NetworkEndian::write_u64(&mut buf[field::MAGIC], REP_MAGIC);
        NetworkEndian::write_u32(&mut buf[field::OPTION], self.opt.into());
        NetworkEndian::write_u32(&mut buf[field::TYPE], self.reply.into());
        NetworkEndian::write_u32(&mut buf[field::LENGTH], self.len);
        Ok(Self::LEN)
    }
}

/// Block-size constraints of an export (`NBD_INFO_BLOCK_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockSize {
    /// Minimum block size: the granularity of offsets and lengths (a power of two,
    /// 1 to 65536).
    pub min: u32,
    /// Preferred block size (a power of two, at least `max(min, 512)`).
    pub preferred: u32,
    /// Maximum payload size (at least `preferred`; `0xffffffff` means no fixed limit).
    pub max_payload: u32,
}

impl BlockSize {
    /// What a client must assume when nothing was advertised: minimum 1, preferred 4096,
    /// maximum payload 32 MiB (proto.md "Block size constraints").
    pub const DEFAULT: Self = Self {
        min: 1,
        preferred: 4096,
        max_payload: 1 << 25,
    };

    /// Checks the spec's validity rules: `min` a power of two in 1..=65536, `preferred` a
    /// power of two at least `max(min, 512)`, `max_payload` at least `preferred`.
    pub fn validate(&self) -> core::result::Result<(), &'static str> {
        if !self.min.is_power_of_two() || self.min > super::MAX_MIN_BLOCK_SIZE {
            return Err("minimum block size must be a power of two between 1 and 65536");
        }
        if !self.preferred.is_power_of_two() || self.preferred < self.min.max(512) {
            return Err(
                "preferred block size must be a power of two of at least max(minimum, 512)",
            );
        }
        if self.max_payload < self.preferred {
            return Err("maximum payload size must be at least the preferred block size");
        }
        Ok(())
    }
}

/// An information record (`NBD_REP_INFO` data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info<'a> {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: TransmissionFlags,
    },
    /// `NBD_INFO_NAME`: the canonical export name.
    Name(&'a str),
    /// `NBD_INFO_DESCRIPTION`: a human-readable description.
    Description(&'a str),
    /// `NBD_INFO_BLOCK_SIZE`: block-size constraints (not validated here; see
    /// [`BlockSize::validate`]).
    BlockSize(BlockSize),
    /// An information type this crate does not know, with its raw data (clients must
    /// ignore it).
    Unknown {
        /// The information type.
        info: u16,
        /// Its data.
        data: &'a [u8],
    },
}

impl<'a> Info<'a> {
    /// The information type.
    pub fn info_type(&self) -> InfoType {
        match self {
            Self::Export { .. } => InfoType::Export,
            Self::Name(_) => InfoType::Name,
            Self::Description(_) => InfoType::Description,
            Self::BlockSize(_) => InfoType::BlockSize,
            Self::Unknown { info, .. } => InfoType::from(*info),
        }
    }

    /// Decodes `NBD_REP_INFO` data (all `L` bytes, starting with the 2-byte type).
    pub fn parse(data: &'a [u8]) -> Result<Self> {
        let (ty, rest) = match data {
            [hi, lo, rest @ ..] => (InfoType::from(u16::from_be_bytes([*hi, *lo])), rest),
            _ => {
                return Err(Error::BadLength {
                    what: "NBD_REP_INFO data shorter than 2 bytes",
                    len: data.len() as u64,
                })
            }
        };
        match ty {
            InfoType::Export => {
                if rest.len() != 10 {
                    return Err(Error::BadLength {
                        what: "NBD_INFO_EXPORT length must be 12",
                        len: data.len() as u64,
                    });
                }
                Ok(Self::Export {
                    size: NetworkEndian::read_u64(&rest[..8]),
                    flags: TransmissionFlags::from_bits(NetworkEndian::read_u16(&rest[8..10])),
                })
            }
            InfoType::Name => Ok(Self::Name(parse_str(rest, "NBD_INFO_NAME")?)),
            InfoType::Description => {
                Ok(Self::Description(parse_str(rest, "NBD_INFO_DESCRIPTION")?))
            }
            InfoType::BlockSize => {
                if rest.len() != 12 {
                    return Err(Error::BadLength {
                        what: "NBD_INFO_BLOCK_SIZE length must be 14",
                        len: data.len() as u64,
                    });
                }
                Ok(Self::BlockSize(BlockSize {
                    min: NetworkEndian::read_u32(&rest[0..4]),
                    preferred: NetworkEndian::read_u32(&rest[4..8]),
                    max_payload: NetworkEndian::read_u32(&rest[8..12]),
                }))
            }
            InfoType::Unknown(info) => Ok(Self::Unknown { info, data: rest }),
        }
    }

    /// Length of the encoded data (including the 2-byte type).
    pub fn buffer_len(&self) -> usize {
        2 + match self {
            Self::Export { .. } => 10,
            Self::Name(s) | Self::Description(s) => s.len(),
            Self::BlockSize(_) => 12,
            Self::Unknown { data, .. } => data.len(),
        }
    }

    /// Encodes the data into `buf`, returning the bytes written.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        let len = self.buffer_len();
        room(buf, len)?;
        match self {
            Self::Name(s) => check_str(s, "NBD_INFO_NAME")?,
            Self::Description(s) => check_str(s, "NBD_INFO_DESCRIPTION")?,
            _ => {}
        }
        NetworkEndian::write_u16(&mut buf[..2], self.info_type().into());
        let rest = &mut buf[2..len];
        match self {
            Self::Export { size, flags } => {
                NetworkEndian::write_u64(&mut rest[..8], *size);
                NetworkEndian::write_u16(&mut rest[8..10], flags.bits());
            }
            Self::Name(s) | Self::Description(s) => rest.copy_from_slice(s.as_bytes()),
            Self::BlockSize(b) => {
                NetworkEndian::write_u32(&mut rest[0..4], b.min);
                NetworkEndian::write_u32(&mut rest[4..8], b.preferred);
                NetworkEndian::write_u32(&mut rest[8..12], b.max_payload);
            }
            Self::Unknown { data, .. } => rest.copy_from_slice(data),
        }
        Ok(len)
    }
}

/// A decoded option reply (the data after the header), borrowing its strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptReply<'a> {
    /// `NBD_REP_ACK` (no data allowed).
    Ack,
    /// `NBD_REP_SERVER`: one export of an `NBD_OPT_LIST` answer.
    Server {
        /// Export name.
        name: &'a str,
        /// The optional details after the name: a human-readable description ("" if none).
        description: &'a str,
    },
    /// `NBD_REP_INFO`: one information record.
    Info(Info<'a>),
    /// `NBD_REP_META_CONTEXT`: one metadata context.
    MetaContext {
        /// Context ID (for `NBD_OPT_LIST_META_CONTEXT` it is meaningless, usually 0).
        id: u32,
        /// Context name, `namespace:leaf`.
        name: &'a str,
    },
    /// An error reply, with its optional message ("" if none).
    Error {
        /// Which error.
        error: OptError,
        /// Human-readable message.
        message: &'a str,
    },
    /// A non-error reply type this crate does not know, with its raw data.
    Unknown {
        /// The reply type.
        reply: u32,
        /// Its data.
        data: &'a [u8],
    },
}

impl<'a> OptReply<'a> {
    /// The reply type.
    pub fn reply_type(&self) -> ReplyType {
        match self {
            Self::Ack => ReplyType::Ack,
            Self::Server { .. } => ReplyType::Server,
            Self::Info(_) => ReplyType::Info,
            Self::MetaContext { .. } => ReplyType::MetaContext,
            Self::Error { error, .. } => ReplyType::Error(*error),
            Self::Unknown { reply, .. } => ReplyType::from(*reply),
        }
    }

    /// True for the replies that end the answer to an option (ACK and errors).
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Ack | Self::Error { .. })
    }

    /// Decodes the data of a reply whose header said `reply`; `data` is exactly the `L`
    /// bytes that followed the header.
    pub fn parse(reply: ReplyType, data: &'a [u8]) -> Result<Self> {
        match reply {
            ReplyType::Ack => {
                if data.is_empty() {
                    Ok(Self::Ack)
                } else {
                    Err(Error::BadLength {
                        what: "NBD_REP_ACK carries no data",
                        len: data.len() as u64,
                    })
                }
            }
            ReplyType::Server => {
                let (len, rest) = split_u32(data).ok_or(Error::BadLength {
                    what: "NBD_REP_SERVER data shorter than 4 bytes",
                    len: data.len() as u64,
                })?;
                let name = rest.get(..len as usize).ok_or(Error::BadLength {
                    what: "NBD_REP_SERVER name length exceeds the data",
                    len: len.into(),
                })?;
                Ok(Self::Server {
                    name: parse_str(name, "NBD_REP_SERVER name")?,
                    description: parse_str(&rest[name.len()..], "NBD_REP_SERVER description")?,
                })
            }
            ReplyType::Info => Info::parse(data).map(Self::Info),
            ReplyType::MetaContext => {
                let (id, name) = split_u32(data).ok_or(Error::BadLength {
                    what: "NBD_REP_META_CONTEXT data shorter than 4 bytes",
                    len: data.len() as u64,
                })?;
                Ok(Self::MetaContext {
                    id,
                    name: parse_str(name, "meta context name")?,
                })
            }
            ReplyType::Error(error) => Ok(Self::Error {
                error,
                message: parse_str(data, "option error message")?,
            }),
            ReplyType::Unknown(reply) => Ok(Self::Unknown { reply, data }),
        }
    }

    /// Decodes a whole option reply (header and data) from the start of `buf`, returning
    /// the option it answers, the reply and the number of bytes it took.
    pub fn parse_message(buf: &'a [u8]) -> Result<(OptCode, Self, usize)> {
        let header = OptReplyHeader::parse(buf)?;
        let end = header.message_len()?;
        need(buf, end)?;
        Ok((
            header.opt,
            Self::parse(header.reply, &buf[OptReplyHeader::LEN..end])?,
            end,
        ))
    }

    /// Length of the reply data.
    pub fn data_len(&self) -> usize {
        match self {
            Self::Ack => 0,
            Self::Server { name, description } => 4 + name.len() + description.len(),
            Self::Info(info) => info.buffer_len(),
            Self::MetaContext { name, .. } => 4 + name.len(),
            Self::Error { message, .. } => message.len(),
            Self::Unknown { data, .. } => data.len(),
        }
    }

    /// Length of the whole message (header and data).
    pub fn buffer_len(&self) -> usize {
        OptReplyHeader::LEN + self.data_len()
    }

    /// Encodes the whole reply to option `opt` into `buf`, returning the bytes written.
    pub fn emit(&self, opt: OptCode, buf: &mut [u8]) -> Result<usize> {
        let data_len = self.data_len();
        let total = OptReplyHeader::LEN + data_len;
        room(buf, total)?;
        match self {
            Self::Server { name, description } => {
                check_str(name, "NBD_REP_SERVER name")?;
                check_str(description, "NBD_REP_SERVER description")?;
            }
            Self::MetaContext { name, .. } => check_str(name, "meta context name")?,
            Self::Error { message, .. } => check_str(message, "option error message")?,
            _ => {}
        }
        let len = u32::try_from(data_len).map_err(|_| Error::BadLength {
            what: "option reply data over 4 GiB",
            len: data_len as u64,
        })?;
        let data = &mut buf[OptReplyHeader::LEN..total];
        match self {
            Self::Ack => {}
            Self::Server { name, description } => {
                NetworkEndian::write_u32(&mut data[..4], name.len() as u32);
                data[4..4 + name.len()].copy_from_slice(name.as_bytes());
                data[4 + name.len()..].copy_from_slice(description.as_bytes());
            }
            Self::Info(info) => {
                info.emit(data)?;
            }
            Self::MetaContext { id, name } => {
                NetworkEndian::write_u32(&mut data[..4], *id);
                data[4..].copy_from_slice(name.as_bytes());
            }
            Self::Error { message, .. } => data.copy_from_slice(message.as_bytes()),
            Self::Unknown { data: raw, .. } => data.copy_from_slice(raw),
        }
        OptReplyHeader {
            opt,
            reply: self.reply_type(),
            len,
        }
        .emit(buf)?;
        Ok(total)
    }
}

/// The server's answer to `NBD_OPT_EXPORT_NAME`: export size and flags, then 124 zero
/// bytes unless both sides agreed on `NO_ZEROES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportNameReply {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: TransmissionFlags,
    /// Whether the 124 zero bytes follow (false when `NO_ZEROES` was agreed).
    pub zeroes: bool,
}

impl ExportNameReply {
    /// Length without the padding.
    pub const SHORT_LEN: usize = 10;
    /// Length with the padding.
    pub const LONG_LEN: usize = 10 + ZERO_PAD_LEN;

    /// Decodes the reply; `zeroes` says whether padding is expected. The padding bytes are
    /// reserved and ignored.
    pub fn parse(buf: &[u8], zeroes: bool) -> Result<Self> {
        let len = if zeroes {
            Self::LONG_LEN
        } else {
            Self::SHORT_LEN
        };
        need(buf, len)?;
        Ok(Self {
            size: NetworkEndian::read_u64(&buf[..8]),
            flags: TransmissionFlags::from_bits(NetworkEndian::read_u16(&buf[8..10])),
            zeroes,
        })
    }

    /// Length of the encoding (10 or 134).
    pub fn buffer_len(&self) -> usize {
        if self.zeroes {
            Self::LONG_LEN
        } else {
            Self::SHORT_LEN
        }
    }

    /// Encodes into `buf`, returning the bytes written.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        let len = self.buffer_len();
        room(buf, len)?;
        NetworkEndian::write_u64(&mut buf[..8], self.size);
        NetworkEndian::write_u16(&mut buf[8..10], self.flags.bits());
        buf[10..len].fill(0);
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::strategies::*;
    use proptest::prelude::*;

    const MAGIC: [u8; 8] = [0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9];

    fn with_magic(rest: &[u8]) -> Vec<u8> {
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(rest);
        v
    }

    fn emitted(opt: OptCode, reply: &OptReply<'_>) -> Vec<u8> {
        let mut buf = vec![0xa5; reply.buffer_len()];
        assert_eq!(reply.emit(opt, &mut buf), Ok(buf.len()));
        buf
    }

    #[test]
    fn info_export_vector() {
        // spec-digest 7: NBD_REP_INFO for GO, NBD_INFO_EXPORT, 1 GiB, flags 0x000d.
        let bytes = with_magic(&[
            0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 0x0c, 0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0, 0, 0x0d,
        ]);
        let reply = OptReply::Info(Info::Export {
            size: 1 << 30,
            flags: TransmissionFlags::HAS_FLAGS
                | TransmissionFlags::SEND_FLUSH
                | TransmissionFlags::SEND_FUA,
        });
        assert_eq!(
            OptReply::parse_message(&bytes),
            Ok((OptCode::Go, reply, 32))
        );
        assert_eq!(emitted(OptCode::Go, &reply), bytes);
    }

    #[test]
    fn info_block_size_vector() {
        let bytes = with_magic(&[
            0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 0x0e, 0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 0x02, 0, 0, 0,
        ]);
        let reply = OptReply::Info(Info::BlockSize(BlockSize {
            min: 512,
            preferred: 4096,
            max_payload: 1 << 25,
        }));
        assert_eq!(
            OptReply::parse_message(&bytes),
            Ok((OptCode::Go, reply, 34))
        );
        assert_eq!(emitted(OptCode::Go, &reply), bytes);
    }

    #[test]
    fn ack_meta_context_error_vectors() {
        let ack = with_magic(&[0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(
            OptReply::parse_message(&ack),
            Ok((OptCode::Go, OptReply::Ack, 20))
        );
        assert_eq!(emitted(OptCode::Go, &OptReply::Ack), ack);

        let mut meta = with_magic(&[0, 0, 0, 0x0a, 0, 0, 0, 4, 0, 0, 0, 0x13, 0, 0, 0, 1]);
        meta.extend_from_slice(b"base:allocation");
        let reply = OptReply::MetaContext {
            id: 1,
            name: "base:allocation",
        };
        assert_eq!(
            OptReply::parse_message(&meta),
            Ok((OptCode::SetMetaContext, reply, 39))
        );
        assert_eq!(emitted(OptCode::SetMetaContext, &reply), meta);

        let err = with_magic(&[0, 0, 0, 0x0b, 0x80, 0, 0, 1, 0, 0, 0, 2, b'n', b'o']);
        let reply = OptReply::Error {
            error: OptError::Unsup,
            message: "no",
        };
        assert_eq!(
            OptReply::parse_message(&err),
            Ok((OptCode::ExtendedHeaders, reply, 22))
        );
        assert_eq!(emitted(OptCode::ExtendedHeaders, &reply), err);
    }

    #[test]
    fn all_ten_errors() {
        let names = [
            "NBD_REP_ERR_UNSUP",
            "NBD_REP_ERR_POLICY",
            "NBD_REP_ERR_INVALID",
            "NBD_REP_ERR_PLATFORM",
            "NBD_REP_ERR_TLS_REQD",
            "NBD_REP_ERR_UNKNOWN",
            "NBD_REP_ERR_SHUTDOWN",
            "NBD_REP_ERR_BLOCK_SIZE_REQD",
            "NBD_REP_ERR_TOO_BIG",
            "NBD_REP_ERR_EXT_HEADER_REQD",
        ];
        for (i, name) in names.iter().enumerate() {
            let value = 0x8000_0001 + i as u32;
            let t = ReplyType::from(value);
            assert!(t.is_error());
            assert_eq!(t.to_string(), *name);
            assert_eq!(u32::from(t), value);
            let reply = OptReply::Error {
                error: OptError::from(value),
                message: "",
            };
            let bytes = emitted(OptCode::Go, &reply);
            assert_eq!(
                OptReply::parse_message(&bytes),
                Ok((OptCode::Go, reply, 20))
            );
        }
        assert_eq!(
            ReplyType::from(0x8000_00ff),
            ReplyType::Error(OptError::Unknown(0x8000_00ff))
        );
        assert_eq!(ReplyType::from(5), ReplyType::Unknown(5));
    }

    #[test]
    fn server_reply() {
        let reply = OptReply::Server {
            name: "disk",
            description: "a disk",
        };
        let bytes = emitted(OptCode::List, &reply);
        assert_eq!(&bytes[16..24], &[0, 0, 0, 14, 0, 0, 0, 4]);
        assert_eq!(
            OptReply::parse_message(&bytes),
            Ok((OptCode::List, reply, 34))
        );
        // Name length past the data.
        assert!(matches!(
            OptReply::parse(ReplyType::Server, &[0, 0, 0, 9, b'a']),
            Err(Error::BadLength { .. })
        ));
        assert!(matches!(
            OptReply::parse(ReplyType::Server, &[0, 0, 0xff, 0xff]),
            Err(Error::BadLength { .. })
        ));
    }

    #[test]
    fn info_lengths_are_checked() {
        assert!(matches!(
            Info::parse(&[0, 0, 1, 2, 3]),
            Err(Error::BadLength { .. })
        ));
        assert!(matches!(
            Info::parse(&[0, 3, 0, 0, 0, 1]),
            Err(Error::BadLength { .. })
        ));
        assert!(matches!(Info::parse(&[0]), Err(Error::BadLength { .. })));
        assert_eq!(Info::parse(&[0, 1]), Ok(Info::Name("")));
        assert_eq!(
            Info::parse(&[0, 9, 1]),
            Ok(Info::Unknown {
                info: 9,
                data: &[1]
            })
        );
        assert!(matches!(
            Info::parse(&[0, 2, 0xc0]),
            Err(Error::BadString { .. })
        ));
        assert!(matches!(
            OptReply::parse(ReplyType::Ack, &[0]),
            Err(Error::BadLength { .. })
        ));
        assert!(matches!(
            OptReply::parse(ReplyType::MetaContext, &[0, 0]),
            Err(Error::BadLength { .. })
        ));
    }

    #[test]
    fn truncated_prefixes() {
        let reply = OptReply::MetaContext {
            id: 1,
            name: "base:allocation",
        };
        let bytes = emitted(OptCode::SetMetaContext, &reply);
        for k in 0..bytes.len() {
            let want = if k < 20 { 20 - k } else { bytes.len() - k };
            assert_eq!(
                OptReply::parse_message(&bytes[..k]),
                Err(Error::Truncated { needed: want })
            );
        }
    }

    #[test]
    fn export_name_reply() {
        // spec-digest 7: 1 GiB, flags 0x0001, 124 zero bytes.
        let mut bytes = vec![0, 0, 0, 0, 0x40, 0, 0, 0, 0, 1];
        bytes.resize(134, 0);
        let r = ExportNameReply {
            size: 1 << 30,
            flags: TransmissionFlags::HAS_FLAGS,
            zeroes: true,
        };
        assert_eq!(ExportNameReply::parse(&bytes, true), Ok(r));
        let mut out = [0xa5; 134];
        assert_eq!(r.emit(&mut out), Ok(134));
        assert_eq!(&out[..], &bytes[..]);
        let short = ExportNameReply { zeroes: false, ..r };
        assert_eq!(ExportNameReply::parse(&bytes[..10], false), Ok(short));
        assert_eq!(short.emit(&mut out), Ok(10));
        for k in 0..134 {
            assert_eq!(
                ExportNameReply::parse(&bytes[..k], true),
                Err(Error::Truncated { needed: 134 - k })
            );
        }
    }

    #[test]
    fn block_size_validation() {
        assert_eq!(
            BlockSize {
                min: 512,
                preferred: 4096,
                max_payload: 1 << 25
            }
            .validate(),
            Ok(())
        );
        assert_eq!(BlockSize::DEFAULT.validate(), Ok(()));
        assert!(BlockSize {
            min: 3,
            preferred: 4096,
            max_payload: 1 << 25
        }
        .validate()
        .is_err());
        assert!(BlockSize {
            min: 1 << 17,
            preferred: 1 << 17,
            max_payload: 1 << 25
        }
        .validate()
        .is_err());
        assert!(BlockSize {
            min: 1,
            preferred: 256,
            max_payload: 1 << 25
        }
        .validate()
        .is_err());
        assert!(BlockSize {
            min: 4096,
            preferred: 512,
            max_payload: 1 << 25
        }
        .validate()
        .is_err());
        assert!(BlockSize {
            min: 512,
            preferred: 4096,
            max_payload: 4095
        }
        .validate()
        .is_err());
    }

    proptest! {
        #[test]
        fn opt_reply_roundtrip(opt in any::<u32>(), r in opt_reply_owned()) {
            let reply = r.as_reply();
            let bytes = emitted(OptCode::from(opt), &reply);
            prop_assert_eq!(OptReply::parse_message(&bytes), Ok((OptCode::from(opt), reply, bytes.len())));
        }

        #[test]
        fn opt_reply_arbitrary_bytes(bytes in option_reply_bytes()) {
            if let Ok((opt, reply, n)) = OptReply::parse_message(&bytes) {
                prop_assert_eq!(emitted(opt, &reply), &bytes[..n]);
            }
        }

        #[test]
        fn export_name_reply_roundtrip(size in any::<u64>(), flags in any::<u16>(), zeroes in any::<bool>()) {
            let r = ExportNameReply { size, flags: TransmissionFlags::from_bits(flags), zeroes };
            let mut out = [0u8; 134];
            let n = r.emit(&mut out).unwrap();
            prop_assert_eq!(ExportNameReply::parse(&out[..n], zeroes), Ok(r));
        }
    }
}
