"""A small Llama trained on a task whose answers need attention across documents, to measure blending's quality.

Random weights cannot show what non-prefix reuse loses, and no model hub is reachable in CI, so this
trains one here (about 15 minutes on 2 CPU cores; ``lmcache/demo/blend_model`` holds the committed result).

The task: D documents of distinct random symbols, separated by the blend separator ``# #``, except that one
symbol occurs twice; after ``Q`` the model names it. Finding a repeat takes attention from the second
occurrence back to the first (no single attention step from ``Q`` can compare two earlier tokens with each
other), so the model learns to mark, at the second occurrence, "seen before": a fact about *another* part of
the context. When the two occurrences sit in different documents ("cross-document" rows, 3 in 4), a document's
KV computed on its own lacks that mark, and naive reuse loses the answer; when both sit in one document
("same-document" rows, the control), it keeps it. This is the sparse cross-document dependence CacheBlend
relies on: one token per prompt carries it.

An earlier version of this task (repeat the documents' text after ``Q``) was learnt as a copy by position,
which makes every document token depend on where it sits among the others: a dense dependence no top-k
selection can repair (session notes in docs/benchmarks.md).

    python -m lmcache.demo.blend_task DIR [--steps 1200] [--layers 4]
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
NUM_SYMBOLS = 128
WORDS = SPECIALS + ["#", "Q", "A"] + [f"s{i}" for i in range(NUM_SYMBOLS)]
COMMITTED = Path(__file__).parent / "blend_model"


@dataclass(frozen=True)
class TaskShape:
    docs: int = 4
    doc_len: int = 16
    #: share of rows whose repeated symbol's two occurrences sit in different documents
    cross: float = 0.75


@dataclass(frozen=True)
class Example:
    """One prompt: ``context`` (``<s> # # doc # # doc ... # #``), the document spans in it, the repeated symbol
    (``answer``, a token id) and whether its occurrences sit in different documents."""

    context: list[int]
    doc_spans: list[tuple[int, int]]
    answer: int
    cross_document: bool
    #: the context position of the second occurrence
    repeat_at: int


def vocab() -> dict[str, int]:
    return {w: i for i, w in enumerate(WORDS)}


def sample(rng: random.Random, shape: TaskShape) -> Example:
    v = vocab()
    n, length = shape.docs * shape.doc_len, shape.doc_len
    symbols = rng.sample(range(NUM_SYMBOLS), n - 1)
    cross = rng.random() < shape.cross
    if cross:
        first_doc, second_doc = sorted(rng.sample(range(shape.docs), 2))
        first = first_doc * length + rng.randrange(length)
        second = second_doc * length + rng.randrange(length)
    else:
        doc = rng.randrange(shape.docs)
        first, second = sorted(doc * length + i for i in rng.sample(range(length), 2))
    rest = iter(symbols)
    order = [symbols[0] if i == second else next(rest) for i in range(n)]
    order[second] = repeated = order[first]
    sep = [v[w] for w in SEPARATOR]
    context, spans = [v["<s>"]] + sep, []
    for i in range(shape.docs):
        start = len(context)
        context += [v[f"s{s}"] for s in order[i * length : (i + 1) * length]]
        spans.append((start, len(context)))
        context += sep
    repeat_at = spans[second // length][0] + second % length
    return Example(context, spans, v[f"s{repeated}"], cross, repeat_at)


def save_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)


def batches(shape: TaskShape, size: int, seed: int) -> Iterator[tuple["object", "object"]]:
    """Rows: a context, ``Q`` and the repeated symbol (the loss is on that symbol); and per row the position of
    the second occurrence (the training-only probe's target, see ``train``)."""
    import torch

    rng = random.Random(seed)
    q = vocab()["Q"]
    while True:
        rows, marks = [], []
        for _ in range(size):
            ex = sample(rng, shape)
            rows.append(list(ex.context) + [q, ex.answer])
            marks.append(ex.repeat_at)
        yield torch.tensor(rows), torch.tensor(marks)


def train(out: str | Path, *, steps: int = 1200, layers: int = 4, hidden: int = 128, heads: int = 4, kv_heads: int = 2,
          seed: int = 0, shape: TaskShape = TaskShape(), log_every: int = 100, lr: float = 2e-3, batch: int = 128) -> Path:
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
    # Training only, dropped after: a linear probe on the first layer's output learns to say "this token occurred
    # before". Without it the two-step circuit (mark repeats, then read the mark from Q) sat at chance for 500 steps:
    # neither step pays off before the other exists. The saved model is a plain Llama.
    probe = torch.nn.Linear(hidden, 1)
    opt = torch.optim.AdamW([*model.parameters(), *probe.parameters()], lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=max(0.05, 2 / steps))
    t0 = time.time()
    for step, (x, marks) in zip(range(steps), batches(shape, batch, seed)):
        result = model(x[:, :-1], logits_to_keep=1, output_hidden_states=True)
        logits = result.logits[:, -1]  # at Q: the repeated symbol
        target = x[:, -1]
        flags = torch.zeros(x.shape[0], x.shape[1] - 1)
        flags[torch.arange(x.shape[0]), marks] = 1.0
        seen = probe(result.hidden_states[1]).squeeze(-1)
        aux = torch.nn.functional.binary_cross_entropy_with_logits(seen, flags, pos_weight=torch.tensor(float(x.shape[1])))
        answer_loss = torch.nn.functional.cross_entropy(logits, target)
        loss = answer_loss + aux
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            acc = (logits.argmax(-1) == target).float().mean().item()
            found = (seen.argmax(-1) == marks).float().mean().item()
            print(f"step {step:5d}  answer loss {answer_loss.item():.3f}  accuracy {acc:.2f}  probe loss {aux.item():.3f}  "
                  f"repeat found {found:.2f}  {time.time() - t0:.0f} s", flush=True)
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(out)
    (out / "blend-task.json").write_text(json.dumps({"task": "repeated-symbol", "docs": shape.docs,
                                                     "doc_len": shape.doc_len, "cross": shape.cross, "steps": steps,
                                                     "seed": seed}))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lmcache.demo.blend_task", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="directory to write the trained model to")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    args = p.parse_args(argv)
    print(f"trained model in {train(args.out, steps=args.steps, layers=args.layers, hidden=args.hidden)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
