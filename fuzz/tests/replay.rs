//! Replays the committed corpora through the fuzz targets' checking functions, on stable
//! and without libFuzzer: `cargo test --manifest-path fuzz/Cargo.toml`.
//!
//! For every target, every file of `corpus/<target>/` (the seeds) and of
//! `regressions/<target>/` (inputs that once crashed it: copy a fixed crash from
//! `artifacts/<target>/` there) is run whole and as every one of its prefixes. Every
//! seed must also be a valid encoding, accepted by at least one decoder of its target.

use std::fs;
use std::path::{Path, PathBuf};

use nbd_proto_fuzz::TARGETS;

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

fn replay(kind: &str, require_some: bool) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for &(name, check) in TARGETS {
        let files = inputs(&root.join(kind).join(name));
        assert!(
            !require_some || !files.is_empty(),
            "{kind}/{name}/ holds no input"
        );
        for path in &files {
            let data = fs::read(path).unwrap();
            if kind == "corpus" {
                // A seed is a valid encoding: some decoder of its target accepts it.
                assert!(
                    check(&data) > 0,
                    "no decoder of {name} accepts {}",
                    path.display()
                );
            }
            for end in 0..=data.len() {
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
    for &(name, _) in TARGETS {
        let src = fs::read_to_string(root.join("fuzz_targets").join(format!("{name}.rs")))
            .unwrap_or_else(|e| panic!("fuzz_targets/{name}.rs: {e}"));
        assert!(
            src.contains(&format!("nbd_proto_fuzz::{name}(data)")),
            "fuzz_targets/{name}.rs does not call nbd_proto_fuzz::{name}"
        );
    }
}
