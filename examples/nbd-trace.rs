//! `nbd-trace`: a transparent NBD man-in-the-middle proxy that prints every message it sees,
//! the NBD equivalent of a protocol dissector. It is built only on `nbd_proto::wire`.
//!
//! ```text
//! nbd-trace --listen unix:/tmp/a.sock --connect unix:/tmp/b.sock
//! nbd-trace --listen 127.0.0.1:10809 --connect unix:/tmp/b.sock [--log FILE] [--quiet] [--max-conns N]
//! ```
//!
//! Every byte is forwarded unmodified in both directions. Each decoded message gives one line
//! `[CONN] C->S ...` or `[CONN] S->C ...`. Payloads (write data, read data) are summarised by
//! length and skipped by count, never buffered: the decode buffer is bounded by
//! [`MAX_BUFFERED`]. Bytes that cannot be decoded give one `decode error at byte N` line, and
//! that direction is forwarded raw from then on. After a `NBD_OPT_STARTTLS` acknowledgement the
//! stream is TLS and is forwarded raw.
//!
//! Options:
//! - `--listen ADDR`, `--connect ADDR`: `unix:PATH`, `tcp:HOST:PORT` or `HOST:PORT`.
//! - `--log FILE`: write the trace to FILE instead of stdout.
//! - `--quiet`: print only the total summary of message counts by type at exit, and one line
//!   for each error (a decode error, a server that cannot be reached).
//! - `--max-conns N`: exit after N connections have been accepted and closed.
//!
//! At exit (after `--max-conns` connections, or on SIGINT or SIGTERM, which end the proxy
//! with status 0) it prints `[total] N connections` and a `[total] C->S summary: ...` and
//! `[total] S->C summary: ...` line of message counts by type, counting connections still
//! open too.
//!
//! Once the socket accepts connections it prints `listening on ADDR, forwarding to ADDR` (with
//! the real port when 0 was asked for): as the first line of the trace, and also on stderr
//! (as `nbd-trace: listening on ...`) with `--log`. With `--quiet` it goes to stderr only.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;

use nbd_proto::wire::chunk::ChunkPayload;
use nbd_proto::wire::{
    self, BlockStatusHeader, BlockStatusPayload, ChunkHeader, ChunkType, ClientFlags, CmdFlags,
    Command, ExportNameReply, Extent, Extents, HandshakeFlags, Hello, Info, Opt, OptCode,
    OptHeader, OptReply, OptReplyHeader, ReplyHeader, ReplyType, Request, TransmissionFlags,
};

/// Largest message (header plus the part of its payload that is decoded) held in memory.
/// Longer option data, option replies and chunk payloads are skipped by count.
const MAX_BUFFERED: usize = 64 * 1024;
/// Size of each socket read.
const READ_CHUNK: usize = 256 * 1024;
/// Block-status descriptors shown per chunk.
const SHOWN_EXTENTS: usize = 4;

// ---------------------------------------------------------------------------------------------
// Command line and sockets
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Addr {
    Unix(PathBuf),
    Tcp(String),
}

