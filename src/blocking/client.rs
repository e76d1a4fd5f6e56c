//! A blocking NBD client over any `Read + Write` transport: a thin loop around
//! [`crate::client::Client`].
//!
//! Read and write data go straight between the socket and the caller's buffers: the
//! machine only counts them, headers are read exactly (never a payload byte into the header
//! buffer), and a write's header and payload leave in one vectored write.
//!
//! Two ways to use it:
//!
//! * synchronous calls: [`read_at`](BlockingClient::read_at),
//!   [`write_at`](BlockingClient::write_at), [`flush`](BlockingClient::flush),
//!   [`trim`](BlockingClient::trim), [`write_zeroes`](BlockingClient::write_zeroes),
//!   [`block_status`](BlockingClient::block_status) (large requests are split and kept in
//!   flight together);
//! * many requests in flight: `submit_*` calls return a [`Cookie`], and
//!   [`complete`](BlockingClient::complete) waits for the next completion, moving read data
//!   into the buffers a [`Sink`] hands out.
//!
//! NBD errors become [`io::Error`]s whose kind follows the errno and whose text carries the
//! server's message; [`errno_of`] recovers the [`Errno`] (and [`Errno::to_host`] the host
//! errno number). `raw_os_error()` is `None` on them: an `io::Error` cannot hold both an OS
//! error number and a message, and the message is worth more.
//!
//! # TLS
//!
//! The library does no TLS itself: implement [`TlsConnector`] (the `nbd-client` example
//! does it with rustls) and connect with [`connect_tls`](BlockingClient::connect_tls), or
//! bring your own transport to [`new_tls`](BlockingClient::new_tls). Such a client runs
//! over a boxed [`Stream`]. When the server accepts `NBD_OPT_STARTTLS`, the driver hands
//! the plain stream and the server name to the connector, goes on over the encrypted
//! stream it returns, and tells the machine ([`Client::tls_established`]); the
//! negotiation then starts again under TLS, as the protocol requires.
//!
//! With [`connect_tls`](BlockingClient::connect_tls) the URI decides the policy:
//!
//! | URI | connector | [`TlsPolicy`] |
//! |---|---|---|
//! | `nbds://`, `nbds+unix://` | given | `Required`: TLS or an error, never plaintext |
//! | `nbds://`, `nbds+unix://` | none | refused before connecting |
//! | `nbd://`, `nbd+unix://` | given | `Optional`: TLS if the server accepts `STARTTLS`, else plaintext (the URI spec's "opportunistically TLS encrypted"; libnbd instead never tries TLS on `nbd:` URIs) |
//! | `nbd://`, `nbd+unix://` | none | `Off`: a server that requires TLS ends the session with "the server requires TLS" |
//!
//! The server name handed to the connector is the URI's `tls-hostname=`, else its TCP
//! host, else `None` (a Unix socket). The other TLS parameters of the URI
//! ([`NbdUri::tls_certificates`], [`NbdUri::tls_verify_peer`], [`NbdUri::tls_type`]) are
//! for whoever builds the connector: the driver does not read them.
//!
//! In manual mode ([`ClientConfig::manual`]) a client with a connector still runs
//! `NBD_OPT_STARTTLS` by itself, as its policy says, before [`new_tls`](BlockingClient::new_tls)
//! returns (libnbd's opt mode does the same), so the options the application sends are
//! already encrypted. With [`TlsPolicy::Off`] the application may send `opt_starttls`
//! itself through [`opt`](BlockingClient::opt); the connector is used all the same.
//!
//! A TLS peer that closes without `close_notify` (the stream's read fails with
//! [`io::ErrorKind::UnexpectedEof`]) counts as an ordinary end of file: NBD's own framing
//! tells a clean close from a truncated reply.

use std::borrow::ToOwned;
use std::boxed::Box;
use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
#[cfg(unix)]
use std::os::unix::net::UnixStream;
use std::prelude::v1::*;
use std::sync::Arc;
use std::vec;

pub use super::Stream;
use crate::client::{Client, ClientConfig, Event, State, MAX_OPTION_LEN};
use crate::common::{TlsPolicy, Transmit, Want};
use crate::error::Error;
use crate::uri::{NbdUri, Transport};
use crate::wire::{BlockSize, CmdFlags, Cookie, Errno, Extent, Info, TransmissionFlags};

/// A TCP or Unix-domain socket.
#[derive(Debug)]
#[non_exhaustive]
pub enum Socket {
    /// TCP (with `TCP_NODELAY` set by [`BlockingClient::connect`]).
    Tcp(TcpStream),
    /// A Unix-domain socket.
    #[cfg(unix)]
    Unix(UnixStream),
}

