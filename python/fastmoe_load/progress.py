"""Feedback on long operations: a tqdm progress bar on stderr, and the package's logging rules.

`Progress` shows bytes done out of the total, the rate (GB/s) and the time left, redrawn at
most ten times a second, once an operation has run for a second (shorter ones print nothing).
It draws only when its stream is a terminal and neither `FASTMOE_LOAD_PROGRESS=0` nor
`TQDM_DISABLE=1` is set, or when forced with `enabled=True`; `enabled=False` silences it
whatever the environment.

    with Progress(total_bytes, "load") as progress:
        for plan, address in work:
            execute_with_progress(plan, address, progress)

Logging: every module logs to `logging.getLogger("fastmoe_load")` or a child of it
(`logging.getLogger(__name__)`), and never configures handlers; applications and the command
line decide what is shown. INFO says what was matched, converted or copied unchanged, one
line per expert group or per summary; DEBUG names single tensors; WARNING is for results a
user may not expect (a layout a consumer cannot read, files left out).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol, TextIO

from tqdm import tqdm

ENV_VAR = "FASTMOE_LOAD_PROGRESS"
_OFF = ("0", "false", "no", "off")
# Nothing is drawn for operations shorter than this: a bar that flashes by is noise.
DEFAULT_DELAY_S = 1.0
# Redrawing more often costs time in the terminal without telling the reader more.
DEFAULT_INTERVAL_S = 0.1
# `execute_with_progress` runs a plan in windows of this size: large enough that the extra
# calls cost nothing measurable, small enough for several updates per second at 10+ GB/s.
PROGRESS_WINDOW_BYTES = 256 << 20


def format_bytes(n: float) -> str:
    """`n` bytes in decimal units with three significant digits or so: `9.66 GB`, `512 B`."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            break
        n /= 1000
    if unit == "B":
        return f"{int(n)} B"
    decimals = 2 if abs(n) < 10 else 1 if abs(n) < 100 else 0
    return f"{n:.{decimals}f} {unit}"


def progress_enabled(stream: TextIO | None = None) -> bool:
    """Whether a progress bar would be drawn on `stream` (default: stderr) by default."""
    if os.environ.get(ENV_VAR, "").strip().lower() in _OFF:
        return False
    if os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", *_OFF):
        return False
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Progress:
    """Bytes done out of `total`, shown as a tqdm bar on `stream` (default: stderr), e.g.
    `load:  50%|█████     | 4.00G/8.00G [00:02<00:02, 2.00GB/s]`.

    `enabled=None` decides from the environment (see `progress_enabled`); `advance` and
    `close` are cheap when disabled, so callers need not check. Safe to advance from
    several threads. `clock` (seconds) is for tests."""

    def __init__(
        self,
        total: int,
        label: str,
        enabled: bool | None = None,
        *,
        stream: TextIO | None = None,
        delay: float = DEFAULT_DELAY_S,
        interval: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = max(int(total), 0)
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.enabled = progress_enabled(self.stream) if enabled is None else bool(enabled)
        self.done = 0
        self._clock = clock
        self._start = clock()
        self._lock = threading.Lock()
        self._bar: tqdm | None = None
        if self.enabled:
            self._bar = tqdm(
                total=self.total,
                desc=label,
                file=self.stream,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                delay=delay,
                mininterval=interval,
                miniters=1,  # bytes arrive in windows of very different sizes
            )
            # tqdm reads its clock from this attribute; its start is taken again with it.
            self._bar._time = clock
            self._bar.start_t = self._bar.last_print_t = self._start

    @property
    def elapsed(self) -> float:
        """Seconds since the start."""
        return self._clock() - self._start

    @property
    def rate(self) -> float:
        """Bytes per second since the start (0 before any time has passed)."""
        elapsed = self.elapsed
        return self.done / elapsed if elapsed > 0 else 0.0

    @property
    def drawn(self) -> bool:
        """Whether anything has been written to the stream."""
        bar = self._bar
        return bar is not None and bar.last_print_t >= bar.start_t + bar.delay

    def advance(self, nbytes: int) -> None:
        """Counts `nbytes` more bytes done, redrawing the bar when it is due."""
        with self._lock:
            self.done += nbytes
            if self._bar is not None:
                self._bar.update(nbytes)

    def close(self) -> None:
        """Draws the final state and ends the line, if anything was drawn."""
        with self._lock:
            if self._bar is not None:
                self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Plan(Protocol):
    """What `execute_with_progress` needs of a native `CopyPlan`."""

    @property
    def nbytes(self) -> int: ...

    def windows(self, max_bytes: int) -> list[tuple[int, int]]: ...

    def execute(self, address: int, start: int = 0, end: int | None = None) -> Any: ...


def execute_with_progress(
    plan: _Plan,
    address: int,
    progress: Progress | None,
    window_bytes: int = PROGRESS_WINDOW_BYTES,
) -> None:
    """Runs `plan` into the memory at `address` (a CPU tensor's `data_ptr()`), advancing
    `progress` after each window; one call to `execute` when there is nothing to report."""
    if progress is None:
        plan.execute(address)
        return
    for start, end in plan.windows(window_bytes):
        plan.execute(address + start, start, end)
        progress.advance(end - start)
