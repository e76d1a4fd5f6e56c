//! Option haggling (proto.md "Option haggling"): what the machine answers on its own, and
//! the `answer_*` calls through which the application answers the rest.

use super::*;

impl<const N: usize, const B: usize> Server<N, B> {
    /// Reads one option (header and data) and handles it.
    pub(super) fn read_option<'i>(
        &mut self,
        input: &'i [u8],
    ) -> Result<Handled<ServerEvent<'i>>, Error> {
        // Option replies of one option are queued at once; a caller that has not sent the
        // last ones yet must do so first (the drain contract).
        if !self.out.is_empty() {
            return Err(Misuse::TransmitPending.into());
        }
        let header = match OptHeader::parse(input) {
            Ok(h) => h,
            Err(wire::Error::Truncated { needed }) => {
                return Ok(self.incomplete(input, input.len() + needed))
            }
            Err(e) => return Err(Error::Malformed(e)),
        };
        let code = header.code;
        if header.len > self.config.max_option_len {
            // proto.md: a server MAY hard-disconnect a client it judges to be a denial of
            // service; below that limit the data is skipped in bounded memory.
            if u64::from(header.len) > self.config.max_discard || code == OptCode::ExportName {
                return Err(Misbehavior::OptionTooLong {
                    opt: code,
                    len: header.len,
                }
                .into());
            }
            self.input = Input::Discard {
                left: header.len.into(),
                then: Refusal::OptionTooBig {
                    code,
                    len: header.len,
                },
            };
            return Ok(Handled::new(OptHeader::LEN, None));
        }
        // invariant: max_option_len is a u32, so this cannot overflow.
        let end = OptHeader::LEN + header.len as usize;
        let Some(data) = input.get(OptHeader::LEN..end) else {
            return Ok(self.incomplete(input, end));
        };
        let event = self.option(code, data, input.len() > end)?;
        Ok(Handled::new(end, event))
    }

    fn option<'i>(
        &mut self,
        code: OptCode,
        data: &'i [u8],
        more: bool,
    ) -> Result<Option<ServerEvent<'i>>, Error> {
        // NBD_OPT_EXPORT_NAME has no way to report an error: refusing it means closing.
        if code == OptCode::ExportName {
            if self.config.tls == TlsPolicy::Required && !self.tls_active {
                return Err(Incompatible::TlsRequiredByUs.into());
            }
            if self.shutting_down {
                self.close();
                return Ok(None);
            }
        } else if self.shutting_down && code != OptCode::Abort {
            self.opt_error(
                code,
                OptError::Shutdown,
                format_args!("server is shutting down"),
            )?;
            return Ok(None);
        } else if self.config.tls == TlsPolicy::Required
            && !self.tls_active
            && !matches!(code, OptCode::StartTls | OptCode::Abort)
        {
            // proto.md (FORCEDTLS): every option but STARTTLS and ABORT gets TLS_REQD.
            self.opt_error(code, OptError::TlsReqd, format_args!("TLS is required"))?;
            return Ok(None);
        }
        let opt = match Opt::parse(code, data) {
            Ok(opt) => opt,
            Err(e) if code == OptCode::ExportName => return Err(Error::Malformed(e)),
            Err(e) => {
                self.opt_error(code, OptError::Invalid, format_args!("{e}"))?;
                return Ok(None);
            }
        };
        match opt {
            Opt::ExportName { name } => {
                // proto.md: after extended headers the client MUST NOT use EXPORT_NAME.
                if self.extended {
                    return Err(Misbehavior::ExportNameAfterExtendedHeaders.into());
                }
                self.pending = Pending::Export {
                    kind: ExportQueryKind::ExportName,
                    name: false,
                    description: false,
                    block_size: false,
                    export: name_hash(name),
                };
                Ok(Some(ServerEvent::Export(ExportQuery {
                    kind: ExportQueryKind::ExportName,
                    name,
                    infos: InfoList::new(&[]),
                })))
            }
            Opt::Abort => {
                // proto.md: the server MUST reply with an ACK, then close.
                self.opt_reply(code, &OptReply::Ack)?;
                self.close();
                Ok(None)
            }
            Opt::List => {
                self.pending = Pending::List;
                Ok(Some(ServerEvent::List))
            }
            Opt::StartTls => self.starttls(more),
            Opt::Info(req) | Opt::Go(req) => {
                let kind = if code == OptCode::Go {
                    ExportQueryKind::Go
                } else {
                    ExportQueryKind::Info
                };
                self.pending = Pending::Export {
                    kind,
                    name: req.infos.contains(InfoType::Name),
                    description: req.infos.contains(InfoType::Description),
                    block_size: req.infos.contains(InfoType::BlockSize),
                    export: name_hash(req.name),
                };
                Ok(Some(ServerEvent::Export(ExportQuery {
                    kind,
                    name: req.name,
                    infos: req.infos,
                })))
            }
            Opt::StructuredReply => {
                if !self.config.structured_replies {
                    self.opt_error(
                        code,
                        OptError::Unsup,
                        format_args!("structured replies are disabled"),
                    )?;
                } else if self.extended {
                    // proto.md: after extended headers, a server that will not downgrade
                    // answers EXT_HEADER_REQD.
                    self.opt_error(
                        code,
                        OptError::ExtHeaderReqd,
                        format_args!("extended headers are already in use"),
                    )?;
                } else {
                    self.structured = true;
                    self.opt_reply(code, &OptReply::Ack)?;
                }
                Ok(None)
            }
            Opt::ExtendedHeaders => {
                // Extended headers imply structured replies: a server configured without
                // the latter refuses the former too.
                if self.config.extended_headers && self.config.structured_replies {
                    self.extended = true;
                    self.structured = true;
                    self.opt_reply(code, &OptReply::Ack)?;
                } else {
                    self.opt_error(
                        code,
                        OptError::Unsup,
                        format_args!("extended headers are disabled"),
                    )?;
                }
                Ok(None)
            }
            Opt::ListMetaContext(req) | Opt::SetMetaContext(req) => {
                let set = code == OptCode::SetMetaContext;
                if set {
                    // proto.md: each SET replaces the previous selection, even if it fails.
                    self.contexts.clear();
                    self.contexts_export = None;
                }
                if !self.structured {
                    self.opt_error(
                        code,
                        OptError::Invalid,
                        format_args!("structured replies must be negotiated first"),
                    )?;
                    return Ok(None);
                }
                self.pending = Pending::Meta {
                    set,
                    export: name_hash(req.export),
                };
                Ok(Some(ServerEvent::MetaContexts(MetaContextQuery {
                    set,
                    export: req.export,
                    queries: req.queries,
                })))
            }
            Opt::Unknown { code, .. } => {
                self.opt_error(
                    OptCode::from(code),
                    OptError::Unsup,
                    format_args!("unknown option {code}"),
                )?;
                Ok(None)
            }
        }
    }

    fn starttls<'i>(&mut self, more: bool) -> Result<Option<ServerEvent<'i>>, Error> {
        let code = OptCode::StartTls;
        if self.config.tls == TlsPolicy::Off {
            self.opt_error(
                code,
                OptError::Policy,
                format_args!("TLS is not configured"),
            )?;
            return Ok(None);
        }
        if self.tls_active {
            self.opt_error(
                code,
                OptError::Invalid,
                format_args!("TLS is already active"),
            )?;
            return Ok(None);
        }
        if !self.client_flags.contains(ClientFlags::FIXED_NEWSTYLE) {
            self.opt_error(
                code,
                OptError::Invalid,
                format_args!("TLS needs fixed newstyle negotiation"),
            )?;
            return Ok(None);
        }
        // proto.md: after the ACK the next bytes are the TLS handshake. Bytes the client
        // sent behind STARTTLS would be plaintext accepted as if protected (the nbdkit
        // CVE-2021-3716 class): refuse them.
        if more {
            return Err(Misbehavior::DataAfterStartTls.into());
        }
        self.opt_reply(code, &OptReply::Ack)?;
        // proto.md: the server MUST forget everything negotiated before TLS.
        self.structured = false;
        self.extended = false;
        self.contexts.clear();
        self.contexts_export = None;
        self.input = Input::AwaitTls;
        self.state = State::StartTls;
        Ok(Some(ServerEvent::StartTls))
    }

    // ---- (C) answers to negotiation events ----

    /// Answers [`ServerEvent::List`] with one export. Call once per export, draining the
    /// output in between if there are many, then [`Server::answer_ack`].
    pub fn answer_list_entry(&mut self, name: &str, description: &str) -> Result<(), Error> {
        self.live()?;
        if self.pending != Pending::List {
            return Err(Misuse::WrongState.into());
        }
        self.opt_reply(OptCode::List, &OptReply::Server { name, description })
    }

    /// Answers [`ServerEvent::MetaContexts`] with one context. For `SET`, `id` is the ID the
    /// client will use in block-status requests: choose a stable one per context (the
    /// [`ServerEvent::Request`] replies name it). For `LIST` the ID is sent as 0.
    pub fn answer_meta_context(&mut self, id: u32, name: &str) -> Result<(), Error> {
        self.live()?;
        let Pending::Meta { set, .. } = self.pending else {
            return Err(Misuse::WrongState.into());
        };
        let checked = enforced!(self, ServerChecks::META_CONTEXTS);
        if checked && !name.contains(':') {
            return Err(Misuse::BadReply("a metadata context name needs a namespace").into());
        }
        if set {
            if checked && self.contexts.contains(&id) {
                return Err(Misuse::BadReply("metadata context ID used twice").into());
            }
            if self.contexts.is_full() {
                return Err(Misuse::BadReply(
                    "too many metadata contexts: answer NBD_REP_ERR_TOO_BIG",
                )
                .into());
            }
        }
        let code = if set {
            OptCode::SetMetaContext
        } else {
            OptCode::ListMetaContext
        };
        self.opt_reply(
            code,
            &OptReply::MetaContext {
                id: if set { id } else { 0 },
                name,
            },
        )?;
        if set {
            // invariant: checked not full above.
            let _ = self.contexts.try_push(id);
        }
        Ok(())
    }

    /// Ends the answer to [`ServerEvent::List`] or [`ServerEvent::MetaContexts`] with
    /// `NBD_REP_ACK`.
    pub fn answer_ack(&mut self) -> Result<(), Error> {
        self.live()?;
        let code = match self.pending {
            Pending::List => OptCode::List,
            Pending::Meta { set: false, .. } => OptCode::ListMetaContext,
            Pending::Meta { set: true, .. } => OptCode::SetMetaContext,
            _ => return Err(Misuse::WrongState.into()),
        };
        self.opt_reply(code, &OptReply::Ack)?;
        if let Pending::Meta { set: true, export } = self.pending {
            self.contexts_export = Some(export);
        }
        self.pending = Pending::None;
        Ok(())
    }

    /// Refuses the option of the last event with an error and a message ("" for none).
    /// Refusing `NBD_OPT_EXPORT_NAME` closes the session, as the protocol has no other way.
    pub fn answer_error(&mut self, error: OptError, message: &str) -> Result<(), Error> {
        self.live()?;
        let code = match self.pending {
            Pending::None => return Err(Misuse::WrongState.into()),
            Pending::List => OptCode::List,
            Pending::Meta { set: false, .. } => OptCode::ListMetaContext,
            Pending::Meta { set: true, .. } => {
                self.contexts.clear();
                OptCode::SetMetaContext
            }
            Pending::Export {
                kind: ExportQueryKind::ExportName,
                ..
            } => {
                self.pending = Pending::None;
                self.close();
                return Ok(());
            }
            Pending::Export {
                kind: ExportQueryKind::Info,
                ..
            } => OptCode::Info,
            Pending::Export {
                kind: ExportQueryKind::Go,
                ..
            } => OptCode::Go,
        };
        self.opt_reply(code, &OptReply::Error { error, message })?;
        self.pending = Pending::None;
        Ok(())
    }

    /// Answers [`ServerEvent::Export`]: the export exists and looks like `info`. For
    /// `NBD_OPT_GO` and `NBD_OPT_EXPORT_NAME` transmission starts.
    ///
    /// The machine sends `NBD_INFO_EXPORT`, the name and description if the client asked
    /// for them and `info` has them, and the block sizes whenever `info` has them (the spec
    /// wants non-default constraints advertised). It refuses on its own where the spec
    /// says so: `NBD_REP_ERR_TLS_REQD` for a TLS-only export before TLS, and
    /// `NBD_REP_ERR_BLOCK_SIZE_REQD` when `info.require_block_size` and the client did not
    /// ask for the block sizes (after sending them, to save a round trip).
    pub fn answer_export(&mut self, info: &ExportInfo<'_>) -> Result<(), Error> {
        self.live()?;
        let Pending::Export {
            kind,
            name,
            description,
            block_size,
            export,
        } = self.pending
        else {
            return Err(Misuse::WrongState.into());
        };
        let code = match kind {
            ExportQueryKind::Info => OptCode::Info,
            ExportQueryKind::Go => OptCode::Go,
            ExportQueryKind::ExportName => OptCode::ExportName,
        };
        let state = self.export_state(info, Some(export))?;
        if let Some(s) = info.name {
            wire::check_str(s, "export name").map_err(Misuse::Encode)?;
        }
        if let Some(s) = info.description {
            wire::check_str(s, "description").map_err(Misuse::Encode)?;
        }
        // Before TLS, a TLS-only export must look like it needs TLS (SELECTIVETLS).
        let refuse_tls = info.tls_only && !self.tls_active && self.config.tls != TlsPolicy::Off;
        let refuse_size = info.require_block_size && !block_size;
        if kind == ExportQueryKind::ExportName {
            if refuse_tls || refuse_size {
                self.pending = Pending::None;
                self.close();
                return Ok(());
            }
            let zeroes = !(self.client_flags.contains(ClientFlags::NO_ZEROES)
                && self.offered.contains(HandshakeFlags::NO_ZEROES));
            let reply = ExportNameReply {
                size: info.size,
                flags: state.flags,
                zeroes,
            };
            self.out.push_with(reply.buffer_len(), |b| reply.emit(b))?;
            self.pending = Pending::None;
            self.enter_transmission(state, export);
            return Ok(());
        }
        if refuse_tls {
            self.opt_reply(
                code,
                &OptReply::Error {
                    error: OptError::TlsReqd,
                    message: "this export needs TLS",
                },
            )?;
            self.pending = Pending::None;
            return Ok(());
        }
        let mut replies: ArrayVec<OptReply<'_>, 5> = ArrayVec::new();
        let size_info = info.block_size.map(|b| OptReply::Info(Info::BlockSize(b)));
        if refuse_size && kind == ExportQueryKind::Go {
            replies.extend(size_info);
            replies.push(OptReply::Error {
                error: OptError::BlockSizeReqd,
                message: "request NBD_INFO_BLOCK_SIZE to use this export",
            });
        } else {
            replies.push(OptReply::Info(Info::Export {
                size: info.size,
                flags: state.flags,
            }));
            if let (true, Some(s)) = (name, info.name) {
                replies.push(OptReply::Info(Info::Name(s)));
            }
            if let (true, Some(s)) = (description, info.description) {
                replies.push(OptReply::Info(Info::Description(s)));
            }
            replies.extend(size_info);
            replies.push(OptReply::Ack);
        }
        let total: usize = replies.iter().map(OptReply::buffer_len).sum();
        if total > B {
            return Err(Misuse::OptionTooLarge(total).into());
        }
        if total > self.out.free() {
            return Err(Misuse::TransmitPending.into());
        }
        for reply in &replies {
            self.opt_reply(code, reply)?;
        }
        self.pending = Pending::None;
        if kind == ExportQueryKind::Go && matches!(replies.last(), Some(OptReply::Ack)) {
            self.enter_transmission(state, export);
        }
        Ok(())
    }

    /// The flags, limits and contexts of `info` as this session will serve it.
    pub(super) fn export_state(
        &self,
        info: &ExportInfo<'_>,
        export: Option<u64>,
    ) -> Result<Export, Error> {
        let checked = enforced!(self, ServerChecks::EXPORT_INFO);
        let mut flags = info.flags;
        // proto.md: SEND_DF MUST be clear without structured replies; FAST_ZERO MUST be
        // clear without WRITE_ZEROES; BLOCK_STATUS_PAYLOAD MUST NOT be set without extended
        // headers and SHOULD NOT be without a selected context. RESIZE is not implemented.
        if checked {
            flags.insert(TransmissionFlags::HAS_FLAGS);
            if !self.structured {
                flags.remove(TransmissionFlags::SEND_DF);
            }
            if flags.contains(TransmissionFlags::READ_ONLY) {
                // Nothing can be written: do not advertise ways of writing (as nbdkit -r
                // and qemu-nbd -r do not).
                flags.remove(
                    TransmissionFlags::SEND_TRIM
                        | TransmissionFlags::SEND_WRITE_ZEROES
                        | TransmissionFlags::SEND_FAST_ZERO,
                );
            }
            if !flags.contains(TransmissionFlags::SEND_WRITE_ZEROES) {
                flags.remove(TransmissionFlags::SEND_FAST_ZERO);
            }
            let contexts =
                export.is_some() && self.contexts_export == export && !self.contexts.is_empty();
            if !(self.extended && contexts) {
                flags.remove(TransmissionFlags::BLOCK_STATUS_PAYLOAD);
            }
            flags.remove(TransmissionFlags::SEND_RESIZE);
        }
        let (min_block, max_payload) = match info.block_size {
            Some(b) => {
                if checked {
                    b.validate().map_err(Misuse::BadReply)?;
                }
                (b.min, b.max_payload)
            }
            None => (1, wire::DEFAULT_MAX_PAYLOAD),
        };
        Ok(Export {
            size: info.size,
            flags,
            min_block,
            max_payload,
        })
    }

    fn enter_transmission(&mut self, export: Export, name: u64) {
        if self.contexts_export != Some(name) {
            // proto.md: block status needs a SET_META_CONTEXT for the same export.
            self.contexts.clear();
        }
        self.export = export;
        self.state = State::Transmission;
        self.input = Input::Request;
    }

    /// Ends the session without another byte (after an ABORT's ACK, or a refused export).
    pub(super) fn close(&mut self) {
        self.state = State::Closed;
        self.input = Input::Done;
    }

    pub(super) fn live(&self) -> Result<(), Error> {
        match self.error {
            Some(e) => Err(e),
            None if self.state == State::Closed => Err(Error::Closed),
            None => Ok(()),
        }
    }

    pub(super) fn opt_reply(&mut self, code: OptCode, reply: &OptReply<'_>) -> Result<(), Error> {
        let len = reply.buffer_len();
        if len > B {
            return Err(Misuse::OptionTooLarge(len).into());
        }
        self.out.push_with(len, |b| reply.emit(code, b))
    }

    pub(super) fn opt_error(
        &mut self,
        code: OptCode,
        error: OptError,
        args: fmt::Arguments<'_>,
    ) -> Result<(), Error> {
        let mut buf = [0u8; ERR_MSG_MAX];
        let message = format_msg(&mut buf, args);
        self.opt_reply(code, &OptReply::Error { error, message })
    }
}
