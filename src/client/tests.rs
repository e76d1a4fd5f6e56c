//! Scenario tests of the client machine against scripted server byte streams, built with
//! the wire codecs.

use std::prelude::v1::*;
use std::{format, vec};

use proptest::prelude::*;

use super::*;
use crate::common::{Transmit, Want};
use crate::error::{Incompatible, Misbehavior, Misuse};
use crate::wire::{
    BlockSize, BlockStatus, ChunkHeader, ChunkType, CmdFlags, Command, Errno, ExportNameReply,
    Extent, Greeting, Hello, Info, InfoType, OffsetHole, OldstyleHello, Opt, OptCode, OptError,
    OptReply, OptReplyHeader, ReplyFlags, Request, SimpleReply, TransmissionFlags,
};

// ---- server-side byte builders ----

const FIXED_NZ: u16 = 0x0003;
const RW: u16 = 0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0080 | 0x0400 | 0x0800;
const SIZE: u64 = 1 << 20;

fn greeting(flags: u16) -> Vec<u8> {
    let mut b = vec![0; 18];
    Hello::Newstyle(Greeting {
        flags: HandshakeFlags::from_bits(flags),
    })
    .emit(&mut b)
    .unwrap();
    b
}

fn oldstyle(size: u64, hs: u16, tflags: u16) -> Vec<u8> {
    let mut b = vec![0; 152];
    OldstyleHello {
        size,
        handshake_flags: HandshakeFlags::from_bits(hs),
        transmission_flags: TransmissionFlags::from_bits(tflags),
    }
    .emit(&mut b)
    .unwrap();
    b
}

fn rep(opt: OptCode, reply: OptReply<'_>) -> Vec<u8> {
    let mut b = vec![0; reply.buffer_len()];
    reply.emit(opt, &mut b).unwrap();
    b
}

fn ack(opt: OptCode) -> Vec<u8> {
    rep(opt, OptReply::Ack)
}

fn refuse(opt: OptCode, error: OptError, message: &str) -> Vec<u8> {
    rep(opt, OptReply::Error { error, message })
}

fn info_export(opt: OptCode, size: u64, flags: u16) -> Vec<u8> {
    rep(
        opt,
        OptReply::Info(Info::Export {
            size,
            flags: TransmissionFlags::from_bits(flags),
        }),
    )
}

fn meta(opt: OptCode, id: u32, name: &str) -> Vec<u8> {
    rep(opt, OptReply::MetaContext { id, name })
}

fn simple(cookie: u64, error: Option<Errno>) -> Vec<u8> {
    let mut b = vec![0; 16];
    SimpleReply {
        error,
        cookie: Cookie(cookie),
    }
    .emit(&mut b)
    .unwrap();
    b
}

/// A chunk header (structured, or extended with `ext = Some(request offset)`) and payload.
fn chunk(ext: Option<u64>, done: bool, ty: ChunkType, cookie: u64, payload: &[u8]) -> Vec<u8> {
    chunk_len(ext, done, ty, cookie, payload.len() as u64, payload)
}

fn chunk_len(
    ext: Option<u64>,
    done: bool,
    ty: ChunkType,
    cookie: u64,
    len: u64,
    payload: &[u8],
) -> Vec<u8> {
    let h = ChunkHeader {
        flags: if done {
            ReplyFlags::DONE
        } else {
            ReplyFlags::empty()
        },
        chunk_type: ty,
        cookie: Cookie(cookie),
        offset: ext,
        len,
    };
    let mut b = vec![0; h.buffer_len()];
    h.emit(&mut b).unwrap();
    b.extend_from_slice(payload);
    b
}

fn data(ext: Option<u64>, done: bool, cookie: u64, offset: u64, bytes: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(bytes);
    chunk(ext, done, ChunkType::OffsetData, cookie, &p)
}

fn hole(ext: Option<u64>, done: bool, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut p = vec![0; 12];
    OffsetHole { offset, len }.emit(&mut p).unwrap();
    chunk(ext, done, ChunkType::OffsetHole, cookie, &p)
}

fn none(ext: Option<u64>, cookie: u64) -> Vec<u8> {
    chunk(ext, true, ChunkType::None, cookie, &[])
}

fn err_chunk(
    ext: Option<u64>,
    done: bool,
    cookie: u64,
    e: u32,
    msg: &str,
    off: Option<u64>,
) -> Vec<u8> {
    let mut p = e.to_be_bytes().to_vec();
    p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    p.extend_from_slice(msg.as_bytes());
    if let Some(o) = off {
        p.extend_from_slice(&o.to_be_bytes());
    }
    let ty = if off.is_some() {
        ChunkType::ErrorOffset
    } else {
        ChunkType::Error
    };
    chunk(ext, done, ty, cookie, &p)
}

fn bs(
    ext: Option<u64>,
    done: bool,
    cookie: u64,
    id: u32,
    wide: bool,
    extents: &[(u64, u64)],
) -> Vec<u8> {
    let ex: Vec<Extent> = extents
        .iter()
        .map(|&(len, status)| Extent { len, status })
        .collect();
    let mut raw = vec![0; ex.len() * Extent::width(wide)];
    wire::extent::emit_extents(&ex, wide, &mut raw).unwrap();
    let status = BlockStatus {
        context_id: id,
        extents: Extents::new(&raw, wide).unwrap(),
    };
    let mut p = vec![0; status.buffer_len()];
    status.emit(&mut p).unwrap();
    let ty = if wide {
        ChunkType::BlockStatusExt
    } else {
        ChunkType::BlockStatus
    };
    chunk(ext, done, ty, cookie, &p)
}

fn ev(e: Event<'_>) -> String {
    format!("{e:?}")
}

fn done(cookie: u64, result: Result<(), Errno>) -> String {
    ev(Event::Done {
        cookie: Cookie(cookie),
        result,
    })
}

// ---- a driver over the machine, as a real one would be ----

struct T<const N: usize = 8> {
    c: Client<N>,
    buf: Vec<u8>,
    events: Vec<String>,
    /// Read payload moved out by the "driver".
    payload: Vec<u8>,
    /// Client output drained so far.
    sent: Vec<u8>,
    /// Run once when the client becomes ready (commands issued then, as an application
    /// would).
    on_ready: Option<fn(&mut Client<N>)>,
}

impl<const N: usize> T<N> {
    fn new(cfg: ClientConfig<'_>) -> Self {
        Self {
            c: Client::new(&cfg).unwrap(),
            buf: Vec::new(),
            events: Vec::new(),
            payload: Vec::new(),
            sent: Vec::new(),
            on_ready: None,
        }
    }

    /// Feeds bytes, handling every event and payload, until the machine wants more.
    fn feed(&mut self, input: &[u8]) -> Result<(), Error> {
        self.buf.extend_from_slice(input);
        loop {
            if let Want::Payload { len, .. } = self.c.wants() {
                let n = len.min(self.buf.len());
                if n == 0 {
                    return Ok(());
                }
                self.payload.extend(self.buf.drain(..n));
                self.c.handle_payload(n)?;
                continue;
            }
            let h = self.c.handle_input(&self.buf)?;
            let progressed = h.consumed > 0 || h.event.is_some();
            if let Some(e) = h.event {
                self.events.push(ev(e));
            }
            let n = h.consumed;
            self.buf.drain(..n);
            if self.c.state() == State::Ready {
                if let Some(hook) = self.on_ready.take() {
                    hook(&mut self.c);
                }
            }
            // The drive contract: drain the output after every input call.
            self.drain();
            if !progressed {
                return Ok(());
            }
        }
    }

    /// Drains `poll_transmit` into `sent`; write payloads show up as 0xee bytes.
    fn drain(&mut self) {
        let mut b = vec![0u8; MAX_OPTION_LEN];
        while let Some(t) = self.c.poll_transmit(&mut b).unwrap() {
            match t {
                Transmit::Bytes(n) => self.sent.extend_from_slice(&b[..n]),
                Transmit::Payload { len, .. } => self.sent.extend(core::iter::repeat_n(0xee, len)),
                Transmit::Zeroes { .. } => panic!("a client never sends zeroes"),
            }
        }
    }

    /// Everything the client sent since the last call.
    fn out(&mut self) -> Vec<u8> {
        self.drain();
        core::mem::take(&mut self.sent)
    }

    fn take_events(&mut self) -> Vec<String> {
        core::mem::take(&mut self.events)
    }

    fn abandoned(&mut self) -> Vec<String> {
        let mut v = Vec::new();
        while let Some(e) = self.c.poll_event() {
            v.push(ev(e));
        }
        v
    }
}

/// The option codes in client output that starts with the 4-byte client flags if `flags`.
fn opts(mut bytes: &[u8]) -> Vec<OptCode> {
    let mut v = Vec::new();
    while !bytes.is_empty() {
        let (opt, n) = Opt::parse_message(bytes).unwrap();
        v.push(opt.code());
        bytes = &bytes[n..];
    }
    v
}

fn requests(mut bytes: &[u8]) -> Vec<Request> {
    let mut v = Vec::new();
    while !bytes.is_empty() {
        let r = Request::parse(bytes).unwrap();
        let skip = r.buffer_len() + r.payload_len() as usize;
        v.push(r);
        bytes = &bytes[skip..];
    }
    v
}

/// What a ready client should look like.
#[derive(Clone, Copy)]
struct Setup {
    eh: bool,
    sr: bool,
    tflags: u16,
    size: u64,
    contexts: &'static [u32],
    block: Option<BlockSize>,
}

const PLAIN: Setup = Setup {
    eh: false,
    sr: false,
    tflags: RW,
    size: SIZE,
    contexts: &[],
    block: None,
};
const SR: Setup = Setup {
    sr: true,
    contexts: &[1],
    ..PLAIN
};
const EH: Setup = Setup {
    eh: true,
    sr: true,
    tflags: RW | 0x1000,
    contexts: &[0, 2],
    ..PLAIN
};

const QUERIES: [&str; 3] = ["base:allocation", "qemu:dirty-bitmap:b", "x-a:b"];

/// A client negotiated through the real handshake to `s`.
fn ready<const N: usize>(s: Setup) -> T<N> {
    let q = &QUERIES[..s.contexts.len()];
    let mut t = T::<N>::new(ClientConfig {
        meta_contexts: q,
        extended_headers: s.eh,
        structured_replies: s.sr,
        ..ClientConfig::default()
    });
    t.feed(&greeting(FIXED_NZ)).unwrap();
    let mut sent = opts(&t.out()[4..]);
    if s.eh {
        assert_eq!(sent, [OptCode::ExtendedHeaders]);
        t.feed(&ack(OptCode::ExtendedHeaders)).unwrap();
        sent = opts(&t.out());
    } else if s.sr {
        assert_eq!(sent, [OptCode::StructuredReply]);
        t.feed(&ack(OptCode::StructuredReply)).unwrap();
        sent = opts(&t.out());
    }
    if !s.contexts.is_empty() {
        assert_eq!(sent, [OptCode::SetMetaContext]);
        for (id, name) in s.contexts.iter().zip(q) {
            t.feed(&meta(OptCode::SetMetaContext, *id, name)).unwrap();
        }
        t.feed(&ack(OptCode::SetMetaContext)).unwrap();
        sent = opts(&t.out());
    }
    assert_eq!(sent, [OptCode::Go]);
    t.feed(&info_export(OptCode::Go, s.size, s.tflags)).unwrap();
    if let Some(b) = s.block {
        t.feed(&rep(OptCode::Go, OptReply::Info(Info::BlockSize(b))))
            .unwrap();
    }
    t.feed(&ack(OptCode::Go)).unwrap();
    assert_eq!(t.c.state(), State::Ready);
    assert!(t.out().is_empty());
    t.take_events();
    t
}

// ======================= negotiation =======================

