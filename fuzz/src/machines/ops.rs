//! `client_ops` and `server_ops`: arbitrary interleavings of API calls on one machine,
//! with the peer's messages built (mostly well-formed, sometimes raw) from `arbitrary`
//! values. Every call goes through [`client::Checked`] / [`server::Checked`], so the
//! sticky-error, exactly-once, bounds and borrow checks apply, and every caller error
//! must leave the observable state unchanged.

use arbitrary::{Arbitrary, Unstructured};

use nbd_proto::client::ClientConfig;
use nbd_proto::server::{ExportInfo, ServerConfig};
use nbd_proto::wire::{
    BlockSize, BlockStatus, ChunkHeader, ChunkType, CmdFlags, Command, Cookie, Errno,
    ExportNameReply, Extent, Extents, Greeting, HandshakeFlags, Hello, Info, OffsetHole,
    OldstyleHello, OptCode, OptError, OptReply, ReplyFlags, SimpleReply, TransmissionFlags,
    NBD_MAGIC, OPTS_MAGIC,
};

use super::client::{self, tls};
use super::server;

/// Strings the generated messages use (names, queries, context names, messages).
const NAMES: [&str; 8] = [
    "",
    "disk",
    "base:allocation",
    "qemu:dirty-bitmap:bm0",
    "qemu:",
    "nocolon",
    ":empty-namespace",
    "\u{e9}t\u{e9}",
];

fn name(i: u8) -> &'static str {
    NAMES[usize::from(i) % NAMES.len()]
}

fn errno(i: u8) -> Errno {
    [
        Errno::Io,
        Errno::Perm,
        Errno::Inval,
        Errno::NoSpc,
        Errno::Overflow,
        Errno::NotSup,
    ][usize::from(i) % 6]
}

fn opt_code(i: u8) -> OptCode {
    match i % 13 {
        12 => OptCode::from(u32::from(i)),
        n => OptCode::from(u32::from(n)),
    }
}

fn opt_error(i: u8) -> OptError {
    OptError::from(0x8000_0000 | u32::from(i % 12))
}

fn emit_into(
    out: &mut Vec<u8>,
    len: usize,
    f: impl FnOnce(&mut [u8]) -> nbd_proto::wire::Result<usize>,
) {
    let at = out.len();
    out.resize(at + len, 0);
    let n = f(&mut out[at..]).expect("encoding a generated message");
    out.truncate(at + n);
}

// ---------------------------------------------------------------- client_ops

