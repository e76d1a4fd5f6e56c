//! Replays the committed corpora through the fuzz targets' checking functions, on stable
//! and without libFuzzer: `cargo test --manifest-path fuzz/Cargo.toml`.
//!
//! For every target, every file of `corpus/<target>/` (the seeds) and of
//! `regressions/<target>/` (inputs that once crashed it: copy a fixed crash from
//! `artifacts/<target>/` there) is run whole and as prefixes: every prefix for the codec
//! targets, whose seeds are single messages; for the state-machine targets, whose seeds
//! are whole sessions (and which already split every input two ways themselves), the
//! first 32 prefixes and 16 evenly spaced ones.
//!
//! Every codec seed must be a valid encoding, accepted by at least one decoder of its
//! target; every machine seed must produce at least one event.

use std::fs;
use std::path::{Path, PathBuf};

use nbd_proto_fuzz::{Target, MACHINE_TARGETS, TARGETS};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    files.sort();
    files
}

fn prefixes(len: usize, machine: bool) -> Vec<usize> {
    if !machine {
        return (0..=len).collect();
    }
    let mut v: Vec<usize> = (0..=len.min(32))
        .chain((0..16).map(|i| len * i / 16))
        .collect();
    v.push(len);
    v.sort_unstable();
    v.dedup();
    v
}

fn replay_target(kind: &str, name: &str, check: Target, machine: bool, require_some: bool) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = inputs(&root.join(kind).join(name));
    assert!(
        !require_some || !files.is_empty(),
        "{kind}/{name}/ holds no input"
    );
    for path in &files {
        let data = fs::read(path).unwrap();
        if kind == "corpus" {
            // A seed is meaningful: some decoder accepts it, or the machine reacts to it.
            assert!(
                check(&data) > 0,
                "{}: {name} accepts nothing of / sees no event in {}",
                if machine { "no event" } else { "no decoder" },
                path.display()
            );
        }
        for end in prefixes(data.len(), machine) {
            if let Err(panic) = std::panic::catch_unwind(|| check(&data[..end])) {
                eprintln!(
                    "{name} failed on the first {end} of {} bytes of {}",
                    data.len(),
                    path.display()
                );
                std::panic::resume_unwind(panic);
            }
        }
    }
    eprintln!("{kind}/{name}: {} inputs", files.len());
}

fn replay(kind: &str, require_some: bool) {
    for &(name, check) in TARGETS {
        replay_target(kind, name, check, false, require_some);
    }
    for &(name, check) in MACHINE_TARGETS {
        replay_target(kind, name, check, true, require_some);
    }
}

#[test]
fn corpus() {
    replay("corpus", true);
}

#[test]
fn regressions() {
    replay("regressions", false);
}

#[test]
fn every_target_has_a_fuzz_target_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for &(name, _) in TARGETS.iter().chain(MACHINE_TARGETS) {
        let src = fs::read_to_string(root.join("fuzz_targets").join(format!("{name}.rs")))
            .unwrap_or_else(|e| panic!("fuzz_targets/{name}.rs: {e}"));
        assert!(
            src.contains(&format!("nbd_proto_fuzz::{name}(data)")),
            "fuzz_targets/{name}.rs does not call nbd_proto_fuzz::{name}"
        );
    }
}
