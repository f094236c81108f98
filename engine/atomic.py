"""Writing run files so that a failure costs nothing already written: each file goes to
`<name>.tmp`, is flushed to disk and renamed over the old one, and a failed write (a full
disk, a file-size limit, a permission) removes its temporary file and ends in one line
naming the file, the cause and what was kept."""
import errno
import os
from contextlib import contextmanager
from pathlib import Path

from core.errors import UserError

CAUSES = {
    errno.ENOSPC: "disk full (ENOSPC)",
    errno.EDQUOT: "disk quota exceeded (EDQUOT)",
    errno.EFBIG: "file too large for the file system or the process's file-size limit (EFBIG)",
    errno.EACCES: "permission denied (EACCES)",
    errno.EPERM: "operation not permitted (EPERM)",
    errno.EROFS: "read-only file system (EROFS)",
}


def describe_os_error(err: OSError) -> str:
    if err.errno in CAUSES:
        return CAUSES[err.errno]
    name = errno.errorcode.get(err.errno, "no errno")
    return f"{err.strerror or err} ({name})"


def write_failure(path: Path, err: OSError, kept: str) -> UserError:
    return UserError(f"cannot write {path}: {describe_os_error(err)}; {kept}")


def write_atomic(path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the directory itself refuses writes: there is no temporary file to remove
        kept = f"the previous {path.name} is kept" if path.exists() else f"there was no earlier {path.name}"
        raise write_failure(path, err, kept) from None


@contextmanager
def appending(path):
    """Open `path` for appending, a failure as one line (the rows before stay)."""
    path = Path(path)
    try:
        with open(path, "a", newline="") as f:
            yield f
    except OSError as err:
        raise write_failure(path, err, "the rows written before are kept") from None
