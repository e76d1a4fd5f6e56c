//! The server state machine.
//!
//! [`Server`] speaks the server side of NBD: it sends the greeting, haggles options, checks
//! every request, and frames the replies the application gives it. It never touches a
//! socket, a file or a clock, and it never sees payload data: write payloads and read data
//! pass beside it, between the transport and the application's own buffers.
//!
//! # The run loop
//!
//! Methods follow quinn's taxonomy: (A) getters such as [`Server::state`]; (B) `handle_*`
//! for bytes from the client; (C) `answer_*` and `reply_*` from the application; (D)
//! [`Server::poll_transmit`] and [`Server::wants`] for what to do next.
//!
//! 1. Create the machine with [`Server::new`]. The greeting is queued.
//! 2. Drain [`Server::poll_transmit`] until it returns `None`, sending each
//!    [`Transmit`] in order: `Bytes(n)` are the first `n` bytes of your
//!    output buffer; `Payload` means "send these bytes of *your* read buffer now";
//!    `Zeroes` means "send this many zero bytes".
//! 3. Act on [`Server::wants`]: `Bytes(n)` means read until you hold at least `n` bytes and
//!    call [`Server::handle_input`]; `Payload` means move the write payload from the
//!    transport into your buffer and call [`Server::handle_payload`]; `Discard` means read
//!    and drop bytes, then call [`Server::handle_payload`]; `Nothing` means no input is
//!    expected (reply to something, or the session is over: see [`Server::state`]).
//! 4. `handle_input` consumes at most one message and returns at most one
//!    [`ServerEvent`]. Handle the event (events may borrow your input buffer), answer it if
//!    it asks a question, then drop the consumed bytes. Go to 2.
//! 5. At end of file call [`Server::handle_eof`].
//!
//! During negotiation the machine answers everything it can on its own (structured
//! replies, extended headers, STARTTLS, unknown and malformed options, TLS policy) and asks
//! the application only what is policy: which exports exist ([`ServerEvent::List`],
//! [`ServerEvent::Export`]) and which metadata contexts they offer
//! ([`ServerEvent::MetaContexts`]). In transmission it checks every request against the
//! spec and the export and answers the bad ones itself with the errno the spec names; the
//! application sees only valid requests ([`ServerEvent::Request`]) and replies to them in
//! any order.
//!
//! # Example
//!
//! Serving one client a 1 MiB disk held in a `Vec` (see [`crate::blocking::server`] for a
//! complete driver with backends). Write payloads go from the socket into the disk and
//! read data from the disk to the socket; the machine only frames them.
//!
//! ```no_run
//! use std::io::{Read, Write};
//! use std::net::TcpListener;
//! use nbd_proto::server::{ExportInfo, Server, ServerConfig, ServerEvent, State};
//! use nbd_proto::wire::{Command, OptError, TransmissionFlags};
//! use nbd_proto::{Transmit, Want};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut disk = vec![0u8; 1 << 20];
//! let export = ExportInfo::new(disk.len() as u64, TransmissionFlags::SEND_FLUSH);
//! let (mut sock, _) = TcpListener::bind("127.0.0.1:10809")?.accept()?;
//! sock.set_nodelay(true)?; // replies are small writes
//! let mut server: Server = Server::new(ServerConfig::default());
//! let (mut out, mut input, mut scratch) = (vec![0u8; 65536], Vec::new(), [0u8; 4096]);
//! let mut writing = None; // a write whose payload is still arriving
//! loop {
//!     // 2. Send what the machine queued.
//!     while let Some(t) = server.poll_transmit(&mut out)? {
//!         match t {
//!             Transmit::Bytes(n) => sock.write_all(&out[..n])?,
//!             Transmit::Payload { offset, len, .. } => {
//!                 sock.write_all(&disk[offset as usize..][..len])?
//!             }
//!             Transmit::Zeroes { len, .. } => sock.write_all(&vec![0; len])?,
//!             _ => unreachable!("no other transmit in this version"),
//!         }
//!     }
//!     // A write is answered once all its data is in the disk.
//!     if let Some(cookie) = writing {
//!         if !matches!(server.wants(), Want::Payload { .. }) {
//!             writing = None;
//!             server.reply(cookie, Ok(()))?;
//!             continue;
//!         }
//!     }
//!     // 3. Do what the machine wants.
//!     match server.wants() {
//!         Want::Payload { offset, len, .. } => {
//!             let n = sock.read(&mut disk[offset as usize..][..len])?;
//!             if n == 0 {
//!                 break server.handle_eof()?;
//!             }
//!             server.handle_payload(n)?;
//!             continue;
//!         }
//!         Want::Discard { len } => {
//!             let n = sock.read(&mut scratch[..len.min(4096)])?;
//!             if n == 0 {
//!                 break server.handle_eof()?;
//!             }
//!             server.handle_payload(n)?;
//!             continue;
//!         }
//!         Want::Bytes(n) if input.len() < n => {
//!             let have = input.len();
//!             input.resize(n, 0);
//!             let got = sock.read(&mut input[have..])?;
//!             input.truncate(have + got);
//!             if got == 0 {
//!                 break server.handle_eof()?;
//!             }
//!         }
//!         Want::Nothing if server.state() == State::Closed => break,
//!         _ => {}
//!     }
//!     // 4. Hand over the bytes: at most one message and one event per call.
//!     let handled = server.handle_input(&input)?;
//!     match handled.event {
//!         Some(ServerEvent::Export(q)) if q.name.is_empty() => server.answer_export(&export)?,
//!         Some(ServerEvent::Export(_)) => server.answer_error(OptError::UnknownExport, "")?,
//!         Some(ServerEvent::List) => {
//!             server.answer_list_entry("", "a 1 MiB disk")?;
//!             server.answer_ack()?;
//!         }
//!         // No metadata contexts here: an empty answer.
//!         Some(ServerEvent::MetaContexts(_)) => server.answer_ack()?,
//!         Some(ServerEvent::Request { request, .. }) => match request.command {
//!             Command::Read => {
//!                 let (offset, len) = (request.offset, request.len as usize);
//!                 server.reply_read_data(request.cookie, offset, len)?
//!             }
//!             Command::Write => writing = Some(request.cookie),
//!             // The machine lets through only what the export advertises.
//!             _ => server.reply(request.cookie, Ok(()))?,
//!         },
//!         _ => {}
//!     }
//!     input.drain(..handled.consumed);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Memory
//!
//! All state is inline: `N` owed replies (default 64) and a `B`-byte output buffer
//! (default 64 KiB) for encoded headers and option replies. No allocation, ever. Payloads
//! are never buffered, and a refused payload is discarded by the caller in pieces of its
//! choosing. The input buffer the caller keeps must hold at least
//! [`ServerConfig::max_option_len`] + 16 bytes during negotiation, and 32 + 8 + 4 ×
//! [`MAX_CONTEXTS`] bytes in transmission.

