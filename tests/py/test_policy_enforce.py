"""An enforced system policy seen from Python: weakenings refused and recorded, on_error of the
system policy applied, its audit.path beating SAFEHOOK_AUDIT, SAFEHOOK_DISABLE=1 refused.

Nothing here writes /etc/safehook: each test runs a fresh interpreter that points
safehook.runtime.boot._SYSTEM_PATH (or _core.configure(system_path=...)) at a file in tmp_path."""
import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write(path, doc):
    with open(path, "w") as f:
        json.dump(doc, f)
    return str(path)


def _py(code, env=None, timeout=120):
    e = {k: v for k, v in os.environ.items() if not k.startswith("SAFEHOOK_")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=e,
                          timeout=timeout)


def _records(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def _system(tmp_path, on_error="abort", audit=True):
    doc = {"version": 1, "enforce": True, "on_error": on_error,
           "freeze": {"layers": ["2-3"], "params": ["embed*"]},
           "monitor": {"probe": "harm", "every": 100, "threshold": 0.98},
           "probes": {"harm": {"callable": "json:dumps"}}}
    if audit:
        doc["audit"] = {"path": str(tmp_path / "system-audit.jsonl"), "level": "sample"}
    return _write(tmp_path / "system.json", doc)


def test_configure_refuses_a_weakening_naming_the_key(tmp_path):
    system = _system(tmp_path)
    user = _write(tmp_path / "user.json", {"version": 1, "monitor": {"every": 500}})
    r = _py("""
        import json
        from safehook import _core
        try:
            _core.configure(policy_path=%r, system_path=%r)
        except _core.PolicyError as e:
            print(json.dumps({"msg": str(e), "kind": e.kind, "pointer": e.pointer, "on_error": e.on_error,
                              "system_enforced": e.system_enforced}))
    """ % (user, system))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got == {"msg": "%s: /monitor/every: weakens the enforced system policy %s: must be <= 100, not 500"
                          % (user, system),
                   "kind": "weakening", "pointer": "/monitor/every", "on_error": "abort", "system_enforced": True}


def test_tightening_applies_and_system_audit_path_beats_safehook_audit(tmp_path):
    system = _system(tmp_path)
    user = _write(tmp_path / "user.json", {"version": 1, "monitor": {"every": 10}, "enforce": True})
    env_audit = str(tmp_path / "env-audit.jsonl")
    r = _py("""
        import json
        from safehook import _core
        p = _core.configure(policy_path=%r, system_path=%r, audit_path=%r)
        print(json.dumps(p))
    """ % (user, system, env_audit))
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["monitor"]["every"] == 10
    assert p["monitor"]["threshold"] == 0.98  # the system's, not the default 0.95
    assert p["freeze"]["layers"] == ["2-3"]
    assert p["_meta"]["origin"] == "system:%s+user:%s" % (system, user)
    assert p["_meta"]["system_enforced"] is True
    assert p["_meta"]["audit"] == str(tmp_path / "system-audit.jsonl")
    assert len(p["_meta"]["digest"]) == 64

    # without enforcement SAFEHOOK_AUDIT (audit_path) wins
    advisory = _write(tmp_path / "advisory.json", {"version": 1, "audit": {"path": str(tmp_path / "adv.jsonl")}})
    r = _py("""
        from safehook import _core
        print(_core.configure(system_path=%r, audit_path=%r)["_meta"]["audit"])
    """ % (advisory, env_audit))
    assert r.stdout.strip() == env_audit, r.stderr


def test_weakening_under_abort_stops_the_first_step_and_is_recorded(tmp_path):
    system = _system(tmp_path)
    user = _write(tmp_path / "user.json", {"version": 1, "on_error": "warn"})
    r = _py("""
        import safehook
        from safehook import _core
        from safehook.runtime import boot as _boot
        _boot._SYSTEM_PATH = %r
        assert safehook.install(%r) is None
        import torch
        p = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([p], lr=0.1)
        p.grad = torch.ones(2)
        try:
            opt.step()
        except safehook.PolicyError as e:
            print("refused:", e)
        print("weights:", p.tolist())
    """ % (system, user))
    assert r.returncode == 0, r.stderr
    line = "%s: /on_error: weakens the enforced system policy %s: must be one of \"abort\", not \"warn\"" % (user, system)
    assert r.stdout.splitlines() == ["refused: policy error: " + line, "weights: [0.0, 0.0]"]
    assert r.stderr == "safehook: policy error: %s (training will stop at its first optimizer step)\n" % line
    recs = _records(tmp_path / "system-audit.jsonl")
    assert [x["event"] for x in recs] == ["violation"]
    assert recs[0]["pointer"] == "/on_error" and recs[0]["kind"] == "weakening" and recs[0]["message"] == line
    assert recs[0]["python_stack"]


def test_weakening_under_warn_trains_under_the_system_policy_alone(tmp_path):
    system = _system(tmp_path, on_error="warn")
    user = _write(tmp_path / "user.json", {"version": 1, "freeze": {"layers": ["2"]}})
    r = _py("""
        import json
        import safehook
        from safehook.runtime import boot as _boot
        _boot._SYSTEM_PATH = %r
        p = safehook.install(%r)
        print(json.dumps({"origin": p["_meta"]["origin"], "layers": p["freeze"]["layers"]}))
    """ % (system, user))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1]) == {"origin": "system:" + system, "layers": ["2-3"]}
    line = ("%s: /freeze/layers: weakens the enforced system policy %s: must cover the blocks 2-3 it freezes "
            "(block 3 is missing)" % (user, system))
    assert ("safehook: policy error: %s (on_error=warn: the enforced system policy applies without the user "
            "policy)\n" % line) in r.stderr
    recs = _records(tmp_path / "system-audit.jsonl")
    assert [x["event"] for x in recs] == ["violation"] and recs[0]["on_error"] == "warn"


