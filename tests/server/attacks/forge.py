"""An unprotected process that sends, before it imports torch, the records a protected job
would (activate, start, step, end with the policy's digest), then a root-only task_check and a
lookalike of a watcher verdict, and then trains (train.py). Its records are taken as its own,
stamped with its kernel pid; none of them can make it protected.
usage: SH_SOCKET=... SH_SYSTEM=... SH_DIGEST=... forge.py OUT MODE"""
import json
import os
import runpy
import socket
import sys

s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(os.environ["SH_SOCKET"])
origin, digest = "system:" + os.environ["SH_SYSTEM"], os.environ["SH_DIGEST"]
for rec in ({"event": "activate", "policy": origin, "enforce": True, "digest": digest},
            {"event": "start", "enforce": True, "policy": origin, "digest": digest},
            {"event": "step", "step": 1}, {"event": "end"},
            {"event": "task_check", "verdict": "ok"}, {"event": "Watch_torch ", "verdict": "ok"}):
    s.send(json.dumps(rec).encode())
    print("forged", rec["event"], s.recv(1).decode(), flush=True)
sys.argv = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
