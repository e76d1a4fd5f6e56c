//! Hostile servers against our client: one test per behaviour, each asserting the exact
//! error the client reports (or, where the spec tells clients to tolerate something, the
//! exact outcome), and that nothing hangs: every driver loop is bounded. A counting
//! allocator measures each test's heap and fails it above a stated bound (`HEAP_BOUND`).
//!
//! Two kinds of hostile server are used: scripted byte streams built with the wire codecs
//! (through [`Message`], mostly for the handshake), and our own server machine in
//! adversarial mode, talking to the client through the in-memory [`Pair`] (mostly for
//! transmission). The last test runs our adversarial server against libnbd over a Unix
//! socket.

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
use std::os::unix::net::UnixListener;

use nbd_proto::adversarial::{Message, ServerChecks};
use nbd_proto::client::{Client, ClientConfig, State};
use nbd_proto::server::{ExportInfo, Server, ServerConfig, ServerEvent};
use nbd_proto::testing::{Pair, Replies};
use nbd_proto::wire::{
    self, BlockSize, ChunkHeader, ChunkType, CmdFlags, Command, Cookie, Errno, ExportNameReply,
    Greeting, HandshakeFlags, Info, OffsetHole, OldstyleHello, OptCode, OptError, OptReply,
    OptReplyHeader, ReplyFlags, ReplyType, SimpleReply, StringError, TransmissionFlags,
};
use nbd_proto::{Error, Incompatible, Misbehavior, TlsPolicy, Transmit, Want};

/// Upper bound on driver steps in any loop of this file.
const MAX_STEPS: usize = 100_000;

const SIZE: u64 = 1 << 20;

// ======================= scripted servers =======================

/// Our client, fed scripted server bytes the way a driver would: output drained after
/// every call, payloads moved as wanted, input handed over until nothing progresses.
struct Scripted {
    /// Created first, so the harness's own buffers count too.
    _heap: heap::Bound,
    client: Client<16>,
    input: Vec<u8>,
    /// Everything the client sent.
    sent: Vec<u8>,
    /// Every event, as text.
    events: Vec<String>,
    /// The largest `Want::Bytes`: what a driver would have had to buffer at once.
    max_want: usize,
}

impl Scripted {
    fn new(config: &ClientConfig<'_>) -> Self {
        Self {
            _heap: heap::Bound::new(HEAP_BOUND),
            client: Client::new(config).unwrap(),
            input: Vec::new(),
            sent: Vec::new(),
            events: Vec::new(),
            max_want: 0,
        }
    }

    fn manual() -> Self {
        let mut c = ClientConfig::new("");
        c.manual = true;
        Self::new(&c)
    }

    /// Hands `bytes` over and runs the client until it needs more.
    fn feed(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.input.extend_from_slice(bytes);
        self.run()
    }

    fn run(&mut self) -> Result<(), Error> {
        for _ in 0..MAX_STEPS {
            self.drain()?;
            match self.client.wants() {
                Want::Payload { len, .. } => {
                    let n = len.min(self.input.len());
                    if n == 0 {
                        return Ok(());
                    }
                    self.input.drain(..n);
                    self.client.handle_payload(n)?;
                    continue;
                }
                Want::Bytes(n) => self.max_want = self.max_want.max(n),
                _ => {}
            }
            let h = self.client.handle_input(&self.input)?;
            let progress = h.consumed > 0 || h.event.is_some();
            if let Some(e) = h.event {
                self.events.push(format!("{e:?}"));
            }
            self.input.drain(..h.consumed);
            if !progress {
                return Ok(());
            }
        }
        panic!("the client did not settle");
    }

    fn eof(&mut self) -> Result<(), Error> {
        self.run()?;
        self.client.handle_eof()
    }

    fn drain(&mut self) -> Result<(), Error> {
        let mut buf = vec![0u8; 65536];
        for _ in 0..MAX_STEPS {
            match self.client.poll_transmit(&mut buf)? {
                None => return Ok(()),
                Some(Transmit::Bytes(n)) => self.sent.extend_from_slice(&buf[..n]),
                Some(Transmit::Payload { len, .. }) => self.sent.resize(self.sent.len() + len, 0),
                Some(t) => panic!("{t:?}"),
            }
        }
        panic!("poll_transmit never ran dry");
    }

    /// The option codes the client sent, in order (`sent` parsed after the client flags).
    fn options(&self) -> Vec<OptCode> {
        let mut v = Vec::new();
        let mut b = &self.sent[4..];
        while let Ok(h) = wire::OptHeader::parse(b) {
            v.push(h.code);
            b = &b[16 + h.len as usize..];
        }
        v
    }
}

fn bytes(m: Message<'_>) -> Vec<u8> {
    m.to_vec().unwrap()
}

fn greeting(flags: u16) -> Vec<u8> {
    bytes(Message::Greeting(Greeting {
        flags: HandshakeFlags::from_bits(flags),
    }))
}

const FIXED_NZ: u16 = 0x0003;

fn rep(opt: OptCode, reply: OptReply<'_>) -> Vec<u8> {
    bytes(Message::OptReply { opt, reply })
}

fn ack(opt: OptCode) -> Vec<u8> {
    rep(opt, OptReply::Ack)
}

/// An option reply header with any declared length, followed by `data`.
fn rep_raw(opt: OptCode, reply: ReplyType, len: u32, data: &[u8]) -> Vec<u8> {
    bytes(Message::OptReplyHeader {
        header: OptReplyHeader { opt, reply, len },
        data,
    })
}

fn info_export(size: u64, flags: u16) -> Vec<u8> {
    rep(
        OptCode::Go,
        OptReply::Info(Info::Export {
            size,
            flags: TransmissionFlags::from_bits(flags),
        }),
    )
}

/// A default-config client in the middle of `NBD_OPT_GO` (extended headers refused,
/// structured replies acknowledged, no contexts).
fn at_go() -> Scripted {
    let mut config = ClientConfig::new("");
    config.extended_headers = false;
    let mut s = Scripted::new(&config);
    s.feed(&greeting(FIXED_NZ)).unwrap();
    s.feed(&ack(OptCode::StructuredReply)).unwrap();
    assert_eq!(s.options().last(), Some(&OptCode::Go));
    s
}

/// A default-config client in the middle of `NBD_OPT_SET_META_CONTEXT`.
fn at_set_meta() -> Scripted {
    let mut config = ClientConfig::new("");
    config.extended_headers = false;
    config.meta_contexts = &["base:allocation", "qemu:dirty-bitmap:"];
    let mut s = Scripted::new(&config);
    s.feed(&greeting(FIXED_NZ)).unwrap();
    s.feed(&ack(OptCode::StructuredReply)).unwrap();
    assert_eq!(s.options().last(), Some(&OptCode::SetMetaContext));
    s
}

fn meta(id: u32, name: &str) -> Vec<u8> {
    rep(OptCode::SetMetaContext, OptReply::MetaContext { id, name })
}

fn misbehaved(m: Misbehavior) -> Result<(), Error> {
    Err(Error::PeerMisbehaved(m))
}

fn malformed(e: wire::Error) -> Result<(), Error> {
    Err(Error::Malformed(e))
}

// ---- greeting ----

#[test]
fn greeting_with_bad_magic() {
    let mut s = Scripted::new(&ClientConfig::new(""));
    let mut g = greeting(FIXED_NZ);
    g[..8].copy_from_slice(b"NBDMAGIX");
    assert_eq!(
        s.feed(&g),
        malformed(wire::Error::BadMagic {
            what: "NBDMAGIC",
            found: u64::from_be_bytes(*b"NBDMAGIX"),
        })
    );
    assert_eq!(s.client.state(), State::Dead);
    assert!(s.sent.is_empty(), "not a byte in answer");
}

#[test]
fn greeting_with_unknown_style_magic() {
    let mut s = Scripted::new(&ClientConfig::new(""));
    let mut g = greeting(FIXED_NZ);
    g[8..16].copy_from_slice(b"IHAVEOPX");
    assert_eq!(
        s.feed(&g),
        malformed(wire::Error::BadMagic {
            what: "IHAVEOPT or cliserv_magic",
            found: u64::from_be_bytes(*b"IHAVEOPX"),
        })
    );
}

