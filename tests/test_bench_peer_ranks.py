"""The bench's rank rows of the peers (`bench.peer_ranks`) on the CPU: the peers load onto GPUs
only, so a stand-in reader takes their place, reading whole files with safetensors the way
they hand whole tensors to vLLM. The rows' slicing is checked against slices cut from the
files by hand, the check against contenders that load a wrong slice, and the table and its
legend through the command line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastmoe_load.bench import generate, peer_ranks, peers, run
from fastmoe_load.bench.harness import Bench, Case
from fastmoe_load.bench.seed import shard_of_tensors
from safetensors import safe_open
from safetensors.torch import load_file
from test_bench_cli import bench
from test_cli import run_main

# E = 8 so that EP=8 gives each rank one expert; I = 32 so that TP=8 gives each rank 4 rows.
SHAPE = {"experts": 8, "hidden": 64, "intermediate": 32}
CPU = torch.device("cpu")
STAND_IN = "whole files through safetensors (stand-in)"


def read_whole_files(files: list[str], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """What a peer's iterator yields: every tensor of each file, the whole file read at once."""
    for file in files:
        yield from load_file(file, device=str(device)).items()


def make_bench(tmp_path: Path, transposed: bool = False) -> Bench:
    shape = generate.Shape(layers=2, transposed=transposed, **SHAPE)
    path = str(tmp_path / "checkpoint")
    generate.generate(path, shape)
    return Bench(path, shape, CPU, repeats=1, threads=None, reference="memcpy")


