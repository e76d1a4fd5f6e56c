//! A blocking NBD server over any `Read + Write`: a thin loop over [`crate::server::Server`]
//! and a small [`Backend`] trait, so that serving a file or memory takes a few lines.
//!
//! ```no_run
//! use std::net::TcpListener;
//! use std::sync::Arc;
//! use nbd_proto::blocking::server::{serve, Export, MemoryBackend, Options};
//!
//! let exports = vec![Export::new("", Arc::new(MemoryBackend::new(64 << 20)))];
//! let options = Arc::new(Options::new(exports));
//! let listener = TcpListener::bind("127.0.0.1:10809")?;
//! for stream in listener.incoming() {
//!     let (stream, options) = (stream?, options.clone());
//!     std::thread::spawn(move || serve(stream, &options));
//! }
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! Each connection is served by one thread, one request at a time, in order. Read data is
//! read from the backend into a per-connection buffer and written to the socket together
//! with its reply header in one vectored write; write payloads are read from the socket
//! straight into that buffer. The buffer grows to the largest request seen and is then
//! reused: in steady state a request allocates nothing.

use std::boxed::Box;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::string::{String, ToString};
use std::sync::{Arc, RwLock};

use arrayvec::ArrayVec;
use std::vec::Vec;
use std::{format, vec};

use crate::common::{Transmit, Want};
use crate::server::{
    ExportInfo, ExportQueryKind, MetaContextQuery, Server, ServerConfig, ServerEvent, State,
};
use crate::wire::extent::{STATE_HOLE, STATE_ZERO};
use crate::wire::{
    BlockSize, CmdFlags, Command, Errno, Extent, OptError, Request, TransmissionFlags,
};
use crate::Error;

/// Storage behind an export. Methods take `&self`: a backend is shared by every
/// connection to its export and must do its own locking.
///
/// Only [`size`](Backend::size), [`read`](Backend::read) and [`write`](Backend::write) are
/// required; the rest have defaults that are always correct.
///
/// ```no_run
/// use std::io;
/// use std::sync::{Arc, Mutex};
/// use nbd_proto::blocking::server::{serve, Backend, Export, Options};
///
/// /// A disk in one `Vec`, behind a lock.
/// struct VecDisk(Mutex<Vec<u8>>);
///
/// impl Backend for VecDisk {
///     fn size(&self) -> u64 {
///         self.0.lock().unwrap().len() as u64
///     }
///     // The server checked the range against the size before calling.
///     fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
///         buf.copy_from_slice(&self.0.lock().unwrap()[offset as usize..][..buf.len()]);
///         Ok(())
///     }
///     fn write(&self, offset: u64, buf: &[u8], _fua: bool) -> io::Result<()> {
///         self.0.lock().unwrap()[offset as usize..][..buf.len()].copy_from_slice(buf);
///         Ok(())
///     }
/// }
///
/// let disk = Arc::new(VecDisk(Mutex::new(vec![0; 16 << 20])));
/// let options = Options::new(vec![Export::new("", disk)]);
/// let (stream, _) = std::net::TcpListener::bind("127.0.0.1:10809")?.accept()?;
/// serve(stream, &options)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Backend: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// What the backend supports. `HAS_FLAGS` is added for you; `READ_ONLY` makes the
    /// server refuse writes; `CAN_MULTI_CONN` promises that a flush on one connection
    /// covers writes made through any other.
    fn flags(&self) -> TransmissionFlags {
        TransmissionFlags::SEND_FLUSH
            | TransmissionFlags::SEND_FUA
            | TransmissionFlags::SEND_WRITE_ZEROES
    }

    /// Block-size constraints to advertise (and have enforced), if any.
    fn block_size(&self) -> Option<BlockSize> {
        None
    }

    /// Fills `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Writes `buf` at `offset`; with `fua`, durably before returning.
    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()>;

    /// Hands the `len` bytes at `offset` to `send`, in order, in one or more calls: the
    /// server writes them to the socket as they come. A backend that holds its data in
    /// memory hands out that memory and no byte is copied before the kernel's own copy.
    /// Fail, if at all, before the first call to `send`: after it the data is promised.
    ///
    /// The default reads the whole range into `scratch` with [`Backend::read`] (the
    /// server keeps `scratch` from one request to the next, so it is allocated once).
    fn read_to(
        &self,
        offset: u64,
        len: usize,
        scratch: &mut Vec<u8>,
        send: &mut dyn FnMut(&[&[u8]]) -> io::Result<()>,
    ) -> io::Result<()> {
        if scratch.len() < len {
            scratch.resize(len, 0);
        }
        self.read(offset, &mut scratch[..len])?;
        send(&[&scratch[..len]])
    }

    /// Writes the `len` bytes at `offset` that `fill` produces: each call fills every
    /// slice it is given, in order, straight from the socket (one vectored read where it
    /// can). A backend that holds its data in memory passes its own memory, so the payload
    /// is copied once, by the kernel. Errors from `fill` (the connection failed) must be
    /// returned as they are.
    ///
    /// The default fills `scratch` and calls [`Backend::write`].
    fn write_from(
        &self,
        offset: u64,
        len: usize,
        fua: bool,
        scratch: &mut Vec<u8>,
        fill: &mut dyn FnMut(&mut [&mut [u8]]) -> io::Result<()>,
    ) -> io::Result<()> {
        if scratch.len() < len {
            scratch.resize(len, 0);
        }
        fill(&mut [&mut scratch[..len]])?;
        self.write(offset, &scratch[..len], fua)
    }

    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    /// Discards a range (advisory: doing nothing is correct).
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let _ = (offset, len, fua);
        Ok(())
    }

    /// Makes a range read as zeroes. `no_hole` asks for allocated zeroes; `fast` asks to
    /// fail with [`io::ErrorKind::Unsupported`] unless this is faster than writing zeroes.
    /// The default writes zeroes in 64 KiB pieces (and so is never fast).
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast: bool,
        fua: bool,
    ) -> io::Result<()> {
        let _ = no_hole;
        if fast {
            return Err(io::ErrorKind::Unsupported.into());
        }
        let zeroes = [0u8; 65536];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(zeroes.len() as u64) as usize;
            self.write(offset + at, &zeroes[..n], false)?;
            at += n as u64;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Prefetches a range (advisory).
    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// Names of the metadata contexts this backend can describe, such as
    /// `base:allocation` or `qemu:dirty-bitmap:NAME`.
    fn meta_contexts(&self) -> Vec<String> {
        Vec::new()
    }

    /// Appends to `out` the extents of context `context` (an index into
    /// [`Backend::meta_contexts`]) from `offset` on, covering up to `len` bytes, and at
    /// most `max` extents: stop early rather than walk the whole range, since clients such
    /// as QEMU ask from each extent to the end of the export with `NBD_CMD_FLAG_REQ_ONE`
    /// (`max` is then 1). Merge neighbours of equal status. The server trims and caps what
    /// it sends.
    fn extents(
        &self,
        context: usize,
        offset: u64,
        len: u64,
        max: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        let _ = (context, max);
        out.push(Extent {
            len: len.min(self.size().saturating_sub(offset)).max(1),
            status: 0,
        });
        Ok(())
    }
}