impl Socket {
    /// Opens the transport a URI names (TLS aside).
    pub fn open(uri: &NbdUri) -> io::Result<Self> {
        match &uri.transport {
            Transport::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port))?;
                // proto.md: TCP users SHOULD set TCP_NODELAY.
                s.set_nodelay(true)?;
                Ok(Self::Tcp(s))
            }
            #[cfg(unix)]
            Transport::Unix { socket } => Ok(Self::Unix(UnixStream::connect(socket)?)),
            #[allow(unreachable_patterns)]
            _ => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "transport not supported on this platform",
            )),
        }
    }

    /// Shuts down both directions.
    pub fn shutdown(&self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            #[cfg(unix)]
            Self::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            #[cfg(unix)]
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            #[cfg(unix)]
            Self::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write_vectored(bufs),
            #[cfg(unix)]
            Self::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Starts TLS as a client, after the server accepted `NBD_OPT_STARTTLS`: the client side of
/// [`server::TlsAcceptor`](super::server::TlsAcceptor).
///
/// The library stays free of TLS dependencies; the `nbd-client` example implements this
/// with rustls.
pub trait TlsConnector: Send + Sync {
    /// Performs the TLS handshake over `stream` and returns the encrypted stream.
    ///
    /// `server_name` is the name to check the server's certificate against: the URI's
    /// `tls-hostname=`, else its TCP host; `None` for a Unix socket without
    /// `tls-hostname=`, where a connector that verifies names should fail. Any error ends
    /// the connection.
    fn connect(
        &self,
        stream: Box<dyn Stream>,
        server_name: Option<&str>,
    ) -> io::Result<Box<dyn Stream>>;
}

impl<T: TlsConnector + ?Sized> TlsConnector for Arc<T> {
    fn connect(
        &self,
        stream: Box<dyn Stream>,
        server_name: Option<&str>,
    ) -> io::Result<Box<dyn Stream>> {
        (**self).connect(stream, server_name)
    }
}

/// Turns the transport into TLS in place (the driver's view of a [`TlsConnector`]).
type Upgrade<S> = Box<dyn FnMut(&mut S) -> io::Result<()> + Send + Sync>;

/// What stands in for the transport while the connector has it, and after it failed.
struct Broken;

impl Read for Broken {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(Broken::error())
    }
}

impl Write for Broken {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(Broken::error())
    }
    fn flush(&mut self) -> io::Result<()> {
        Err(Broken::error())
    }
}

impl Broken {
    fn error() -> io::Error {
        io::Error::new(
            io::ErrorKind::NotConnected,
            "the connection was lost in the TLS handshake",
        )
    }
}

/// The upgrade for a boxed stream: hands it to `tls`, keeps what comes back.
fn upgrade_with(
    tls: Arc<dyn TlsConnector>,
    server_name: Option<String>,
) -> Upgrade<Box<dyn Stream>> {
    Box::new(move |stream: &mut Box<dyn Stream>| {
        let plain = std::mem::replace(stream, Box::new(Broken));
        *stream = tls.connect(plain, server_name.as_deref())?;
        Ok(())
    })
}

/// An NBD error for one command: the errno and the server's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    /// The error, as the server sent it.
    pub errno: Errno,
    /// The server's message from an error chunk ("" if none).
    pub message: String,
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.errno.description(), self.errno)?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for CommandError {}

impl From<CommandError> for io::Error {
    fn from(e: CommandError) -> Self {
        io::Error::new(e.errno.kind(), e)
    }
}

/// The NBD errno behind an [`io::Error`] from this module, if it came from the server.
pub fn errno_of(e: &io::Error) -> Option<Errno> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<CommandError>())
        .map(|c| c.errno)
}

/// A finished command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The command.
    pub cookie: Cookie,
    /// `Ok`, or the first error the server reported.
    pub result: Result<(), CommandError>,
}

/// Where read data and block-status extents go while [`BlockingClient::complete`] runs.
pub trait Sink {
    /// The destination for `len` bytes of read `cookie` at export offset `offset`: exactly
    /// `len` bytes long.
    fn read_buf(&mut self, cookie: Cookie, offset: u64, len: usize) -> &mut [u8];
    /// `len` bytes of read `cookie` at `offset` read as zeroes (default: zero them).
    fn hole(&mut self, cookie: Cookie, offset: u64, len: usize) {
        self.read_buf(cookie, offset, len).fill(0);
    }
    /// One block-status extent of `context_id` starting at export offset `offset`.
    fn extent(&mut self, cookie: Cookie, context_id: u32, offset: u64, extent: Extent) {
        let _ = (cookie, context_id, offset, extent);
    }
}

/// A [`Sink`] for commands that return no data (writes, flushes, ...).
#[derive(Debug, Default)]
pub struct NoSink;

impl Sink for NoSink {
    fn read_buf(&mut self, _: Cookie, _: u64, _: usize) -> &mut [u8] {
        &mut []
    }
}

/// A [`Sink`] for reads into one buffer that holds export offsets `base..`.
struct SliceSink<'a> {
    buf: &'a mut [u8],
    base: u64,
}

impl Sink for SliceSink<'_> {
    fn read_buf(&mut self, _: Cookie, offset: u64, len: usize) -> &mut [u8] {
        let start = (offset - self.base) as usize;
        self.buf.get_mut(start..start + len).unwrap_or(&mut [])
    }
}

/// A [`Sink`] that hands extents to a closure.
struct ExtentSink<F>(F);

impl<F: FnMut(u32, u64, Extent)> Sink for ExtentSink<F> {
    fn read_buf(&mut self, _: Cookie, _: u64, _: usize) -> &mut [u8] {
        &mut []
    }
    fn extent(&mut self, _: Cookie, context_id: u32, offset: u64, extent: Extent) {
        (self.0)(context_id, offset, extent)
    }
}