impl Addr {
    fn parse(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("{s}: empty socket path"));
            }
            Ok(Self::Unix(PathBuf::from(path)))
        } else {
            let hp = s.strip_prefix("tcp:").unwrap_or(s);
            if !hp.contains(':') {
                return Err(format!(
                    "{s}: expected unix:PATH, tcp:HOST:PORT or HOST:PORT"
                ));
            }
            Ok(Self::Tcp(hp.to_string()))
        }
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Tcp(hp) => write!(f, "{hp}"),
        }
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn connect(addr: &Addr) -> io::Result<Self> {
        Ok(match addr {
            Addr::Unix(p) => Self::Unix(UnixStream::connect(p)?),
            Addr::Tcp(hp) => {
                let s = TcpStream::connect(hp.as_str())?;
                let _ = s.set_nodelay(true);
                Self::Tcp(s)
            }
        })
    }

    fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
            Self::Unix(s) => Self::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) {
        // The peer may be gone already; nothing to do about it then.
        let _ = match self {
            Self::Tcp(s) => s.shutdown(how),
            Self::Unix(s) => s.shutdown(how),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    fn bind(addr: &Addr) -> io::Result<Self> {
        match addr {
            Addr::Tcp(hp) => Ok(Self::Tcp(TcpListener::bind(hp.as_str())?)),
            Addr::Unix(p) => {
                // Replace a stale socket left by an earlier run, but never any other file.
                if let Ok(meta) = std::fs::symlink_metadata(p) {
                    if meta.file_type().is_socket() {
                        std::fs::remove_file(p)?;
                    }
                }
                Ok(Self::Unix(UnixListener::bind(p)?, p.clone()))
            }
        }
    }

    fn local(&self) -> String {
        match self {
            Self::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| format!("? ({e})"), |a| a.to_string()),
            Self::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Self::Tcp(l) => {
                let (s, peer) = l.accept()?;
                let _ = s.set_nodelay(true);
                Ok((Stream::Tcp(s), peer.to_string()))
            }
            Self::Unix(l, _) => {
                let (s, _) = l.accept()?;
                Ok((Stream::Unix(s), "unix client".to_string()))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

struct Options {
    listen: Addr,
    connect: Addr,
    log: Option<PathBuf>,
    quiet: bool,
    max_conns: Option<usize>,
}

const USAGE: &str =
    "usage: nbd-trace --listen ADDR --connect ADDR [--log FILE] [--quiet] [--max-conns N]
  ADDR is unix:PATH, tcp:HOST:PORT or HOST:PORT";

fn parse_args() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let (mut listen, mut connect, mut log, mut quiet, mut max_conns) =
        (None, None, None, false, None);
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{what} needs a value"))
        };
        match name.as_str() {
            "--listen" | "-l" => listen = Some(Addr::parse(&value("--listen")?)?),
            "--connect" | "-c" => connect = Some(Addr::parse(&value("--connect")?)?),
            "--log" => log = Some(PathBuf::from(value("--log")?)),
            "--quiet" | "-q" => quiet = true,
            "--max-conns" => {
                let v = value("--max-conns")?;
                let n: usize = v
                    .parse()
                    .map_err(|_| format!("--max-conns: not a number: {v}"))?;
                if n == 0 {
                    return Err("--max-conns must be at least 1".into());
                }
                max_conns = Some(n);
            }
            "--help" | "-h" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Options {
        listen: listen.ok_or("--listen is required")?,
        connect: connect.ok_or("--connect is required")?,
        log,
        quiet,
        max_conns,
    })
}

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

/// Serialises lines from every thread; each line is flushed as it is written.
struct Out {
    sink: Mutex<Box<dyn Write + Send>>,
    quiet: bool,
}

impl Out {
    /// A line printed even with `--quiet`: an error, or the summary at exit.
    fn line(&self, line: &str) {
        let mut sink = lock(&self.sink);
        write_line(&mut sink, line);
    }

    /// A trace line: suppressed by `--quiet`.
    fn trace(&self, line: &str) {
        if !self.quiet {
            self.line(line);
        }
    }
}

fn write_line(sink: &mut Box<dyn Write + Send>, line: &str) {
    // A closed stdout or a full disk must not disturb the forwarding.
    let _ = writeln!(sink, "{line}");
    let _ = sink.flush();
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `0x3[FIXED_NEWSTYLE|NO_ZEROES]`: raw bits, then the names (`Display` of the flag types).
fn flags<T: fmt::Display + Copy>(bits: u64, f: T) -> String {
    if bits == 0 {
        "0".to_string()
    } else {
        format!("{bits:#x}[{}]", f.to_string().replace(" | ", "|"))
    }
}

fn tflags(f: TransmissionFlags) -> String {
    flags(f.bits().into(), f)
}

/// Message counts by type, per direction.
type Counts = BTreeMap<String, u64>;

fn summary(counts: &Counts) -> String {
    if counts.is_empty() {
        return "nothing".to_string();
    }
    let mut s = String::new();
    for (k, v) in counts {
        if !s.is_empty() {
            s.push(' ');
        }
        let _ = write!(s, "{k}={v}");
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Per-connection state shared by the two directions
// ---------------------------------------------------------------------------------------------

/// What one direction's decoder must know about the other direction.
///
/// Each side records what it saw *before* forwarding those bytes, so the peer cannot answer
/// before the record exists.
#[derive(Default)]
struct Session {
    /// The server sent an oldstyle hello: no options, transmission at once.
    oldstyle: bool,
    /// `NBD_FLAG_NO_ZEROES` offered by the server.
    server_no_zeroes: bool,
    /// `NBD_FLAG_C_NO_ZEROES` set by the client.
    client_no_zeroes: bool,
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    structured: bool,
    /// `NBD_OPT_EXTENDED_HEADERS` was acknowledged.
    extended: bool,
    /// Transmission phase reached (EXPORT_NAME reply, GO ACK or oldstyle).
    transmission: bool,
    /// `NBD_OPT_STARTTLS` was acknowledged: the rest is TLS.
    tls: bool,
    /// The client sent `NBD_OPT_EXPORT_NAME`: the next server bytes are its headerless reply.
    export_name_pending: bool,
    /// Requests in flight: cookie -> (command, length).
    inflight: HashMap<u64, (Command, u64)>,
    /// Metadata contexts selected with `NBD_OPT_SET_META_CONTEXT`: id -> name.
    contexts: HashMap<u32, String>,
}

impl Session {
    fn mode(&self) -> &'static str {
        if self.extended {
            "extended headers"
        } else if self.structured {
            "structured replies"
        } else {
            "simple replies"
        }
    }
}

struct Conn {
    id: usize,
    out: Arc<Out>,
    session: Mutex<Session>,
    /// The counts of every connection, kept up to date message by message, so that a
    /// signal can print them at any time.
    totals: Arc<Totals>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    ClientToServer,
    ServerToClient,
}

impl fmt::Display for Dir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ClientToServer => "C->S",
            Self::ServerToClient => "S->C",
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Streaming decoder
// ---------------------------------------------------------------------------------------------

/// What one decode step did.
enum Step {
    /// The first `n` bytes were one message (or a phase change when `n == 0`); `skip` payload
    /// bytes follow it and are passed over without decoding.
    Consumed { n: usize, skip: u64 },
    /// From here on the stream is not NBD (TLS): forward it raw.
    Raw,
}

fn consumed(n: usize, skip: u64) -> Result<Step, wire::Error> {
    Ok(Step::Consumed { n, skip })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Client: client flags next. Server: hello next.
    Start,
    /// Option haggling.
    Options,
    /// Transmission: requests (client) or replies (server).
    Transmission,
    /// Not decoded any more (TLS, or after a decode error).
    Raw,
}

struct Decoder {
    conn: Arc<Conn>,
    dir: Dir,
    phase: Phase,
    /// Bytes of this direction consumed so far (decoded or skipped).
    offset: u64,
    /// Payload bytes still to pass over.
    skip: u64,
    /// Start of a message that arrived in pieces (never more than `MAX_BUFFERED` bytes).
    acc: Vec<u8>,
    counts: Counts,
    /// Payload bytes passed over without decoding.
    payload_bytes: u64,
}

impl Decoder {
    fn new(conn: Arc<Conn>, dir: Dir) -> Self {
        Self {
            conn,
            dir,
            phase: Phase::Start,
            offset: 0,
            skip: 0,
            acc: Vec::new(),
            counts: Counts::new(),
            payload_bytes: 0,
        }
    }

    fn trace(&self, msg: fmt::Arguments<'_>) {
        self.conn
            .out
            .trace(&format!("[{}] {} {}", self.conn.id, self.dir, msg));
    }

    fn count(&mut self, what: impl Into<String>) {
        let what = what.into();
        {
            let mut totals = lock(&self.conn.totals.counts);
            let t = match self.dir {
                Dir::ClientToServer => &mut totals.0,
                Dir::ServerToClient => &mut totals.1,
            };
            *t.entry(what.clone()).or_insert(0) += 1;
        }
        *self.counts.entry(what).or_insert(0) += 1;
    }

    fn session(&self) -> MutexGuard<'_, Session> {
        lock(&self.conn.session)
    }

    /// Decodes everything in `input` that can be decoded, keeping at most one partial
    /// message. Called before `input` is forwarded.
    fn feed(&mut self, input: &[u8]) {
        let mut pos = 0;
        loop {
            if self.phase == Phase::Raw {
                self.acc.clear();
                return;
            }
            if self.skip > 0 {
                // Payload bytes: pass over them by count.
                let n = if !self.acc.is_empty() {
                    let n = self.skip.min(self.acc.len() as u64) as usize;
                    self.acc.drain(..n);
                    n
                } else if pos < input.len() {
                    let n = self.skip.min((input.len() - pos) as u64) as usize;
                    pos += n;
                    n
                } else {
                    return;
                };
                self.skip -= n as u64;
                self.offset += n as u64;
                self.payload_bytes += n as u64;
                continue;
            }
            if self.acc.is_empty() {
                // Fast path: decode straight from the input.
                if pos == input.len() {
                    return;
                }
                match self.step(&input[pos..]) {
                    Ok(step) => pos += self.apply(step),
                    Err(wire::Error::Truncated { needed }) => {
                        let have = input.len() - pos;
                        if self.too_long(have, needed) {
                            continue;
                        }
                        self.acc.extend_from_slice(&input[pos..]);
                        return;
                    }
                    Err(e) => self.fail(&e.to_string()),
                }
            } else {
                // The message started in an earlier read: add just the bytes it needs.
                let buf = std::mem::take(&mut self.acc);
                match self.step(&buf) {
                    Ok(step) => {
                        let n = self.apply(step);
                        // Bytes past the message (none when `needed` was exact) stay queued.
                        self.acc = buf[n.min(buf.len())..].to_vec();
                    }
                    Err(wire::Error::Truncated { needed }) => {
                        self.acc = buf;
                        if pos == input.len() {
                            return;
                        }
                        if self.too_long(self.acc.len(), needed) {
                            continue;
                        }
                        let take = needed.min(input.len() - pos);
                        self.acc.extend_from_slice(&input[pos..pos + take]);
                        pos += take;
                    }
                    Err(e) => self.fail(&e.to_string()),
                }
            }
        }
    }

    /// Fails the stream if a message would not fit in the decode buffer.
    fn too_long(&mut self, have: usize, needed: usize) -> bool {
        let total = have.saturating_add(needed);
        if total <= MAX_BUFFERED {
            return false;
        }
        self.fail(&format!(
            "message of at least {total} bytes is longer than the {MAX_BUFFERED} byte decode buffer"
        ));
        true
    }

    fn apply(&mut self, step: Step) -> usize {
        match step {
            Step::Consumed { n, skip } => {
                self.offset += n as u64;
                self.skip = skip;
                n
            }
            Step::Raw => {
                self.phase = Phase::Raw;
                0
            }
        }
    }

    /// Reports undecodable bytes at the current offset and stops decoding this direction.
    /// The line is printed with `--quiet` too.
    fn fail(&mut self, why: &str) {
        self.count("decode error");
        let (id, dir, at) = (self.conn.id, self.dir, self.offset);
        self.conn.out.line(&format!(
            "[{id}] {dir} decode error at byte {at}: {why}; forwarding the rest of this direction undecoded"
        ));
        self.phase = Phase::Raw;
    }

    /// Called at end of stream.
    fn finish(&mut self) {
        if self.phase == Phase::Raw {
            return;
        }
        if self.skip > 0 {
            self.trace(format_args!(
                "stream ended at byte {} with {} payload bytes still expected",
                self.offset, self.skip
            ));
        } else if !self.acc.is_empty() {
            self.trace(format_args!(
                "stream ended at byte {} inside a message ({} bytes of it received)",
                self.offset,
                self.acc.len()
            ));
        }
    }

    /// Decodes one message from the start of `buf`. Has no effect unless it returns `Ok`.
    fn step(&mut self, buf: &[u8]) -> Result<Step, wire::Error> {
        match self.dir {
            Dir::ClientToServer => self.client_step(buf),
            Dir::ServerToClient => self.server_step(buf),
        }
    }

    // ---- client to server ----

    fn client_step(&mut self, buf: &[u8]) -> Result<Step, wire::Error> {
        let (tls, oldstyle, transmission) = {
            let s = self.session();
            (s.tls, s.oldstyle, s.transmission)
        };
        if tls {
            return Ok(Step::Raw);
        }
        match self.phase {
            Phase::Start if oldstyle => {
                self.phase = Phase::Transmission;
                consumed(0, 0)
            }
            Phase::Start => {
                let f = ClientFlags::parse(buf)?;
                self.session().client_no_zeroes = f.contains(ClientFlags::NO_ZEROES);
                self.count("client flags");
                self.trace(format_args!("client flags {}", flags(f.bits().into(), f)));
                self.phase = Phase::Options;
                consumed(ClientFlags::LEN, 0)
            }
            Phase::Options if transmission => {
                self.phase = Phase::Transmission;
                consumed(0, 0)
            }
            Phase::Options => self.option(buf),
            Phase::Transmission => self.request(buf),
            Phase::Raw => Ok(Step::Raw),
        }
    }

    fn option(&mut self, buf: &[u8]) -> Result<Step, wire::Error> {
        let header = OptHeader::parse(buf)?;
        let total = header.message_len()?;
        if total > MAX_BUFFERED {
            self.count(header.code.to_string());
            self.trace(format_args!(
                "{} with {} bytes of data (too long to decode, skipped)",
                header.code, header.len
            ));
            return consumed(OptHeader::LEN, header.len.into());
        }
        wire::need(buf, total)?;
        self.count(header.code.to_string());
        let data = &buf[OptHeader::LEN..total];
        let opt = match Opt::parse(header.code, data) {
            Ok(opt) => opt,
            Err(e) => {
                self.trace(format_args!(
                    "{} with {} bytes of data, malformed: {e}",
                    header.code, header.len
                ));
                return consumed(total, 0);
            }
        };
        let mut line = header.code.to_string();
        match opt {
            Opt::ExportName { name } => {
                self.session().export_name_pending = true;
                let _ = write!(line, " name={name:?}");
            }
            Opt::Info(r) | Opt::Go(r) => {
                let infos: Vec<String> = r.infos.iter().map(|i| i.to_string()).collect();
                let _ = write!(
                    line,
                    " name={:?} info_requests=[{}]",
                    r.name,
                    infos.join(",")
                );
            }
            Opt::ListMetaContext(r) | Opt::SetMetaContext(r) => {
                if header.code == OptCode::SetMetaContext {
                    self.session().contexts.clear();
                }
                let q: Vec<String> = r.queries.iter().map(|q| format!("{q:?}")).collect();
                let _ = write!(line, " export={:?} queries=[{}]", r.export, q.join(","));
            }
            Opt::Abort if !data.is_empty() => {
                let _ = write!(line, " ({} bytes of data, ignored)", data.len());
            }
            Opt::Unknown { data, .. } => {
                let _ = write!(line, " data={} bytes", data.len());
            }
            _ => {}
        }
        self.trace(format_args!("{line}"));
        consumed(total, 0)
    }

    fn request(&mut self, buf: &[u8]) -> Result<Step, wire::Error> {
        let r = Request::parse(buf)?;
        let hlen = r.buffer_len();
        // A write counts its payload even without PAYLOAD_LEN under extended headers (QEMU 10
        // clients omit the flag the spec requires; qemu-nbd proceeds, and so does the codec).
        let payload = r.payload_len();
        // The block-status payload is small: decode it with the header.
        let bs_payload = r.extended && r.command == Command::BlockStatus && payload > 0;
        if bs_payload && (payload as usize) <= MAX_BUFFERED - hlen {
            wire::need(buf, hlen + payload as usize)?;
        }
        let extended_negotiated = {
            let mut s = self.session();
            if r.command != Command::Disc {
                s.inflight.insert(r.cookie.0, (r.command, r.len));
            }
            s.extended
        };
        self.count(r.command.to_string());
        let mut line = format!(
            "{} {} cookie={:#x} offset={} len={} flags={}",
            r.command,
            if r.extended { "extended" } else { "compact" },
            r.cookie.0,
            r.offset,
            r.len,
            flags(r.flags.bits().into(), r.flags)
        );
        if r.extended != extended_negotiated {
            let _ = write!(
                line,
                " (header form does not match the negotiation: extended headers {})",
                if extended_negotiated { "on" } else { "off" }
            );
        }
        if r.extended && r.command == Command::Write && !r.flags.contains(CmdFlags::PAYLOAD_LEN) {
            line.push_str(" (extended write without PAYLOAD_LEN, which the spec requires; length taken as the payload length)");
        }
        if bs_payload && (payload as usize) <= MAX_BUFFERED - hlen {
            let end = hlen + payload as usize;
            match BlockStatusPayload::parse(&buf[hlen..end]) {
                Ok(p) => {
                    let ids: Vec<String> = p.ids.iter().map(|i| i.to_string()).collect();
                    let _ = write!(
                        line,
                        " payload: effect_len={} context_ids=[{}]",
                        p.effect_len,
                        ids.join(",")
                    );
                }
                Err(e) => {
                    let _ = write!(line, " payload of {payload} bytes malformed: {e}");
                }
            }
            self.trace(format_args!("{line}"));
            return consumed(end, 0);
        }
        if payload > 0 {
            let _ = write!(line, " payload={payload} bytes");
        }
        self.trace(format_args!("{line}"));
        consumed(hlen, payload)
    }

    // ---- server to client ----

    fn server_step(&mut self, buf: &[u8]) -> Result<Step, wire::Error> {
        match self.phase {
            Phase::Start => self.hello(buf),
            Phase::Options => {
                let (pending, zeroes) = {
                    let s = self.session();
                    (
                        s.export_name_pending,
                        !(s.server_no_zeroes && s.client_no_zeroes),
                    )
                };
                if pending {
                    self.export_name_reply(buf, zeroes)
                } else {
                    self.option_reply(buf)
                }
            }
            Phase::Transmission => self.reply(buf),
            Phase::Raw => Ok(Step::Raw),
        }
    }

    fn hello(&mut self, buf: &[u8]) -> Result<Step, wire::Error> {
        match Hello::parse(buf)? {
            Hello::Newstyle(g) => {
                self.session().server_no_zeroes = g.flags.contains(HandshakeFlags::NO_ZEROES);
                self.count("greeting");
                self.trace(format_args!(
                    "greeting newstyle, handshake flags {}",
                    flags(g.flags.bits().into(), g.flags)
                ));
                self.phase = Phase::Options;
                consumed(wire::Greeting::LEN, 0)
            }
            Hello::Oldstyle(h) => {
                {
                    let mut s = self.session();
                    s.oldstyle = true;
                    s.transmission = true;
                }
                self.count("oldstyle hello");
                let mut line = format!(
                    "oldstyle hello size={} flags={} (transmission starts: simple replies)",
                    h.size,
                    tflags(h.transmission_flags)
                );
                if !h.handshake_flags.is_empty() {
                    let _ = write!(
                        line,
                        " (handshake flags {:#x} should be 0)",
                        h.handshake_flags.bits()
                    );
                }
                self.trace(format_args!("{line}"));
                self.phase = Phase::Transmission;
                consumed(wire::OldstyleHello::LEN, 0)
            }
        }
    }

    fn export_name_reply(&mut self, buf: &[u8], zeroes: bool) -> Result<Step, wire::Error> {
        let r = ExportNameReply::parse(buf, zeroes)?;
        let mode = {
            let mut s = self.session();
            s.export_name_pending = false;
            s.transmission = true;
            s.mode()
        };
        self.count("export name reply");
        self.trace(format_args!(
            "NBD_OPT_EXPORT_NAME reply size={} flags={} ({}) (transmission starts: {mode})",
            r.size,
            tflags(r.flags),
            if zeroes {
                "with 124 zero bytes"
            } else {
                "no zero padding"
            }
        ));
        self.phase = Phase::Transmission;
        consumed(r.buffer_len(), 0)
    }

    fn option_reply(&mut self, buf: &[u8]) -> Result<Step, wire::Error> {
        let header = OptReplyHeader::parse(buf)?;
        let total = header.message_len()?;
        let name = header.reply.to_string();
        if total > MAX_BUFFERED {
            self.count(name.clone());
            self.trace(format_args!(
                "{name} to {} with {} bytes of data (too long to decode, skipped)",
                header.opt, header.len
            ));
            return consumed(OptReplyHeader::LEN, header.len.into());
        }
        wire::need(buf, total)?;
        self.count(name.clone());
        let mut line = format!("{name} to {}", header.opt);
        let reply = match OptReply::parse(header.reply, &buf[OptReplyHeader::LEN..total]) {
            Ok(r) => r,
            Err(e) => {
                self.trace(format_args!(
                    "{line} with {} bytes of data, malformed: {e}",
                    header.len
                ));
                return consumed(total, 0);
            }
        };
        let (mut raw, mut go) = (false, false);
        match reply {
            OptReply::Ack => {
                let mut s = self.session();
                match header.opt {
                    OptCode::StructuredReply => {
                        s.structured = true;
                        line.push_str(" (structured replies on)");
                    }
                    OptCode::ExtendedHeaders => {
                        s.extended = true;
                        line.push_str(" (extended headers on)");
                    }
                    OptCode::StartTls => {
                        s.tls = true;
                        raw = true;
                        line.push_str(" (TLS handshake follows: forwarding both directions undecoded from here)");
                    }
                    OptCode::Go => {
                        s.transmission = true;
                        go = true;
                        let _ = write!(line, " (transmission starts: {})", s.mode());
                    }
                    _ => {}
                }
            }
            OptReply::Server { name, description } => {
                let _ = write!(line, " name={name:?} description={description:?}");
            }
            OptReply::Info(info) => {
                let _ = write!(line, " {}", info.info_type());
                match info {
                    Info::Export { size, flags } => {
                        let _ = write!(line, " size={size} flags={}", tflags(flags));
                    }
                    Info::Name(n) => {
                        let _ = write!(line, " name={n:?}");
                    }
                    Info::Description(d) => {
                        let _ = write!(line, " description={d:?}");
                    }
                    Info::BlockSize(b) => {
                        let _ = write!(
                            line,
                            " min={} preferred={} max_payload={}",
                            b.min, b.preferred, b.max_payload
                        );
                        if let Err(why) = b.validate() {
                            let _ = write!(line, " (invalid: {why})");
                        }
                    }
                    Info::Unknown { data, .. } => {
                        let _ = write!(line, " data={} bytes", data.len());
                    }
                }
            }
            OptReply::MetaContext { id, name } => {
                if header.opt == OptCode::SetMetaContext {
                    self.session().contexts.insert(id, name.to_string());
                }
                let _ = write!(line, " id={id} name={name:?}");
            }
            OptReply::Error { message, .. } => {
                let _ = write!(line, " message={message:?}");
            }
            OptReply::Unknown { data, .. } => {
                let _ = write!(line, " data={} bytes", data.len());
            }
        }
        if header.reply == ReplyType::Ack && header.opt == OptCode::Abort {
            line.push_str(" (negotiation aborted)");
        }
        self.trace(format_args!("{line}"));
        if go {
            self.phase = Phase::Transmission;
        }
        if raw {
            // The bytes after this reply are TLS.
            self.phase = Phase::Raw;
        }
        consumed(total, 0)
    }

    fn reply(&mut self, buf: &[u8]) -> Result<Step, wire::Error> {
        match ReplyHeader::parse(buf)? {
            ReplyHeader::Simple(r) => {
                let (cmd, mode_note) = {
                    let mut s = self.session();
                    let cmd = s.inflight.remove(&r.cookie.0);
                    let note = if s.extended {
                        " (simple reply although extended headers were negotiated)"
                    } else {
                        ""
                    };
                    (cmd, note)
                };
                self.count("simple reply");
                let mut line = format!("simple reply cookie={:#x}", r.cookie.0);
                match cmd {
                    Some((c, _)) => {
                        let _ = write!(line, " to {c}");
                    }
                    None => line.push_str(" to an unknown cookie"),
                }
                let mut skip = 0;
                match r.error {
                    Some(e) => {
                        let _ = write!(line, " error={e}");
                    }
                    None => {
                        line.push_str(" ok");
                        if let Some((Command::Read, len)) = cmd {
                            skip = len;
                            let _ = write!(line, " data={len} bytes");
                        }
                    }
                }
                line.push_str(mode_note);
                self.trace(format_args!("{line}"));
                consumed(wire::SimpleReply::LEN, skip)
            }
            ReplyHeader::Chunk(h) => self.chunk(buf, h),
        }
    }

    fn chunk(&mut self, buf: &[u8], h: ChunkHeader) -> Result<Step, wire::Error> {
        let hlen = h.buffer_len();
        let wide = h.chunk_type == ChunkType::BlockStatusExt;
        // How much of the payload is decoded (the rest is skipped).
        let decoded: u64 = match h.chunk_type {
            ChunkType::OffsetData => (wire::OffsetDataHeader::LEN as u64).min(h.len),
            ChunkType::BlockStatus | ChunkType::BlockStatusExt => {
                let fixed = BlockStatusHeader::len(wide) as u64;
                let w = Extent::width(wide) as u64;
                // Whole descriptors only, at most SHOWN_EXTENTS of them.
                let body = h.len.saturating_sub(fixed);
                let shown = (body / w).min(SHOWN_EXTENTS as u64);
                if h.len < fixed {
                    h.len
                } else {
                    fixed + shown * w
                }
            }
            _ if h.len <= (MAX_BUFFERED - hlen) as u64 => h.len,
            _ => 0,
        };
        // invariant: `decoded` is at most 8 + 4 * 16 or at most MAX_BUFFERED.
        let end = hlen + decoded as usize;
        wire::need(buf, end)?;
        let payload = &buf[hlen..end];

        let (cmd, extended, structured, context) = {
            let mut s = self.session();
            let cmd = s.inflight.get(&h.cookie.0).map(|c| c.0);
            if h.is_done() {
                s.inflight.remove(&h.cookie.0);
            }
            let context = if matches!(
                h.chunk_type,
                ChunkType::BlockStatus | ChunkType::BlockStatusExt
            ) && payload.len() >= 4
            {
                let id = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                s.contexts.get(&id).cloned()
            } else {
                None
            };
            (cmd, s.extended, s.structured, context)
        };

        let form = if h.is_extended() {
            "extended chunk"
        } else {
            "structured chunk"
        };
        self.count(h.chunk_type.to_string());
        let mut line = format!("{form} {} cookie={:#x}", h.chunk_type, h.cookie.0);
        match cmd {
            Some(c) => {
                let _ = write!(line, " to {c}");
            }
            None => line.push_str(" to an unknown cookie"),
        }
        if let Some(off) = h.offset {
            let _ = write!(line, " req_offset={off}");
        }
        let _ = write!(
            line,
            " len={} flags={}",
            h.len,
            flags(h.flags.bits().into(), h.flags)
        );
        if h.is_extended() && !extended {
            line.push_str(" (extended headers not negotiated)");
        } else if !h.is_extended() && extended {
            line.push_str(" (structured chunk although extended headers were negotiated)");
        } else if !h.is_extended() && !structured {
            line.push_str(" (structured replies not negotiated)");
        }

        let skip = h.len - decoded;
        match h.chunk_type {
            ChunkType::OffsetData => match wire::OffsetDataHeader::parse(payload, h.len) {
                Ok(d) => {
                    let _ = write!(line, " offset={} data={} bytes", d.offset, d.data_len);
                }
                Err(e) => {
                    let _ = write!(line, " malformed: {e}");
                }
            },
            ChunkType::BlockStatus | ChunkType::BlockStatusExt => {
                match BlockStatusHeader::parse(payload, wide, h.len) {
                    Ok(bs) => {
                        let fixed = BlockStatusHeader::len(wide);
                        let _ = write!(line, " context={}", bs.context_id);
                        if let Some(name) = context {
                            let _ = write!(line, "({name})");
                        }
                        let _ = write!(line, " extents={}", bs.count);
                        match Extents::new(&payload[fixed..], wide) {
                            Ok(ex) => {
                                let shown: Vec<String> = ex
                                    .iter()
                                    .map(|e| format!("({},{})", e.len, e.status))
                                    .collect();
                                let more = if bs.count > ex.len() as u64 {
                                    " ..."
                                } else {
                                    ""
                                };
                                let _ = write!(line, " [{}{more}]", shown.join(" "));
                            }
                            Err(e) => {
                                let _ = write!(line, " malformed: {e}");
                            }
                        }
                    }
                    Err(e) => {
                        let _ = write!(line, " malformed: {e}");
                    }
                }
            }
            _ if decoded < h.len => {
                let _ = write!(
                    line,
                    " payload of {} bytes (too long to decode, skipped)",
                    h.len
                );
            }
            _ => match ChunkPayload::parse(&h, payload) {
                Ok(ChunkPayload::None) => {}
                Ok(ChunkPayload::OffsetHole(hole)) => {
                    let _ = write!(line, " offset={} hole={}", hole.offset, hole.len);
                }
                Ok(ChunkPayload::Error(e)) => {
                    let _ = write!(line, " error={} message={:?}", e.error, e.message);
                    if let Some(off) = e.offset {
                        let _ = write!(line, " offset={off}");
                    }
                }
                Ok(ChunkPayload::Unknown(p)) => {
                    let _ = write!(line, " payload={} bytes", p.len());
                }
                // Handled above; kept for completeness.
                Ok(ChunkPayload::OffsetData(_)) | Ok(ChunkPayload::BlockStatus(_)) => {}
                Err(e) => {
                    let _ = write!(line, " malformed: {e}");
                }
            },
        }
        self.trace(format_args!("{line}"));
        consumed(end, skip)
    }
}

// ---------------------------------------------------------------------------------------------
// Forwarding
// ---------------------------------------------------------------------------------------------

/// Forwards `src` to `dst`, decoding every chunk before it is forwarded. Returns the decoder
/// (for its counts) and the bytes forwarded.
fn pump(mut src: Stream, mut dst: Stream, mut dec: Decoder) -> (Decoder, u64) {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut total = 0u64;
    let end = loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break "end of stream".to_string(),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break format!("read error: {e}"),
        };
        dec.feed(&buf[..n]);
        if let Err(e) = dst.write_all(&buf[..n]) {
            // The receiver is gone: stop reading from the sender too.
            src.shutdown(Shutdown::Both);
            break format!("write error: {e}");
        }
        total += n as u64;
    };
    dec.finish();
    // Let EOF reach the receiver, which then closes its side.
    dst.shutdown(Shutdown::Write);
    dec.trace(format_args!("{end} after {total} bytes"));
    (dec, total)
}

/// Message counts of every connection, and how many connections there were.
struct Totals {
    /// (C->S, S->C), updated as each message is decoded.
    counts: Mutex<(Counts, Counts)>,
    accepted: AtomicUsize,
    closed: AtomicUsize,
    /// The summary has been printed (it is printed once, by a signal or at the end).
    printed: AtomicBool,
}

impl Totals {
    /// Prints the total summary unless it was printed already, and keeps the output locked
    /// (so nothing follows it) while `then` runs.
    fn print_then(&self, out: &Out, then: impl FnOnce()) {
        let (accepted, closed) = (
            self.accepted.load(Ordering::SeqCst),
            self.closed.load(Ordering::SeqCst),
        );
        let (c2s, s2c) = lock(&self.counts).clone();
        let mut sink = lock(&out.sink);
        if self.printed.swap(true, Ordering::SeqCst) {
            then();
            return;
        }
        let open = accepted.saturating_sub(closed);
        let still = if open > 0 {
            format!(" ({open} still open)")
        } else {
            String::new()
        };
        write_line(&mut sink, &format!("[total] {accepted} connections{still}"));
        write_line(
            &mut sink,
            &format!("[total] C->S summary: {}", summary(&c2s)),
        );
        write_line(
            &mut sink,
            &format!("[total] S->C summary: {}", summary(&s2c)),
        );
        then();
    }
}

/// On SIGINT or SIGTERM: the total summary, then exit with status 0 (removing the Unix
/// socket the proxy listens on, if any).
fn on_signal_print_totals(out: Arc<Out>, totals: Arc<Totals>, socket: Option<PathBuf>) {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nbd-trace: cannot handle signals: {e}");
            return;
        }
    };
    thread::spawn(move || {
        if signals.forever().next().is_some() {
            totals.print_then(&out, || {
                if let Some(p) = &socket {
                    let _ = std::fs::remove_file(p);
                }
                std::process::exit(0);
            });
        }
    });
}

