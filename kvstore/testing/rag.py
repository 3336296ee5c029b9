"""A retrieval-augmented question-answering task built from the shipped essay.

The passages are the paragraphs of :mod:`kvstore.testing.corpus`; each :class:`Question`
names the passage that answers it.  :func:`trials` draws, for each question, a set of
passages (the answering one among distractors) in a random order, the way a retriever
returns the same documents in different orders behind different questions: the workload
CacheBlend is for.  Everything is seeded, so a benchmark run is reproducible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvstore.testing.corpus import PARAGRAPHS

SYSTEM = "Answer the question using only the passages below. Be brief."


@dataclass(frozen=True, slots=True)
class Question:
    text: str
    passage: int  # index into PASSAGES of the paragraph that answers it


@dataclass(frozen=True, slots=True)
class Trial:
    question: Question
    passages: tuple[int, ...]  # in prompt order


PASSAGES: tuple[str, ...] = PARAGRAPHS

QUESTIONS: tuple[Question, ...] = (
    Question("On which island stood the famous early lighthouse at the entrance to the harbor of Alexandria?", 1),
    Question("Where do the ruins of a Roman lighthouse still stand inside the walls of a medieval castle?", 2),
    Question("What happened to the first wooden tower built on the notorious reef off the south coast of England?", 3),
    Question("What did the engineer of the wave-swept rock study to decide the shape of his stone tower?", 4),
    Question("What did the keepers do every evening shortly before sunset?", 9),
    Question("Who often took over the light when a keeper died?", 11),
    Question("Which fuel burned brightly and cheaply after whale oil became too expensive?", 12),
    Question("When did automation come to most lighthouses?", 14),
    Question("What did every keeper write in the log book at the end of every night?", 18),
    Question("Why does the oil house stand a little apart from the tower?", 18),
)


def trials(passages_per_prompt: int = 6, seed: int = 0) -> list[Trial]:
    """One trial per question: its passage and ``passages_per_prompt - 1`` others, shuffled."""
    if not 1 <= passages_per_prompt <= len(PASSAGES):
        raise ValueError(f"passages_per_prompt must be in [1, {len(PASSAGES)}], got {passages_per_prompt}")
    rng = random.Random(seed)
    out = []
    for q in QUESTIONS:
        others = rng.sample([i for i in range(len(PASSAGES)) if i != q.passage], passages_per_prompt - 1)
        chosen = [q.passage, *others]
        rng.shuffle(chosen)
        out.append(Trial(q, tuple(chosen)))
    return out
