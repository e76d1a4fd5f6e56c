//! The handshake and option phase (proto.md "Handshake", "Option types", "Option reply
//! types"; spec digest 3.3-3.5): greeting detection, client flags, the option sequence of
//! automatic mode, the `opt_*` calls of manual mode, and the checks on every option reply.

use arrayvec::ArrayVec;

use super::{Client, Event, ExportInfo, OptRefusal, Phase};
#[cfg(feature = "adversarial")]
use crate::adversarial::ClientChecks;
use crate::common::{Handled, TlsPolicy, Transmit};
use crate::error::{Error, Incompatible, Misbehavior, Misuse};
use crate::wire::{
    self, ClientFlags, ExportNameReply, ExportRequest, HandshakeFlags, Hello, Info, InfoList,
    InfoType, MetaContextRequest, Opt, OptCode, OptError, OptReply, OptReplyHeader, Queries,
    ReplyType, MAX_STRING_LEN,
};

/// An option queued or awaiting its final reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pending {
    pub(crate) code: OptCode,
    /// `poll_transmit` wrote it.
    pub(crate) sent: bool,
    /// For INFO/GO: ask for `NBD_INFO_BLOCK_SIZE`.
    block_size: bool,
    /// For INFO/GO: ask for `NBD_INFO_NAME` and `NBD_INFO_DESCRIPTION`.
    name_and_description: bool,
}

/// Negotiation state.
#[derive(Debug, Clone)]
pub(crate) struct Nego {
    /// Handshake flags the server offered.
    pub(crate) offered: HandshakeFlags,
    /// Both sides speak fixed newstyle.
    fixed: bool,
    /// Both sides set NO_ZEROES (the `NBD_OPT_EXPORT_NAME` reply is 10 bytes).
    no_zeroes: bool,
    /// The client flags are queued and not sent yet.
    flags_out: bool,
    pending: Option<Pending>,
    /// Some option reply arrived since the greeting.
    got_reply: bool,
    /// `disconnect()` was called while an option was on the wire.
    abort_requested: bool,
    /// What the current `NBD_OPT_INFO`/`NBD_OPT_GO` taught us.
    scratch: Scratch,
    /// Ask for `NBD_INFO_BLOCK_SIZE` in the next INFO/GO (config, or a
    /// `NBD_REP_ERR_BLOCK_SIZE_REQD` retry).
    block_size_in_go: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct Scratch {
    export: Option<(u64, wire::TransmissionFlags)>,
    block_size: Option<wire::BlockSize>,
}

impl Nego {
    pub(crate) fn new(request_block_size: bool) -> Self {
        Self {
            offered: HandshakeFlags::empty(),
            fixed: false,
            no_zeroes: false,
            flags_out: false,
            pending: None,
            got_reply: false,
            abort_requested: false,
            scratch: Scratch::default(),
            block_size_in_go: request_block_size,
        }
    }

    /// Length of the next reply frame's fixed part, if a reply is expected.
    pub(crate) fn reply_len(&self) -> Option<usize> {
        let p = self.pending?;
        Some(match p.code {
            OptCode::ExportName if self.no_zeroes => ExportNameReply::SHORT_LEN,
            OptCode::ExportName => ExportNameReply::LONG_LEN,
            _ => OptReplyHeader::LEN,
        })
    }

    /// Messages queued and not sent yet: the client flags and the pending option.
    #[cfg(feature = "adversarial")]
    pub(crate) fn unsent_messages(&self) -> u64 {
        u64::from(self.flags_out) + u64::from(self.pending.is_some_and(|p| !p.sent))
    }

    /// `NBD_OPT_ABORT` went out: end of file is now a clean end.
    pub(crate) fn abort_sent(&self) -> bool {
        matches!(
            self.pending,
            Some(Pending {
                code: OptCode::Abort,
                sent: true,
                ..
            })
        )
    }

