"""safehook check [--explain] [--model DIR] [--json] FILE...: validate policies.

The schema is the C core's (parsed and validated once, in C). Beyond it, check reads what the
policy names on disk, as the job would at its first step: every probe's data file (each line a
JSON object: a malformed line is reported as DATA:LINE), tokenizer folder and callable. With
--model DIR it also resolves the policy against that model folder: freeze.layers and
shaping.layer against the model's block list (the runtime's own find_blocks, on a model built on
the meta device from DIR's config, so no weights are read), freeze.params globs against its
parameter names, probe rows through the probe loader itself (its tokenizer and chat template),
their token ids against the model's vocabulary.
--schema-only checks the schema alone (policy templates whose paths are examples).

Output: "FILE: ok" per valid file (with --model, what it resolved to), and one line per problem
in the core's forms: "FILE:LINE:COLUMN: message" (JSON syntax) and "FILE: /json/pointer:
message". Exit 0 when every file is valid, 2 otherwise. Relative paths in a policy are resolved
against the current folder, as the job resolves them."""
import fnmatch
import json
import os
import re

SCHEMA = "safehook.check/1"


def _json_lines(path):
    """Check that every non-blank line of the JSONL file PATH is a JSON object; returns
    (rows read, first problem as 'PATH:LINE: what' or None)."""
    n = 0
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        return 0, "%s: cannot read: %s" % (path, e.strerror)
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:  # a JSONDecodeError: the column within the line
                    return n, "%s:%d:%d: not JSON: %s" % (path, lineno, e.colno, e.msg)
                if not isinstance(row, dict):
                    return n, "%s:%d: a row is a JSON object, not %s" % (path, lineno, type(row).__name__)
                n += 1
        except UnicodeDecodeError as e:
            return n, "%s: not UTF-8 text: %s" % (path, e)
    return n, None


class _Problems:
    """The problems found in one policy file, as the lines check prints and as JSON."""

    def __init__(self, path):
        self.path, self.items = path, []

    def add(self, pointer, message, line=None, column=None):
        self.items.append({"pointer": pointer, "message": message, "line": line, "column": column})

    def core(self, text):
        """A PolicyError's one line (FILE:LINE:COLUMN: msg or FILE: /pointer: msg)."""
        rest = text[len(self.path):] if text.startswith(self.path) else ": " + text
        m = re.match(r"^:(\d+):(\d+): (.*)$", rest, re.S)
        if m:
            return self.add(None, m.group(3), int(m.group(1)), int(m.group(2)))
        m = re.match(r"^: (/\S*): (.*)$", rest, re.S)
        if m:
            return self.add(m.group(1), m.group(2))
        self.add(None, rest[2:] if rest.startswith(": ") else rest)

    def lines(self):
        out = []
        for p in self.items:
            if p["line"] is not None:
                out.append("%s:%d:%d: %s" % (self.path, p["line"], p["column"], p["message"]))
            elif p["pointer"] is not None:
                out.append("%s: %s: %s" % (self.path, p["pointer"], p["message"]))
            else:
                out.append("%s: %s" % (self.path, p["message"]))
        return out


def _probe_files(doc, bad, info):
    """Probe data, tokenizer and callables as the job finds them at setup (Probe.check), and
    the data's JSON line by line (the loader would stop at the first bad line with no name)."""
    from ..probes import Probe
    for name, cfg in (doc.get("probes") or {}).items():
        ptr = "/probes/%s" % name
        try:
            Probe(name, cfg).check()
        except ValueError as e:
            bad.add(ptr, str(e))
            continue
        path = Probe(name, cfg).data_path()
        if path:
            key = "/data" if cfg.get("data") else "/builtin"
            rows, err = _json_lines(path)
            if err:
                bad.add(ptr + key, err)
            elif rows == 0:
                bad.add(ptr + key, "%s has no rows" % path)
            info.setdefault("probes", {})[name] = {"rows": rows}
            if cfg.get("builtin"):
                info["probes"][name]["data"] = path


