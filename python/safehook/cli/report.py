"""safehook report AUDIT.jsonl [-o FILE.png] [--json]: what safehook did during a run.

The summary reads the audit log's records: what was frozen (the freeze records, and the end
record's checks), steps (and their SafeGrad fields ``cosine`` and ``projected``, found at the
top of the step record or in a sub-object), gate decisions, the monitor's probe scores against
the baseline, rollbacks (with the steps that came just before each drop), shaping's stopped
examples (each counted once, by its last flag record: cli/audit.py's counts(), the demo's
rule too), violations and errors, then the record counts. With ``-o`` it also draws, over
steps, the safety score (with the baseline and the limit), the conflict cosine, gate skips,
the safety loss of the step records (a third panel, when they carry one), and rollbacks as
vertical lines (matplotlib, Agg backend). The PNG carries the lengths of the plotted series in a
text chunk ``safehook-series`` (JSON), so that a test or a script can check what was drawn.
A file that is not an audit log is refused (exit 2).
"""
import json
import sys

from .audit import FLAG_RULE, NotAnAuditLog, counts, flag_decisions, load  # noqa: F401

SCHEMA = "safehook.report/1"


def _find(rec, key):
    """rec[key], or the first sub-object's key (features nest their step fields)."""
    if key in rec:
        return rec[key]
    for v in rec.values():
        if isinstance(v, dict) and key in v:
            return v[key]
    return None


def series(recs):
    """The data the report draws: {"score": [(step, score)], "baseline": float or None,
    "limit": float or None, "cosine": [(step, cos)], "projected": [step], "rollbacks":
    [(step, to_step)], "ends": [(step, "stop" or "abort")], "gate_skips": [step], "gate_scales": [step],
    "gate_shrinks": [step], "safety_loss": [(step, loss)]}. The safety loss is the step record's
    (SafeGrad's probe loss, or the gate's when SafeGrad did not compute one)."""
    out = {"score": [], "baseline": None, "limit": None, "cosine": [], "projected": [], "rollbacks": [],
           "ends": [], "gate_skips": [], "gate_scales": [], "gate_shrinks": [], "safety_loss": []}
    for r in recs:
        ev, step = r["event"], r.get("step")
        if ev == "probe" and _is_num(r.get("score")) and r.get("what") is None:
            out["score"].append((step, r["score"]))
            if r.get("action") == "baseline":
                out["baseline"], out["limit"] = r.get("baseline"), r.get("limit")
            elif r.get("action") in ("stop", "abort"):
                out["ends"].append((step, r["action"]))
        elif ev == "step":
            c = _find(r, "cosine")
            if _is_num(c):
                out["cosine"].append((step, c))
            if _projected(_find(r, "projected")):
                out["projected"].append(step)
            loss = r.get("safety_loss")
            if not _is_num(loss) and isinstance(r.get("gate"), dict):
                loss = r["gate"].get("loss")
            if _is_num(loss):
                out["safety_loss"].append((step, loss))
        elif ev == "rollback":
            out["rollbacks"].append((step, r.get("to_step")))
        elif ev == "gate":
            key = {"skip": "gate_skips", "shrink": "gate_shrinks"}.get(r.get("action"), "gate_scales")
            out[key].append(step)
    return out


def _is_num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _projected(v):
    """SafeGrad's "projected": a bool (and, in logs before groups_projected, a group count)."""
    return v is True or (_is_num(v) and v > 0)


def _posthoc_groups(recs):
    """(posthoc_start record, the records after it up to the next start) for each post-hoc run."""
    for i, r in enumerate(recs):
        if r["event"] != "posthoc_start":
            continue
        run = []
        for x in recs[i + 1:]:
            if x["event"] == "posthoc_start":
                break
            run.append(x)
        yield r, run


