"""A small Llama trained on a task whose answers need attention across documents, to measure blending's quality.

Random weights cannot show what non-prefix reuse loses, and no model hub is reachable in CI, so this
trains one here (about 10 minutes on 2 CPU cores; ``lmcache/demo/blend_model`` holds the committed result,
4 MB).

The task: D documents of random symbols, separated by the blend separator ``# #``, then ``Q`` and the
documents' text again, read as one (separators left out): each symbol of the repetition is predicted from
the context. The symbol that opens document i+1 follows the one that closed document i, across a separator:
predicting it ("boundary" positions) needs the documents' KV to know where they sit among the others, which
a document's KV computed on its own (after ``<s> # #``) does not. The other positions are controls.

What the model learnt (measured, ``lmcache bench blend``): it copies by position, and every document token's
KV carries where it sits in the whole context, so naive reuse loses nearly every answer, not only the boundary
ones: a dense cross-document dependence, harder for blending than the sparse one CacheBlend's paper assumes.
(Rows also ask a run of the text from a random place after a second ``Q``; the model never learnt those in
2000 steps: finding a symbol by content needs an induction head, which did not form here.)

    python -m lmcache.demo.blend_task DIR [--steps 2000]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

SPECIALS = ["<unk>", "<s>", "</s>"]
SEPARATOR = ["#", "#"]
NUM_SYMBOLS = 64
WORDS = SPECIALS + ["#", "Q", "A"] + [f"s{i}" for i in range(NUM_SYMBOLS)]
COMMITTED = Path(__file__).parent / "blend_model"


@dataclass(frozen=True)
class TaskShape:
    docs: int = 4
    doc_len: int = 16


@dataclass(frozen=True)
class Example:
    """One prompt: ``context`` (``<s> # # doc # # doc ... # #``) and the document spans in it."""

    context: list[int]
    doc_spans: list[tuple[int, int]]

    @property
    def text(self) -> list[int]:
        """The documents read as one, separators left out: what follows ``Q``."""
        return [t for s, e in self.doc_spans for t in self.context[s:e]]


def vocab() -> dict[str, int]:
    return {w: i for i, w in enumerate(WORDS)}


def sample(rng: random.Random, shape: TaskShape) -> Example:
    v = vocab()
    symbols = rng.sample(range(NUM_SYMBOLS), shape.docs * shape.doc_len)
    sep = [v[w] for w in SEPARATOR]
    context, spans = [v["<s>"]] + sep, []
    for i in range(shape.docs):
        start = len(context)
        context += [v[f"s{s}"] for s in symbols[i * shape.doc_len : (i + 1) * shape.doc_len]]
        spans.append((start, len(context)))
        context += sep
    return Example(context, spans)


def boundaries(shape: TaskShape) -> list[int]:
    """Positions of the repeated text that open a document after the first."""
    return [i * shape.doc_len for i in range(1, shape.docs)]


def save_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)


def batches(shape: TaskShape, size: int, seed: int, span_len: int = 12) -> Iterator[tuple["object", "object"]]:
    """Rows: a context, ``Q`` and the whole text again, then ``Q`` and a run of it from a random place (often
    just before a boundary); the loss is on every token after the first of each."""
    import torch

    rng = random.Random(seed)
    v = vocab()
    while True:
        rows, masks = [], []
        for _ in range(size):
            ex = sample(rng, shape)
            flat = ex.text
            edge = rng.randrange(1, shape.docs) * shape.doc_len
            start = max(0, min(edge - rng.randint(1, span_len - 1), len(flat) - span_len))
            rows.append(list(ex.context) + [v["Q"]] + flat + [v["Q"]] + flat[start : start + span_len])
            masks.append([0] * len(ex.context) + [0, 0] + [1] * (len(flat) - 1) + [0, 0] + [1] * (span_len - 1))
        yield torch.tensor(rows), torch.tensor(masks, dtype=torch.bool)


def train(out: str | Path, *, steps: int = 2000, layers: int = 4, hidden: int = 128, heads: int = 4, kv_heads: int = 2,
          seed: int = 0, shape: TaskShape = TaskShape(), log_every: int = 100, lr: float = 2e-3) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                         torch_dtype="float32")
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=max(0.05, 2 / steps))
    t0 = time.time()
    for step, (x, mask) in zip(range(steps), batches(shape, 32, seed)):
        logits = model(x[:, :-1]).logits
        target = x[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[mask[:, 1:]], target[mask[:, 1:]])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            acc = (logits[mask[:, 1:]].argmax(-1) == target[mask[:, 1:]]).float().mean().item()
            print(f"step {step:5d}  loss {loss.item():.3f}  accuracy {acc:.2f}  {time.time() - t0:.0f} s", flush=True)
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(out)
    (out / "blend-task.json").write_text(json.dumps({"docs": shape.docs, "doc_len": shape.doc_len, "steps": steps,
                                                     "seed": seed}))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lmcache.demo.blend_task", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="directory to write the trained model to")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    args = p.parse_args(argv)
    print(f"trained model in {train(args.out, steps=args.steps, layers=args.layers, hidden=args.hidden)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
