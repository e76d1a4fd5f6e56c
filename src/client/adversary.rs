//! The client's adversarial mode (feature `adversarial`; see [`crate::adversarial`]):
//! injected bytes queued in order with the machine's own messages, relaxable checks, and
//! commands sent exactly as asked.

use arrayvec::ArrayVec;

use super::inflight::Send;
use super::{Client, Phase};
use crate::adversarial::{ClientChecks, Message};
use crate::common::Transmit;
use crate::error::{Error, Misuse};
use crate::wire::{CmdFlags, Command, Cookie};

/// Bytes of injected output a client can hold before it is sent.
pub const INJECT_CAPACITY: usize = 16 * 1024;

/// Injections a client can hold before they are sent.
const MAX_INJECTIONS: usize = 32;

/// One injection waiting at the front of [`Adversary::bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    /// Due once this many of the machine's own messages have gone out.
    after: u64,
    /// Its bytes still to send.
    len: usize,
}

/// Adversarial state of a client.
#[derive(Debug, Clone, Default)]
pub(crate) struct Adversary {
    relaxed: ClientChecks,
    /// The machine's own messages fully handed out so far (client flags, options,
    /// requests with their payload, `NBD_CMD_DISC`). They leave in the order they were
    /// queued, so an injection is placed by counting.
    sent: u64,
    bytes: ArrayVec<u8, INJECT_CAPACITY>,
    marks: ArrayVec<Mark, MAX_INJECTIONS>,
}

impl Adversary {
    /// One of the machine's own messages went out.
    pub(crate) fn note_sent(&mut self) {
        self.sent += 1;
    }

    /// Injected bytes must go out before the machine's next message.
    pub(crate) fn due(&self) -> bool {
        self.marks.first().is_some_and(|m| self.sent >= m.after)
    }
}

/// The adversarial controls of a [`Client`]: see [`crate::adversarial`] and
/// [`Client::adversary`].
#[derive(Debug)]
pub struct ClientAdversary<'a, const N: usize> {
    client: &'a mut Client<N>,
}

impl<const N: usize> Client<N> {
    /// The adversarial controls (feature `adversarial`): inject bytes or forged messages,
    /// relax the checks on commands and options, queue arbitrary commands. See
    /// [`crate::adversarial`].
    pub fn adversary(&mut self) -> ClientAdversary<'_, N> {
        ClientAdversary { client: self }
    }

    /// True unless adversarial mode relaxed `check` (the `enforced!` hook).
    pub(crate) fn enforces(&self, check: ClientChecks) -> bool {
        !self.adv.relaxed.intersects(check)
    }

    /// Hands out the front injection if it is due (from `poll_transmit`).
    pub(crate) fn poll_injected(&mut self, out: &mut [u8]) -> Result<Option<Transmit>, Error> {
        if self.phase == Phase::Closed || !self.adv.due() {
            return Ok(None);
        }
        let Some(mark) = self.adv.marks.first_mut() else {
            return Ok(None);
        };
        if out.is_empty() {
            // Injected bytes may be split anywhere, so one byte of room is enough.
            return Err(Error::BufferTooSmall { required: 1 });
        }
        let n = mark.len.min(out.len());
        // invariant: the front mark's bytes are the first `mark.len` of `bytes`.
        let Some(src) = self.adv.bytes.get(..n) else {
            return Ok(None);
        };
        out[..n].copy_from_slice(src);
        self.adv.bytes.drain(..n);
        mark.len -= n;
        if mark.len == 0 {
            self.adv.marks.remove(0);
        }
        Ok(Some(Transmit::Bytes(n)))
    }

    /// Messages queued but not fully handed out yet (they leave before a new injection).
    fn unsent_messages(&self) -> u64 {
        let requests = self.table.iter().filter(|e| e.send != Send::Sent).count() as u64;
        let disc = u64::from(self.disc_queued && !self.disc_sent);
        self.nego.unsent_messages() + requests + disc
    }
}

