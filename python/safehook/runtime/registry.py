"""The features of safehook, as the policy schema declares them (src/policy_schema.c, FEATURES):
each one's name, policy section, the module that sets it up, the order of its step callables,
and every default of its section. The C schema is the single source; this module only reads it
(``_core.schema_json()``), once.

Adding a feature: its Python module (``setup(policy, rt)``), its field table and one line in
FEATURES of src/policy_schema.c. Nothing else lists features.
"""
import json

from .. import _core

_schema = []


def _load():
    if not _schema:
        _schema.append(json.loads(_core.schema_json()))
    return _schema[0]


class Feature:
    """A feature of the registry: ``name``, ``section`` (None: set up for every policy),
    ``module`` (None: nothing to set up), ``order`` (of its step callables; 0: none)."""
    __slots__ = ("name", "section", "module", "order", "always")

    def __init__(self, d):
        self.name, self.section, self.module = d["name"], d.get("section"), d.get("module")
        self.order, self.always = d["order"], d["always"]

    def wanted(self, policy):
        """True when POLICY asks for this feature (or it is set up for every policy)."""
        return self.module is not None and (self.always or bool(policy.get(self.section)))


def features():
    """Every Feature, in the order their setup runs."""
    return [Feature(d) for d in _load()["features"]]


def feature(name):
    """The Feature NAME."""
    for f in features():
        if f.name == name:
            return f
    raise KeyError(name)


def defaults(section):
    """{field: default} of SECTION ("probe": one entry of probes), from the schema."""
    return json.loads(json.dumps(_load()["defaults"][section]))  # a fresh copy: lists inside


def section(policy, name):
    """Section NAME of POLICY with the schema's defaults under it (a normalized policy already
    has them; a dict handed to a feature directly may not)."""
    out = defaults(name)
    out.update(policy.get(name) or {})
    return out


def order(name):
    """The order of feature NAME's step callables."""
    return feature(name).order
