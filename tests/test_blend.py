"""Blending (CacheBlend) in the core: RoPE re-rotation, the reference model, the blend step, segment keys and
segment storage, on real models (transformers' Llama/Qwen2 as the reference) and real tiers."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache.core.blend.blender import BlendSettings, blend
from lmcache.core.blend.kvio import dense_kv, load_segments, save_segment
from lmcache.core.blend.reference import ReferenceLlama
from lmcache.core.blend.rope import Rope, llama_inv_freq
from lmcache.core.blend.segments import SegmentHasher, check_spans, split_spans
from lmcache.core.config import load_config
from lmcache.core.engine import CacheEngine
from lmcache.core.geometry import KVGeometry, ModelIdentity
from lmcache.core.keys import ChunkHasher

transformers = pytest.importorskip("transformers")


def hf_model(path, arch: str = "llama", layers: int = 4, hidden: int = 64, seed: int = 0) -> ReferenceLlama:
    """A random-weight transformers model saved to ``path``, loaded back as the reference model."""
    torch.manual_seed(seed)
    common = dict(vocab_size=200, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        model = transformers.LlamaForCausalLM(cfg)
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    model.save_pretrained(path, safe_serialization=True)
    return ReferenceLlama.load(path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return hf_model(tmp_path_factory.mktemp("llama"))


# -- RoPE -------------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(p=st.integers(0, 500), q=st.integers(0, 500), neox=st.booleans(), scaled=st.booleans(), partial=st.booleans())
def test_a_key_moved_by_rope_equals_the_key_computed_at_the_new_position(p, q, neox, scaled, partial):
    scaling = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64} if scaled else None
    rope = Rope.from_inv_freq(llama_inv_freq(32, 10000.0, scaling, rotary_dim=16 if partial else None), 600, neox)
    x = torch.randn(3, 2, 32)
    at_p = rope.apply(x, torch.full((3,), p))
    moved = rope.rotate(at_p, torch.full((3,), q - p))
    torch.testing.assert_close(moved, rope.apply(x, torch.full((3,), q)), atol=2e-5, rtol=1e-5)
    if partial:  # channels past rotary_dim carry no position
        assert torch.equal(moved[..., 16:], x[..., 16:])


def test_rope_refuses_a_move_past_its_table():
    rope = Rope.from_inv_freq(llama_inv_freq(8, 10000.0), 16)
    with pytest.raises(ValueError, match="RoPE table ends at 15"):
        rope.rotate(torch.zeros(1, 1, 8), torch.tensor([16]))


# -- the reference model ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_reference_model_computes_what_transformers_computes(tmp_path, arch):
    ref = hf_model(tmp_path, arch)
    model = getattr(transformers, "LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM").from_pretrained(tmp_path)
    tokens = torch.randint(0, 200, (90,))
    with torch.no_grad():
        want = model(tokens[None]).logits[0]
    got, _, _ = ref.forward(tokens)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the same with the first 50 tokens' K/V as a cache (positions continue after it)
    _, k, v = ref.forward(tokens[:50])
    tail, _, _ = ref.forward(tokens[50:], k, v)
    torch.testing.assert_close(tail, want[50:], atol=1e-4, rtol=1e-4)


# -- the blend step ---------------------------------------------------------------------------------------

def naive_cache(ref: ReferenceLlama, tokens: torch.Tensor, spans: list[tuple[int, int]]):
    """Each span's K/V computed on its own at positions 0.., then moved to where it sits in ``tokens``."""
    n = tokens.shape[0]
    ck = [torch.zeros(n, ref.kv_heads, ref.head_dim) for _ in range(ref.num_layers)]
    cv = [torch.zeros(n, ref.kv_heads, ref.head_dim) for _ in range(ref.num_layers)]
    for s, e in spans:
        _, k, v = ref.forward(tokens[s:e])
        for layer in range(ref.num_layers):
            ck[layer][s:e] = ref.rope.rotate(k[layer], torch.full((e - s,), s))
            cv[layer][s:e] = v[layer]
    return ck, cv