    /// The error for an end of file at a message boundary during negotiation.
    pub(crate) fn eof_error(&self) -> Error {
        match self.pending {
            Some(Pending {
                code: OptCode::ExportName,
                sent: true,
                ..
            }) => Incompatible::ExportRefused.into(),
            Some(Pending { sent: true, .. }) if !self.got_reply => {
                Incompatible::ClientFlagsRefused.into()
            }
            _ => Error::UnexpectedEof,
        }
    }
}

/// Largest data length accepted for each reply type to each option, checked before the
/// data is buffered; `None` if that reply type is not a valid answer to the option.
fn reply_cap(opt: OptCode, reply: ReplyType) -> Option<usize> {
    match reply {
        ReplyType::Ack => Some(0),
        ReplyType::Server if opt == OptCode::List => Some(4 + 2 * MAX_STRING_LEN),
        ReplyType::Info if matches!(opt, OptCode::Info | OptCode::Go) => Some(2 + MAX_STRING_LEN),
        ReplyType::MetaContext
            if matches!(opt, OptCode::ListMetaContext | OptCode::SetMetaContext) =>
        {
            Some(4 + MAX_STRING_LEN)
        }
        ReplyType::Error(_) => Some(MAX_STRING_LEN),
        _ => None,
    }
}

/// What automatic mode does after an option's final reply.
enum Next {
    Queue(OptCode),
    /// Wait (for `tls_established`, or for the application in manual mode).
    Wait,
    /// Give up: queue `NBD_OPT_ABORT` and die with this error.
    Fail(Error),
}

impl<const N: usize> Client<N> {
    // ---- manual mode options ----

    /// Manual mode: `NBD_OPT_LIST`. Exports come as [`Event::Export`], then
    /// [`Event::OptionDone`].
    pub fn opt_list(&mut self) -> Result<(), Error> {
        self.manual_opt(OptCode::List)
    }

    /// Manual mode: `NBD_OPT_INFO` for `name`, asking for the information types the
    /// configuration asks for. Records come as [`Event::Info`], then
    /// [`Event::OptionDone`].
    pub fn opt_info(&mut self, name: &str) -> Result<(), Error> {
        self.manual_check(OptCode::Info)?;
        self.strings.set(name, &[])?;
        self.manual_opt(OptCode::Info)
    }

    /// Manual mode: `NBD_OPT_GO` for `name`. Records come as [`Event::Info`], then
    /// [`Event::Ready`] (or [`Event::OptionDone`] with the refusal).
    pub fn opt_go(&mut self, name: &str) -> Result<(), Error> {
        self.manual_check(OptCode::Go)?;
        self.strings.set(name, &[])?;
        self.manual_opt(OptCode::Go)
    }

    /// Manual mode: `NBD_OPT_EXPORT_NAME` for `name` (old servers). [`Event::Ready`]
    /// follows, or end of file ([`Incompatible::ExportRefused`]). Not allowed after
    /// extended headers were negotiated.
    pub fn opt_export_name(&mut self, name: &str) -> Result<(), Error> {
        self.manual_check(OptCode::ExportName)?;
        self.strings.set(name, &[])?;
        self.manual_opt(OptCode::ExportName)
    }

    /// Manual mode: `NBD_OPT_STRUCTURED_REPLY`.
    pub fn opt_structured_reply(&mut self) -> Result<(), Error> {
        self.manual_opt(OptCode::StructuredReply)
    }

    /// Manual mode: `NBD_OPT_EXTENDED_HEADERS`.
    pub fn opt_extended_headers(&mut self) -> Result<(), Error> {
        self.manual_opt(OptCode::ExtendedHeaders)
    }

    /// Manual mode: `NBD_OPT_LIST_META_CONTEXT` for `export` with `queries` (empty: all
    /// contexts). Contexts come as [`Event::MetaContext`], then [`Event::OptionDone`].
    pub fn opt_list_meta_context(&mut self, export: &str, queries: &[&str]) -> Result<(), Error> {
        self.manual_check(OptCode::ListMetaContext)?;
        self.strings.set(export, queries)?;
        self.manual_opt(OptCode::ListMetaContext)
    }

    /// Manual mode: `NBD_OPT_SET_META_CONTEXT` for `export` with `queries`. The selected
    /// contexts come as [`Event::MetaContext`] and are kept ([`contexts`](Self::contexts))
    /// if [`Event::OptionDone`] reports success. Needs structured replies or extended
    /// headers first; `NBD_CMD_BLOCK_STATUS` needs the same export in `NBD_OPT_GO`.
    pub fn opt_set_meta_context(&mut self, export: &str, queries: &[&str]) -> Result<(), Error> {
        self.manual_check(OptCode::SetMetaContext)?;
        self.strings.set(export, queries)?;
        self.manual_opt(OptCode::SetMetaContext)
    }

