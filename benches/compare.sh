#!/usr/bin/env bash
# Our example NBD server and client against the NBD peers installed on this machine.
#
#   benches/compare.sh            servers, clients and sparse sections (default)
#   benches/compare.sh scaling    cost vs requests in flight, request size, connections, export size
#   benches/compare.sh micro      the criterion benches (benches/codecs.rs, benches/machines.rs)
#                                 as ratios to memcpy
#   benches/compare.sh ceilings   memcpy and raw Unix/TCP socket streams only
#
# Run from anywhere; needs the peers (apt-get install qemu-utils nbdkit libnbd-bin nbd-server
# fio) and /usr/bin/python3. A missing peer is skipped with a note. Every comparison is
# measured in the same run, in alternation (round-robin over servers or clients within each
# repetition, the starting one rotating), and reported as medians and ratios: the machine has
# 2 vCPUs shared by client and server, and other work may be running (the load average is
# printed with every table).
#
# Environment:
#   REPS=5            repetitions of every sequential cell (fio: FIO_REPS, default min(REPS,3))
#   QUICK=1           fewer cells and repetitions (REPS=3, FIO_REPS=2, FIO_RUNTIME=2)
#   TRANSPORTS=both   unix | tcp | both
#   ONLY=             servers | clients | sparse (default: all three)
#   FIO_RUNTIME=3     seconds per fio run (plus 1 s ramp)
#   OUT=/tmp/nbd-compare-DATE   where results.jsonl and report.md are kept
#   MULTI_CONN=2      connections for our client's multi-connection copy (nbdcopy's default
#                     here is min(4, nproc) = 2 on this machine)
#   CARGO_TARGET_DIR  honoured when building and finding our examples
#
# Nothing is left behind: servers are started with pid files and stopped by pid on exit
# (trap), and the RAM files in /dev/shm are removed.

set -uo pipefail

MODE=${1:-compare}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
    REPS=${REPS:-3}
    FIO_REPS=${FIO_REPS:-2}
    FIO_RUNTIME=${FIO_RUNTIME:-2}
else
    REPS=${REPS:-5}
    FIO_REPS=${FIO_REPS:-$((REPS < 3 ? REPS : 3))}
    FIO_RUNTIME=${FIO_RUNTIME:-3}
fi
TRANSPORTS=${TRANSPORTS:-both}
ONLY=${ONLY:-}
MULTI_CONN=${MULTI_CONN:-2}
case $TRANSPORTS in
    both) TRANSPORT_LIST=(unix tcp) ;;
    unix | tcp) TRANSPORT_LIST=("$TRANSPORTS") ;;
    *) echo "TRANSPORTS must be unix, tcp or both" >&2; exit 2 ;;
esac