def test_blending_everything_is_a_full_prefill_and_less_converges_to_it_monotonically(llama):
    torch.manual_seed(1)
    tokens = torch.randint(0, 200, (160,))
    spans = [(0, 40), (40, 80), (80, 120), (120, 160)]
    ck, cv = naive_cache(llama, tokens, spans)
    question = torch.randint(0, 200, (6,))
    _, full_k, full_v = llama.forward(tokens)
    want, _, _ = llama.forward(question, full_k, full_v)
    cached = torch.ones(160, dtype=torch.bool)
    errors, recomputed = [], []
    for ratio in (0.0, 0.05, 0.15, 0.3, 0.5, 1.0):
        result = blend(llama, tokens, ck, cv, cached, BlendSettings(ratio, 0, 1))
        got, _, _ = llama.forward(question, result.k, result.v)
        errors.append(float((got[-1] - want[-1]).abs().max()))
        recomputed.append(set(result.recomputed.tolist()))
        if ratio == 1.0:
            for layer in range(llama.num_layers):
                torch.testing.assert_close(result.k[layer], full_k[layer], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(result.v[layer], full_v[layer], atol=1e-5, rtol=1e-5)
            assert result.compute_fraction == 1.0
    assert errors[0] > 1e-3, "naive reuse should differ from a full prefill on this model"
    assert all(a >= b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4
    assert all(a <= b for a, b in zip(recomputed, recomputed[1:])), "the selection grows with the ratio"
    # the first span computed alone at position 0 *is* its full prefill: never worth recomputing
    assert not recomputed[2] & set(range(40))


def test_tokens_without_cached_kv_are_always_recomputed(llama):
    tokens = torch.randint(0, 200, (64,))
    ck, cv = naive_cache(llama, tokens, [(0, 30), (34, 64)])
    cached = torch.ones(64, dtype=torch.bool)
    cached[30:34] = False  # a separator: nothing cached
    result = blend(llama, tokens, ck, cv, cached, BlendSettings(0.0, 0, 1))
    assert result.recomputed.tolist() == [30, 31, 32, 33]
    assert 0 < result.compute_fraction < 1
    with pytest.raises(ValueError, match="blend_recompute_ratio"):
        BlendSettings(1.5)


# -- segments ---------------------------------------------------------------------------------------------

IDENTITY = ModelIdentity("blend-test", KVGeometry(2, 2, 8, 8, torch.float32))


def test_a_segment_has_the_same_keys_wherever_it_sits_and_none_of_a_prefix_chunk():
    hasher = SegmentHasher(IDENTITY, 4)
    doc = list(range(100, 112))
    sep = [7, 7]
    a = [1, 2, 3] + sep + doc + sep + [50, 51, 52, 53, 54]
    b = [1, 9] + sep + [60, 61, 62, 63, 64, 65] + sep + doc + sep + [70]
    sa, sb = hasher.segments(a, split_spans(a, sep)), hasher.segments(b, split_spans(b, sep))
    assert [(s.start, s.end) for s in sa] == [(0, 3), (5, 17), (19, 24)]
    assert sa[1].keys == sb[2].keys and len(sa[1].keys) == 3
    assert not set(sa[1].keys) & set(ChunkHasher(IDENTITY, 4).keys(doc))
    assert SegmentHasher(IDENTITY, 4, "tenant-b").segments(a, [(5, 17)])[0].keys != sa[1].keys
    assert check_spans([[0, 3], [5, 17]], 24) == [(0, 3), (5, 17)]
    with pytest.raises(ValueError, match="in order, not overlapping"):
        check_spans([[5, 17], [0, 3]], 24)
    with pytest.raises(ValueError, match="within the prompt's 24 tokens"):
        check_spans([[20, 30]], 24)


def engine_on(path, **over) -> CacheEngine:
    cfg = load_config(env={}, overrides={"chunk_size": 4, "max_cpu_size_gb": 0.01, "local_disk_path": str(path), **over})
    return CacheEngine(cfg, IDENTITY, device="cpu")


@settings(max_examples=10, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), start=st.integers(0, 40))
def test_segment_kv_is_stored_at_its_own_positions_and_comes_back_bit_exact(tmp_path_factory, dtype, start):
    geometry = KVGeometry(2, 2, 8, 8, dtype)
    identity = ModelIdentity("blend-test", geometry)
    cfg = load_config(env={}, overrides={"chunk_size": 4, "max_cpu_size_gb": 0.01,
                                         "local_disk_path": str(tmp_path_factory.mktemp("disk"))})
    engine = CacheEngine(cfg, identity, device="cpu")
    rope = Rope.from_inv_freq(llama_inv_freq(8, 10000.0), 128)
    n = start + 12
    kv = dense_kv(geometry, (0, 2), n)
    for t in kv.k + (kv.v or []):
        t.copy_(torch.randn(t.shape).to(dtype))
    seg = SegmentHasher(identity, 4).segments(list(range(n)), [(start, n)])[0]
    assert save_segment(engine, seg, kv, rope).stored_chunks == 3
    # what the store holds: the keys moved to the segment's own positions 0..11 (read with no RoPE: the raw bytes)
    raw = dense_kv(geometry, (0, 2), 12)
    moved = type(seg)(0, 12, seg.keys)
    assert load_segments(engine, [moved], [3], raw, None).all()
    for layer in range(2):
        want = rope.rotate(kv.k[layer][start:n], torch.full((12,), -start))
        assert torch.equal(raw.k[layer].view(torch.uint8), want.view(torch.uint8))
        assert torch.equal(raw.v[layer].view(torch.uint8), kv.v[layer][start:n].view(torch.uint8))
    engine.close()


def test_a_corrupt_segment_chunk_on_disk_is_a_miss_and_its_tokens_are_recomputed(tmp_path):
    geometry = IDENTITY.geometry
    engine = engine_on(tmp_path)
    kv = dense_kv(geometry, (0, 2), 12)
    for t in kv.k + (kv.v or []):
        t.copy_(torch.randn(t.shape))
    seg = SegmentHasher(IDENTITY, 4).segments(list(range(12)), [(0, 12)])[0]
    save_segment(engine, seg, kv, None)
    engine.flush()
    engine.close()
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size > 100)
    assert len(files) == 3
    victim = next(f for f in files if seg.keys[1].hex() in f.name)
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x40
    victim.write_bytes(bytes(data))
    fresh = engine_on(tmp_path)  # a new process's view: its CPU tier is empty, the disk has the chunks
    out = dense_kv(geometry, (0, 2), 12)
    cached = load_segments(fresh, [seg], [3], out, None)
    assert cached.tolist() == [True] * 4 + [False] * 8  # the prefix before the corrupt chunk only
    for layer in range(2):
        assert torch.equal(out.k[layer][:4], kv.k[layer][:4]) and not out.k[layer][4:].any()
    fresh.close()
    assert os.path.exists(tmp_path)