#[cfg(feature = "adversarial")]
mod adversary;
mod meta;
mod output;

use core::fmt::{self, Write as _};

use arrayvec::ArrayVec;

#[cfg(feature = "adversarial")]
pub use self::adversary::ServerAdversary;
pub use self::meta::{any_matches, query_matches};
use self::output::Output;
#[cfg(feature = "adversarial")]
use crate::adversarial::ServerChecks;
use crate::common::{Handled, TlsPolicy, Transmit, Want};
use crate::error::{Error, Incompatible, Misbehavior, Misuse};
use crate::wire::chunk::{BlockStatusHeader, ErrorChunk, OffsetDataHeader, OffsetHole};
use crate::wire::{
    self, BlockSize, BlockStatusPayload, ChunkHeader, ChunkType, ClientFlags, CmdFlags, Command,
    ContextIds, Cookie, Errno, ExportNameReply, Extent, Greeting, HandshakeFlags, InfoList,
    InfoType, OldstyleHello, Opt, OptCode, OptError, OptHeader, OptReply, Queries, ReplyFlags,
    Request, SimpleReply, TransmissionFlags,
};
use crate::wire::{Info, MAX_STRING_LEN};

/// Most metadata contexts one `NBD_OPT_SET_META_CONTEXT` can select; a larger selection
/// is refused with `NBD_REP_ERR_TOO_BIG`.
pub const MAX_CONTEXTS: usize = 16;

/// Largest `NBD_CMD_BLOCK_STATUS` payload the server accepts (8 + 4 × [`MAX_CONTEXTS`]);
/// a longer one is discarded and answered with `NBD_EINVAL`.
pub const MAX_BLOCK_STATUS_PAYLOAD: usize = 8 + 4 * MAX_CONTEXTS;

/// Bytes of output buffer an option answer may need at most: `NBD_INFO_EXPORT`,
/// `NBD_INFO_NAME` and `NBD_INFO_DESCRIPTION` with 4096-byte strings, `NBD_INFO_BLOCK_SIZE`
/// and the ACK; a `B` smaller than this limits the strings the server can send.
pub const MAX_OPTION_ANSWER: usize = 32 + 2 * (20 + 2 + MAX_STRING_LEN) + 34 + 20;