#[test]
fn greeting_with_unknown_handshake_flags_is_tolerated() {
    // proto.md: clients ignore unknown handshake flags; they MUST NOT echo them.
    let mut s = Scripted::new(&ClientConfig::new(""));
    s.feed(&greeting(0xfff3)).unwrap();
    assert_eq!(
        &s.sent[..4],
        &[0, 0, 0, 3],
        "only FIXED_NEWSTYLE | NO_ZEROES"
    );
    assert_eq!(s.options(), [OptCode::ExtendedHeaders]);
}

#[test]
fn oldstyle_with_handshake_flags() {
    let mut s = Scripted::new(&ClientConfig::new(""));
    let hello = bytes(Message::OldstyleHello(OldstyleHello {
        size: SIZE,
        handshake_flags: HandshakeFlags::from_bits(0x8001),
        transmission_flags: TransmissionFlags::HAS_FLAGS,
    }));
    assert_eq!(
        s.feed(&hello),
        misbehaved(Misbehavior::OldstyleHandshakeFlags(0x8001))
    );
}

#[test]
fn oldstyle_with_garbage_padding_is_tolerated() {
    // The 124 reserved bytes are ignored (documented non-canonical input).
    let mut s = Scripted::new(&ClientConfig::new(""));
    let mut hello = bytes(Message::OldstyleHello(OldstyleHello {
        size: SIZE,
        handshake_flags: HandshakeFlags::empty(),
        transmission_flags: TransmissionFlags::HAS_FLAGS,
    }));
    hello[28..].fill(0xa5);
    s.feed(&hello).unwrap();
    assert_eq!(s.client.state(), State::Ready);
    assert_eq!(s.client.size(), Some(SIZE));
}

#[test]
fn oldstyle_when_tls_is_required() {
    let mut config = ClientConfig::new("");
    config.tls = TlsPolicy::Required;
    let mut s = Scripted::new(&config);
    let hello = bytes(Message::OldstyleHello(OldstyleHello {
        size: SIZE,
        handshake_flags: HandshakeFlags::empty(),
        transmission_flags: TransmissionFlags::HAS_FLAGS,
    }));
    assert_eq!(
        s.feed(&hello),
        Err(Error::PeerIncompatible(Incompatible::TlsUnavailable))
    );
}

#[test]
fn close_right_after_the_client_flags() {
    let mut s = Scripted::new(&ClientConfig::new(""));
    s.feed(&greeting(FIXED_NZ)).unwrap();
    assert_eq!(
        s.eof(),
        Err(Error::PeerIncompatible(Incompatible::ClientFlagsRefused))
    );
}

// ---- option replies ----

#[test]
fn option_reply_with_bad_magic() {
    let mut s = at_go();
    let mut r = ack(OptCode::Go);
    r[0] = 0xff;
    assert_eq!(
        s.feed(&r),
        malformed(wire::Error::BadMagic {
            what: "NBD_REP_MAGIC",
            found: 0xff03_e889_0455_65a9,
        })
    );
}

#[test]
fn option_reply_for_another_option() {
    let mut s = at_go();
    assert_eq!(
        s.feed(&ack(OptCode::List)),
        misbehaved(Misbehavior::ReplyToWrongOption {
            sent: OptCode::Go,
            answered: OptCode::List,
        })
    );
}

#[test]
fn option_reply_while_no_option_is_pending() {
    let mut s = Scripted::manual();
    s.feed(&greeting(FIXED_NZ)).unwrap();
    assert_eq!(s.client.wants(), Want::Nothing);
    assert_eq!(
        s.feed(&ack(OptCode::Go)),
        misbehaved(Misbehavior::UnsolicitedOptionReply(OptCode::Go))
    );
}

#[test]
fn option_reply_of_a_type_invalid_for_the_option() {
    let mut s = at_go();
    let server = rep(
        OptCode::Go,
        OptReply::Server {
            name: "disk",
            description: "",
        },
    );
    assert_eq!(
        s.feed(&server),
        misbehaved(Misbehavior::UnexpectedOptionReply {
            opt: OptCode::Go,
            reply: ReplyType::Server,
        })
    );
}

#[test]
fn option_reply_of_an_unknown_type() {
    let mut s = at_go();
    assert_eq!(
        s.feed(&rep_raw(OptCode::Go, ReplyType::Unknown(77), 0, &[])),
        misbehaved(Misbehavior::UnexpectedOptionReply {
            opt: OptCode::Go,
            reply: ReplyType::Unknown(77),
        })
    );
}

#[test]
fn ack_whose_length_lies() {
    let mut s = at_go();
    assert_eq!(
        s.feed(&rep_raw(OptCode::Go, ReplyType::Ack, 4, &[0; 4])),
        misbehaved(Misbehavior::OptionReplyTooLong {
            opt: OptCode::Go,
            len: 4,
        })
    );
}

#[test]
fn option_reply_declaring_4_gib() {
    let mut s = at_go();
    // Only the header is sent: the client must refuse before asking for the data.
    let header = rep_raw(OptCode::Go, ReplyType::Info, u32::MAX, &[]);
    assert_eq!(
        s.feed(&header),
        misbehaved(Misbehavior::OptionReplyTooLong {
            opt: OptCode::Go,
            len: u32::MAX,
        })
    );
    assert!(s.max_want <= nbd_proto::client::MAX_FRAME_LEN);
}

#[test]
fn info_record_whose_length_is_wrong() {
    let mut s = at_go();
    // NBD_INFO_EXPORT is 12 bytes; send 11.
    let data = [0u8, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0];
    assert_eq!(
        s.feed(&rep_raw(OptCode::Go, ReplyType::Info, 11, &data)),
        malformed(wire::Error::BadLength {
            what: "NBD_INFO_EXPORT length must be 12",
            len: 11,
        })
    );
}

#[test]
fn info_record_shorter_than_its_declared_length_then_close() {
    let mut s = at_go();
    let partial = rep_raw(OptCode::Go, ReplyType::Info, 12, &[0, 0, 0, 0]);
    s.feed(&partial).unwrap();
    assert_eq!(
        s.client.wants(),
        Want::Bytes(OptReplyHeader::LEN + 12),
        "the exact frame"
    );
    assert_eq!(s.eof(), Err(Error::UnexpectedEof));
}

#[test]
fn go_acknowledged_without_info_export() {
    let mut s = at_go();
    assert_eq!(
        s.feed(&ack(OptCode::Go)),
        misbehaved(Misbehavior::InfoWithoutExport)
    );
}

#[test]
fn block_size_not_a_power_of_two() {
    let mut s = at_go();
    let bs = rep(
        OptCode::Go,
        OptReply::Info(Info::BlockSize(BlockSize {
            min: 768,
            preferred: 4096,
            max_payload: 1 << 25,
        })),
    );
    assert_eq!(
        s.feed(&bs),
        misbehaved(Misbehavior::InvalidBlockSize(
            "minimum block size must be a power of two between 1 and 65536"
        ))
    );
}

#[test]
fn block_sizes_inconsistent() {
    let mut s = at_go();
    let bs = rep(
        OptCode::Go,
        OptReply::Info(Info::BlockSize(BlockSize {
            min: 4096,
            preferred: 8192,
            max_payload: 4096,
        })),
    );
    assert_eq!(
        s.feed(&bs),
        misbehaved(Misbehavior::InvalidBlockSize(
            "maximum payload size must be at least the preferred block size"
        ))
    );
}

#[test]
fn string_with_nul() {
    let mut s = at_go();
    let mut data = vec![0, 1];
    data.extend_from_slice(b"di\0sk");
    assert_eq!(
        s.feed(&rep_raw(OptCode::Go, ReplyType::Info, 7, &data)),
        malformed(wire::Error::BadString {
            what: "NBD_INFO_NAME",
            error: StringError::Nul(2),
        })
    );
}

#[test]
fn string_with_bad_utf8() {
    let mut s = at_go();
    let msg = b"no \xff\xfe export";
    assert_eq!(
        s.feed(&rep_raw(
            OptCode::Go,
            ReplyType::Error(OptError::UnknownExport),
            msg.len() as u32,
            msg
        )),
        malformed(wire::Error::BadString {
            what: "option error message",
            error: StringError::Utf8(3),
        })
    );
}