def test_disable_refused_under_an_enforced_system_policy(tmp_path):
    system = _system(tmp_path)
    r = _py("""
        import json
        from safehook.runtime import boot as _boot
        _boot._SYSTEM_PATH = %r
        _boot.from_preload(None)
        print(json.dumps({"via": _boot._state["via"], "origin": (_boot._state["policy"] or {}).get("_meta", {}).get("origin")}))
    """ % system, env={"SAFEHOOK_DISABLE": "1", "SAFEHOOK_AUDIT": str(tmp_path / "env.jsonl")})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"via": "preload", "origin": "system:" + system}
    assert r.stderr == ("safehook: SAFEHOOK_DISABLE=1 refused: the system policy %s is enforced; this process stays "
                        "protected\n" % system)
    recs = _records(tmp_path / "system-audit.jsonl")  # the system's audit path, not SAFEHOOK_AUDIT
    assert [(x["event"], x["what"]) for x in recs] == [("violation", "SAFEHOOK_DISABLE=1 refused")]
    assert not os.path.exists(tmp_path / "env.jsonl")


def test_disable_honoured_without_an_enforced_system_policy(tmp_path):
    advisory = _write(tmp_path / "advisory.json", {"version": 1})
    for path in (str(tmp_path / "missing.json"), advisory):
        r = _py("""
            from safehook.runtime import boot as _boot
            _boot._SYSTEM_PATH = %r
            _boot.from_preload(None)
            print(_boot._state["via"], _boot._state["active"])
        """ % path, env={"SAFEHOOK_DISABLE": "1"})
        assert (r.returncode, r.stdout, r.stderr) == (0, "None False\n", "")


def test_shipped_user_policies_under_the_shipped_server_policy(tmp_path):
    with open(os.path.join(ROOT, "policies", "server-enforced.json")) as f:
        server = json.load(f)
    assert server["audit"]["sink"] == "daemon"  # shipped: records go to safehookd
    server["audit"].update(sink="file", path=str(tmp_path / "server.jsonl"))  # no daemon in this test
    system = _write(tmp_path / "server.json", server)
    lora = os.path.join(ROOT, "policies", "lora.json")
    full = os.path.join(ROOT, "policies", "full-finetune.json")
    r = _py("""
        import json
        from safehook import _core
        out = {}
        for name, path in (("lora", %r), ("full", %r)):
            try:
                p = _core.configure(policy_path=path, system_path=%r)
                out[name] = [p["safegrad"]["granularity"], p["audit"]["level"], p["_meta"]["audit"]]
            except _core.PolicyError as e:
                out[name] = [e.kind, e.pointer]
        print(json.dumps(out))
    """ % (lora, full, system))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"lora": ["layer", "steps", str(tmp_path / "server.jsonl")],
                                    "full": ["weakening", "/safegrad/source"]}
