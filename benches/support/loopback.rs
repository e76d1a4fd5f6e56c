//! An allocation-free in-memory loop joining a [`Client`] and a [`Server`]: two fixed byte
//! arrays as pipes, a `Vec<u8>` disk on the server side and a `Vec<u8>` mirror of the export
//! on the client side (read data lands there at its export offset, write payloads are taken
//! from there). Everything is allocated in [`Loopback::new`]; driving requests afterwards
//! allocates nothing (tests/alloc.rs checks it), so the loop can be used both to prove the
//! machines allocation-free and to benchmark them without an allocator in the picture.
//!
//! Unlike `nbd_proto::testing::Pair` (HashMaps and Vecs per request, for tests), nothing here
//! is per request: cookies are never looked up, because both machines report export
//! offsets for every payload.
//!
//! Shared by `benches/machines.rs` and `tests/alloc.rs` (`#[path]` include).

#![allow(dead_code)]

use nbd_proto::client::{Client, ClientConfig, Event, State};
use nbd_proto::server::{ExportInfo, ReplyForm, Server, ServerConfig, ServerEvent};
use nbd_proto::wire::extent::{STATE_HOLE, STATE_ZERO};
use nbd_proto::wire::{CmdFlags, Command, Cookie, Extent, TransmissionFlags};
use nbd_proto::{Error, Transmit, Want};

/// The metadata context the server offers (ID 1).
pub const CONTEXT: &str = "base:allocation";

/// A one-way byte pipe over a fixed buffer: `buf[start..end]` is readable, the rest of
/// the buffer is free. Compacts (moves the unread tail to the front) only when the free
/// tail gets short.
pub struct Pipe {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Pipe {
    pub fn new(capacity: usize) -> Self {
        Self {
            buf: vec![0; capacity],
            start: 0,
            end: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// The free tail, compacting first when less than half the buffer is free there.
    pub fn space(&mut self) -> &mut [u8] {
        if self.start > 0 && self.buf.len() - self.end < self.buf.len() / 2 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    pub fn commit(&mut self, n: usize) {
        self.end += n;
        debug_assert!(self.end <= self.buf.len());
    }
}

/// A payload being moved into a pipe in pieces: export offset, bytes left, zeroes?
#[derive(Clone, Copy)]
struct Outgoing {
    offset: usize,
    left: usize,
    zeroes: bool,
}

/// Counters kept by the client side.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Commands completed (any result).
    pub completed: u64,
    /// Commands completed with an error.
    pub errors: u64,
    /// Block-status descriptors seen.
    pub extents: u64,
    /// Sum of the lengths of those descriptors (keeps the iteration honest).
    pub extent_bytes: u64,
    /// Read-data payload bytes received by the client.
    pub read_bytes: u64,
}

/// What [`Loopback::run`] issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    BlockStatus,
}

/// The client and server machines joined by two in-memory pipes.
pub struct Loopback {
    pub client: Box<Client<64>>,
    pub server: Box<Server<64>>,
    c2s: Pipe,
    s2c: Pipe,
    /// The server's export.
    pub disk: Vec<u8>,
    /// The client's buffer, indexed by export offset.
    pub mirror: Vec<u8>,
    c_out: Option<Outgoing>,
    s_out: Option<Outgoing>,
    /// The write whose payload the server is receiving: cookie and bytes left.
    s_write: Option<(Cookie, u64)>,
    pub stats: Stats,
    /// Next offset for [`Loopback::run`].
    cursor: u64,
}

fn form_config(form: ReplyForm) -> ClientConfig<'static> {
    let mut c = ClientConfig::new("");
    match form {
        ReplyForm::Simple => {
            c.structured_replies = false;
            c.extended_headers = false;
        }
        ReplyForm::Structured => {
            c.extended_headers = false;
            c.meta_contexts = &[CONTEXT];
        }
        ReplyForm::Extended => c.meta_contexts = &[CONTEXT],
    }
    c
}

impl Loopback {
    /// A negotiated pair in `form` over a `size`-byte disk, with `pipe`-byte pipes.
    pub fn new(form: ReplyForm, size: usize, pipe: usize) -> Self {
        Self::with_export_size(form, size, size as u64, pipe)
    }

    /// Like [`Loopback::new`], but the server announces `export_size` bytes (which may be
    /// larger than the disk, for block-status-only use).
    pub fn with_export_size(form: ReplyForm, disk: usize, export_size: u64, pipe: usize) -> Self {
        let config = form_config(form);
        let mut l = Self {
            client: Box::new(Client::new(&config).expect("client config")),
            server: Box::new(Server::new(ServerConfig::default())),
            c2s: Pipe::new(pipe),
            s2c: Pipe::new(pipe),
            disk: vec![0x5a; disk],
            mirror: vec![0xa5; disk],
            c_out: None,
            s_out: None,
            s_write: None,
            stats: Stats::default(),
            cursor: 0,
        };
        let mut rounds = 0;
        while l.client.state() != State::Ready {
            assert!(
                l.step_with(export_size),
                "handshake stalled in {:?}",
                l.client.state()
            );
            rounds += 1;
            assert!(rounds < 10_000, "handshake does not end");
        }
        assert_eq!(l.server.reply_form(), form);
        l
    }

