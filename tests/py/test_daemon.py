"""safehookd, the audit sink a job cannot write: two real training jobs send their records over
the socket, the daemon stamps each with the kernel's uid/pid of its sender and a SHA-256 chain,
`safehook verify-log` catches a changed or removed line, and a full log stops an enforced job
(disk_full=stop) or is marked (disk_full=keep), never silently."""
import json
import os
import subprocess
import sys

import pytest

from server_util import Daemon, safehookd_binary, verify_log

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "server_scripts", "train_audited.py")


@pytest.fixture
def daemon(tmp_path_factory, tmp_path):
    made = []

    def start(*extra, d=None):
        dm = Daemon(safehookd_binary(tmp_path_factory), d or tmp_path / ("d%d" % len(made)), *extra)
        made.append(dm)
        return dm.start()
    yield start
    for dm in made:
        dm.stop()


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
    assert replies == [b"E", b"E", b"E", b"E", b"O"]
    end = [r for r in d.records() if r["event"] == "end"]
    assert end[0]["peer"]["uid"] == os.getuid() and end[0]["peer"]["pid"] == os.getpid()


def test_unreachable_daemon_the_enforced_job_does_not_start(tmp_path):
    rc, out, err = _train(_policy(tmp_path, str(tmp_path / "nobody-listens.sock")))
    assert rc != 0
    assert "cannot reach the audit daemon safehookd at %s" % (tmp_path / "nobody-listens.sock") in err
    assert "writable" not in out  # it never reached its end


def test_disk_full_stop_stops_the_enforced_job_with_a_marker(daemon, tmp_path):
    d = daemon("--max-bytes", "2600", "--disk-full", "stop")
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
    sent = 1 + 40 + 1 + sum(1 for r in recs if r["event"] == "optimizer" or r["event"] == "freeze")
    kept = [r for r in recs if r["peer"]["pid"] != d.records()[0]["pid"]]
    stop = recs[-1]
    assert stop["event"] == "daemon_stop"
    assert stop["records_lost"] == 42 - len([r for r in kept if r["event"] in ("start", "step", "end")]), (stop, len(written))
    assert verify_log(d.log).returncode == 0
