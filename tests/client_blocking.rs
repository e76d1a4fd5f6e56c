//! The blocking driver against a scripted server on a Unix socket pair: no real peer
//! needed. The server side is written with the wire codecs.

#![cfg(unix)]

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use nbd_proto::blocking::client::Stream;
use nbd_proto::blocking::{errno_of, BlockingClient, NoSink, Sink, TlsConnector};
use nbd_proto::client::ClientConfig;
use nbd_proto::wire::{
    ChunkHeader, ChunkType, CmdFlags, Command, Cookie, Errno, Greeting, HandshakeFlags, Info, Opt,
    OptCode, OptHeader, OptReply, ReplyFlags, Request, SimpleReply, TransmissionFlags,
};
use nbd_proto::TlsPolicy;

const SIZE: u64 = 1 << 20;
const FLAGS: u16 = 0x0001 | 0x0004 | 0x0008;

fn read_opt(s: &mut impl Read) -> (OptCode, Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    let header = OptHeader::parse(&h).unwrap();
    let mut data = vec![0u8; header.len as usize];
    s.read_exact(&mut data).unwrap();
    (header.code, data)
}

fn send_rep(s: &mut impl Write, opt: OptCode, reply: OptReply<'_>) {
    let mut b = vec![0; reply.buffer_len()];
    reply.emit(opt, &mut b).unwrap();
    s.write_all(&b).unwrap();
}

/// Greeting, then refuses extended headers and structured replies, then answers GO.
fn handshake(s: &mut UnixStream) {
    greet(s);
    options(s);
}

/// The fixed-newstyle greeting and the client's flags.
fn greet(s: &mut UnixStream) {
    let mut g = [0u8; 18];
    Greeting {
        flags: HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES,
    }
    .emit(&mut g)
    .unwrap();
    s.write_all(&g).unwrap();
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags).unwrap();
    assert_eq!(flags, [0, 0, 0, 3]);
}

/// Refuses every option but GO, which opens the export.
fn options(s: &mut (impl Read + Write)) {
    loop {
        let (code, data) = read_opt(s);
        match code {
            OptCode::Go => {
                match Opt::parse(code, &data).unwrap() {
                    Opt::Go(r) => assert_eq!(r.name, "scripted"),
                    o => panic!("{o:?}"),
                }
                send_rep(
                    s,
                    code,
                    OptReply::Info(Info::Export {
                        size: SIZE,
                        flags: TransmissionFlags::from_bits(FLAGS),
                    }),
                );
                send_rep(s, code, OptReply::Ack);
                return;
            }
            _ => send_rep(
                s,
                code,
                OptReply::Error {
                    error: nbd_proto::wire::OptError::Unsup,
                    message: "not here",
                },
            ),
        }
    }
}

fn read_request(s: &mut impl Read) -> Option<(Request, Vec<u8>)> {
    let mut h = [0u8; 28];
    if s.read_exact(&mut h).is_err() {
        return None;
    }
    let r = Request::parse(&h).unwrap();
    let mut payload = vec![0u8; r.payload_len() as usize];
    s.read_exact(&mut payload).unwrap();
    Some((r, payload))
}

fn reply(s: &mut impl Write, cookie: Cookie, error: Option<Errno>, data: &[u8]) {
    let mut b = [0u8; 16];
    SimpleReply { error, cookie }.emit(&mut b).unwrap();
    s.write_all(&b).unwrap();
    s.write_all(data).unwrap();
}

fn client(s: UnixStream) -> BlockingClient<UnixStream> {
    let cfg = ClientConfig::new("scripted");
    BlockingClient::new(s, &cfg).unwrap()
}

