"""Output files: which paths jquant will write, and the atomic replace itself.

Rules for an output path (:func:`check_output`):

* A symlink is followed: the file it points to is replaced and the link stays a link
  (what ``cp`` and shell redirection do). A dangling link creates its target.
* Anything that exists and is not a regular file (a folder, a FIFO, a device node such
  as ``/dev/null``, a socket) is refused: an atomic rename would replace it with a
  regular file.
* A path ending in ``/`` names a folder and is refused; so is a path whose folder does
  not exist.
* The output must not be one of the inputs (same file by device and inode, so hard
  links and symlinks count): the conversion would destroy what it reads.

:func:`atomic_output` writes a temporary file next to the target, fsyncs it, gives it
the mode of the file it replaces (or ``0o666 & ~umask`` for a new file, as ``open``
would) and renames it over the target. On any exception, ``KeyboardInterrupt`` and the
CLI's signal exceptions included, the temporary file is removed and an existing target
is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .._errors import FileWriteError

__all__ = ["atomic_output", "check_output", "current_umask", "write_problem"]


def current_umask() -> int:
    """The process umask (read from /proc where possible, so no other thread sees a change)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def check_output(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Check an output path against the rules above; returns the file to replace.

    Args:
        path: the output path as the user gave it.
        inputs: files the output must not be (compared by device and inode).

    Returns:
        The path to write: ``path`` with symlinks resolved.

    Raises:
        FileWriteError: the path is refused; the message says why and what to do.
    """
    shown = os.fspath(path)
    where = f"can't write {shown!r}"
    seps = (os.sep, os.altsep) if os.altsep else (os.sep,)
    if not shown or shown.endswith(seps) or os.path.basename(shown) in (".", ".."):
        raise FileWriteError(
            f"{where}: it names a folder; give a file name (e.g. {shown.rstrip('/') or '.'}"
            f"/model.gguf)"
        )
    target = Path(os.path.realpath(shown))
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as e:  # a symlink loop, a component that is a file, permissions
        raise FileWriteError(f"{where}: {e.strerror or e}") from e
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise FileWriteError(f"{where}: it is a directory; give a file name")
        if not stat.S_ISREG(st.st_mode):
            raise FileWriteError(
                f"{where}: it is not a regular file (a FIFO, device or socket); jquant only "
                f"writes regular files, so choose a file path"
            )
    if not target.parent.is_dir():
        raise FileWriteError(
            f"{where}: the folder {str(target.parent)!r} does not exist; create it first"
        )
    if st is not None:
        for inp in inputs:
            try:
                ist = os.stat(inp)
            except OSError:
                continue
            if _same_file(st, ist):
                raise FileWriteError(
                    f"{where}: it is the input file {os.fspath(inp)!r}; writing it would destroy "
                    f"the input, so choose another output name"
                )
    return target


def write_problem(path: str | os.PathLike, folder: str | os.PathLike, e: OSError) -> str:
    """A one-line message for an ``OSError`` raised while writing ``path``."""
    where = f"can't write {os.fspath(path)!r}"
    folder = os.fspath(folder)
    if e.errno in (errno.ENOSPC, errno.EDQUOT) or (e.errno is None and _disk_full(folder)):
        return (
            f"{where}: no space left on device (the one holding {folder!r}); free some space "
            f"or write elsewhere (no partial file was left)"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}: permission denied in {folder!r} ({e.strerror}); choose a folder you can write to"
    if e.errno == errno.ENOENT and not os.path.isdir(folder):
        return f"{where}: the folder {folder!r} does not exist; create it first"
    return f"{where}: {e.strerror or e}"


def _disk_full(folder: str) -> bool:
    # numpy's tofile reports a short write as "N requested and M written", without errno
    try:
        s = os.statvfs(folder)
    except OSError:
        return False
    return s.f_bavail * s.f_frsize < 1 << 20


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = ()
) -> Iterator[str]:
    """Context manager yielding a temporary path that replaces ``path`` on success.

    The body writes (and closes) the temporary file; on a normal exit it is fsynced,
    given the replaced file's mode (or ``0o666 & ~umask``), renamed over the target and
    the folder fsynced. On any exception the temporary file is removed.

    Raises:
        FileWriteError: the path is refused (:func:`check_output`) or writing failed
          (disk full, permissions), with a message saying which.

    Example:
        >>> import os, tempfile
        >>> from jquant._io.safe_write import atomic_output
        >>> out = os.path.join(tempfile.mkdtemp(), "x.bin")
        >>> with atomic_output(out) as tmp:
        ...     with open(tmp, "wb") as f:
        ...         _ = f.write(b"data")
        >>> open(out, "rb").read(), sorted(os.listdir(os.path.dirname(out)))
        (b'data', ['x.bin'])
    """
    target = check_output(path, inputs=inputs)
    folder = target.parent
    try:
        old = os.stat(target)
    except OSError:
        old = None
    mode = stat.S_IMODE(old.st_mode) if old is not None else 0o666 & ~current_umask()
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        if old is not None and (old.st_uid, old.st_gid) != (os.getuid(), os.getgid()):
            with contextlib.suppress(OSError):  # only root may give a file away
                os.chown(tmp, old.st_uid, old.st_gid)
        os.replace(tmp, target)
        tmp = None
        _fsync_dir(folder)
    except FileWriteError:
        raise
    except OSError as e:
        raise FileWriteError(write_problem(path, folder, e)) from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
