"""Writing results so that a failure never leaves a half-written folder behind, and two runs never mix.

Everything goes to a temporary sibling folder first (``.OUT.partial-PID-*``) and is renamed into place only when
complete. On top of that:

- one writer per output: a run claims ``OUT`` with an exclusive lock on a sibling ``.OUT.lock`` before any work
  (``claim``), so a second run writing the same ``OUT`` is refused at once instead of silently replacing the first;
  whether ``OUT`` exists is checked again under that lock at the rename;
- SIGTERM while a folder is being written removes the partial folder; a partial folder left by a run that was
  killed outright (SIGKILL, power) is removed by the next run writing the same ``OUT``;
- permissions follow the umask, as every other tool's output does (``tempfile`` would make them private);
- the working folder, or a folder holding it, is never an output (replacing it would delete where you stand).
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CloverError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: Path, folder: bool) -> None:
    """Give ``path`` the mode a plain ``mkdir`` / ``open`` would have (``tempfile`` makes 0700 / 0600)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def follow_umask_tree(root: Path) -> None:
    """Every folder and file under ``root`` as the umask allows (writers such as safetensors make private temp
    files and rename them into place)."""
    follow_umask(root, folder=True)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            follow_umask(Path(folder) / name, folder=True)
        for name in files:
            follow_umask(Path(folder) / name, folder=False)


def check_output_dir(out: str | os.PathLike, overwrite: bool, take: bool = True) -> Path:
    """Fail before any work if ``out`` may not be written: the working folder (or one holding it), an existing
    folder without ``overwrite``, a file, or an output another run is writing right now. ``take``: claim it for
    this process (a caller with further checks claims it itself once they pass)."""
    path = Path(out)
    here = Path.cwd().resolve()
    target = path.expanduser().resolve()
    if target == here or target in here.parents:
        raise CloverError(f"output folder {out} is the working folder or holds it: writing there would replace the "
                          "folder you run in; choose a new folder, such as out/NAME")
    if path.exists() and not overwrite:
        raise CloverError(f"output directory {path} exists: pass --overwrite to replace it, or choose another --out")
    if path.exists() and not path.is_dir():
        raise CloverError(f"output path {path} is a file, not a directory: choose another --out")
    if take:
        claim(path)
    return path


# --- one writer per output ----------------------------------------------------------------------------------------

_claims: dict[Path, int] = {}
_claims_lock = threading.Lock()


def _lock_file(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def claim(path: Path) -> None:
    """Take ``path`` for this process (re-entrant; released by ``release`` or at exit). A folder whose parent does
    not exist yet cannot be written by anyone else yet: it is claimed when ``atomic_dir`` creates the parent."""
    key = path.expanduser().absolute()
    if os.environ.get("RANK", "0") != "0":  # a distributed run: rank 0 writes, the other ranks only read
        return
    with _claims_lock:
        if key in _claims or not key.parent.is_dir():
            return
        lock = _lock_file(key)
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise CloverError(f"another clover run is writing {path} right now: wait for it to finish, or choose "
                                  "another --out") from None
            try:  # the holder before us may have removed the lock file after we opened it: lock the current one
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        _claims[key] = fd


def release(path: Path) -> None:
    key = path.expanduser().absolute()
    with _claims_lock:
        fd = _claims.pop(key, None)
        if fd is None:
            return
        _lock_file(key).unlink(missing_ok=True)
        os.close(fd)


@atexit.register
def release_all() -> None:
    """Release every claim of this process (the CLI calls it when a command ends, however it ends)."""
    for key in list(_claims):
        release(key)


# --- atomic folders -------------------------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_partials(path: Path) -> list[Path]:
    """Partial folders of ``path`` left by runs that no longer exist (killed before they could clean up)."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:partial|old)-(\d+)-")
    removed = []
    if not path.parent.is_dir():
        return removed
    for sibling in path.parent.iterdir():
        match = pattern.match(sibling.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            shutil.rmtree(sibling, ignore_errors=True)
            removed.append(sibling)
    return removed


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM (``kill``, a job scheduler's stop) unwinds like Ctrl-C, so the partial folder is removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` only if the block finishes without error."""
    path = check_output_dir(out, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    claim(path)
    try:
        remove_stale_partials(path)
        with _sigterm_raises():
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-{os.getpid()}-", dir=path.parent))
            try:
                yield tmp
                follow_umask_tree(tmp)
                if path.exists() and not overwrite:  # created since the check (by something that took no claim)
                    raise CloverError(f"output directory {path} appeared while this run worked: pass --overwrite to "
                                      "replace it, or choose another --out")
                move_into_place(tmp, path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    finally:
        release(path)


def move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished folder ``tmp`` to ``path``, replacing an old ``path`` only once ``tmp`` is in place."""
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-", dir=path.parent))
        os.replace(path, old / path.name)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def write_json(path: str | os.PathLike, payload: object) -> None:
    """Atomic JSON write (temp file in the same folder, then rename), readable as the umask allows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        follow_umask(Path(tmp), folder=False)
        os.replace(tmp, path)
    except BaseException:  # a failed write (a folder in the way, a full disk) leaves no temp file beside it
        Path(tmp).unlink(missing_ok=True)
        raise
