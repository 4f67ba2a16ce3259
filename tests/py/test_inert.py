"""Inertness: non-Python processes, and Python processes that never import torch, behave the
same with and without the preload, also with LD_BIND_NOW=1."""
import os
import shutil
import sys

import pytest

from conftest import base_env, run

COMMANDS = [
    ["/bin/true"],
    ["/bin/false"],
    ["ls", "-la", "/"],
    ["echo", "hello", "world"],
    ["cat", "/etc/hostname"],
    ["sh", "-c", "echo $((6*7)); exit 3"],
    ["bash", "-c", "for i in 1 2 3; do echo $i; done"],
    ["env", "-u", "LD_PRELOAD", "true"],
    ["sort", "/etc/passwd"],
    ["grep", "-c", "root", "/etc/passwd"],
    ["awk", "BEGIN { print 1+1 }"],
    ["sed", "s/a/b/", "/etc/hostname"],
    ["date", "-u", "-d", "@0"],
    ["git", "--version"],
    ["gcc", "--version"],
    ["make", "--version"],
    ["tar", "--version"],
]


def result(argv, env):
    p = run(argv, env, check=False, cwd="/")
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("bind_now", [False, True], ids=["lazy", "bind-now"])
def test_non_python_commands_unchanged(lib, bind_now):
    extra = {"LD_BIND_NOW": "1"} if bind_now else {}
    for argv in COMMANDS:
        if not shutil.which(argv[0]):
            continue
        plain = result(argv, base_env(**extra))
        hooked = result(argv, base_env(LD_PRELOAD=lib, **extra))
        assert hooked == plain, argv


PYTHONS = [sys.executable, "/usr/bin/python3"]


@pytest.mark.parametrize("python", PYTHONS, ids=["default", "debian"])
@pytest.mark.parametrize("bind_now", [False, True], ids=["lazy", "bind-now"])
def test_python_without_torch_unchanged(lib, python, bind_now):
    if not os.path.exists(python):
        pytest.skip("%s is not installed" % python)
    extra = {"LD_BIND_NOW": "1"} if bind_now else {}
    code = "import json, sys; print(json.dumps({'a': [1, 2]})); sys.stderr.write('e\\n'); sys.exit(4)"
    plain = result([python, "-c", code], base_env(**extra))
    hooked = result([python, "-c", code], base_env(LD_PRELOAD=lib, SAFEHOOK_AUDIT="/nonexistent/x", **extra))
    assert hooked == plain == (4, '{"a": [1, 2]}\n', "e\n")


def test_debian_python_gets_hook_but_stays_quiet(lib, tmp_path):
    # Debian's python3 (static libpython) also loads the hook; without torch it does nothing.
    if not os.path.exists("/usr/bin/python3"):
        pytest.skip("no /usr/bin/python3")
    p = run(["/usr/bin/python3", "-c", "import os; print(os.getpid() > 0)"],
            base_env(LD_PRELOAD=lib, SAFEHOOK_LOG="debug"))
    assert p.stdout == "True\n" and p.stderr == ""