#[test]
fn oldstyle_goes_straight_to_transmission() {
    let mut t = T::<8>::new(ClientConfig::default());
    assert_eq!(t.c.wants(), Want::Bytes(18));
    let hello = oldstyle(SIZE, 0, 0x0005);
    t.feed(&hello[..16]).unwrap();
    // Now the style is known: the whole hello is wanted.
    assert_eq!(t.c.wants(), Want::Bytes(152));
    t.feed(&hello[16..]).unwrap();
    assert_eq!(
        t.take_events(),
        [
            ev(Event::Greeting {
                oldstyle: true,
                flags: HandshakeFlags::empty()
            }),
            ev(Event::Ready {
                size: SIZE,
                flags: TransmissionFlags::from_bits(5)
            })
        ]
    );
    assert!(t.out().is_empty(), "oldstyle clients send nothing");
    assert_eq!(t.c.size(), Some(SIZE));
    assert_eq!(t.c.wants(), Want::Nothing);
    let c = t.c.read(0, 512, CmdFlags::empty()).unwrap();
    let reqs = requests(&t.out());
    assert_eq!(reqs.len(), 1);
    assert!(!reqs[0].extended);
    assert_eq!(reqs[0].cookie, c);
}

#[test]
fn oldstyle_with_handshake_flags_is_refused() {
    let mut t = T::<8>::new(ClientConfig::default());
    assert_eq!(
        t.feed(&oldstyle(SIZE, 1, 1)),
        Err(Misbehavior::OldstyleHandshakeFlags(1).into())
    );
    assert_eq!(t.c.state(), State::Dead);
    // Sticky.
    assert_eq!(
        t.c.handle_input(&[]).unwrap_err(),
        Misbehavior::OldstyleHandshakeFlags(1).into()
    );
}

#[test]
fn non_fixed_newstyle_uses_export_name_with_padding() {
    let mut t = T::<8>::new(ClientConfig::new("disk"));
    t.feed(&greeting(0)).unwrap();
    let out = t.out();
    assert_eq!(
        &out[..4],
        &[0, 0, 0, 0],
        "no client flag the server did not offer"
    );
    assert_eq!(opts(&out[4..]), [OptCode::ExportName]);
    assert_eq!(t.c.wants(), Want::Bytes(134));
    let mut reply = vec![0; 134];
    ExportNameReply {
        size: 4096,
        flags: TransmissionFlags::from_bits(1),
        zeroes: true,
    }
    .emit(&mut reply)
    .unwrap();
    t.feed(&reply).unwrap();
    assert_eq!(t.c.state(), State::Ready);
    assert_eq!(t.c.size(), Some(4096));
    assert!(!t.c.structured_replies());
}

#[test]
fn client_flags_are_a_subset_of_the_offer() {
    for (offered, expected) in [(0x0001, 1), (0x0002, 2), (0x0003, 3), (0xfffc, 0)] {
        let mut t = T::<8>::new(ClientConfig::default());
        t.feed(&greeting(offered)).unwrap();
        assert_eq!(&t.out()[..4], &[0, 0, 0, expected], "offered {offered:#x}");
    }
}

#[test]
fn optional_tls_with_a_non_fixed_server_stays_plaintext() {
    let mut t = T::<8>::new(ClientConfig {
        tls: TlsPolicy::Optional,
        ..ClientConfig::default()
    });
    t.feed(&greeting(0x0002)).unwrap();
    let out = t.out();
    assert_eq!(&out[..4], &[0, 0, 0, 2]);
    assert_eq!(opts(&out[4..]), [OptCode::ExportName]);
}

#[test]
fn fixed_newstyle_runs_the_whole_automatic_sequence() {
    let q = ["base:allocation"];
    let mut t = T::<8>::new(ClientConfig {
        export: "disk",
        meta_contexts: &q,
        ..ClientConfig::default()
    });
    t.feed(&greeting(FIXED_NZ)).unwrap();
    let out = t.out();
    assert_eq!(&out[..4], &[0, 0, 0, 3]);
    assert_eq!(opts(&out[4..]), [OptCode::ExtendedHeaders]);
    t.feed(&ack(OptCode::ExtendedHeaders)).unwrap();
    let out = t.out();
    let (opt, _) = Opt::parse_message(&out).unwrap();
    match opt {
        Opt::SetMetaContext(r) => {
            assert_eq!(r.export, "disk");
            assert_eq!(r.queries.iter().collect::<Vec<_>>(), ["base:allocation"]);
        }
        other => panic!("{other:?}"),
    }
    t.feed(&meta(OptCode::SetMetaContext, 7, "base:allocation"))
        .unwrap();
    t.feed(&ack(OptCode::SetMetaContext)).unwrap();
    let out = t.out();
    match Opt::parse_message(&out).unwrap().0 {
        Opt::Go(r) => {
            assert_eq!(r.name, "disk");
            assert_eq!(
                r.infos.iter().collect::<Vec<_>>(),
                [InfoType::BlockSize, InfoType::Name, InfoType::Description]
            );
        }
        other => panic!("{other:?}"),
    }
    let b = BlockSize {
        min: 512,
        preferred: 4096,
        max_payload: 1 << 21,
    };
    t.feed(&info_export(OptCode::Go, SIZE, RW)).unwrap();
    t.feed(&rep(OptCode::Go, OptReply::Info(Info::BlockSize(b))))
        .unwrap();
    t.feed(&rep(OptCode::Go, OptReply::Info(Info::Name("disk"))))
        .unwrap();
    t.feed(&ack(OptCode::Go)).unwrap();
    assert_eq!(
        t.take_events(),
        [
            ev(Event::Greeting {
                oldstyle: false,
                flags: HandshakeFlags::from_bits(3)
            }),
            ev(Event::OptionDone {
                opt: OptCode::ExtendedHeaders,
                result: Ok(())
            }),
            ev(Event::MetaContext {
                id: 7,
                name: "base:allocation"
            }),
            ev(Event::OptionDone {
                opt: OptCode::SetMetaContext,
                result: Ok(())
            }),
            ev(Event::Info(Info::Export {
                size: SIZE,
                flags: TransmissionFlags::from_bits(RW)
            })),
            ev(Event::Info(Info::BlockSize(b))),
            ev(Event::Info(Info::Name("disk"))),
            ev(Event::Ready {
                size: SIZE,
                flags: TransmissionFlags::from_bits(RW)
            }),
        ]
    );
    assert!(t.c.extended_headers() && t.c.structured_replies());
    assert_eq!(t.c.contexts(), &[7]);
    assert_eq!(t.c.block_size(), b);
    assert_eq!(t.c.max_payload(), 1 << 21);
    assert_eq!(t.c.export_name(), "disk");
}

#[test]
fn extended_headers_refused_falls_back_to_structured_replies() {
    let mut t = T::<8>::new(ClientConfig::default());
    t.feed(&greeting(FIXED_NZ)).unwrap();
    t.out();
    t.feed(&refuse(OptCode::ExtendedHeaders, OptError::Unsup, "no"))
        .unwrap();
    assert_eq!(opts(&t.out()), [OptCode::StructuredReply]);
    t.feed(&ack(OptCode::StructuredReply)).unwrap();
    // No contexts configured: straight to GO.
    assert_eq!(opts(&t.out()), [OptCode::Go]);
    assert!(t.take_events().contains(&ev(Event::OptionDone {
        opt: OptCode::ExtendedHeaders,
        result: Err(OptRefusal {
            error: OptError::Unsup,
            message: "no"
        })
    })));
}

#[test]
fn structured_replies_refused_skips_meta_contexts() {
    let q = ["base:allocation"];
    let mut t = T::<8>::new(ClientConfig {
        meta_contexts: &q,
        extended_headers: false,
        ..ClientConfig::default()
    });
    t.feed(&greeting(FIXED_NZ)).unwrap();
    assert_eq!(opts(&t.out()[4..]), [OptCode::StructuredReply]);
    t.feed(&refuse(OptCode::StructuredReply, OptError::Unsup, ""))
        .unwrap();
    assert_eq!(opts(&t.out()), [OptCode::Go]);
}

#[test]
fn go_unsupported_falls_back_to_export_name_without_padding() {
    let mut t = T::<8>::new(ClientConfig {
        extended_headers: false,
        structured_replies: false,
        ..ClientConfig::default()
    });
    t.feed(&greeting(FIXED_NZ)).unwrap();
    assert_eq!(opts(&t.out()[4..]), [OptCode::Go]);
    t.feed(&refuse(OptCode::Go, OptError::Unsup, "")).unwrap();
    assert_eq!(opts(&t.out()), [OptCode::ExportName]);
    assert_eq!(t.c.wants(), Want::Bytes(10));
    let mut reply = vec![0; 10];
    ExportNameReply {
        size: 99,
        flags: TransmissionFlags::from_bits(3),
        zeroes: false,
    }
    .emit(&mut reply)
    .unwrap();
    t.feed(&reply).unwrap();
    assert_eq!(t.c.state(), State::Ready);
    assert_eq!(t.c.size(), Some(99));
}

#[test]
fn go_unsupported_after_extended_headers_is_fatal_with_a_polite_abort() {
    let mut t = T::<8>::new(ClientConfig::default());
    t.feed(&greeting(FIXED_NZ)).unwrap();
    t.out();
    t.feed(&ack(OptCode::ExtendedHeaders)).unwrap();
    t.out();
    t.feed(&refuse(OptCode::Go, OptError::Unsup, "what"))
        .unwrap_err();
    let refused = Incompatible::OptionRefused {
        opt: OptCode::Go,
        reply: wire::ReplyType::Error(OptError::Unsup),
    };
    assert_eq!(t.c.error(), Some(refused.into()));
    // The refusal (with its message) was still delivered as an event.
    assert!(t.take_events().contains(&ev(Event::OptionDone {
        opt: OptCode::Go,
        result: Err(OptRefusal {
            error: OptError::Unsup,
            message: "what"
        })
    })));
    assert_eq!(opts(&t.out()), [OptCode::Abort]);
}

#[test]
fn block_size_required_retries_go_with_the_request() {
    let mut t = T::<8>::new(ClientConfig {
        extended_headers: false,
        structured_replies: false,
        request_block_size: false,
        request_name_and_description: false,
        ..ClientConfig::default()
    });
    t.feed(&greeting(FIXED_NZ)).unwrap();
    let out = t.out();
    match Opt::parse_message(&out[4..]).unwrap().0 {
        Opt::Go(r) => assert!(r.infos.is_empty()),
        o => panic!("{o:?}"),
    }
    t.feed(&refuse(OptCode::Go, OptError::BlockSizeReqd, ""))
        .unwrap();
    match Opt::parse_message(&t.out()).unwrap().0 {
        Opt::Go(r) => assert_eq!(r.infos.iter().collect::<Vec<_>>(), [InfoType::BlockSize]),
        o => panic!("{o:?}"),
    }
    // A second BLOCK_SIZE_REQD (we did ask) ends the session.
    t.feed(&refuse(OptCode::Go, OptError::BlockSizeReqd, ""))
        .unwrap_err();
    assert_eq!(opts(&t.out()), [OptCode::Abort]);
}

fn at_go() -> T<8> {
    let mut t = T::<8>::new(ClientConfig {
        extended_headers: false,
        structured_replies: false,
        ..ClientConfig::default()
    });
    t.feed(&greeting(FIXED_NZ)).unwrap();
    assert_eq!(opts(&t.out()[4..]), [OptCode::Go]);
    t
}

#[test]
fn go_success_needs_info_export() {
    let mut t = at_go();
    assert_eq!(
        t.feed(&ack(OptCode::Go)),
        Err(Misbehavior::InfoWithoutExport.into())
    );
}

#[test]
fn invalid_block_size_is_refused() {
    let mut t = at_go();
    let b = BlockSize {
        min: 3,
        preferred: 4096,
        max_payload: 1 << 20,
    };
    let e = t
        .feed(&rep(OptCode::Go, OptReply::Info(Info::BlockSize(b))))
        .unwrap_err();
    assert!(matches!(
        e,
        Error::PeerMisbehaved(Misbehavior::InvalidBlockSize(_))
    ));
}

