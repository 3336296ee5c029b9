"""Splitting a prompt into segments at a separator token sequence.

A prompt for retrieval-augmented generation is ``prefix SEP doc_1 SEP doc_2 ... SEP question``.
Each span between separators is a segment; a segment is *reusable* (looked up in the store
under its own segment keys, wherever it sits) when it has at least ``min_tokens`` tokens and
is not the last span: the last span is the new part of the prompt (the question), and the
logits of its last token are what prefill exists to produce.  Separator tokens are never reused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvstore.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class Segment:
    """Tokens ``[start, end)`` of a prompt."""

    start: int
    end: int
    reusable: bool

    @property
    def length(self) -> int:
        return self.end - self.start


def split(tokens: Sequence[int], separator: Sequence[int], min_tokens: int) -> list[Segment]:
    """Segments of ``tokens`` (non-empty spans between separators, in order).

    Runs in O(len(tokens) * len(separator)); occurrences of the separator do not overlap.
    """
    if not separator:
        raise InvalidArgument("the separator is empty: set BlendConfig.separator to the token ids between documents")
    if min_tokens < 1:
        raise InvalidArgument(f"min_tokens must be >= 1, got {min_tokens}")
    toks = list(tokens)
    sep = list(separator)
    n, m = len(toks), len(sep)
    spans: list[tuple[int, int]] = []
    start = i = 0
    while i + m <= n:
        if toks[i : i + m] == sep:
            spans.append((start, i))
            i += m
            start = i
        else:
            i += 1
    spans.append((start, n))
    spans = [(a, b) for a, b in spans if b > a]
    out: list[Segment] = []
    for k, (a, b) in enumerate(spans):
        last = k == len(spans) - 1 and b == n
        out.append(Segment(a, b, reusable=not last and b - a >= min_tokens))
    return out
