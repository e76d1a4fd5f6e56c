//! Smoke tests for the interop harness in `tests/support`. They start each
//! real NBD peer and query it with standard client tools. They do not use
//! the crate's API, so they show that the harness itself works.
//!
//! Missing peers make the tests skip, or fail with `NBD_INTEROP=required`.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::{Peer, Spawned, TestDir, Transport};

const MIB: u64 = 1 << 20;

fn nbdinfo_size(uri: &str) -> u64 {
    let out = support::run_ok(Command::new("nbdinfo").arg("--size").arg(uri));
    out.trim()
        .parse()
        .unwrap_or_else(|e| panic!("nbdinfo --size printed {out:?}: {e}"))
}

/// Finds `"key": <number>` in qemu-img's JSON output (no JSON crate needed).
fn json_number(json: &str, key: &str) -> Option<u64> {
    let compact: String = json.chars().filter(|c| !c.is_whitespace()).collect();
    let pat = format!("\"{key}\":");
    let rest = &compact[compact.find(&pat)? + pat.len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

#[test]
fn nbdkit_memory_unix_size() {
    if !support::require(&["nbdkit", "nbdinfo"]) {
        return;
    }
    let srv = Peer::nbdkit(&["memory", "1M"]);
    assert!(srv.socket_path().is_some());
    assert!(srv.uri("").starts_with("nbd+unix:///?socket="));
    assert_eq!(nbdinfo_size(&srv.uri("")), MIB);
}

#[test]
fn nbdkit_tcp_nbdsh_get_size() {
    if !support::require(&["nbdkit", "nbdsh"]) {
        return;
    }
    let srv = Peer::nbdkit_tcp(&["memory", "2M"]);
    let port = srv.port().expect("tcp peer has a port");
    assert_eq!(srv.uri(""), format!("nbd://127.0.0.1:{port}/"));
    let out = support::run_ok(&mut support::nbdsh(&[
        "-u",
        &srv.uri(""),
        "-c",
        "print(h.get_size())",
    ]));
    assert_eq!(out.trim(), (2 * MIB).to_string());
}

#[test]
fn nbdkit_oldstyle_tcp() {
    // The macro form of the skip policy.
    support::require_peers!("nbdkit", "nbdinfo");
    let srv = Peer::nbdkit_tcp(&["-o", "memory", "1M"]);
    assert_eq!(nbdinfo_size(&srv.uri("")), MIB);
}

#[test]
fn nbdkit_error_filter_fails_reads_with_eio() {
    if !support::require(&["nbdkit", "nbdsh"]) {
        return;
    }
    let srv = Peer::nbdkit(&[
        "--filter=error",
        "memory",
        "64M",
        "error=EIO",
        "error-pread-rate=100%",
    ]);
    let script = "try:\n    h.pread(512, 0)\n    print('no error')\nexcept nbd.Error as e:\n    print(e.errno)";
    let out = support::run_ok(Command::new("nbdsh").args(["-u", &srv.uri(""), "-c", script]));
    assert_eq!(out.trim(), "EIO");
}

#[test]
fn qemu_nbd_tcp_qemu_img_info() {
    if !support::require(&["qemu-nbd", "qemu-img"]) {
        return;
    }
    let dir = TestDir::new();
    let img = dir.pattern_file("disk.raw", MIB, 1);
    let srv = Peer::qemu_nbd_tcp(&img, &[]);
    assert!(srv.tcp_addr().is_some());
    let out =
        support::run_ok(Command::new("qemu-img").args(["info", "--output=json", &srv.uri("")]));
    assert_eq!(
        json_number(&out, "virtual-size"),
        Some(MIB),
        "qemu-img info: {out}"
    );
}

#[test]
fn qemu_nbd_unix_serves_the_pattern() {
    if !support::require(&["qemu-nbd", "qemu-img"]) {
        return;
    }
    let dir = TestDir::new();
    let size = 3 * MIB + 4096;
    let img = dir.pattern_file("disk.raw", size, 7);
    let copy = dir.data_path("copy.raw");
    let srv = Peer::qemu_nbd(&img, &["-r", "-x", "pat"]);
    support::run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(srv.uri("pat"))
            .arg(&copy),
    );
    let got = std::fs::read(&copy).unwrap();
    assert_eq!(got.len() as u64, size);
    assert!(
        got == support::pattern(7, 0, size as usize),
        "data mismatch"
    );
}

#[test]
fn nbd_server_unix_size_and_list() {
    if !support::require(&["nbd-server", "nbdinfo"]) {
        return;
    }
    let dir = TestDir::new();
    let size = 2 * MIB + 4096;
    let img = dir.pattern_file("disk.raw", size, 3);
    let srv = Peer::nbd_server(&img, &["flush = true", "fua = true"]);
    assert_eq!(srv.default_uri(), srv.uri("disk"));
    assert_eq!(nbdinfo_size(&srv.uri("disk")), size);
    let list = support::run_ok(Command::new("nbdinfo").args(["--list", &srv.default_uri()]));
    assert!(list.contains("export=\"disk\""), "nbdinfo --list: {list}");
}

#[test]
fn nbd_server_tcp_second_export_read_only() {
    if !support::require(&["nbd-server", "nbdinfo"]) {
        return;
    }
    let dir = TestDir::new();
    let img = dir.zero_file("disk.raw", 4 * MIB);
    let ro = format!("exportname = {}", img.display());
    let srv = Peer::nbd_server_on(Transport::Tcp, &img, &["[ro]", &ro, "readonly = true"]);
    assert_eq!(nbdinfo_size(&srv.uri("disk")), 4 * MIB);
    let is_ro = support::run(Command::new("nbdinfo").args(["--is", "read-only", &srv.uri("ro")]));
    assert_eq!(
        is_ro.status.code(),
        Some(0),
        "export `ro` should be read-only"
    );
}

#[test]
fn peer_drop_stops_the_server_and_removes_its_dir() {
    if !support::require(&["nbdkit", "qemu-nbd", "nbd-server"]) {
        return;
    }
    let dir = TestDir::new();
    let img = dir.zero_file("disk.raw", MIB);
    let peers = vec![
        Peer::nbdkit(&["memory", "1M"]),
        Peer::nbdkit_tcp(&["memory", "1M"]),
        Peer::qemu_nbd(&img, &[]),
        Peer::qemu_nbd_tcp(&img, &[]),
        Peer::nbd_server(&img, &[]),
        Peer::nbd_server_tcp(&img, &[]),
    ];
    for p in peers {
        let (pid, pdir, addr) = (p.pid(), p.dir().to_path_buf(), p.addr().clone());
        assert!(p.is_running(), "{:?} not running", p.kind());
        assert!(addr.is_listening());
        p.stop();
        assert!(!support::process_alive(pid), "pid {pid} survived drop");
        assert!(!pdir.exists(), "{} not removed", pdir.display());
        // A TCP port, once free, may be taken at once by anything else on the machine:
        // only a Unix socket path says for sure that this server stopped listening.
        if p_is_unix(&addr) {
            assert!(!addr.is_listening(), "{addr} still listening");
        }
    }
}

fn p_is_unix(addr: &support::Addr) -> bool {
    matches!(addr, support::Addr::Unix(_))
}

#[test]
fn spawned_foreground_server() {
    if !support::require(&["nbdkit", "nbdinfo"]) {
        return;
    }
    let dir = TestDir::new();
    let sock = dir.join("fg.sock");
    let mut srv = Spawned::spawn_in(
        dir,
        Command::new("nbdkit")
            .args(["-f", "-v", "-U"])
            .arg(&sock)
            .args(["memory", "3M"]),
    );
    srv.wait_for_unix_socket(&sock);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    assert_eq!(nbdinfo_size(&uri), 3 * MIB);
    let pid = srv.pid();
    srv.stop().expect("the process has exited");
    assert!(!support::process_alive(pid));
    assert!(
        srv.stderr().contains("nbdkit"),
        "verbose log expected on stderr"
    );
}

#[test]
fn spawned_exit_is_noticed() {
    let mut p = Spawned::spawn(Command::new("sh").args(["-c", "echo hello; exit 3"]));
    let status = p.wait();
    assert_eq!(status.code(), Some(3));
    assert_eq!(p.stdout(), "hello\n");
}

#[test]
#[should_panic(expected = "timed out")]
fn run_kills_a_command_that_hangs() {
    support::run_timeout(Command::new("sleep").arg("30"), Duration::from_millis(200));
}

#[test]
fn skip_policy_names_missing_tools() {
    let missing = support::missing_tools(&["sh", "nbd-proto-no-such-tool"]);
    assert_eq!(
        missing,
        vec!["nbd-proto-no-such-tool not installed".to_string()]
    );
}

#[test]
fn pattern_is_deterministic_and_seekable() {
    let whole = support::pattern(5, 0, 4096);
    assert_eq!(&whole[13..1013], &support::pattern(5, 13, 1000)[..]);
    assert_ne!(whole, support::pattern(6, 0, 4096));
    assert_ne!(&whole[..8], &whole[8..16]);
    let dir = TestDir::new();
    let f = dir.pattern_file("p.raw", MIB + 5, 5);
    let data = std::fs::read(&f).unwrap();
    assert_eq!(data.len() as u64, MIB + 5);
    assert_eq!(&data[..4096], &whole[..]);
    assert_eq!(data, support::pattern(5, 0, (MIB + 5) as usize));
    if Path::new("/dev/shm").is_dir() {
        assert!(f.starts_with("/dev/shm"));
    }
    let (a, b) = (dir.path().to_path_buf(), dir.data_dir().to_path_buf());
    drop(dir);
    assert!(!a.exists() && !b.exists());
}

#[test]
fn free_ports_are_unique() {
    let ports: std::collections::BTreeSet<u16> = (0..50).map(|_| support::free_port()).collect();
    assert_eq!(ports.len(), 50);
}