#[test]
fn unknown_info_types_are_surfaced_and_ignored() {
    let mut t = at_go();
    t.feed(&rep(
        OptCode::Go,
        OptReply::Info(Info::Unknown {
            info: 77,
            data: &[1, 2],
        }),
    ))
    .unwrap();
    t.feed(&info_export(OptCode::Go, 8, 1)).unwrap();
    t.feed(&ack(OptCode::Go)).unwrap();
    assert_eq!(t.c.state(), State::Ready);
    assert!(t.take_events().contains(&ev(Event::Info(Info::Unknown {
        info: 77,
        data: &[1, 2]
    }))));
    assert_eq!(t.c.block_size(), BlockSize::DEFAULT);
}

fn at_set_meta() -> T<8> {
    let q = ["base:allocation", "x:y"];
    let mut t = T::<8>::new(ClientConfig {
        meta_contexts: &q,
        ..ClientConfig::default()
    });
    t.feed(&greeting(FIXED_NZ)).unwrap();
    t.out();
    t.feed(&ack(OptCode::ExtendedHeaders)).unwrap();
    assert_eq!(opts(&t.out()), [OptCode::SetMetaContext]);
    t
}

#[test]
fn context_names_need_a_namespace() {
    let mut t = at_set_meta();
    assert_eq!(
        t.feed(&meta(OptCode::SetMetaContext, 1, "allocation")),
        Err(Misbehavior::InvalidContextName.into())
    );
    let mut t = at_set_meta();
    assert_eq!(
        t.feed(&meta(OptCode::SetMetaContext, 1, ":x")),
        Err(Misbehavior::InvalidContextName.into())
    );
}

#[test]
fn context_ids_must_be_unique() {
    let mut t = at_set_meta();
    t.feed(&meta(OptCode::SetMetaContext, 1, "base:allocation"))
        .unwrap();
    assert_eq!(
        t.feed(&meta(OptCode::SetMetaContext, 1, "x:y")),
        Err(Misbehavior::DuplicateContextId(1).into())
    );
}

#[test]
fn refused_set_meta_context_discards_contexts() {
    let mut t = at_set_meta();
    t.feed(&meta(OptCode::SetMetaContext, 1, "base:allocation"))
        .unwrap();
    t.feed(&refuse(OptCode::SetMetaContext, OptError::TooBig, ""))
        .unwrap();
    assert_eq!(t.c.contexts(), &[] as &[u32]);
    assert_eq!(opts(&t.out()), [OptCode::Go]);
    t.feed(&info_export(OptCode::Go, SIZE, RW)).unwrap();
    t.feed(&ack(OptCode::Go)).unwrap();
    assert_eq!(
        t.c.block_status(0, 512, CmdFlags::empty()),
        Err(Misuse::NotNegotiated("metadata contexts").into())
    );
}

#[test]
fn too_many_contexts_are_refused() {
    let q = ["x:"];
    let mut t = T::<8>::new(ClientConfig {
        meta_contexts: &q,
        ..ClientConfig::default()
    });
    t.feed(&greeting(FIXED_NZ)).unwrap();
    t.out();
    t.feed(&ack(OptCode::ExtendedHeaders)).unwrap();
    t.out();
    for id in 0..MAX_CONTEXTS as u32 {
        t.feed(&meta(OptCode::SetMetaContext, id, "x:a")).unwrap();
    }
    assert_eq!(
        t.feed(&meta(OptCode::SetMetaContext, 99, "x:a")),
        Err(Misbehavior::TooManyContexts {
            limit: MAX_CONTEXTS
        }
        .into())
    );
}

#[test]
fn a_full_context_table_works() {
    let q = ["x:"];
    let mut t = T::<8>::new(ClientConfig {
        meta_contexts: &q,
        ..ClientConfig::default()
    });
    t.feed(&greeting(FIXED_NZ)).unwrap();
    t.feed(&ack(OptCode::ExtendedHeaders)).unwrap();
    for id in 0..MAX_CONTEXTS as u32 {
        t.feed(&meta(OptCode::SetMetaContext, id + 100, "x:a"))
            .unwrap();
    }
    t.feed(&ack(OptCode::SetMetaContext)).unwrap();
    t.feed(&info_export(OptCode::Go, SIZE, RW)).unwrap();
    t.feed(&ack(OptCode::Go)).unwrap();
    let c = t.c.block_status(0, 512, CmdFlags::empty()).unwrap();
    t.out();
    for id in 0..MAX_CONTEXTS as u32 {
        assert_eq!(
            t.c.in_flight_len(),
            1,
            "done only when every context answered"
        );
        t.feed(&bs(
            Some(0),
            id + 1 == MAX_CONTEXTS as u32,
            c.0,
            id + 100,
            true,
            &[(512, 0)],
        ))
        .unwrap();
    }
    assert_eq!(t.take_events().last(), Some(&done(c.0, Ok(()))));
}

fn tls(policy: TlsPolicy) -> T<8> {
    let mut t = T::<8>::new(ClientConfig {
        tls: policy,
        ..ClientConfig::default()
    });
    t.feed(&greeting(FIXED_NZ)).unwrap();
    assert_eq!(opts(&t.out()[4..]), [OptCode::StartTls]);
    t
}

#[test]
fn starttls_hands_over_and_resumes_negotiation() {
    let mut t = tls(TlsPolicy::Optional);
    t.feed(&ack(OptCode::StartTls)).unwrap();
    assert_eq!(t.take_events().last(), Some(&ev(Event::StartTls)));
    assert_eq!(t.c.state(), State::StartTls);
    assert_eq!(t.c.wants(), Want::Nothing);
    assert!(t.out().is_empty());
    t.c.tls_established().unwrap();
    assert!(t.c.tls_active());
    assert_eq!(opts(&t.out()), [OptCode::ExtendedHeaders]);
    assert_eq!(t.c.tls_established(), Err(Misuse::WrongState.into()));
}

#[test]
fn data_with_the_starttls_ack_is_refused() {
    let mut t = tls(TlsPolicy::Required);
    let mut input = ack(OptCode::StartTls);
    input.push(0x16);
    assert_eq!(
        t.c.handle_input(&input).unwrap_err(),
        Misbehavior::DataAfterStartTls.into()
    );
    // And data after the ACK but before tls_established().
    let mut t = tls(TlsPolicy::Required);
    t.feed(&ack(OptCode::StartTls)).unwrap();
    assert!(t.c.handle_input(&[]).is_ok());
    assert_eq!(
        t.c.handle_input(&[0x16]).unwrap_err(),
        Misbehavior::DataAfterStartTls.into()
    );
}

#[test]
fn optional_tls_refused_continues_in_plaintext() {
    let mut t = tls(TlsPolicy::Optional);
    t.feed(&refuse(
        OptCode::StartTls,
        OptError::Policy,
        "TLS not configured",
    ))
    .unwrap();
    assert!(t.take_events().contains(&ev(Event::OptionDone {
        opt: OptCode::StartTls,
        result: Err(OptRefusal {
            error: OptError::Policy,
            message: "TLS not configured"
        })
    })));
    assert_eq!(opts(&t.out()), [OptCode::ExtendedHeaders]);
    assert!(!t.c.tls_active());
}

#[test]
fn required_tls_refused_fails_without_downgrade() {
    let mut t = tls(TlsPolicy::Required);
    t.feed(&refuse(OptCode::StartTls, OptError::Policy, ""))
        .unwrap_err();
    assert_eq!(t.c.error(), Some(Incompatible::TlsUnavailable.into()));
    assert_eq!(opts(&t.out()), [OptCode::Abort]);
}

#[test]
fn required_tls_needs_fixed_newstyle() {
    let cfg = ClientConfig {
        tls: TlsPolicy::Required,
        ..ClientConfig::default()
    };
    let mut t = T::<8>::new(cfg);
    assert_eq!(
        t.feed(&greeting(0)),
        Err(Incompatible::TlsUnavailable.into())
    );
    assert!(t.out().is_empty());
    let mut t = T::<8>::new(cfg);
    assert_eq!(
        t.feed(&oldstyle(SIZE, 0, 1)),
        Err(Incompatible::TlsUnavailable.into())
    );
}

#[test]
fn tls_required_by_the_server_with_tls_off() {
    let mut t = T::<8>::new(ClientConfig::default());
    t.feed(&greeting(FIXED_NZ)).unwrap();
    t.out();
    t.feed(&refuse(
        OptCode::ExtendedHeaders,
        OptError::TlsReqd,
        "TLS first",
    ))
    .unwrap_err();
    assert_eq!(t.c.error(), Some(Incompatible::TlsRequiredByPeer.into()));
    assert_eq!(opts(&t.out()), [OptCode::Abort]);
    assert!(t.out().is_empty());
    assert_eq!(
        t.c.read(0, 1, CmdFlags::empty()),
        Err(Incompatible::TlsRequiredByPeer.into())
    );
}

#[test]
fn abort_accepts_an_ack_or_end_of_file() {
    for with_ack in [true, false] {
        let mut t = T::<8>::new(ClientConfig::default());
        t.feed(&greeting(FIXED_NZ)).unwrap();
        t.out();
        // An option is on the wire: ABORT waits for its final reply.
        t.c.disconnect().unwrap();
        assert!(t.out().is_empty());
        t.feed(&ack(OptCode::ExtendedHeaders)).unwrap();
        assert_eq!(opts(&t.out()), [OptCode::Abort]);
        if with_ack {
            t.feed(&ack(OptCode::Abort)).unwrap();
            assert_eq!(t.c.state(), State::Closed);
        }
        assert_eq!(t.c.handle_eof(), Ok(()));
        assert_eq!(t.c.state(), State::Closed);
    }
}

#[test]
fn disconnect_replaces_an_option_not_yet_sent() {
    let mut t = T::<8>::new(ClientConfig::default());
    let g = greeting(FIXED_NZ);
    assert_eq!(t.c.handle_input(&g).unwrap().consumed, 18);
    // EXTENDED_HEADERS is queued but not sent: ABORT takes its place.
    t.c.disconnect().unwrap();
    assert_eq!(opts(&t.out()[4..]), [OptCode::Abort]);
    assert_eq!(t.c.disconnect(), Err(Misuse::WrongState.into()));
    // Before the greeting: ABORT right after the client flags.
    let mut t = T::<8>::new(ClientConfig::default());
    t.c.disconnect().unwrap();
    t.feed(&g).unwrap();
    assert_eq!(opts(&t.out()[4..]), [OptCode::Abort]);
    assert_eq!(t.c.handle_eof(), Ok(()));
}

#[test]
fn shutdown_refusal_ends_the_session_politely() {
    let mut t = at_go();
    t.feed(&refuse(OptCode::Go, OptError::Shutdown, "bye"))
        .unwrap_err();
    assert_eq!(opts(&t.out()), [OptCode::Abort]);
}

