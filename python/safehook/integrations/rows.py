"""Probe rows in the formats of Hugging Face datasets, turned into the rows probes/probe.py reads.

- Chat rows, ``{"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant",
  "content": ...}]}`` (the format of chat datasets and of TRL's SFT data): rendered with the
  probe tokenizer's own chat template (``apply_chat_template``). The loss is on the last
  message when it is the assistant's: its tokens are the template's rendering of the whole
  conversation after the rendering of the conversation before it with the generation prompt.
  A conversation that ends with a user turn is a prompt alone (for the judges).
- Alpaca rows, ``{"instruction", "input", "output"}``: the prompt is the instruction, then a
  blank line and the input when there is one; the response is the output. They become text
  rows (``prompt``/``response``), encoded as those are (plain, or with the chat template when
  the probe says ``chat_template``).

Rows already in safehook's own forms (``input_ids``, ``prompt``) pass through unchanged."""


def _ids(x):
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    return [int(i) for i in x]


def alpaca_prompt(row):
    """The prompt text of an Alpaca row: the instruction, then a blank line and the input."""
    inp = (row.get("input") or "").strip()
    ins = str(row["instruction"]).strip()
    return ins + ("\n\n" + inp if inp else "")


def chat(tok, messages, name="probe"):
    """(input_ids, labels) of MESSAGES rendered with TOK's chat template: labels -100 except on
    the last message when the assistant says it."""
    if not getattr(tok, "chat_template", None):
        raise ValueError("probe %r: chat rows need a tokenizer with a chat template" % name)
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise ValueError("probe %r: 'messages' must be a list of {role, content}" % name)
    if messages[-1]["role"] != "assistant":
        ids = _ids(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        return ids, [-100] * len(ids)
    full = _ids(tok.apply_chat_template(messages, tokenize=True))
    prompt = _ids(tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True))
    if full[:len(prompt)] != prompt or len(full) == len(prompt):
        raise ValueError("probe %r: the chat template renders the conversation without its last turn "
                         "differently from the start of the whole one; give pre-tokenized rows instead" % name)
    return full, [-100] * len(prompt) + full[len(prompt):]


def convert(row, tokenizer, name="probe", n=0):
    """ROW in one of safehook's own forms. TOKENIZER: a callable returning the probe's tokenizer
    (or None), called only for chat rows."""
    if not isinstance(row, dict) or "input_ids" in row or "prompt" in row:
        return row
    if "messages" in row:
        tok = tokenizer()
        if tok is None:
            raise ValueError("probe %r: row %d is a chat row: it needs 'tokenizer'" % (name, n + 1))
        ids, labels = chat(tok, row["messages"], name)
        return {"input_ids": ids, "labels": labels}
    if "instruction" in row:
        out = {"prompt": alpaca_prompt(row), "response": str(row.get("output") or "")}
        return out
    return row