/// Configuration of a [`Server`]. Everything is policy with a safe default.
///
/// ```
/// use nbd_proto::server::{Server, ServerConfig, State};
///
/// let mut config = ServerConfig::default();
/// config.extended_headers = false; // offer structured replies at most
/// config.max_option_len = 4096;
/// // At most 8 replies owed, and a 4 KiB output buffer.
/// let server: Server<8, 4096> = Server::new(config);
/// assert_eq!(server.state(), State::Greeting);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerConfig {
    /// TLS policy. `Required` is the spec's FORCEDTLS, `Optional` its SELECTIVETLS (see
    /// [`ExportInfo::tls_only`]). Default `Off`.
    pub tls: TlsPolicy,
    /// Offer `NBD_FLAG_NO_ZEROES`. Default true.
    pub no_zeroes: bool,
    /// Accept `NBD_OPT_STRUCTURED_REPLY`. Default true.
    pub structured_replies: bool,
    /// Accept `NBD_OPT_EXTENDED_HEADERS` (only if structured replies are accepted too:
    /// extended headers imply them). Default true.
    pub extended_headers: bool,
    /// Options with more data than this are refused with `NBD_REP_ERR_TOO_BIG` (and their
    /// data discarded). Default 16 KiB: room for a 4096-byte name and several queries.
    pub max_option_len: u32,
    /// A declared length above this (option data, write payload) can only be a denial of
    /// service: the machine dies instead of discarding it. Default 64 MiB.
    pub max_discard: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            tls: TlsPolicy::Off,
            no_zeroes: true,
            structured_replies: true,
            extended_headers: true,
            max_option_len: 16 * 1024,
            max_discard: 64 << 20,
        }
    }
}

/// How replies are framed, decided by negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyForm {
    /// Compact requests, simple replies only.
    Simple,
    /// Compact requests, structured replies.
    Structured,
    /// Extended requests and extended replies.
    Extended,
}

/// What the application says about one export, in answer to [`ServerEvent::Export`] (or up
/// front for oldstyle and transmission-only servers).
///
/// ```
/// use nbd_proto::server::ExportInfo;
/// use nbd_proto::wire::{BlockSize, TransmissionFlags};
///
/// let info = ExportInfo::new(1 << 30, TransmissionFlags::SEND_FLUSH | TransmissionFlags::SEND_TRIM)
///     .with_block_size(BlockSize { min: 512, preferred: 4096, max_payload: 1 << 25 })
///     .with_description("scratch disk");
/// assert_eq!(info.size, 1 << 30);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExportInfo<'a> {
    /// Export size in bytes.
    pub size: u64,
    /// What the export supports. The machine adds `HAS_FLAGS` and removes what the
    /// negotiation does not allow (`SEND_DF` without structured replies,
    /// `BLOCK_STATUS_PAYLOAD` without extended headers and contexts, `SEND_FAST_ZERO`
    /// without `SEND_WRITE_ZEROES`).
    pub flags: TransmissionFlags,
    /// Block-size constraints to advertise, if any (they are then enforced).
    pub block_size: Option<BlockSize>,
    /// Refuse `NBD_OPT_GO` with `NBD_REP_ERR_BLOCK_SIZE_REQD` unless the client asked for
    /// `NBD_INFO_BLOCK_SIZE` (and refuse `NBD_OPT_EXPORT_NAME`).
    pub require_block_size: bool,
    /// Canonical name sent as `NBD_INFO_NAME` when asked.
    pub name: Option<&'a str>,
    /// Description sent as `NBD_INFO_DESCRIPTION` when asked.
    pub description: Option<&'a str>,
    /// Under [`TlsPolicy::Optional`], the export exists only over TLS (answered with
    /// `NBD_REP_ERR_TLS_REQD` before TLS).
    pub tls_only: bool,
}

impl<'a> ExportInfo<'a> {
    /// An export of `size` bytes with `flags`, and nothing else.
    pub fn new(size: u64, flags: TransmissionFlags) -> Self {
        Self {
            size,
            flags,
            block_size: None,
            require_block_size: false,
            name: None,
            description: None,
            tls_only: false,
        }
    }

    /// Sets the block-size constraints.
    pub fn with_block_size(mut self, block_size: BlockSize) -> Self {
        self.block_size = Some(block_size);
        self
    }

