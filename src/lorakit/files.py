"""Crash-consistent writes: a kill at any instant leaves the old state or the new one, never a mix.

    write_file_atomic(path, write)     one file: written beside, fsynced, renamed over
    write_dir_atomic(dest, writers)    some files of a folder, the others kept (hard links)
    replace_dir(dest, build, keep)     a whole folder the caller owns; `keep(dest)` true: an
                                       existing complete copy wins (caches, published sets)

A folder is always built complete beside its destination and switched in by one rename (a new
folder) or one atomic exchange (renameat2 RENAME_EXCHANGE; two renames with recovery where the
file system lacks it). Only this module renames folders into place.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import os
import platform
import re
import secrets
import shutil
import stat
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from .errors import LoraError

# --------------------------------------------------------------------
# Temporary names carry the writer's pid, so the next writer removes what a killed one left and
# never what a running one is still building: `.{name}.tmp-{pid}-{hex}` (a folder being built, or
# after a swap the old folder being deleted), `.{name}.old-{pid}-{hex}` (the old folder during the
# two-rename fallback), `.{stem}.tmp-{pid}-{hex}{suffix}` (write_file_atomic).
_LEFTOVER = re.compile(r"^\..*\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}(?:\.[^.]*)?$")
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
_SYS_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276}


def _short_name(name: str, limit: int = 200) -> str:
    """`name`, or a cut of it with a hash when long: a sibling's name must fit NAME_MAX (255)."""
    if len(name.encode()) <= limit:
        return name
    return name[: limit // 4] + "~" + hashlib.sha256(name.encode()).hexdigest()[:12]


def _sibling(dest: Path, kind: str) -> Path:
    return dest.parent / f".{_short_name(dest.name)}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie counts as running). Off POSIX: assume it does."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate it on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's process
        return True
    return True


def _leftovers(dest: Path) -> list[tuple[str, Path, bool]]:
    """(kind, path, writer alive) of temporary/old siblings of `dest` left by savers."""
    prefix = f".{_short_name(dest.name)}."
    out = []
    try:
        entries = [e for e in os.scandir(dest.parent) if e.name.startswith(prefix)]
    except OSError:
        return []
    for e in entries:
        m = _LEFTOVER.match(e.name)
        if m and e.name[len(prefix):].startswith(m["kind"] + "-") and e.is_dir(follow_symlinks=False):
            out.append((m["kind"], Path(e.path), _pid_alive(int(m["pid"]))))
    return out


def _recover(dest: Path) -> None:
    """If a killed two-rename swap left `dest` missing, put its old folder back."""
    if os.path.lexists(dest):
        return
    olds = [p for kind, p, alive in _leftovers(dest) if kind == "old" and not alive]
    for old in sorted(olds, key=lambda p: p.stat().st_mtime, reverse=True)[:1]:
        try:
            os.rename(old, dest)
        except OSError:  # another process recovered it first
            pass


def _wait_for_live_swap(dest: Path, seconds: float = 1.0) -> None:
    """A running saver on the two-rename fallback has `dest` away for an instant: wait for it."""
    deadline = time.monotonic() + seconds
    while (not os.path.lexists(dest) and time.monotonic() < deadline
           and any(kind == "old" and alive for kind, _, alive in _leftovers(dest))):
        time.sleep(0.01)


def _clean_leftovers(dest: Path) -> None:
    for _, path, alive in _leftovers(dest):
        if not alive:
            shutil.rmtree(path, ignore_errors=True)


@functools.lru_cache(maxsize=1)
def _renameat2() -> Any:
    """glibc's renameat2, or the raw syscall; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return fn
    nr = _SYS_RENAMEAT2.get(platform.machine().lower())
    if nr is None:
        return None
    syscall = libc.syscall
    return lambda *args: syscall(ctypes.c_long(nr), *args)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths `a` and `b` in one atomic step (renameat2 RENAME_EXCHANGE). False where the
    system or file system cannot; other failures raise OSError."""
    fn = _renameat2()
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), ctypes.c_uint(_RENAME_EXCHANGE))
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(tmp: Path, dest: Path) -> Path:
    """Put the folder `tmp` at `dest`, where a folder exists; returns where the old one now is.

    RENAME_EXCHANGE: one atomic step. Elsewhere two renames (dest -> .old, tmp -> dest); a kill
    between them leaves `dest` missing and the old folder whole beside it, and the next
    read_adapter or save puts it back (`_recover`)."""
    cwd = _cwd_inside(dest)
    if _exchange(tmp, dest):
        old = tmp
    else:
        old = _sibling(dest, "old")
        os.rename(dest, old)
        try:
            os.rename(tmp, dest)
        except BaseException:
            os.rename(old, dest)
            raise
    if cwd is not None:  # the process worked inside the old folder: follow the new one
        try:
            os.chdir(dest / cwd)
        except OSError:
            pass
    return old


