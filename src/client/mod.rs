//! The client state machine: handshake, option negotiation and transmission, without I/O.
//!
//! [`Client`] follows quinn-proto's method taxonomy:
//!
//! * **(A) getters** on `&self`: [`state`](Client::state), [`size`](Client::size),
//!   [`transmission_flags`](Client::transmission_flags), [`block_size`](Client::block_size),
//!   [`contexts`](Client::contexts), [`in_flight`](Client::in_flight), ...
//! * **(B) peer input**: [`handle_input`](Client::handle_input),
//!   [`handle_payload`](Client::handle_payload), [`handle_eof`](Client::handle_eof),
//!   [`tls_established`](Client::tls_established).
//! * **(C) commands** from the application: [`read`](Client::read),
//!   [`write`](Client::write), [`flush`](Client::flush), ..., and in manual mode the
//!   `opt_*` options.
//! * **(D) output**: [`poll_transmit`](Client::poll_transmit), [`wants`](Client::wants),
//!   [`poll_event`](Client::poll_event).
//!
//! # The drive loop
//!
//! 1. After every (B) or (C) call, call [`poll_transmit`](Client::poll_transmit) until it
//!    returns `Ok(None)`, sending each [`Transmit::Bytes`] from your output buffer and, for
//!    each [`Transmit::Payload`], that many bytes of *your* write buffer.
//! 2. Then act on [`wants`](Client::wants):
//!    * [`Want::Bytes(n)`](Want::Bytes): have at least `n` bytes buffered from the first
//!      unconsumed one, and call [`handle_input`](Client::handle_input) with all buffered
//!      bytes. `n` never reaches past the next frame, so a driver that reads exactly `n`
//!      never pulls payload into its header buffer. `n` may grow once the machine has seen
//!      a frame's header (and is 0 when an event is ready without new bytes).
//!    * [`Want::Payload`]: move up to `len` bytes from the transport straight into your
//!      read buffer at the given export offset, then call
//!      [`handle_payload`](Client::handle_payload) with the count (in as many pieces as
//!      you like).
//!    * [`Want::Nothing`]: no reply is owed. Issue a command, or wait.
//! 3. [`handle_input`](Client::handle_input) consumes at most one frame and returns at most
//!    one event, which may borrow the input: handle the event, then drop `consumed` bytes.
//!    Keep calling it until it returns `consumed == 0` and no event.
//! 4. When the transport reports end of file, call [`handle_eof`](Client::handle_eof)
//!    (after handing every buffered byte to `handle_input`).
//! 5. After end of file or a fatal error, call [`poll_event`](Client::poll_event) until
//!    `None`: every command still in flight comes back once as [`Event::Abandoned`].
//!
//! Payload bytes never pass through the machine: it only counts them.
//!
//! # Example
//!
//! Reading the first 4 KiB of an export over TCP (see [`crate::blocking`] for a complete
//! driver):
//!
//! ```no_run
//! use std::io::{Read, Write};
//! use nbd_proto::client::{Client, ClientConfig, Event};
//! use nbd_proto::wire::CmdFlags;
//! use nbd_proto::{Transmit, Want};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut sock = std::net::TcpStream::connect("127.0.0.1:10809")?;
//! let mut client: Client = Client::new(&ClientConfig::new("disk"))?;
//! let mut out = vec![0u8; nbd_proto::client::MAX_OPTION_LEN];
//! let (mut input, mut data) = (Vec::new(), vec![0u8; 4096]);
//! let mut pending = None;
//! loop {
//!     // 1. Send what the machine queued.
//!     while let Some(t) = client.poll_transmit(&mut out)? {
//!         if let Transmit::Bytes(n) = t {
//!             sock.write_all(&out[..n])?;
//!         }
//!     }
//!     // 2. Do what it wants: read data goes straight into `data`.
//!     match client.wants() {
//!         Want::Payload { offset, len, .. } => {
//!             let at = offset as usize;
//!             let n = sock.read(&mut data[at..at + len])?;
//!             if n == 0 {
//!                 client.handle_eof()?;
//!             }
//!             client.handle_payload(n)?;
//!             continue;
//!         }
//!         Want::Bytes(n) if input.len() < n => {
//!             let have = input.len();
//!             input.resize(n, 0);
//!             let got = sock.read(&mut input[have..])?;
//!             input.truncate(have + got);
//!             if got == 0 {
//!                 client.handle_eof()?;
//!                 break;
//!             }
//!         }
//!         _ => {}
//!     }
//!     // 3. Hand over the bytes: at most one frame and one event per call.
//!     let handled = client.handle_input(&input)?;
//!     match handled.event {
//!         Some(Event::Ready { .. }) => pending = Some(client.read(0, 4096, CmdFlags::empty())?),
//!         Some(Event::Done { cookie, result }) if Some(cookie) == pending => {
//!             result.map_err(std::io::Error::from)?;
//!             break;
//!         }
//!         _ => {}
//!     }
//!     input.drain(..handled.consumed);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Negotiation
//!
//! In automatic mode (the default) the client runs, in order: `NBD_OPT_STARTTLS` (unless
//! [`TlsPolicy::Off`]), `NBD_OPT_EXTENDED_HEADERS` (falling back to
//! `NBD_OPT_STRUCTURED_REPLY` when refused), `NBD_OPT_SET_META_CONTEXT` (when contexts are
//! configured and structured replies are on), then `NBD_OPT_GO` (falling back to
//! `NBD_OPT_EXPORT_NAME` for servers that do not know it, and retrying with
//! `NBD_INFO_BLOCK_SIZE` on `NBD_REP_ERR_BLOCK_SIZE_REQD`). Every reply still surfaces as
//! an event. When the session cannot go on (the export is refused, TLS is required by one
//! side and refused by the other, the server shuts down), the refusal still comes as an
//! [`Event::OptionDone`] carrying the server's message, an `NBD_OPT_ABORT` is queued, and
//! the next call returns the error ([`State::Dead`]).
//!
//! In manual mode ([`ClientConfig::manual`]) the application sends each option
//! itself (`opt_*`), one at a time, and sees each reply as events ending with
//! [`Event::OptionDone`] (or [`Event::StartTls`], [`Event::Ready`]). The TLS policy is
//! then the application's business too.
//!
//! TLS: on [`Event::StartTls`] wrap the transport in a TLS client session, then call
//! [`Client::tls_established`]. Bytes that arrive before that are refused
//! ([`Misbehavior::DataAfterStartTls`](crate::Misbehavior::DataAfterStartTls)).
//!
//! # Limits
//!
//! Everything is fixed-size: at most `N` commands in flight, [`MAX_CONTEXTS`] negotiated
//! metadata contexts, [`MAX_QUERIES`] queries, [`STRING_STORE_LEN`] bytes of export name
//! and queries, and no frame larger than [`MAX_FRAME_LEN`] is ever buffered whole
//! (block-status chunks are streamed in batches of descriptors).

