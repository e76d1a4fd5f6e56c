//! Scenario tests: scripted client bytes in, decoded server bytes out.

use std::vec::Vec;

use super::*;
use crate::wire::chunk::ChunkPayload;
use crate::wire::{ExportRequest, MetaContextRequest, ReplyHeader};

type S = Server<8, 16384>;

/// What the server sent, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Out {
    Bytes(Vec<u8>),
    Payload(Cookie, u64, usize),
    Zeroes(Cookie, u64, usize),
}

fn drain(s: &mut S) -> Vec<Out> {
    let mut v: Vec<Out> = Vec::new();
    let mut buf = [0u8; 700];
    while let Some(t) = s.poll_transmit(&mut buf).unwrap() {
        match t {
            Transmit::Bytes(n) => match v.last_mut() {
                Some(Out::Bytes(b)) => b.extend_from_slice(&buf[..n]),
                _ => v.push(Out::Bytes(buf[..n].to_vec())),
            },
            Transmit::Payload {
                cookie,
                offset,
                len,
            } => v.push(Out::Payload(cookie, offset, len)),
            Transmit::Zeroes {
                cookie,
                offset,
                len,
            } => v.push(Out::Zeroes(cookie, offset, len)),
        }
    }
    v
}

fn bytes(s: &mut S) -> Vec<u8> {
    match drain(s).as_slice() {
        [] => Vec::new(),
        [Out::Bytes(b)] => b.clone(),
        other => panic!("expected only bytes, got {other:?}"),
    }
}

fn opt(o: &Opt<'_>) -> Vec<u8> {
    let mut b = vec![0; o.buffer_len()];
    o.emit(&mut b).unwrap();
    b
}

/// Decodes a run of option replies.
fn opt_replies(mut b: &[u8]) -> Vec<(OptCode, OptReply<'_>)> {
    let mut v = Vec::new();
    while !b.is_empty() {
        let (code, reply, n) = OptReply::parse_message(b).unwrap();
        v.push((code, reply));
        b = &b[n..];
    }
    v
}

fn feed<'i>(s: &mut S, input: &'i [u8]) -> Option<ServerEvent<'i>> {
    let h = s.handle_input(input).unwrap();
    assert_eq!(h.consumed, input.len(), "whole message consumed");
    h.event
}

/// A server past the greeting and client flags.
fn negotiating(config: ServerConfig) -> S {
    let mut s = S::new(config);
    let greeting = bytes(&mut s);
    assert_eq!(
        Greeting::parse(&greeting).unwrap().flags,
        HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES
    );
    assert_eq!(feed(&mut s, &[0, 0, 0, 3]), None);
    assert_eq!(s.state(), State::Negotiating);
    s
}

const FLAGS: TransmissionFlags = TransmissionFlags::from_bits(
    TransmissionFlags::SEND_FLUSH.bits()
        | TransmissionFlags::SEND_FUA.bits()
        | TransmissionFlags::SEND_TRIM.bits()
        | TransmissionFlags::SEND_WRITE_ZEROES.bits()
        | TransmissionFlags::SEND_DF.bits()
        | TransmissionFlags::SEND_CACHE.bits()
        | TransmissionFlags::BLOCK_STATUS_PAYLOAD.bits(),
);

