//! Errors of the state machines.
//!
//! One [`Error`] type serves both roles. It separates, as rustls and h11 do, what the peer
//! did ([`Error::Malformed`], [`Error::PeerMisbehaved`], [`Error::PeerIncompatible`],
//! [`Error::UnexpectedEof`]) from what the caller did ([`Error::Misuse`],
//! [`Error::BufferTooSmall`]). The first group is fatal: the machine moves to its dead
//! state and every later call returns the same error again. The second group changes
//! nothing: fix the call and try again. [`Error::is_fatal`] tells them apart.
//!
//! NBD-level failures (an `NBD_EIO` reply, an `NBD_REP_ERR_POLICY` answer) are not Rust
//! errors: they are data in events.

use core::fmt;

use crate::wire::{self, ChunkType, Command, Cookie, OptCode, ReplyType};

/// An error from a client or server state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The peer's bytes do not decode. Fatal: close the connection.
    Malformed(wire::Error),
    /// The peer's bytes decode but break a rule of the protocol. Fatal: close the
    /// connection (the spec allows a hard disconnect after a MUST is broken).
    PeerMisbehaved(Misbehavior),
    /// The peer lacks something this side was configured to require, or refused it. Fatal:
    /// end the session (the machine already queued a polite goodbye where the protocol has
    /// one; drain `poll_transmit` first).
    PeerIncompatible(Incompatible),
    /// The peer closed the connection in the middle of a message or while replies were
    /// owed. Fatal.
    UnexpectedEof,
    /// The caller broke the machine's contract (a command in the wrong state, a length the
    /// export cannot take, ...). Not fatal: nothing changed.
    Misuse(Misuse),
    /// The output buffer given to `poll_transmit` is too small for the next message. Not
    /// fatal: nothing was written; call again with at least `required` bytes.
    BufferTooSmall {
        /// Bytes needed for the next message.
        required: usize,
    },
    /// The session ended cleanly (soft disconnect, or the peer closed at a message
    /// boundary when that was allowed). Nothing more can be done with this machine.
    Closed,
}

impl Error {
    /// True if the machine is dead after this error: every later call fails with it again.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Self::Malformed(_)
                | Self::PeerMisbehaved(_)
                | Self::PeerIncompatible(_)
                | Self::UnexpectedEof
        )
    }
}

impl From<Misbehavior> for Error {
    fn from(m: Misbehavior) -> Self {
        Self::PeerMisbehaved(m)
    }
}

impl From<Incompatible> for Error {
    fn from(i: Incompatible) -> Self {
        Self::PeerIncompatible(i)
    }
}

impl From<Misuse> for Error {
    fn from(m: Misuse) -> Self {
        Self::Misuse(m)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(e) => write!(f, "malformed message from peer: {e}"),
            Self::PeerMisbehaved(m) => write!(f, "peer broke the protocol: {m}"),
            Self::PeerIncompatible(i) => write!(f, "peer is incompatible: {i}"),
            Self::UnexpectedEof => f.write_str("peer closed the connection unexpectedly"),
            Self::Misuse(m) => write!(f, "API misuse: {m}"),
            Self::BufferTooSmall { required } => {
                write!(f, "output buffer too small: {required} bytes required")
            }
            Self::Closed => f.write_str("the session is closed"),
        }
    }
}

impl core::error::Error for Error {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::Malformed(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(feature = "std")]
impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        use std::io::ErrorKind;
        let kind = match e {
            Error::Malformed(_) | Error::PeerMisbehaved(_) => ErrorKind::InvalidData,
            Error::PeerIncompatible(_) => ErrorKind::Unsupported,
            Error::UnexpectedEof => ErrorKind::UnexpectedEof,
            Error::Misuse(_) | Error::BufferTooSmall { .. } => ErrorKind::InvalidInput,
            Error::Closed => ErrorKind::NotConnected,
        };
        std::io::Error::new(kind, e)
    }
}