/// One export: a name, an optional description and a backend.
#[derive(Clone)]
pub struct Export {
    /// Name clients ask for ("" is the default export).
    pub name: String,
    /// Description sent to clients that ask.
    pub description: Option<String>,
    /// The storage.
    pub backend: Arc<dyn Backend>,
    /// Advertise the export read-only even if the backend could write.
    pub read_only: bool,
    /// Block-size constraints to advertise (and have enforced) instead of the backend's.
    pub block_size: Option<BlockSize>,
    /// Under [`TlsPolicy::Optional`](crate::TlsPolicy::Optional), only offer this export over TLS.
    pub tls_only: bool,
}

impl Export {
    /// An export named `name` on `backend`.
    pub fn new(name: &str, backend: Arc<dyn Backend>) -> Self {
        Self {
            name: name.into(),
            description: None,
            backend,
            read_only: false,
            block_size: None,
            tls_only: false,
        }
    }

    fn flags(&self) -> TransmissionFlags {
        let mut f = self.backend.flags();
        if self.read_only {
            f |= TransmissionFlags::READ_ONLY;
        }
        f
    }

    fn info(&self) -> ExportInfo<'_> {
        let mut info = ExportInfo::new(self.backend.size(), self.flags()).with_name(&self.name);
        if let Some(d) = &self.description {
            info = info.with_description(d);
        }
        if let Some(b) = self.block_size.or_else(|| self.backend.block_size()) {
            info = info.with_block_size(b);
        }
        info.tls_only = self.tls_only;
        info
    }
}

/// What a server offers: its exports and protocol configuration.
#[derive(Clone)]
pub struct Options {
    /// The machine's configuration.
    pub config: ServerConfig,
    /// The exports, in the order `NBD_OPT_LIST` shows them.
    pub exports: Vec<Export>,
    /// Speak oldstyle negotiation (serving the first export).
    pub oldstyle: bool,
    /// Turn the transport into TLS after `NBD_OPT_STARTTLS`. Needed unless the TLS policy
    /// is off.
    pub tls: Option<Arc<dyn TlsAcceptor>>,
}

impl Options {
    /// Default configuration for these exports.
    pub fn new(exports: Vec<Export>) -> Self {
        Self {
            config: ServerConfig::default(),
            exports,
            oldstyle: false,
            tls: None,
        }
    }

    fn find(&self, name: &str) -> Option<&Export> {
        self.exports.iter().find(|e| e.name == name)
    }
}

pub use super::Stream;

/// Starts TLS as a server on a stream, after the machine accepted `NBD_OPT_STARTTLS`.
pub trait TlsAcceptor: Send + Sync {
    /// Performs the handshake and returns the encrypted stream.
    fn accept(&self, stream: Box<dyn Stream>) -> io::Result<Box<dyn Stream>>;
}

/// Why a session ended badly.
#[derive(Debug)]
pub enum ServeError {
    /// The transport failed.
    Io(io::Error),
    /// The machine refused the client (protocol violation or incompatibility).
    Protocol(Error),
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "I/O error: {e}"),
            Self::Protocol(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ServeError {}

impl From<io::Error> for ServeError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl From<Error> for ServeError {
    fn from(e: Error) -> Self {
        Self::Protocol(e)
    }
}

/// Serves one connection until the client disconnects.
///
/// A client that ends negotiation with `NBD_OPT_ABORT` and closes without reading the
/// acknowledgement (`qemu-nbd -L` does) ends the session cleanly: proto.md asks servers to
/// cope with exactly that.
pub fn serve<S: Stream + 'static>(stream: S, options: &Options) -> Result<(), ServeError> {
    let mut conn = Connection::new(Box::new(stream), options)?;
    match conn.run() {
        Err(ServeError::Io(e))
            if conn.server.state() == State::Closed
                && matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
        {
            Ok(())
        }
        r => r,
    }
}

