"""Splitting prompts at a separator token sequence."""

from __future__ import annotations

import pytest

from kvstore.blend.segments import Segment, split
from kvstore.errors import InvalidArgument


def test_split_marks_documents_reusable_and_the_question_not() -> None:
    toks = [1] * 5 + [9, 9] + [2] * 6 + [9, 9] + [3] * 2 + [9, 9] + [4] * 8
    segs = split(toks, [9, 9], 4)
    assert segs == [
        Segment(0, 5, True),
        Segment(7, 13, True),
        Segment(15, 17, False),  # shorter than min_tokens
        Segment(19, 27, False),  # the last span: the question
    ]


def test_split_handles_leading_trailing_and_adjacent_separators() -> None:
    toks = [9, 9, 1, 1, 1, 1, 9, 9, 9, 9]
    assert split(toks, [9, 9], 2) == [Segment(2, 6, True)]  # ends with a separator: nothing after
    assert split([1, 2, 3], [9], 1) == [Segment(0, 3, False)]  # no separator: only the question


def test_separator_occurrences_do_not_overlap() -> None:
    assert split([9, 9, 9, 5, 5], [9, 9], 1) == [Segment(2, 5, False)]


def test_bad_input_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="separator is empty"):
        split([1, 2], [], 1)
    with pytest.raises(InvalidArgument, match="min_tokens"):
        split([1, 2], [9], 0)