/// A protocol rule the peer broke. Each variant names the rule; the spec allows a hard
/// disconnect after any of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Misbehavior {
    // ---- Seen by a client (the server misbehaved) ----
    /// The oldstyle hello set handshake flags (its upper 16 flag bits must be 0).
    OldstyleHandshakeFlags(u16),
    /// An option reply answered a different option than the one pending.
    ReplyToWrongOption {
        /// Option the client sent.
        sent: OptCode,
        /// Option the reply names.
        answered: OptCode,
    },
    /// An option reply arrived while no option was pending.
    UnsolicitedOptionReply(OptCode),
    /// A reply type that is not valid for this option (e.g. `NBD_REP_SERVER` to
    /// `NBD_OPT_GO`), or an unknown non-error reply type.
    UnexpectedOptionReply {
        /// The option pending.
        opt: OptCode,
        /// The reply type received.
        reply: ReplyType,
    },
    /// An option reply declared more data than that reply can legitimately carry.
    OptionReplyTooLong {
        /// The option pending.
        opt: OptCode,
        /// The declared data length.
        len: u32,
    },
    /// `NBD_OPT_INFO`/`NBD_OPT_GO` ended in `NBD_REP_ACK` without an `NBD_INFO_EXPORT`.
    InfoWithoutExport,
    /// Block-size constraints that break the spec's rules.
    InvalidBlockSize(&'static str),
    /// A metadata context name without a `namespace:` prefix.
    InvalidContextName,
    /// `NBD_OPT_SET_META_CONTEXT` gave the same context ID twice.
    DuplicateContextId(u32),
    /// Bytes arrived after the `NBD_REP_ACK` to `NBD_OPT_STARTTLS` and before the TLS
    /// switch: they would be plaintext injected into the TLS session.
    DataAfterStartTls,
    /// The server sent bytes in transmission while no reply was owed.
    UnsolicitedReply,
    /// A reply named a cookie with no command in flight (or one already completed).
    UnknownCookie(Cookie),
    /// A simple reply to `NBD_CMD_READ` after structured replies were negotiated.
    SimpleReplyToStructuredRead(Cookie),
    /// A simple reply after extended headers were negotiated.
    SimpleReplyWithExtendedHeaders(Cookie),
    /// A structured chunk although structured replies were not negotiated.
    StructuredReplyNotNegotiated(Cookie),
    /// A chunk header of the wrong form: extended without extended headers, or
    /// structured after extended headers were negotiated.
    WrongChunkForm(Cookie),
    /// A chunk type with bit 15 clear that this command does not allow, or that is
    /// unknown.
    UnexpectedChunk {
        /// The command's cookie.
        cookie: Cookie,
        /// The chunk type.
        chunk_type: ChunkType,
    },
    /// An extended chunk header did not echo the request's offset.
    ChunkOffsetMismatch(Cookie),
    /// A chunk payload longer than this client accepts (or than the request can need).
    ChunkTooLong {
        /// The command's cookie.
        cookie: Cookie,
        /// Declared payload length.
        len: u64,
    },
    /// A content or error chunk outside the request's range.
    ChunkOutOfRange {
        /// The command's cookie.
        cookie: Cookie,
        /// Chunk offset.
        offset: u64,
        /// Chunk length.
        len: u64,
    },
    /// A content chunk overlapping an earlier content or error chunk of the same reply.
    ChunkOverlap {
        /// The command's cookie.
        cookie: Cookie,
        /// Chunk offset.
        offset: u64,
    },
    /// More than one content chunk for a read with `NBD_CMD_FLAG_DF`.
    FragmentedDfRead(Cookie),
    /// A zero-length `NBD_REPLY_TYPE_OFFSET_HOLE`.
    EmptyHole(Cookie),
    /// `NBD_REPLY_TYPE_NONE` without `NBD_REPLY_FLAG_DONE`.
    NoneWithoutDone(Cookie),
    /// The reply ended successfully without covering the whole read.
    IncompleteRead(Cookie),
    /// A block-status descriptor of length 0.
    ZeroLengthExtent(Cookie),
    /// Block-status descriptors that do not start at the request offset, or run past
    /// the request where the spec forbids it.
    ExtentsOutOfRange(Cookie),
    /// More than one descriptor per chunk although `NBD_CMD_FLAG_REQ_ONE` was set.
    ReqOneViolated(Cookie),
    /// A block-status chunk for a context ID that was not negotiated.
    UnknownContext {
        /// The command's cookie.
        cookie: Cookie,
        /// The context ID.
        id: u32,
    },
    /// Two block-status chunks for the same context in one reply.
    DuplicateContextChunk {
        /// The command's cookie.
        cookie: Cookie,
        /// The context ID.
        id: u32,
    },
    /// A block-status reply ended successfully without a chunk for every context.
    MissingContextChunk(Cookie),
    /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` without extended headers.
    WideExtentsWithoutExtendedHeaders(Cookie),
    /// An error reply whose error value is 0.
    ZeroError(Cookie),
    /// `NBD_OPT_SET_META_CONTEXT` selected more contexts than the client can track.
    TooManyContexts {
        /// The client's bound.
        limit: usize,
    },

    // ---- Seen by a server (the client misbehaved) ----
    /// The client set flags the server does not know or did not offer.
    BadClientFlags(u32),
    /// An option's declared length is too large to be anything but a denial of service.
    OptionTooLong {
        /// The option.
        opt: OptCode,
        /// Its declared length.
        len: u32,
    },
    /// A request in the wrong header form: extended without extended headers, or compact
    /// after they were negotiated.
    WrongRequestForm,
    /// A payload so large it can only be a denial of service.
    PayloadTooLong {
        /// The request's cookie.
        cookie: Cookie,
        /// Declared payload length.
        len: u64,
    },
    /// Bytes after `NBD_CMD_DISC`.
    DataAfterDisconnect,
    /// `NBD_OPT_EXPORT_NAME` after extended headers were negotiated (proto.md: the client
    /// MUST NOT).
    ExportNameAfterExtendedHeaders,
    /// A cookie reused while a request with it is still in flight.
    DuplicateCookie(Cookie),
}

impl fmt::Display for Misbehavior {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Misbehavior::*;
        match *self {
            OldstyleHandshakeFlags(v) => {
                write!(f, "oldstyle hello with handshake flags {v:#x} (must be 0)")
            }
            ReplyToWrongOption { sent, answered } => {
                write!(f, "reply to {answered} while {sent} was pending")
            }
            UnsolicitedOptionReply(o) => {
                write!(f, "option reply for {o} while no option was pending")
            }
            UnexpectedOptionReply { opt, reply } => {
                write!(f, "{reply} is not a valid reply to {opt}")
            }
            OptionReplyTooLong { opt, len } => {
                write!(f, "reply to {opt} declares {len} bytes of data")
            }
            InfoWithoutExport => f.write_str("NBD_REP_ACK without NBD_INFO_EXPORT"),
            InvalidBlockSize(why) => write!(f, "invalid NBD_INFO_BLOCK_SIZE: {why}"),
            InvalidContextName => f.write_str("metadata context name without a namespace"),
            DuplicateContextId(id) => write!(f, "metadata context ID {id} given twice"),
            DataAfterStartTls => {
                f.write_str("data after the NBD_OPT_STARTTLS acknowledgement, before TLS")
            }
            UnsolicitedReply => f.write_str("reply while no command was in flight"),
            UnknownCookie(c) => write!(f, "reply for unknown cookie {c}"),
            SimpleReplyToStructuredRead(c) => {
                write!(
                    f,
                    "simple reply to read {c} after structured replies were negotiated"
                )
            }
            SimpleReplyWithExtendedHeaders(c) => {
                write!(
                    f,
                    "simple reply to {c} after extended headers were negotiated"
                )
            }
            StructuredReplyNotNegotiated(c) => {
                write!(f, "structured reply to {c} without negotiation")
            }
            WrongChunkForm(c) => write!(f, "reply chunk header of the wrong form for {c}"),
            UnexpectedChunk { cookie, chunk_type } => {
                write!(f, "{chunk_type} not allowed in reply to {cookie}")
            }
            ChunkOffsetMismatch(c) => {
                write!(f, "extended chunk for {c} does not echo the request offset")
            }
            ChunkTooLong { cookie, len } => write!(f, "chunk of {len} bytes for {cookie}"),
            ChunkOutOfRange {
                cookie,
                offset,
                len,
            } => {
                write!(f, "chunk [{offset}, +{len}) outside request {cookie}")
            }
            ChunkOverlap { cookie, offset } => {
                write!(f, "chunk at {offset} overlaps earlier data for {cookie}")
            }
            FragmentedDfRead(c) => write!(f, "more than one content chunk for DF read {c}"),
            EmptyHole(c) => write!(f, "zero-length hole for {c}"),
            NoneWithoutDone(c) => write!(f, "NBD_REPLY_TYPE_NONE without DONE for {c}"),
            IncompleteRead(c) => write!(f, "read {c} ended without covering the whole range"),
            ZeroLengthExtent(c) => write!(f, "zero-length extent for {c}"),
            ExtentsOutOfRange(c) => write!(f, "extents for {c} do not match the request range"),
            ReqOneViolated(c) => write!(f, "several extents for REQ_ONE request {c}"),
            UnknownContext { cookie, id } => {
                write!(f, "block status for context {id} not negotiated ({cookie})")
            }
            DuplicateContextChunk { cookie, id } => {
                write!(f, "two chunks for context {id} in reply to {cookie}")
            }
            MissingContextChunk(c) => {
                write!(f, "block status reply {c} lacks a negotiated context")
            }
            WideExtentsWithoutExtendedHeaders(c) => {
                write!(f, "64-bit extents without extended headers for {c}")
            }
            ZeroError(c) => write!(f, "error reply with error value 0 for {c}"),
            TooManyContexts { limit } => {
                write!(f, "more than {limit} metadata contexts selected")
            }
            BadClientFlags(v) => write!(f, "client flags {v:#x} unknown or not offered"),
            OptionTooLong { opt, len } => write!(f, "{opt} of {len} bytes"),
            WrongRequestForm => {
                f.write_str("request header form does not match the negotiated one")
            }
            PayloadTooLong { cookie, len } => write!(f, "payload of {len} bytes for {cookie}"),
            DataAfterDisconnect => f.write_str("data after NBD_CMD_DISC"),
            ExportNameAfterExtendedHeaders => {
                f.write_str("NBD_OPT_EXPORT_NAME after extended headers")
            }
            DuplicateCookie(c) => write!(f, "cookie {c} reused while in flight"),
        }
    }
}

/// Something the peer lacks or refused that this side was configured to require.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Incompatible {
    /// TLS is required by this side but the server did not accept `NBD_OPT_STARTTLS`.
    TlsUnavailable,
    /// The server requires TLS (`NBD_REP_ERR_TLS_REQD`) but TLS is off here.
    TlsRequiredByPeer,
    /// The client did not start TLS although this server requires it, and tried to enter
    /// transmission with `NBD_OPT_EXPORT_NAME`.
    TlsRequiredByUs,
    /// An option this side needed was refused.
    OptionRefused {
        /// The option.
        opt: OptCode,
        /// The server's answer.
        reply: ReplyType,
    },
    /// The server closed the connection right after reading the client flags: it did not
    /// accept them.
    ClientFlagsRefused,
    /// The export chosen with `NBD_OPT_EXPORT_NAME` was refused (the server closed).
    ExportRefused,
}

impl fmt::Display for Incompatible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TlsUnavailable => {
                f.write_str("TLS is required but the server did not accept STARTTLS")
            }
            Self::TlsRequiredByPeer => f.write_str("the server requires TLS"),
            Self::TlsRequiredByUs => {
                f.write_str("the client did not start TLS, which this server requires")
            }
            Self::OptionRefused { opt, reply } => write!(f, "{opt} refused with {reply}"),
            Self::ClientFlagsRefused => f.write_str("the server closed after the client flags"),
            Self::ExportRefused => f.write_str("the server refused the export"),
        }
    }
}

/// A call the machine refused because it breaks the API contract or the negotiated
/// protocol. Nothing changed; the machine can be used further.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Misuse {
    /// The call is not valid in the machine's current state (e.g. a command before the
    /// handshake finished, an option after it).
    WrongState,
    /// `handle_input` was called while a payload was wanted: move the payload first
    /// (`handle_payload`).
    PayloadPending,
    /// `handle_payload` moved more bytes than were wanted, or none were wanted.
    PayloadMismatch,
    /// The in-flight table is full; wait for a reply first.
    TooManyInFlight,
    /// The export does not support this command (its transmission flag is clear).
    Unsupported(Command),
    /// A command flag that is unknown, invalid for this command, or not negotiated.
    FlagNotAllowed(u16),
    /// A write to a read-only export.
    ReadOnly,
    /// The range is past the end of the export, or overflows.
    OutOfRange {
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Export size.
        size: u64,
    },
    /// Offset or length not a multiple of the export's minimum block size.
    Misaligned {
        /// The minimum block size.
        min_block: u32,
    },
    /// A payload larger than the negotiated maximum.
    PayloadTooLarge {
        /// Requested length.
        len: u64,
        /// The maximum.
        max: u64,
    },
    /// A length that the header form cannot carry (over 32 bits without extended
    /// headers), or a zero length where one is required.
    BadLength(u64),
    /// No metadata context was negotiated, or the ID is not one of them.
    NoSuchContext(u32),
    /// No command with this cookie is in flight (server: no reply owed).
    UnknownCookie(Cookie),
    /// The reply breaks the rules for this command (range, order, overlap, type).
    BadReply(&'static str),
    /// A string the caller gave breaks the spec's string rules, or a value cannot be
    /// encoded.
    Encode(wire::Error),
    /// Output is still queued: drain `poll_transmit` before this call.
    TransmitPending,
    /// The option data is larger than this machine's option buffer.
    OptionTooLarge(usize),
    /// The feature was not negotiated (structured replies, extended headers, contexts).
    NotNegotiated(&'static str),
    /// Adversarial mode only (feature `adversarial`): an injected message of this many
    /// bytes is larger than the machine can ever queue. Split it into several injections.
    InjectionTooLarge(usize),
}

impl fmt::Display for Misuse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::WrongState => f.write_str("not valid in the current state"),
            Self::PayloadPending => f.write_str("a payload must be moved first"),
            Self::PayloadMismatch => f.write_str("payload length does not match what is wanted"),
            Self::TooManyInFlight => f.write_str("too many commands in flight"),
            Self::Unsupported(c) => write!(f, "{c} is not supported by the export"),
            Self::FlagNotAllowed(v) => write!(f, "command flags {v:#x} not allowed here"),
            Self::ReadOnly => f.write_str("the export is read-only"),
            Self::OutOfRange { offset, len, size } => {
                write!(
                    f,
                    "range [{offset}, +{len}) outside the export of {size} bytes"
                )
            }
            Self::Misaligned { min_block } => {
                write!(f, "not aligned to the minimum block size {min_block}")
            }
            Self::PayloadTooLarge { len, max } => {
                write!(f, "payload of {len} bytes exceeds the maximum {max}")
            }
            Self::BadLength(len) => write!(f, "length {len} cannot be sent"),
            Self::NoSuchContext(id) => write!(f, "metadata context {id} was not negotiated"),
            Self::UnknownCookie(c) => write!(f, "no command with cookie {c} in flight"),
            Self::BadReply(why) => write!(f, "invalid reply: {why}"),
            Self::Encode(e) => write!(f, "cannot encode: {e}"),
            Self::TransmitPending => f.write_str("queued output must be drained first"),
            Self::OptionTooLarge(n) => write!(f, "option data of {n} bytes is too large"),
            Self::NotNegotiated(what) => write!(f, "{what} was not negotiated"),
            Self::InjectionTooLarge(n) => write!(f, "injected message of {n} bytes is too large"),
        }
    }
}
