//! The server's adversarial mode (feature `adversarial`; see [`crate::adversarial`]):
//! forged messages queued in order with the machine's own output, relaxable checks on the
//! application's replies, and a hard disconnect on demand.

use super::{Pending, Server};
use crate::adversarial::{Message, ServerChecks};
use crate::error::{Error, Misuse};

/// The adversarial controls of a [`Server`]: see [`crate::adversarial`] and
/// [`Server::adversary`].
#[derive(Debug)]
pub struct ServerAdversary<'a, const N: usize, const B: usize> {
    server: &'a mut Server<N, B>,
}

impl<const N: usize, const B: usize> Server<N, B> {
    /// The adversarial controls (feature `adversarial`): inject bytes or forged messages,
    /// relax the checks on replies, hang up. See [`crate::adversarial`].
    pub fn adversary(&mut self) -> ServerAdversary<'_, N, B> {
        ServerAdversary { server: self }
    }

    /// True unless adversarial mode relaxed `check` (the `enforced!` hook).
    pub(crate) fn enforces(&self, check: ServerChecks) -> bool {
        !self.relaxed.intersects(check)
    }
}

impl<const N: usize, const B: usize> ServerAdversary<'_, N, B> {
    /// Queues `message` behind everything already queued: the server's output is one
    /// ordered queue, so it never splits one of the machine's own messages. Fails with
    /// [`Misuse::TransmitPending`] while the output buffer is too full (drain
    /// `poll_transmit` first), with [`Misuse::InjectionTooLarge`] for a message larger
    /// than the buffer (`B` bytes), with [`Misuse::Encode`] for one the codecs cannot
    /// express, and with the sticky error or [`Error::Closed`] once the session is over.
    pub fn inject(&mut self, message: &Message<'_>) -> Result<(), Error> {
        self.inject_truncated(message, usize::MAX)
    }

    /// Like [`inject`](Self::inject), but only the first `len` bytes of the encoding go
    /// out: a truncated message (follow it with [`hang_up`](Self::hang_up) for the
    /// classic "truncated header, then close").
    pub fn inject_truncated(&mut self, message: &Message<'_>, len: usize) -> Result<(), Error> {
        let s = &mut *self.server;
        s.live()?;
        let full = message.buffer_len();
        if full > B {
            return Err(Misuse::InjectionTooLarge(full).into());
        }
        let keep = len.min(full);
        if keep == 0 {
            return Ok(());
        }
        s.out.push_with(full, |buf| {
            message.emit(buf)?;
            Ok(keep)
        })
    }

    /// Ends the session without another byte of the machine's own: what is queued
    /// (injected bytes included) is still sent, then [`Server::is_finished`] says to close
    /// the connection. Replies still owed are never sent. A hard disconnect.
    pub fn hang_up(&mut self) -> Result<(), Error> {
        let s = &mut *self.server;
        s.live()?;
        s.close();
        s.owed.clear();
        s.pending = Pending::None;
        // Nor a refusal still waiting for its payload to be discarded.
        s.deferred = None;
        Ok(())
    }

    /// Switches off `checks` (see [`ServerChecks`]) until [`enforce`](Self::enforce).
    pub fn relax(&mut self, checks: ServerChecks) {
        self.server.relaxed.insert(checks);
    }

    /// Switches `checks` back on.
    pub fn enforce(&mut self, checks: ServerChecks) {
        self.server.relaxed.remove(checks);
    }

    /// The checks currently switched off.
    pub fn relaxed(&self) -> ServerChecks {
        self.server.relaxed
    }
}

#[cfg(test)]
mod tests {
    use std::vec::Vec;

    use super::*;
    use crate::common::Transmit;
    use crate::server::{ExportInfo, ServerConfig, ServerEvent, State};
    use crate::wire::{
        ExportRequest, Greeting, InfoList, Opt, OptCode, OptReply, SimpleReply, TransmissionFlags,
    };

    type S = Server<4, 4096>;