#[test]
fn manual_mode_list_info_go() {
    let mut t = T::<8>::new(ClientConfig {
        manual: true,
        ..ClientConfig::default()
    });
    t.feed(&greeting(FIXED_NZ)).unwrap();
    assert_eq!(t.out(), [0, 0, 0, 3]);
    assert_eq!(t.c.wants(), Want::Nothing);
    // Bytes while nothing is pending.
    let mut idle = T::<8>::new(ClientConfig {
        manual: true,
        ..ClientConfig::default()
    });
    idle.feed(&greeting(FIXED_NZ)).unwrap();
    assert_eq!(
        idle.feed(&ack(OptCode::List)),
        Err(Misbehavior::UnsolicitedOptionReply(OptCode::List).into())
    );

    t.c.opt_list().unwrap();
    assert_eq!(
        t.c.opt_list(),
        Err(Misuse::WrongState.into()),
        "no pipelining"
    );
    assert_eq!(opts(&t.out()), [OptCode::List]);
    t.feed(&rep(
        OptCode::List,
        OptReply::Server {
            name: "a",
            description: "first",
        },
    ))
    .unwrap();
    t.feed(&rep(
        OptCode::List,
        OptReply::Server {
            name: "b",
            description: "",
        },
    ))
    .unwrap();
    t.feed(&ack(OptCode::List)).unwrap();
    t.c.opt_info("b").unwrap();
    match Opt::parse_message(&t.out()).unwrap().0 {
        Opt::Info(r) => assert_eq!(r.name, "b"),
        o => panic!("{o:?}"),
    }
    t.feed(&info_export(OptCode::Info, 0, 1)).unwrap();
    t.feed(&ack(OptCode::Info)).unwrap();
    assert_eq!(t.c.state(), State::Negotiating);
    assert_eq!(t.c.size(), None, "INFO does not choose the export");
    t.c.opt_go("b").unwrap();
    t.out();
    t.feed(&info_export(OptCode::Go, 512, 1)).unwrap();
    t.feed(&ack(OptCode::Go)).unwrap();
    assert_eq!(
        t.take_events(),
        [
            ev(Event::Greeting {
                oldstyle: false,
                flags: HandshakeFlags::from_bits(3)
            }),
            ev(Event::Export {
                name: "a",
                description: "first"
            }),
            ev(Event::Export {
                name: "b",
                description: ""
            }),
            ev(Event::OptionDone {
                opt: OptCode::List,
                result: Ok(())
            }),
            ev(Event::Info(Info::Export {
                size: 0,
                flags: TransmissionFlags::from_bits(1)
            })),
            ev(Event::OptionDone {
                opt: OptCode::Info,
                result: Ok(())
            }),
            ev(Event::Info(Info::Export {
                size: 512,
                flags: TransmissionFlags::from_bits(1)
            })),
            ev(Event::Ready {
                size: 512,
                flags: TransmissionFlags::from_bits(1)
            }),
        ]
    );
    assert_eq!(t.c.size(), Some(512));
    assert_eq!(t.c.export_name(), "b");
}

#[test]
fn manual_mode_checks_preconditions() {
    let mut t = T::<8>::new(ClientConfig {
        manual: true,
        ..ClientConfig::default()
    });
    assert_eq!(
        t.c.opt_list(),
        Err(Misuse::WrongState.into()),
        "before the greeting"
    );
    t.feed(&greeting(FIXED_NZ)).unwrap();
    t.out();
    assert_eq!(
        t.c.opt_set_meta_context("", &["base:allocation"]),
        Err(Misuse::NotNegotiated("structured replies").into())
    );
    t.c.opt_list_meta_context("", &["base:"]).unwrap();
    t.out();
    t.feed(&meta(OptCode::ListMetaContext, 0, "base:allocation"))
        .unwrap();
    t.feed(&ack(OptCode::ListMetaContext)).unwrap();
    assert_eq!(t.c.contexts(), &[] as &[u32], "LIST selects nothing");
    t.c.opt_extended_headers().unwrap();
    t.out();
    t.feed(&ack(OptCode::ExtendedHeaders)).unwrap();
    assert_eq!(t.c.opt_export_name(""), Err(Misuse::WrongState.into()));
    t.c.opt_abort().unwrap();
    t.out();
    t.feed(&ack(OptCode::Abort)).unwrap();
    assert_eq!(t.c.state(), State::Closed);
    // Automatic mode has no opt_* calls.
    let mut a = T::<8>::new(ClientConfig::default());
    a.feed(&greeting(FIXED_NZ)).unwrap();
    assert_eq!(a.c.opt_list(), Err(Misuse::WrongState.into()));
    // Non-fixed newstyle has only EXPORT_NAME.
    let mut n = T::<8>::new(ClientConfig {
        manual: true,
        ..ClientConfig::default()
    });
    n.feed(&greeting(0)).unwrap();
    assert_eq!(
        n.c.opt_list(),
        Err(Misuse::NotNegotiated("fixed newstyle").into())
    );
    n.c.opt_export_name("x").unwrap();
}

#[test]
fn manual_mode_starttls_forgets_earlier_negotiation() {
    let mut t = T::<8>::new(ClientConfig {
        manual: true,
        ..ClientConfig::default()
    });
    t.feed(&greeting(FIXED_NZ)).unwrap();
    t.c.opt_structured_reply().unwrap();
    t.out();
    t.feed(&ack(OptCode::StructuredReply)).unwrap();
    assert!(t.c.structured_replies());
    t.c.opt_starttls().unwrap();
    t.out();
    t.feed(&ack(OptCode::StartTls)).unwrap();
    t.c.tls_established().unwrap();
    assert!(!t.c.structured_replies());
    assert_eq!(t.c.state(), State::Negotiating);
    assert_eq!(t.c.opt_starttls(), Err(Misuse::WrongState.into()));
}

#[test]
fn option_replies_are_checked_against_the_option() {
    // For another option.
    let mut t = at_go();
    assert_eq!(
        t.feed(&ack(OptCode::List)),
        Err(Misbehavior::ReplyToWrongOption {
            sent: OptCode::Go,
            answered: OptCode::List
        }
        .into())
    );
    // A reply type not valid for the option.
    let mut t = at_go();
    assert_eq!(
        t.feed(&rep(
            OptCode::Go,
            OptReply::Server {
                name: "x",
                description: ""
            }
        )),
        Err(Misbehavior::UnexpectedOptionReply {
            opt: OptCode::Go,
            reply: wire::ReplyType::Server
        }
        .into())
    );
    // An unknown non-error reply type.
    let mut t = at_go();
    assert!(matches!(
        t.feed(&rep(
            OptCode::Go,
            OptReply::Unknown {
                reply: 9,
                data: &[]
            }
        )),
        Err(Error::PeerMisbehaved(
            Misbehavior::UnexpectedOptionReply { .. }
        ))
    ));
    // Too long, refused from the header alone (before any data arrives).
    let mut t = at_go();
    let mut header = vec![0; 20];
    OptReplyHeader {
        opt: OptCode::Go,
        reply: wire::ReplyType::Info,
        len: 2 + 4097,
    }
    .emit(&mut header)
    .unwrap();
    assert_eq!(
        t.feed(&header),
        Err(Misbehavior::OptionReplyTooLong {
            opt: OptCode::Go,
            len: 4099
        }
        .into())
    );
    // An ACK with data.
    let mut t = at_go();
    OptReplyHeader {
        opt: OptCode::Go,
        reply: wire::ReplyType::Ack,
        len: 1,
    }
    .emit(&mut header)
    .unwrap();
    assert!(matches!(
        t.feed(&header),
        Err(Error::PeerMisbehaved(
            Misbehavior::OptionReplyTooLong { .. }
        ))
    ));
    // Unknown error types are refusals like any other.
    let mut t = at_go();
    t.feed(&rep(
        OptCode::Go,
        OptReply::Error {
            error: OptError::Unknown(0x8000_0077),
            message: "?",
        },
    ))
    .unwrap_err();
    assert!(t.take_events().contains(&ev(Event::OptionDone {
        opt: OptCode::Go,
        result: Err(OptRefusal {
            error: OptError::Unknown(0x8000_0077),
            message: "?"
        })
    })));
}

#[test]
fn wants_gives_the_exact_next_frame_length() {
    let mut t = at_go();
    assert_eq!(t.c.wants(), Want::Bytes(20));
    let r = rep(OptCode::Go, OptReply::Info(Info::Name("disk")));
    t.feed(&r[..19]).unwrap();
    assert_eq!(t.c.wants(), Want::Bytes(20));
    t.feed(&r[19..20]).unwrap();
    assert_eq!(t.c.wants(), Want::Bytes(r.len()));
    t.feed(&r[20..]).unwrap();
    assert_eq!(t.c.wants(), Want::Bytes(20));
}

#[test]
fn end_of_file_during_negotiation() {
    let mut t = at_go();
    assert_eq!(
        t.c.handle_eof(),
        Err(Incompatible::ClientFlagsRefused.into())
    );
    let mut t = T::<8>::new(ClientConfig::new("x"));
    t.feed(&greeting(0)).unwrap();
    t.out();
    assert_eq!(t.c.handle_eof(), Err(Incompatible::ExportRefused.into()));
    let mut t = at_go();
    t.feed(&info_export(OptCode::Go, 1, 1)).unwrap();
    assert_eq!(t.c.handle_eof(), Err(Error::UnexpectedEof));
    // Mid-frame.
    let mut t = at_go();
    t.feed(&ack(OptCode::Go)[..5]).unwrap();
    assert_eq!(t.c.handle_eof(), Err(Error::UnexpectedEof));
    let mut t = T::<8>::new(ClientConfig::default());
    assert_eq!(t.c.handle_eof(), Err(Error::UnexpectedEof));
}

#[test]
fn config_strings_are_checked_and_bounded() {
    let long = "x".repeat(4097);
    assert!(matches!(
        Client::<1>::new(&ClientConfig::new(&long)),
        Err(Error::Misuse(Misuse::Encode(_)))
    ));
    let q = "q:".repeat(2000);
    let qs = [q.as_str(), q.as_str(), q.as_str()];
    assert!(matches!(
        Client::<1>::new(&ClientConfig {
            export: "",
            meta_contexts: &qs,
            ..ClientConfig::default()
        }),
        Err(Error::Misuse(Misuse::OptionTooLarge(_)))
    ));
    let many = ["a:b"; MAX_QUERIES + 1];
    assert!(matches!(
        Client::<1>::new(&ClientConfig {
            meta_contexts: &many,
            ..ClientConfig::default()
        }),
        Err(Error::Misuse(Misuse::OptionTooLarge(_)))
    ));
}

#[test]
fn the_biggest_option_fits_max_option_len() {
    // A maximal configuration: 16 queries and a full string store.
    let export = "e".repeat(4096);
    let q = format!(
        "q:{}",
        "x".repeat((STRING_STORE_LEN - 4096) / MAX_QUERIES - 2)
    );
    let queries = [q.as_str(); MAX_QUERIES];
    let mut c: Client<1> = Client::new(&ClientConfig {
        export: &export,
        meta_contexts: &queries,
        manual: true,
        ..ClientConfig::default()
    })
    .unwrap();
    let _ = c.handle_input(&greeting(FIXED_NZ)).unwrap();
    let mut b = vec![0u8; MAX_OPTION_LEN];
    assert_eq!(c.poll_transmit(&mut b), Ok(Some(Transmit::Bytes(4))));
    c.opt_list_meta_context(&export, &queries).unwrap();
    let Ok(Some(Transmit::Bytes(n))) = c.poll_transmit(&mut b) else {
        panic!()
    };
    assert_eq!(n, MAX_OPTION_LEN);
    assert_eq!(opts(&b[..n]), [OptCode::ListMetaContext]);
}

#[test]
fn poll_transmit_with_a_small_buffer_changes_nothing() {
    let mut t = T::<8>::new(ClientConfig::new("disk"));
    let _ = t.c.handle_input(&greeting(FIXED_NZ)).unwrap();
    let mut small = [0u8; 3];
    assert_eq!(
        t.c.poll_transmit(&mut small),
        Err(Error::BufferTooSmall { required: 4 })
    );
    // Room for the flags only: they go alone, the option next.
    let mut b = [0u8; 10];
    assert_eq!(t.c.poll_transmit(&mut b), Ok(Some(Transmit::Bytes(4))));
    assert_eq!(
        t.c.poll_transmit(&mut b),
        Err(Error::BufferTooSmall { required: 16 })
    );
    assert_eq!(opts(&t.out()), [OptCode::ExtendedHeaders]);
    let mut t = ready::<8>(PLAIN);
    t.c.read(0, 512, CmdFlags::empty()).unwrap();
    let mut b = [0u8; 27];
    assert_eq!(
        t.c.poll_transmit(&mut b),
        Err(Error::BufferTooSmall { required: 28 })
    );
    assert_eq!(requests(&t.out()).len(), 1);
}

// ======================= transmission: requests =======================

