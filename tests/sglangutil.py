"""SGLang's storage-backend plumbing on CPU: its real HiCacheStorageConfig, backend factory and page
hashes, and host KV pools built to SGLang 0.5.23's documented host layouts (SGLang's own host pool
classes need torchvision/tvm_ffi to import; their layout code is mirrored here, see the reference notes)."""

from __future__ import annotations

from engineutil import require_engine  # noqa: E402

sglang = require_engine("sglang", ".ci/run installs sglang==0.5.23 --no-deps")

import torch  # noqa: E402
from sglang.srt.mem_cache.hicache_storage import STORAGE_BATCH_SIZE, HiCacheStorageConfig  # noqa: E402
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: E402
from sglang.srt.mem_cache.utils import get_hash_str  # noqa: E402


class HostPool:
    """A host KV pool with SGLang's attributes and page semantics (``get_data_page`` & co)."""

    def __init__(self, layout, page_size, pages, layers, heads, head_dim, dtype=torch.float16, mla=False):
        self.layout, self.page_size, self.layer_num, self.dtype, self.mla = layout, page_size, layers, dtype, mla
        self.head_num, self.head_dim = (1, head_dim) if mla else (heads, head_dim)
        self.size = pages * page_size
        self.device = torch.device("cpu")
        H, D, L, S, P = self.head_num, head_dim, layers, self.size, page_size
        shape = {
            ("layer_first", False): (2, L, S, H, D), ("page_first", False): (2, S, L, H, D),
            ("page_first_direct", False): (2, pages, L, P, H, D),
            ("layer_first", True): (L, S, 1, D), ("page_first", True): (S, L, 1, D),
            ("page_first_direct", True): (pages, L, P, 1, D),
        }[(layout, mla)]
        self.kv_buffer = torch.full(shape, 0x7F, dtype=torch.int16).view(dtype) if dtype == torch.float16 else \
            torch.zeros(shape, dtype=dtype)

    def token_kv(self, index: int) -> torch.Tensor:
        """[layers, heads, row] of one host slot: K|V (MHA) or the latent row (MLA)."""
        b = self.kv_buffer
        if self.layout == "page_first_direct":
            p, o = divmod(index, self.page_size)
            return b[p, :, o] if self.mla else torch.cat([b[0, p, :, o], b[1, p, :, o]], dim=-1)
        if self.layout == "layer_first":
            return b[:, index] if self.mla else torch.cat([b[0, :, index], b[1, :, index]], dim=-1)
        return b[index] if self.mla else torch.cat([b[0, index], b[1, index]], dim=-1)

    def set_token_kv(self, index: int, kv: torch.Tensor) -> None:
        view = self.token_kv(index)  # a copy for MHA (cat): write through the halves instead
        b, d = self.kv_buffer, self.head_dim
        if self.mla:
            view.copy_(kv)
            return
        if self.layout == "page_first_direct":
            p, o = divmod(index, self.page_size)
            b[0, p, :, o], b[1, p, :, o] = kv[..., :d], kv[..., d:]
        elif self.layout == "layer_first":
            b[0, :, index], b[1, :, index] = kv[..., :d], kv[..., d:]
        else:
            b[0, index], b[1, index] = kv[..., :d], kv[..., d:]

    # SGLang's flat-page API (legacy get/set path)
    def _page(self, index):
        b, ps = self.kv_buffer, self.page_size
        if self.layout == "page_first_direct":
            return b[index // ps : index // ps + 1] if self.mla else b[:, index // ps : index // ps + 1]
        if self.layout == "layer_first":
            return b[:, index : index + ps] if self.mla else b[:, :, index : index + ps]
        return b[index : index + ps] if self.mla else b[:, index : index + ps]

    def get_data_page(self, index, flat=True):
        page = self._page(index)
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self):
        return torch.zeros(self._page(0).shape, dtype=self.dtype).flatten()

    def set_from_flat_data_page(self, index, data_page):
        page = self._page(index)
        page.copy_(data_page.reshape(page.shape))


def storage_config(extra: dict, *, mla=False, tp_rank=0, tp_size=1, model="shared-llama") -> HiCacheStorageConfig:
    backend = {"backend_name": "lmcache", "module_path": "lmcache.adapters.sglang.backend",
               "class_name": "LMCacheHiCacheStorage", "interface_v1": 1}
    return HiCacheStorageConfig(tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
                                attn_cp_size=1, is_mla_model=mla, enable_storage_metrics=False,
                                is_page_first_layout=False, model_name=model, extra_config={**backend, **extra})


def make_backend(extra: dict, pool: HostPool, **kw):
    """As SGLang's cache controller does: the 'dynamic' factory, then the host pool registration."""
    backend = StorageBackendFactory.create_backend("dynamic", storage_config(extra, mla=pool.mla, **kw), pool)
    backend.register_mem_pool_host(pool)
    backend.on_host_pools_registered()
    return backend


def page_keys(tokens: list[int], page_size: int) -> list[str]:
    """SGLang's own page hashes of the full pages of ``tokens``."""
    n = len(tokens) // page_size * page_size
    return list(get_hash_str(tokens[:n], None, page_size)) if n else []


def batch_exists(backend, keys: list[str]) -> int:
    """Prefetch as SGLang's controller runs it: batches of STORAGE_BATCH_SIZE pages, stop at a short one."""
    hit = 0
    for i in range(0, len(keys), STORAGE_BATCH_SIZE):
        n = backend.batch_exists(keys[i : i + STORAGE_BATCH_SIZE])
        hit += n
        if n < len(keys[i : i + STORAGE_BATCH_SIZE]):
            break
    return hit