/// A message from the server, appended to the client's input.
#[derive(Arbitrary, Debug)]
pub enum SrvMsg {
    /// Newstyle greeting.
    Greeting { fixed: bool, no_zeroes: bool },
    /// Oldstyle hello.
    Oldstyle { size: u32, tflags: u16 },
    /// Option replies, to the last option the client sent (or a wrong one).
    Ack { wrong: bool },
    /// An error reply.
    OptErr { wrong: bool, err: u8, msg: u8 },
    /// `NBD_INFO_EXPORT`.
    InfoExport { size: u32, tflags: u16 },
    /// `NBD_INFO_BLOCK_SIZE`.
    InfoBlockSize { min: u8, pref: u8, max: u32 },
    /// `NBD_INFO_NAME` / `NBD_INFO_DESCRIPTION`.
    InfoText { desc: bool, s: u8 },
    /// `NBD_REP_SERVER`.
    Server { name: u8, desc: u8 },
    /// `NBD_REP_META_CONTEXT`.
    MetaContext { id: u8, name: u8 },
    /// The `NBD_OPT_EXPORT_NAME` reply.
    ExportName {
        size: u32,
        tflags: u16,
        zeroes: bool,
    },
    /// A simple reply to the `which`-th command in flight.
    Simple {
        which: u8,
        err: Option<u8>,
        data: bool,
    },
    /// Structured/extended chunks to the `which`-th command in flight (`flip`: the wrong
    /// header form).
    None { which: u8, flip: bool },
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    Data {
        which: u8,
        flip: bool,
        done: bool,
        off: u16,
        len: u16,
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    Hole {
        which: u8,
        flip: bool,
        done: bool,
        off: u16,
        len: u16,
    },
    /// Block status for the `ctx`-th context.
    Bs {
        which: u8,
        flip: bool,
        done: bool,
        ctx: u8,
        wide: bool,
        extents: Vec<(u16, u8)>,
    },
    /// An error chunk.
    Error {
        which: u8,
        flip: bool,
        done: bool,
        err: u8,
        msg: u8,
        off: Option<u16>,
    },
    /// Anything.
    Raw(Vec<u8>),
}

/// One step of `client_ops`.
#[derive(Arbitrary, Debug)]
pub enum COp {
    /// Append a server message to the input.
    Send(SrvMsg),
    /// `handle_input` with up to `n` of the pending bytes (0: all).
    Feed(u16),
    /// `handle_payload(n)`, taking `n` pending bytes.
    Payload(u16),
    /// `handle_eof`, then `poll_event` until `None`.
    Eof,
    /// One `poll_transmit` into `n + 1` bytes.
    Poll(u16),
    /// `poll_transmit` until `None`.
    Drain,
    /// One `poll_event`.
    PollEvent,
    /// Commands: offsets in 512-byte units.
    Read { off: u16, len: u16, flags: u8 },
    /// `write`.
    Write { off: u16, len: u16, flags: u8 },
    /// `flush`.
    Flush { flags: u8 },
    /// `trim`, `cache`, `write_zeroes`, `block_status` (by `kind`).
    Range {
        kind: u8,
        off: u16,
        len: u32,
        flags: u8,
    },
    /// `block_status_for` the contexts whose bit is set.
    BsFor {
        off: u16,
        len: u32,
        flags: u8,
        mask: u8,
    },
    /// `disconnect`.
    Disconnect,
    /// `tls_established`.
    TlsEstablished,
    /// A manual `opt_*` call.
    Opt { code: u8, name: u8 },
}

/// The client configuration.
#[derive(Arbitrary, Debug)]
pub struct CConfig {
    tls: u8,
    manual: bool,
    contexts: bool,
    no_sr: bool,
    no_eh: bool,
    lean: bool,
    small: bool,
}

struct COps<const N: usize> {
    k: client::Checked<N>,
    input: Vec<u8>,
    /// Bytes of the client's output scanned for options.
    scanned: usize,
    last_opt: OptCode,
}

impl<const N: usize> COps<N> {
    /// The last option the client wrote (scanning its output).
    fn scan(&mut self) {
        let out = &self.k.out;
        if self.scanned == 0 {
            self.scanned = 4.min(out.len());
        }
        while let Some(h) = out.get(self.scanned..self.scanned + 16) {
            if h[..8] != OPTS_MAGIC.to_be_bytes() {
                break;
            }
            self.last_opt = OptCode::from(u32::from_be_bytes([h[8], h[9], h[10], h[11]]));
            let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]) as usize;
            self.scanned += 16 + len;
        }
    }

    /// Cookie and request of the `which`-th command in flight.
    fn target(&self, which: u8) -> (Cookie, u64, u64) {
        let n = self.k.cmds.len();
        if n == 0 {
            return (Cookie(u64::from(which)), 0, 0);
        }
        let (c, cmd) = self.k.cmds.iter().nth(usize::from(which) % n).expect("nth");
        (Cookie(*c), cmd.offset, cmd.len)
    }

    fn chunk(&mut self, which: u8, flip: bool, done: bool, ty: ChunkType, payload: &[u8]) {
        let (cookie, offset, _) = self.target(which);
        let ext = self.k.c.extended_headers() != flip;
        let h = ChunkHeader {
            flags: if done {
                ReplyFlags::DONE
            } else {
                ReplyFlags::empty()
            },
            chunk_type: ty,
            cookie,
            offset: ext.then_some(offset),
            len: payload.len() as u64,
        };
        emit_into(&mut self.input, h.buffer_len(), |b| h.emit(b));
        self.input.extend_from_slice(payload);
    }

    fn send(&mut self, m: SrvMsg) {
        self.scan();
        let opt = self.last_opt;
        let rep = |s: &mut Self, wrong: bool, r: OptReply<'_>| {
            let o = if wrong { OptCode::List } else { opt };
            emit_into(&mut s.input, r.buffer_len(), |b| r.emit(o, b));
        };
        match m {
            SrvMsg::Greeting { fixed, no_zeroes } => {
                let mut flags = HandshakeFlags::empty();
                flags.set(HandshakeFlags::FIXED_NEWSTYLE, fixed);
                flags.set(HandshakeFlags::NO_ZEROES, no_zeroes);
                let h = Hello::Newstyle(Greeting { flags });
                emit_into(&mut self.input, h.buffer_len(), |b| h.emit(b));
            }
            SrvMsg::Oldstyle { size, tflags } => {
                let h = OldstyleHello {
                    size: size.into(),
                    handshake_flags: HandshakeFlags::empty(),
                    transmission_flags: TransmissionFlags::from_bits(tflags),
                };
                emit_into(&mut self.input, OldstyleHello::LEN, |b| h.emit(b));
            }
            SrvMsg::Ack { wrong } => rep(self, wrong, OptReply::Ack),
            SrvMsg::OptErr { wrong, err, msg } => rep(
                self,
                wrong,
                OptReply::Error {
                    error: opt_error(err),
                    message: name(msg),
                },
            ),
            SrvMsg::InfoExport { size, tflags } => rep(
                self,
                false,
                OptReply::Info(Info::Export {
                    size: u64::from(size) << 9,
                    flags: TransmissionFlags::from_bits(tflags),
                }),
            ),
            SrvMsg::InfoBlockSize { min, pref, max } => rep(
                self,
                false,
                OptReply::Info(Info::BlockSize(BlockSize {
                    min: 1 << (min % 18),
                    preferred: 1 << (pref % 26),
                    max_payload: max,
                })),
            ),
            SrvMsg::InfoText { desc, s } => {
                let i = if desc {
                    Info::Description(name(s))
                } else {
                    Info::Name(name(s))
                };
                rep(self, false, OptReply::Info(i))
            }
            SrvMsg::Server { name: n, desc } => rep(
                self,
                false,
                OptReply::Server {
                    name: name(n),
                    description: name(desc),
                },
            ),
            SrvMsg::MetaContext { id, name: n } => rep(
                self,
                false,
                OptReply::MetaContext {
                    id: id.into(),
                    name: name(n),
                },
            ),
            SrvMsg::ExportName {
                size,
                tflags,
                zeroes,
            } => {
                let r = ExportNameReply {
                    size: u64::from(size) << 9,
                    flags: TransmissionFlags::from_bits(tflags),
                    zeroes,
                };
                emit_into(&mut self.input, r.buffer_len(), |b| r.emit(b));
            }
            SrvMsg::Simple { which, err, data } => {
                let (cookie, _, len) = self.target(which);
                let r = SimpleReply {
                    error: err.map(errno),
                    cookie,
                };
                emit_into(&mut self.input, SimpleReply::LEN, |b| r.emit(b));
                if data {
                    self.input
                        .resize(self.input.len() + len.min(1 << 16) as usize, 0x5a);
                }
            }
            SrvMsg::None { which, flip } => self.chunk(which, flip, true, ChunkType::None, &[]),
            SrvMsg::Data {
                which,
                flip,
                done,
                off,
                len,
            } => {
                let (_, offset, _) = self.target(which);
                let mut p = (offset + u64::from(off)).to_be_bytes().to_vec();
                p.resize(8 + usize::from(len), 0x5a);
                self.chunk(which, flip, done, ChunkType::OffsetData, &p);
            }
            SrvMsg::Hole {
                which,
                flip,
                done,
                off,
                len,
            } => {
                let (_, offset, _) = self.target(which);
                let h = OffsetHole {
                    offset: offset + u64::from(off),
                    len: len.into(),
                };
                let mut p = [0u8; 12];
                let _ = h.emit(&mut p);
                self.chunk(which, flip, done, ChunkType::OffsetHole, &p);
            }
            SrvMsg::Bs {
                which,
                flip,
                done,
                ctx,
                wide,
                extents,
            } => {
                let id = context_id(self.k.c.contexts(), ctx);
                let ex = to_extents(&extents, 600);
                let mut raw = vec![0; ex.len() * Extent::width(wide)];
                let _ = nbd_proto::wire::extent::emit_extents(&ex, wide, &mut raw);
                let Ok(extents) = Extents::new(&raw, wide) else {
                    return;
                };
                let b = BlockStatus {
                    context_id: id,
                    extents,
                };
                let mut p = vec![0; b.buffer_len()];
                let _ = b.emit(&mut p);
                let ty = if wide {
                    ChunkType::BlockStatusExt
                } else {
                    ChunkType::BlockStatus
                };
                self.chunk(which, flip, done, ty, &p);
            }
            SrvMsg::Error {
                which,
                flip,
                done,
                err,
                msg,
                off,
            } => {
                let (_, offset, _) = self.target(which);
                let e = nbd_proto::wire::ErrorChunk {
                    error: errno(err),
                    message: name(msg),
                    offset: off.map(|o| offset + u64::from(o)),
                };
                let mut p = vec![0; e.buffer_len()];
                let _ = e.emit(&mut p);
                self.chunk(which, flip, done, e.chunk_type(), &p);
            }
            SrvMsg::Raw(b) => self.input.extend_from_slice(&b),
        }
    }

    fn op(&mut self, op: COp) {
        let k = &mut self.k;
        match op {
            COp::Send(m) => self.send(m),
            COp::Feed(n) => {
                let n = if n == 0 {
                    self.input.len()
                } else {
                    usize::from(n).min(self.input.len())
                };
                let input = self.input[..n].to_vec();
                if let Some((consumed, _)) = k.input(&input) {
                    self.input.drain(..consumed);
                }
                if k.saw_starttls {
                    k.call("tls_established", |c| c.tls_established());
                }
            }
            COp::Payload(n) => {
                if k.payload(n.into()) {
                    let n = usize::from(n).min(self.input.len());
                    self.input.drain(..n);
                }
            }
            COp::Eof => k.eof(),
            COp::Poll(n) => {
                let _ = k.poll_one(usize::from(n) + 1);
            }
            COp::Drain => k.transmit(),
            COp::PollEvent => k.drain_one(),
            COp::Read { off, len, flags } => {
                let (o, f) = (u64::from(off) << 9, CmdFlags::from_bits(flags.into()));
                let l = u32::from(len);
                k.command("read", Command::Read, o, l.into(), f, |c| c.read(o, l, f));
            }
            COp::Write { off, len, flags } => {
                let (o, f) = (u64::from(off) << 9, CmdFlags::from_bits(flags.into()));
                let l = u32::from(len);
                k.command("write", Command::Write, o, l.into(), f, |c| {
                    c.write(o, l, f)
                });
            }
            COp::Flush { flags } => {
                let f = CmdFlags::from_bits(flags.into());
                k.command("flush", Command::Flush, 0, 0, f, |c| c.flush(f));
            }
            COp::Range {
                kind,
                off,
                len,
                flags,
            } => {
                let (o, l, f) = (
                    u64::from(off) << 9,
                    u64::from(len),
                    CmdFlags::from_bits(flags.into()),
                );
                match kind % 4 {
                    0 => k.command("trim", Command::Trim, o, l, f, |c| c.trim(o, l, f)),
                    1 => k.command("cache", Command::Cache, o, l, f, |c| c.cache(o, l, f)),
                    2 => k.command("zero", Command::WriteZeroes, o, l, f, |c| {
                        c.write_zeroes(o, l, f)
                    }),
                    _ => k.command("bs", Command::BlockStatus, o, l, f, |c| {
                        c.block_status(o, l, f)
                    }),
                };
            }
            COp::BsFor {
                off,
                len,
                flags,
                mask,
            } => {
                let (o, l, f) = (
                    u64::from(off) << 9,
                    u64::from(len),
                    CmdFlags::from_bits(flags.into()),
                );
                let mut ids: Vec<u32> =
                    k.c.contexts()
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| mask & (1 << (i % 8)) != 0)
                        .map(|(_, id)| *id)
                        .collect();
                if mask & 0x80 != 0 {
                    ids.push(0xdead);
                }
                k.command("bs_for", Command::BlockStatus, o, l, f, |c| {
                    c.block_status_for(o, l, f, &ids)
                });
            }
            COp::Disconnect => {
                k.call("disconnect", |c| c.disconnect());
            }
            COp::TlsEstablished => {
                k.call("tls_established", |c| c.tls_established());
            }
            COp::Opt { code, name: n } => {
                let s = name(n);
                let q = [s];
                match code % 10 {
                    0 => k.call("opt_list", |c| c.opt_list()),
                    1 => k.call("opt_info", |c| c.opt_info(s)),
                    2 => k.call("opt_go", |c| c.opt_go(s)),
                    3 => k.call("opt_export_name", |c| c.opt_export_name(s)),
                    4 => k.call("opt_sr", |c| c.opt_structured_reply()),
                    5 => k.call("opt_eh", |c| c.opt_extended_headers()),
                    6 => k.call("opt_list_meta", |c| c.opt_list_meta_context("", &q)),
                    7 => k.call("opt_set_meta", |c| c.opt_set_meta_context("", &q)),
                    8 => k.call("opt_starttls", |c| c.opt_starttls()),
                    _ => k.call("opt_abort", |c| c.opt_abort()),
                };
            }
        }
    }
}

