"""One user's bounded abuse of safehookd, while other users' jobs send their records.

The attacker (uid 40001, forked children that drop to it) runs, all at once for SECONDS:
- 8 clients that pipeline records and never read a reply (each reconnects when dropped);
- 2,000 idle connections (retried every second: the uid cap holds 256 at once);
- a flood: 8 clients sending 300-byte records as fast as they can, reading the replies.
Two victim uids (40002, 40003), 4 clients each, send one record every 10 ms and time each reply.

Prints the victims' records sent and taken, their reply latency (p50/p99/max), what the attacker
got (taken, refused over the rate, dropped, refused connections), the daemon's RSS (start, max,
end) and CPU, and whether `safehook verify-log` passes. Root only (it changes uids).

    python bench/daemon_abuse.py --safehookd build/daemon/safehookd [--seconds 60]
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ATTACKER, VICTIMS = 40001, (40002, 40003)


def drop_to(uid):
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def child(uid, fn, *args):
    """fork; the child drops to UID, runs fn(*args) and writes its JSON result to a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            drop_to(uid)
            out = fn(*args)
        except BaseException as e:  # noqa: BLE001
            out = {"error": repr(e)}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    return pid, r


def collect(pid, r):
    data = b""
    while True:
        b = os.read(r, 1 << 20)
        if not b:
            break
        data += b
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data or b"{}")


def never_read(sock, until):
    dropped = sent = 0
    while time.time() < until:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.connect(sock)
        except OSError:
            time.sleep(0.2)
            continue
        s.setblocking(False)
        while time.time() < until:
            try:
                s.send(b'{"event":"noread"}')
                sent += 1
            except BlockingIOError:
                time.sleep(0.05)
            except OSError:
                dropped += 1
                break
        s.close()
    return {"sent": sent, "dropped": dropped}


def idle(sock, until, n=2000):
    held, refused_seen, best = [], 0, 0
    while time.time() < until:
        while len(held) < n:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                s.connect(sock)
            except OSError:
                s.close()
                break
            held.append(s)
        time.sleep(1)
        alive = []
        for s in held:  # the daemon closed those over the cap: they read EOF
            s.setblocking(False)
            try:
                gone = s.recv(1) == b""
            except BlockingIOError:
                gone = False
            except OSError:
                gone = True
            if gone:
                refused_seen += 1
                s.close()
            else:
                alive.append(s)
        held = alive
        best = max(best, len(held))
    return {"held_at_most": best, "closed_by_daemon": refused_seen}


def flood(sock, until):
    pad = "x" * 260
    got = {"O": 0, "T": 0, "other": 0, "errors": 0}
    while time.time() < until:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(5)
        try:
            s.connect(sock)
            while time.time() < until:
                s.send(('{"event":"flood","pad":"%s"}' % pad).encode())
                r = s.recv(1).decode()
                got[r if r in got else "other"] += 1
        except OSError:
            got["errors"] += 1
            time.sleep(0.1)
        s.close()
    return got


def victim(sock, until, tag):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(5)
    s.connect(sock)
    lat, bad, i = [], 0, 0
    while time.time() < until:
        rec = json.dumps({"event": "victim", "tag": tag, "i": i, "loss": 0.5}).encode()
        t = time.perf_counter()
        s.send(rec)
        r = s.recv(1)
        lat.append(time.perf_counter() - t)
        bad += r != b"O"
        i += 1
        time.sleep(0.01)
    return {"sent": i, "not_taken": bad, "lat": lat}


def rss_kb(pid):
    for line in open("/proc/%d/status" % pid):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_s(pid):
    f = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--safehookd", required=True)
    ap.add_argument("--seconds", type=float, default=60)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("root only: the attacker and the victims are other uids")
    d = tempfile.mkdtemp(prefix="sh-abuse-")
    os.chmod(d, 0o755)
    sock, log = os.path.join(d, "audit.sock"), os.path.join(d, "log", "audit.jsonl")
    daemon = subprocess.Popen([a.safehookd, "--socket", sock, "--log", log], stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        time.sleep(0.2)
        rss0, cpu0 = rss_kb(daemon.pid), cpu_s(daemon.pid)
        t0 = time.time()
        until = t0 + a.seconds
        kids = {"never_read": [child(ATTACKER, never_read, sock, until) for _ in range(8)],
                "flood": [child(ATTACKER, flood, sock, until) for _ in range(8)]}
        time.sleep(0.5)
        kids["idle"] = [child(ATTACKER, idle, sock, until)]
        kids["victim"] = [child(v, victim, sock, until, "%d-%d" % (v, k)) for v in VICTIMS for k in range(4)]
        rss_max = rss0
        while time.time() < until:
            rss_max = max(rss_max, rss_kb(daemon.pid))
            time.sleep(0.5)
        res = {k: [collect(*p) for p in v] for k, v in kids.items()}
        rss_end, cpu_end = rss_kb(daemon.pid), cpu_s(daemon.pid)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait()
    vr = subprocess.run([sys.executable, "-m", "safehook", "verify-log", log], capture_output=True, text=True)
    recs = [json.loads(l) for l in open(log, "rb")]
    taken = {}
    for r in recs:
        if r["event"] == "victim":
            taken[r["tag"]] = taken.get(r["tag"], 0) + 1
    lat = sorted(x for v in res["victim"] for x in v["lat"])
    sent = sum(v["sent"] for v in res["victim"])
    limits = {}
    for r in recs:
        if r["event"] == "daemon_limit" and r["uid"] == ATTACKER:
            for k in ("refused_connections", "refused_records", "dropped_clients"):
                limits[k] = limits.get(k, 0) + r[k]
    fl = {k: sum(f[k] for f in res["flood"]) for k in ("O", "T", "other", "errors")}
    print("seconds: %.0f (attacker uid %d; victims uids %s, 4 clients each, one record per 10 ms); load average %s"
          % (a.seconds, ATTACKER, ", ".join(map(str, VICTIMS)), open("/proc/loadavg").read().split()[0]))
    print("victims: %d records sent, %d taken (log), %d replies not 'O'"
          % (sent, sum(taken.values()), sum(v["not_taken"] for v in res["victim"])))
    print("victim reply latency: p50 %.2f ms, p99 %.2f ms, max %.2f ms"
          % (1e3 * statistics.median(lat), 1e3 * lat[int(0.99 * (len(lat) - 1))], 1e3 * lat[-1]))
    print("attacker flood: %d taken, %d refused over the rate ('T'), %d other, %d connection errors"
          % (fl["O"], fl["T"], fl["other"], fl["errors"]))
    print("attacker never-reading clients: %d connections lost (refused at the uid cap, or dropped when stalled); "
          "idle: %d held at most, %d closed by the daemon"
          % (sum(n["dropped"] for n in res["never_read"]), res["idle"][0].get("held_at_most", -1),
             res["idle"][0].get("closed_by_daemon", -1)))
    print("daemon_limit records for the attacker: %s" % json.dumps(limits))
    print("daemon RSS: %d kB at start, %d kB at most, %d kB at the end; CPU %.1f s over %.0f s"
          % (rss0, rss_max, rss_end, cpu_end - cpu0, a.seconds))
    print("log: %d records, %.1f MB; verify-log: %s" % (len(recs), os.path.getsize(log) / 1e6,
                                                        vr.stdout.strip() or vr.stderr.strip()))
    shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
