//! Scripted handshakes, built with the wire encoders: the server's side of a negotiation
//! (for `client_input`) and the client's side (for `server_input`), so that fuzz data can
//! start right in transmission in each reply form.

use nbd_proto::wire::{
    BlockSize, ClientFlags, Greeting, HandshakeFlags, Hello, Info, InfoList, InfoType, Opt,
    OptCode, OptError, OptReply, Queries, TransmissionFlags,
};
use nbd_proto::TlsPolicy;

use nbd_proto::wire::{ExportRequest, MetaContextRequest};

/// Reply forms a scripted negotiation ends in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// Simple replies.
    Simple,
    /// Structured replies.
    Structured,
    /// Extended headers.
    Extended,
}

/// Export size of the scripted negotiations (the seeds were captured on 64 MiB exports).
pub const SIZE: u64 = 64 << 20;

/// Metadata contexts the scripted sides use.
pub const CONTEXTS: [&str; 2] = ["base:allocation", "qemu:dirty-bitmap:bm0"];

/// Every transmission flag a scripted server offers.
pub fn all_flags(form: Form) -> TransmissionFlags {
    let mut f = TransmissionFlags::from_bits(0x0d6d) // HAS_FLAGS FLUSH FUA TRIM WZ DF MULTI CACHE FAST_ZERO
        ;
    if form == Form::Extended {
        f |= TransmissionFlags::BLOCK_STATUS_PAYLOAD;
    }
    f
}

fn rep(out: &mut Vec<u8>, opt: OptCode, reply: OptReply<'_>) {
    let at = out.len();
    out.resize(at + reply.buffer_len(), 0);
    reply
        .emit(opt, &mut out[at..])
        .expect("scripted option reply");
}

fn opt(out: &mut Vec<u8>, o: &Opt<'_>) {
    let at = out.len();
    out.resize(at + o.buffer_len(), 0);
    o.emit(&mut out[at..]).expect("scripted option");
}

/// The server's bytes for what a client in automatic mode sends: greeting, STARTTLS
/// accepted (unless `tls` is `Off`), extended headers or structured replies accepted or
/// refused as `form` says, `SET_META_CONTEXT` (if `contexts`) selecting [`CONTEXTS`] with
/// IDs `id_base` and `id_base + 1`, then `GO` with the export and block sizes.
///
/// The client must be configured with extended headers and structured replies on. The
/// return value is the stream and the offset where TLS starts (`None` without TLS).
pub fn server_side(
    form: Form,
    tls: TlsPolicy,
    contexts: bool,
    id_base: u32,
) -> (Vec<u8>, Option<usize>) {
    let mut out = vec![0; Greeting::LEN];
    Hello::Newstyle(Greeting {
        flags: HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES,
    })
    .emit(&mut out)
    .expect("greeting");
    let mut tls_at = None;
    if tls != TlsPolicy::Off {
        rep(&mut out, OptCode::StartTls, OptReply::Ack);
        tls_at = Some(out.len());
    }
    let unsup = |out: &mut Vec<u8>, code| {
        rep(
            out,
            code,
            OptReply::Error {
                error: OptError::Unsup,
                message: "",
            },
        )
    };
    match form {
        Form::Extended => rep(&mut out, OptCode::ExtendedHeaders, OptReply::Ack),
        Form::Structured => {
            unsup(&mut out, OptCode::ExtendedHeaders);
            rep(&mut out, OptCode::StructuredReply, OptReply::Ack);
        }
        Form::Simple => {
            unsup(&mut out, OptCode::ExtendedHeaders);
            unsup(&mut out, OptCode::StructuredReply);
        }
    }
    if contexts && form != Form::Simple {
        for (i, name) in CONTEXTS.iter().enumerate() {
            let id = id_base.wrapping_add(i as u32);
            rep(
                &mut out,
                OptCode::SetMetaContext,
                OptReply::MetaContext { id, name },
            );
        }
        rep(&mut out, OptCode::SetMetaContext, OptReply::Ack);
    }
    rep(
        &mut out,
        OptCode::Go,
        OptReply::Info(Info::Export {
            size: SIZE,
            flags: all_flags(form),
        }),
    );
    rep(
        &mut out,
        OptCode::Go,
        OptReply::Info(Info::BlockSize(BlockSize {
            min: 1,
            preferred: 4096,
            max_payload: 32 << 20,
        })),
    );
    rep(&mut out, OptCode::Go, OptReply::Ack);
    (out, tls_at)
}

/// The client's bytes of a negotiation into transmission in `form`: client flags,
/// STARTTLS (unless `tls` is `Off`), extended headers or structured replies, a
/// `SET_META_CONTEXT` for [`CONTEXTS`] (not in simple form), then `GO` for the default
/// export asking for the block sizes, name and description.
pub fn client_side(form: Form, tls: TlsPolicy) -> (Vec<u8>, Option<usize>) {
    let mut out = vec![0; ClientFlags::LEN];
    (ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES)
        .emit(&mut out)
        .expect("client flags");
    let mut tls_at = None;
    if tls != TlsPolicy::Off {
        opt(&mut out, &Opt::StartTls);
        tls_at = Some(out.len());
    }
    match form {
        Form::Extended => opt(&mut out, &Opt::ExtendedHeaders),
        Form::Structured => opt(&mut out, &Opt::StructuredReply),
        Form::Simple => {}
    }
    if form != Form::Simple {
        opt(
            &mut out,
            &Opt::SetMetaContext(MetaContextRequest {
                export: "",
                queries: Queries::new(&CONTEXTS),
            }),
        );
    }
    let infos = [InfoType::BlockSize, InfoType::Name, InfoType::Description];
    opt(
        &mut out,
        &Opt::Go(ExportRequest {
            name: "",
            infos: InfoList::new(&infos),
        }),
    );
    (out, tls_at)
}
