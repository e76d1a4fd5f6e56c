//! An NBD server on tokio: the sans-IO [`Server`] machine driven by an async runtime, one
//! task per connection, serving a sparse in-memory disk with `base:allocation`.
//!
//! ```text
//! cargo run --release --example tokio-server                    # 1 GiB on 127.0.0.1:10809
//! cargo run --release --example tokio-server -- --unix /tmp/nbd.sock --size 64M
//! qemu-img info nbd://127.0.0.1:10809                           # or: nbdinfo --map nbd://...
//! ```
//!
//! Options: `--listen ADDR:PORT` (TCP; port 0 picks a free one), `--unix PATH`, `--size SIZE`
//! (K/M/G suffixes), `--name NAME` (export name besides the default ""). Both `--listen` and
//! `--unix` may be given. The server prints `listening on ADDR` for each socket.
//!
//! How it drives the machine (see the run loop in the crate docs):
//!
//! - Requests are read exactly as long as `wants()` says, so a write payload never lands in
//!   the header buffer: it is read from the socket straight into the disk's pages.
//! - Read data goes from the disk's pages straight to the socket: the reply header and the
//!   page slices leave in one vectored write. Holes are sent as hole chunks (or zeroes, for
//!   simple replies), never copied.
//! - Clients pipeline up to 64 requests (the machine's in-flight bound); replies without
//!   data are batched and written before the next read that could block.
//! - Pages are `tokio::sync::RwLock`s, so a task may hold one across an `.await` while it
//!   streams data, and connections to the same disk run in parallel.

use std::io::{self, IoSlice};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::RwLock;

use nbd_proto::server::{ExportInfo, Server, ServerConfig, ServerEvent, State};
use nbd_proto::wire::extent::{STATE_HOLE, STATE_ZERO};
use nbd_proto::wire::{CmdFlags, Command, Errno, Extent, OptError, Request, TransmissionFlags};
use nbd_proto::{Transmit, Want};

/// Allocation unit of the disk.
const PAGE: u64 = 64 * 1024;

/// Zeroes for holes: in simple read replies, and for the unallocated pages of a DF read.
static ZEROES: [u8; PAGE as usize] = [0; PAGE as usize];

/// The only metadata context this disk describes.
const CONTEXTS: [&str; 1] = ["base:allocation"];

/// One page of the disk: `None` until written (a hole that reads as zeroes).
type Page = RwLock<Option<Box<[u8]>>>;

/// A sparse disk in pages allocated on first write.
struct Disk {
    size: u64,
    pages: Box<[Page]>,
}

impl Disk {
    fn new(size: u64) -> Self {
        let pages = (0..size.div_ceil(PAGE))
            .map(|_| RwLock::new(None))
            .collect();
        Self { size, pages }
    }

    /// The pages covering `[offset, offset + len)` (len > 0), as (page index, offset in
    /// the page, bytes) spans.
    fn spans(offset: u64, len: u64) -> impl Iterator<Item = (usize, usize, usize)> {
        let end = offset + len;
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let n = (PAGE - at % PAGE).min(end - at);
            let span = ((at / PAGE) as usize, (at % PAGE) as usize, n as usize);
            at += n;
            Some(span)
        })
    }

    /// Zeroes a range: whole pages become holes; with `allocate`, zeroes are written
    /// instead (`NBD_CMD_FLAG_NO_HOLE`).
    async fn zero(&self, offset: u64, len: u64, allocate: bool) {
        for (p, at, n) in Self::spans(offset, len) {
            let mut page = self.pages[p].write().await;
            if allocate {
                page.get_or_insert_with(new_page)[at..at + n].fill(0);
            } else if n as u64 == PAGE {
                *page = None;
            } else if let Some(data) = page.as_mut() {
                data[at..at + n].fill(0);
            }
        }
    }

    /// `base:allocation` extents from `offset` on, at most `max` of them.
    async fn extents(&self, offset: u64, len: u64, max: usize) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        for (p, _, n) in Self::spans(offset, len.min(self.size.saturating_sub(offset))) {
            let status = if self.pages[p].read().await.is_some() {
                0
            } else {
                STATE_HOLE | STATE_ZERO
            };
            let full = out.len() == max;
            match out.last_mut() {
                Some(last) if last.status == status => last.len += n as u64,
                _ if full => break,
                _ => out.push(Extent {
                    len: n as u64,
                    status,
                }),
            }
        }
        out
    }
}

fn new_page() -> Box<[u8]> {
    vec![0; PAGE as usize].into_boxed_slice()
}

/// What every connection serves.
struct Export {
    name: String,
    disk: Disk,
}

