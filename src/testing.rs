//! Not public API: a [`Client`] and a [`Server`] joined by two in-memory pipes, for this
//! crate's tests, benches and fuzz targets (feature `_testing`). It may change at any
//! time.
//!
//! [`Pair::drive`] steps both machines until neither can make progress, playing the
//! application on both sides: the client side keeps write payloads and read buffers per
//! cookie; the server side serves a `Vec<u8>` disk whose all-zero 4 KiB blocks are
//! reported as holes. Payloads move beside the machines, as a real driver moves them.

use std::collections::HashMap;
use std::format;
use std::string::String;
use std::vec;
use std::vec::Vec;

use crate::client::{Client, ClientConfig, Event};
use crate::server::{ExportInfo, Server, ServerConfig, ServerEvent};
use crate::wire::extent::{STATE_HOLE, STATE_ZERO};
use crate::wire::{CmdFlags, Command, Cookie, Errno, Extent, OptError, Request, TransmissionFlags};
use crate::{Error, Transmit, Want};

/// Block size of the disk's allocation map.
pub const BLOCK: u64 = 4096;

/// Metadata contexts the server offers: `base:allocation` (ID 1) and a fake
/// `qemu:dirty-bitmap:all` (ID 2) that reports every block dirty.
pub const CONTEXTS: [&str; 2] = ["base:allocation", "qemu:dirty-bitmap:all"];

/// How the server side answers requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replies {
    /// At once, in order.
    Immediate,
    /// Held until [`Pair::release`], which answers them last-first.
    Held,
}

/// A client and a server joined in memory.
pub struct Pair {
    /// The client machine.
    pub client: Client<64>,
    /// The server machine.
    pub server: Server<64>,
    /// The export's contents.
    pub disk: Vec<u8>,
    /// Flags the server offers for the export.
    pub flags: TransmissionFlags,
    /// How the server answers.
    pub replies: Replies,
    c2s: Vec<u8>,
    s2c: Vec<u8>,
    writes: HashMap<Cookie, Vec<u8>>,
    reads: HashMap<Cookie, (u64, Vec<u8>)>,
    /// Completed reads: cookie to data.
    pub read_data: HashMap<Cookie, Vec<u8>>,
    /// Completions seen by the client, in order.
    pub done: Vec<(Cookie, Result<(), Errno>)>,
    /// Block-status descriptors seen by the client: cookie, context, offset, extent.
    pub extents: Vec<(Cookie, u32, u64, Extent)>,
    /// Every client event, as text.
    pub client_log: Vec<String>,
    /// Every server event, as text.
    pub server_log: Vec<String>,
    held: Vec<Request>,
    /// The write whose payload the server is receiving.
    incoming: Option<(Request, Vec<u8>)>,
    /// The first error either machine returned.
    pub error: Option<(&'static str, Error)>,
    /// Bytes that crossed, client to server and back.
    pub traffic: (u64, u64),
    /// Requests whose range contains one of these offsets fail with its errno.
    pub failures: Vec<(u64, Errno)>,
    eof_sent: bool,
}

impl Pair {
    /// A pair negotiated with these configurations over a `size`-byte zeroed disk.
    /// Call [`Pair::drive`] to run the handshake.
    pub fn new(client: &ClientConfig<'_>, server: ServerConfig, size: usize) -> Self {
        Self {
            // invariant: a test configuration with too long strings is a test bug.
            client: Client::new(client).expect("client configuration"),
            server: Server::new(server),
            disk: vec![0; size],
            flags: TransmissionFlags::SEND_FLUSH
                | TransmissionFlags::SEND_FUA
                | TransmissionFlags::SEND_TRIM
                | TransmissionFlags::SEND_WRITE_ZEROES
                | TransmissionFlags::SEND_FAST_ZERO
                | TransmissionFlags::SEND_DF
                | TransmissionFlags::SEND_CACHE
                | TransmissionFlags::CAN_MULTI_CONN
                | TransmissionFlags::BLOCK_STATUS_PAYLOAD,
            replies: Replies::Immediate,
            c2s: Vec::new(),
            s2c: Vec::new(),
            writes: HashMap::new(),
            reads: HashMap::new(),
            read_data: HashMap::new(),
            done: Vec::new(),
            extents: Vec::new(),
            client_log: Vec::new(),
            server_log: Vec::new(),
            held: Vec::new(),
            incoming: None,
            error: None,
            traffic: (0, 0),
            failures: Vec::new(),
            eof_sent: false,
        }
    }

