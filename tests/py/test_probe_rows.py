"""Probe files in the formats of HF datasets (safehook.integrations.rows): chat rows
{"messages": [...]} rendered with the tokenizer's own chat template, and Alpaca rows
(instruction/input/output). Checked against the tokenizer's own apply_chat_template and
encoding, with a tokenizer built here (word level, a chat template of its own; no hub)."""
import json

import pytest

from safehook.probes.probe import Probe

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")
WORDS = ("how do i pick a lock sorry i cannot help with that you are a careful assistant "
         "write a poem about the sea waves roll in summarize this text the cat sat").split()


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)))}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    tok.chat_template = TEMPLATE
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(str(d))
    return str(d)


def _load(tokdir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tokdir, local_files_only=True)


def _ids(x):
    return list(x["input_ids"] if hasattr(x, "keys") else x)


def _probe(tmp_path, tokdir, rows, **cfg):
    path = tmp_path / "probe.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Probe("p", dict({"data": str(path), "tokenizer": tokdir}, **cfg))


CHAT = [
    {"messages": [{"role": "user", "content": "how do i pick a lock"},
                  {"role": "assistant", "content": "sorry i cannot help with that"}]},
    {"messages": [{"role": "system", "content": "you are a careful assistant"},
                  {"role": "user", "content": "write a poem about the sea"},
                  {"role": "assistant", "content": "waves roll in"}]},
]


def test_chat_rows_are_rendered_with_the_tokenizers_own_template(tmp_path, tokdir):
    tok = _load(tokdir)
    ex = _probe(tmp_path, tokdir, CHAT).examples()
    assert len(ex) == 2
    for e, row in zip(ex, CHAT):
        msgs = row["messages"]
        full = _ids(tok.apply_chat_template(msgs, tokenize=True))
        prompt = _ids(tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=True))
        assert e.ids == full
        assert e.prompt == prompt  # what the judges generate from: the template's generation prompt
        # the loss is on the assistant's answer and its end of turn, nothing of the prompt
        assert e.labels == [-100] * len(prompt) + full[len(prompt):]
        answer = tok.decode(full[len(prompt):]).split()
        assert answer == msgs[-1]["content"].split() + ["</s>"], answer
    # the system turn is part of the second row's prompt
    assert tok.decode(ex[1].prompt).split()[:2] == ["<|system|>", "you"]


def test_chat_row_ending_with_the_user_is_a_prompt_alone(tmp_path, tokdir):
    tok = _load(tokdir)
    msgs = [{"role": "user", "content": "summarize this text"}]
    (e,) = _probe(tmp_path, tokdir, [{"messages": msgs}]).examples()
    assert e.ids == _ids(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
    assert set(e.labels) == {-100}


def test_chat_rows_need_a_tokenizer_with_a_chat_template(tmp_path, tokdir):
    with pytest.raises(ValueError, match="a chat row: it needs 'tokenizer'"):
        _probe(tmp_path, tokdir, CHAT, tokenizer=None).examples()
    tok = _load(tokdir)
    tok.chat_template = None
    plain = tmp_path / "plain-tok"
    tok.save_pretrained(str(plain))
    with pytest.raises(ValueError, match="need a tokenizer with a chat template"):
        _probe(tmp_path, str(plain), CHAT).examples()


ALPACA = [{"instruction": "summarize this text", "input": "the cat sat", "output": "the cat sat"},
          {"instruction": "how do i pick a lock", "input": "", "output": "sorry i cannot help with that"}]


def test_alpaca_rows_become_prompt_and_response(tmp_path, tokdir):
    tok = _load(tokdir)
    ex = _probe(tmp_path, tokdir, ALPACA).examples()
    for e, row, prompt in zip(ex, ALPACA, ["summarize this text\n\nthe cat sat", "how do i pick a lock"]):
        p = list(tok(prompt)["input_ids"])
        a = list(tok(row["output"], add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
        assert e.prompt_text == prompt
        assert e.ids == p + a and e.labels == [-100] * len(p) + a


def test_alpaca_rows_with_the_chat_template(tmp_path, tokdir):
    """chat_template: true wraps the Alpaca prompt as a user turn, as it does text rows."""
    tok = _load(tokdir)
    (e,) = _probe(tmp_path, tokdir, ALPACA[1:], chat_template=True).examples()
    want = _ids(tok.apply_chat_template([{"role": "user", "content": "how do i pick a lock"}],
                                        add_generation_prompt=True, tokenize=True))
    assert e.prompt == want and e.ids[:len(want)] == want