def _model_view(model_dir):
    """The model of the Hugging Face folder MODEL_DIR, built from its config on the meta device
    (no weights read, no memory taken)."""
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise ValueError("no such folder")
    if not os.path.isfile(cfg_path):
        raise ValueError("no config.json (not a Hugging Face model folder)")
    import torch
    import transformers as T
    from transformers.utils import logging as tlog
    tlog.set_verbosity_error()
    config = T.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):
        try:
            root = T.AutoModelForCausalLM.from_config(config)
        except ValueError:  # not a causal LM: the bare model
            root = T.AutoModel.from_config(config)
    return root


def _resolve_model(doc, model_dir, bad, info):
    """freeze.layers, freeze.params, shaping.layer and probe rows against MODEL_DIR."""
    from ..features.freeze import find_blocks, select_blocks
    from ..runtime.context import strip_name
    try:
        root = _model_view(model_dir)
    except (OSError, ValueError, ImportError) as e:
        bad.add(None, "--model %s: %s" % (model_dir, str(e).splitlines()[0] if str(e) else type(e).__name__))
        return
    names = [strip_name(n) for n, _ in root.named_parameters()]
    blocks = find_blocks(root)
    m = {"model": model_dir, "class": type(root).__name__, "parameters": len(names)}
    if blocks is not None:
        m.update(blocks=blocks.path, count=len(blocks))
    info["model"] = m
    freeze = doc.get("freeze") or {}
    if freeze.get("layers") is not None:
        if blocks is None:
            bad.add("/freeze/layers", "%s has no transformer block list, so the layers cannot be frozen"
                    % type(root).__name__)
        else:
            try:
                ids = select_blocks(freeze["layers"], len(blocks))
                info["freeze_blocks"] = ids
            except ValueError as e:
                bad.add("/freeze/layers", "%s (%s at %s)" % (e, type(root).__name__, blocks.path))
    for i, g in enumerate(freeze.get("params") or []):
        hits = [n for n in names if fnmatch.fnmatchcase(n, g)]
        if not hits:
            bad.add("/freeze/params/%d" % i, "%r matches no parameter of %s (e.g. %s)"
                    % (g, type(root).__name__, names[0] if names else "-"))
        info.setdefault("freeze_params", {})[g] = len(hits)
    sh = doc.get("shaping") or {}
    if sh.get("layer") is not None and blocks is not None and not 0 <= int(sh["layer"]) < len(blocks):
        bad.add("/shaping/layer", "block %s does not exist (the model has %d blocks, 0-%d)"
                % (sh["layer"], len(blocks), len(blocks) - 1))
    _probe_rows(doc, model_dir, bad, info, root)


class _FolderTokenizer:
    """The shipped probes' tokenizer search against a model folder (probes/tokenizer.py: the
    model's config._name_or_path is the folder, then the probe's own tokenizer)."""

    def __init__(self, root, model_dir):
        self.root, self.model_dir = root, model_dir

    def for_probes(self, policy_path=None):
        from ..probes.tokenizer import find
        self.root.config._name_or_path = self.model_dir
        return find(self.root, policy_path)


def _probe_rows(doc, model_dir, bad, info, root=None):
    """Every probe's rows through the probe loader itself (tokenizer, chat template)."""
    from ..probes import Probe
    for name, cfg in (doc.get("probes") or {}).items():
        if not (cfg.get("data") or cfg.get("builtin")) or any(
                p["pointer"] and p["pointer"].startswith("/probes/%s" % name) for p in bad.items):
            continue
        p = Probe(name, cfg, _FolderTokenizer(root, model_dir) if cfg.get("builtin") and root is not None else None)
        try:
            ex = p.examples()
        except Exception as e:  # the loader's own message: what the job would stop with
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            bad.add("/probes/%s" % name, msg)
            continue
        tok = None
        try:
            tok = p.tokenizer()
        except Exception as e:
            bad.add("/probes/%s/tokenizer" % name, str(e).splitlines()[0])
        rec = info.setdefault("probes", {}).setdefault(name, {})
        rec.update(rows=len(ex), tokens=sum(len(e.ids) for e in ex))
        if cfg.get("builtin"):
            rec.update(tokenizer=p.found().source, template=p.found().template)
        vocab = _vocab_size(model_dir)
        top = max((max(e.ids) for e in ex if e.ids), default=-1)
        if vocab is not None and top >= vocab:
            bad.add("/probes/%s/data" % name, "token id %d is outside the model's vocabulary of %d%s"
                    % (top, vocab, " (tokenizer %s)" % cfg["tokenizer"] if cfg.get("tokenizer") else ""))
        if cfg.get("chat_template") and tok is not None and not getattr(tok, "chat_template", None):
            bad.add("/probes/%s/chat_template" % name, "the tokenizer %s has no chat template" % cfg.get("tokenizer"))