#[test]
fn reads_and_writes_go_straight_through() {
    let (a, mut b) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        handshake(&mut b);
        let mut disk = vec![0u8; SIZE as usize];
        // Replies in reverse order of the requests, to exercise out-of-order completion.
        let mut held = Vec::new();
        while let Some((r, payload)) = read_request(&mut b) {
            match r.command {
                Command::Write => {
                    let at = r.offset as usize;
                    disk[at..at + payload.len()].copy_from_slice(&payload);
                    reply(&mut b, r.cookie, None, &[]);
                }
                Command::Read => {
                    held.push(r);
                    if held.len() == 4 {
                        for r in held.drain(..).rev() {
                            let at = r.offset as usize;
                            reply(&mut b, r.cookie, None, &disk[at..at + r.len as usize]);
                        }
                    }
                }
                Command::Flush => reply(&mut b, r.cookie, Some(Errno::Io), &[]),
                Command::Disc => break,
                other => panic!("{other}"),
            }
        }
        disk
    });
    let mut c = client(a);
    assert_eq!(c.size(), SIZE);
    assert!(!c.machine().structured_replies());
    let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    c.write_at(&data, 4096, CmdFlags::FUA).unwrap();
    // Four reads in flight, answered last first.
    struct Bufs(Vec<(Cookie, u64, Vec<u8>)>);
    impl Sink for Bufs {
        fn read_buf(&mut self, cookie: Cookie, offset: u64, len: usize) -> &mut [u8] {
            let (_, base, buf) = self.0.iter_mut().find(|(c, _, _)| *c == cookie).unwrap();
            let at = (offset - *base) as usize;
            &mut buf[at..at + len]
        }
    }
    let mut bufs = Bufs(Vec::new());
    for i in 0..4u64 {
        let off = 4096 + i * 16384;
        let cookie = c.submit_read(off, 16384, CmdFlags::empty()).unwrap();
        bufs.0.push((cookie, off, vec![0; 16384]));
    }
    let mut order = Vec::new();
    while c.in_flight() > 0 {
        let done = c.complete(&mut bufs).unwrap();
        done.result.unwrap();
        order.push(done.cookie);
    }
    let expected: Vec<Cookie> = bufs.0.iter().rev().map(|(c, _, _)| *c).collect();
    assert_eq!(order, expected);
    let joined: Vec<u8> = bufs.0.iter().flat_map(|(_, _, b)| b.clone()).collect();
    assert_eq!(joined, data);
    // An NBD error reaches the caller with its errno.
    let e = c.flush().unwrap_err();
    assert_eq!(errno_of(&e), Some(Errno::Io));
    assert_eq!(e.raw_os_error(), None);
    c.disconnect().unwrap();
    let disk = server.join().unwrap();
    assert_eq!(&disk[4096..4096 + data.len()], &data[..]);
}

#[test]
fn a_broken_server_fails_cleanly_and_abandons_commands() {
    let (a, mut b) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        handshake(&mut b);
        let (r, _) = read_request(&mut b).unwrap();
        let (_r2, _) = read_request(&mut b).unwrap();
        // A structured chunk although structured replies were refused.
        let h = ChunkHeader {
            flags: ReplyFlags::DONE,
            chunk_type: ChunkType::None,
            cookie: r.cookie,
            offset: None,
            len: 0,
        };
        let mut buf = [0u8; 20];
        h.emit(&mut buf).unwrap();
        b.write_all(&buf).unwrap();
    });
    let mut c = client(a);
    let first = c.submit_read(0, 512, CmdFlags::empty()).unwrap();
    let second = c.submit_read(512, 512, CmdFlags::empty()).unwrap();
    let e = c.complete(&mut NoSink).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
    assert!(e.to_string().contains("structured"), "{e}");
    assert_eq!(c.in_flight(), 0);
    assert_eq!(c.abandoned(), &[first, second]);
    // Every later call fails with the same error.
    assert!(c.complete(&mut NoSink).is_err());
    server.join().unwrap();
}

#[test]
fn the_server_closing_mid_reply_is_an_error() {
    let (a, mut b) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        handshake(&mut b);
        let (r, _) = read_request(&mut b).unwrap();
        let mut h = [0u8; 16];
        SimpleReply {
            error: None,
            cookie: r.cookie,
        }
        .emit(&mut h)
        .unwrap();
        b.write_all(&h).unwrap();
        b.write_all(&[1, 2, 3]).unwrap();
    });
    let mut c = client(a);
    let mut buf = [0u8; 512];
    let e = c.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    assert_eq!(
        &buf[..3],
        &[1, 2, 3],
        "the data went straight into the caller's buffer"
    );
    server.join().unwrap();
}

