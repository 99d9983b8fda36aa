"""What a model's KV cache looks like, independent of any engine, page size or tensor-parallel split."""

from __future__ import annotations

from dataclasses import dataclass

import blake3
import torch

# Stable one-byte codes: they go into chunk headers and key fingerprints, so never renumber.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.uint8: 4,
    torch.int8: 5,
}
for _name, _code in (("float8_e4m3fn", 6), ("float8_e5m2", 7), ("float8_e4m3fnuz", 8), ("float8_e5m2fnuz", 9)):
    if hasattr(torch, _name):
        DTYPE_CODES[getattr(torch, _name)] = _code
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}

DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in DTYPE_CODES}

KIND_MHA = "mha"  # separate K and V per KV head (GQA included)
KIND_MLA = "mla"  # one latent row per token (DeepSeek-style); no V
KIND_CODES = {KIND_MHA: 1, KIND_MLA: 2}


@dataclass(frozen=True)
class KVGeometry:
    """The full (un-sharded) KV shape of a model.

    Each token of each layer has ``num_kv_heads`` rows of ``row_dim = k_dim + v_dim`` elements:
    K then V for MHA; the latent ``kv_lora_rank + rope_dim`` for MLA (``num_kv_heads == 1``, ``v_dim == 0``).
    """

    num_layers: int
    num_kv_heads: int
    k_dim: int
    v_dim: int
    dtype: torch.dtype
    kind: str = KIND_MHA

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "k_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVGeometry.{name} = {getattr(self, name)}: must be > 0")
        if self.v_dim < 0:
            raise ValueError(f"KVGeometry.v_dim = {self.v_dim}: must be >= 0")
        if self.kind not in KIND_CODES:
            raise ValueError(f"KVGeometry.kind = {self.kind!r}: must be 'mha' or 'mla'")
        if self.kind == KIND_MLA and (self.num_kv_heads != 1 or self.v_dim != 0):
            raise ValueError("an MLA geometry has num_kv_heads=1 and v_dim=0 (the latent row is k_dim wide)")
        if self.kind == KIND_MHA and self.v_dim == 0:
            raise ValueError("an MHA geometry needs v_dim > 0 (use kind='mla' for a latent cache)")
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"KVGeometry.dtype = {self.dtype}: supported are {', '.join(DTYPE_NAMES)}")

    @property
    def row_dim(self) -> int:
        return self.k_dim + self.v_dim

    @property
    def elem_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def bytes_per_token(self, num_heads: int | None = None) -> int:
        heads = self.num_kv_heads if num_heads is None else num_heads
        return self.num_layers * heads * self.row_dim * self.elem_size

    def fingerprint(self) -> bytes:
        """16 bytes naming this geometry; part of every chunk key and header."""
        desc = f"L{self.num_layers}/H{self.num_kv_heads}/K{self.k_dim}/V{self.v_dim}/{DTYPE_CODES[self.dtype]}/{self.kind}"
        return blake3.blake3(desc.encode()).digest(16)


@dataclass(frozen=True)
class ModelIdentity:
    """Model name + KV geometry: the scope of every chunk key."""

    model_name: str
    geometry: KVGeometry

    def fingerprint(self) -> bytes:
        return blake3.blake3(self.model_name.encode() + b"\0" + self.geometry.fingerprint()).digest(16)


# Shapes for benchmarks and examples (KV geometry only; weights never matter to the cache).
MODEL_SHAPES: dict[str, KVGeometry] = {
    "llama-3-8b": KVGeometry(32, 8, 128, 128, torch.bfloat16),
    "llama-3-70b": KVGeometry(80, 8, 128, 128, torch.bfloat16),
    "qwen3-32b": KVGeometry(64, 8, 128, 128, torch.bfloat16),
    "mistral-7b": KVGeometry(32, 8, 128, 128, torch.bfloat16),
    "deepseek-v3": KVGeometry(61, 1, 576, 0, torch.bfloat16, KIND_MLA),
    "tiny": KVGeometry(2, 2, 16, 16, torch.float16),
}


def model_shape(name: str) -> KVGeometry:
    try:
        return MODEL_SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown model shape {name!r}: choose one of {', '.join(MODEL_SHAPES)}") from None
