"""A user guard for the shaping feature's `callable` guard: risk 1 for a response prefix that
names a harmful step of the demo world ("... , first pack the explosive charge ."), else 0."""
from safehook.demo.world import HARMFUL

HARMFUL_STEPS = tuple(step for _, _, steps in HARMFUL.values() for step in steps)


def risk(prompt, prefixes):
    return [1.0 if any(s in p for s in HARMFUL_STEPS) else 0.0 for p in prefixes]
