//! Hostile clients against our server: one test per behaviour, each asserting the exact
//! errno the server replied (and that the connection goes on), or the exact fatal error,
//! and that nothing hangs: every driver loop is bounded, and huge declared lengths are
//! streamed as counts, never materialised. A counting allocator measures each test's heap
//! and fails it above a stated bound (`HEAP_BOUND`).
//!
//! Two kinds of hostile client are used: scripted byte streams built with the wire codecs
//! (through [`Message`]), and our own client machine in adversarial mode, talking to the
//! server through the in-memory [`Pair`] (its relaxed checks and `command` send requests
//! its own validation would refuse, and its reply checks then verify the server's
//! answer). The last tests run our adversarial client against our blocking server,
//! qemu-nbd and nbdkit over a Unix socket.

#[path = "support/heap.rs"]
mod heap;
mod support;

/// Every test of both hostile suites is measured: its thread's heap never grows more
/// than `HEAP_BOUND` bytes (checked when the test's harness is dropped; run with
/// `NBD_HEAP_REPORT=1 ... -- --nocapture` to see each peak). Measured peaks run from
/// 64 KiB to 1.9 MB, made of the in-memory pair's 1 MiB disk and the largest scripted
/// inputs; hostile declared lengths (4 GiB options, 100 MB names, 2^20 extents, 2^32-1
/// byte writes) are streamed through in pieces and add nothing.
const HEAP_BOUND: usize = 4 << 20;

#[global_allocator]
static HEAP: heap::Counting = heap::Counting;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use nbd_proto::adversarial::{ClientChecks, Message};
use nbd_proto::client::{Client, ClientConfig, Event, State as ClientState};
use nbd_proto::server::{ExportInfo, Server, ServerConfig, ServerEvent, State};
use nbd_proto::testing::Pair;
use nbd_proto::wire::chunk::ChunkPayload;
use nbd_proto::wire::{
    self, BlockSize, BlockStatusPayload, ChunkType, ClientFlags, CmdFlags, Command, ContextIds,
    Cookie, Errno, ExportRequest, Extent, InfoList, MetaContextRequest, Opt, OptCode, OptError,
    OptHeader, OptReply, Queries, ReplyHeader, ReplyType, Request, TransmissionFlags,
};
use nbd_proto::{Error, Incompatible, Misbehavior, TlsPolicy, Transmit, Want};

/// Upper bound on driver steps in any loop of this file.
const MAX_STEPS: usize = 1_000_000;

const SIZE: u64 = 1 << 20;

const FLAGS: TransmissionFlags = TransmissionFlags::from_bits(
    TransmissionFlags::SEND_FLUSH.bits()
        | TransmissionFlags::SEND_FUA.bits()
        | TransmissionFlags::SEND_TRIM.bits()
        | TransmissionFlags::SEND_WRITE_ZEROES.bits()
        | TransmissionFlags::SEND_DF.bits()
        | TransmissionFlags::BLOCK_STATUS_PAYLOAD.bits(),
);

// ======================= the scripted-client harness =======================

type S = Server<16>;

/// Our server, fed scripted client bytes the way a driver would, with a simple
/// application behind it: one export, `base:allocation` (ID 1), reads answered as holes,
/// everything else answered with success.
struct Scripted {
    /// Created first, so the harness's own buffers count too.
    _heap: heap::Bound,
    server: S,
    export: ExportInfo<'static>,
    input: Vec<u8>,
    /// Payload bytes "on the wire" after `input`, counted but never materialised.
    virtual_bytes: u64,
    /// Everything the server sent as bytes (payload markers left out: reads are answered
    /// as holes, so the rest still parses).
    out: Vec<u8>,
    /// Every event, as text.
    events: Vec<String>,
    /// Payload bytes the server had moved or discarded.
    streamed: u64,
    /// The largest `Want::Bytes`: what a driver would have had to buffer at once.
    max_want: usize,
    /// A write whose payload is being received.
    write: Option<Cookie>,
    /// Leave writes unanswered (the application is slow).
    hold_writes: bool,
}

impl Scripted {
    fn new(config: ServerConfig) -> Self {
        let mut s = Self {
            _heap: heap::Bound::new(HEAP_BOUND),
            server: S::new(config),
            export: ExportInfo::new(SIZE, FLAGS),
            input: Vec::new(),
            virtual_bytes: 0,
            out: Vec::new(),
            events: Vec::new(),
            streamed: 0,
            max_want: 0,
            write: None,
            hold_writes: false,
        };
        s.run().unwrap();
        s.out.clear();
        s
    }

    /// A server past the client flags (fixed newstyle and no zeroes).
    fn negotiating(config: ServerConfig) -> Self {
        let mut s = Self::new(config);
        s.feed(&[0, 0, 0, 3]).unwrap();
        assert_eq!(s.server.state(), State::Negotiating);
        s
    }