def _cwd_inside(dest: Path) -> Path | None:
    try:
        return Path(os.getcwd()).relative_to(dest)
    except (OSError, ValueError):
        return None


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable: what an atomic write relies on."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _new_dir(dest: Path) -> Path:
    """An empty folder beside `dest` with a temporary name (mode from the umask, like mkdir)."""
    while True:
        tmp = _sibling(dest, "tmp")
        try:
            os.mkdir(tmp)
            return tmp
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue


def _link_tree(src: Path, dst: Path, skip: Any = None) -> None:
    """Recreate `src`'s entries in the empty `dst` without copying data: hard links for files
    (a copy where the file system refuses), symlinks as symlinks, folders recreated. Names for
    which `skip(name)` is true (top level) and leftovers of killed writers are left out."""
    for entry in os.scandir(src):
        if skip is not None and skip(entry.name):
            continue
        m = _LEFTOVER.match(entry.name)
        if m and not _pid_alive(int(m["pid"])):
            continue
        target = dst / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir(follow_symlinks=False):
            os.mkdir(target)
            _link_tree(Path(entry.path), target)
            os.chmod(target, stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode))
            fsync_dir(target)
        else:
            try:
                os.link(entry.path, target, follow_symlinks=False)
            except OSError:
                if entry.is_file(follow_symlinks=False):
                    shutil.copy2(entry.path, target)
                    _write_synced(target, lambda p: None)
                else:  # a fifo or socket on a file system without hard links: nothing to keep
                    warnings.warn(f"{entry.path}: not carried into the saved folder (special file)", stacklevel=4)


def write_dir_atomic(dest: Path, writers: dict[str, Any]) -> None:
    """Write the files `writers` names ({file name: write(path)}) into folder `dest`, crash-consistently.

    The complete new folder is built beside `dest`: the new files (fsynced), plus hard links to
    every other file of an existing `dest` (subfolders recreated), then switched in by one rename
    (a new folder) or one atomic exchange (an existing one; two renames where the system has no
    RENAME_EXCHANGE, with recovery). A kill at any instant leaves the old set of files or the new
    one, never a mix. Files others add to `dest` while the new folder is being built are lost.
    Where the folder cannot be switched (a mount point, a parent this process may not write),
    its files are replaced inside it instead (`_write_in_place`).
    Leftovers of killed writes are removed first.
    """
    dest = Path(os.path.realpath(dest))  # a symlinked folder: update its target, keep the link
    exists = _prepare(dest)
    if exists and (os.path.ismount(dest) or not os.access(dest.parent, os.W_OK | os.X_OK)):
        _write_in_place(dest, writers)  # a mount point, or a parent this process may not write into
        return
    try:
        _build_and_swap(dest, lambda tmp: [_write_synced(tmp / name, write) for name, write in writers.items()],
                        keep_others=set(writers))
    except OSError as e:
        if not exists or e.errno not in _CANNOT_SWITCH:
            raise
        _write_in_place(dest, writers)


_CANNOT_SWITCH = (errno.EACCES, errno.EPERM, errno.EBUSY, errno.EXDEV)


