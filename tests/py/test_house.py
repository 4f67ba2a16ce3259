"""Things defined once (issue 21, defects 9 and 10): the transformer block list (freeze, shaping,
SafeGrad's layer groups and a checkpoint's tensor names agree, on a vision-language model too),
the row fingerprint (the monitor's rollback suspects are shaping's flag fingerprints) and the
refusal keyword judge (the probes' and the demo's are one list with one rule)."""
import torch


class _Block(torch.nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.attn = torch.nn.Linear(d, d)
        self.mlp = torch.nn.Linear(d, d)


class _Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_tower = torch.nn.Module()
        self.vision_tower.blocks = torch.nn.ModuleList(_Block() for _ in range(6))  # the larger list
        self.language_model = torch.nn.Module()
        self.language_model.layers = torch.nn.ModuleList(_Block() for _ in range(3))
        self.language_model.layers[0].experts = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(8))


class _VLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = _Inner()
        self.lm_head = torch.nn.Linear(4, 8)


def test_one_block_list_on_a_vision_language_model():
    """Freeze, shaping, SafeGrad's layer groups and the checkpoint-name rule all pick the text
    blocks (model.language_model.layers), not the vision tower's larger list nor an expert list
    inside a block (before: shaping took the largest list named layers/h/blocks, the vision
    tower's, and SafeGrad's regex grouped the vision blocks as blocks)."""
    from safehook.features import freeze, safegrad, shaping
    from safehook.runtime import stacks
    m = _VLM()
    b = stacks.find_blocks(m)
    assert (b.path, len(b), b.how) == ("model.language_model.layers", 3, "known")
    assert freeze.find_blocks(m).path == b.path
    sh = shaping.find_blocks(m)
    assert len(sh) == 3 and all(x is y for x, y in zip(sh, m.model.language_model.layers))
    names = [n for n, _ in m.named_parameters()]
    assert stacks.find_block_list(names) == ("model.language_model.layers", 3)
    assert stacks.find_block_list(["module." + n for n in names][:0]) is None
    key = safegrad.layer_key
    assert key("model.language_model.layers.2.mlp.weight", b.path) == "model.language_model.layers.2"
    assert key("model.language_model.layers.0.experts.5.weight", b.path) == "model.language_model.layers.0"
    assert key("model.vision_tower.blocks.4.attn.weight", b.path) == "model.vision_tower.blocks.4.attn"
    assert key("lm_head.weight", b.path) == "lm_head"


def test_one_row_fingerprint_for_the_monitor_and_shaping():
    """A row's fingerprint is the same string whether the monitor hashes its batch (padded,
    with a mask) or shaping keys the row (before: two hashes, so rollback suspects could not be
    matched to flag records)."""
    from safehook.features import monitor, shaping
    rows = [[1, 5, 6, 7, 2], [1, 9, 2]]
    ids = torch.tensor([[1, 5, 6, 7, 2], [0, 0, 1, 9, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    batch = monitor.fingerprint(ids, mask)
    assert batch == [shaping.fingerprint(r) for r in rows]
    assert batch[0] != batch[1] and len(batch[0]) == 16


def test_one_refusal_keyword_judge():
    """The probes' keyword judge and the demo's evaluation are one list and one rule: a phrase
    as whole words, case and curly quotes aside (before: two lists, substring against word
    matches)."""
    from safehook.demo import evaluate
    from safehook.probes import judges
    assert evaluate.REFUSAL_KEYWORDS is judges.REFUSAL_KEYWORDS
    judge = judges.make_judge({"judge": "keyword", "max_new_tokens": 8})
    texts = ["I cannot help with that.", "I\u2019m sorry, no.", "As an AI I decline", "sorryness is a word",
             "i cannotice", "Sure, here is how", "this is illegal", "illegality"]
    want = [True, True, True, False, False, False, True, False]
    assert [evaluate.refused_keyword(t) for t in texts] == want
    assert [judge(None, [], t) for t in texts] == want


def test_one_feature_registry_read_from_the_c_schema(tmp_path):
    """Features are declared once, in the C schema (src/policy_schema.c, FEATURES): the runtime
    sets up what the registry lists, in its order, and every default a feature uses is the
    schema's, the same the normalized policy (check --explain) shows (before: boot.FEATURES,
    three C tables and DEFAULTS repeated in Python)."""
    import json
    from safehook import _core, probes
    from safehook.features import gate, monitor, safegrad, shaping
    from safehook.runtime import registry
    feats = registry.features()
    assert [f.name for f in feats] == ["freeze", "safegrad", "probes", "gate", "monitor", "shaping", "audit", "tamper", "tap"]
    assert [f.order for f in feats if f.order] == [10, 20, 30, 40, 15, 1000000]
    assert [f.name for f in feats if f.always] == ["tamper", "tap"]
    for mod in (gate, monitor, safegrad, shaping, probes.probe):
        assert not hasattr(mod, "DEFAULTS") and not hasattr(mod, "ORDER"), mod
    data = tmp_path / "p.jsonl"
    data.write_text('{"input_ids": [1, 2], "labels": [1, 2]}\n')
    minimal = {"version": 1, "probes": {"p": {"data": str(data)}}, "freeze": {"layers": "0"},
               "safegrad": {"source": "anchor"}, "gate": {"probe": "p"}, "monitor": {"probe": "p"},
               "shaping": {"probe": "p", "guards": ["refusal"]}}
    norm = _core.configure(policy_text=json.dumps(minimal), policy_name="<test>")
    for sec in ("freeze", "safegrad", "gate", "monitor", "shaping"):
        given = minimal[sec]
        assert {k: v for k, v in norm[sec].items() if k not in given} == \
            {k: v for k, v in registry.defaults(sec).items() if k not in given}, sec
    assert {k: v for k, v in norm["probes"]["p"].items() if k != "data"} == registry.defaults("probe")
    assert probes.Probe("p", {"data": str(data)}).cfg == norm["probes"]["p"]
