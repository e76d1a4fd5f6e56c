//! The transmission phase (proto.md "Transmission"): request validation, and the
//! `reply_*` calls that frame the application's replies.

use super::*;

impl<const N: usize, const B: usize> Server<N, B> {
    /// Reads one request header (and a payload-form block-status payload) and checks it.
    pub(super) fn read_request<'i>(
        &mut self,
        input: &'i [u8],
    ) -> Result<Handled<ServerEvent<'i>>, Error> {
        // Backpressure: a request is read only when its reply can be tracked and, if the
        // machine must refuse it, queued.
        if self.owed.is_full() || !self.has_reply_room() {
            return Ok(Handled::none());
        }
        let req = match Request::parse(input) {
            Ok(r) => r,
            Err(wire::Error::Truncated { needed }) => {
                return Ok(self.incomplete(input, input.len() + needed))
            }
            Err(e) => return Err(Error::Malformed(e)),
        };
        if req.extended != self.extended {
            return Err(Misbehavior::WrongRequestForm.into());
        }
        let header = req.buffer_len();
        // A write carries its data even without PAYLOAD_LEN under extended headers, which
        // the spec requires but QEMU 10's client omits (QEMU's server proceeds too).
        let payload = req.payload_len();
        if payload > self.config.max_discard {
            return Err(Misbehavior::PayloadTooLong {
                cookie: req.cookie,
                len: payload,
            }
            .into());
        }
        if req.command == Command::Disc {
            // proto.md: finish what is in flight, then close; no reply to DISC itself.
            self.input = Input::Disconnected;
            self.state = if self.owed.is_empty() && self.out.is_empty() {
                State::Closed
            } else {
                State::Disconnecting
            };
            return Ok(Handled::new(header, Some(ServerEvent::Disconnect)));
        }
        if self.owed.iter().any(|o| o.cookie == req.cookie) {
            return Err(Misbehavior::DuplicateCookie(req.cookie).into());
        }

        // A payload-form block-status request carries its effect length and context IDs in a
        // small payload, buffered whole. Any other payload passes beside the machine.
        let mut consumed = header;
        let mut effect_len = req.len;
        let mut ids = None;
        let mut bs_payload = Err(Errno::Inval);
        if req.command == Command::BlockStatus && req.flags.contains(CmdFlags::PAYLOAD_LEN) {
            if payload as usize <= MAX_BLOCK_STATUS_PAYLOAD {
                consumed += payload as usize;
                let Some(bytes) = input.get(header..consumed) else {
                    return Ok(self.incomplete(input, consumed));
                };
                if let Ok(p) = BlockStatusPayload::parse(bytes) {
                    effect_len = p.effect_len;
                    ids = Some(p.ids);
                    bs_payload = Ok(());
                }
            }
        } else {
            bs_payload = Ok(());
        }
        let left = payload - (consumed - header) as u64;

        let verdict = bs_payload.and_then(|()| self.check(&req, effect_len, ids));
        let mask = match verdict {
            Ok(mask) => mask,
            Err(errno) => {
                if left > 0 {
                    // The refusal waits until the payload is gone.
                    let then = Refusal::Request {
                        cookie: req.cookie,
                        command: req.command,
                        offset: req.offset,
                        errno,
                    };
                    self.input = Input::Discard { left, then };
                } else {
                    self.refuse_now(req.cookie, req.command, req.offset, errno)?;
                }
                return Ok(Handled::new(consumed, None));
            }
        };
        // proto.md leaves zero-length requests unspecified and asks servers not to
        // disconnect: they succeed at once, without troubling the application.
        if effect_len == 0 && req.command != Command::Flush {
            self.queue_ok(&req)?;
            return Ok(Handled::new(consumed, None));
        }
        let owed = Owed {
            cookie: req.cookie,
            command: req.command,
            flags: req.flags,
            offset: req.offset,
            len: effect_len,
            progress: if req.command == Command::Read {
                req.offset
            } else {
                mask
            },
            started: false,
        };
        // invariant: read_request returns early while the table is full.
        let _ = self.owed.try_push(owed);
        if req.command == Command::Write && left > 0 {
            self.input = Input::Payload {
                cookie: req.cookie,
                offset: req.offset,
                left,
            };
        }
        let mut request = req;
        if ids.is_some() {
            request.len = effect_len;
            request.flags.remove(CmdFlags::PAYLOAD_LEN);
        }
        Ok(Handled::new(
            consumed,
            Some(ServerEvent::Request { request, ids }),
        ))
    }

    /// The errno proto.md names for a bad request, or, for a good one, the bit mask of the
    /// selection indices a block-status reply owes a chunk for.
    fn check(&self, req: &Request, len: u64, ids: Option<ContextIds<'_>>) -> Result<u64, Errno> {
        let tflags = self.export.flags;
        let cmd = req.command;
        // Unknown or unadvertised commands: EINVAL.
        let gate = match cmd {
            Command::Read | Command::Write | Command::BlockStatus => TransmissionFlags::empty(),
            Command::Flush => TransmissionFlags::SEND_FLUSH,
            Command::Trim => TransmissionFlags::SEND_TRIM,
            Command::Cache => TransmissionFlags::SEND_CACHE,
            Command::WriteZeroes => TransmissionFlags::SEND_WRITE_ZEROES,
            Command::Disc | Command::Resize | Command::Unknown(_) => return Err(Errno::Inval),
        };
        // proto.md: writes of any kind to a read-only export SHOULD fail with EPERM, even
        // those (TRIM, WRITE_ZEROES) a read-only export does not advertise.
        let writes = matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes);
        if writes && tflags.contains(TransmissionFlags::READ_ONLY) {
            return Err(Errno::Perm);
        }
        if !tflags.contains(gate) {
            return Err(Errno::Inval);
        }
        // Flags unknown, not valid for the command, or not advertised: EINVAL (FAST_ZERO
        // without SEND_FAST_ZERO included, as proto.md asks).
        let mut allowed = CmdFlags::empty();
        if tflags.contains(TransmissionFlags::SEND_FUA) {
            allowed |= CmdFlags::FUA;
        }
        match cmd {
            Command::Read if tflags.contains(TransmissionFlags::SEND_DF) => allowed |= CmdFlags::DF,
            Command::Write if self.extended => allowed |= CmdFlags::PAYLOAD_LEN,
            Command::WriteZeroes => {
                allowed |= CmdFlags::NO_HOLE;
                if tflags.contains(TransmissionFlags::SEND_FAST_ZERO) {
                    allowed |= CmdFlags::FAST_ZERO;
                }
            }
            Command::BlockStatus => {
                allowed |= CmdFlags::REQ_ONE;
                if self.extended && tflags.contains(TransmissionFlags::BLOCK_STATUS_PAYLOAD) {
                    allowed |= CmdFlags::PAYLOAD_LEN;
                }
            }
            _ => {}
        }
        if !allowed.contains(req.flags) {
            return Err(Errno::Inval);
        }
        let mut mask = 0u64;
        if cmd == Command::BlockStatus {
            // proto.md: BLOCK_STATUS without a selected context SHOULD fail with EINVAL;
            // unknown, duplicate or missing IDs in the payload form MUST.
            if self.contexts.is_empty() {
                return Err(Errno::Inval);
            }
            match ids {
                None => mask = (1u64 << self.contexts.len()) - 1,
                Some(ids) => {
                    for id in ids.iter() {
                        let i = self
                            .contexts
                            .iter()
                            .position(|c| *c == id)
                            .ok_or(Errno::Inval)?;
                        if mask & (1 << i) != 0 {
                            return Err(Errno::Inval);
                        }
                        mask |= 1 << i;
                    }
                    if mask == 0 {
                        return Err(Errno::Inval);
                    }
                }
            }
        }
        if cmd == Command::Flush {
            // proto.md: offset and length MUST be 0.
            return if req.offset == 0 && len == 0 {
                self.shutdown_check(0)
            } else {
                Err(Errno::Inval)
            };
        }
        // Past the end: ENOSPC for writes (proto.md SHOULD), EINVAL otherwise.
        if req
            .offset
            .checked_add(len)
            .is_none_or(|end| end > self.export.size)
        {
            return Err(if matches!(cmd, Command::Write | Command::WriteZeroes) {
                Errno::NoSpc
            } else {
                Errno::Inval
            });
        }
        let min = u64::from(self.export.min_block);
        if min > 1 && (!req.offset.is_multiple_of(min) || !len.is_multiple_of(min)) {
            return Err(Errno::Inval);
        }
        let max = u64::from(self.export.max_payload);
        match cmd {
            Command::Write if len > max => return Err(Errno::Inval),
            // proto.md: a structured server MAY reject large reads up front with EOVERFLOW.
            Command::Read if len > max => {
                return Err(if self.structured {
                    Errno::Overflow
                } else {
                    Errno::Inval
                })
            }
            // proto.md: a DF read gets at most one content chunk, and a compact chunk
            // carries at most 2^32 - 9 data bytes; a read that cannot fit MAY fail with
            // EOVERFLOW. (Reachable only with a maximum payload above that, "no limit".)
            Command::Read if req.flags.contains(CmdFlags::DF) && len > self.max_data_chunk() => {
                return Err(Errno::Overflow)
            }
            Command::BlockStatus if len == 0 => return Err(Errno::Inval),
            _ => {}
        }
        self.shutdown_check(mask)
    }

    /// The most data bytes one `OFFSET_DATA` chunk can carry: the variable part of a chunk
    /// MUST NOT exceed the maximum payload (proto.md), and a compact chunk header declares
    /// at most 2^32 - 1 payload bytes, 8 of them the offset. An extended header's length
    /// is 64 bits, so there only the maximum payload limits it.
    fn max_data_chunk(&self) -> u64 {
        let max = u64::from(self.export.max_payload).max(1);
        if self.extended {
            max
        } else {
            max.min(u64::from(u32::MAX) - 8)
        }
    }

    fn shutdown_check(&self, mask: u64) -> Result<u64, Errno> {
        if self.shutting_down {
            Err(Errno::Shutdown)
        } else {
            Ok(mask)
        }
    }

    /// Queues the machine's own error reply to a request it refused.
    pub(super) fn refuse_now(
        &mut self,
        cookie: Cookie,
        command: Command,
        offset: u64,
        errno: Errno,
    ) -> Result<(), Error> {
        let o = Owed {
            cookie,
            command,
            flags: CmdFlags::empty(),
            offset,
            len: 0,
            progress: 0,
            started: false,
        };
        self.queue_error(&o, errno, "", None)
    }

    /// Queues a success reply without data.
    fn queue_ok(&mut self, req: &Request) -> Result<(), Error> {
        // proto.md: with structured replies a READ is always answered with chunks, even
        // when there is no data (a NONE chunk); other commands may get a simple reply.
        if self.extended || (self.structured && req.command == Command::Read) {
            self.queue_chunk(req.cookie, req.offset, ChunkType::None, 0, true, |_| Ok(0))
        } else {
            // proto.md: with structured replies, a simple reply is still allowed for
            // success without data; every peer uses it.
            let r = SimpleReply {
                error: None,
                cookie: req.cookie,
            };
            self.out.push_with(SimpleReply::LEN, |b| r.emit(b))
        }
    }

    fn queue_error(
        &mut self,
        o: &Owed,
        errno: Errno,
        message: &str,
        offset: Option<u64>,
    ) -> Result<(), Error> {
        if self.structured {
            let chunk = ErrorChunk {
                error: errno,
                message,
                offset,
            };
            self.queue_chunk(
                o.cookie,
                o.offset,
                chunk.chunk_type(),
                chunk.buffer_len(),
                true,
                |b| chunk.emit(b),
            )
        } else {
            let r = SimpleReply {
                error: Some(errno),
                cookie: o.cookie,
            };
            self.out.push_with(SimpleReply::LEN, |b| r.emit(b))
        }
    }

    /// Queues one structured or extended chunk: header plus `len` payload bytes written by
    /// `body`.
    fn queue_chunk(
        &mut self,
        cookie: Cookie,
        request_offset: u64,
        chunk_type: ChunkType,
        len: usize,
        done: bool,
        body: impl FnOnce(&mut [u8]) -> wire::Result<usize>,
    ) -> Result<(), Error> {
        let header = ChunkHeader {
            flags: if done {
                ReplyFlags::DONE
            } else {
                ReplyFlags::empty()
            },
            chunk_type,
            cookie,
            offset: self.extended.then_some(request_offset),
            len: len as u64,
        };
        let hlen = header.buffer_len();
        self.out.push_with(hlen + len, |b| {
            header.emit(b)?;
            body(&mut b[hlen..])?;
            Ok(hlen + len)
        })
    }

    fn owed_index(&self, cookie: Cookie) -> Result<usize, Error> {
        self.live()?;
        if matches!(self.input, Input::Payload { cookie: c, .. } if c == cookie) {
            return Err(Misuse::PayloadPending.into());
        }
        self.owed
            .iter()
            .position(|o| o.cookie == cookie)
            .ok_or(Misuse::UnknownCookie(cookie).into())
    }

    fn finish(&mut self, i: usize) {
        self.owed.swap_remove(i);
        if self.state == State::Disconnecting && self.owed.is_empty() && self.out.is_empty() {
            self.state = State::Closed;
        }
    }

    // ---- (C) replies ----

    /// Completes a request without data: success, or an error (as an error chunk when
    /// structured replies are on). Reads are answered with [`Server::reply_read_data`] and
    /// [`Server::reply_read_hole`], block status with [`Server::reply_block_status`]; both
    /// can end with an error here.
    pub fn reply(&mut self, cookie: Cookie, result: Result<(), Errno>) -> Result<(), Error> {
        match result {
            Err(errno) => self.reply_error(cookie, errno, ""),
            Ok(()) => {
                let i = self.owed_index(cookie)?;
                let o = self.owed[i];
                match o.command {
                    Command::Read => {
                        return Err(Misuse::BadReply("a read is answered with its data").into())
                    }
                    Command::BlockStatus => {
                        return Err(Misuse::BadReply("block status is answered with extents").into())
                    }
                    _ => {}
                }
                let req = Request {
                    flags: o.flags,
                    command: o.command,
                    cookie,
                    offset: o.offset,
                    len: o.len,
                    extended: self.extended,
                };
                self.queue_ok(&req)?;
                self.finish(i);
                Ok(())
            }
        }
    }

    /// Completes a request with an error and a message ("" for none; only structured
    /// replies can carry one). A read may already have sent some data.
    ///
    /// With simple replies, an error after read data started cannot be reported: proto.md
    /// requires a hard disconnect, so the machine drops its queued output and moves to
    /// [`State::Closed`]; close the connection.
    pub fn reply_error(
        &mut self,
        cookie: Cookie,
        errno: Errno,
        message: &str,
    ) -> Result<(), Error> {
        self.reply_error_inner(cookie, errno, message, None)
    }

    /// Like [`Server::reply_error`], with the export offset where the error happened
    /// (`NBD_REPLY_TYPE_ERROR_OFFSET`; structured replies only, inside the request range).
    pub fn reply_error_at(
        &mut self,
        cookie: Cookie,
        errno: Errno,
        message: &str,
        offset: u64,
    ) -> Result<(), Error> {
        self.reply_error_inner(cookie, errno, message, Some(offset))
    }

    fn reply_error_inner(
        &mut self,
        cookie: Cookie,
        errno: Errno,
        message: &str,
        offset: Option<u64>,
    ) -> Result<(), Error> {
        let i = self.owed_index(cookie)?;
        let o = self.owed[i];
        if errno.to_wire() == 0 {
            return Err(Misuse::Encode(wire::Error::BadValue {
                what: "error value 0",
                value: 0,
            })
            .into());
        }
        wire::check_str(message, "error message").map_err(Misuse::Encode)?;
        if let Some(at) = offset {
            if !self.structured {
                return Err(Misuse::NotNegotiated("structured replies").into());
            }
            let outside = !o.command.allows_error_offset() || at < o.offset || at >= o.end();
            if enforced!(self, ServerChecks::ERROR_OFFSET) && outside {
                return Err(Misuse::BadReply("error offset outside the request").into());
            }
        }
        if !self.structured && o.started {
            // proto.md: an error after a zero-error simple reply header went out MUST be a
            // hard disconnect, sending nothing more.
            self.out.clear();
            self.owed.clear();
            self.close();
            return Ok(());
        }
        self.queue_error(&o, errno, message, offset)?;
        self.finish(i);
        Ok(())
    }

    fn read_entry(&self, cookie: Cookie, offset: u64, len: u64) -> Result<(usize, Owed), Error> {
        let i = self.owed_index(cookie)?;
        let o = self.owed[i];
        if o.command != Command::Read {
            return Err(Misuse::BadReply("not a read").into());
        }
        // The machine sends content in order, without gaps or overlap, so that coverage
        // and the DONE flag are exact. (Adversarial mode may relax that, never the
        // overflow: the framing below adds offset and len.)
        let checked = enforced!(self, ServerChecks::READ_CHUNKS);
        if len == 0
            || (checked && offset != o.progress)
            || offset
                .checked_add(len)
                .is_none_or(|end| checked && end > o.end())
        {
            return Err(Misuse::BadReply(
                "read data must continue where the last piece ended, inside the request",
            )
            .into());
        }
        // proto.md: a DF read gets at most one content chunk.
        if checked && o.flags.contains(CmdFlags::DF) && (offset != o.offset || len != o.len) {
            return Err(Misuse::BadReply("a DF read is answered with one piece").into());
        }
        Ok((i, o))
    }

    /// Answers the next `len` bytes of a read, starting at `offset`, with data from your
    /// buffer: the machine queues the framing and then a [`Transmit::Payload`] for those
    /// bytes. Pieces must follow each other in order; the piece that completes the read
    /// completes the reply (`NBD_REPLY_FLAG_DONE`). Call it only once the data is in hand:
    /// after it, an error can no longer be reported for these bytes.
    pub fn reply_read_data(
        &mut self,
        cookie: Cookie,
        offset: u64,
        len: usize,
    ) -> Result<(), Error> {
        self.reply_read_piece(cookie, offset, len as u64, false)
    }

    /// Answers the next `len` bytes of a read as a hole that reads as zeroes: an
    /// `NBD_REPLY_TYPE_OFFSET_HOLE` chunk, or, with simple replies, a [`Transmit::Zeroes`].
    pub fn reply_read_hole(&mut self, cookie: Cookie, offset: u64, len: u64) -> Result<(), Error> {
        self.reply_read_piece(cookie, offset, len, true)
    }

    fn reply_read_piece(
        &mut self,
        cookie: Cookie,
        offset: u64,
        len: u64,
        hole: bool,
    ) -> Result<(), Error> {
        let (i, o) = self.read_entry(cookie, offset, len)?;
        let end = offset + len;
        // Largest piece per chunk: a hole length is 32 bits; data is limited by the
        // maximum payload and, with compact headers, by the 32-bit chunk length.
        let max = if hole {
            u64::from(u32::MAX)
        } else {
            self.max_data_chunk()
        };
        let pieces = len.div_ceil(max);
        let per_piece = if self.structured {
            ChunkHeader::EXTENDED_LEN + 12
        } else {
            0
        } as u64;
        let header = if !self.structured && !o.started {
            SimpleReply::LEN
        } else {
            0
        } as u64;
        let segments = if self.structured {
            pieces * 2
        } else {
            pieces + 1
        };
        if pieces.saturating_mul(per_piece).saturating_add(header) > self.out.free() as u64
            || segments > self.out.free_segments() as u64
        {
            return Err(Misuse::TransmitPending.into());
        }
        if !self.structured {
            if !o.started {
                let r = SimpleReply {
                    error: None,
                    cookie,
                };
                self.out.push_with(SimpleReply::LEN, |b| r.emit(b))?;
                self.owed[i].started = true;
            }
            // invariant: the request length was checked against the maximum payload, a u32.
            self.out.push_payload(cookie, offset, len as usize, hole)?;
        } else {
            let mut at = offset;
            while at < end {
                let n = (end - at).min(max);
                // The last chunk of the piece that reaches the end of the read (or, in
                // adversarial mode, runs past it) carries DONE.
                let done = at + n == end && end >= o.end();
                if hole {
                    let h = OffsetHole {
                        offset: at,
                        len: n as u32,
                    };
                    self.queue_chunk(
                        cookie,
                        o.offset,
                        ChunkType::OffsetHole,
                        OffsetHole::LEN,
                        done,
                        |b| h.emit(b),
                    )?;
                } else {
                    let d = OffsetDataHeader {
                        offset: at,
                        data_len: n,
                    };
                    // The header declares the data that follows beside the machine.
                    let header = ChunkHeader {
                        flags: if done {
                            ReplyFlags::DONE
                        } else {
                            ReplyFlags::empty()
                        },
                        chunk_type: ChunkType::OffsetData,
                        cookie,
                        offset: self.extended.then_some(o.offset),
                        len: OffsetDataHeader::LEN as u64 + n,
                    };
                    let hlen = header.buffer_len();
                    self.out.push_with(hlen + OffsetDataHeader::LEN, |b| {
                        header.emit(b)?;
                        d.emit(&mut b[hlen..])?;
                        Ok(hlen + OffsetDataHeader::LEN)
                    })?;
                    self.out.push_payload(cookie, at, n as usize, false)?;
                }
                at += n;
            }
        }
        self.owed[i].progress = end;
        if end >= o.end() {
            self.finish(i);
        }
        Ok(())
    }

    /// Answers a block-status request for one metadata context with `extents`, which
    /// describe the export from the request offset on. One call per context the request
    /// covers (all selected contexts, or the IDs of a payload-form request); the last one
    /// completes the reply.
    ///
    /// The machine merges neighbours with equal status, drops empty extents, trims the
    /// list to the request (one extent for `NBD_CMD_FLAG_REQ_ONE`), uses 32- or 64-bit
    /// descriptors as negotiated, and sends at most as many extents as fit its output
    /// buffer (and at most 2^20): the spec lets a reply describe less than was asked, and
    /// the client asks again for the rest.
    pub fn reply_block_status(
        &mut self,
        cookie: Cookie,
        context_id: u32,
        extents: &[Extent],
    ) -> Result<(), Error> {
        let i = self.owed_index(cookie)?;
        let o = self.owed[i];
        if o.command != Command::BlockStatus {
            return Err(Misuse::BadReply("not a block-status request").into());
        }
        let index = self
            .contexts
            .iter()
            .position(|c| *c == context_id)
            .ok_or(Misuse::NoSuchContext(context_id))?;
        let bit = 1u64 << index;
        if o.progress & bit == 0 {
            return Err(Misuse::BadReply("no chunk is owed for this context").into());
        }
        if !extents.iter().any(|e| e.len > 0) {
            return Err(Misuse::BadReply("no extent of non-zero length").into());
        }
        let wide = self.extended;
        let hlen = if wide {
            ChunkHeader::EXTENDED_LEN
        } else {
            ChunkHeader::STRUCTURED_LEN
        };
        let fixed = BlockStatusHeader::len(wide);
        let width = Extent::width(wide);
        let room = self.out.free().saturating_sub(hlen + fixed);
        let max_n = (room / width).min(wire::MAX_EXTENTS_PER_CHUNK);
        if max_n == 0 {
            return Err(Misuse::TransmitPending.into());
        }
        let last = o.progress & !bit == 0;
        let req_one = o.flags.contains(CmdFlags::REQ_ONE);
        let header = |n: usize| ChunkHeader {
            flags: if last {
                ReplyFlags::DONE
            } else {
                ReplyFlags::empty()
            },
            chunk_type: if wide {
                ChunkType::BlockStatusExt
            } else {
                ChunkType::BlockStatus
            },
            cookie,
            offset: wide.then_some(o.offset),
            len: (fixed + n * width) as u64,
        };
        self.out.push_with(hlen + fixed + max_n * width, |buf| {
            let body = &mut buf[hlen + fixed..];
            let mut n = 0;
            let mut covered = 0u64;
            for e in merged(extents) {
                // Trim to the request; REQ_ONE wants exactly one descriptor.
                let len = e.len.min(o.len - covered);
                Extent {
                    len,
                    status: e.status,
                }
                .emit(&mut body[n * width..], wide)?;
                n += 1;
                covered += len;
                if covered == o.len || req_one || n == max_n {
                    break;
                }
            }
            header(n).emit(buf)?;
            BlockStatusHeader {
                context_id,
                count: n as u64,
                wide,
            }
            .emit(&mut buf[hlen..])?;
            Ok(hlen + fixed + n * width)
        })?;
        self.owed[i].progress &= !bit;
        if last {
            self.finish(i);
        }
        Ok(())
    }
}

/// `extents` without empty ones, neighbours of equal status merged.
fn merged(extents: &[Extent]) -> impl Iterator<Item = Extent> + '_ {
    let mut it = extents.iter().copied().filter(|e| e.len > 0).peekable();
    core::iter::from_fn(move || {
        let mut cur = it.next()?;
        while let Some(next) = it.next_if(|n| n.status == cur.status) {
            cur.len = cur.len.saturating_add(next.len);
        }
        Some(cur)
    })
}
