"""A tiny torch program for the C step hooks (safehook._core.pre_step/post_step), one scenario per
argument, each on optimizers of its own:

  reinstall  a pre-step feature calls safehook.install() with another policy mid-loop; the
             feature after it (referenced by the old feature list only) must still run
  raising    an optimizer whose step raises once between the pre and post hooks; the steps of
             another optimizer after it are outer steps, with features and records
  subclass   a subclass whose step calls super().step(): one step, the inner call nested
  threads    two threads step two optimizers at once (both inside step() together)
  fork       a child forked after the kernel's pool started steps its own optimizer and
             projects; the parent goes on
  kernel     a projection big enough to use the pool

Features tag the step records: "pre" (the optimizer's name, pre-step) and "post" (post-step).
Prints "ok NAME" per scenario; the test reads the audit log (SAFEHOOK_AUDIT)."""
import os
import sys
import threading

import torch

import safehook
from safehook import _core

torch.set_num_threads(1)
POLICY = {"version": 1}
safehook.install(POLICY)


def tag_pre(opt, step, record):
    record["pre"] = opt.name


def tag_post(opt, step, record):
    record["post"] = opt.name


def plain_features():
    _core.set_features([tag_pre], [tag_post])


def sgd(name, cls=torch.optim.SGD):
    m = torch.nn.Linear(4, 1)
    o = cls(m.parameters(), lr=0.1)
    o.name = name
    return m, o


def step(m, o):
    o.zero_grad()
    m(torch.randn(2, 4)).sum().backward()
    o.step()


def scenario_reinstall():
    m, o = sgd("reinstall")

    def reinstall(opt, step, record):
        record["first"] = True
        if step == 1:
            safehook.install({"version": 1, "on_error": "warn"})  # replaces the feature lists

    class Second:  # only the feature list holds it
        def __call__(self, opt, step, record):
            record["second"] = True

    _core.set_features([reinstall, Second()], [])
    step(m, o)
    step(m, o)  # the new policy has no features: an untagged record
    safehook.install(POLICY)


def scenario_raising():
    class Raising(torch.optim.Optimizer):
        """Plain SGD written out (no inner optimizer step), failing the first time."""
        raised = False

        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            if not Raising.raised:
                Raising.raised = True
                raise RuntimeError("a step that fails once")
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(p.grad, alpha=-group["lr"])

    plain_features()
    mr, r = sgd("raising", Raising)
    mo, other = sgd("after-raise")
    try:
        step(mr, r)
    except RuntimeError:
        pass
    for _ in range(3):
        step(mo, other)
    step(mr, r)


def scenario_subclass():
    class Sub(torch.optim.SGD):  # its step and SGD's are both wrapped by torch's hook caller
        def step(self, closure=None):
            return super().step(closure)

    plain_features()
    sgd("make-sgd-wrapped")  # an SGD instance: SGD.step itself now calls the hooks too
    m, o = sgd("subclass", Sub)
    step(m, o)
    step(m, o)


def scenario_threads(n=4):
    plain_features()
    both_inside = threading.Barrier(2, timeout=30)

    class Meeting(torch.optim.SGD):
        def step(self, closure=None):
            both_inside.wait()  # both threads are between their pre and post hooks here
            return super().step(closure)

    pairs = [sgd("thread-a", Meeting), sgd("thread-b", Meeting)]
    errors = []

    def run(m, o):
        try:
            for _ in range(n):
                step(m, o)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=p) for p in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def project_big():
    g = [torch.randn(300_000) for _ in range(2)]
    s = [-x + 0.1 * torch.randn(300_000) for x in g]
    _, _, _, n = _core.safegrad_project(g, s)
    assert n == 1, n
    gs = sum(float(a.double() @ b.double()) for a, b in zip(g, s))  # the conflict is gone
    gg = sum(float(a.double() @ a.double()) for a in g)
    ss = sum(float(b.double() @ b.double()) for b in s)
    assert abs(gs) < 1e-5 * (gg * ss) ** 0.5, (gs, gg, ss)


def scenario_kernel():
    _core.safegrad_threads(2)
    project_big()


def scenario_fork():
    plain_features()
    _core.safegrad_threads(2)
    project_big()  # the pool's workers exist now
    mp, parent = sgd("parent")
    step(mp, parent)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            mc, child = sgd("child")
            step(mc, child)
            project_big()  # the child's pool starts workers of its own
            step(mc, child)
            code = 0
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    step(mp, parent)
    print("child", pid)


if __name__ == "__main__":
    print("core", _core.__file__, flush=True)
    for name in sys.argv[1:]:
        globals()["scenario_" + name]()
        print("ok", name, flush=True)
    print("stats", _core.stats(), flush=True)
