"""SGLang's host KV pool layouts, as lmcache layout descriptors (no SGLang import here).

| layout            | MHA kv_buffer                       | MLA kv_buffer                    |
|-------------------|-------------------------------------|----------------------------------|
| layer_first       | (2, L, size, H, D)                  | (L, size, 1, kv_dim)             |
| page_first        | (2, size, L, H, D)                  | (size, L, 1, kv_dim)             |
| page_first_direct | (2, page_num, L, page_size, H, D)   | (page_num, L, page_size, 1, kv_dim) |

Token-major layouts become one ``TokenSlotKV`` whose slots are SGLang's host indices (per-layer strided
views, no copy). ``page_first_direct`` keeps each page's tokens apart per layer, so it is described one
page at a time (slots 0..page_size-1 of that page).
"""

from __future__ import annotations

import torch

from lmcache.core.layouts import TokenSlotKV

TOKEN_MAJOR = ("layer_first", "page_first")
SUPPORTED = TOKEN_MAJOR + ("page_first_direct",)


class UnsupportedLayout(ValueError):
    pass


def check_layout(layout: str) -> None:
    if layout not in SUPPORTED:
        raise UnsupportedLayout(f"SGLang host layout {layout!r} is not supported by lmcache: start SGLang with "
                                f"--hicache-mem-layout {' or '.join(SUPPORTED)}")


def token_slots(kv_buffer: torch.Tensor, layout: str, mla: bool, head_start: int) -> TokenSlotKV:
    """The whole host pool as token slots (token-major layouts only)."""
    if layout == "layer_first":
        per_layer = (lambda t: [t[i] for i in range(t.shape[0])])
    elif layout == "page_first":
        per_layer = (lambda t: [t[:, i] for i in range(t.shape[1])])
    else:
        raise UnsupportedLayout(f"{layout} is not token-major")
    if mla:
        return TokenSlotKV(per_layer(kv_buffer), None, head_start)
    return TokenSlotKV(per_layer(kv_buffer[0]), per_layer(kv_buffer[1]), head_start)


def page_slots(kv_buffer: torch.Tensor, page: int, mla: bool, head_start: int) -> TokenSlotKV:
    """One page of a page_first_direct pool as token slots 0..page_size-1."""
    if mla:
        t = kv_buffer[page]  # (L, page_size, 1, kv_dim)
        return TokenSlotKV([t[i] for i in range(t.shape[0])], None, head_start)
    k, v = kv_buffer[0, page], kv_buffer[1, page]  # (L, page_size, H, D)
    return TokenSlotKV([k[i] for i in range(k.shape[0])], [v[i] for i in range(v.shape[0])], head_start)


def flat_page_slots(page: torch.Tensor, layout: str, shape: tuple[int, ...], mla: bool, head_start: int,
                    page_size: int) -> TokenSlotKV:
    """A flat data page (SGLang's legacy get/set buffers) as token slots 0..page_size-1.

    ``shape`` is the host pool's kv_buffer shape; a flat page holds the same axes with the token axis cut
    to one page, in the same order (layer_first/page_first) or one page of page_first_direct.
    """
    if layout == "page_first_direct":
        view = page.view(*(shape[1:] if mla else (shape[0],) + shape[2:]))
        if mla:
            return TokenSlotKV([view[i] for i in range(view.shape[0])], None, head_start)
        return TokenSlotKV([view[0, i] for i in range(view.shape[1])], [view[1, i] for i in range(view.shape[1])], head_start)
    return token_slots(page.view(*page_shape(layout, shape, mla, page_size)), layout, mla, head_start)


def page_shape(layout: str, shape: tuple[int, ...], mla: bool, page_size: int | None = None) -> tuple[int, ...]:
    """Shape of one flat page's tensor (token axis = page_size), for token-major layouts."""
    s = list(shape)
    token_axis = {("layer_first", False): 2, ("page_first", False): 1, ("layer_first", True): 1, ("page_first", True): 0}[
        (layout, mla)]
    if page_size is not None:
        s[token_axis] = page_size
    return tuple(s)
