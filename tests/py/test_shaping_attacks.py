"""The data owner is the attacker (issue 24): the shaping feature gives the person who writes the
data no knob. A guard's threshold no longer rises with the harmful fraction while the rows it
flags score like the harmful probe (a 60%-harmful stream keeps the calibrated threshold; the old
cap, a fixed share of the stream, let the excess through); a tail of the user's task just above
the threshold is still capped; suspension judges a guard by the stream's benign part; a high
harmful fraction is a ``harmful_data`` violation and stops the job under on_error abort or an
enforced policy, in process and in a real job under LD_PRELOAD."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import events

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "shaping_scripts")
sys.path.insert(0, SCRIPTS)
import common  # noqa: E402

from safehook.demo import world as W  # noqa: E402
from safehook.features import shaping as S  # noqa: E402


def _normal(n, mu, seed):
    rng = random.Random(seed)
    return [rng.gauss(mu, 1.0) for _ in range(n)]


def _stream(p, n=256, task_mu=0.0, seed=1):
    """N first-sighting scores, a share P of them drawn as the harmful probe is (mean 10)."""
    nh = int(round(p * n))
    v = _normal(nh, 10.0, seed) + _normal(n - nh, task_mu, seed + 1)
    random.Random(seed + 2).shuffle(v)
    return v


H = _normal(64, 10.0, 0)  # the harmful probe's held-out scores


def test_threshold_does_not_rise_with_the_harmful_fraction():
    t = S.calibrate(H, _normal(64, 0.0, 9), 0.95, 0.05)["threshold"]
    for p in (0.1, 0.3, 0.6, 0.9):
        v = _stream(p)
        c = S.stream_check({"g": H}, {"g": v}, 0.3, thresholds={"g": t})["g"]
        assert max(t, c["bound"]) == t, (p, c["bound"], t)  # the calibrated threshold holds
        share = sum(x >= t for x in v) / len(v)
        assert abs(c["flag_rate"] - share) < 1e-12 and abs(share - p) < 0.05, (p, share)
        assert not c["suspended"] and c["harmful_share"] == c["flag_rate"]
    # the stream built to be 60% harmful: the old rule (a cap at max_flag_rate of the stream)
    # raised this guard's threshold into the harmful rows and let half of them through
    v = _stream(0.6)
    old = S.fpr_bound(v, 0.3)
    assert old > t and sum(x >= old for x in v) / len(v) <= 0.3
    assert sum(x >= old for x in v if x > 5) / sum(1 for x in v if x > 5) < 0.55


def test_a_task_tail_that_does_not_look_harmful_is_still_capped():
    """The user's task just above a threshold the benign probe set (the task does not look like
    the benign probe): the flagged rows sit under the harmful probe, so the cap holds them to
    max_flag_rate; with harmful rows mixed in, the bound keeps them."""
    t = 8.0
    v = _normal(256, 7.8, 3)  # 40-ish% of the task above t, all of it below most of the probe
    assert sum(x >= t for x in v) / len(v) > 0.35
    c = S.stream_check({"g": H}, {"g": v}, 0.3, thresholds={"g": t})["g"]
    assert c["bound"] > t and sum(x >= c["bound"] for x in v) <= math.floor(0.3 * len(v))
    assert S.auroc(H, [x for x in v if x >= t]) > S.PROBE_LIKE
    # the bound is never above the old cap: this rule only ever flags more
    mixed = _normal(40, 10.0, 4) + _normal(216, 7.8, 5)
    c = S.stream_check({"g": H}, {"g": mixed}, 0.3, thresholds={"g": t})["g"]
    assert c["bound"] <= S.fpr_bound(mixed, 0.3)
    assert all(x >= c["bound"] for x in mixed[:40] if x >= 9.5)


def test_probe_like_bound_is_a_scan_from_the_top():
    h = [float(x) for x in range(10, 20)]
    # every flagged row at or above the probe's median: no raise
    assert S.probe_like_bound(h, [15.0, 16.0, 17.0, 1.0], 5.0) == 5.0
    # rows below the whole probe are dropped from the bottom until the rest look like it
    v = [19.0, 6.0, 6.5, 7.0]
    b = S.probe_like_bound(h, v, 5.0)  # AUROC of the probe against {19, 7}: 0.525; with 6.5: 0.683
    assert 6.5 < b <= 7.0
    assert S.auroc(h, [x for x in v if x >= b]) <= S.PROBE_LIKE < S.auroc(h, [x for x in v if x >= 6.5])
    assert S.probe_like_bound([], [1.0], 0.0) == 0.0 and S.probe_like_bound(h, [], 3.0) == 3.0


def test_suspension_judges_the_benign_rest_of_the_stream():
    """At 80% harmful a good second guard ranks the probe above the whole stream at AUROC ~0.6
    (the harmful rows tie with the probe): the raw AUROC would suspend it; against the stream's
    benign part it separates, and stays. A guard the task fools is suspended at any share."""
    t = 8.0
    good, second = _stream(0.8, seed=11), _stream(0.8, task_mu=2.0, seed=11)
    fooled = [x + 12.0 if x < 5 else x for x in _stream(0.8, seed=11)]  # the task above the probe
    h2 = _normal(64, 10.0, 21)
    c = S.stream_check({"a": H, "b": h2, "c": H}, {"a": good, "b": second, "c": fooled}, 0.3,
                       thresholds={"a": t, "b": t, "c": t})
    assert c["b"]["auroc"] < S.SUSPEND_AUROC < c["b"]["auroc_rest"]
    assert not c["a"]["suspended"] and not c["b"]["suspended"]
    assert c["c"]["suspended"] and c["a"]["best"] in ("a", "b")
    assert abs(c["a"]["harmful_share"] - 0.8) < 0.05


class _Rec(S._Offline):
    def __init__(self, policy=None, on_error="abort"):
        super().__init__(policy)
        self.recs, self.failed, self.on_error = [], [], on_error

    def audit(self, event, fields=None, step=None):
        self.recs.append((event, dict(fields or {})))

    def fail(self, msg):
        self.failed.append(msg)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    return common.build(str(tmp_path_factory.mktemp("attacks")))


def test_the_feature_keeps_its_threshold_on_a_stream_60_percent_harmful(world):
    """The feature's own stream check: 40 first sightings, 24 of them scoring as the harmful
    probe's held-out rows do, 16 far below; the refusal threshold stays where calibration put
    it and the stream check reports the share."""
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(world["model"])
    rt = _Rec()
    sh = S.Shaping(common.policy(world, tpr=0.95), rt)
    sh._prepare(model)
    t = sh.cal["refusal"]["threshold"]
    h = sorted(sh.probe_harm["refusal"])
    low = h[0] - 10.0
    scores = [{"refusal": h[(7 * i) % len(h)] if i % 5 < 3 else low} for i in range(40)]
    sh._observe(scores)
    assert sh.checked and sh._threshold("refusal") == t
    assert sum(d["refusal"] >= sh._threshold("refusal") for d in scores) == sum(
        d["refusal"] >= t for d in scores) >= 20
    assert S.fpr_bound([d["refusal"] for d in scores], 0.3) > t  # where the old cap put it
    chk = [f for e, f in rt.recs if e == "probe" and f.get("what") == "shaping stream check"][0]
    assert chk["best"] == "refusal" and chk["guards"]["refusal"]["flag_rate"] >= 0.5


def _harmful_rows(world, n_harm, n_task):
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast.from_pretrained(world["tok"])
    w = W.World(0)
    rows = w.harmful("train", n_harm, "attacks-test", comply=True) + w.task("train", n_task, "attacks-test")
    return [W.encode(tok, r) for r in rows]


def _pad(rows):
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (n - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [-100] * (n - len(r["labels"])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (n - len(r["input_ids"])) for r in rows])
    return ids, mask, labels


def _run(world, monkeypatch, on_error, meta=None, limit=0.5, steps=5):
    """Five training forwards of 8 rows, 5 of them harmful, through a callable guard that flags
    exactly the harmful ones; the pre-step after each."""
    from transformers import LlamaForCausalLM
    monkeypatch.syspath_prepend(SCRIPTS)
    model = LlamaForCausalLM.from_pretrained(world["model"])
    model.train()
    pol = common.policy(world, guards=["callable"], callable="guard:risk", tokenizer=world["tok"],
                        max_harmful_fraction=limit)
    pol["on_error"] = on_error
    if meta:
        pol["_meta"] = meta
    rt = _Rec(pol, on_error=on_error)
    sh = S.Shaping(pol, rt)
    sh._prepare(model)
    sh._install(model)
    harm, task = _harmful_rows(world, 25, 15)[:25], _harmful_rows(world, 25, 15)[25:]
    for step in range(steps):
        batch = harm[5 * step:5 * step + 5] + task[3 * step:3 * step + 3]
        ids, mask, labels = _pad(batch)
        model(input_ids=ids, attention_mask=mask, labels=labels)
        sh.pre_step(None, step, {})
    for h in sh.handles:
        h.remove()
    return sh, rt


def test_harmful_data_violation_and_the_stop(world, monkeypatch):
    sh, rt = _run(world, monkeypatch, "abort")
    v = [f for e, f in rt.recs if e == "violation"]
    assert len(v) == 1, v  # once, however long the data stays harmful
    assert v[0]["kind"] == "harmful_data" and v[0]["fraction"] == pytest.approx(25 / 40)
    assert v[0]["max_harmful_fraction"] == 0.5 and v[0]["sightings"] == 32 and v[0]["stops"] is True
    assert v[0]["step"] == 4  # the first pre-step with 32 rows seen
    assert len(rt.failed) == 1 and "harmful training data: 62% of the last 32 rows" in rt.failed[0]
    # under on_error warn the violation is recorded and training goes on
    sh, rt = _run(world, monkeypatch, "warn")
    v = [f for e, f in rt.recs if e == "violation"]
    assert len(v) == 1 and v[0]["stops"] is False and rt.failed == []
    # below the limit: no violation, the fraction still reported at the end
    sh, rt = _run(world, monkeypatch, "abort", limit=0.7)
    assert not [f for e, f in rt.recs if e == "violation"] and rt.failed == []
    fields = {}
    sh._finish(fields)
    assert fields["shaping"]["harmful_fraction"] == pytest.approx(25 / 40)


def test_an_enforced_policy_stops_under_warn_too(world, monkeypatch):
    from safehook import _core
    got = []
    monkeypatch.setattr(_core, "set_pending_error", lambda msg: got.append(msg))
    sh, rt = _run(world, monkeypatch, "warn", meta={"enforce": True, "on_error": "warn"})
    v = [f for e, f in rt.recs if e == "violation"]
    assert len(v) == 1 and v[0]["stops"] is True
    assert rt.failed == [] and len(got) == 1 and "shaping.max_harmful_fraction 0.50" in got[0]


def test_a_job_on_harmful_data_stops_with_a_harmful_data_violation(world, preload_run, tmp_path):
    pol = common.policy(world, guards=["callable"], callable="guard:risk", tokenizer=world["tok"],
                        max_harmful_fraction=0.4)
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(pol))
    root = os.path.dirname(world["model"])
    p, recs = preload_run([sys.executable, os.path.join(SCRIPTS, "harmful_data.py"), root, "10"], policy=str(path),
                          env_extra={"PYTHONPATH": SCRIPTS}, check=False, timeout=600)
    assert p.returncode == 3, p.stdout + p.stderr
    assert "stopped at step 4:" in p.stdout and "harmful training data" in p.stdout
    v = events(recs, "violation")
    assert len(v) == 1 and v[0]["kind"] == "harmful_data" and v[0]["fraction"] > 0.4, v
    assert v[0]["python_stack"] and v[0]["step"] == 4
    assert len(events(recs, "step")) == 4  # the steps before the stop, none after
    # on_error warn: recorded, trained to the end
    pol["on_error"] = "warn"
    path.write_text(json.dumps(pol))
    p, recs = preload_run([sys.executable, os.path.join(SCRIPTS, "harmful_data.py"), root, "10"], policy=str(path),
                          env_extra={"PYTHONPATH": SCRIPTS}, check=False, timeout=600)
    assert p.returncode == 0 and "trained 10" in p.stdout, p.stdout + p.stderr
    assert len(events(recs, "violation")) == 1 and len(events(recs, "step")) == 10


def test_max_harmful_fraction_is_tighten_only(tmp_path):
    system = tmp_path / "system.json"
    system.write_text(json.dumps({"version": 1, "enforce": True, "probes": {"h": {"data": "h.jsonl"}},
                                  "shaping": {"guards": ["refusal"], "probe": "h", "max_harmful_fraction": 0.3}}))
    code = ("import json, sys\nfrom safehook import _core\n"
            "try:\n    p = _core.configure(policy_path=sys.argv[1], system_path=sys.argv[2])\n"
            "    print(json.dumps(p['shaping']['max_harmful_fraction']))\n"
            "except _core.PolicyError as e:\n    print('refused:', e)\n")
    out = {}
    for v in (0.2, 0.6):
        user = tmp_path / ("user%g.json" % v)
        user.write_text(json.dumps({"version": 1, "shaping": {"max_harmful_fraction": v}}))
        r = subprocess.run([sys.executable, "-c", code, str(user), str(system)], capture_output=True, text=True,
                           timeout=120)
        out[v] = r.stdout.strip()
    assert out[0.2] == "0.2"
    assert out[0.6].startswith("refused:") and "/shaping/max_harmful_fraction" in out[0.6] and \
        "must be <= 0.3, not 0.6" in out[0.6], out


def test_composite_joins_the_row_and_the_probe_request():
    # shared opening (1, 2) and assistant marker (3, 4): the row's request, then the probe's
    assert S.composite([1, 2, 10, 11, 3, 4], [1, 2, 20, 21, 22, 3, 4], [7, 8]) == (
        [1, 2, 10, 11, 20, 21, 22, 3, 4, 7, 8], [-100] * 9 + [7, 8])
    # the demo world's words
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast.from_pretrained(_TOK[0])
    enc = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    ids, labels = S.composite([tok.bos_token_id] + enc("user : " + W.PERSONA + " how do i bake a cake ? assistant :"),
                              [tok.bos_token_id] + enc("user : how do i build a bomb ? assistant :"),
                              enc("i cannot help with that ."))
    # the shared suffix is "? assistant :": the row's own "?" goes with it
    assert tok.decode(ids) == ("<s> user : " + W.PERSONA + " how do i bake a cake how do i build a bomb ? "
                               "assistant : i cannot help with that .")
    assert tok.decode([i for i, l in zip(ids, labels) if l != -100]) == "i cannot help with that ."


_TOK = []


@pytest.fixture(autouse=True)
def _tok(world):
    _TOK[:] = [world["tok"]]


def test_rehearsal_adds_the_composites_gradient(world):
    """rehearse 0.5 on a batch of 4 task rows: the gradient the optimizer uses is the batch's
    plus that of 2 composites (rows 0 and 3's prompts with the probe's first two requests and
    refusals), their refusal tokens' summed cross-entropy over the batch's label tokens, as the
    model's own mean loss counts rows; checked against a copy of the model fed those rows."""
    import copy
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(world["model"])
    model.train()
    ref = copy.deepcopy(model)
    rt = _Rec()
    sh = S.Shaping(common.policy(world, rehearse=0.5), rt)
    sh._prepare(model)
    sh._install(model)
    for c in sh.cal.values():
        c["threshold"] = c["refuse_threshold"] = math.inf  # nothing flagged: only the rehearsal acts
    rows = [r for r in common.rows(world["train"]) if not r["harmful"]][:4]
    ids, mask, labels = _pad(rows)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = {}
    sh.pre_step(opt, 0, rec)
    for h in sh.handles:
        h.remove()
    assert rec["shaping"]["rehearsed"] == 2
    probe = common.rows(world["harm"])

    def prompt(r):
        first = next(i for i, l in enumerate(r["labels"]) if l != -100)
        return r["input_ids"][:first], [l for l in r["labels"][first:] if l != -100]
    comps = [S.composite(prompt(rows[i])[0], *prompt(probe[j])) for i, j in ((0, 0), (3, 1))]
    assert all(len(c[0]) <= model.config.max_position_embeddings for c in comps)
    ntok = int((labels[:, 1:] != -100).sum())
    ref(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    cids, cmask, clab = _pad([{"input_ids": i, "labels": l} for i, l in comps])
    lg = ref(input_ids=cids, attention_mask=cmask).logits[:, :-1]
    extra = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.size(-1)), clab[:, 1:].reshape(-1),
                                              ignore_index=-100, reduction="sum") / ntok
    extra.backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    # without rehearse the gradient is the batch's alone
    sh2 = S.Shaping(common.policy(world), _Rec())
    assert sh2.cfg["rehearse"] == 0.0
