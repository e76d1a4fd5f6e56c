//! The blocking driver against a scripted server on a Unix socket pair: no real peer
//! needed. The server side is written with the wire codecs.

#![cfg(unix)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;

use nbd_proto::blocking::{errno_of, BlockingClient, NoSink, Sink};
use nbd_proto::client::ClientConfig;
use nbd_proto::wire::{
    ChunkHeader, ChunkType, CmdFlags, Command, Cookie, Errno, Greeting, HandshakeFlags, Info, Opt,
    OptCode, OptHeader, OptReply, ReplyFlags, Request, SimpleReply, TransmissionFlags,
};

const SIZE: u64 = 1 << 20;
const FLAGS: u16 = 0x0001 | 0x0004 | 0x0008;

fn read_opt(s: &mut UnixStream) -> (OptCode, Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    let header = OptHeader::parse(&h).unwrap();
    let mut data = vec![0u8; header.len as usize];
    s.read_exact(&mut data).unwrap();
    (header.code, data)
}

fn send_rep(s: &mut UnixStream, opt: OptCode, reply: OptReply<'_>) {
    let mut b = vec![0; reply.buffer_len()];
    reply.emit(opt, &mut b).unwrap();
    s.write_all(&b).unwrap();
}

/// Greeting, then refuses extended headers and structured replies, then answers GO.
fn handshake(s: &mut UnixStream) {
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

fn read_request(s: &mut UnixStream) -> Option<(Request, Vec<u8>)> {
    let mut h = [0u8; 28];
    if s.read_exact(&mut h).is_err() {
        return None;
    }
    let r = Request::parse(&h).unwrap();
    let mut payload = vec![0u8; r.payload_len() as usize];
    s.read_exact(&mut payload).unwrap();
    Some((r, payload))
}

fn reply(s: &mut UnixStream, cookie: Cookie, error: Option<Errno>, data: &[u8]) {
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
