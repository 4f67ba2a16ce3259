"""safehook report AUDIT.jsonl [-o FILE.png]: what safehook did during a run.

The summary reads the audit log's records: steps (and their SafeGrad fields ``cosine`` and
``projected``, found at the top of the step record or in a sub-object), gate decisions, the
monitor's probe scores against the baseline, rollbacks (with the steps that came just before
each drop), violations and errors. With ``-o`` it also draws, over steps, the safety score
(with the baseline and the limit), the conflict cosine, gate skips, and rollbacks as vertical
lines (matplotlib, Agg backend). The PNG carries the lengths of the plotted series in a text
chunk ``safehook-series`` (JSON), so that a test or a script can check what was drawn.
"""
import json
import sys


def load(path):
    """(records, number of unreadable lines)."""
    recs, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(r, dict) and "event" in r:
                recs.append(r)
            else:
                bad += 1
    return recs, bad


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
    "gate_shrinks": [step]}."""
    out = {"score": [], "baseline": None, "limit": None, "cosine": [], "projected": [], "rollbacks": [],
           "ends": [], "gate_skips": [], "gate_scales": [], "gate_shrinks": []}
    for r in recs:
        ev, step = r["event"], r.get("step")
        if ev == "probe" and isinstance(r.get("score"), (int, float)):
            out["score"].append((step, r["score"]))
            if r.get("action") == "baseline":
                out["baseline"], out["limit"] = r.get("baseline"), r.get("limit")
            elif r.get("action") in ("stop", "abort"):
                out["ends"].append((step, r["action"]))
        elif ev == "step":
            c = _find(r, "cosine")
            if isinstance(c, (int, float)) and not isinstance(c, bool):
                out["cosine"].append((step, c))
            pr = _find(r, "projected")  # SafeGrad: a bool, or the number of groups projected
            if pr is True or (isinstance(pr, int) and not isinstance(pr, bool) and pr > 0):
                out["projected"].append(step)
        elif ev == "rollback":
            out["rollbacks"].append((step, r.get("to_step")))
        elif ev == "gate":
            key = {"skip": "gate_skips", "shrink": "gate_shrinks"}.get(r.get("action"), "gate_scales")
            out[key].append(step)
    return out


def posthoc_summary(recs):
    """Lines for the records of `safehook harden` / `safehook restore` (posthoc_* events)."""
    lines = []
    for i, r in enumerate(recs):
        if r["event"] != "posthoc_start":
            continue
        run = []
        for x in recs[i + 1:]:
            if x["event"] == "posthoc_start":
                break
            run.append(x)
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


def summary(recs, bad=0):
    lines = posthoc_summary(recs)
    if lines and not any(r["event"] in ("start", "step", "end") for r in recs):
        return lines + (["(%d unreadable lines skipped)" % bad] if bad else [])
    starts = [r for r in recs if r["event"] == "start"]
    ends = [r for r in recs if r["event"] == "end"]
    steps = [r for r in recs if r["event"] == "step"]
    if starts:
        s = starts[0]
        lines.append("run: policy %s (digest %s)%s" % (s.get("policy"), s.get("digest"),
                                                      ", enforced" if s.get("enforce") else ""))
    nsteps = ends[-1].get("steps") if ends else (max((r.get("step") or 0) for r in steps) if steps else 0)
    lines.append("steps: %s%s (%d step records)" % (nsteps, "" if ends else " (no end record: still running or killed)",
                                                     len(steps)))
    s = series(recs)
    if s["cosine"]:
        cs = [c for _, c in s["cosine"]]
        lines.append("safegrad: %d steps measured, %d conflicts (cosine < 0), %d projected; cosine min %.3f, mean %.3f"
                     % (len(cs), sum(c < 0 for c in cs), len(s["projected"]), min(cs), sum(cs) / len(cs)))
    gated = [r for r in steps if isinstance(r.get("gate"), dict)]
    if gated or s["gate_skips"] or s["gate_scales"] or s["gate_shrinks"]:
        inf = sum(1 for r in gated if r["gate"].get("found_inf"))
        lines.append("gate: %d steps checked: %d allowed, %d shrunk, %d scaled, %d skipped%s"
                     % (len(gated) - inf, sum(1 for r in gated if r["gate"].get("action") == "allow"),
                        len(s["gate_shrinks"]), len(s["gate_scales"]), len(s["gate_skips"]),
                        "; %d steps with inf/NaN gradients left to the optimizer (GradScaler)" % inf if inf else ""))
        streaks = [r for r in recs if r["event"] == "gate" and isinstance(r.get("streak"), int)]
        if streaks:
            top = max(streaks, key=lambda r: r["streak"])
            lines.append("  longest run of skipped updates: %d (to step %s)%s"
                         % (top["streak"], top.get("step"),
                            "; training stood still: the optimizer's momentum points against the probe "
                            "(try gate.action 'shrink', the default)" if any(r.get("stalled") for r in streaks) else ""))
    probes = [r for r in recs if r["event"] == "probe" and "score" in r]  # the monitor's
    if probes:
        base = next((r for r in probes if r.get("action") == "baseline"), None)
        if base:
            lines.append("monitor: probe '%s', baseline %.4f at step 0, limit %.4f"
                         % (base.get("probe"), base["score"], base.get("limit", float("nan"))))
        for r in probes:
            if r.get("action") == "baseline":
                continue
            ratio = r.get("ratio")
            rel = (" (%.3f x baseline)" % ratio if isinstance(ratio, (int, float))
                   else " (%+.4f vs baseline)" % (r["score"] - base["score"]) if base else "")
            lines.append("  step %-6s score %.4f%s  %s%s" % (
                r.get("step"), r["score"], rel,
                "ok" if r.get("passed") else "DROP",
                "" if r.get("passed") else " -> " + str(r.get("action"))))
    rbs = [r for r in recs if r["event"] == "rollback"]
    if rbs:
        lines.append("rollbacks: %d" % len(rbs))
        for r in rbs:
            sus = r.get("suspects") or []
            rows = sum(len(e.get("rows", [])) for e in sus)
            lines.append("  step %s -> step %s (score %.4f, limit %.4f); suspect steps %s, %d batch rows fingerprinted"
                         % (r.get("step"), r.get("to_step"), r.get("score", float("nan")), r.get("limit", float("nan")),
                            _ranges(r.get("suspect_steps") or []), rows))
    lines += _shaping(recs, steps)
    viol = [r for r in recs if r["event"] == "violation"]
    if viol:
        kinds = {}
        for r in viol:
            kinds[r.get("what")] = kinds.get(r.get("what"), 0) + 1
        lines.append("violations: %d (%s)" % (len(viol), ", ".join("%s: %d" % kv for kv in kinds.items())))
    else:
        lines.append("violations: 0")
    for r in recs:
        if r["event"] == "error":
            lines.append("error at step %s: %s" % (r.get("step", "-"), r.get("message")))
    if bad:
        lines.append("(%d unreadable lines skipped)" % bad)
    return lines


def _shaping(recs, steps, limit=50):
    """The shaping feature: calibration, totals, and the examples it stopped."""
    out = []
    cal = [r for r in recs if r["event"] == "probe" and r.get("what") == "shaping calibration"]
    flags = [r for r in recs if r["event"] == "flag"]
    shaped = [r["shaping"] for r in steps if isinstance(r.get("shaping"), dict)]
    if not (cal or flags or shaped):
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
    # an example's last flag record is its decision (the stream check may withdraw or change it)
    last = {}
    for r in flags:
        last[r.get("fingerprint")] = r
    revoked = sum(1 for r in last.values() if r.get("revoked"))
    flags = [r for r in last.values() if not r.get("revoked")]
    out.append("  stopped examples: %d (%d withdrawn by the stream check)" % (len(flags), revoked))
    for r in flags[:limit]:
        out.append("    step %-6s %s  %-9s score %s (threshold %s) -> %s" % (
            r.get("step"), r.get("fingerprint"), r.get("guard"), _num(r.get("score")), _num(r.get("threshold")),
            r.get("action")))
    if len(flags) > limit:
        out.append("    ... and %d more (every one is a 'flag' record of the log)" % (len(flags) - limit))
    return out


def _num(x):
    return "%.4g" % x if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def _ranges(steps):
    if not steps:
        return "-"
    steps = sorted(steps)
    out, a, b = [], steps[0], steps[0]
    for s in steps[1:]:
        if s == b + 1:
            b = s
            continue
        out.append("%d-%d" % (a, b) if a != b else str(a))
        a = b = s
    out.append("%d-%d" % (a, b) if a != b else str(a))
    return ",".join(out)


def plot(recs, path):
    """Draw the series into PATH (PNG). Returns the {series: length} written into the PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = series(recs)
    lengths = {"score": len(s["score"]), "cosine": len(s["cosine"]), "rollbacks": len(s["rollbacks"]),
               "gate_skips": len(s["gate_skips"])}
    fig, axes = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
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
    ax.set_xlabel("step")
    for a in axes:
        for i, (step, _) in enumerate(s["rollbacks"]):
            a.axvline(step, color="tab:red", lw=1.2, alpha=0.7, label="rollback" if i == 0 else None)
        for step, what in s["ends"]:
            a.axvline(step, color="black", ls="--", lw=1.2, label="training " + ("stopped" if what == "stop" else "aborted"))
        if a.get_legend_handles_labels()[0]:
            a.legend(loc="best", fontsize=8)
    fig.suptitle("safehook: safety during training")
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"safehook-series": json.dumps(lengths, sort_keys=True)})
    plt.close(fig)
    return lengths


def _run(args):
    try:
        recs, bad = load(args.audit)
    except OSError as e:
        print("safehook report: cannot read %s: %s" % (args.audit, e.strerror), file=sys.stderr)
        return 2
    for line in summary(recs, bad):
        print(line)
    if args.output:
        lengths = plot(recs, args.output)
        print("plot: %s (%s)" % (args.output, ", ".join("%s %d" % kv for kv in sorted(lengths.items()))))
    return 0


def register(sub):
    s = sub.add_parser("report", help="summarize an audit log (and plot it)",
                       description="Summarize what safehook did in a run from its audit log: steps, SafeGrad "
                                   "conflicts and projections, gate decisions, probe scores against the baseline, "
                                   "rollbacks, violations. -o draws the safety score, conflict cosine and "
                                   "rollbacks over steps.")
    s.add_argument("audit", metavar="AUDIT.jsonl")
    s.add_argument("-o", "--output", metavar="FILE.png", help="write a plot (PNG)")
    s.set_defaults(func=_run)