#[test]
fn string_of_5000_bytes() {
    let mut s = at_go();
    let mut data = vec![0, 2];
    data.resize(2 + 5000, b'x');
    assert_eq!(
        s.feed(&rep_raw(OptCode::Go, ReplyType::Info, 5002, &data)),
        misbehaved(Misbehavior::OptionReplyTooLong {
            opt: OptCode::Go,
            len: 5002,
        })
    );
}

#[test]
fn export_list_name_length_that_lies() {
    let mut s = Scripted::manual();
    s.feed(&greeting(FIXED_NZ)).unwrap();
    s.client.opt_list().unwrap();
    s.drain().unwrap();
    // A name length of 100 in 8 bytes of data.
    let data = [0, 0, 0, 100, b'd', b'i', b's', b'k'];
    assert_eq!(
        s.feed(&rep_raw(OptCode::List, ReplyType::Server, 8, &data)),
        malformed(wire::Error::BadLength {
            what: "NBD_REP_SERVER name length exceeds the data",
            len: 100,
        })
    );
}

#[test]
fn context_name_without_namespace() {
    let mut s = at_set_meta();
    assert_eq!(
        s.feed(&meta(1, "allocation")),
        misbehaved(Misbehavior::InvalidContextName)
    );
}

#[test]
fn context_id_given_twice() {
    let mut s = at_set_meta();
    s.feed(&meta(5, "base:allocation")).unwrap();
    assert_eq!(
        s.feed(&meta(5, "qemu:dirty-bitmap:a")),
        misbehaved(Misbehavior::DuplicateContextId(5))
    );
}

#[test]
fn more_contexts_than_the_client_can_track() {
    let mut s = at_set_meta();
    for id in 0..16 {
        s.feed(&meta(id, &format!("qemu:dirty-bitmap:b{id}")))
            .unwrap();
    }
    assert_eq!(
        s.feed(&meta(16, "qemu:dirty-bitmap:b16")),
        misbehaved(Misbehavior::TooManyContexts { limit: 16 })
    );
}

#[test]
fn meta_context_reply_to_go() {
    let mut s = at_go();
    assert_eq!(
        s.feed(&rep(
            OptCode::Go,
            OptReply::MetaContext {
                id: 1,
                name: "base:allocation"
            }
        )),
        misbehaved(Misbehavior::UnexpectedOptionReply {
            opt: OptCode::Go,
            reply: ReplyType::MetaContext,
        })
    );
}

#[test]
fn bytes_pipelined_after_the_starttls_ack() {
    let mut config = ClientConfig::new("");
    config.tls = TlsPolicy::Optional;
    let mut s = Scripted::new(&config);
    s.feed(&greeting(FIXED_NZ)).unwrap();
    assert_eq!(s.options(), [OptCode::StartTls]);
    // The ACK and, glued to it, a plaintext reply meant to be read as if under TLS.
    let mut evil = ack(OptCode::StartTls);
    evil.extend_from_slice(&ack(OptCode::ExtendedHeaders));
    assert_eq!(s.feed(&evil), misbehaved(Misbehavior::DataAfterStartTls));
    assert!(!s.events.iter().any(|e| e == "StartTls"), "no TLS hand-off");
}

#[test]
fn bytes_after_the_starttls_ack_in_a_later_read() {
    let mut config = ClientConfig::new("");
    config.tls = TlsPolicy::Optional;
    let mut s = Scripted::new(&config);
    s.feed(&greeting(FIXED_NZ)).unwrap();
    s.feed(&ack(OptCode::StartTls)).unwrap();
    assert_eq!(s.client.state(), State::StartTls);
    assert_eq!(
        s.feed(b"\x16\x03\x01"),
        misbehaved(Misbehavior::DataAfterStartTls)
    );
}

#[test]
fn starttls_refused_when_tls_is_required() {
    let mut config = ClientConfig::new("");
    config.tls = TlsPolicy::Required;
    let mut s = Scripted::new(&config);
    s.feed(&greeting(FIXED_NZ)).unwrap();
    let refusal = rep(
        OptCode::StartTls,
        OptReply::Error {
            error: OptError::Policy,
            message: "",
        },
    );
    assert_eq!(
        s.feed(&refusal),
        Err(Error::PeerIncompatible(Incompatible::TlsUnavailable))
    );
    assert!(s
        .events
        .last()
        .unwrap()
        .starts_with("OptionDone { opt: StartTls"));
    // No downgrade: the only thing sent after is NBD_OPT_ABORT.
    assert_eq!(s.options(), [OptCode::StartTls, OptCode::Abort]);
}

#[test]
fn tls_demanded_when_tls_is_off() {
    let mut s = at_go();
    let refusal = rep(
        OptCode::Go,
        OptReply::Error {
            error: OptError::TlsReqd,
            message: "TLS first",
        },
    );
    assert_eq!(
        s.feed(&refusal),
        Err(Error::PeerIncompatible(Incompatible::TlsRequiredByPeer))
    );
    // The server's message still reached the application.
    assert!(s.events.last().unwrap().contains("TLS first"));
    assert_eq!(s.options().last(), Some(&OptCode::Abort));
}

#[test]
fn shutdown_refusal() {
    let mut s = at_go();
    let refusal = rep(
        OptCode::Go,
        OptReply::Error {
            error: OptError::Shutdown,
            message: "",
        },
    );
    assert_eq!(
        s.feed(&refusal),
        Err(Error::PeerIncompatible(Incompatible::OptionRefused {
            opt: OptCode::Go,
            reply: ReplyType::Error(OptError::Shutdown),
        }))
    );
    assert_eq!(s.options().last(), Some(&OptCode::Abort), "soft disconnect");
}

#[test]
fn go_unsupported_after_extended_headers() {
    let mut s = Scripted::new(&ClientConfig::new(""));
    s.feed(&greeting(FIXED_NZ)).unwrap();
    s.feed(&ack(OptCode::ExtendedHeaders)).unwrap();
    let refusal = rep(
        OptCode::Go,
        OptReply::Error {
            error: OptError::Unsup,
            message: "",
        },
    );
    // proto.md: no fall back to EXPORT_NAME after extended headers.
    assert_eq!(
        s.feed(&refusal),
        Err(Error::PeerIncompatible(Incompatible::OptionRefused {
            opt: OptCode::Go,
            reply: ReplyType::Error(OptError::Unsup),
        }))
    );
    assert!(!s.options().contains(&OptCode::ExportName));
}

#[test]
fn export_name_refused_by_closing() {
    let mut s = Scripted::new(&ClientConfig::new(""));
    // Not fixed newstyle: EXPORT_NAME is the only way in.
    s.feed(&greeting(0)).unwrap();
    assert_eq!(s.options(), [OptCode::ExportName]);
    assert_eq!(
        s.eof(),
        Err(Error::PeerIncompatible(Incompatible::ExportRefused))
    );
}

#[test]
fn export_name_reply_truncated_then_close() {
    let mut s = Scripted::new(&ClientConfig::new(""));
    s.feed(&greeting(0)).unwrap();
    let reply = bytes(Message::ExportNameReply(ExportNameReply {
        size: SIZE,
        flags: TransmissionFlags::HAS_FLAGS,
        zeroes: true,
    }));
    s.feed(&reply[..100]).unwrap();
    assert_eq!(s.eof(), Err(Error::UnexpectedEof));
}

#[test]
fn block_size_required_although_it_was_asked_for() {
    // The default configuration asks for NBD_INFO_BLOCK_SIZE in GO: a server demanding it
    // anyway gets no retry loop, and the client leaves politely.
    let mut s = at_go();
    let refusal = rep(
        OptCode::Go,
        OptReply::Error {
            error: OptError::BlockSizeReqd,
            message: "",
        },
    );
    assert_eq!(
        s.feed(&refusal),
        Err(Error::PeerIncompatible(Incompatible::OptionRefused {
            opt: OptCode::Go,
            reply: ReplyType::Error(OptError::BlockSizeReqd),
        }))
    );
    assert_eq!(
        s.options(),
        [OptCode::StructuredReply, OptCode::Go, OptCode::Abort]
    );
}

