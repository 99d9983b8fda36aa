"""``lmcache bench kernels`` and ``lmcache bench ttft``: the accelerator data path against same-run limits.

kernels: the hardware backend's paged gather/scatter alone (engine KV memory <-> contiguous canonical chunks on
the same device) next to a plain contiguous copy of the same bytes on that device.
ttft: a transformers Llama with random weights (no download) prefills prompts; the same prompts' KV is then
retrieved from lmcache's CPU tier into a paged cache. Reported: prefill time, retrieve time, their ratio (the
TTFT cut on a hit), and the physical limit of that ratio: prefill time / (KV bytes at the pinned host->device
copy speed measured in the same run).
"""

from __future__ import annotations

import argparse

import torch

from lmcache.core.geometry import KIND_MLA, MODEL_SHAPES, KVGeometry, ModelIdentity, model_shape


def add_parsers(bsub: argparse._SubParsersAction) -> None:
    from lmcache.cli.bench import LAYOUTS
    from lmcache.cli.main import add_config_flags

    k = bsub.add_parser("kernels", help="paged gather/scatter alone vs a contiguous copy on the same device")
    k.add_argument("--model-shape", default="llama-3-8b", choices=sorted(MODEL_SHAPES), help="KV geometry (default llama-3-8b)")
    k.add_argument("--tokens", type=int, default=None, help="tokens moved (default: 32768 on a GPU, 4096 on CPU)")
    k.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the paged KV memory lives (default: cuda where torch sees a GPU, else cpu)")
    k.add_argument("--layout", default="vllm-lbnhc", choices=LAYOUTS, help="engine KV layout (default vllm-lbnhc)")
    k.add_argument("--block-size", type=int, default=16, help="engine block/page size in tokens (default 16)")
    k.add_argument("--repeats", type=int, default=5, help="timed repetitions; the best is reported (default 5)")
    k.add_argument("--json", action="store_true", help="machine-readable output")
    add_config_flags(k)
    k.set_defaults(func=cmd_kernels)

    t = bsub.add_parser("ttft", help="prefill time of a random-weight Llama vs retrieving the same KV from lmcache")
    t.add_argument("--model-shape", default=None, choices=sorted(n for n, g in MODEL_SHAPES.items() if g.kind != KIND_MLA),
                   help="model to build with random weights (default: llama-3-8b on a GPU; mistral-7b's KV shape at "
                        "4 layers on CPU, which fits in memory and builds in seconds)")
    t.add_argument("--layers", type=int, default=None, help="build only this many layers (default: all on a GPU, 4 on CPU)")
    t.add_argument("--tokens", default=None, help="comma-separated prompt lengths (default: 4096,16384,32768 on a "
                                                  "GPU, 256,1024 on CPU)")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model runs (default: cuda where torch sees a GPU, else cpu)")
    t.add_argument("--block-size", type=int, default=16, help="engine block size in tokens (default 16)")
    t.add_argument("--repeats", type=int, default=2, help="timed repetitions; the best is reported (default 2)")
    t.add_argument("--json", action="store_true", help="machine-readable output")
    add_config_flags(t)
    t.set_defaults(func=cmd_ttft)


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else None


def _fallback_line(backend) -> str | None:
    why = getattr(backend, "fallback", None)
    return f"FALLBACK: the {backend.name} backend used the torch reference ops: {why}" if why else None


