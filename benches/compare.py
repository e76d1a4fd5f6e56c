#!/usr/bin/python3
"""Helper of benches/compare.sh: runs and measures one command, measures the raw ceilings of
this machine, and prints the tables. System python3 only, standard library only.

  compare.py run OUT.jsonl KEY=VALUE... -- CMD ARGS...
      Runs CMD once and appends one JSON line to OUT.jsonl: the KEY=VALUE labels, wall
      seconds, the client's user+sys CPU seconds (wait4 rusage, so children included), the
      server's CPU seconds (utime+stime+cutime+cstime delta of /proc/PID/stat; label
      server_pid=PID), the load average, the exit code, and for fio (label fio=FILE) the
      IOPS, latency percentiles and fio's own CPU from its JSON output. Label stdout=FILE
      sends the command's standard output there (default /dev/null).
  compare.py ceilings OUT.jsonl REPS
      memcpy of 1 GiB, and 1 GiB through a Unix stream socket and TCP loopback (one sender
      process, one receiver; 256 KiB sendall/recv_into).
  compare.py table OUT.jsonl SECTION
      Markdown tables of medians for one section (servers, clients, sparse, scaling, ceilings).
  compare.py criterion TARGET_DIR
      Criterion results (median time, throughput) with the ratio to the memcpy of each group.
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

GIB = 1 << 30
TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid):
    """utime+stime+cutime+cstime of a process, in seconds (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # rest[0] is field 3 (state); utime..cstime are fields 14..17.
    return sum(int(x) for x in rest[11:15]) / TICK


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return f.read().split()
    except OSError:
        return []


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def cmd_run(argv):
    sep = argv.index("--")
    out, labels, cmd = argv[0], argv[1:sep], argv[sep + 1:]
    rec = dict(kv.split("=", 1) for kv in labels)
    spid = rec.get("server_pid")
    c0 = proc_cpu(spid) if spid else None
    stdout = open(rec.get("stdout", "/dev/null"), "wb")
    load = loadavg()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE)
    # A hung run is killed (and fails) rather than stalling the whole comparison.
    killer = threading.Timer(float(rec.get("timeout", 300)), p.kill)
    killer.start()
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    killer.cancel()
    p.returncode = os.waitstatus_to_exitcode(status)
    stdout.close()
    if spid:
        # A forking server (nbd-server) accounts a connection's CPU when it reaps the child.
        deadline = time.time() + 3
        while children(spid) and time.time() < deadline:
            time.sleep(0.02)
    c1 = proc_cpu(spid) if spid else None
    rec.update(
        wall=wall,
        client_cpu=ru.ru_utime + ru.ru_stime,
        client_user=ru.ru_utime,
        client_sys=ru.ru_stime,
        server_cpu=(c1 - c0) if c0 is not None and c1 is not None else None,
        load=(load + loadavg()) / 2,
        rc=p.returncode,
    )
    if p.returncode != 0:
        rec["stderr"] = err.decode(errors="replace")[-500:]
        sys.stderr.write(f"FAILED ({p.returncode}): {' '.join(cmd)}\n{rec['stderr']}\n")
    fio = rec.get("fio")
    if fio and p.returncode == 0:
        with open(fio) as f:
            text = f.read()
        j = json.loads(text[text.index("{"):])["jobs"][0]
        side = j["read"] if j["read"]["total_ios"] > 0 else j["write"]
        pct = side["clat_ns"].get("percentile", {})
        rec.update(
            iops=side["iops"],
            p50_us=pct.get("50.000000", 0) / 1000,
            p99_us=pct.get("99.000000", 0) / 1000,
            fio_cpu_pct=j["usr_cpu"] + j["sys_cpu"],
        )
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return 0


# ---------------------------------------------------------------- ceilings


