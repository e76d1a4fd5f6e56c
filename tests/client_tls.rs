//! The example client (`nbd-client`, rustls) over TLS against real servers: nbdkit with
//! `--tls=require` (GnuTLS) and the example server with `--tls-cert`, with certificates made
//! by the test. Data is checked byte for byte; refusals must be one clear line, a non-zero
//! exit and no hang.

mod support;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use support::{example_binary, make_pki, pattern, require, run, Peer, Spawned, TestDir};

fn client(args: &[&str]) -> Output {
    run(Command::new(example_binary("nbd-client")).args(args))
}

fn client_ok(args: &[&str]) -> Vec<u8> {
    let out = client(args);
    assert!(
        out.status.success(),
        "nbd-client {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Runs a command that must fail with one line on stderr containing every one of
/// `needles`; returns that line.
fn client_fails(args: &[&str], needles: &[&str]) -> String {
    let out = client(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "nbd-client {args:?} succeeded");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "nbd-client {args:?}: not one line: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "nbd-client {args:?}: no {n:?} in: {err}");
    }
    err
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `uri` with more query parameters.
fn with(uri: &str, params: &[(&str, &str)]) -> String {
    let mut u = uri.to_owned();
    for (k, v) in params {
        u.push(if u.contains('?') { '&' } else { '?' });
        u.push_str(&format!("{k}={v}"));
    }
    u
}

/// `nbd+unix://...` → `nbds+unix://...`, `nbd://` → `nbds://`.
fn nbds(uri: &str) -> String {
    uri.replacen("nbd", "nbds", 1)
}

const SIZE: u64 = 8 << 20;

#[test]
fn nbdkit_over_tls_info_read_and_copy_both_ways() {
    if !require(&["nbdkit"]) {
        return;
    }
    let dir = TestDir::named("client_tls_nbdkit");
    let pki = make_pki(&dir, false);
    let certs = format!("--tls-certificates={}", path(&pki.server));
    let source = dir.pattern_file("source.raw", SIZE, 31);
    let src = Peer::nbdkit(&["--tls=require", &certs, "-r", "file", path(&source)]);
    let dst = Peer::nbdkit(&["--tls=require", &certs, "memory", "16M"]);
    let tls = [
        ("tls-certificates", path(&pki.client)),
        ("tls-hostname", "localhost"),
    ];
    let src_uri = with(&nbds(&src.default_uri()), &tls);
    let dst_uri = with(&nbds(&dst.default_uri()), &tls);

    let info = String::from_utf8(client_ok(&["info", &src_uri])).unwrap();
    assert!(info.contains("with TLS"), "{info}");
    assert!(info.contains(&format!("export-size: {SIZE}")), "{info}");
    let json = String::from_utf8(client_ok(&["info", &src_uri, "--json"])).unwrap();
    assert!(json.contains("\"TLS\": true"), "{json}");

    // Reads, spanning several requests, at an odd offset.
    let got = client_ok(&["read", &src_uri, "12345", "3000000"]);
    assert!(
        got == pattern(31, 12345, 3_000_000),
        "read over TLS differs"
    );

    // TLS source to a file.
    let copy = dir.data_path("copy.raw");
    client_ok(&["copy", &src_uri, path(&copy)]);
    assert!(fs::read(&copy).unwrap() == fs::read(&source).unwrap());
    // A file to a TLS destination, then TLS to TLS, read back over TLS.
    client_ok(&["copy", path(&source), &dst_uri, "--requests", "8"]);
    let back = client_ok(&["read", &dst_uri, "0", &SIZE.to_string()]);
    assert!(back == pattern(31, 0, SIZE as usize), "copy to TLS differs");
    client_ok(&["copy", &src_uri, &dst_uri, "--connections", "2"]);
    let back = client_ok(&["read", &dst_uri, "4096", "65536"]);
    assert!(back == pattern(31, 4096, 65536));
}

#[test]
fn nbdkit_over_tcp_checks_the_ip_address_and_takes_the_flag() {
    if !require(&["nbdkit"]) {
        return;
    }
    let dir = TestDir::named("client_tls_tcp");
    let pki = make_pki(&dir, false);
    let certs = format!("--tls-certificates={}", path(&pki.server));
    let source = dir.pattern_file("source.raw", 1 << 20, 32);
    let peer = Peer::nbdkit_tcp(&["--tls=require", &certs, "-r", "file", path(&source)]);
    // nbds://127.0.0.1:PORT/: the certificate must carry the IP address.
    let uri = nbds(&peer.default_uri());
    assert!(uri.starts_with("nbds://127.0.0.1:"), "{uri}");
    let got = client_ok(&[
        "--tls-certificates",
        path(&pki.client),
        "read",
        &uri,
        "0",
        "65536",
    ]);
    assert!(got == pattern(32, 0, 65536));
    let got = client_ok(&[
        "read",
        &with(&uri, &[("tls-certificates", path(&pki.client))]),
        "100",
        "200",
    ]);
    assert!(got == pattern(32, 100, 200));
    // A name the certificate does not carry.
    let wrong = with(
        &uri,
        &[
            ("tls-certificates", path(&pki.client)),
            ("tls-hostname", "disk.example"),
        ],
    );
    client_fails(
        &["read", &wrong, "0", "512"],
        &["TLS handshake", "disk.example"],
    );
}

#[test]
fn example_server_with_tls() {
    let dir = TestDir::named("client_tls_ours");
    let pki = make_pki(&dir, false);
    let sock = dir.join("tls.sock");
    let mut server = Spawned::spawn(
        Command::new(example_binary("nbd-server"))
            .arg("--unix")
            .arg(&sock)
            .args(["--memory", "16M", "--tls-cert"])
            .arg(pki.server.join("server-cert.pem"))
            .arg("--tls-key")
            .arg(pki.server.join("server-key.pem")),
    );
    server.wait_for_unix_socket(&sock);
    let uri = format!(
        "nbds+unix:///?socket={}&tls-certificates={}&tls-hostname=localhost",
        sock.display(),
        path(&pki.client)
    );
    let info = String::from_utf8(client_ok(&["info", &uri])).unwrap();
    assert!(info.contains("with TLS"), "{info}");
    assert!(info.contains("export-size: 16777216"), "{info}");
    let source = dir.pattern_file("source.raw", SIZE, 33);
    client_ok(&["copy", path(&source), &uri]);
    let back = client_ok(&["read", &uri, "0", &SIZE.to_string()]);
    assert!(
        back == pattern(33, 0, SIZE as usize),
        "round trip over TLS differs"
    );
    let copy = dir.data_path("copy.raw");
    client_ok(&["copy", &uri, path(&copy)]);
    let copied = fs::read(&copy).unwrap();
    assert_eq!(copied.len(), 16 << 20);
    assert!(copied[..SIZE as usize] == pattern(33, 0, SIZE as usize));
    assert!(copied[SIZE as usize..].iter().all(|b| *b == 0));
    // The example server requires TLS: plaintext is refused, by name.
    let plain = format!("nbd+unix:///?socket={}", sock.display());
    client_fails(&["read", &plain, "0", "512"], &["server requires TLS"]);
    client_fails(&["info", &plain], &["server requires TLS"]);
    drop(server);
}

#[test]
fn nbds_against_plaintext_servers_fails_clearly() {
    if !require(&["nbdkit"]) {
        return;
    }
    let dir = TestDir::named("client_tls_plain");
    let pki = make_pki(&dir, false);
    let kit = Peer::nbdkit(&["memory", "1M"]);
    let sock = dir.join("plain.sock");
    let mut ours = Spawned::spawn(
        Command::new(example_binary("nbd-server"))
            .arg("--unix")
            .arg(&sock)
            .args(["--memory", "1M"]),
    );
    ours.wait_for_unix_socket(&sock);
    let ours_uri = format!("nbd+unix:///?socket={}", sock.display());
    for plain in [kit.default_uri(), ours_uri] {
        let uri = with(
            &nbds(&plain),
            &[
                ("tls-certificates", path(&pki.client)),
                ("tls-hostname", "localhost"),
            ],
        );
        for args in [
            vec!["read", &uri, "0", "512"],
            vec!["info", &uri],
            vec!["list", &uri],
        ] {
            client_fails(&args, &["TLS is required", "STARTTLS"]);
        }
        // The same URI as nbd:// falls back to plaintext (TLS only if offered).
        let optional = uri.replacen("nbds", "nbd", 1);
        let info = String::from_utf8(client_ok(&["info", &optional])).unwrap();
        assert!(info.contains("without TLS"), "{info}");
        assert_eq!(client_ok(&["read", &optional, "0", "512"]), vec![0u8; 512]);
    }
}

#[test]
fn nbd_uris_upgrade_with_certificates_and_plaintext_is_refused() {
    if !require(&["nbdkit"]) {
        return;
    }
    let dir = TestDir::named("client_tls_optional");
    let pki = make_pki(&dir, false);
    let certs = format!("--tls-certificates={}", path(&pki.server));
    let source = dir.pattern_file("source.raw", 1 << 20, 34);
    let peer = Peer::nbdkit(&["--tls=require", &certs, "-r", "file", path(&source)]);
    let plain = peer.default_uri();
    // nbd:// with certificates: TLS policy Optional, and the server offers TLS.
    let optional = with(
        &plain,
        &[
            ("tls-certificates", path(&pki.client)),
            ("tls-hostname", "localhost"),
        ],
    );
    let info = String::from_utf8(client_ok(&["info", &optional])).unwrap();
    assert!(info.contains("with TLS"), "{info}");
    let got = client_ok(&["read", &optional, "1000", "5000"]);
    assert!(got == pattern(34, 1000, 5000));
    // nbd:// without certificates: no TLS, and the server says it requires TLS.
    for args in [
        vec!["read", &plain, "0", "512"],
        vec!["info", &plain],
        vec!["list", &plain],
        vec!["map", &plain],
    ] {
        client_fails(&args, &["server requires TLS", "NBD_REP_ERR_TLS_REQD"]);
    }
}

#[test]
fn certificate_problems_are_refused_with_the_reason() {
    if !require(&["nbdkit"]) {
        return;
    }
    let dir = TestDir::named("client_tls_bad");
    let pki = make_pki(&dir, false);
    let certs = format!("--tls-certificates={}", path(&pki.server));
    let peer = Peer::nbdkit(&["--tls=require", &certs, "memory", "1M"]);
    let uri = nbds(&peer.default_uri());
    // A CA that did not sign the server's certificate.
    let other = with(
        &uri,
        &[
            ("tls-certificates", path(&pki.other)),
            ("tls-hostname", "localhost"),
        ],
    );
    client_fails(
        &["read", &other, "0", "512"],
        &["TLS handshake", "UnknownIssuer"],
    );
    client_fails(&["info", &other], &["TLS handshake", "UnknownIssuer"]);
    // ... which tls-verify-peer=false accepts (encrypted, not authenticated).
    let unverified = with(&uri, &[("tls-verify-peer", "false")]);
    let info = String::from_utf8(client_ok(&["info", &unverified])).unwrap();
    assert!(info.contains("with TLS"), "{info}");
    // Refused before connecting: no CA, no name over a Unix socket, pre-shared keys.
    client_fails(
        &["read", &uri, "0", "512"],
        &["tls-certificates", "ca-cert.pem"],
    );
    let no_name = with(&uri, &[("tls-certificates", path(&pki.client))]);
    client_fails(&["read", &no_name, "0", "512"], &["tls-hostname"]);
    let psk = with(&uri, &[("tls-type", "psk")]);
    client_fails(
        &["read", &psk, "0", "512"],
        &["tls-type=psk", "not supported"],
    );
    let missing = with(
        &uri,
        &[
            ("tls-certificates", path(&dir.join("nowhere"))),
            ("tls-hostname", "localhost"),
        ],
    );
    client_fails(&["read", &missing, "0", "512"], &["ca-cert.pem"]);
}

#[test]
fn a_client_certificate_is_presented_when_the_directory_has_one() {
    if !require(&["nbdkit"]) {
        return;
    }
    let dir = TestDir::named("client_tls_client_cert");
    let pki = make_pki(&dir, true);
    let certs = format!("--tls-certificates={}", path(&pki.server));
    let peer = Peer::nbdkit(&["--tls=require", "--tls-verify-peer", &certs, "memory", "1M"]);
    let uri = nbds(&peer.default_uri());
    let with_cert = with(
        &uri,
        &[
            ("tls-certificates", path(&pki.client)),
            ("tls-hostname", "localhost"),
        ],
    );
    assert_eq!(
        client_ok(&["read", &with_cert, "0", "4096"]),
        vec![0u8; 4096]
    );
    // Without one (only the CA), the server refuses the session.
    let ca_only = dir.join("ca-only");
    fs::create_dir(&ca_only).unwrap();
    fs::copy(pki.client.join("ca-cert.pem"), ca_only.join("ca-cert.pem")).unwrap();
    let without = with(
        &uri,
        &[
            ("tls-certificates", path(&ca_only)),
            ("tls-hostname", "localhost"),
        ],
    );
    // (nbdkit checks the certificate after the TLS 1.3 handshake and hangs up: the client
    // sees a reset or a broken pipe, which must still be reported, naming TLS.)
    for args in [vec!["read", &without, "0", "4096"], vec!["info", &without]] {
        client_fails(&args, &["TLS session", "client certificate"]);
    }
}