// ---- the TLS hand-off, with a stand-in for TLS ----

/// A client over a boxed stream, as TLS needs.
type Boxed = BlockingClient<Box<dyn Stream>>;

/// A stand-in for a TLS session: every byte XORed with 0x5a both ways, so a driver that
/// kept talking on the plain stream after STARTTLS would be caught.
struct Xor<S>(S);

impl<S: Read> Read for Xor<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.0.read(buf)?;
        buf[..n].iter_mut().for_each(|b| *b ^= 0x5a);
        Ok(n)
    }
}

impl<S: Write> Write for Xor<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let x: Vec<u8> = buf.iter().map(|b| b ^ 0x5a).collect();
        self.0.write_all(&x)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Wraps the stream in [`Xor`] and remembers the server names it was given; fails instead
/// if `fail` is set.
#[derive(Default)]
struct FakeTls {
    names: Mutex<Vec<Option<String>>>,
    fail: bool,
}

impl TlsConnector for FakeTls {
    fn connect(
        &self,
        stream: Box<dyn Stream>,
        server_name: Option<&str>,
    ) -> io::Result<Box<dyn Stream>> {
        self.names
            .lock()
            .unwrap()
            .push(server_name.map(str::to_owned));
        if self.fail {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "invalid peer certificate: UnknownIssuer",
            ));
        }
        Ok(Box::new(Xor(stream)))
    }
}

/// Greeting, then answers NBD_OPT_STARTTLS with `answer` (None: ACK and go on over
/// [`Xor`], serving reads from a patterned disk until NBD_CMD_DISC).
fn tls_server(mut s: UnixStream, answer: Option<nbd_proto::wire::OptError>) {
    greet(&mut s);
    let (code, _) = read_opt(&mut s);
    assert_eq!(code, OptCode::StartTls);
    if let Some(error) = answer {
        send_rep(
            &mut s,
            code,
            OptReply::Error {
                error,
                message: "TLS not configured",
            },
        );
        // Plaintext from here on (or the client goes away).
        options(&mut s);
        serve_reads(&mut s);
        return;
    }
    send_rep(&mut s, code, OptReply::Ack);
    let mut t = Xor(s);
    options(&mut t);
    serve_reads(&mut t);
}

fn serve_reads(s: &mut (impl Read + Write)) {
    while let Some((r, _)) = read_request(s) {
        match r.command {
            Command::Read => {
                let data: Vec<u8> = (r.offset..r.offset + r.len)
                    .map(|i| (i % 253) as u8)
                    .collect();
                reply(s, r.cookie, None, &data);
            }
            Command::Disc => break,
            other => panic!("{other}"),
        }
    }
}

fn tls_config(tls: TlsPolicy, manual: bool) -> ClientConfig<'static> {
    let mut cfg = ClientConfig::new("scripted");
    cfg.tls = tls;
    cfg.manual = manual;
    cfg
}

fn check_read(c: &mut Boxed) {
    let mut buf = vec![0u8; 5000];
    c.read_at(&mut buf, 1000).unwrap();
    assert!(buf
        .iter()
        .enumerate()
        .all(|(i, b)| *b == ((1000 + i) % 253) as u8));
}

#[test]
fn starttls_hands_the_stream_to_the_connector_and_negotiates_again() {
    let (a, b) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || tls_server(b, None));
    let tls = Arc::new(FakeTls::default());
    let mut c = Boxed::new_tls(
        Box::new(a),
        &tls_config(TlsPolicy::Required, false),
        tls.clone(),
        Some("disk.example"),
    )
    .unwrap();
    assert!(c.machine().tls_active());
    assert_eq!(c.size(), SIZE);
    check_read(&mut c);
    c.disconnect().unwrap();
    server.join().unwrap();
    assert_eq!(
        *tls.names.lock().unwrap(),
        [Some("disk.example".to_owned())]
    );
}