/// Bytes of zeroes to send for holes in simple replies.
static ZEROES: [u8; 65536] = [0; 65536];

/// Size of the input buffer: requests are read in batches, not one system call each.
const INPUT_LEN: usize = 64 * 1024;

/// A write payload at least this long makes the next header read exact.
const LARGE_WRITE: usize = 16 * 1024;

struct Connection<'o> {
    stream: Option<Box<dyn Stream>>,
    options: &'o Options,
    server: Box<Server>,
    /// Bytes read and not yet consumed: `input[start..end]`. Reads fill as much as the
    /// socket has, so one system call brings in many pipelined requests.
    input: Vec<u8>,
    start: usize,
    end: usize,
    /// Encoded output (reply headers, option replies) not yet written: written with the
    /// next payload in one vectored write, or before blocking on input.
    pending: Vec<u8>,
    /// Where `poll_transmit` encodes.
    out: Vec<u8>,
    /// Scratch for backends that copy (the default `read_to` and `write_from`).
    scratch: Vec<u8>,
    export: Option<usize>,
    /// Context IDs a block-status request asks for. An ID is the index of the context in
    /// the backend's [`Backend::meta_contexts`].
    ids: Vec<u32>,
    extents: Vec<Extent>,
    /// The write whose payload is being read.
    write: Option<Request>,
    /// The last write was large: read the next header exactly (see `read_at_least`).
    exact_reads: bool,
}

impl<'o> Connection<'o> {
    fn new(stream: Box<dyn Stream>, options: &'o Options) -> Result<Self, ServeError> {
        let server = if options.oldstyle {
            let e = options
                .exports
                .first()
                .ok_or_else(|| io::Error::other("no export to serve"))?;
            Box::new(Server::new_oldstyle(options.config, &e.info())?)
        } else {
            Box::new(Server::new(options.config))
        };
        Ok(Self {
            stream: Some(stream),
            options,
            server,
            input: vec![0; INPUT_LEN],
            start: 0,
            end: 0,
            pending: Vec::with_capacity(INPUT_LEN),
            out: vec![0; 16 * 1024],
            scratch: Vec::new(),
            export: if options.oldstyle { Some(0) } else { None },
            ids: Vec::new(),
            extents: Vec::new(),
            write: None,
            exact_reads: false,
        })
    }

    fn stream(&mut self) -> &mut Box<dyn Stream> {
        // invariant: the stream is only taken out for the duration of the TLS handshake.
        self.stream.as_mut().expect("stream present")
    }

    fn run(&mut self) -> Result<(), ServeError> {
        loop {
            self.collect()?;
            if self.server.is_finished() {
                self.flush()?;
                return match self.server.error() {
                    Some(e) => Err(e.into()),
                    None => Ok(()),
                };
            }
            match self.server.wants() {
                Want::Bytes(n) => {
                    if self.end - self.start < n && !self.read_at_least(n)? {
                        if self.end > self.start {
                            // Let the machine see the partial message before the end.
                            let _ = self.server.handle_input(&self.input[self.start..self.end]);
                        }
                        self.server.handle_eof()?;
                        continue;
                    }
                    self.handle_message()?;
                }
                Want::Payload { len, .. } => self.receive_write(len)?,
                Want::Discard { len } => {
                    let mut n = len.min(self.end - self.start);
                    if n > 0 {
                        self.start += n;
                    } else {
                        self.flush()?;
                        let mut drop = [0u8; 16384];
                        n = len.min(drop.len());
                        self.stream().read_exact(&mut drop[..n])?;
                    }
                    self.server.handle_payload(n)?;
                }
                Want::Nothing => match self.server.state() {
                    State::StartTls => self.start_tls()?,
                    State::Closed | State::Dead | State::Disconnecting => {
                        self.flush()?;
                        return Ok(());
                    }
                    state => {
                        return Err(io::Error::other(format!("server stalled in {state:?}")).into())
                    }
                },
            }
        }
    }