/// What the server said about an export, gathered from the handshake events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportDetails {
    /// The name used to open it, or listed by the server.
    pub name: String,
    /// `NBD_REP_SERVER` description or `NBD_INFO_DESCRIPTION`.
    pub description: Option<String>,
    /// Canonical name (`NBD_INFO_NAME`).
    pub canonical_name: Option<String>,
    /// Size, if known.
    pub size: Option<u64>,
    /// Transmission flags, if known.
    pub flags: Option<TransmissionFlags>,
    /// Advertised block-size constraints.
    pub block_size: Option<BlockSize>,
}

/// A blocking NBD client. `N` is the most commands in flight.
///
/// ```no_run
/// use nbd_proto::blocking::BlockingClient;
/// use nbd_proto::wire::CmdFlags;
///
/// let mut nbd = BlockingClient::connect("nbd://127.0.0.1:10809")?;
/// println!("{} bytes", nbd.size());
/// nbd.write_at(b"hello", 0, CmdFlags::empty())?;
/// let mut buf = [0u8; 5];
/// nbd.read_at(&mut buf, 0)?; // large reads are split and kept in flight together
/// assert_eq!(&buf, b"hello");
/// nbd.disconnect()?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct BlockingClient<S = Socket, const N: usize = 64> {
    client: Client<N>,
    stream: S,
    /// Bytes read from the transport and not consumed yet (never more than one frame).
    rbuf: Vec<u8>,
    /// Output being assembled.
    wbuf: Vec<u8>,
    /// Metadata contexts seen in `NBD_REP_META_CONTEXT` replies.
    meta: Vec<(u32, String)>,
    /// Exports seen in `NBD_REP_SERVER` replies.
    exports: Vec<ExportDetails>,
    /// What the last `NBD_OPT_INFO`/`NBD_OPT_GO` said.
    details: ExportDetails,
    /// The last option refusal, for error messages.
    refusal: Option<String>,
    /// Error messages from error chunks, per command in flight.
    messages: Vec<(Cookie, String)>,
    /// An option reached its end (manual mode).
    option_done: Option<Result<(), String>>,
    /// Commands abandoned when the connection ended or broke.
    abandoned: Vec<Cookie>,
    /// Turns the transport into TLS after `NBD_OPT_STARTTLS` (none: no TLS).
    upgrade: Option<Upgrade<S>>,
}

impl<S, const N: usize> fmt::Debug for BlockingClient<S, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockingClient")
            .field("state", &self.client.state())
            .field("tls", &self.client.tls_active())
            .field("in_flight", &self.client.in_flight_len())
            .finish_non_exhaustive()
    }
}

fn misuse(e: Error) -> io::Error {
    io::Error::from(e)
}

impl BlockingClient {
    /// Connects to an NBD URI (TCP with `TCP_NODELAY`, or a Unix socket) and negotiates
    /// with the default configuration, in plaintext. (For another in-flight bound `N`,
    /// open a [`Socket`] and use [`BlockingClient::new`]; for TLS, see
    /// [`connect_tls`](BlockingClient::connect_tls).)
    pub fn connect(uri: &str) -> io::Result<Self> {
        Self::connect_with(uri, ClientConfig::default())
    }

    /// Connects to an NBD URI with `config` (its `export` is replaced by the URI's), in
    /// plaintext: an `nbds://` URI, or a TLS policy other than `Off`, is refused before
    /// connecting (use [`connect_tls`](BlockingClient::connect_tls)).
    pub fn connect_with(uri: &str, config: ClientConfig<'_>) -> io::Result<Self> {
        let uri = parse_uri(uri)?;
        if uri.tls {
            return Err(no_connector("the URI requires TLS (nbds://)"));
        }
        let stream = open(&uri)?;
        let mut config = config;
        config.export = &uri.export;
        Self::new(stream, &config)
    }
}

impl BlockingClient<Box<dyn Stream>> {
    /// Connects to an NBD URI with `config` (its `export` is replaced by the URI's), ready
    /// for TLS: the URI and `tls` set the policy as the [module docs](self#tls) say,
    /// and `tls` encrypts the connection when the server accepts `NBD_OPT_STARTTLS`.
    ///
    /// Fails before connecting when TLS is required (`nbds://`, or
    /// [`TlsPolicy::Required`] in `config`) and `tls` is `None`.
    pub fn connect_tls(
        uri: &str,
        config: ClientConfig<'_>,
        tls: Option<Arc<dyn TlsConnector>>,
    ) -> io::Result<Self> {
        let uri = parse_uri(uri)?;
        let mut config = config;
        config.export = &uri.export;
        config.tls = match (&tls, uri.tls, config.tls) {
            (None, true, _) => return Err(no_connector("the URI requires TLS (nbds://)")),
            (None, false, TlsPolicy::Required) => {
                return Err(no_connector("the TLS policy is Required"))
            }
            (None, false, _) => TlsPolicy::Off,
            (Some(_), true, _) | (Some(_), false, TlsPolicy::Required) => TlsPolicy::Required,
            (Some(_), false, _) => TlsPolicy::Optional,
        };
        let server_name = uri.tls_hostname.clone().or(match &uri.transport {
            Transport::Tcp { host, .. } => Some(host.clone()),
            _ => None,
        });
        let stream: Box<dyn Stream> = Box::new(open(&uri)?);
        let upgrade = tls.map(|t| upgrade_with(t, server_name));
        Self::start(stream, &config, upgrade)
    }
}