#[test]
fn requests_use_the_negotiated_header_form() {
    let mut t = ready::<8>(PLAIN);
    let r = t.c.read(4096, 512, CmdFlags::empty()).unwrap();
    let w = t.c.write(0, 4, CmdFlags::FUA).unwrap();
    assert_eq!(
        (r, w),
        (Cookie(1), Cookie(2)),
        "cookies come from a counter"
    );
    let out = t.out();
    // Spec digest section 7 vectors (compact READ and WRITE|FUA).
    assert_eq!(
        &out[..28],
        &[
            0x25, 0x60, 0x95, 0x13, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0x10, 0,
            0, 0, 2, 0
        ]
    );
    assert_eq!(
        &out[28..56],
        &[
            0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 4
        ]
    );
    assert_eq!(&out[56..], &[0xee; 4]);

    let mut t = ready::<8>(EH);
    t.c.write(0, 4, CmdFlags::empty()).unwrap();
    t.c.trim(0, 1 << 19, CmdFlags::empty()).unwrap();
    let reqs = requests(&t.out());
    assert!(reqs.iter().all(|r| r.extended));
    assert_eq!(reqs[0].flags, CmdFlags::PAYLOAD_LEN);
    assert_eq!(reqs[0].payload_len(), 4);
    assert_eq!(reqs[1].flags, CmdFlags::empty());
}

#[test]
fn write_payload_comes_right_after_its_header() {
    let mut t = ready::<8>(PLAIN);
    t.c.write(512, 1024, CmdFlags::empty()).unwrap();
    t.c.flush(CmdFlags::empty()).unwrap();
    let mut b = [0u8; 256];
    assert_eq!(t.c.poll_transmit(&mut b), Ok(Some(Transmit::Bytes(28))));
    assert_eq!(
        t.c.poll_transmit(&mut b),
        Ok(Some(Transmit::Payload {
            cookie: Cookie(1),
            offset: 512,
            len: 1024
        }))
    );
    assert_eq!(t.c.poll_transmit(&mut b), Ok(Some(Transmit::Bytes(28))));
    assert_eq!(t.c.poll_transmit(&mut b), Ok(None));
}

#[test]
fn commands_the_server_would_reject_are_refused_locally() {
    let mut t = ready::<2>(Setup {
        tflags: 0x0001,
        ..PLAIN
    });
    let e = |r: Result<Cookie, Error>| r.unwrap_err();
    assert_eq!(
        e(t.c.flush(CmdFlags::empty())),
        Misuse::Unsupported(Command::Flush).into()
    );
    assert_eq!(
        e(t.c.trim(0, 1, CmdFlags::empty())),
        Misuse::Unsupported(Command::Trim).into()
    );
    assert_eq!(
        e(t.c.cache(0, 1, CmdFlags::empty())),
        Misuse::Unsupported(Command::Cache).into()
    );
    assert_eq!(
        e(t.c.write_zeroes(0, 1, CmdFlags::empty())),
        Misuse::Unsupported(Command::WriteZeroes).into()
    );
    assert_eq!(
        e(t.c.read(0, 1, CmdFlags::FUA)),
        Misuse::FlagNotAllowed(1).into()
    );
    assert_eq!(
        e(t.c.read(0, 1, CmdFlags::DF)),
        Misuse::FlagNotAllowed(4).into()
    );
    assert_eq!(
        e(t.c.read(0, 1, CmdFlags::NO_HOLE)),
        Misuse::FlagNotAllowed(2).into()
    );
    assert_eq!(
        e(t.c.read(0, 1, CmdFlags::PAYLOAD_LEN)),
        Misuse::FlagNotAllowed(0x20).into()
    );
    assert_eq!(
        e(t.c.read(0, 1, CmdFlags::from_bits(0x8000))),
        Misuse::FlagNotAllowed(0x8000).into()
    );
    assert_eq!(
        e(t.c.read(0, 0, CmdFlags::empty())),
        Misuse::BadLength(0).into()
    );
    assert_eq!(
        e(t.c.read(SIZE, 1, CmdFlags::empty())),
        Misuse::OutOfRange {
            offset: SIZE,
            len: 1,
            size: SIZE
        }
        .into()
    );
    assert!(matches!(
        e(t.c.read(u64::MAX, 2, CmdFlags::empty())),
        Error::Misuse(Misuse::OutOfRange { .. })
    ));
    assert_eq!(
        e(t.c.block_status(0, 1, CmdFlags::empty())),
        Misuse::NotNegotiated("metadata contexts").into()
    );
    t.c.read(0, 1, CmdFlags::empty()).unwrap();
    t.c.read(0, 1, CmdFlags::empty()).unwrap();
    assert_eq!(
        e(t.c.read(0, 1, CmdFlags::empty())),
        Misuse::TooManyInFlight.into()
    );
    assert!(t.out().len() == 56, "refused commands sent nothing");

    let mut t = ready::<8>(Setup {
        tflags: 0x0001 | 0x0002 | 0x0020 | 0x0040,
        ..PLAIN
    });
    assert_eq!(
        e(t.c.write(0, 1, CmdFlags::empty())),
        Misuse::ReadOnly.into()
    );
    assert_eq!(
        e(t.c.trim(0, 1, CmdFlags::empty())),
        Misuse::ReadOnly.into()
    );
    assert_eq!(
        e(t.c.write_zeroes(0, 1, CmdFlags::empty())),
        Misuse::ReadOnly.into()
    );
    assert_eq!(
        e(t.c.write_zeroes(0, 1, CmdFlags::FAST_ZERO)),
        Misuse::FlagNotAllowed(0x10).into(),
        "FAST_ZERO needs SEND_FAST_ZERO"
    );

    // Lengths over 32 bits need extended headers.
    let mut t = ready::<8>(Setup {
        size: 1 << 40,
        ..PLAIN
    });
    assert_eq!(
        e(t.c.trim(0, 1 << 33, CmdFlags::empty())),
        Misuse::BadLength(1 << 33).into()
    );
    let mut t = ready::<8>(Setup {
        size: 1 << 40,
        ..EH
    });
    t.c.trim(0, 1 << 33, CmdFlags::empty()).unwrap();
    let r = requests(&t.out());
    assert_eq!(r[0].len, 1 << 33);
    // Default maximum payload: 32 MiB.
    assert_eq!(
        e(t.c.read(0, (1 << 25) + 1, CmdFlags::empty())),
        Misuse::PayloadTooLarge {
            len: (1 << 25) + 1,
            max: 1 << 25
        }
        .into()
    );
}

#[test]
fn advertised_block_sizes_are_obeyed() {
    let mut t = ready::<8>(Setup {
        size: 10_000 * 512 + 100,
        block: Some(BlockSize {
            min: 512,
            preferred: 4096,
            max_payload: 1 << 20,
        }),
        ..PLAIN
    });
    let e = |r: Result<Cookie, Error>| r.unwrap_err();
    let mis = Misuse::Misaligned { min_block: 512 }.into();
    assert_eq!(e(t.c.read(1, 512, CmdFlags::empty())), mis);
    assert_eq!(e(t.c.read(0, 513, CmdFlags::empty())), mis);
    assert_eq!(e(t.c.trim(512, 100, CmdFlags::empty())), mis);
    // The unaligned tail of the export can be reached.
    t.c.read(10_000 * 512, 100, CmdFlags::empty()).unwrap();
    assert_eq!(
        e(t.c.write(0, 2 << 20, CmdFlags::empty())),
        Misuse::PayloadTooLarge {
            len: 2 << 20,
            max: 1 << 20
        }
        .into()
    );
    // No limit on payload-less commands.
    t.c.write_zeroes(0, 2 << 20, CmdFlags::empty()).unwrap();
}

#[test]
fn commands_need_the_ready_state() {
    let mut t = at_go();
    assert_eq!(
        t.c.read(0, 1, CmdFlags::empty()),
        Err(Misuse::WrongState.into())
    );
}

#[test]
fn block_status_payload_form() {
    let mut t = ready::<8>(EH);
    let e = |r: Result<Cookie, Error>| r.unwrap_err();
    assert_eq!(
        e(t.c.block_status_for(0, 512, CmdFlags::empty(), &[])),
        Misuse::BadLength(0).into()
    );
    assert_eq!(
        e(t.c.block_status_for(0, 512, CmdFlags::empty(), &[9])),
        Misuse::NoSuchContext(9).into()
    );
    assert_eq!(
        e(t.c.block_status_for(0, 512, CmdFlags::empty(), &[2, 2])),
        Misuse::NoSuchContext(2).into()
    );
    let c =
        t.c.block_status_for(0, 8192, CmdFlags::empty(), &[2])
            .unwrap();
    let out = t.out();
    // Spec digest section 7 layout: header with PAYLOAD_LEN, then effect length and IDs.
    let r = Request::parse(&out).unwrap();
    assert_eq!(r.flags, CmdFlags::PAYLOAD_LEN);
    assert_eq!(r.len, 12);
    assert_eq!(
        wire::BlockStatusPayload::parse(&out[32..]).unwrap(),
        wire::BlockStatusPayload {
            effect_len: 8192,
            ids: wire::ContextIds::new(&[2])
        }
    );
    // Only context 2 is owed.
    t.feed(&bs(Some(0), true, c.0, 2, true, &[(8192, 0)]))
        .unwrap();
    assert_eq!(t.take_events().last(), Some(&done(c.0, Ok(()))));
    // The longest request there is.
    let mut t = ready::<8>(EH);
    t.c.block_status_for(0, 512, CmdFlags::empty(), &[0, 2])
        .unwrap();
    let mut b = [0u8; MAX_REQUEST_LEN];
    assert_eq!(
        t.c.poll_transmit(&mut b),
        Ok(Some(Transmit::Bytes(32 + 8 + 8)))
    );
    // Not without the export flag.
    let mut t = ready::<8>(Setup { tflags: RW, ..EH });
    assert_eq!(
        e(t.c.block_status_for(0, 512, CmdFlags::empty(), &[2])),
        Misuse::Unsupported(Command::BlockStatus).into()
    );
    let mut t = ready::<8>(SR);
    assert_eq!(
        e(t.c.block_status_for(0, 512, CmdFlags::empty(), &[1])),
        Misuse::NotNegotiated("extended headers").into()
    );
}

// ======================= transmission: replies =======================

#[test]
fn simple_read_reply_passes_data_through() {
    let mut t = ready::<8>(PLAIN);
    let c = t.c.read(4096, 8, CmdFlags::empty()).unwrap();
    t.out();
    assert_eq!(t.c.wants(), Want::Bytes(16));
    let mut input = simple(c.0, None);
    input.extend_from_slice(b"abcdefgh");
    // Header, then the data in pieces.
    t.feed(&input[..19]).unwrap();
    assert_eq!(
        t.c.wants(),
        Want::Payload {
            cookie: c,
            offset: 4099,
            len: 5
        }
    );
    assert_eq!(
        t.c.handle_input(&input[19..]).unwrap_err(),
        Misuse::PayloadPending.into()
    );
    assert_eq!(t.c.handle_payload(6), Err(Misuse::PayloadMismatch.into()));
    t.feed(&input[19..]).unwrap();
    assert_eq!(t.payload, b"abcdefgh");
    assert_eq!(
        t.take_events(),
        [
            ev(Event::ReadData {
                cookie: c,
                offset: 4096,
                len: 8
            }),
            done(c.0, Ok(()))
        ]
    );
    assert_eq!(t.c.wants(), Want::Nothing);
    assert_eq!(t.c.handle_payload(1), Err(Misuse::PayloadMismatch.into()));
}

#[test]
fn simple_errors_complete_commands_out_of_order() {
    let mut t = ready::<8>(PLAIN);
    let a = t.c.read(0, 8, CmdFlags::empty()).unwrap();
    let b = t.c.write(0, 8, CmdFlags::empty()).unwrap();
    let f = t.c.flush(CmdFlags::empty()).unwrap();
    t.out();
    t.feed(&simple(f.0, None)).unwrap();
    t.feed(&simple(a.0, Some(Errno::Io))).unwrap();
    t.feed(&simple(b.0, Some(Errno::Unknown(1234)))).unwrap();
    assert_eq!(
        t.take_events(),
        [
            done(f.0, Ok(())),
            done(a.0, Err(Errno::Io)),
            done(b.0, Err(Errno::Unknown(1234)))
        ]
    );
    assert!(t.payload.is_empty(), "no data after a read error");
    assert_eq!(t.c.in_flight_len(), 0);
    // Bytes while nothing is owed.
    assert_eq!(
        t.feed(&simple(9, None)),
        Err(Misbehavior::UnsolicitedReply.into())
    );
}