    /// Sets the description.
    pub fn with_description(mut self, description: &'a str) -> Self {
        self.description = Some(description);
        self
    }

    /// Sets the canonical name.
    pub fn with_name(mut self, name: &'a str) -> Self {
        self.name = Some(name);
        self
    }
}

/// What [`ServerEvent::Export`] asks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportQueryKind {
    /// `NBD_OPT_INFO`: describe the export, stay in negotiation.
    Info,
    /// `NBD_OPT_GO`: describe it and enter transmission.
    Go,
    /// `NBD_OPT_EXPORT_NAME`: enter transmission (a refusal closes the connection).
    ExportName,
}

/// A client's question about one export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportQuery<'i> {
    /// Which option asked.
    pub kind: ExportQueryKind,
    /// Export name ("" = the default export).
    pub name: &'i str,
    /// Information types requested (empty for `NBD_OPT_EXPORT_NAME`).
    pub infos: InfoList<'i>,
}

/// A client's metadata context query (`NBD_OPT_LIST_META_CONTEXT` or
/// `NBD_OPT_SET_META_CONTEXT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaContextQuery<'i> {
    /// True for `SET` (select), false for `LIST`.
    pub set: bool,
    /// The export the contexts are for.
    pub export: &'i str,
    /// The queries, as sent.
    pub queries: Queries<'i>,
}

impl<'i> MetaContextQuery<'i> {
    /// The contexts of `available` this query selects, with the rules of
    /// [`query_matches`]: answer each with [`Server::answer_meta_context`].
    pub fn matching<'a>(&self, available: &'a [&'a str]) -> impl Iterator<Item = &'a str> + 'a
    where
        'i: 'a,
    {
        let (queries, list) = (self.queries, !self.set);
        available
            .iter()
            .copied()
            .filter(move |name| any_matches(queries, name, list))
    }
}

/// Something the client did that the application must know about or answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerEvent<'i> {
    /// `NBD_OPT_LIST`: call [`Server::answer_list_entry`] for each export, then
    /// [`Server::answer_ack`] (or [`Server::answer_error`]).
    List,
    /// `NBD_OPT_INFO`, `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`: call
    /// [`Server::answer_export`] or [`Server::answer_error`] (e.g.
    /// `OptError::UnknownExport`).
    Export(ExportQuery<'i>),
    /// `NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_SET_META_CONTEXT`: call
    /// [`Server::answer_meta_context`] for each selected context (see
    /// [`MetaContextQuery::matching`]), then [`Server::answer_ack`] (or
    /// [`Server::answer_error`]).
    MetaContexts(MetaContextQuery<'i>),
    /// `NBD_OPT_STARTTLS` was accepted: drain `poll_transmit` (the ACK), start TLS on the
    /// transport as a server, then call [`Server::tls_established`].
    StartTls,
    /// A valid request; reply to it with the `reply_*` methods, in any order. For a write,
    /// the payload follows ([`Want::Payload`]). For a block-status request in the payload
    /// form, `request.len` is the effect length and `ids` the contexts asked for.
    Request {
        /// The request (validated).
        request: Request,
        /// Context IDs of a payload-form `NBD_CMD_BLOCK_STATUS`.
        ids: Option<ContextIds<'i>>,
    },
    /// `NBD_CMD_DISC`: reply to what is in flight; the session then ends
    /// ([`State::Closed`] once the output is drained).
    Disconnect,
}

/// Where the server is in the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum State {
    /// Greeting sent; waiting for the client flags.
    Greeting,
    /// Haggling options (an answer may be owed to the last event).
    Negotiating,
    /// STARTTLS acknowledged; waiting for [`Server::tls_established`].
    StartTls,
    /// Serving requests.
    Transmission,
    /// `NBD_CMD_DISC` received; finishing the replies still owed.
    Disconnecting,
    /// The session is over (clean end, abort, refused export, or a hard disconnect the
    /// server chose): close the connection once the output is drained.
    Closed,
    /// A fatal error happened; every call returns it again.
    Dead,
}

/// Which answer the application owes for the last event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    List,
    Export {
        kind: ExportQueryKind,
        name: bool,
        description: bool,
        block_size: bool,
        export: u64,
    },
    Meta {
        set: bool,
        export: u64,
    },
}

/// What the input bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Input {
    ClientFlags,
    Option,
    /// Skipping a refused option's data or request's payload; the refusal goes out once
    /// the last byte is gone.
    Discard {
        left: u64,
        then: Refusal,
    },
    /// After the STARTTLS ACK: nothing until the caller switched.
    AwaitTls,
    Request,
    /// A write payload the application is moving.
    Payload {
        cookie: Cookie,
        offset: u64,
        left: u64,
    },
    /// `NBD_CMD_DISC` was received: the client may send nothing more.
    Disconnected,
    /// Nothing more is accepted.
    Done,
}

