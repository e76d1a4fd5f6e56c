//! The client side: [`Checked`], a client machine wrapped so that every call is checked
//! against the documented contracts, and the `client_input` target.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use nbd_proto::client::{
    Client, ClientConfig, Event, State, MAX_FRAME_LEN, MAX_OPTION_LEN, MAX_REQUEST_LEN,
};
use nbd_proto::wire::{CmdFlags, Command, Cookie, Info, OptCode, REP_MAGIC};
use nbd_proto::{Error, TlsPolicy, Transmit, Want};

use super::script::{self, Form};
use super::{check_borrow, Bytes, Feed, Rng};

/// Fragments of one read the client tracks exactly (`client/inflight.rs`).
const READ_FRAGMENTS: usize = 4;

/// A command the client accepted, and what its reply has shown so far.
#[derive(Debug, Clone)]
pub struct Cmd {
    /// The command.
    pub command: Command,
    /// Its flags, as given.
    pub flags: CmdFlags,
    /// Request offset.
    pub offset: u64,
    /// Effect length.
    pub len: u64,
    /// Content pieces seen (read), relative to `offset`, merged.
    frags: Vec<(u64, u64)>,
    /// The client's own fragment list would have overflowed: it checks only the count.
    overflowed: bool,
    covered: u64,
    pieces: u32,
    /// `poll_transmit` asked for the write payload.
    payload_asked: bool,
    /// Block status: next expected offset per context.
    extents_at: BTreeMap<u32, u64>,
}

impl Cmd {
    fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }

    fn holds(&self, offset: u64, len: u64) -> bool {
        offset >= self.offset && offset.checked_add(len).is_some_and(|e| e <= self.end())
    }

    /// Records read content `[offset, offset + len)`; panics where the client should have
    /// refused an overlap (while its fragment list is exact).
    fn content(&mut self, cookie: Cookie, offset: u64, len: u64) {
        assert!(
            self.holds(offset, len),
            "read content {offset}+{len} of {cookie:?} outside the request {}+{}",
            self.offset,
            self.len
        );
        let (s, e) = (offset - self.offset, offset - self.offset + len);
        let overlap = self.frags.iter().any(|&(fs, fe)| s < fe && fs < e);
        assert!(
            !overlap || self.overflowed,
            "{cookie:?}: overlapping read content {offset}+{len} accepted (fragments {:?})",
            self.frags
        );
        self.covered += len;
        self.pieces += 1;
        if overlap {
            return;
        }
        let (mut s, mut e) = (s, e);
        while let Some(i) = self.frags.iter().position(|&(fs, fe)| fe == s || fs == e) {
            let (fs, fe) = self.frags.swap_remove(i);
            s = s.min(fs);
            e = e.max(fe);
        }
        if self.frags.len() == READ_FRAGMENTS {
            self.overflowed = true;
        }
        self.frags.push((s, e));
    }
}

/// A client machine and the checker's view of it.
pub struct Checked<const N: usize> {
    /// The machine.
    pub c: Client<N>,
    /// Commands accepted and not yet completed or abandoned, by cookie.
    pub cmds: BTreeMap<u64, Cmd>,
    /// Every event and call result, as text.
    pub log: Vec<String>,
    /// Everything sent, in order (write payloads as a marker line).
    pub out: Vec<u8>,
    /// Events seen.
    pub events: usize,
    /// Transmission was reached.
    pub ready: bool,
    /// Commands completed (`Done` or `Abandoned`).
    pub completed: usize,
    /// `poll_transmit` buffer sizes: all big, or data-derived small ones.
    sizes: Option<Rng>,
    /// Read content still to move: (cookie, offset, bytes).
    rx: Option<(Cookie, u64, usize)>,
    /// Last event was `StartTls` / `Ready` (for the driver to act on).
    pub saw_starttls: bool,
    /// See `saw_starttls`.
    pub saw_ready: bool,
    /// The last `handle_input` error.
    pub last_error: Option<Error>,
    /// Write payloads by cookie: when set, `poll_transmit` payloads append the real
    /// bytes to `out` instead of a marker line (the `pair` target).
    pub payloads: Option<BTreeMap<u64, Vec<u8>>>,
    /// Owned copies of the transmission events, for a driver that needs their contents.
    pub record: Vec<Rec>,
}

/// An owned copy of a transmission event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rec {
    /// `ReadHole`.
    Hole(Cookie, u64, u64),
    /// `BlockStatus`: cookie, context, offset, (length, status) pairs.
    Extents(Cookie, u32, u64, Vec<(u64, u64)>),
    /// `Done`.
    Done(Cookie, Result<(), nbd_proto::Errno>),
}

