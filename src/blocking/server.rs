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
use std::io::{self, IoSlice, Read, Write};
use std::string::{String, ToString};
use std::sync::{Arc, RwLock};
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
        if let Some(b) = self.backend.block_size() {
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

struct Connection<'o> {
    stream: Option<Box<dyn Stream>>,
    options: &'o Options,
    server: Box<Server>,
    /// Input: exactly the bytes of the message being read.
    input: Vec<u8>,
    /// Output: encoded bytes not yet written.
    out: Vec<u8>,
    /// Data of the request being served (read data or write payload).
    data: Vec<u8>,
    export: Option<usize>,
    /// Context IDs a block-status request asks for. An ID is the index of the context in
    /// the backend's [`Backend::meta_contexts`].
    ids: Vec<u32>,
    extents: Vec<Extent>,
    /// The write whose payload is being read.
    write: Option<Request>,
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
            input: Vec::with_capacity(64),
            out: vec![0; 64 * 1024],
            data: Vec::new(),
            export: if options.oldstyle { Some(0) } else { None },
            ids: Vec::new(),
            extents: Vec::new(),
            write: None,
        })
    }

    fn stream(&mut self) -> &mut Box<dyn Stream> {
        // invariant: the stream is only taken out for the duration of the TLS handshake.
        self.stream.as_mut().expect("stream present")
    }

    fn run(&mut self) -> Result<(), ServeError> {
        loop {
            self.flush_output()?;
            if self.server.is_finished() {
                return match self.server.error() {
                    Some(e) => Err(e.into()),
                    None => Ok(()),
                };
            }
            match self.server.wants() {
                Want::Bytes(n) => {
                    if !self.fill(n)? {
                        self.server.handle_eof()?;
                        continue;
                    }
                    self.handle_message()?;
                }
                Want::Payload { len, .. } => self.read_payload(len)?,
                Want::Discard { len } => {
                    let mut scratch = [0u8; 16384];
                    let n = len.min(scratch.len());
                    self.stream().read_exact(&mut scratch[..n])?;
                    self.server.handle_payload(n)?;
                }
                Want::Nothing => match self.server.state() {
                    State::StartTls => self.start_tls()?,
                    State::Closed | State::Dead | State::Disconnecting => return Ok(()),
                    state => {
                        return Err(io::Error::other(format!("server stalled in {state:?}")).into())
                    }
                },
            }
        }
    }

    /// Reads until `self.input` holds `n` bytes. False at a clean end of file.
    fn fill(&mut self, n: usize) -> Result<bool, ServeError> {
        let have = self.input.len();
        if have < n {
            self.input.resize(n, 0);
            let mut at = have;
            while at < n {
                // invariant: taken only during the TLS handshake.
                match self
                    .stream
                    .as_mut()
                    .expect("stream")
                    .read(&mut self.input[at..n])
                {
                    Ok(0) => {
                        self.input.truncate(at);
                        if at > 0 {
                            // Let the machine see the partial message before the end.
                            let _ = self.server.handle_input(&self.input);
                        }
                        return Ok(false);
                    }
                    Ok(k) => at += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(true)
    }

    fn handle_message(&mut self) -> Result<(), ServeError> {
        let input = std::mem::take(&mut self.input);
        let result = self.server.handle_input(&input);
        let handled = match result {
            Ok(h) => h,
            Err(e) => {
                self.input = input;
                return Err(e.into());
            }
        };
        if let Some(event) = handled.event {
            self.handle_event(event)?;
        }
        let consumed = handled.consumed;
        self.input = input;
        self.input.drain(..consumed);
        Ok(())
    }

    fn handle_event(&mut self, event: ServerEvent<'_>) -> Result<(), ServeError> {
        let options = self.options;
        match event {
            ServerEvent::List => {
                let tls = self.server.tls_active();
                for e in options.exports.iter().filter(|e| !e.tls_only || tls) {
                    self.server
                        .answer_list_entry(&e.name, e.description.as_deref().unwrap_or(""))?;
                    self.flush_output()?;
                }
                self.server.answer_ack()?;
            }
            ServerEvent::Export(q) => match options.exports.iter().position(|e| e.name == q.name) {
                Some(i) => {
                    self.server.answer_export(&options.exports[i].info())?;
                    if q.kind != ExportQueryKind::Info && self.server.state() == State::Transmission
                    {
                        self.enter(i);
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
            self.flush_output()?;
        }
        self.server.answer_ack()?;
        Ok(())
    }

    fn enter(&mut self, export: usize) {
        self.export = Some(export);
    }

    fn backend(&self) -> &Arc<dyn Backend> {
        // invariant: requests only arrive in transmission, after `enter`.
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

    fn read(&mut self, req: Request) -> Result<(), ServeError> {
        // invariant: the machine checked the length against the maximum payload (u32).
        let len = req.len as usize;
        if self.data.len() < len {
            self.data.resize(len, 0);
        }
        match self
            .backend()
            .clone()
            .read(req.offset, &mut self.data[..len])
        {
            Ok(()) => self.server.reply_read_data(req.cookie, req.offset, len)?,
            Err(e) => self
                .server
                .reply_error(req.cookie, Errno::from(&e), &e.to_string())?,
        }
        Ok(())
    }

    fn read_payload(&mut self, len: usize) -> Result<(), ServeError> {
        let Some(req) = self.write else {
            return Err(io::Error::other("payload without a write").into());
        };
        let total = req.len as usize;
        if self.data.len() < total {
            self.data.resize(total, 0);
        }
        let start = total - len;
        // invariant: the stream is only taken out during the TLS handshake.
        let stream = self.stream.as_mut().expect("stream");
        if let Err(e) = stream.read_exact(&mut self.data[start..total]) {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                let _ = self.server.handle_eof();
            }
            return Err(e.into());
        }
        self.server.handle_payload(len)?;
        self.write = None;
        let result = self.backend().clone().write(
            req.offset,
            &self.data[..total],
            req.flags.contains(CmdFlags::FUA),
        );
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
            self.flush_output()?;
        }
        Ok(())
    }

    fn start_tls(&mut self) -> Result<(), ServeError> {
        let Some(tls) = self.options.tls.clone() else {
            return Err(io::Error::other("STARTTLS accepted without a TLS acceptor").into());
        };
        // invariant: the stream is present outside this function.
        let stream = self.stream.take().expect("stream");
        self.stream = Some(tls.accept(stream)?);
        self.server.tls_established()?;
        Ok(())
    }

    /// Sends everything the machine has queued: header bytes gathered into one buffer,
    /// written together with the payload that follows them.
    fn flush_output(&mut self) -> Result<(), ServeError> {
        let mut filled = 0;
        loop {
            let t = match self.server.poll_transmit(&mut self.out[filled..]) {
                Ok(t) => t,
                Err(Error::BufferTooSmall { .. }) => {
                    self.write_all_out(filled, &[])?;
                    filled = 0;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            match t {
                None => break,
                Some(Transmit::Bytes(n)) => filled += n,
                Some(Transmit::Payload { len, .. }) => {
                    // Header and data in one vectored write; the read being served starts
                    // at index 0 of the data buffer.
                    let data = std::mem::take(&mut self.data);
                    let r = self.write_all_out(filled, &data[..len]);
                    self.data = data;
                    r?;
                    filled = 0;
                }
                Some(Transmit::Zeroes { len, .. }) => {
                    self.write_all_out(filled, &[])?;
                    filled = 0;
                    let mut left = len;
                    while left > 0 {
                        let n = left.min(ZEROES.len());
                        self.stream().write_all(&ZEROES[..n])?;
                        left -= n;
                    }
                }
            }
        }
        self.write_all_out(filled, &[])?;
        self.stream().flush()?;
        Ok(())
    }

    fn write_all_out(&mut self, filled: usize, payload: &[u8]) -> io::Result<()> {
        let out = std::mem::take(&mut self.out);
        let r = write_all_vectored(self.stream(), &out[..filled], payload);
        self.out = out;
        r
    }
}

/// Writes `a` then `b` with as few system calls as the stream allows.
pub(crate) fn write_all_vectored<W: Write + ?Sized>(
    w: &mut W,
    mut a: &[u8],
    mut b: &[u8],
) -> io::Result<()> {
    while !a.is_empty() || !b.is_empty() {
        let n = if a.is_empty() {
            w.write(b)?
        } else if b.is_empty() {
            w.write(a)?
        } else {
            w.write_vectored(&[IoSlice::new(a), IoSlice::new(b)])?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}

/// A sparse in-memory disk, in 64 KiB pages allocated on first write, safe to share
/// between connections. It reports `base:allocation` (unallocated pages are holes that read
/// as zeroes) and punches holes on trim and zeroing.
pub struct MemoryBackend {
    size: u64,
    pages: Vec<RwLock<Option<Box<[u8]>>>>,
    read_only: bool,
}

const PAGE: u64 = 64 * 1024;

impl MemoryBackend {
    /// A zeroed disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        let pages = size.div_ceil(PAGE) as usize;
        Self {
            size,
            pages: (0..pages).map(|_| RwLock::new(None)).collect(),
            read_only: false,
        }
    }

    /// Refuse writes.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    fn page(&self, i: usize) -> &RwLock<Option<Box<[u8]>>> {
        &self.pages[i]
    }

    /// Zeroes `[offset, offset + len)`, freeing whole pages.
    fn zero_range(&self, offset: u64, len: u64) {
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let p = at / PAGE;
            let in_page = (at % PAGE) as usize;
            let n = ((PAGE - at % PAGE).min(end - at)) as usize;
            let mut page = self
                .page(p as usize)
                .write()
                .unwrap_or_else(|e| e.into_inner());
            if n as u64 == PAGE {
                *page = None;
            } else if let Some(data) = page.as_mut() {
                data[in_page..in_page + n].fill(0);
            }
            at += n as u64;
        }
    }
}

impl Backend for MemoryBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn flags(&self) -> TransmissionFlags {
        let mut f = TransmissionFlags::SEND_FLUSH
            | TransmissionFlags::SEND_FUA
            | TransmissionFlags::SEND_TRIM
            | TransmissionFlags::SEND_WRITE_ZEROES
            | TransmissionFlags::SEND_FAST_ZERO
            | TransmissionFlags::SEND_CACHE
            | TransmissionFlags::SEND_DF
            | TransmissionFlags::CAN_MULTI_CONN
            | TransmissionFlags::BLOCK_STATUS_PAYLOAD;
        if self.read_only {
            f |= TransmissionFlags::READ_ONLY;
        }
        f
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut at = 0usize;
        while at < buf.len() {
            let pos = offset + at as u64;
            let p = (pos / PAGE) as usize;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(buf.len() - at);
            let page = self.page(p).read().unwrap_or_else(|e| e.into_inner());
            match page.as_ref() {
                Some(data) => buf[at..at + n].copy_from_slice(&data[in_page..in_page + n]),
                None => buf[at..at + n].fill(0),
            }
            at += n;
        }
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8], _fua: bool) -> io::Result<()> {
        let mut at = 0usize;
        while at < buf.len() {
            let pos = offset + at as u64;
            let p = (pos / PAGE) as usize;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(buf.len() - at);
            let mut page = self.page(p).write().unwrap_or_else(|e| e.into_inner());
            let data = page.get_or_insert_with(|| vec![0; PAGE as usize].into_boxed_slice());
            data[in_page..in_page + n].copy_from_slice(&buf[at..at + n]);
            at += n;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
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
        if no_hole {
            // Allocated zeroes: write them.
            let zeroes = vec![0u8; (len.min(PAGE)) as usize];
            let mut at = 0;
            while at < len {
                let n = (len - at).min(PAGE);
                self.write(offset + at, &zeroes[..n as usize], false)?;
                at += n;
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
        let mut at = offset;
        while at < end {
            let p = at / PAGE;
            let n = (PAGE - at % PAGE).min(end - at);
            let allocated = self
                .page(p as usize)
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
            at += n;
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
        write_all_vectored(&mut d, b"hello", b" world").unwrap();
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
}
