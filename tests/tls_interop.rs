//! TLS against real peers: the example server with `--tls-cert`, reached by libnbd
//! (`nbdinfo`, GnuTLS) and QEMU (`qemu-img` with `tls-creds-x509`), with certificates made
//! by the test.

mod support;

use std::path::Path;
use std::process::Command;

use support::{example_binary, make_pki, require, run, Spawned, TestDir};

fn tls_server(dir: &TestDir, pki: &Path, extra: &[&str]) -> (Spawned, String) {
    let sock = dir.join("tls.sock");
    let mut cmd = Command::new(example_binary("nbd-server"));
    cmd.arg("--unix")
        .arg(&sock)
        .args(["--memory", "16M", "--tls-cert"])
        .arg(pki.join("server-cert.pem"));
    cmd.arg("--tls-key")
        .arg(pki.join("server-key.pem"))
        .args(extra);
    let mut server = Spawned::spawn(&mut cmd);
    server.wait_for_unix_socket(&sock);
    (server, sock.display().to_string())
}

#[test]
fn nbdinfo_over_tls_and_plaintext_refused() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let dir = TestDir::named("tls_nbdinfo");
    let pki = make_pki(&dir, false).server;
    let (_server, sock) = tls_server(&dir, &pki, &[]);

    let uri = format!(
        "nbds+unix:///?socket={sock}&tls-certificates={}&tls-hostname=localhost",
        pki.display()
    );
    let out = run(Command::new("nbdinfo").arg(&uri));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("with TLS"), "{text}");
    assert!(text.contains("export-size: 16777216"), "{text}");

    // A client without TLS gets NBD_REP_ERR_TLS_REQD and cannot use the export.
    let plain = run(Command::new("nbdinfo").arg(format!("nbd+unix:///?socket={sock}")));
    assert!(!plain.status.success());
}

#[test]
fn qemu_img_over_tls_reads_back_what_it_wrote() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TestDir::named("tls_qemu");
    let pki = make_pki(&dir, false).server;
    let (_server, sock) = tls_server(&dir, &pki, &[]);
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        pki.display()
    );
    let image = format!(
        "driver=nbd,server.type=unix,server.path={sock},tls-creds=tls0,tls-hostname=localhost"
    );

    let out = run(Command::new("qemu-io")
        .args(["--object", &object, "--image-opts", &image])
        .args(["-c", "write -P 0x5a 1M 256k", "-c", "read -P 0x5a 1M 256k"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("failed"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out =
        run(Command::new("qemu-img").args(["info", "--object", &object, "--image-opts", &image]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("16 MiB"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn optional_tls_serves_plain_clients_but_hides_tls_only_exports() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let dir = TestDir::named("tls_optional");
    let pki = make_pki(&dir, false).server;
    let (_server, sock) = tls_server(
        &dir,
        &pki,
        &[
            "--tls",
            "optional",
            "--export",
            "public",
            "--export",
            "secret",
            "--tls-only",
        ],
    );

    let plain = run(Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd+unix:///?socket={sock}")));
    let text = String::from_utf8_lossy(&plain.stdout);
    assert!(
        plain.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    assert!(text.contains("export=\"public\""), "{text}");
    assert!(
        !text.contains("secret"),
        "TLS-only export listed in plaintext: {text}"
    );

    let refused = run(Command::new("nbdinfo").arg(format!("nbd+unix:///secret?socket={sock}")));
    assert!(
        !refused.status.success(),
        "TLS-only export served in plaintext"
    );

    let uri = format!(
        "nbds+unix:///secret?socket={sock}&tls-certificates={}&tls-hostname=localhost",
        pki.display()
    );
    let tls = run(Command::new("nbdinfo").arg(&uri));
    assert!(
        tls.status.success(),
        "{}",
        String::from_utf8_lossy(&tls.stderr)
    );
}
