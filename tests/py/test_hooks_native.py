"""The C step hooks on a tiny purpose-built torch program (scripts/hooks_native.py): re-entrant
install from inside a step, a step that raises, a subclass calling super().step(), two threads
stepping at once, fork; all in one process, told apart by the optimizers' names. Then the
extension itself built with AddressSanitizer runs them all again. The processes run with
PYTHONMALLOC=debug, which fills freed memory, so a use after free shows."""
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from conftest import SCRIPTS, base_env, events, read_audit, run

SCRIPT = os.path.join(SCRIPTS, "hooks_native.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


SCENARIOS = ("reinstall", "raising", "subclass", "threads", "fork")


def run_scenarios(tmp_path, names, env_extra=None, python_path=None):
    audit = tmp_path / "audit.jsonl"
    env = base_env(SAFEHOOK_AUDIT=str(audit), PYTHONMALLOC="debug")
    env.update(env_extra or {})
    if python_path:
        env["PYTHONPATH"] = python_path
    p = run([sys.executable, SCRIPT, *names], env, cwd=str(tmp_path), timeout=240)
    for n in names:
        assert "ok %s" % n in p.stdout.split("\n"), p.stdout
    return p, read_audit(str(audit))


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    """Every scenario in one process (one torch import), told apart by the optimizers' names."""
    return run_scenarios(tmp_path_factory.mktemp("hooks"), SCENARIOS)


def steps_by(recs, key):
    """{tag: [step numbers]} of the step (key "pre") or post_step (key "post") records."""
    out = {}
    for r in recs:
        if r["event"] in ("step", "post_step") and key in r:
            out.setdefault(r[key], []).append(r["step"])
    return out


def parent_records(scenarios):
    p, recs = scenarios
    parent = events(recs, "start")[0]["pid"]
    return [r for r in recs if r["pid"] == parent]


def test_install_from_inside_a_step_finishes_the_features_it_started(scenarios):
    recs = parent_records(scenarios)
    first = [r for r in events(recs, "step") if "first" in r]
    assert len(first) == 1, first  # the new policy in force from step 2 has no features
    # the feature after the one that reinstalled ran (it was held while the list was replaced)
    assert first[0]["step"] == 1 and first[0].get("second") is True, first[0]
    again = [r for r in events(recs, "step") if r["opt"] == first[0]["opt"]]
    assert [r["step"] for r in again] == [1, 2] and "second" not in again[1], again


def test_a_step_that_raised_leaves_later_steps_of_other_optimizers_recorded(scenarios):
    recs = parent_records(scenarios)
    pre, post = steps_by(recs, "pre"), steps_by(recs, "post")
    # the raising step counted (its pre hook ran), then 3 outer steps of the other optimizer
    assert pre["raising"] == [1, 2] and pre["after-raise"] == [1, 2, 3], pre
    assert post["raising"] == [2] and post["after-raise"] == [1, 2, 3], post


def test_a_subclass_calling_super_step_is_one_step(scenarios):
    recs = parent_records(scenarios)
    assert steps_by(recs, "pre")["subclass"] == [1, 2]
    assert steps_by(recs, "post")["subclass"] == [1, 2]
    end = events(recs, "end")[0]
    # the super().step() calls and nothing else: 2 here, 8 in the threads scenario (whose
    # optimizers are SGD subclasses too, each nested in its own thread's outer step)
    assert end["nested_steps"] == 2 + 8, end


def test_two_threads_stepping_at_once_each_get_their_own_records(scenarios):
    recs = parent_records(scenarios)
    pre, post = steps_by(recs, "pre"), steps_by(recs, "post")
    for name in ("thread-a", "thread-b"):
        assert sorted(pre.get(name, [])) == [1, 2, 3, 4], pre
        # each post hook got its own thread's step number
        assert sorted(post.get(name, [])) == [1, 2, 3, 4], post


def test_a_forked_child_writes_its_own_records_and_the_parent_goes_on(scenarios):
    p, recs = scenarios
    child = int([line for line in p.stdout.split("\n") if line.startswith("child ")][0].split()[1])
    parent = events(recs, "start")[0]["pid"]
    assert parent != child
    assert steps_by(parent_records(scenarios), "pre")["parent"] == [1, 2]
    assert steps_by([r for r in recs if r["pid"] == child], "pre") == {"child": [1, 2]}
    assert {r["pid"] for r in recs} == {parent, child}
    end = events(recs, "end")
    assert len(end) == 1 and end[0]["pid"] == parent  # the child left through os._exit


def asan_runtime():
    for cc in ("gcc", "cc"):
        if shutil.which(cc):
            path = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
            if os.path.isabs(path) and os.path.exists(path):
                return os.path.realpath(path)
    return None


def test_the_extension_under_address_sanitizer(tmp_path):
    """_core built with -fsanitize=address (a build of its own) runs every scenario."""
    lib = asan_runtime()
    if lib is None:
        pytest.skip("no AddressSanitizer runtime (libasan) for the C compiler")
    meson = [shutil.which("meson")] if shutil.which("meson") else [sys.executable, "-m", "mesonbuild.mesonmain"]
    build = tmp_path / "build-asan"
    env = base_env()
    run(meson + ["setup", str(build), ROOT, "-Db_sanitize=address", "-Db_lundef=false", "--buildtype=debug",
         "--native-file", write_native(tmp_path)], env, timeout=120)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    run(meson + ["compile", "-C", str(build), "hooks/_core" + suffix], env, timeout=240)
    pkg = tmp_path / "pkg"
    shutil.copytree(os.path.join(ROOT, "python", "safehook"), pkg / "safehook")
    shutil.copy(build / "hooks" / ("_core" + suffix), pkg / "safehook" / ("_core" + suffix))
    p, recs = run_scenarios(tmp_path, SCENARIOS + ("kernel",),
                            # Python's objects from malloc too, where ASan sees them
                            env_extra={"LD_PRELOAD": lib, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
                                       "PYTHONMALLOC": "malloc"},
                            python_path=str(pkg))
    assert "AddressSanitizer" not in p.stderr, p.stderr[-4000:]
    assert "core %s" % (pkg / "safehook" / ("_core" + suffix)) in p.stdout.split("\n"), p.stdout
    # the records are there: the instrumented module did the work
    assert steps_by(recs, "pre").get("after-raise") == [1, 2, 3]
    assert sorted(steps_by(recs, "post").get("thread-b", [])) == [1, 2, 3, 4]


def write_native(tmp_path):
    """A meson native file naming this interpreter, so the module is built for it."""
    f = tmp_path / "native.ini"
    f.write_text("[binaries]\npython = '%s'\n" % sys.executable)
    return str(f)