    /// Issues a write of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8], flags: CmdFlags) -> Result<Cookie, Error> {
        let len = u32::try_from(data.len())
            .map_err(|_| Error::Misuse(crate::Misuse::BadLength(data.len() as u64)))?;
        let cookie = self.client.write(offset, len, flags)?;
        self.writes.insert(cookie, data.to_vec());
        Ok(cookie)
    }

    /// Issues a read of `len` bytes at `offset`; the data lands in [`Pair::read_data`].
    pub fn read(&mut self, offset: u64, len: u32, flags: CmdFlags) -> Result<Cookie, Error> {
        let cookie = self.client.read(offset, len, flags)?;
        self.reads
            .insert(cookie, (offset, vec![0xa5; len as usize]));
        Ok(cookie)
    }

    /// The result the client saw for `cookie`, if it completed.
    pub fn result(&self, cookie: Cookie) -> Option<Result<(), Errno>> {
        self.done
            .iter()
            .find(|(c, _)| *c == cookie)
            .map(|(_, r)| *r)
    }

    /// The requests held in [`Replies::Held`] mode, oldest first.
    pub fn held(&self) -> &[Request] {
        &self.held
    }

    /// Takes the held requests without answering them (a test then answers them itself,
    /// say with the server's adversarial mode).
    pub fn take_held(&mut self) -> Vec<Request> {
        core::mem::take(&mut self.held)
    }

    /// Answers every held request, last-first.
    pub fn release(&mut self) {
        while let Some(r) = self.held.pop() {
            self.answer(r);
        }
    }

    /// Steps both machines until neither makes progress. Returns false if a machine
    /// failed (see [`Pair::error`]).
    pub fn drive(&mut self) -> bool {
        for _ in 0..1_000_000 {
            if self.error.is_some() {
                return false;
            }
            let mut progress =
                self.client_out() | self.server_out() | self.server_in() | self.client_in();
            // The server closes the connection once it is done: the client sees the end
            // (after every byte, even those of a frame the server cut short).
            if !progress && self.server.is_finished() && !self.eof_sent {
                self.eof_sent = true;
                if let Err(e) = self.client.handle_eof() {
                    self.fail("client", e);
                }
                progress = true;
            }
            if !progress {
                // A machine may have failed in this very round.
                return self.error.is_none();
            }
        }
        // invariant: every step moves at least one byte or event; a million rounds without
        // settling is a livelock bug in a machine.
        panic!("the pair did not settle");
    }

    fn fail(&mut self, side: &'static str, e: Error) {
        if self.error.is_none() {
            self.error = Some((side, e));
        }
    }

    fn client_out(&mut self) -> bool {
        let mut buf = [0u8; 16384];
        let mut progress = false;
        loop {
            match self.client.poll_transmit(&mut buf) {
                Ok(None) => return progress,
                Ok(Some(Transmit::Bytes(n))) => self.c2s.extend_from_slice(&buf[..n]),
                Ok(Some(Transmit::Payload { cookie, len, .. })) => {
                    match self.writes.remove(&cookie) {
                        Some(data) if data.len() == len => self.c2s.extend_from_slice(&data),
                        Some(_) => panic!("the client asked for a payload of another length"),
                        // A write queued behind the pair's back (the adversarial `command`).
                        None => self.c2s.resize(self.c2s.len() + len, 0xee),
                    }
                }
                Ok(Some(t)) => panic!("unexpected client transmit {t:?}"),
                Err(e) => {
                    self.fail("client", e);
                    return progress;
                }
            }
            progress = true;
        }
    }

    fn server_out(&mut self) -> bool {
        let mut buf = [0u8; 16384];
        let mut progress = false;
        loop {
            match self.server.poll_transmit(&mut buf) {
                Ok(None) => return progress,
                Ok(Some(Transmit::Bytes(n))) => self.s2c.extend_from_slice(&buf[..n]),
                Ok(Some(Transmit::Payload { offset, len, .. })) => {
                    // A server in adversarial mode may point past the disk: send zeroes.
                    let range = usize::try_from(offset)
                        .ok()
                        .and_then(|at| Some(at..at.checked_add(len)?));
                    match range.and_then(|r| self.disk.get(r)) {
                        Some(data) => self.s2c.extend_from_slice(data),
                        None => self.s2c.resize(self.s2c.len() + len, 0),
                    }
                }
                Ok(Some(Transmit::Zeroes { len, .. })) => self.s2c.resize(self.s2c.len() + len, 0),
                Err(e) => {
                    self.fail("server", e);
                    return progress;
                }
            }
            progress = true;
        }
    }

