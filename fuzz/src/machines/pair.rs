//! `pair`: a client and a server joined in memory, driven by arbitrary operations
//! (reads, writes, trims, zeroes, block status, flush, cache, disconnect, replies held and
//! released), with a model of the disk on the side.
//!
//! Both machines are this crate's, talking to each other through the checked wrappers,
//! so any machine error other than an expected TLS incompatibility is a bug. Checks:
//!
//! - every read delivers exactly the bytes the server's disk held when it answered
//!   (transport integrity: offsets, holes, split payloads);
//! - a read that no overlapping write, trim or zero raced with returns the model's bytes,
//!   and block status never calls a range zero that the model says is not;
//! - every command completes once, successfully (the server is never asked anything
//!   the client considers valid and the server refuses);
//! - after a disconnect both sides end cleanly.

use std::collections::BTreeMap;

use arbitrary::{Arbitrary, Unstructured};

use nbd_proto::client::{ClientConfig, State as CState};
use nbd_proto::server::{ServerConfig, State as SState};
use nbd_proto::wire::{BlockSize, CmdFlags, Command, Cookie, Extent, Request, TransmissionFlags};
use nbd_proto::{Error, Incompatible, TlsPolicy, Want};

use super::client::{self, tls, Rec};
use super::server::{self, Ask, Responder};
use super::Rng;

/// Disk block of the allocation map (holes, block status).
const BLOCK: u64 = 4096;

/// The configuration of both sides.
#[derive(Arbitrary, Debug)]
pub struct PConfig {
    ctls: u8,
    stls: u8,
    contexts: bool,
    c_no_sr: bool,
    c_no_eh: bool,
    s_no_sr: bool,
    s_no_eh: bool,
    read_only: bool,
    block_size: bool,
    blocks: u8,
    small: bool,
}

/// One operation.
#[derive(Arbitrary, Debug)]
pub enum POp {
    /// `read` (offsets and lengths in 64-byte units, wrapped into the disk).
    Read { off: u16, len: u16, df: bool },
    /// `write` of a pattern.
    Write {
        off: u16,
        len: u16,
        byte: u8,
        fua: bool,
    },
    /// `trim`.
    Trim { off: u16, len: u16 },
    /// `write_zeroes`.
    Zero { off: u16, len: u16, no_hole: bool },
    /// `block_status`.
    Bs { off: u16, len: u32, req_one: bool },
    /// `block_status_for` the first context only.
    BsFor { off: u16, len: u32 },
    /// `flush`.
    Flush,
    /// `cache`.
    Cache { off: u16, len: u16 },
    /// Hold the server's replies from now on (or stop holding).
    Hold(bool),
    /// Answer the held requests, newest first or oldest first.
    Release { newest_first: bool },
    /// Step both machines `n` times.
    Step(u8),
    /// Step until neither moves.
    Settle,
    /// `disconnect`.
    Disconnect,
}

struct Read {
    offset: u64,
    buf: Vec<u8>,
    /// An overlapping write, trim or zero was in flight during the read.
    raced: bool,
}

/// A write-like command in flight: range, and its data (`None`: zeroes).
struct Write {
    offset: u64,
    len: u64,
    data: Option<Vec<u8>>,
    /// Another overlapping write-like command was in flight at the same time: the order
    /// the server applied them in is unknown.
    raced: bool,
}

struct Pair<const N: usize, const B: usize> {
    c: client::Checked<64>,
    s: server::Checked<N, B>,
    app: Responder,
    c2s: Vec<u8>,
    s2c: Vec<u8>,
    /// What the client believes the disk holds (writes applied on completion).
    model: Vec<u8>,
    /// Bytes of the model that are certain (not last written by racing writes).
    known: Vec<bool>,
    reads: BTreeMap<u64, Read>,
    /// Block status in flight: offset, length, raced.
    bs: BTreeMap<u64, (u64, u64, bool)>,
    writes: BTreeMap<u64, Write>,
    /// What the server answered each read with, at reply time.
    served: BTreeMap<u64, Vec<u8>>,
    /// The write payload being received.
    incoming: Vec<u8>,
    hold: bool,
    held: Vec<Request>,
    /// The handshake must fail (TLS required by one side only).
    incompatible: bool,
    eof_sent: bool,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

impl<const N: usize, const B: usize> Pair<N, B> {
    fn disk(&mut self) -> &mut Vec<u8> {
        self.s.disk.as_mut().expect("disk mode")
    }