impl<const N: usize> ClientAdversary<'_, N> {
    /// Queues `message` to go out after every message already queued and before any
    /// queued later. Fails with [`Misuse::TransmitPending`] while the injection buffer
    /// ([`INJECT_CAPACITY`] bytes) is too full (drain `poll_transmit` first), with
    /// [`Misuse::InjectionTooLarge`] for a message that can never fit, with
    /// [`Misuse::Encode`] for one the codecs cannot express, and with the sticky error or
    /// [`Error::Closed`] once the session is over.
    pub fn inject(&mut self, message: &Message<'_>) -> Result<(), Error> {
        self.inject_truncated(message, usize::MAX)
    }

    /// Like [`inject`](Self::inject), but only the first `len` bytes of the encoding go
    /// out: a truncated message.
    pub fn inject_truncated(&mut self, message: &Message<'_>, len: usize) -> Result<(), Error> {
        let c = &mut *self.client;
        c.check_open()?;
        let full = message.buffer_len();
        if full > INJECT_CAPACITY {
            return Err(Misuse::InjectionTooLarge(full).into());
        }
        let keep = len.min(full);
        if keep == 0 {
            return Ok(());
        }
        if c.adv.bytes.remaining_capacity() < full || c.adv.marks.is_full() {
            return Err(Misuse::TransmitPending.into());
        }
        let start = c.adv.bytes.len();
        for _ in 0..full {
            // invariant: room for `full` bytes was checked above.
            let _ = c.adv.bytes.try_push(0);
        }
        if let Err(e) = message.emit(&mut c.adv.bytes[start..]) {
            c.adv.bytes.truncate(start);
            return Err(Misuse::Encode(e).into());
        }
        c.adv.bytes.truncate(start + keep);
        // Later injections never overtake earlier ones.
        let after =
            (c.adv.sent + c.unsent_messages()).max(c.adv.marks.last().map_or(0, |m| m.after));
        // invariant: checked not full above.
        let _ = c.adv.marks.try_push(Mark { after, len: keep });
        Ok(())
    }

    /// Switches off `checks` (see [`ClientChecks`]) until [`enforce`](Self::enforce).
    pub fn relax(&mut self, checks: ClientChecks) {
        self.client.adv.relaxed.insert(checks);
    }

    /// Switches `checks` back on.
    pub fn enforce(&mut self, checks: ClientChecks) {
        self.client.adv.relaxed.remove(checks);
    }

    /// The checks currently switched off.
    pub fn relaxed(&self) -> ClientChecks {
        self.client.adv.relaxed
    }

    /// Bytes injected but not handed out by `poll_transmit` yet.
    pub fn injected_pending(&self) -> usize {
        self.client.adv.bytes.len()
    }

    /// Queues any command, with exactly these flags (none added, not even
    /// `NBD_CMD_FLAG_PAYLOAD_LEN` on an extended write), and tracks it like any other: its
    /// reply is checked and delivered as events. No check applies except the state
    /// (transmission, no `NBD_CMD_DISC` queued), the table's capacity, and a length that
    /// fits the header form. An `NBD_CMD_WRITE` sends `len` bytes of payload
    /// ([`Transmit::Payload`]); a block-status request covers every negotiated context,
    /// in the payload form if `flags` has `PAYLOAD_LEN`.
    pub fn command(
        &mut self,
        command: Command,
        flags: CmdFlags,
        offset: u64,
        len: u64,
    ) -> Result<Cookie, Error> {
        let c = &mut *self.client;
        c.check_open()?;
        if c.phase != Phase::Ready || c.export.is_none() || c.disc_queued {
            return Err(Misuse::WrongState.into());
        }
        let too_long = (!c.eh && len > u64::from(u32::MAX))
            || (command == Command::Write && usize::try_from(len).is_err());
        if too_long {
            return Err(Misuse::BadLength(len).into());
        }
        if c.table.is_full() {
            return Err(Misuse::TooManyInFlight.into());
        }
        let every_context = 1u16
            .checked_shl(c.contexts.len() as u32)
            .map_or(u16::MAX, |bit| bit - 1);
        c.enqueue(command, flags, offset, len, every_context)
    }
}

#[cfg(test)]
mod tests {
    use std::vec::Vec;

    use super::*;
    use crate::client::{ClientConfig, State};
    use crate::server::ServerConfig;
    use crate::testing::Pair;
    use crate::wire::{Greeting, HandshakeFlags, Opt, OptHeader, Request};

    /// Everything the client sends until it has nothing more, payloads as `len` bytes of
    /// `0xee`.
    fn drain<const N: usize>(c: &mut Client<N>, chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = std::vec![0u8; chunk];
        for _ in 0..1000 {
            match c.poll_transmit(&mut buf).unwrap() {
                None => return out,
                Some(Transmit::Bytes(n)) => out.extend_from_slice(&buf[..n]),
                Some(Transmit::Payload { len, .. }) => out.resize(out.len() + len, 0xee),
                Some(t) => panic!("{t:?}"),
            }
        }
        panic!("poll_transmit never ran dry");
    }

    fn ready() -> Pair {
        let mut p = Pair::new(&ClientConfig::new(""), ServerConfig::default(), 1 << 20);
        assert!(p.drive(), "{:?}", p.error);
        assert_eq!(p.client.state(), State::Ready);
        p
    }