#[cfg(feature = "adversarial")]
mod adversary;
mod inflight;
mod negotiate;
mod transmission;

#[cfg(test)]
mod tests;

use arrayvec::ArrayVec;

use crate::common::{Handled, TlsPolicy, Transmit, Want};
use crate::error::{Error, Misuse};
use crate::wire::{
    self, BlockSize, Cookie, Errno, Extents, HandshakeFlags, Info, OptCode, OptError,
    OptReplyHeader, TransmissionFlags, MAX_STRING_LEN,
};

#[cfg(feature = "adversarial")]
pub use self::adversary::{ClientAdversary, INJECT_CAPACITY};
use self::inflight::Table;
use self::negotiate::Nego;
use self::transmission::Rx;

/// Most metadata contexts a client keeps from `NBD_OPT_SET_META_CONTEXT`. A server that
/// selects more fails the handshake with
/// [`Misbehavior::TooManyContexts`](crate::Misbehavior::TooManyContexts).
pub const MAX_CONTEXTS: usize = 16;

/// Most metadata context queries a client sends in one option.
pub const MAX_QUERIES: usize = 16;

/// Bytes of storage for the export name and the metadata context queries together.
pub const STRING_STORE_LEN: usize = 8192;

/// The largest frame the client ever asks to have buffered whole: an `NBD_REP_SERVER`
/// option reply with a 4096-byte name and a 4096-byte description (20-byte header,
/// 4-byte name length). Every other frame is smaller: option replies are length-capped
/// per reply type before buffering, error chunks carry at most a 4096-byte message, only
/// the 8-byte offset of `NBD_REPLY_TYPE_OFFSET_DATA` is buffered, and block-status
/// descriptors come in batches of at most [`EXTENT_BATCH_LEN`] bytes.
pub const MAX_FRAME_LEN: usize = OptReplyHeader::LEN + 4 + 2 * MAX_STRING_LEN;

/// Bytes of block-status descriptors delivered per [`Event::BlockStatus`] (512 32-bit or
/// 256 64-bit descriptors); a chunk with more comes as several events.
pub const EXTENT_BATCH_LEN: usize = 4096;