/// A refusal the machine sends once a refused payload has been discarded. Answering
/// earlier would reach a client still busy sending that payload, which libnbd, for one,
/// takes for a reply to an unknown cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// A request, with this errno.
    Request {
        cookie: Cookie,
        command: Command,
        offset: u64,
        errno: Errno,
    },
    /// An option over the length limit: `NBD_REP_ERR_TOO_BIG`.
    OptionTooBig { code: OptCode, len: u32 },
}

/// The negotiated export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Export {
    size: u64,
    flags: TransmissionFlags,
    min_block: u32,
    max_payload: u32,
}

/// A reply the server owes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Owed {
    cookie: Cookie,
    command: Command,
    flags: CmdFlags,
    offset: u64,
    len: u64,
    /// READ: next offset to answer. BLOCK_STATUS: bit mask of selection indices still owed.
    progress: u64,
    /// READ in simple mode: the header went out (an error can no longer be reported).
    started: bool,
}

impl Owed {
    fn end(&self) -> u64 {
        // invariant: validation checked offset + len against the export size.
        self.offset.saturating_add(self.len)
    }
}

/// The server state machine. `N` is the most replies owed at once (requests beyond it are
/// left unread until one is answered); `B` the output buffer size in bytes.
///
/// `size_of::<Server>()` with the defaults is about 69 KiB: 64 KiB of output buffer, 64
/// owed-reply slots of 48 bytes, and small fixed state (`Server<4, 1024>`: 3.5 KiB).
///
/// # Example
///
/// Serving one read, in a server that starts in transmission: the machine frames the reply
/// and then asks for the data from *your* buffer; it never sees the bytes.
///
/// ```
/// use nbd_proto::server::{ExportInfo, ReplyForm, Server, ServerConfig, ServerEvent};
/// use nbd_proto::wire::{CmdFlags, Command, Cookie, Request, TransmissionFlags};
/// use nbd_proto::Transmit;
///
/// let disk = vec![7u8; 4096];
/// let export = ExportInfo::new(disk.len() as u64, TransmissionFlags::SEND_FLUSH);
/// let mut server: Server =
///     Server::new_transmission(ServerConfig::default(), &export, ReplyForm::Simple)?;
///
/// // A client's 28-byte request: read 512 bytes at offset 1024.
/// let read = Request { flags: CmdFlags::empty(), command: Command::Read, cookie: Cookie(1),
///                      offset: 1024, len: 512, extended: false };
/// let mut input = [0u8; 28];
/// read.emit(&mut input)?;
///
/// let handled = server.handle_input(&input)?;
/// assert_eq!(handled.consumed, 28);
/// let Some(ServerEvent::Request { request, .. }) = handled.event else { unreachable!() };
/// server.reply_read_data(request.cookie, request.offset, request.len as usize)?;
///
/// let (mut out, mut wire) = ([0u8; 64], Vec::new());
/// while let Some(t) = server.poll_transmit(&mut out)? {
///     match t {
///         // The 16-byte simple reply header, encoded by the machine.
///         Transmit::Bytes(n) => wire.extend_from_slice(&out[..n]),
///         // The data: straight from the disk to the transport.
///         Transmit::Payload { offset, len, .. } => {
///             wire.extend_from_slice(&disk[offset as usize..][..len])
///         }
///         _ => unreachable!("no holes in a simple reply here"),
///     }
/// }
/// assert_eq!(wire.len(), 16 + 512);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Server<const N: usize = 64, const B: usize = 65536> {
    config: ServerConfig,
    state: State,
    error: Option<Error>,
    input: Input,
    /// The last `handle_input` ended inside a message...
    partial: bool,
    /// ...which needs this many bytes in all (0 if only the header length is known).
    need: usize,
    out: Output<B>,
    /// A refusal due after a discard, not yet queued for want of room.
    deferred: Option<Refusal>,
    pending: Pending,
    offered: HandshakeFlags,
    client_flags: ClientFlags,
    tls_active: bool,
    structured: bool,
    extended: bool,
    /// Selected context IDs, and a hash of the export they were selected for.
    contexts: ArrayVec<u32, MAX_CONTEXTS>,
    contexts_export: Option<u64>,
    export: Export,
    owed: ArrayVec<Owed, N>,
    shutting_down: bool,
    /// Adversarial mode: the checks on replies switched off.
    #[cfg(feature = "adversarial")]
    relaxed: ServerChecks,
}