#[test]
fn endless_info_records_take_constant_memory() {
    // 100,000 NBD_INFO_NAME records before the ACK: each is an event, nothing piles up.
    let mut s = at_go();
    // The harness's event log is emptied after each batch: it is the test's memory, not
    // the client's, and the heap bound covers both.
    let name = rep(OptCode::Go, OptReply::Info(Info::Name("x")));
    let mut names = 0;
    for _ in 0..100 {
        s.feed(&name.repeat(1000)).unwrap();
        assert!(s.input.is_empty());
        names += s.events.iter().filter(|e| e.contains("Name")).count();
        s.events.clear();
    }
    s.feed(&info_export(SIZE, 0x0001)).unwrap();
    s.feed(&ack(OptCode::Go)).unwrap();
    assert_eq!(s.client.state(), State::Ready);
    assert_eq!(names, 100_000);
    assert!(s.max_want <= OptReplyHeader::LEN + 2 + 1);
}

#[test]
fn export_name_padding_despite_no_zeroes() {
    // Both sides agreed on NO_ZEROES, yet the server pads: the 124 zeroes arrive in
    // transmission with nothing in flight.
    let mut s = Scripted::new(&ClientConfig::new(""));
    s.feed(&greeting(0x0002)).unwrap();
    assert_eq!(&s.sent[..4], &[0, 0, 0, 2], "C_NO_ZEROES");
    let reply = bytes(Message::ExportNameReply(ExportNameReply {
        size: SIZE,
        flags: TransmissionFlags::HAS_FLAGS,
        zeroes: true,
    }));
    assert_eq!(s.feed(&reply), misbehaved(Misbehavior::UnsolicitedReply));
    assert!(s.events.iter().any(|e| e.starts_with("Ready")));
}

// ======================= adversarial servers in transmission =======================

/// The three reply forms a negotiation can end in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Simple,
    Structured,
    Extended,
}

/// An in-memory pair whose test is measured against `HEAP_BOUND`.
type MeasuredPair = heap::Measured<Pair>;

fn measured_pair(client: &ClientConfig<'_>, server: ServerConfig, size: usize) -> MeasuredPair {
    heap::Measured::new(HEAP_BOUND, || Pair::new(client, server, size))
}

/// Our client and our server, negotiated in `form` (with `base:allocation` and a second
/// context where replies allow), the server holding every request for the test to answer.
fn pair(form: Form) -> MeasuredPair {
    let mut config = ClientConfig::new("");
    config.structured_replies = form != Form::Simple;
    config.extended_headers = form == Form::Extended;
    if form != Form::Simple {
        config.meta_contexts = &["base:allocation", "qemu:dirty-bitmap:all"];
    }
    let mut p = measured_pair(&config, ServerConfig::default(), SIZE as usize);
    p.replies = Replies::Held;
    assert!(p.drive(), "{:?}", p.error);
    assert_eq!(p.client.state(), State::Ready);
    assert_eq!(p.client.extended_headers(), form == Form::Extended);
    assert_eq!(p.client.structured_replies(), form != Form::Simple);
    p
}

/// Issues a command through `f`, and delivers it to the server (held there).
fn issue(p: &mut Pair, f: impl FnOnce(&mut Pair) -> Cookie) -> Cookie {
    let c = f(p);
    assert!(p.drive(), "{:?}", p.error);
    assert!(p.held().iter().any(|r| r.cookie == c), "request held");
    c
}

fn read(p: &mut Pair, offset: u64, len: u32) -> Cookie {
    issue(p, |p| p.read(offset, len, CmdFlags::empty()).unwrap())
}

/// Drives the pair and returns the error the client died with.
/// The protocol rule the client says the server broke (it must have failed with one).
fn violation(p: &mut Pair) -> Misbehavior {
    match client_error(p) {
        Error::PeerMisbehaved(m) => m,
        e => panic!("expected a protocol violation, got {e:?}"),
    }
}

fn client_error(p: &mut Pair) -> Error {
    assert!(
        !p.drive(),
        "the client should have failed: {:?} {:?}",
        p.client_log,
        p.server_log
    );
    match p.error {
        Some(("client", e)) => {
            assert_eq!(p.client.state(), State::Dead);
            assert_eq!(p.client.error(), Some(e), "sticky");
            e
        }
        other => panic!("expected a client error, got {other:?}"),
    }
}

fn inject(p: &mut Pair, m: Message<'_>) {
    p.server.adversary().inject(&m).unwrap();
}

/// A chunk header in the negotiated form (extended ones echo `request_offset`).
fn header(
    p: &Pair,
    cookie: Cookie,
    ty: ChunkType,
    done: bool,
    request_offset: u64,
    len: u64,
) -> ChunkHeader {
    ChunkHeader {
        flags: if done {
            ReplyFlags::DONE
        } else {
            ReplyFlags::empty()
        },
        chunk_type: ty,
        cookie,
        offset: p.client.extended_headers().then_some(request_offset),
        len,
    }
}

fn chunk(p: &mut Pair, cookie: Cookie, ty: ChunkType, done: bool, at: u64, payload: &[u8]) {
    let header = header(p, cookie, ty, done, at, payload.len() as u64);
    inject(p, Message::Chunk { header, payload });
}

fn hole_payload(offset: u64, len: u32) -> [u8; 12] {
    let mut b = [0u8; 12];
    OffsetHole { offset, len }.emit(&mut b).unwrap();
    b
}

fn data_payload(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut v = offset.to_be_bytes().to_vec();
    v.extend_from_slice(data);
    v
}

/// An error chunk payload: error, message length field, message, optional offset.
fn error_payload(error: u32, msg_len: u16, msg: &[u8], offset: Option<u64>) -> Vec<u8> {
    let mut v = error.to_be_bytes().to_vec();
    v.extend_from_slice(&msg_len.to_be_bytes());
    v.extend_from_slice(msg);
    if let Some(o) = offset {
        v.extend_from_slice(&o.to_be_bytes());
    }
    v
}

/// A 32-bit block-status payload.
fn bs_payload(context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut v = context.to_be_bytes().to_vec();
    for (len, status) in extents {
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(&status.to_be_bytes());
    }
    v
}

/// A 64-bit block-status payload.
fn bs_ext_payload(context: u32, extents: &[(u64, u64)]) -> Vec<u8> {
    let mut v = context.to_be_bytes().to_vec();
    v.extend_from_slice(&(extents.len() as u32).to_be_bytes());
    for (len, status) in extents {
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(&status.to_be_bytes());
    }
    v
}

fn simple(p: &mut Pair, cookie: Cookie, error: Option<Errno>) {
    inject(p, Message::SimpleReply(SimpleReply { error, cookie }));
}

// ---- framing ----

#[test]
fn reply_with_bad_magic() {
    let mut p = pair(Form::Structured);
    read(&mut p, 0, 512);
    inject(&mut p, Message::Raw(b"\x12\x34\x56\x78 not a reply....."));
    assert_eq!(
        client_error(&mut p),
        Error::Malformed(wire::Error::BadMagic {
            what: "NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC or NBD_EXTENDED_REPLY_MAGIC",
            found: 0x1234_5678,
        })
    );
}

#[test]
fn reply_while_nothing_is_in_flight() {
    let mut p = pair(Form::Simple);
    simple(&mut p, Cookie(1), None);
    assert_eq!(violation(&mut p), Misbehavior::UnsolicitedReply);
}

#[test]
fn option_reply_in_transmission() {
    let mut p = pair(Form::Structured);
    read(&mut p, 0, 512);
    inject(
        &mut p,
        Message::OptReply {
            opt: OptCode::Go,
            reply: OptReply::Ack,
        },
    );
    assert_eq!(
        client_error(&mut p),
        Error::Malformed(wire::Error::BadMagic {
            what: "NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC or NBD_EXTENDED_REPLY_MAGIC",
            found: 0x0003_e889,
        })
    );
}

#[test]
fn simple_reply_for_an_unknown_cookie() {
    let mut p = pair(Form::Simple);
    read(&mut p, 0, 512);
    simple(&mut p, Cookie(0xdead), Some(Errno::Io));
    assert_eq!(
        violation(&mut p),
        Misbehavior::UnknownCookie(Cookie(0xdead))
    );
}

#[test]
fn chunk_for_an_unknown_cookie() {
    let mut p = pair(Form::Extended);
    read(&mut p, 0, 512);
    chunk(&mut p, Cookie(0xdead), ChunkType::None, true, 0, &[]);
    assert_eq!(
        violation(&mut p),
        Misbehavior::UnknownCookie(Cookie(0xdead))
    );
}