impl Export {
    fn info(&self) -> ExportInfo<'_> {
        let flags = TransmissionFlags::SEND_FLUSH
            | TransmissionFlags::SEND_FUA
            | TransmissionFlags::SEND_TRIM
            | TransmissionFlags::SEND_WRITE_ZEROES
            | TransmissionFlags::SEND_DF
            | TransmissionFlags::SEND_CACHE
            | TransmissionFlags::CAN_MULTI_CONN
            | TransmissionFlags::BLOCK_STATUS_PAYLOAD;
        ExportInfo::new(self.disk.size, flags).with_description("tokio-server memory disk")
    }

    fn is(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }
}

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// One connection: the machine, the two halves of the socket and the buffers.
struct Connection {
    server: Box<Server>,
    export: Arc<Export>,
    reader: Reader,
    writer: Writer,
    /// Bytes read and not consumed: never more than the next message.
    input: Vec<u8>,
    /// Where `poll_transmit` encodes.
    out: Vec<u8>,
    /// Encoded output not yet written: it goes out with the next read data, or before the
    /// next read from the socket.
    pending: Vec<u8>,
}

impl Connection {
    fn new(reader: Reader, writer: Writer, export: Arc<Export>) -> Self {
        Self {
            server: Box::new(Server::new(ServerConfig::default())),
            export,
            reader,
            writer,
            input: Vec::with_capacity(32 * 1024),
            out: vec![0; 16 * 1024],
            pending: Vec::with_capacity(64 * 1024),
        }
    }

    async fn run(&mut self) -> io::Result<()> {
        loop {
            self.collect().await?;
            if self.server.is_finished() {
                self.flush().await?;
                return match self.server.error() {
                    Some(e) => Err(io::Error::other(e)),
                    None => Ok(()),
                };
            }
            match self.server.wants() {
                Want::Bytes(n) => {
                    if !self.fill(n).await? {
                        if !self.input.is_empty() {
                            // Let the machine see a partial message before the end.
                            let _ = self.server.handle_input(&self.input);
                        }
                        self.server.handle_eof().map_err(io::Error::other)?;
                        continue;
                    }
                    self.handle_message().await?;
                }
                Want::Payload {
                    cookie,
                    offset,
                    len,
                } => {
                    // A write: straight from the socket into the pages. The disk is
                    // memory, so every write is durable at once (FUA needs nothing).
                    for (p, from, n) in Disk::spans(offset, len as u64) {
                        let mut page = self.export.disk.pages[p].write().await;
                        let data = page.get_or_insert_with(new_page);
                        self.reader.read_exact(&mut data[from..from + n]).await?;
                        drop(page);
                        self.server.handle_payload(n).map_err(io::Error::other)?;
                    }
                    self.server
                        .reply(cookie, Ok(()))
                        .map_err(io::Error::other)?;
                }
                Want::Discard { len } => {
                    // A refused payload (a write to a read-only export, say): read and drop.
                    let n = len.min(ZEROES.len());
                    let mut sink = vec![0; n];
                    self.reader.read_exact(&mut sink).await?;
                    self.server.handle_payload(n).map_err(io::Error::other)?;
                }
                Want::Nothing => match self.server.state() {
                    State::Closed | State::Dead | State::Disconnecting => {
                        self.flush().await?;
                        return Ok(());
                    }
                    state => return Err(io::Error::other(format!("stalled in {state:?}"))),
                },
                want => return Err(io::Error::other(format!("unexpected {want:?}"))),
            }
        }
    }

    /// Reads until `input` holds `n` bytes (never more), after sending what is pending:
    /// the client may be waiting for it. False at end of file.
    async fn fill(&mut self, n: usize) -> io::Result<bool> {
        self.flush().await?;
        let have = self.input.len();
        if have >= n {
            return Ok(true);
        }
        self.input.resize(n, 0);
        let mut at = have;
        while at < n {
            let got = self.reader.read(&mut self.input[at..n]).await?;
            if got == 0 {
                self.input.truncate(at);
                return Ok(false);
            }
            at += got;
        }
        Ok(true)
    }

    async fn handle_message(&mut self) -> io::Result<()> {
        let input = std::mem::take(&mut self.input);
        let result = self.server.handle_input(&input);
        let handled = match result {
            Ok(h) => h,
            Err(e) => {
                self.input = input;
                return Err(io::Error::other(e));
            }
        };
        let consumed = handled.consumed;
        let outcome = match handled.event {
            Some(event) => self.handle_event(event).await,
            None => Ok(()),
        };
        self.input = input;
        self.input.drain(..consumed);
        outcome
    }