def test_the_quality_benchmark_on_the_trained_model_orders_full_blend_and_naive_reuse(capsys):
    """``lmcache bench blend`` on the committed model (trained by lmcache.demo.blend_task): a full prefill names the
    repeated symbol, naive reuse of documents computed alone loses it where the two occurrences sit in different
    documents (and keeps it where they share one), blending at the default ratio recovers most of that gap, and
    recomputing everything is a full prefill again. The figures are the benchmark's (README)."""
    from lmcache.cli.bench_blend import evaluate
    from lmcache.cli.main import main
    from lmcache.demo.blend_task import COMMITTED

    result = evaluate(COMMITTED, prompts=24, ratios=[0.05, 0.15, 1.0])
    rows = result["configurations"]
    assert rows["full"]["cross_document_accuracy"] >= 0.9 and rows["full"]["same_document_accuracy"] >= 0.9
    assert rows["naive"]["cross_document_accuracy"] <= 0.5 * rows["full"]["cross_document_accuracy"]
    assert rows["naive"]["same_document_accuracy"] >= 0.8
    assert rows["blend 15%"]["cross_document_accuracy_gap_recovered"] >= 0.8
    logliks = [rows[k]["answer_loglik"] for k in ("naive", "blend 5%", "blend 15%", "blend 100%")]
    assert logliks[0] < logliks[2] - 1 and abs(logliks[2] - logliks[3]) < 1e-2, logliks
    assert abs(rows["blend 100%"]["answer_loglik"] - rows["full"]["answer_loglik"]) < 1e-3
    assert rows["blend 100%"]["cross_document_accuracy"] == rows["full"]["cross_document_accuracy"]
    assert rows["naive"]["compute_fraction"] < rows["blend 5%"]["compute_fraction"] < rows["blend 15%"]["compute_fraction"]
    deviation = list(result["random_model_logit_deviation"].values())
    assert deviation == sorted(deviation, reverse=True) and deviation[-1] < 1e-4
    assert main(["bench", "blend", "--prompts", "2", "--ratios", "0.15", "--json"]) == 0
    assert '"blend 15%"' in capsys.readouterr().out
    with pytest.raises(SystemExit, match="each ratio must be in 0..1"):
        main(["bench", "blend", "--ratios", "0.15,7"])