#[test]
fn simple_reply_rules_after_negotiation() {
    let mut t = ready::<8>(SR);
    let c = t.c.read(0, 8, CmdFlags::empty()).unwrap();
    t.out();
    assert_eq!(
        t.feed(&simple(c.0, None)),
        Err(Misbehavior::SimpleReplyToStructuredRead(c).into())
    );
    // A simple *error* reply to a read is tolerated.
    let mut t = ready::<8>(SR);
    let c = t.c.read(0, 8, CmdFlags::empty()).unwrap();
    let w = t.c.write(0, 8, CmdFlags::empty()).unwrap();
    t.out();
    t.feed(&simple(c.0, Some(Errno::Inval))).unwrap();
    t.feed(&simple(w.0, None)).unwrap();
    assert_eq!(
        t.take_events(),
        [done(c.0, Err(Errno::Inval)), done(w.0, Ok(()))]
    );
    // No simple reply at all with extended headers.
    let mut t = ready::<8>(EH);
    let w = t.c.write(0, 8, CmdFlags::empty()).unwrap();
    t.out();
    assert_eq!(t.c.wants(), Want::Bytes(32));
    assert_eq!(
        t.feed(&simple(w.0, None)),
        Err(Misbehavior::SimpleReplyWithExtendedHeaders(w).into())
    );
}

#[test]
fn chunk_forms_must_match_the_negotiation() {
    let mut t = ready::<8>(PLAIN);
    let c = t.c.flush(CmdFlags::empty()).unwrap();
    t.out();
    assert_eq!(
        t.feed(&none(None, c.0)),
        Err(Misbehavior::StructuredReplyNotNegotiated(c).into())
    );
    let mut t = ready::<8>(SR);
    let c = t.c.flush(CmdFlags::empty()).unwrap();
    t.out();
    assert_eq!(
        t.feed(&none(Some(0), c.0)),
        Err(Misbehavior::WrongChunkForm(c).into())
    );
    let mut t = ready::<8>(EH);
    let c = t.c.flush(CmdFlags::empty()).unwrap();
    t.out();
    assert_eq!(
        t.feed(&none(None, c.0)),
        Err(Misbehavior::WrongChunkForm(c).into())
    );
}

#[test]
fn unknown_cookies_and_chunks_after_done() {
    let mut t = ready::<8>(SR);
    let c = t.c.flush(CmdFlags::empty()).unwrap();
    t.out();
    assert_eq!(
        t.feed(&none(None, 77)),
        Err(Misbehavior::UnknownCookie(Cookie(77)).into())
    );
    let mut t = ready::<8>(SR);
    let c2 = t.c.flush(CmdFlags::empty()).unwrap();
    let _other = t.c.flush(CmdFlags::empty()).unwrap();
    t.out();
    t.feed(&none(None, c2.0)).unwrap();
    assert_eq!(
        t.feed(&none(None, c2.0)),
        Err(Misbehavior::UnknownCookie(c2).into())
    );
    let _ = c;
}

#[test]
fn extended_chunks_echo_the_request_offset() {
    let mut t = ready::<8>(EH);
    let c = t.c.read(4096, 512, CmdFlags::empty()).unwrap();
    t.out();
    assert_eq!(
        t.feed(&hole(Some(0), true, c.0, 4096, 512)),
        Err(Misbehavior::ChunkOffsetMismatch(c).into())
    );
    let mut t = ready::<8>(EH);
    let c = t.c.read(4096, 512, CmdFlags::empty()).unwrap();
    t.out();
    // As qemu-nbd does: the header echoes the request, the payloads carry their offsets.
    t.feed(&data(Some(4096), false, c.0, 4096, &[7; 256]))
        .unwrap();
    t.feed(&hole(Some(4096), true, c.0, 4352, 256)).unwrap();
    assert_eq!(
        t.take_events(),
        [
            ev(Event::ReadData {
                cookie: c,
                offset: 4096,
                len: 256
            }),
            ev(Event::ReadHole {
                cookie: c,
                offset: 4352,
                len: 256
            }),
            done(c.0, Ok(()))
        ]
    );
    assert_eq!(t.payload, [7; 256]);
}

fn sr_read(len: u32, flags: CmdFlags) -> (T<8>, Cookie) {
    let mut t = ready::<8>(Setup { tflags: RW, ..SR });
    let c = t.c.read(1000, len, flags).unwrap();
    t.out();
    (t, c)
}

#[test]
fn out_of_order_read_chunks_reassemble() {
    let (mut t, c) = sr_read(300, CmdFlags::empty());
    t.feed(&hole(None, false, c.0, 1200, 100)).unwrap();
    t.feed(&data(None, false, c.0, 1000, &[1; 100])).unwrap();
    t.feed(&data(None, false, c.0, 1100, &[2; 100])).unwrap();
    t.feed(&none(None, c.0)).unwrap();
    assert_eq!(t.take_events().last(), Some(&done(c.0, Ok(()))));
}

#[test]
fn content_chunk_rules() {
    let (mut t, c) = sr_read(300, CmdFlags::empty());
    assert_eq!(
        t.feed(&data(None, false, c.0, 999, &[0; 10])),
        Err(Misbehavior::ChunkOutOfRange {
            cookie: c,
            offset: 999,
            len: 10
        }
        .into())
    );
    let (mut t, c) = sr_read(300, CmdFlags::empty());
    assert!(matches!(
        t.feed(&hole(None, false, c.0, 1250, 51)),
        Err(Error::PeerMisbehaved(Misbehavior::ChunkOutOfRange { .. }))
    ));
    let (mut t, c) = sr_read(300, CmdFlags::empty());
    t.feed(&data(None, false, c.0, 1000, &[0; 100])).unwrap();
    assert_eq!(
        t.feed(&hole(None, false, c.0, 1099, 2)),
        Err(Misbehavior::ChunkOverlap {
            cookie: c,
            offset: 1099
        }
        .into())
    );
    let (mut t, c) = sr_read(300, CmdFlags::empty());
    assert_eq!(
        t.feed(&hole(None, false, c.0, 1000, 0)),
        Err(Misbehavior::EmptyHole(c).into())
    );
    let (mut t, c) = sr_read(300, CmdFlags::empty());
    assert_eq!(
        t.feed(&chunk(None, false, ChunkType::None, c.0, &[])),
        Err(Misbehavior::NoneWithoutDone(c).into())
    );
    let (mut t, c) = sr_read(300, CmdFlags::empty());
    assert!(matches!(
        t.feed(&chunk(None, true, ChunkType::None, c.0, &[0])),
        Err(Error::Malformed(_))
    ));
    let (mut t, c) = sr_read(300, CmdFlags::empty());
    t.feed(&data(None, false, c.0, 1000, &[0; 100])).unwrap();
    assert_eq!(
        t.feed(&none(None, c.0)),
        Err(Misbehavior::IncompleteRead(c).into())
    );
    // A data chunk with DONE that leaves a gap fails when its data has been moved.
    let (mut t, c) = sr_read(300, CmdFlags::empty());
    assert_eq!(
        t.feed(&data(None, true, c.0, 1000, &[0; 100])),
        Err(Misbehavior::IncompleteRead(c).into())
    );
    // Content chunks belong to reads only.
    let mut t = ready::<8>(SR);
    let w = t.c.write(0, 10, CmdFlags::empty()).unwrap();
    t.out();
    assert_eq!(
        t.feed(&hole(None, true, w.0, 0, 10)),
        Err(Misbehavior::UnexpectedChunk {
            cookie: w,
            chunk_type: ChunkType::OffsetHole
        }
        .into())
    );
    let mut t = ready::<8>(SR);
    let w = t.c.write(0, 10, CmdFlags::empty()).unwrap();
    t.out();
    assert!(matches!(
        t.feed(&bs(None, true, w.0, 1, false, &[(10, 0)])),
        Err(Error::PeerMisbehaved(Misbehavior::UnexpectedChunk { .. }))
    ));
}

#[test]
fn df_reads_come_in_one_chunk() {
    let (mut t, c) = sr_read(300, CmdFlags::DF);
    t.feed(&data(None, false, c.0, 1000, &[0; 100])).unwrap();
    assert_eq!(
        t.feed(&hole(None, false, c.0, 1100, 200)),
        Err(Misbehavior::FragmentedDfRead(c).into())
    );
    let (mut t, c) = sr_read(300, CmdFlags::DF);
    t.feed(&data(None, true, c.0, 1000, &[0; 300])).unwrap();
    assert_eq!(t.take_events().last(), Some(&done(c.0, Ok(()))));
}

#[test]
fn error_chunks_fail_the_command_and_first_error_wins() {
    let (mut t, c) = sr_read(300, CmdFlags::empty());
    t.feed(&data(None, false, c.0, 1000, &[0; 100])).unwrap();
    t.feed(&err_chunk(None, false, c.0, 5, "disk on fire", Some(1100)))
        .unwrap();
    t.feed(&err_chunk(None, true, c.0, 22, "", None)).unwrap();
    let events = t.take_events();
    assert_eq!(
        &events[1..],
        [
            ev(Event::ChunkError {
                cookie: c,
                error: Errno::Io,
                message: "disk on fire",
                offset: Some(1100)
            }),
            ev(Event::ChunkError {
                cookie: c,
                error: Errno::Inval,
                message: "",
                offset: None
            }),
            done(c.0, Err(Errno::Io))
        ]
    );
    // Error offsets must lie inside the request.
    let (mut t, c) = sr_read(300, CmdFlags::empty());
    assert!(matches!(
        t.feed(&err_chunk(None, true, c.0, 5, "", Some(1300))),
        Err(Error::PeerMisbehaved(Misbehavior::ChunkOutOfRange { .. }))
    ));
    let (mut t, c) = sr_read(300, CmdFlags::empty());
    assert_eq!(
        t.feed(&err_chunk(None, true, c.0, 0, "", None)),
        Err(Misbehavior::ZeroError(c).into())
    );
    // Too long to be an error chunk: refused from the header.
    let (mut t, c) = sr_read(300, CmdFlags::empty());
    assert!(matches!(
        t.feed(&chunk_len(None, true, ChunkType::Error, c.0, 1 << 20, &[])),
        Err(Error::PeerMisbehaved(Misbehavior::ChunkTooLong { .. }))
    ));
    // ERROR_OFFSET on a flush fails it; the offset means nothing there.
    let mut t = ready::<8>(SR);
    let f = t.c.flush(CmdFlags::empty()).unwrap();
    t.out();
    t.feed(&err_chunk(None, true, f.0, 5, "x", Some(7)))
        .unwrap();
    assert_eq!(
        t.take_events(),
        [
            ev(Event::ChunkError {
                cookie: f,
                error: Errno::Io,
                message: "x",
                offset: None
            }),
            done(f.0, Err(Errno::Io))
        ]
    );
}

#[test]
fn unknown_chunk_types() {
    // Bit 15 clear: fatal.
    let mut t = ready::<8>(SR);
    let f = t.c.flush(CmdFlags::empty()).unwrap();
    t.out();
    assert_eq!(
        t.feed(&chunk(None, true, ChunkType::Unknown(0x0042), f.0, &[])),
        Err(Misbehavior::UnexpectedChunk {
            cookie: f,
            chunk_type: ChunkType::Unknown(0x42)
        }
        .into())
    );
    // Bit 15 set: the command fails, the connection lives on.
    let mut t = ready::<8>(SR);
    let f = t.c.flush(CmdFlags::empty()).unwrap();
    let g = t.c.flush(CmdFlags::empty()).unwrap();
    t.out();
    let mut p = 95u32.to_be_bytes().to_vec();
    p.extend_from_slice(&[0, 2, b'h', b'i', 9, 9, 9]);
    t.feed(&chunk(None, true, ChunkType::Unknown(0x8042), f.0, &p))
        .unwrap();
    t.feed(&simple(g.0, None)).unwrap();
    assert_eq!(
        t.take_events(),
        [
            ev(Event::ChunkError {
                cookie: f,
                error: Errno::NotSup,
                message: "hi",
                offset: None
            }),
            done(f.0, Err(Errno::NotSup)),
            done(g.0, Ok(()))
        ]
    );
    // ... unless its message overruns the chunk.
    let mut t = ready::<8>(SR);
    let f = t.c.flush(CmdFlags::empty()).unwrap();
    t.out();
    let mut p = 95u32.to_be_bytes().to_vec();
    p.extend_from_slice(&[0, 9, b'h']);
    assert!(matches!(
        t.feed(&chunk(None, true, ChunkType::Unknown(0x8042), f.0, &p)),
        Err(Error::Malformed(_))
    ));
}