    fn range(&self, off: u16, len: u64) -> (u64, u64) {
        let size = self.model.len() as u64;
        let o = (u64::from(off) * 64) % size;
        (o, len.clamp(1, size - o))
    }

    fn writes_overlap(&self, r: (u64, u64)) -> bool {
        self.writes.values().any(|w| overlaps(r, (w.offset, w.len)))
    }

    /// A write-like command was submitted: every overlapping read or block status in
    /// flight races with it, and so does every overlapping write (returns whether one
    /// did).
    fn taint(&mut self, r: (u64, u64)) -> bool {
        let mut raced = false;
        for w in self.writes.values_mut() {
            if overlaps(r, (w.offset, w.len)) {
                w.raced = true;
                raced = true;
            }
        }
        for rd in self.reads.values_mut() {
            if overlaps(r, (rd.offset, rd.buf.len() as u64)) {
                rd.raced = true;
            }
        }
        for b in self.bs.values_mut() {
            if overlaps(r, (b.0, b.1)) {
                b.2 = true;
            }
        }
        raced
    }

    fn op(&mut self, op: POp, rng: &mut Rng) {
        match op {
            POp::Read { off, len, df } => {
                let (o, l) = self.range(off, u64::from(len) * 64);
                let flags = if df { CmdFlags::DF } else { CmdFlags::empty() };
                let l32 = l as u32;
                if let Some(k) = self.c.command("read", Command::Read, o, l, flags, |c| {
                    c.read(o, l32, flags)
                }) {
                    let raced = self.writes_overlap((o, l));
                    let buf = vec![0xa5; l as usize];
                    self.reads.insert(
                        k.0,
                        Read {
                            offset: o,
                            buf,
                            raced,
                        },
                    );
                }
            }
            POp::Write {
                off,
                len,
                byte,
                fua,
            } => {
                let (o, l) = self.range(off, u64::from(len) * 64);
                let flags = if fua {
                    CmdFlags::FUA
                } else {
                    CmdFlags::empty()
                };
                let data: Vec<u8> = (0..l)
                    .map(|i| byte.wrapping_add((i / 512) as u8) | 1)
                    .collect();
                let l32 = l as u32;
                if let Some(k) = self.c.command("write", Command::Write, o, l, flags, |c| {
                    c.write(o, l32, flags)
                }) {
                    self.c
                        .payloads
                        .get_or_insert_with(BTreeMap::new)
                        .insert(k.0, data.clone());
                    let raced = self.taint((o, l));
                    self.writes.insert(
                        k.0,
                        Write {
                            offset: o,
                            len: l,
                            data: Some(data),
                            raced,
                        },
                    );
                }
            }
            POp::Trim { off, len } | POp::Zero { off, len, .. } => {
                let trim = matches!(op, POp::Trim { .. });
                let (o, l) = self.range(off, u64::from(len) * 64);
                let flags = match op {
                    POp::Zero { no_hole: true, .. } => CmdFlags::NO_HOLE,
                    _ => CmdFlags::empty(),
                };
                let r = if trim {
                    self.c
                        .command("trim", Command::Trim, o, l, flags, |c| c.trim(o, l, flags))
                } else {
                    self.c
                        .command("zero", Command::WriteZeroes, o, l, flags, |c| {
                            c.write_zeroes(o, l, flags)
                        })
                };
                if let Some(k) = r {
                    let raced = self.taint((o, l));
                    self.writes.insert(
                        k.0,
                        Write {
                            offset: o,
                            len: l,
                            data: None,
                            raced,
                        },
                    );
                }
            }
            POp::Bs { off, len, req_one } => {
                let (o, l) = self.range(off, u64::from(len));
                let flags = if req_one {
                    CmdFlags::REQ_ONE
                } else {
                    CmdFlags::empty()
                };
                if let Some(k) = self
                    .c
                    .command("bs", Command::BlockStatus, o, l, flags, |c| {
                        c.block_status(o, l, flags)
                    })
                {
                    let raced = self.writes_overlap((o, l));
                    self.bs.insert(k.0, (o, l, raced));
                }
            }
            POp::BsFor { off, len } => {
                let (o, l) = self.range(off, u64::from(len));
                let ids: Vec<u32> = self.c.c.contexts().iter().copied().take(1).collect();
                let f = CmdFlags::empty();
                if let Some(k) = self
                    .c
                    .command("bs_for", Command::BlockStatus, o, l, f, |c| {
                        c.block_status_for(o, l, f, &ids)
                    })
                {
                    let raced = self.writes_overlap((o, l));
                    self.bs.insert(k.0, (o, l, raced));
                }
            }
            POp::Flush => {
                let f = CmdFlags::empty();
                self.c
                    .command("flush", Command::Flush, 0, 0, f, |c| c.flush(f));
            }
            POp::Cache { off, len } => {
                let (o, l) = self.range(off, u64::from(len) * 64);
                let f = CmdFlags::empty();
                self.c
                    .command("cache", Command::Cache, o, l, f, |c| c.cache(o, l, f));
            }
            POp::Hold(h) => self.hold = h,
            POp::Release { newest_first } => self.release(newest_first),
            POp::Step(n) => {
                for _ in 0..n {
                    if !self.step(rng) {
                        break;
                    }
                }
            }
            POp::Settle => self.settle(rng),
            POp::Disconnect => {
                self.c.call("disconnect", |c| c.disconnect());
            }
        }
    }

