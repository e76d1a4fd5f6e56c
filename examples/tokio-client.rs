//! An NBD client on tokio: the sans-IO [`Client`] machine driven by one task per
//! connection, with many requests in flight, behind a cloneable async handle.
//!
//! ```text
//! tokio-client info URI
//! tokio-client read URI OFFSET LENGTH                    > out
//! tokio-client write URI OFFSET [FILE]                   (default: stdin)
//! tokio-client copy URI DEST [--requests N] [--request-size BYTES]
//! ```
//!
//! URI is an NBD URI (`nbd://host[:port]/export`, `nbd+unix:///export?socket=PATH`); DEST a
//! file or `-` for stdout. `read` and `copy` keep up to `--requests` reads in flight (default
//! 16) of `--request-size` bytes (default 256K); `write` does the same with writes.
//!
//! How it drives the machine (see the run loop in the crate docs): the connection task owns
//! the machine and both halves of the socket, and `select!`s between reading (when the
//! machine wants bytes or a payload), writing (when output is queued) and taking commands
//! from handles (when the in-flight table has room), so requests and replies cross in both
//! directions at once. Read data is read from the socket straight into the caller's buffer;
//! a write's header and payload leave the caller's buffer in one vectored write. Buffers
//! are moved in and out of the task, never copied.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use nbd_proto::client::{Client, ClientConfig, Event, State, MAX_OPTION_LEN};
use nbd_proto::uri::{NbdUri, Transport};
use nbd_proto::wire::{CmdFlags, Cookie, Info, TransmissionFlags};
use nbd_proto::{Transmit, Want};

/// Commands in flight per connection (the machine's table size).
const IN_FLIGHT: usize = 64;

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// What the handshake told us.
#[derive(Debug, Clone, Default)]
struct ExportDetails {
    size: u64,
    flags: TransmissionFlags,
    description: Option<String>,
    block_size: Option<(u32, u32, u32)>,
    structured: bool,
    extended: bool,
}

/// A request from a handle to the connection task.
enum Op {
    Read,
    Write,
    Flush,
}

struct Request {
    op: Op,
    offset: u64,
    /// The caller's buffer: filled by a read, sent by a write; handed back when done.
    buf: Vec<u8>,
    done: oneshot::Sender<io::Result<Vec<u8>>>,
}

/// A command in flight.
struct InFlight {
    offset: u64,
    /// `None` while a write's payload is being sent (the buffer is in `Task::sending`).
    buf: Option<Vec<u8>>,
    done: oneshot::Sender<io::Result<Vec<u8>>>,
    /// The server's first error message, for the completion.
    message: Option<String>,
    /// A completion that arrived while the payload was still being sent.
    result: Option<Result<(), String>>,
}

/// A cloneable handle to one connection: every call is a request in flight.
#[derive(Clone)]
struct Nbd {
    requests: mpsc::Sender<Request>,
    details: Arc<ExportDetails>,
}

