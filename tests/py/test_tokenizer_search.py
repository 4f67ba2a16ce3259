"""The trained model's own tokenizer, found without a path (probes/tokenizer.py): a tokenizer
the script created, the model's config._name_or_path folder, the policy's tokenizer, in that
order; one whose vocabulary does not fit the model's embedding is refused; rows are rendered
exactly as the tokenizer's own apply_chat_template renders them, else in a plain format. In
process, with tiny real models and tokenizers built here (each test its own vocabulary size:
the search scans every tokenizer alive in the process)."""
import gc
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
import tinychat  # noqa: E402
from safehook import data  # noqa: E402
from safehook.probes import Probe  # noqa: E402
from safehook.probes.tokenizer import Found, NotFound, find, render  # noqa: E402


def _ids(x):
    return list(x["input_ids"] if hasattr(x, "keys") else x)


@pytest.fixture(autouse=True)
def _collected():
    gc.collect()  # the tokenizers of the tests before are gone, not only unreferenced


def test_a_tokenizer_the_script_created_is_found():
    tok = tinychat.tokenizer(extra=11)
    m = tinychat.model(len(tok) + 3)  # an embedding padded a little beyond the vocabulary
    got = find(m)
    assert got.tok is tok and got.source == "script" and got.template == "chat_template"
    assert (got.vocab, got.rows) == (len(tok), len(tok) + 3)
    assert got.record() == {"source": "script", "name": "(in memory)", "class": type(tok).__name__,
                            "vocab": len(tok), "embedding_rows": len(tok) + 3, "template": "chat_template"}


def test_the_model_folder_of_config_name_or_path_is_found(tmp_path):
    n = tinychat.save(str(tmp_path / "m"), extra=13)
    gc.collect()  # the tokenizer save() made is gone: nothing of this size is alive
    from transformers import LlamaForCausalLM
    m = LlamaForCausalLM.from_pretrained(str(tmp_path / "m"))
    got = find(m, policy_path="/nonexistent")
    assert (got.source, got.name, got.vocab) == ("config", str(tmp_path / "m"), n)


def test_the_policy_tokenizer_is_the_last_resort(tmp_path):
    tinychat.tokenizer(extra=17).save_pretrained(str(tmp_path / "tok"))
    gc.collect()
    m = tinychat.model(269 + 10)  # built in memory: no _name_or_path
    with pytest.raises(NotFound, match="no config._name_or_path; no tokenizer in the policy"):
        find(m)
    got = find(m, policy_path=str(tmp_path / "tok"))
    assert (got.source, got.name, got.vocab) == ("policy", str(tmp_path / "tok"), 269 + 10)


def test_a_tokenizer_whose_vocabulary_does_not_fit_is_refused(tmp_path):
    big = tinychat.tokenizer(extra=60)  # 322 tokens
    with pytest.raises(NotFound, match="its 322 tokens do not fit the embedding's 316 rows"):
        find(tinychat.model(316))
    with pytest.raises(NotFound, match="its 322 tokens cover under 90% of the embedding's 400 rows"):
        find(tinychat.model(400))
    # the misfit in memory is passed over for the model's own folder
    n = tinychat.save(str(tmp_path / "m"), extra=23)
    gc.collect()
    from transformers import LlamaForCausalLM
    got = find(LlamaForCausalLM.from_pretrained(str(tmp_path / "m")))
    assert got.source == "config" and got.vocab == n and got.tok is not big
    del got
    gc.collect()
    # nor is the policy's tokenizer taken when it does not fit
    big.save_pretrained(str(tmp_path / "big"))
    with pytest.raises(NotFound, match="the policy's tokenizer .*big: its 322 tokens do not fit"):
        find(tinychat.model(300), policy_path=str(tmp_path / "big"))


def test_a_model_without_a_token_embedding_cannot_be_read():
    with pytest.raises(NotFound, match="Sequential has no token embedding"):
        find(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_rows_are_rendered_as_apply_chat_template_renders_them():
    tok = tinychat.tokenizer(extra=29)
    got = Found(tok, "script", "x", len(tok))
    prompt, answer = "How do I bake bread?", "Mix flour, water, yeast and salt."
    ids, labels = render(got, prompt, answer)
    conv = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    assert ids == _ids(tok.apply_chat_template(conv, tokenize=True))
    head = _ids(tok.apply_chat_template(conv[:1], add_generation_prompt=True, tokenize=True))
    assert labels == [-100] * len(head) + ids[len(head):]
    assert tok.decode([i for i in labels if i != -100]) == answer + "</s>"


def test_rows_without_a_chat_template_take_the_plain_format():
    tok = tinychat.tokenizer(extra=31, template=False)
    got = Found(tok, "script", "x", len(tok))
    assert got.template == "plain"
    ids, labels = render(got, "Name a colour.", "Blue.")
    head = _ids(tok("User: Name a colour.\nAssistant:"))
    assert ids == head + _ids(tok(" Blue.", add_special_tokens=False)) + [tok.eos_token_id]
    assert labels[:len(head)] == [-100] * len(head) and labels[len(head):] == ids[len(head):]


def test_a_template_without_an_answer_turn_renders_the_prompt_only():
    tok = tinychat.tokenizer(extra=37)
    tok.chat_template = ("{% for m in messages if m['role'] == 'user' %}<|user|>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    got = Found(tok, "script", "x", len(tok))
    assert got.template == "chat_template (prompt)"
    ids, labels = render(got, "Hi", "Hello")
    head = _ids(tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True))
    assert ids == head + _ids(tok("Hello", add_special_tokens=False)) + [tok.eos_token_id]
    assert labels == [-100] * len(head) + ids[len(head):]


class _Tokenizers:
    def __init__(self, found):
        self.found, self.asked = found, []

    def for_probes(self, policy_path=None):
        self.asked.append(policy_path)
        return self.found


def test_a_builtin_probe_reads_the_shipped_rows_with_the_found_tokenizer(tmp_path):
    tok = tinychat.tokenizer(extra=41)
    found = Found(tok, "script", "x", len(tok))
    ts = _Tokenizers(found)
    p = Probe("refusals", {"builtin": "refusals", "limit": 3, "tokenizer": str(tmp_path)}, ts)
    p.check()
    ex = p.examples()
    rows = data.rows("refusals")[:3]
    assert len(ex) == 3 and ts.asked == [str(tmp_path)]  # the policy's folder goes to the search as its last resort
    for e, r in zip(ex, rows):
        ids, labels = render(found, r["prompt"], r["response"])
        assert (e.ids, e.labels, e.prompt_text) == (ids, labels, r["prompt"])
        assert tok.decode(e.reference) == r["response"] + "</s>"
    with pytest.raises(ValueError, match="need the trained model's tokenizer"):
        Probe("b", {"builtin": "benign"}).examples()