fn client_ops_n<const N: usize>(cfg: &ClientConfig<'_>, u: &mut Unstructured<'_>) -> usize {
    let mut s = COps::<N> {
        k: client::Checked::new(cfg, None),
        input: Vec::new(),
        scanned: 0,
        last_opt: OptCode::Go,
    };
    s.k.check();
    for _ in 0..256 {
        if u.is_empty() {
            break;
        }
        let Ok(op) = COp::arbitrary(u) else { break };
        s.op(op);
    }
    s.k.transmit();
    s.k.eof();
    s.k.events
}

/// `client_ops`: arbitrary calls on a client (see [`COp`]). Returns the events seen.
pub fn client_ops(data: &[u8]) -> usize {
    let mut u = Unstructured::new(data);
    let Ok(c) = CConfig::arbitrary(&mut u) else {
        return 0;
    };
    let mut cfg = ClientConfig::new("");
    cfg.tls = tls(c.tls);
    cfg.manual = c.manual;
    if c.contexts {
        cfg.meta_contexts = &super::script::CONTEXTS;
    }
    cfg.structured_replies = !c.no_sr;
    cfg.extended_headers = !c.no_eh;
    cfg.request_block_size = !c.lean;
    cfg.request_name_and_description = !c.lean;
    if c.small {
        client_ops_n::<2>(&cfg, &mut u)
    } else {
        client_ops_n::<64>(&cfg, &mut u)
    }
}