impl Nbd {
    async fn call(&self, op: Op, offset: u64, buf: Vec<u8>) -> io::Result<Vec<u8>> {
        let (done, result) = oneshot::channel();
        let request = Request {
            op,
            offset,
            buf,
            done,
        };
        let gone = || io::Error::new(io::ErrorKind::BrokenPipe, "the connection is gone");
        self.requests.send(request).await.map_err(|_| gone())?;
        result.await.map_err(|_| gone())?
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    async fn read(&self, offset: u64, buf: Vec<u8>) -> io::Result<Vec<u8>> {
        self.call(Op::Read, offset, buf).await
    }

    /// Writes `buf` at `offset`; gives the buffer back.
    async fn write(&self, offset: u64, buf: Vec<u8>) -> io::Result<Vec<u8>> {
        self.call(Op::Write, offset, buf).await
    }

    async fn flush(&self) -> io::Result<()> {
        self.call(Op::Flush, 0, Vec::new()).await.map(drop)
    }
}

/// The connection task: the machine, the socket and the commands in flight.
struct Task {
    client: Client<IN_FLIGHT>,
    reader: Reader,
    writer: Writer,
    /// Header bytes read (exactly what `wants()` asks for: never payload).
    input: Vec<u8>,
    /// Where `poll_transmit` encodes.
    out: Vec<u8>,
    /// Encoded output not yet written, and how much of it went out.
    pending: Vec<u8>,
    pending_sent: usize,
    /// A write payload being sent: its cookie, buffer and how much went out. It follows
    /// `pending`, in the same vectored writes.
    sending: Option<(Cookie, Vec<u8>, usize)>,
    ops: HashMap<Cookie, InFlight>,
    details: ExportDetails,
    /// The last option refusal, for the error message.
    refusal: Option<String>,
}

impl Task {
    async fn connect(uri: &str) -> io::Result<Self> {
        let uri = NbdUri::parse(uri).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        if uri.tls {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "TLS is not supported",
            ));
        }
        let (reader, writer): (Reader, Writer) = match &uri.transport {
            Transport::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port)).await?;
                // proto.md: TCP users SHOULD set TCP_NODELAY.
                s.set_nodelay(true)?;
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Transport::Unix { socket } => {
                let (r, w) = UnixStream::connect(socket).await?.into_split();
                (Box::new(r), Box::new(w))
            }
            _ => return Err(io::Error::new(io::ErrorKind::Unsupported, "transport")),
        };
        let config = ClientConfig::new(&uri.export);
        Ok(Self {
            client: Client::new(&config).map_err(io::Error::other)?,
            reader,
            writer,
            input: Vec::with_capacity(nbd_proto::client::MAX_FRAME_LEN),
            out: vec![0; MAX_OPTION_LEN],
            pending: Vec::new(),
            pending_sent: 0,
            sending: None,
            ops: HashMap::new(),
            details: ExportDetails::default(),
            refusal: None,
        })
    }

    /// Connects, negotiates, and starts the connection task.
    async fn open(uri: &str) -> io::Result<Nbd> {
        let mut task = Self::connect(uri).await?;
        let (requests, mut rx) = mpsc::channel(IN_FLIGHT);
        while task.client.state() != State::Ready {
            if !task.turn(&mut rx).await? {
                return Err(io::Error::other("the server closed during the handshake"));
            }
        }
        task.details.size = task.client.size().unwrap_or(0);
        task.details.flags = task.client.transmission_flags().unwrap_or_default();
        task.details.structured = task.client.structured_replies();
        task.details.extended = task.client.extended_headers();
        let details = Arc::new(task.details.clone());
        tokio::spawn(async move {
            if let Err(e) = task.run(rx).await {
                eprintln!("tokio-client: connection failed: {e}");
            }
        });
        Ok(Nbd { requests, details })
    }

    /// Serves handles until they are all dropped and nothing is in flight, then sends
    /// `NBD_CMD_DISC` and closes.
    async fn run(&mut self, mut rx: mpsc::Receiver<Request>) -> io::Result<()> {
        while self.turn(&mut rx).await? {}
        Ok(())
    }

    /// One turn of the loop: queue what the machine has to send, then wait for whichever
    /// comes first of socket input, socket output room, or a new request. False once the
    /// session is over.
    async fn turn(&mut self, rx: &mut mpsc::Receiver<Request>) -> io::Result<bool> {
        if matches!(self.client.state(), State::Closed | State::Dead) {
            self.abandon();
            return match self.client.error() {
                Some(e) => Err(self.error(e)),
                None => Ok(false),
            };
        }
        self.encode()?;
        let ready = self.client.state() == State::Ready;
        let has_output = self.pending_sent < self.pending.len() || self.sending.is_some();
        if ready && !has_output && self.ops.is_empty() && rx.is_closed() {
            // Every handle is gone and nothing is owed: leave politely.
            self.client.disconnect().map_err(io::Error::other)?;
            self.encode()?;
            self.write_out_all().await?;
            let _ = self.writer.shutdown().await;
            return Ok(false);
        }
        let want = self.client.wants();
        if matches!(want, Want::Bytes(n) if self.input.len() >= n) {
            // A whole frame (or an owed event) is buffered: handle it first.
            self.input_frame()?;
            return Ok(true);
        }
        let room = ready && self.client.in_flight_len() < IN_FLIGHT && !rx.is_closed();
        // Where the next input goes: the header buffer (exactly up to the frame's end), or
        // the read's own buffer.
        let have = self.input.len();
        let dest: Option<&mut [u8]> = match want {
            Want::Bytes(n) => {
                self.input.resize(n, 0);
                Some(&mut self.input[have..])
            }
            Want::Payload {
                cookie,
                offset,
                len,
            } => {
                let op = self.ops.get_mut(&cookie);
                let buf = op.and_then(|o| {
                    let at = usize::try_from(offset.checked_sub(o.offset)?).ok()?;
                    o.buf.as_mut()?.get_mut(at..at + len)
                });
                Some(buf.ok_or_else(|| io::Error::other("read data for no buffer"))?)
            }
            _ => None,
        };
        let wants_input = dest.is_some();
        let slices = output_slices(&self.pending[self.pending_sent..], self.sending.as_ref());
        tokio::select! {
            r = self.reader.read(dest.unwrap_or_default()), if wants_input => {
                let n = r?;
                self.received(want, have, n)?;
            }
            r = self.writer.write_vectored(&slices), if has_output => {
                let n = r?;
                // The header buffer was grown for a read that did not happen.
                self.input.truncate(have);
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                self.sent(n);
            }
            request = rx.recv(), if room => {
                self.input.truncate(have);
                if let Some(request) = request {
                    self.submit(request);
                }
            }
            else => {
                // Nothing to read, write or take: only possible before transmission.
                return Err(io::Error::other(format!(
                    "nothing to wait for in state {:?}",
                    self.client.state()
                )));
            }
        }
        Ok(true)
    }

    /// `n` bytes arrived for `want` (`have` header bytes were buffered before).
    fn received(&mut self, want: Want, have: usize, n: usize) -> io::Result<()> {
        if let Want::Bytes(_) = want {
            self.input.truncate(have + n);
        }
        if n == 0 {
            // End of file: clean only where the machine says so.
            return match self.client.handle_eof() {
                Ok(()) => Ok(()),
                Err(e) => {
                    self.abandon();
                    Err(self.error(e))
                }
            };
        }
        match want {
            Want::Payload { .. } => self.client.handle_payload(n).map_err(|e| self.error(e)),
            _ => Ok(()),
        }
    }

    fn error(&self, e: nbd_proto::Error) -> io::Error {
        match &self.refusal {
            Some(text) => io::Error::other(format!("{e} ({text})")),
            None => io::Error::other(e),
        }
    }

    /// Hands the buffered frame to the machine and acts on its event.
    fn input_frame(&mut self) -> io::Result<()> {
        let input = std::mem::take(&mut self.input);
        let r = self.client.handle_input(&input);
        let handled = match r {
            Ok(h) => h,
            Err(e) => {
                self.input = input;
                self.abandon();
                return Err(self.error(e));
            }
        };
        let consumed = handled.consumed;
        if let Some(event) = handled.event {
            self.event(event);
        }
        self.input = input;
        self.input.drain(..consumed);
        Ok(())
    }

    fn event(&mut self, event: Event<'_>) {
        match event {
            Event::Info(Info::Description(d)) => self.details.description = Some(d.into()),
            Event::Info(Info::BlockSize(b)) => {
                self.details.block_size = Some((b.min, b.preferred, b.max_payload))
            }
            Event::OptionDone {
                opt,
                result: Err(r),
            } => self.refusal = Some(format!("{opt} refused: {} {}", r.error, r.message)),
            Event::ReadHole {
                cookie,
                offset,
                len,
            } => {
                // The machine checked that the hole lies inside the read.
                if let Some(op) = self.ops.get_mut(&cookie) {
                    let at = offset.saturating_sub(op.offset) as usize;
                    if let Some(hole) = op
                        .buf
                        .as_mut()
                        .and_then(|b| b.get_mut(at..at + len as usize))
                    {
                        hole.fill(0);
                    }
                }
            }
            Event::ChunkError {
                cookie, message, ..
            } => {
                if let Some(op) = self.ops.get_mut(&cookie) {
                    op.message.get_or_insert_with(|| message.into());
                }
            }
            Event::Done { cookie, result } => {
                let result = result.map_err(|errno| {
                    let message = self
                        .ops
                        .get(&cookie)
                        .and_then(|o| o.message.clone())
                        .unwrap_or_default();
                    format!("{} ({errno}) {message}", errno.description())
                });
                self.complete(cookie, result);
            }
            _ => {}
        }
    }

    fn complete(&mut self, cookie: Cookie, result: Result<(), String>) {
        let Some(mut op) = self.ops.remove(&cookie) else {
            return;
        };
        match op.buf.take() {
            Some(buf) => {
                let _ = op.done.send(result.map(|()| buf).map_err(io::Error::other));
            }
            None => {
                // The payload is still going out: complete once it has.
                op.result = Some(result);
                self.ops.insert(cookie, op);
            }
        }
    }

    /// After a fatal error: every command in flight fails.
    fn abandon(&mut self) {
        while self.client.poll_event().is_some() {}
        for (_, op) in self.ops.drain() {
            let _ = op.done.send(Err(io::Error::other("the connection failed")));
        }
    }

    /// Queues a request with the machine.
    fn submit(&mut self, r: Request) {
        let len = u32::try_from(r.buf.len());
        let issued = match (r.op, len) {
            (Op::Read, Ok(len)) => self.client.read(r.offset, len, CmdFlags::empty()),
            (Op::Write, Ok(len)) => self.client.write(r.offset, len, CmdFlags::empty()),
            (Op::Flush, _) => self.client.flush(CmdFlags::empty()),
            (_, Err(_)) => {
                let _ = r.done.send(Err(io::Error::other("request over 4 GiB")));
                return;
            }
        };
        match issued {
            Ok(cookie) => {
                let op = InFlight {
                    offset: r.offset,
                    buf: Some(r.buf),
                    done: r.done,
                    message: None,
                    result: None,
                };
                self.ops.insert(cookie, op);
            }
            Err(e) => {
                let _ = r.done.send(Err(io::Error::other(e)));
            }
        }
    }

    /// Moves what the machine queued into `pending` (until a write payload, which must go
    /// out before anything after it).
    fn encode(&mut self) -> io::Result<()> {
        if self.pending_sent == self.pending.len() {
            self.pending.clear();
            self.pending_sent = 0;
        }
        while self.sending.is_none() {
            match self.client.poll_transmit(&mut self.out) {
                Ok(None) => break,
                Ok(Some(Transmit::Bytes(n))) => self.pending.extend_from_slice(&self.out[..n]),
                Ok(Some(Transmit::Payload { cookie, len, .. })) => {
                    let buf = self
                        .ops
                        .get_mut(&cookie)
                        .and_then(|o| o.buf.take())
                        .filter(|b| b.len() == len)
                        .ok_or_else(|| io::Error::other("write payload missing"))?;
                    self.sending = Some((cookie, buf, 0));
                }
                Ok(Some(t)) => return Err(io::Error::other(format!("unexpected {t:?}"))),
                Err(e) => return Err(self.error(e)),
            }
        }
        Ok(())
    }

    /// `n` bytes of output went out.
    fn sent(&mut self, mut n: usize) {
        let head = self.pending.len() - self.pending_sent;
        let k = n.min(head);
        self.pending_sent += k;
        n -= k;
        if let Some((cookie, buf, at)) = &mut self.sending {
            *at += n;
            if *at == buf.len() {
                let cookie = *cookie;
                if let Some((_, buf, _)) = self.sending.take() {
                    if let Some(op) = self.ops.get_mut(&cookie) {
                        op.buf = Some(buf);
                        if let Some(result) = op.result.take() {
                            self.complete(cookie, result);
                        }
                    }
                }
            }
        }
    }

    async fn write_out_all(&mut self) -> io::Result<()> {
        while self.pending_sent < self.pending.len() {
            let n = self
                .writer
                .write(&self.pending[self.pending_sent..])
                .await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.pending_sent += n;
        }
        self.writer.flush().await
    }
}