PY=/usr/bin/python3
HELP="$ROOT/benches/compare.py"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OURS_SRV=$TARGET/release/examples/nbd-server
OURS_CLI=$TARGET/release/examples/nbd-client
OUT=${OUT:-/tmp/nbd-compare-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
RES=$OUT/results.jsonl
RUN=$(mktemp -d /tmp/nbd-compare-run.XXXXXX)
SHM=$(mktemp -d /dev/shm/nbd-compare.XXXXXX)
SRC=$SHM/src.raw
START=$SECONDS

# Everything printed also goes to $OUT/report.md.
exec > >(tee -a "$OUT/report.md") 2>&1

# ---------------------------------------------------------------- servers

declare -A URI PIDF KIND STARTCMD
NAMES=()
PORT=${PORT_BASE:-$((20000 + RANDOM % 30000))}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

next_port() {
    PORT=$((PORT + 1))
    while ! port_free "$PORT"; do PORT=$((PORT + 1)); done
}

wait_ready() { # NAME TRANSPORT ADDR
    local i
    for i in $(seq 1 300); do
        if [ -s "${PIDF[$1]}" ]; then
            if [ "$2" = unix ] && [ -S "$3" ]; then return 0; fi
            if [ "$2" = tcp ] && ! port_free "$3"; then return 0; fi
        fi
        sleep 0.1
    done
    echo "server $1 did not start" >&2
    return 1
}

# start NAME KIND TRANSPORT [SIZE] [FILE]: starts a server; sets URI[NAME] and PIDF[NAME].
start() {
    local name=$1 kind=$2 tr=$3 size=${4:-1G} file=${5:-}
    local sock=$RUN/$name.sock pidf=$RUN/$name.pid export="" addr
    local -a cmd
    if [ "$tr" = tcp ]; then next_port; addr=$PORT; else addr=$sock; fi
    case $kind in
        ours)
            cmd=("$OURS_SRV" --memory "$size" --pid-file "$pidf")
            if [ "$tr" = unix ]; then cmd+=(--unix "$sock"); else cmd+=(--listen "127.0.0.1:$addr"); fi
            "${cmd[@]}" > "$RUN/$name.log" 2>&1 &
            ;;
        nbdkit)
            cmd=(nbdkit -P "$pidf")
            if [ "$tr" = unix ]; then cmd+=(-U "$sock"); else cmd+=(-i 127.0.0.1 -p "$addr"); fi
            cmd+=(memory "$size")
            "${cmd[@]}" > "$RUN/$name.log" 2>&1
            ;;
        qemu)
            cmd=(qemu-nbd --fork --pid-file="$pidf" -t -e 8 -f raw)
            if [ "$tr" = unix ]; then cmd+=(-k "$sock"); else cmd+=(-b 127.0.0.1 -p "$addr"); fi
            cmd+=("$file")
            "${cmd[@]}" > "$RUN/$name.log" 2>&1
            ;;
        nbdsrv)
            export=disk
            {
                echo "[generic]"
                if [ "$tr" = unix ]; then echo "    unixsock = $sock"; else
                    echo "    listenaddr = 127.0.0.1"
                    echo "    port = $addr"
                fi
                echo "    allowlist = true"
                echo "[disk]"
                echo "    exportname = $file"
                echo "    flush = true"
                echo "    fua = true"
                echo "    trim = true"
            } > "$RUN/$name.conf"
            cmd=(nbd-server -C "$RUN/$name.conf" -p "$pidf")
            "${cmd[@]}" > "$RUN/$name.log" 2>&1
            ;;
    esac
    PIDF[$name]=$pidf
    KIND[$name]=$kind
    NAMES+=("$name")
    STARTCMD[$name]="${cmd[*]}"
    if [ "$tr" = unix ]; then URI[$name]="nbd+unix:///$export?socket=$sock"; else URI[$name]="nbd://127.0.0.1:$addr/$export"; fi
    wait_ready "$name" "$tr" "$addr" || { cat "$RUN/$name.log" >&2; return 1; }
}

stop() { # NAME
    local name=$1 pidf=${PIDF[$1]:-} pid i
    [ -n "$pidf" ] && [ -s "$pidf" ] || { unset "PIDF[$name]"; return 0; }
    pid=$(cat "$pidf")
    kill "$pid" 2> /dev/null
    for i in $(seq 1 50); do
        # Daemons are re-parented to PID 1, which reaps them late: a zombie is gone.
        case $(ps -o stat= -p "$pid" 2> /dev/null) in "" | Z*) break ;; esac
        sleep 0.1
    done
    case $(ps -o stat= -p "$pid" 2> /dev/null) in "" | Z*) ;; *) kill -9 "$pid" 2> /dev/null ;; esac
    wait "$pid" 2> /dev/null # our own server is our child
    rm -f "$pidf" "$RUN/$name.sock"
    unset "PIDF[$name]"
}

stop_all() {
    local n
    for n in "${!PIDF[@]}"; do stop "$n"; done
}