// ---------------------------------------------------------------- server_ops

/// The data of a generated option.
#[derive(Arbitrary, Debug)]
pub enum OptBody {
    /// No data.
    Empty,
    /// A bare name (`NBD_OPT_EXPORT_NAME`).
    Name(u8),
    /// An export request (INFO/GO): name and information types.
    Export { name: u8, infos: Vec<u16> },
    /// A metadata context request: export and queries.
    Meta { export: u8, queries: Vec<u8> },
    /// Anything, declared as `len` bytes.
    Raw(Vec<u8>),
    /// A header declaring `len` bytes with none following yet (an oversized option).
    Declared(u32),
}

/// A message from the client, appended to the server's input.
#[derive(Arbitrary, Debug)]
pub enum CliMsg {
    /// Client flags.
    Flags(u8),
    /// An option.
    Opt { code: u8, body: OptBody },
    /// A request. `ext: None` follows the negotiated form.
    Request {
        cmd: u8,
        flags: u8,
        cookie: u8,
        off: u16,
        len: u16,
        ext: Option<bool>,
        payload: bool,
    },
    /// An extended payload-form block status.
    BsPayload {
        cookie: u8,
        off: u16,
        len: u16,
        ids: Vec<u8>,
    },
    /// Anything.
    Raw(Vec<u8>),
}