/// The unsent header bytes and the unsent part of the payload behind them.
fn output_slices<'a>(
    head: &'a [u8],
    payload: Option<&'a (Cookie, Vec<u8>, usize)>,
) -> [IoSlice<'a>; 2] {
    let tail = payload.map_or(&[][..], |(_, buf, at)| &buf[*at..]);
    [IoSlice::new(head), IoSlice::new(tail)]
}

// ---- the commands ----

fn parse_size(s: &str) -> io::Result<u64> {
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 20),
        Some(b'g' | b'G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("bad number {s:?}")))
}

async fn info(uri: &str) -> io::Result<()> {
    let nbd = Task::open(uri).await?;
    let d = &nbd.details;
    println!("size: {}", d.size);
    println!("flags: {:?}", d.flags);
    if let Some(text) = &d.description {
        println!("description: {text}");
    }
    if let Some((min, preferred, max)) = d.block_size {
        println!("block size: {min} / {preferred} / {max}");
    }
    let form = match (d.extended, d.structured) {
        (true, _) => "extended headers",
        (false, true) => "structured replies",
        _ => "simple replies",
    };
    println!("replies: {form}");
    Ok(())
}

/// Where copied data goes: written in order (a file or stdout), from a blocking thread so
/// the runtime never waits on the disk.
struct Sink {
    out: Option<Box<dyn Write + Send>>,
}