def posthoc_summary(recs):
    """Lines for the records of `safehook harden` / `safehook restore` (posthoc_* events)."""
    lines = []
    for r, run in _posthoc_groups(recs):
        m, p = r.get("method"), r.get("params") or {}
        ts = [x for x in run if x["event"] == "posthoc_tensor"]
        ch = [x for x in ts if x.get("changed")]
        end = next((x for x in run if x["event"] == "posthoc_end"), None)
        what = {"lox": "harden (LoX, rank %s, alpha %s)" % (p.get("rank") or "full", p.get("alpha")),
                "safelora": "restore (Safe LoRA, %s)" % ("%s least similar layers" % p["layers"]
                                                          if p.get("layers") else
                                                          "threshold %s" % p.get("threshold")),
                "nlsr": "restore (NLSR, %s%% neurons, p in [%s, %s], seed %s, %s direction)" % (
                    round(100 * (p.get("neuron_fraction") or 0)), _span(p, "rate", -1, "epsilon"),
                    _span(p, "rate", 1, "epsilon"), p.get("seed"), p.get("direction"))}.get(m, m)
        lines.append("posthoc: %s -> %s" % (what, p.get("out")))
        lines.append("  %d tensors considered, %d changed%s" % (
            len(ts), len(ch), "" if end else " (no end record: interrupted)"))
        if end and end.get("status") not in (None, "ok"):
            lines.append("  status: %s" % end.get("status"))
        sims = [x["similarity"] for x in ts if isinstance(x.get("similarity"), (int, float))]
        if sims:
            lines.append("  similarity: min %.3f, mean %.3f, max %.3f" % (
                min(sims), sum(sims) / len(sims), max(sims)))
        if m == "lox" and ch:
            ek = [x["energy_kept"] for x in ch if isinstance(x.get("energy_kept"), (int, float))]
            lines.append("  added norm / delta norm: mean %.3f; energy of dW kept: mean %.3f" % (
                sum(x.get("norm_added", 0) / x["norm_delta"] for x in ch if x.get("norm_delta"))
                / len(ch), sum(ek) / len(ek) if ek else float("nan")))
        for x in ch[:12] if m != "lox" else []:
            lines.append("  %-48s similarity %s%s" % (
                x.get("name"), "%.3f" % x["similarity"] if isinstance(x.get("similarity"), (int, float)) else "-",
                ", %d neurons" % x["neurons"] if "neurons" in x else ""))
        if m != "lox" and len(ch) > 12:
            lines.append("  ... and %d more" % (len(ch) - 12))
    return lines


def _span(p, a, sign, b):
    try:
        return round(p[a] + sign * p[b], 6)
    except (KeyError, TypeError):
        return None


def data(recs, bad=0):
    """The report as one JSON-able dict (schema safehook.report/1; docs/cli.md lists the keys)."""
    c = counts(recs)
    out = {"schema": SCHEMA, "kind": "training", "records": len(recs), "unreadable": bad, "counts": c}
    if any(r["event"].startswith("posthoc_") for r in recs) and not any(
            r["event"] in ("start", "step", "end") for r in recs):
        out["kind"] = "posthoc"
    out["posthoc"] = _posthoc_runs(recs)
    starts = [r for r in recs if r["event"] == "start"]
    ends = [r for r in recs if r["event"] == "end"]
    steps = [r for r in recs if r["event"] == "step"]
    s0 = starts[0] if starts else {}
    out["run"] = ({"policy": s0.get("policy"), "digest": s0.get("digest"), "enforce": bool(s0.get("enforce")),
                   "versions": s0.get("versions")} if starts else None)
    nsteps = ends[-1].get("steps") if ends else (max((r.get("step") or 0) for r in steps) if steps else 0)
    out["steps"] = {"count": nsteps, "records": len(steps), "ended": bool(ends)}
    out["freeze"] = _freeze(recs, steps, ends)
    s = series(recs)
    out["safegrad"] = None
    if s["cosine"]:
        cs = [x for _, x in s["cosine"]]
        out["safegrad"] = {"measured": len(cs), "conflicts": sum(x < 0 for x in cs), "projected": len(s["projected"]),
                           "cosine_min": min(cs), "cosine_mean": sum(cs) / len(cs)}
    out["safety_loss"] = ({"points": len(s["safety_loss"]), "first": s["safety_loss"][0][1],
                           "last": s["safety_loss"][-1][1], "max": max(v for _, v in s["safety_loss"])}
                          if s["safety_loss"] else None)
    out["gate"] = _gate(recs, steps, s)
    out["monitor"] = _monitor(recs)
    out["rollbacks"] = [{"step": r.get("step"), "to_step": r.get("to_step"), "score": r.get("score"),
                         "limit": r.get("limit"), "suspect_steps": r.get("suspect_steps") or [],
                         "rows": sum(len(e.get("rows", [])) for e in r.get("suspects") or [])}
                        for r in recs if r["event"] == "rollback"]
    out["shaping"] = _shaping_data(recs, steps)
    kinds = {}
    for r in recs:
        if r["event"] == "violation":
            kinds[r.get("what")] = kinds.get(r.get("what"), 0) + 1
    out["violations"] = {"count": sum(kinds.values()), "by_kind": kinds}
    out["errors"] = [{"step": r.get("step"), "message": r.get("message")} for r in recs if r["event"] == "error"]
    return out


