"""A vLLM engine on CPU for connector tests: vLLM's real Scheduler, real KV cache views, and a stand-in
forward pass that writes each token's KV as a known function of (token, position).

Nothing of vLLM is mocked: requests, scheduler, block manager, connector factory, metadata transport,
KV cache views (``create_kv_cache_views``) and the output path are vLLM's own. Only the model's math is
replaced, by ``expected_kv``, so every slot of every computed token can be checked bit for bit.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"


from engineutil import require_engine  # noqa: E402

vllm = require_engine("vllm", ".ci/run installs vllm==0.33.0 for these tests")

import torch  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.config import (  # noqa: E402
    CacheConfig,
    DeviceConfig,
    KVEventsConfig,
    KVTransferConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
    MLAAttentionSpec,
    compute_layout_strides,
    create_kv_cache_views,
)
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

init_none_hash(sha256)
EOS = 2


def write_model_dir(path, num_layers=2, kv_heads=2, head_dim=16, mla=False) -> str:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
           "num_attention_heads": 4, "num_key_value_heads": kv_heads, "num_hidden_layers": num_layers,
           "head_dim": head_dim, "vocab_size": 1000, "max_position_embeddings": 8192, "torch_dtype": "float16",
           "rms_norm_eps": 1e-5, "eos_token_id": EOS}
    if mla:
        cfg.update({"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "kv_lora_rank": 32,
                    "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16, "q_lora_rank": None,
                    "n_routed_experts": None, "num_key_value_heads": 4})
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(path)


_model_configs: dict[str, ModelConfig] = {}


def model_config(model_dir: str) -> ModelConfig:
    # building a ModelConfig costs seconds (transformers); tests share one per model folder
    if model_dir not in _model_configs:
        _model_configs[model_dir] = ModelConfig(model=model_dir, dtype="float16", seed=0, skip_tokenizer_init=True)
    return copy.deepcopy(_model_configs[model_dir])


def vllm_config(model_dir: str, extra: dict, *, block_size=16, tp=1, policy="fail", kv_role="kv_both",
                events=False, budget=4096, connector="LMCacheConnector", module="lmcache.adapters.vllm") -> VllmConfig:
    mc = model_config(model_dir)
    sc = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=budget, max_model_len=8192,
                         enable_chunked_prefill=True, is_encoder_decoder=False)
    cc = CacheConfig(block_size=block_size, gpu_memory_utilization=0.9, cache_dtype="auto", enable_prefix_caching=True)
    cc.kv_cache_layout = "LBNHC"
    kt = KVTransferConfig(kv_connector=connector, kv_connector_module_path=module, kv_role=kv_role,
                          kv_connector_extra_config=dict(extra), kv_load_failure_policy=policy)
    kwargs = {}
    if events:
        # a real ZMQ publisher when given an endpoint (events is then that endpoint)
        kwargs["kv_events_config"] = KVEventsConfig(
            enable_kv_cache_events=True, publisher="zmq" if isinstance(events, str) else "null",
            endpoint=events if isinstance(events, str) else "tcp://*:5557", topic="kv-events")
    return VllmConfig(scheduler_config=sc, model_config=mc, cache_config=cc, kv_transfer_config=kt,
                      device_config=DeviceConfig("cpu"), parallel_config=ParallelConfig(tensor_parallel_size=tp),
                      **kwargs)


def expected_kv(tokens: torch.Tensor, positions: torch.Tensor, num_layers: int, heads: int, row: int) -> torch.Tensor:
    """The stand-in model's KV: [tokens, layers, heads, row] fp16, a function of (token, position) only.
    Integers below 2048 are exact in fp16, so equality checks are bit-exact."""
    base = tokens.to(torch.int64) * 1009 + positions.to(torch.int64) * 7919
    lay = torch.arange(num_layers).view(1, -1, 1, 1) * 37
    head = torch.arange(heads).view(1, 1, -1, 1) * 11
    col = torch.arange(row).view(1, 1, 1, -1)
    return ((base.view(-1, 1, 1, 1) + lay + head + col) % 2039).to(torch.float16)


@dataclass
class Worker:
    connector: object
    layers: list[torch.Tensor]
    head_start: int
    heads: int


@dataclass
class StepResult:
    output: object
    load_errors: set = field(default_factory=set)
    events: list = field(default_factory=list)
    #: the scheduler's stats of this step (vLLM's SchedulerStats), as its metrics loggers get them
    scheduler_stats: object = None


class CpuVllm:
    """One vLLM instance: scheduler + one worker connector per TP rank, KV in vLLM's own views."""

    def __init__(self, config: VllmConfig, num_blocks=256, layout="LBNHC", mla=False, kv_fn=None, dtype=torch.float16):
        self.config = config
        mc = config.model_config
        self.bs = config.cache_config.block_size
        self.num_layers = mc.hf_config.num_hidden_layers
        self.names = [f"model.layers.{i}.self_attn.attn" for i in range(self.num_layers)]
        tp = config.parallel_config.tensor_parallel_size
        if mla:
            spec = MLAAttentionSpec(block_size=self.bs, num_kv_heads=1, head_size=40, dtype=dtype)
            self.total_heads, self.row = 1, 40
        else:
            self.total_heads = mc.get_total_num_kv_heads()
            hd = mc.get_head_size()
            spec = FullAttentionSpec(block_size=self.bs, num_kv_heads=max(1, self.total_heads // tp), head_size=hd,
                                     dtype=dtype)
            self.row = 2 * hd
        self.spec = spec
        #: kv_fn(tokens, positions) -> [tokens, layers, all heads, row]: the "model"
        self.kv_fn = kv_fn or (lambda t, p: expected_kv(t, p, self.num_layers, self.total_heads, self.row))
        self.kv_cache_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                                             kv_cache_groups=[KVCacheGroupSpec(list(self.names), spec)])
        config.cache_config.num_gpu_blocks = num_blocks
        self.scheduler = Scheduler(vllm_config=config, kv_cache_config=self.kv_cache_config, log_stats=True,
                                   structured_output_manager=StructuredOutputManager(config), block_size=self.bs)
        self.workers: list[Worker] = []
        self.aggregator = KVOutputAggregator(tp)
        for rank in range(tp):
            wc = copy.copy(config)
            wc.parallel_config = copy.copy(config.parallel_config)
            wc.parallel_config.rank = rank
            conn = KVConnectorFactory.create_connector(wc, KVConnectorRole.WORKER, self.kv_cache_config)
            layers = self._views(num_blocks, KVCacheLayout[layout])
            conn.register_kv_caches(dict(zip(self.names, layers)))
            heads = spec.num_kv_heads
            start = conn._worker.head_range[0]
            self.workers.append(Worker(conn, layers, start, heads))

    def _views(self, num_blocks, layout):
        strides = compute_layout_strides(self.spec, num_blocks, self.num_layers, layout)
        size = self.spec.page_size_bytes * num_blocks * self.num_layers
        raw = torch.full((size,), 0x7F, dtype=torch.int8)  # fp16 0x7F7F: a value no test writes
        kvt = KVCacheTensor(size=size, layers=list(self.names), layer_stride=strides[0], block_stride=strides[1])
        return create_kv_cache_views(raw, self.spec, num_blocks, layout, kvt)

    # -- requests ----------------------------------------------------------------------------------------

    def add(self, req_id: str, prompt: list[int], max_tokens=2, **kw) -> Request:
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        req = Request(request_id=req_id, prompt_token_ids=list(prompt), sampling_params=sp, pooling_params=None,
                      block_hasher=get_request_block_hasher(self.bs, sha256), **kw)
        self.scheduler.add_request(req)
        return req

    def block_ids(self, req_id: str) -> list[int]:
        return list(self.scheduler.kv_cache_manager.get_block_ids(req_id)[0])

    def slots(self, req_id: str, n: int) -> torch.Tensor:
        blocks = torch.tensor(self.block_ids(req_id))
        pos = torch.arange(n)
        return blocks[pos // self.bs] * self.bs + pos % self.bs

    def read(self, worker: Worker, slots: torch.Tensor) -> torch.Tensor:
        """[tokens, layers, heads, row] of a worker's KV at the given slots."""
        rows = [layer[slots // self.bs, :, slots % self.bs, :] for layer in worker.layers]
        return torch.stack(rows, dim=1)

    def expected(self, worker: Worker, tokens, positions) -> torch.Tensor:
        full = self.kv_fn(torch.as_tensor(tokens), torch.as_tensor(positions))
        h0 = worker.head_start
        return full[:, :, h0 : h0 + worker.heads]

    def assert_kv(self, req_id: str, n: int) -> None:
        """Tokens [0, n) of the request hold exactly the KV the stand-in model computes for them."""
        if n == 0:
            return
        tokens = self.scheduler.requests[req_id].all_token_ids[:n]
        slots = self.slots(req_id, n)
        for w in self.workers:
            got = self.read(w, slots)
            want = self.expected(w, tokens, torch.arange(n))
            bits = torch.int16 if got.element_size() == 2 else torch.int32
            bad = (got.view(bits) != want.view(bits)).reshape(n, -1).any(dim=1).nonzero().flatten()
            assert bad.numel() == 0, f"{req_id}: wrong KV at positions {bad[:8].tolist()} (of {n})"

    # -- one engine step -------------------------------------------------------------------------------

    def step(self, check=True, before_load=None) -> StepResult:
        so = self.scheduler.schedule()
        result = StepResult(None)
        if before_load is not None:
            before_load(so)
        for w in self.workers:
            w.connector.bind_connector_metadata(so.kv_connector_metadata)
            w.connector.start_load_kv(None)
        for w in self.workers:
            result.load_errors |= w.connector.get_block_ids_with_load_errors()
        sampled = {}
        for rid, start in self._scheduled(so):
            n = so.num_scheduled_tokens[rid]
            req = self.scheduler.requests[rid]
            failed = set(self.block_ids(rid)) & result.load_errors
            if check and not failed:
                self.assert_kv(rid, start)  # what was computed, prefix-cached or loaded before this step
            tokens = req.all_token_ids[start : start + n]
            slots = self.slots(rid, start + n)[start:]
            for w in self.workers:  # the "forward": write this step's KV
                kv = self.expected(w, tokens, torch.arange(start, start + n))
                for layer_idx, layer in enumerate(w.layers):
                    # as vLLM's attention layers do, each layer first waits for its loaded KV
                    w.connector.wait_for_layer_load(w.connector.view.layer_names[layer_idx])
                    layer[slots // self.bs, :, slots % self.bs, :] = kv[:, layer_idx]
            sampled[rid] = [7] if start + n >= req.num_tokens else []
        ids = list(sampled)
        outputs = []
        for w in self.workers:
            w.connector.wait_for_save()
            kvo = KVConnectorOutput(invalid_block_ids=w.connector.get_block_ids_with_load_errors() | (
                result.load_errors if w is self.workers[0] else set()),
                kv_cache_events=w.connector.get_kv_connector_kv_cache_events(),
                kv_connector_stats=w.connector.get_kv_connector_stats())
            w.connector.clear_connector_metadata()
            outputs.append(ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                             sampled_token_ids=[sampled[r] for r in ids], logprobs=None,
                                             prompt_logprobs_dict={}, pooler_output=None, kv_connector_output=kvo))
        # vLLM's own executor-side merge of the workers' outputs (load errors, events)
        out = self.aggregator.aggregate(outputs, output_rank=0)
        engine_outputs = self.scheduler.update_from_output(so, out)
        result.scheduler_stats = next((o.scheduler_stats for o in engine_outputs.values() if o.scheduler_stats), None)
        result.output = so
        return result

    def _scheduled(self, so):
        for new in so.scheduled_new_reqs:
            yield new.req_id, new.num_computed_tokens
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            yield rid, cached.num_computed_tokens[i]

    def run(self, max_steps=200, check=True) -> list[StepResult]:
        results = []
        while self.scheduler.requests and len(results) < max_steps:
            results.append(self.step(check))
        assert not self.scheduler.requests, f"requests left after {max_steps} steps"
        return results

    def assert_no_leaks(self) -> None:
        """vLLM's own bookkeeping is back to empty, and so is the connector's."""
        pool = self.scheduler.kv_cache_manager.block_pool
        assert pool.free_block_queue.num_free_blocks == pool.num_gpu_blocks - 1
        assert all(b.ref_cnt == 0 for b in pool.blocks)
        sched = self.scheduler.connector._scheduler
        assert not sched._tracked and not sched._keys and not sched._last_match

    def close(self):
        for w in self.workers:
            w.connector.shutdown()
        self.scheduler.connector.shutdown()