impl Sink {
    async fn write(&mut self, buf: Vec<u8>) -> io::Result<Vec<u8>> {
        let mut out = self
            .out
            .take()
            .ok_or_else(|| io::Error::other("sink failed"))?;
        let (out, buf, r) = tokio::task::spawn_blocking(move || {
            let r = out.write_all(&buf);
            (out, buf, r)
        })
        .await
        .map_err(io::Error::other)?;
        self.out = Some(out);
        r.map(|()| buf)
    }

    async fn finish(mut self) -> io::Result<()> {
        if let Some(mut out) = self.out.take() {
            tokio::task::spawn_blocking(move || out.flush())
                .await
                .map_err(io::Error::other)??;
        }
        Ok(())
    }
}

/// Reads `[offset, offset + len)` with up to `requests` reads of `chunk` bytes in flight,
/// and writes the data to `sink` in order.
async fn copy_range(
    nbd: &Nbd,
    offset: u64,
    len: u64,
    requests: usize,
    chunk: u64,
    sink: &mut Sink,
) -> io::Result<()> {
    let mut in_flight = JoinSet::new();
    let mut done: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut spare: Vec<Vec<u8>> = Vec::new();
    let (mut next, mut written) = (offset, offset);
    let end = offset + len;
    while written < end {
        while next < end && in_flight.len() < requests {
            let n = chunk.min(end - next) as usize;
            let mut buf = spare.pop().unwrap_or_default();
            buf.resize(n, 0);
            let (nbd, at) = (nbd.clone(), next);
            in_flight.spawn(async move { (at, nbd.read(at, buf).await) });
            next += n as u64;
        }
        let Some(r) = in_flight.join_next().await else {
            break;
        };
        let (at, buf) = r.map_err(io::Error::other)?;
        done.insert(at, buf?);
        // Write out whatever is now contiguous.
        while let Some(buf) = done.remove(&written) {
            written += buf.len() as u64;
            spare.push(sink.write(buf).await?);
        }
    }
    Ok(())
}

