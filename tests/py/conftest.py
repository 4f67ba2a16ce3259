"""Shared helpers for the integration tests: they run real Python/torch processes under the
preload library of the installed package and read the audit log they write."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "scripts")


def safehook_lib():
    return subprocess.check_output([sys.executable, "-m", "safehook", "lib"], text=True).strip()


@pytest.fixture(scope="session")
def lib():
    path = safehook_lib()
    assert os.path.isabs(path) and os.path.exists(path), path
    return path


def base_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFEHOOK_") and k != "LD_PRELOAD"}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items() if v is not None})
    return env


def run(cmd, env, cwd=None, timeout=300, check=True):
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError("command %r failed (%d)\nstdout:\n%s\nstderr:\n%s" % (cmd, p.returncode, p.stdout, p.stderr))
    return p


def read_audit(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def events(records, name):
    return [r for r in records if r["event"] == name]


@pytest.fixture
def preload_run(lib, tmp_path):
    """Run argv under LD_PRELOAD with an audit log in tmp_path; returns (proc, records)."""
    def _run(argv, policy=None, cwd=None, env_extra=None, check=True, timeout=300):
        audit = tmp_path / "audit.jsonl"
        if audit.exists():
            audit.unlink()
        env = base_env(LD_PRELOAD=lib, SAFEHOOK_AUDIT=str(audit), SAFEHOOK_POLICY=policy, **(env_extra or {}))
        p = run(argv, env, cwd=cwd or str(tmp_path), check=check, timeout=timeout)
        return p, read_audit(str(audit))
    return _run
