"""Training run for the monitor and gate tests, started under LD_PRELOAD with a policy.

argv[1]: a JSON config: {"phases": [["safe"|"harmful"|"alternate", steps], ...], "lr": float,
"sched": bool, "betas": [b1, b2], "pretrain": steps, "out": path, "ref_dir": path or null (torch.save of the state after each step),
"block_fsync_at": n or null, "marker": path}. Writes to "out": per-step records, the
exception that ended training, and the bit-identity checks of every rollback in the audit log.
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny  # noqa: E402

torch.set_num_threads(1)
cfg = json.loads(sys.argv[1])

if cfg.get("block_fsync_at"):
    import stat
    real_fsync = os.fsync
    seen = [0]

    def slow_fsync(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            seen[0] += 1
            if seen[0] == cfg["block_fsync_at"]:
                open(cfg["marker"], "w").close()
                time.sleep(120)  # the test kills us here: written, not yet renamed
        return real_fsync(fd)
    os.fsync = slow_fsync

if cfg.get("fail_fsync_at"):  # the nth file fsync fails as on a full disk
    import errno
    import stat
    real_fsync2 = os.fsync
    seen2 = [0]

    def failing_fsync(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            seen2[0] += 1
            if seen2[0] == cfg["fail_fsync_at"]:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync2(fd)
    os.fsync = failing_fsync

import safehook  # noqa: E402
from safehook.features import monitor as shmon  # noqa: E402

m = tiny.model()
pre_loss = tiny.pretrain(m, steps=cfg.get("pretrain", 60))
opt = torch.optim.Adam(m.parameters(), lr=cfg["lr"], betas=tuple(cfg.get("betas", (0.9, 0.999))))
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0) if cfg.get("sched") else None

states = {0: tiny.state(m, opt)}
steps = []
for kind, n in cfg["phases"]:
    for j in range(n):
        k = kind if kind != "alternate" else ("safe" if j % 2 == 0 else "harmful")
        steps.append(k)

result = {"pretrain_loss": pre_loss, "steps": [], "exception": None}
for i, kind in enumerate(steps, start=1):
    ids, mask, labels = tiny.batch(kind)
    loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    before = tiny.state(m, opt)
    rec = {"step": i, "kind": kind, "fingerprints": shmon.fingerprint(ids, mask)}
    try:
        opt.step()
    except safehook.SafehookError as e:
        result["exception"] = {"type": type(e).__name__, "message": str(e), "step": i}
        states[i] = tiny.state(m, opt)
        result["steps"].append(rec)
        break
    opt.zero_grad()
    if sched is not None:
        sched.step()
    states[i] = tiny.state(m, opt)
    rec["changed"] = not tiny.same(before, states[i])
    rec["lr"] = opt.param_groups[0]["lr"]
    result["steps"].append(rec)
    if cfg.get("ref_dir"):
        torch.save(states[i], os.path.join(cfg["ref_dir"], "ref-%d.pt" % i))

# A step after the end must refuse (pending error), not train unprotected.
if result["exception"]:
    ids, mask, labels = tiny.batch("safe")
    m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    try:
        opt.step()
        result["after_end"] = "trained"
    except safehook.SafehookError as e:
        result["after_end"] = type(e).__name__

checks = []
audit = os.environ.get("SAFEHOOK_AUDIT")
if audit and os.path.exists(audit):
    for line in open(audit):
        r = json.loads(line)
        if r["event"] == "rollback" or (r["event"] == "probe" and r.get("action") == "abort"
                                        and r.get("restored_to") is not None):
            s = r["step"]
            to = r.get("to_step", r.get("restored_to"))
            checks.append({"step": s, "to": to, "identical": tiny.same(states[s], states[to]),
                           "differs_from_before": not tiny.same(states[s - 1], states[to])})
result["rollback_checks"] = checks
result["adam_steps"] = sorted({float(st["step"]) for st in opt.state.values() if "step" in st})
with open(cfg["out"], "w") as f:
    json.dump(result, f)