impl<const N: usize> BlockingClient<Box<dyn Stream>, N> {
    /// Runs the handshake over `stream` like [`new`](BlockingClient::new), handing the
    /// stream to `tls` when the server accepts `NBD_OPT_STARTTLS` (as `config.tls` asks;
    /// in manual mode too, see the [module docs](self#tls)). `server_name` goes to the
    /// connector.
    pub fn new_tls(
        stream: Box<dyn Stream>,
        config: &ClientConfig<'_>,
        tls: Arc<dyn TlsConnector>,
        server_name: Option<&str>,
    ) -> io::Result<Self> {
        let upgrade = upgrade_with(tls, server_name.map(str::to_owned));
        Self::start(stream, config, Some(upgrade))
    }
}

fn parse_uri(uri: &str) -> io::Result<NbdUri> {
    NbdUri::parse(uri).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

fn no_connector(why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        std::format!("{why}, but no TLS connector was given"),
    )
}

/// Opens the URI's transport, naming it in the error.
fn open(uri: &NbdUri) -> io::Result<Socket> {
    Socket::open(uri).map_err(|e| {
        let target = match &uri.transport {
            Transport::Tcp { host, port } => std::format!("{host}:{port}"),
            Transport::Unix { socket } => socket.clone(),
        };
        io::Error::new(e.kind(), std::format!("cannot connect to {target}: {e}"))
    })
}

impl<S: Read + Write, const N: usize> BlockingClient<S, N> {
    /// Runs the handshake over `stream`, in plaintext. In automatic mode this returns once
    /// the export is open; in manual mode, after the greeting (then use
    /// [`opt`](Self::opt)).
    ///
    /// A TLS policy other than [`TlsPolicy::Off`] in automatic mode is refused before
    /// any I/O: TLS needs a connector ([`new_tls`](BlockingClient::new_tls)).
    pub fn new(stream: S, config: &ClientConfig<'_>) -> io::Result<Self> {
        if !config.manual && config.tls != TlsPolicy::Off {
            return Err(no_connector(&std::format!(
                "the TLS policy is {:?}",
                config.tls
            )));
        }
        Self::start(stream, config, None)
    }

    fn start(
        stream: S,
        config: &ClientConfig<'_>,
        upgrade: Option<Upgrade<S>>,
    ) -> io::Result<Self> {
        let mut this = Self {
            client: Client::new(config).map_err(misuse)?,
            stream,
            rbuf: Vec::with_capacity(crate::client::MAX_FRAME_LEN),
            wbuf: vec![0; MAX_OPTION_LEN],
            meta: Vec::new(),
            exports: Vec::new(),
            details: ExportDetails {
                name: config.export.to_owned(),
                ..ExportDetails::default()
            },
            refusal: None,
            messages: Vec::new(),
            option_done: None,
            abandoned: Vec::new(),
            upgrade,
        };
        loop {
            this.flush_out(None)
                .map_err(|e| this.negotiation_error(e))?;
            match this.client.state() {
                State::Ready => break,
                State::Negotiating if config.manual && this.client.wants() == Want::Nothing => {
                    break
                }
                _ => {}
            }
            if let Err(e) = this.step(&mut NoSink) {
                return Err(this.negotiation_error(e));
            }
        }
        if config.manual && this.upgrade.is_some() {
            this.manual_starttls(config.tls)?;
        }
        this.details.name = this.client.export_name().to_owned();
        Ok(this)
    }

    /// Manual mode with a connector: `NBD_OPT_STARTTLS` as `policy` says, before the
    /// application's first option.
    fn manual_starttls(&mut self, policy: TlsPolicy) -> io::Result<()> {
        if policy == TlsPolicy::Off {
            return Ok(());
        }
        let fixed = self.client.state() == State::Negotiating
            && self
                .client
                .handshake_flags()
                .contains(crate::wire::HandshakeFlags::FIXED_NEWSTYLE);
        let why = if fixed {
            match self.opt(|m| m.opt_starttls())? {
                Ok(()) => return Ok(()),
                Err(text) => std::format!("the server did not accept STARTTLS ({text})"),
            }
        } else {
            "the server cannot negotiate it (oldstyle or not fixed newstyle)".to_owned()
        };
        if policy != TlsPolicy::Required {
            return Ok(());
        }
        if fixed {
            // A polite goodbye, not waited for (the automatic mode does the same).
            if self.client.opt_abort().is_ok() {
                let _ = self.flush_out(None);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            std::format!("TLS is required but {why}"),
        ))
    }

    /// The state machine (for its getters).
    pub fn machine(&self) -> &Client<N> {
        &self.client
    }

    /// The transport.
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// Export size in bytes (0 before the export is open).
    pub fn size(&self) -> u64 {
        self.client.size().unwrap_or(0)
    }

    /// Transmission flags of the open export.
    pub fn flags(&self) -> TransmissionFlags {
        self.client.transmission_flags().unwrap_or_default()
    }