/// The longest option request this client sends: an `NBD_OPT_SET_META_CONTEXT` with a
/// full string store and [`MAX_QUERIES`] queries. A buffer this big always satisfies
/// [`Client::poll_transmit`] during negotiation.
pub const MAX_OPTION_LEN: usize = wire::OptHeader::LEN + 4 + 4 + 4 * MAX_QUERIES + STRING_STORE_LEN;

/// The longest request this client sends in transmission: an extended
/// `NBD_CMD_BLOCK_STATUS` with its payload naming [`MAX_CONTEXTS`] contexts. A buffer
/// this big always satisfies [`Client::poll_transmit`] in transmission.
pub const MAX_REQUEST_LEN: usize = wire::Request::EXTENDED_LEN + 8 + 4 * MAX_CONTEXTS;

// Lengths from the wire (up to 32 bits for data) are held in `usize`.
const _: () = assert!(
    usize::BITS >= 32,
    "the client needs a usize of at least 32 bits"
);

/// What the client is configured to do. Copied into the [`Client`] by [`Client::new`].
///
/// Start from [`ClientConfig::new`] (or `default()`) and set the fields you need:
///
/// ```
/// use nbd_proto::client::{Client, ClientConfig};
/// use nbd_proto::TlsPolicy;
///
/// let mut config = ClientConfig::new("disk");
/// config.meta_contexts = &["base:allocation"]; // for block status
/// config.tls = TlsPolicy::Optional; // use TLS if the server offers it
/// let client: Client<16> = Client::new(&config)?; // at most 16 commands in flight
/// assert_eq!(client.export_name(), "disk");
/// # Ok::<(), nbd_proto::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientConfig<'a> {
    /// Export to open; "" is the server's default export.
    pub export: &'a str,
    /// Metadata contexts to select with `NBD_OPT_SET_META_CONTEXT`, e.g.
    /// `["base:allocation"]`. Empty: no block status.
    pub meta_contexts: &'a [&'a str],
    /// TLS policy (automatic mode; in manual mode the application decides).
    pub tls: TlsPolicy,
    /// Negotiate structured replies (default true).
    pub structured_replies: bool,
    /// Negotiate extended headers (default true); structured replies are tried when the
    /// server refuses them.
    pub extended_headers: bool,
    /// Ask for `NBD_INFO_BLOCK_SIZE` in `NBD_OPT_GO`/`NBD_OPT_INFO` (default true), and
    /// obey what the server says.
    pub request_block_size: bool,
    /// Ask for `NBD_INFO_NAME` and `NBD_INFO_DESCRIPTION` (default true).
    pub request_name_and_description: bool,
    /// Step-by-step option mode (libnbd's "opt mode"): the application sends each option
    /// with the `opt_*` methods.
    pub manual: bool,
}

impl Default for ClientConfig<'_> {
    fn default() -> Self {
        Self {
            export: "",
            meta_contexts: &[],
            tls: TlsPolicy::Off,
            structured_replies: true,
            extended_headers: true,
            request_block_size: true,
            request_name_and_description: true,
            manual: false,
        }
    }
}

impl<'a> ClientConfig<'a> {
    /// The default configuration for `export`.
    pub fn new(export: &'a str) -> Self {
        Self {
            export,
            ..Self::default()
        }
    }
}

/// Where the client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum State {
    /// Waiting for the server's greeting (oldstyle hello or newstyle greeting).
    Greeting,
    /// Option haggling: an option is queued or awaiting its reply, or (manual mode) the
    /// application's next option.
    Negotiating,
    /// The server accepted `NBD_OPT_STARTTLS`: waiting for the caller to wrap its
    /// transport in TLS and call [`Client::tls_established`].
    StartTls,
    /// Transmission: commands can be issued.
    Ready,
    /// The session ended cleanly.
    Closed,
    /// A fatal error happened; every input and command call returns it again.
    /// [`Client::poll_transmit`] still yields a polite goodbye if one was queued, and
    /// [`Client::poll_event`] the commands abandoned.
    Dead,
}

/// An option the server refused: its `NBD_REP_ERR_*` and message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptRefusal<'i> {
    /// The error reply type.
    pub error: OptError,
    /// The server's human-readable message ("" if none).
    pub message: &'i str,
}

