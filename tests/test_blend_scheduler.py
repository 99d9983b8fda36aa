"""The blending scheduler half on its own: which region a prompt blends, and what it refuses, with the real
segment keys and a lookup that answers from a set of stored keys (the engine tests run it inside vLLM)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch

from lmcache.adapters.vllm.blend_scheduler import BlendScheduler
from lmcache.adapters.vllm.model import ModelView
from lmcache.core.blend.segments import SegmentHasher, split_spans
from lmcache.core.config import load_config
from lmcache.core.geometry import KVGeometry, ModelIdentity

VIEW = ModelView(ModelIdentity("m", KVGeometry(2, 2, 8, 8, torch.float32)), ("l0", "l1"), 16, 1, False)
SEP = [7, 7]


def scheduler(stored: set[bytes], **over) -> BlendScheduler:
    config = load_config(env={}, overrides={"chunk_size": 16, "enable_blending": True, "blend_min_tokens": 16, **over})

    def lookup(keys: list[bytes]) -> int:
        n = 0
        while n < len(keys) and keys[n] in stored:
            n += 1
        return n

    return BlendScheduler(config, VIEW, lookup, SEP, load=True, save=True)


def request(rid: str, tokens: list[int], **params) -> SimpleNamespace:
    return SimpleNamespace(request_id=rid, prompt_token_ids=tokens, num_tokens=len(tokens), kv_transfer_params=params,
                           mm_features=None, prompt_embeds=None, cache_salt=None, lora_request=None)


def stored_docs(*docs: list[int]) -> set[bytes]:
    hasher = SegmentHasher(VIEW.identity, 16, "")
    return {k for d in docs for s in hasher.segments(d, [(0, len(d))]) for k in s.keys}


def test_the_region_ends_at_the_last_cached_chunk_of_any_segment_and_never_takes_the_last_token():
    a, b = list(range(100, 140)), list(range(200, 232))  # 2 full chunks + 8 tokens, 2 full chunks
    s = scheduler(stored_docs(a, b))
    prompt = [1, 2, 3] + SEP + b + SEP + a + SEP + [9] * 5
    assert split_spans(prompt, SEP) == [(0, 3), (5, 37), (39, 79), (81, 86)]
    assert s.get_num_new_matched_tokens(request("r", prompt), 0) == (39 + 32, False)  # a's partial chunk is not cached
    assert s.get_num_new_matched_tokens(request("r2", prompt), 48) == (39 + 32 - 48, False)  # vLLM has a start
    whole = [1] + SEP + b  # the cached document ends the prompt: vLLM computes its last token itself
    assert s.get_num_new_matched_tokens(request("r3", whole), 0) == (len(whole) - 1, False)


def test_too_few_cached_tokens_bad_spans_and_bad_ratios_mean_no_blend_or_the_config_ratio(caplog):
    b = list(range(200, 232))
    s = scheduler(stored_docs(b), blend_min_tokens=64)
    assert s.get_num_new_matched_tokens(request("r", [1] + SEP + b + [5]), 0) == (0, False)
    s = scheduler(stored_docs(b))
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        assert s.get_num_new_matched_tokens(request("x", b + [5], lmcache_segments=[[10, 5]]), 0) == (0, False)
        got = s.get_num_new_matched_tokens(request("y", b + [5], lmcache_segments=[[0, 32]], lmcache_recompute_ratio=3), 0)
    assert got == (32, False)
    said = caplog.text
    assert "spans must be [start, end) token ranges" in said and "served without blending" in said
    assert "lmcache_recompute_ratio = 3 is not a fraction in 0..1" in said