def _freeze(recs, steps, ends):
    """What was frozen (one entry per bound model) and what the checks found."""
    models = []
    for r in recs:
        if r["event"] != "freeze":
            continue
        b = r.get("blocks") or {}
        models.append({"model": r.get("model"), "blocks": b.get("path"), "count": b.get("count"),
                       "frozen_blocks": r.get("frozen_blocks"), "params": r.get("params") or [],
                       "tensors": r.get("tensors"), "numel": r.get("numel"), "mode": r.get("mode"),
                       "when": r.get("when"), "error": r.get("error"), "note": r.get("note")})
    checks = {}
    for r in steps:
        if r.get("freeze_check") is not None:
            checks[r["freeze_check"]] = checks.get(r["freeze_check"], 0) + 1
    end = (ends[-1].get("freeze") if ends and isinstance(ends[-1].get("freeze"), dict) else None)
    if not models and end is None:
        return None
    return {"models": models, "step_checks": checks, "end": end}


def _gate(recs, steps, s):
    gated = [r for r in steps if isinstance(r.get("gate"), dict)]
    if not (gated or s["gate_skips"] or s["gate_scales"] or s["gate_shrinks"]):
        return None
    inf = sum(1 for r in gated if r["gate"].get("found_inf"))
    streaks = [r for r in recs if r["event"] == "gate" and isinstance(r.get("streak"), int)]
    top = max(streaks, key=lambda r: r["streak"]) if streaks else None
    return {"checked": len(gated) - inf, "allowed": sum(1 for r in gated if r["gate"].get("action") == "allow"),
            "shrunk": len(s["gate_shrinks"]), "scaled": len(s["gate_scales"]), "skipped": len(s["gate_skips"]),
            "nonfinite_left": inf, "longest_skip_streak": top["streak"] if top else 0,
            "longest_skip_streak_to": top.get("step") if top else None,
            "stalled": any(r.get("stalled") for r in streaks)}


def _monitor(recs):
    probes = [r for r in recs if r["event"] == "probe" and "score" in r and r.get("what") is None]
    if not probes:
        return None
    base = next((r for r in probes if r.get("action") == "baseline"), None)
    return {"probe": (base or probes[0]).get("probe"), "baseline": base["score"] if base else None,
            "limit": base.get("limit") if base else None,
            "evaluations": [{"step": r.get("step"), "score": r["score"], "ratio": r.get("ratio"),
                             "passed": bool(r.get("passed")), "action": r.get("action")}
                            for r in probes if r.get("action") != "baseline"]}


def _shaping_data(recs, steps):
    cal = [r for r in recs if r["event"] == "probe" and r.get("what") == "shaping calibration"]
    shaped = [r["shaping"] for r in steps if isinstance(r.get("shaping"), dict)]
    last = flag_decisions(recs)
    if not (cal or last or shaped):
        return None
    stopped = [r for r in last.values() if not r.get("revoked")]
    return {"flag_records": sum(1 for r in recs if r["event"] == "flag"),
            "examples_stopped": len(stopped), "examples_withdrawn": len(last) - len(stopped), "rule": FLAG_RULE,
            "action": cal[0].get("action") if cal else None,
            "totals": ({k: sum(x.get(k, 0) for x in shaped) for k in ("seen", "new", "flagged", "rewritten",
                                                                       "masked_tokens")} if shaped else None),
            "stopped": [{k: r.get(k) for k in ("step", "fingerprint", "guard", "score", "threshold", "action")}
                        for r in stopped]}


def _posthoc_runs(recs):
    runs = []
    for r, run in _posthoc_groups(recs):
        ts = [x for x in run if x["event"] == "posthoc_tensor"]
        end = next((x for x in run if x["event"] == "posthoc_end"), None)
        runs.append({"method": r.get("method"), "params": r.get("params") or {}, "tensors": len(ts),
                     "changed": sum(1 for x in ts if x.get("changed")), "status": end.get("status") if end else None,
                     "ended": end is not None})
    return runs