    async fn handle_event(&mut self, event: ServerEvent<'_>) -> io::Result<()> {
        let export = self.export.clone();
        let r = match event {
            ServerEvent::List => self
                .server
                .answer_list_entry(&export.name, "tokio-server memory disk")
                .and_then(|()| self.server.answer_ack()),
            ServerEvent::Export(q) if export.is(q.name) => {
                self.server.answer_export(&export.info())
            }
            ServerEvent::Export(_) => self
                .server
                .answer_error(OptError::UnknownExport, "no such export"),
            ServerEvent::MetaContexts(q) if export.is(q.export) => {
                let mut r = Ok(());
                for name in q.matching(&CONTEXTS) {
                    // The ID is the index in CONTEXTS.
                    r = r.and_then(|()| self.server.answer_meta_context(0, name));
                }
                r.and_then(|()| self.server.answer_ack())
            }
            ServerEvent::MetaContexts(_) => self
                .server
                .answer_error(OptError::UnknownExport, "no such export"),
            ServerEvent::Request { request, ids } => {
                let ids: Vec<u32> = match ids {
                    Some(ids) => ids.iter().collect(),
                    None => self.server.contexts().to_vec(),
                };
                return self.request(request, &ids).await;
            }
            // STARTTLS is refused by the machine (TLS is off); DISC needs nothing.
            _ => Ok(()),
        };
        r.map_err(io::Error::other)
    }

    /// Serves a request the machine has validated against the export.
    async fn request(&mut self, r: Request, ids: &[u32]) -> io::Result<()> {
        let disk = &self.export.disk;
        let result = match r.command {
            Command::Read => return self.read(r).await,
            // The payload follows: `Want::Payload`.
            Command::Write => return Ok(()),
            Command::Flush | Command::Cache => Ok(()),
            Command::Trim => {
                disk.zero(r.offset, r.len, false).await;
                Ok(())
            }
            Command::WriteZeroes => {
                disk.zero(r.offset, r.len, r.flags.contains(CmdFlags::NO_HOLE))
                    .await;
                Ok(())
            }
            Command::BlockStatus => {
                let max = if r.flags.contains(CmdFlags::REQ_ONE) {
                    1
                } else {
                    8192
                };
                let extents = disk.extents(r.offset, r.len, max).await;
                for &id in ids {
                    self.server
                        .reply_block_status(r.cookie, id, &extents)
                        .map_err(io::Error::other)?;
                    self.collect().await?;
                }
                return Ok(());
            }
            _ => Err(Errno::Inval),
        };
        self.server
            .reply(r.cookie, result)
            .map_err(io::Error::other)
    }

    /// Serves a read from the pages, holding their read locks while the data is written:
    /// runs of allocated pages go out as data pieces (header and page slices in one
    /// vectored write), runs of holes as hole chunks. A DF read is one data piece.
    async fn read(&mut self, r: Request) -> io::Result<()> {
        let export = self.export.clone();
        let mut guards = Vec::new();
        let spans: Vec<_> = Disk::spans(r.offset, r.len).collect();
        for &(p, _, _) in &spans {
            guards.push(export.disk.pages[p].read().await);
        }
        let one_piece = r.flags.contains(CmdFlags::DF);
        let mut i = 0;
        let mut at = r.offset;
        while i < spans.len() {
            let allocated = guards[i].is_some();
            let mut j = i + 1;
            while j < spans.len() && (one_piece || guards[j].is_some() == allocated) {
                j += 1;
            }
            let len: usize = spans[i..j].iter().map(|s| s.2).sum();
            if allocated || one_piece {
                self.server
                    .reply_read_data(r.cookie, at, len)
                    .map_err(io::Error::other)?;
                self.encode_until_payload()?;
                let slices: Vec<&[u8]> = spans[i..j]
                    .iter()
                    .zip(&guards[i..j])
                    .map(|(&(_, from, n), g)| match g.as_ref() {
                        Some(data) => &data[from..from + n],
                        None => &ZEROES[from..from + n],
                    })
                    .collect();
                write_vectored_all(&mut self.writer, &self.pending, &slices).await?;
                self.pending.clear();
            } else {
                self.server
                    .reply_read_hole(r.cookie, at, len as u64)
                    .map_err(io::Error::other)?;
                self.collect().await?;
            }
            at += len as u64;
            i = j;
        }
        Ok(())
    }

    /// Moves queued output into `pending` up to the `Transmit::Payload` of a read piece.
    fn encode_until_payload(&mut self) -> io::Result<()> {
        loop {
            match self.server.poll_transmit(&mut self.out) {
                Ok(Some(Transmit::Bytes(n))) => self.pending.extend_from_slice(&self.out[..n]),
                Ok(Some(Transmit::Payload { .. })) => return Ok(()),
                other => return Err(io::Error::other(format!("unexpected {other:?}"))),
            }
        }
    }

