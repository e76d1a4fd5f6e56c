//! The server side: [`Checked`], a server machine wrapped so that every call is checked
//! against the documented contracts, a deterministic [`Responder`] playing the
//! application, and the `server_input` target.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;

use nbd_proto::server::{
    any_matches, ExportInfo, ExportQueryKind, Server, ServerConfig, ServerEvent, State,
    MAX_CONTEXTS,
};
use nbd_proto::wire::{
    BlockSize, CmdFlags, Command, Cookie, Errno, Extent, InfoType, OptCode, OptError, Queries,
    Request, TransmissionFlags, OPTS_MAGIC,
};
use nbd_proto::{Error, Misuse, Transmit, Want};

use super::client::{same_transcript, tls, Transcript};
use super::script::{self, Form};
use super::{check_borrow, Feed, Rng};

/// Longest transmission-phase message the server buffers: an extended header and a
/// block-status payload naming every context.
pub const MAX_REQUEST_FRAME: usize = 32 + 8 + 4 * MAX_CONTEXTS;

/// An event with its borrowed parts copied out, for the application to answer.
#[derive(Debug, Clone)]
pub enum Ask {
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_INFO`, `NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME`.
    Export {
        /// Which option.
        kind: ExportQueryKind,
        /// The name asked for.
        name: String,
        /// Information asked for.
        infos: Vec<InfoType>,
    },
    /// `NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_SET_META_CONTEXT`.
    Meta {
        /// SET or LIST.
        set: bool,
        /// The queries.
        queries: Vec<String>,
    },
    /// STARTTLS accepted.
    StartTls,
    /// A request.
    Request(Request, Option<Vec<u32>>),
    /// `NBD_CMD_DISC`.
    Disconnect,
}

/// A server machine and the checker's view of it.
pub struct Checked<const N: usize, const B: usize> {
    /// The machine.
    pub s: Server<N, B>,
    /// Its configuration.
    pub config: ServerConfig,
    /// Requests handed to the application and not answered yet.
    pub owed: BTreeMap<u64, Request>,
    /// Events and call results.
    pub log: Vec<String>,
    /// Output bytes (payloads and zeroes as marker lines).
    pub out: Vec<u8>,
    /// Events seen.
    pub events: usize,
    /// Transmission was reached.
    pub transmission: bool,
    sizes: Option<Rng>,
    /// Payload markers owed for read replies: cookie, offset, length, zeroes, and (in
    /// disk mode) the bytes to send.
    markers: VecDeque<(Cookie, u64, u64, bool, Vec<u8>)>,
    /// Disk mode (the `pair` target): read replies send these bytes for real.
    pub disk: Option<Vec<u8>>,
    /// The write whose payload is being received.
    pub writing: Option<Request>,
    /// Per owed read: next offset to answer; per owed block status: contexts still owed.
    progress: BTreeMap<u64, (u64, Vec<u32>)>,
    /// The buffer `poll_transmit` writes into, kept between calls and refilled with the
    /// guard byte only where the machine wrote.
    scratch: Vec<u8>,
}

impl<const N: usize, const B: usize> Checked<N, B> {
    /// A checked newstyle server.
    pub fn new(config: ServerConfig, sizes: Option<Rng>) -> Self {
        Self {
            s: Server::new(config),
            config,
            owed: BTreeMap::new(),
            log: Vec::new(),
            out: Vec::new(),
            events: 0,
            transmission: false,
            sizes,
            markers: VecDeque::new(),
            disk: None,
            writing: None,
            progress: BTreeMap::new(),
            scratch: Vec::new(),
        }
    }

    /// True once the session is over (closed or dead).
    pub fn finished(&self) -> bool {
        matches!(self.s.state(), State::Closed | State::Dead)
    }

    /// The observable state, to check that a caller error changed nothing.
    pub fn snapshot(&self) -> String {
        let s = &self.s;
        format!(
            "{:?} {:?} {:?} {:?} {} {:?} {:?} {} {:?} {}",
            s.state(),
            s.error(),
            s.wants(),
            s.reply_form(),
            s.tls_active(),
            s.transmission_flags(),
            s.contexts(),
            s.owed(),
            s.payload_in_progress(),
            s.is_finished(),
        )
    }

    /// Checks the invariants that hold between calls.
    pub fn check(&self) {
        let s = &self.s;
        assert_eq!(
            s.state() == State::Dead,
            s.error().is_some(),
            "state {:?} with error {:?}",
            s.state(),
            s.error()
        );
        if let Some(e) = s.error() {
            assert!(e.is_fatal(), "dead with a non-fatal {e:?}");
        }
        assert!(s.owed() <= N);
        match s.wants() {
            Want::Bytes(n) => {
                let max = match s.state() {
                    State::Greeting => 4,
                    State::Negotiating => 16 + self.config.max_option_len as usize,
                    _ => MAX_REQUEST_FRAME,
                };
                assert!(
                    n <= max,
                    "wants {n} bytes in {:?}, more than {max}",
                    s.state()
                );
                assert!(n > 0);
            }
            Want::Payload {
                cookie,
                offset,
                len,
            } => {
                let w = self
                    .writing
                    .expect("payload wanted without a write request");
                assert_eq!(w.cookie, cookie);
                assert!(len > 0);
                assert!(offset >= w.offset && offset + len as u64 <= w.offset + w.len);
                assert_eq!(
                    s.payload_in_progress(),
                    Some((cookie, offset, len as u64)),
                    "payload_in_progress vs wants"
                );
            }
            Want::Discard { len } => {
                assert!(len > 0);
                assert!(len as u64 <= self.config.max_discard, "discard {len}");
            }
            Want::Nothing => {}
            w => panic!("unknown want {w:?}"),
        }
        if self.finished() {
            assert_eq!(s.wants(), Want::Nothing, "a finished server wants input");
        }
    }

    /// Checks the replies owed match the requests handed out and not answered (at points
    /// where no reply call is half done).
    pub fn check_owed(&self) {
        if !self.finished() {
            assert_eq!(
                self.s.owed(),
                self.owed.len(),
                "owed replies: the checker has {:?}",
                self.owed.keys()
            );
        }
    }

    /// A fatal error was returned: dead, and sticky.
    fn sticky(&mut self, e: Error) {
        assert!(e.is_fatal());
        assert_eq!(self.s.state(), State::Dead, "{e:?} returned, but not dead");
        assert_eq!(self.s.error(), Some(e));
        let mut buf = [0u8; 64];
        let again = [
            self.s.handle_input(&[]).map(|_| ()),
            self.s.handle_input(&[0x25, 0x60, 0x95, 0x13]).map(|_| ()),
            self.s.handle_payload(0),
            self.s.handle_eof(),
            self.s.tls_established(),
            self.s.poll_transmit(&mut buf).map(|_| ()),
            self.s.answer_ack(),
            self.s.answer_error(OptError::Unsup, ""),
            self.s.reply(Cookie(1), Ok(())),
        ];
        for (i, r) in again.into_iter().enumerate() {
            assert_eq!(r, Err(e), "call {i} after the fatal {e:?}");
        }
        assert!(self.s.is_finished(), "dead but not finished");
        self.writing = None;
    }

    /// Logs a call's result; a caller error must change nothing, a fatal one be sticky.
    pub fn call(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Server<N, B>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let before = self.snapshot();
        let r = f(&mut self.s);
        match r {
            Ok(()) => self.log.push(format!("{what}: ok")),
            Err(e) => {
                self.log.push(format!("{what}: {e:?}"));
                if e.is_fatal() {
                    assert_eq!(Some(e), self.s.error(), "{what}: fatal {e:?} not sticky");
                } else {
                    assert_eq!(
                        before,
                        self.snapshot(),
                        "{what} failed with {e:?} but changed state"
                    );
                }
            }
        }
        self.check();
        r
    }

    /// `handle_input`: `Some((consumed, event))` or `None` on error.
    pub fn input(&mut self, buf: &[u8]) -> Option<(usize, Option<Ask>)> {
        let before = self.snapshot();
        let r = self.s.handle_input(buf);
        let out = match r {
            Ok(h) => {
                assert!(
                    h.consumed <= buf.len(),
                    "consumed {} of {}",
                    h.consumed,
                    buf.len()
                );
                let ask = h.event.map(|ev| self.event(ev, &buf[..h.consumed]));
                Some((h.consumed, ask))
            }
            Err(e) => {
                self.log.push(format!("handle_input: {e:?}"));
                if e.is_fatal() {
                    self.sticky(e);
                } else {
                    assert_eq!(before, self.snapshot(), "handle_input: {e:?} changed state");
                }
                None
            }
        };
        self.check();
        out
    }

    fn event(&mut self, ev: ServerEvent<'_>, consumed: &[u8]) -> Ask {
        self.events += 1;
        self.log.push(format!("{ev:?}"));
        let b = |what: &str, s: &[u8]| check_borrow(what, s, consumed, &ev);
        let ask = match ev {
            ServerEvent::List => Ask::List,
            ServerEvent::Export(q) => {
                b("name", q.name.as_bytes());
                Ask::Export {
                    kind: q.kind,
                    name: q.name.into(),
                    infos: q.infos.iter().collect(),
                }
            }
            ServerEvent::MetaContexts(q) => {
                b("export", q.export.as_bytes());
                for s in q.queries.iter() {
                    b("query", s.as_bytes());
                }
                Ask::Meta {
                    set: q.set,
                    queries: q.queries.iter().map(String::from).collect(),
                }
            }
            ServerEvent::StartTls => {
                assert_eq!(self.s.state(), State::StartTls);
                Ask::StartTls
            }
            ServerEvent::Request { request, ids } => {
                self.transmission = true;
                assert!(
                    matches!(self.s.state(), State::Transmission),
                    "request in {:?}",
                    self.s.state()
                );
                let old = self.owed.insert(request.cookie.0, request);
                assert!(old.is_none(), "{ev:?}: cookie already owed a reply");
                let ctx = match (request.command, ids) {
                    (Command::BlockStatus, Some(ids)) => ids.iter().collect(),
                    (Command::BlockStatus, None) => self.s.contexts().to_vec(),
                    _ => Vec::new(),
                };
                self.progress
                    .insert(request.cookie.0, (request.offset, ctx));
                if request.command == Command::Write {
                    self.writing = Some(request);
                } else {
                    assert_eq!(request.payload_len(), 0, "{ev:?} with a payload left over");
                }
                Ask::Request(request, ids.map(|i| i.iter().collect()))
            }
            ServerEvent::Disconnect => Ask::Disconnect,
            _ => panic!("unknown event {ev:?}"),
        };
        ask
    }

    /// `handle_payload(n)` for write data or a discard.
    pub fn payload(&mut self, n: usize) -> bool {
        let before = self.snapshot();
        let r = self.s.handle_payload(n);
        if let Err(e) = r {
            // (Successful moves are not logged: their sizes depend on the split.)
            self.log.push(format!("handle_payload: {e:?}"));
        }
        match r {
            Ok(()) => {}
            Err(e) if e.is_fatal() => self.sticky(e),
            Err(e) => assert_eq!(
                before,
                self.snapshot(),
                "handle_payload: {e:?} changed state"
            ),
        }
        self.check();
        r.is_ok()
    }

    /// Marks a reply as sent (`Ok` from a completing `reply*` call).
    pub fn answered(&mut self, cookie: Cookie) {
        self.owed.remove(&cookie.0);
        self.progress.remove(&cookie.0);
    }

    /// `reply_read_data` or `reply_read_hole`, tracking the payload markers owed and the
    /// read's progress.
    pub fn reply_read(&mut self, cookie: Cookie, at: u64, n: u64, hole: bool) -> Result<(), Error> {
        let simple = self.s.reply_form() == nbd_proto::server::ReplyForm::Simple;
        let r = self.call("reply_read", |s| {
            if hole {
                s.reply_read_hole(cookie, at, n)
            } else {
                s.reply_read_data(cookie, at, n as usize)
            }
        });
        if r.is_ok() {
            if !hole || simple {
                let bytes = match &self.disk {
                    Some(d) if !hole => d[at as usize..(at + n) as usize].to_vec(),
                    _ => Vec::new(),
                };
                self.markers.push_back((cookie, at, n, hole, bytes));
            }
            let req = self.owed[&cookie.0];
            let p = self.progress.get_mut(&cookie.0).expect("progress");
            assert_eq!(p.0, at, "a read piece accepted out of order");
            p.0 += n;
            if p.0 == req.offset + req.len {
                self.answered(cookie);
            }
        }
        r
    }

    /// `reply_block_status`, tracking the contexts still owed.
    pub fn reply_bs(&mut self, cookie: Cookie, id: u32, extents: &[Extent]) -> Result<(), Error> {
        let r = self.call("reply_block_status", |s| {
            s.reply_block_status(cookie, id, extents)
        });
        if r.is_ok() {
            let p = self.progress.get_mut(&cookie.0).expect("progress");
            let i =
                p.1.iter()
                    .position(|c| *c == id)
                    .expect("a context not owed was accepted");
            p.1.remove(i);
            if p.1.is_empty() {
                self.answered(cookie);
            }
        }
        r
    }

    /// A call that completes the reply to `cookie` when it succeeds (`reply`,
    /// `reply_error`, `reply_error_at`).
    pub fn reply_end(
        &mut self,
        cookie: Cookie,
        f: impl FnOnce(&mut Server<N, B>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let r = self.call("reply_end", f);
        if r.is_ok() {
            self.answered(cookie);
        }
        r
    }

    /// The next offset owed for a read, the contexts owed for a block status.
    pub fn progress(&self, cookie: Cookie) -> Option<&(u64, Vec<u32>)> {
        self.progress.get(&cookie.0)
    }

    /// `poll_transmit` until `None`.
    pub fn transmit(&mut self) {
        for _ in 0..1_000_000 {
            let size = match &mut self.sizes {
                None => 65536,
                Some(r) => r.piece(300),
            };
            if !self.poll_one(size) {
                self.check();
                return;
            }
        }
        panic!("poll_transmit never ends");
    }

    /// One `poll_transmit` into `size` bytes; true if something came out.
    ///
    /// The buffer is filled with a guard byte; every byte past the reported length must
    /// still hold it. Allocating, filling and scanning 64 KiB per call made the whole-run
    /// half of `server_input` run at a few dozen inputs a second, so the buffer is reused,
    /// only the bytes the machine wrote are refilled, and the bytes past the output are
    /// checked near its end on every call and in full when the machine has nothing more.
    pub fn poll_one(&mut self, size: usize) -> bool {
        const GUARD: u8 = 0xa5;
        if self.scratch.len() < size {
            self.scratch.resize(size, GUARD);
        }
        let buf = &mut self.scratch[..size];
        match self.s.poll_transmit(buf) {
            Ok(None) => {
                assert!(untouched(buf, GUARD), "wrote without transmitting");
                false
            }
            Ok(Some(Transmit::Bytes(n))) => {
                assert!(n > 0 && n <= size, "Transmit::Bytes({n}) from {size} bytes");
                // Just past the end here; the whole buffer when the machine runs dry.
                assert!(
                    untouched(&buf[n..size.min(n + 512)], GUARD),
                    "wrote past {n}"
                );
                self.out.extend_from_slice(&buf[..n]);
                buf[..n].fill(GUARD);
                true
            }
            Ok(Some(Transmit::Payload {
                cookie,
                offset,
                len,
            })) => {
                self.marker(cookie, offset, len, false);
                true
            }
            Ok(Some(Transmit::Zeroes {
                cookie,
                offset,
                len,
            })) => {
                self.marker(cookie, offset, len, true);
                true
            }
            Ok(Some(t)) => panic!("unknown transmit {t:?}"),
            Err(e) => {
                assert_eq!(Some(e), self.s.error(), "poll_transmit: {e:?}");
                false
            }
        }
    }

    fn marker(&mut self, cookie: Cookie, offset: u64, len: usize, zeroes: bool) {
        if self.disk.is_none() {
            let _ = writeln!(Text(&mut self.out), "<{zeroes} {cookie:?} {offset} {len}>");
        }
        let Some(m) = self.markers.front_mut() else {
            panic!("payload marker {cookie:?} {offset}+{len} nobody asked for");
        };
        assert_eq!(
            (m.0, m.1, m.3),
            (cookie, offset, zeroes),
            "payload marker {cookie:?} {offset}+{len} (zeroes {zeroes}), expected {m:?}"
        );
        assert!(
            len > 0 && len as u64 <= m.2,
            "marker {len} bytes, expected {m:?}"
        );
        if self.disk.is_some() {
            if zeroes {
                self.out.resize(self.out.len() + len, 0);
            } else {
                self.out.extend(m.4.drain(..len));
            }
        }
        m.1 += len as u64;
        m.2 -= len as u64;
        if m.2 == 0 {
            self.markers.pop_front();
        }
    }

    /// `handle_eof`.
    pub fn eof(&mut self) -> Result<(), Error> {
        let r = self.s.handle_eof();
        self.log.push(format!("handle_eof: {r:?}"));
        match r {
            Ok(()) => assert!(
                matches!(self.s.state(), State::Closed | State::Disconnecting),
                "after a clean end of file: {:?}",
                self.s.state()
            ),
            Err(e) => {
                assert!(e.is_fatal(), "handle_eof: {e:?}");
                self.sticky(e);
            }
        }
        self.check();
        r
    }
}

struct Text<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Text<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Metadata contexts the responder offers, with the IDs it selects them under.
pub const AVAILABLE: [(u32, &str); 3] = [
    (1, "base:allocation"),
    (2, "qemu:dirty-bitmap:bm0"),
    (3, "qemu:allocation-depth"),
];

/// The application: answers every event deterministically.
#[derive(Debug, Clone)]
pub struct Responder {
    /// The export served.
    pub size: u64,
    /// Its flags.
    pub flags: TransmissionFlags,
    /// Block-size constraints (then also required).
    pub block_size: Option<BlockSize>,
    /// The export exists only over TLS.
    pub tls_only: bool,
    /// Requests held back, answered later in reverse order.
    pub held: Vec<(Request, Option<Vec<u32>>)>,
}

impl Responder {
    fn info(&self) -> ExportInfo<'static> {
        let mut i = ExportInfo::new(self.size, self.flags)
            .with_name("disk")
            .with_description("fuzz disk");
        if let Some(b) = self.block_size {
            i = i.with_block_size(b);
            i.require_block_size = true;
        }
        i.tls_only = self.tls_only;
        i
    }

    /// Answers `ask`. Requests whose cookie is 3 mod 4 are held until three are.
    pub fn answer<const N: usize, const B: usize>(&mut self, k: &mut Checked<N, B>, ask: Ask) {
        match ask {
            Ask::List => {
                let _ = k.call("list entry", |s| s.answer_list_entry("", "fuzz disk"));
                let _ = k.call("list entry", |s| s.answer_list_entry("disk", ""));
                let _ = k.call("ack", |s| s.answer_ack());
            }
            Ask::Export { name, .. } if name.is_empty() || name == "disk" => {
                let info = self.info();
                let r = k.call("answer_export", |s| s.answer_export(&info));
                assert!(r.is_ok(), "answer_export refused: {r:?}");
                if k.s.state() == State::Transmission {
                    k.transmission = true;
                }
            }
            Ask::Export { .. } => {
                let r = k.call("unknown export", |s| {
                    s.answer_error(OptError::UnknownExport, "no such export")
                });
                assert!(r.is_ok(), "answer_error refused: {r:?}");
            }
            Ask::Meta { set, queries } => {
                let refs: Vec<&str> = queries.iter().map(String::as_str).collect();
                let q = Queries::new(&refs);
                for (id, name) in AVAILABLE {
                    if any_matches(q, name, !set) {
                        let r = k.call("meta", |s| s.answer_meta_context(id, name));
                        assert!(r.is_ok(), "answer_meta_context refused: {r:?}");
                    }
                }
                let r = k.call("ack", |s| s.answer_ack());
                assert!(r.is_ok(), "answer_ack refused: {r:?}");
            }
            Ask::StartTls => {
                let r = k.call("tls_established", |s| s.tls_established());
                assert!(r.is_ok());
            }
            Ask::Request(r, _) if r.command == Command::Write => {}
            Ask::Request(r, ids) => {
                if r.cookie.0 % 4 == 3 {
                    self.held.push((r, ids));
                    if self.held.len() >= 3 {
                        self.release(k);
                    }
                } else {
                    self.reply(k, r, ids);
                }
            }
            Ask::Disconnect => self.release(k),
        }
        k.transmit();
    }

    /// Answers every held request, last first.
    pub fn release<const N: usize, const B: usize>(&mut self, k: &mut Checked<N, B>) {
        while let Some((r, ids)) = self.held.pop() {
            self.reply(k, r, ids);
        }
    }

    /// The write payload arrived: answer it.
    pub fn after_payload<const N: usize, const B: usize>(&mut self, k: &mut Checked<N, B>) {
        if k.s.payload_in_progress().is_none() {
            if let Some(w) = k.writing.take() {
                self.reply(k, w, None);
                k.transmit();
            }
        }
    }

    /// Replies to one request: reads as data and holes by 4 KiB block, block status as
    /// three extents per context, errors for cookies 4 mod 5.
    pub fn reply<const N: usize, const B: usize>(
        &mut self,
        k: &mut Checked<N, B>,
        r: Request,
        _ids: Option<Vec<u32>>,
    ) {
        if k.finished() || !k.owed.contains_key(&r.cookie.0) {
            return;
        }
        let cookie = r.cookie;
        let fail = cookie.0 % 5 == 4;
        let structured = k.s.reply_form() != nbd_proto::server::ReplyForm::Simple;
        match r.command {
            Command::Read if fail => retry(k, |k| {
                k.reply_end(cookie, |s| s.reply_error(cookie, Errno::Io, "injected"))
            }),
            Command::Read => {
                let df = r.flags.contains(CmdFlags::DF);
                let end = r.offset + r.len;
                let mut pos = r.offset;
                let mut first = true;
                while pos < end && !k.finished() && k.owed.contains_key(&cookie.0) {
                    if !first && cookie.0 % 7 == 6 {
                        let at = pos;
                        retry(k, |k| {
                            k.reply_end(cookie, |s| {
                                if structured {
                                    s.reply_error_at(cookie, Errno::Io, "half", at)
                                } else {
                                    s.reply_error(cookie, Errno::Io, "half")
                                }
                            })
                        });
                        break;
                    }
                    first = false;
                    let hole_at = |p: u64| !df && (p / 4096) % 3 == 1;
                    let hole = hole_at(pos);
                    let mut run = ((pos / 4096 + 1) * 4096).min(end);
                    while run < end && hole_at(run) == hole {
                        run = ((run / 4096 + 1) * 4096).min(end);
                    }
                    if df {
                        run = end;
                    }
                    let (at, n) = (pos, run - pos);
                    retry(k, |k| k.reply_read(cookie, at, n, hole));
                    pos = run;
                }
            }
            Command::BlockStatus => {
                let ids = k.progress(cookie).map(|p| p.1.clone()).unwrap_or_default();
                for id in ids {
                    let third = r.len / 3;
                    let extents = [
                        Extent {
                            len: third + 1,
                            status: 0,
                        },
                        Extent {
                            len: third,
                            status: 3,
                        },
                        Extent {
                            len: r.len,
                            status: cookie.0 & 3,
                        },
                    ];
                    retry(k, |k| k.reply_bs(cookie, id, &extents));
                }
            }
            _ => {
                let result = if fail { Err(Errno::NoSpc) } else { Ok(()) };
                retry(k, |k| k.reply_end(cookie, |s| s.reply(cookie, result)));
            }
        }
    }
}

/// Calls `f`; on `TransmitPending` drains the output and tries again. Any other refusal
/// of the deterministic responder's replies is a bug.
fn retry<const N: usize, const B: usize>(
    k: &mut Checked<N, B>,
    mut f: impl FnMut(&mut Checked<N, B>) -> Result<(), Error>,
) {
    for _ in 0..4 {
        match f(k) {
            Err(Error::Misuse(Misuse::TransmitPending)) => k.transmit(),
            Ok(()) => return,
            Err(e) if k.finished() => {
                assert!(e.is_fatal() || e == Error::Closed, "reply refused: {e:?}");
                return;
            }
            Err(e) => panic!("reply refused: {e:?}"),
        }
    }
    panic!("reply refused: output never drains");
}

/// Offsets in a client stream where TLS may start: the end of every `NBD_OPT_STARTTLS`.
pub fn client_tls_points(stream: &[u8]) -> Vec<usize> {
    let mut points = Vec::new();
    let mut at = 4;
    while let Some(h) = stream.get(at..at + 16) {
        if h[..8] != OPTS_MAGIC.to_be_bytes() {
            break;
        }
        let opt = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]) as usize;
        at = at.saturating_add(16).saturating_add(len);
        if opt == u32::from(OptCode::StartTls) && at <= stream.len() {
            points.push(at);
        }
    }
    points
}

/// What the first byte of a `server_input` input selects.
#[derive(Debug, Clone)]
pub struct Setup {
    /// `None`: from the greeting; else after a scripted negotiation in this form.
    pub form: Option<Form>,
    /// Server configuration.
    pub config: ServerConfig,
    /// `Server<4, 8192>` instead of `Server<64, 65536>`.
    pub small: bool,
    /// The application.
    pub responder: Responder,
}

/// Decodes the selector byte; the rest is the client's byte stream.
///
/// Bits: 0-1 form (0: from the greeting, 1 simple, 2 structured, 3 extended), 2-3 TLS
/// (0 off, 1 optional, 2 required, 3 off), 4 small server, 5 read-only export, 6 block-size
/// constraints (512/4096/64 KiB, required), 7 tight limits (64-byte options, 8 KiB
/// discards) and a TLS-only export.
pub fn setup(data: &[u8]) -> (Setup, &[u8]) {
    let sel = data.first().copied().unwrap_or(0);
    let form = match sel & 3 {
        0 => None,
        1 => Some(Form::Simple),
        2 => Some(Form::Structured),
        _ => Some(Form::Extended),
    };
    let mut config = ServerConfig::default();
    config.tls = tls(sel >> 2);
    if sel & 0x80 != 0 {
        config.max_option_len = 64;
        config.max_discard = 8192;
    }
    let mut flags = script::all_flags(Form::Extended);
    if sel & 0x20 != 0 {
        flags |= TransmissionFlags::READ_ONLY;
    }
    let responder = Responder {
        size: script::SIZE,
        flags,
        block_size: (sel & 0x40 != 0).then_some(BlockSize {
            min: 512,
            preferred: 4096,
            max_payload: 65536,
        }),
        tls_only: sel & 0x80 != 0,
        held: Vec::new(),
    };
    let setup = Setup {
        form,
        config,
        small: sel & 0x10 != 0,
        responder,
    };
    (setup, data.get(1..).unwrap_or(&[]))
}

/// Feeds `stream` to a server configured by `setup`: whole, or in pieces sized by `split`.
pub fn run_server<const N: usize, const B: usize>(
    setup: &Setup,
    stream: &[u8],
    split: Option<Rng>,
) -> Transcript {
    let mut feed = Feed::new(stream, client_tls_points(stream), split.clone());
    let mut k = Checked::<N, B>::new(setup.config, split);
    let mut app = setup.responder.clone();
    k.check();
    k.transmit();
    for _ in 0..10_000_000 {
        if k.finished() {
            break;
        }
        feed.step();
        match k.s.wants() {
            Want::Payload { len, .. } | Want::Discard { len } => {
                let n = feed.payload(len);
                if n == 0 {
                    break;
                }
                k.payload(n);
                app.after_payload(&mut k);
                k.transmit();
                continue;
            }
            want => feed.offer(want),
        }
        let Some((consumed, ask)) = k.input(&feed.buf) else {
            break;
        };
        if consumed == 0 && ask.is_none() {
            if let Want::Bytes(w) = k.s.wants() {
                let buffered = feed.buf.len();
                assert!(
                    w > buffered || buffered == 0,
                    "no progress with {buffered} bytes, and wants() says {w}"
                );
            }
            if !feed.stalled() {
                break;
            }
            continue;
        }
        feed.consume(consumed);
        if let Some(ask) = ask {
            app.answer(&mut k, ask);
        }
        k.transmit();
        k.check_owed();
    }
    // The client is gone: end of file, then the replies still owed.
    if k.eof().is_ok() {
        app.release(&mut k);
        if let Some(w) = k.writing.take() {
            panic!("write {w:?} still owed a payload after a clean end of file");
        }
        k.transmit();
        if !k.finished() {
            // Anything still owed is a reply the responder never gives (none are).
            assert!(k.owed.is_empty(), "owed after the end: {:?}", k.owed);
        }
        assert!(
            k.s.is_finished(),
            "not finished after the end: {:?} owed {}",
            k.s.state(),
            k.s.owed()
        );
    }
    assert!(
        k.markers.is_empty() || k.finished(),
        "payload markers never came: {:?}",
        k.markers
    );
    Transcript {
        log: k.log,
        out: k.out,
        events: k.events,
        ready: k.transmission,
    }
}

/// `server_input`: the server fed arbitrary client bytes (see [`setup`]), whole and split.
pub fn server_input(data: &[u8]) -> usize {
    let (setup, rest) = setup(data);
    let mut stream = Vec::new();
    if let Some(form) = setup.form {
        stream = script::client_side(form, setup.config.tls).0;
    }
    stream.extend_from_slice(rest);
    let (whole, split) = if setup.small {
        (
            run_server::<4, 8192>(&setup, &stream, None),
            run_server::<4, 8192>(&setup, &stream, Some(Rng::from_bytes(data))),
        )
    } else {
        (
            run_server::<64, 65536>(&setup, &stream, None),
            run_server::<64, 65536>(&setup, &stream, Some(Rng::from_bytes(data))),
        )
    };
    same_transcript("server_input", &whole, &split);
    if setup.form.is_some() {
        assert!(
            whole.ready || whole.log.iter().any(|l| l.contains("answer_export: ok")),
            "the scripted negotiation did not reach transmission: {:?}",
            whole.log
        );
    }
    whole.events
}

/// Whether every byte of `buf` is `guard` (an OR over 64-byte chunks, which vectorises).
fn untouched(buf: &[u8], guard: u8) -> bool {
    buf.chunks(64)
        .all(|c| c.iter().fold(0, |acc, &b| acc | (b ^ guard)) == 0)
}