    /// Manual mode: `NBD_OPT_STARTTLS`. Success comes as [`Event::StartTls`].
    pub fn opt_starttls(&mut self) -> Result<(), Error> {
        self.manual_opt(OptCode::StartTls)
    }

    /// Manual mode: `NBD_OPT_ABORT`. The session then ends ([`State::Closed`](super::State)
    /// on the acknowledgement or on end of file).
    pub fn opt_abort(&mut self) -> Result<(), Error> {
        self.manual_opt(OptCode::Abort)
    }

    /// Checks that manual option `code` may be sent now. Nothing changes.
    fn manual_check(&self, code: OptCode) -> Result<(), Error> {
        self.check_open()?;
        if !self.config.manual
            || self.phase != Phase::Negotiating
            || self.nego.pending.is_some()
            || self.nego.abort_requested
        {
            return Err(Misuse::WrongState.into());
        }
        if !enforced!(self, ClientChecks::OPTIONS) {
            return Ok(());
        }
        if !self.nego.fixed && !matches!(code, OptCode::ExportName | OptCode::Abort) {
            return Err(Misuse::NotNegotiated("fixed newstyle").into());
        }
        match code {
            // proto.md: EXPORT_NAME is forbidden once extended headers were acknowledged.
            OptCode::ExportName if self.eh => Err(Misuse::WrongState.into()),
            // proto.md: a client MUST NOT send STARTTLS when TLS is already up.
            OptCode::StartTls if self.tls_active => Err(Misuse::WrongState.into()),
            // proto.md: SET_META_CONTEXT MUST only be sent after structured replies.
            OptCode::SetMetaContext if !self.sr => {
                Err(Misuse::NotNegotiated("structured replies").into())
            }
            _ => Ok(()),
        }
    }

    fn manual_opt(&mut self, code: OptCode) -> Result<(), Error> {
        self.manual_check(code)?;
        self.queue(code);
        Ok(())
    }

    /// `disconnect()` during negotiation.
    pub(super) fn request_abort(&mut self) -> Result<(), Error> {
        if self.nego.abort_requested {
            return Err(Misuse::WrongState.into());
        }
        match self.nego.pending {
            Some(Pending {
                code: OptCode::Abort,
                ..
            }) => Err(Misuse::WrongState.into()),
            // Not on the wire yet: send ABORT in its place.
            Some(Pending { sent: false, .. }) if self.phase == Phase::Negotiating => {
                self.queue(OptCode::Abort);
                Ok(())
            }
            None if self.phase == Phase::Negotiating => {
                self.queue(OptCode::Abort);
                Ok(())
            }
            // Greeting not seen yet, TLS being set up, or an option awaiting its reply:
            // ABORT goes out as soon as it may.
            _ => {
                self.nego.abort_requested = true;
                Ok(())
            }
        }
    }

    /// Queues option `code` (or `NBD_OPT_ABORT` if a disconnect was requested).
    fn queue(&mut self, code: OptCode) {
        let code = if self.nego.abort_requested {
            OptCode::Abort
        } else {
            code
        };
        if matches!(code, OptCode::Info | OptCode::Go) {
            self.nego.scratch = Scratch::default();
        }
        if code == OptCode::SetMetaContext {
            // proto.md: each SET replaces the previous selection, even if it fails.
            self.contexts.clear();
        }
        self.nego.pending = Some(Pending {
            code,
            sent: false,
            block_size: self.nego.block_size_in_go,
            name_and_description: self.config.request_name_and_description,
        });
    }

    /// Automatic mode, once TLS is settled (or not wanted): the first stateful option.
    pub(super) fn after_tls(&mut self) {
        if self.nego.abort_requested {
            self.queue(OptCode::Abort);
        } else if self.config.manual {
            // The application drives.
        } else if self.config.extended_headers {
            self.queue(OptCode::ExtendedHeaders);
        } else if self.config.structured_replies {
            self.queue(OptCode::StructuredReply);
        } else {
            self.queue_meta_or_go();
        }
    }

