"""safehookd, the audit sink a job cannot write: two real training jobs send their records over
the socket, the daemon stamps each with the kernel's uid/pid of its sender and a SHA-256 chain,
`safehook verify-log` catches a changed or removed line, and a full log stops an enforced job
(disk_full=stop) or is marked (disk_full=keep), never silently.

No user can wedge it: a client that never reads its replies is dropped while others are
answered; per-uid caps on connections and bytes/s refuse with a record; a full descriptor table
does not spin; a restart after a 192 KB line and a SIGHUP rotation keep the chain; lookalike
daemon events are refused; the sender's pid is the kernel's, also over an inherited connection.
Other uids are played by forked children that drop to an unused uid (server_util.as_uid)."""
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from server_util import Daemon, as_uid, open_dir, safehookd_binary, verify_log

ATTACKER, VICTIM = 40001, 40002

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "server_scripts", "train_audited.py")


@pytest.fixture
def daemon(tmp_path_factory, tmp_path):
    made = []
    shared = open_dir()

    def start(*extra, d=None, **kw):
        dm = Daemon(safehookd_binary(tmp_path_factory), d or os.path.join(shared, "d%d" % len(made)), *extra, **kw)
        made.append(dm)
        return dm.start()
    yield start
    for dm in made:
        dm.stop()
    shutil.rmtree(shared, ignore_errors=True)