    /// What the server said about the export (or, in manual mode, the last INFO/GO).
    pub fn details(&self) -> &ExportDetails {
        &self.details
    }

    /// The negotiated metadata contexts: ID and name.
    pub fn contexts(&self) -> Vec<(u32, &str)> {
        self.client
            .contexts()
            .iter()
            .map(|id| {
                let name = self
                    .meta
                    .iter()
                    .rev()
                    .find(|(i, _)| i == id)
                    .map_or("", |(_, n)| n.as_str());
                (*id, name)
            })
            .collect()
    }

    // ---- manual mode ----

    /// Manual mode: runs one option (`f` calls an `opt_*` method) to its final reply.
    /// `Ok(Err(text))` if the server refused it.
    pub fn opt(
        &mut self,
        f: impl FnOnce(&mut Client<N>) -> Result<(), Error>,
    ) -> io::Result<Result<(), String>> {
        f(&mut self.client).map_err(misuse)?;
        self.option_done = None;
        self.meta.retain(|_| false);
        loop {
            self.flush_out(None)
                .map_err(|e| self.negotiation_error(e))?;
            if let Some(r) = self.option_done.take() {
                return Ok(r);
            }
            match self.client.state() {
                State::Ready | State::Closed => return Ok(Ok(())),
                _ => {}
            }
            if let Err(e) = self.step(&mut NoSink) {
                return Err(self.negotiation_error(e));
            }
        }
    }

