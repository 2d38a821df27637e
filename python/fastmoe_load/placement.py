"""Which global experts an expert-parallel rank holds, as vLLM places them."""

from __future__ import annotations

from typing import Literal

from ._fastmoe_load import RequestError

Strategy = Literal["linear", "round_robin"]


def expert_placement(
    num_experts: int, ep_size: int, ep_rank: int, strategy: Strategy = "linear"
) -> list[int]:
    """Global expert ids of `ep_rank`'s slots (`ep_rank` in `[0, ep_size)`, `ep_size` at
    least 1); raises `RequestError` otherwise.

    `linear`: contiguous blocks, the remainder going one each to the lowest ranks.
    `round_robin`: expert `e` goes to rank `e % ep_size`.
    """
    for name, value in (("num_experts", num_experts), ("ep_size", ep_size), ("ep_rank", ep_rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RequestError(f"{name} must be a non-negative int, got {value!r}")
    if ep_size == 0:
        raise RequestError("ep_size must be at least 1 (one rank holds every expert), got 0")
    if ep_rank >= ep_size:
        raise RequestError(f"ep_rank {ep_rank} is not in [0, ep_size={ep_size})")
    if strategy == "linear":
        base, remainder = divmod(num_experts, ep_size)
        start = ep_rank * base + min(ep_rank, remainder)
        return list(range(start, start + base + (ep_rank < remainder)))
    if strategy == "round_robin":
        return list(range(ep_rank, num_experts, ep_size))
    raise RequestError(f"unknown placement strategy {strategy!r}: use 'linear' or 'round_robin'")
