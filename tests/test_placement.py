"""`expert_placement` places experts as vLLM's `determine_expert_map` does."""

from __future__ import annotations

import fastmoe_load as fml
import pytest

STRATEGIES = ["linear", "round_robin"]
SIZES = [(e, ep) for e in range(1, 21) for ep in range(1, 9)]


def vllm_placement(num_experts: int, ep_size: int, ep_rank: int, strategy: str) -> list[int]:
    """An independent reference, written from vLLM's `determine_expert_map`: `linear` gives
    every rank `E // ep` experts and one more to each of the first `E % ep` ranks, in
    contiguous blocks; `round_robin` gives rank `r` every expert `e` with `e % ep == r`."""
    if strategy == "linear":
        base, remainder = num_experts // ep_size, num_experts % ep_size
        count = base + 1 if ep_rank < remainder else base
        start = ep_rank * base + min(ep_rank, remainder)
        return [start + i for i in range(count)]
    return [e for e in range(num_experts) if e % ep_size == ep_rank]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_matches_vllm(strategy):
    for num_experts, ep_size in SIZES:
        for rank in range(ep_size):
            got = fml.expert_placement(num_experts, ep_size, rank, strategy)
            want = vllm_placement(num_experts, ep_size, rank, strategy)
            assert got == want, (num_experts, ep_size, rank, strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_expert_exactly_once_and_balanced(strategy):
    for num_experts, ep_size in SIZES:
        ranks = [fml.expert_placement(num_experts, ep_size, r, strategy) for r in range(ep_size)]
        assert all(isinstance(e, int) for rank in ranks for e in rank)
        placed = sorted(e for rank in ranks for e in rank)
        assert placed == list(range(num_experts)), (num_experts, ep_size, strategy)
        sizes = [len(rank) for rank in ranks]
        assert max(sizes) - min(sizes) <= 1, (num_experts, ep_size, sizes)
        # the larger ranks come first
        assert sizes == sorted(sizes, reverse=True), (num_experts, ep_size, sizes)
        for rank in ranks:
            assert rank == sorted(rank)


def test_linear_blocks_are_contiguous():
    """Rank after rank, the linear blocks spell out 0..E-1 in order."""
    for num_experts, ep_size in SIZES:
        flat = []
        for r in range(ep_size):
            flat += fml.expert_placement(num_experts, ep_size, r, "linear")
        assert flat == list(range(num_experts)), (num_experts, ep_size)


@pytest.mark.parametrize(
    ("num_experts", "ep_size", "strategy", "expected"),
    [
        (10, 4, "linear", [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]),
        (10, 4, "round_robin", [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]),
        (3, 5, "linear", [[0], [1], [2], [], []]),
        (3, 5, "round_robin", [[0], [1], [2], [], []]),
        (8, 2, "linear", [[0, 1, 2, 3], [4, 5, 6, 7]]),
        (7, 3, "linear", [[0, 1, 2], [3, 4], [5, 6]]),
        (7, 1, "round_robin", [[0, 1, 2, 3, 4, 5, 6]]),
    ],
)
def test_hand_written_cases(num_experts, ep_size, strategy, expected):
    got = [fml.expert_placement(num_experts, ep_size, r, strategy) for r in range(ep_size)]
    assert got == expected


def test_default_strategy_is_linear():
    assert fml.expert_placement(10, 4, 2) == [6, 7]
    assert fml.expert_placement(10, 4, 2) == fml.expert_placement(10, 4, 2, "linear")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((8, 2, 2, "linear"), "ep_rank 2"),
        ((8, 2, 5, "round_robin"), "ep_rank 5"),
        ((8, 0, 0, "linear"), r"^ep_size must be at least 1 \(.*\), got 0$"),
        ((8, -2, 0, "linear"), "ep_size"),
        ((8, 2, -1, "linear"), "ep_rank"),
        ((-8, 2, 0, "linear"), "num_experts"),
        ((True, 2, 0, "linear"), "num_experts"),
        ((8, True, 0, "linear"), "ep_size"),
        ((8, 2, False, "linear"), "ep_rank"),
        ((8.0, 2, 0, "linear"), "num_experts"),
        ((8, "2", 0, "linear"), "ep_size"),
        ((8, 2, None, "linear"), "ep_rank"),
        ((8, 2, 0, "random"), "random"),
        ((8, 2, 0, "Linear"), "Linear"),
        ((8, 2, 0, None), "strategy"),
    ],
)
def test_invalid_inputs_raise_request_error(args, match):
    with pytest.raises(fml.RequestError, match=match) as info:
        fml.expert_placement(*args)
    assert isinstance(info.value, fml.FastMoeLoadError)