impl<const N: usize> Checked<N> {
    /// A checked client for `config` (which must be valid).
    pub fn new(config: &ClientConfig<'_>, sizes: Option<Rng>) -> Self {
        Self {
            c: Client::new(config).expect("client configuration"),
            cmds: BTreeMap::new(),
            log: Vec::new(),
            out: Vec::new(),
            events: 0,
            ready: false,
            completed: 0,
            sizes,
            rx: None,
            saw_starttls: false,
            saw_ready: false,
            last_error: None,
            payloads: None,
            record: Vec::new(),
        }
    }

    /// True once the machine can do nothing more (closed or dead).
    pub fn finished(&self) -> bool {
        matches!(self.c.state(), State::Closed | State::Dead)
    }

    /// The observable state, to check that a caller error changed nothing.
    pub fn snapshot(&self) -> String {
        let c = &self.c;
        let mut s = String::new();
        let _ = write!(
            s,
            "{:?} {:?} {:?} {:?} {:?} {:?} {:?} {} {} {:?}",
            c.state(),
            c.error(),
            c.wants(),
            c.in_flight().collect::<Vec<_>>(),
            c.size(),
            c.transmission_flags(),
            c.contexts(),
            c.structured_replies(),
            c.extended_headers(),
            c.export_name(),
        );
        s
    }