fn bs_ready(s: Setup, flags: CmdFlags, off: u64, len: u64) -> (T<8>, Cookie, Option<u64>) {
    let mut t = ready::<8>(s);
    let c = t.c.block_status(off, len, flags).unwrap();
    t.out();
    (t, c, s.eh.then_some(off))
}

#[test]
fn block_status_replies_for_every_context() {
    let (mut t, c, x) = bs_ready(EH, CmdFlags::empty(), 4096, 8192);
    t.feed(&bs(x, false, c.0, 2, true, &[(4096, 1), (1 << 33, 0)]))
        .unwrap();
    t.feed(&bs(x, false, c.0, 0, true, &[(8192, 3)])).unwrap();
    t.feed(&none(x, c.0)).unwrap();
    let events = t.take_events();
    assert_eq!(events.len(), 3);
    assert!(events[0].contains("context_id: 2, offset: 4096"));
    assert_eq!(events[2], done(c.0, Ok(())));
    // The 32-bit form is tolerated under extended headers.
    let (mut t, c, x) = bs_ready(EH, CmdFlags::empty(), 0, 512);
    t.feed(&bs(x, false, c.0, 0, false, &[(512, 0)])).unwrap();
    t.feed(&bs(x, true, c.0, 2, false, &[(512, 0)])).unwrap();
    assert_eq!(t.take_events().last(), Some(&done(c.0, Ok(()))));
}

#[test]
fn block_status_rules() {
    let fail = |s: Setup, flags: CmdFlags, chunk_for: &dyn Fn(Option<u64>, u64) -> Vec<u8>| {
        let (mut t, c, x) = bs_ready(s, flags, 4096, 8192);
        (t.feed(&chunk_for(x, c.0)), c)
    };
    let (r, c) = fail(SR, CmdFlags::empty(), &|x, c| {
        bs(x, true, c, 1, false, &[(0, 0)])
    });
    assert_eq!(r, Err(Misbehavior::ZeroLengthExtent(c).into()));
    let (r, c) = fail(SR, CmdFlags::empty(), &|x, c| {
        bs(x, true, c, 1, false, &[(8192, 0), (1, 0)])
    });
    assert_eq!(
        r,
        Err(Misbehavior::ExtentsOutOfRange(c).into()),
        "N-1 lengths must stay inside"
    );
    let (r, _) = fail(SR, CmdFlags::empty(), &|x, c| {
        bs(x, true, c, 1, false, &[(8191, 0), (100_000, 0)])
    });
    assert_eq!(r, Ok(()), "the last descriptor may run past the request");
    let (r, c) = fail(SR, CmdFlags::REQ_ONE, &|x, c| {
        bs(x, true, c, 1, false, &[(512, 0), (512, 0)])
    });
    assert_eq!(r, Err(Misbehavior::ReqOneViolated(c).into()));
    let (r, c) = fail(SR, CmdFlags::REQ_ONE, &|x, c| {
        bs(x, true, c, 1, false, &[(8193, 0)])
    });
    assert_eq!(r, Err(Misbehavior::ExtentsOutOfRange(c).into()));
    let (r, c) = fail(SR, CmdFlags::empty(), &|x, c| {
        bs(x, true, c, 5, false, &[(512, 0)])
    });
    assert_eq!(
        r,
        Err(Misbehavior::UnknownContext { cookie: c, id: 5 }.into())
    );
    let (r, c) = fail(SR, CmdFlags::empty(), &|x, c| {
        let mut v = bs(x, false, c, 1, false, &[(512, 0)]);
        v.extend(bs(x, true, c, 1, false, &[(512, 0)]));
        v
    });
    assert_eq!(
        r,
        Err(Misbehavior::DuplicateContextChunk { cookie: c, id: 1 }.into())
    );
    let (r, c) = fail(EH, CmdFlags::empty(), &|x, c| {
        let mut v = bs(x, false, c, 2, true, &[(512, 0)]);
        v.extend(none(x, c));
        v
    });
    assert_eq!(r, Err(Misbehavior::MissingContextChunk(c).into()));
    let (r, c) = fail(SR, CmdFlags::empty(), &|x, c| {
        bs(x, true, c, 1, true, &[(512, 0)])
    });
    assert_eq!(
        r,
        Err(Misbehavior::WideExtentsWithoutExtendedHeaders(c).into())
    );
    // An error reply needs no context chunk.
    let (r, _) = fail(EH, CmdFlags::empty(), &|x, c| {
        err_chunk(x, true, c, 22, "no", None)
    });
    assert_eq!(r, Ok(()));
    // A simple success reply to block status lacks the chunks.
    let (r, c) = fail(SR, CmdFlags::empty(), &|_, c| simple(c, None));
    assert_eq!(r, Err(Misbehavior::MissingContextChunk(c).into()));
}

#[test]
fn huge_block_status_chunks_stream_in_batches() {
    let (mut t, c, x) = bs_ready(SR, CmdFlags::empty(), 0, SIZE);
    let n = 1300u64;
    let extents: Vec<(u64, u64)> = (0..n).map(|i| (512, i % 2)).collect();
    let bytes = bs(x, true, c.0, 1, false, &extents);
    // First batch: header, context ID and 512 descriptors, known from the header alone.
    t.feed(&bytes[..3]).unwrap();
    assert_eq!(
        t.c.wants(),
        Want::Bytes(16),
        "a simple reply is the shortest frame"
    );
    t.feed(&bytes[3..19]).unwrap();
    assert_eq!(t.c.wants(), Want::Bytes(20), "the magic says structured");
    t.feed(&bytes[19..20]).unwrap();
    assert_eq!(t.c.wants(), Want::Bytes(20 + 4 + 4096));
    t.feed(&bytes[20..]).unwrap();
    let events = t.take_events();
    assert_eq!(events.len(), 4);
    assert!(events[0].contains("offset: 0,"));
    assert!(events[1].contains(&format!("offset: {},", 512 * 512)));
    assert!(events[2].contains(&format!("offset: {},", 1024 * 512)));
    assert_eq!(events[3], done(c.0, Ok(())));
}

// ======================= end of file and abandonment =======================

#[test]
fn eof_abandons_every_command_exactly_once() {
    let mut t = ready::<8>(SR);
    let a = t.c.read(0, 8, CmdFlags::empty()).unwrap();
    let b = t.c.flush(CmdFlags::empty()).unwrap();
    let c = t.c.write(0, 8, CmdFlags::empty()).unwrap();
    t.out();
    t.feed(&none(None, b.0)).unwrap();
    assert_eq!(t.c.poll_event(), None, "nothing to abandon while alive");
    assert_eq!(t.c.handle_eof(), Err(Error::UnexpectedEof));
    assert_eq!(
        t.abandoned(),
        [
            ev(Event::Abandoned { cookie: a }),
            ev(Event::Abandoned { cookie: c })
        ]
    );
    assert_eq!(t.c.poll_event(), None);
    assert_eq!(t.c.handle_eof(), Err(Error::UnexpectedEof));
}

#[test]
fn fatal_errors_abandon_in_flight_commands_and_keep_owed_completions() {
    let mut t = ready::<8>(SR);
    let a = t.c.read(0, 8, CmdFlags::empty()).unwrap();
    let f = t.c.flush(CmdFlags::empty()).unwrap();
    t.out();
    // An error chunk with DONE: its Done is owed when the next frame breaks everything.
    let mut input = err_chunk(None, true, f.0, 5, "", None);
    input.extend(none(None, 99));
    let h = t.c.handle_input(&input).unwrap();
    assert!(h.event.is_some());
    let rest = &input[h.consumed..];
    // The owed Done comes first, without input...
    assert_eq!(t.c.wants(), Want::Bytes(0));
    let h2 = t.c.handle_input(rest).unwrap();
    assert_eq!(h2.consumed, 0);
    assert_eq!(h2.event.map(ev), Some(done(f.0, Err(Errno::Io))));
    assert_eq!(
        t.c.handle_input(rest).unwrap_err(),
        Misbehavior::UnknownCookie(Cookie(99)).into()
    );
    assert_eq!(t.abandoned(), [ev(Event::Abandoned { cookie: a })]);
}

#[test]
fn clean_end_of_file() {
    let mut t = ready::<8>(PLAIN);
    assert_eq!(t.c.handle_eof(), Ok(()));
    assert_eq!(t.c.state(), State::Closed);
    assert_eq!(t.c.read(0, 1, CmdFlags::empty()), Err(Error::Closed));
    // After NBD_CMD_DISC, once the replies are in.
    let mut t = ready::<8>(EH);
    let w = t.c.write(0, 4, CmdFlags::empty()).unwrap();
    t.c.disconnect().unwrap();
    assert_eq!(
        t.c.read(0, 1, CmdFlags::empty()),
        Err(Misuse::WrongState.into())
    );
    let reqs = requests(&t.out());
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].command, Command::Disc);
    assert_eq!((reqs[1].offset, reqs[1].len), (0, 0));
    assert!(t.out().is_empty());
    t.feed(&none(Some(0), w.0)).unwrap();
    assert_eq!(t.c.handle_eof(), Ok(()));
    assert!(t.abandoned().is_empty());
}

#[test]
fn eof_mid_payload_is_unexpected() {
    let mut t = ready::<8>(PLAIN);
    let c = t.c.read(0, 8, CmdFlags::empty()).unwrap();
    t.out();
    let mut input = simple(c.0, None);
    input.extend_from_slice(b"abc");
    t.feed(&input).unwrap();
    assert_eq!(t.c.handle_eof(), Err(Error::UnexpectedEof));
    assert_eq!(t.abandoned(), [ev(Event::Abandoned { cookie: c })]);
}

#[test]
fn client_size_is_bounded() {
    // The whole machine, 64 commands in flight included, is a fixed-size value (plus the
    // injection buffer of adversarial mode, which tests enable).
    #[cfg(feature = "adversarial")]
    let adversarial = size_of::<adversary::Adversary>();
    #[cfg(not(feature = "adversarial"))]
    let adversarial = 0;
    let size = size_of::<Client<64>>() - adversarial;
    assert!(size < 24 * 1024, "Client<64> is {size} bytes");
}

// ======================= chunking invariance =======================

/// A long session: negotiation with every kind of option reply, then a mix of replies.
fn script() -> (Vec<u8>, Vec<(u64, u32)>) {
    let mut s = greeting(FIXED_NZ);
    s.extend(ack(OptCode::ExtendedHeaders));
    s.extend(meta(OptCode::SetMetaContext, 0, "base:allocation"));
    s.extend(meta(OptCode::SetMetaContext, 2, "qemu:dirty-bitmap:b"));
    s.extend(ack(OptCode::SetMetaContext));
    s.extend(info_export(OptCode::Go, SIZE, RW | 0x1000));
    s.extend(rep(
        OptCode::Go,
        OptReply::Info(Info::Description("a disk")),
    ));
    s.extend(ack(OptCode::Go));
    // Replies to: read 1 (0, 4096), write 2, block status 3 (0, SIZE), read 4 (8192, 100).
    s.extend(data(Some(8192), false, 4, 8192, &[4; 60]));
    s.extend(hole(Some(0), false, 1, 2048, 2048));
    let many: Vec<(u64, u64)> = (0..600).map(|i| (1024, i % 3)).collect();
    s.extend(bs(Some(0), false, 3, 2, true, &many));
    s.extend(data(Some(0), false, 1, 0, &[1; 2048]));
    s.extend(none(Some(0), 2));
    s.extend(data(Some(8192), false, 4, 8252, &[5; 40]));
    s.extend(bs(Some(0), true, 3, 0, true, &[(SIZE, 0)]));
    // proto.md: content and an error at the same offset come content first.
    s.extend(err_chunk(Some(8192), true, 4, 5, "bad sector", Some(8252)));
    s.extend(none(Some(0), 1));
    (s, vec![(0, 4096), (8192, 100)])
}