#[test]
fn duplicate_completion() {
    let mut p = pair(Form::Simple);
    let flush = issue(&mut p, |p| p.client.flush(CmdFlags::empty()).unwrap());
    let other = read(&mut p, 0, 512);
    simple(&mut p, flush, None);
    simple(&mut p, flush, None);
    assert_eq!(violation(&mut p), Misbehavior::UnknownCookie(flush));
    assert_eq!(p.result(flush), Some(Ok(())), "the first one counted");
    assert_eq!(p.client.poll_event(), Some(abandoned(other)));
    assert_eq!(p.client.poll_event(), None);
}

fn abandoned(cookie: Cookie) -> nbd_proto::client::Event<'static> {
    nbd_proto::client::Event::Abandoned { cookie }
}

#[test]
fn simple_reply_to_a_read_after_structured_replies() {
    let mut p = pair(Form::Structured);
    let r = read(&mut p, 0, 512);
    simple(&mut p, r, None);
    assert_eq!(
        violation(&mut p),
        Misbehavior::SimpleReplyToStructuredRead(r)
    );
}

#[test]
fn simple_error_reply_to_a_read_after_structured_replies_is_tolerated() {
    // It carries no data, so the stream stays in step (nbdkit does this).
    let mut p = pair(Form::Structured);
    let r = read(&mut p, 0, 512);
    simple(&mut p, r, Some(Errno::Io));
    assert!(p.drive(), "{:?}", p.error);
    assert_eq!(p.result(r), Some(Err(Errno::Io)));
}

#[test]
fn simple_reply_after_extended_headers() {
    let mut p = pair(Form::Extended);
    let f = issue(&mut p, |p| p.client.flush(CmdFlags::empty()).unwrap());
    simple(&mut p, f, None);
    assert_eq!(
        violation(&mut p),
        Misbehavior::SimpleReplyWithExtendedHeaders(f)
    );
}

#[test]
fn structured_chunk_without_negotiation() {
    let mut p = pair(Form::Simple);
    let r = read(&mut p, 0, 512);
    chunk(&mut p, r, ChunkType::None, true, 0, &[]);
    assert_eq!(
        violation(&mut p),
        Misbehavior::StructuredReplyNotNegotiated(r)
    );
}

#[test]
fn extended_chunk_without_extended_headers() {
    let mut p = pair(Form::Structured);
    let r = read(&mut p, 0, 512);
    let header = ChunkHeader {
        flags: ReplyFlags::DONE,
        chunk_type: ChunkType::None,
        cookie: r,
        offset: Some(0),
        len: 0,
    };
    inject(
        &mut p,
        Message::Chunk {
            header,
            payload: &[],
        },
    );
    assert_eq!(violation(&mut p), Misbehavior::WrongChunkForm(r));
}

#[test]
fn structured_chunk_after_extended_headers() {
    let mut p = pair(Form::Extended);
    let r = read(&mut p, 0, 512);
    let header = ChunkHeader {
        flags: ReplyFlags::DONE,
        chunk_type: ChunkType::None,
        cookie: r,
        offset: None,
        len: 0,
    };
    inject(
        &mut p,
        Message::Chunk {
            header,
            payload: &[],
        },
    );
    assert_eq!(violation(&mut p), Misbehavior::WrongChunkForm(r));
}

#[test]
fn extended_chunk_that_does_not_echo_the_offset() {
    let mut p = pair(Form::Extended);
    let r = read(&mut p, 4096, 512);
    chunk(&mut p, r, ChunkType::None, true, 0, &[]);
    assert_eq!(violation(&mut p), Misbehavior::ChunkOffsetMismatch(r));
}

#[test]
fn reply_header_truncated_then_close() {
    let mut p = pair(Form::Extended);
    let r = read(&mut p, 0, 512);
    let header = header(&p, r, ChunkType::None, true, 0, 0);
    p.server
        .adversary()
        .inject_truncated(
            &Message::Chunk {
                header,
                payload: &[],
            },
            17,
        )
        .unwrap();
    p.server.adversary().hang_up().unwrap();
    assert_eq!(client_error(&mut p), Error::UnexpectedEof);
    assert_eq!(p.client.poll_event(), Some(abandoned(r)));
}

// ---- read replies ----

#[test]
fn data_chunk_past_the_request() {
    let mut p = pair(Form::Structured);
    let r = read(&mut p, 0, 4096);
    p.take_held();
    p.server.adversary().relax(ServerChecks::READ_CHUNKS);
    p.server.reply_read_data(r, 2048, 4096).unwrap();
    assert_eq!(
        violation(&mut p),
        Misbehavior::ChunkOutOfRange {
            cookie: r,
            offset: 2048,
            len: 4096,
        }
    );
}

#[test]
fn hole_chunk_before_the_request() {
    let mut p = pair(Form::Extended);
    let r = read(&mut p, 8192, 4096);
    chunk(
        &mut p,
        r,
        ChunkType::OffsetHole,
        true,
        8192,
        &hole_payload(4096, 4096),
    );
    assert_eq!(
        violation(&mut p),
        Misbehavior::ChunkOutOfRange {
            cookie: r,
            offset: 4096,
            len: 4096,
        }
    );
}

#[test]
fn overlapping_chunks() {
    let mut p = pair(Form::Extended);
    let r = read(&mut p, 0, 8192);
    p.take_held();
    p.server.adversary().relax(ServerChecks::READ_CHUNKS);
    p.server.reply_read_hole(r, 0, 4096).unwrap();
    p.server.reply_read_data(r, 2048, 4096).unwrap();
    assert_eq!(
        violation(&mut p),
        Misbehavior::ChunkOverlap {
            cookie: r,
            offset: 2048,
        }
    );
}

#[test]
fn fragmented_df_read() {
    let mut p = pair(Form::Structured);
    let r = issue(&mut p, |p| p.read(0, 8192, CmdFlags::DF).unwrap());
    p.server.adversary().relax(ServerChecks::READ_CHUNKS);
    p.server.reply_read_hole(r, 0, 4096).unwrap();
    p.server.reply_read_hole(r, 4096, 4096).unwrap();
    assert_eq!(violation(&mut p), Misbehavior::FragmentedDfRead(r));
}

#[test]
fn zero_length_hole() {
    let mut p = pair(Form::Structured);
    let r = read(&mut p, 0, 4096);
    chunk(
        &mut p,
        r,
        ChunkType::OffsetHole,
        true,
        0,
        &hole_payload(0, 0),
    );
    assert_eq!(violation(&mut p), Misbehavior::EmptyHole(r));
}

#[test]
fn hole_chunk_whose_length_lies() {
    let mut p = pair(Form::Structured);
    let r = read(&mut p, 0, 4096);
    let header = header(&p, r, ChunkType::OffsetHole, true, 0, 16);
    inject(
        &mut p,
        Message::Chunk {
            header,
            payload: &[0; 16],
        },
    );
    assert_eq!(
        client_error(&mut p),
        Error::Malformed(wire::Error::BadLength {
            what: "NBD_REPLY_TYPE_OFFSET_HOLE length must be 12",
            len: 16,
        })
    );
}

#[test]
fn data_chunk_without_data() {
    let mut p = pair(Form::Structured);
    let r = read(&mut p, 0, 4096);
    chunk(
        &mut p,
        r,
        ChunkType::OffsetData,
        true,
        0,
        &data_payload(0, &[]),
    );
    assert_eq!(
        client_error(&mut p),
        Error::Malformed(wire::Error::BadLength {
            what: "NBD_REPLY_TYPE_OFFSET_DATA must carry at least one data byte",
            len: 8,
        })
    );
}

#[test]
fn data_chunk_declaring_4_gib() {
    let mut p = pair(Form::Structured);
    let r = read(&mut p, 0, 4096);
    // Only the header and the offset: the client must refuse before any data.
    let header = header(&p, r, ChunkType::OffsetData, true, 0, u64::from(u32::MAX));
    inject(
        &mut p,
        Message::Chunk {
            header,
            payload: &0u64.to_be_bytes(),
        },
    );
    assert_eq!(
        violation(&mut p),
        Misbehavior::ChunkOutOfRange {
            cookie: r,
            offset: 0,
            len: u64::from(u32::MAX) - 8,
        }
    );
}

