"""A tiny chat model for the tests of the default policy and the tokenizer search: a Llama with a
byte-level tokenizer (every text encodes) and, optionally, a chat template. EXTRA special tokens
give the vocabulary a size no other test's tokenizer has (the search scans the whole process)."""
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tokenizer(extra=7, template=True):
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    specials += ["<|x%d|>" % i for i in range(extra)]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(specials + sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  additional_special_tokens=specials[3:])
    if template:
        tok.chat_template = TEMPLATE
    return tok


def model(vocab, layers=4, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                                        eos_token_id=2))


def save(path, extra=7, template=True, layers=4):
    """A model folder as from_pretrained() reads it: its tokenizer and a model of its vocabulary."""
    tok = tokenizer(extra, template)
    tok.save_pretrained(path)
    model(len(tok), layers).save_pretrained(path)
    return len(tok)