    fn queue_meta_or_go(&mut self) {
        if self.sr && self.strings.has_queries() {
            self.queue(OptCode::SetMetaContext);
        } else {
            self.queue(OptCode::Go);
        }
    }

    // ---- input ----

    /// `Phase::Greeting`: the oldstyle hello or the newstyle greeting.
    pub(super) fn on_greeting<'i>(&mut self, input: &'i [u8]) -> Result<Handled<Event<'i>>, Error> {
        let hello = match Hello::parse(input) {
            Ok(h) => h,
            Err(wire::Error::Truncated { needed }) => {
                // Below 16 bytes the style is unknown: the 18-byte greeting is the floor.
                self.peek = Some((input.len() + needed).max(wire::Greeting::LEN));
                return Ok(Handled::none());
            }
            Err(e) => return Err(Error::Malformed(e)),
        };
        match hello {
            Hello::Oldstyle(h) => {
                if !h.handshake_flags.is_empty() {
                    return Err(
                        Misbehavior::OldstyleHandshakeFlags(h.handshake_flags.bits()).into(),
                    );
                }
                if self.config.tls == TlsPolicy::Required && !self.config.manual {
                    return Err(Incompatible::TlsUnavailable.into());
                }
                let ready = self.enter_ready(ExportInfo {
                    size: h.size,
                    flags: h.transmission_flags,
                    block_size: None,
                });
                self.deferred = Some(ready);
                Ok(Handled::new(
                    h.buffer_len(),
                    Some(Event::Greeting {
                        oldstyle: true,
                        flags: HandshakeFlags::empty(),
                    }),
                ))
            }
            Hello::Newstyle(g) => {
                let offered = g.flags;
                self.nego.offered = offered;
                self.nego.fixed = offered.contains(HandshakeFlags::FIXED_NEWSTYLE);
                self.nego.no_zeroes = offered.contains(HandshakeFlags::NO_ZEROES);
                if !self.nego.fixed && self.config.tls == TlsPolicy::Required && !self.config.manual
                {
                    // No STARTTLS without fixed newstyle, and no way to say goodbye.
                    return Err(Incompatible::TlsUnavailable.into());
                }
                self.nego.flags_out = true;
                self.phase = Phase::Negotiating;
                if self.nego.abort_requested {
                    self.nego.abort_requested = false;
                    self.queue(OptCode::Abort);
                } else if !self.config.manual {
                    if !self.nego.fixed {
                        // proto.md: non-fixed newstyle knows only NBD_OPT_EXPORT_NAME.
                        self.queue(OptCode::ExportName);
                    } else if self.config.tls != TlsPolicy::Off {
                        self.queue(OptCode::StartTls);
                    } else {
                        self.after_tls();
                    }
                }
                Ok(Handled::new(
                    g.buffer_len(),
                    Some(Event::Greeting {
                        oldstyle: false,
                        flags: offered,
                    }),
                ))
            }
        }
    }

    /// `Phase::Negotiating`: one option reply (or the `NBD_OPT_EXPORT_NAME` reply).
    pub(super) fn on_option_reply<'i>(
        &mut self,
        input: &'i [u8],
    ) -> Result<Handled<Event<'i>>, Error> {
        let pending = match self.nego.pending {
            Some(p) if p.sent => Some(p),
            _ => None,
        };
        if let Some(Pending {
            code: OptCode::ExportName,
            ..
        }) = pending
        {
            return self.on_export_name_reply(input);
        }
        let header = match OptReplyHeader::parse(input) {
            Ok(h) => h,
            Err(wire::Error::Truncated { .. }) => return Ok(Handled::none()),
            Err(e) => return Err(Error::Malformed(e)),
        };
        let Some(pending) = pending else {
            return Err(Misbehavior::UnsolicitedOptionReply(header.opt).into());
        };
        let opt = pending.code;
        if header.opt != opt {
            return Err(Misbehavior::ReplyToWrongOption {
                sent: opt,
                answered: header.opt,
            }
            .into());
        }
        let cap = reply_cap(opt, header.reply).ok_or(Misbehavior::UnexpectedOptionReply {
            opt,
            reply: header.reply,
        })?;
        if usize::try_from(header.len).map_or(true, |len| len > cap) {
            return Err(Misbehavior::OptionReplyTooLong {
                opt,
                len: header.len,
            }
            .into());
        }
        // invariant: header.len <= cap <= 8196, so this cannot overflow.
        let end = OptReplyHeader::LEN + header.len as usize;
        let Some(data) = input.get(OptReplyHeader::LEN..end) else {
            self.peek = Some(end);
            return Ok(Handled::none());
        };
        let reply = OptReply::parse(header.reply, data).map_err(Error::Malformed)?;
        self.nego.got_reply = true;
        let event = match reply {
            OptReply::Server { name, description } => Event::Export { name, description },
            OptReply::Info(info) => {
                self.on_info(&info)?;
                Event::Info(info)
            }
            OptReply::MetaContext { id, name } => {
                // proto.md: a context name is `namespace:leaf` with a non-empty namespace.
                if name.find(':').is_none_or(|i| i == 0) {
                    return Err(Misbehavior::InvalidContextName.into());
                }
                if opt == OptCode::SetMetaContext {
                    if self.contexts.contains(&id) {
                        return Err(Misbehavior::DuplicateContextId(id).into());
                    }
                    self.contexts
                        .try_push(id)
                        .map_err(|_| Misbehavior::TooManyContexts {
                            limit: super::MAX_CONTEXTS,
                        })?;
                }
                Event::MetaContext { id, name }
            }
            OptReply::Ack => return self.on_ack(opt, input, end),
            OptReply::Error { error, message } => {
                return Ok(Handled::new(
                    end,
                    Some(self.on_refusal(opt, error, message)),
                ));
            }
            // invariant: reply_cap() refused unknown reply types.
            OptReply::Unknown { .. } => {
                return Err(Misbehavior::UnexpectedOptionReply {
                    opt,
                    reply: header.reply,
                }
                .into())
            }
        };
        Ok(Handled::new(end, Some(event)))
    }

    fn on_info(&mut self, info: &Info<'_>) -> Result<(), Error> {
        match *info {
            Info::Export { size, flags } => self.nego.scratch.export = Some((size, flags)),
            Info::BlockSize(b) => {
                b.validate().map_err(Misbehavior::InvalidBlockSize)?;
                self.nego.scratch.block_size = Some(b);
            }
            // Names and descriptions are for the application; unknown types are ignored
            // (proto.md: clients MUST ignore unknown information types). A repeated record
            // breaks only a SHOULD, so the last one wins.
            Info::Name(_) | Info::Description(_) | Info::Unknown { .. } => {}
        }
        Ok(())
    }

    /// `NBD_REP_ACK` to `opt`, which ended at `end` in `input`.
    fn on_ack<'i>(
        &mut self,
        opt: OptCode,
        input: &'i [u8],
        end: usize,
    ) -> Result<Handled<Event<'i>>, Error> {
        self.nego.pending = None;
        let event = match opt {
            OptCode::StartTls => {
                // proto.md: after the ACK the next bytes are the TLS handshake, which the
                // client starts; anything already here was injected in plaintext.
                if input.len() > end {
                    return Err(Misbehavior::DataAfterStartTls.into());
                }
                self.phase = Phase::StartTls;
                return Ok(Handled::new(end, Some(Event::StartTls)));
            }
            OptCode::Go | OptCode::Info => {
                let (size, flags) = self
                    .nego
                    .scratch
                    .export
                    .ok_or(Misbehavior::InfoWithoutExport)?;
                if opt == OptCode::Go {
                    let info = ExportInfo {
                        size,
                        flags,
                        block_size: self.nego.scratch.block_size,
                    };
                    return Ok(Handled::new(end, Some(self.enter_ready(info))));
                }
                Event::OptionDone {
                    opt,
                    result: Ok(()),
                }
            }
            OptCode::ExtendedHeaders => {
                // Extended headers imply structured replies (proto.md).
                self.eh = true;
                self.sr = true;
                Event::OptionDone {
                    opt,
                    result: Ok(()),
                }
            }
            OptCode::StructuredReply => {
                self.sr = true;
                Event::OptionDone {
                    opt,
                    result: Ok(()),
                }
            }
            OptCode::Abort => {
                self.phase = Phase::Closed;
                return Ok(Handled::new(
                    end,
                    Some(Event::OptionDone {
                        opt,
                        result: Ok(()),
                    }),
                ));
            }
            _ => Event::OptionDone {
                opt,
                result: Ok(()),
            },
        };
        let next = if self.config.manual {
            Next::Wait
        } else {
            self.auto_next_after_ack(opt)
        };
        self.apply(next);
        Ok(Handled::new(end, Some(event)))
    }

    fn auto_next_after_ack(&self, opt: OptCode) -> Next {
        match opt {
            OptCode::ExtendedHeaders | OptCode::StructuredReply => {
                if self.sr && self.strings.has_queries() {
                    Next::Queue(OptCode::SetMetaContext)
                } else {
                    Next::Queue(OptCode::Go)
                }
            }
            OptCode::SetMetaContext => Next::Queue(OptCode::Go),
            _ => Next::Wait,
        }
    }

    /// An error reply to `opt`: the event, and what comes next.
    fn on_refusal<'i>(&mut self, opt: OptCode, error: OptError, message: &'i str) -> Event<'i> {
        self.nego.pending = None;
        if opt == OptCode::SetMetaContext {
            // proto.md: on error the client MUST discard the contexts of this reply.
            self.contexts.clear();
        }
        let event = Event::OptionDone {
            opt,
            result: Err(OptRefusal { error, message }),
        };
        if opt == OptCode::Abort {
            self.phase = Phase::Closed;
            return event;
        }
        let next = if self.config.manual {
            Next::Wait
        } else {
            self.auto_next_after_refusal(opt, error)
        };
        self.apply(next);
        event
    }

    fn auto_next_after_refusal(&mut self, opt: OptCode, error: OptError) -> Next {
        let refused = Incompatible::OptionRefused {
            opt,
            reply: ReplyType::Error(error),
        };
        match (opt, error) {
            // proto.md: on NBD_REP_ERR_SHUTDOWN the client MUST soft-disconnect.
            (_, OptError::Shutdown) => Next::Fail(refused.into()),
            (OptCode::StartTls, _) if self.config.tls == TlsPolicy::Required => {
                Next::Fail(Incompatible::TlsUnavailable.into())
            }
            (OptCode::StartTls, _) => {
                self.after_tls();
                Next::Wait
            }
            (_, OptError::TlsReqd) => Next::Fail(Incompatible::TlsRequiredByPeer.into()),
            (OptCode::ExtendedHeaders, _) if self.config.structured_replies => {
                Next::Queue(OptCode::StructuredReply)
            }
            (OptCode::ExtendedHeaders | OptCode::StructuredReply, _) => {
                if self.sr && self.strings.has_queries() {
                    Next::Queue(OptCode::SetMetaContext)
                } else {
                    Next::Queue(OptCode::Go)
                }
            }
            (OptCode::SetMetaContext, _) => Next::Queue(OptCode::Go),
            // proto.md: fall back to EXPORT_NAME for old servers, except after extended
            // headers were acknowledged.
            (OptCode::Go, OptError::Unsup) if !self.eh => Next::Queue(OptCode::ExportName),
            (OptCode::Go, OptError::BlockSizeReqd) if !self.nego.block_size_in_go => {
                self.nego.block_size_in_go = true;
                Next::Queue(OptCode::Go)
            }
            _ => Next::Fail(refused.into()),
        }
    }

    fn apply(&mut self, next: Next) {
        match next {
            Next::Queue(code) => self.queue(code),
            Next::Wait => {
                if self.nego.abort_requested && self.nego.pending.is_none() {
                    self.queue(OptCode::Abort);
                }
            }
            Next::Fail(e) => {
                // A polite goodbye, then the sticky error. The refusal event is still
                // returned to the caller, so the server's message is not lost.
                self.nego.abort_requested = false;
                self.queue(OptCode::Abort);
                self.phase = Phase::Dead(e);
            }
        }
    }

    fn on_export_name_reply<'i>(&mut self, input: &'i [u8]) -> Result<Handled<Event<'i>>, Error> {
        let zeroes = !self.nego.no_zeroes;
        let reply = match ExportNameReply::parse(input, zeroes) {
            Ok(r) => r,
            Err(wire::Error::Truncated { .. }) => return Ok(Handled::none()),
            Err(e) => return Err(Error::Malformed(e)),
        };
        self.nego.pending = None;
        self.nego.got_reply = true;
        let event = self.enter_ready(ExportInfo {
            size: reply.size,
            flags: reply.flags,
            block_size: None,
        });
        Ok(Handled::new(reply.buffer_len(), Some(event)))
    }

    /// Transmission starts with `info`.
    fn enter_ready(&mut self, info: ExportInfo) -> Event<'static> {
        self.export = Some(info);
        self.phase = Phase::Ready;
        if self.nego.abort_requested {
            self.nego.abort_requested = false;
            self.disc_queued = true;
        }
        Event::Ready {
            size: info.size,
            flags: info.flags,
        }
    }

    // ---- output ----

    pub(super) fn transmit_negotiation(
        &mut self,
        out: &mut [u8],
    ) -> Result<Option<Transmit>, Error> {
        let dead = matches!(self.phase, Phase::Dead(_));
        let pending = self.nego.pending.filter(|p| !p.sent);
        if dead && !matches!(pending, Some(p) if p.code == OptCode::Abort) {
            return Ok(None);
        }
        let mut n = 0;
        if self.nego.flags_out {
            let mut flags = ClientFlags::empty();
            flags.set(ClientFlags::FIXED_NEWSTYLE, self.nego.fixed);
            flags.set(ClientFlags::NO_ZEROES, self.nego.no_zeroes);
            n = flags.emit(out).map_err(|_| Error::BufferTooSmall {
                required: ClientFlags::LEN,
            })?;
            self.nego.flags_out = false;
            #[cfg(feature = "adversarial")]
            {
                self.adv.note_sent();
                if self.adv.due() {
                    return Ok(Some(Transmit::Bytes(n)));
                }
            }
        }
        if let Some(p) = pending {
            // invariant: n <= out.len() (emit wrote n bytes into out).
            match self.encode_option(&p, &mut out[n..]) {
                Ok(len) => {
                    n += len;
                    if let Some(p) = self.nego.pending.as_mut() {
                        p.sent = true;
                    }
                    #[cfg(feature = "adversarial")]
                    self.adv.note_sent();
                }
                // The flags went out alone; the option follows on the next call.
                Err(Error::BufferTooSmall { .. }) if n > 0 => {}
                Err(e) => return Err(e),
            }
        }
        Ok((n > 0).then_some(Transmit::Bytes(n)))
    }

    fn encode_option(&self, p: &Pending, out: &mut [u8]) -> Result<usize, Error> {
        let mut infos: ArrayVec<InfoType, 3> = ArrayVec::new();
        if p.block_size {
            infos.push(InfoType::BlockSize);
        }
        if p.name_and_description {
            infos.push(InfoType::Name);
            infos.push(InfoType::Description);
        }
        let queries = self.strings.queries();
        let name = self.strings.export();
        let export_request = ExportRequest {
            name,
            infos: InfoList::new(&infos),
        };
        let meta = MetaContextRequest {
            export: name,
            queries: Queries::new(&queries),
        };
        let opt = match p.code {
            OptCode::ExportName => Opt::ExportName { name },
            OptCode::Abort => Opt::Abort,
            OptCode::List => Opt::List,
            OptCode::StartTls => Opt::StartTls,
            OptCode::Info => Opt::Info(export_request),
            OptCode::Go => Opt::Go(export_request),
            OptCode::StructuredReply => Opt::StructuredReply,
            OptCode::ListMetaContext => Opt::ListMetaContext(meta),
            OptCode::SetMetaContext => Opt::SetMetaContext(meta),
            OptCode::ExtendedHeaders => Opt::ExtendedHeaders,
            OptCode::Unknown(code) => Opt::Unknown { code, data: &[] },
        };
        let required = opt.buffer_len();
        if out.len() < required {
            return Err(Error::BufferTooSmall { required });
        }
        // invariant: the strings were checked when stored, so only the room could fail.
        opt.emit(out).map_err(|e| Misuse::Encode(e).into())
    }
}