#[test]
fn extended_data_chunk_declaring_2_pow_63() {
    let mut p = pair(Form::Extended);
    let r = read(&mut p, 0, 4096);
    let header = header(&p, r, ChunkType::OffsetData, false, 0, 1 << 63);
    inject(
        &mut p,
        Message::Chunk {
            header,
            payload: &0u64.to_be_bytes(),
        },
    );
    assert_eq!(
        violation(&mut p),
        Misbehavior::ChunkOutOfRange {
            cookie: r,
            offset: 0,
            len: (1 << 63) - 8,
        }
    );
}

#[test]
fn none_chunk_with_a_length() {
    let mut p = pair(Form::Extended);
    let r = read(&mut p, 0, 4096);
    chunk(&mut p, r, ChunkType::None, true, 0, &[0; 4]);
    assert_eq!(
        client_error(&mut p),
        Error::Malformed(wire::Error::BadLength {
            what: "NBD_REPLY_TYPE_NONE length must be 0",
            len: 4,
        })
    );
}

#[test]
fn none_chunk_without_done() {
    let mut p = pair(Form::Structured);
    let f = issue(&mut p, |p| p.client.flush(CmdFlags::empty()).unwrap());
    chunk(&mut p, f, ChunkType::None, false, 0, &[]);
    assert_eq!(violation(&mut p), Misbehavior::NoneWithoutDone(f));
}

#[test]
fn done_before_the_read_is_covered() {
    let mut p = pair(Form::Structured);
    let r = read(&mut p, 0, 8192);
    chunk(
        &mut p,
        r,
        ChunkType::OffsetHole,
        true,
        0,
        &hole_payload(0, 4096),
    );
    assert_eq!(violation(&mut p), Misbehavior::IncompleteRead(r));
}

#[test]
fn done_missing_then_close() {
    let mut p = pair(Form::Extended);
    let r = read(&mut p, 0, 8192);
    p.take_held();
    // Half the read, then a hard disconnect: no chunk ever says DONE.
    p.server.reply_read_hole(r, 0, 4096).unwrap();
    p.server.adversary().hang_up().unwrap();
    assert_eq!(client_error(&mut p), Error::UnexpectedEof);
    assert!(p.client_log.iter().any(|e| e.starts_with("ReadHole")));
    assert_eq!(p.client.poll_event(), Some(abandoned(r)), "abandoned once");
    assert_eq!(p.client.poll_event(), None);
}

#[test]
fn close_in_the_middle_of_read_data() {
    let mut p = pair(Form::Simple);
    let r = read(&mut p, 0, 4096);
    simple(&mut p, r, None);
    inject(&mut p, Message::Raw(&[0; 1000]));
    p.server.adversary().hang_up().unwrap();
    assert_eq!(client_error(&mut p), Error::UnexpectedEof);
    assert_eq!(p.client.poll_event(), Some(abandoned(r)));
}

#[test]
fn chunk_after_done() {
    let mut p = pair(Form::Structured);
    let r = read(&mut p, 0, 4096);
    let keep = read(&mut p, 0, 512);
    chunk(
        &mut p,
        r,
        ChunkType::OffsetHole,
        true,
        0,
        &hole_payload(0, 4096),
    );
    chunk(&mut p, r, ChunkType::None, true, 0, &[]);
    assert_eq!(violation(&mut p), Misbehavior::UnknownCookie(r));
    assert_eq!(p.result(r), Some(Ok(())));
    assert_eq!(p.client.poll_event(), Some(abandoned(keep)));
}

#[test]
fn content_chunk_for_a_trim() {
    let mut p = pair(Form::Structured);
    let w = issue(&mut p, |p| {
        p.client.trim(0, 512, CmdFlags::empty()).unwrap()
    });
    chunk(
        &mut p,
        w,
        ChunkType::OffsetHole,
        true,
        0,
        &hole_payload(0, 512),
    );
    assert_eq!(
        violation(&mut p),
        Misbehavior::UnexpectedChunk {
            cookie: w,
            chunk_type: ChunkType::OffsetHole,
        }
    );
}

#[test]
fn unknown_chunk_type_without_the_error_bit() {
    let mut p = pair(Form::Extended);
    let r = read(&mut p, 0, 512);
    chunk(&mut p, r, ChunkType::Unknown(0x0042), true, 0, &[1, 2, 3]);
    assert_eq!(
        violation(&mut p),
        Misbehavior::UnexpectedChunk {
            cookie: r,
            chunk_type: ChunkType::Unknown(0x0042),
        }
    );
}

#[test]
fn unknown_chunk_type_with_the_error_bit_fails_only_the_command() {
    // proto.md: treat the request as failed, keep the connection.
    let mut p = pair(Form::Structured);
    let r = read(&mut p, 0, 512);
    let payload = error_payload(5, 2, b"no", Some(0));
    chunk(&mut p, r, ChunkType::Unknown(0x8042), true, 0, &payload);
    assert!(p.drive(), "{:?}", p.error);
    assert_eq!(p.result(r), Some(Err(Errno::Io)));
    // The connection is still good.
    p.take_held();
    let next = read(&mut p, 0, 512);
    p.release();
    assert!(p.drive(), "{:?}", p.error);
    assert_eq!(p.result(next), Some(Ok(())));
}

#[test]
fn unknown_error_value_is_kept_and_not_fatal() {
    let mut p = pair(Form::Structured);
    let r = read(&mut p, 0, 512);
    chunk(
        &mut p,
        r,
        ChunkType::Error,
        true,
        0,
        &error_payload(9999, 0, b"", None),
    );
    assert!(p.drive(), "{:?}", p.error);
    let result = p.result(r).unwrap();
    assert_eq!(result, Err(Errno::Unknown(9999)));
    // proto.md: treat it like NBD_EINVAL.
    assert_eq!(result.unwrap_err().normalized(), Errno::Inval);
}

#[test]
fn error_chunk_with_error_zero() {
    let mut p = pair(Form::Structured);
    let r = read(&mut p, 0, 512);
    chunk(
        &mut p,
        r,
        ChunkType::Error,
        true,
        0,
        &error_payload(0, 0, b"", None),
    );
    assert_eq!(violation(&mut p), Misbehavior::ZeroError(r));
}

#[test]
fn error_chunk_message_longer_than_the_chunk() {
    let mut p = pair(Form::Structured);
    let r = read(&mut p, 0, 512);
    chunk(
        &mut p,
        r,
        ChunkType::Error,
        true,
        0,
        &error_payload(5, 200, b"short", None),
    );
    assert_eq!(
        client_error(&mut p),
        Error::Malformed(wire::Error::BadLength {
            what: "error chunk message longer than the chunk",
            len: 200,
        })
    );
}

#[test]
fn error_chunk_longer_than_any_message() {
    let mut p = pair(Form::Structured);
    let r = read(&mut p, 0, 512);
    let header = header(&p, r, ChunkType::Error, true, 0, 100_000);
    inject(
        &mut p,
        Message::Chunk {
            header,
            payload: &[0, 0, 0, 5],
        },
    );
    assert_eq!(
        violation(&mut p),
        Misbehavior::ChunkTooLong {
            cookie: r,
            len: 100_000,
        }
    );
}

#[test]
fn error_offset_outside_the_request() {
    let mut p = pair(Form::Structured);
    let r = read(&mut p, 4096, 512);
    p.take_held();
    p.server.adversary().relax(ServerChecks::ERROR_OFFSET);
    p.server
        .reply_error_at(r, Errno::Io, "bad sector", 0)
        .unwrap();
    assert_eq!(
        violation(&mut p),
        Misbehavior::ChunkOutOfRange {
            cookie: r,
            offset: 0,
            len: 0,
        }
    );
}

#[test]
fn content_over_an_earlier_error_offset() {
    // proto.md: content chunks must not overlap an earlier content *or error* chunk.
    let mut p = pair(Form::Structured);
    let r = read(&mut p, 0, 8192);
    let error = error_payload(5, 0, b"", Some(4096));
    chunk(&mut p, r, ChunkType::ErrorOffset, false, 0, &error);
    chunk(
        &mut p,
        r,
        ChunkType::OffsetHole,
        false,
        0,
        &hole_payload(0, 8192),
    );
    assert_eq!(
        violation(&mut p),
        Misbehavior::ChunkOverlap {
            cookie: r,
            offset: 0
        }
    );
    assert!(p
        .client_log
        .iter()
        .any(|e| e.contains("offset: Some(4096)")));
}

