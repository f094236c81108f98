"""User-facing errors: one clear line and exit status 2, never a traceback."""
import functools
import sys


class UserError(Exception):
    """A mistake the user can fix; the message names the problem and the fix."""


EXIT_USAGE = 2


def exits_cleanly(main):
    """Run `main`, turning a UserError into one line on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(EXIT_USAGE)

    return wrapper
