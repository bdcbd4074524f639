"""Safe file writes: every file the harness writes goes through `safe_write`.

- Only a regular file is ever replaced: a FIFO, a device node, a directory, a socket or a symlink
  at the target is refused (`OutputError`, one line) and left exactly as it was.
- The bytes go to a temp file in the target's folder, are fsynced, and `os.replace` puts them in
  place: a reader sees the old file or the new one, never half of one.
- A new file gets the permissions the umask gives (0666 & ~umask); a replaced file keeps its mode.
- A full disk, a read-only folder or a missing permission is an `OutputError` naming the path.

`safe_name` turns a stored sweep name into a file name that stays in its folder.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import tempfile
from pathlib import Path

from harness.errors import OutputError

MAX_NAME_BYTES = 120  # well under the 255 bytes most file systems allow, room left for suffixes

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symbolic link"),
)


def _kind(mode: int) -> str | None:
    """What the file at `mode` is, when it is not a regular file."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _problem(exc: OSError) -> str:
    reasons = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exhausted",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ENAMETOOLONG: "the file name is too long",
        errno.ENOTDIR: "a part of the path is not a folder",
    }
    return reasons.get(exc.errno, exc.strerror or str(exc))


def check_writable_target(path: str | Path, *, key: str | None = None) -> Path:
    """Refuse a target that is there and is not a regular file (before any work is done for it)."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise OutputError(f"cannot write here: {_problem(exc)}", file=str(path), key=key) from None
    kind = _kind(mode)
    if kind is not None:
        raise OutputError(
            f"is {kind}; the harness only ever replaces regular files (choose another path)", file=str(path), key=key
        )
    return path


def safe_write(path: str | Path, data: str | bytes, *, key: str | None = None) -> Path:
    """Write `data` (text is UTF-8) to `path` atomically; see the module docstring for the rules."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    check_writable_target(path, key=key)
    try:
        old_mode = stat.S_IMODE(os.stat(path).st_mode) if path.exists() else None
    except OSError:
        old_mode = None
    mode = old_mode if old_mode is not None else 0o666 & ~current_umask()
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:60]}.", suffix=".tmp")
        try:
            os.fchmod(fd, mode)
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        check_writable_target(path, key=key)  # still not replaced by something else meanwhile
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"cannot write: {_problem(exc)}", file=str(path), key=key) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def ensure_dir(path: str | Path, *, key: str | None = None) -> Path:
    """Create a folder (and its parents) for output; a non-folder there or an OS error is one line."""
    path = Path(path)
    try:
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            mode = os.lstat(path).st_mode
            raise OutputError(
                f"is {_kind(mode) or 'a file'}, not a folder the harness may write into (choose another path)",
                file=str(path),
                key=key,
            )
        path.mkdir(parents=True, exist_ok=True)
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"cannot create the folder: {_problem(exc)}", file=str(path), key=key) from None
    return path


_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_name(name: str, *, max_bytes: int = MAX_NAME_BYTES) -> str:
    """A file name for a stored sweep name: letters, digits, `._+-` kept, anything else `_`; no
    leading dot (so never `.` or `..`); too long or altered -> shortened with a hash of the original,
    so two different names never share a file."""
    cleaned = _UNSAFE.sub("_", name).lstrip(".") or "sweep"
    if cleaned == name and len(cleaned.encode()) <= max_bytes:
        return cleaned
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{cleaned[: max_bytes - 11]}-{digest}"