    /// One round: each side sends, then receives. False if nothing moved.
    pub fn step(&mut self) -> bool {
        self.step_with(self.disk.len() as u64)
    }

    fn step_with(&mut self, export_size: u64) -> bool {
        let a = self.client_out();
        let b = self.server_in(export_size);
        let c = self.server_out();
        let d = self.client_in();
        a | b | c | d
    }

    fn client_out(&mut self) -> bool {
        let mut progress = false;
        loop {
            if let Some(o) = &mut self.c_out {
                let space = self.c2s.space();
                let n = o.left.min(space.len());
                if n == 0 {
                    return progress;
                }
                space[..n].copy_from_slice(&self.mirror[o.offset..o.offset + n]);
                self.c2s.commit(n);
                o.offset += n;
                o.left -= n;
                if o.left == 0 {
                    self.c_out = None;
                }
                progress = true;
                continue;
            }
            let space = self.c2s.space();
            if space.is_empty() {
                return progress;
            }
            match self.client.poll_transmit(space) {
                Ok(None) => return progress,
                Ok(Some(Transmit::Bytes(n))) => self.c2s.commit(n),
                Ok(Some(Transmit::Payload { offset, len, .. })) => {
                    self.c_out = Some(Outgoing {
                        offset: offset as usize,
                        left: len,
                        zeroes: false,
                    })
                }
                // The pipe is too full for the next whole request: the server drains it.
                Err(Error::BufferTooSmall { .. }) => return progress,
                other => panic!("client poll_transmit: {other:?}"),
            }
            progress = true;
        }
    }

    fn server_out(&mut self) -> bool {
        let mut progress = false;
        loop {
            if let Some(o) = &mut self.s_out {
                let space = self.s2c.space();
                let n = o.left.min(space.len());
                if n == 0 {
                    return progress;
                }
                if o.zeroes {
                    space[..n].fill(0);
                } else {
                    space[..n].copy_from_slice(&self.disk[o.offset..o.offset + n]);
                }
                self.s2c.commit(n);
                o.offset += n;
                o.left -= n;
                if o.left == 0 {
                    self.s_out = None;
                }
                progress = true;
                continue;
            }
            let space = self.s2c.space();
            if space.is_empty() {
                return progress;
            }
            match self.server.poll_transmit(space) {
                Ok(None) => return progress,
                Ok(Some(Transmit::Bytes(n))) => self.s2c.commit(n),
                Ok(Some(Transmit::Payload { offset, len, .. })) => {
                    self.s_out = Some(Outgoing {
                        offset: offset as usize,
                        left: len,
                        zeroes: false,
                    })
                }
                Ok(Some(Transmit::Zeroes { offset, len, .. })) => {
                    self.s_out = Some(Outgoing {
                        offset: offset as usize,
                        left: len,
                        zeroes: true,
                    })
                }
                Ok(Some(other)) => panic!("server transmit {other:?}"),
                Err(e) => panic!("server poll_transmit: {e:?}"),
            }
            progress = true;
        }
    }

    fn server_in(&mut self, export_size: u64) -> bool {
        let mut progress = false;
        loop {
            match self.server.wants() {
                Want::Payload { offset, len, .. } => {
                    let n = len.min(self.c2s.len());
                    if n == 0 {
                        return progress;
                    }
                    let at = offset as usize;
                    self.disk[at..at + n].copy_from_slice(&self.c2s.data()[..n]);
                    self.c2s.consume(n);
                    self.server
                        .handle_payload(n)
                        .expect("server handle_payload");
                    if let Some((cookie, left)) = &mut self.s_write {
                        *left -= n as u64;
                        if *left == 0 {
                            let cookie = *cookie;
                            self.s_write = None;
                            self.server.reply(cookie, Ok(())).expect("write reply");
                        }
                    }
                }
                Want::Discard { len } => {
                    let n = len.min(self.c2s.len());
                    if n == 0 {
                        return progress;
                    }
                    self.c2s.consume(n);
                    self.server.handle_payload(n).expect("server discard");
                }
                Want::Bytes(n) => {
                    if self.c2s.len() < n {
                        return progress;
                    }
                    let h = self
                        .server
                        .handle_input(self.c2s.data())
                        .expect("server handle_input");
                    let consumed = h.consumed;
                    let event = h.event.is_some();
                    if let Some(ev) = h.event {
                        server_event(&mut self.server, &mut self.s_write, ev, export_size);
                    }
                    self.c2s.consume(consumed);
                    if consumed == 0 && !event {
                        return progress;
                    }
                }
                _ => return progress,
            }
            progress = true;
        }
    }

