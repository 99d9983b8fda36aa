"""A small Llama (or Qwen2, Qwen3: ``--arch``) with random weights and a locally trained tokenizer, for serving demos and tests on CPU.

No model hub is needed: the weights are random (seeded, so every build is the same model), the tokenizer
is a word-level vocabulary learned from the Python standard library's own sources. Any engine serves the
result like a downloaded model. Needs ``transformers`` and ``tokenizers`` (``pip install
"lmcache[demo]"``; vLLM brings both).

    python -m lmcache.demo.tiny_model DIR [--dtype float32] [--layers 4]

fp32 by default: a random-weight bf16 model flips greedy tokens at near-ties between a cold and a warm
run (reduction order differs), so equality checks need fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sysconfig
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def _corpus(max_files: int = 400):
    """Text to learn a vocabulary from: the standard library's sources (always on disk)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))[:max_files]
    for f in files:
        try:
            yield f.read_text(errors="ignore")
        except OSError:
            continue


ARCHITECTURES = ("llama", "qwen2", "qwen3")  # qwen2: biased q/k/v projections; qwen3: q/k RMS norms


def build(out: str | os.PathLike, *, vocab_size: int = 8000, hidden: int = 512, layers: int = 4, heads: int = 8,
          kv_heads: int = 4, max_positions: int = 32768, dtype: str = "float32", seed: int = 0,
          arch: str = "llama") -> Path:
    """Write the model to ``out`` (config, safetensors weights, tokenizer); returns the directory. A
    directory that already holds this build is left as it is."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch '{arch}': use one of {', '.join(ARCHITECTURES)}")
    out = Path(out)
    spec = {"vocab_size": vocab_size, "hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads,
            "max_positions": max_positions, "dtype": dtype, "seed": seed}
    if arch != "llama":
        spec["arch"] = arch  # a Llama build's stamp stays as it was: existing directories are reused
    stamp = out / "lmcache-tiny-model.json"
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return out
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(_corpus(), trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    if arch == "qwen2":  # transformers 5 maps model_type qwen2 to its byte-level Qwen2Tokenizer, whatever the
        fast.save_pretrained(out / "tokenizer")  # tokenizer config says: serve with --tokenizer DIR/tokenizer

    torch.manual_seed(seed)
    name = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
    config = getattr(transformers, f"{name}Config")(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        torch_dtype=dtype)
    model = getattr(transformers, f"{name}ForCausalLM")(config).to(getattr(torch, dtype))
    with torch.no_grad():  # biases start at 0 and norm weights at 1: random ones make them part of what is tested
        for layer in model.model.layers if arch != "llama" else ():
            attn = layer.self_attn
            if arch == "qwen3":
                attn.q_norm.weight.uniform_(0.5, 1.5)
                attn.k_norm.weight.uniform_(0.5, 1.5)
            else:
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    proj.bias.uniform_(-0.5, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    stamp.write_text(json.dumps(spec))
    return out


def words(model_dir: str | os.PathLike, n: int, seed: int) -> str:
    """A text of ``n`` vocabulary words (one token each), deterministic in ``seed``."""
    vocab = json.loads((Path(model_dir) / "tokenizer.json").read_text())["model"]["vocab"]
    pool = sorted(w for w in vocab if w not in SPECIALS)
    rng = random.Random(seed)
    return " ".join(rng.choice(pool) for _ in range(n))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lmcache.demo.tiny_model", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="directory to write the model to")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--arch", default="llama", choices=ARCHITECTURES)
    args = p.parse_args(argv)
    path = build(args.out, dtype=args.dtype, layers=args.layers, hidden=args.hidden, arch=args.arch)
    print(f"tiny model in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