fn handle(
    id: usize,
    client: Stream,
    peer: String,
    connect: &Addr,
    out: Arc<Out>,
    totals: Arc<Totals>,
) {
    handle_conn(id, client, peer, connect, out, totals.clone());
    totals.closed.fetch_add(1, Ordering::SeqCst);
}

fn handle_conn(
    id: usize,
    client: Stream,
    peer: String,
    connect: &Addr,
    out: Arc<Out>,
    totals: Arc<Totals>,
) {
    out.trace(&format!("[{id}] accepted {peer}"));
    let server = match Stream::connect(connect) {
        Ok(s) => s,
        Err(e) => {
            out.line(&format!(
                "[{id}] cannot connect to {connect}: {e}; closing the client"
            ));
            client.shutdown(Shutdown::Both);
            return;
        }
    };
    out.trace(&format!("[{id}] connected to {connect}"));
    let conn = Arc::new(Conn {
        id,
        out: out.clone(),
        session: Mutex::new(Session::default()),
        totals,
    });
    let clones = client
        .try_clone()
        .and_then(|c| Ok((c, server.try_clone()?)));
    let (client2, server2) = match clones {
        Ok(c) => c,
        Err(e) => {
            out.line(&format!("[{id}] cannot clone sockets: {e}"));
            return;
        }
    };
    let c2s_dec = Decoder::new(conn.clone(), Dir::ClientToServer);
    let s2c_dec = Decoder::new(conn.clone(), Dir::ServerToClient);
    let c2s = thread::spawn(move || pump(client, server, c2s_dec));
    let (s2c, s2c_bytes) = pump(server2, client2, s2c_dec);
    let (c2s, c2s_bytes) = match c2s.join() {
        Ok(r) => r,
        Err(_) => {
            out.line(&format!("[{id}] C->S thread panicked"));
            return;
        }
    };
    out.trace(&format!(
        "[{id}] closed: C->S {c2s_bytes} bytes ({} payload), S->C {s2c_bytes} bytes ({} payload)",
        c2s.payload_bytes, s2c.payload_bytes
    ));
    out.trace(&format!("[{id}] C->S summary: {}", summary(&c2s.counts)));
    out.trace(&format!("[{id}] S->C summary: {}", summary(&s2c.counts)));
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) if e.is_empty() => {
            // --help
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("nbd-trace: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let sink: Box<dyn Write + Send> = match &opts.log {
        Some(p) => match File::create(p) {
            Ok(f) => Box::new(f),
            Err(e) => {
                eprintln!("nbd-trace: cannot create {}: {e}", p.display());
                return ExitCode::FAILURE;
            }
        },
        None => Box::new(io::stdout()),
    };
    let out = Arc::new(Out {
        sink: Mutex::new(sink),
        quiet: opts.quiet,
    });
    let listener = match Listener::bind(&opts.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("nbd-trace: cannot listen on {}: {e}", opts.listen);
            return ExitCode::FAILURE;
        }
    };
    // Signals are handled before anyone is told the proxy is ready.
    let totals = Arc::new(Totals {
        counts: Mutex::new((Counts::new(), Counts::new())),
        accepted: AtomicUsize::new(0),
        closed: AtomicUsize::new(0),
        printed: AtomicBool::new(false),
    });
    let socket = match &opts.listen {
        Addr::Unix(p) => Some(p.clone()),
        Addr::Tcp(_) => None,
    };
    on_signal_print_totals(out.clone(), totals.clone(), socket);
    let ready = format!(
        "listening on {}, forwarding to {}",
        listener.local(),
        opts.connect
    );
    out.trace(&ready);
    if opts.log.is_some() || opts.quiet {
        eprintln!("nbd-trace: {ready}");
    }

    let mut handles = Vec::new();
    loop {
        if opts.max_conns.is_some_and(|max| handles.len() >= max) {
            break;
        }
        let (client, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("nbd-trace: accept: {e}");
                continue;
            }
        };
        let id = totals.accepted.fetch_add(1, Ordering::SeqCst) + 1;
        let (connect, out, totals) = (opts.connect.clone(), out.clone(), totals.clone());
        handles.push(thread::spawn(move || {
            handle(id, client, peer, &connect, out, totals)
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    totals.print_then(&out, || {});
    ExitCode::SUCCESS
}