    /// Moves output to the other side.
    fn flush_out(&mut self) -> bool {
        self.c.transmit();
        self.s.transmit();
        let moved = !self.c.out.is_empty() || !self.s.out.is_empty();
        self.c2s.append(&mut self.c.out);
        self.s2c.append(&mut self.s.out);
        moved
    }

    fn settle(&mut self, rng: &mut Rng) {
        for _ in 0..1_000_000 {
            if !self.step(rng) {
                return;
            }
        }
        panic!("the pair did not settle");
    }

    /// One round: output moved, one server input step, one client input step. True if
    /// anything moved.
    fn step(&mut self, rng: &mut Rng) -> bool {
        let mut progress = self.flush_out();
        progress |= self.server_in(rng);
        progress |= self.flush_out();
        progress |= self.client_in(rng);
        if !progress && self.s.s.is_finished() && self.s2c.is_empty() && !self.eof_sent {
            // The server closed the connection: the client sees the end of file.
            self.eof_sent = true;
            self.c.eof();
            self.after_client_events();
            progress = true;
        }
        progress
    }

    fn server_in(&mut self, rng: &mut Rng) -> bool {
        if self.s.finished() {
            return false;
        }
        match self.s.s.wants() {
            Want::Payload { len, .. } | Want::Discard { len } => {
                let n = len.min(self.c2s.len()).min(rng.piece(1 << 16));
                if n == 0 {
                    return false;
                }
                let payload = matches!(self.s.s.wants(), Want::Payload { .. });
                if payload {
                    self.incoming.extend_from_slice(&self.c2s[..n]);
                }
                self.c2s.drain(..n);
                self.s.payload(n);
                if payload && self.s.s.payload_in_progress().is_none() {
                    let w = self.s.writing.take().expect("write");
                    let data = std::mem::take(&mut self.incoming);
                    assert_eq!(data.len() as u64, w.len);
                    let at = w.offset as usize;
                    self.disk()[at..at + data.len()].copy_from_slice(&data);
                    self.request(w);
                }
                true
            }
            _ => {
                let input = std::mem::take(&mut self.c2s);
                let r = self.s.input(&input);
                self.c2s = input;
                let Some((consumed, ask)) = r else {
                    return false;
                };
                let event = ask.is_some();
                self.c2s.drain(..consumed);
                match ask {
                    Some(Ask::Request(r, _)) if r.command == Command::Write => {}
                    Some(Ask::Request(r, _)) => self.request(r),
                    Some(Ask::Disconnect) => {
                        self.release(true);
                    }
                    Some(ask) => self.app.answer(&mut self.s, ask),
                    None => {}
                }
                consumed > 0 || event
            }
        }
    }