    /// Checks the invariants that hold between calls.
    pub fn check(&self) {
        let c = &self.c;
        assert_eq!(
            c.state() == State::Dead,
            c.error().is_some(),
            "state {:?} with error {:?}",
            c.state(),
            c.error()
        );
        if let Some(e) = c.error() {
            assert!(e.is_fatal(), "dead with a non-fatal error {e:?}");
        }
        let in_flight: Vec<u64> = c.in_flight().map(|k| k.0).collect();
        let mut sorted = in_flight.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), in_flight.len(), "a cookie twice in flight");
        // A command whose completion is owed as a deferred event (wants() is `Bytes(0)`
        // until handle_input or poll_event returns it) has already left the table.
        let missing: Vec<u64> = self
            .cmds
            .keys()
            .filter(|k| !sorted.contains(k))
            .copied()
            .collect();
        assert!(
            sorted.iter().all(|k| self.cmds.contains_key(k))
                && (missing.is_empty() || (missing.len() == 1 && c.wants() == Want::Bytes(0))),
            "in flight {in_flight:?}, but the commands owed are {:?}",
            self.cmds.keys().collect::<Vec<_>>()
        );
        assert_eq!(c.in_flight_len(), self.cmds.len() - missing.len());
        assert!(c.in_flight_len() <= N);
        match c.wants() {
            Want::Bytes(n) => assert!(
                n <= MAX_FRAME_LEN,
                "wants {n} bytes, more than MAX_FRAME_LEN ({MAX_FRAME_LEN})"
            ),
            Want::Payload {
                cookie,
                offset,
                len,
            } => {
                let cmd = self
                    .cmds
                    .get(&cookie.0)
                    .unwrap_or_else(|| panic!("payload wanted for {cookie:?}, not in flight"));
                assert_eq!(cmd.command, Command::Read, "payload wanted for {cmd:?}");
                assert!(len > 0, "an empty payload wanted");
                assert!(
                    cmd.holds(offset, len as u64),
                    "payload {offset}+{len} of {cmd:?}"
                );
                let (rc, ro, rl) = self.rx.expect("payload wanted without ReadData");
                assert_eq!((rc, ro, rl), (cookie, offset, len), "wants() vs ReadData");
            }
            Want::Discard { len } => panic!("a client never discards (asked for {len})"),
            Want::Nothing => {}
            w => panic!("unknown want {w:?}"),
        }
        if self.finished() {
            // A completion still owed when the session ended shows as `Bytes(0)` until
            // `poll_event` takes it (handle_input no longer returns it).
            assert!(
                matches!(c.wants(), Want::Nothing | Want::Bytes(0)),
                "a finished client wants {:?}",
                c.wants()
            );
        }
    }

    /// A fatal error was returned: the machine must be dead with it, and every input call
    /// must return it again.
    fn sticky(&mut self, e: Error) {
        assert!(e.is_fatal());
        assert_eq!(self.c.state(), State::Dead, "{e:?} returned, but not dead");
        assert_eq!(self.c.error(), Some(e));
        let again = [
            self.c.handle_input(&[]).map(|_| ()),
            self.c.handle_input(&[0x67, 0x44, 0x66, 0x98]).map(|_| ()),
            self.c.handle_payload(0),
            self.c.handle_payload(1),
            self.c.handle_eof(),
            self.c.tls_established(),
            self.c.disconnect(),
            self.c.read(0, 1, CmdFlags::empty()).map(|_| ()),
            self.c.flush(CmdFlags::empty()).map(|_| ()),
            self.c.opt_list(),
        ];
        for (i, r) in again.into_iter().enumerate() {
            assert_eq!(r, Err(e), "call {i} after the fatal {e:?}");
        }
        assert_eq!(self.c.state(), State::Dead);
        self.rx = None;
    }

    /// Handles a non-`Ok` result of a call that is not input: a caller error must change
    /// nothing; a fatal one must be the sticky error.
    fn refused(&mut self, what: &str, e: Error, before: &str) {
        self.log.push(format!("{what}: {e:?}"));
        if e.is_fatal() {
            assert_eq!(
                Some(e),
                self.c.error(),
                "{what} returned a fatal {e:?} not sticky"
            );
        } else {
            assert_eq!(
                before,
                self.snapshot(),
                "{what} failed with {e:?} but changed state"
            );
        }
    }

    /// Issues a command through `f`, recording it.
    pub fn command(
        &mut self,
        what: &str,
        command: Command,
        offset: u64,
        len: u64,
        flags: CmdFlags,
        f: impl FnOnce(&mut Client<N>) -> Result<Cookie, Error>,
    ) -> Option<Cookie> {
        let before = self.snapshot();
        let r = f(&mut self.c);
        let cookie = match r {
            Ok(k) => k,
            Err(e) => {
                self.refused(what, e, &before);
                self.check();
                return None;
            }
        };
        self.log.push(format!("{what} -> {cookie:?}"));
        let old = self.cmds.insert(
            cookie.0,
            Cmd {
                command,
                flags,
                offset,
                len,
                frags: Vec::new(),
                overflowed: false,
                covered: 0,
                pieces: 0,
                payload_asked: false,
                extents_at: BTreeMap::new(),
            },
        );
        assert!(old.is_none(), "{cookie:?} given to two commands in flight");
        self.check();
        Some(cookie)
    }

    /// Any other call (options, disconnect, tls_established): logs, checks.
    pub fn call(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Client<N>) -> Result<(), Error>,
    ) -> bool {
        let before = self.snapshot();
        let r = f(&mut self.c);
        let ok = match r {
            Ok(()) => {
                self.log.push(format!("{what}: ok"));
                true
            }
            Err(e) => {
                self.refused(what, e, &before);
                false
            }
        };
        self.check();
        ok
    }

    /// `handle_input(buf)`: `Some((consumed, event?))`, or `None` on an error.
    pub fn input(&mut self, buf: &[u8]) -> Option<(usize, bool)> {
        self.saw_starttls = false;
        self.saw_ready = false;
        let before = self.snapshot();
        let r = self.c.handle_input(buf);
        let out = match r {
            Ok(h) => {
                assert!(
                    h.consumed <= buf.len(),
                    "consumed {} of {}",
                    h.consumed,
                    buf.len()
                );
                let got = h.event.is_some();
                if let Some(ev) = h.event {
                    self.event(ev, &buf[..h.consumed], false);
                }
                Some((h.consumed, got))
            }
            Err(e) => {
                self.log.push(format!("handle_input: {e:?}"));
                self.last_error = Some(e);
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

    /// `handle_payload(n)` for read content.
    pub fn payload(&mut self, n: usize) -> bool {
        let r = self.c.handle_payload(n);
        let ok = match r {
            Ok(()) => {
                let (k, o, l) = self.rx.expect("payload accepted with none owed");
                assert!(n <= l);
                self.rx = (n < l).then_some((k, o + n as u64, l - n));
                true
            }
            Err(e) => {
                // (Not the size: it depends on the split.)
                self.log.push(format!("handle_payload: {e:?}"));
                self.last_error = Some(e);
                if e.is_fatal() {
                    self.sticky(e);
                } else {
                    assert!(
                        self.rx.is_none_or(|(_, _, l)| n > l),
                        "handle_payload({n}) refused: {e:?}"
                    );
                }
                false
            }
        };
        self.check();
        ok
    }

    /// `handle_eof`, then every event owed (`poll_event`); afterwards nothing may be in
    /// flight.
    pub fn eof(&mut self) {
        let r = self.c.handle_eof();
        self.log.push(format!("handle_eof: {r:?}"));
        match r {
            Ok(()) => assert_eq!(self.c.state(), State::Closed),
            Err(e) => {
                assert!(e.is_fatal(), "handle_eof: non-fatal {e:?}");
                self.sticky(e);
            }
        }
        self.check();
        self.transmit();
        self.drain_events();
        assert!(
            self.cmds.is_empty(),
            "commands lost after end of file: {:?}",
            self.cmds
        );
        assert_eq!(self.c.poll_event(), None);
        assert_eq!(self.c.wants(), Want::Nothing, "wants input after the end");
        assert_eq!(self.c.handle_eof(), self.c.error().map_or(Ok(()), Err));
    }

    /// One `poll_event`.
    pub fn drain_one(&mut self) {
        if let Some(ev) = self.c.poll_event() {
            assert!(self.finished(), "poll_event gave {ev:?} on a live client");
            self.event(ev, &[], true);
        }
        self.check();
    }

    /// `poll_event` until `None`.
    pub fn drain_events(&mut self) {
        while let Some(ev) = self.c.poll_event() {
            assert!(self.finished(), "poll_event gave {ev:?} on a live client");
            self.event(ev, &[], true);
            self.check();
        }
    }

    /// Checks and records one event. `consumed` is the input it may borrow from.
    fn event(&mut self, ev: Event<'_>, consumed: &[u8], polled: bool) {
        self.events += 1;
        self.log.push(format!("{ev:?}"));
        let b = |what: &str, s: &[u8]| check_borrow(what, s, consumed, &ev);
        match ev {
            Event::Greeting { .. } | Event::OptionDone { result: Ok(()), .. } => {}
            Event::OptionDone {
                opt,
                result: Err(r),
            } => {
                b("message", r.message.as_bytes());
                if opt == OptCode::StartTls {
                    self.saw_starttls = false;
                }
            }
            Event::StartTls => self.saw_starttls = true,
            Event::Export { name, description } => {
                b("name", name.as_bytes());
                b("description", description.as_bytes());
            }
            Event::Info(i) => match i {
                Info::Name(s) | Info::Description(s) => b("info", s.as_bytes()),
                Info::Unknown { data, .. } => b("info data", data),
                _ => {}
            },
            Event::MetaContext { name, .. } => b("context", name.as_bytes()),
            Event::Ready { size, flags } => {
                // (From poll_event: an oldstyle hello's deferred Ready after the end.)
                assert!(
                    polled || self.c.state() == State::Ready,
                    "{ev:?} in {:?}",
                    self.c.state()
                );
                assert_eq!(self.c.size(), Some(size));
                assert_eq!(self.c.transmission_flags(), Some(flags));
                self.ready = true;
                self.saw_ready = true;
            }
            Event::ReadData {
                cookie,
                offset,
                len,
            } => {
                let cmd = self.cmd(cookie, &ev);
                assert_eq!(cmd.command, Command::Read, "{ev:?} for {cmd:?}");
                cmd.content(cookie, offset, len as u64);
                if len > 0 {
                    self.rx = Some((cookie, offset, len));
                }
            }
            Event::ReadHole {
                cookie,
                offset,
                len,
            } => {
                let cmd = self.cmd(cookie, &ev);
                assert_eq!(cmd.command, Command::Read, "{ev:?} for {cmd:?}");
                assert!(len > 0);
                cmd.content(cookie, offset, len.into());
                self.record.push(Rec::Hole(cookie, offset, len.into()));
            }
            Event::BlockStatus {
                cookie,
                context_id,
                offset,
                extents,
            } => {
                b("extents", extents.as_bytes());
                assert!(
                    self.c.contexts().contains(&context_id),
                    "{ev:?}: context not negotiated"
                );
                let cmd = self.cmd(cookie, &ev);
                assert_eq!(cmd.command, Command::BlockStatus, "{ev:?} for {cmd:?}");
                let start = cmd.offset;
                let at = cmd.extents_at.entry(context_id).or_insert(start);
                assert_eq!(*at, offset, "{ev:?}: descriptors not consecutive");
                if cmd.flags.contains(CmdFlags::REQ_ONE) {
                    assert_eq!(extents.len(), 1, "{ev:?}: REQ_ONE");
                }
                let end = cmd.end();
                let mut pos = offset;
                for e in extents.iter() {
                    assert!(
                        e.len > 0 && pos < end,
                        "{ev:?}: descriptor past the request"
                    );
                    pos = pos.saturating_add(e.len);
                }
                if let Some(at) = self
                    .cmds
                    .get_mut(&cookie.0)
                    .and_then(|c| c.extents_at.get_mut(&context_id))
                {
                    *at = pos;
                }
                let list = extents.iter().map(|e| (e.len, e.status)).collect();
                self.record
                    .push(Rec::Extents(cookie, context_id, offset, list));
            }
            Event::ChunkError {
                cookie,
                message,
                offset,
                ..
            } => {
                b("message", message.as_bytes());
                let cmd = self.cmd(cookie, &ev);
                if let Some(o) = offset {
                    assert!(cmd.holds(o, 1), "{ev:?}: offset outside {cmd:?}");
                }
            }
            Event::Done { cookie, result } => {
                let cmd = self
                    .cmds
                    .remove(&cookie.0)
                    .unwrap_or_else(|| panic!("{ev:?}: not in flight (completed twice?)"));
                self.completed += 1;
                if cmd.command == Command::Read && result.is_ok() {
                    assert_eq!(cmd.covered, cmd.len, "{ev:?}: read not covered: {cmd:?}");
                    if !cmd.overflowed {
                        assert_eq!(cmd.frags, vec![(0, cmd.len)], "{ev:?}");
                    }
                    if cmd.flags.contains(CmdFlags::DF) {
                        assert_eq!(cmd.pieces, 1, "{ev:?}: DF read in pieces");
                    }
                }
                if cmd.command == Command::Write {
                    assert!(
                        cmd.payload_asked,
                        "{ev:?}: write done before its payload went"
                    );
                }
                if self.rx.is_some_and(|(k, _, _)| k == cookie) {
                    panic!("{ev:?} while its data is still being moved");
                }
                self.record.push(Rec::Done(cookie, result));
            }
            Event::Abandoned { cookie } => {
                assert!(polled, "Abandoned from handle_input");
                self.cmds
                    .remove(&cookie.0)
                    .unwrap_or_else(|| panic!("{ev:?}: not in flight (completed twice?)"));
                self.completed += 1;
            }
            _ => panic!("unknown event {ev:?}"),
        }
    }

    fn cmd(&mut self, cookie: Cookie, ev: &Event<'_>) -> &mut Cmd {
        self.cmds
            .get_mut(&cookie.0)
            .unwrap_or_else(|| panic!("{ev:?}: not in flight"))
    }

    /// `poll_transmit` until `None`, into buffers of the configured sizes (growing one to
    /// what `BufferTooSmall` asks for).
    pub fn transmit(&mut self) {
        for _ in 0..100_000 {
            let mut size = match &mut self.sizes {
                None => MAX_OPTION_LEN,
                Some(r) => r.piece(200),
            };
            loop {
                match self.poll_one(size) {
                    Ok(true) => break,
                    Ok(false) => {
                        self.check();
                        return;
                    }
                    Err(required) => size = required,
                }
            }
        }
        panic!("poll_transmit never ends");
    }

    /// One `poll_transmit` into `size` bytes: `Ok(true)` if something came out,
    /// `Ok(false)` for `None`, `Err(required)` for `BufferTooSmall`.
    pub fn poll_one(&mut self, size: usize) -> Result<bool, usize> {
        let mut buf = vec![0xa5u8; size];
        let before = self.snapshot();
        match self.c.poll_transmit(&mut buf) {
            Err(Error::BufferTooSmall { required }) => {
                assert!(
                    required > size,
                    "BufferTooSmall {required} for {size} bytes"
                );
                let max = if self.c.state() == State::Ready {
                    MAX_REQUEST_LEN
                } else {
                    MAX_OPTION_LEN
                };
                assert!(required <= max, "poll_transmit needs {required} > {max}");
                assert!(
                    buf.iter().all(|&b| b == 0xa5),
                    "BufferTooSmall, but bytes written"
                );
                assert_eq!(before, self.snapshot(), "BufferTooSmall changed state");
                Err(required)
            }
            Ok(None) => Ok(false),
            Ok(Some(Transmit::Bytes(n))) => {
                assert!(n > 0 && n <= size, "Transmit::Bytes({n}) from {size} bytes");
                assert!(buf[n..].iter().all(|&b| b == 0xa5), "wrote past {n}");
                self.out.extend_from_slice(&buf[..n]);
                Ok(true)
            }
            Ok(Some(Transmit::Payload {
                cookie,
                offset,
                len,
            })) => {
                let cmd = self
                    .cmds
                    .get_mut(&cookie.0)
                    .unwrap_or_else(|| panic!("payload for {cookie:?}, not in flight"));
                assert_eq!(cmd.command, Command::Write);
                assert_eq!((offset, len as u64), (cmd.offset, cmd.len));
                assert!(!cmd.payload_asked, "write payload asked twice");
                cmd.payload_asked = true;
                match self.payloads.as_mut().map(|p| p.remove(&cookie.0)) {
                    Some(Some(data)) => {
                        assert_eq!(data.len(), len, "payload length");
                        self.out.extend_from_slice(&data);
                    }
                    Some(None) => panic!("payload for {cookie:?} asked twice"),
                    None => {
                        let _ =
                            writeln!(PayloadMarker(&mut self.out), "<payload {cookie:?} {len}>");
                    }
                }
                Ok(true)
            }
            Ok(Some(t)) => panic!("a client transmits {t:?}"),
            Err(e) => panic!("poll_transmit: {e:?}"),
        }
    }
}

struct PayloadMarker<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for PayloadMarker<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

// ---------------------------------------------------------------- client_input

/// One scripted command: 14 bytes (kind, flags, offset u64, length u32).
#[derive(Debug, Clone, Copy)]
pub struct CmdSpec {
    /// `kind % 10`: read, write, flush, trim, cache, write zeroes, block status, block
    /// status for the first context (payload form), disconnect, DF read.
    pub kind: u8,
    /// Command flag bits, as given.
    pub flags: u8,
    /// Offset.
    pub offset: u64,
    /// Length.
    pub len: u32,
}

/// Length of an encoded [`CmdSpec`].
pub const CMD_SPEC_LEN: usize = 14;

/// Most scripted commands.
pub const MAX_SCRIPT: usize = 32;

/// What the first bytes of a `client_input` input select.
#[derive(Debug, Clone)]
pub struct Setup {
    /// `None`: from the greeting; else after a scripted handshake in this form.
    pub form: Option<Form>,
    /// TLS policy.
    pub tls: TlsPolicy,
    /// Ask for [`script::CONTEXTS`].
    pub contexts: bool,
    /// Manual mode, following the stream's option replies (from the greeting only).
    pub follow: bool,
    /// `Client<4>` instead of `Client<64>`.
    pub small: bool,
    /// Do not ask for block sizes, names and descriptions.
    pub lean: bool,
    /// First context ID of the scripted `SET_META_CONTEXT`.
    pub id_base: u32,
    /// Commands issued when transmission starts.
    pub cmds: Vec<CmdSpec>,
}

/// Decodes the input header: selector, context ID base, command count, commands; the
/// rest is the server's byte stream.
///
/// Selector bits: 0-1 form (0: from the greeting, 1 simple, 2 structured, 3 extended),
/// 2-3 TLS (0 off, 1 optional, 2 required, 3 off), 4 contexts, 5 manual follow, 6 small
/// client, 7 lean options.
pub fn setup(data: &[u8]) -> (Setup, &[u8]) {
    let mut b = Bytes(data);
    let sel = b.u8();
    let id_base = u32::from(b.u8());
    let n = usize::from(b.u8()) % (MAX_SCRIPT + 1);
    let mut cmds = Vec::new();
    for _ in 0..n {
        if b.0.len() < CMD_SPEC_LEN {
            break;
        }
        cmds.push(CmdSpec {
            kind: b.u8(),
            flags: b.u8(),
            offset: b.be(8),
            len: b.be(4) as u32,
        });
    }
    let form = match sel & 3 {
        0 => None,
        1 => Some(Form::Simple),
        2 => Some(Form::Structured),
        _ => Some(Form::Extended),
    };
    let setup = Setup {
        form,
        tls: tls(sel >> 2),
        contexts: sel & 0x10 != 0,
        follow: form.is_none() && sel & 0x20 != 0,
        small: sel & 0x40 != 0,
        lean: sel & 0x80 != 0,
        id_base,
        cmds,
    };
    (setup, b.0)
}

/// TLS policy from two bits.
pub fn tls(bits: u8) -> TlsPolicy {
    match bits & 3 {
        1 => TlsPolicy::Optional,
        2 => TlsPolicy::Required,
        _ => TlsPolicy::Off,
    }
}

impl Setup {
    fn config(&self) -> ClientConfig<'static> {
        let mut c = ClientConfig::new("");
        c.tls = self.tls;
        if self.contexts {
            c.meta_contexts = &script::CONTEXTS;
        }
        c.manual = self.follow;
        if self.lean {
            c.request_block_size = false;
            c.request_name_and_description = false;
        }
        c
    }
}

/// Offsets in a server stream where TLS may start: the end of every option reply that
/// names `NBD_OPT_STARTTLS`. A driver never hands the machine bytes across one of these
/// in one call (after a STARTTLS ACK, later bytes come through TLS).
pub fn server_tls_points(stream: &[u8]) -> Vec<usize> {
    let mut points = Vec::new();
    if stream.len() < 18 || &stream[..16] != b"NBDMAGICIHAVEOPT" {
        return points;
    }
    let mut at = 18;
    while let Some(h) = stream.get(at..at + 20) {
        if h[..8] != REP_MAGIC.to_be_bytes() {
            break;
        }
        let opt = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
        at = at.saturating_add(20).saturating_add(len);
        if opt == u32::from(OptCode::StartTls) && at <= stream.len() {
            points.push(at);
        }
    }
    points
}

/// The result of one run, compared between the whole and the split run.
#[derive(Debug, PartialEq, Eq)]
pub struct Transcript {
    /// Events and call results.
    pub log: Vec<String>,
    /// Output bytes.
    pub out: Vec<u8>,
    /// Events seen.
    pub events: usize,
    /// Transmission reached.
    pub ready: bool,
}

/// Feeds `stream` to a client configured by `setup`: whole (`split` = `None`), or in
/// pieces sized by `split`, reading exactly what `wants()` asks for.
pub fn run_client<const N: usize>(setup: &Setup, stream: &[u8], split: Option<Rng>) -> Transcript {
    let mut feed = Feed::new(stream, server_tls_points(stream), split.clone());
    let mut k = Checked::<N>::new(&setup.config(), split);
    let mut abs = 0;
    let mut followed = None;
    k.check();
    k.transmit();
    for _ in 0..10_000_000 {
        if k.finished() {
            break;
        }
        feed.step();
        if setup.follow
            && k.c.state() == State::Negotiating
            && k.c.wants() == Want::Nothing
            && followed != Some((abs, k.events))
        {
            followed = Some((abs, k.events));
            follow(&mut k, &stream[abs..]);
            k.transmit();
            continue;
        }
        match k.c.wants() {
            Want::Payload { len, .. } => {
                let n = feed.payload(len);
                if n == 0 {
                    break;
                }
                abs += n;
                k.payload(n);
                k.transmit();
                continue;
            }
            want => feed.offer(want),
        }
        let Some((consumed, event)) = k.input(&feed.buf) else {
            break;
        };
        if consumed == 0 && !event {
            let buffered = feed.buf.len();
            match k.c.wants() {
                Want::Bytes(w) => assert!(
                    w > buffered || buffered == 0,
                    "no progress with {buffered} bytes, and wants() says {w}"
                ),
                w => assert!(
                    buffered == 0,
                    "no progress with {buffered} bytes, wants {w:?}"
                ),
            }
            if !feed.stalled() {
                break;
            }
            continue;
        }
        feed.consume(consumed);
        abs += consumed;
        if k.saw_starttls {
            k.call("tls_established", |c| c.tls_established());
        }
        if k.saw_ready {
            issue(&mut k, &setup.cmds);
        }
        k.transmit();
    }
    k.eof();
    Transcript {
        log: k.log,
        out: k.out,
        events: k.events,
        ready: k.ready,
    }
}

/// Manual mode: sends the option whose reply the stream holds next.
fn follow<const N: usize>(k: &mut Checked<N>, rest: &[u8]) {
    if rest.is_empty() {
        return;
    }
    let ok = if rest.len() >= 12 && rest[..8] == REP_MAGIC.to_be_bytes() {
        let code = OptCode::from(u32::from_be_bytes([rest[8], rest[9], rest[10], rest[11]]));
        match code {
            OptCode::List => k.call("opt_list", |c| c.opt_list()),
            OptCode::Info => k.call("opt_info", |c| c.opt_info("")),
            OptCode::Go => k.call("opt_go", |c| c.opt_go("")),
            OptCode::StructuredReply => k.call("opt_sr", |c| c.opt_structured_reply()),
            OptCode::ExtendedHeaders => k.call("opt_eh", |c| c.opt_extended_headers()),
            OptCode::StartTls => k.call("opt_starttls", |c| c.opt_starttls()),
            OptCode::Abort => k.call("opt_abort", |c| c.opt_abort()),
            OptCode::ListMetaContext => {
                k.call("opt_list_meta", |c| c.opt_list_meta_context("", &[]))
            }
            OptCode::SetMetaContext => k.call("opt_set_meta", |c| {
                c.opt_set_meta_context("", &script::CONTEXTS)
            }),
            _ => false,
        }
    } else {
        k.call("opt_export_name", |c| c.opt_export_name(""))
    };
    if !ok {
        k.call("opt_abort", |c| c.opt_abort());
    }
}

/// Issues the scripted commands.
fn issue<const N: usize>(k: &mut Checked<N>, cmds: &[CmdSpec]) {
    for s in cmds {
        let flags = CmdFlags::from_bits(u16::from(s.flags));
        let (o, l) = (s.offset, s.len);
        let l64 = u64::from(l);
        match s.kind % 10 {
            0 => k.command("read", Command::Read, o, l64, flags, |c| {
                c.read(o, l, flags)
            }),
            1 => k.command("write", Command::Write, o, l64, flags, |c| {
                c.write(o, l, flags)
            }),
            2 => k.command("flush", Command::Flush, 0, 0, flags, |c| c.flush(flags)),
            3 => k.command("trim", Command::Trim, o, l64, flags, |c| {
                c.trim(o, l64, flags)
            }),
            4 => k.command("cache", Command::Cache, o, l64, flags, |c| {
                c.cache(o, l64, flags)
            }),
            5 => k.command("zero", Command::WriteZeroes, o, l64, flags, |c| {
                c.write_zeroes(o, l64, flags)
            }),
            6 => k.command("bs", Command::BlockStatus, o, l64, flags, |c| {
                c.block_status(o, l64, flags)
            }),
            7 => {
                let ids: Vec<u32> = k.c.contexts().iter().copied().take(1).collect();
                k.command("bs_for", Command::BlockStatus, o, l64, flags, |c| {
                    c.block_status_for(o, l64, flags, &ids)
                })
            }
            8 => {
                k.call("disconnect", |c| c.disconnect());
                None
            }
            _ => {
                let flags = flags | CmdFlags::DF;
                k.command("read_df", Command::Read, o, l64, flags, |c| {
                    c.read(o, l, flags)
                })
            }
        };
    }
    k.transmit();
}

/// Asserts two transcripts are the same, showing the first difference.
pub fn same_transcript(what: &str, whole: &Transcript, split: &Transcript) {
    if whole.log != split.log {
        let i = whole
            .log
            .iter()
            .zip(&split.log)
            .position(|(a, b)| a != b)
            .unwrap_or(whole.log.len().min(split.log.len()));
        panic!(
            "{what}: whole and split runs differ at log line {i}:\n  whole: {:?}\n  split: {:?}\n\
             (whole log {} lines, split {}; previous: {:?})",
            whole.log.get(i),
            split.log.get(i),
            whole.log.len(),
            split.log.len(),
            i.checked_sub(1).and_then(|j| whole.log.get(j)),
        );
    }
    if whole.out != split.out {
        let i = whole
            .out
            .iter()
            .zip(&split.out)
            .position(|(a, b)| a != b)
            .unwrap_or(whole.out.len().min(split.out.len()));
        let near = |o: &[u8]| o[i.saturating_sub(16)..(i + 16).min(o.len())].to_vec();
        panic!(
            "{what}: same events but different output bytes ({} vs {}), first at {i}:\n  \
             whole: {:02x?}\n  split: {:02x?}",
            whole.out.len(),
            split.out.len(),
            near(&whole.out),
            near(&split.out),
        );
    }
    assert_eq!(
        (&whole.log, whole.events, whole.ready),
        (&split.log, split.events, split.ready)
    );
}

/// `client_input`: the client fed arbitrary server bytes (see [`setup`]), whole and
/// split. Returns the number of events (the replay requires seeds to produce some).
pub fn client_input(data: &[u8]) -> usize {
    let (setup, rest) = setup(data);
    let mut stream = Vec::new();
    if let Some(form) = setup.form {
        stream = script::server_side(form, setup.tls, setup.contexts, setup.id_base).0;
    }
    stream.extend_from_slice(rest);
    let (whole, split) = if setup.small {
        (
            run_client::<4>(&setup, &stream, None),
            run_client::<4>(&setup, &stream, Some(Rng::from_bytes(data))),
        )
    } else {
        (
            run_client::<64>(&setup, &stream, None),
            run_client::<64>(&setup, &stream, Some(Rng::from_bytes(data))),
        )
    };
    same_transcript("client_input", &whole, &split);
    if setup.form.is_some() {
        assert!(
            whole.ready,
            "the scripted handshake did not reach transmission: {:?}",
            whole.log
        );
    }
    whole.events
}