def summary(recs, bad=0):
    """The report's lines."""
    lines = posthoc_summary(recs)
    d = data(recs, bad)
    if d["kind"] == "posthoc":
        return lines + (["(%d unreadable lines skipped)" % bad] if bad else [])
    if d["run"]:
        lines.append("run: policy %s (digest %s)%s" % (d["run"]["policy"], d["run"]["digest"],
                                                      ", enforced" if d["run"]["enforce"] else ""))
    st = d["steps"]
    lines.append("steps: %s%s (%d step records)" % (st["count"], "" if st["ended"] else
                                                     " (no end record: still running or killed)", st["records"]))
    lines += _freeze_lines(d["freeze"])
    sg = d["safegrad"]
    if sg:
        lines.append("safegrad: %d steps measured, %d conflicts (cosine < 0), %d projected; cosine min %.3f, mean %.3f"
                     % (sg["measured"], sg["conflicts"], sg["projected"], sg["cosine_min"], sg["cosine_mean"]))
    sl = d["safety_loss"]
    if sl:
        lines.append("safety loss: %d steps, %.4g at the first, %.4g at the last, max %.4g"
                     % (sl["points"], sl["first"], sl["last"], sl["max"]))
    g = d["gate"]
    if g:
        lines.append("gate: %d steps checked: %d allowed, %d shrunk, %d scaled, %d skipped%s"
                     % (g["checked"], g["allowed"], g["shrunk"], g["scaled"], g["skipped"],
                        "; %d steps with inf/NaN gradients left to the optimizer (GradScaler)" % g["nonfinite_left"]
                        if g["nonfinite_left"] else ""))
        if g["longest_skip_streak"]:
            lines.append("  longest run of skipped updates: %d (to step %s)%s"
                         % (g["longest_skip_streak"], g["longest_skip_streak_to"],
                            "; training stood still: the optimizer's momentum points against the probe "
                            "(try gate.action 'shrink', the default)" if g["stalled"] else ""))
    m = d["monitor"]
    if m:
        if m["baseline"] is not None:
            lines.append("monitor: probe '%s', baseline %.4f at step 0, limit %.4f"
                         % (m["probe"], m["baseline"], m["limit"] if _is_num(m["limit"]) else float("nan")))
        for e in m["evaluations"]:
            rel = (" (%.3f x baseline)" % e["ratio"] if _is_num(e["ratio"])
                   else " (%+.4f vs baseline)" % (e["score"] - m["baseline"]) if m["baseline"] is not None else "")
            lines.append("  step %-6s score %.4f%s  %s%s" % (
                e["step"], e["score"], rel, "ok" if e["passed"] else "DROP",
                "" if e["passed"] else " -> " + str(e["action"])))
    if d["rollbacks"]:
        lines.append("rollbacks: %d" % len(d["rollbacks"]))
        for r in d["rollbacks"]:
            lines.append("  step %s -> step %s (score %.4f, limit %.4f); suspect steps %s, %d batch rows fingerprinted"
                         % (r["step"], r["to_step"], _f(r["score"]), _f(r["limit"]), _ranges(r["suspect_steps"]),
                            r["rows"]))
    lines += _shaping(recs, [r for r in recs if r["event"] == "step"])
    v = d["violations"]
    lines.append("violations: %d%s" % (v["count"], " (%s)" % ", ".join("%s: %d" % kv for kv in v["by_kind"].items())
                                       if v["count"] else ""))
    for e in d["errors"]:
        lines.append("error at step %s: %s" % (e["step"] if e["step"] is not None else "-", e["message"]))
    lines.append(_counts_line(d["counts"]))
    if bad:
        lines.append("(%d unreadable lines skipped)" % bad)
    return lines


def _f(x):
    return x if _is_num(x) else float("nan")