    fn request(&mut self, r: Request) {
        if self.hold {
            self.held.push(r);
        } else {
            self.answer(r);
        }
    }

    fn release(&mut self, newest_first: bool) {
        let mut held = std::mem::take(&mut self.held);
        if newest_first {
            held.reverse();
        }
        for r in held {
            self.answer(r);
        }
    }

    fn zero_block(&self, b: u64) -> bool {
        let d = self.s.disk.as_ref().expect("disk");
        let s = (b * BLOCK) as usize;
        d[s..(s + BLOCK as usize).min(d.len())]
            .iter()
            .all(|&x| x == 0)
    }

    /// Serves one request from the server's disk.
    fn answer(&mut self, r: Request) {
        if self.s.finished() || !self.s.owed.contains_key(&r.cookie.0) {
            return;
        }
        let cookie = r.cookie;
        let end = r.offset + r.len;
        let ok = |e: Result<(), Error>| assert!(e.is_ok(), "pair: server refused a reply: {e:?}");
        match r.command {
            Command::Read => {
                let df = r.flags.contains(CmdFlags::DF);
                let d =
                    self.s.disk.as_ref().expect("disk")[r.offset as usize..end as usize].to_vec();
                self.served.insert(cookie.0, d);
                let mut pos = r.offset;
                while pos < end {
                    let hole = !df && self.zero_block(pos / BLOCK);
                    let mut run = ((pos / BLOCK + 1) * BLOCK).min(end);
                    while run < end && (!df && self.zero_block(run / BLOCK)) == hole {
                        run = ((run / BLOCK + 1) * BLOCK).min(end);
                    }
                    ok(self.retry(|s| s.reply_read(cookie, pos, run - pos, hole)));
                    pos = run;
                }
            }
            Command::BlockStatus => {
                let ids = self
                    .s
                    .progress(cookie)
                    .map(|p| p.1.clone())
                    .unwrap_or_default();
                let size = self.model.len() as u64;
                for id in ids {
                    let mut ex = Vec::new();
                    let mut pos = r.offset;
                    while pos < end.min(size) {
                        let n = ((pos / BLOCK + 1) * BLOCK).min(end) - pos;
                        let status = match id {
                            2 => 1,
                            _ if self.zero_block(pos / BLOCK) => 3,
                            _ => 0,
                        };
                        ex.push(Extent { len: n, status });
                        pos += n;
                    }
                    ok(self.retry(|s| s.reply_bs(cookie, id, &ex)));
                }
            }
            Command::Trim | Command::WriteZeroes => {
                self.disk()[r.offset as usize..end as usize].fill(0);
                ok(self.retry(|s| s.reply_end(cookie, |m| m.reply(cookie, Ok(())))));
            }
            _ => ok(self.retry(|s| s.reply_end(cookie, |m| m.reply(cookie, Ok(()))))),
        }
    }