    fn server_in(&mut self) -> bool {
        match self.server.wants() {
            Want::Payload { len, .. } | Want::Discard { len } => {
                let n = len.min(self.c2s.len());
                if n == 0 {
                    return false;
                }
                if let Some((_, data)) = &mut self.incoming {
                    data.extend_from_slice(&self.c2s[..n]);
                }
                self.c2s.drain(..n);
                self.traffic.0 += n as u64;
                if let Err(e) = self.server.handle_payload(n) {
                    self.fail("server", e);
                    return false;
                }
                if !matches!(self.server.wants(), Want::Payload { .. }) {
                    if let Some((req, data)) = self.incoming.take() {
                        if self.injected(&req).is_some() {
                            self.answer(req);
                        } else {
                            let at = req.offset as usize;
                            self.disk[at..at + data.len()].copy_from_slice(&data);
                            self.reply(req.cookie, Ok(()));
                        }
                    }
                }
                true
            }
            _ => {
                let input = core::mem::take(&mut self.c2s);
                let handled = match self.server.handle_input(&input) {
                    Ok(h) => h,
                    Err(e) => {
                        self.c2s = input;
                        self.fail("server", e);
                        return false;
                    }
                };
                let consumed = handled.consumed;
                let progress = consumed > 0 || handled.event.is_some();
                if let Some(ev) = handled.event {
                    self.server_log.push(format!("{ev:?}"));
                    self.server_event(ev);
                }
                self.c2s = input;
                self.c2s.drain(..consumed);
                self.traffic.0 += consumed as u64;
                progress
            }
        }
    }

    fn server_event(&mut self, ev: ServerEvent<'_>) {
        let r = match ev {
            ServerEvent::List => self
                .server
                .answer_list_entry("", "test disk")
                .and_then(|()| self.server.answer_ack()),
            ServerEvent::Export(q) if q.name.is_empty() || q.name == "disk" => {
                let info = ExportInfo::new(self.disk.len() as u64, self.flags)
                    .with_description("test disk");
                self.server.answer_export(&info)
            }
            ServerEvent::Export(_) => self
                .server
                .answer_error(OptError::UnknownExport, "no such export"),
            ServerEvent::MetaContexts(q) => {
                let mut r = Ok(());
                for name in q.matching(&CONTEXTS) {
                    let id = if name == CONTEXTS[0] { 1 } else { 2 };
                    r = r.and_then(|()| self.server.answer_meta_context(id, name));
                }
                r.and_then(|()| self.server.answer_ack())
            }
            ServerEvent::StartTls => self.server.tls_established(),
            ServerEvent::Request { request, .. } if request.command == Command::Write => {
                self.incoming = Some((request, Vec::new()));
                Ok(())
            }
            ServerEvent::Request { request, .. } => {
                match self.replies {
                    Replies::Immediate => self.answer(request),
                    Replies::Held => self.held.push(request),
                }
                Ok(())
            }
            ServerEvent::Disconnect => Ok(()),
        };
        if let Err(e) = r {
            self.fail("server", e);
        }
    }

    fn reply(&mut self, cookie: Cookie, result: Result<(), Errno>) {
        if let Err(e) = self.server.reply(cookie, result) {
            self.fail("server", e);
        }
    }

    fn zero_block(&self, block: u64) -> bool {
        let start = (block * BLOCK) as usize;
        let end = (start + BLOCK as usize).min(self.disk.len());
        self.disk[start..end].iter().all(|b| *b == 0)
    }

    /// The injected failure for a request, if any.
    fn injected(&self, r: &Request) -> Option<(u64, Errno)> {
        self.failures
            .iter()
            .copied()
            .find(|(o, _)| *o >= r.offset && *o < r.offset + r.len.max(1))
    }