/// One step of `server_ops`.
#[derive(Arbitrary, Debug)]
pub enum SOp {
    /// Append a client message.
    Send(CliMsg),
    /// `handle_input` with up to `n` pending bytes (0: all).
    Feed(u16),
    /// `handle_payload(n)`.
    Payload(u16),
    /// `handle_eof`.
    Eof,
    /// One `poll_transmit` into `n + 1` bytes.
    Poll(u16),
    /// `poll_transmit` until `None`.
    Drain,
    /// `tls_established`.
    TlsEstablished,
    /// `shutdown`.
    Shutdown,
    /// `answer_list_entry`.
    ListEntry(u8, u8),
    /// `answer_ack`.
    Ack,
    /// `answer_error`.
    OptErr(u8, u8),
    /// `answer_export`.
    Export {
        size: u32,
        flags: u16,
        bs: Option<(u8, u8, u32)>,
        require: bool,
        name: Option<u8>,
        desc: Option<u8>,
        tls_only: bool,
    },
    /// `answer_meta_context`.
    Meta { id: u8, name: u8 },
    /// `reply` to the `which`-th request owed.
    Reply { which: u8, err: Option<u8> },
    /// `reply_error` / `reply_error_at`.
    ReplyError {
        which: u8,
        err: u8,
        at: Option<u16>,
        msg: u8,
    },
    /// `reply_read_data` / `reply_read_hole` of the next `len` bytes (`skew` misplaces it).
    ReplyRead {
        which: u8,
        len: u16,
        hole: bool,
        skew: bool,
    },
    /// `reply_block_status` for the `ctx`-th context.
    ReplyBs {
        which: u8,
        ctx: u8,
        extents: Vec<(u16, u8)>,
    },
}

