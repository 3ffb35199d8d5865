"""Progress of long work: on a terminal a bar that redraws itself (tqdm); anywhere else (a log file, a
cluster's job log) a plain line every HAFA_LOG_INTERVAL seconds (default 30), never a carriage return."""

import os
import sys
import time
from collections.abc import Iterable

from tqdm import tqdm

DEFAULT_LOG_INTERVAL_S = 30.0


def log_interval() -> float:
    """Seconds between two progress lines in a log (the environment variable HAFA_LOG_INTERVAL)."""
    try:
        return max(0.0, float(os.environ.get("HAFA_LOG_INTERVAL", DEFAULT_LOG_INTERVAL_S)))
    except ValueError:
        return DEFAULT_LOG_INTERVAL_S


def format_rate(value: float) -> str:
    """A speed with three significant digits at most, never rounded to 0 (0.82, 12.3, 456)."""
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


class LineProgress:
    """tqdm's interface for logs: a line `desc: n/total unit (p%), elapsed, postfix` when at least
    log_interval() seconds have passed since the last one."""

    def __init__(self, iterable: Iterable | None, *, total: int | None, desc: str, unit: str, initial: int):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.start = self.last = time.perf_counter()
        self.postfix = ""

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= log_interval():
            self.last = now
            self.write_line(now)

    def write_line(self, now: float) -> None:
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        elapsed = time.strftime("%H:%M:%S", time.gmtime(now - self.start))
        postfix = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} {self.unit}{share}, {elapsed} elapsed{postfix}", file=sys.stderr, flush=True)

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self.postfix = text

    def close(self) -> None:
        """Nothing to clear: a log keeps its lines."""


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    enabled: bool = True,
    leave: bool = True,
):
    """A progress bar over `iterable` (or updated by hand): tqdm on a terminal, LineProgress in a log,
    nothing when not enabled (e.g. on other processes than the main one)."""
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(
            iterable,
            total=total,
            desc=desc,
            unit=unit,
            initial=initial,
            leave=leave,
            dynamic_ncols=True,
            mininterval=0.2,
        )
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial)