/// Something that happened, for the application to act on. May borrow the input given to
/// [`Client::handle_input`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event<'i> {
    /// The server's first message (informational). `flags` are the handshake flags it
    /// offered (empty for oldstyle).
    Greeting {
        /// True for an oldstyle server (no options; transmission follows at once).
        oldstyle: bool,
        /// Handshake flags offered.
        flags: HandshakeFlags,
    },
    /// The server accepted `NBD_OPT_STARTTLS`: wrap the transport in TLS (client side),
    /// then call [`Client::tls_established`].
    StartTls,
    /// One export of an `NBD_OPT_LIST` answer (`NBD_REP_SERVER`).
    Export {
        /// Export name.
        name: &'i str,
        /// Description ("" if none).
        description: &'i str,
    },
    /// One information record of an `NBD_OPT_INFO`/`NBD_OPT_GO` answer (`NBD_REP_INFO`).
    /// Unknown information types come as [`Info::Unknown`]: ignore them.
    Info(Info<'i>),
    /// One metadata context of an `NBD_OPT_LIST_META_CONTEXT` or
    /// `NBD_OPT_SET_META_CONTEXT` answer. For LIST the ID is meaningless.
    MetaContext {
        /// Context ID (SET only).
        id: u32,
        /// Context name, `namespace:leaf`.
        name: &'i str,
    },
    /// The final reply to an option: `Ok` for `NBD_REP_ACK`, or the refusal. Success of
    /// `NBD_OPT_STARTTLS` and `NBD_OPT_GO` comes as [`Event::StartTls`] and
    /// [`Event::Ready`] instead. In manual mode, a refusal with `NBD_REP_ERR_SHUTDOWN`
    /// obliges the client to leave ([`Client::opt_abort`]); automatic mode does so itself.
    OptionDone {
        /// The option answered.
        opt: OptCode,
        /// Its outcome.
        result: Result<(), OptRefusal<'i>>,
    },
    /// Transmission started: commands can be issued.
    Ready {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags of the export.
        flags: TransmissionFlags,
    },
    /// Read data follows: [`Client::wants`] now returns [`Want::Payload`]; move `len` bytes
    /// into your buffer at export offset `offset`.
    ReadData {
        /// The read.
        cookie: Cookie,
        /// Export offset of the first byte.
        offset: u64,
        /// Number of bytes.
        len: usize,
    },
    /// This range of the read reads as zeroes: zero it in your buffer.
    ReadHole {
        /// The read.
        cookie: Cookie,
        /// Export offset of the hole.
        offset: u64,
        /// Hole length.
        len: u32,
    },
    /// Block-status descriptors for one context. One chunk may come as several events
    /// (batches of at most [`EXTENT_BATCH_LEN`] bytes), so memory stays bounded.
    ///
    /// `offset` is an addition to the issue's sketch: the export offset of the first
    /// descriptor of this batch (descriptors are consecutive from the request offset), so
    /// a batch can be used without remembering the previous ones.
    BlockStatus {
        /// The block-status command.
        cookie: Cookie,
        /// The metadata context described.
        context_id: u32,
        /// Export offset of the first descriptor in `extents`.
        offset: u64,
        /// The descriptors.
        extents: Extents<'i>,
    },
    /// An error chunk: the command fails (its [`Event::Done`] carries the first error).
    /// Unknown error chunk types (bit 15 set) come here too.
    ChunkError {
        /// The command.
        cookie: Cookie,
        /// The error, as sent (unknown values kept; see [`Errno::normalized`]).
        error: Errno,
        /// The server's message ("" if none).
        message: &'i str,
        /// For `NBD_REPLY_TYPE_ERROR_OFFSET`: where the error happened.
        offset: Option<u64>,
    },
    /// The command completed: `Ok`, or the first error the server reported. On
    /// [`Errno::Shutdown`] the spec requires the client to soft-disconnect: call
    /// [`Client::disconnect`] once the other replies are in.
    Done {
        /// The command.
        cookie: Cookie,
        /// Its outcome.
        result: Result<(), Errno>,
    },
    /// The command's reply will never come: the connection ended or broke. Only from
    /// [`Client::poll_event`].
    Abandoned {
        /// The command.
        cookie: Cookie,
    },
}

/// Bounded storage for the export name and the metadata context queries of the current
/// configuration or manual option.
#[derive(Debug, Clone)]
pub(crate) struct Strings {
    bytes: ArrayVec<u8, STRING_STORE_LEN>,
    /// Span 0 is the export name, the rest are queries.
    spans: ArrayVec<(u16, u16), { MAX_QUERIES + 1 }>,
}

