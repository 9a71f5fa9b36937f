"""The recorder's file system access: only what it made, never through a symlink.

Everything under ``[recorder] dir`` is reached from one directory fd (:class:`Tree`, opened
once with ``O_DIRECTORY | O_NOFOLLOW``), one path component at a time: each feed and fixture
directory is opened relative to its parent's fd with ``O_DIRECTORY | O_NOFOLLOW``, each file
relative to its directory's fd with ``O_NOFOLLOW``. A name there that is a symlink, or not a
regular file where a file is due (a FIFO, a device, a socket, a directory), or not a directory
where a directory is due, raises :class:`NotOurFile` and is left alone: nothing is read, cut,
written or removed through it. Checks are made on the open fd (``fstat``), so a name swapped
between a check and the open is refused as well; a name is ``lstat``-ed before it is opened, so
a FIFO or a device is never opened at all. Removals (``unlinkat``, ``rmdir``) and renames act
on the name itself, never on what a link names.

No threads, no state beyond the root fd: the writer, the janitor and the readers share a
:class:`Tree`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from gateway.config import ConfigError

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: O_NONBLOCK: a FIFO swapped in between the lstat and the open does not block the open.
_FILE_FLAGS: Final = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NEW_FILE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_MODE: Final = 0o640
DIR_MODE: Final = 0o750
#: What a refused open fails with: a link (ELOOP, ENOTDIR for O_DIRECTORY), a FIFO opened for
#: writing (ENXIO), a directory opened for writing (EISDIR).
_REFUSED_ERRNOS: Final = frozenset({errno.ELOOP, errno.ENOTDIR, errno.ENXIO, errno.EISDIR})


class NotOurFile(OSError):
    """A name in the recorder's directory that the recorder did not make (a symlink, or not
    the kind of file it expects): refused and left alone. The message names the entry (a
    feed, fixture or file name under the recorder's directory), never a path outside it."""


def kind(mode: int) -> str:
    """What a file of this ``st_mode`` is, for a refusal's message."""
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def refusal(name: str, mode: int, expected: str) -> NotOurFile:
    return NotOurFile(f"{name!r} is {kind(mode)}, not {expected} the recorder made: left alone")


def check_file(dfd: int, name: str) -> bool:
    """True when *name* in *dfd* is a regular file, False when it does not exist; raises
    :class:`NotOurFile` for anything else (the name itself: a link is not followed)."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        raise refusal(name, st.st_mode, "a file")
    return True


def _refused(dfd: int, name: str, exc: OSError, expected: str) -> OSError:
    """The error to raise for a failed open: a :class:`NotOurFile` when the name is not what
    was expected, else *exc* itself."""
    if exc.errno not in _REFUSED_ERRNOS:
        return exc
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except OSError:
        return exc
    want = stat.S_ISDIR if expected == "a directory" else stat.S_ISREG
    return exc if want(st.st_mode) else refusal(name, st.st_mode, expected)


def open_file(dfd: int, name: str, flags: int) -> int:
    """Open the regular file *name* in directory *dfd* (``O_RDONLY``, ``O_RDWR``, ``O_WRONLY |
    O_APPEND`` ...); a blocking fd. Raises :class:`NotOurFile` for a link or anything that is
    not a regular file (never opened when ``lstat`` tells), and for writing, for a file with
    another hard link (the recorder's files have one: a write would change the other name's
    file too); FileNotFoundError when missing."""
    if not check_file(dfd, name):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
    try:
        fd = os.open(name, flags | _FILE_FLAGS, dir_fd=dfd)
    except OSError as exc:
        raise _refused(dfd, name, exc, "a file") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refusal(name, st.st_mode, "a file")
        if flags & (os.O_WRONLY | os.O_RDWR) and st.st_nlink != 1:
            raise NotOurFile(
                f"{name!r} has {st.st_nlink} hard links, not a file the recorder made: left alone"
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_file(dfd: int, name: str, *, replace: bool = False, flags: int = 0) -> int:
    """Create *name* in *dfd* for writing: a new regular file, never over what is there
    (``O_EXCL`` never follows a link). *replace*: a leftover of that name (a temporary file of
    a write cut short) is unlinked first (the name, not what a link names). *flags*: more
    (``O_APPEND``)."""
    if replace:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dfd)
    return os.open(name, _NEW_FILE_FLAGS | flags, FILE_MODE, dir_fd=dfd)


def open_dir(dfd: int, name: str, *, create: bool = False) -> int:
    """The directory *name* in *dfd*, never through a link (made when *create*; the parent
    fsynced then). Raises :class:`NotOurFile` for a link or anything not a directory."""
    if create:
        try:
            os.mkdir(name, DIR_MODE, dir_fd=dfd)
        except FileExistsError:
            pass
        else:
            os.fsync(dfd)
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dfd)
    except OSError as exc:
        raise _refused(dfd, name, exc, "a directory") from None


def read_file(dfd: int, name: str) -> bytes:
    """The bytes of the regular file *name* in *dfd* (see :func:`open_file`)."""
    with os.fdopen(open_file(dfd, name, os.O_RDONLY), "rb") as f:
        return f.read()


def write_atomic(dfd: int, name: str, data: bytes) -> None:
    """Replace *name* in *dfd* with *data* so that a crash leaves the old file or the new one,
    whole: a new temporary file, fsync, rename over the name (a link there is replaced, never
    followed), fsync of the directory."""
    tmp = name + ".tmp"
    fd = create_file(dfd, tmp, replace=True)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(fd)
    os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    os.fsync(dfd)


class Tree:
    """The recorder's directory, opened once (made when missing). The configured path is the
    operator's; its last component must not be a link (a :class:`ConfigError` naming
    ``recorder.dir``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        try:
            self.fd = os.open(path, _DIR_FLAGS)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise ConfigError(
                    [
                        f"recorder.dir: {str(path)!r} is a symlink or not a directory: name the "
                        "directory itself (nothing under it is reached through a link)"
                    ]
                ) from None
            raise

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    @contextlib.contextmanager
    def directory(self, *names: str, create: bool = False) -> Iterator[int]:
        """The fd of the directory ``names`` below the root, opened a component at a time
        (see :func:`open_dir`); closed on leaving."""
        opened: list[int] = []
        fd = self.fd
        try:
            for name in names:
                fd = open_dir(fd, name, create=create)
                opened.append(fd)
            yield fd
        finally:
            for x in opened:
                os.close(x)
