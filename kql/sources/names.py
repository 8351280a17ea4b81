"""Fuzzy matching of names a user typed, for "did you mean" hints."""
from __future__ import annotations

import difflib
from typing import Optional

__all__ = ["closest", "did_you_mean"]


def closest(word: str, choices, cutoff: float = 0.6) -> Optional[str]:
    """The choice most similar to ``word`` (difflib ratio >= cutoff), or None.

    Ties go to the choice whose first differing character is nearest, so
    'vgg17' suggests 'vgg16' rather than 'vgg11' or 'vgg19'.
    """
    matcher = difflib.SequenceMatcher()
    matcher.set_seq2(word)
    scored = []
    for choice in choices:
        matcher.set_seq1(choice)
        if (matcher.real_quick_ratio() >= cutoff and matcher.quick_ratio() >= cutoff
                and (r := matcher.ratio()) >= cutoff):
            scored.append((-r, _first_difference(word, choice), choice))
    return min(scored)[2] if scored else None


def _first_difference(a: str, b: str) -> int:
    for ca, cb in zip(a, b):
        if ca != cb:
            return abs(ord(ca) - ord(cb))
    return 1000


def did_you_mean(word: str, choices) -> str:
    close = closest(word, choices)
    return f"; did you mean '{close}'?" if close else ""
