"""The demo's chart: one panel per setting (ASR against task accuracy, every point labelled with
its mode), and a panel of step times; one colour and one marker per mode, the legend outside
the axes. Needs matplotlib (the demo extra); chart() raises ImportError without it."""

# One (colour, marker) per mode, in modes.MODES order: 12 colours no two alike (Okabe-Ito and
# tab10 hues, dark and light), so "recommended" never looks like "freeze".
STYLE = {
    "plain": ("#000000", "o"),
    "freeze": ("#1f77b4", "s"),
    "safegrad": ("#ff7f0e", "^"),
    "gate": ("#2ca02c", "D"),
    "monitor": ("#9467bd", "v"),
    "freeze_safegrad": ("#8c564b", "P"),
    "all": ("#e377c2", "X"),
    "lox_plain": ("#7f7f7f", "<"),
    "plain_safelora": ("#bcbd22", ">"),
    "plain_nlsr": ("#17becf", "h"),
    "shaping": ("#d62728", "p"),
    "recommended": ("#00ff7f", "*"),
}
BASE_STYLE = ("#000000", "*")


def style(mode, i=0):
    """(colour, marker) of MODE; a mode without an entry gets one from a fallback cycle."""
    if mode in STYLE:
        return STYLE[mode]
    return ("C%d" % (i % 10), "os^Dv"[i % 5])