def _conn(path, timeout=5.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(timeout)
    s.connect(path)
    return s


def _ask(s, rec):
    s.send(json.dumps(rec, ensure_ascii=False).encode() if isinstance(rec, dict) else rec)
    return s.recv(1).decode()


def _limits(recs, uid):
    out = {}
    for r in recs:
        if r["event"] == "daemon_limit" and r["uid"] == uid:
            for k, v in r.items():
                if isinstance(v, int) and k not in ("uid", "seq", "pid"):
                    out[k] = out.get(k, 0) + v
    return out


def _policy(tmp_path, socket, enforce=True, name="policy.json"):
    doc = {"version": 1, "enforce": enforce, "freeze": {"params": ["0.*"]},
           "audit": {"sink": "daemon", "socket": socket, "level": "steps"}}
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return str(p)


def _env():
    e = {k: v for k, v in os.environ.items() if not k.startswith("SAFEHOOK_") and k != "LD_PRELOAD"}
    e["OMP_NUM_THREADS"] = "1"
    return e


def _train(policy, steps=3, wait=True):
    p = subprocess.Popen([sys.executable, TRAIN, policy, str(steps)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=_env())
    if not wait:
        return p
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


def test_two_jobs_are_stamped_chained_and_hold_no_log_descriptor(daemon, tmp_path):
    d = daemon()
    policy = _policy(tmp_path, d.socket)
    jobs = [_train(policy, wait=False) for _ in range(2)]
    outs = []
    for j in jobs:
        out, err = j.communicate(timeout=300)
        assert j.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    d.stop()
    recs = d.records()
    for o in outs:
        mine = [r for r in recs if r.get("pid") == o["pid"]]
        assert [r["event"] for r in mine if r["event"] in ("start", "step", "end")] == \
            ["start", "step", "step", "step", "end"]
        # the kernel's credentials of the sender, not what the record says
        assert all(r["peer"] == {"uid": os.getuid(), "gid": os.getgid(), "pid": o["pid"]} for r in mine)
        # the job never had the log open: its only writable descriptors are std streams and sockets
        assert not [t for t in o["writable"].values() if "audit" in t or t.startswith("/") and "/log/" in t], o
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    assert recs[0]["event"] == "daemon_start" and recs[-1]["event"] == "daemon_stop"
    st = os.stat(d.log)
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.geteuid()
    r = verify_log(d.log)
    assert r.returncode == 0 and "%d records, chain intact" % len(recs) in r.stdout, r.stdout + r.stderr


def test_verify_log_names_the_first_broken_line(daemon, tmp_path):
    d = daemon()
    rc, out, err = _train(_policy(tmp_path, d.socket))
    assert rc == 0, err
    d.stop()
    lines = d.lines()
    assert len(lines) >= 6
    # a forged value in line 3 (1-based): line 4's "prev" no longer matches
    forged = list(lines)
    forged[2] = forged[2].replace(b'"step":', b'"step":1', 1) if b'"step":' in forged[2] else \
        forged[2].replace(b'"event":"', b'"event":"x', 1)
    assert forged[2] != lines[2]
    (tmp_path / "forged.jsonl").write_bytes(b"".join(forged))
    r = verify_log(str(tmp_path / "forged.jsonl"))
    assert r.returncode == 2 and r.stdout.startswith("%s:4: hash chain broken" % (tmp_path / "forged.jsonl")), r.stdout
    # a removed line 3: line 4 (now the third) chains to a line that is gone
    (tmp_path / "cut.jsonl").write_bytes(b"".join(lines[:2] + lines[3:]))
    r = verify_log(str(tmp_path / "cut.jsonl"))
    assert r.returncode == 2 and ":3: hash chain broken" in r.stdout, r.stdout
    # the first line removed: the chain no longer starts at zeros
    (tmp_path / "head.jsonl").write_bytes(b"".join(lines[1:]))
    r = verify_log(str(tmp_path / "head.jsonl"))
    assert r.returncode == 2 and ":1: the first line does not start a chain" in r.stdout, r.stdout
    # and the intact log passes
    assert verify_log(d.log).returncode == 0


def test_a_restarted_daemon_continues_the_chain(daemon, tmp_path):
    d = daemon()
    d.stop()
    d.start()
    d.stop()
    events = [r["event"] for r in d.records()]
    assert events == ["daemon_start", "daemon_stop", "daemon_start", "daemon_stop"]
    assert verify_log(d.log).returncode == 0


def test_a_job_cannot_forge_the_daemons_records(daemon):
    import socket
    d = daemon()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(d.socket)
    replies = []
    for msg in (b'{"event":"daemon_stop"}', b'{"event":"records_lost","records":0}', b'not json', b'[1]',
                b'{"event":"end","peer":{"uid":12345,"pid":1}}'):
        s.send(msg)
        replies.append(s.recv(1))
    s.close()
    d.stop()
    assert replies == [b"R", b"R", b"E", b"E", b"O"]
    end = [r for r in d.records() if r["event"] == "end"]
    assert end[0]["peer"]["uid"] == os.getuid() and end[0]["peer"]["pid"] == os.getpid()


def test_unreachable_daemon_the_enforced_job_does_not_start(tmp_path):
    rc, out, err = _train(_policy(tmp_path, str(tmp_path / "nobody-listens.sock")))
    assert rc != 0
    assert "cannot reach the audit daemon safehookd at %s" % (tmp_path / "nobody-listens.sock") in err
    assert "writable" not in out  # it never reached its end


def test_disk_full_stop_stops_the_enforced_job_with_a_marker(daemon, tmp_path):
    d = daemon("--max-bytes", "2600", "--disk-full", "stop")  # 512 bytes of it kept for the marker
    rc, out, err = _train(_policy(tmp_path, d.socket), steps=200)
    d.stop()
    assert rc != 0
    assert "the audit daemon did not take the 'step' record (its log is full)" in err
    recs = d.records()
    steps = [r["step"] for r in recs if r["event"] == "step"]
    assert 1 <= len(steps) < 200 and steps == list(range(1, len(steps) + 1))
    full = [r for r in recs if r["event"] == "disk_full"]
    assert len(full) == 1 and full[0]["action"] == "stop"
    assert "disk_full=stop" in d.stderr()
    assert os.path.getsize(d.log) <= 2600
    assert verify_log(d.log).returncode == 0  # no torn line


def test_disk_full_keep_lets_the_job_finish_and_counts_what_was_lost(daemon, tmp_path):
    d = daemon("--max-bytes", "2600", "--disk-full", "keep")
    rc, out, err = _train(_policy(tmp_path, d.socket), steps=40)
    d.stop()
    assert rc == 0, err
    recs = d.records()
    written = [r for r in recs if r["event"] == "step"]
    full = [r for r in recs if r["event"] == "disk_full"]
    assert len(full) == 1 and full[0]["action"] == "keep"
    # start + 40 steps + end were sent; what was not written is counted exactly
    kept = [r for r in recs if r["peer"]["pid"] != d.records()[0]["pid"]]
    stop = recs[-1]
    assert stop["event"] == "daemon_stop"
    assert stop["records_lost"] == 42 - len([r for r in kept if r["event"] in ("start", "step", "end")]), (stop, len(written))
    assert verify_log(d.log).returncode == 0


def test_a_client_that_never_reads_is_dropped_and_others_are_answered(daemon):
    d = daemon("--stall", "1")

    def flood():  # pipelines records and never reads a reply
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(d.socket)
        s.setblocking(False)
        sent, t0 = 0, time.time()
        while time.time() - t0 < 4:
            try:
                s.send(b'{"event":"step"}')
                sent += 1
            except BlockingIOError:
                time.sleep(0.01)
            except OSError as e:  # the daemon closed it
                return {"sent": sent, "closed": e.__class__.__name__, "after": time.time() - t0}
        return {"sent": sent, "closed": None}
    wait = as_uid(ATTACKER, flood, background=True)
    time.sleep(0.7)
    worst = 0.0
    s = _conn(d.socket, timeout=3)
    for i in range(20):
        t = time.time()
        assert _ask(s, {"event": "victim", "i": i}) == "O"
        worst = max(worst, time.time() - t)
        time.sleep(0.05)
    s.close()
    res = wait()
    d.stop()
    assert res["closed"] in ("BrokenPipeError", "ConnectionResetError"), res
    assert res["sent"] > 100 and res["after"] < 3.9, res
    assert worst < 0.5, worst
    recs = d.records()
    assert [r["i"] for r in recs if r["event"] == "victim"] == list(range(20))
    assert _limits(recs, ATTACKER)["dropped_clients"] == 1
    assert verify_log(d.log).returncode == 0


def test_per_uid_connection_cap_refuses_with_a_record_and_spares_other_uids(daemon):
    d = daemon("--uid-conns", "8")

    def many():
        socks, answered, refused = [], 0, 0
        for i in range(20):
            s = _conn(d.socket, timeout=2)
            socks.append(s)
        time.sleep(0.3)  # the daemon has accepted (or closed) them all
        for s in socks:
            try:
                got = _ask(s, {"event": "idle"})
            except OSError:  # closed at accept
                got = ""
            answered += got == "O"
            refused += got != "O"
        return [answered, refused]
    held = as_uid(ATTACKER, many)
    assert held == [8, 12]
    assert as_uid(VICTIM, lambda: _ask(_conn(d.socket), {"event": "other_user"})) == "O"
    d.stop()
    recs = d.records()
    assert _limits(recs, ATTACKER)["refused_connections"] == 12
    assert not _limits(recs, VICTIM)
    assert [r["peer"]["uid"] for r in recs if r["event"] == "other_user"] == [VICTIM]


def test_per_uid_byte_rate_refuses_the_flood_and_takes_the_others(daemon):
    d = daemon("--uid-rate", "20000", "--uid-burst", "70000")
    pad = "x" * 1000

    def flood():
        s = _conn(d.socket)
        return [_ask(s, {"event": "flood", "pad": pad}) for _ in range(200)]
    replies = as_uid(ATTACKER, flood)
    others = as_uid(VICTIM, lambda: [_ask(_conn(d.socket), {"event": "victim", "pad": pad}) for _ in range(10)])
    d.stop()
    taken, throttled = replies.count("O"), replies.count("T")
    assert taken + throttled == 200 and 60 <= taken <= 80, replies  # the 70 KB burst, and a little refill
    assert others == ["O"] * 10
    recs = d.records()
    assert len([r for r in recs if r["event"] == "flood"]) == taken
    assert _limits(recs, ATTACKER)["refused_records"] == throttled
    assert verify_log(d.log).returncode == 0


def test_a_full_descriptor_table_is_shed_without_spinning(daemon):
    def low_fds():
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
    d = daemon("--max-clients", "1000", preexec_fn=low_fds)
    early = _conn(d.socket)
    assert _ask(early, {"event": "early"}) == "O"
    held = [_conn(d.socket) for _ in range(150)]  # far more than 48 descriptors
    ticks = os.sysconf("SC_CLK_TCK")

    def cpu():
        f = open("/proc/%d/stat" % d.proc.pid).read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / ticks
    time.sleep(0.5)
    c0 = cpu()
    time.sleep(2)
    spent = cpu() - c0
    assert _ask(early, {"event": "still_served"}) == "O"
    for s in held:
        s.close()
    d.stop()
    assert spent < 0.3, spent  # a busy loop on EMFILE burns ~2 s of these 2
    recs = d.records()
    ex = [r for r in recs if r["event"] == "daemon_fd_exhausted"]
    assert ex and sum(r["refused_connections"] for r in ex) >= 100, ex
    assert [r["event"] for r in recs if r["event"] in ("early", "still_served")] == ["early", "still_served"]


def test_a_192_kb_line_is_recovered_at_restart(daemon):
    d = daemon()
    s = _conn(d.socket)
    # 16,000 characters outside the BMP: 64 KB in, 12 bytes each once escaped
    assert _ask(s, {"event": "big", "text": "\U0001F600" * 16000}) == "O"
    s.close()
    d.proc.kill()  # no daemon_stop after it: the long line is the last one
    d.proc.wait()
    d.stop()
    assert len(d.lines()[-1]) > 190000
    d.start()
    assert _ask(_conn(d.socket), {"event": "after"}) == "O"
    d.stop()
    recs = d.records()
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    r = verify_log(d.log)
    assert r.returncode == 0, r.stdout


def test_sighup_rotation_chains_the_new_file_to_the_old(daemon):
    d = daemon()
    s = _conn(d.socket)
    assert _ask(s, {"event": "before"}) == "O"
    old = d.log + ".1"
    os.rename(d.log, old)
    d.proc.send_signal(signal.SIGHUP)
    for _ in range(50):
        if os.path.exists(d.log):
            break
        time.sleep(0.05)
    assert _ask(s, {"event": "after"}) == "O"
    s.close()
    d.stop()
    old_lines = open(old, "rb").read().splitlines()
    new = d.records()
    assert new[0]["event"] == "log_reopened"
    assert new[0]["prev"] == hashlib.sha256(old_lines[-1]).hexdigest()
    assert new[0]["seq"] == json.loads(old_lines[-1])["seq"] + 1
    assert [r["event"] for r in new[1:]] == ["after", "daemon_stop"]
    r = verify_log(old, d.log)
    assert r.returncode == 0 and "%s: %d records, chain intact" % (d.log, len(new)) in r.stdout, r.stdout
    # a file that does not follow on is named
    other = daemon()
    other.stop()
    r = verify_log(other.log, d.log)
    assert r.returncode == 2 and "%s:1:" % d.log in r.stdout, r.stdout


def test_reserved_and_lookalike_events_are_refused_and_counted(daemon):
    d = daemon()
    names = ["Daemon_stop", "daemon_stop ", " disk_full", "DISK-FULL", "records__lost", "d\u0430emon_stop",
             "watch_torch", "daemon_limit", "task_check", "job_start", "log reopened"]

    def try_all():
        s = _conn(d.socket)
        return [_ask(s, {"event": n, "verdict": "ok"}) for n in names]
    got = as_uid(ATTACKER, try_all)
    root = _ask(_conn(d.socket), {"event": "task_check", "verdict": "ok"})
    d.stop()
    assert all(g in ("R", "E") for g in got), got
    assert got.count("R") == 10 and got[names.index("d\u0430emon_stop")] == "E", got
    assert root == "O"
    recs = d.records()
    daemon_pid = recs[0]["pid"]
    assert [(r["event"], r["peer"]["uid"]) for r in recs if r["pid"] != daemon_pid] == [("task_check", 0)]
    assert _limits(recs, ATTACKER)["refused_events"] == 10


def test_the_sender_is_the_kernels_also_over_an_inherited_connection(daemon):
    d = daemon()
    s = _conn(d.socket)
    assert _ask(s, {"event": "claims", "pid": 1}) == "O"
    child = os.fork()
    if child == 0:
        try:
            s.send(b'{"event":"from_child"}')
            os._exit(0 if s.recv(1) == b"O" else 1)
        except BaseException:
            os._exit(2)
    assert os.waitpid(child, 0)[1] == 0
    s.close()
    d.stop()
    recs = {r["event"]: r for r in d.records()}
    me = os.getpid()
    assert recs["claims"]["pid"] == me and recs["claims"]["claimed_pid"] == 1
    assert recs["claims"]["peer"] == {"uid": 0, "gid": 0, "pid": me}
    assert recs["from_child"]["pid"] == child
    assert recs["from_child"]["peer"] == {"uid": 0, "gid": 0, "pid": child, "conn_pid": me}


def test_a_real_full_disk_keeps_room_for_the_marker(daemon):
    mnt = open_dir("safehook-fullfs-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mnt], check=True)
    try:
        d = daemon("--disk-full", "stop", d=os.path.join(mnt, "d"))
        fd = os.open(os.path.join(mnt, "filler"), os.O_WRONLY | os.O_CREAT)  # the disk fills from outside
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        os.close(fd)
        s = _conn(d.socket)
        replies = []
        for i in range(20000):
            replies.append(_ask(s, {"event": "step", "i": i, "pad": "y" * 200}))
            if replies[-1] != "O":
                break
        s.close()
        d.stop()
        assert replies[-1] == "F" and len(replies) > 1000, (len(replies), replies[-3:])
        recs = d.records()
        full = [r for r in recs if r["event"] == "disk_full"]
        assert len(full) == 1 and full[0]["action"] == "stop" and full[0]["error"] == "No space left on device"
        assert recs[-1]["event"] in ("disk_full", "daemon_stop")
        assert verify_log(d.log).returncode == 0
    finally:
        subprocess.run(["umount", "-l", mnt])
        shutil.rmtree(mnt, ignore_errors=True)
