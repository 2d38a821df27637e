"""Wording shared by the messages of the package."""

from __future__ import annotations


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """`count` with its noun, singular for exactly one: `1 layer`, `2 layers`, `0 expert
    groups`. `nouns` is the plural where it is not `noun` + "s"."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"
