"""What a run reports while it trains, for a person at a terminal and for a log file.

On a terminal the running epoch has a live bar. Not on a terminal (a log file, a pipe, a
scheduler's output) there is no bar, so no carriage return reaches the file: only one line per
epoch. Every epoch line starts with the run's name, so the lines of runs sharing one output can
be told apart.

A process that runs several trainings at once (scripts/run_commands.py) installs a *sink*: the
bars' states and the lines then go to it, and it draws one live display with a named line per
run (see `LiveDisplay`).
"""
import shutil
import sys
import time
from typing import Callable, Dict, Optional

from tqdm import tqdm

SINK_INTERVAL_S = 0.5   # a bar's state goes to the sink at most this often

_sink: Optional[Callable[[tuple], None]] = None


def set_sink(sink: Optional[Callable[[tuple], None]]) -> None:
    """Send bars ('bar', run, text) and lines ('line', text) to `sink` instead of the terminal."""
    global _sink
    _sink = sink


def on_terminal() -> bool:
    return sys.stdout.isatty()


def epoch_bar(total: int, run: str, desc: str, enabled: bool = True):
    """A progress bar over one epoch's `total` steps."""
    if _sink is not None:
        return SinkBar(_sink, total, run, desc) if enabled else SinkBar(None, total, run, desc)
    return tqdm(total=total, desc=desc, leave=False, disable=not (enabled and on_terminal()), dynamic_ncols=True)


def run_line(run: str, text: str) -> None:
    line = f"[{run}] {text}"
    if _sink is not None:
        _sink(("line", line))
    else:
        print(line, flush=True)


class SinkBar:
    """tqdm's update/set_postfix/close, sending the bar's text to a sink, throttled."""

    def __init__(self, sink, total: int, run: str, desc: str):
        self.sink, self.total, self.run, self.desc = sink, total, run, desc
        self.n, self.postfix, self.start, self.sent = 0, "", time.perf_counter(), 0.0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.sink is not None and (now - self.sent >= SINK_INTERVAL_S or self.n == self.total):
            self.sent = now
            rate = self.n / max(now - self.start, 1e-9)
            self.sink(("bar", self.run, f"{self.desc} {self.n}/{self.total} {rate:.1f} it/s {self.postfix}"))

    def set_postfix(self, values: Dict[str, str]) -> None:
        self.postfix = " ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        if self.sink is not None:
            self.sink(("done", self.run))


class LiveDisplay:
    """Lines scroll above a block of one live line per running run (ANSI cursor moves)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.bars: Dict[str, str] = {}
        self.drawn = 0

    def handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "line":
            self._redraw(above=event[1])
        elif kind == "bar":
            self.bars[event[1]] = event[2]
            self._redraw()
        elif kind == "done":
            self.bars.pop(event[1], None)
            self._redraw()

    def _redraw(self, above: Optional[str] = None) -> None:
        out = ["\x1b[1A\x1b[2K" * self.drawn]
        if above is not None:
            out.append(above + "\n")
        out.extend(f"{run}: {text}"[:_width()] + "\n" for run, text in self.bars.items())
        self.drawn = len(self.bars)
        self.stream.write("\r" + "".join(out))
        self.stream.flush()

    def close(self) -> None:
        self.bars.clear()
        self._redraw()


def _width() -> int:
    return shutil.get_terminal_size((120, 20)).columns - 1
