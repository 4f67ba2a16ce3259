"""Steps that take a closure (``opt.step(closure)``, Lightning's automatic optimization, LBFGS):
the closure computes the gradients the optimizer uses *inside* step(), after torch's pre-step
hooks have run. So the pre hook (hooks/pymodule.c) does not run the features then; it hands
step()'s arguments to wrap(), which returns them with the closure replaced by one that calls the
user's closure and then runs the pre-step features and writes the step record
(``_core.step_features``), on the fresh gradients, before the optimizer reads them.

Once per step: an optimizer that evaluates the closure several times (LBFGS's line search) gets
the features after the first evaluation only (the gradients of its later evaluations are not
projected; the step record describes the first). A step whose closure is never called gets no
features and no step record."""
from .. import _core


def wrap(opt, step, index, args, kwargs):
    """New (args, kwargs) for OPT.step: the closure wrapped (see the module docstring)."""
    positional = len(args) >= 2 and args[1] is not None
    closure = args[1] if positional else kwargs["closure"]
    done = [False]

    def closure_then_features(*a, **k):
        out = closure(*a, **k)
        if not done[0]:
            done[0] = True
            _core.step_features(opt, step, index)
        return out

    closure_then_features.__wrapped__ = closure
    if positional:
        return (args[0], closure_then_features) + tuple(args[2:]), kwargs
    kwargs = dict(kwargs)
    kwargs["closure"] = closure_then_features
    return args, kwargs
