"""The safehook command as a whole: --version, and every printing command behind a pipe whose
reader goes away (`| head`): no BrokenPipeError, no traceback, exit 141 like a C tool."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _safehook(*argv, **kw):
    return subprocess.run([sys.executable, "-m", "safehook", *argv], capture_output=True, text=True, timeout=120, **kw)


def test_version():
    import safehook
    for argv in (["--version"], ["version"]):
        r = _safehook(*argv)
        assert (r.returncode, r.stdout, r.stderr) == (0, "safehook %s\n" % safehook.__version__, "")


def _long_audit(path, n=20000):
    with open(path, "w") as f:
        f.write(json.dumps({"event": "start", "time": 0, "pid": 1, "policy": "p.json", "digest": "d"}) + "\n")
        for i in range(n):
            f.write(json.dumps({"event": "probe", "time": 0, "pid": 1, "step": i, "probe": "harm", "score": 0.5,
                                "passed": True, "action": "none"}) + "\n")


@pytest.mark.parametrize("argv", [["report", "{audit}"], ["check", "--explain"] + ["{policy}"] * 400])
def test_reader_gone_is_silent(tmp_path, argv):
    """More than a pipe's 64 KiB, read one line: the writer sees EPIPE while still printing."""
    audit = tmp_path / "audit.jsonl"
    _long_audit(str(audit))
    policy = os.path.join(ROOT, "policies", "recommended.json")
    argv = [a.format(audit=audit, policy=policy) for a in argv]
    if argv[0] == "check":
        argv.insert(1, "--schema-only")
    p = subprocess.Popen([sys.executable, "-m", "safehook", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141
    assert first and err == "", err


def test_locate_on_a_missing_folder_is_one_line_and_never_the_hub(tmp_path):
    """A name that is not a folder (a hub id, a typo) is refused before transformers is even
    imported: nothing can look it up on the hub."""
    code = ("import sys; from safehook.cli import main; rc = main(sys.argv[1:]); "
            "print('transformers imported' if 'transformers' in sys.modules else 'no transformers'); sys.exit(rc)")
    for name, why in ((str(tmp_path / "missing"), "no such folder (locate reads local model folders only, never the hub)"),
                      ("HuggingFaceTB/SmolLM2-135M", "no such folder (locate reads local model folders only, never the hub)"),
                      (str(tmp_path), "no config.json (not a Hugging Face model folder)")):
        r = subprocess.run([sys.executable, "-c", code, "locate", "--model", name], capture_output=True, text=True,
                           timeout=120, cwd=str(tmp_path))
        assert r.returncode == 2, r.stderr
        assert r.stderr == "safehook locate: %s: %s\n" % (name, why)
        assert r.stdout == "no transformers\n"
    (tmp_path / "config.json").write_text("{}")
    r = _safehook("locate", "--model", str(tmp_path), "--benign", str(tmp_path / "b.txt"))
    assert r.returncode == 2 and r.stderr == "safehook locate: %s: no such file\n" % (tmp_path / "b.txt")