    fn client_in(&mut self) -> bool {
        let mut progress = false;
        loop {
            match self.client.wants() {
                Want::Payload { offset, len, .. } => {
                    let n = len.min(self.s2c.len());
                    if n == 0 {
                        return progress;
                    }
                    let at = offset as usize;
                    self.mirror[at..at + n].copy_from_slice(&self.s2c.data()[..n]);
                    self.s2c.consume(n);
                    self.stats.read_bytes += n as u64;
                    self.client
                        .handle_payload(n)
                        .expect("client handle_payload");
                }
                Want::Bytes(n) => {
                    if self.s2c.len() < n {
                        return progress;
                    }
                    let h = self
                        .client
                        .handle_input(self.s2c.data())
                        .expect("client handle_input");
                    let consumed = h.consumed;
                    let event = h.event.is_some();
                    if let Some(ev) = h.event {
                        client_event(&mut self.mirror, &mut self.stats, ev);
                    }
                    self.s2c.consume(consumed);
                    if consumed == 0 && !event {
                        return progress;
                    }
                }
                _ => return progress,
            }
            progress = true;
        }
    }

    /// Issues one command of `op` over `len` bytes at `offset`.
    pub fn issue(&mut self, op: Op, offset: u64, len: u32) -> Cookie {
        let r = match op {
            Op::Read => self.client.read(offset, len, CmdFlags::empty()),
            Op::Write => self.client.write(offset, len, CmdFlags::empty()),
            Op::BlockStatus => self
                .client
                .block_status(offset, u64::from(len), CmdFlags::empty()),
        };
        r.expect("issue")
    }

    /// Runs `count` commands of `op` over `len` bytes each, keeping `depth` in flight, at
    /// consecutive offsets (wrapping around the disk). Returns the commands completed.
    pub fn run(&mut self, op: Op, len: u32, depth: usize, count: u64) -> u64 {
        let target = self.stats.completed + count;
        let size = self.disk.len() as u64;
        let mut issued = 0;
        while self.stats.completed < target {
            while issued < count && self.client.in_flight_len() < depth {
                if self.cursor + u64::from(len) > size {
                    self.cursor = 0;
                }
                self.issue(op, self.cursor, len);
                self.cursor += u64::from(len);
                issued += 1;
            }
            if !self.step() {
                panic!(
                    "the loop stalled: {} in flight, client wants {:?}, server wants {:?}",
                    self.client.in_flight_len(),
                    self.client.wants(),
                    self.server.wants()
                );
            }
        }
        count
    }

    /// Drives until nothing moves (all replies in).
    pub fn settle(&mut self) {
        while self.step() {}
    }
}

/// The application behind the server: answers options and serves requests from `disk`
/// (read data is copied by `server_out` when the machine asks for it).
fn server_event(
    server: &mut Server<64>,
    write: &mut Option<(Cookie, u64)>,
    ev: ServerEvent<'_>,
    export_size: u64,
) {
    let r = match ev {
        ServerEvent::List => server
            .answer_list_entry("", "")
            .and_then(|()| server.answer_ack()),
        ServerEvent::Export(_) => {
            let flags = TransmissionFlags::SEND_FLUSH
                | TransmissionFlags::SEND_FUA
                | TransmissionFlags::SEND_TRIM
                | TransmissionFlags::SEND_WRITE_ZEROES
                | TransmissionFlags::SEND_DF
                | TransmissionFlags::CAN_MULTI_CONN;
            server.answer_export(&ExportInfo::new(export_size, flags))
        }
        ServerEvent::MetaContexts(q) => {
            let mut r = Ok(());
            for name in q.matching(&[CONTEXT]) {
                r = r.and_then(|()| server.answer_meta_context(1, name));
            }
            r.and_then(|()| server.answer_ack())
        }
        ServerEvent::Request { request, .. } => match request.command {
            Command::Read => {
                server.reply_read_data(request.cookie, request.offset, request.len as usize)
            }
            Command::Write => {
                *write = Some((request.cookie, request.len));
                Ok(())
            }
            Command::BlockStatus => {
                // Eight alternating data/hole extents over the request, from a stack array.
                let piece = (request.len / 8).max(1);
                let mut extents = [Extent::default(); 8];
                for (i, e) in extents.iter_mut().enumerate() {
                    e.len = piece;
                    e.status = if i % 2 == 0 {
                        0
                    } else {
                        STATE_HOLE | STATE_ZERO
                    };
                }
                let mut ids = [0u32; 16];
                let n = server.contexts().len().min(16);
                ids[..n].copy_from_slice(&server.contexts()[..n]);
                let mut r = Ok(());
                for id in &ids[..n] {
                    r = r.and_then(|()| server.reply_block_status(request.cookie, *id, &extents));
                }
                r
            }
            _ => server.reply(request.cookie, Ok(())),
        },
        ServerEvent::StartTls | ServerEvent::Disconnect => Ok(()),
        other => panic!("unexpected server event {other:?}"),
    };
    r.expect("server answer");
}

/// The application behind the client.
fn client_event(mirror: &mut [u8], stats: &mut Stats, ev: Event<'_>) {
    match ev {
        Event::ReadHole { offset, len, .. } => {
            let at = offset as usize;
            mirror[at..at + len as usize].fill(0);
        }
        Event::BlockStatus { extents, .. } => {
            for e in extents {
                stats.extents += 1;
                stats.extent_bytes += e.len;
            }
        }
        Event::Done { result, .. } => {
            stats.completed += 1;
            if result.is_err() {
                stats.errors += 1;
            }
        }
        _ => {}
    }
}
