"""Run many train_teacher.py / train_student.py command lines in one Python process.

    bash scripts/run_digits_table.sh --dry-run | python scripts/run_commands.py

Reads one command per line (`[VAR=value ...] python train_student.py ARGS...`) and calls the
entry point's main(ARGS) in this process, in order, so short runs (the digits table) do not
each pay the interpreter's and torch's start-up. Environment assignments are applied before
the run. A run that fails is reported and the next one goes on; the exit status is 1 if any
failed.
"""
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_line(line: str):
    """(environment, entry point file name, argv) of one command line."""
    words = shlex.split(line)
    env = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    if len(words) < 2 or not words[1].endswith(".py"):
        raise ValueError(f"not a 'python <entry point> ARGS' command: {line}")
    return env, os.path.basename(words[1]), words[2:]


def entry_points():
    import train_student
    import train_teacher
    return {"train_student.py": train_student.main, "train_teacher.py": train_teacher.main}


def run_line(line: str, mains) -> bool:
    env, entry, argv = parse_line(line)
    os.environ.update(env)
    try:
        mains[entry](argv)
    except SystemExit as stop:
        return stop.code in (0, None)
    except Exception:
        traceback.print_exc()
        return False
    return True


def main() -> int:
    lines = [line.strip() for line in sys.stdin if line.strip() and not line.startswith("#")]
    mains = entry_points()
    failed = []
    start = time.perf_counter()
    for number, line in enumerate(lines, 1):
        print(f"[{number}/{len(lines)}] {line}", flush=True)
        if not run_line(line, mains):
            failed.append(line)
    print(f"{len(lines) - len(failed)} of {len(lines)} runs succeeded in {time.perf_counter() - start:.0f} s")
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