impl Strings {
    fn new() -> Self {
        let mut spans = ArrayVec::new();
        spans.push((0, 0));
        Self {
            bytes: ArrayVec::new(),
            spans,
        }
    }

    /// Replaces the contents, checking the spec's string rules and the storage bounds.
    /// Nothing changes on error.
    pub(crate) fn set(&mut self, export: &str, queries: &[&str]) -> Result<(), Error> {
        wire::check_str(export, "export name").map_err(Misuse::Encode)?;
        for q in queries {
            wire::check_str(q, "meta context query").map_err(Misuse::Encode)?;
        }
        let total = export.len() + queries.iter().map(|q| q.len()).sum::<usize>();
        if total > STRING_STORE_LEN || queries.len() > MAX_QUERIES {
            // Report the size of the option the caller asked for.
            let data = 8 + export.len() + queries.iter().map(|q| 4 + q.len()).sum::<usize>();
            return Err(Misuse::OptionTooLarge(data).into());
        }
        self.bytes.clear();
        self.spans.clear();
        for s in core::iter::once(&export).chain(queries) {
            let start = self.bytes.len();
            // invariant: the total was checked against the capacity above.
            let _ = self.bytes.try_extend_from_slice(s.as_bytes());
            // invariant: offsets are <= STRING_STORE_LEN (8192), which fits u16, and there
            // are at most MAX_QUERIES + 1 spans.
            let _ = self.spans.try_push((start as u16, self.bytes.len() as u16));
        }
        Ok(())
    }

    fn get(&self, i: usize) -> &str {
        let Some(&(s, e)) = self.spans.get(i) else {
            return "";
        };
        // invariant: spans were made from `&str`s, so they are in range and valid UTF-8.
        self.bytes
            .get(usize::from(s)..usize::from(e))
            .and_then(|b| core::str::from_utf8(b).ok())
            .unwrap_or("")
    }

    pub(crate) fn export(&self) -> &str {
        self.get(0)
    }

    pub(crate) fn queries(&self) -> ArrayVec<&str, MAX_QUERIES> {
        (1..self.spans.len()).map(|i| self.get(i)).collect()
    }

    pub(crate) fn has_queries(&self) -> bool {
        self.spans.len() > 1
    }
}

/// Where the machine is, with the sticky error of a dead one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Greeting,
    Negotiating,
    StartTls,
    Ready,
    Closed,
    Dead(Error),
}

/// What the export looks like once chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ExportInfo {
    pub(crate) size: u64,
    pub(crate) flags: TransmissionFlags,
    pub(crate) block_size: Option<BlockSize>,
}

/// The NBD client state machine. `N` is the most commands in flight at once.
///
/// See the [module documentation](self) for the drive loop over a socket, and
/// [`crate::blocking::BlockingClient`], `examples/tokio-client.rs` and `ci/embedded-demo`
/// for whole drivers.
///
/// # Example
///
/// A client and a server machine joined in memory, with two `Vec`s for the transport: each
/// side sends what it queued, then hands over at most one message per call.
///
/// ```
/// use nbd_proto::client::{Client, ClientConfig, Event};
/// use nbd_proto::server::{ExportInfo, Server, ServerConfig, ServerEvent};
/// use nbd_proto::wire::TransmissionFlags;
/// use nbd_proto::{Transmit, Want};
///
/// let mut client: Client = Client::new(&ClientConfig::new(""))?;
/// let mut server: Server = Server::new(ServerConfig::default());
/// let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
/// let mut out = vec![0u8; nbd_proto::client::MAX_OPTION_LEN];
/// let mut size = None;
/// for _ in 0..100 {
///     // Run-loop step 1: send what each side queued.
///     while let Some(Transmit::Bytes(n)) = client.poll_transmit(&mut out)? {
///         to_server.extend_from_slice(&out[..n]);
///     }
///     while let Some(Transmit::Bytes(n)) = server.poll_transmit(&mut out)? {
///         to_client.extend_from_slice(&out[..n]);
///     }
///     // Steps 2 and 3: feed what each side wants, handle the event, drop what was consumed.
///     if matches!(server.wants(), Want::Bytes(n) if to_server.len() >= n) {
///         let handled = server.handle_input(&to_server)?;
///         if let Some(ServerEvent::Export(_)) = handled.event {
///             let info = ExportInfo::new(1 << 20, TransmissionFlags::SEND_FLUSH);
///             server.answer_export(&info)?;
///         }
///         to_server.drain(..handled.consumed);
///     }
///     if matches!(client.wants(), Want::Bytes(n) if to_client.len() >= n) {
///         let handled = client.handle_input(&to_client)?;
///         if let Some(Event::Ready { size: s, .. }) = handled.event {
///             size = Some(s);
///             break;
///         }
///         to_client.drain(..handled.consumed);
///     }
/// }
/// assert_eq!(size, Some(1 << 20));
/// assert!(client.extended_headers()); // both sides support the extension
/// # Ok::<(), nbd_proto::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Client<const N: usize = 64> {
    phase: Phase,
    config: Settings,
    strings: Strings,
    nego: Nego,
    /// The chosen export, once in transmission.
    export: Option<ExportInfo>,
    /// Structured replies negotiated (also implied by extended headers).
    sr: bool,
    /// Extended headers negotiated.
    eh: bool,
    /// TLS was started on this connection.
    tls_active: bool,
    /// Negotiated metadata context IDs.
    contexts: ArrayVec<u32, MAX_CONTEXTS>,
    table: Table<N>,
    rx: Rx,
    /// `NBD_CMD_DISC`: requested (to go out after the queued commands) and sent.
    disc_queued: bool,
    disc_sent: bool,
    /// Length of the next frame once its header was seen (see [`Want::Bytes`]).
    peek: Option<usize>,
    /// The last `handle_input` left an incomplete frame behind.
    partial: bool,
    /// An event owed without new input (at most one: it is taken before anything else).
    deferred: Option<Event<'static>>,
    /// Adversarial mode: injected output and relaxed checks.
    #[cfg(feature = "adversarial")]
    adv: adversary::Adversary,
}