    #[test]
    fn injections_keep_their_place_among_queued_requests() {
        let mut p = ready();
        let c = &mut p.client;
        let r1 = c.read(0, 512, CmdFlags::empty()).unwrap();
        let w = c.write(512, 4, CmdFlags::empty()).unwrap();
        c.adversary().inject(&Message::Raw(&[b'J'; 40])).unwrap();
        let r2 = c.read(1024, 512, CmdFlags::empty()).unwrap();
        c.adversary().inject(&Message::Raw(b"MORE")).unwrap();
        // Small output buffers split the injected bytes, never a request.
        for chunk in [32, 50, 4096] {
            let mut c = c.clone();
            let bytes = drain(&mut c, chunk);
            let first = Request::parse(&bytes).unwrap();
            assert_eq!(first.cookie, r1);
            let second = Request::parse(&bytes[32..]).unwrap();
            assert_eq!(second.cookie, w);
            assert_eq!(
                &bytes[64..68],
                &[0xee; 4],
                "the write payload, then the injection"
            );
            assert_eq!(&bytes[68..108], &[b'J'; 40]);
            assert_eq!(Request::parse(&bytes[108..]).unwrap().cookie, r2);
            assert_eq!(&bytes[140..], b"MORE");
            assert_eq!(c.adversary().injected_pending(), 0);
        }
    }

    #[test]
    fn injections_follow_the_client_flags_and_precede_later_options() {
        let mut config = ClientConfig::new("");
        config.manual = true;
        let mut c: Client<4> = Client::new(&config).unwrap();
        // Before the greeting nothing is queued: the injection goes out at once.
        c.adversary().inject(&Message::Raw(b"early")).unwrap();
        assert_eq!(drain(&mut c, 64), b"early");
        let mut g = [0u8; 18];
        Greeting {
            flags: HandshakeFlags::FIXED_NEWSTYLE,
        }
        .emit(&mut g)
        .unwrap();
        assert!(c.handle_input(&g).unwrap().event.is_some());
        c.adversary()
            .inject_truncated(&Message::Opt(Opt::StructuredReply), 10)
            .unwrap();
        c.opt_list().unwrap();
        let bytes = drain(&mut c, 4096);
        assert_eq!(&bytes[..4], &[0, 0, 0, 1], "client flags first");
        assert_eq!(&bytes[4..14], b"IHAVEOPT\0\0", "then the truncated option");
        let list = OptHeader::parse(&bytes[14..]).unwrap();
        assert_eq!(list.code, crate::wire::OptCode::List);
        assert_eq!(bytes.len(), 30);
    }

    #[test]
    fn injection_limits_are_misuse_and_change_nothing() {
        let mut p = ready();
        let mut a = p.client.adversary();
        let big = std::vec![0u8; INJECT_CAPACITY + 1];
        assert_eq!(
            a.inject(&Message::Raw(&big)),
            Err(Misuse::InjectionTooLarge(INJECT_CAPACITY + 1).into())
        );
        a.inject(&Message::Raw(&big[..INJECT_CAPACITY])).unwrap();
        assert_eq!(
            a.inject(&Message::Raw(b"x")),
            Err(Misuse::TransmitPending.into())
        );
        assert_eq!(a.injected_pending(), INJECT_CAPACITY);
        // Nothing is queued for zero bytes.
        a.inject_truncated(&Message::Raw(b"abc"), 0).unwrap();
        assert_eq!(drain(&mut p.client, 1000).len(), INJECT_CAPACITY);
        p.client.disconnect().unwrap();
        let _ = drain(&mut p.client, 64);
        assert_eq!(p.client.handle_eof(), Ok(()));
        assert_eq!(
            p.client.adversary().inject(&Message::Raw(b"x")),
            Err(Error::Closed)
        );
    }

    #[test]
    fn relaxed_checks_let_requests_out_and_are_tracked() {
        let mut p = ready();
        let size = p.client.size().unwrap();
        assert_eq!(
            p.client.read(size, 512, CmdFlags::empty()),
            Err(Misuse::OutOfRange {
                offset: size,
                len: 512,
                size
            }
            .into())
        );
        p.client.adversary().relax(ClientChecks::BOUNDS);
        assert_eq!(p.client.adversary().relaxed(), ClientChecks::BOUNDS);
        let past = p.read(size, 512, CmdFlags::empty()).unwrap();
        let unknown = p
            .client
            .adversary()
            .command(Command::Unknown(99), CmdFlags::empty(), 0, 0)
            .unwrap();
        assert!(p.drive(), "{:?}", p.error);
        // The server refused both, and the client delivered both refusals.
        assert_eq!(p.result(past), Some(Err(crate::Errno::Inval)));
        assert_eq!(p.result(unknown), Some(Err(crate::Errno::Inval)));
        p.client.adversary().enforce(ClientChecks::BOUNDS);
        assert!(p.client.adversary().relaxed().is_empty());
        assert!(p.client.read(size, 512, CmdFlags::empty()).is_err());
    }
}