def _vocab_size(model_dir):
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    v = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    return v if isinstance(v, int) else None


def check_file(path, model=None, files=True):
    """The check of one policy file: {"file", "ok", "problems": [{pointer, message, line,
    column}], "resolved": {...}, "lines", "policy"} (resolved: probe rows, and with MODEL the
    blocks found and frozen, the parameters the globs match). FILES=False: the schema only."""
    from .. import _core
    bad, info = _Problems(path), {}
    try:
        doc = json.loads(_core.explain_file(path))
    except _core.PolicyError as e:
        bad.core(str(e))
        doc = None
    if doc is not None and (files or model):
        _probe_files(doc, bad, info)
        if model:
            _resolve_model(doc, model, bad, info)
    return {"file": path, "ok": not bad.items, "problems": bad.items, "resolved": info,
            "lines": bad.lines(), "policy": doc}


def problems(path):
    """The problem lines of the policy PATH without a model (what `safehook run` refuses)."""
    return check_file(path)["lines"]


def _ok_line(res):
    r = res["resolved"]
    parts = []
    m = r.get("model")
    if m:
        parts.append("%s, %s" % (m["class"], "%d blocks at %s" % (m["count"], m["blocks"]) if "count" in m
                                 else "no block list"))
    if "freeze_blocks" in r:
        parts.append("freezes blocks %s" % _ranges(r["freeze_blocks"]))
    for g, n in (r.get("freeze_params") or {}).items():
        parts.append("%s matches %d parameters" % (g, n))
    for name, p in sorted((r.get("probes") or {}).items()):
        parts.append("probe %s: %d rows%s" % (name, p["rows"], ", %d tokens" % p["tokens"] if "tokens" in p else ""))
    return "%s: ok%s" % (res["file"], " (%s)" % "; ".join(parts) if parts else "")


def _ranges(ids):
    from . import ranges
    return ranges(ids)


def _default_view(model_dir):
    """The embedded default and its fallback as check --explain shows them: {"default": {origin,
    digest, policy, probes: {name: {builtin, data, rows}}}, "fallback": {...}} and, with
    MODEL_DIR, "model": what the default does for that folder's model (protect: the tokenizer
    and template found; fallback: why)."""
    from .. import _core, data
    out = {}
    for key, fb in (("default", False), ("fallback", True)):
        d = _core.default_policy(fallback=fb)
        doc = json.loads(d["policy"])
        out[key] = {"origin": d["origin"], "digest": d["digest"], "policy": doc}
        shipped = {n: c["builtin"] for n, c in (doc.get("probes") or {}).items() if c.get("builtin")}
        if shipped:
            out[key]["probes"] = {n: {"builtin": s, "data": data.path(s), "rows": len(data.rows(s)),
                                      "limit": doc["probes"][n].get("limit")} for n, s in shipped.items()}
    if model_dir:
        m = {"model": model_dir}
        try:
            root = _model_view(model_dir)
            found = _FolderTokenizer(root, model_dir).for_probes()
            from ..features.freeze import find_blocks
            if find_blocks(root) is None:
                m.update(applied="fallback", reason="%s has no transformer block list" % type(root).__name__)
            else:
                m.update(applied="protect", tokenizer=found.record())
        except Exception as e:  # NotFound, or a folder that is not a model's
            m.update(applied="fallback", reason=str(e).splitlines()[0] if str(e) else type(e).__name__)
        out["model"] = m
    return out


