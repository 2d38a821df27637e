"""The rank rows: each peer as vLLM uses it for one TP or EP rank, beside fastmoe_load's own
load of the same rank (`bench --device cuda`, and `--cold`).

A peer reads whole files. vLLM hands every tensor its reader yields to `FusedMoE`'s
weight_loader, which narrows the rank's gate and up rows and down columns, skips the experts of
other ranks, copies what is left into the rank's `w13_weight [E_local, 2I/tp, H]` and
`w2_weight [E_local, H, I/tp]`, and drops the whole tensor. So a TP=8 or EP=8 rank of a peer
reads every byte of the layer files, where fastmoe_load reads the rank's bytes only; these rows
show what that is worth, with the ratio to fastmoe_load in the last column (`x fastmoe`).

Every row is checked once, outside the timing: each contender fills destinations poisoned
with NaN, which must then equal fastmoe_load's bit for bit, so that no row times a wrong slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

import fastmoe_load as fml

from .harness import Bench, Case, landed_bytes
from .seed import SeedLoader, load_fused_weight, shard_of_tensors

# `(files, device)` -> every tensor of the files, by name, on the device (`peers.Reader`).
Reader = Callable[[list[str], torch.device], Iterator[tuple[str, torch.Tensor]]]
Load = Callable[[list[tuple[torch.Tensor, torch.Tensor]]], int]

RANK_CASES = [
    Case("TP=1"),
    Case("TP=2 rank 1", tp_rank=1, tp_size=2),
    Case("TP=8 rank 1", tp_rank=1, tp_size=8),
    Case("EP=8 rank 1", ep_rank=1, ep_size=8),
]

FASTMOE = "fastmoe_load"
SEED = "seed: vLLM per-expert loop"

TITLE = "Ranks: the peers as vLLM uses them (every byte read, the rank's slices cut on the device)"

# Two NaNs of different bits (bf16 as int16): one for fastmoe_load's destinations, one for the
# others', so that an element neither load writes differs too. Loaded data holds no NaN.
_REFERENCE_POISON, _CONTENDER_POISON = 0x7FC0, 0x7FA1


class RankMismatchError(RuntimeError):
    """A contender's tensors differ from fastmoe_load's for the same rank: its row would time
    a wrong slice."""


def cases(experts: int, intermediate: int) -> list[Case]:
    """The rank cases a checkpoint of `experts` and `intermediate` size splits evenly."""
    return [
        case
        for case in RANK_CASES
        if experts % case.ep_size == 0 and intermediate % case.tp_size == 0
    ]


def through_reader(bench: Bench, case: Case, read: Reader) -> Load:
    """`read`'s tensors of the bench's checkpoint into a rank's destinations, as vLLM's
    `FusedMoE.load_weights` takes a weights iterator: every fused weight, whole on the device,
    through the weight_loader (`seed.SeedLoader`), then dropped. Returns the bytes landed."""
    files = sorted(set(shard_of_tensors(bench.path).values()))
    with fml.open(bench.path) as ckpt:  # only for the layer descriptions
        layers = ckpt.moe_layers()
    # The destinations are in layer order, as the bench makes them (`Shape.prefix`).
    owner = {name: index for index, layer in enumerate(layers) for name in layer.tensor_names}
    experts = case.experts(bench.shape.experts)

    def load(dests: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        loaders = [
            SeedLoader(w13, w2, case.tp_rank, experts, tp_size=case.tp_size) for w13, w2 in dests
        ]
        for name, tensor in read(files, bench.device):
            index = owner[name]
            load_fused_weight(loaders[index], layers[index], name, tensor)
            del tensor  # the whole tensor goes once its slices are copied
        return landed_bytes(dests)

    return load


def _poisoned(bench: Bench, case: Case, bits: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    dests = bench.destinations(case, touched=False)
    for pair in dests:
        for t in pair:
            t.view(torch.int16).fill_(bits)
    return dests


def check(bench: Bench, case: Case, contenders: Mapping[str, Load]) -> None:
    """Runs each contender once into poisoned destinations and compares them with
    fastmoe_load's (`contenders[FASTMOE]`), bit for bit. Raises `RankMismatchError` naming
    the contender, case, layer and tensor of the first difference."""
    reference = _poisoned(bench, case, _REFERENCE_POISON)
    contenders[FASTMOE](reference)
    for name, load in contenders.items():
        if name == FASTMOE:
            continue
        dests = _poisoned(bench, case, _CONTENDER_POISON)
        load(dests)
        bench.sync()
        for layer, (ours, theirs) in enumerate(zip(dests, reference, strict=True)):
            for param, a, b in zip(("w13_weight", "w2_weight"), ours, theirs, strict=True):
                if not torch.equal(a.view(torch.int16), b.view(torch.int16)):
                    raise RankMismatchError(
                        f"{name}, {case.label}: layer {layer}'s {param} differs from "
                        f"fastmoe_load's; its row would time a wrong slice"
                    )
        del dests


def run(
    bench: Bench,
    readers: Mapping[str, Reader],
    before_each: Callable[[], None] | None = None,
) -> Bench | None:
    """Times, for each rank case (`cases`), fastmoe_load, the seed path and every reader
    through vLLM's weight_loader, round-robin, into pre-touched destinations, after `check`;
    prints them as a table of their own (last column: x fastmoe) and returns it. None,
    printing nothing, without readers. `before_each` runs before every timed run (`--cold`:
    the page cache dropped)."""
    if not readers:
        return None
    table = Bench(
        bench.path,
        bench.shape,
        bench.device,
        bench.repeats,
        bench.threads,
        FASTMOE,
        title=TITLE,
    )
    for case in cases(bench.shape.experts, bench.shape.intermediate):
        contenders: dict[str, Load] = {FASTMOE: table.fastmoe(case), SEED: table.seed(case)}
        for name, read in readers.items():
            contenders[name] = through_reader(table, case, read)
        check(table, case, contenders)
        table.compare(case, contenders, before_each=before_each)
    return table