    /// Serves one request from the disk.
    fn answer(&mut self, r: Request) {
        let (at, len) = (r.offset as usize, r.len as usize);
        if let Some((offset, errno)) = self.injected(&r) {
            let res = if r.command == Command::Flush {
                self.server.reply_error(r.cookie, errno, "injected failure")
            } else {
                self.server
                    .reply_error_at(r.cookie, errno, "injected failure", offset)
                    .or_else(|_| self.server.reply_error(r.cookie, errno, "injected failure"))
            };
            if let Err(e) = res {
                self.fail("server", e);
            }
            return;
        }
        let result = match r.command {
            Command::Read => {
                // Whole zero blocks go out as holes, the rest as data, in order.
                let mut pos = r.offset;
                let end = r.offset + r.len;
                let mut res = Ok(());
                while pos < end && res.is_ok() {
                    let block_end = ((pos / BLOCK + 1) * BLOCK).min(end);
                    let hole = self.zero_block(pos / BLOCK) && !r.flags.contains(CmdFlags::DF);
                    let mut run_end = block_end;
                    while run_end < end
                        && (self.zero_block(run_end / BLOCK) && !r.flags.contains(CmdFlags::DF))
                            == hole
                    {
                        run_end = ((run_end / BLOCK + 1) * BLOCK).min(end);
                    }
                    res = if hole {
                        self.server.reply_read_hole(r.cookie, pos, run_end - pos)
                    } else {
                        self.server
                            .reply_read_data(r.cookie, pos, (run_end - pos) as usize)
                    };
                    pos = run_end;
                }
                if let Err(e) = res {
                    self.fail("server", e);
                }
                return;
            }
            Command::BlockStatus => {
                for id in [1u32, 2] {
                    if !self.server.contexts().contains(&id) {
                        continue;
                    }
                    let mut extents = Vec::new();
                    let mut pos = r.offset;
                    let end = (r.offset + r.len).min(self.disk.len() as u64);
                    while pos < end {
                        let n = ((pos / BLOCK + 1) * BLOCK).min(end) - pos;
                        let status = if id == 2 {
                            1
                        } else if self.zero_block(pos / BLOCK) {
                            STATE_HOLE | STATE_ZERO
                        } else {
                            0
                        };
                        extents.push(Extent { len: n, status });
                        pos += n;
                    }
                    match self.server.reply_block_status(r.cookie, id, &extents) {
                        // A payload-form request may leave a context out.
                        Ok(()) | Err(Error::Misuse(crate::Misuse::BadReply(_))) => {}
                        Err(e) => {
                            self.fail("server", e);
                            return;
                        }
                    }
                }
                return;
            }
            Command::Trim | Command::WriteZeroes => {
                self.disk[at..at + len].fill(0);
                Ok(())
            }
            _ => Ok(()),
        };
        self.reply(r.cookie, result);
    }

    fn client_in(&mut self) -> bool {
        if let Want::Payload {
            cookie,
            offset,
            len,
        } = self.client.wants()
        {
            let n = len.min(self.s2c.len());
            if n == 0 {
                return false;
            }
            if let Some((base, buf)) = self.reads.get_mut(&cookie) {
                let at = (offset - *base) as usize;
                buf[at..at + n].copy_from_slice(&self.s2c[..n]);
            }
            self.s2c.drain(..n);
            self.traffic.1 += n as u64;
            if let Err(e) = self.client.handle_payload(n) {
                self.fail("client", e);
                return false;
            }
            return true;
        }
        let input = core::mem::take(&mut self.s2c);
        let handled = match self.client.handle_input(&input) {
            Ok(h) => h,
            Err(e) => {
                self.s2c = input;
                self.fail("client", e);
                return false;
            }
        };
        let consumed = handled.consumed;
        let progress = consumed > 0 || handled.event.is_some();
        if let Some(ev) = handled.event {
            self.client_log.push(format!("{ev:?}"));
            match ev {
                Event::ReadHole {
                    cookie,
                    offset,
                    len,
                } => {
                    if let Some((base, buf)) = self.reads.get_mut(&cookie) {
                        let at = (offset - *base) as usize;
                        buf[at..at + len as usize].fill(0);
                    }
                }
                Event::BlockStatus {
                    cookie,
                    context_id,
                    offset,
                    extents,
                } => {
                    let mut pos = offset;
                    for e in extents.iter() {
                        self.extents.push((cookie, context_id, pos, e));
                        pos += e.len;
                    }
                }
                Event::Done { cookie, result } => {
                    if let Some((_, data)) = self.reads.remove(&cookie) {
                        if result.is_ok() {
                            self.read_data.insert(cookie, data);
                        }
                    }
                    self.done.push((cookie, result));
                }
                _ => {}
            }
        }
        self.s2c = input;
        self.s2c.drain(..consumed);
        self.traffic.1 += consumed as u64;
        progress
    }
}