fn open_sink(dest: &str) -> io::Result<Sink> {
    let out: Box<dyn Write + Send> = if dest == "-" {
        Box::new(io::stdout())
    } else {
        Box::new(std::fs::File::create(dest)?)
    };
    Ok(Sink { out: Some(out) })
}

/// Writes `input` at `offset`, with up to `requests` writes of `chunk` bytes in flight.
async fn write(
    nbd: &Nbd,
    mut input: Box<dyn Read + Send>,
    offset: u64,
    requests: usize,
    chunk: usize,
) -> io::Result<()> {
    let mut in_flight = JoinSet::new();
    let mut at = offset;
    let mut spare: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut buf = spare.pop().unwrap_or_default();
        buf.resize(chunk, 0);
        let (returned, buf, n) = tokio::task::spawn_blocking(move || {
            let mut filled = 0;
            let r = loop {
                match input.read(&mut buf[filled..]) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        filled += n;
                        if filled == buf.len() {
                            break Ok(());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            (input, buf, r.map(|()| filled))
        })
        .await
        .map_err(io::Error::other)?;
        input = returned;
        let n = n?;
        if n == 0 {
            break;
        }
        let mut buf = buf;
        buf.truncate(n);
        if in_flight.len() == requests {
            if let Some(r) = in_flight.join_next().await {
                spare.push(r.map_err(io::Error::other)??);
            }
        }
        let nbd = nbd.clone();
        in_flight.spawn(async move { nbd.write(at, buf).await });
        at += n as u64;
    }
    while let Some(r) = in_flight.join_next().await {
        r.map_err(io::Error::other)??;
    }
    nbd.flush().await
}

struct Options {
    positional: Vec<String>,
    requests: usize,
    request_size: u64,
}

fn options(args: &[String]) -> io::Result<Options> {
    let mut o = Options {
        positional: Vec::new(),
        requests: 16,
        request_size: 256 << 10,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("{a} needs a value"))
            })
        };
        match a.as_str() {
            "--requests" => o.requests = parse_size(value()?)?.clamp(1, IN_FLIGHT as u64) as usize,
            "--request-size" => o.request_size = parse_size(value()?)?.clamp(512, 32 << 20),
            _ => o.positional.push(a.clone()),
        }
    }
    Ok(o)
}