/// The server configuration.
#[derive(Arbitrary, Debug)]
pub struct SConfig {
    tls: u8,
    no_zeroes: bool,
    no_sr: bool,
    no_eh: bool,
    tight: bool,
    small: bool,
}

struct SOps<const N: usize, const B: usize> {
    k: server::Checked<N, B>,
    input: Vec<u8>,
    /// Client bytes the server consumed.
    consumed: usize,
}

impl<const N: usize, const B: usize> SOps<N, B> {
    fn send(&mut self, m: CliMsg) {
        let out = &mut self.input;
        match m {
            CliMsg::Flags(f) => out.extend_from_slice(&u32::from(f & 7).to_be_bytes()),
            CliMsg::Opt { code, body } => {
                let mut data = Vec::new();
                let mut declared = None;
                let str32 = |d: &mut Vec<u8>, s: &str| {
                    d.extend_from_slice(&(s.len() as u32).to_be_bytes());
                    d.extend_from_slice(s.as_bytes());
                };
                match body {
                    OptBody::Empty => {}
                    OptBody::Name(n) => data.extend_from_slice(name(n).as_bytes()),
                    OptBody::Export { name: n, infos } => {
                        str32(&mut data, name(n));
                        data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
                        for i in infos {
                            data.extend_from_slice(&(i % 5).to_be_bytes());
                        }
                    }
                    OptBody::Meta { export, queries } => {
                        str32(&mut data, name(export));
                        data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
                        for q in queries {
                            str32(&mut data, name(q));
                        }
                    }
                    OptBody::Raw(b) => data = b,
                    OptBody::Declared(n) => declared = Some(n),
                }
                out.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
                out.extend_from_slice(&u32::from(opt_code(code)).to_be_bytes());
                out.extend_from_slice(&declared.unwrap_or(data.len() as u32).to_be_bytes());
                out.extend_from_slice(&data);
            }
            CliMsg::Request {
                cmd,
                flags,
                cookie,
                off,
                len,
                ext,
                payload,
            } => {
                let ext =
                    ext.unwrap_or(self.k.s.reply_form() == nbd_proto::server::ReplyForm::Extended);
                let command = u16::from(cmd % 10);
                out.extend_from_slice(
                    &if ext { 0x21e4_1c71u32 } else { 0x2560_9513 }.to_be_bytes(),
                );
                out.extend_from_slice(&u16::from(flags & 0x3f).to_be_bytes());
                out.extend_from_slice(&command.to_be_bytes());
                out.extend_from_slice(&u64::from(cookie).to_be_bytes());
                out.extend_from_slice(&(u64::from(off) << 9).to_be_bytes());
                if ext {
                    out.extend_from_slice(&u64::from(len).to_be_bytes());
                } else {
                    out.extend_from_slice(&u32::from(len).to_be_bytes());
                }
                if payload && command == 1 {
                    out.resize(out.len() + usize::from(len), 0x77);
                }
            }
            CliMsg::BsPayload {
                cookie,
                off,
                len,
                ids,
            } => {
                let ids: Vec<u32> = ids.iter().take(20).map(|i| u32::from(i % 5)).collect();
                let plen = 8 + 4 * ids.len() as u64;
                out.extend_from_slice(&0x21e4_1c71u32.to_be_bytes());
                out.extend_from_slice(&CmdFlags::PAYLOAD_LEN.bits().to_be_bytes());
                out.extend_from_slice(&7u16.to_be_bytes());
                out.extend_from_slice(&u64::from(cookie).to_be_bytes());
                out.extend_from_slice(&(u64::from(off) << 9).to_be_bytes());
                out.extend_from_slice(&plen.to_be_bytes());
                out.extend_from_slice(&u64::from(len).to_be_bytes());
                for i in ids {
                    out.extend_from_slice(&i.to_be_bytes());
                }
            }
            CliMsg::Raw(b) => out.extend_from_slice(&b),
        }
    }

