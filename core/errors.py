"""User-facing errors: one clear line and an exit status, never a traceback."""
import functools
import signal
import sys
import threading


class UserError(Exception):
    """A mistake the user can fix; the message names the problem and the fix."""


class RunStopped(Exception):
    """A run ended early on purpose (a signal, a non-finite loss): the message says what was
    kept and how to go on; the process exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


EXIT_USAGE = 2
EXIT_SIGINT = 128 + signal.SIGINT

_cleanups = []


def on_exit(callback) -> None:
    """Call `callback()` when the running main ends, however it ends (a run directory's lock
    is released so the next main in this process, a table script's next run, may take it)."""
    _cleanups.append(callback)


def exit_quietly_on_ctrl_c() -> None:
    """Make a Ctrl-C end the process with one line and status 130 until main starts. An entry
    point calls this before its other imports, which take seconds (torch), so that a Ctrl-C
    during them does not print Python's traceback of an import."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _interrupted_while_starting)


def _interrupted_while_starting(signum, frame):
    print("interrupted (Ctrl-C) while starting; nothing was written", file=sys.stderr)
    sys.exit(EXIT_SIGINT)


def exits_cleanly(main):
    """Run `main`, turning a UserError into one line on stderr and exit status 2, a RunStopped
    into its line and status, and Ctrl-C outside training into one line and status 130.

    `main` returns its results to library callers; `main.command` is the console command, which
    must return an exit status (a console script calls `sys.exit` on what it gets, and a dict
    there would be printed and read as status 1)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        except RunStopped as stop:
            print(f"stopped: {stop}", file=sys.stderr)
            sys.exit(stop.exit_code)
        except KeyboardInterrupt:
            print("interrupted (Ctrl-C) outside the training loop; run the same command again to go on", file=sys.stderr)
            sys.exit(EXIT_SIGINT)
        finally:
            while _cleanups:
                _cleanups.pop()()

    def command() -> int:
        wrapper()
        return 0

    wrapper.command = command
    return wrapper
