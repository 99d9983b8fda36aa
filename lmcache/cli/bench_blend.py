"""``lmcache bench blend``: what blending costs in answer quality, on a model whose attention was trained.

The model (``lmcache.demo.blend_task``, committed under ``lmcache/demo/blend_model``) reads documents of distinct
symbols separated by ``# #``, one symbol occurring twice, and names that symbol after ``Q``. In *cross-document*
rows the two occurrences sit in different documents: only a context whose KV was computed with the other
documents in view marks the repeat. In *same-document* rows (the control) a document's own KV has it. For each
prompt:

* full prefill: the whole context computed at once (the reference);
* naive reuse: each document's KV as a warm-up request ``<s> # # doc`` left it, moved to its new position,
  nothing recomputed (separators computed over it);
* blend at each ratio: the same cache, ``ratio`` of the cached tokens recomputed from the check layer on.

Reported per configuration: cross- and same-document accuracy, mean log-likelihood of the right answers, and
the share of a full prefill's layer work done; the share of the naive-to-full gap each ratio recovers; and, on
a random-weight model, the largest last-token logit deviation from a full prefill per ratio.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

RATIOS = (0.05, 0.15, 0.30)


def add_parser(bsub: argparse._SubParsersAction) -> None:
    b = bsub.add_parser("blend", help="answer quality of blending vs full prefill and naive reuse, on a trained model")
    b.add_argument("--model", help="a model trained by python -m lmcache.demo.blend_task (default: the committed one)")
    b.add_argument("--prompts", type=int, default=100, help="prompts evaluated (default 100)")
    b.add_argument("--ratios", default=",".join(str(r) for r in RATIOS), help="recompute ratios (default 0.05,0.15,0.3)")
    b.add_argument("--check-layer", type=int, default=1, help="blend_check_layer (default 1)")
    b.add_argument("--seed", type=int, default=1234)
    b.add_argument("--json", action="store_true", help="machine-readable output")
    b.set_defaults(func=cmd_blend)


def evaluate(model_dir: str | Path, prompts: int, ratios: list[float], check_layer: int = 1, seed: int = 1234,
             progress=None) -> dict:
    import torch

    from lmcache.core.blend.blender import BlendSettings, blend
    from lmcache.core.blend.reference import ReferenceLlama
    from lmcache.demo.blend_task import SEPARATOR, TaskShape, sample, vocab

    ref = ReferenceLlama.load(model_dir)
    task = json.loads((Path(model_dir) / "blend-task.json").read_text())
    if task.get("task") != "repeated-symbol":
        raise SystemExit(f"lmcache bench blend: {model_dir} was trained on another task ({task.get('task', 'text repetition')}): "
                         "retrain it with python -m lmcache.demo.blend_task")
    shape = TaskShape(task["docs"], task["doc_len"], task["cross"])
    v = vocab()
    warm_prefix = [v["<s>"]] + [v[w] for w in SEPARATOR]
    configs = ["full", "naive"] + [f"blend {r:.0%}" for r in ratios]
    tally = {c: {"cross": [0, 0], "same": [0, 0], "loglik": 0.0, "work": 0.0} for c in configs}
    rng = random.Random(seed)
    question = torch.tensor([v["Q"]])
    for i in range(prompts):
        ex = sample(rng, shape)
        context = torch.tensor(ex.context)
        n = len(ex.context)
        cached_k = [torch.zeros(n, ref.kv_heads, ref.head_dim) for _ in range(ref.num_layers)]
        cached_v = [torch.zeros(n, ref.kv_heads, ref.head_dim) for _ in range(ref.num_layers)]
        cached = torch.zeros(n, dtype=torch.bool)
        w = len(warm_prefix)
        for s, e in ex.doc_spans:  # the warm-up request's KV of the document, moved from position w to s
            _, k, vv = ref.forward(torch.tensor(warm_prefix + ex.context[s:e]))
            for layer in range(ref.num_layers):
                cached_k[layer][s:e] = ref.rope.rotate(k[layer][w:], torch.full((e - s,), s - w))
                cached_v[layer][s:e] = vv[layer][w:]
            cached[s:e] = True
        caches = {"full": ref.forward(context)[1:] + (1.0,)}
        naive = blend(ref, context, cached_k, cached_v, cached, BlendSettings(0.0, 0, 0))
        caches["naive"] = (naive.k, naive.v, naive.compute_fraction)
        for r in ratios:
            result = blend(ref, context, cached_k, cached_v, cached, BlendSettings(r, 0, check_layer))
            caches[f"blend {r:.0%}"] = (result.k, result.v, result.compute_fraction)
        for name, (ks, vs, work) in caches.items():
            t = tally[name]
            t["work"] += work
            logits, _, _ = ref.forward(question, ks, vs)
            logp = logits[-1].log_softmax(-1)
            kind = t["cross" if ex.cross_document else "same"]
            kind[0] += int(int(logp.argmax()) == ex.answer)
            kind[1] += 1
            t["loglik"] += float(logp[ex.answer])
        if progress:
            progress(i + 1, prompts)
    rows = {}
    for name, t in tally.items():
        rows[name] = {
            "cross_document_accuracy": t["cross"][0] / max(t["cross"][1], 1),
            "same_document_accuracy": t["same"][0] / max(t["same"][1], 1),
            "answer_loglik": t["loglik"] / prompts,
            "compute_fraction": t["work"] / prompts,
        }
    full, naive = rows["full"], rows["naive"]
    for name in rows:
        if name.startswith("blend"):
            for metric in ("cross_document_accuracy", "answer_loglik"):
                gap = full[metric] - naive[metric]
                rows[name][f"{metric}_gap_recovered"] = (rows[name][metric] - naive[metric]) / gap if gap else None
    return {"model": str(model_dir), "prompts": prompts, "check_layer": check_layer, "configurations": rows,
            "random_model_logit_deviation": random_model_deviation(sorted({0.0, *ratios, 0.5, 1.0}), check_layer)}


def random_model_deviation(ratios: list[float], check_layer: int = 1, seed: int = 0) -> dict[str, float]:
    """Largest |last-token logit - full prefill's| per ratio on a random-weight Llama (4 documents, each cached alone)."""
    import torch

    from lmcache.core.blend.blender import BlendSettings, blend
    from lmcache.core.blend.reference import ReferenceLlama

    torch.manual_seed(seed)
    hidden, layers, vocab_size = 128, 4, 500
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_hidden_layers": layers, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6}
    w = {"model.embed_tokens.weight": torch.randn(vocab_size, hidden), "model.norm.weight": torch.ones(hidden),
         "lm_head.weight": torch.randn(vocab_size, hidden) / hidden**0.5}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden // 2, hidden)),
                            ("self_attn.v_proj", (hidden // 2, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                            ("mlp.gate_proj", (2 * hidden, hidden)), ("mlp.up_proj", (2 * hidden, hidden)),
                            ("mlp.down_proj", (hidden, 2 * hidden))):
            w[p + name + ".weight"] = torch.randn(shape) / shape[1] ** 0.5
        w[p + "input_layernorm.weight"] = torch.ones(hidden)
        w[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    ref = ReferenceLlama(w, config)
    tokens = torch.randint(0, vocab_size, (160,))
    spans = [(0, 40), (40, 80), (80, 120), (120, 160)]
    ck = [torch.zeros(160, 2, 32) for _ in range(layers)]
    cv = [torch.zeros(160, 2, 32) for _ in range(layers)]
    for s, e in spans:
        _, k, v = ref.forward(tokens[s:e])
        for layer in range(layers):
            ck[layer][s:e] = ref.rope.rotate(k[layer], torch.full((e - s,), s))
            cv[layer][s:e] = v[layer]
    question = torch.randint(0, vocab_size, (8,))
    full, fk, fv = ref.forward(tokens)
    want, _, _ = ref.forward(question, fk, fv)
    out = {}
    for r in ratios:
        res = blend(ref, tokens, ck, cv, torch.ones(160, dtype=torch.bool), BlendSettings(r, 0, check_layer))
        got, _, _ = ref.forward(question, res.k, res.v)
        out[f"{r:.0%}"] = float((got[-1] - want[-1]).abs().max())
    return out


def cmd_blend(args: argparse.Namespace) -> int:
    from lmcache.cli.bench import Progress
    from lmcache.demo.blend_task import COMMITTED

    model = Path(args.model) if args.model else COMMITTED
    if not (model / "blend-task.json").exists():
        raise SystemExit(f"lmcache bench blend: {model} is not a model trained by python -m lmcache.demo.blend_task "
                         "(no blend-task.json): train one, or omit --model for the committed one")
    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        raise SystemExit(f"lmcache bench blend: --ratios {args.ratios!r}: give fractions such as 0.05,0.15,0.3") from None
    if not ratios or any(not 0 <= r <= 1 for r in ratios):
        raise SystemExit(f"lmcache bench blend: --ratios {args.ratios!r}: each ratio must be in 0..1")
    say = Progress(args.json)
    result = evaluate(model, args.prompts, ratios, args.check_layer, args.seed,
                      progress=lambda i, n: say(f"  {i}/{n} prompts") if i % 25 == 0 or i == n else None)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"blending quality on {model} ({args.prompts} prompts, check layer {args.check_layer})")
    print(f"{'configuration':<14} {'cross-doc acc':>13} {'same-doc acc':>12} {'answer loglik':>13} {'layer work':>10} "
          f"{'gap recovered (acc / loglik)':>29}")
    for name, row in result["configurations"].items():
        rec = ""
        if "cross_document_accuracy_gap_recovered" in row:
            a, b = row["cross_document_accuracy_gap_recovered"], row["answer_loglik_gap_recovered"]
            rec = f"{a:.0%} / {b:.0%}" if a is not None and b is not None else "no gap"
        print(f"{name:<14} {row['cross_document_accuracy']:>13.1%} {row['same_document_accuracy']:>12.1%} "
              f"{row['answer_loglik']:>13.3f} {row['compute_fraction']:>10.0%} {rec:>29}")
    dev = result["random_model_logit_deviation"]
    print("random-weight model, largest last-token logit deviation from a full prefill: "
          + ", ".join(f"{k} {v:.2e}" for k, v in dev.items()))
    return 0