#[test]
fn manual_mode_starts_tls_before_the_first_option() {
    let (a, b) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || tls_server(b, None));
    let tls = Arc::new(FakeTls::default());
    let mut c = Boxed::new_tls(
        Box::new(a),
        &tls_config(TlsPolicy::Optional, true),
        tls,
        None,
    )
    .unwrap();
    assert!(c.machine().tls_active());
    c.opt(|m| m.opt_go("scripted")).unwrap().unwrap();
    check_read(&mut c);
    c.disconnect().unwrap();
    server.join().unwrap();
}

#[test]
fn a_failed_tls_handshake_is_a_clear_error() {
    for manual in [false, true] {
        let (a, b) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || {
            let mut s = b;
            greet(&mut s);
            let (code, _) = read_opt(&mut s);
            send_rep(&mut s, code, OptReply::Ack);
            // The client hangs up: nothing more arrives.
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).unwrap();
        });
        let tls = Arc::new(FakeTls {
            fail: true,
            ..FakeTls::default()
        });
        let e = Boxed::new_tls(
            Box::new(a),
            &tls_config(TlsPolicy::Required, manual),
            tls,
            Some("h"),
        )
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        let text = e.to_string();
        assert!(
            text.contains("TLS handshake") && text.contains("UnknownIssuer"),
            "{text}"
        );
        server.join().unwrap();
    }
}

#[test]
fn a_refused_starttls_fails_when_required_and_falls_back_when_optional() {
    for manual in [false, true] {
        let (a, b) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || {
            // The client gives up at once: the server sees its NBD_OPT_ABORT or the end.
            let mut s = b;
            greet(&mut s);
            let (code, _) = read_opt(&mut s);
            send_rep(
                &mut s,
                code,
                OptReply::Error {
                    error: nbd_proto::wire::OptError::Policy,
                    message: "TLS not configured",
                },
            );
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        });
        let e = Boxed::new_tls(
            Box::new(a),
            &tls_config(TlsPolicy::Required, manual),
            Arc::new(FakeTls::default()),
            Some("h"),
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("TLS is required") && text.contains("TLS not configured"),
            "manual={manual}: {text}"
        );
        assert!(!text.contains('\n'), "{text}");
        server.join().unwrap();

        let (a, b) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || tls_server(b, Some(nbd_proto::wire::OptError::Policy)));
        let tls = Arc::new(FakeTls::default());
        let mut c = Boxed::new_tls(
            Box::new(a),
            &tls_config(TlsPolicy::Optional, manual),
            tls.clone(),
            Some("h"),
        )
        .unwrap();
        assert!(!c.machine().tls_active());
        if manual {
            c.opt(|m| m.opt_go("scripted")).unwrap().unwrap();
        }
        check_read(&mut c);
        c.disconnect().unwrap();
        server.join().unwrap();
        assert!(tls.names.lock().unwrap().is_empty(), "connector not used");
    }
}

#[test]
fn tls_without_a_connector_is_refused_before_any_io() {
    // A peer that never speaks: any attempt to negotiate would time out.
    let (a, _b) = UnixStream::pair().unwrap();
    a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for policy in [TlsPolicy::Required, TlsPolicy::Optional] {
        let e =
            BlockingClient::<UnixStream>::new(a.try_clone().unwrap(), &tls_config(policy, false))
                .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("no TLS connector"), "{e}");
    }
    // nbds:// without a connector: refused before connecting (the socket does not exist).
    let uri = "nbds+unix:///?socket=/nonexistent/nbd-proto-test.sock";
    for e in [
        BlockingClient::connect(uri).unwrap_err(),
        BlockingClient::connect_tls(uri, ClientConfig::default(), None).unwrap_err(),
    ] {
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        let text = e.to_string();
        assert!(
            text.contains("requires TLS") && !text.contains("connect to"),
            "{text}"
        );
    }
    let mut cfg = ClientConfig::default();
    cfg.tls = TlsPolicy::Required;
    let e = BlockingClient::connect_tls("nbd+unix:///?socket=/nonexistent/x.sock", cfg, None)
        .unwrap_err();
    assert!(e.to_string().contains("no TLS connector"), "{e}");
}