def _freeze_lines(fz):
    if not fz:
        return []
    out = []
    for m in fz["models"]:
        if m["error"]:
            out.append("freeze: %s: not applied: %s" % (m["model"], m["error"]))
            continue
        what = []
        if m["frozen_blocks"]:
            what.append("blocks %s of %s[0-%s]" % (_ranges(m["frozen_blocks"]), m["blocks"],
                                                   (m["count"] - 1) if isinstance(m["count"], int) else "?"))
        if m["params"]:
            what.append("params %s" % ", ".join(m["params"]))
        out.append("freeze: %s: %s: %s tensors, %s values (%s, bound at %s)%s" % (
            m["model"], "; ".join(what) or "nothing", m["tensors"], _thousands(m["numel"]), m["mode"], m["when"],
            "; " + m["note"] if m["note"] else ""))
    end, checks = fz["end"], fz["step_checks"]
    if end:
        out.append("  checks: %s (%s), %s changed, %s restored, %s violations, %s gradients dropped" % (
            end.get("checks"), ", ".join("%d %s" % (n, k) for k, n in sorted(checks.items())) or "at exit",
            end.get("changed"), end.get("restored"), end.get("violations"), end.get("dropped_grads")))
    elif checks:
        out.append("  checks during steps: %s (no end record)" % ", ".join("%d %s" % (n, k)
                                                                         for k, n in sorted(checks.items())))
    return out


def _thousands(n):
    return "{:,}".format(n) if isinstance(n, int) else "-"


def _counts_line(c):
    ev = c["events"]
    parts = ["%s %d" % (k, v) for k, v in sorted(ev.items()) if k not in ("start", "end", "step", "optimizer", "flag")]
    parts += ["%s %d" % (k, v) for k, v in sorted(c["step_flags"].items()) if k != "safety_refreshed"]
    if ev.get("flag"):
        parts.append("flagged examples %d (%d withdrawn; %s; %d flag records)" % (
            c["examples_flagged"], c["examples_withdrawn"], c["flag_rule"], ev["flag"]))
    return "counts: %s" % (", ".join(parts) or "no interventions")


def _shaping(recs, steps, limit=50):
    """The shaping feature: calibration, totals, and the examples it stopped."""
    out = []
    cal = [r for r in recs if r["event"] == "probe" and r.get("what") == "shaping calibration"]
    shaped = [r["shaping"] for r in steps if isinstance(r.get("shaping"), dict)]
    last = flag_decisions(recs)
    if not (cal or last or shaped):
        return out
    if cal:
        c = cal[0]
        parts = []
        for g, v in sorted((c.get("calibration") or {}).items()):
            desc = "%s threshold %s" % (g, _num(v.get("threshold")))
            if v.get("layer") is not None:
                desc += " (block %s)" % v["layer"]
            if v.get("tpr") is not None or v.get("fpr") is not None:
                desc += " (probe TPR %s, FPR %s)" % (_num(v.get("tpr")), _num(v.get("fpr")))
            parts.append(desc)
        out.append("shaping: action %s; %s" % (c.get("action"), "; ".join(parts)))
    if shaped:
        tot = {k: sum(s.get(k, 0) for s in shaped) for k in ("seen", "new", "flagged", "rewritten", "masked_tokens")}
        out.append("  over %d steps: %d rows seen (%d new), %d flagged, %d rewritten into refusals, %d tokens masked"
                   % (len(shaped), tot["seen"], tot["new"], tot["flagged"], tot["rewritten"], tot["masked_tokens"]))
    for c in [r for r in recs if r["event"] == "probe" and r.get("what") == "shaping stream check"]:
        parts = []
        for g, v in sorted((c.get("guards") or {}).items()):
            parts.append("%s %s (AUROC vs probe %s, threshold %s)" % (
                g, "suspended" if v.get("suspended") else "active", _num(v.get("auroc_vs_probe")),
                _num(v.get("threshold"))))
        out.append("  stream check at step %s (at most %s of the rows flagged): %s; %d decisions withdrawn"
                   % (c.get("step"), _num(c.get("max_flag_rate")), "; ".join(parts), c.get("revoked") or 0))
    revoked = sum(1 for r in last.values() if r.get("revoked"))
    flags = [r for r in last.values() if not r.get("revoked")]
    out.append("  stopped examples: %d (%d withdrawn by the stream check); %s" % (len(flags), revoked, FLAG_RULE))
    for r in flags[:limit]:
        out.append("    step %-6s %s  %-9s score %s (threshold %s) -> %s" % (
            r.get("step"), r.get("fingerprint"), r.get("guard"), _num(r.get("score")), _num(r.get("threshold")),
            r.get("action")))
    if len(flags) > limit:
        out.append("    ... and %d more (every one is a 'flag' record of the log)" % (len(flags) - limit))
    return out


def _num(x):
    return "%.4g" % x if _is_num(x) else "-"


def _ranges(steps):
    from . import ranges
    return ranges(steps, "-")