#[test]
fn error_offset_inside_earlier_content_is_tolerated() {
    // The other order is the allowed one: content, then the error inside it.
    let mut p = pair(Form::Structured);
    let r = read(&mut p, 0, 8192);
    chunk(
        &mut p,
        r,
        ChunkType::OffsetHole,
        false,
        0,
        &hole_payload(0, 8192),
    );
    let error = error_payload(5, 3, b"bad", Some(4096));
    chunk(&mut p, r, ChunkType::ErrorOffset, true, 0, &error);
    assert!(p.drive(), "{:?}", p.error);
    assert_eq!(p.result(r), Some(Err(Errno::Io)));
}

#[test]
fn unknown_reply_flags_are_ignored() {
    // proto.md: clients MUST ignore unknown reply flags.
    let mut p = pair(Form::Extended);
    let r = read(&mut p, 0, 4096);
    let mut h = header(&p, r, ChunkType::OffsetHole, true, 0, 12);
    h.flags = ReplyFlags::from_bits(0xfff1);
    inject(
        &mut p,
        Message::Chunk {
            header: h,
            payload: &hole_payload(0, 4096),
        },
    );
    assert!(p.drive(), "{:?}", p.error);
    assert_eq!(p.result(r), Some(Ok(())));
}

// ---- block status ----

fn block_status(p: &mut Pair, offset: u64, len: u64, flags: CmdFlags) -> Cookie {
    issue(p, |p| p.client.block_status(offset, len, flags).unwrap())
}

#[test]
fn extent_of_zero_length() {
    let mut p = pair(Form::Structured);
    let b = block_status(&mut p, 0, 8192, CmdFlags::empty());
    let id = p.client.contexts()[0];
    chunk(
        &mut p,
        b,
        ChunkType::BlockStatus,
        false,
        0,
        &bs_payload(id, &[(4096, 0), (0, 3)]),
    );
    assert_eq!(violation(&mut p), Misbehavior::ZeroLengthExtent(b));
}

#[test]
fn block_status_for_a_context_never_negotiated() {
    let mut p = pair(Form::Structured);
    let b = block_status(&mut p, 0, 8192, CmdFlags::empty());
    chunk(
        &mut p,
        b,
        ChunkType::BlockStatus,
        false,
        0,
        &bs_payload(77, &[(8192, 0)]),
    );
    assert_eq!(
        violation(&mut p),
        Misbehavior::UnknownContext { cookie: b, id: 77 }
    );
}

#[test]
fn two_chunks_for_one_context() {
    let mut p = pair(Form::Extended);
    let b = block_status(&mut p, 0, 8192, CmdFlags::empty());
    let id = p.client.contexts()[0];
    let payload = bs_ext_payload(id, &[(8192, 0)]);
    chunk(&mut p, b, ChunkType::BlockStatusExt, false, 0, &payload);
    chunk(&mut p, b, ChunkType::BlockStatusExt, false, 0, &payload);
    assert_eq!(
        violation(&mut p),
        Misbehavior::DuplicateContextChunk { cookie: b, id }
    );
}

#[test]
fn block_status_missing_a_context() {
    let mut p = pair(Form::Structured);
    assert_eq!(p.client.contexts().len(), 2);
    let b = block_status(&mut p, 0, 8192, CmdFlags::empty());
    let id = p.client.contexts()[0];
    chunk(
        &mut p,
        b,
        ChunkType::BlockStatus,
        true,
        0,
        &bs_payload(id, &[(8192, 0)]),
    );
    assert_eq!(violation(&mut p), Misbehavior::MissingContextChunk(b));
}

#[test]
fn wide_extents_without_extended_headers() {
    let mut p = pair(Form::Structured);
    let b = block_status(&mut p, 0, 8192, CmdFlags::empty());
    let id = p.client.contexts()[0];
    let payload = bs_ext_payload(id, &[(8192, 0)]);
    chunk(&mut p, b, ChunkType::BlockStatusExt, true, 0, &payload);
    assert_eq!(
        violation(&mut p),
        Misbehavior::WideExtentsWithoutExtendedHeaders(b)
    );
}

#[test]
fn narrow_extents_with_extended_headers_are_tolerated() {
    // Unambiguous, and the draft allowed it once: accepted.
    let mut p = pair(Form::Extended);
    let b = block_status(&mut p, 0, 8192, CmdFlags::empty());
    let ids = p.client.contexts().to_vec();
    chunk(
        &mut p,
        b,
        ChunkType::BlockStatus,
        false,
        0,
        &bs_payload(ids[0], &[(8192, 3)]),
    );
    chunk(
        &mut p,
        b,
        ChunkType::BlockStatus,
        true,
        0,
        &bs_payload(ids[1], &[(8192, 1)]),
    );
    assert!(p.drive(), "{:?}", p.error);
    assert_eq!(p.result(b), Some(Ok(())));
    assert_eq!(p.extents.len(), 2);
}

#[test]
fn req_one_answered_with_two_extents() {
    let mut p = pair(Form::Structured);
    let b = block_status(&mut p, 0, 8192, CmdFlags::REQ_ONE);
    let id = p.client.contexts()[0];
    let payload = bs_payload(id, &[(4096, 0), (4096, 3)]);
    chunk(&mut p, b, ChunkType::BlockStatus, false, 0, &payload);
    assert_eq!(violation(&mut p), Misbehavior::ReqOneViolated(b));
}

#[test]
fn extents_running_past_the_request() {
    let mut p = pair(Form::Structured);
    let b = block_status(&mut p, 0, 8192, CmdFlags::empty());
    let id = p.client.contexts()[0];
    // The last extent may run past the end; one after it may not.
    let payload = bs_payload(id, &[(4096, 0), (8192, 3), (512, 0)]);
    chunk(&mut p, b, ChunkType::BlockStatus, false, 0, &payload);
    assert_eq!(violation(&mut p), Misbehavior::ExtentsOutOfRange(b));
}

#[test]
fn block_status_length_not_a_whole_number_of_extents() {
    let mut p = pair(Form::Structured);
    let b = block_status(&mut p, 0, 8192, CmdFlags::empty());
    let id = p.client.contexts()[0];
    let mut payload = bs_payload(id, &[(8192, 0)]);
    payload.push(0);
    chunk(&mut p, b, ChunkType::BlockStatus, false, 0, &payload);
    assert_eq!(
        client_error(&mut p),
        Error::Malformed(wire::Error::BadLength {
            what: "NBD_REPLY_TYPE_BLOCK_STATUS length must be 4 + 8n with n >= 1",
            len: 13,
        })
    );
}

#[test]
fn wide_extent_count_that_lies() {
    let mut p = pair(Form::Extended);
    let b = block_status(&mut p, 0, 8192, CmdFlags::empty());
    let id = p.client.contexts()[0];
    let mut payload = bs_ext_payload(id, &[(8192, 0)]);
    payload[4..8].copy_from_slice(&1000u32.to_be_bytes());
    chunk(&mut p, b, ChunkType::BlockStatusExt, false, 0, &payload);
    assert_eq!(
        client_error(&mut p),
        Error::Malformed(wire::Error::BadLength {
            what: "NBD_REPLY_TYPE_BLOCK_STATUS_EXT descriptor count does not match its length",
            len: 1000,
        })
    );
}

#[test]
fn block_status_chunk_for_a_read() {
    let mut p = pair(Form::Structured);
    let r = read(&mut p, 0, 512);
    let id = p.client.contexts()[0];
    chunk(
        &mut p,
        r,
        ChunkType::BlockStatus,
        true,
        0,
        &bs_payload(id, &[(512, 0)]),
    );
    assert_eq!(
        violation(&mut p),
        Misbehavior::UnexpectedChunk {
            cookie: r,
            chunk_type: ChunkType::BlockStatus,
        }
    );
}

#[test]
fn simple_success_for_block_status() {
    let mut p = pair(Form::Structured);
    let b = block_status(&mut p, 0, 8192, CmdFlags::empty());
    simple(&mut p, b, None);
    assert_eq!(violation(&mut p), Misbehavior::MissingContextChunk(b));
}

#[test]
fn block_status_chunk_without_extents() {
    let mut p = pair(Form::Structured);
    let b = block_status(&mut p, 0, 8192, CmdFlags::empty());
    let id = p.client.contexts()[0];
    chunk(
        &mut p,
        b,
        ChunkType::BlockStatus,
        true,
        0,
        &bs_payload(id, &[]),
    );
    assert_eq!(
        client_error(&mut p),
        Error::Malformed(wire::Error::BadLength {
            what: "NBD_REPLY_TYPE_BLOCK_STATUS length must be 4 + 8n with n >= 1",
            len: 4,
        })
    );
}