/// The configuration flags kept after `new` (the strings live in [`Strings`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settings {
    pub(crate) tls: TlsPolicy,
    pub(crate) structured_replies: bool,
    pub(crate) extended_headers: bool,
    pub(crate) request_block_size: bool,
    pub(crate) request_name_and_description: bool,
    pub(crate) manual: bool,
}

impl<const N: usize> Client<N> {
    /// A client for `config`, waiting for the server's greeting. The export name and
    /// queries are checked (string rules; at most [`MAX_QUERIES`] queries and
    /// [`STRING_STORE_LEN`] bytes, else [`Misuse::OptionTooLarge`]) and copied.
    pub fn new(config: &ClientConfig<'_>) -> Result<Self, Error> {
        let mut strings = Strings::new();
        strings.set(config.export, config.meta_contexts)?;
        Ok(Self {
            phase: Phase::Greeting,
            config: Settings {
                tls: config.tls,
                structured_replies: config.structured_replies,
                extended_headers: config.extended_headers,
                request_block_size: config.request_block_size,
                request_name_and_description: config.request_name_and_description,
                manual: config.manual,
            },
            strings,
            nego: Nego::new(config.request_block_size),
            export: None,
            sr: false,
            eh: false,
            tls_active: false,
            contexts: ArrayVec::new(),
            table: Table::new(),
            rx: Rx::Header,
            disc_queued: false,
            disc_sent: false,
            peek: None,
            partial: false,
            deferred: None,
            #[cfg(feature = "adversarial")]
            adv: adversary::Adversary::default(),
        })
    }

    // ---- (A) getters ----

    /// Where the client is.
    pub fn state(&self) -> State {
        match self.phase {
            Phase::Greeting => State::Greeting,
            Phase::Negotiating => State::Negotiating,
            Phase::StartTls => State::StartTls,
            Phase::Ready => State::Ready,
            Phase::Closed => State::Closed,
            Phase::Dead(_) => State::Dead,
        }
    }

    /// The fatal error, if the client is dead.
    pub fn error(&self) -> Option<Error> {
        match self.phase {
            Phase::Dead(e) => Some(e),
            _ => None,
        }
    }

    /// Export size in bytes, once in transmission.
    pub fn size(&self) -> Option<u64> {
        self.export.map(|e| e.size)
    }

    /// Transmission flags of the export, once in transmission.
    pub fn transmission_flags(&self) -> Option<TransmissionFlags> {
        self.export.map(|e| e.flags)
    }

    /// The block-size constraints to obey: the advertised ones, or [`BlockSize::DEFAULT`].
    pub fn block_size(&self) -> BlockSize {
        self.advertised_block_size().unwrap_or(BlockSize::DEFAULT)
    }

    /// The block-size constraints the server advertised in `NBD_OPT_GO`, if any.
    pub fn advertised_block_size(&self) -> Option<BlockSize> {
        self.export.and_then(|e| e.block_size)
    }