    fn retry(
        &mut self,
        mut f: impl FnMut(&mut server::Checked<N, B>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        for _ in 0..4 {
            match f(&mut self.s) {
                Err(Error::Misuse(nbd_proto::Misuse::TransmitPending)) => {
                    self.flush_out();
                }
                r => return r,
            }
        }
        f(&mut self.s)
    }

    fn client_in(&mut self, rng: &mut Rng) -> bool {
        if self.c.finished() {
            return false;
        }
        if let Want::Payload {
            cookie,
            offset,
            len,
        } = self.c.c.wants()
        {
            let n = len.min(self.s2c.len()).min(rng.piece(1 << 16));
            if n == 0 {
                return false;
            }
            if let Some(rd) = self.reads.get_mut(&cookie.0) {
                let at = (offset - rd.offset) as usize;
                rd.buf[at..at + n].copy_from_slice(&self.s2c[..n]);
            }
            self.s2c.drain(..n);
            self.c.payload(n);
            return true;
        }
        let input = std::mem::take(&mut self.s2c);
        let r = self.c.input(&input);
        self.s2c = input;
        let Some((consumed, event)) = r else {
            return false;
        };
        self.s2c.drain(..consumed);
        if self.c.saw_starttls {
            self.c.call("tls_established", |c| c.tls_established());
        }
        self.after_client_events();
        consumed > 0 || event
    }

    /// Applies the recorded client events to the model and checks completed reads.
    fn after_client_events(&mut self) {
        for rec in std::mem::take(&mut self.c.record) {
            match rec {
                Rec::Hole(k, offset, len) => {
                    let rd = self.reads.get_mut(&k.0).expect("hole for a read");
                    let at = (offset - rd.offset) as usize;
                    rd.buf[at..at + len as usize].fill(0);
                }
                Rec::Extents(k, ctx, offset, list) => {
                    let (o, l, raced) = *self.bs.get(&k.0).expect("extents for a block status");
                    let base = self.c.c.contexts().first() == Some(&ctx) && ctx == 1;
                    if raced || !base {
                        continue;
                    }
                    let mut pos = offset;
                    for (len, status) in list {
                        let (s, e) = (pos.max(o), (pos + len).min(o + l));
                        if status & 2 != 0 && s < e {
                            let (s, e) = (s as usize, e as usize);
                            assert!(
                                (s..e).all(|i| !self.known[i] || self.model[i] == 0),
                                "block status says {s}..{e} reads as zeroes; the model disagrees"
                            );
                        }
                        pos += len;
                    }
                }
                Rec::Done(k, result) => self.done(k, result),
            }
        }
    }

    fn done(&mut self, k: Cookie, result: Result<(), nbd_proto::Errno>) {
        assert_eq!(result, Ok(()), "pair: {k:?} failed");
        if let Some(rd) = self.reads.remove(&k.0) {
            let served = self
                .served
                .remove(&k.0)
                .expect("a read the server never answered");
            assert!(
                rd.buf == served,
                "read {k:?} at {}: the client got other bytes than the server sent",
                rd.offset
            );
            if !rd.raced {
                let s = rd.offset as usize;
                for (i, b) in rd.buf.iter().enumerate() {
                    if self.known[s + i] {
                        assert_eq!(
                            *b,
                            self.model[s + i],
                            "read {k:?} at {s}: byte {i} differs from the model"
                        );
                    }
                }
            }
        }
        self.bs.remove(&k.0);
        if let Some(w) = self.writes.remove(&k.0) {
            let (s, e) = (w.offset as usize, (w.offset + w.len) as usize);
            match w.data {
                Some(d) => self.model[s..e].copy_from_slice(&d),
                None => self.model[s..e].fill(0),
            }
            self.known[s..e].fill(!w.raced);
        }
    }
}

fn pair_n<const N: usize, const B: usize>(
    c: &PConfig,
    u: &mut Unstructured<'_>,
    seed: &[u8],
) -> usize {
    let mut rng = Rng::from_bytes(seed);
    let size = (u64::from(c.blocks % 64) + 1) * BLOCK - u64::from(c.blocks & 0x40) * 8;
    let (ctls, stls) = (tls(c.ctls), tls(c.stls));
    let mut cc = ClientConfig::new("");
    cc.tls = ctls;
    if c.contexts {
        cc.meta_contexts = &super::script::CONTEXTS;
    }
    cc.structured_replies = !c.c_no_sr;
    cc.extended_headers = !c.c_no_eh;
    let mut sc = ServerConfig::default();
    sc.tls = stls;
    sc.structured_replies = !c.s_no_sr;
    sc.extended_headers = !c.s_no_eh;
    let mut flags = super::script::all_flags(super::script::Form::Extended);
    if c.read_only {
        flags |= TransmissionFlags::READ_ONLY;
    }
    let app = Responder {
        size,
        flags,
        block_size: c.block_size.then_some(BlockSize {
            min: 512,
            preferred: 4096,
            max_payload: 65536,
        }),
        tls_only: false,
        held: Vec::new(),
    };
    let incompatible = (ctls == TlsPolicy::Required && stls == TlsPolicy::Off)
        || (ctls == TlsPolicy::Off && stls == TlsPolicy::Required);
    let mut client = client::Checked::<64>::new(&cc, Some(rng.clone()));
    client.payloads = Some(BTreeMap::new());
    let mut server = server::Checked::<N, B>::new(sc, Some(rng.clone()));
    server.disk = Some(vec![0; size as usize]);
    let mut p = Pair {
        c: client,
        s: server,
        app,
        c2s: Vec::new(),
        s2c: Vec::new(),
        model: vec![0; size as usize],
        known: vec![true; size as usize],
        reads: BTreeMap::new(),
        bs: BTreeMap::new(),
        writes: BTreeMap::new(),
        served: BTreeMap::new(),
        incoming: Vec::new(),
        hold: false,
        held: Vec::new(),
        incompatible,
        eof_sent: false,
    };
    p.settle(&mut rng);
    if !p.incompatible {
        assert_eq!(
            p.c.c.state(),
            CState::Ready,
            "handshake failed: {:?} / {:?}",
            p.c.log,
            p.s.log
        );
    }
    for _ in 0..200 {
        if u.is_empty() {
            break;
        }
        let Ok(op) = POp::arbitrary(u) else { break };
        p.op(op, &mut rng);
    }
    // Wind down: answer everything, disconnect, let both sides finish.
    p.hold = false;
    p.release(false);
    p.settle(&mut rng);
    if p.c.c.state() == CState::Ready {
        p.c.call("disconnect", |c| c.disconnect());
    }
    p.settle(&mut rng);
    if !p.eof_sent {
        p.c.eof();
        p.after_client_events();
    }
    if p.incompatible {
        let e = p.c.c.error().or(p.s.s.error());
        assert!(
            matches!(
                e,
                Some(Error::PeerIncompatible(
                    Incompatible::TlsUnavailable | Incompatible::TlsRequiredByPeer
                )) | None
            ),
            "TLS mismatch ended with {e:?}"
        );
    } else {
        assert_eq!(p.c.c.error(), None, "client failed: {:?}", p.c.log);
        assert_eq!(p.s.s.error(), None, "server failed: {:?}", p.s.log);
        assert_eq!(p.c.c.state(), CState::Closed, "client log {:?}", p.c.log);
        assert_eq!(p.s.s.state(), SState::Closed, "server log {:?}", p.s.log);
        assert!(p.reads.is_empty() && p.writes.is_empty() && p.bs.is_empty());
        let disk = p.s.disk.as_deref().unwrap_or(&[]);
        let differ = (0..disk.len()).find(|&i| p.known[i] && disk[i] != p.model[i]);
        assert_eq!(differ, None, "the server's disk and the model differ");
    }
    p.c.completed
}

/// `pair`: see the module documentation. Returns the commands completed.
pub fn pair(data: &[u8]) -> usize {
    let mut u = Unstructured::new(data);
    let Ok(c) = PConfig::arbitrary(&mut u) else {
        return 0;
    };
    if c.small {
        pair_n::<4, 8192>(&c, &mut u, data)
    } else {
        pair_n::<64, 65536>(&c, &mut u, data)
    }
}