    fn drain(s: &mut S) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 100];
        while let Some(t) = s.poll_transmit(&mut buf).unwrap() {
            match t {
                Transmit::Bytes(n) => out.extend_from_slice(&buf[..n]),
                t => panic!("{t:?}"),
            }
        }
        out
    }

    fn opt(o: &Opt<'_>) -> Vec<u8> {
        Message::Opt(*o).to_vec().unwrap()
    }

    #[test]
    fn injections_follow_queued_output_and_hang_up_drains_first() {
        let mut s = S::new(ServerConfig::default());
        s.adversary()
            .inject(&Message::SimpleReply(SimpleReply {
                error: None,
                cookie: crate::wire::Cookie(9),
            }))
            .unwrap();
        s.adversary()
            .inject_truncated(&Message::Raw(b"truncated"), 5)
            .unwrap();
        s.adversary().hang_up().unwrap();
        assert_eq!(s.state(), State::Closed);
        assert!(!s.is_finished(), "queued output goes out first");
        let bytes = drain(&mut s);
        assert_eq!(bytes.len(), Greeting::LEN + 16 + 5);
        assert_eq!(
            &bytes[Greeting::LEN..Greeting::LEN + 4],
            &[0x67, 0x44, 0x66, 0x98]
        );
        assert_eq!(&bytes[Greeting::LEN + 16..], b"trunc");
        assert!(s.is_finished());
        assert_eq!(
            s.adversary().inject(&Message::Raw(b"x")),
            Err(Error::Closed)
        );
    }

    #[test]
    fn injection_limits() {
        let mut s = S::new(ServerConfig::default());
        let big = [0u8; 4097];
        assert_eq!(
            s.adversary().inject(&Message::Raw(&big)),
            Err(Misuse::InjectionTooLarge(4097).into())
        );
        // The greeting (18 bytes) is queued: the whole buffer is not free.
        assert_eq!(
            s.adversary().inject(&Message::Raw(&big[..4096])),
            Err(Misuse::TransmitPending.into())
        );
        drain(&mut s);
        s.adversary().inject(&Message::Raw(&big[..4096])).unwrap();
        assert_eq!(drain(&mut s).len(), 4096);
    }

    #[test]
    fn relaxed_export_info_goes_out_verbatim() {
        let mut s = S::new(ServerConfig::default());
        drain(&mut s);
        assert!(s.handle_input(&[0, 0, 0, 1]).unwrap().event.is_none());
        let go = opt(&Opt::Go(ExportRequest {
            name: "",
            infos: InfoList::new(&[]),
        }));
        let bad = crate::wire::BlockSize {
            min: 3,
            preferred: 1,
            max_payload: 0,
        };
        // Flags the negotiation forbids, and nonsense block sizes.
        let flags = TransmissionFlags::SEND_DF | TransmissionFlags::SEND_RESIZE;
        let info = ExportInfo::new(4096, flags).with_block_size(bad);
        let mut refused = s.clone();
        assert!(matches!(
            refused.handle_input(&go).unwrap().event,
            Some(ServerEvent::Export(_))
        ));
        assert_eq!(
            refused.answer_export(&info),
            Err(
                Misuse::BadReply("minimum block size must be a power of two between 1 and 65536")
                    .into()
            )
        );
        s.adversary().relax(ServerChecks::EXPORT_INFO);
        assert!(matches!(
            s.handle_input(&go).unwrap().event,
            Some(ServerEvent::Export(_))
        ));
        s.answer_export(&info).unwrap();
        let bytes = drain(&mut s);
        let (code, reply, n) = OptReply::parse_message(&bytes).unwrap();
        assert_eq!(code, OptCode::Go);
        assert_eq!(
            reply,
            OptReply::Info(crate::wire::Info::Export { size: 4096, flags })
        );
        let (_, reply, _) = OptReply::parse_message(&bytes[n..]).unwrap();
        assert_eq!(reply, OptReply::Info(crate::wire::Info::BlockSize(bad)));
        assert_eq!(s.state(), State::Transmission);
        assert_eq!(s.transmission_flags(), flags);
    }
}