impl<const N: usize, const B: usize> Server<N, B> {
    /// A fixed-newstyle server. The greeting is queued for [`Server::poll_transmit`].
    pub fn new(config: ServerConfig) -> Self {
        let mut offered = HandshakeFlags::FIXED_NEWSTYLE;
        offered.set(HandshakeFlags::NO_ZEROES, config.no_zeroes);
        let mut s = Self::blank(config, State::Greeting, Input::ClientFlags);
        s.offered = offered;
        s.queue(Greeting::LEN, |b| Greeting { flags: offered }.emit(b));
        s
    }

    /// An oldstyle server for one export: the 152-byte hello is queued, then transmission
    /// with simple replies starts at once.
    pub fn new_oldstyle(config: ServerConfig, export: &ExportInfo<'_>) -> Result<Self, Error> {
        let mut s = Self::blank(config, State::Transmission, Input::Request);
        s.export = s.export_state(export, None)?;
        let hello = OldstyleHello {
            size: export.size,
            handshake_flags: HandshakeFlags::empty(),
            transmission_flags: s.export.flags,
        };
        s.queue(OldstyleHello::LEN, |b| hello.emit(b));
        Ok(s)
    }

    /// A server that starts directly in transmission, for callers that did the handshake
    /// themselves (for example before handing a socket to the Linux kernel client).
    /// Nothing is queued.
    pub fn new_transmission(
        config: ServerConfig,
        export: &ExportInfo<'_>,
        form: ReplyForm,
    ) -> Result<Self, Error> {
        let mut s = Self::blank(config, State::Transmission, Input::Request);
        s.structured = form != ReplyForm::Simple;
        s.extended = form == ReplyForm::Extended;
        s.export = s.export_state(export, None)?;
        Ok(s)
    }

    fn blank(config: ServerConfig, state: State, input: Input) -> Self {
        Self {
            config,
            state,
            error: None,
            input,
            partial: false,
            need: 0,
            out: Output::new(),
            deferred: None,
            pending: Pending::None,
            offered: HandshakeFlags::empty(),
            client_flags: ClientFlags::empty(),
            tls_active: false,
            structured: false,
            extended: false,
            contexts: ArrayVec::new(),
            contexts_export: None,
            export: Export {
                size: 0,
                flags: TransmissionFlags::HAS_FLAGS,
                min_block: 1,
                max_payload: 1 << 25,
            },
            owed: ArrayVec::new(),
            shutting_down: false,
            #[cfg(feature = "adversarial")]
            relaxed: ServerChecks::empty(),
        }
    }

    // ---- (A) getters ----

    /// Where the session is.
    pub fn state(&self) -> State {
        self.state
    }

    /// The fatal error, once dead.
    pub fn error(&self) -> Option<Error> {
        self.error
    }

    /// How replies are framed (meaningful once in transmission).
    pub fn reply_form(&self) -> ReplyForm {
        if self.extended {
            ReplyForm::Extended
        } else if self.structured {
            ReplyForm::Structured
        } else {
            ReplyForm::Simple
        }
    }

    /// True once TLS was established.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// The flags the client sent.
    pub fn client_flags(&self) -> ClientFlags {
        self.client_flags
    }

    /// Size of the export being served.
    pub fn export_size(&self) -> u64 {
        self.export.size
    }

    /// Transmission flags sent for the export being served.
    pub fn transmission_flags(&self) -> TransmissionFlags {
        self.export.flags
    }

    /// Context IDs selected for the export being served.
    pub fn contexts(&self) -> &[u32] {
        &self.contexts
    }

    /// Replies owed.
    pub fn owed(&self) -> usize {
        self.owed.len()
    }

    /// The write payload being received, as `(cookie, next offset, bytes left)`: after an
    /// unexpected end of file this says how far the write got.
    pub fn payload_in_progress(&self) -> Option<(Cookie, u64, u64)> {
        match self.input {
            Input::Payload {
                cookie,
                offset,
                left,
            } => Some((cookie, offset, left)),
            _ => None,
        }
    }