    /// Reads until the input holds at least `n` unconsumed bytes, taking whatever more the
    /// socket has. Sends pending output first: the client may be waiting for it. False at
    /// the end of the stream.
    fn read_at_least(&mut self, n: usize) -> Result<bool, ServeError> {
        self.flush()?;
        if self.start > 0 {
            self.input.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.input.len() < n {
            self.input.resize(n, 0);
        }
        // After a large write, read only the next header: if another large write follows,
        // its payload then goes straight from the socket into the backend instead of
        // through this buffer. Small requests are read in batches.
        let limit = if self.exact_reads {
            n
        } else {
            self.input.len()
        };
        while self.end < n {
            // invariant: the stream is only taken out during the TLS handshake.
            let stream = self.stream.as_mut().expect("stream");
            match stream.read(&mut self.input[self.end..limit]) {
                Ok(0) => return Ok(false),
                Ok(k) => self.end += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    fn handle_message(&mut self) -> Result<(), ServeError> {
        let input = std::mem::take(&mut self.input);
        let handled = match self.server.handle_input(&input[self.start..self.end]) {
            Ok(h) => h,
            Err(e) => {
                self.input = input;
                return Err(e.into());
            }
        };
        let consumed = handled.consumed;
        let result = match handled.event {
            Some(event) => self.handle_event(event),
            None => Ok(()),
        };
        self.input = input;
        self.start += consumed;
        result
    }

    fn handle_event(&mut self, event: ServerEvent<'_>) -> Result<(), ServeError> {
        let options = self.options;
        match event {
            ServerEvent::List => {
                let tls = self.server.tls_active();
                for e in options.exports.iter().filter(|e| !e.tls_only || tls) {
                    self.server
                        .answer_list_entry(&e.name, e.description.as_deref().unwrap_or(""))?;
                    self.collect()?;
                }
                self.server.answer_ack()?;
            }
            ServerEvent::Export(q) => match options.exports.iter().position(|e| e.name == q.name) {
                Some(i) => {
                    self.server.answer_export(&options.exports[i].info())?;
                    if q.kind != ExportQueryKind::Info && self.server.state() == State::Transmission
                    {
                        self.export = Some(i);
                    }
                }
                None => self
                    .server
                    .answer_error(OptError::UnknownExport, "no such export")?,
            },
            ServerEvent::MetaContexts(q) => self.answer_meta(&q)?,
            ServerEvent::StartTls | ServerEvent::Disconnect => {}
            ServerEvent::Request { request, ids } => {
                self.ids.clear();
                match ids {
                    Some(ids) => self.ids.extend(ids.iter()),
                    None => self.ids.extend(self.server.contexts()),
                }
                self.request(request)?
            }
        }
        Ok(())
    }

    fn answer_meta(&mut self, q: &MetaContextQuery<'_>) -> Result<(), ServeError> {
        let Some(export) = self.options.find(q.export) else {
            self.server
                .answer_error(OptError::UnknownExport, "no such export")?;
            return Ok(());
        };
        let names = export.backend.meta_contexts();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let selected: Vec<&str> = q.matching(&refs).collect();
        for name in selected {
            // IDs are the index in the backend's list: stable for the connection.
            let id = refs.iter().position(|n| *n == name).unwrap_or(0) as u32;
            self.server.answer_meta_context(id, name)?;
            self.collect()?;
        }
        self.server.answer_ack()?;
        Ok(())
    }

    fn backend(&self) -> &Arc<dyn Backend> {
        // invariant: requests only arrive in transmission, after an export was chosen.
        &self.options.exports[self.export.unwrap_or(0)].backend
    }

    fn request(&mut self, req: Request) -> Result<(), ServeError> {
        let fua = req.flags.contains(CmdFlags::FUA);
        let backend = self.backend().clone();
        let cookie = req.cookie;
        let result = match req.command {
            Command::Read => return self.read(req),
            Command::Write => {
                self.write = Some(req);
                return Ok(());
            }
            Command::Flush => backend.flush(),
            Command::Trim => backend.trim(req.offset, req.len, fua),
            Command::Cache => backend.cache(req.offset, req.len),
            Command::WriteZeroes => backend.write_zeroes(
                req.offset,
                req.len,
                req.flags.contains(CmdFlags::NO_HOLE),
                req.flags.contains(CmdFlags::FAST_ZERO),
                fua,
            ),
            Command::BlockStatus => return self.block_status(req),
            _ => Err(io::ErrorKind::InvalidInput.into()),
        };
        self.server
            .reply(cookie, result.map_err(|e| Errno::from(&e)))?;
        Ok(())
    }

    /// Serves a read: the backend hands over its data (its own memory if it can), and the
    /// reply header goes out with it in one vectored write.
    fn read(&mut self, req: Request) -> Result<(), ServeError> {
        // invariant: the machine checked the length against the maximum payload (u32).
        let len = req.len as usize;
        let backend = self.backend().clone();
        let mut started = false;
        let mut send_error: Option<ServeError> = None;
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = backend.read_to(req.offset, len, &mut scratch, &mut |slices| {
            let r = self.send_read_piece(&req, len, started, slices);
            started = true;
            r.map_err(|e| {
                send_error = Some(e);
                io::Error::other("send failed")
            })
        });
        self.scratch = scratch;
        if let Some(e) = send_error {
            return Err(e);
        }
        if let Err(e) = result {
            if started {
                // The data was promised: the connection cannot recover.
                return Err(e.into());
            }
            self.server
                .reply_error(req.cookie, Errno::from(&e), &e.to_string())?;
        }
        Ok(())
    }

    /// Writes one piece of read data; the first piece goes out behind the reply header.
    fn send_read_piece(
        &mut self,
        req: &Request,
        len: usize,
        started: bool,
        slices: &[&[u8]],
    ) -> Result<(), ServeError> {
        if !started {
            self.server.reply_read_data(req.cookie, req.offset, len)?;
            // The framing up to the payload marker joins the pending bytes.
            loop {
                match self.server.poll_transmit(&mut self.out)? {
                    Some(Transmit::Bytes(n)) => self.pending.extend_from_slice(&self.out[..n]),
                    Some(Transmit::Payload { .. }) => break,
                    other => {
                        return Err(
                            io::Error::other(format!("unexpected transmit {other:?}")).into()
                        )
                    }
                }
            }
        }
        let pending = std::mem::take(&mut self.pending);
        let r = write_all_slices(self.stream(), &pending, slices);
        self.pending = pending;
        self.pending.clear();
        r.map_err(Into::into)
    }

    /// Moves a write's payload from the socket into the backend (straight into its memory
    /// if it can), then replies.
    fn receive_write(&mut self, len: usize) -> Result<(), ServeError> {
        let Some(req) = self.write.take() else {
            return Err(io::Error::other("payload without a write").into());
        };
        let backend = self.backend().clone();
        let fua = req.flags.contains(CmdFlags::FUA);
        self.exact_reads = len >= LARGE_WRITE;
        let mut eof = false;
        let mut read_error: Option<io::Error> = None;
        let mut scratch = std::mem::take(&mut self.scratch);
        let (input, start, end) = (&self.input, &mut self.start, self.end);
        // invariant: the stream is only taken out during the TLS handshake.
        let stream = self.stream.as_mut().expect("stream");
        let result = backend.write_from(req.offset, len, fua, &mut scratch, &mut |dests| {
            // Bytes already read come first, the rest straight from the socket.
            let mut bufs: ArrayVec<IoSliceMut<'_>, 64> = ArrayVec::new();
            for dest in dests.iter_mut() {
                let have = (end - *start).min(dest.len());
                dest[..have].copy_from_slice(&input[*start..*start + have]);
                *start += have;
                if have < dest.len() && !bufs.is_full() {
                    bufs.push(IoSliceMut::new(&mut dest[have..]));
                }
            }
            read_all_vectored(stream, &mut bufs).inspect_err(|e| {
                eof = e.kind() == io::ErrorKind::UnexpectedEof;
                read_error = Some(io::Error::new(e.kind(), e.to_string()));
            })
        });
        self.scratch = scratch;
        if let Some(e) = read_error {
            if eof {
                let _ = self.server.handle_eof();
            }
            return Err(e.into());
        }
        self.server.handle_payload(len)?;
        self.server
            .reply(req.cookie, result.map_err(|e| Errno::from(&e)))?;
        Ok(())
    }

    fn block_status(&mut self, req: Request) -> Result<(), ServeError> {
        let backend = self.backend().clone();
        for i in 0..self.ids.len() {
            let id = self.ids[i];
            self.extents.clear();
            // A REQ_ONE reply sends one extent; any other sends what fits the machine's
            // output buffer (64 KiB: at most 8192 descriptors).
            let max = if req.flags.contains(CmdFlags::REQ_ONE) {
                1
            } else {
                8192
            };
            if let Err(e) =
                backend.extents(id as usize, req.offset, req.len, max, &mut self.extents)
            {
                self.server
                    .reply_error(req.cookie, Errno::from(&e), &e.to_string())?;
                return Ok(());
            }
            if !self.extents.iter().any(|e| e.len > 0) {
                // Nothing known: one extent of status 0, which is always safe.
                self.extents.push(Extent {
                    len: req.len,
                    status: 0,
                });
            }
            self.server
                .reply_block_status(req.cookie, id, &self.extents)?;
            self.collect()?;
        }
        Ok(())
    }

    fn start_tls(&mut self) -> Result<(), ServeError> {
        let Some(tls) = self.options.tls.clone() else {
            return Err(io::Error::other("STARTTLS accepted without a TLS acceptor").into());
        };
        self.flush()?;
        if self.end > self.start {
            // Plaintext that arrived behind STARTTLS: the machine refuses it.
            let _refused = self
                .server
                .handle_input(&self.input[self.start..self.end])?;
        }
        // invariant: the stream is present outside this function.
        let stream = self.stream.take().expect("stream");
        self.stream = Some(tls.accept(stream)?);
        self.server.tls_established()?;
        Ok(())
    }

    /// Moves what the machine has queued into `pending`. Read data never comes here: reads
    /// are sent as they are served.
    fn collect(&mut self) -> Result<(), ServeError> {
        loop {
            match self.server.poll_transmit(&mut self.out)? {
                None => return Ok(()),
                Some(Transmit::Bytes(n)) => self.pending.extend_from_slice(&self.out[..n]),
                Some(Transmit::Zeroes { len, .. }) => {
                    self.flush()?;
                    let mut left = len;
                    while left > 0 {
                        let n = left.min(ZEROES.len());
                        self.stream().write_all(&ZEROES[..n])?;
                        left -= n;
                    }
                }
                Some(Transmit::Payload { .. }) => {
                    return Err(io::Error::other("read data outside a read").into())
                }
            }
        }
    }

    /// Writes the pending output.
    fn flush(&mut self) -> Result<(), ServeError> {
        self.collect()?;
        if !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            let r = self.stream().write_all(&pending);
            self.pending = pending;
            self.pending.clear();
            r?;
        }
        self.stream().flush()?;
        Ok(())
    }
}

/// Fills every buffer of `bufs` from `r`, with as few system calls as the stream allows.
fn read_all_vectored<R: Read + ?Sized>(
    r: &mut R,
    mut bufs: &mut [IoSliceMut<'_>],
) -> io::Result<()> {
    while !bufs.is_empty() {
        match r.read_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => IoSliceMut::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes `head` then every slice of `rest` with as few system calls as the stream allows.
pub(crate) fn write_all_slices<W: Write + ?Sized>(
    w: &mut W,
    head: &[u8],
    rest: &[&[u8]],
) -> io::Result<()> {
    // A small fixed array of slices: no allocation per write.
    const MAX: usize = 64;
    let mut at = 0;
    let mut first = !head.is_empty();
    while at < rest.len() || first {
        let mut bufs: [IoSlice<'_>; MAX] = [IoSlice::new(&[]); MAX];
        let mut n = 0;
        if first {
            bufs[0] = IoSlice::new(head);
            n = 1;
        }
        let take = (rest.len() - at).min(MAX - n);
        for (b, s) in bufs[n..n + take].iter_mut().zip(&rest[at..at + take]) {
            *b = IoSlice::new(s);
        }
        n += take;
        super::write_all_vectored(w, &mut bufs[..n])?;
        first = false;
        at += take;
    }
    Ok(())
}

/// A sparse in-memory disk, in 64 KiB pages allocated on first write, safe to share
/// between connections. It reports `base:allocation` (unallocated pages are holes that read
/// as zeroes) and punches holes on trim and zeroing. (To serve it read-only, set
/// [`Export::read_only`].)
pub struct MemoryBackend {
    size: u64,
    pages: Vec<RwLock<Option<Box<[u8]>>>>,
}

const PAGE: u64 = 64 * 1024;

/// Pages locked together by `read_to` and `write_from`, so that one vectored socket call
/// moves up to 1 MiB.
const GROUP: usize = 16;

/// One page's part of a byte range: bytes `from..to` of page `page`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    page: usize,
    from: usize,
    to: usize,
}

impl Span {
    fn len(&self) -> usize {
        self.to - self.from
    }
}

/// The pages `[offset, offset + len)` touches, in order, each with the part of it inside
/// the range (nothing for an empty range).
fn spans(offset: u64, len: u64) -> impl Iterator<Item = Span> {
    let end = offset + len;
    let pages = if len == 0 {
        0..0
    } else {
        offset / PAGE..end.div_ceil(PAGE)
    };
    pages.map(move |p| {
        let start = p * PAGE;
        Span {
            page: p as usize,
            from: (offset.max(start) - start) as usize,
            to: (end.min(start + PAGE) - start) as usize,
        }
    })
}

/// Up to [`GROUP`] spans at a time.
fn groups(offset: u64, len: u64) -> impl Iterator<Item = ArrayVec<Span, GROUP>> {
    let mut spans = spans(offset, len).peekable();
    core::iter::from_fn(move || {
        spans.peek()?;
        Some(spans.by_ref().take(GROUP).collect())
    })
}

impl MemoryBackend {
    /// A zeroed disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        let pages = size.div_ceil(PAGE) as usize;
        Self {
            size,
            pages: (0..pages).map(|_| RwLock::new(None)).collect(),
        }
    }

    fn page(&self, i: usize) -> &RwLock<Option<Box<[u8]>>> {
        // invariant: callers went through check_range.
        &self.pages[i]
    }

    /// The server checks every request against the export size; a direct caller gets an
    /// error for a range past the end rather than a panic.
    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range past the end of the disk",
            )),
        }
    }

    /// Zeroes `[offset, offset + len)`, freeing whole pages.
    fn zero_range(&self, offset: u64, len: u64) {
        for s in spans(offset, len) {
            let mut page = self.page(s.page).write().unwrap_or_else(|e| e.into_inner());
            if s.len() as u64 == PAGE {
                *page = None;
            } else if let Some(data) = page.as_mut() {
                data[s.from..s.to].fill(0);
            }
        }
    }
}

impl Backend for MemoryBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn flags(&self) -> TransmissionFlags {
        TransmissionFlags::SEND_FLUSH
            | TransmissionFlags::SEND_FUA
            | TransmissionFlags::SEND_TRIM
            | TransmissionFlags::SEND_WRITE_ZEROES
            | TransmissionFlags::SEND_FAST_ZERO
            | TransmissionFlags::SEND_CACHE
            | TransmissionFlags::SEND_DF
            | TransmissionFlags::CAN_MULTI_CONN
            | TransmissionFlags::BLOCK_STATUS_PAYLOAD
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut at = 0usize;
        for s in spans(offset, buf.len() as u64) {
            let out = &mut buf[at..at + s.len()];
            match self
                .page(s.page)
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                Some(data) => out.copy_from_slice(&data[s.from..s.to]),
                None => out.fill(0),
            }
            at += s.len();
        }
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8], _fua: bool) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut at = 0usize;
        for s in spans(offset, buf.len() as u64) {
            let mut page = self.page(s.page).write().unwrap_or_else(|e| e.into_inner());
            let data = page.get_or_insert_with(|| vec![0; PAGE as usize].into_boxed_slice());
            data[s.from..s.to].copy_from_slice(&buf[at..at + s.len()]);
            at += s.len();
        }
        Ok(())
    }

    fn read_to(
        &self,
        offset: u64,
        len: usize,
        _scratch: &mut Vec<u8>,
        send: &mut dyn FnMut(&[&[u8]]) -> io::Result<()>,
    ) -> io::Result<()> {
        self.check_range(offset, len as u64)?;
        // GROUP pages at a time, read-locked while the kernel copies them out.
        let zero_page = &ZEROES[..PAGE as usize];
        for group in groups(offset, len as u64) {
            let guards: ArrayVec<_, GROUP> = group
                .iter()
                .map(|s| self.page(s.page).read().unwrap_or_else(|e| e.into_inner()))
                .collect();
            let slices: ArrayVec<&[u8], GROUP> = guards
                .iter()
                .zip(&group)
                .map(|(g, s)| match g.as_ref() {
                    Some(data) => &data[s.from..s.to],
                    None => &zero_page[s.from..s.to],
                })
                .collect();
            send(&slices)?;
        }
        Ok(())
    }

    fn write_from(
        &self,
        offset: u64,
        len: usize,
        _fua: bool,
        _scratch: &mut Vec<u8>,
        fill: &mut dyn FnMut(&mut [&mut [u8]]) -> io::Result<()>,
    ) -> io::Result<()> {
        self.check_range(offset, len as u64)?;
        // GROUP pages at a time, write-locked while the kernel copies into them.
        for group in groups(offset, len as u64) {
            let mut guards: ArrayVec<_, GROUP> = group
                .iter()
                .map(|s| self.page(s.page).write().unwrap_or_else(|e| e.into_inner()))
                .collect();
            let mut slices: ArrayVec<&mut [u8], GROUP> = guards
                .iter_mut()
                .zip(&group)
                .map(|(g, s)| {
                    let data = g.get_or_insert_with(|| vec![0; PAGE as usize].into_boxed_slice());
                    &mut data[s.from..s.to]
                })
                .collect();
            fill(&mut slices)?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        self.check_range(offset, len)?;
        self.zero_range(offset, len);
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        _fast: bool,
        _fua: bool,
    ) -> io::Result<()> {
        self.check_range(offset, len)?;
        if no_hole {
            // Allocated zeroes: every page in the range exists afterwards.
            for s in spans(offset, len) {
                let mut page = self.page(s.page).write().unwrap_or_else(|e| e.into_inner());
                let data = page.get_or_insert_with(|| vec![0; PAGE as usize].into_boxed_slice());
                data[s.from..s.to].fill(0);
            }
        } else {
            self.zero_range(offset, len);
        }
        Ok(())
    }

    fn meta_contexts(&self) -> Vec<String> {
        vec![String::from("base:allocation")]
    }

    fn extents(
        &self,
        _context: usize,
        offset: u64,
        len: u64,
        max: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        let first = out.len();
        let end = offset.saturating_add(len).min(self.size);
        for s in spans(offset, end.saturating_sub(offset)) {
            let n = s.len() as u64;
            let allocated = self
                .page(s.page)
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .is_some();
            let status = if allocated {
                0
            } else {
                STATE_HOLE | STATE_ZERO
            };
            let ours = out.len() - first;
            match out.last_mut() {
                Some(last) if ours > 0 && last.status == status => last.len += n,
                _ if ours == max => break,
                _ => out.push(Extent { len: n, status }),
            }
        }
        Ok(())
    }
}