const USAGE: &str = "usage:
  tokio-client info URI
  tokio-client read URI OFFSET LENGTH            > out
  tokio-client write URI OFFSET [FILE]           (default: stdin)
  tokio-client copy URI DEST [--requests N] [--request-size BYTES]";

async fn run(args: &[String]) -> io::Result<()> {
    let o = options(args)?;
    let usage = || io::Error::new(io::ErrorKind::InvalidInput, USAGE);
    let p: Vec<&str> = o.positional.iter().map(String::as_str).collect();
    match p.as_slice() {
        ["info", uri] => info(uri).await,
        ["read", uri, offset, len] => {
            let (offset, len) = (parse_size(offset)?, parse_size(len)?);
            let nbd = Task::open(uri).await?;
            let mut sink = open_sink("-")?;
            copy_range(&nbd, offset, len, o.requests, o.request_size, &mut sink).await?;
            sink.finish().await
        }
        ["write", uri, offset, rest @ ..] if rest.len() <= 1 => {
            let input: Box<dyn Read + Send> = match rest {
                [path] if *path != "-" => Box::new(std::fs::File::open(path)?),
                _ => Box::new(io::stdin()),
            };
            let nbd = Task::open(uri).await?;
            let chunk = o.request_size as usize;
            write(&nbd, input, parse_size(offset)?, o.requests, chunk).await
        }
        ["copy", uri, dest] => {
            let nbd = Task::open(uri).await?;
            let mut sink = open_sink(dest)?;
            let size = nbd.details.size;
            copy_range(&nbd, 0, size, o.requests, o.request_size, &mut sink).await?;
            sink.finish().await
        }
        _ => Err(usage()),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokio-client: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