    /// True if structured replies are in use (negotiated, or implied by extended headers).
    pub fn structured_replies(&self) -> bool {
        self.sr
    }

    /// True if extended headers are in use.
    pub fn extended_headers(&self) -> bool {
        self.eh
    }

    /// True if TLS was started on this connection.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// The handshake flags the server offered (empty before the greeting and for oldstyle).
    pub fn handshake_flags(&self) -> HandshakeFlags {
        self.nego.offered
    }

    /// The negotiated metadata context IDs, in the order the server gave them.
    pub fn contexts(&self) -> &[u32] {
        &self.contexts
    }

    /// The export name of the configuration or of the last manual option that named one
    /// (the name sent in `NBD_OPT_GO`/`NBD_OPT_EXPORT_NAME`).
    pub fn export_name(&self) -> &str {
        self.strings.export()
    }

    /// The cookies of the commands in flight (queued or awaiting their reply), oldest first.
    pub fn in_flight(&self) -> impl Iterator<Item = Cookie> + '_ {
        self.table.iter().map(|e| e.cookie)
    }

    /// Number of commands in flight.
    pub fn in_flight_len(&self) -> usize {
        self.table.len()
    }

    /// The largest read or write payload allowed: the advertised maximum, else 32 MiB.
    pub fn max_payload(&self) -> u32 {
        match self.advertised_block_size() {
            Some(b) => b.max_payload,
            None => wire::DEFAULT_MAX_PAYLOAD,
        }
    }

    // ---- (B) peer input ----

    /// Feeds bytes from the server. Consumes at most one frame and returns at most one
    /// event, which may borrow `input`. An incomplete frame gives `consumed == 0` and no
    /// event; [`wants`](Self::wants) then says how many bytes to have.
    ///
    /// A fatal error moves the client to [`State::Dead`]; drain
    /// [`poll_transmit`](Self::poll_transmit) (a polite goodbye may be queued) and
    /// [`poll_event`](Self::poll_event).
    pub fn handle_input<'i>(&mut self, input: &'i [u8]) -> Result<Handled<Event<'i>>, Error> {
        if self.phase == Phase::Closed && input.is_empty() {
            // A drive loop asking once more after the last event.
            return Ok(Handled::none());
        }
        self.check_open()?;
        if matches!(self.rx, Rx::Payload { .. }) {
            return Err(Misuse::PayloadPending.into());
        }
        if let Some(event) = self.deferred.take() {
            return Ok(Handled::new(0, Some(event)));
        }
        let result = match self.phase {
            Phase::Greeting => self.on_greeting(input),
            Phase::Negotiating => self.on_option_reply(input),
            Phase::StartTls if input.is_empty() => Ok(Handled::none()),
            Phase::StartTls => Err(crate::Misbehavior::DataAfterStartTls.into()),
            Phase::Ready => self.on_reply(input),
            // invariant: check_open() returned for the other phases.
            Phase::Closed | Phase::Dead(_) => Ok(Handled::none()),
        };
        match result {
            Ok(h) => {
                if h.consumed > 0 || h.event.is_some() {
                    self.peek = None;
                }
                self.partial = h.consumed == 0 && h.event.is_none() && !input.is_empty();
                Ok(h)
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Reports that `n` bytes of the wanted read payload ([`Want::Payload`]) were moved
    /// into the caller's buffer. May be called in pieces.
    pub fn handle_payload(&mut self, n: usize) -> Result<(), Error> {
        self.check_open()?;
        match self.on_payload(n) {
            Ok(()) => Ok(()),
            Err(e) if e.is_fatal() => Err(self.fail(e)),
            Err(e) => Err(e),
        }
    }

    /// Reports end of file from the server. `Ok` (and [`State::Closed`]) at a clean point:
    /// after `NBD_OPT_ABORT` or `NBD_CMD_DISC` with nothing owed, or in transmission with
    /// no command in flight. Otherwise a fatal error; commands in flight are then
    /// abandoned (see [`poll_event`](Self::poll_event)).
    pub fn handle_eof(&mut self) -> Result<(), Error> {
        match self.phase {
            Phase::Closed => return Ok(()),
            Phase::Dead(e) => return Err(e),
            _ => {}
        }
        let clean = !self.partial
            && match self.phase {
                Phase::Negotiating => self.nego.abort_sent(),
                Phase::Ready => matches!(self.rx, Rx::Header) && self.table.len() == 0,
                _ => false,
            };
        if clean {
            self.phase = Phase::Closed;
            return Ok(());
        }
        let error = match self.phase {
            Phase::Negotiating if !self.partial => self.nego.eof_error(),
            _ => Error::UnexpectedEof,
        };
        Err(self.fail(error))
    }

    /// Reports that the caller wrapped its transport in TLS after [`Event::StartTls`].
    /// Everything negotiated before is forgotten (proto.md: STARTTLS resets structured
    /// replies, extended headers and metadata contexts); automatic mode carries on.
    pub fn tls_established(&mut self) -> Result<(), Error> {
        self.check_open()?;
        if self.phase != Phase::StartTls {
            return Err(Misuse::WrongState.into());
        }
        self.tls_active = true;
        self.sr = false;
        self.eh = false;
        self.contexts.clear();
        self.phase = Phase::Negotiating;
        self.after_tls();
        Ok(())
    }

    // ---- (C) commands: see transmission.rs; options: see negotiate.rs ----

    /// Ends the session politely: `NBD_CMD_DISC` in transmission (after the queued
    /// commands; replies to commands in flight still arrive), `NBD_OPT_ABORT` during
    /// negotiation (sent once the pending option, if any, has its final reply).
    pub fn disconnect(&mut self) -> Result<(), Error> {
        self.check_open()?;
        match self.phase {
            Phase::Ready => {
                if self.disc_queued {
                    return Err(Misuse::WrongState.into());
                }
                self.disc_queued = true;
                Ok(())
            }
            Phase::Greeting | Phase::Negotiating | Phase::StartTls => self.request_abort(),
            // invariant: check_open() returned for the other phases.
            Phase::Closed | Phase::Dead(_) => Err(Error::Closed),
        }
    }

    // ---- (D) output ----

    /// Writes the next output into `out`: [`Transmit::Bytes`] (as many whole messages as
    /// fit; never part of one), or [`Transmit::Payload`]: send that many bytes of your
    /// write buffer now. `Ok(None)`: nothing to send. A buffer too small for the next
    /// message gives [`Error::BufferTooSmall`] and changes nothing; [`MAX_REQUEST_LEN`]
    /// bytes always suffice in transmission, [`MAX_OPTION_LEN`] in negotiation.
    pub fn poll_transmit(&mut self, out: &mut [u8]) -> Result<Option<Transmit>, Error> {
        // Adversarial mode: injected bytes that are due go before the next own message.
        #[cfg(feature = "adversarial")]
        if let Some(t) = self.poll_injected(out)? {
            return Ok(Some(t));
        }
        match self.phase {
            Phase::Greeting | Phase::StartTls => Ok(None),
            Phase::Negotiating | Phase::Dead(_) => self.transmit_negotiation(out),
            Phase::Ready => self.transmit_commands(out),
            Phase::Closed => Ok(None),
        }
    }

    /// What the machine needs next from the transport (see the module docs).
    pub fn wants(&self) -> Want {
        if self.deferred.is_some() {
            return Want::Bytes(0);
        }
        match self.phase {
            Phase::Greeting => Want::Bytes(self.peek.unwrap_or(wire::Greeting::LEN)),
            Phase::Negotiating => match self.nego.reply_len() {
                Some(n) => Want::Bytes(self.peek.unwrap_or(n)),
                None => Want::Nothing,
            },
            Phase::Ready => self.rx_wants(),
            Phase::StartTls | Phase::Closed | Phase::Dead(_) => Want::Nothing,
        }
    }

    /// Events that arrive without input: after end of file or a fatal error, an event
    /// still owed (a completion) and then [`Event::Abandoned`] once for every command
    /// still in flight, oldest first. `None` while the connection is alive.
    pub fn poll_event(&mut self) -> Option<Event<'static>> {
        if !matches!(self.phase, Phase::Closed | Phase::Dead(_)) {
            return None;
        }
        if let Some(event) = self.deferred.take() {
            return Some(event);
        }
        self.table
            .pop_front()
            .map(|e| Event::Abandoned { cookie: e.cookie })
    }

    // ---- internals shared by the phases ----

    /// `Ok` while the session is open; the sticky error or `Closed` otherwise.
    fn check_open(&self) -> Result<(), Error> {
        match self.phase {
            Phase::Dead(e) => Err(e),
            Phase::Closed => Err(Error::Closed),
            _ => Ok(()),
        }
    }

    /// Records a fatal error (non-fatal ones pass through) and returns it.
    fn fail(&mut self, e: Error) -> Error {
        if e.is_fatal() {
            self.phase = Phase::Dead(e);
            self.rx = Rx::Header;
            self.peek = None;
        }
        e
    }
}
