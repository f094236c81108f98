"""One process owns a run directory at a time: an exclusive flock on `<run>/.lock`.

The kernel drops the lock when its holder's file descriptor closes, so a process killed by
SIGKILL never leaves the directory locked. (Forked data-loader workers share the descriptor
and hold the lock until they notice their parent is gone, a few seconds.) The lock file
itself is never deleted: unlinking a locked file lets a third process lock a fresh inode
while a second still holds the old one.

Whether a run is training is this lock (`holder`), not a scheduler's view of its job: a launcher
(scripts/slurm.py status) asks it, on whichever node, as flock works on the shared file system.
"""
import fcntl
import os
import socket
import time
from pathlib import Path

from core.errors import UserError, on_exit
from engine.atomic import describe_os_error

LOCK_FILE = ".lock"
# `holder` takes the lock shared for an instant; a run starting in that instant tries again
# rather than failing as if another run held the directory
TRIES, RETRY_S = 5, 0.02


def lock_run_dir(run_dir: Path) -> None:
    """Take the run directory (creating it) until the running main ends; a UserError naming
    the holder when another process has it."""
    path = Path(run_dir) / LOCK_FILE
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"cannot create run directory {run_dir}: {describe_os_error(err)}; "
                        "choose a writable --save_dir") from None
    try:
        taken = take(fd)
    except OSError as err:
        os.close(fd)
        raise UserError(f"cannot lock {path}: {describe_os_error(err)}") from None
    if not taken:
        holder_said = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(f"run directory {run_dir} is in use by another process ({holder_said}); "
                        "wait for it to end, or choose another --trial or --run_name")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    on_exit(lambda: os.close(fd))


def take(fd: int) -> bool:
    """The exclusive lock on `fd`, or False when another process keeps it through every try."""
    for _ in range(TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(RETRY_S)
    return False


def holder(run_dir: Path):
    """Who holds the run directory ('pid N on HOST'), or None when no process does (no lock
    file, or nobody holding it). Takes nothing: a shared lock for an instant, released at once."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)