    /// True when the session is over and all output was drained: close the connection.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Closed | State::Dead) && self.out.is_empty()
    }

    // ---- (D) output ----

    /// Writes the next output into `out`. Call until it returns `None` after every other
    /// call. Fails with [`Error::BufferTooSmall`] only for an empty `out`: long byte runs
    /// are split across calls.
    pub fn poll_transmit(&mut self, out: &mut [u8]) -> Result<Option<Transmit>, Error> {
        if let Some(e) = self.error {
            return Err(e);
        }
        self.queue_deferred();
        let t = self.out.poll(out)?;
        if t.is_none() && self.state == State::Disconnecting && self.owed.is_empty() {
            self.state = State::Closed;
        }
        Ok(t)
    }

    /// What the machine needs from the transport next.
    pub fn wants(&self) -> Want {
        if self.error.is_some() || self.pending != Pending::None {
            return Want::Nothing;
        }
        match self.input {
            Input::ClientFlags => Want::Bytes(ClientFlags::LEN),
            Input::Option => Want::Bytes(self.need.max(OptHeader::LEN)),
            Input::Discard { left, .. } => Want::Discard { len: clamp(left) },
            Input::AwaitTls | Input::Disconnected | Input::Done => Want::Nothing,
            Input::Request => {
                if self.owed.is_full() || !self.has_reply_room() {
                    Want::Nothing
                } else {
                    Want::Bytes(self.need.max(self.request_len()))
                }
            }
            Input::Payload {
                cookie,
                offset,
                left,
            } => Want::Payload {
                cookie,
                offset,
                len: clamp(left),
            },
        }
    }

    // ---- (B) input ----

    /// Consumes at most one message from the front of `input` and returns at most one
    /// event. With an incomplete message it consumes nothing; [`Server::wants`] then says
    /// how many bytes the message needs.
    pub fn handle_input<'i>(&mut self, input: &'i [u8]) -> Result<Handled<ServerEvent<'i>>, Error> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.pending != Pending::None {
            return Err(Misuse::WrongState.into());
        }
        self.partial = false;
        self.need = 0;
        let result = match self.input {
            Input::ClientFlags => self.read_client_flags(input),
            Input::Option => self.read_option(input),
            Input::Request => self.read_request(input),
            Input::Payload { .. } | Input::Discard { .. } => {
                return Err(Misuse::PayloadPending.into())
            }
            Input::AwaitTls => {
                if input.is_empty() {
                    Ok(Handled::none())
                } else {
                    Err(Misbehavior::DataAfterStartTls.into())
                }
            }
            // proto.md: the client MUST NOT send anything after NBD_CMD_DISC, whether or
            // not the server is still finishing replies (test: hostile_client.rs,
            // data_after_disconnect).
            Input::Disconnected if !input.is_empty() => {
                Err(Misbehavior::DataAfterDisconnect.into())
            }
            Input::Disconnected | Input::Done => {
                if input.is_empty() {
                    Ok(Handled::none())
                } else {
                    Err(Error::Closed)
                }
            }
        };
        result.map_err(|e| self.fail(e))
    }

    /// The caller moved (or discarded) `n` payload bytes from the transport.
    pub fn handle_payload(&mut self, n: usize) -> Result<(), Error> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let n = n as u64;
        match &mut self.input {
            Input::Payload { offset, left, .. } if n <= *left => {
                *left -= n;
                *offset += n;
                if *left == 0 {
                    self.input = Input::Request;
                }
                Ok(())
            }
            Input::Discard { left, then } if n <= *left => {
                *left -= n;
                if *left == 0 {
                    self.deferred = Some(*then);
                    self.input = if self.state == State::Transmission {
                        Input::Request
                    } else {
                        Input::Option
                    };
                    self.queue_deferred();
                }
                Ok(())
            }
            _ => Err(Misuse::PayloadMismatch.into()),
        }
    }

    /// The client closed its side. Ending at a message boundary is clean: the session
    /// closes once the replies still owed are sent. Ending inside a message or a write
    /// payload is [`Error::UnexpectedEof`] (see [`Server::payload_in_progress`]).
    pub fn handle_eof(&mut self) -> Result<(), Error> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let mid_message =
            self.partial || matches!(self.input, Input::Payload { .. } | Input::Discard { .. });
        if mid_message {
            return Err(self.fail(Error::UnexpectedEof));
        }
        // Replies still owed can go out (the client may only have shut down its sending
        // side); the session closes once they have.
        self.state = if self.owed.is_empty() {
            State::Closed
        } else {
            State::Disconnecting
        };
        self.input = Input::Done;
        Ok(())
    }

    /// TLS is up on the transport after [`ServerEvent::StartTls`]: negotiation goes on,
    /// with everything negotiated before TLS forgotten.
    pub fn tls_established(&mut self) -> Result<(), Error> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.input != Input::AwaitTls {
            return Err(Misuse::WrongState.into());
        }
        self.tls_active = true;
        self.input = Input::Option;
        self.state = State::Negotiating;
        Ok(())
    }

    /// Starts a graceful shutdown: further options are refused with
    /// `NBD_REP_ERR_SHUTDOWN`, further requests with `NBD_ESHUTDOWN`. Keep replying to
    /// what is owed, then close.
    pub fn shutdown(&mut self) {
        self.shutting_down = true;
    }

    /// Queues the refusal due after a discard, if there is room (else it waits for the
    /// next `poll_transmit`).
    fn queue_deferred(&mut self) {
        let queued = match self.deferred {
            None => return,
            Some(Refusal::Request {
                cookie,
                command,
                offset,
                errno,
            }) => self.refuse_now(cookie, command, offset, errno),
            Some(Refusal::OptionTooBig { code, len }) => {
                let limit = self.config.max_option_len;
                self.opt_error(
                    code,
                    OptError::TooBig,
                    format_args!("{len} bytes of option data exceed the limit of {limit}"),
                )
            }
        };
        if queued.is_ok() {
            self.deferred = None;
        }
    }

    fn fail(&mut self, e: Error) -> Error {
        if e.is_fatal() {
            self.error = Some(e);
            self.state = State::Dead;
            self.out.clear();
        }
        e
    }

    fn queue(&mut self, max: usize, f: impl FnOnce(&mut [u8]) -> wire::Result<usize>) {
        // invariant: only used for the fixed-size greeting and hello on an empty buffer of
        // at least 152 bytes (a smaller B is a configuration this crate does not support).
        let _ = self.out.push_with(max, f);
    }

    /// Notes that `input` holds only the start of a message of `need` bytes.
    fn incomplete<E>(&mut self, input: &[u8], need: usize) -> Handled<E> {
        self.partial = !input.is_empty();
        self.need = need;
        Handled::none()
    }

    fn read_client_flags<'i>(
        &mut self,
        input: &'i [u8],
    ) -> Result<Handled<ServerEvent<'i>>, Error> {
        let flags = match ClientFlags::parse(input) {
            Ok(f) => f,
            Err(wire::Error::Truncated { needed }) => {
                return Ok(self.incomplete(input, input.len() + needed))
            }
            Err(e) => return Err(Error::Malformed(e)),
        };
        // proto.md: a server MUST close the connection on unknown flags or flags whose
        // handshake flag it did not offer.
        let known = ClientFlags::FIXED_NEWSTYLE
            | if self.offered.contains(HandshakeFlags::NO_ZEROES) {
                ClientFlags::NO_ZEROES
            } else {
                ClientFlags::empty()
            };
        if !known.contains(flags) {
            return Err(Misbehavior::BadClientFlags(flags.bits()).into());
        }
        self.client_flags = flags;
        self.state = State::Negotiating;
        self.input = Input::Option;
        Ok(Handled::new(ClientFlags::LEN, None))
    }

    fn request_len(&self) -> usize {
        if self.extended {
            Request::EXTENDED_LEN
        } else {
            Request::COMPACT_LEN
        }
    }

    /// Room for the largest reply the machine may queue on its own for one request.
    fn has_reply_room(&self) -> bool {
        self.out.free() >= ChunkHeader::EXTENDED_LEN + 6 + ERR_MSG_MAX
            && self.out.free_segments() >= 4
    }
}

/// Longest message the machine itself puts into an error reply.
const ERR_MSG_MAX: usize = 120;

fn clamp(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// FNV-1a of an export name: enough to tell whether `NBD_OPT_GO` names the export that
/// `NBD_OPT_SET_META_CONTEXT` named, without storing 4096 bytes.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A `fmt::Write` into a fixed slice that stops (without error) when full.
struct SliceWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl fmt::Write for SliceWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - self.len;
        // Cut at a character boundary so the message stays valid UTF-8.
        let mut n = s.len().min(room);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Formats a short message into `buf`, returning it.
fn format_msg<'a>(buf: &'a mut [u8; ERR_MSG_MAX], args: fmt::Arguments<'_>) -> &'a str {
    let mut w = SliceWriter {
        buf: &mut buf[..],
        len: 0,
    };
    let _ = w.write_fmt(args);
    let len = w.len;
    // invariant: SliceWriter only copies whole characters of valid `str`s.
    core::str::from_utf8(&buf[..len]).unwrap_or("")
}

mod negotiate;
mod transmission;

#[cfg(test)]
mod tests;