#[test]
fn block_status_for_a_context_not_asked_for() {
    // The payload form names one context; a chunk for the other one is not owed.
    let mut p = pair(Form::Extended);
    let ids = p.client.contexts().to_vec();
    let b = issue(&mut p, |p| {
        p.client
            .block_status_for(0, 8192, CmdFlags::empty(), &ids[..1])
            .unwrap()
    });
    let payload = bs_ext_payload(ids[1], &[(8192, 1)]);
    chunk(&mut p, b, ChunkType::BlockStatusExt, true, 0, &payload);
    assert_eq!(
        violation(&mut p),
        Misbehavior::UnknownContext {
            cookie: b,
            id: ids[1]
        }
    );
}

/// A scripted structured-replies server up to `Ready`, with one context (ID 1) on an
/// export of `size` bytes.
fn scripted_ready_with_context(size: u64) -> Scripted {
    let mut s = at_set_meta();
    s.feed(&meta(1, "base:allocation")).unwrap();
    s.feed(&ack(OptCode::SetMetaContext)).unwrap();
    s.feed(&info_export(size, 0x0001)).unwrap();
    s.feed(&ack(OptCode::Go)).unwrap();
    assert_eq!(s.client.state(), State::Ready);
    s
}

#[test]
fn a_million_extents_are_streamed_in_bounded_memory() {
    // 2^20 extents (8 MiB of payload) in one chunk: the client never asks for more than
    // one batch at a time, and the test produces them lazily, so neither side holds them.
    const COUNT: u64 = 1 << 20;
    let mut s = scripted_ready_with_context(COUNT * 512);
    let b = s
        .client
        .block_status(0, COUNT * 512, CmdFlags::empty())
        .unwrap();
    s.drain().unwrap();
    let header = ChunkHeader {
        flags: ReplyFlags::DONE,
        chunk_type: ChunkType::BlockStatus,
        cookie: b,
        offset: None,
        len: 4 + 8 * COUNT,
    };
    let mut first = bytes(Message::Chunk {
        header,
        payload: &1u32.to_be_bytes(),
    });
    let extent = |i: u64| {
        let mut e = 512u32.to_be_bytes().to_vec();
        e.extend_from_slice(&((i % 2) as u32 * 3).to_be_bytes());
        e
    };
    let mut next = 0u64;
    let mut events = 0;
    let mut steps = 0;
    let mut result = None;
    while result.is_none() {
        steps += 1;
        assert!(steps < MAX_STEPS, "no progress");
        // Produce exactly what the client wants, as a driver reading `Want::Bytes` would.
        let want = match s.client.wants() {
            Want::Bytes(n) => n,
            other => panic!("{other:?}"),
        };
        assert!(
            want <= 20 + 4 + nbd_proto::client::EXTENT_BATCH_LEN,
            "{want}"
        );
        while first.len() < want && next < COUNT {
            first.extend_from_slice(&extent(next));
            next += 1;
        }
        let h = s.client.handle_input(&first).unwrap();
        match h.event {
            Some(nbd_proto::client::Event::BlockStatus { extents, .. }) => {
                events += 1;
                assert_eq!(extents.len() * 8, nbd_proto::client::EXTENT_BATCH_LEN);
            }
            Some(nbd_proto::client::Event::Done { cookie, result: r }) => {
                assert_eq!(cookie, b);
                result = Some(r);
            }
            Some(other) => panic!("{other:?}"),
            None => {}
        }
        first.drain(..h.consumed);
    }
    assert_eq!(result, Some(Ok(())));
    assert_eq!(next, COUNT);
    assert_eq!(events, COUNT as usize / 512);
    assert!(first.is_empty());
}

// ======================= against libnbd =======================

/// Serves one connection with our server in adversarial mode: every read is answered
/// with a data chunk that lies past the end of the request. Returns what happened.
fn serve_lying_reads(listener: UnixListener) -> Result<Vec<String>, String> {
    let _heap = heap::Bound::new(HEAP_BOUND);
    let (mut sock, _) = listener.accept().map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    let mut server: Server = Server::new(ServerConfig::default());
    server.adversary().relax(ServerChecks::READ_CHUNKS);
    let mut log = Vec::new();
    let (mut input, mut out) = (Vec::new(), vec![0u8; 65536]);
    let zeroes = vec![0u8; 65536];
    for _ in 0..MAX_STEPS {
        while let Some(t) = server.poll_transmit(&mut out).map_err(|e| e.to_string())? {
            let r = match t {
                Transmit::Bytes(n) => sock.write_all(&out[..n]),
                Transmit::Payload { len, .. } | Transmit::Zeroes { len, .. } => {
                    sock.write_all(&zeroes[..len.min(zeroes.len())])
                }
                _ => Ok(()),
            };
            if r.is_err() {
                // The client hung up while the reply was still going out.
                log.push("eof (write failed)".to_string());
                return Ok(log);
            }
        }
        if server.is_finished() {
            return Ok(log);
        }
        match server.wants() {
            Want::Payload { len, .. } | Want::Discard { len } => {
                let mut buf = vec![0u8; len.min(65536)];
                let n = sock.read(&mut buf).map_err(|e| e.to_string())?;
                if n == 0 {
                    log.push("eof (in a payload)".to_string());
                    return Ok(log);
                }
                server.handle_payload(n).map_err(|e| e.to_string())?;
                continue;
            }
            Want::Bytes(n) if input.len() < n => {
                let mut buf = vec![0u8; n - input.len()];
                let got = sock.read(&mut buf).unwrap_or(0);
                if got == 0 {
                    let _ = server.handle_eof();
                    log.push("eof".to_string());
                    return Ok(log);
                }
                input.extend_from_slice(&buf[..got]);
            }
            _ => {}
        }
        let h = server.handle_input(&input).map_err(|e| e.to_string())?;
        let consumed = h.consumed;
        if let Some(ev) = h.event {
            log.push(format!("{ev:?}"));
            match ev {
                ServerEvent::Export(_) => server
                    .answer_export(&ExportInfo::new(SIZE, TransmissionFlags::empty()))
                    .map_err(|e| e.to_string())?,
                ServerEvent::MetaContexts(_) | ServerEvent::List => {
                    server.answer_ack().map_err(|e| e.to_string())?
                }
                ServerEvent::Request { request, .. } if request.command == Command::Read => {
                    // The lie: data for the range right after the request.
                    let len = request.len as usize;
                    server
                        .reply_read_data(request.cookie, request.offset + request.len, len)
                        .map_err(|e| e.to_string())?;
                }
                ServerEvent::Request { request, .. } => server
                    .reply(request.cookie, Err(Errno::Inval))
                    .map_err(|e| e.to_string())?,
                _ => {}
            }
        }
        input.drain(..consumed);
    }
    Err("the server loop did not end".into())
}

#[test]
fn libnbd_reports_an_out_of_range_chunk_as_a_protocol_error() {
    if !support::require(&["nbdsh"]) {
        return;
    }
    let dir = support::TestDir::new();
    let sock = dir.join("hostile.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || serve_lying_reads(listener));
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let script = "\
try:
    h.pread(512, 0)
    print('READ SUCCEEDED')
except nbd.Error as e:
    print('ERROR:', e.string)
";
    let out = support::run(&mut support::nbdsh(&["-u", &uri, "-c", script]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = server.join().unwrap().unwrap();
    assert!(
        log.iter().any(|e| e.contains("Read")),
        "the read reached the server: {log:?}"
    );
    assert!(!stdout.contains("READ SUCCEEDED"), "{stdout}");
    // libnbd 1.14 names the rule and the offending range, then hangs up.
    assert!(
        stdout.contains("ERROR: nbd_pread: range of structured reply is out of bounds, offset=512"),
        "libnbd should name the broken rule: {stdout}"
    );
    // ... and hangs up, which the server sees as end of file or, when the hang-up races
    // the rest of the reply, as a failed write.
    assert!(
        log.last().is_some_and(|e| e.starts_with("eof")),
        "libnbd should hang up after the bad chunk: {log:?}"
    );
}