def _place_labels(ax, points, fig):
    """Label each (x, y, text, colour) of POINTS next to its marker without overlapping another
    label or marker: candidate offsets are tried nearest first; a label pushed away from its
    point gets a thin leader line."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    taken = []  # pixel boxes (x0, y0, x1, y1) of markers and placed labels
    for x, y, _, _ in points:
        px, py = to_px((x, y))
        taken.append((px - 6, py - 6, px + 6, py + 6))
    offsets = [(8, 4), (8, -12), (-8, 4), (-8, -12), (0, 10), (0, -18)]
    for ring in (20, 34, 48, 62, 76):
        offsets += [(ring, 0), (-ring, 0), (0, ring), (0, -ring), (ring, ring), (-ring, ring),
                    (ring, -ring), (-ring, -ring)]
    box_ax = ax.get_window_extent(r)
    placed = []
    for x, y, text, colour in points:
        px, py = to_px((x, y))
        t = ax.annotate(text, (x, y), xytext=(0, 0), textcoords="offset points", fontsize=7,
                        color="#222222", zorder=5)
        bb = t.get_window_extent(r)
        w, h = bb.width, bb.height
        chosen = None
        for dx, dy in offsets:
            # offsets in points; convert to pixels (dpi / 72)
            sx, sy = dx * fig.dpi / 72.0, dy * fig.dpi / 72.0
            x0 = px + sx if dx >= 0 else px + sx - w
            y0 = py + sy
            box = (x0, y0, x0 + w, y0 + h)
            inside = box_ax.x0 <= box[0] and box[2] <= box_ax.x1 and box_ax.y0 <= box[1] and box[3] <= box_ax.y1
            if inside and not any(_overlap(box, b) for b in taken):
                chosen = (dx, dy, box)
                break
        if chosen is None:
            dx, dy = offsets[0]
            sx, sy = dx * fig.dpi / 72.0, dy * fig.dpi / 72.0
            chosen = (dx, dy, (px + sx, py + sy, px + sx + w, py + sy + h))
        dx, dy, box = chosen
        t.remove()
        far = abs(dx) > 10 or abs(dy) > 14
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                    color="#222222", ha="left" if dx >= 0 else "right", va="bottom", zorder=5,
                    arrowprops=dict(arrowstyle="-", color=colour, lw=0.6, shrinkA=0, shrinkB=3)
                    if far else None)
        taken.append(box)
        placed.append((text, box))
    return placed


def _overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def chart(results, path, modes):
    """Draw RESULTS (the demo's results dict) into PATH. MODES: the (name, label, features)
    list of modes.MODES, for the order and the legend. Returns what was drawn, in pixels:
    {"labels": {setting: [(text, box)]}, "legend": box, "axes": [box]} (box: x0, y0, x1, y1)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    settings = list(results["settings"].items())
    names = [n for n, _, _ in modes]
    labels = {n: l for n, l, _ in modes}
    b = results["base"]
    ncol = len(settings) + 1
    placed = []
    fig, axes = plt.subplots(1, ncol, figsize=(5.2 * ncol + 2.6, 5.6),
                             gridspec_kw={"width_ratios": [1] * len(settings) + [0.9]})
    for ax, (setting, s) in zip(axes, settings):
        pts = [(100 * b["task_accuracy"], 100 * b["asr_keyword"], "base", BASE_STYLE[0])]
        ax.scatter([pts[0][0]], [pts[0][1]], marker=BASE_STYLE[1], s=180, facecolor="white",
                   edgecolor="k", linewidths=1.2, zorder=3)
        for i, n in enumerate(names):
            r = s["modes"].get(n)
            if not r or r.get("status") not in ("ok", "stopped") or "asr_keyword" not in r:
                continue
            c, mk = style(n, i)
            x, y = 100 * r["task_accuracy"], 100 * r["asr_keyword"]
            ax.scatter([x], [y], marker=mk, s=70 if mk != "*" else 150, color=c, edgecolors="k",
                       linewidths=0.6, zorder=4)
            pts.append((x, y, n, c))
        ax.set_xlim(-5, 105)
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
        ax.set_xlabel("task accuracy (%) - higher is better")
        ax.set_ylabel("ASR, keyword judge (%) - lower is safer")
        ratio = s.get("harmful_ratio")
        ax.set_title("%s\n%s" % (setting, "the task alone (no harmful data)" if not ratio
                                 else "the task + %g%% harmful rows answered" % (100 * ratio)), fontsize=10)
        placed.append((ax, pts))

    # step time: median seconds per optimizer step, one bar per mode and setting
    ax = axes[-1]
    rows = [n for n in names if any((s["modes"].get(n) or {}).get("status") in ("ok", "stopped") for _, s in settings)]
    h = 0.8 / max(1, len(settings))
    for j, (setting, s) in enumerate(settings):
        for k, n in enumerate(rows):
            r = s["modes"].get(n) or {}
            if r.get("status") not in ("ok", "stopped") or not r.get("step_seconds_median"):
                continue
            c, _ = style(n, names.index(n))
            y = k + (j - (len(settings) - 1) / 2.0) * h
            ms = 1000 * r["step_seconds_median"]
            ax.barh(y, ms, height=h * 0.9, color=c, edgecolor="k", linewidth=0.4,
                    hatch=("", "//", "..", "xx")[j % 4], alpha=0.9)
            ratio = r.get("step_time_ratio")
            if ratio is not None:
                ax.annotate("%.1fx" % ratio, (ms, y), xytext=(2, 0), textcoords="offset points",
                            va="center", fontsize=6)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median step time (ms); label: x plain SFT")
    ax.set_title("step time (bars: %s)" % ", ".join(
        "%s%s" % (st, ("", " hatched //", " dotted", " crossed")[j % 4]) for j, (st, _) in enumerate(settings)),
        fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    x1 = ax.get_xlim()[1]
    ax.set_xlim(0, x1 * 1.15)

    handles = [Line2D([], [], marker=BASE_STYLE[1], ls="", markerfacecolor="white", markeredgecolor="k",
                      markersize=11, label="base: the aligned model")]
    for i, n in enumerate(names):
        if n not in rows:
            continue
        c, mk = style(n, i)
        handles.append(Line2D([], [], marker=mk, ls="", color=c, markeredgecolor="k", markersize=8,
                              label="%s: %s" % (n, labels.get(n, n))))
    fig.suptitle("safehook alignment-tax demo (%s, seed %s): safety against task on held-out prompts"
                 % ("--quick" if results.get("quick") else "full preset", results.get("seed", 0)),
                 fontsize=11)
    right = 1 - 3.0 / (5.2 * ncol + 2.6)  # the legend's strip, outside every axes
    fig.tight_layout(rect=(0, 0, right, 0.95))
    leg = fig.legend(handles=handles, loc="center left", bbox_to_anchor=(right, 0.5), fontsize=8,
                     title="mode", frameon=True)
    info = {"labels": {}}
    for (ax, pts), (setting, _) in zip(placed, settings):  # after the layout: boxes as drawn
        info["labels"][setting] = _place_labels(ax, pts, fig)
    r = fig.canvas.get_renderer()
    info["legend"] = tuple(leg.get_window_extent(r).extents)
    info["axes"] = [tuple(a.get_window_extent(r).extents) for a in axes]
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return info