def plot(recs, path):
    """Draw the series into PATH (PNG). Returns the {series: length} written into the PNG
    ("safety_loss" only when the step records carry a safety loss: its panel is drawn then)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = series(recs)
    lengths = {"score": len(s["score"]), "cosine": len(s["cosine"]), "rollbacks": len(s["rollbacks"]),
               "gate_skips": len(s["gate_skips"])}
    panels = 3 if s["safety_loss"] else 2
    if panels == 3:
        lengths["safety_loss"] = len(s["safety_loss"])
    fig, axes = plt.subplots(panels, 1, sharex=True, figsize=(9, 3 * panels))
    ax = axes[0]
    if s["score"]:
        ax.plot([p[0] for p in s["score"]], [p[1] for p in s["score"]], "o-", color="tab:blue", label="safety score")
    if s["baseline"] is not None:
        ax.axhline(s["baseline"], color="tab:green", ls="--", lw=1, label="baseline")
    if s["limit"] is not None:
        ax.axhline(s["limit"], color="tab:red", ls=":", lw=1, label="limit")
    ax.set_ylabel("probe score (higher is safer)")
    ax = axes[1]
    if s["cosine"]:
        ax.plot([p[0] for p in s["cosine"]], [p[1] for p in s["cosine"]], lw=1, color="tab:purple",
                label="conflict cosine")
        ax.axhline(0, color="grey", lw=0.5)
    if s["gate_skips"]:
        ax.plot(s["gate_skips"], [0] * len(s["gate_skips"]), "x", color="tab:orange", label="gate skip")
    ax.set_ylabel("cosine(task, safety)")
    if panels == 3:
        ax = axes[2]
        ax.plot([p[0] for p in s["safety_loss"]], [p[1] for p in s["safety_loss"]], ".-", lw=1, color="tab:brown",
                label="safety loss (probe)")
        ax.set_ylabel("safety loss (lower is safer)")
    axes[-1].set_xlabel("step")
    for a in axes:
        for i, (step, _) in enumerate(s["rollbacks"]):
            a.axvline(step, color="tab:red", lw=1.2, alpha=0.7, label="rollback" if i == 0 else None)
        for step, what in s["ends"]:
            a.axvline(step, color="black", ls="--", lw=1.2,
                      label="training " + ("stopped" if what == "stop" else "aborted"))
        if a.get_legend_handles_labels()[0]:
            a.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    fig.suptitle("safehook: safety during training")
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"safehook-series": json.dumps(lengths, sort_keys=True)})
    plt.close(fig)
    return lengths


def _run(args):
    try:
        recs, bad = load(args.audit)
    except NotAnAuditLog as e:
        print("safehook report: %s" % e, file=sys.stderr)
        return 2
    except OSError as e:
        print("safehook report: cannot read %s: %s" % (args.audit, e.strerror), file=sys.stderr)
        return 2
    lengths = None
    if args.output:
        try:
            lengths = plot(recs, args.output)
        except ImportError:
            print("safehook report: -o needs matplotlib (pip install 'safehook[demo]')", file=sys.stderr)
            return 2
        except OSError as e:
            print("safehook report: cannot write %s: %s" % (args.output, e.strerror), file=sys.stderr)
            return 2
    if args.json:
        d = data(recs, bad)
        d["file"] = args.audit
        d["plot"] = {"path": args.output, "series": lengths} if args.output else None
        print(json.dumps(d, indent=1, sort_keys=False))
        return 0
    for line in summary(recs, bad):
        print(line)
    if args.output:
        print("plot: %s (%s)" % (args.output, ", ".join("%s %d" % kv for kv in sorted(lengths.items()))))
    return 0


def register(sub):
    s = sub.add_parser("report", help="summarize an audit log (and plot it)",
                       description="Summarize what safehook did in a run from its audit log: what was frozen, "
                                   "steps, SafeGrad conflicts and projections, the safety loss, gate decisions, "
                                   "probe scores against the baseline, rollbacks, shaping's stopped examples "
                                   "(each counted once), violations, record counts. -o draws the safety score, "
                                   "conflict cosine, safety loss and rollbacks over steps. Exit 2 for a file "
                                   "that is not an audit log.")
    s.add_argument("audit", metavar="AUDIT.jsonl")
    s.add_argument("-o", "--output", metavar="FILE.png", help="write a plot (PNG)")
    s.add_argument("--json", action="store_true", help="print the report as one JSON document (schema %s)" % SCHEMA)
    s.set_defaults(func=_run)
