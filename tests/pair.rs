//! The client and server machines against each other, in memory, in every reply form.

use nbd_proto::client::{ClientConfig, State};
use nbd_proto::server::{ReplyForm, ServerConfig};
use nbd_proto::testing::{Pair, Replies, BLOCK};
use nbd_proto::wire::extent::{STATE_HOLE, STATE_ZERO};
use nbd_proto::wire::{CmdFlags, Errno, Extent, TransmissionFlags};

const SIZE: usize = 1 << 20;

/// Client configurations for the three reply forms.
fn forms() -> [(ReplyForm, ClientConfig<'static>); 3] {
    let mut simple = ClientConfig::new("");
    simple.structured_replies = false;
    simple.extended_headers = false;
    let mut structured = ClientConfig::new("");
    structured.extended_headers = false;
    structured.meta_contexts = &["base:allocation"];
    let mut extended = ClientConfig::new("");
    extended.meta_contexts = &["base:allocation", "qemu:dirty-bitmap:all"];
    [
        (ReplyForm::Simple, simple),
        (ReplyForm::Structured, structured),
        (ReplyForm::Extended, extended),
    ]
}

fn ready(config: &ClientConfig<'_>, form: ReplyForm) -> Pair {
    let mut p = Pair::new(config, ServerConfig::default(), SIZE);
    assert!(p.drive(), "{:?}", p.error);
    assert_eq!(p.client.state(), State::Ready, "{:?}", p.client_log);
    assert_eq!(p.server.reply_form(), form);
    assert_eq!(p.client.extended_headers(), form == ReplyForm::Extended);
    assert_eq!(p.client.structured_replies(), form != ReplyForm::Simple);
    p
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn handshake_in_every_form() {
    for (form, config) in forms() {
        let p = ready(&config, form);
        assert_eq!(p.client.size(), Some(SIZE as u64));
        assert_eq!(p.client.contexts().len(), config.meta_contexts.len());
        assert_eq!(p.server.contexts(), p.client.contexts());
    }
}

#[test]
fn write_then_read_back_in_every_form() {
    for (form, config) in forms() {
        let mut p = ready(&config, form);
        let data = pattern(3 * BLOCK as usize + 100, 7);
        let w = p.write(8192, &data, CmdFlags::FUA).unwrap();
        assert!(p.drive());
        assert_eq!(p.result(w), Some(Ok(())));
        assert_eq!(&p.disk[8192..8192 + data.len()], &data[..]);
        // A read spanning a hole, the data, and another hole.
        let r = p.read(0, 8 * BLOCK as u32, CmdFlags::empty()).unwrap();
        assert!(p.drive(), "{form:?}: {:?}", p.error);
        assert_eq!(p.result(r), Some(Ok(())));
        let got = &p.read_data[&r];
        assert_eq!(&got[..], &p.disk[..8 * BLOCK as usize], "{form:?}");
        if form != ReplyForm::Simple {
            assert!(
                p.client_log.iter().any(|e| e.starts_with("ReadHole")),
                "{form:?}: holes expected"
            );
        }
    }
}

#[test]
fn many_requests_in_flight_complete_out_of_order() {
    for (form, config) in forms() {
        let mut p = ready(&config, form);
        let data = pattern(SIZE, 3);
        p.disk.copy_from_slice(&data);
        p.replies = Replies::Held;
        let cookies: Vec<_> = (0..32)
            .map(|i| p.read(i * 4096, 4096, CmdFlags::empty()).unwrap())
            .collect();
        assert!(p.drive());
        assert!(p.done.is_empty());
        assert_eq!(p.server.owed(), 32);
        p.release();
        assert!(p.drive(), "{:?}", p.error);
        assert_eq!(p.done.len(), 32);
        // Answered last-first.
        assert_eq!(p.done[0].0, *cookies.last().unwrap());
        for (i, c) in cookies.iter().enumerate() {
            assert_eq!(&p.read_data[c][..], &data[i * 4096..(i + 1) * 4096]);
        }
    }
}

#[test]
fn trim_zeroes_and_block_status() {
    for (form, config) in forms().into_iter().skip(1) {
        let mut p = ready(&config, form);
        let w = p
            .write(0, &pattern(4 * BLOCK as usize, 9), CmdFlags::empty())
            .unwrap();
        assert!(p.drive());
        assert_eq!(p.result(w), Some(Ok(())));
        let t = p.client.trim(BLOCK, BLOCK, CmdFlags::empty()).unwrap();
        let z = p
            .client
            .write_zeroes(2 * BLOCK, BLOCK, CmdFlags::NO_HOLE)
            .unwrap();
        assert!(p.drive());
        assert_eq!((p.result(t), p.result(z)), (Some(Ok(())), Some(Ok(()))));
        let b = p
            .client
            .block_status(0, 8 * BLOCK, CmdFlags::empty())
            .unwrap();
        assert!(p.drive(), "{:?}", p.error);
        assert_eq!(p.result(b), Some(Ok(())));
        let base: Vec<_> = p
            .extents
            .iter()
            .filter(|(c, id, ..)| *c == b && *id == 1)
            .map(|(.., o, e)| (*o, *e))
            .collect();
        let hole = STATE_HOLE | STATE_ZERO;
        assert_eq!(
            base,
            [
                (
                    0,
                    Extent {
                        len: BLOCK,
                        status: 0
                    }
                ),
                (
                    BLOCK,
                    Extent {
                        len: 2 * BLOCK,
                        status: hole
                    }
                ),
                (
                    3 * BLOCK,
                    Extent {
                        len: BLOCK,
                        status: 0
                    }
                ),
                (
                    4 * BLOCK,
                    Extent {
                        len: 4 * BLOCK,
                        status: hole
                    }
                ),
            ],
            "{form:?}"
        );
        if form == ReplyForm::Extended {
            assert!(p.extents.iter().any(|(c, id, ..)| *c == b && *id == 2));
        }
    }
}

#[test]
fn block_status_payload_form_and_req_one() {
    let (form, config) = forms()[2];
    let mut p = ready(&config, form);
    let ids = [p.client.contexts()[1]];
    let b = p
        .client
        .block_status_for(0, 4 * BLOCK, CmdFlags::empty(), &ids)
        .unwrap();
    assert!(p.drive(), "{:?}", p.error);
    assert_eq!(p.result(b), Some(Ok(())));
    assert!(p.extents.iter().all(|(_, id, ..)| *id == ids[0]));
    let r = p
        .client
        .block_status(0, 4 * BLOCK, CmdFlags::REQ_ONE)
        .unwrap();
    assert!(p.drive());
    assert_eq!(
        p.extents.iter().filter(|(c, ..)| *c == r).count(),
        2,
        "one extent per context"
    );
}

#[test]
fn server_errors_reach_the_client() {
    for (form, config) in forms() {
        let mut p = ready(&config, form);
        p.failures.push((2 * BLOCK, Errno::Io));
        p.failures.push((6 * BLOCK, Errno::NoSpc));
        let r = p.read(BLOCK, 2 * BLOCK as u32, CmdFlags::empty()).unwrap();
        let w = p.write(6 * BLOCK, &[1; 512], CmdFlags::empty()).unwrap();
        let ok = p.read(10 * BLOCK, 512, CmdFlags::empty()).unwrap();
        assert!(p.drive(), "{form:?}: {:?}", p.error);
        assert_eq!(p.result(r), Some(Err(Errno::Io)), "{form:?}");
        assert_eq!(p.result(w), Some(Err(Errno::NoSpc)), "{form:?}");
        assert_eq!(p.result(ok), Some(Ok(())), "{form:?}");
        if form != ReplyForm::Simple {
            // Structured replies carry the message and the offset.
            assert!(
                p.client_log
                    .iter()
                    .any(|e| e.contains("injected failure") && e.contains("8192")),
                "{form:?}: {:#?}",
                p.client_log
            );
        }
    }
}

#[test]
fn the_client_refuses_what_the_server_would_reject() {
    for (form, config) in forms() {
        let mut p = Pair::new(&config, ServerConfig::default(), SIZE);
        p.flags |= TransmissionFlags::READ_ONLY;
        assert!(p.drive());
        assert_eq!(p.server.reply_form(), form);
        assert!(
            p.write(0, &[1; 512], CmdFlags::empty()).is_err(),
            "read-only"
        );
        assert!(
            p.read(SIZE as u64, 512, CmdFlags::empty()).is_err(),
            "past the end"
        );
        assert!(
            p.client.trim(0, 512, CmdFlags::empty()).is_err(),
            "read-only trim"
        );
        assert!(p.drive());
        assert_eq!(p.server.owed(), 0, "nothing reached the server");
        assert!(p.server_log.iter().all(|e| !e.starts_with("Request")));
    }
}

#[test]
fn disconnect_closes_both_sides() {
    for (form, config) in forms() {
        let mut p = ready(&config, form);
        let r = p.read(0, 4096, CmdFlags::empty()).unwrap();
        p.client.disconnect().unwrap();
        assert!(p.drive());
        assert_eq!(p.result(r), Some(Ok(())));
        assert!(p.server.is_finished(), "{:?}", p.server.state());
        assert_eq!(p.client.state(), State::Closed);
    }
}