def _write_in_place(dest: Path, writers: dict[str, Any]) -> None:
    """When the folder itself cannot be switched, its files are: the new files are written and
    fsynced into a staging folder inside it (`.save.tmp-{pid}-{hex}`, which also catches the
    writers' own temporaries), and only then renamed over the old ones, in the order given. A
    kill between two renames leaves a newer file beside an older one, with the rest of the new set
    still staged: the caller makes that detectable and repairable (lorakit.io: the weights name
    the hash of their config, and a read completes the interrupted save)."""
    for e in _scandir_quiet(dest):  # what killed in-place saves staged: this save supersedes it
        m = _LEFTOVER.match(e.name)
        if m and e.name.startswith(".save.") and not _pid_alive(int(m["pid"])):
            shutil.rmtree(e.path, ignore_errors=True)
    stage = dest / f".save.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(stage)
    try:
        for name, write in writers.items():
            _write_synced(stage / name, write)
        fsync_dir(stage)
        for name in writers:
            os.replace(stage / name, dest / name)
        fsync_dir(dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def staged_versions(path: Path) -> list[Path]:
    """New versions of `path` staged by in-place saves that were killed before renaming them."""
    out = []
    for e in _scandir_quiet(path.parent):
        m = _LEFTOVER.match(e.name)
        if m and e.name.startswith(".save.") and not _pid_alive(int(m["pid"])) and (Path(e.path) / path.name).is_file():
            out.append(Path(e.path) / path.name)
    return out


def _build_and_swap(dest: Path, build: Any, keep_others: set[str] | None,
                    keep: Callable[[Path], bool] | None = None) -> None:
    """`build(tmp)` in a new folder beside `dest`; with `keep_others`, link in the other entries of
    the existing `dest`; then switch it in and drop the old folder (unless `keep(dest)` became
    true meanwhile: a concurrent writer's complete copy stays)."""
    tmp = _new_dir(dest)
    swapped = False
    try:
        build(tmp)
        if keep is not None and keep(dest):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        exists = os.path.lexists(dest)
        if exists and keep_others is not None:
            _link_tree(dest, tmp, lambda name: name in keep_others or _legacy_temp_of(name, keep_others))
            os.chmod(tmp, stat.S_IMODE(dest.stat().st_mode))
        fsync_dir(tmp)
        if exists:
            old = _swap_in(tmp, dest)
            swapped = True
            fsync_dir(dest.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, dest)  # a new folder: one rename
            except OSError:  # a concurrent writer created it first
                if keep is None or not keep(dest):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                return
            swapped = True
            fsync_dir(dest.parent)
    except BaseException:
        if not swapped:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


_LEGACY_TEMP = re.compile(r"^\.(?P<stem>.+)\.tmp-[0-9a-f]{8}(?P<suffix>\.[^.]*)?$")


def _legacy_temp_of(name: str, files: set[str]) -> bool:
    """Whether `name` is a temporary of one of `files` left by an earlier lorakit, which wrote
    `.{stem}.tmp-{8 hex}{suffix}` (no pid: no running writer of this version makes that name)."""
    m = _LEGACY_TEMP.match(name)
    return m is not None and f"{m['stem']}{m['suffix'] or ''}" in files


def write_file_atomic(path: Path, write: Any) -> None:
    """`write(tmp)` to a temporary file beside `path`, fsync, rename over `path`: the file is the
    old or the new one, never half-written. The temporary keeps `path`'s suffix (formats that
    go by it, e.g. matplotlib's, still see it). Temporaries of killed writers of `path` are removed."""
    path = Path(path)
    stem = _short_name(path.stem)
    for e in _scandir_quiet(path.parent):
        m = _LEFTOVER.match(e.name)
        if m and e.name.startswith(f".{stem}.tmp-") and not _pid_alive(int(m["pid"])) and e.is_file(follow_symlinks=False):
            Path(e.path).unlink(missing_ok=True)
    tmp = path.parent / f".{stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}"
    try:
        _write_synced(tmp, write)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _scandir_quiet(folder: Path) -> list[os.DirEntry]:
    try:
        return list(os.scandir(folder))
    except OSError:
        return []


def replace_dir(dest: Path, build: Callable[[Path], Any], keep: Callable[[Path], bool] | None = None) -> None:
    """Fill a new folder with `build(tmp)` beside `dest`, then switch it in for `dest` (whose old
    contents are dropped): readers never see a half-built folder, and a kill leaves the old
    folder or the new one. For folders the caller owns whole (an exported model, a cache entry, a
    published set); use write_dir_atomic to update files in a user's folder.

    keep(dest) true means a complete copy is there already: nothing is built, and a copy that a
    concurrent writer completes while this one builds wins (first complete writer wins)."""
    dest = Path(os.path.realpath(dest))
    if keep is not None and keep(dest):
        return
    _prepare(dest)
    _build_and_swap(dest, build, keep_others=None, keep=keep)


def _prepare(dest: Path) -> bool:
    """Before a folder write: its parent made, a killed write recovered and its leftovers removed;
    whether `dest` exists (a folder: anything else is refused)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    _recover(dest)
    _clean_leftovers(dest)
    exists = os.path.lexists(dest)
    if exists and not dest.is_dir():
        raise LoraError(f"{dest}: exists and is not a folder")
    return exists


def recover(dest: Path) -> None:
    """Before reading `dest`: if a killed two-rename switch left it missing, put the old folder
    back; if a live writer is between its two renames, wait for it (at most a second)."""
    dest = Path(os.path.abspath(dest))
    if not os.path.lexists(dest):
        _recover(dest)
        _wait_for_live_swap(dest)


def _write_synced(path: Path, write: Any) -> None:
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