/// Wraps a backend to track which blocks were written (by writes, trims or zeroing) since
/// it was created, and serves that as the metadata context `qemu:dirty-bitmap:NAME`
/// (status 1 = dirty), as QEMU does for incremental backups.
pub struct DirtyBitmap {
    inner: Arc<dyn Backend>,
    name: String,
    granularity: u64,
    bits: RwLock<Vec<u64>>,
}

impl DirtyBitmap {
    /// Tracks `inner` in blocks of `granularity` bytes (a power of two; 64 KiB is QEMU's
    /// default).
    pub fn new(inner: Arc<dyn Backend>, name: &str, granularity: u64) -> Self {
        let granularity = granularity.max(1).next_power_of_two();
        let blocks = inner.size().div_ceil(granularity);
        Self {
            inner,
            name: format!("qemu:dirty-bitmap:{name}"),
            granularity,
            bits: RwLock::new(vec![0; blocks.div_ceil(64) as usize]),
        }
    }

    fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut bits = self.bits.write().unwrap_or_else(|e| e.into_inner());
        for b in offset / self.granularity..=(offset + len - 1) / self.granularity {
            if let Some(word) = bits.get_mut((b / 64) as usize) {
                *word |= 1 << (b % 64);
            }
        }
    }

    fn dirty(&self, block: u64) -> bool {
        let bits = self.bits.read().unwrap_or_else(|e| e.into_inner());
        bits.get((block / 64) as usize)
            .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }
}

