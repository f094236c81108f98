"""Run many entry-point command lines (train_teacher.py, train_student.py, train_mutual.py,
train_self.py, evaluate.py: engine/programs.py's table) in one Python process.

    bash scripts/run_digits_table.sh --dry-run | python scripts/run_commands.py [--jobs 2]

Reads one command per line (`[VAR=value ...] python train_student.py ARGS...`) and calls the
entry point's main(ARGS) in this process, so short runs (the digits table) do not each pay
the interpreter's and torch's start-up. With --jobs N the commands are shared among N worker
processes with cores/N threads each (small networks use many single-threaded processes
better than one multi-threaded one); the commands of one call must then not depend on each
other. Environment assignments are applied before the run. A run that fails is reported and
the others go on; the exit status is 1 if any failed.

Output: on a terminal, parallel runs share one live display (a named progress line per running
run, their epoch lines scrolling above it); otherwise no progress bars, one line per epoch per
run, each starting with the run's name (engine/progress.py).
"""
import argparse
import importlib
import multiprocessing
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.programs import PROGRAMS  # noqa: E402  (after the checkout is on sys.path)

# the programs a command line can name, by file name
SCRIPTS = {Path(p.script).name: p for p in PROGRAMS if "." not in p.module}


def split_line(line: str):
    """(environment assignments, words) of one `[VAR=value ...] program ARGS` line."""
    words = shlex.split(line)
    env = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def parse_line(line: str):
    """(environment, entry point file name, argv) of one command line."""
    env, words = split_line(line)
    if len(words) < 2 or os.path.basename(words[1]) not in SCRIPTS:
        raise ValueError(f"not a 'python <entry point> ARGS' command with an entry point of "
                         f"{', '.join(SCRIPTS)}: {line}")
    return env, os.path.basename(words[1]), words[2:]


def entry_main(script: str):
    """The main() of the entry point `script` (imported on first use: a worker imports only the
    programs its lines name)."""
    return importlib.import_module(SCRIPTS[script].module).main


def run_line(line: str) -> bool:
    env, entry, argv = parse_line(line)
    os.environ.update(env)
    try:
        entry_main(entry)(argv)
    except SystemExit as stop:
        return stop.code in (0, None)
    except Exception:
        traceback.print_exc()
        return False
    return True


class LinesToSink:
    """A worker's stdout: each complete line goes to the parent's live display."""

    def __init__(self, sink):
        self.sink, self.pending = sink, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.sink(("line", line))
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def worker_init(threads: int, queue) -> None:
    import torch
    torch.set_num_threads(threads)
    if queue is not None:
        from engine import progress
        progress.set_sink(queue.put)
        sys.stdout = LinesToSink(queue.put)


def run_in_worker(numbered) -> tuple:
    number, total, line = numbered
    print(f"[{number}/{total}] {line}", flush=True)
    return line, run_line(line)


def run_parallel(numbered, jobs: int) -> list:
    from engine.progress import LiveDisplay, on_terminal
    threads = max(1, (os.cpu_count() or jobs) // jobs)
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        queue = manager.Queue() if on_terminal() else None
        with context.Pool(jobs, worker_init, (threads, queue), maxtasksperchild=8) as pool:
            pending = pool.map_async(run_in_worker, numbered, chunksize=1)
            if queue is not None:
                show_live(pending, queue, LiveDisplay())
            outcomes = pending.get()
            # let the workers exit on their own (the context manager terminates them, which
            # leaves what they imported with no chance to release its semaphores)
            pool.close()
            pool.join()
    return outcomes


def show_live(pending, queue, display) -> None:
    """Draw the workers' events until every run has ended."""
    import queue as queues
    while True:
        try:
            display.handle(queue.get(timeout=0.2))
        except queues.Empty:
            if pending.ready():
                break
    display.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run entry-point command lines read from stdin in one process.")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes for independent commands")
    jobs = parser.parse_args(argv).jobs
    return run_lines([line.strip() for line in sys.stdin if line.strip() and not line.startswith("#")], jobs)


def run_lines(lines: list, jobs: int = 1) -> int:
    """Run `lines` (with --jobs 1 in this process, one after another), report, and return the
    exit status: 1 if any failed."""
    numbered = [(k, len(lines), line) for k, line in enumerate(lines, 1)]
    start = time.perf_counter()
    if jobs > 1:
        outcomes = run_parallel(numbered, jobs)
    else:
        outcomes = [run_in_worker(item) for item in numbered]
    failed = [line for line, ok in outcomes if not ok]
    print(f"{len(lines) - len(failed)} of {len(lines)} runs succeeded in {time.perf_counter() - start:.0f} s")
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
