"""One training run per folder: a lock file holding the owner's pid, and the liveness test of a pid.

``train.lock`` in the run folder is held with ``flock`` for the life of the run, so the kernel releases it
when the process dies however it dies; the file keeps the owner's pid and host for the messages. A second
run into the folder is refused naming the folder and the pid; the file of a run that was killed stays
behind and the next run takes it over, saying so.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_NAME = "train.lock"


class RunFolderLocked(BlockingIOError):
    """Another live process trains into the same run folder (its lock would block)."""


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running (a zombie, killed but not yet reaped, is not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


class RunLock:
    """The lock of a run folder (created if needed); :meth:`release` or process exit frees it."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> str | None:
        """Take the lock; returns a message when it took over the file of a dead run, else None. Raises
        :class:`RunFolderLocked` while another process holds it, ValueError when the folder cannot be
        created or written."""
        if self._fd is not None:
            return None
        _make_folder(self.folder)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise ValueError(f"cannot write to run folder {self.folder}: {err.strerror}") from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise RunFolderLocked(
                    f"run folder {self.folder} is in use by another training run ({owner}, lock file "
                    f"{self.path}); wait for it to finish, stop it, or choose another --out"
                ) from None
            # a run that released the lock between our open and flock removed the file we opened: retry
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_owner(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        if previous == "pid unknown":
            return None
        return (
            f"run folder {self.folder}: taking over the lock of a run that is no longer running ({previous})"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # before unlocking: a waiting run then sees the file is gone
        os.close(self._fd)
        self._fd = None


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"run folder {folder} cannot be created: {folder} is a file") from None
    except NotADirectoryError:
        blocker = next(p for p in folder.parents if p.exists())
        raise ValueError(f"run folder {folder} cannot be created: {blocker} is a file") from None
    except OSError as err:
        raise ValueError(f"run folder {folder} cannot be created: {err.strerror}") from err


def _read_owner(fd: int) -> str:
    text = os.pread(fd, 256, 0).decode(errors="replace").split()
    if not text or not text[0].isdigit():
        return "pid unknown"
    return f"pid {text[0]}" + (f" on {text[1]}" if len(text) > 1 else "")