fn run_split(splits: &[usize]) -> Result<(Vec<String>, Vec<u8>), Error> {
    let (s, _) = script();
    let q = ["base:allocation", "qemu:dirty-bitmap:b"];
    let mut t = T::<8>::new(ClientConfig {
        meta_contexts: &q,
        ..ClientConfig::default()
    });
    t.on_ready = Some(|c| {
        c.read(0, 4096, CmdFlags::empty()).unwrap();
        c.write(0, 4096, CmdFlags::empty()).unwrap();
        c.block_status(0, SIZE, CmdFlags::empty()).unwrap();
        c.read(8192, 100, CmdFlags::empty()).unwrap();
    });
    let mut at = 0;
    let mut cuts: Vec<usize> = splits.iter().map(|x| x % (s.len() + 1)).collect();
    cuts.push(s.len());
    cuts.sort_unstable();
    for cut in cuts {
        if cut < at {
            continue;
        }
        t.feed(&s[at..cut])?;
        at = cut;
    }
    assert_eq!(t.c.in_flight_len(), 0);
    Ok((t.events, t.payload))
}

#[test]
fn script_runs_whole() {
    let (events, payload) = run_split(&[]).unwrap();
    assert_eq!(payload.len(), 2048 + 100);
    assert!(events.contains(&done(4, Err(Errno::Io))));
    assert!(events.contains(&done(1, Ok(()))));
    assert!(events.contains(&done(3, Ok(()))));
    // 600 wide descriptors come in batches of 256, 256 and 88; the other context in one.
    assert_eq!(
        events.iter().filter(|e| e.contains("BlockStatus")).count(),
        4
    );
}

proptest! {
    #[test]
    fn any_split_of_the_input_gives_the_same_events(splits in proptest::collection::vec(any::<usize>(), 0..40)) {
        let whole = run_split(&[]).unwrap();
        prop_assert_eq!(run_split(&splits).unwrap(), whole);
    }

    #[test]
    fn arbitrary_server_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400), manual in any::<bool>()) {
        let mut t = T::<4>::new(ClientConfig { manual, ..ClientConfig::default() });
        let mut input = greeting(FIXED_NZ);
        input.extend_from_slice(&bytes);
        if t.feed(&input).is_err() {
            prop_assert_eq!(t.c.state(), State::Dead);
            prop_assert!(t.c.handle_input(&[]).is_err());
        }
    }

    #[test]
    fn arbitrary_replies_in_transmission_never_panic(bytes in wire::strategies::chunk_bytes(), eh in any::<bool>()) {
        let mut t = ready::<8>(if eh { EH } else { SR });
        for _ in 0..3 {
            let _ = t.c.read(0, 4096, CmdFlags::empty());
        }
        let _ = t.c.block_status(0, 4096, CmdFlags::empty());
        t.out();
        if t.feed(&bytes).is_err() {
            prop_assert_eq!(t.c.state(), State::Dead);
            let abandoned = t.abandoned();
            prop_assert_eq!(abandoned.len() + t.events.iter().filter(|e| e.starts_with("Done")).count(), 4);
        }
    }
}

// ======================= random operations (a fuzzer in miniature) =======================

#[derive(Debug, Clone)]
enum Op {
    Read(u16, u16, bool),
    Write(u16, u16),
    BlockStatus(u16, u16, bool),
    Flush,
    /// A reply to the in-flight command picked by the index (or a stray cookie).
    Reply {
        pick: u8,
        kind: u8,
        delta: i16,
        len: u16,
        done: bool,
    },
    Raw(Vec<u8>),
    Eof,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (any::<u16>(), any::<u16>(), any::<bool>()).prop_map(|(o, l, df)| Op::Read(o, l, df)),
        (any::<u16>(), any::<u16>()).prop_map(|(o, l)| Op::Write(o, l)),
        (any::<u16>(), any::<u16>(), any::<bool>()).prop_map(|(o, l, r)| Op::BlockStatus(o, l, r)),
        Just(Op::Flush),
        (any::<u8>(), 0u8..9, -64i16..64, any::<u16>(), any::<bool>()).prop_map(
            |(pick, kind, delta, len, done)| Op::Reply {
                pick,
                kind,
                delta,
                len,
                done
            }
        ),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Op::Raw),
        Just(Op::Eof),
    ]
}

fn run_ops(setup: Setup, ops: &[Op]) {
    let mut t = ready::<8>(setup);
    let x = |o: u64| setup.eh.then_some(o);
    let mut issued: Vec<(Cookie, u64, u64)> = Vec::new();
    let mut failed = false;
    for op in ops {
        let r = match op {
            Op::Read(o, l, df) => {
                let flags = if *df { CmdFlags::DF } else { CmdFlags::empty() };
                t.c.read(u64::from(*o), u32::from(*l), flags)
                    .map(|c| issued.push((c, u64::from(*o), u64::from(*l))))
            }
            Op::Write(o, l) => {
                t.c.write(u64::from(*o), u32::from(*l), CmdFlags::empty())
                    .map(|c| issued.push((c, u64::from(*o), u64::from(*l))))
            }
            Op::BlockStatus(o, l, one) => {
                let flags = if *one {
                    CmdFlags::REQ_ONE
                } else {
                    CmdFlags::empty()
                };
                t.c.block_status(u64::from(*o), u64::from(*l), flags)
                    .map(|c| issued.push((c, u64::from(*o), u64::from(*l))))
            }
            Op::Flush => t.c.flush(CmdFlags::empty()).map(|c| issued.push((c, 0, 0))),
            Op::Reply {
                pick,
                kind,
                delta,
                len,
                done,
            } => {
                t.out();
                let (cookie, off, rlen) = issued
                    .get(usize::from(*pick) % (issued.len() + 1))
                    .copied()
                    .unwrap_or((Cookie(u64::from(*pick)), 0, 0));
                let at = off.saturating_add_signed(i64::from(*delta));
                let n = u32::from(*len) % (rlen as u32 + 2);
                let c = cookie.0;
                let bytes = match kind {
                    0 => none(x(off), c),
                    1 => data(x(off), *done, c, at, &vec![7; n as usize]),
                    2 => hole(x(off), *done, c, at, n),
                    3 => err_chunk(x(off), *done, c, u32::from(*len) % 3, "e", None),
                    4 => err_chunk(x(off), *done, c, 5, "", Some(at)),
                    5 => {
                        let id = setup.contexts.first().copied().unwrap_or(1);
                        bs(x(off), *done, c, id, setup.eh, &[(u64::from(n), 0)])
                    }
                    6 => simple(c, None),
                    7 => simple(c, Some(Errno::Io)),
                    _ => chunk(
                        x(off),
                        *done,
                        ChunkType::Unknown(0x8000 | *len),
                        c,
                        &[0, 0, 0, 1, 0, 0],
                    ),
                };
                t.feed(&bytes).map(|_| ())
            }
            Op::Raw(bytes) => {
                t.out();
                t.feed(bytes).map(|_| ())
            }
            Op::Eof => t.c.handle_eof(),
        };
        match r {
            Err(e) if e.is_fatal() || e == Error::Closed => {
                failed = true;
                break;
            }
            _ => {}
        }
        if t.c.state() == State::Closed {
            break;
        }
    }
    if !failed && t.c.state() != State::Closed {
        let _ = t.c.handle_eof();
    }
    let dones = t.events.iter().filter(|e| e.starts_with("Done")).count();
    let abandoned = t.abandoned().len();
    assert_eq!(t.c.in_flight_len(), 0);
    assert_eq!(
        dones + abandoned,
        issued.len(),
        "every command ends exactly once"
    );
}

proptest! {
    #[test]
    fn random_operations_keep_the_books(ops in proptest::collection::vec(op(), 0..30), which in 0u8..3) {
        let setup = match which {
            0 => Setup { contexts: &[1], ..SR },
            1 => EH,
            // No contexts without structured replies: block status is refused locally.
            _ => PLAIN,
        };
        run_ops(setup, &ops);
    }
}

/// The option the client last put on the wire, if any.
fn last_opt(bytes: &[u8]) -> Option<OptCode> {
    let mut last = None;
    let mut rest = bytes;
    while !rest.is_empty() {
        let (opt, n) = Opt::parse_message(rest).ok()?;
        last = Some(opt.code());
        rest = &rest[n..];
    }
    last
}

proptest! {
    #[test]
    fn random_negotiations_never_panic(
        replies in proptest::collection::vec((0u8..30, 0u8..20, 1u32..12, any::<u8>()), 0..20),
        policy in 0u8..3,
        manual in any::<bool>(),
        flags in 0u16..4,
    ) {
        let tls = [TlsPolicy::Off, TlsPolicy::Optional, TlsPolicy::Required][usize::from(policy)];
        let q = ["base:allocation"];
        let mut t = T::<4>::new(ClientConfig { tls, manual, meta_contexts: &q, ..ClientConfig::default() });
        if t.feed(&greeting(flags)).is_err() {
            prop_assert_eq!(t.c.state(), State::Dead);
            return Ok(());
        }
        let mut pending = last_opt(t.out().get(4..).unwrap_or(&[]));
        for (right_opt, kind, err, byte) in replies {
            if manual && pending.is_none() {
                let _ = match byte % 6 {
                    0 => t.c.opt_list(),
                    1 => t.c.opt_go(""),
                    2 => t.c.opt_structured_reply(),
                    3 => t.c.opt_set_meta_context("", &["base:allocation"]),
                    4 => t.c.opt_starttls(),
                    _ => t.c.opt_info("x"),
                };
                pending = last_opt(&t.out());
            }
            let opt = match pending {
                Some(o) if right_opt > 0 => o,
                // Nothing pending: only now and then does the server speak out of turn.
                None if right_opt > 1 => continue,
                _ => OptCode::from(u32::from(byte % 12)),
            };
            // Mostly well-formed answers to the pending option, so that runs go deep.
            let describes = matches!(opt, OptCode::Go | OptCode::Info);
            let lists = matches!(opt, OptCode::SetMetaContext | OptCode::ListMetaContext);
            let bytes = match kind {
                0..=5 if describes => info_export(opt, u64::from(byte), 1),
                0..=3 if lists => meta(opt, u32::from(byte), "base:allocation"),
                0..=9 => ack(opt),
                10..=13 => refuse(opt, OptError::from(0x8000_0000 | err), "no"),
                14 => info_export(opt, u64::from(byte), 1),
                15 => meta(opt, u32::from(byte), "base:allocation"),
                16 => rep(opt, OptReply::Server { name: "e", description: "" }),
                17 => rep(opt, OptReply::Info(Info::BlockSize(BlockSize { min: 1 << (byte % 18), preferred: 4096, max_payload: 1 << 20 }))),
                18 => vec![0; 10],
                _ => ack(OptCode::StartTls),
            };
            let r = t.feed(&bytes);
            if let Err(e) = r {
                if e.is_fatal() {
                    prop_assert_eq!(t.c.state(), State::Dead);
                    prop_assert!(t.c.handle_input(&[]).is_err());
                    return Ok(());
                }
            }
            match t.c.state() {
                State::StartTls => t.c.tls_established().unwrap(),
                State::Ready => {
                    prop_assert!(t.c.size().is_some());
                    return Ok(());
                }
                State::Closed => return Ok(()),
                _ => {}
            }
            if let Some(o) = last_opt(&t.out()) {
                pending = Some(o);
            }
            if t.c.wants() == Want::Nothing {
                pending = None;
            }
        }
    }
}
