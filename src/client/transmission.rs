//! Transmission (proto.md "Transmission", "Request types", "Structured reply types"; spec
//! digest 3.8-3.13): command checks, request encoding, and the validation of every reply.

use super::inflight::{InFlight, ReadTrack, Send, Track};
use super::{Client, Event, Phase, MAX_CONTEXTS};
#[cfg(feature = "adversarial")]
use crate::adversarial::ClientChecks;
use crate::common::{Handled, Transmit, Want};
use crate::error::{Error, Misbehavior, Misuse};
use crate::wire::{
    self, BlockStatusHeader, BlockStatusPayload, ChunkHeader, ChunkType, CmdFlags, Command,
    ContextIds, Cookie, ErrorChunk, Extent, Extents, OffsetDataHeader, OffsetHole, ReplyHeader,
    Request, SimpleReply, TransmissionFlags, MAX_STRING_LEN,
};

/// What the reply parser is in the middle of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rx {
    /// Waiting for a reply header.
    Header,
    /// Read data is being moved by the caller.
    Payload {
        cookie: Cookie,
        /// Export offset of the next byte.
        offset: u64,
        remaining: usize,
        /// What the end of the data completes.
        then: AfterPayload,
    },
    /// Descriptors of a block-status chunk are being streamed in batches.
    Extents(ExtentStream),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterPayload {
    /// A simple reply: the command is done.
    Simple,
    /// A chunk with `NBD_REPLY_FLAG_DONE`: check the reply and complete it.
    LastChunk,
    /// More chunks follow.
    More,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExtentStream {
    cookie: Cookie,
    context_id: u32,
    /// Descriptors still to come.
    remaining: u64,
    /// Export offset where the next descriptor starts.
    pos: u64,
    /// End of the request range.
    end: u64,
    wide: bool,
    done: bool,
}

/// Longest error chunk payload accepted (known or unknown error types): error, message
/// length, a maximal message and up to 8 bytes of further fields.
const MAX_ERROR_CHUNK: u64 = 6 + MAX_STRING_LEN as u64 + 8;

/// Descriptors per batch for the given width.
fn batch(wide: bool) -> u64 {
    (super::EXTENT_BATCH_LEN / Extent::width(wide)) as u64
}

impl<const N: usize> Client<N> {
    // ---- (C) commands ----

    /// Queues `NBD_CMD_READ` of `len` bytes at `offset`. Flags: `FUA`, `DF`.
    pub fn read(&mut self, offset: u64, len: u32, flags: CmdFlags) -> Result<Cookie, Error> {
        self.command(Command::Read, offset, len.into(), flags, 0, false)
    }

    /// Queues `NBD_CMD_WRITE` of `len` bytes at `offset`; [`poll_transmit`](Self::poll_transmit)
    /// asks for the payload right after the header. Flags: `FUA`.
    pub fn write(&mut self, offset: u64, len: u32, flags: CmdFlags) -> Result<Cookie, Error> {
        self.command(Command::Write, offset, len.into(), flags, 0, false)
    }

    /// Queues `NBD_CMD_FLUSH`. Flags: `FUA`.
    pub fn flush(&mut self, flags: CmdFlags) -> Result<Cookie, Error> {
        self.command(Command::Flush, 0, 0, flags, 0, false)
    }

    /// Queues `NBD_CMD_TRIM`. Flags: `FUA`.
    pub fn trim(&mut self, offset: u64, len: u64, flags: CmdFlags) -> Result<Cookie, Error> {
        self.command(Command::Trim, offset, len, flags, 0, false)
    }

    /// Queues `NBD_CMD_CACHE`. Flags: `FUA`.
    pub fn cache(&mut self, offset: u64, len: u64, flags: CmdFlags) -> Result<Cookie, Error> {
        self.command(Command::Cache, offset, len, flags, 0, false)
    }

    /// Queues `NBD_CMD_WRITE_ZEROES`. Flags: `FUA`, `NO_HOLE`, `FAST_ZERO`.
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        flags: CmdFlags,
    ) -> Result<Cookie, Error> {
        self.command(Command::WriteZeroes, offset, len, flags, 0, false)
    }

    /// Queues `NBD_CMD_BLOCK_STATUS` for every negotiated context. Flags: `FUA`,
    /// `REQ_ONE`. Each context's extents come as [`Event::BlockStatus`].
    pub fn block_status(
        &mut self,
        offset: u64,
        len: u64,
        flags: CmdFlags,
    ) -> Result<Cookie, Error> {
        // One bit per negotiated context (all 16 bits when the table is full).
        let all = 1u16
            .checked_shl(self.contexts.len() as u32)
            .map_or(u16::MAX, |bit| bit - 1);
        self.command(Command::BlockStatus, offset, len, flags, all, false)
    }

    /// Queues the payload form of `NBD_CMD_BLOCK_STATUS` for the contexts `ids` only (each
    /// negotiated, each at most once: anything else is refused with
    /// [`Misuse::NoSuchContext`]). Needs extended headers and
    /// `NBD_FLAG_BLOCK_STATUS_PAYLOAD`.
    pub fn block_status_for(
        &mut self,
        offset: u64,
        len: u64,
        flags: CmdFlags,
        ids: &[u32],
    ) -> Result<Cookie, Error> {
        self.check_open()?;
        if !self.eh {
            return Err(Misuse::NotNegotiated("extended headers").into());
        }
        if !self
            .tflags()
            .contains(TransmissionFlags::BLOCK_STATUS_PAYLOAD)
        {
            return Err(Misuse::Unsupported(Command::BlockStatus).into());
        }
        if ids.is_empty() {
            return Err(Misuse::BadLength(0).into());
        }
        let mut mask = 0u16;
        for id in ids {
            let bit = self
                .contexts
                .iter()
                .position(|c| c == id)
                .map(|i| 1u16 << i)
                .filter(|b| mask & b == 0)
                .ok_or(Misuse::NoSuchContext(*id))?;
            mask |= bit;
        }
        self.command(Command::BlockStatus, offset, len, flags, mask, true)
    }

    fn tflags(&self) -> TransmissionFlags {
        self.export.map(|e| e.flags).unwrap_or_default()
    }

    /// Checks a command against the state, the export and the negotiation, then queues it.
    /// `ctx_mask` selects the contexts of a block-status command. Nothing changes on error.
    fn command(
        &mut self,
        command: Command,
        offset: u64,
        len: u64,
        flags: CmdFlags,
        ctx_mask: u16,
        payload_form: bool,
    ) -> Result<Cookie, Error> {
        self.check_open()?;
        let Some(export) = self.export.filter(|_| self.phase == Phase::Ready) else {
            return Err(Misuse::WrongState.into());
        };
        if self.disc_queued {
            return Err(Misuse::WrongState.into());
        }
        let tf = export.flags;
        // Flags: each must be valid for the command and enabled by the export.
        let mut allowed = CmdFlags::FUA;
        match command {
            Command::Read => allowed |= CmdFlags::DF,
            Command::WriteZeroes => allowed |= CmdFlags::NO_HOLE | CmdFlags::FAST_ZERO,
            Command::BlockStatus => allowed |= CmdFlags::REQ_ONE,
            _ => {}
        }
        let bad = flags.difference(allowed);
        if enforced!(self, ClientChecks::FLAGS) && !bad.is_empty() {
            return Err(Misuse::FlagNotAllowed(bad.bits()).into());
        }
        let gates = [
            (CmdFlags::FUA, tf.contains(TransmissionFlags::SEND_FUA)),
            (
                CmdFlags::DF,
                self.sr && tf.contains(TransmissionFlags::SEND_DF),
            ),
            (
                CmdFlags::FAST_ZERO,
                tf.contains(TransmissionFlags::SEND_FAST_ZERO),
            ),
        ];
        for (flag, ok) in gates {
            if enforced!(self, ClientChecks::FLAGS) && flags.contains(flag) && !ok {
                return Err(Misuse::FlagNotAllowed(flag.bits()).into());
            }
        }
        // The export must support the command.
        let gate = match command {
            Command::Flush => Some(TransmissionFlags::SEND_FLUSH),
            Command::Trim => Some(TransmissionFlags::SEND_TRIM),
            Command::WriteZeroes => Some(TransmissionFlags::SEND_WRITE_ZEROES),
            Command::Cache => Some(TransmissionFlags::SEND_CACHE),
            _ => None,
        };
        let commands = enforced!(self, ClientChecks::COMMANDS);
        if commands && gate.is_some_and(|g| !tf.contains(g)) {
            return Err(Misuse::Unsupported(command).into());
        }
        if commands && command == Command::BlockStatus && self.contexts.is_empty() {
            return Err(Misuse::NotNegotiated("metadata contexts").into());
        }
        if enforced!(self, ClientChecks::READ_ONLY)
            && matches!(
                command,
                Command::Write | Command::Trim | Command::WriteZeroes
            )
            && tf.contains(TransmissionFlags::READ_ONLY)
        {
            return Err(Misuse::ReadOnly.into());
        }
        // The range.
        let bounds = enforced!(self, ClientChecks::BOUNDS);
        if command != Command::Flush {
            if bounds && len == 0 {
                return Err(Misuse::BadLength(0).into());
            }
            // What a compact header cannot carry is never relaxed.
            if !self.eh && len > u64::from(u32::MAX) {
                return Err(Misuse::BadLength(len).into());
            }
            if bounds && offset.checked_add(len).is_none_or(|end| end > export.size) {
                return Err(Misuse::OutOfRange {
                    offset,
                    len,
                    size: export.size,
                }
                .into());
            }
            if let Some(b) = export
                .block_size
                .filter(|_| enforced!(self, ClientChecks::BLOCK_SIZE))
            {
                let min = u64::from(b.min);
                // The tail of an export whose size is not a multiple of the minimum block
                // may be addressed up to its end.
                let aligned_end =
                    len.is_multiple_of(min) || offset.checked_add(len) == Some(export.size);
                if !offset.is_multiple_of(min) || !aligned_end {
                    return Err(Misuse::Misaligned { min_block: b.min }.into());
                }
            }
            if enforced!(self, ClientChecks::BLOCK_SIZE)
                && matches!(command, Command::Read | Command::Write)
            {
                let max = u64::from(self.max_payload());
                if len > max {
                    return Err(Misuse::PayloadTooLarge { len, max }.into());
                }
            }
        }
        if self.table.is_full() {
            return Err(Misuse::TooManyInFlight.into());
        }
        let mut sent_flags = flags;
        if payload_form || (command == Command::Write && self.eh) {
            // proto.md (extended headers): WRITE MUST set PAYLOAD_LEN.
            sent_flags |= CmdFlags::PAYLOAD_LEN;
        }
        self.enqueue(command, sent_flags, offset, len, ctx_mask)
    }

    /// Puts a checked command in the table, queued to be sent. `ctx_mask` is the set of
    /// context ids (as bits of the negotiated list) a block-status reply must cover.
    pub(super) fn enqueue(
        &mut self,
        command: Command,
        flags: CmdFlags,
        offset: u64,
        len: u64,
        ctx_mask: u16,
    ) -> Result<Cookie, Error> {
        let cookie = self.table.allocate_cookie();
        let track = match command {
            Command::Read => Track::Read(ReadTrack::default()),
            Command::BlockStatus => Track::BlockStatus {
                expected: ctx_mask,
                seen: 0,
            },
            _ => Track::Other,
        };
        self.table
            .push(InFlight {
                cookie,
                command,
                flags,
                offset,
                len,
                send: Send::Queued,
                error: None,
                track,
            })
            .map_err(|()| Misuse::TooManyInFlight)?;
        Ok(cookie)
    }

    // ---- (D) output ----

    /// Packs as many queued request headers as fit into `out`, stopping before a write
    /// payload.
    pub(super) fn transmit_commands(&mut self, out: &mut [u8]) -> Result<Option<Transmit>, Error> {
        let eh = self.eh;
        let contexts = self.contexts.clone();
        let mut n = 0;
        while let Some(entry) = self.table.first_unsent_mut() {
            // Adversarial mode: injected bytes due here go out before this request.
            #[cfg(feature = "adversarial")]
            if n > 0 && self.adv.due() {
                break;
            }
            if entry.send == Send::PayloadDue {
                if n > 0 {
                    break;
                }
                entry.send = Send::Sent;
                #[cfg(feature = "adversarial")]
                self.adv.note_sent();
                return Ok(Some(Transmit::Payload {
                    cookie: entry.cookie,
                    offset: entry.offset,
                    // invariant: writes are at most u32::MAX bytes (`write` takes a u32),
                    // or fit a usize (the adversarial `command` checks).
                    len: entry.len as usize,
                }));
            }
            let payload_form = entry.command == Command::BlockStatus
                && entry.flags.contains(CmdFlags::PAYLOAD_LEN);
            let mut ids = arrayvec::ArrayVec::<u32, MAX_CONTEXTS>::new();
            if let Track::BlockStatus { expected, .. } = entry.track {
                ids.extend(
                    contexts
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| expected & (1 << i) != 0)
                        .map(|(_, id)| *id),
                );
            }
            let payload = BlockStatusPayload {
                effect_len: entry.len,
                ids: ContextIds::new(&ids),
            };
            let request = Request {
                flags: entry.flags,
                command: entry.command,
                cookie: entry.cookie,
                offset: entry.offset,
                len: if payload_form {
                    payload.buffer_len() as u64
                } else {
                    entry.len
                },
                extended: eh,
            };
            let extra = if payload_form {
                payload.buffer_len()
            } else {
                0
            };
            let need = request.buffer_len() + extra;
            let Some(room) = out.get_mut(n..n + need) else {
                if n == 0 {
                    return Err(Error::BufferTooSmall { required: need });
                }
                break;
            };
            // invariant: the command was checked when queued (length fits the form).
            let at = request.emit(room).map_err(Misuse::Encode)?;
            if payload_form {
                payload.emit(&mut room[at..]).map_err(Misuse::Encode)?;
            }
            n += need;
            entry.send = if entry.command == Command::Write {
                Send::PayloadDue
            } else {
                #[cfg(feature = "adversarial")]
                self.adv.note_sent();
                Send::Sent
            };
        }
        if n == 0 && self.disc_queued && !self.disc_sent {
            let need = if eh {
                Request::EXTENDED_LEN
            } else {
                Request::COMPACT_LEN
            };
            // Room first: a buffer too small must change nothing, the cookie counter
            // included (sessions replay byte for byte).
            let room = out
                .get_mut(..need)
                .ok_or(Error::BufferTooSmall { required: need })?;
            let request = Request {
                flags: CmdFlags::empty(),
                command: Command::Disc,
                cookie: self.table.allocate_cookie(),
                offset: 0,
                len: 0,
                extended: eh,
            };
            request.emit(room).map_err(Misuse::Encode)?;
            self.disc_sent = true;
            #[cfg(feature = "adversarial")]
            self.adv.note_sent();
            return Ok(Some(Transmit::Bytes(need)));
        }
        Ok((n > 0).then_some(Transmit::Bytes(n)))
    }

    /// `wants()` in transmission.
    pub(super) fn rx_wants(&self) -> Want {
        match self.rx {
            Rx::Payload {
                cookie,
                offset,
                remaining,
                ..
            } => Want::Payload {
                cookie,
                offset,
                len: remaining,
            },
            Rx::Extents(s) => Want::Bytes(self.peek.unwrap_or(Self::extent_batch_len(&s))),
            Rx::Header if self.table.has_sent() => Want::Bytes(self.peek.unwrap_or(if self.eh {
                ChunkHeader::EXTENDED_LEN
            } else {
                SimpleReply::LEN
            })),
            Rx::Header => Want::Nothing,
        }
    }

    fn extent_batch_len(s: &ExtentStream) -> usize {
        // invariant: at most `batch()` descriptors, i.e. EXTENT_BATCH_LEN bytes.
        (s.remaining.min(batch(s.wide)) as usize) * Extent::width(s.wide)
    }

    // ---- (B) replies ----

    /// `Phase::Ready`: one reply frame.
    pub(super) fn on_reply<'i>(&mut self, input: &'i [u8]) -> Result<Handled<Event<'i>>, Error> {
        if let Rx::Extents(s) = self.rx {
            return self.on_extents(s, input, 0);
        }
        if input.is_empty() {
            return Ok(Handled::none());
        }
        if !self.table.has_sent() {
            // proto.md: the server only ever answers requests.
            return Err(Misbehavior::UnsolicitedReply.into());
        }
        let header = match ReplyHeader::parse(input) {
            Ok(h) => h,
            Err(wire::Error::Truncated { needed }) => {
                // Exact once the magic is in: the header length of that form.
                if input.len() >= ReplyHeader::MAGIC_LEN {
                    self.peek = Some(input.len() + needed);
                }
                return Ok(Handled::none());
            }
            Err(e) => return Err(Error::Malformed(e)),
        };
        match header {
            ReplyHeader::Simple(s) => self.on_simple(s),
            ReplyHeader::Chunk(c) => self.on_chunk(c, input),
        }
    }

    fn on_simple<'i>(&mut self, s: SimpleReply) -> Result<Handled<Event<'i>>, Error> {
        let cookie = s.cookie;
        if self.eh {
            // proto.md (extended headers): no simple replies at all.
            return Err(Misbehavior::SimpleReplyWithExtendedHeaders(cookie).into());
        }
        let sr = self.sr;
        let entry = self
            .table
            .sent_mut(cookie)
            .ok_or(Misbehavior::UnknownCookie(cookie))?;
        let consumed = SimpleReply::LEN;
        if entry.command == Command::Read && s.error.is_none() {
            if sr {
                // proto.md: the server MUST NOT send a simple reply to NBD_CMD_READ once
                // structured replies are negotiated (a simple *error* reply is tolerated:
                // it carries no data, so the stream stays in step).
                return Err(Misbehavior::SimpleReplyToStructuredRead(cookie).into());
            }
            let (offset, len) = (entry.offset, entry.len as usize);
            self.rx = Rx::Payload {
                cookie,
                offset,
                remaining: len,
                then: AfterPayload::Simple,
            };
            return Ok(Handled::new(
                consumed,
                Some(Event::ReadData {
                    cookie,
                    offset,
                    len,
                }),
            ));
        }
        if entry.command == Command::BlockStatus && s.error.is_none() {
            // A successful block status needs a chunk per context.
            return Err(Misbehavior::MissingContextChunk(cookie).into());
        }
        self.table.remove(cookie);
        Ok(Handled::new(
            consumed,
            Some(Event::Done {
                cookie,
                result: s.error.map_or(Ok(()), Err),
            }),
        ))
    }

    fn on_chunk<'i>(
        &mut self,
        h: ChunkHeader,
        input: &'i [u8],
    ) -> Result<Handled<Event<'i>>, Error> {
        let cookie = h.cookie;
        if !self.sr {
            return Err(Misbehavior::StructuredReplyNotNegotiated(cookie).into());
        }
        if h.is_extended() != self.eh {
            return Err(Misbehavior::WrongChunkForm(cookie).into());
        }
        let eh = self.eh;
        let entry = *self
            .table
            .sent_mut(cookie)
            .ok_or(Misbehavior::UnknownCookie(cookie))?;
        if h.offset.is_some_and(|o| o != entry.offset) {
            return Err(Misbehavior::ChunkOffsetMismatch(cookie).into());
        }
        let hlen = h.buffer_len();
        let unexpected = Misbehavior::UnexpectedChunk {
            cookie,
            chunk_type: h.chunk_type,
        };
        let done = h.is_done();
        match h.chunk_type {
            ChunkType::None => {
                if h.len != 0 {
                    return Err(Error::Malformed(wire::Error::BadLength {
                        what: "NBD_REPLY_TYPE_NONE length must be 0",
                        len: h.len,
                    }));
                }
                if !done {
                    return Err(Misbehavior::NoneWithoutDone(cookie).into());
                }
                let event = self.complete(cookie)?;
                Ok(Handled::new(hlen, Some(event)))
            }
            ChunkType::OffsetData => {
                if entry.command != Command::Read {
                    return Err(unexpected.into());
                }
                let end = hlen + OffsetDataHeader::LEN;
                let data = match OffsetDataHeader::parse(input.get(hlen..).unwrap_or(&[]), h.len) {
                    Ok(d) => d,
                    Err(wire::Error::Truncated { .. }) => {
                        self.peek = Some(end);
                        return Ok(Handled::none());
                    }
                    Err(e) => return Err(Error::Malformed(e)),
                };
                self.record_content(cookie, data.offset, data.data_len)?;
                // invariant: record_content() checked the data lies inside a read of at
                // most u32::MAX bytes.
                let len = data.data_len as usize;
                self.rx = Rx::Payload {
                    cookie,
                    offset: data.offset,
                    remaining: len,
                    then: if done {
                        AfterPayload::LastChunk
                    } else {
                        AfterPayload::More
                    },
                };
                Ok(Handled::new(
                    end,
                    Some(Event::ReadData {
                        cookie,
                        offset: data.offset,
                        len,
                    }),
                ))
            }
            ChunkType::OffsetHole => {
                if entry.command != Command::Read {
                    return Err(unexpected.into());
                }
                if h.len != OffsetHole::LEN as u64 {
                    return Err(Error::Malformed(wire::Error::BadLength {
                        what: "NBD_REPLY_TYPE_OFFSET_HOLE length must be 12",
                        len: h.len,
                    }));
                }
                let end = hlen + OffsetHole::LEN;
                let Some(payload) = input.get(hlen..end) else {
                    self.peek = Some(end);
                    return Ok(Handled::none());
                };
                let hole = OffsetHole::parse(payload).map_err(Error::Malformed)?;
                if hole.len == 0 {
                    return Err(Misbehavior::EmptyHole(cookie).into());
                }
                self.record_content(cookie, hole.offset, hole.len.into())?;
                let event = Event::ReadHole {
                    cookie,
                    offset: hole.offset,
                    len: hole.len,
                };
                if done {
                    self.deferred = Some(self.complete(cookie)?);
                }
                Ok(Handled::new(end, Some(event)))
            }
            ChunkType::BlockStatus | ChunkType::BlockStatusExt => {
                if entry.command != Command::BlockStatus {
                    return Err(unexpected.into());
                }
                let wide = h.chunk_type == ChunkType::BlockStatusExt;
                if wide && !eh {
                    return Err(Misbehavior::WideExtentsWithoutExtendedHeaders(cookie).into());
                }
                // (A 32-bit BLOCK_STATUS under extended headers is tolerated: it is
                // unambiguous, and the spec digest notes servers may have sent it.)
                let fixed = BlockStatusHeader::len(wide);
                let bs =
                    match BlockStatusHeader::parse(input.get(hlen..).unwrap_or(&[]), wide, h.len) {
                        Ok(b) => b,
                        Err(wire::Error::Truncated { .. }) => {
                            // The descriptor count follows from the chunk length, so the whole
                            // first batch can be asked for at once.
                            let width = Extent::width(wide) as u64;
                            let count = h.len.saturating_sub(fixed as u64) / width;
                            // invariant: at most one batch (EXTENT_BATCH_LEN bytes).
                            let first = (count.min(batch(wide)) * width) as usize;
                            self.peek = Some(hlen + fixed + first);
                            return Ok(Handled::none());
                        }
                        Err(e) => return Err(Error::Malformed(e)),
                    };
                let stream = ExtentStream {
                    cookie,
                    context_id: bs.context_id,
                    remaining: bs.count,
                    pos: entry.offset,
                    end: entry.end(),
                    wide,
                    done,
                };
                // Everything must be in before the context is checked, so that the
                // outcome does not depend on how the input was split.
                let batch_len = Self::extent_batch_len(&stream);
                if input.len() < hlen + fixed + batch_len {
                    self.peek = Some(hlen + fixed + batch_len);
                    return Ok(Handled::none());
                }
                self.start_extents(&entry, &bs)?;
                self.on_extents(stream, input, hlen + fixed)
            }
            t if t.is_error() => {
                if h.len > MAX_ERROR_CHUNK {
                    return Err(Misbehavior::ChunkTooLong { cookie, len: h.len }.into());
                }
                // invariant: h.len <= MAX_ERROR_CHUNK (4110).
                let end = hlen + h.len as usize;
                let Some(payload) = input.get(hlen..end) else {
                    self.peek = Some(end);
                    return Ok(Handled::none());
                };
                let chunk = match ErrorChunk::parse(t, payload) {
                    Ok(c) => c,
                    Err(wire::Error::BadValue { value: 0, .. }) => {
                        return Err(Misbehavior::ZeroError(cookie).into())
                    }
                    Err(e) => return Err(Error::Malformed(e)),
                };
                // proto.md: ERROR_OFFSET is valid for READ, WRITE, TRIM, CACHE,
                // WRITE_ZEROES and BLOCK_STATUS, with an offset inside the request. On
                // any other command it is an unexpected error chunk: the command fails,
                // the offset means nothing.
                let offset_allowed = entry.command.allows_error_offset();
                let offset = chunk.offset.filter(|_| offset_allowed);
                if let Some(o) = offset {
                    if !entry.contains(o, 1) {
                        return Err(Misbehavior::ChunkOutOfRange {
                            cookie,
                            offset: o,
                            len: 0,
                        }
                        .into());
                    }
                }
                if let Some(e) = self.table.sent_mut(cookie) {
                    e.error.get_or_insert(chunk.error);
                    // proto.md: later content chunks must not cover this offset (test:
                    // hostile_server.rs, content_over_an_earlier_error_offset).
                    if let (Track::Read(t), Some(o)) = (&mut e.track, offset) {
                        if let Ok(at) = u32::try_from(o - e.offset) {
                            t.add_error(at);
                        }
                    }
                }
                if done {
                    self.deferred = Some(self.complete(cookie)?);
                }
                Ok(Handled::new(
                    end,
                    Some(Event::ChunkError {
                        cookie,
                        error: chunk.error,
                        message: chunk.message,
                        offset,
                    }),
                ))
            }
            // proto.md: an unknown chunk type without bit 15 MUST end the connection.
            _ => Err(unexpected.into()),
        }
    }

    /// Checks a content chunk `[offset, offset + len)` of read `cookie` and records it.
    fn record_content(&mut self, cookie: Cookie, offset: u64, len: u64) -> Result<(), Error> {
        let Some(entry) = self.table.sent_mut(cookie) else {
            return Err(Misbehavior::UnknownCookie(cookie).into());
        };
        if !entry.contains(offset, len) {
            return Err(Misbehavior::ChunkOutOfRange {
                cookie,
                offset,
                len,
            }
            .into());
        }
        let req_len = entry.len;
        let df = entry.flags.contains(CmdFlags::DF);
        let start = offset - entry.offset;
        let Track::Read(track) = &mut entry.track else {
            return Err(Misbehavior::UnknownCookie(cookie).into());
        };
        if df && track.chunks > 0 {
            return Err(Misbehavior::FragmentedDfRead(cookie).into());
        }
        // invariant: inside a read of at most u32::MAX bytes, both fit u32.
        track
            .add(start as u32, len as u32, req_len)
            .map_err(|()| Misbehavior::ChunkOverlap { cookie, offset }.into())
    }

    /// Checks the context of a new block-status chunk and marks it seen.
    fn start_extents(&mut self, entry: &InFlight, bs: &BlockStatusHeader) -> Result<(), Error> {
        let cookie = entry.cookie;
        let id = bs.context_id;
        let unknown = Misbehavior::UnknownContext { cookie, id };
        let bit = self
            .contexts
            .iter()
            .position(|c| *c == id)
            .map(|i| 1u16 << i)
            .ok_or(unknown)?;
        if entry.flags.contains(CmdFlags::REQ_ONE) && bs.count != 1 {
            return Err(Misbehavior::ReqOneViolated(cookie).into());
        }
        let Some(e) = self.table.sent_mut(cookie) else {
            return Err(Misbehavior::UnknownCookie(cookie).into());
        };
        let Track::BlockStatus { expected, seen } = &mut e.track else {
            return Err(unknown.into());
        };
        if *expected & bit == 0 {
            return Err(unknown.into());
        }
        if *seen & bit != 0 {
            return Err(Misbehavior::DuplicateContextChunk { cookie, id }.into());
        }
        *seen |= bit;
        Ok(())
    }

    /// One batch of descriptors starting at `at` in `input`.
    fn on_extents<'i>(
        &mut self,
        mut s: ExtentStream,
        input: &'i [u8],
        at: usize,
    ) -> Result<Handled<Event<'i>>, Error> {
        let len = Self::extent_batch_len(&s);
        let end = at + len;
        let Some(bytes) = input.get(at..end) else {
            return Ok(Handled::none());
        };
        let extents = Extents::new(bytes, s.wide).map_err(Error::Malformed)?;
        let cookie = s.cookie;
        let start = s.pos;
        let req_one = self
            .table
            .sent_mut(cookie)
            .is_some_and(|e| e.flags.contains(CmdFlags::REQ_ONE));
        for e in extents.iter() {
            if e.len == 0 {
                return Err(Misbehavior::ZeroLengthExtent(cookie).into());
            }
            // proto.md: all descriptors but the last lie inside the request (the first
            // N-1 lengths sum to less than the requested length), and with REQ_ONE the
            // only one is no longer than the request.
            let next = s.pos.checked_add(e.len);
            let bad = s.pos >= s.end || next.is_none() || (req_one && next > Some(s.end));
            if bad {
                return Err(Misbehavior::ExtentsOutOfRange(cookie).into());
            }
            s.pos = next.unwrap_or(u64::MAX);
            s.remaining -= 1;
        }
        if s.remaining > 0 {
            self.rx = Rx::Extents(s);
        } else {
            self.rx = Rx::Header;
            if s.done {
                self.deferred = Some(self.complete(cookie)?);
            }
        }
        Ok(Handled::new(
            end,
            Some(Event::BlockStatus {
                cookie,
                context_id: s.context_id,
                offset: start,
                extents,
            }),
        ))
    }

    /// The final chunk of `cookie` arrived: checks the reply as a whole and removes the
    /// command. A reply that fails the check leaves the command in the table, so that it is
    /// abandoned (not lost) when the connection dies.
    fn complete(&mut self, cookie: Cookie) -> Result<Event<'static>, Error> {
        let entry = self
            .table
            .sent_mut(cookie)
            .ok_or(Misbehavior::UnknownCookie(cookie))?;
        let result = match (entry.error, entry.track) {
            (Some(error), _) => Err(error),
            (None, Track::Read(t)) if !t.complete(entry.len) => {
                return Err(Misbehavior::IncompleteRead(cookie).into())
            }
            (None, Track::BlockStatus { expected, seen }) if seen != expected => {
                return Err(Misbehavior::MissingContextChunk(cookie).into())
            }
            (None, _) => Ok(()),
        };
        self.table.remove(cookie);
        Ok(Event::Done { cookie, result })
    }

    /// `handle_payload` in transmission.
    pub(super) fn on_payload(&mut self, n: usize) -> Result<(), Error> {
        let Rx::Payload {
            cookie,
            offset,
            remaining,
            then,
        } = self.rx
        else {
            return Err(Misuse::PayloadMismatch.into());
        };
        let Some(left) = remaining.checked_sub(n) else {
            return Err(Misuse::PayloadMismatch.into());
        };
        if left > 0 {
            self.rx = Rx::Payload {
                cookie,
                offset: offset + n as u64,
                remaining: left,
                then,
            };
            return Ok(());
        }
        self.rx = Rx::Header;
        match then {
            AfterPayload::More => {}
            AfterPayload::Simple => {
                self.table.remove(cookie);
                self.deferred = Some(Event::Done {
                    cookie,
                    result: Ok(()),
                });
            }
            AfterPayload::LastChunk => self.deferred = Some(self.complete(cookie)?),
        }
        Ok(())
    }
}