    fn which(&self, which: u8) -> Cookie {
        let n = self.k.owed.len();
        if n == 0 {
            return Cookie(u64::from(which));
        }
        Cookie(*self.k.owed.keys().nth(usize::from(which) % n).expect("nth"))
    }

    fn op(&mut self, op: SOp) {
        match op {
            SOp::Send(m) => self.send(m),
            SOp::Feed(n) => {
                let n = if n == 0 {
                    self.input.len()
                } else {
                    usize::from(n).min(self.input.len())
                };
                let input = self.input[..n].to_vec();
                if let Some((consumed, _ask)) = self.k.input(&input) {
                    self.input.drain(..consumed);
                    self.consumed += consumed;
                }
            }
            SOp::Payload(n) => {
                if self.k.payload(n.into()) {
                    let n = usize::from(n).min(self.input.len());
                    self.input.drain(..n);
                    if self.k.s.payload_in_progress().is_none() {
                        self.k.writing = None;
                    }
                }
            }
            SOp::Eof => {
                let _ = self.k.eof();
            }
            SOp::Poll(n) => {
                self.k.poll_one(usize::from(n) + 1);
            }
            SOp::Drain => self.k.transmit(),
            SOp::TlsEstablished => {
                let _ = self.k.call("tls_established", |s| s.tls_established());
            }
            SOp::Shutdown => self.k.s.shutdown(),
            SOp::ListEntry(n, d) => {
                let _ = self
                    .k
                    .call("list entry", |s| s.answer_list_entry(name(n), name(d)));
            }
            SOp::Ack => {
                let _ = self.k.call("ack", |s| s.answer_ack());
            }
            SOp::OptErr(e, m) => {
                let _ = self
                    .k
                    .call("answer_error", |s| s.answer_error(opt_error(e), name(m)));
            }
            SOp::Export {
                size,
                flags,
                bs,
                require,
                name: n,
                desc,
                tls_only,
            } => {
                let mut info =
                    ExportInfo::new(u64::from(size) << 9, TransmissionFlags::from_bits(flags));
                if let Some((min, pref, max)) = bs {
                    info = info.with_block_size(BlockSize {
                        min: 1 << (min % 18),
                        preferred: 1 << (pref % 26),
                        max_payload: max,
                    });
                }
                info.require_block_size = require;
                info.name = n.map(name);
                info.description = desc.map(name);
                info.tls_only = tls_only;
                let _ = self.k.call("answer_export", |s| s.answer_export(&info));
            }
            SOp::Meta { id, name: n } => {
                let _ = self
                    .k
                    .call("answer_meta", |s| s.answer_meta_context(id.into(), name(n)));
            }
            SOp::Reply { which, err } => {
                let c = self.which(which);
                let _ = self
                    .k
                    .reply_end(c, |s| s.reply(c, err.map_or(Ok(()), |e| Err(errno(e)))));
            }
            SOp::ReplyError {
                which,
                err,
                at,
                msg,
            } => {
                let c = self.which(which);
                let base = self.k.owed.get(&c.0).map_or(0, |r| r.offset);
                let _ = self.k.reply_end(c, |s| match at {
                    None => s.reply_error(c, errno(err), name(msg)),
                    Some(a) => s.reply_error_at(c, errno(err), name(msg), base + u64::from(a)),
                });
            }
            SOp::ReplyRead {
                which,
                len,
                hole,
                skew,
            } => {
                let c = self.which(which);
                let at = self.k.progress(c).map_or(0, |p| p.0) + u64::from(skew);
                let _ = self.k.reply_read(c, at, len.into(), hole);
            }
            SOp::ReplyBs {
                which,
                ctx,
                extents,
            } => {
                let c = self.which(which);
                let id = context_id(self.k.s.contexts(), ctx);
                let ex = to_extents(&extents, 100);
                let _ = self.k.reply_bs(c, id, &ex);
            }
        }
        self.k.check_owed();
    }
}