def by_hand(bench: Bench, case: Case) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The rank's `w13 [n, 2I/tp, H]` and `w2 [n, H, I/tp]` of every layer, cut from the stored
    tensors with plain indexing: its experts, its gate rows then its up rows, its down columns."""
    where = shard_of_tensors(bench.path)
    experts = case.experts(bench.shape.experts)
    shard = bench.shape.intermediate // case.tp_size
    rows = slice(case.tp_rank * shard, (case.tp_rank + 1) * shard)
    out = []
    for layer in range(bench.shape.layers):
        prefix = bench.shape.prefix(layer)
        with safe_open(where[f"{prefix}.gate_up_proj"], "pt") as f:
            gate_up, down = (
                f.get_tensor(f"{prefix}.gate_up_proj"),
                f.get_tensor(f"{prefix}.down_proj"),
            )
        if bench.shape.transposed:  # stored [E, H, 2I] and [E, I, H]
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        gate, up = gate_up[experts].chunk(2, dim=1)
        out.append((torch.cat([gate[:, rows], up[:, rows]], dim=1), down[experts][:, :, rows]))
    return out


def poisoned(bench: Bench, case: Case) -> list[tuple[torch.Tensor, torch.Tensor]]:
    dests = bench.destinations(case, touched=False)
    for pair in dests:
        for t in pair:
            t.fill_(float("nan"))
    return dests


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def assert_bit_equal(ours, reference) -> None:
    for (w13, w2), (w13_ref, w2_ref) in zip(ours, reference, strict=True):
        assert w13.shape == w13_ref.shape and w2.shape == w2_ref.shape
        assert torch.equal(bits(w13), bits(w13_ref))
        assert torch.equal(bits(w2), bits(w2_ref))


@pytest.mark.parametrize("transposed", [False, True], ids=["fused", "transposed"])
@pytest.mark.parametrize("case", peer_ranks.RANK_CASES, ids=lambda c: c.label)
def test_a_reader_through_vllms_weight_loader_fills_the_ranks_slices(tmp_path, case, transposed):
    b = make_bench(tmp_path, transposed)
    dests = poisoned(b, case)
    landed = peer_ranks.through_reader(b, case, read_whole_files)(dests)
    assert landed == sum(t.nbytes for pair in dests for t in pair)
    assert_bit_equal(dests, by_hand(b, case))
    # And the same as fastmoe_load's own load of the rank, which the bench checks against.
    ours = poisoned(b, case)
    b.fastmoe(case)(ours)
    assert_bit_equal(dests, ours)


def test_the_rank_cases_are_the_ones_the_shape_splits_evenly():
    labels = [c.label for c in peer_ranks.cases(experts=8, intermediate=32)]
    assert labels == ["TP=1", "TP=2 rank 1", "TP=8 rank 1", "EP=8 rank 1"]
    # The command line's tiniest checkpoint: 4 experts, I = 32.
    assert [c.label for c in peer_ranks.cases(4, 32)] == ["TP=1", "TP=2 rank 1", "TP=8 rank 1"]
    assert [c.label for c in peer_ranks.cases(128, 12)] == ["TP=1", "TP=2 rank 1", "EP=8 rank 1"]


def wrong_element(expert: int, column: int):
    """A reader of whole files that changes one element of the second layer's down weight:
    `expert`'s, in its first row, at `column` of I."""

    def read(files: list[str], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in read_whole_files(files, device):
            if name == "model.layers.1.mlp.experts.down_proj":
                tensor = tensor.clone()
                tensor[expert, 0, column] += 1
            yield name, tensor

    return read


@pytest.mark.parametrize("case", peer_ranks.RANK_CASES, ids=lambda c: c.label)
def test_the_check_refuses_a_contender_with_a_wrong_element(tmp_path, case):
    b = make_bench(tmp_path)
    contenders = {
        peer_ranks.FASTMOE: b.fastmoe(case),
        peer_ranks.SEED: b.seed(case),
        STAND_IN: peer_ranks.through_reader(b, case, read_whole_files),
    }
    peer_ranks.check(b, case, contenders)  # the right ones pass
    # The rank's first expert and the first of its columns.
    expert = case.experts(b.shape.experts)[0]
    column = case.tp_rank * b.shape.intermediate // case.tp_size
    contenders["wrong"] = peer_ranks.through_reader(b, case, wrong_element(expert, column))
    with pytest.raises(peer_ranks.RankMismatchError) as error:
        peer_ranks.check(b, case, contenders)
    assert str(error.value) == (
        f"wrong, {case.label}: layer 1's w2_weight differs from fastmoe_load's; its row would "
        "time a wrong slice"
    )


def test_the_check_refuses_another_ranks_slice_and_a_load_that_writes_nothing(tmp_path):
    b = make_bench(tmp_path)
    rank1 = Case("TP=2 rank 1", tp_rank=1, tp_size=2)
    rank0 = Case("TP=2 rank 1", tp_rank=0, tp_size=2)  # the label of rank 1, rank 0's rows
    contenders = {
        peer_ranks.FASTMOE: b.fastmoe(rank1),
        "rank 0": peer_ranks.through_reader(b, rank0, read_whole_files),
    }
    with pytest.raises(peer_ranks.RankMismatchError, match="rank 0, TP=2 rank 1: layer 0's w13"):
        peer_ranks.check(b, rank1, contenders)
    # A load that writes nothing: its destinations keep their poison, which is not
    # fastmoe_load's, even where fastmoe_load too would leave one untouched.
    nothing = {peer_ranks.FASTMOE: b.fastmoe(rank1), "nothing": lambda dests: 0}
    with pytest.raises(peer_ranks.RankMismatchError, match="nothing, TP=2 rank 1: layer 0's"):
        peer_ranks.check(b, rank1, nothing)


def table_rows(out: list[str], header: int) -> list[tuple[str, str, str]]:
    end = out.index("", header)
    return [
        (line[:46].strip(), line[47:59].strip(), line[60:72].strip())
        for line in out[header + 2 : end]
    ]


def test_the_rank_table_on_the_command_line(tmp_path, monkeypatch):
    """With a reader in place of the peers, `bench` prints the rank table after the usual one:
    its title, its own header with x fastmoe, each case's rows once, fastmoe_load at 1.00 of
    itself and the seed at 1.00 of itself, and a legend that explains both tables."""
    asked = []

    def readers(device, direct=False):
        asked.append((device, direct))
        return {STAND_IN: read_whole_files}

    monkeypatch.setattr(peers, "readers", readers)
    options = ["--experts", 8, "--hidden", 64, "--intermediate", 32, "--repeats", 1]
    result = run_main("bench", "--dir", tmp_path / "bench", "--layers", 2, *options)
    assert result.returncode == 0, result.stderr
    assert asked == [(CPU, False)]
    out = result.stdout.splitlines()
    headers = [i for i, line in enumerate(out[:-1]) if out[i + 1].startswith("-----")]
    assert len(headers) == 2
    assert out[headers[0]].split()[-2:] == ["x", "memcpy"]
    assert out[headers[1]].split() == "path case destination GB/s x seed x fastmoe".split()
    assert out[headers[1] - 1] == peer_ranks.TITLE
    assert out[headers[1] - 2] == ""
    rows = table_rows(out, headers[1])
    paths = [peer_ranks.FASTMOE, peer_ranks.SEED, STAND_IN]
    labels = ["TP=1", "TP=2 rank 1", "TP=8 rank 1", "EP=8 rank 1"]
    assert rows == [(p, c, "pre-touched") for c in labels for p in paths]
    for line in out[headers[1] + 2 : headers[1] + 2 + len(rows)]:
        if line.startswith(peer_ranks.FASTMOE):
            assert line.split()[-1] == "1.00"
        if line.startswith("seed"):
            assert line.split()[-2] == "1.00"
    legend = " ".join(out[out.index("", headers[1]) + 1 :])
    legend = " ".join(legend.split())
    for term in ("path", "case", "destination", "GB/s", "x seed", "x memcpy", "x fastmoe"):
        assert f" {term} " in f" {legend} ", term
    assert "TP=8 rank 1 = its eighth (gate and up rows, down columns)" in legend
    assert "EP=n rank 1 = the experts placed on rank 1 of n" in legend
    assert "each tensor handed to vLLM's FusedMoE weight_loader" in legend
    assert "its tensors equal fastmoe_load's bit for bit" in legend
    assert "that rate over fastmoe_load's own load of the same rank" in legend
    # The rough note is said once, before the first table.
    assert sum("every figure below is rough" in line for line in out) == 1


def test_without_peers_a_cpu_bench_has_no_rank_table(tmp_path):
    out = bench(tmp_path / "bench", "--layers", 1).stdout
    assert peer_ranks.TITLE not in out
    assert "x fastmoe" not in out
    assert "no peer installed" not in out  # said on a GPU only


def test_cold_rank_rows_read_direct_and_drop_the_cache_before_every_run(tmp_path, monkeypatch):
    """--cold: the peers in their O_DIRECT modes, the page cache dropped before each timed run
    and warm-up of every contender (here counted instead of dropped)."""
    b = make_bench(tmp_path)
    asked, drops = [], []

    def readers(device, direct=False):
        asked.append(direct)
        return {STAND_IN: read_whole_files}

    monkeypatch.setattr(peers, "readers", readers)
    monkeypatch.setattr(run, "drop_page_cache", lambda: drops.append(1))
    table = run._run_ranks(b, cold=True)
    assert asked == [True]
    cases = len(peer_ranks.RANK_CASES)
    assert len(drops) == cases * 3 * 2  # 3 contenders, one warm-up and one timed run each
    assert [(r.path, r.case) for r in table.rows][:3] == [
        (peer_ranks.FASTMOE, "TP=1"),
        (peer_ranks.SEED, "TP=1"),
        (STAND_IN, "TP=1"),
    ]
    assert all(len(r.seconds) == 1 for r in table.rows)


def test_peer_names_fit_the_path_column():
    """Every name a peer row can have fits the table's 46-character path column, in both
    modes, so the columns after it stay aligned."""
    for peer in peers._PEERS:
        for mode in (peer.buffered, peer.direct):
            assert len(f"{peer.name} ({mode})") <= 46, peer.name


def test_peer_readers_need_a_gpu():
    assert peers.readers(CPU) == {}
    assert peers.readers(CPU, direct=True) == {}


def test_bench_help_tells_of_the_peer_rows():
    result = run_main("bench", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "Run:ai Model Streamer) load whole files, and then TP=1, TP=2, TP=8 and EP=8" in text
    assert "beside fastmoe_load's load of the same ranks, in a second table" in text
    assert "--cold empty the page cache before every run (root only); the peers then read in" in (
        text
    )
