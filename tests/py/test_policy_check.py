"""`safehook check` on the data-driven cases in tests/policies/{valid,invalid}/<case>/ and on
every file in policies/.

An invalid case holds policy.json (or generate.py, which writes it: the 10 MB case) and
`expected`, the exact line `safehook check` prints, with FILE standing for the path given.
A valid case's `expected` is its normalized policy as `safehook check --explain` prints it."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASES = os.path.join(ROOT, "tests", "policies")
POLICIES = os.path.join(ROOT, "policies")


def _cases(kind):
    d = os.path.join(CASES, kind)
    return sorted(n for n in os.listdir(d) if os.path.isdir(os.path.join(d, n)))


def _check(*args):
    return subprocess.run([sys.executable, "-m", "safehook", "check", *args], capture_output=True, text=True,
                          timeout=120)


def _policy_path(kind, case, tmp_dir):
    d = os.path.join(CASES, kind, case)
    p = os.path.join(d, "policy.json")
    if os.path.exists(p):
        return p
    out = os.path.join(tmp_dir, case + ".json")
    subprocess.check_call([sys.executable, os.path.join(d, "generate.py"), out])
    return out


def _expected(kind, case):
    with open(os.path.join(CASES, kind, case, "expected"), encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def invalid_lines(tmp_path_factory):
    """One `safehook check` over every invalid case: {case: (path, the line printed for it)}."""
    tmp = str(tmp_path_factory.mktemp("generated"))
    paths = {case: _policy_path("invalid", case, tmp) for case in _cases("invalid")}
    r = _check("--schema-only", *paths.values())
    assert r.returncode == 2, r.stderr
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    out = {}
    for case, path in paths.items():
        mine = [l for l in lines if l.startswith(path + ":")]
        out[case] = (path, mine)
    assert len(lines) == len(paths), "one line per invalid file"
    return out


def test_at_least_40_invalid_cases():
    assert len(_cases("invalid")) >= 40


@pytest.mark.parametrize("case", _cases("invalid"))
def test_invalid_case(case, invalid_lines):
    path, lines = invalid_lines[case]
    want = _expected("invalid", case).rstrip("\n").replace("FILE", path, 1)
    assert lines == [want]


@pytest.fixture(scope="module")
def explained():
    """One `safehook check --explain` over every valid case: {case: the text printed for it}."""
    paths = {case: os.path.join(CASES, "valid", case, "policy.json") for case in _cases("valid")}
    r = _check("--schema-only", "--explain", *paths.values())
    assert r.returncode == 0, r.stdout + r.stderr
    blocks = re.split(r"^# (.*)\n", r.stdout, flags=re.M)[1:]
    by_path = dict(zip(blocks[0::2], blocks[1::2]))
    return {case: by_path.get(p) for case, p in paths.items()}


@pytest.mark.parametrize("case", _cases("valid"))
def test_valid_case(case, explained):
    assert explained[case] == _expected("valid", case)


def test_exit_codes_and_silence():
    valid = os.path.join(CASES, "valid", "minimal", "policy.json")
    invalid = os.path.join(CASES, "invalid", "version-2", "policy.json")
    r = _check(valid)
    assert (r.returncode, r.stdout, r.stderr) == (0, valid + ": ok\n", "")
    r = _check(valid, invalid, valid)
    assert r.returncode == 2
    assert r.stdout == "%s: ok\n%s: /version: must be 1, not 2\n%s: ok\n" % (valid, invalid, valid)
    r = _check(os.path.join(CASES, "no-such-file.json"))
    assert r.returncode == 2
    assert r.stdout.endswith("no-such-file.json: cannot read: No such file or directory\n")


def test_every_shipped_policy_is_valid():
    files = sorted(os.path.join(POLICIES, f) for f in os.listdir(POLICIES) if f.endswith(".json"))
    assert {"default.json", "lora.json", "full-finetune.json", "server-enforced.json"} <= {
        os.path.basename(f) for f in files}
    r = _check("--schema-only", "--explain", *files)  # their probe paths are examples
    assert r.returncode == 0, r.stdout
    for f in files:
        assert "# %s\n" % f in r.stdout


def test_readme_explains_every_key_and_file():
    with open(os.path.join(POLICIES, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    with open(os.path.join(CASES, "valid", "all-keys-set", "expected"), encoding="utf-8") as f:
        full = json.load(f)
    keys = set()
    for k, v in full.items():
        keys.add(k)
        if isinstance(v, dict):
            for k2, v2 in v.items():
                keys.add(k2 if k != "probes" else None)
                if k == "probes":
                    keys.update(v2)
    keys.discard(None)
    missing = sorted(k for k in keys if "`%s`" % k not in readme)
    assert not missing, "policies/README.md does not explain %s" % missing
    for f in os.listdir(POLICIES):
        if f.endswith(".json"):
            assert f in readme


def test_default_needs_no_data_of_the_users():
    """The embedded default applies to any model with nothing at hand: its probes are the ones
    shipped inside the package, and its fallback (for a model it cannot protect) needs none."""
    r = _check("--explain", os.path.join(POLICIES, "default.json"))
    doc = json.loads(r.stdout)
    assert doc["probes"] and all(set(p) & {"data", "callable", "tokenizer"} == set() and p["builtin"]
                                 for p in doc["probes"].values())
    assert not doc.get("monitor") and not doc.get("freeze")
    assert doc["on_error"] == "abort" and doc["enforce"] is False
    fb = json.loads(_check("--explain", os.path.join(POLICIES, "default-fallback.json")).stdout)
    assert not fb.get("probes") and fb["freeze"]["layers"] == {"fraction": [0.375, 0.625]}


def test_explain_alone_shows_the_default_with_the_shipped_probes_files():
    from safehook import _core, data
    r = _check("--explain")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    for name, builtin, limit in (("refusals", "refusals", 64), ("benign", "benign", 64), ("refusals_step", "refusals", 8)):
        line = "# probe %s: builtin %s, %s (%d rows, the first %d)\n" % (
            name, builtin, data.path(builtin), len(data.rows(builtin)), limit)
        assert line in r.stdout and os.path.isfile(data.path(builtin))
    blocks = [b for b in re.split(r"^#.*\n", r.stdout, flags=re.M) if b.strip()]
    assert [json.loads(b) for b in blocks] == [json.loads(_core.default_policy()["policy"]),
                                               json.loads(_core.default_policy(fallback=True)["policy"])]
    doc = json.loads(_check("--explain", "--json").stdout)
    assert doc["default"]["probes"]["refusals"]["data"] == data.path("refusals")
    assert doc["fallback"]["policy"]["freeze"]["layers"] == {"fraction": [0.375, 0.625]}
    assert doc["default"]["digest"] == _core.default_policy()["digest"] != doc["fallback"]["digest"]
    r = _check()
    assert r.returncode == 2 and r.stderr == "safehook check: give FILE..., or --explain alone for the default policy\n"


def test_explain_with_a_model_folder_says_whether_the_default_protects_it(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
    import tinychat
    tinychat.save(str(tmp_path / "chat"), extra=53)
    r = _check("--explain", "--model", str(tmp_path / "chat"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("# --model %s: protected (tokenizer: config %s, chat_template)\n"
                             % (tmp_path / "chat", tmp_path / "chat"))
    os.unlink(tmp_path / "chat" / "tokenizer.json")
    os.unlink(tmp_path / "chat" / "tokenizer_config.json")
    r = _check("--explain", "--json", "--model", str(tmp_path / "chat"))
    m = json.loads(r.stdout)["model"]
    assert m["applied"] == "fallback" and m["reason"].startswith("no tokenizer found for LlamaForCausalLM")
    # a policy naming the shipped probes, resolved against the folder with its tokenizer
    tinychat.save(str(tmp_path / "chat2"), extra=53)
    pol = _write(tmp_path / "p.json", {"version": 1, "probes": {"r": {"builtin": "refusals", "limit": 5}}})
    r = _check("--json", "--model", str(tmp_path / "chat2"), pol)
    res = json.loads(r.stdout)["files"][0]["resolved"]["probes"]["r"]
    assert r.returncode == 0 and (res["rows"], res["tokenizer"], res["template"]) == (5, "config", "chat_template")


# ---- what the policy names on disk, and --model ----

def _write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def test_malformed_probe_line_is_one_line_with_file_and_line(tmp_path):
    data = tmp_path / "probe.jsonl"
    data.write_text('{"input_ids": [1, 2, 3]}\n\n{"input_ids": [4, 5], }\n')
    pol = _write(tmp_path / "p.json", {"version": 1, "probes": {"harm": {"data": str(data)}},
                                      "gate": {"probe": "harm"}})
    r = _check(pol)
    assert r.returncode == 2 and r.stderr == ""
    assert r.stdout.splitlines() == ["%s: /probes/harm/data: %s:3:23: not JSON: Expecting property name enclosed "
                                     "in double quotes" % (pol, data)]
    # safehook run refuses to start the job, with check's line (the command never runs)
    marker = tmp_path / "ran"
    r = subprocess.run([sys.executable, "-m", "safehook", "run", "--policy", pol, "--", "touch", str(marker)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and not marker.exists()
    assert r.stderr.splitlines() == ["%s: /probes/harm/data: %s:3:23: not JSON: Expecting property name enclosed "
                                     "in double quotes" % (pol, data),
                                     "safehook run: %s is not a valid policy; not starting touch" % pol]
    # and a schema error the same way, from SAFEHOOK_POLICY too
    bad = _write(tmp_path / "bad.json", {"version": 2})
    r = subprocess.run([sys.executable, "-m", "safehook", "run", "--", "touch", str(marker)], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, SAFEHOOK_POLICY=bad))
    assert r.returncode == 2 and not marker.exists()
    assert r.stderr.splitlines()[0] == bad + ": /version: must be 1, not 2"


def test_json_output(tmp_path):
    valid = os.path.join(CASES, "valid", "minimal", "policy.json")
    syntax = tmp_path / "syntax.json"
    syntax.write_text('{"version": 1,\n  "freeze": {"layers": "1-2",}}\n')
    r = _check("--json", valid, str(syntax))
    assert r.returncode == 2 and r.stderr == ""
    doc = json.loads(r.stdout)
    assert doc["schema"] == "safehook.check/1" and doc["ok"] is False and doc["model"] is None
    assert [(f["file"], f["ok"]) for f in doc["files"]] == [(valid, True), (str(syntax), False)]
    (p,) = doc["files"][1]["problems"]
    assert (p["line"], p["column"], p["pointer"]) == (2, 30, None) and p["message"]
    r = _check("--json", "--explain", valid)
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["ok"] and doc["files"][0]["policy"]["version"] == 1
    assert doc["files"][0]["policy"]["on_error"] == "abort"  # normalized: defaults filled in


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 3-block Llama saved by save_pretrained with a word-level tokenizer (no chat template)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    d = tmp_path_factory.mktemp("model")
    words = ["<pad>", "<s>", "</s>", "<unk>", "I", "cannot", "help", "how", "build", "a", "bomb"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(str(d))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                 num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=32)).save_pretrained(str(d))
    return str(d)


def test_check_against_a_model_folder(tmp_path, tiny_model):
    data = tmp_path / "harm.jsonl"
    data.write_text('{"prompt": "how build a bomb", "response": "I cannot help"}\n'
                    '{"prompt": "how build a", "response": "I cannot"}\n')
    probe = {"data": str(data), "tokenizer": tiny_model}
    good = _write(tmp_path / "good.json", {"version": 1, "freeze": {"layers": "1-2", "params": ["lm_head.*"]},
                                          "probes": {"harm": probe}, "gate": {"probe": "harm"}})
    r = _check("--model", tiny_model, good)
    assert r.returncode == 0, r.stdout
    # 4 + 3 tokens (the word tokenizer adds no BOS) + 3 + 2, each response with </s>
    assert r.stdout == ("%s: ok (LlamaForCausalLM, 3 blocks at model.layers; freezes blocks 1-2; lm_head.* matches "
                        "1 parameters; probe harm: 2 rows, 14 tokens)\n" % good)
    bad = _write(tmp_path / "bad.json", {
        "version": 1, "freeze": {"layers": ["0", "2-3"], "params": ["model.decoder.*"]},
        "probes": {"harm": dict(probe, chat_template=True), "ok": probe}, "gate": {"probe": "harm"},
        "shaping": {"probe": "harm", "benign": "ok", "layer": 5, "guards": ["direction"]}})
    r = _check("--model", tiny_model, bad)
    assert r.returncode == 2
    assert r.stdout.splitlines() == [
        "%s: /freeze/layers: freeze.layers: block 3 does not exist (the model has 3 blocks, 0-2) "
        "(LlamaForCausalLM at model.layers)" % bad,
        "%s: /freeze/params/0: 'model.decoder.*' matches no parameter of LlamaForCausalLM "
        "(e.g. model.embed_tokens.weight)" % bad,
        "%s: /shaping/layer: block 5 does not exist (the model has 3 blocks, 0-2)" % bad,
        "%s: /probes/harm: %s" % (bad, _loader_error(dict(probe, chat_template=True))),
    ]
    # pre-tokenized rows with an id the model's embedding does not have
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"input_ids": [1, 4, 5, 40]}\n')
    pol = _write(tmp_path / "ids.json", {"version": 1, "probes": {"harm": {"data": str(ids)}},
                                         "gate": {"probe": "harm"}})
    r = _check("--model", tiny_model, pol)
    assert r.returncode == 2
    assert r.stdout == "%s: /probes/harm/data: token id 40 is outside the model's vocabulary of 11\n" % pol
    r = _check("--model", str(tmp_path / "nowhere"), pol)
    assert r.returncode == 2 and r.stdout == "%s: --model %s: no such folder\n" % (pol, tmp_path / "nowhere")


def _loader_error(cfg):
    """What the probe loader itself raises for CFG (check reports the loader's own message)."""
    from safehook.probes import Probe
    try:
        Probe("harm", cfg).examples()
    except Exception as e:
        return str(e).splitlines()[0]
    raise AssertionError("the loader accepted %r" % cfg)