    /// A transport error during negotiation, explained when TLS is up: a server that
    /// refuses the client's certificate (or has none) hangs up just after the handshake.
    fn negotiation_error(&self, e: io::Error) -> io::Error {
        let dropped = matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::UnexpectedEof
        );
        if dropped && self.client.tls_active() {
            io::Error::new(
                e.kind(),
                std::format!(
                    "the server closed the TLS session during negotiation ({e}); servers \
                     that check client certificates do so when they refuse one"
                ),
            )
        } else {
            e
        }
    }

    /// Exports seen in `NBD_OPT_LIST` replies so far.
    pub fn exports(&self) -> &[ExportDetails] {
        &self.exports
    }

    /// Metadata contexts seen in the last option's replies (LIST or SET).
    pub fn listed_contexts(&self) -> &[(u32, String)] {
        &self.meta
    }

    // ---- many requests in flight ----

    /// Queues a read and sends it.
    pub fn submit_read(&mut self, offset: u64, len: u32, flags: CmdFlags) -> io::Result<Cookie> {
        let c = self.client.read(offset, len, flags).map_err(misuse)?;
        self.flush_out(None)?;
        Ok(c)
    }

    /// Queues a write of `data` and sends it (header and payload in one vectored write).
    ///
    /// This blocks until the whole write is sent, and nothing is read meanwhile. With
    /// read replies owed, keep them small enough to wait in the socket buffers: a server
    /// that stops reading while its read data cannot drain, and this thread blocked
    /// sending, wait for each other forever. Submit writes before reads, or
    /// [`complete`](Self::complete) the reads first.
    pub fn submit_write(
        &mut self,
        offset: u64,
        data: &[u8],
        flags: CmdFlags,
    ) -> io::Result<Cookie> {
        let len = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "write over 4 GiB"))?;
        let c = self.client.write(offset, len, flags).map_err(misuse)?;
        self.flush_out(Some(data))?;
        Ok(c)
    }

    /// Queues a flush and sends it.
    pub fn submit_flush(&mut self, flags: CmdFlags) -> io::Result<Cookie> {
        let c = self.client.flush(flags).map_err(misuse)?;
        self.flush_out(None)?;
        Ok(c)
    }

    /// Queues a trim and sends it.
    pub fn submit_trim(&mut self, offset: u64, len: u64, flags: CmdFlags) -> io::Result<Cookie> {
        let c = self.client.trim(offset, len, flags).map_err(misuse)?;
        self.flush_out(None)?;
        Ok(c)
    }

    /// Queues a write-zeroes and sends it.
    pub fn submit_write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        flags: CmdFlags,
    ) -> io::Result<Cookie> {
        let c = self
            .client
            .write_zeroes(offset, len, flags)
            .map_err(misuse)?;
        self.flush_out(None)?;
        Ok(c)
    }

    /// Queues a block-status query (every negotiated context) and sends it.
    pub fn submit_block_status(
        &mut self,
        offset: u64,
        len: u64,
        flags: CmdFlags,
    ) -> io::Result<Cookie> {
        let c = self
            .client
            .block_status(offset, len, flags)
            .map_err(misuse)?;
        self.flush_out(None)?;
        Ok(c)
    }

    /// Queues the payload form of block status for the contexts `ids` only (extended
    /// headers and `NBD_FLAG_BLOCK_STATUS_PAYLOAD` needed) and sends it.
    pub fn submit_block_status_for(
        &mut self,
        offset: u64,
        len: u64,
        flags: CmdFlags,
        ids: &[u32],
    ) -> io::Result<Cookie> {
        let c = self
            .client
            .block_status_for(offset, len, flags, ids)
            .map_err(misuse)?;
        self.flush_out(None)?;
        Ok(c)
    }

    /// Number of commands in flight.
    pub fn in_flight(&self) -> usize {
        self.client.in_flight_len()
    }

    /// Waits for the next command to complete, moving read data into `sink`'s buffers.
    pub fn complete(&mut self, sink: &mut dyn Sink) -> io::Result<Completion> {
        loop {
            if let Some(done) = self.step(sink)? {
                return Ok(done);
            }
        }
    }

    // ---- synchronous calls (nothing else may be in flight) ----

    fn idle(&self) -> io::Result<()> {
        if self.in_flight() == 0 {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "commands in flight: finish them with complete() first",
            ))
        }
    }

    /// Largest request to split reads and writes into: the maximum payload, rounded down
    /// to the minimum block size.
    fn chunk_len(&self) -> u64 {
        let b = self.client.block_size();
        let max = u64::from(self.client.max_payload()).min(1 << 25);
        (max / u64::from(b.min)).max(1) * u64::from(b.min)
    }

    /// Waits for every command in flight; the first error wins.
    fn drain(&mut self, sink: &mut dyn Sink, mut first: io::Result<()>) -> io::Result<()> {
        while self.in_flight() > 0 {
            let c = self.complete(sink)?;
            if let (Ok(()), Err(e)) = (&first, c.result) {
                first = Err(e.into());
            }
        }
        first
    }

    /// Reads `buf.len()` bytes at `offset`, as requests of at most the maximum payload kept
    /// in flight together.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.idle()?;
        let step = self.chunk_len();
        let mut sink = SliceSink { buf, base: offset };
        let total = sink.buf.len() as u64;
        let mut at = 0;
        let mut first = Ok(());
        while at < total && first.is_ok() {
            if self.in_flight() == N {
                let c = self.complete(&mut sink)?;
                if let Err(e) = c.result {
                    first = Err(e.into());
                    break;
                }
            }
            let len = step.min(total - at) as u32;
            self.submit_read(offset + at, len, CmdFlags::empty())?;
            at += u64::from(len);
        }
        self.drain(&mut sink, first)
    }

    /// Writes `data` at `offset`, as requests of at most the maximum payload kept in
    /// flight together.
    pub fn write_at(&mut self, data: &[u8], offset: u64, flags: CmdFlags) -> io::Result<()> {
        self.idle()?;
        let step = self.chunk_len() as usize;
        let mut first = Ok(());
        for (i, piece) in data.chunks(step).enumerate() {
            if self.in_flight() == N {
                let c = self.complete(&mut NoSink)?;
                if let Err(e) = c.result {
                    first = Err(e.into());
                    break;
                }
            }
            self.submit_write(offset + (i * step) as u64, piece, flags)?;
        }
        self.drain(&mut NoSink, first)
    }

    fn one(&mut self, submit: io::Result<Cookie>, sink: &mut dyn Sink) -> io::Result<()> {
        submit?;
        let c = self.complete(sink)?;
        c.result.map_err(io::Error::from)
    }

    /// Flushes the export.
    pub fn flush(&mut self) -> io::Result<()> {
        self.idle()?;
        let s = self.submit_flush(CmdFlags::empty());
        self.one(s, &mut NoSink)
    }

    /// Trims a range.
    pub fn trim(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.idle()?;
        let s = self.submit_trim(offset, len, CmdFlags::empty());
        self.one(s, &mut NoSink)
    }

    /// Writes zeroes over a range.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, flags: CmdFlags) -> io::Result<()> {
        self.idle()?;
        let s = self.submit_write_zeroes(offset, len, flags);
        self.one(s, &mut NoSink)
    }

    /// Queries block status; `f(context_id, offset, extent)` sees every extent, with no
    /// allocation per call.
    pub fn block_status(
        &mut self,
        offset: u64,
        len: u64,
        flags: CmdFlags,
        f: impl FnMut(u32, u64, Extent),
    ) -> io::Result<()> {
        self.idle()?;
        let s = self.submit_block_status(offset, len, flags);
        self.one(s, &mut ExtentSink(f))
    }

    /// Like [`block_status`](Self::block_status), for the contexts `ids` only (the payload
    /// form of the command).
    pub fn block_status_for(
        &mut self,
        offset: u64,
        len: u64,
        flags: CmdFlags,
        ids: &[u32],
        f: impl FnMut(u32, u64, Extent),
    ) -> io::Result<()> {
        self.idle()?;
        let s = self.submit_block_status_for(offset, len, flags, ids);
        self.one(s, &mut ExtentSink(f))
    }

    /// Ends the session: `NBD_CMD_DISC` (or `NBD_OPT_ABORT` during negotiation). Replies
    /// still owed are waited for first, as the spec recommends.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.drain(&mut NoSink, Ok(()))?;
        if matches!(self.client.state(), State::Closed | State::Dead) {
            return Ok(());
        }
        self.client.disconnect().map_err(misuse)?;
        self.flush_out(None)?;
        // Wait for the server to close (or acknowledge NBD_OPT_ABORT).
        while self.client.wants() != Want::Nothing
            && !matches!(self.client.state(), State::Closed | State::Dead)
        {
            self.step(&mut NoSink)?;
        }
        Ok(())
    }

    // ---- the loop ----

    /// Sends everything the machine has queued; `payload` is the data of a write just
    /// submitted.
    fn flush_out(&mut self, payload: Option<&[u8]>) -> io::Result<()> {
        let mut used = 0;
        loop {
            match self.client.poll_transmit(&mut self.wbuf[used..]) {
                Ok(None) => break,
                Ok(Some(Transmit::Bytes(n))) => used += n,
                Ok(Some(Transmit::Payload { len, .. })) => {
                    let data = payload.and_then(|p| p.get(..len)).ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidInput, "write payload missing")
                    })?;
                    let mut bufs = [IoSlice::new(&self.wbuf[..used]), IoSlice::new(data)];
                    if let Err(e) = super::write_all_vectored(&mut self.stream, &mut bufs) {
                        return Err(self.broken(e));
                    }
                    used = 0;
                }
                // Only a server sends zeroes; a client machine never asks for it.
                Ok(Some(Transmit::Zeroes { .. })) => {
                    return Err(io::Error::other(
                        "unexpected transmit from the client machine",
                    ))
                }
                Err(Error::BufferTooSmall { .. }) if used > 0 => {
                    if let Err(e) = self.stream.write_all(&self.wbuf[..used]) {
                        return Err(self.broken(e));
                    }
                    used = 0;
                }
                Err(e) => return Err(misuse(e)),
            }
        }
        if used > 0 {
            if let Err(e) = self.stream.write_all(&self.wbuf[..used]) {
                return Err(self.broken(e));
            }
        }
        // A TLS stream may hold records back until flushed; a socket's flush does nothing.
        self.stream.flush().map_err(|e| self.broken(e))
    }

    /// One step: moves a payload, or reads and handles at most one frame. Returns a
    /// completion if one happened.
    fn step(&mut self, sink: &mut dyn Sink) -> io::Result<Option<Completion>> {
        match self.client.wants() {
            Want::Payload {
                cookie,
                offset,
                len,
            } => {
                let dest = sink.read_buf(cookie, offset, len);
                if dest.len() != len {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "the sink gave no buffer for read data",
                    ));
                }
                if let Err(e) = self.stream.read_exact(dest) {
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        return Err(self.eof());
                    }
                    // Part of the payload may be gone: the stream cannot be resumed.
                    return Err(self.broken(e));
                }
                if let Err(e) = self.client.handle_payload(len) {
                    self.reap();
                    return Err(self.error(e));
                }
                Ok(None)
            }
            Want::Bytes(n) => {
                if self.rbuf.len() < n {
                    let have = self.rbuf.len();
                    self.rbuf.resize(n, 0);
                    let got = loop {
                        match self.stream.read(&mut self.rbuf[have..n]) {
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            // A TLS close without close_notify: an end of file like any
                            // other (the machine knows whether a frame was cut short).
                            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(0),
                            r => break r,
                        }
                    };
                    let got = match got {
                        Ok(g) => g,
                        Err(e) => {
                            self.rbuf.truncate(have);
                            // A timeout loses nothing and may be retried; anything else
                            // (a reset, a broken pipe) ends the connection.
                            return Err(match e.kind() {
                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => e,
                                _ => self.broken(e),
                            });
                        }
                    };
                    self.rbuf.truncate(have + got);
                    if got == 0 {
                        let r = self.client.handle_eof();
                        self.reap();
                        return match r {
                            Ok(()) => Ok(None),
                            Err(e) => Err(self.error(e)),
                        };
                    }
                }
                let rbuf = std::mem::take(&mut self.rbuf);
                let result = self.handle(&rbuf, sink);
                self.rbuf = rbuf;
                let (consumed, done) = match result {
                    Ok(r) => r,
                    Err(e) => {
                        self.reap();
                        return Err(e);
                    }
                };
                if consumed == 0
                    && n > 0
                    && self.rbuf.len() >= n
                    && self.client.wants() == Want::Bytes(n)
                {
                    // The machine promised progress with `n` bytes and made none: a bug in
                    // the machine, reported rather than looped on.
                    return Err(io::Error::other("the client machine made no progress"));
                }
                self.rbuf.drain(..consumed);
                if self.client.state() == State::StartTls {
                    self.start_tls()?;
                }
                self.flush_out(None)?;
                Ok(done)
            }
            Want::Nothing => match self.client.state() {
                State::Dead => {
                    self.reap();
                    Err(self.error(self.client.error().unwrap_or(Error::Closed)))
                }
                State::StartTls => self.start_tls().map(|()| None),
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "nothing to wait for",
                )),
            },
            // Only a server discards refused payloads.
            Want::Discard { .. } => {
                Err(io::Error::other("unexpected want from the client machine"))
            }
        }
    }

    /// After the server's `NBD_OPT_STARTTLS` acknowledgement: hands the transport to the
    /// connector and tells the machine.
    fn start_tls(&mut self) -> io::Result<()> {
        if !self.rbuf.is_empty() {
            // Plaintext after the acknowledgement: the machine refuses it.
            let rbuf = std::mem::take(&mut self.rbuf);
            let e = match self.client.handle_input(&rbuf) {
                Err(e) => self.error(e),
                Ok(_) => io::Error::other("plaintext data after the STARTTLS acknowledgement"),
            };
            self.reap();
            return Err(e);
        }
        let Some(upgrade) = self.upgrade.as_mut() else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the server accepted STARTTLS, but this client has no TLS connector",
            ));
        };
        upgrade(&mut self.stream).map_err(|e| {
            io::Error::new(
                e.kind(),
                std::format!("TLS handshake with the server failed: {e}"),
            )
        })?;
        self.client.tls_established().map_err(misuse)?;
        // What the server said in plaintext is not to be trusted now (the machine forgets
        // its side too).
        self.exports.clear();
        self.meta.clear();
        self.refusal = None;
        self.details = ExportDetails {
            name: std::mem::take(&mut self.details.name),
            ..ExportDetails::default()
        };
        Ok(())
    }

    fn handle(
        &mut self,
        input: &[u8],
        sink: &mut dyn Sink,
    ) -> io::Result<(usize, Option<Completion>)> {
        let h = self.client.handle_input(input).map_err(|e| self.error(e))?;
        let mut done = None;
        match h.event {
            None => {}
            Some(Event::Export { name, description }) => self.exports.push(ExportDetails {
                name: name.to_owned(),
                description: (!description.is_empty()).then(|| description.to_owned()),
                ..ExportDetails::default()
            }),
            Some(Event::Info(info)) => match info {
                Info::Export { size, flags } => {
                    self.details.size = Some(size);
                    self.details.flags = Some(flags);
                }
                Info::Name(n) => self.details.canonical_name = Some(n.to_owned()),
                Info::Description(d) => self.details.description = Some(d.to_owned()),
                Info::BlockSize(b) => self.details.block_size = Some(b),
                _ => {}
            },
            Some(Event::MetaContext { id, name }) => self.meta.push((id, name.to_owned())),
            Some(Event::OptionDone { opt, result }) => {
                let r = result.map_err(|r| {
                    let mut text = std::format!("{opt} refused: {}", r.error);
                    if !r.message.is_empty() {
                        text.push_str(": ");
                        text.push_str(r.message);
                    }
                    text
                });
                if let Err(text) = &r {
                    self.refusal = Some(text.clone());
                }
                self.option_done = Some(r);
            }
            Some(Event::StartTls) => {
                self.option_done = Some(Ok(()));
            }
            Some(Event::Ready { size, flags }) => {
                self.details.size = Some(size);
                self.details.flags = Some(flags);
                // A refusal during negotiation (say, of extended headers) explains nothing
                // that goes wrong from here on.
                self.refusal = None;
            }
            Some(Event::ReadHole {
                cookie,
                offset,
                len,
            }) => {
                let dest = sink.read_buf(cookie, offset, len as usize);
                if dest.len() != len as usize {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "the sink gave no buffer for read data",
                    ));
                }
                sink.hole(cookie, offset, len as usize);
            }
            Some(Event::BlockStatus {
                cookie,
                context_id,
                offset,
                extents,
            }) => {
                let mut at = offset;
                for e in extents {
                    sink.extent(cookie, context_id, at, e);
                    at = at.saturating_add(e.len);
                }
            }
            // The first error's message goes with the first error (its Done reports it).
            Some(Event::ChunkError {
                cookie, message, ..
            }) if !self.messages.iter().any(|(c, _)| *c == cookie) => {
                self.messages.push((cookie, message.to_owned()));
            }
            Some(Event::Done { cookie, result }) => {
                let message = self
                    .messages
                    .iter()
                    .position(|(c, _)| *c == cookie)
                    .map(|i| self.messages.swap_remove(i).1)
                    .unwrap_or_default();
                done = Some(Completion {
                    cookie,
                    result: result.map_err(|errno| CommandError { errno, message }),
                });
            }
            Some(_) => {}
        }
        Ok((h.consumed, done))
    }

    /// After a fatal error or end of file: forgets the commands whose replies will never
    /// come (the machine's [`Event::Abandoned`]s), remembering their cookies.
    fn reap(&mut self) {
        while let Some(e) = self.client.poll_event() {
            if let Event::Abandoned { cookie } = e {
                self.abandoned.push(cookie);
            }
        }
    }

    /// Commands abandoned because the connection ended or broke.
    pub fn abandoned(&self) -> &[Cookie] {
        &self.abandoned
    }

    /// A transport failure the connection cannot recover from (bytes of a frame may be
    /// lost either way): the machine is told the connection ended, so every command in
    /// flight is abandoned at once, and the client is dead.
    fn broken(&mut self, e: io::Error) -> io::Error {
        // The machine's view of the ending (a frame cut short) matters less than the
        // transport's own error, which is returned.
        let _ = self.client.handle_eof();
        self.reap();
        e
    }

    /// End of file where the machine did not expect it.
    fn eof(&mut self) -> io::Error {
        let r = self.client.handle_eof();
        self.reap();
        match r {
            Ok(()) => io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed"),
            Err(e) => self.error(e),
        }
    }

    /// An io::Error for a machine error, with the server's last refusal if there was one.
    fn error(&self, e: Error) -> io::Error {
        match &self.refusal {
            Some(text) if e.is_fatal() => {
                io::Error::new(io::Error::from(e).kind(), std::format!("{e} ({text})"))
            }
            _ => io::Error::from(e),
        }
    }
}