impl Backend for DirtyBitmap {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn flags(&self) -> TransmissionFlags {
        self.inner.flags()
    }
    fn block_size(&self) -> Option<BlockSize> {
        self.inner.block_size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        self.mark(offset, buf.len() as u64);
        self.inner.write(offset, buf, fua)
    }
    fn read_to(
        &self,
        offset: u64,
        len: usize,
        scratch: &mut Vec<u8>,
        send: &mut dyn FnMut(&[&[u8]]) -> io::Result<()>,
    ) -> io::Result<()> {
        self.inner.read_to(offset, len, scratch, send)
    }
    fn write_from(
        &self,
        offset: u64,
        len: usize,
        fua: bool,
        scratch: &mut Vec<u8>,
        fill: &mut dyn FnMut(&mut [&mut [u8]]) -> io::Result<()>,
    ) -> io::Result<()> {
        self.mark(offset, len as u64);
        self.inner.write_from(offset, len, fua, scratch, fill)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.mark(offset, len);
        self.inner.trim(offset, len, fua)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast: bool,
        fua: bool,
    ) -> io::Result<()> {
        let r = self.inner.write_zeroes(offset, len, no_hole, fast, fua);
        if r.is_ok() {
            self.mark(offset, len);
        }
        r
    }
    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.cache(offset, len)
    }
    fn meta_contexts(&self) -> Vec<String> {
        let mut v = self.inner.meta_contexts();
        v.push(self.name.clone());
        v
    }
    fn extents(
        &self,
        context: usize,
        offset: u64,
        len: u64,
        max: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        let ours = self.inner.meta_contexts().len();
        if context != ours {
            return self.inner.extents(context, offset, len, max, out);
        }
        let first = out.len();
        let end = offset.saturating_add(len).min(self.size());
        let mut at = offset;
        while at < end {
            let block = at / self.granularity;
            let n = (self.granularity - at % self.granularity).min(end - at);
            let status = u64::from(self.dirty(block));
            let ours = out.len() - first;
            match out.last_mut() {
                Some(last) if ours > 0 && last.status == status => last.len += n,
                _ if ours == max => break,
                _ => out.push(Extent { len: n, status }),
            }
            at += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_cover_a_range_page_by_page() {
        assert_eq!(spans(PAGE - 2, 0).count(), 0);
        assert_eq!(spans(3, 0).count(), 0);
        let v: Vec<Span> = spans(PAGE - 2, PAGE + 4).collect();
        assert_eq!(
            v,
            [
                Span {
                    page: 0,
                    from: PAGE as usize - 2,
                    to: PAGE as usize
                },
                Span {
                    page: 1,
                    from: 0,
                    to: PAGE as usize
                },
                Span {
                    page: 2,
                    from: 0,
                    to: 2
                },
            ]
        );
        assert_eq!(
            spans(2 * PAGE, PAGE).collect::<Vec<_>>(),
            [Span {
                page: 2,
                from: 0,
                to: PAGE as usize
            }]
        );
        let sizes: Vec<usize> = groups(1, 40 * PAGE).map(|g| g.len()).collect();
        assert_eq!(sizes, [GROUP, GROUP, 41 - 2 * GROUP]);
        assert_eq!(groups(0, 0).count(), 0);
    }

    #[test]
    fn memory_backend_is_sparse() {
        let m = MemoryBackend::new(1 << 20);
        let mut buf = [0xffu8; 100];
        m.read(1000, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0));
        m.write(PAGE - 2, b"abcd", false).unwrap();
        m.read(PAGE - 2, &mut buf[..4]).unwrap();
        assert_eq!(&buf[..4], b"abcd");
        let mut ex = Vec::new();
        m.extents(0, 0, 4 * PAGE, usize::MAX, &mut ex).unwrap();
        assert_eq!(
            ex,
            [
                Extent {
                    len: 2 * PAGE,
                    status: 0
                },
                Extent {
                    len: 2 * PAGE,
                    status: STATE_HOLE | STATE_ZERO
                }
            ]
        );
        m.trim(0, PAGE, false).unwrap();
        ex.clear();
        m.extents(0, 0, 2 * PAGE, usize::MAX, &mut ex).unwrap();
        assert_eq!(
            ex,
            [
                Extent {
                    len: PAGE,
                    status: 3
                },
                Extent {
                    len: PAGE,
                    status: 0
                }
            ]
        );
        m.read(PAGE, &mut buf[..2]).unwrap();
        assert_eq!(&buf[..2], b"cd");
    }

    #[test]
    fn dirty_bitmap() {
        let m = DirtyBitmap::new(Arc::new(MemoryBackend::new(1 << 20)), "b", PAGE);
        assert_eq!(
            m.meta_contexts(),
            ["base:allocation", "qemu:dirty-bitmap:b"]
        );
        m.write(3 * PAGE + 5, b"x", false).unwrap();
        let mut ex = Vec::new();
        m.extents(1, 0, 8 * PAGE, usize::MAX, &mut ex).unwrap();
        assert_eq!(
            ex,
            [
                Extent {
                    len: 3 * PAGE,
                    status: 0
                },
                Extent {
                    len: PAGE,
                    status: 1
                },
                Extent {
                    len: 4 * PAGE,
                    status: 0
                }
            ]
        );
    }

    #[test]
    fn vectored_write_handles_short_writes() {
        struct Dribble(Vec<u8>);
        impl Write for Dribble {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                let n = b.len().min(3);
                self.0.extend_from_slice(&b[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut d = Dribble(Vec::new());
        write_all_slices(&mut d, b"hello", &[b" wor", b"", b"ld"]).unwrap();
        assert_eq!(d.0, b"hello world");
    }

    #[test]
    fn extents_stop_at_max() {
        let m = MemoryBackend::new(1 << 30);
        for p in (0..64).step_by(2) {
            m.write(p * PAGE, b"x", false).unwrap();
        }
        let mut ex = Vec::new();
        // One extent, merged over the long hole after the data: REQ_ONE costs O(1) pages of
        // work per allocated run, not O(export).
        m.extents(0, 64 * PAGE, (1 << 30) - 64 * PAGE, 1, &mut ex)
            .unwrap();
        assert_eq!(
            ex,
            [Extent {
                len: (1 << 30) - 64 * PAGE,
                status: STATE_HOLE | STATE_ZERO
            }]
        );
        ex.clear();
        m.extents(0, 0, 1 << 30, 3, &mut ex).unwrap();
        assert_eq!(ex.len(), 3);
        assert_eq!(
            ex[0],
            Extent {
                len: PAGE,
                status: 0
            }
        );
    }

    #[test]
    fn memory_backend_refuses_ranges_past_the_end() {
        let m = MemoryBackend::new(PAGE);
        let mut buf = [0u8; 2];
        assert!(m.read(PAGE - 1, &mut buf).is_err());
        assert!(m.write(u64::MAX, b"x", false).is_err());
        assert!(m.trim(PAGE, 1, false).is_err());
        assert!(m.read(PAGE - 2, &mut buf).is_ok());
    }
}