def cmd_kernels(args: argparse.Namespace) -> int:
    from lmcache.cli.bench import Progress, _paired, _verify, make_layout, random_slots
    from lmcache.cli.main import config_from_args, emit, table
    from lmcache.core import convert
    from lmcache.core.plugins import select_backend

    say = Progress(args.json)
    cfg = config_from_args(args)
    geometry = model_shape(args.model_shape)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no GPU is visible here; use --device cpu")
    tokens = args.tokens or (32768 if device.type == "cuda" else 4096)
    cs = cfg.chunk_size
    tokens = tokens // cs * cs
    if tokens <= 0 or cs % args.block_size:
        raise ValueError(f"--tokens/--block-size: need at least one chunk of {cs} tokens, a multiple of the block size")
    backend = select_backend(cfg.device_backend, device.type)
    nbytes = tokens * geometry.bytes_per_token()
    num_slots = tokens + tokens // 4
    say(f"allocating 2 x {nbytes / 2**30:.2f} GiB of {args.layout} KV memory + {nbytes / 2**30:.2f} GiB of chunks on "
        f"{device}; backend {backend.name}")
    src, src_storage = make_layout(geometry, args.layout, num_slots, args.block_size, device, fill=True)
    dst, dst_storage = make_layout(geometry, args.layout, num_slots, args.block_size, device, fill=False)
    H, L, C = src.num_heads, geometry.num_layers, geometry.row_dim
    chunks = torch.empty(tokens // cs, H, L, cs, C, dtype=geometry.dtype, device=device)
    src_slots = random_slots(tokens, num_slots, args.block_size, device, seed=1)
    dst_slots = random_slots(tokens, num_slots, args.block_size, device, seed=2)
    gather_jobs = [(convert.plan_slots(src, src_slots[j * cs:(j + 1) * cs]), chunks[j]) for j in range(tokens // cs)]
    scatter_jobs = [(convert.plan_slots(dst, dst_slots[j * cs:(j + 1) * cs]), chunks[j]) for j in range(tokens // cs)]
    flat_a = src_storage.view(-1).view(torch.uint8)[:nbytes]
    flat_b = chunks.view(-1).view(torch.uint8)
    sync = _sync(device)

    def run(fn, jobs, kv):
        def op():
            fn(kv, jobs)
            backend.synchronize()
        return op

    say("timing gather (paged -> contiguous chunks) against a contiguous copy of the same bytes")
    raw_g, gather_s = _paired(lambda: flat_b.copy_(flat_a), run(backend.gather, gather_jobs, src), args.repeats, sync=sync)
    say("timing scatter (contiguous chunks -> paged) against a contiguous copy of the same bytes")
    flat_dst = dst_storage.view(-1).view(torch.uint8)[:nbytes]
    raw_s, scatter_s = _paired(lambda: flat_dst.copy_(flat_b), run(backend.scatter, scatter_jobs, dst), args.repeats,
                               sync=sync)
    backend.gather(src, gather_jobs)  # the chunks hold src's tokens again (the copies above overwrote them)
    backend.scatter(dst, scatter_jobs)
    backend.synchronize()
    exact = _verify(src, src_slots, dst, dst_slots)
    raw = nbytes / min(raw_g, raw_s) / 1e9
    data = {"model_shape": args.model_shape, "tokens": tokens, "bytes": nbytes, "device": str(device),
            "layout": args.layout, "block_size": args.block_size, "backend": backend.name,
            "gather_gbps": nbytes / gather_s / 1e9, "scatter_gbps": nbytes / scatter_s / 1e9,
            "raw_copy_gbps": raw, "gather_ratio": nbytes / gather_s / 1e9 / raw,
            "scatter_ratio": nbytes / scatter_s / 1e9 / raw, "bit_exact": exact,
            "fallback": getattr(backend, "fallback", None)}

    def render(d):
        table(f"lmcache bench kernels: {d['model_shape']}, {d['tokens']} tokens ({d['bytes'] / 2**30:.2f} GiB), "
              f"{d['layout']} block {d['block_size']} on {d['device']}, backend {d['backend']} (bytes counted once)",
              ["operation", "GB/s", "same-run contiguous copy GB/s", "ratio"],
              [["gather (paged -> chunks)", f"{d['gather_gbps']:.1f}", f"{d['raw_copy_gbps']:.1f}", f"{d['gather_ratio']:.0%}"],
               ["scatter (chunks -> paged)", f"{d['scatter_gbps']:.1f}", f"{d['raw_copy_gbps']:.1f}", f"{d['scatter_ratio']:.0%}"]])
        print(f"bit-exact: {d['bit_exact']}")
        if d["fallback"]:
            print(_fallback_line(backend))

    emit(args, data, render)
    return 0 if exact else 1


# transformers configs for the model shapes (random weights: only the sizes matter)
_LLAMA = {"llama-3-8b": dict(hidden_size=4096, num_attention_heads=32, intermediate_size=14336, vocab_size=128256),
          "llama-3-70b": dict(hidden_size=8192, num_attention_heads=64, intermediate_size=28672, vocab_size=128256),
          "mistral-7b": dict(hidden_size=4096, num_attention_heads=32, intermediate_size=14336, vocab_size=32768),
          "qwen3-32b": dict(hidden_size=5120, num_attention_heads=64, intermediate_size=25600, vocab_size=151936)}


def llama_for(shape: str, device: torch.device, layers: int | None = None):
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        raise ValueError(f"lmcache bench ttft needs transformers ({e}): pip install 'lmcache[demo]'") from None
    g = model_shape(shape)
    if layers:
        g = KVGeometry(min(layers, g.num_layers), g.num_kv_heads, g.k_dim, g.v_dim, g.dtype, g.kind)
    extra = _LLAMA.get(shape) or dict(hidden_size=4 * g.num_kv_heads * g.k_dim, num_attention_heads=4 * g.num_kv_heads,
                                      intermediate_size=14 * g.num_kv_heads * g.k_dim, vocab_size=1024)
    config = LlamaConfig(num_hidden_layers=g.num_layers, num_key_value_heads=g.num_kv_heads, head_dim=g.k_dim,
                         max_position_embeddings=131072, attn_implementation="sdpa", **extra)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(g.dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(old)
    return model, g


def _layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[layer], cache.value_cache[layer]
    return cache[layer][0], cache[layer][1]


def cmd_ttft(args: argparse.Namespace) -> int:
    from lmcache.cli.bench import Progress, _best_seconds, _verify, make_layout, random_slots
    from lmcache.cli.main import config_from_args, emit, table
    from lmcache.core.engine import CacheEngine

    say = Progress(args.json)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no GPU is visible here; use --device cpu")
    lengths = [int(x) for x in (args.tokens or ("4096,16384,32768" if device.type == "cuda" else "256,1024")).split(",")]
    cfg0 = config_from_args(args)
    cs = cfg0.chunk_size
    lengths = [n // cs * cs for n in lengths]
    if min(lengths) <= 0 or cs % args.block_size:
        raise ValueError(f"--tokens: each length needs at least one chunk of {cs} tokens (a multiple of the block size)")
    on_cpu = device.type == "cpu"
    args.model_shape = args.model_shape or ("mistral-7b" if on_cpu else "llama-3-8b")
    layers = args.layers or (4 if on_cpu else None)
    say(f"building a random-weight Llama ({args.model_shape}{f', {layers} layers' if layers else ''}) on {device}"
        + (" - the full model on CPU takes minutes and ~17 GB" if on_cpu and not layers else ""))
    model, g = llama_for(args.model_shape, device, layers)
    say("model built")
    sync = _sync(device)
    biggest = max(lengths) * g.bytes_per_token()
    cfg = cfg0.replace(max_cpu_size_gb=max(cfg0.max_cpu_size_gb, biggest * 1.1 / 2**30 + 0.01))
    engine = CacheEngine(cfg, ModelIdentity(f"bench-ttft/{args.model_shape}", g), device=device)
    rows = []
    for n in lengths:
        nbytes = n * g.bytes_per_token()
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
        say(f"{n} tokens: prefill (best of {args.repeats})")
        out = {}

        def prefill():
            with torch.inference_mode():
                out["kv"] = model(ids, use_cache=True, logits_to_keep=1).past_key_values

        prefill_s = _best_seconds(prefill, args.repeats, sync=sync)
        num_slots = n + n // 4
        src, _ = make_layout(g, "vllm-lbnhc", num_slots, args.block_size, device, fill=False)
        dst, dst_storage = make_layout(g, "vllm-lbnhc", num_slots, args.block_size, device, fill=False)
        src_slots = random_slots(n, num_slots, args.block_size, device, seed=1)
        dst_slots = random_slots(n, num_slots, args.block_size, device, seed=2)
        for layer in range(g.num_layers):  # the model's KV, written into a vLLM-layout paged cache
            k, v = _layer_kv(out["kv"], layer)
            row = torch.cat([k[0], v[0]], dim=-1).transpose(0, 1)  # [T, H, K|V]
            src.layers[layer][src_slots // args.block_size, :, src_slots % args.block_size, :] = row
        prompt = ids[0].tolist()
        engine.clear()
        engine.store(prompt, src, src_slots)
        engine.backend.synchronize()
        say(f"{n} tokens: retrieve from the CPU tier into a paged cache, and the raw pinned host->device copy")
        pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
        flat = dst_storage.view(-1).view(torch.uint8)[:nbytes]
        raw_s = _best_seconds(lambda: flat.copy_(pinned, non_blocking=True), args.repeats + 1, sync=sync)
        retrieve_s = _best_seconds(lambda: engine.retrieve(prompt, dst, dst_slots), args.repeats, sync=sync)
        exact = _verify(src, src_slots, dst, dst_slots)
        rows.append({"tokens": n, "kv_bytes": nbytes, "prefill_s": prefill_s, "retrieve_s": retrieve_s,
                     "raw_h2d_gbps": nbytes / raw_s / 1e9, "ttft_cut": prefill_s / retrieve_s,
                     "limit_cut": prefill_s / raw_s, "ratio_to_limit": raw_s / retrieve_s, "bit_exact": exact})
        out.clear()  # free this prompt's KV before the next, longer one
    data = {"model_shape": args.model_shape, "layers": g.num_layers, "device": str(device), "backend": engine.backend.name,
            "fallback": getattr(engine.backend, "fallback", None), "rows": rows}
    engine.close()

    def render(d):
        table(f"lmcache bench ttft: random-weight Llama ({d['model_shape']}) on {d['device']}, backend {d['backend']}",
              ["tokens", "prefill s", "retrieve s", "TTFT cut", "limit (KV at raw H2D)", "cut / limit", "bit-exact"],
              [[r["tokens"], f"{r['prefill_s']:.3f}", f"{r['retrieve_s']:.4f}", f"{r['ttft_cut']:.1f}x",
                f"{r['limit_cut']:.1f}x ({r['raw_h2d_gbps']:.1f} GB/s)", f"{r['ratio_to_limit']:.0%}", r["bit_exact"]]
               for r in d["rows"]])
        if d["device"] == "cpu":
            print("on CPU the 'raw H2D' limit is a host-to-host copy of the same bytes (there is no device to cross to)")
        if d["fallback"]:
            print(f"FALLBACK: the {d['backend']} backend used the torch reference ops: {d['fallback']}")

    emit(args, data, render)
    return 0 if all(r["bit_exact"] for r in rows) else 1