    /// Moves what the machine has queued into `pending` (zeroes for simple-reply holes are
    /// written at once, behind it).
    async fn collect(&mut self) -> io::Result<()> {
        loop {
            match self.server.poll_transmit(&mut self.out) {
                Ok(None) => return Ok(()),
                Ok(Some(Transmit::Bytes(n))) => self.pending.extend_from_slice(&self.out[..n]),
                Ok(Some(Transmit::Zeroes { len, .. })) => {
                    let mut left = len;
                    let mut slices = Vec::new();
                    while left > 0 {
                        let n = left.min(ZEROES.len());
                        slices.push(&ZEROES[..n]);
                        left -= n;
                    }
                    write_vectored_all(&mut self.writer, &self.pending, &slices).await?;
                    self.pending.clear();
                }
                other => return Err(io::Error::other(format!("unexpected {other:?}"))),
            }
        }
    }

    /// Writes what is pending.
    async fn flush(&mut self) -> io::Result<()> {
        self.collect().await?;
        if !self.pending.is_empty() {
            self.writer.write_all(&self.pending).await?;
            self.pending.clear();
        }
        self.writer.flush().await
    }
}

/// Writes `head` and then `rest` with vectored writes, however short each write is.
async fn write_vectored_all(w: &mut Writer, head: &[u8], rest: &[&[u8]]) -> io::Result<()> {
    let mut bufs: Vec<IoSlice<'_>> = std::iter::once(head)
        .chain(rest.iter().copied())
        .filter(|b| !b.is_empty())
        .map(IoSlice::new)
        .collect();
    let mut bufs = &mut bufs[..];
    while !bufs.is_empty() {
        // At most 64 slices per call: the kernel's limit is 1024, and this keeps it cheap.
        let k = bufs.len().min(64);
        let n = w.write_vectored(&bufs[..k]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

async fn serve(reader: Reader, writer: Writer, export: Arc<Export>, peer: String) {
    let mut conn = Connection::new(reader, writer, export);
    if let Err(e) = conn.run().await {
        // A client that hangs up after NBD_OPT_ABORT without reading the reply is fine.
        let closed = conn.server.state() == State::Closed
            && matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            );
        if !closed {
            eprintln!("tokio-server: {peer}: connection ended: {e}");
        }
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

struct Options {
    listen: Vec<String>,
    unix: Vec<String>,
    size: u64,
    name: String,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        listen: Vec::new(),
        unix: Vec::new(),
        size: 1 << 30,
        name: String::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--listen" => o.listen.push(value()?),
            "--unix" => o.unix.push(value()?),
            "--size" => o.size = parse_size(&value()?).ok_or("bad --size")?,
            "--name" => o.name = value()?,
            _ => {
                return Err(format!(
                    "unknown argument {arg}\nusage: tokio-server [--listen ADDR:PORT] [--unix PATH] [--size SIZE] [--name NAME]"
                ))
            }
        }
    }
    if o.listen.is_empty() && o.unix.is_empty() {
        o.listen.push("127.0.0.1:10809".into());
    }
    Ok(o)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let o = options()?;
    let export = Arc::new(Export {
        name: o.name,
        disk: Disk::new(o.size),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for addr in &o.listen {
        let listener = TcpListener::bind(addr).await?;
        println!("listening on {}", listener.local_addr()?);
        let export = export.clone();
        tasks.spawn(async move {
            loop {
                let (stream, peer) = listener.accept().await?;
                // proto.md: TCP users SHOULD set TCP_NODELAY.
                stream.set_nodelay(true)?;
                let (r, w) = stream.into_split();
                tokio::spawn(serve(
                    Box::new(r),
                    Box::new(w),
                    export.clone(),
                    peer.to_string(),
                ));
            }
            #[allow(unreachable_code)]
            Ok::<(), io::Error>(())
        });
    }
    for path in &o.unix {
        let listener = UnixListener::bind(path)?;
        println!("listening on {path}");
        let export = export.clone();
        tasks.spawn(async move {
            loop {
                let (stream, _) = listener.accept().await?;
                let (r, w) = stream.into_split();
                tokio::spawn(serve(
                    Box::new(r),
                    Box::new(w),
                    export.clone(),
                    "unix".into(),
                ));
            }
            #[allow(unreachable_code)]
            Ok::<(), io::Error>(())
        });
    }
    tokio::select! {
        r = tasks.join_next() => match r {
            Some(Ok(Err(e))) => return Err(e.into()),
            Some(Err(e)) => return Err(e.into()),
            _ => {}
        },
        _ = tokio::signal::ctrl_c() => {}
    }
    for path in &o.unix {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