cleanup() {
    stop_all
    rm -rf "$SHM" "$RUN"
    printf '\ncompare.sh %s: total %dm%02ds; results in %s\n' "$MODE" $(((SECONDS - START) / 60)) $(((SECONDS - START) % 60)) "$OUT"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

spid() { cat "${PIDF[$1]}"; }

# measure LABEL=VALUE... -- CMD...: one timed run appended to $RES.
measure() { "$PY" "$HELP" run "$RES" "$@"; }

# ---------------------------------------------------------------- helpers

have() { command -v "$1" > /dev/null 2>&1; }

load_note() { echo "load: $(cut -d' ' -f1-3 /proc/loadavg) ($(uptime | sed 's/.*up/up/'))"; }

build() {
    echo "== building our examples (release)"
    cargo build --release --example nbd-server --example nbd-client 2>&1 | tail -1
    [ -x "$OURS_SRV" ] && [ -x "$OURS_CLI" ] || { echo "build failed" >&2; exit 1; }
}

make_source() {
    echo "== creating a 1 GiB random source in $SRC"
    head -c 1G /dev/urandom > "$SRC"
}

# populate NAME: writes the source into a memory export (the first write allocates).
populate() { nbdcopy "$SRC" "${URI[$1]}" && nbdcopy "${URI[$1]}" null:; }

# sparse_fill NAME SIZE_BYTES: 16 x 1 MiB of data spread evenly over the export.
sparse_fill() {
    local name=$1 size=$2 i
    [ -s "$SHM/chunk" ] || head -c 1M "$SRC" > "$SHM/chunk"
    for i in $(seq 0 15); do
        "$OURS_CLI" write "${URI[$name]}" $((i * (size / 16))) < "$SHM/chunk" || return 1
    done
}

# expand TEMPLATE NAME: the command with @URI@, @DST@, @SRC@, @FIO@ replaced.
expand() {
    local t=$1
    t=${t//@URI@/${URI[$2]}}
    t=${t//@DST@/${URI[${3:-none}]:-}}
    t=${t//@SRC@/$SRC}
    t=${t//@FIO@/$RUN/fio.json}
    t=${t//@OURS@/$OURS_CLI}
    t=${t//@OUTF@/$SHM/out.raw}
    printf '%s' "$t"
}

ceilings() {
    echo "== raw ceilings (memcpy, Unix and TCP socket streams; python3, 1 GiB each)"
    "$PY" "$HELP" ceilings "$RES" "${CEIL_REPS:-3}"
    "$PY" "$HELP" table "$RES" ceilings
}

header() {
    echo "# compare.sh $MODE — $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "REPS=$REPS FIO_REPS=$FIO_REPS FIO_RUNTIME=$FIO_RUNTIME QUICK=$QUICK TRANSPORTS=$TRANSPORTS ONLY=${ONLY:-all} MULTI_CONN=$MULTI_CONN"
    echo "machine: $(nproc) vCPUs, $(uname -r); $(load_note)"
    echo "peers: $(nbdkit --version 2> /dev/null | head -1); $(qemu-nbd --version 2> /dev/null | head -1); $(nbd-server -V 2>&1 | head -1); $(nbdcopy --version 2> /dev/null | head -1); $(fio --version 2> /dev/null)"
    echo "ours: $(git -C "$ROOT" describe --always --dirty 2> /dev/null) ($OURS_SRV, $OURS_CLI)"
    echo
}

print_cmds() { # TITLE TEMPLATES...
    echo "Commands ($1; @URI@ is the server's URI, @DST@ a second export of the same kind, @SRC@ $SRC, @OUTF@ a fresh file in $SHM):"
    shift
    local t
    for t in "$@"; do echo "    ${t#*|}" | sed "s#@OURS@#$OURS_CLI#g; s#|#   vs   #g"; done
    echo
}

print_servers() {
    local n
    echo "Servers started:"
    for n in "$@"; do echo "    $n: ${STARTCMD[$n]}   -> ${URI[$n]}"; done
    echo
}

# ---------------------------------------------------------------- sections

FIO="fio --name=c --ioengine=nbd --uri=@URI@ --bs=4k --runtime=$FIO_RUNTIME --ramp_time=1 --time_based --norandommap --randrepeat=0 --output-format=json --output=@FIO@"

section_servers() {
    local -a cells=(
        "write, nbdcopy -C 1|nbdcopy -C 1 @SRC@ @URI@"
        "read, nbdcopy -C 1|nbdcopy -C 1 @URI@ null:"
        "read, nbdcopy (default multi-conn)|nbdcopy @URI@ null:"
        "write, nbdcopy (default multi-conn)|nbdcopy @SRC@ @URI@"
        "read, qemu-img convert → null-co|qemu-img convert -n -f raw --target-image-opts @URI@ driver=null-co,size=1073741824"
    )
    local -a fio_cells=(
        "fio 4K randread QD1|$FIO --rw=randread --iodepth=1"
        "fio 4K randread QD32|$FIO --rw=randread --iodepth=32"
        "fio 4K randwrite QD1|$FIO --rw=randwrite --iodepth=1"
        "fio 4K randwrite QD32|$FIO --rw=randwrite --iodepth=32"
    )
    if [ "$QUICK" = 1 ]; then
        cells=("${cells[0]}" "${cells[1]}" "${cells[2]}")
        fio_cells=("${fio_cells[0]}" "${fio_cells[1]}" "${fio_cells[3]}")
    fi
    have fio || fio_cells=()
    echo "## Servers, same clients"
    echo
    print_cmds "servers section" "${cells[@]}" "${fio_cells[@]}"
    [ -f "$SHM/qemu.raw" ] || cp "$SRC" "$SHM/qemu.raw"
    [ -f "$SHM/nbdsrv.raw" ] || cp "$SRC" "$SHM/nbdsrv.raw"
    local tr rep i s cell t
    for tr in "${TRANSPORT_LIST[@]}"; do
        local -a servers=()
        start "ours-$tr" ours "$tr" 1G && servers+=("ours-$tr")
        have nbdkit && start "nbdkit-$tr" nbdkit "$tr" 1G && servers+=("nbdkit-$tr")
        have qemu-nbd && start "qemu-$tr" qemu "$tr" 1G "$SHM/qemu.raw" && servers+=("qemu-$tr")
        have nbd-server && start "nbdsrv-$tr" nbdsrv "$tr" 1G "$SHM/nbdsrv.raw" && servers+=("nbdsrv-$tr")
        print_servers "${servers[@]}"
        for s in "${servers[@]}"; do
            case ${KIND[$s]} in ours | nbdkit) populate "$s" || echo "populating $s failed" ;; esac
        done
        for rep in $(seq 1 "$REPS"); do
            echo "[$tr] repetition $rep/$REPS ($(load_note))"
            for cell in "${cells[@]}" "${fio_cells[@]}"; do
                case $cell in fio*) [ "$rep" -le "$FIO_REPS" ] || continue ;; esac
                local n=${#servers[@]}
                for i in $(seq 0 $((n - 1))); do
                    s=${servers[$(((i + rep) % n))]}
                    read -ra t <<< "$(expand "${cell#*|}" "$s")"
                    local -a extra=()
                    case $cell in fio*) extra=(fio="$RUN/fio.json") ;; esac
                    measure section=servers transport="$tr" cell="${cell%%|*}" server="${KIND[$s]}" \
                        server_pid="$(spid "$s")" rep="$rep" gib=1 "${extra[@]}" -- "${t[@]}"
                done
            done
        done
        for s in "${servers[@]}"; do stop "$s"; done
    done
    echo
    "$PY" "$HELP" table "$RES" servers
}

section_clients() {
    local ours="@OURS@ copy --requests 64 --request-size 262144"
    local nc="nbdcopy -C 1 --request-size=262144 --requests=64"
    local -a cells=(
        "read → /dev/null|$ours @URI@ -|$nc @URI@ null:"
        "write from /dev/shm|$ours @SRC@ @URI@|$nc @SRC@ @URI@"
        "nbd → nbd, 1 connection|$ours @URI@ @DST@|$nc @URI@ @DST@"
        "nbd → nbd, multi-conn|$ours --connections $MULTI_CONN @URI@ @DST@|nbdcopy @URI@ @DST@"
    )
    [ "$QUICK" = 1 ] && cells=("${cells[0]}" "${cells[1]}" "${cells[3]}")
    echo "## Clients, same servers"
    echo
    print_cmds "clients section" "${cells[@]}"
    local tr rep i j s cell
    for tr in "${TRANSPORT_LIST[@]}"; do
        local -a servers=()
        start "ours-$tr" ours "$tr" 1G && start "ours-dst-$tr" ours "$tr" 1G && servers+=("ours-$tr")
        have nbdkit && start "nbdkit-$tr" nbdkit "$tr" 1G && start "nbdkit-dst-$tr" nbdkit "$tr" 1G && servers+=("nbdkit-$tr")
        print_servers "${servers[@]}" "${servers[@]/%-$tr/-dst-$tr}"
        for s in "${servers[@]}"; do
            populate "$s"
            populate "${s/-$tr/-dst-$tr}"
        done
        for rep in $(seq 1 "$REPS"); do
            echo "[$tr] repetition $rep/$REPS ($(load_note))"
            for cell in "${cells[@]}"; do
                local rest=${cell#*|}
                local -a tmpl=("${rest%%|*}" "${rest#*|}") who=(ours nbdcopy)
                for i in 0 1; do
                    s=${servers[$(((i + rep) % ${#servers[@]}))]}
                    for j in 0 1; do
                        local k=$(((j + rep + i) % 2)) t
                        read -ra t <<< "$(expand "${tmpl[$k]}" "$s" "${s/-$tr/-dst-$tr}")"
                        measure section=clients transport="$tr" cell="${cell%%|*}" server="${KIND[$s]}" \
                            client="${who[$k]}" server_pid="$(spid "$s")" rep="$rep" gib=1 -- "${t[@]}"
                    done
                done
            done
        done
        for s in "${servers[@]}"; do stop "$s"; stop "${s/-$tr/-dst-$tr}"; done
    done
    echo
    "$PY" "$HELP" table "$RES" clients
}

section_sparse() {
    local -a clients=(
        "ours → stdout (/dev/null)|@OURS@ copy @URI@ -"
        "ours → /dev/shm file|@OURS@ copy @URI@ @OUTF@"
        "nbdcopy → null:|nbdcopy -C 1 @URI@ null:"
    )
    echo "## Sparse awareness"
    echo
    print_cmds "sparse section" "${clients[@]}"
    local tr rep kind fill c s t
    for tr in "${TRANSPORT_LIST[@]}"; do
        local -a kinds=(ours)
        have nbdkit && kinds+=(nbdkit)
        for kind in "${kinds[@]}"; do
            start "$kind-full-$tr" "$kind" "$tr" 1G && populate "$kind-full-$tr"
            start "$kind-sparse-$tr" "$kind" "$tr" 1G && sparse_fill "$kind-sparse-$tr" $((1 << 30))
        done
        print_servers "${kinds[@]/%/-full-$tr}" "${kinds[@]/%/-sparse-$tr}"
        for rep in $(seq 1 "$REPS"); do
            echo "[$tr] repetition $rep/$REPS ($(load_note))"
            for kind in "${kinds[@]}"; do
                for c in "${clients[@]}"; do
                    for fill in full sparse; do
                        s=$kind-$fill-$tr
                        read -ra t <<< "$(expand "${c#*|}" "$s")"
                        measure section=sparse transport="$tr" cell="$fill" server="$kind" \
                            client="${c%%|*}" server_pid="$(spid "$s")" rep="$rep" gib=1 -- "${t[@]}"
                        rm -f "$SHM/out.raw"
                    done
                done
            done
        done
        for kind in "${kinds[@]}"; do stop "$kind-full-$tr"; stop "$kind-sparse-$tr"; done
    done
    echo
    "$PY" "$HELP" table "$RES" sparse
}

# ---------------------------------------------------------------- scaling

scale_run() { # AXIS X SERVER-NAME CLIENT GIB|s TEMPLATE [DST-NAME]
    local t
    read -ra t <<< "$(expand "$6" "$3" "${7:-none}")"
    local unit=()
    [ "$5" = s ] && unit=(unit=s)
    measure section=scaling axis="$1" x="$2" server="${KIND[$3]}" client="$4" \
        server_pid="$(spid "$3")" gib=1 "${unit[@]}" -- "${t[@]}"
}

section_scaling() {
    local tr=${SCALING_TRANSPORT:-unix} reps=${SCALING_REPS:-3} rep x s
    local -a kinds=(ours)
    have nbdkit && kinds+=(nbdkit)
    echo "## Scaling ($tr, $reps repetitions, medians)"
    echo
    echo "Axis 1, requests in flight: @OURS@ copy --requests N @URI@ -   vs   nbdcopy -C 1 --requests=N @URI@ null:" | sed "s#@OURS@#$OURS_CLI#"
    echo "  (our client clamps --requests to 64: BlockingClient<_, 64>; values above 64 run at 64)"
    echo "Axis 2, request size S (requests in flight Q = min(64, 256 MiB / S)): @OURS@ copy --request-size S --requests Q @URI@ -   vs   nbdcopy -C 1 --request-size=S --requests=Q --queue-size=Q*S @URI@ null:"
    echo "Axis 3, connections N (nbd → nbd, a second server of the same kind): @OURS@ copy --connections N @URI@ @DST@   vs   nbdcopy -C N @URI@ @DST@"
    echo "Axis 4, export size (sparse, 16 x 1 MiB of data): @OURS@ map @URI@, nbdinfo --map @URI@, @OURS@ copy @URI@ @OUTF@ (a fresh file in /dev/shm), nbdcopy -C 1 @URI@ null:"
    echo
    for s in "${kinds[@]}"; do
        start "$s-$tr" "$s" "$tr" 1G && populate "$s-$tr"
        start "$s-dst-$tr" "$s" "$tr" 1G && populate "$s-dst-$tr"
    done
    print_servers "${kinds[@]/%/-$tr}" "${kinds[@]/%/-dst-$tr}"
    local -a reqs=(1 2 4 8 16 32 64 128 256) sizes=(4K 16K 64K 256K 1M 4M 16M 32M) conns=(1 2 4 8)
    [ "$QUICK" = 1 ] && { reqs=(1 4 16 64 256); sizes=(4K 64K 1M 32M); conns=(1 2 4); }
    for rep in $(seq 1 "$reps"); do
        echo "repetition $rep/$reps: requests in flight ($(load_note))"
        for x in "${reqs[@]}"; do
            for s in "${kinds[@]}"; do
                scale_run "requests in flight (256 KiB, 1 connection, read → null), GiB/s" "$x" "$s-$tr" ours GIB "@OURS@ copy --requests $x @URI@ -"
                scale_run "requests in flight (256 KiB, 1 connection, read → null), GiB/s" "$x" "$s-$tr" nbdcopy GIB "nbdcopy -C 1 --requests=$x @URI@ null:"
            done
        done
        echo "repetition $rep/$reps: request size ($(load_note))"
        for x in "${sizes[@]}"; do
            local b q
            b=$(numfmt --from=iec "$x")
            q=$(((256 << 20) / b)); [ $q -gt 64 ] && q=64; [ $q -lt 1 ] && q=1
            for s in "${kinds[@]}"; do
                scale_run "request size (Q = min(64, 256 MiB / size) in flight, read → null), GiB/s" "$x (Q=$q)" "$s-$tr" ours GIB "@OURS@ copy --request-size $b --requests $q @URI@ -"
                scale_run "request size (Q = min(64, 256 MiB / size) in flight, read → null), GiB/s" "$x (Q=$q)" "$s-$tr" nbdcopy GIB "nbdcopy -C 1 --request-size=$b --requests=$q --queue-size=$((q * b)) @URI@ null:"
            done
        done
        echo "repetition $rep/$reps: connections ($(load_note))"
        for x in "${conns[@]}"; do
            for s in "${kinds[@]}"; do
                scale_run "connections (nbd → nbd copy), GiB/s" "$x" "$s-$tr" ours GIB "@OURS@ copy --connections $x @URI@ @DST@" "$s-dst-$tr"
                scale_run "connections (nbd → nbd copy), GiB/s" "$x" "$s-$tr" nbdcopy GIB "nbdcopy -C $x @URI@ @DST@" "$s-dst-$tr"
            done
        done
    done
    for s in "${kinds[@]}"; do stop "$s-$tr"; stop "$s-dst-$tr"; done
    local -a esizes=(1G 16G 256G 1T)
    [ "$QUICK" = 1 ] && esizes=(1G 1T)
    for x in "${esizes[@]}"; do
        local bytes
        bytes=$(numfmt --from=iec "$x")
        for s in "${kinds[@]}"; do
            start "$s-sz-$tr" "$s" "$tr" "$x" && sparse_fill "$s-sz-$tr" "$bytes"
        done
        echo "export size $x ($(load_note))"
        for rep in $(seq 1 "$reps"); do
            for s in "${kinds[@]}"; do
                scale_run "export size: block status map (sparse, 16 MiB of data), seconds" "$x" "$s-sz-$tr" "ours map" s "@OURS@ map @URI@"
                scale_run "export size: block status map (sparse, 16 MiB of data), seconds" "$x" "$s-sz-$tr" "nbdinfo --map" s "nbdinfo --map @URI@"
                # To a fresh sparse file: to stdout, our client writes every zero (see the
                # sparse section), which costs O(export size) in the client.
                scale_run "export size: copy (sparse, 16 MiB of data), seconds" "$x" "$s-sz-$tr" "ours copy → /dev/shm file" s "@OURS@ copy @URI@ @OUTF@"
                rm -f "$SHM/out.raw"
                scale_run "export size: copy (sparse, 16 MiB of data), seconds" "$x" "$s-sz-$tr" "nbdcopy → null:" s "nbdcopy -C 1 @URI@ null:"
            done
        done
        for s in "${kinds[@]}"; do stop "$s-sz-$tr"; done
    done
    echo
    "$PY" "$HELP" table "$RES" scaling
}

# ---------------------------------------------------------------- main

case $MODE in
    compare)
        build
        header
        make_source
        ceilings
        case $ONLY in
            "") section_servers; section_clients; section_sparse ;;
            servers) section_servers ;;
            clients) section_clients ;;
            sparse) section_sparse ;;
            *) echo "ONLY must be servers, clients or sparse" >&2; exit 2 ;;
        esac
        ;;
    scaling)
        build
        header
        make_source
        ceilings
        section_scaling
        ;;
    ceilings)
        header
        ceilings
        ;;
    micro)
        header
        echo "== criterion: cargo bench --bench codecs --bench machines"
        cargo bench --bench codecs --bench machines > "$OUT/criterion.txt" 2>&1 || { tail -20 "$OUT/criterion.txt"; exit 1; }
        load_note
        "$PY" "$HELP" criterion "$TARGET"
        ;;
    *)
        echo "usage: benches/compare.sh [compare|scaling|micro|ceilings]" >&2
        exit 2
        ;;
esac