fn server_ops_n<const N: usize, const B: usize>(
    cfg: ServerConfig,
    u: &mut Unstructured<'_>,
) -> usize {
    let mut s = SOps::<N, B> {
        k: server::Checked::new(cfg, None),
        input: Vec::new(),
        consumed: 0,
    };
    s.k.check();
    for _ in 0..256 {
        if u.is_empty() {
            break;
        }
        let Ok(op) = SOp::arbitrary(u) else { break };
        s.op(op);
    }
    s.k.transmit();
    let _ = s.k.eof();
    s.k.transmit();
    s.k.events + s.consumed
}

/// `server_ops`: arbitrary calls on a server (see [`SOp`]). Returns the events seen plus
/// the client bytes consumed (a seed must make the server read something).
pub fn server_ops(data: &[u8]) -> usize {
    let mut u = Unstructured::new(data);
    let Ok(c) = SConfig::arbitrary(&mut u) else {
        return 0;
    };
    let mut cfg = ServerConfig::default();
    cfg.tls = tls(c.tls);
    cfg.no_zeroes = !c.no_zeroes;
    cfg.structured_replies = !c.no_sr;
    cfg.extended_headers = !c.no_eh;
    if c.tight {
        cfg.max_option_len = 64;
        cfg.max_discard = 4096;
    }
    if c.small {
        server_ops_n::<2, 4096>(cfg, &mut u)
    } else {
        server_ops_n::<64, 65536>(cfg, &mut u)
    }
}

#[allow(dead_code)]
const _: u64 = NBD_MAGIC;

/// A negotiated context ID chosen by `ctx` (or `ctx` itself when none was negotiated).
fn context_id(negotiated: &[u32], ctx: u8) -> u32 {
    if negotiated.is_empty() {
        u32::from(ctx)
    } else {
        negotiated[usize::from(ctx) % negotiated.len()]
    }
}

/// Up to `max` extents from fuzzed (length in 512-byte units, status) pairs.
fn to_extents(pairs: &[(u16, u8)], max: usize) -> Vec<Extent> {
    pairs
        .iter()
        .take(max)
        .map(|&(l, s)| Extent {
            len: u64::from(l) << 9,
            status: s.into(),
        })
        .collect()
}