def _explain_default(args):
    """check --explain with no FILE: the policy a job with no SAFEHOOK_POLICY runs: the system
    policy when there is one, else the embedded default with its shipped probes and fallback."""
    from .. import _core
    system = _core.system_policy_state()
    if system["state"] != "none":
        if not args.json:
            print("# the system policy %s (%s) applies to a job that gives no policy of its own"
                  % (system["path"], system["state"]))
        args.files = [system["path"]]
        return _run(args)
    view = _default_view(args.model)
    if args.json:
        print(json.dumps(dict(schema=SCHEMA, ok=True, **view), indent=1, ensure_ascii=False))
        return 0
    d, fb = view["default"], view["fallback"]
    print("# %s: what a job with no policy runs (no user policy, no system policy at %s), for each model"
          % (d["origin"], system["path"]))
    print("# whose tokenizer is found (one the script created, or config._name_or_path); digest %s" % d["digest"])
    for name, p in sorted((d.get("probes") or {}).items()):
        print("# probe %s: builtin %s, %s (%d rows%s)" % (name, p["builtin"], p["data"], p["rows"],
                                                          ", the first %d" % p["limit"] if p["limit"] else ""))
    print(json.dumps(d["policy"], indent=2, ensure_ascii=False))
    print("# %s: for a model it cannot protect (no tokenizer found, no token embedding, no block list); "
          "digest %s" % (fb["origin"], fb["digest"]))
    print(json.dumps(fb["policy"], indent=2, ensure_ascii=False))
    m = view.get("model")
    if m:
        print("# --model %s: %s" % (m["model"], "protected (tokenizer: %s %s, %s)" % (
            m["tokenizer"]["source"], m["tokenizer"]["name"], m["tokenizer"]["template"])
            if m["applied"] == "protect" else "falls back: %s" % m["reason"]))
    return 0


def _run(args):
    if not args.files:
        if not args.explain:
            import sys
            sys.stderr.write("safehook check: give FILE..., or --explain alone for the default policy\n")
            return 2
        return _explain_default(args)
    results = [check_file(f, args.model, files=not args.schema_only) for f in args.files]
    bad = sum(not r["ok"] for r in results)
    if args.json:
        doc = {"schema": SCHEMA, "ok": not bad, "model": args.model,
               "files": [{k: r[k] for k in ("file", "ok", "problems", "resolved")} for r in results]}
        if args.explain:
            for d, r in zip(doc["files"], results):
                d["policy"] = r["policy"]
        print(json.dumps(doc, indent=1, ensure_ascii=False))
        return 2 if bad else 0
    for r in results:
        for line in r["lines"]:
            print(line)
        if not r["ok"]:
            continue
        if args.explain:
            if len(args.files) > 1:
                print("# %s" % r["file"])
            # Python prints reals in their shortest exact form (0.1, not 0.10000000000000001)
            print(json.dumps(r["policy"], indent=2, ensure_ascii=False))
        else:
            print(_ok_line(r))
    return 2 if bad else 0


def register(sub):
    s = sub.add_parser("check", help="validate policy files (and resolve them against a model)",
                       description="Validate policies: 'FILE: ok' and exit 0 when all are valid, else 2 with one "
                                   "line per problem ('FILE:LINE:COLUMN: message' for JSON syntax, "
                                   "'FILE: /json/pointer: message' for the schema and for the files the policy "
                                   "names: probe data (DATA:LINE), tokenizers, callables). --model DIR also "
                                   "resolves layer ranges, parameter globs and probe rows against a model folder.")
    s.add_argument("--explain", action="store_true",
                   help="print each valid policy normalized, with every default filled in; with no FILE, the "
                        "policy a job with no policy runs (the embedded default, its shipped probes' files and "
                        "its fallback, or the system policy)")
    s.add_argument("--model", metavar="DIR", help="a Hugging Face model folder to resolve the policy against")
    s.add_argument("--schema-only", action="store_true",
                   help="check the schema only, not the files the policy names (templates, policies for another host)")
    s.add_argument("--json", action="store_true", help="print one JSON document (schema %s)" % SCHEMA)
    s.add_argument("files", nargs="*", metavar="FILE")
    s.set_defaults(func=_run)