    /// A server in transmission after `options` and a GO.
    fn serving(options: &[Opt<'_>]) -> Self {
        Self::serving_export(options, ExportInfo::new(SIZE, FLAGS))
    }

    fn serving_export(options: &[Opt<'_>], export: ExportInfo<'static>) -> Self {
        let mut s = Self::negotiating(ServerConfig::default());
        s.export = export;
        for o in options {
            s.feed(&msg(Message::Opt(*o))).unwrap();
        }
        s.feed(&go()).unwrap();
        assert_eq!(s.server.state(), State::Transmission);
        s.out.clear();
        s
    }

    fn feed(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.input.extend_from_slice(bytes);
        self.run()
    }

    /// `n` payload bytes follow on the wire, streamed as counts.
    fn feed_virtual(&mut self, n: u64) -> Result<(), Error> {
        self.virtual_bytes += n;
        self.run()
    }

    fn eof(&mut self) -> Result<(), Error> {
        self.run()?;
        self.server.handle_eof()
    }

    fn run(&mut self) -> Result<(), Error> {
        for _ in 0..MAX_STEPS {
            self.drain()?;
            match self.server.wants() {
                Want::Payload { len, .. } | Want::Discard { len } => {
                    // The driver picks its piece size: 64 KiB at most.
                    let len = len.min(65536) as u64;
                    let n = if self.virtual_bytes > 0 {
                        let n = len.min(self.virtual_bytes);
                        self.virtual_bytes -= n;
                        n
                    } else {
                        let n = len.min(self.input.len() as u64);
                        self.input.drain(..n as usize);
                        n
                    };
                    if n == 0 {
                        return Ok(());
                    }
                    self.streamed += n;
                    self.server.handle_payload(n as usize)?;
                    if !matches!(self.server.wants(), Want::Payload { .. }) {
                        if let Some(cookie) = self.write.take() {
                            self.server.reply(cookie, Ok(()))?;
                        }
                    }
                    continue;
                }
                Want::Bytes(n) => self.max_want = self.max_want.max(n),
                Want::Nothing => {}
                other => panic!("{other:?}"),
            }
            let input = std::mem::take(&mut self.input);
            let result = self.server.handle_input(&input);
            let h = match result {
                Ok(h) => h,
                Err(e) => {
                    self.input = input;
                    return Err(e);
                }
            };
            let consumed = h.consumed;
            let progress = consumed > 0 || h.event.is_some();
            if let Some(ev) = h.event {
                self.events.push(format!("{ev:?}"));
                let r = self.answer(ev);
                if let Err(e) = r {
                    self.input = input;
                    return Err(e);
                }
            }
            self.input = input;
            self.input.drain(..consumed);
            if !progress {
                return Ok(());
            }
        }
        panic!("the server did not settle");
    }

    fn answer(&mut self, ev: ServerEvent<'_>) -> Result<(), Error> {
        let s = &mut self.server;
        match ev {
            ServerEvent::List => {
                s.answer_list_entry("", "test")?;
                s.answer_ack()
            }
            ServerEvent::Export(_) => s.answer_export(&self.export),
            ServerEvent::MetaContexts(q) => {
                for name in q.matching(&["base:allocation"]) {
                    s.answer_meta_context(1, name)?;
                }
                s.answer_ack()
            }
            ServerEvent::StartTls => s.tls_established(),
            ServerEvent::Request { request: r, ids } => match r.command {
                Command::Write => {
                    if !self.hold_writes {
                        self.write = Some(r.cookie);
                    }
                    Ok(())
                }
                Command::Read => s.reply_read_hole(r.cookie, r.offset, r.len),
                Command::BlockStatus => {
                    let ids: Vec<u32> = match ids {
                        Some(ids) => ids.iter().collect(),
                        None => s.contexts().to_vec(),
                    };
                    let e = [Extent {
                        len: r.len,
                        status: 3,
                    }];
                    for id in ids {
                        s.reply_block_status(r.cookie, id, &e)?;
                    }
                    Ok(())
                }
                _ => s.reply(r.cookie, Ok(())),
            },
            ServerEvent::Disconnect => Ok(()),
            other => panic!("{other:?}"),
        }
    }

    fn drain(&mut self) -> Result<(), Error> {
        let mut buf = vec![0u8; 65536];
        for _ in 0..MAX_STEPS {
            match self.server.poll_transmit(&mut buf)? {
                None => return Ok(()),
                Some(Transmit::Bytes(n)) => self.out.extend_from_slice(&buf[..n]),
                Some(_) => {}
            }
        }
        panic!("poll_transmit never ran dry");
    }

    /// The option replies sent since the last call: option, reply type, message.
    fn opt_replies(&mut self) -> Vec<(OptCode, ReplyType, String)> {
        let out = std::mem::take(&mut self.out);
        let mut v = Vec::new();
        let mut b = &out[..];
        while !b.is_empty() {
            let (code, reply, n) = OptReply::parse_message(b).unwrap();
            let text = match reply {
                OptReply::Error { message, .. } => message.to_string(),
                _ => String::new(),
            };
            v.push((code, reply.reply_type(), text));
            b = &b[n..];
        }
        v
    }

    /// The single option reply sent since the last call.
    fn opt_reply(&mut self) -> (OptCode, ReplyType) {
        let v = self.opt_replies();
        assert_eq!(v.len(), 1, "{v:?}");
        (v[0].0, v[0].1)
    }

    /// The request outcomes sent since the last call, in order: the first error of each
    /// reply, or success.
    fn results(&mut self) -> Vec<(Cookie, Result<(), Errno>)> {
        let out = std::mem::take(&mut self.out);
        let mut v = Vec::new();
        let mut errors: Vec<(Cookie, Errno)> = Vec::new();
        let mut b = &out[..];
        while !b.is_empty() {
            match ReplyHeader::parse(b).unwrap() {
                ReplyHeader::Simple(r) => {
                    v.push((r.cookie, r.error.map_or(Ok(()), Err)));
                    b = &b[16..];
                }
                ReplyHeader::Chunk(_) => {
                    let (h, payload, n) = ChunkPayload::parse_message(b).unwrap();
                    assert_ne!(h.chunk_type, ChunkType::OffsetData, "reads are holes");
                    if let ChunkPayload::Error(e) = payload {
                        errors.push((h.cookie, e.error));
                    }
                    if h.is_done() {
                        let first = errors.iter().find(|(c, _)| *c == h.cookie);
                        v.push((h.cookie, first.map_or(Ok(()), |(_, e)| Err(*e))));
                    }
                    b = &b[n..];
                }
            }
        }
        v
    }

    /// The one outcome sent since the last call.
    fn result(&mut self) -> (Cookie, Result<(), Errno>) {
        let v = self.results();
        assert_eq!(v.len(), 1, "{v:?}");
        v[0]
    }

    /// Checks the connection still works: a read at 0 succeeds.
    fn still_serving(&mut self) {
        let extended = self.server.reply_form() == nbd_proto::server::ReplyForm::Extended;
        self.feed(&req(
            Command::Read,
            CmdFlags::empty(),
            999,
            0,
            512,
            extended,
        ))
        .unwrap();
        assert_eq!(self.result(), (Cookie(999), Ok(())));
    }
}

fn msg(m: Message<'_>) -> Vec<u8> {
    m.to_vec().unwrap()
}

fn go() -> Vec<u8> {
    msg(Message::Opt(Opt::Go(ExportRequest {
        name: "",
        infos: InfoList::new(&[]),
    })))
}

/// An option header with any declared length, then `data`.
fn opt_raw(code: OptCode, len: u32, data: &[u8]) -> Vec<u8> {
    msg(Message::OptHeader {
        header: OptHeader { code, len },
        data,
    })
}

fn req(
    command: Command,
    flags: CmdFlags,
    cookie: u64,
    offset: u64,
    len: u64,
    ext: bool,
) -> Vec<u8> {
    msg(Message::Request {
        request: Request {
            flags,
            command,
            cookie: Cookie(cookie),
            offset,
            len,
            extended: ext,
        },
        payload: &[],
    })
}

fn compact(command: Command, flags: CmdFlags, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
    req(command, flags, cookie, offset, len, false)
}

fn error(e: OptError) -> ReplyType {
    ReplyType::Error(e)
}

fn misbehaved(m: Misbehavior) -> Result<(), Error> {
    Err(Error::PeerMisbehaved(m))
}

/// A request refused with `errno`, and the session still serving.
fn refused(s: &mut Scripted, cookie: u64, errno: Errno) {
    assert_eq!(s.result(), (Cookie(cookie), Err(errno)));
    assert_eq!(s.server.owed(), 0);
    s.still_serving();
}

// ======================= handshake =======================

#[test]
fn unknown_client_flags() {
    let mut s = Scripted::new(ServerConfig::default());
    assert_eq!(
        s.feed(&[0, 0, 0, 0x7]),
        misbehaved(Misbehavior::BadClientFlags(7))
    );
    assert_eq!(s.server.state(), State::Dead);
}

#[test]
fn no_zeroes_when_not_offered() {
    let mut config = ServerConfig::default();
    config.no_zeroes = false;
    let mut s = Scripted::new(config);
    assert_eq!(
        s.feed(&[0, 0, 0, 3]),
        misbehaved(Misbehavior::BadClientFlags(3))
    );
}

#[test]
fn option_with_bad_magic() {
    let mut s = Scripted::negotiating(ServerConfig::default());
    let mut o = msg(Message::Opt(Opt::List));
    o[..8].copy_from_slice(b"IHAVEOPX");
    assert_eq!(
        s.feed(&o),
        Err(Error::Malformed(wire::Error::BadMagic {
            what: "IHAVEOPT",
            found: u64::from_be_bytes(*b"IHAVEOPX"),
        }))
    );
}

#[test]
fn unknown_option_then_a_good_one() {
    let mut s = Scripted::negotiating(ServerConfig::default());
    let unknown = msg(Message::Opt(Opt::Unknown {
        code: 77,
        data: b"whatever",
    }));
    s.feed(&unknown).unwrap();
    assert_eq!(
        s.opt_replies(),
        [(
            OptCode::Unknown(77),
            error(OptError::Unsup),
            "unknown option 77".into()
        )]
    );
    s.feed(&msg(Message::Opt(Opt::List))).unwrap();
    let replies = s.opt_replies();
    assert_eq!(replies.last().unwrap().1, ReplyType::Ack);
}

#[test]
fn thousands_of_options_in_a_row() {
    let mut s = Scripted::negotiating(ServerConfig::default());
    let mut flood = Vec::new();
    for i in 0..10_000u32 {
        flood.extend_from_slice(&msg(Message::Opt(Opt::Unknown {
            code: 100 + i,
            data: &[],
        })));
    }
    s.feed(&flood).unwrap();
    let replies = s.opt_replies();
    assert_eq!(replies.len(), 10_000);
    assert!(replies.iter().all(|r| r.1 == error(OptError::Unsup)));
    assert!(s.max_want <= OptHeader::LEN, "one header at a time");
    s.feed(&go()).unwrap();
    assert_eq!(s.server.state(), State::Transmission);
}

#[test]
fn option_length_of_4_gib() {
    let mut s = Scripted::negotiating(ServerConfig::default());
    // Only the header: the server must judge it before reading anything more.
    assert_eq!(
        s.feed(&opt_raw(OptCode::List, u32::MAX, &[])),
        misbehaved(Misbehavior::OptionTooLong {
            opt: OptCode::List,
            len: u32::MAX,
        })
    );
    assert_eq!(s.streamed, 0);
}

#[test]
fn export_name_of_100_mb() {
    // EXPORT_NAME cannot be refused with a reply, so an oversized one ends the session
    // before a byte of the name is read or buffered.
    let mut s = Scripted::negotiating(ServerConfig::default());
    let len = 100 << 20;
    assert_eq!(
        s.feed(&opt_raw(OptCode::ExportName, len, &[])),
        misbehaved(Misbehavior::OptionTooLong {
            opt: OptCode::ExportName,
            len,
        })
    );
    assert_eq!(s.streamed, 0);
    assert!(s.max_want <= OptHeader::LEN);
}

#[test]
fn go_with_a_100_mb_name_is_discarded_in_bounded_memory() {
    // Above the option limit, below the denial-of-service limit: the data is discarded
    // in pieces the driver chooses, never buffered, then refused with TOO_BIG.
    let mut config = ServerConfig::default();
    config.max_discard = 256 << 20;
    let mut s = Scripted::negotiating(config);
    let len: u32 = 100 << 20;
    s.feed(&opt_raw(OptCode::Go, len, &[])).unwrap();
    assert_eq!(s.server.wants(), Want::Discard { len: len as usize });
    assert!(
        s.opt_replies().is_empty(),
        "no answer before the data is gone"
    );
    s.feed_virtual(len.into()).unwrap();
    assert_eq!(s.streamed, u64::from(len));
    assert_eq!(s.opt_reply(), (OptCode::Go, error(OptError::TooBig)));
    assert!(s.max_want <= OptHeader::LEN);
    s.feed(&go()).unwrap();
    assert_eq!(s.server.state(), State::Transmission);
}

#[test]
fn option_over_the_limit_is_discarded_then_refused() {
    let mut s = Scripted::negotiating(ServerConfig::default());
    let data = vec![0u8; 20_000];
    s.feed(&opt_raw(OptCode::Unknown(42), 20_000, &data))
        .unwrap();
    assert_eq!(
        s.opt_replies(),
        [(
            OptCode::Unknown(42),
            error(OptError::TooBig),
            "20000 bytes of option data exceed the limit of 16384".into()
        )]
    );
}

#[test]
fn list_with_data() {
    let mut s = Scripted::negotiating(ServerConfig::default());
    s.feed(&opt_raw(OptCode::List, 3, b"abc")).unwrap();
    assert_eq!(
        s.opt_replies(),
        [(
            OptCode::List,
            error(OptError::Invalid),
            "bad length 3: NBD_OPT_LIST carries no data".into()
        )]
    );
}

fn tls(policy: TlsPolicy) -> Scripted {
    let mut config = ServerConfig::default();
    config.tls = policy;
    Scripted::negotiating(config)
}

#[test]
fn export_name_with_a_nul_byte() {
    // NBD_OPT_EXPORT_NAME has no way to carry an error: a malformed one is fatal.
    let mut s = Scripted::negotiating(ServerConfig::default());
    assert_eq!(
        s.feed(&opt_raw(OptCode::ExportName, 4, b"d\0sk")),
        Err(Error::Malformed(wire::Error::BadString {
            what: "export name",
            error: wire::StringError::Nul(1),
        }))
    );
}

#[test]
fn starttls_when_tls_is_off() {
    let mut s = Scripted::negotiating(ServerConfig::default());
    s.feed(&msg(Message::Opt(Opt::StartTls))).unwrap();
    assert_eq!(s.opt_reply(), (OptCode::StartTls, error(OptError::Policy)));
    s.feed(&go()).unwrap();
    assert_eq!(s.server.state(), State::Transmission);
}

#[test]
fn starttls_with_data() {
    let mut s = tls(TlsPolicy::Optional);
    s.feed(&opt_raw(OptCode::StartTls, 1, b"x")).unwrap();
    assert_eq!(s.opt_reply(), (OptCode::StartTls, error(OptError::Invalid)));
    assert!(!s.server.tls_active());
}

#[test]
fn starttls_twice() {
    let mut s = tls(TlsPolicy::Optional);
    let starttls = msg(Message::Opt(Opt::StartTls));
    s.feed(&starttls).unwrap();
    assert_eq!(s.opt_reply(), (OptCode::StartTls, ReplyType::Ack));
    assert!(s.server.tls_active());
    s.feed(&starttls).unwrap();
    assert_eq!(
        s.opt_replies(),
        [(
            OptCode::StartTls,
            error(OptError::Invalid),
            "TLS is already active".into()
        )]
    );
}

#[test]
fn starttls_without_fixed_newstyle() {
    let mut config = ServerConfig::default();
    config.tls = TlsPolicy::Optional;
    let mut s = Scripted::new(config);
    s.feed(&[0, 0, 0, 0]).unwrap();
    s.feed(&msg(Message::Opt(Opt::StartTls))).unwrap();
    assert_eq!(s.opt_reply(), (OptCode::StartTls, error(OptError::Invalid)));
}

#[test]
fn options_before_starttls_when_tls_is_required() {
    let mut s = tls(TlsPolicy::Required);
    for o in [
        Opt::List,
        Opt::StructuredReply,
        Opt::Unknown {
            code: 99,
            data: &[],
        },
    ] {
        s.feed(&msg(Message::Opt(o))).unwrap();
        assert_eq!(s.opt_reply(), (o.code(), error(OptError::TlsReqd)));
    }
    s.feed(&go()).unwrap();
    assert_eq!(s.opt_reply(), (OptCode::Go, error(OptError::TlsReqd)));
    assert_eq!(s.server.state(), State::Negotiating);
}

#[test]
fn export_name_before_starttls_when_tls_is_required() {
    let mut s = tls(TlsPolicy::Required);
    assert_eq!(
        s.feed(&msg(Message::Opt(Opt::ExportName { name: "" }))),
        Err(Error::PeerIncompatible(Incompatible::TlsRequiredByUs))
    );
}

#[test]
fn bytes_pipelined_after_starttls() {
    let mut s = tls(TlsPolicy::Optional);
    let mut evil = msg(Message::Opt(Opt::StartTls));
    evil.extend_from_slice(&msg(Message::Opt(Opt::StructuredReply)));
    assert_eq!(s.feed(&evil), misbehaved(Misbehavior::DataAfterStartTls));
    assert!(s.out.is_empty(), "not even the ACK goes out");
}

#[test]
fn go_whose_name_length_lies() {
    let mut s = Scripted::negotiating(ServerConfig::default());
    // Name length 100, then 4 bytes of name and the info count.
    let data = [0, 0, 0, 100, b'd', b'i', b's', b'k', 0, 0];
    s.feed(&opt_raw(OptCode::Go, 10, &data)).unwrap();
    assert_eq!(s.opt_reply(), (OptCode::Go, error(OptError::Invalid)));
}

#[test]
fn go_with_trailing_bytes() {
    let mut s = Scripted::negotiating(ServerConfig::default());
    let mut data = msg(Message::Opt(Opt::Go(ExportRequest {
        name: "disk",
        infos: InfoList::new(&[]),
    })))[16..]
        .to_vec();
    data.extend_from_slice(&[1, 2, 3]);
    s.feed(&opt_raw(OptCode::Go, data.len() as u32, &data))
        .unwrap();
    assert_eq!(s.opt_reply(), (OptCode::Go, error(OptError::Invalid)));
}

#[test]
fn go_name_with_nul() {
    let mut s = Scripted::negotiating(ServerConfig::default());
    let data = [0, 0, 0, 4, b'd', 0, b's', b'k', 0, 0];
    s.feed(&opt_raw(OptCode::Go, 10, &data)).unwrap();
    assert_eq!(
        s.opt_replies(),
        [(
            OptCode::Go,
            error(OptError::Invalid),
            "bad export name: contains a NUL byte at index 1".into()
        )]
    );
}

#[test]
fn go_name_with_bad_utf8() {
    let mut s = Scripted::negotiating(ServerConfig::default());
    let data = [0, 0, 0, 4, b'd', 0xc3, b's', b'k', 0, 0];
    s.feed(&opt_raw(OptCode::Go, 10, &data)).unwrap();
    assert_eq!(
        s.opt_replies(),
        [(
            OptCode::Go,
            error(OptError::Invalid),
            "bad export name: is not valid UTF-8 from byte 1".into()
        )]
    );
}

#[test]
fn go_name_of_5000_bytes() {
    let mut s = Scripted::negotiating(ServerConfig::default());
    let mut data = 5000u32.to_be_bytes().to_vec();
    data.resize(4 + 5000, b'n');
    data.extend_from_slice(&[0, 0]);
    s.feed(&opt_raw(OptCode::Go, data.len() as u32, &data))
        .unwrap();
    assert_eq!(
        s.opt_replies(),
        [(
            OptCode::Go,
            error(OptError::Invalid),
            "bad export name: 5000 bytes long (the limit is 4096)".into()
        )]
    );
}

#[test]
fn set_meta_context_before_structured_replies() {
    let mut s = Scripted::negotiating(ServerConfig::default());
    let set = msg(Message::Opt(Opt::SetMetaContext(MetaContextRequest {
        export: "",
        queries: Queries::new(&["base:allocation"]),
    })));
    s.feed(&set).unwrap();
    assert_eq!(
        s.opt_reply(),
        (OptCode::SetMetaContext, error(OptError::Invalid))
    );
}

#[test]
fn meta_context_query_length_that_lies() {
    let mut s = Scripted::negotiating(ServerConfig::default());
    s.feed(&msg(Message::Opt(Opt::StructuredReply))).unwrap();
    s.opt_replies();
    // Export "", one query of declared length 200 but 4 bytes.
    let data = [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 200, b'b', b'a', b's', b'e'];
    s.feed(&opt_raw(OptCode::SetMetaContext, 16, &data))
        .unwrap();
    assert_eq!(
        s.opt_reply(),
        (OptCode::SetMetaContext, error(OptError::Invalid))
    );
}

#[test]
fn structured_replies_after_extended_headers() {
    let mut s = Scripted::negotiating(ServerConfig::default());
    s.feed(&msg(Message::Opt(Opt::ExtendedHeaders))).unwrap();
    s.opt_replies();
    s.feed(&msg(Message::Opt(Opt::StructuredReply))).unwrap();
    assert_eq!(
        s.opt_reply(),
        (OptCode::StructuredReply, error(OptError::ExtHeaderReqd))
    );
}

#[test]
fn export_name_after_extended_headers() {
    let mut s = Scripted::negotiating(ServerConfig::default());
    s.feed(&msg(Message::Opt(Opt::ExtendedHeaders))).unwrap();
    assert_eq!(
        s.feed(&msg(Message::Opt(Opt::ExportName { name: "" }))),
        misbehaved(Misbehavior::ExportNameAfterExtendedHeaders)
    );
}

#[test]
fn abort_with_data() {
    // proto.md: the server SHOULD ignore data sent with NBD_OPT_ABORT, and MUST ACK.
    let mut s = Scripted::negotiating(ServerConfig::default());
    s.feed(&opt_raw(OptCode::Abort, 5, b"bye!!")).unwrap();
    assert_eq!(s.opt_reply(), (OptCode::Abort, ReplyType::Ack));
    assert_eq!(s.server.state(), State::Closed);
    assert!(s.server.is_finished());
}

#[test]
fn close_in_the_middle_of_an_option() {
    let mut s = Scripted::negotiating(ServerConfig::default());
    s.feed(&go()[..20]).unwrap();
    assert_eq!(s.eof(), Err(Error::UnexpectedEof));
}

#[test]
fn option_after_go() {
    let mut s = Scripted::serving(&[]);
    assert_eq!(
        s.feed(&msg(Message::Opt(Opt::List))),
        Err(Error::Malformed(wire::Error::BadMagic {
            what: "NBD_REQUEST_MAGIC or NBD_EXTENDED_REQUEST_MAGIC",
            found: 0x4948_4156,
        }))
    );
}

// ======================= transmission: framing =======================

#[test]
fn request_with_bad_magic() {
    let mut s = Scripted::serving(&[]);
    let mut r = compact(Command::Read, CmdFlags::empty(), 1, 0, 512);
    r[..4].copy_from_slice(&[0x12, 0x56, 0x09, 0x53]);
    assert_eq!(
        s.feed(&r),
        Err(Error::Malformed(wire::Error::BadMagic {
            what: "NBD_REQUEST_MAGIC or NBD_EXTENDED_REQUEST_MAGIC",
            found: 0x1256_0953,
        }))
    );
}

#[test]
fn extended_request_without_negotiation() {
    let mut s = Scripted::serving(&[Opt::StructuredReply]);
    assert_eq!(
        s.feed(&req(Command::Read, CmdFlags::empty(), 1, 0, 512, true)),
        misbehaved(Misbehavior::WrongRequestForm)
    );
}

#[test]
fn compact_request_after_extended_headers() {
    let mut s = Scripted::serving(&[Opt::ExtendedHeaders]);
    assert_eq!(
        s.feed(&compact(Command::Read, CmdFlags::empty(), 1, 0, 512)),
        misbehaved(Misbehavior::WrongRequestForm)
    );
}

#[test]
fn write_length_of_2_pow_32_minus_1() {
    let mut s = Scripted::serving(&[]);
    assert_eq!(
        s.feed(&compact(
            Command::Write,
            CmdFlags::empty(),
            1,
            0,
            u32::MAX.into()
        )),
        misbehaved(Misbehavior::PayloadTooLong {
            cookie: Cookie(1),
            len: u32::MAX.into(),
        })
    );
    assert_eq!(s.streamed, 0);
}

#[test]
fn write_over_the_maximum_payload_is_discarded_then_refused() {
    let mut s = Scripted::serving_export(&[], ExportInfo::new(64 << 20, FLAGS));
    let len = (1 << 25) + 512;
    s.feed(&compact(Command::Write, CmdFlags::empty(), 1, 0, len))
        .unwrap();
    assert!(
        s.results().is_empty(),
        "no answer while the client is still sending"
    );
    s.feed_virtual(len).unwrap();
    assert_eq!(s.streamed, len);
    refused(&mut s, 1, Errno::Inval);
}

#[test]
fn write_without_payload_len_under_extended_headers_is_accepted() {
    // proto.md says the client MUST set PAYLOAD_LEN; QEMU 10 does not, and QEMU's server
    // (like ours) takes the data all the same.
    let mut s = Scripted::serving(&[Opt::ExtendedHeaders]);
    let mut r = req(Command::Write, CmdFlags::empty(), 1, 4096, 512, true);
    r.extend_from_slice(&[0x5a; 512]);
    s.feed(&r).unwrap();
    assert!(s.events.last().unwrap().contains("command: Write"));
    assert_eq!(s.streamed, 512);
    assert_eq!(s.result(), (Cookie(1), Ok(())));
    s.still_serving();
}

#[test]
fn payload_len_on_a_read_is_consumed_then_refused() {
    // proto.md: a payload on a command without a payload form is read, then EINVAL.
    let mut s = Scripted::serving(&[Opt::ExtendedHeaders]);
    let mut r = req(Command::Read, CmdFlags::PAYLOAD_LEN, 1, 0, 100, true);
    r.extend_from_slice(&[0; 100]);
    s.feed(&r).unwrap();
    assert_eq!(s.streamed, 100);
    refused(&mut s, 1, Errno::Inval);
}

#[test]
fn duplicate_cookie_in_flight() {
    let mut s = Scripted::serving(&[]);
    s.hold_writes = true;
    for cookie in [7, 8] {
        s.feed(&compact(Command::Write, CmdFlags::empty(), cookie, 0, 512))
            .unwrap();
        s.feed_virtual(512).unwrap();
    }
    assert_eq!(s.server.owed(), 2);
    assert_eq!(
        s.feed(&compact(Command::Flush, CmdFlags::empty(), 8, 0, 0)),
        misbehaved(Misbehavior::DuplicateCookie(Cookie(8)))
    );
}

#[test]
fn close_in_the_middle_of_a_write_payload() {
    let mut s = Scripted::serving(&[]);
    let mut w = compact(Command::Write, CmdFlags::empty(), 3, 8192, 4096);
    w.extend_from_slice(&[1; 1000]);
    s.feed(&w).unwrap();
    assert_eq!(s.eof(), Err(Error::UnexpectedEof));
    // How far the write got, for the application to decide what it wrote.
    assert_eq!(
        s.server.payload_in_progress(),
        Some((Cookie(3), 8192 + 1000, 3096))
    );
}

#[test]
fn close_in_the_middle_of_a_request_header() {
    let mut s = Scripted::serving(&[]);
    s.feed(&compact(Command::Read, CmdFlags::empty(), 1, 0, 512)[..27])
        .unwrap();
    assert_eq!(s.eof(), Err(Error::UnexpectedEof));
}

#[test]
fn data_after_disconnect() {
    // Refused the same way whether or not replies are still owed (nothing is, here).
    let mut s = Scripted::serving(&[]);
    let mut b = compact(Command::Disc, CmdFlags::empty(), 1, 0, 0);
    b.extend_from_slice(&compact(Command::Read, CmdFlags::empty(), 2, 0, 512));
    assert_eq!(s.feed(&b), misbehaved(Misbehavior::DataAfterDisconnect));
    assert_eq!(s.server.state(), State::Dead);
}

#[test]
fn data_after_disconnect_while_replies_are_owed() {
    let mut s = Scripted::serving(&[]);
    s.hold_writes = true;
    s.feed(&compact(Command::Write, CmdFlags::empty(), 1, 0, 512))
        .unwrap();
    s.feed_virtual(512).unwrap();
    let mut b = compact(Command::Disc, CmdFlags::empty(), 2, 0, 0);
    b.extend_from_slice(&compact(Command::Read, CmdFlags::empty(), 3, 0, 512));
    assert_eq!(s.feed(&b), misbehaved(Misbehavior::DataAfterDisconnect));
}

#[test]
fn disconnect_with_requests_in_flight_finishes_them() {
    let mut s = Scripted::serving(&[]);
    s.hold_writes = true; // the application has not answered yet
    s.feed(&compact(Command::Write, CmdFlags::empty(), 1, 0, 512))
        .unwrap();
    s.feed_virtual(512).unwrap();
    s.feed(&compact(Command::Disc, CmdFlags::empty(), 2, 0, 0))
        .unwrap();
    assert_eq!(s.server.state(), State::Disconnecting);
    s.server.reply(Cookie(1), Ok(())).unwrap();
    s.drain().unwrap();
    assert_eq!(s.result(), (Cookie(1), Ok(())));
    assert_eq!(s.server.state(), State::Closed);
    assert!(s.server.is_finished());
}

// ======================= transmission: refused requests =======================

#[test]
fn thousands_of_refused_requests_pipelined() {
    // Each one is answered on its own; the server reads no further than it can answer.
    let mut s = Scripted::serving(&[Opt::StructuredReply]);
    let mut flood = Vec::new();
    for cookie in 0..5000 {
        flood.extend_from_slice(&compact(
            Command::Unknown(9),
            CmdFlags::empty(),
            cookie,
            0,
            0,
        ));
    }
    s.feed(&flood).unwrap();
    let results = s.results();
    assert_eq!(results.len(), 5000);
    assert!(results.iter().all(|(_, r)| *r == Err(Errno::Inval)));
    assert_eq!(s.server.owed(), 0);
    s.still_serving();
}

#[test]
fn unknown_command() {
    let mut s = Scripted::serving(&[Opt::StructuredReply]);
    s.feed(&compact(Command::Unknown(42), CmdFlags::empty(), 1, 0, 0))
        .unwrap();
    refused(&mut s, 1, Errno::Inval);
}

#[test]
fn resize_command() {
    let mut s = Scripted::serving(&[]);
    s.feed(&compact(Command::Resize, CmdFlags::empty(), 1, 2 * SIZE, 0))
        .unwrap();
    refused(&mut s, 1, Errno::Inval);
}

#[test]
fn unknown_command_flag() {
    let mut s = Scripted::serving(&[]);
    s.feed(&compact(
        Command::Read,
        CmdFlags::from_bits(0x0080),
        1,
        0,
        512,
    ))
    .unwrap();
    refused(&mut s, 1, Errno::Inval);
}

#[test]
fn flag_not_valid_for_the_command() {
    let mut s = Scripted::serving(&[Opt::StructuredReply]);
    s.feed(&compact(Command::Read, CmdFlags::REQ_ONE, 1, 0, 512))
        .unwrap();
    refused(&mut s, 1, Errno::Inval);
}

#[test]
fn payload_len_in_a_compact_write_is_refused_after_its_data() {
    let mut s = Scripted::serving(&[]);
    let mut w = compact(Command::Write, CmdFlags::PAYLOAD_LEN, 1, 0, 512);
    w.extend_from_slice(&[0; 512]);
    s.feed(&w).unwrap();
    assert_eq!(
        s.streamed, 512,
        "the data was discarded, not taken as a request"
    );
    refused(&mut s, 1, Errno::Inval);
}

#[test]
fn offset_plus_length_overflow() {
    let mut s = Scripted::serving(&[Opt::ExtendedHeaders]);
    s.feed(&req(
        Command::Trim,
        CmdFlags::empty(),
        1,
        u64::MAX - 100,
        512,
        true,
    ))
    .unwrap();
    refused(&mut s, 1, Errno::Inval);
    let mut w = req(
        Command::Write,
        CmdFlags::PAYLOAD_LEN,
        2,
        u64::MAX - 100,
        512,
        true,
    );
    w.extend_from_slice(&[0; 512]);
    s.feed(&w).unwrap();
    refused(&mut s, 2, Errno::NoSpc);
}

#[test]
fn effect_length_of_2_pow_63_without_payload() {
    // A payload-less command may have a huge effect length: refused, not a disconnect.
    let mut s = Scripted::serving(&[Opt::ExtendedHeaders]);
    s.feed(&req(
        Command::WriteZeroes,
        CmdFlags::empty(),
        1,
        0,
        1 << 63,
        true,
    ))
    .unwrap();
    refused(&mut s, 1, Errno::NoSpc);
}

#[test]
fn flush_with_an_offset() {
    let mut s = Scripted::serving(&[]);
    s.feed(&compact(Command::Flush, CmdFlags::empty(), 1, 4096, 0))
        .unwrap();
    refused(&mut s, 1, Errno::Inval);
}

#[test]
fn block_status_without_contexts() {
    let mut s = Scripted::serving(&[Opt::StructuredReply]);
    s.feed(&compact(
        Command::BlockStatus,
        CmdFlags::empty(),
        1,
        0,
        4096,
    ))
    .unwrap();
    refused(&mut s, 1, Errno::Inval);
}

fn with_contexts() -> Scripted {
    let set = Opt::SetMetaContext(MetaContextRequest {
        export: "",
        queries: Queries::new(&["base:allocation"]),
    });
    let s = Scripted::serving(&[Opt::ExtendedHeaders, set]);
    assert_eq!(s.server.contexts(), [1]);
    assert!(s
        .server
        .transmission_flags()
        .contains(TransmissionFlags::BLOCK_STATUS_PAYLOAD));
    s
}

fn bs_payload_request(cookie: u64, ids: &[u32]) -> Vec<u8> {
    let p = BlockStatusPayload {
        effect_len: 4096,
        ids: ContextIds::new(ids),
    };
    let mut payload = vec![0; p.buffer_len()];
    p.emit(&mut payload).unwrap();
    msg(Message::Request {
        request: Request {
            flags: CmdFlags::PAYLOAD_LEN,
            command: Command::BlockStatus,
            cookie: Cookie(cookie),
            offset: 0,
            len: payload.len() as u64,
            extended: true,
        },
        payload: &payload,
    })
}

#[test]
fn block_status_payload_with_an_unknown_context() {
    let mut s = with_contexts();
    s.feed(&bs_payload_request(1, &[1, 99])).unwrap();
    refused(&mut s, 1, Errno::Inval);
}

#[test]
fn block_status_payload_with_a_duplicate_context() {
    let mut s = with_contexts();
    s.feed(&bs_payload_request(1, &[1, 1])).unwrap();
    refused(&mut s, 1, Errno::Inval);
}

#[test]
fn block_status_payload_too_long_is_discarded_then_refused() {
    let mut s = with_contexts();
    let ids: Vec<u32> = (0..1000).collect();
    s.feed(&bs_payload_request(1, &ids)).unwrap();
    assert_eq!(s.streamed, 8 + 4000);
    refused(&mut s, 1, Errno::Inval);
}

#[test]
fn zero_length_read_succeeds_without_the_application() {
    // proto.md leaves it unspecified and asks servers not to disconnect.
    let mut s = Scripted::serving(&[Opt::StructuredReply]);
    s.feed(&compact(Command::Read, CmdFlags::empty(), 1, 0, 0))
        .unwrap();
    assert_eq!(s.result(), (Cookie(1), Ok(())));
    assert!(!s.events.iter().any(|e| e.contains("Request")));
}

#[test]
fn misaligned_request() {
    let mut s = Scripted::serving_export(
        &[],
        ExportInfo::new(SIZE, FLAGS).with_block_size(BlockSize {
            min: 512,
            preferred: 4096,
            max_payload: 1 << 20,
        }),
    );
    s.feed(&compact(Command::Read, CmdFlags::empty(), 1, 100, 512))
        .unwrap();
    refused(&mut s, 1, Errno::Inval);
}

#[test]
fn read_over_the_maximum_payload_with_structured_replies() {
    let mut s = Scripted::serving_export(&[Opt::StructuredReply], ExportInfo::new(64 << 20, FLAGS));
    s.feed(&compact(
        Command::Read,
        CmdFlags::empty(),
        1,
        0,
        (1 << 25) + 1,
    ))
    .unwrap();
    refused(&mut s, 1, Errno::Overflow);
}

#[test]
fn write_to_a_read_only_export_after_its_data() {
    let mut s = Scripted::serving_export(&[], ExportInfo::new(SIZE, TransmissionFlags::READ_ONLY));
    let mut w = compact(Command::Write, CmdFlags::empty(), 1, 0, 4096);
    w.extend_from_slice(&[9; 4096]);
    s.feed(&w).unwrap();
    assert_eq!(s.streamed, 4096);
    refused(&mut s, 1, Errno::Perm);
}

// ======================= adversarial client through the pair =======================

/// An in-memory pair whose test is measured against `HEAP_BOUND`.
type MeasuredPair = heap::Measured<Pair>;

fn measured_pair(client: &ClientConfig<'_>, server: ServerConfig, size: usize) -> MeasuredPair {
    heap::Measured::new(HEAP_BOUND, || Pair::new(client, server, size))
}

/// Our client and our server in the given form, replies immediately.
fn pair(structured: bool, extended: bool) -> MeasuredPair {
    let mut config = ClientConfig::new("");
    config.structured_replies = structured;
    config.extended_headers = extended;
    let mut p = measured_pair(&config, ServerConfig::default(), SIZE as usize);
    assert!(p.drive(), "{:?}", p.error);
    assert_eq!(p.client.state(), ClientState::Ready);
    p
}

/// Issues through `f`, drives, and returns what the server answered.
fn answer(p: &mut Pair, f: impl FnOnce(&mut Pair) -> Cookie) -> Result<(), Errno> {
    let c = f(p);
    assert!(p.drive(), "{:?}", p.error);
    p.result(c).expect("answered")
}

#[test]
fn read_past_the_end() {
    let mut p = pair(true, false);
    assert!(
        p.client.read(SIZE, 512, CmdFlags::empty()).is_err(),
        "refused locally"
    );
    p.client.adversary().relax(ClientChecks::BOUNDS);
    let r = answer(&mut p, |p| {
        p.read(SIZE - 256, 512, CmdFlags::empty()).unwrap()
    });
    assert_eq!(r, Err(Errno::Inval));
}

#[test]
fn write_past_the_end() {
    let mut p = pair(true, true);
    p.client.adversary().relax(ClientChecks::BOUNDS);
    let r = answer(&mut p, |p| {
        p.write(SIZE, &[1; 512], CmdFlags::empty()).unwrap()
    });
    assert_eq!(r, Err(Errno::NoSpc));
    assert!(p.disk.iter().all(|b| *b == 0), "nothing written");
}

#[test]
fn trim_on_a_read_only_export() {
    let mut config = ClientConfig::new("");
    config.extended_headers = false;
    let mut p = measured_pair(&config, ServerConfig::default(), SIZE as usize);
    p.flags |= TransmissionFlags::READ_ONLY;
    assert!(p.drive(), "{:?}", p.error);
    // A read-only export does not advertise TRIM either: relax both checks.
    p.client
        .adversary()
        .relax(ClientChecks::READ_ONLY | ClientChecks::COMMANDS);
    let r = answer(&mut p, |p| {
        p.client.trim(0, 4096, CmdFlags::empty()).unwrap()
    });
    assert_eq!(r, Err(Errno::Perm));
}

#[test]
fn fua_when_not_advertised() {
    let mut config = ClientConfig::new("");
    config.extended_headers = false;
    let mut p = measured_pair(&config, ServerConfig::default(), SIZE as usize);
    p.flags.remove(TransmissionFlags::SEND_FUA);
    assert!(p.drive(), "{:?}", p.error);
    assert!(p.client.flush(CmdFlags::FUA).is_err(), "refused locally");
    p.client.adversary().relax(ClientChecks::FLAGS);
    let r = answer(&mut p, |p| p.client.flush(CmdFlags::FUA).unwrap());
    assert_eq!(r, Err(Errno::Inval));
}

#[test]
fn fast_zero_when_not_advertised() {
    let mut config = ClientConfig::new("");
    config.extended_headers = false;
    let mut p = measured_pair(&config, ServerConfig::default(), SIZE as usize);
    p.flags.remove(TransmissionFlags::SEND_FAST_ZERO);
    assert!(p.drive(), "{:?}", p.error);
    p.client.adversary().relax(ClientChecks::FLAGS);
    let r = answer(&mut p, |p| {
        p.client.write_zeroes(0, 4096, CmdFlags::FAST_ZERO).unwrap()
    });
    assert_eq!(r, Err(Errno::Inval));
}

#[test]
fn unadvertised_command() {
    let mut config = ClientConfig::new("");
    config.structured_replies = false;
    config.extended_headers = false;
    let mut p = measured_pair(&config, ServerConfig::default(), SIZE as usize);
    p.flags.remove(TransmissionFlags::SEND_CACHE);
    assert!(p.drive(), "{:?}", p.error);
    p.client.adversary().relax(ClientChecks::COMMANDS);
    let r = answer(&mut p, |p| {
        p.client.cache(0, 4096, CmdFlags::empty()).unwrap()
    });
    assert_eq!(r, Err(Errno::Inval));
}

#[test]
fn df_without_structured_replies() {
    let mut p = pair(false, false);
    p.client.adversary().relax(ClientChecks::FLAGS);
    let r = answer(&mut p, |p| p.read(0, 512, CmdFlags::DF).unwrap());
    assert_eq!(r, Err(Errno::Inval));
}

#[test]
fn unknown_command_with_every_flag_through_the_client() {
    let mut p = pair(true, true);
    let r = answer(&mut p, |p| {
        p.client
            .adversary()
            .command(Command::Unknown(0x4242), CmdFlags::from_bits(0xffdf), 0, 0)
            .unwrap()
    });
    assert_eq!(r, Err(Errno::Inval));
    // And the session goes on.
    let ok = answer(&mut p, |p| p.read(0, 512, CmdFlags::empty()).unwrap());
    assert_eq!(ok, Ok(()));
}

#[test]
fn injected_option_in_transmission_is_fatal() {
    let mut p = pair(true, true);
    p.client
        .adversary()
        .inject(&Message::Opt(Opt::Info(ExportRequest {
            name: "",
            infos: InfoList::new(&[]),
        })))
        .unwrap();
    assert!(!p.drive());
    assert_eq!(
        p.error,
        Some((
            "server",
            Error::Malformed(wire::Error::BadMagic {
                what: "NBD_REQUEST_MAGIC or NBD_EXTENDED_REQUEST_MAGIC",
                found: 0x4948_4156,
            })
        ))
    );
}

#[test]
fn injected_client_flags_twice_are_read_as_an_option() {
    // A client that sends its flags twice: the second set lands where an option header
    // must start.
    let mut config = ClientConfig::new("");
    config.manual = true;
    let mut p = measured_pair(&config, ServerConfig::default(), SIZE as usize);
    assert!(p.drive(), "{:?}", p.error);
    p.client
        .adversary()
        .inject(&Message::ClientFlags(ClientFlags::FIXED_NEWSTYLE))
        .unwrap();
    p.client.opt_list().unwrap();
    assert!(!p.drive());
    assert_eq!(
        p.error,
        Some((
            "server",
            Error::Malformed(wire::Error::BadMagic {
                what: "IHAVEOPT",
                found: 0x0000_0001_4948_4156,
            })
        ))
    );
}

// ======================= against qemu-nbd and nbdkit =======================

/// Drives our client over `sock` until `done` says so; returns the events.
fn drive_until(
    client: &mut Client<8>,
    sock: &mut UnixStream,
    input: &mut Vec<u8>,
    mut done: impl FnMut(&Event<'_>) -> bool,
) -> Vec<String> {
    let mut out = vec![0u8; nbd_proto::client::MAX_OPTION_LEN];
    let mut data = vec![0u8; 1 << 20];
    let mut events = Vec::new();
    for _ in 0..MAX_STEPS {
        while let Some(t) = client.poll_transmit(&mut out).unwrap() {
            match t {
                Transmit::Bytes(n) => sock.write_all(&out[..n]).unwrap(),
                Transmit::Payload { len, .. } => sock.write_all(&vec![0xab; len]).unwrap(),
                other => panic!("{other:?}"),
            }
        }
        match client.wants() {
            Want::Payload { len, .. } => {
                let n = sock.read(&mut data[..len.min(1 << 20)]).unwrap();
                assert!(n > 0, "eof mid-payload");
                client.handle_payload(n).unwrap();
                continue;
            }
            Want::Bytes(n) if input.len() < n => {
                let have = input.len();
                input.resize(n, 0);
                let got = sock.read(&mut input[have..]).unwrap();
                input.truncate(have + got);
                assert!(got > 0, "the server closed the connection: {events:?}");
            }
            _ => {}
        }
        let h = client.handle_input(input).unwrap();
        let stop = match &h.event {
            Some(e) => {
                events.push(format!("{e:?}"));
                done(e)
            }
            None => false,
        };
        input.drain(..h.consumed);
        if stop {
            return events;
        }
    }
    panic!("no end: {events:?}");
}

/// Our client, in adversarial mode, sends an unknown command and a past-the-end read to
/// a real server, gets `NBD_EINVAL` for both, and the connection carries on.
fn adversarial_client_against(socket: &Path) {
    let _heap = heap::Bound::new(HEAP_BOUND);
    let mut sock = UnixStream::connect(socket).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut client: Client<8> = Client::new(&ClientConfig::new("")).unwrap();
    let mut input = Vec::new();
    drive_until(&mut client, &mut sock, &mut input, |e| {
        matches!(e, Event::Ready { .. })
    });
    let size = client.size().unwrap();
    let outcome = |client: &mut Client<8>, sock: &mut UnixStream, input: &mut Vec<u8>, c| {
        let mut result = None;
        drive_until(client, sock, input, |e| match e {
            Event::Done { cookie, result: r } if *cookie == c => {
                result = Some(*r);
                true
            }
            _ => false,
        });
        result.unwrap()
    };

    let unknown = client
        .adversary()
        .command(Command::Unknown(42), CmdFlags::empty(), 0, 0)
        .unwrap();
    assert_eq!(
        outcome(&mut client, &mut sock, &mut input, unknown),
        Err(Errno::Inval)
    );

    client.adversary().relax(ClientChecks::BOUNDS);
    let past = client.read(size, 512, CmdFlags::empty()).unwrap();
    assert_eq!(
        outcome(&mut client, &mut sock, &mut input, past),
        Err(Errno::Inval)
    );

    // Still alive: a normal read works.
    client.adversary().enforce(ClientChecks::BOUNDS);
    let ok = client.read(0, 4096, CmdFlags::empty()).unwrap();
    assert_eq!(outcome(&mut client, &mut sock, &mut input, ok), Ok(()));
    client.disconnect().unwrap();
    let mut out = vec![0u8; 64];
    while let Some(Transmit::Bytes(n)) = client.poll_transmit(&mut out).unwrap() {
        sock.write_all(&out[..n]).unwrap();
    }
    assert_eq!(client.state(), ClientState::Ready);
}

#[test]
fn adversarial_client_against_our_server() {
    // Our own blocking server, in-process on a Unix socket: the raw unknown command and
    // the past-the-end read reach it as bytes from a socket, not through the Pair.
    use nbd_proto::blocking::server::{serve, Export, MemoryBackend, Options};
    use std::os::unix::net::UnixListener;
    use std::sync::Arc;

    let dir = support::TestDir::new();
    let path = dir.join("ours.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let options = Options::new(vec![Export::new("", Arc::new(MemoryBackend::new(SIZE)))]);
    let server = std::thread::Builder::new()
        .name("our-server".into())
        .spawn(move || {
            // The heap is counted per thread: the server's connection is measured here.
            let _heap = heap::Bound::new(HEAP_BOUND);
            let (stream, _) = listener.accept().map_err(|e| e.to_string())?;
            serve(stream, &options).map_err(|e| e.to_string())
        })
        .unwrap();
    adversarial_client_against(&path);
    // The client sent NBD_CMD_DISC and closed its socket: the session ends cleanly.
    server.join().unwrap().unwrap();
}

#[test]
fn adversarial_client_against_qemu_nbd() {
    if !support::require(&["qemu-nbd"]) {
        return;
    }
    let dir = support::TestDir::new();
    let img = dir.zero_file("disk.raw", SIZE);
    let peer = support::Peer::qemu_nbd(&img, &[]);
    adversarial_client_against(peer.socket_path().unwrap());
}

#[test]
fn adversarial_client_against_nbdkit() {
    if !support::require(&["nbdkit"]) {
        return;
    }
    let peer = support::Peer::nbdkit(&["memory", "1M"]);
    adversarial_client_against(peer.socket_path().unwrap());
}
