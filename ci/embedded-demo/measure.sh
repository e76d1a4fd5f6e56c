#!/usr/bin/env bash
# Builds the embedded demo as a no_std staticlib for each role (client, server, both), runs
# each build's exported `nbd_demo_run()` from a C `main`, and reports sizes:
#
#  - `size_of` of the machines (from the host test `sizes`);
#  - the code size per role: the staticlib is built with the release profile of this crate
#    (opt-level "z", fat LTO, one codegen unit, panic = abort), then linked with
#    `ld -e nbd_demo_run --gc-sections`, so only what the exported function reaches is
#    kept, as in a firmware link; `size -A` reads `.text` and `.rodata` of the result.
#    memcpy/memset/memmove/bcmp are left unresolved (the platform provides them).
#
# The numbers are for the host target (x86_64): no embedded target is installed here.
# Thumb code is typically smaller.
#
# Usage: ci/embedded-demo/measure.sh     (CARGO_TARGET_DIR is honoured)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
target=${CARGO_TARGET_DIR:-$PWD/target}/embedded-demo-measure
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cargo test --quiet --locked --target-dir "$target" sizes -- --nocapture | grep '^size_of'

cat >"$work/main.c" <<'C'
#include <stdint.h>
uint32_t nbd_demo_run(void);
int main(void) { return (int)nbd_demo_run(); }
C

section() { size -A "$1" | awk -v s="$2" '$1 == s { print $2 }'; }

printf '\n%-14s %8s %8s   %s\n' roles .text .rodata 'nbd_demo_run() from C'
for roles in client server client,server; do
    # `cargo rustc --crate-type staticlib`: with the manifest's `rlib` beside it, cargo
    # would not apply LTO.
    cargo rustc --quiet --locked --release --lib --crate-type staticlib \
        --no-default-features --features "$roles" --target-dir "$target"
    lib="$work/lib-${roles/,/-}.a"
    cp "$target/release/libnbd_proto_embedded_demo.a" "$lib"
    ld -e nbd_demo_run --gc-sections --unresolved-symbols=ignore-all -o "$work/$roles.elf" "$lib"
    cc -o "$work/$roles-run" "$work/main.c" "$lib"
    if "$work/$roles-run"; then result="returned 0"; else result="FAILED ($?)"; fi
    printf '%-14s %8s %8s   %s\n' "$roles" "$(section "$work/$roles.elf" .text)" \
        "$(section "$work/$roles.elf" .rodata)" "$result"
    [ "$result" = "returned 0" ]
done
