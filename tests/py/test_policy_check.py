"""`safehook check` on the data-driven cases in tests/policies/{valid,invalid}/<case>/ and on
every file in policies/.

An invalid case holds policy.json (or generate.py, which writes it: the 10 MB case) and
`expected`, the exact line `safehook check` prints, with FILE standing for the path given.
A valid case's `expected` is its normalized policy as `safehook check --explain` prints it."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASES = os.path.join(ROOT, "tests", "policies")
POLICIES = os.path.join(ROOT, "policies")


def _cases(kind):
    d = os.path.join(CASES, kind)
    return sorted(n for n in os.listdir(d) if os.path.isdir(os.path.join(d, n)))


def _check(*args):
    return subprocess.run([sys.executable, "-m", "safehook", "check", *args], capture_output=True, text=True,
                          timeout=120)


def _policy_path(kind, case, tmp_dir):
    d = os.path.join(CASES, kind, case)
    p = os.path.join(d, "policy.json")
    if os.path.exists(p):
        return p
    out = os.path.join(tmp_dir, case + ".json")
    subprocess.check_call([sys.executable, os.path.join(d, "generate.py"), out])
    return out


def _expected(kind, case):
    with open(os.path.join(CASES, kind, case, "expected"), encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def invalid_lines(tmp_path_factory):
    """One `safehook check` over every invalid case: {case: (path, the line printed for it)}."""
    tmp = str(tmp_path_factory.mktemp("generated"))
    paths = {case: _policy_path("invalid", case, tmp) for case in _cases("invalid")}
    r = _check(*paths.values())
    assert r.returncode == 2, r.stderr
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    out = {}
    for case, path in paths.items():
        mine = [l for l in lines if l.startswith(path + ":")]
        out[case] = (path, mine)
    assert len(lines) == len(paths), "one line per invalid file"
    return out


def test_at_least_40_invalid_cases():
    assert len(_cases("invalid")) >= 40


@pytest.mark.parametrize("case", _cases("invalid"))
def test_invalid_case(case, invalid_lines):
    path, lines = invalid_lines[case]
    want = _expected("invalid", case).rstrip("\n").replace("FILE", path, 1)
    assert lines == [want]


@pytest.fixture(scope="module")
def explained():
    """One `safehook check --explain` over every valid case: {case: the text printed for it}."""
    paths = {case: os.path.join(CASES, "valid", case, "policy.json") for case in _cases("valid")}
    r = _check("--explain", *paths.values())
    assert r.returncode == 0, r.stdout + r.stderr
    blocks = re.split(r"^# (.*)\n", r.stdout, flags=re.M)[1:]
    by_path = dict(zip(blocks[0::2], blocks[1::2]))
    return {case: by_path.get(p) for case, p in paths.items()}


@pytest.mark.parametrize("case", _cases("valid"))
def test_valid_case(case, explained):
    assert explained[case] == _expected("valid", case)


def test_exit_codes_and_silence():
    valid = os.path.join(CASES, "valid", "minimal", "policy.json")
    invalid = os.path.join(CASES, "invalid", "version-2", "policy.json")
    r = _check(valid)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    r = _check(valid, invalid, valid)
    assert r.returncode == 2
    assert r.stdout == invalid + ": /version: must be 1, not 2\n"
    r = _check(os.path.join(CASES, "no-such-file.json"))
    assert r.returncode == 2
    assert r.stdout.endswith("no-such-file.json: cannot read: No such file or directory\n")


def test_every_shipped_policy_is_valid():
    files = sorted(os.path.join(POLICIES, f) for f in os.listdir(POLICIES) if f.endswith(".json"))
    assert {"default.json", "lora.json", "full-finetune.json", "server-enforced.json"} <= {
        os.path.basename(f) for f in files}
    r = _check("--explain", *files)
    assert r.returncode == 0, r.stdout
    for f in files:
        assert "# %s\n" % f in r.stdout


def test_readme_explains_every_key_and_file():
    with open(os.path.join(POLICIES, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    with open(os.path.join(CASES, "valid", "all-keys-set", "expected"), encoding="utf-8") as f:
        full = json.load(f)
    keys = set()
    for k, v in full.items():
        keys.add(k)
        if isinstance(v, dict):
            for k2, v2 in v.items():
                keys.add(k2 if k != "probes" else None)
                if k == "probes":
                    keys.update(v2)
    keys.discard(None)
    missing = sorted(k for k in keys if "`%s`" % k not in readme)
    assert not missing, "policies/README.md does not explain %s" % missing
    for f in os.listdir(POLICIES):
        if f.endswith(".json"):
            assert f in readme


def test_default_needs_no_data():
    """The embedded default applies to any model with nothing at hand: no probe, no data file."""
    r = _check("--explain", os.path.join(POLICIES, "default.json"))
    doc = json.loads(r.stdout)
    assert not doc.get("probes") and not doc.get("gate") and not doc.get("monitor")
    assert doc.get("safegrad", {}).get("source", "anchor") == "anchor"
    assert doc["on_error"] == "abort" and doc["enforce"] is False
