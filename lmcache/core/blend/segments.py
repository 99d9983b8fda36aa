"""Segments: the pieces of a prompt cached on their own, wherever in a prompt they appear.

A prompt is cut at every occurrence of the separator's token ids (``blend_special_str`` tokenized alone);
the separators belong to no segment. A caller that knows its boundaries passes spans instead.

A segment's chunks are keyed by the segment's own tokens, chained from the segment's start: the same
``ChunkHasher`` as prefix chunks, under a salt no prefix chunk uses (``SEGMENT_SCOPE``), so a segment key
can never name a prefix chunk and the reverse. So a segment is found whatever precedes it, and a longer
segment that starts with a cached one reuses its full chunks. Its KV is stored with keys rotated to the
segment's own positions 0..n-1 (the canonical position), so it can be moved to any position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from lmcache.core.geometry import ModelIdentity
from lmcache.core.keys import ChunkHasher

SEGMENT_SCOPE = "\x1fblend-segment-v1"


@dataclass(frozen=True)
class Segment:
    """Tokens [start, end) of a prompt, and the keys of the segment's full chunks (chained from ``start``)."""

    start: int
    end: int
    keys: tuple[bytes, ...]

    def chunk_span(self, i: int, chunk_size: int) -> tuple[int, int]:
        """Prompt positions of the segment's chunk i."""
        return self.start + i * chunk_size, self.start + (i + 1) * chunk_size


def find_separators(tokens: Sequence[int], separator: Sequence[int]) -> list[int]:
    """Start positions of the non-overlapping occurrences of ``separator`` in ``tokens``, left to right."""
    sep = list(separator)
    n = len(sep)
    if n == 0:
        raise ValueError("the blend separator has no tokens: set blend_special_str to a text the tokenizer keeps")
    out, i, first = [], 0, sep[0]
    toks = list(tokens)
    while i + n <= len(toks):
        if toks[i] == first and toks[i : i + n] == sep:
            out.append(i)
            i += n
        else:
            i += 1
    return out


def split_spans(tokens: Sequence[int], separator: Sequence[int]) -> list[tuple[int, int]]:
    """The non-empty spans between separators (the text before the first one is a segment too)."""
    spans, start = [], 0
    for at in find_separators(tokens, separator):
        if at > start:
            spans.append((start, at))
        start = at + len(separator)
    if len(tokens) > start:
        spans.append((start, len(tokens)))
    return spans


def check_spans(spans: Sequence[tuple[int, int]], num_tokens: int) -> list[tuple[int, int]]:
    """Caller-given spans, validated: in order, not overlapping, inside the prompt."""
    out: list[tuple[int, int]] = []
    last = 0
    for span in spans:
        start, end = int(span[0]), int(span[1])
        if not last <= start < end <= num_tokens:
            raise ValueError(f"segment span {list(span)}: spans must be [start, end) token ranges in order, not "
                             f"overlapping, within the prompt's {num_tokens} tokens")
        out.append((start, end))
        last = end
    return out


class SegmentHasher:
    """Segment keys for one model identity, chunk size and namespace (salt)."""

    def __init__(self, identity: ModelIdentity, chunk_size: int, salt: str = "") -> None:
        self.chunk_size = chunk_size
        self._hasher = ChunkHasher(identity, chunk_size, salt + SEGMENT_SCOPE)

    def segments(self, tokens: Sequence[int], spans: Sequence[tuple[int, int]]) -> list[Segment]:
        toks = list(tokens)
        return [Segment(s, e, tuple(self._hasher.keys(toks[s:e]))) for s, e in spans]
