"""A small Llama trained on a task that needs attention across documents, to measure blending's quality.

Random weights cannot show what non-prefix reuse loses, and no model hub is reachable in CI, so this
trains one here (a few minutes on 2 CPU cores; ``lmcache/demo/blend_model`` holds the committed result).

The task: D documents of random symbols, separated by the blend separator ``# #``, then questions
``Q x y``: y is the symbol after x in the documents read as one text (separators skipped). Training rows
continue the text from random places after ``Q`` (``Q x y z ...``): the same skill, many targets per row. For x at the
end of a document, y is the first symbol of the *next* document: the answer needs that document's KV to
know what came before it, which a document's KV computed on its own does not (it saw ``<s> # #`` before
it). Those "boundary" questions measure cross-document attention; the others are controls.

    python -m lmcache.demo.blend_task DIR [--steps 3000]
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
    questions: int = 16


@dataclass(frozen=True)
class Example:
    """One prompt: ``context`` (``<s> # # doc # # doc ... # #``), the document spans in it, then questions."""

    context: list[int]
    doc_spans: list[tuple[int, int]]
    questions: list[tuple[int, int, bool]]  # (x, y, is_boundary), token ids


def vocab() -> dict[str, int]:
    return {w: i for i, w in enumerate(WORDS)}


def sample(rng: random.Random, shape: TaskShape, boundary_only: bool = False) -> Example:
    v = vocab()
    symbols = rng.sample(range(NUM_SYMBOLS), shape.docs * shape.doc_len)
    docs = [symbols[i * shape.doc_len : (i + 1) * shape.doc_len] for i in range(shape.docs)]
    sep = [v[w] for w in SEPARATOR]
    context, spans = [v["<s>"]] + sep, []
    for d in docs:
        start = len(context)
        context += [v[f"s{s}"] for s in d]
        spans.append((start, len(context)))
        context += sep
    flat = [s for d in docs for s in d]
    boundary = {(i + 1) * shape.doc_len - 1 for i in range(shape.docs - 1)}
    pool = sorted(boundary) if boundary_only else list(range(len(flat) - 1))
    picks = [rng.choice(pool) for _ in range(shape.questions)] if boundary_only else rng.sample(pool, shape.questions)
    questions = [(v[f"s{flat[i]}"], v[f"s{flat[i + 1]}"], i in boundary) for i in picks]
    return Example(context, spans, questions)


def question_tokens(ex: Example) -> list[int]:
    v = vocab()
    return [t for x, y, _ in ex.questions for t in (v["Q"], x, y)]


def save_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)


def batches(shape: TaskShape, size: int, seed: int, spans: int = 5, span_len: int = 12) -> Iterator[tuple["object", "object"]]:
    """Training rows: a context, then ``spans`` times ``Q`` and a run of the documents' text read as one, from a
    random place (half of them just before a boundary); the loss is on every run token after the first. Copying
    the text on from where a symbol was seen is the skill the questions need (an induction head); runs start at
    random places so no fixed offset copies them (a whole-text repetition is learnt that way, and fails here)."""
    import torch

    rng = random.Random(seed)
    v = vocab()
    while True:
        rows, masks = [], []
        for _ in range(size):
            ex = sample(rng, shape)
            flat = [t for s, e in ex.doc_spans for t in ex.context[s:e]]
            seq, mask = list(ex.context), [0] * len(ex.context)
            for i in range(spans):
                if i % 2 == 0:
                    edge = rng.randrange(1, shape.docs) * shape.doc_len
                    start = max(0, min(edge - rng.randint(1, span_len - 1), len(flat) - span_len))
                else:
                    start = rng.randrange(0, len(flat) - span_len + 1)
                seq += [v["Q"]] + flat[start : start + span_len]
                mask += [0, 0] + [1] * (span_len - 1)
            rows.append(seq)
            masks.append(mask)
        yield torch.tensor(rows), torch.tensor(masks, dtype=torch.bool)


def train(out: str | Path, *, steps: int = 3000, layers: int = 4, hidden: int = 128, heads: int = 4, kv_heads: int = 2,
          seed: int = 0, shape: TaskShape = TaskShape(), log_every: int = 100) -> Path:
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
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=max(0.05, 2 / steps))
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
            print(f"step {step:5d}  loss {loss.item():.3f}  answer accuracy {acc:.2f}  {time.time() - t0:.0f} s", flush=True)
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(out)
    (out / "blend-task.json").write_text(json.dumps({"docs": shape.docs, "doc_len": shape.doc_len,
                                                     "questions": shape.questions, "steps": steps, "seed": seed}))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lmcache.demo.blend_task", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="directory to write the trained model to")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    args = p.parse_args(argv)
    print(f"trained model in {train(args.out, steps=args.steps, layers=args.layers, hidden=args.hidden)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