/// A server in transmission, after the given options and a GO for "disk" (1 MiB).
fn serving(options: &[Opt<'_>], info: ExportInfo<'_>) -> S {
    let mut s = negotiating(ServerConfig::default());
    negotiate(&mut s, options);
    go_disk(&mut s, info);
    s
}

/// Sends `options`, each of which must end in an ACK; meta-context queries are answered
/// from `base:allocation` (ID 0) and `qemu:dirty-bitmap:bm0` (ID 7).
fn negotiate(s: &mut S, options: &[Opt<'_>]) {
    for o in options {
        let b = opt(o);
        match feed(s, &b) {
            None => {}
            Some(ServerEvent::MetaContexts(q)) => {
                for name in q.matching(&["base:allocation", "qemu:dirty-bitmap:bm0"]) {
                    let id = if name == "base:allocation" { 0 } else { 7 };
                    s.answer_meta_context(id, name).unwrap();
                }
                s.answer_ack().unwrap();
            }
            Some(e) => panic!("{e:?}"),
        }
        let replies = bytes(s);
        assert!(
            matches!(opt_replies(&replies).last(), Some((_, OptReply::Ack))),
            "{o:?}"
        );
    }
}

/// Sends a GO for "disk", answers it with `info`, and checks transmission started.
fn go_disk(s: &mut S, info: ExportInfo<'_>) {
    let go = opt(&Opt::Go(ExportRequest {
        name: "disk",
        infos: InfoList::new(&[InfoType::BlockSize]),
    }));
    let Some(ServerEvent::Export(q)) = feed(s, &go) else {
        panic!()
    };
    assert_eq!((q.kind, q.name), (ExportQueryKind::Go, "disk"));
    s.answer_export(&info).unwrap();
    let replies = bytes(s);
    assert!(matches!(
        opt_replies(&replies).last(),
        Some((OptCode::Go, OptReply::Ack))
    ));
    assert_eq!(s.state(), State::Transmission);
}

fn disk() -> ExportInfo<'static> {
    ExportInfo::new(1 << 20, FLAGS)
}

fn request(
    s: &S,
    command: Command,
    flags: CmdFlags,
    cookie: u64,
    offset: u64,
    len: u64,
) -> Vec<u8> {
    let extended = s.reply_form() == ReplyForm::Extended;
    let mut flags = flags;
    if extended && command == Command::Write {
        flags |= CmdFlags::PAYLOAD_LEN;
    }
    let r = Request {
        flags,
        command,
        cookie: Cookie(cookie),
        offset,
        len,
        extended,
    };
    let mut b = vec![0; r.buffer_len()];
    r.emit(&mut b).unwrap();
    b
}

/// Sends a request the server must refuse itself; returns the errno it sent.
fn refused(s: &mut S, command: Command, flags: CmdFlags, offset: u64, len: u64) -> Errno {
    let b = request(s, command, flags, 99, offset, len);
    let h = s.handle_input(&b).unwrap();
    assert_eq!(h.consumed, b.len());
    assert!(h.event.is_none(), "{:?}", h.event);
    if let Want::Discard { len: n } = s.wants() {
        assert_eq!(drain(s), [], "refused before the payload was discarded");
        s.handle_payload(n).unwrap();
    }
    let out = bytes(s);
    reply_errno(&out)
}

fn reply_errno(out: &[u8]) -> Errno {
    match ReplyHeader::parse(out).unwrap() {
        ReplyHeader::Simple(r) => r.error.expect("an error"),
        ReplyHeader::Chunk(c) => {
            let (_, p, _) = ChunkPayload::parse_message(out).unwrap();
            assert!(c.is_done());
            let ChunkPayload::Error(e) = p else {
                panic!("{p:?}")
            };
            e.error
        }
    }
}

/// A simple reply as raw bytes: magic, error, cookie.
fn simple_reply(error: u32, cookie: u64) -> Vec<u8> {
    let mut b = vec![0x67, 0x44, 0x66, 0x98];
    b.extend(error.to_be_bytes());
    b.extend(cookie.to_be_bytes());
    b
}

#[test]
fn greeting_and_client_flags() {
    let mut s = S::new(ServerConfig {
        no_zeroes: false,
        ..ServerConfig::default()
    });
    assert_eq!(
        bytes(&mut s),
        [
            b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', b'I', b'H', b'A', b'V', b'E', b'O',
            b'P', b'T', 0, 1
        ]
    );
    assert_eq!(s.wants(), Want::Bytes(4));
    // proto.md: NO_ZEROES not offered, so C_NO_ZEROES is a flag the server MUST refuse.
    assert_eq!(
        s.handle_input(&[0, 0, 0, 3]).unwrap_err(),
        Error::PeerMisbehaved(Misbehavior::BadClientFlags(3))
    );
    assert_eq!(s.state(), State::Dead);
    assert!(s.handle_input(&[]).is_err());
}

#[test]
fn unknown_client_flags_end_the_session() {
    let mut s = S::new(ServerConfig::default());
    let _ = bytes(&mut s);
    assert!(matches!(
        s.handle_input(&[0, 0, 0, 4]),
        Err(Error::PeerMisbehaved(Misbehavior::BadClientFlags(4)))
    ));
}

#[test]
fn unknown_option_then_next_option() {
    let mut s = negotiating(ServerConfig::default());
    let mut two = opt(&Opt::Unknown {
        code: 99,
        data: b"abc",
    });
    two.extend(opt(&Opt::StructuredReply));
    let h = s.handle_input(&two).unwrap();
    assert_eq!((h.consumed, h.event), (19, None));
    let r = bytes(&mut s);
    assert!(matches!(
        opt_replies(&r)[..],
        [(
            OptCode::Unknown(99),
            OptReply::Error {
                error: OptError::Unsup,
                ..
            }
        )]
    ));
    assert_eq!(feed(&mut s, &two[19..]), None);
    assert_eq!(
        opt_replies(&bytes(&mut s)),
        [(OptCode::StructuredReply, OptReply::Ack)]
    );
}

#[test]
fn partial_options_report_what_they_need() {
    let mut s = negotiating(ServerConfig::default());
    let go = opt(&Opt::Go(ExportRequest {
        name: "disk",
        infos: InfoList::new(&[]),
    }));
    for k in 0..go.len() {
        let h = s.handle_input(&go[..k]).unwrap();
        assert_eq!((h.consumed, h.event.is_none()), (0, true));
        let want = if k < 16 { 16 } else { go.len() };
        assert_eq!(s.wants(), Want::Bytes(want), "{k}");
    }
    assert!(matches!(feed(&mut s, &go), Some(ServerEvent::Export(_))));
    // An answer is owed: more input is misuse.
    assert_eq!(
        s.handle_input(&go).unwrap_err(),
        Error::Misuse(Misuse::WrongState)
    );
    assert_eq!(s.wants(), Want::Nothing);
}

#[test]
fn list_exports() {
    let mut s = negotiating(ServerConfig::default());
    assert_eq!(feed(&mut s, &opt(&Opt::List)), Some(ServerEvent::List));
    s.answer_list_entry("disk", "a disk").unwrap();
    s.answer_list_entry("", "").unwrap();
    s.answer_ack().unwrap();
    let r = bytes(&mut s);
    assert_eq!(
        opt_replies(&r),
        [
            (
                OptCode::List,
                OptReply::Server {
                    name: "disk",
                    description: "a disk"
                }
            ),
            (
                OptCode::List,
                OptReply::Server {
                    name: "",
                    description: ""
                }
            ),
            (OptCode::List, OptReply::Ack),
        ]
    );
    // LIST with data is invalid (proto.md: the client MUST NOT send data).
    let mut bad = opt(&Opt::List);
    bad[15] = 1;
    bad.push(0);
    assert_eq!(feed(&mut s, &bad), None);
    assert!(matches!(
        opt_replies(&bytes(&mut s))[..],
        [(
            OptCode::List,
            OptReply::Error {
                error: OptError::Invalid,
                ..
            }
        )]
    ));
}

#[test]
fn go_with_extended_headers_and_contexts() {
    let s = serving(
        &[
            Opt::ExtendedHeaders,
            Opt::SetMetaContext(MetaContextRequest {
                export: "disk",
                queries: Queries::new(&["base:allocation"]),
            }),
        ],
        disk().with_block_size(BlockSize {
            min: 512,
            preferred: 4096,
            max_payload: 1 << 20,
        }),
    );
    assert_eq!(s.reply_form(), ReplyForm::Extended);
    assert_eq!(s.contexts(), [0]);
    let f = s.transmission_flags();
    assert!(f.contains(
        TransmissionFlags::HAS_FLAGS
            | TransmissionFlags::BLOCK_STATUS_PAYLOAD
            | TransmissionFlags::SEND_DF
    ));
}

#[test]
fn go_replies_in_detail() {
    let mut s = negotiating(ServerConfig::default());
    let go = opt(&Opt::Go(ExportRequest {
        name: "disk",
        infos: InfoList::new(&[InfoType::Name, InfoType::Description, InfoType::BlockSize]),
    }));
    let Some(ServerEvent::Export(q)) = feed(&mut s, &go) else {
        panic!()
    };
    assert!(q.infos.contains(InfoType::Description));
    let bs = BlockSize {
        min: 1,
        preferred: 4096,
        max_payload: 1 << 25,
    };
    s.answer_export(
        &disk()
            .with_name("disk")
            .with_description("test disk")
            .with_block_size(bs),
    )
    .unwrap();
    let r = bytes(&mut s);
    let flags = FLAGS
        .difference(TransmissionFlags::SEND_DF | TransmissionFlags::BLOCK_STATUS_PAYLOAD)
        | TransmissionFlags::HAS_FLAGS;
    assert_eq!(
        opt_replies(&r),
        [
            (
                OptCode::Go,
                OptReply::Info(Info::Export {
                    size: 1 << 20,
                    flags
                })
            ),
            (OptCode::Go, OptReply::Info(Info::Name("disk"))),
            (OptCode::Go, OptReply::Info(Info::Description("test disk"))),
            (OptCode::Go, OptReply::Info(Info::BlockSize(bs))),
            (OptCode::Go, OptReply::Ack),
        ]
    );
    assert_eq!(s.state(), State::Transmission);
    assert_eq!(s.wants(), Want::Bytes(28));
}

#[test]
fn info_then_unknown_export() {
    let mut s = negotiating(ServerConfig::default());
    let info = opt(&Opt::Info(ExportRequest {
        name: "nope",
        infos: InfoList::new(&[]),
    }));
    assert!(matches!(
        feed(&mut s, &info),
        Some(ServerEvent::Export(ExportQuery {
            kind: ExportQueryKind::Info,
            ..
        }))
    ));
    s.answer_error(OptError::UnknownExport, "no such export")
        .unwrap();
    assert!(matches!(
        opt_replies(&bytes(&mut s))[..],
        [(
            OptCode::Info,
            OptReply::Error {
                error: OptError::UnknownExport,
                message: "no such export"
            }
        )]
    ));
    assert_eq!(s.state(), State::Negotiating);
}

#[test]
fn export_name_with_and_without_zeroes() {
    for (client_flags, len) in [([0, 0, 0, 1], 134), ([0, 0, 0, 3], 10)] {
        let mut s = S::new(ServerConfig::default());
        let _ = bytes(&mut s);
        assert_eq!(feed(&mut s, &client_flags), None);
        let b = opt(&Opt::ExportName { name: "x" });
        let Some(ServerEvent::Export(q)) = feed(&mut s, &b) else {
            panic!()
        };
        assert_eq!(q.kind, ExportQueryKind::ExportName);
        s.answer_export(&disk()).unwrap();
        let r = bytes(&mut s);
        assert_eq!(r.len(), len);
        let reply = ExportNameReply::parse(&r, len == 134).unwrap();
        assert_eq!(reply.size, 1 << 20);
        assert_eq!(s.state(), State::Transmission);
    }
    // Refusing EXPORT_NAME can only close the connection.
    let mut s = negotiating(ServerConfig::default());
    assert!(feed(&mut s, &opt(&Opt::ExportName { name: "x" })).is_some());
    s.answer_error(OptError::UnknownExport, "").unwrap();
    assert_eq!(bytes(&mut s), b"");
    assert_eq!(s.state(), State::Closed);
    assert!(s.is_finished());
}

#[test]
fn block_size_required() {
    let mut s = negotiating(ServerConfig::default());
    let go = opt(&Opt::Go(ExportRequest {
        name: "",
        infos: InfoList::new(&[]),
    }));
    assert!(feed(&mut s, &go).is_some());
    let bs = BlockSize {
        min: 4096,
        preferred: 4096,
        max_payload: 1 << 20,
    };
    let mut info = disk().with_block_size(bs);
    info.require_block_size = true;
    s.answer_export(&info).unwrap();
    let r = bytes(&mut s);
    assert!(matches!(
        opt_replies(&r)[..],
        [
            (OptCode::Go, OptReply::Info(Info::BlockSize(_))),
            (
                OptCode::Go,
                OptReply::Error {
                    error: OptError::BlockSizeReqd,
                    ..
                }
            )
        ]
    ));
    assert_eq!(s.state(), State::Negotiating);
    let go = opt(&Opt::Go(ExportRequest {
        name: "",
        infos: InfoList::new(&[InfoType::BlockSize]),
    }));
    assert!(feed(&mut s, &go).is_some());
    s.answer_export(&info).unwrap();
    assert!(matches!(
        opt_replies(&bytes(&mut s)).last(),
        Some((OptCode::Go, OptReply::Ack))
    ));
    assert_eq!(s.state(), State::Transmission);
}

#[test]
fn tls_required() {
    let mut s = negotiating(ServerConfig {
        tls: TlsPolicy::Required,
        ..ServerConfig::default()
    });
    assert_eq!(feed(&mut s, &opt(&Opt::List)), None);
    assert!(matches!(
        opt_replies(&bytes(&mut s))[..],
        [(
            OptCode::List,
            OptReply::Error {
                error: OptError::TlsReqd,
                ..
            }
        )]
    ));
    assert_eq!(feed(&mut s, &opt(&Opt::StructuredReply)), None);
    assert!(matches!(
        opt_replies(&bytes(&mut s))[..],
        [(
            _,
            OptReply::Error {
                error: OptError::TlsReqd,
                ..
            }
        )]
    ));
    assert_eq!(s.reply_form(), ReplyForm::Simple);
    assert_eq!(
        feed(&mut s, &opt(&Opt::StartTls)),
        Some(ServerEvent::StartTls)
    );
    assert_eq!(
        opt_replies(&bytes(&mut s)),
        [(OptCode::StartTls, OptReply::Ack)]
    );
    assert_eq!(s.state(), State::StartTls);
    assert_eq!(s.wants(), Want::Nothing);
    s.tls_established().unwrap();
    assert!(s.tls_active());
    // After TLS, options work; a second STARTTLS is invalid.
    assert_eq!(feed(&mut s, &opt(&Opt::StartTls)), None);
    assert!(matches!(
        opt_replies(&bytes(&mut s))[..],
        [(
            _,
            OptReply::Error {
                error: OptError::Invalid,
                ..
            }
        )]
    ));
    assert_eq!(feed(&mut s, &opt(&Opt::StructuredReply)), None);
    assert_eq!(
        opt_replies(&bytes(&mut s)),
        [(OptCode::StructuredReply, OptReply::Ack)]
    );
}

#[test]
fn tls_required_export_name_before_tls_closes() {
    let mut s = negotiating(ServerConfig {
        tls: TlsPolicy::Required,
        ..ServerConfig::default()
    });
    let e = s
        .handle_input(&opt(&Opt::ExportName { name: "" }))
        .unwrap_err();
    assert_eq!(e, Error::PeerIncompatible(Incompatible::TlsRequiredByUs));
}

#[test]
fn starttls_forgets_earlier_state_and_refuses_pipelined_bytes() {
    // The nbdkit CVE-2021-3716 class: negotiate structured replies in plaintext, then
    // STARTTLS with more plaintext behind it.
    let config = ServerConfig {
        tls: TlsPolicy::Optional,
        ..ServerConfig::default()
    };
    let mut s = negotiating(config);
    assert_eq!(feed(&mut s, &opt(&Opt::StructuredReply)), None);
    let _ = bytes(&mut s);
    let mut b = opt(&Opt::StartTls);
    b.extend(opt(&Opt::List));
    assert_eq!(
        s.handle_input(&b).unwrap_err(),
        Error::PeerMisbehaved(Misbehavior::DataAfterStartTls)
    );

    let mut s = negotiating(config);
    assert_eq!(feed(&mut s, &opt(&Opt::StructuredReply)), None);
    let _ = bytes(&mut s);
    assert_eq!(
        feed(&mut s, &opt(&Opt::StartTls)),
        Some(ServerEvent::StartTls)
    );
    assert_eq!(
        s.reply_form(),
        ReplyForm::Simple,
        "structured replies forgotten"
    );
    assert!(matches!(
        s.handle_input(b"x"),
        Err(Error::PeerMisbehaved(Misbehavior::DataAfterStartTls))
    ));
}

#[test]
fn tls_off_refuses_starttls() {
    let mut s = negotiating(ServerConfig::default());
    assert_eq!(feed(&mut s, &opt(&Opt::StartTls)), None);
    assert!(matches!(
        opt_replies(&bytes(&mut s))[..],
        [(
            OptCode::StartTls,
            OptReply::Error {
                error: OptError::Policy,
                ..
            }
        )]
    ));
}

#[test]
fn selective_tls_export() {
    let mut s = negotiating(ServerConfig {
        tls: TlsPolicy::Optional,
        ..ServerConfig::default()
    });
    let go = opt(&Opt::Go(ExportRequest {
        name: "secret",
        infos: InfoList::new(&[]),
    }));
    assert!(feed(&mut s, &go).is_some());
    let mut info = disk();
    info.tls_only = true;
    s.answer_export(&info).unwrap();
    assert!(matches!(
        opt_replies(&bytes(&mut s))[..],
        [(
            OptCode::Go,
            OptReply::Error {
                error: OptError::TlsReqd,
                ..
            }
        )]
    ));
    assert_eq!(s.state(), State::Negotiating);
}

/// A SELECTIVETLS server past the client flags.
fn selective_tls() -> S {
    negotiating(ServerConfig {
        tls: TlsPolicy::Optional,
        ..ServerConfig::default()
    })
}

/// STARTTLS, its ACK, and the switch to TLS.
fn switch_to_tls(s: &mut S) {
    assert_eq!(feed(s, &opt(&Opt::StartTls)), Some(ServerEvent::StartTls));
    assert_eq!(opt_replies(&bytes(s)), [(OptCode::StartTls, OptReply::Ack)]);
    s.tls_established().unwrap();
    assert_eq!(s.state(), State::Negotiating);
}

#[test]
fn starttls_forgets_extended_headers() {
    // proto.md: after STARTTLS the server MUST forget extended headers negotiated in
    // plaintext. A client that does not ask again sends compact requests and gets simple
    // replies.
    let mut s = selective_tls();
    negotiate(&mut s, &[Opt::ExtendedHeaders]);
    assert_eq!(s.reply_form(), ReplyForm::Extended);
    switch_to_tls(&mut s);
    go_disk(&mut s, disk());
    assert_eq!(s.reply_form(), ReplyForm::Simple);
    assert_eq!(s.wants(), Want::Bytes(Request::COMPACT_LEN));
    let r = request(&s, Command::Read, CmdFlags::empty(), 1, 0, 512);
    assert_eq!(r.len(), Request::COMPACT_LEN);
    assert!(feed(&mut s, &r).is_some());
    s.reply_read_data(Cookie(1), 0, 512).unwrap();
    assert_eq!(
        drain(&mut s),
        [
            Out::Bytes(simple_reply(0, 1)),
            Out::Payload(Cookie(1), 0, 512)
        ]
    );
    // An extended request is now the wrong form.
    let x = Request {
        flags: CmdFlags::empty(),
        command: Command::Read,
        cookie: Cookie(2),
        offset: 0,
        len: 512,
        extended: true,
    };
    let mut b = [0u8; Request::EXTENDED_LEN];
    x.emit(&mut b).unwrap();
    assert_eq!(
        s.handle_input(&b).unwrap_err(),
        Error::PeerMisbehaved(Misbehavior::WrongRequestForm)
    );
}

#[test]
fn starttls_forgets_selected_meta_contexts() {
    // proto.md: BLOCK_STATUS needs a SET_META_CONTEXT with no STARTTLS after it. Here the
    // client selects base:allocation in plaintext, upgrades, asks for structured replies
    // again but not for the context, and goes: block status has no context.
    let mut s = selective_tls();
    negotiate(
        &mut s,
        &[
            Opt::StructuredReply,
            Opt::SetMetaContext(MetaContextRequest {
                export: "disk",
                queries: Queries::new(&["base:allocation"]),
            }),
        ],
    );
    assert_eq!(s.contexts(), [0]);
    switch_to_tls(&mut s);
    assert_eq!(s.contexts(), []);
    negotiate(&mut s, &[Opt::StructuredReply]);
    go_disk(&mut s, disk());
    assert_eq!(s.reply_form(), ReplyForm::Structured);
    assert_eq!(s.contexts(), []);
    assert_eq!(
        refused(&mut s, Command::BlockStatus, CmdFlags::empty(), 0, 4096),
        Errno::Inval
    );
}

/// A FORCEDTLS server past the client flags.
fn forced_tls() -> S {
    negotiating(ServerConfig {
        tls: TlsPolicy::Required,
        ..ServerConfig::default()
    })
}

#[test]
fn tls_required_still_acks_abort() {
    // proto.md: FORCEDTLS refuses every option but STARTTLS and ABORT; ABORT gets its ACK,
    // then the session ends.
    let mut s = forced_tls();
    assert_eq!(feed(&mut s, &opt(&Opt::Abort)), None);
    assert_eq!(
        opt_replies(&bytes(&mut s)),
        [(OptCode::Abort, OptReply::Ack)]
    );
    assert_eq!(s.state(), State::Closed);
    assert!(s.is_finished());
    assert_eq!(s.wants(), Want::Nothing);
}

#[test]
fn tls_required_refuses_other_options_and_goes_on() {
    let mut s = forced_tls();
    let export = ExportRequest {
        name: "disk",
        infos: InfoList::new(&[InfoType::BlockSize]),
    };
    let meta = MetaContextRequest {
        export: "disk",
        queries: Queries::new(&["base:allocation"]),
    };
    let options = [
        Opt::Info(export),
        Opt::Go(export),
        Opt::ListMetaContext(meta),
        Opt::SetMetaContext(meta),
        Opt::ExtendedHeaders,
        Opt::Unknown {
            code: 42,
            data: b"",
        },
    ];
    for o in options {
        // The machine answers on its own: the application is never asked.
        assert_eq!(feed(&mut s, &opt(&o)), None, "{o:?}");
        assert_eq!(
            opt_replies(&bytes(&mut s)),
            [(
                o.code(),
                OptReply::Error {
                    error: OptError::TlsReqd,
                    message: "TLS is required"
                }
            )],
            "{o:?}"
        );
        assert_eq!(s.state(), State::Negotiating, "{o:?}");
        assert_eq!(s.wants(), Want::Bytes(OptHeader::LEN), "{o:?}");
    }
    // Nothing refused took effect.
    assert_eq!(s.reply_form(), ReplyForm::Simple);
    assert_eq!(s.contexts(), []);
}

#[test]
fn selective_tls_info_refuses_only_tls_only_exports() {
    let mut s = selective_tls();
    let info = |name| {
        opt(&Opt::Info(ExportRequest {
            name,
            infos: InfoList::new(&[]),
        }))
    };
    let b = info("secret");
    let Some(ServerEvent::Export(q)) = feed(&mut s, &b) else {
        panic!()
    };
    assert_eq!((q.kind, q.name), (ExportQueryKind::Info, "secret"));
    let mut secret = disk();
    secret.tls_only = true;
    s.answer_export(&secret).unwrap();
    assert_eq!(
        opt_replies(&bytes(&mut s)),
        [(
            OptCode::Info,
            OptReply::Error {
                error: OptError::TlsReqd,
                message: "this export needs TLS"
            }
        )]
    );
    assert_eq!(s.state(), State::Negotiating);

    // A plain export is described before TLS, and negotiation goes on.
    let b = info("disk");
    let Some(ServerEvent::Export(q)) = feed(&mut s, &b) else {
        panic!()
    };
    assert_eq!((q.kind, q.name), (ExportQueryKind::Info, "disk"));
    s.answer_export(&disk()).unwrap();
    // Without structured replies or extended headers: no DF, no block-status payload.
    let flags = TransmissionFlags::HAS_FLAGS
        | TransmissionFlags::SEND_FLUSH
        | TransmissionFlags::SEND_FUA
        | TransmissionFlags::SEND_TRIM
        | TransmissionFlags::SEND_WRITE_ZEROES
        | TransmissionFlags::SEND_CACHE;
    assert_eq!(
        opt_replies(&bytes(&mut s)),
        [
            (
                OptCode::Info,
                OptReply::Info(Info::Export {
                    size: 1 << 20,
                    flags
                })
            ),
            (OptCode::Info, OptReply::Ack)
        ]
    );
    assert_eq!(s.state(), State::Negotiating);
    assert_eq!(s.wants(), Want::Bytes(OptHeader::LEN));
}

#[test]
fn oversized_options() {
    let mut s = negotiating(ServerConfig {
        max_option_len: 64,
        ..ServerConfig::default()
    });
    let name = "n".repeat(100);
    let go = opt(&Opt::Go(ExportRequest {
        name: &name,
        infos: InfoList::new(&[]),
    }));
    let h = s.handle_input(&go[..16]).unwrap();
    assert_eq!((h.consumed, h.event), (16, None));
    // The refusal waits until the data is gone: the client is still sending it.
    assert_eq!(bytes(&mut s), b"");
    assert_eq!(s.wants(), Want::Discard { len: go.len() - 16 });
    assert_eq!(
        s.handle_input(&go[16..]).unwrap_err(),
        Error::Misuse(Misuse::PayloadPending)
    );
    s.handle_payload(50).unwrap();
    assert_eq!(bytes(&mut s), b"");
    s.handle_payload(go.len() - 16 - 50).unwrap();
    assert!(matches!(
        opt_replies(&bytes(&mut s))[..],
        [(
            OptCode::Go,
            OptReply::Error {
                error: OptError::TooBig,
                ..
            }
        )]
    ));
    assert_eq!(s.wants(), Want::Bytes(16));
    assert_eq!(feed(&mut s, &opt(&Opt::List)), Some(ServerEvent::List));

    // A 4 GiB option is a denial of service: the session ends.
    let mut s = negotiating(ServerConfig::default());
    let mut header = [0u8; 16];
    OptHeader {
        code: OptCode::Go,
        len: u32::MAX,
    }
    .emit(&mut header)
    .unwrap();
    assert!(matches!(
        s.handle_input(&header),
        Err(Error::PeerMisbehaved(Misbehavior::OptionTooLong { .. }))
    ));
}

#[test]
fn malformed_options_get_invalid_with_a_reason() {
    let mut s = negotiating(ServerConfig::default());
    let mut go = opt(&Opt::Go(ExportRequest {
        name: "disk",
        infos: InfoList::new(&[]),
    }));
    go[19] = 9; // name length past the data
    assert_eq!(feed(&mut s, &go), None);
    let r = bytes(&mut s);
    let replies = opt_replies(&r);
    let [(
        OptCode::Go,
        OptReply::Error {
            error: OptError::Invalid,
            message,
        },
    )] = replies[..]
    else {
        panic!("{replies:?}")
    };
    assert!(message.contains("name length"), "{message}");
}

#[test]
fn abort_acks_then_closes() {
    let mut s = negotiating(ServerConfig::default());
    assert_eq!(feed(&mut s, &opt(&Opt::Abort)), None);
    assert_eq!(
        opt_replies(&bytes(&mut s)),
        [(OptCode::Abort, OptReply::Ack)]
    );
    assert_eq!(s.state(), State::Closed);
    assert!(s.is_finished());
    assert_eq!(s.wants(), Want::Nothing);
}

#[test]
fn structured_after_extended_and_meta_before_structured() {
    let mut s = negotiating(ServerConfig::default());
    let set = opt(&Opt::SetMetaContext(MetaContextRequest {
        export: "",
        queries: Queries::new(&["base:allocation"]),
    }));
    assert_eq!(feed(&mut s, &set), None);
    assert!(matches!(
        opt_replies(&bytes(&mut s))[..],
        [(
            _,
            OptReply::Error {
                error: OptError::Invalid,
                ..
            }
        )]
    ));
    assert_eq!(feed(&mut s, &opt(&Opt::ExtendedHeaders)), None);
    let _ = bytes(&mut s);
    assert_eq!(feed(&mut s, &opt(&Opt::StructuredReply)), None);
    assert!(matches!(
        opt_replies(&bytes(&mut s))[..],
        [(
            _,
            OptReply::Error {
                error: OptError::ExtHeaderReqd,
                ..
            }
        )]
    ));
    assert!(matches!(
        s.handle_input(&opt(&Opt::ExportName { name: "" })),
        Err(Error::PeerMisbehaved(
            Misbehavior::ExportNameAfterExtendedHeaders
        ))
    ));
}

#[test]
fn list_meta_context_prefixes() {
    let mut s = negotiating(ServerConfig::default());
    assert_eq!(feed(&mut s, &opt(&Opt::StructuredReply)), None);
    let _ = bytes(&mut s);
    let list = opt(&Opt::ListMetaContext(MetaContextRequest {
        export: "",
        queries: Queries::new(&["qemu:"]),
    }));
    let Some(ServerEvent::MetaContexts(q)) = feed(&mut s, &list) else {
        panic!()
    };
    assert!(!q.set);
    let available = [
        "base:allocation",
        "qemu:dirty-bitmap:a",
        "qemu:allocation-depth",
    ];
    let names: Vec<_> = q.matching(&available).collect();
    assert_eq!(names, ["qemu:dirty-bitmap:a", "qemu:allocation-depth"]);
    for n in names {
        s.answer_meta_context(5, n).unwrap();
    }
    s.answer_ack().unwrap();
    let r = bytes(&mut s);
    let replies = opt_replies(&r);
    assert_eq!(
        replies[0],
        (
            OptCode::ListMetaContext,
            OptReply::MetaContext {
                id: 0,
                name: "qemu:dirty-bitmap:a"
            }
        )
    );
    assert_eq!(replies.len(), 3);
    assert!(s.contexts().is_empty(), "LIST selects nothing");
}

fn simple() -> S {
    serving(&[], disk())
}

fn structured() -> S {
    serving(
        &[
            Opt::StructuredReply,
            Opt::SetMetaContext(MetaContextRequest {
                export: "disk",
                queries: Queries::new(&["base:allocation"]),
            }),
        ],
        disk(),
    )
}

fn extended() -> S {
    serving(
        &[
            Opt::ExtendedHeaders,
            Opt::SetMetaContext(MetaContextRequest {
                export: "disk",
                queries: Queries::new(&["base:allocation", "qemu:dirty-bitmap:bm0"]),
            }),
        ],
        disk(),
    )
}

#[test]
fn simple_read_with_data_and_hole() {
    let mut s = simple();
    let r = request(&s, Command::Read, CmdFlags::empty(), 1, 4096, 8192);
    let Some(ServerEvent::Request { request, ids: None }) = feed(&mut s, &r) else {
        panic!()
    };
    assert_eq!(
        (request.command, request.offset, request.len),
        (Command::Read, 4096, 8192)
    );
    s.reply_read_data(Cookie(1), 4096, 4096).unwrap();
    s.reply_read_hole(Cookie(1), 8192, 4096).unwrap();
    let out = drain(&mut s);
    assert_eq!(
        out,
        [
            Out::Bytes(vec![
                0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1
            ]),
            Out::Payload(Cookie(1), 4096, 4096),
            Out::Zeroes(Cookie(1), 8192, 4096),
        ]
    );
    assert_eq!(s.owed(), 0);
    assert!(matches!(
        s.reply_read_data(Cookie(1), 0, 1),
        Err(Error::Misuse(Misuse::UnknownCookie(_)))
    ));
}

#[test]
fn structured_read_chunks() {
    let mut s = structured();
    let r = request(&s, Command::Read, CmdFlags::empty(), 2, 0, 4096);
    assert!(feed(&mut s, &r).is_some());
    // Out of order or overlapping pieces are refused.
    assert!(matches!(
        s.reply_read_data(Cookie(2), 512, 512),
        Err(Error::Misuse(Misuse::BadReply(_)))
    ));
    s.reply_read_hole(Cookie(2), 0, 1024).unwrap();
    s.reply_read_data(Cookie(2), 1024, 3072).unwrap();
    let out = drain(&mut s);
    let [Out::Bytes(a), Out::Payload(Cookie(2), 1024, 3072)] = &out[..] else {
        panic!("{out:?}")
    };
    let (h1, p1, n1) = ChunkPayload::parse_message(a).unwrap();
    assert_eq!(
        p1,
        ChunkPayload::OffsetHole(OffsetHole {
            offset: 0,
            len: 1024
        })
    );
    assert!(!h1.is_done());
    let (h2, p2, n2) = ChunkPayload::parse_message(&a[n1..]).unwrap();
    assert!(h2.is_done());
    assert_eq!(
        p2,
        ChunkPayload::OffsetData(OffsetDataHeader {
            offset: 1024,
            data_len: 3072
        })
    );
    assert_eq!(n1 + n2, a.len());
}

#[test]
fn extended_replies_echo_the_request_offset() {
    let mut s = extended();
    let r = request(&s, Command::Read, CmdFlags::empty(), 3, 8192, 1024);
    assert!(feed(&mut s, &r).is_some());
    s.reply_read_data(Cookie(3), 8192, 512).unwrap();
    s.reply_read_hole(Cookie(3), 8704, 512).unwrap();
    let out = drain(&mut s);
    let Out::Bytes(a) = &out[0] else { panic!() };
    let (h, _, n) = ChunkPayload::parse_message(a).unwrap();
    assert_eq!(h.offset, Some(8192));
    let Out::Bytes(b) = &out[2] else { panic!() };
    let (h, p, _) = ChunkPayload::parse_message(b).unwrap();
    assert_eq!((h.offset, h.is_done()), (Some(8192), true));
    assert_eq!(
        p,
        ChunkPayload::OffsetHole(OffsetHole {
            offset: 8704,
            len: 512
        })
    );
    assert_eq!(n, 40);
    // A write succeeds with an extended NONE chunk.
    let w = request(&s, Command::Write, CmdFlags::empty(), 4, 0, 512);
    assert!(feed(&mut s, &w).is_some());
    assert_eq!(
        s.wants(),
        Want::Payload {
            cookie: Cookie(4),
            offset: 0,
            len: 512
        }
    );
    assert_eq!(
        s.reply(Cookie(4), Ok(())).unwrap_err(),
        Error::Misuse(Misuse::PayloadPending)
    );
    s.handle_payload(512).unwrap();
    s.reply(Cookie(4), Ok(())).unwrap();
    let r = bytes(&mut s);
    let (h, p, _) = ChunkPayload::parse_message(&r).unwrap();
    assert_eq!(
        (h.chunk_type, h.is_done(), h.offset, p),
        (ChunkType::None, true, Some(0), ChunkPayload::None)
    );
}

#[test]
fn reads_beyond_a_compact_chunk_are_split() {
    // Reachable without adversarial mode: a maximum payload of 0xffffffff ("no fixed
    // limit") lets a compact read of 2^32 - 1 bytes through, and one compact OFFSET_DATA
    // chunk carries at most 2^32 - 9 data bytes (its length field is 8 + data). The
    // machine splits the piece the application gives it at that limit.
    let bs = BlockSize {
        min: 1,
        preferred: 4096,
        max_payload: u32::MAX,
    };
    let info = ExportInfo::new(1 << 33, FLAGS).with_block_size(bs);
    let mut s = serving(&[Opt::StructuredReply], info);
    let len = u64::from(u32::MAX);
    let r = request(&s, Command::Read, CmdFlags::empty(), 5, 4096, len);
    assert!(feed(&mut s, &r).is_some());
    s.reply_read_data(Cookie(5), 4096, len as usize).unwrap();
    assert_eq!(s.owed(), 0);
    // One compact OFFSET_DATA chunk header for cookie 5: magic, flags, type 1, cookie,
    // length (8 + data), offset.
    let chunk = |done: bool, len: u32, offset: u64| {
        [
            [0x66, 0x8e, 0x33, 0xef, 0, u8::from(done), 0, 1].as_slice(),
            &5u64.to_be_bytes(),
            &len.to_be_bytes(),
            &offset.to_be_bytes(),
        ]
        .concat()
    };
    // Two pieces, in order, covering the read exactly: 2^32 - 9 bytes (length field
    // 0xffffffff), then the last 8 bytes with DONE.
    let limit = u64::from(u32::MAX) - 8;
    assert_eq!(
        drain(&mut s),
        [
            Out::Bytes(chunk(false, u32::MAX, 4096)),
            Out::Payload(Cookie(5), 4096, limit as usize),
            Out::Bytes(chunk(true, 16, 4096 + limit)),
            Out::Payload(Cookie(5), 4096 + limit, 8),
        ]
    );
}

#[test]
fn df_reads_larger_than_one_chunk_are_eoverflow_with_compact_headers() {
    // A DF read gets at most one content chunk; a compact chunk holds 2^32 - 9 data
    // bytes, so a longer DF read is refused up front instead of being split.
    let bs = BlockSize {
        min: 1,
        preferred: 4096,
        max_payload: u32::MAX,
    };
    let info = ExportInfo::new(1 << 33, FLAGS).with_block_size(bs);
    let limit = u64::from(u32::MAX) - 8;
    let mut s = serving(&[Opt::StructuredReply], info);
    assert_eq!(
        refused(&mut s, Command::Read, CmdFlags::DF, 0, limit + 1),
        Errno::Overflow
    );
    // At the limit it fits one chunk and reaches the application.
    let r = request(&s, Command::Read, CmdFlags::DF, 5, 0, limit);
    assert!(feed(&mut s, &r).is_some());
    s.reply_read_data(Cookie(5), 0, limit as usize).unwrap();
    assert_eq!(s.owed(), 0);
    assert_eq!(drain(&mut s).len(), 2, "one chunk header, one payload");

    // Extended chunk lengths are 64 bits: the same 2^32 - 1 byte DF read is one chunk.
    let mut s = serving(&[Opt::ExtendedHeaders], info);
    let len = u64::from(u32::MAX);
    let r = request(&s, Command::Read, CmdFlags::DF, 6, 0, len);
    assert!(feed(&mut s, &r).is_some());
    s.reply_read_data(Cookie(6), 0, len as usize).unwrap();
    let out = drain(&mut s);
    let [Out::Bytes(b), Out::Payload(Cookie(6), 0, n)] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(*n as u64, len);
    let (h, p, _) = ChunkPayload::parse_message(b).unwrap();
    assert!(h.is_done());
    assert_eq!(
        p,
        ChunkPayload::OffsetData(OffsetDataHeader {
            offset: 0,
            data_len: len
        })
    );
}

#[cfg(feature = "adversarial")]
#[test]
fn adversarial_read_past_the_end_is_done_only_on_its_last_chunk() {
    // With the read checks relaxed, a piece may run past the request; split at the
    // maximum payload, only its last chunk carries DONE, and the reply is complete.
    let bs = BlockSize {
        min: 1,
        preferred: 4096,
        max_payload: 4096,
    };
    let mut s = serving(
        &[Opt::StructuredReply],
        ExportInfo::new(1 << 20, FLAGS).with_block_size(bs),
    );
    s.adversary().relax(ServerChecks::READ_CHUNKS);
    let r = request(&s, Command::Read, CmdFlags::empty(), 7, 0, 4096);
    assert!(feed(&mut s, &r).is_some());
    s.reply_read_data(Cookie(7), 0, 8192).unwrap();
    assert_eq!(s.owed(), 0);
    let done: Vec<bool> = drain(&mut s)
        .iter()
        .filter_map(|o| match o {
            Out::Bytes(b) => Some(ChunkPayload::parse_message(b).unwrap().0.is_done()),
            _ => None,
        })
        .collect();
    assert_eq!(done, [false, true]);
}

#[test]
fn exports_can_be_made_up_on_demand() {
    // The machine keeps no export table: each INFO/GO asks the application, which may
    // invent the export from its name (as nbdkit plugins do). Here "zeroes-N" is an export
    // of N bytes; anything else is unknown.
    let mut s = negotiating(ServerConfig::default());
    let app = |name: &str| {
        let size = name.strip_prefix("zeroes-")?.parse().ok()?;
        Some(ExportInfo::new(size, TransmissionFlags::READ_ONLY))
    };
    for (name, size) in [
        ("zeroes-4096", Some(4096)),
        ("zeroes-x", None),
        ("zeroes-7", Some(7)),
    ] {
        let info = opt(&Opt::Info(ExportRequest {
            name,
            infos: InfoList::new(&[]),
        }));
        let Some(ServerEvent::Export(q)) = feed(&mut s, &info) else {
            panic!("{name}")
        };
        assert_eq!((q.kind, q.name), (ExportQueryKind::Info, name));
        match app(q.name) {
            Some(export) => s.answer_export(&export).unwrap(),
            None => s
                .answer_error(OptError::UnknownExport, "no such export")
                .unwrap(),
        }
        let replies = bytes(&mut s);
        let replies = opt_replies(&replies);
        match size {
            Some(size) => {
                assert!(
                    matches!(
                        replies.as_slice(),
                        [
                            (OptCode::Info, OptReply::Info(Info::Export { size: sz, .. })),
                            (OptCode::Info, OptReply::Ack)
                        ] if *sz == size
                    ),
                    "{name}: {replies:?}"
                );
            }
            None => assert!(
                matches!(
                    replies.as_slice(),
                    [(
                        OptCode::Info,
                        OptReply::Error {
                            error: OptError::UnknownExport,
                            message: "no such export"
                        }
                    )]
                ),
                "{name}: {replies:?}"
            ),
        }
        assert_eq!(s.state(), State::Negotiating);
    }
}

#[test]
fn requests_refused_with_the_spec_errno() {
    let mut s = structured();
    let size = 1 << 20;
    assert_eq!(
        refused(&mut s, Command::Unknown(99), CmdFlags::empty(), 0, 0),
        Errno::Inval
    );
    assert_eq!(
        refused(&mut s, Command::Read, CmdFlags::empty(), size, 512),
        Errno::Inval
    );
    assert_eq!(
        refused(&mut s, Command::Read, CmdFlags::empty(), u64::MAX, 2),
        Errno::Inval
    );
    assert_eq!(
        refused(&mut s, Command::Write, CmdFlags::empty(), size - 511, 512),
        Errno::NoSpc
    );
    assert_eq!(
        refused(&mut s, Command::WriteZeroes, CmdFlags::empty(), size, 1),
        Errno::NoSpc
    );
    assert_eq!(
        refused(&mut s, Command::Trim, CmdFlags::empty(), size, 1),
        Errno::Inval
    );
    assert_eq!(
        refused(&mut s, Command::Read, CmdFlags::from_bits(0x8000), 0, 512),
        Errno::Inval
    );
    assert_eq!(
        refused(&mut s, Command::Read, CmdFlags::NO_HOLE, 0, 512),
        Errno::Inval
    );
    assert_eq!(
        refused(&mut s, Command::WriteZeroes, CmdFlags::FAST_ZERO, 0, 512),
        Errno::Inval
    );
    assert_eq!(
        refused(&mut s, Command::Write, CmdFlags::PAYLOAD_LEN, 0, 0),
        Errno::Inval
    );
    assert_eq!(
        refused(&mut s, Command::Flush, CmdFlags::empty(), 1, 0),
        Errno::Inval
    );
    assert_eq!(
        refused(&mut s, Command::BlockStatus, CmdFlags::empty(), 0, 0),
        Errno::Inval
    );
    assert_eq!(
        refused(&mut s, Command::Resize, CmdFlags::empty(), 0, 0),
        Errno::Inval
    );
    assert_eq!(s.owed(), 0);
    // Zero-length requests succeed without an event.
    let r = request(&s, Command::Trim, CmdFlags::empty(), 5, 0, 0);
    assert_eq!(feed(&mut s, &r), None);
    assert_eq!(
        ReplyHeader::parse(&bytes(&mut s)).unwrap(),
        ReplyHeader::Simple(SimpleReply {
            error: None,
            cookie: Cookie(5)
        })
    );
    // A zero-length read still gets a structured reply (proto.md: a READ MUST be
    // answered with chunks once structured replies are on): NONE with DONE.
    let r = request(&s, Command::Read, CmdFlags::empty(), 6, 0, 0);
    assert_eq!(feed(&mut s, &r), None);
    let out = bytes(&mut s);
    let (h, p, _) = ChunkPayload::parse_message(&out).unwrap();
    assert_eq!(
        (h.chunk_type, h.is_done(), h.cookie, p),
        (ChunkType::None, true, Cookie(6), ChunkPayload::None)
    );
}

#[test]
fn large_reads_are_refused_up_front() {
    let big = ExportInfo::new(1 << 30, FLAGS);
    let mut s = serving(&[Opt::StructuredReply], big);
    assert_eq!(
        refused(&mut s, Command::Read, CmdFlags::empty(), 0, (1 << 25) + 1),
        Errno::Overflow
    );
    let mut s = serving(&[], big);
    assert_eq!(
        refused(&mut s, Command::Read, CmdFlags::empty(), 0, (1 << 25) + 1),
        Errno::Inval
    );
}

#[test]
fn read_only_and_unadvertised_commands() {
    let flags = TransmissionFlags::READ_ONLY | TransmissionFlags::SEND_FLUSH;
    let mut s = serving(&[], ExportInfo::new(1 << 20, flags));
    assert_eq!(
        refused(&mut s, Command::Write, CmdFlags::empty(), 0, 512),
        Errno::Perm
    );
    assert_eq!(
        refused(&mut s, Command::Trim, CmdFlags::empty(), 0, 512),
        Errno::Perm,
        "writes of any kind to a read-only export: EPERM"
    );
    assert_eq!(
        refused(&mut s, Command::Cache, CmdFlags::empty(), 0, 512),
        Errno::Inval,
        "CACHE not advertised"
    );
    // A read-only export does not advertise ways of writing.
    assert!(!s.transmission_flags().intersects(
        TransmissionFlags::SEND_TRIM
            | TransmissionFlags::SEND_WRITE_ZEROES
            | TransmissionFlags::SEND_FAST_ZERO
    ));
    assert_eq!(
        refused(&mut s, Command::BlockStatus, CmdFlags::empty(), 0, 512),
        Errno::Inval,
        "no contexts"
    );
    assert_eq!(
        refused(&mut s, Command::Read, CmdFlags::FUA, 0, 512),
        Errno::Inval,
        "FUA not advertised"
    );
    assert_eq!(
        refused(&mut s, Command::Read, CmdFlags::DF, 0, 512),
        Errno::Inval,
        "DF needs structured replies"
    );
    // The refused write's payload was discarded by the caller, and the stream goes on.
    let r = request(&s, Command::Read, CmdFlags::empty(), 6, 0, 512);
    assert!(feed(&mut s, &r).is_some());
}

#[test]
fn write_zeroes_on_a_read_only_export_is_eperm() {
    // The application's flags offer WRITE_ZEROES, but the export is read-only: the
    // machine does not advertise it, and refuses it with EPERM (spec-digest 3.10), not the
    // EINVAL of an unadvertised command.
    let flags = TransmissionFlags::READ_ONLY | TransmissionFlags::SEND_WRITE_ZEROES;
    let mut s = serving(&[Opt::StructuredReply], ExportInfo::new(1 << 20, flags));
    assert_eq!(
        s.transmission_flags(),
        TransmissionFlags::HAS_FLAGS | TransmissionFlags::READ_ONLY
    );
    assert_eq!(
        refused(&mut s, Command::WriteZeroes, CmdFlags::empty(), 0, 512),
        Errno::Perm
    );
}

#[test]
fn block_status_past_the_end_is_einval() {
    // A context is selected, so only the range is wrong (spec-digest 3.10).
    let mut s = structured();
    assert_eq!(s.contexts(), [0]);
    let size = 1 << 20;
    assert_eq!(
        refused(
            &mut s,
            Command::BlockStatus,
            CmdFlags::empty(),
            size - 4096,
            8192
        ),
        Errno::Inval
    );
    assert_eq!(
        refused(&mut s, Command::BlockStatus, CmdFlags::empty(), size, 1),
        Errno::Inval
    );
    assert_eq!(
        refused(
            &mut s,
            Command::BlockStatus,
            CmdFlags::REQ_ONE,
            u64::MAX - 511,
            4096
        ),
        Errno::Inval,
        "offset + length overflows"
    );
    // The same request inside the export reaches the application.
    let r = request(
        &s,
        Command::BlockStatus,
        CmdFlags::empty(),
        1,
        size - 4096,
        4096,
    );
    assert!(matches!(
        feed(&mut s, &r),
        Some(ServerEvent::Request { .. })
    ));
}

#[test]
fn payload_len_on_a_command_without_payload_is_discarded_then_einval() {
    // Extended headers: a payload behind a command that has no payload form is read and
    // dropped, then the command fails with EINVAL (spec-digest 3.10, EH3), and the session
    // goes on.
    let mut s = extended();
    for (cookie, command) in [(1, Command::Read), (2, Command::Trim)] {
        let b = request(&s, command, CmdFlags::PAYLOAD_LEN, cookie, 0, 512);
        let h = s.handle_input(&b).unwrap();
        assert_eq!((h.consumed, h.event), (Request::EXTENDED_LEN, None));
        assert_eq!(s.wants(), Want::Discard { len: 512 });
        assert_eq!(
            drain(&mut s),
            [],
            "refused before the payload was discarded"
        );
        s.handle_payload(512).unwrap();
        let out = bytes(&mut s);
        let (h, p, n) = ChunkPayload::parse_message(&out).unwrap();
        assert_eq!(n, out.len());
        assert_eq!(
            (h.cookie, h.offset, h.is_done()),
            (Cookie(cookie), Some(0), true)
        );
        assert_eq!(
            p,
            ChunkPayload::Error(ErrorChunk {
                error: Errno::Inval,
                message: "",
                offset: None
            })
        );
        assert_eq!(s.wants(), Want::Bytes(Request::EXTENDED_LEN));
    }
}

#[test]
fn fast_zero_when_offered_reaches_the_application() {
    // FAST_ZERO is refused by the machine only when not advertised (EINVAL, tested above);
    // when it is, the application decides and answers ENOTSUP if zeroing is not fast.
    let flags = FLAGS | TransmissionFlags::SEND_FAST_ZERO;
    let mut s = serving(&[Opt::StructuredReply], ExportInfo::new(1 << 20, flags));
    assert!(s
        .transmission_flags()
        .contains(TransmissionFlags::SEND_FAST_ZERO));
    let r = request(&s, Command::WriteZeroes, CmdFlags::FAST_ZERO, 1, 0, 4096);
    let Some(ServerEvent::Request { request: got, .. }) = feed(&mut s, &r) else {
        panic!()
    };
    assert_eq!(
        (got.command, got.flags),
        (Command::WriteZeroes, CmdFlags::FAST_ZERO)
    );
    s.reply(Cookie(1), Err(Errno::NotSup)).unwrap();
    assert_eq!(reply_errno(&bytes(&mut s)), Errno::NotSup);
    assert_eq!(s.owed(), 0);
}

#[test]
fn block_size_constraints_are_enforced() {
    let bs = BlockSize {
        min: 4096,
        preferred: 4096,
        max_payload: 65536,
    };
    let mut s = serving(&[], disk().with_block_size(bs));
    assert_eq!(
        refused(&mut s, Command::Read, CmdFlags::empty(), 512, 4096),
        Errno::Inval
    );
    assert_eq!(
        refused(&mut s, Command::Write, CmdFlags::empty(), 0, 512),
        Errno::Inval
    );
    assert_eq!(
        refused(&mut s, Command::Write, CmdFlags::empty(), 0, 65536 + 4096),
        Errno::Inval
    );
    assert_eq!(
        refused(&mut s, Command::Read, CmdFlags::empty(), 0, 65536 + 4096),
        Errno::Inval
    );
    // Payload-less commands may exceed the maximum payload.
    let r = request(&s, Command::Trim, CmdFlags::empty(), 7, 0, 1 << 19);
    assert!(feed(&mut s, &r).is_some());
}

#[test]
fn block_status_merges_trims_and_marks_done() {
    let mut s = extended();
    assert_eq!(s.contexts(), [0, 7]);
    let r = request(&s, Command::BlockStatus, CmdFlags::empty(), 8, 4096, 16384);
    assert!(feed(&mut s, &r).is_some());
    let extents = [
        Extent {
            len: 4096,
            status: 0,
        },
        Extent { len: 0, status: 3 },
        Extent {
            len: 4096,
            status: 0,
        },
        Extent {
            len: 1 << 20,
            status: 3,
        },
    ];
    s.reply_block_status(Cookie(8), 0, &extents).unwrap();
    assert!(matches!(
        s.reply_block_status(Cookie(8), 0, &extents),
        Err(Error::Misuse(Misuse::BadReply(_)))
    ));
    let out = bytes(&mut s);
    let (h, p, _) = ChunkPayload::parse_message(&out).unwrap();
    assert_eq!(
        (h.chunk_type, h.is_done()),
        (ChunkType::BlockStatusExt, false)
    );
    let ChunkPayload::BlockStatus(bs) = p else {
        panic!()
    };
    assert_eq!(bs.context_id, 0);
    assert_eq!(
        bs.extents.iter().collect::<Vec<_>>(),
        [
            Extent {
                len: 8192,
                status: 0
            },
            Extent {
                len: 8192,
                status: 3
            }
        ]
    );
    s.reply_block_status(
        Cookie(8),
        7,
        &[Extent {
            len: 1 << 40,
            status: 1,
        }],
    )
    .unwrap();
    let out = bytes(&mut s);
    let (h, p, _) = ChunkPayload::parse_message(&out).unwrap();
    assert!(h.is_done());
    let ChunkPayload::BlockStatus(bs) = p else {
        panic!()
    };
    assert_eq!(
        bs.extents.iter().collect::<Vec<_>>(),
        [Extent {
            len: 16384,
            status: 1
        }]
    );
    assert_eq!(s.owed(), 0);
}

#[test]
fn block_status_req_one_and_narrow() {
    let mut s = structured();
    let r = request(&s, Command::BlockStatus, CmdFlags::REQ_ONE, 9, 0, 1 << 20);
    assert!(feed(&mut s, &r).is_some());
    s.reply_block_status(
        Cookie(9),
        0,
        &[
            Extent {
                len: 512,
                status: 1,
            },
            Extent {
                len: 512,
                status: 2,
            },
        ],
    )
    .unwrap();
    let out = bytes(&mut s);
    let (h, p, _) = ChunkPayload::parse_message(&out).unwrap();
    assert_eq!((h.chunk_type, h.is_done()), (ChunkType::BlockStatus, true));
    let ChunkPayload::BlockStatus(bs) = p else {
        panic!()
    };
    assert_eq!(
        bs.extents.iter().collect::<Vec<_>>(),
        [Extent {
            len: 512,
            status: 1
        }]
    );
}

#[test]
fn block_status_payload_form() {
    let mut s = extended();
    let mut b = request(&s, Command::BlockStatus, CmdFlags::PAYLOAD_LEN, 10, 0, 12);
    b.extend([0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 7]);
    let Some(ServerEvent::Request {
        request: req,
        ids: Some(ids),
    }) = feed(&mut s, &b)
    else {
        panic!()
    };
    assert_eq!(req.len, 8192);
    assert!(!req.flags.contains(CmdFlags::PAYLOAD_LEN));
    assert_eq!(ids.iter().collect::<Vec<_>>(), [7]);
    assert!(matches!(
        s.reply_block_status(Cookie(10), 0, &[Extent { len: 1, status: 0 }]),
        Err(Error::Misuse(_))
    ));
    s.reply_block_status(
        Cookie(10),
        7,
        &[Extent {
            len: 8192,
            status: 0,
        }],
    )
    .unwrap();
    assert_eq!(s.owed(), 0);
    let _ = bytes(&mut s);
    // Unknown and duplicate IDs: EINVAL, after reading the payload.
    for ids in [[0, 0, 0, 9, 0, 0, 0, 9], [0, 0, 0, 7, 0, 0, 0, 7]] {
        let mut b = request(&s, Command::BlockStatus, CmdFlags::PAYLOAD_LEN, 11, 0, 16);
        b.extend([0, 0, 0, 0, 0, 0, 0x20, 0]);
        b.extend(ids);
        assert_eq!(feed(&mut s, &b), None);
        assert_eq!(reply_errno(&bytes(&mut s)), Errno::Inval);
    }
}

#[test]
fn write_payload_passes_beside_and_in_pieces() {
    let mut s = simple();
    let w = request(&s, Command::Write, CmdFlags::FUA, 12, 1024, 4096);
    let Some(ServerEvent::Request { request, .. }) = feed(&mut s, &w) else {
        panic!()
    };
    assert_eq!(
        (request.command, request.flags),
        (Command::Write, CmdFlags::FUA)
    );
    assert_eq!(
        s.wants(),
        Want::Payload {
            cookie: Cookie(12),
            offset: 1024,
            len: 4096
        }
    );
    assert_eq!(
        s.handle_input(b"abc").unwrap_err(),
        Error::Misuse(Misuse::PayloadPending)
    );
    s.handle_payload(1000).unwrap();
    assert_eq!(s.payload_in_progress(), Some((Cookie(12), 2024, 3096)));
    assert_eq!(
        s.handle_payload(5000).unwrap_err(),
        Error::Misuse(Misuse::PayloadMismatch)
    );
    // End of file inside the payload is reported, and the progress is still known.
    assert_eq!(s.handle_eof().unwrap_err(), Error::UnexpectedEof);
    assert_eq!(s.state(), State::Dead);
}

#[test]
fn backpressure_when_too_many_are_owed() {
    let mut s = simple();
    let mut all = Vec::new();
    for c in 0..9 {
        all.extend(request(&s, Command::Read, CmdFlags::empty(), c, 0, 512));
    }
    let mut at = 0;
    for _ in 0..8 {
        let h = s.handle_input(&all[at..]).unwrap();
        assert!(h.event.is_some());
        at += h.consumed;
    }
    let h = s.handle_input(&all[at..]).unwrap();
    assert_eq!((h.consumed, h.event), (0, None));
    assert_eq!(s.wants(), Want::Nothing);
    s.reply(Cookie(3), Err(Errno::Io)).unwrap();
    assert_eq!(s.wants(), Want::Bytes(28));
    assert!(s.handle_input(&all[at..]).unwrap().event.is_some());
}

#[test]
fn disconnect_finishes_owed_replies() {
    let mut s = simple();
    let r = request(&s, Command::Read, CmdFlags::empty(), 1, 0, 512);
    assert!(feed(&mut s, &r).is_some());
    let d = request(&s, Command::Disc, CmdFlags::empty(), 2, 0, 0);
    assert_eq!(feed(&mut s, &d), Some(ServerEvent::Disconnect));
    assert_eq!(s.state(), State::Disconnecting);
    assert_eq!(s.wants(), Want::Nothing);
    s.reply_read_data(Cookie(1), 0, 512).unwrap();
    assert_eq!(drain(&mut s).len(), 2);
    assert_eq!(s.state(), State::Closed);
    assert!(s.is_finished());
}

#[test]
fn simple_read_error_after_data_is_a_hard_disconnect() {
    let mut s = simple();
    let r = request(&s, Command::Read, CmdFlags::empty(), 1, 0, 1024);
    assert!(feed(&mut s, &r).is_some());
    s.reply_read_data(Cookie(1), 0, 512).unwrap();
    s.reply_error(Cookie(1), Errno::Io, "disk failed").unwrap();
    assert_eq!(drain(&mut s), []);
    assert_eq!(s.state(), State::Closed);
}

#[test]
fn structured_errors_carry_messages_and_offsets() {
    let mut s = structured();
    let r = request(&s, Command::Read, CmdFlags::empty(), 1, 4096, 1024);
    assert!(feed(&mut s, &r).is_some());
    s.reply_read_data(Cookie(1), 4096, 512).unwrap();
    assert!(
        s.reply_error_at(Cookie(1), Errno::Io, "bad sector", 0)
            .is_err(),
        "offset outside the request"
    );
    s.reply_error_at(Cookie(1), Errno::Io, "bad sector", 4608)
        .unwrap();
    let out = drain(&mut s);
    let Out::Bytes(b) = &out[2] else {
        panic!("{out:?}")
    };
    let (h, p, _) = ChunkPayload::parse_message(b).unwrap();
    assert!(h.is_done());
    assert_eq!(
        p,
        ChunkPayload::Error(ErrorChunk {
            error: Errno::Io,
            message: "bad sector",
            offset: Some(4608)
        })
    );
}

#[test]
fn fatal_request_framing_errors() {
    // QEMU 10 sends extended writes without PAYLOAD_LEN: the data follows all the same.
    let mut s = extended();
    let r = Request {
        flags: CmdFlags::FUA,
        command: Command::Write,
        cookie: Cookie(1),
        offset: 0,
        len: 512,
        extended: true,
    };
    let mut b = [0u8; 32];
    r.emit(&mut b).unwrap();
    assert!(matches!(
        feed(&mut s, &b),
        Some(ServerEvent::Request { .. })
    ));
    assert_eq!(
        s.wants(),
        Want::Payload {
            cookie: Cookie(1),
            offset: 0,
            len: 512
        }
    );

    let mut s = simple();
    let r = Request {
        extended: true,
        ..r
    };
    r.emit(&mut b).unwrap();
    assert_eq!(
        s.handle_input(&b).unwrap_err(),
        Error::PeerMisbehaved(Misbehavior::WrongRequestForm)
    );

    let mut s = simple();
    let a = request(&s, Command::Read, CmdFlags::empty(), 1, 0, 512);
    assert!(feed(&mut s, &a).is_some());
    assert_eq!(
        s.handle_input(&a).unwrap_err(),
        Error::PeerMisbehaved(Misbehavior::DuplicateCookie(Cookie(1)))
    );

    let mut s = simple();
    let w = request(&s, Command::Write, CmdFlags::empty(), 1, 0, u32::MAX.into());
    assert!(matches!(
        s.handle_input(&w),
        Err(Error::PeerMisbehaved(Misbehavior::PayloadTooLong { .. }))
    ));
}

#[test]
fn oldstyle_and_transmission_only() {
    let mut s = S::new_oldstyle(ServerConfig::default(), &disk()).unwrap();
    let b = bytes(&mut s);
    let hello = OldstyleHello::parse(&b).unwrap();
    assert_eq!(hello.size, 1 << 20);
    assert!(!hello
        .transmission_flags
        .contains(TransmissionFlags::SEND_DF));
    assert_eq!(s.state(), State::Transmission);
    assert_eq!(s.wants(), Want::Bytes(28));

    let mut s = S::new_transmission(ServerConfig::default(), &disk(), ReplyForm::Extended).unwrap();
    assert_eq!(drain(&mut s), []);
    assert_eq!(s.wants(), Want::Bytes(32));
}

#[test]
fn transmission_only_serves_simple_replies() {
    // The Linux kernel client's case: the handshake happened elsewhere; compact requests
    // in, simple replies out.
    let flags = TransmissionFlags::SEND_FLUSH | TransmissionFlags::SEND_FUA;
    let info = ExportInfo::new(1 << 20, flags);
    let mut s = S::new_transmission(ServerConfig::default(), &info, ReplyForm::Simple).unwrap();
    assert_eq!(drain(&mut s), []);
    assert_eq!(s.transmission_flags(), TransmissionFlags::HAS_FLAGS | flags);
    assert_eq!(s.wants(), Want::Bytes(Request::COMPACT_LEN));

    let r = request(&s, Command::Read, CmdFlags::empty(), 1, 4096, 512);
    let Some(ServerEvent::Request {
        request: got,
        ids: None,
    }) = feed(&mut s, &r)
    else {
        panic!()
    };
    assert_eq!(
        (got.command, got.offset, got.len),
        (Command::Read, 4096, 512)
    );
    s.reply_read_data(Cookie(1), 4096, 512).unwrap();
    assert_eq!(
        drain(&mut s),
        [
            Out::Bytes(simple_reply(0, 1)),
            Out::Payload(Cookie(1), 4096, 512)
        ]
    );

    let w = request(&s, Command::Write, CmdFlags::FUA, 2, 8192, 1024);
    let Some(ServerEvent::Request { request: got, .. }) = feed(&mut s, &w) else {
        panic!()
    };
    assert_eq!(
        (got.command, got.flags, got.offset, got.len),
        (Command::Write, CmdFlags::FUA, 8192, 1024)
    );
    assert_eq!(
        s.wants(),
        Want::Payload {
            cookie: Cookie(2),
            offset: 8192,
            len: 1024
        }
    );
    s.handle_payload(1024).unwrap();
    assert_eq!(s.wants(), Want::Bytes(Request::COMPACT_LEN));
    s.reply(Cookie(2), Ok(())).unwrap();
    assert_eq!(bytes(&mut s), simple_reply(0, 2));

    let f = request(&s, Command::Flush, CmdFlags::empty(), 3, 0, 0);
    let Some(ServerEvent::Request { request: got, .. }) = feed(&mut s, &f) else {
        panic!()
    };
    assert_eq!(got.command, Command::Flush);
    s.reply(Cookie(3), Ok(())).unwrap();
    assert_eq!(bytes(&mut s), simple_reply(0, 3));

    // Bad requests are answered by the machine: a read past the end (EINVAL), and a
    // write past the end (ENOSPC, once its payload has been discarded).
    let r = request(&s, Command::Read, CmdFlags::empty(), 4, 1 << 20, 512);
    assert_eq!(feed(&mut s, &r), None);
    assert_eq!(bytes(&mut s), simple_reply(22, 4));
    let w = request(
        &s,
        Command::Write,
        CmdFlags::empty(),
        5,
        (1 << 20) - 512,
        1024,
    );
    assert_eq!(feed(&mut s, &w), None);
    assert_eq!(s.wants(), Want::Discard { len: 1024 });
    assert_eq!(drain(&mut s), []);
    s.handle_payload(1024).unwrap();
    assert_eq!(bytes(&mut s), simple_reply(28, 5));
    assert_eq!(s.owed(), 0);
    assert_eq!(s.wants(), Want::Bytes(Request::COMPACT_LEN));

    let d = request(&s, Command::Disc, CmdFlags::empty(), 6, 0, 0);
    assert_eq!(feed(&mut s, &d), Some(ServerEvent::Disconnect));
    assert!(s.is_finished());
}

#[test]
fn shutdown_refuses_new_work() {
    let mut s = negotiating(ServerConfig::default());
    s.shutdown();
    assert_eq!(feed(&mut s, &opt(&Opt::List)), None);
    assert!(matches!(
        opt_replies(&bytes(&mut s))[..],
        [(
            _,
            OptReply::Error {
                error: OptError::Shutdown,
                ..
            }
        )]
    ));
    let mut s = simple();
    s.shutdown();
    assert_eq!(
        refused(&mut s, Command::Read, CmdFlags::empty(), 0, 512),
        Errno::Shutdown
    );
}

#[test]
fn eof_at_a_boundary_is_clean() {
    let mut s = negotiating(ServerConfig::default());
    s.handle_eof().unwrap();
    assert_eq!(s.state(), State::Closed);
    let mut s = negotiating(ServerConfig::default());
    let list = opt(&Opt::List);
    let h = s.handle_input(&list[..5]).unwrap();
    assert_eq!(h.consumed, 0);
    assert_eq!(s.handle_eof().unwrap_err(), Error::UnexpectedEof);
}

/// Runs a scripted client byte stream through a server, fed in the pieces `cuts` makes,
/// answering every event the same way; returns the events and everything sent.
fn run_script(stream: &[u8], cuts: &[usize]) -> (Vec<String>, Vec<Out>) {
    let mut s = S::new(ServerConfig::default());
    let mut events = Vec::new();
    let mut sent = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut pending_write: Option<Cookie> = None;
    let mut sent_raw: Vec<Out> = Vec::new();
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    bounds.push(stream.len());
    bounds.sort_unstable();
    let mut fed = 0;
    for end in bounds {
        buf.extend_from_slice(&stream[fed..end]);
        fed = end;
        loop {
            sent.extend(drain(&mut s));
            match s.wants() {
                Want::Payload { len, .. } | Want::Discard { len } => {
                    let n = len.min(buf.len());
                    if n == 0 {
                        break;
                    }
                    s.handle_payload(n).unwrap();
                    buf.drain(..n);
                    if let (Some(c), false) =
                        (pending_write, matches!(s.wants(), Want::Payload { .. }))
                    {
                        s.reply(c, Ok(())).unwrap();
                        pending_write = None;
                    }
                }
                _ => {
                    let h = match s.handle_input(&buf) {
                        Ok(h) => h,
                        Err(e) => {
                            events.push(format!("error {e:?}"));
                            return (events, sent);
                        }
                    };
                    if h.consumed == 0 && h.event.is_none() {
                        break;
                    }
                    if let Some(ev) = h.event {
                        events.push(format!("{ev:?}"));
                        match ev {
                            ServerEvent::List => {
                                s.answer_list_entry("disk", "d").unwrap();
                                s.answer_ack().unwrap();
                            }
                            ServerEvent::Export(_) => s.answer_export(&disk()).unwrap(),
                            ServerEvent::MetaContexts(q) => {
                                for name in q.matching(&["base:allocation"]) {
                                    s.answer_meta_context(3, name).unwrap();
                                }
                                s.answer_ack().unwrap();
                            }
                            ServerEvent::Request { request: r, .. } => match r.command {
                                Command::Read => s
                                    .reply_read_data(r.cookie, r.offset, r.len as usize)
                                    .unwrap(),
                                Command::Write => pending_write = Some(r.cookie),
                                Command::BlockStatus => s
                                    .reply_block_status(
                                        r.cookie,
                                        3,
                                        &[Extent {
                                            len: r.len,
                                            status: 0,
                                        }],
                                    )
                                    .unwrap(),
                                _ => s.reply(r.cookie, Ok(())).unwrap(),
                            },
                            _ => {}
                        }
                    }
                    buf.drain(..h.consumed);
                }
            }
        }
    }
    if s.handle_eof().is_err() {
        events.push("eof error".into());
    }
    sent.extend(drain(&mut s));
    // Byte runs split across drains are one run.
    for o in sent {
        match (sent_raw.last_mut(), o) {
            (Some(Out::Bytes(a)), Out::Bytes(b)) => a.extend(b),
            (_, o) => sent_raw.push(o),
        }
    }
    (events, sent_raw)
}

fn script() -> Vec<u8> {
    let mut b = vec![0, 0, 0, 3];
    b.extend(opt(&Opt::Unknown {
        code: 42,
        data: b"x",
    }));
    b.extend(opt(&Opt::StructuredReply));
    b.extend(opt(&Opt::List));
    b.extend(opt(&Opt::SetMetaContext(MetaContextRequest {
        export: "disk",
        queries: Queries::new(&["base:allocation"]),
    })));
    b.extend(opt(&Opt::Go(ExportRequest {
        name: "disk",
        infos: InfoList::new(&[InfoType::BlockSize]),
    })));
    let req = |command, flags, cookie, offset, len| {
        let r = Request {
            flags,
            command,
            cookie: Cookie(cookie),
            offset,
            len,
            extended: false,
        };
        let mut v = vec![0; 28];
        r.emit(&mut v).unwrap();
        v
    };
    b.extend(req(Command::Read, CmdFlags::empty(), 1, 0, 4096));
    b.extend(req(Command::Write, CmdFlags::FUA, 2, 512, 1000));
    b.extend((0..1000).map(|i| i as u8));
    b.extend(req(Command::BlockStatus, CmdFlags::empty(), 3, 0, 65536));
    b.extend(req(Command::Write, CmdFlags::empty(), 4, 1 << 20, 100)); // past the end: discarded
    b.extend([7; 100]);
    b.extend(req(Command::Trim, CmdFlags::empty(), 5, 0, 4096));
    b.extend(req(Command::Flush, CmdFlags::empty(), 6, 0, 0));
    b.extend(req(Command::Disc, CmdFlags::empty(), 7, 0, 0));
    b
}

#[test]
fn scripted_session() {
    let stream = script();
    let (events, sent) = run_script(&stream, &[]);
    assert_eq!(events.len(), 9, "{events:#?}");
    assert!(events[0].starts_with("List"));
    assert!(events.last().unwrap().starts_with("Disconnect"));
    // Greeting + option replies + replies; the read's data went beside.
    assert!(sent.contains(&Out::Payload(Cookie(1), 0, 4096)));
}

proptest::proptest! {
    /// Feeding the same bytes in any split gives the same events and the same output.
    #[test]
    fn split_invariance(cuts in proptest::collection::vec(0usize..2000, 0..12)) {
        let stream = script();
        let whole = run_script(&stream, &[]);
        let split = run_script(&stream, &cuts);
        proptest::prop_assert_eq!(whole, split);
    }
}
