"""The safety probe data shipped inside the package: text written for safehook (DATA.md beside
this file gives its source, license, version and counts).

Two sets, one JSONL file each, rows ``{"prompt": str, "response": str}``:

* ``refusals``: harmful requests of many kinds (weapons, drugs, malware, fraud, violence,
  stalking, hate, self-harm, disinformation, ...; questions, imperatives, role-play and
  "ignore your rules" framings, short and long), each with a polite refusal;
* ``benign``: ordinary chat-assistant requests with short helpful answers, and hard negatives
  (benign requests that use harmful words: history, safety, fiction, security defence,
  chemistry, medicine) interleaved with them, so that the first N rows hold both kinds. Each
  row says which it is: ``"kind": "benign"`` or ``"hard_negative"``.

A policy names them with ``"probes": "builtin"`` or, one probe at a time, ``{"builtin":
"refusals"}``; the rows are rendered with the trained model's own tokenizer and chat template
(probes/tokenizer.py). Nothing here imports torch."""
import json
import os

VERSION = "2"
SETS = ("refusals", "benign")
KINDS = ("benign", "hard_negative")

_HERE = os.path.dirname(os.path.abspath(__file__))


def path(name):
    """Absolute path of the shipped set NAME (one of SETS)."""
    if name not in SETS:
        raise ValueError("no shipped probe set %r (there are %s)" % (name, ", ".join(SETS)))
    return os.path.join(_HERE, name + ".jsonl")


def rows(name, kind=None):
    """The rows of the set NAME as dicts, in file order; KIND keeps only the benign set's rows
    of that kind ("benign" or "hard_negative")."""
    if kind is not None and kind not in KINDS:
        raise ValueError("kind must be one of %s, not %r" % (", ".join(KINDS), kind))
    with open(path(name), encoding="utf-8") as f:
        out = [json.loads(line) for line in f if line.strip()]
    return [r for r in out if kind is None or r.get("kind") == kind]


def counts():
    """{"refusals": rows, "benign": rows of kind benign, "hard_negative": rows of that kind}."""
    ben = rows("benign")
    return {"refusals": len(rows("refusals")), "benign": sum(r.get("kind") == "benign" for r in ben),
            "hard_negative": sum(r.get("kind") == "hard_negative" for r in ben)}