def sock_once(kind, chunk=256 << 10, total=GIB):
    if kind == "unix":
        path = f"/tmp/nbd-compare-sock.{os.getpid()}"
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        ls = socket.socket(socket.AF_UNIX)
        ls.bind(path)
        addr = path
    else:
        ls = socket.socket(socket.AF_INET)
        ls.bind(("127.0.0.1", 0))
        addr = ls.getsockname()
    ls.listen(1)
    pid = os.fork()
    if pid == 0:
        c = socket.socket(ls.family)
        c.connect(addr)
        buf = b"\xa5" * chunk
        for _ in range(total // chunk):
            c.sendall(buf)
        c.close()
        os._exit(0)
    s, _ = ls.accept()
    buf = bytearray(chunk)
    mv = memoryview(buf)
    got = 0
    r0 = os.times()
    t0 = time.perf_counter()
    while got < total:
        n = s.recv_into(mv)
        if not n:
            break
        got += n
    t = time.perf_counter() - t0
    os.waitpid(pid, 0)
    r1 = os.times()
    s.close()
    ls.close()
    if kind == "unix":
        os.unlink(path)
    cpu = sum(getattr(r1, a) - getattr(r0, a) for a in ("user", "system", "children_user", "children_system"))
    return t, cpu


def cmd_ceilings(argv):
    out, reps = argv[0], int(argv[1])
    recs = []
    a = bytearray(b"\x5a") * GIB
    b = bytearray(GIB)
    b[:] = a
    for _ in range(reps):
        t0 = time.perf_counter()
        b[:] = a
        recs.append(dict(section="ceilings", cell="memcpy 1 GiB (1 thread)", wall=time.perf_counter() - t0))
    del a, b
    for _ in range(reps):
        for kind in ("unix", "tcp"):
            t, cpu = sock_once(kind)
            recs.append(dict(section="ceilings", cell=f"{kind} socket stream, 256 KiB", wall=t, client_cpu=cpu))
    with open(out, "a") as f:
        for r in recs:
            r["load"] = loadavg()
            f.write(json.dumps(r) + "\n")
    return 0


# ---------------------------------------------------------------- tables


def load(path, section):
    rows = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("section") == section:
                rows.append(r)
    return rows


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def groups(rows, keys):
    out = {}
    for r in rows:
        if r.get("rc", 0) != 0:
            continue
        out.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return out


def seq_stats(rs):
    """Median throughput and CPU per GiB of 1 GiB runs."""
    gib = float(rs[0].get("gib", 1))
    wall = med(r["wall"] for r in rs)
    return dict(
        n=len(rs),
        gibs=gib / wall,
        wall=wall,
        minmax=(min(r["wall"] for r in rs), max(r["wall"] for r in rs)),
        ccpu=med(r.get("client_cpu") for r in rs) / gib if rs[0].get("client_cpu") is not None else None,
        scpu=med(r.get("server_cpu") for r in rs) / gib if rs[0].get("server_cpu") is not None else None,
        load=med(r.get("load") for r in rs),
    )


def table_servers(rows):
    print("Servers, same clients. Throughput = median over runs; CPU = median seconds per GiB")
    print("(client: user+sys of the client process tree; server: /proc/PID/stat delta).")
    print("Ratio = ours / best peer in the same cell and transport (higher is better).\n")
    g = groups(rows, ("transport", "cell", "server"))
    cells = []
    for (tr, cell, _), _rs in g.items():
        if (tr, cell) not in cells:
            cells.append((tr, cell))
    for tr, cell in cells:
        servers = [k[2] for k in g if k[0] == tr and k[1] == cell]
        fio = "fio" in g[(tr, cell, servers[0])][0]
        print(f"#### {cell} — {tr}\n")
        if fio:
            print("| server | median IOPS | min–max IOPS | p50 µs | p99 µs | fio CPU % | server CPU % of 1 core | server CPU µs/IO | runs | load |")
            print("|---|---|---|---|---|---|---|---|---|---|")
        else:
            print("| server | median GiB/s | median s | min–max s | client CPU s/GiB | server CPU s/GiB | runs | load |")
            print("|---|---|---|---|---|---|---|---|")
        score = {}
        for s in servers:
            rs = g[(tr, cell, s)]
            if fio:
                iops = med(r["iops"] for r in rs)
                score[s] = iops
                scpu = med(r["server_cpu"] / r["wall"] * 100 for r in rs if r.get("server_cpu") is not None)
                per_io = med(r["server_cpu"] / (r["iops"] * r["wall"]) * 1e6 for r in rs if r.get("server_cpu") is not None and r["iops"])
                print(f"| {s} | **{iops:.0f}** | {min(r['iops'] for r in rs):.0f}–{max(r['iops'] for r in rs):.0f} | "
                      f"{fmt(med(r['p50_us'] for r in rs), '.1f')} | {fmt(med(r['p99_us'] for r in rs), '.1f')} | "
                      f"{fmt(med(r['fio_cpu_pct'] for r in rs), '.0f')} | {fmt(scpu, '.0f')} | {fmt(per_io, '.1f')} | {len(rs)} | {fmt(med(r['load'] for r in rs), '.1f')} |")
            else:
                st = seq_stats(rs)
                score[s] = st["gibs"]
                print(f"| {s} | **{st['gibs']:.2f}** | {st['wall']:.3f} | {st['minmax'][0]:.3f}–{st['minmax'][1]:.3f} | "
                      f"{fmt(st['ccpu'])} | {fmt(st['scpu'])} | {st['n']} | {fmt(st['load'], '.1f')} |")
        peers = {k: v for k, v in score.items() if k != "ours" and v}
        if "ours" in score and peers:
            best = max(peers, key=peers.get)
            print(f"\n**ours / best peer ({best}) = {score['ours'] / peers[best]:.2f}x**\n")
        else:
            print()


def table_clients(rows):
    print("Clients, same servers. Ratio = ours / nbdcopy for the same server, cell and transport;")
    print("CPU columns are medians in seconds per GiB.\n")
    g = groups(rows, ("transport", "server", "cell", "client"))
    keys = []
    for (tr, srv, cell, _c) in g:
        if (tr, srv, cell) not in keys:
            keys.append((tr, srv, cell))
    print("| transport | server | cell | client | median GiB/s | min–max s | client CPU s/GiB | server CPU s/GiB | runs | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ratios = []
    for tr, srv, cell in keys:
        st = {}
        for cl in ("ours", "nbdcopy"):
            rs = g.get((tr, srv, cell, cl))
            if not rs:
                continue
            st[cl] = s = seq_stats(rs)
            print(f"| {tr} | {srv} | {cell} | {rs[0].get('label', cl)} | **{s['gibs']:.2f}** | {s['minmax'][0]:.3f}–{s['minmax'][1]:.3f} | "
                  f"{fmt(s['ccpu'])} | {fmt(s['scpu'])} | {s['n']} | {fmt(s['load'], '.1f')} |")
        if len(st) == 2:
            ratios.append((tr, srv, cell, st["ours"]["gibs"] / st["nbdcopy"]["gibs"],
                           (st["ours"]["ccpu"] or 0) / (st["nbdcopy"]["ccpu"] or 1)))
    print("\n| transport | server | cell | throughput ours/nbdcopy | client CPU/GiB ours/nbdcopy |")
    print("|---|---|---|---|---|")
    for tr, srv, cell, r, c in ratios:
        print(f"| {tr} | {srv} | {cell} | **{r:.2f}x** | {c:.2f}x |")
    print()


def table_sparse(rows):
    print("Sparse awareness: a 1 GiB export holding 16 MiB of data vs the same export fully")
    print("allocated. Ratio = median time full / median time sparse (goal >= 10x for our client).\n")
    g = groups(rows, ("transport", "server", "client", "cell"))
    print("| transport | server | client | full: median s | sparse: median s | full/sparse | client CPU s (sparse) | runs |")
    print("|---|---|---|---|---|---|---|---|")
    seen = []
    for (tr, srv, cl, _cell) in g:
        if (tr, srv, cl) in seen:
            continue
        seen.append((tr, srv, cl))
        full, sparse = g.get((tr, srv, cl, "full")), g.get((tr, srv, cl, "sparse"))
        if not full or not sparse:
            continue
        f, s = med(r["wall"] for r in full), med(r["wall"] for r in sparse)
        print(f"| {tr} | {srv} | {full[0].get('label', cl)} | {f:.3f} | {s:.3f} | **{f / s:.1f}x** | "
              f"{fmt(med(r['client_cpu'] for r in sparse), '.3f')} | {len(full)}+{len(sparse)} |")
    print()


def table_scaling(rows):
    g = groups(rows, ("axis", "server", "client", "x"))
    axes = []
    for (axis, _s, _c, _x) in g:
        if axis not in axes:
            axes.append(axis)
    for axis in axes:
        print(f"#### {axis}\n")
        keys = sorted({(k[1], k[2]) for k in g if k[0] == axis})
        xs = []
        for k in g:
            if k[0] == axis and k[3] not in xs:
                xs.append(k[3])
        unit = g[next(k for k in g if k[0] == axis)][0].get("unit", "GiB/s")
        print(f"| {axis} | " + " | ".join(f"{s} ← {c}" for s, c in keys) + " |")
        print("|---|" + "---|" * len(keys))
        for x in xs:
            cells = []
            for s, c in keys:
                rs = g.get((axis, s, c, x))
                if not rs:
                    cells.append("-")
                    continue
                wall = med(r["wall"] for r in rs)
                cpu = med(r.get("client_cpu") for r in rs)
                scpu = med(r.get("server_cpu") for r in rs)
                if unit == "s":
                    cells.append(f"{wall:.3f} s (client CPU {fmt(cpu, '.2f')} s, server {fmt(scpu, '.2f')} s)")
                else:
                    gib = float(rs[0].get("gib", 1))
                    cells.append(f"**{gib / wall:.2f}** (c {fmt(cpu / gib if cpu is not None else None)} / s {fmt(scpu / gib if scpu is not None else None)} s/GiB)")
            print(f"| {x} | " + " | ".join(cells) + " |")
        print()


def table_ceilings(rows):
    g = groups(rows, ("cell",))
    print("| ceiling | median s per GiB | GiB/s | min–max s | CPU s (both ends) | runs | load |")
    print("|---|---|---|---|---|---|---|")
    for (cell,), rs in g.items():
        w = med(r["wall"] for r in rs)
        print(f"| {cell} | {w:.3f} | **{1 / w:.2f}** | {min(r['wall'] for r in rs):.3f}–{max(r['wall'] for r in rs):.3f} | "
              f"{fmt(med(r.get('client_cpu') for r in rs))} | {len(rs)} | {fmt(med(r['load'] for r in rs), '.1f')} |")
    print()


def cmd_table(argv):
    path, section = argv
    rows = load(path, section)
    if not rows:
        print(f"(no results for {section})\n")
        return 0
    {"servers": table_servers, "clients": table_clients, "sparse": table_sparse,
     "scaling": table_scaling, "ceilings": table_ceilings}[section](rows)
    return 0


# ---------------------------------------------------------------- criterion


def cmd_criterion(argv):
    root = os.path.join(argv[0], "criterion")
    rows = {}
    for group in sorted(os.listdir(root)):
        gdir = os.path.join(root, group)
        if not os.path.isdir(gdir) or group == "report":
            continue
        for bench in sorted(os.listdir(gdir)):
            new = os.path.join(gdir, bench, "new")
            try:
                meta = json.load(open(os.path.join(new, "benchmark.json")))
                est = json.load(open(os.path.join(new, "estimates.json")))
            except OSError:
                continue
            t = est["median"]["point_estimate"]  # ns per iteration
            tp = meta.get("throughput") or {}
            rows.setdefault(meta["group_id"], []).append((meta["function_id"], t, tp))
    print("| group | bench | median time | throughput | vs memcpy of the same bytes |")
    print("|---|---|---|---|---|")
    for gid, benches in rows.items():
        ref = next((t for f, t, _ in benches if f == "memcpy"), None)
        for f, t, tp in benches:
            if "Bytes" in tp:
                thr = f"{tp['Bytes'] / t * 1e9 / GIB:.2f} GiB/s"
            elif "Elements" in tp:
                thr = f"{tp['Elements'] / t * 1e9 / 1e6:.3f} M/s"
            else:
                thr = "-"
            ratio = f"{ref / t:.2f}" if ref and f != "memcpy" and "Bytes" in tp else ""
            tstr = f"{t / 1e3:.1f} µs" if t < 1e6 else f"{t / 1e6:.2f} ms"
            print(f"| {gid} | {f} | {tstr} | {thr} | {ratio} |")
    print()
    return 0


def main():
    cmd, argv = sys.argv[1], sys.argv[2:]
    return {"run": cmd_run, "ceilings": cmd_ceilings, "table": cmd_table,
            "criterion": cmd_criterion}[cmd](argv)


if __name__ == "__main__":
    sys.exit(main())
