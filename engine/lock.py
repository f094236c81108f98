"""One process owns a run directory at a time: an exclusive flock on `<run>/.lock`.

The kernel drops the lock when its holder's file descriptor closes, so a process killed by
SIGKILL never leaves the directory locked. (Forked data-loader workers share the descriptor
and hold the lock until they notice their parent is gone, a few seconds.) The lock file
itself is never deleted: unlinking a locked file lets a third process lock a fresh inode
while a second still holds the old one.
"""
import errno
import fcntl
import os
import socket
from pathlib import Path

from core.errors import UserError, on_exit
from engine.atomic import describe_os_error

LOCK_FILE = ".lock"


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
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise UserError(f"cannot lock {path}: {describe_os_error(err)}") from None
        raise UserError(f"run directory {run_dir} is in use by another process ({holder}); "
                        "wait for it to end, or choose another --trial or --run_name") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    on_exit(lambda: os.close(fd))
