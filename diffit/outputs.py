"""Output files written atomically: under a temporary name, renamed into place when complete.

A reader never sees a half-written fits.tbl, failures file or difference image, and a run
that fails leaves the previous file as it was. The rename is done the way a user expects
of an ordinary ``open(path, "w")``:

* a symbolic link is followed: the file it points to is replaced, the link stays;
* a destination that exists and is not a regular file (``/dev/null``, a FIFO) is written
  in place, since renaming over it would replace the device or pipe with a plain file;
* the new file gets the permissions the old one had, or, for a new file, those that
  ``open`` would give it under the process's umask (``mkstemp`` alone makes it private).
"""
from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import threading
from typing import IO

_UMASK: int | None = None
_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask (read once). Linux reports it in /proc; elsewhere it can only be
    read by setting it for an instant, which could affect a file another thread creates
    at that moment."""
    global _UMASK
    with _UMASK_LOCK:
        if _UMASK is None:
            try:
                with open("/proc/self/status", encoding="ascii", errors="replace") as status:
                    _UMASK = next(int(line.split()[1], 8) for line in status
                                  if line.startswith("Umask:"))
            except (OSError, StopIteration, ValueError, IndexError):
                _UMASK = os.umask(0o022)
                os.umask(_UMASK)
        return _UMASK


def temporary_prefix(target: str) -> str:
    """Start of the names of the temporary files of ``target`` (hidden, in its folder). A
    long name is shortened, with a hash of the whole name so that two long names sharing
    their start do not share a prefix, to keep within the file system's name limit."""
    name = os.path.basename(target)
    if len(name) > 200:
        whole = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        name = f"{name[:180]}-{whole}"
    return f".{name}.diffit-"


def remove_stale_temporaries(path: str, keep: str | None = None) -> int:
    """Remove temporary files of ``path`` left by runs that were killed.

    Only safe while no other writer of ``path`` can be running (the runner holds the
    output's journal lock). Returns the number of files removed.
    """
    target = destination(path)
    directory = os.path.dirname(target) or "."
    prefix = temporary_prefix(target)
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    keep = os.path.abspath(keep) if keep is not None else None
    for name in names:
        candidate = os.path.abspath(os.path.join(directory, name))
        if name.startswith(prefix) and candidate != keep:
            try:
                os.remove(candidate)
                removed += 1
            except OSError:
                pass
    return removed


def destination(path: str) -> str:
    """Where writing ``path`` really goes: symbolic links followed (a dangling link gives
    the file it names).

    Raises
    ------
    OSError
        A loop of symbolic links (ELOOP), as ``open`` would.
    """
    if not os.path.islink(path):
        return path
    try:
        return os.path.realpath(path, strict=True)
    except FileNotFoundError:  # a dangling link: writing creates its target
        return os.path.realpath(path)


class AtomicOutput:
    """A file written under a temporary name beside its destination.

    Parameters
    ----------
    path : str
        The destination.
    binary : bool, optional
        Open the temporary file in binary mode (default: text).
    encoding : str, optional
        Text encoding (``errors="surrogateescape"``, so names read from undecodable
        bytes are written back as those bytes).

    Raises
    ------
    OSError
        The temporary file cannot be created (folder missing, not writable, ...).
    """

    def __init__(self, path: str, *, binary: bool = False, encoding: str = "utf-8") -> None:
        self.path = path
        self.target = destination(path)
        try:
            info = os.stat(self.target)
        except OSError:
            info = None
        if info is not None and stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(21, "Is a directory", path)
        self.in_place = info is not None and not stat.S_ISREG(info.st_mode)
        mode = "wb" if binary else "w"
        kwargs = {} if binary else {"encoding": encoding, "errors": "surrogateescape"}
        if self.in_place:
            self.temporary = None
            self.stream: IO = open(self.target, mode, **kwargs)
            return
        directory = os.path.dirname(self.target) or "."
        try:
            handle, self.temporary = tempfile.mkstemp(prefix=temporary_prefix(self.target),
                                                      dir=directory)
        except PermissionError as error:
            raise PermissionError(error.errno, f"Permission denied: folder {directory} does not let"
                                  " a new file be made (outputs are written whole, then renamed)",
                                  path) from None
        try:
            permissions = stat.S_IMODE(info.st_mode) if info is not None else 0o666 & ~_umask()
            os.fchmod(handle, permissions)
            self.stream = os.fdopen(handle, mode, **kwargs)
        except BaseException:
            os.close(handle)
            os.remove(self.temporary)
            raise

    @property
    def name(self) -> str:
        """The file being written (the temporary one, or the destination in place)."""
        return self.temporary or self.target

    def commit(self) -> None:
        """Flush, sync and rename the file into place.

        Raises
        ------
        OSError
            The file could not be completed (the temporary file is then removed).
        """
        try:
            if not self.stream.closed:
                self.stream.flush()
                if self.temporary is not None:
                    os.fsync(self.stream.fileno())
                self.stream.close()
            elif self.temporary is not None:  # written by name (write_atomically)
                handle = os.open(self.temporary, os.O_RDONLY)
                try:
                    os.fsync(handle)
                finally:
                    os.close(handle)
            if self.temporary is not None:
                os.replace(self.temporary, self.target)
                self.temporary = None
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Abandon the file: the destination keeps its previous content."""
        try:
            if not self.stream.closed:
                self.stream.close()
        except OSError:  # closing flushes the buffer, which may fail again (full disk)
            pass
        if self.temporary is not None:
            try:
                os.remove(self.temporary)
            except FileNotFoundError:
                pass
        self.temporary = None


def write_atomically(path: str, write, *, binary: bool = False) -> None:
    """Create ``path`` by calling ``write(name)`` on a temporary file, then rename it.

    For writers that take a file name (astropy's ``writeto``). The temporary file is
    closed before ``write`` is called; ``write`` must overwrite it. A destination that
    exists and is not a regular file is refused (OSError "not a regular file").

    Raises
    ------
    OSError
    """
    output = AtomicOutput(path, binary=binary)
    output.stream.close()
    if output.in_place:
        raise OSError(0, "not a regular file", path)
    try:
        write(output.name)
        output.commit()
    except BaseException:
        output.discard()
        raise


__all__ = ["AtomicOutput", "write_atomically", "destination", "remove_stale_temporaries"]
