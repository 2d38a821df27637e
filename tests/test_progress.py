"""The progress bar (tqdm): off unless its stream is a terminal, and off by flag or
environment; silent for short operations; bytes, percentage, GB/s and time left while drawn;
every byte counted, from several threads too; plans run window by window."""

from __future__ import annotations

import fcntl
import io
import os
import struct
import termios
import threading

import pytest
from fastmoe_load.progress import Progress, execute_with_progress, format_bytes


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FASTMOE_LOAD_PROGRESS", raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)


def test_progress_is_off_when_not_a_terminal_or_disabled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert not Progress(10, "load", stream=io.StringIO()).enabled
    assert Progress(10, "load", stream=Terminal()).enabled
    assert not Progress(10, "load", enabled=False, stream=Terminal()).enabled
    for variable, value in [("FASTMOE_LOAD_PROGRESS", "0"), ("TQDM_DISABLE", "1")]:
        with monkeypatch.context() as patch:
            patch.setenv(variable, value)
            assert not Progress(10, "load", stream=Terminal()).enabled
            assert Progress(10, "load", enabled=True, stream=Terminal()).enabled
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert Progress(10, "load", stream=Terminal()).enabled

    for stream, enabled in [(io.StringIO(), None), (Terminal(), False)]:
        clock = FakeClock()
        with Progress(10**9, "load", enabled, stream=stream, clock=clock) as progress:
            clock.now += 5
            progress.advance(10**9)
        assert stream.getvalue() == ""
        assert progress.done == 10**9 and not progress.drawn


def test_progress_stays_silent_for_short_loads() -> None:
    clock, stream = FakeClock(), Terminal()
    with Progress(10**9, "load", enabled=True, stream=stream, clock=clock) as progress:
        for _ in range(10):
            clock.now += 0.09
            progress.advance(10**8)
    assert stream.getvalue() == ""
    assert progress.done == 10**9 and not progress.drawn


def test_progress_shows_bytes_rate_and_time_left() -> None:
    clock, stream = FakeClock(), Terminal()
    progress = Progress(8 * 10**9, "load", enabled=True, stream=stream, clock=clock)
    clock.now += 2
    progress.advance(4 * 10**9)
    assert progress.rate == pytest.approx(2e9)
    assert progress.drawn
    line = stream.getvalue()
    assert line.startswith("\rload:  50%|")
    assert "4.00G/8.00G [00:02<00:0" in line and line.endswith(", 2.00GB/s]")
    clock.now += 0.05  # within the redraw interval: nothing new
    progress.advance(10**6)
    assert stream.getvalue() == line
    clock.now += 1.95
    progress.advance(4 * 10**9 - 10**6)
    progress.close()
    assert stream.getvalue().endswith("8.00G/8.00G [00:04<00:00, 2.00GB/s]\n")
    assert "load: 100%|" in stream.getvalue()
    progress.close()  # once only
    assert stream.getvalue().count("\n") == 1


def test_progress_on_a_real_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """stderr on a pseudo-terminal is taken for a terminal by default, and the bar, as wide
    as the terminal, reaches it."""
    leader, follower = os.openpty()
    # 100 columns (a fresh pseudo-terminal has 0, where tqdm draws nothing).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    with os.fdopen(follower, "w") as stream:
        monkeypatch.setattr("sys.stderr", stream)
        clock = FakeClock()
        with Progress(3 * 10**9, "convert", clock=clock) as progress:
            assert progress.enabled
            clock.now += 1.5
            progress.advance(3 * 10**9)
        stream.flush()
        shown = os.read(leader, 4096).decode()
    os.close(leader)
    last = shown.strip().split("\r")[-1]
    assert last.startswith("convert: 100%|") and 90 < len(last) <= 100
    assert last.endswith("| 3.00G/3.00G [00:01<00:00, 2.00GB/s]")


def test_progress_counts_every_byte_from_several_threads() -> None:
    stream = Terminal()
    with Progress(8 * 1000 * 1000, "load", enabled=True, stream=stream, delay=0) as progress:
        workers = [
            threading.Thread(target=lambda: [progress.advance(1000) for _ in range(1000)])
            for _ in range(8)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    assert progress.done == 8 * 1000 * 1000
    assert "8.00M/8.00M" in stream.getvalue().splitlines()[-1]


def test_execute_with_progress_advances_per_window() -> None:
    class Plan:
        nbytes = 10

        def __init__(self) -> None:
            self.calls: list[tuple[int, int, int | None]] = []

        def windows(self, max_bytes: int) -> list[tuple[int, int]]:
            return [(s, min(s + max_bytes, self.nbytes)) for s in range(0, self.nbytes, max_bytes)]

        def execute(self, address: int, start: int = 0, end: int | None = None) -> None:
            self.calls.append((address, start, end))

    plan, progress = Plan(), Progress(10, "load", enabled=False)
    execute_with_progress(plan, 1000, progress, window_bytes=4)
    assert plan.calls == [(1000, 0, 4), (1004, 4, 8), (1008, 8, 10)]
    assert progress.done == 10
    plan = Plan()
    execute_with_progress(plan, 1000, None)
    assert plan.calls == [(1000, 0, None)]


def test_format_bytes() -> None:
    assert [format_bytes(n) for n in (0, 999, 1000, 57_600, 9.66e9, 123.4e6)] == [
        "0 B",
        "999 B",
        "1.00 kB",
        "57.6 kB",
        "9.66 GB",
        "123 MB",
    ]
