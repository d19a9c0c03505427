"""Adapters on disk in PEFT's format, both ways.

A folder holds `adapter_config.json` (PEFT's field names) and `adapter_model.safetensors` with
keys `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (embeddings:
`.lora_embedding_A` / `.lora_embedding_B`; modules_to_save: `base_model.model.<path>.<param>`).
Adapters are untrusted files: only JSON and safetensors are read, never pickle. Loading checks
everything before it changes the model (all or nothing); saving builds the new folder beside the
old one and switches it in with one rename or one atomic exchange (crash-consistent).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import stat
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file
from torch import Tensor, nn

from . import dora, kinds
from .config import LoraConfig, match_budget, matches
from .errors import AdapterFileError, LoraError, TargetError
from .init import changes_base
from .inject import (_save_module, _wrap, check_adapter_name,
                     modules_to_save_paths)
from .layer import LoraLayer, ModulesToSave, lora_layers, require_state, saved_modules, state_of, walk

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---- save -------------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, adapter: str = "default") -> dict[str, Tensor]:
    """The adapter's tensors under PEFT's keys (what `adapter_model.safetensors` holds)."""
    state = require_state(model)
    if adapter not in state.configs:
        raise LoraError(f"no adapter named {adapter!r}; adapters: {list(state.configs)}")
    config = state.configs[adapter]
    out: dict[str, Tensor] = {}
    for path, layer in lora_layers(model):
        if adapter not in layer.lora_A:
            continue
        r, base, (ka, kb) = layer.rank(adapter), layer.base_layer, layer.kind.keys
        out[f"{PREFIX}{path}.{ka}"] = layer.lora_A[adapter].detach().reshape(layer.kind.a_shape(base, r))
        out[f"{PREFIX}{path}.{kb}"] = layer.lora_B[adapter].detach().reshape(layer.kind.b_shape(base, r))
        if adapter in layer.lora_magnitude_vector:
            mag = layer.lora_magnitude_vector[adapter].detach()
            out[f"{PREFIX}{path}.{dora.KEY}"] = mag.reshape(dora.file_shape(layer.kind, base))
        if config.bias == "lora_only" and getattr(base, "bias", None) is not None:
            out[f"{PREFIX}{path}.base_layer.bias"] = base.bias.detach()
    for path, mod in saved_modules(model):
        if adapter in mod.modules_to_save:
            for k, v in mod.modules_to_save[adapter].state_dict().items():
                out[f"{PREFIX}{path}.{k}"] = v.detach()
    if config.bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias") and not re.search(r"\.(original_module|modules_to_save)\.", name):
                out[f"{PREFIX}{name}"] = p.detach()
    return {k: v.cpu().contiguous() for k, v in out.items()}


def _base_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None) or None


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter: str = "default", *,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write `adapter` as a PEFT adapter folder at `path`, crash-consistently; returns the folder.

    A kill at any instant leaves the previous adapter or the new one whole (see write_dir_atomic);
    other files and subfolders of an existing folder stay."""
    state = require_state(model)
    tensors = adapter_state_dict(model, adapter)
    config = state.configs[adapter]
    meta = config.to_peft()
    meta["base_model_name_or_path"] = base_model_name_or_path or config.base_model_name_or_path or _base_name(model)
    dest = Path(path)
    write_dir_atomic(dest, {
        WEIGHTS_NAME: lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
        CONFIG_NAME: lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True, default=list)),
    })
    return dest


# ---- crash-consistent writes --------------------------------------------------------------------
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


def _fsync_dir(path: Path) -> None:
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
            _fsync_dir(target)
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
    Leftovers of killed writes are removed first.
    """
    dest = Path(os.path.realpath(dest))  # a symlinked folder: update its target, keep the link
    dest.parent.mkdir(parents=True, exist_ok=True)
    _recover(dest)
    _clean_leftovers(dest)
    exists = os.path.lexists(dest)
    if exists and not dest.is_dir():
        raise LoraError(f"{dest}: exists and is not a folder")
    _build_and_swap(dest, exists, lambda tmp: [_write_synced(tmp / name, write) for name, write in writers.items()],
                    keep_others=set(writers))


def _build_and_swap(dest: Path, exists: bool, build: Any, keep_others: set[str] | None) -> None:
    """`build(tmp)` in a new folder beside `dest`; with `keep_others`, link in the other entries of
    the existing `dest`; then switch it in and drop the old folder."""
    tmp = _new_dir(dest)
    swapped = False
    try:
        build(tmp)
        if exists and keep_others is not None:
            _link_tree(dest, tmp, lambda name: name in keep_others or _legacy_temp_of(name, keep_others))
            os.chmod(tmp, stat.S_IMODE(dest.stat().st_mode))
        _fsync_dir(tmp)
        if exists:
            old = _swap_in(tmp, dest)
            swapped = True
            _fsync_dir(dest.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)  # a new folder: one rename
            swapped = True
            _fsync_dir(dest.parent)
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


def replace_dir(dest: Path, build: Any) -> None:
    """Fill a new folder with `build(tmp)` beside `dest`, then swap it in for `dest` (whose old
    contents are dropped): readers never see a half-built folder, and a kill leaves the old
    folder or the new one. For folders the caller owns whole (an exported model); use
    write_dir_atomic to update files in a user's folder."""
    dest = Path(os.path.realpath(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    _recover(dest)
    _clean_leftovers(dest)
    exists = os.path.lexists(dest)
    if exists and not dest.is_dir():
        raise LoraError(f"{dest}: exists and is not a folder")
    _build_and_swap(dest, exists, build, keep_others=None)


def _write_synced(path: Path, write: Any) -> None:
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# ---- load -------------------------------------------------------------------------------------
MAX_PATH_BYTES = 4096  # PATH_MAX on Linux; longer is refused before any system call
MAX_CONFIG_BYTES = 16 << 20  # adapter_config.json: PEFT's are a few KB


@dataclass(frozen=True, eq=False)
class AdapterFiles:
    """An adapter folder as read once: its parsed, checked contents and the digest of exactly the
    bytes they were parsed from, so a later read can tell whether the files changed."""

    folder: Path  # resolved
    config: LoraConfig
    tensors: dict[str, Tensor]
    digest: str  # sha256 hex over (len, config bytes, len, weights bytes), lengths as 8-byte big-endian


class _Moved(Exception):
    """The folder was swapped by a save while it was being opened: read it again."""


def _user_path(path: Any, what: str) -> str:
    """`path` as a str, refused (AdapterFileError) if it cannot name a file: not a path, a NUL
    byte, longer than PATH_MAX. Checked before any resolution (which is quadratic in the length)."""
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        raise AdapterFileError(f"{what}: expected a path, got {type(path).__name__}")
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    shown = text if len(text) <= 200 else f"{text[:200]}... ({len(text):,} characters)"
    if not text:
        raise AdapterFileError(f"{what}: empty path")
    if "\0" in text:
        raise AdapterFileError(f"{what} {shown!r}: a path with a NUL byte")
    size = len(os.fsencode(text))
    if size > MAX_PATH_BYTES:
        raise AdapterFileError(f"{what} {shown!r}: a path of {size:,} bytes (at most {MAX_PATH_BYTES:,})")
    return text


def _real_path(fd: int, path: Path) -> Path:
    """Where the open file `fd` really is (Linux: the kernel's answer, immune to a symlink
    swapped in after the check); elsewhere `path` resolved."""
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return path.resolve(strict=True)
    return Path(link.removesuffix(" (deleted)"))


def _inside(path: Path, root: Path | None) -> bool:
    return root is None or path == root or root in path.parents


def read_adapter_files(path: str | os.PathLike, *, root: str | os.PathLike | None = None,
                       max_bytes: int | None = None) -> AdapterFiles:
    """Read and check an adapter folder's two files, each file's bytes once. Never unpickles.

    `root`: the folder and both files must resolve (symlinks followed) inside it, else
    AdapterFileError. `max_bytes`: a larger weights file is refused before it is read. The files
    are opened through one handle on the folder, so a concurrent save (which swaps the folder)
    yields the old pair or the new one, never a mix.
    """
    text = _user_path(path, "adapter folder")
    root_path = None
    if root is not None:
        try:
            root_path = Path(_user_path(root, "adapters root")).resolve(strict=True)
        except OSError as e:
            raise AdapterFileError(f"adapters root {root!s}: cannot be opened ({e.strerror or e})") from None
    if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0):
        raise LoraError(f"max_bytes={max_bytes!r}: expected a positive number of bytes")
    shown = Path(text)
    if not os.path.lexists(text):
        absolute = Path(os.path.abspath(text))
        if _inside(Path(os.path.realpath(absolute.parent)), root_path):
            _recover(absolute)
            _wait_for_live_swap(absolute)
    for _ in range(5):
        try:
            return _read_once(shown, root_path, max_bytes)
        except _Moved:
            continue
    raise AdapterFileError(f"{shown}: kept changing while being read (a save in progress?); try again")


def _read_once(shown: Path, root: Path | None, max_bytes: int | None) -> AdapterFiles:
    try:
        folder = shown.resolve(strict=True)
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise AdapterFileError(f"{shown}: no such adapter folder") from None
    except (OSError, RuntimeError) as e:  # ELOOP, EACCES, ENAMETOOLONG (RuntimeError: a loop, Python 3.10)
        raise AdapterFileError(f"{shown}: cannot open the adapter folder ({getattr(e, 'strerror', None) or e})") from None
    fds: dict[str, int] = {}
    try:
        real = _real_path(dfd, folder)
        if not _inside(real, root):
            raise AdapterFileError(f"{shown}: resolves to {real}, outside the adapters root {root}")
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            fd = _open_in(dfd, shown / name)
            if fd is not None:
                fds[name] = fd
        if WEIGHTS_NAME not in fds or CONFIG_NAME not in fds:
            _check_not_moved(dfd, folder)
        if WEIGHTS_NAME not in fds:
            if _open_in(dfd, shown / PICKLE_NAME, probe=True) is not None:
                raise AdapterFileError(
                    f"{shown}: only {PICKLE_NAME} (a pickle file) is there, and lorakit never loads "
                    "pickle: it can run arbitrary code. Convert it once, where you trust the file: "
                    f"python -c \"import torch; from safetensors.torch import save_file; "
                    f"save_file(torch.load('{PICKLE_NAME}', weights_only=True), '{WEIGHTS_NAME}')\""
                )
            raise AdapterFileError(f"{shown}: {WEIGHTS_NAME} is missing")
        if CONFIG_NAME not in fds:
            raise AdapterFileError(f"{shown}: {CONFIG_NAME} is missing")
        data: dict[str, bytes] = {}
        for name, limit in ((CONFIG_NAME, MAX_CONFIG_BYTES), (WEIGHTS_NAME, max_bytes)):
            fd, file = fds[name], shown / name
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise AdapterFileError(f"{file}: not a regular file")
            where = _real_path(fd, folder / name)
            if not _inside(where, root):
                raise AdapterFileError(f"{file}: resolves to {where}, outside the adapters root {root}")
            if limit is not None and st.st_size > limit:
                raise AdapterFileError(f"{file}: {st.st_size:,} bytes, over the limit of {limit:,}")
            data[name] = _read_all(fd, file, limit)
    finally:
        for fd in fds.values():
            os.close(fd)
        os.close(dfd)
    config_bytes, weights_bytes = data[CONFIG_NAME], data[WEIGHTS_NAME]
    digest = hashlib.sha256()
    for part in (config_bytes, weights_bytes):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    config, tensors = _parse(shown, config_bytes, weights_bytes)
    return AdapterFiles(folder, config, tensors, digest.hexdigest())


def _open_in(dfd: int, file: Path, probe: bool = False) -> int | None:
    """Open `file.name` in the folder `dfd` (symlinks followed; O_NONBLOCK: a FIFO must not hang
    the reader), or None if it is not there."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(file.name, flags, dir_fd=dfd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if probe:
            return None
        raise AdapterFileError(f"{file}: cannot be opened ({e.strerror or e})") from None
    if probe:
        os.close(fd)
        return 0
    return fd


def _check_not_moved(dfd: int, folder: Path) -> None:
    """A file missing from the folder we hold may only mean a save swapped it away meanwhile."""
    try:
        now = os.stat(folder)
    except OSError:
        return
    held = os.fstat(dfd)
    if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
        raise _Moved


def _read_all(fd: int, file: Path, limit: int | None) -> bytes:
    """Every byte of `fd`; over `limit` (the file grew since fstat): refused."""
    os.set_blocking(fd, True)
    chunks, total = [], 0
    while True:
        try:
            chunk = os.read(fd, 1 << 24)
        except OSError as e:
            raise AdapterFileError(f"{file}: cannot be read ({e.strerror or e})") from None
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if limit is not None and total > limit:
            raise AdapterFileError(f"{file}: over the limit of {limit:,} bytes")
        chunks.append(chunk)


def _parse(shown: Path, config_bytes: bytes, weights_bytes: bytes) -> tuple[LoraConfig, dict[str, Tensor]]:
    """The checks read_adapter always made, on bytes already read."""
    cfg_file, weights = shown / CONFIG_NAME, shown / WEIGHTS_NAME
    try:
        data = json.loads(config_bytes)
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{cfg_file}: not valid JSON ({e})") from None
    except RecursionError:
        raise AdapterFileError(f"{cfg_file}: not valid JSON (nested too deeply)") from None
    config = LoraConfig.from_peft(data, source=str(cfg_file))
    try:
        tensors: dict[str, Tensor] = safetensors_load(weights_bytes)
    except Exception as e:  # safetensors raises its own error types for every kind of corruption
        raise AdapterFileError(f"{weights}: not a readable safetensors file ({e})") from None
    if not tensors:
        raise AdapterFileError(f"{weights}: holds no tensors")
    for key, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise AdapterFileError(f"{weights}: tensor {key!r} has dtype {t.dtype}; expected a float type")
    # cheap screen: a sum is non-finite if any value is (or, rarely, if it overflows: those
    # tensors get the exact check). 10x faster than isfinite() per tensor, which dominated loading.
    keys = list(tensors)
    sums = torch.stack([tensors[k].sum(dtype=torch.float32) for k in keys])
    suspects = (~torch.isfinite(sums)).nonzero().flatten().tolist()
    for key in (keys[i] for i in suspects):
        if not torch.isfinite(tensors[key]).all():
            raise AdapterFileError(f"{weights}: tensor {key!r} holds NaN or inf values")
    return config, tensors


def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, Tensor]]:
    """Read and check an adapter folder's two files. Never unpickles anything."""
    files = read_adapter_files(path)
    return files.config, files.tensors


@dataclass
class _Plan:
    """Everything load_adapter will do, worked out before it touches the model."""

    lora: dict[str, tuple[Tensor, Tensor]]  # module path -> (A as r x in, B as out x r)
    saved: dict[str, dict[str, Tensor]]  # modules_to_save path -> its state dict
    biases: dict[str, Tensor]  # parameter name in the wrapped model -> value
    base_weights: dict[str, Tensor]  # module path -> full base weight (PEFT's save_embedding_layers)
    magnitudes: dict[str, Tensor] = field(default_factory=dict)  # module path -> DoRA magnitude (out,)
    alphas: dict[str, float] = field(default_factory=dict)  # module path -> alpha (alpha_pattern applied)


_LORA_KEY = re.compile(r"^(?P<path>.+)\.(?P<which>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


def _plan(model: nn.Module, config: LoraConfig, tensors: dict[str, Tensor], source: str) -> _Plan:
    """Check `tensors` against `model` and `config`; every pattern match of the config shares one
    time budget (a hostile regex fails here, before the model changes)."""
    with match_budget(source=source):
        try:
            saved_paths = modules_to_save_paths(model, config)
        except TargetError as e:
            raise AdapterFileError(f"{source}: {e}") from None
        plan = _plan_checked(model, config, tensors, source, saved_paths)
        plan.alphas.update({path: config.alpha_for(path) for path in plan.lora})
    return plan


def _plan_checked(model: nn.Module, config: LoraConfig, tensors: dict[str, Tensor], source: str,
                  saved_paths: list[str]) -> _Plan:
    pairs: dict[str, dict[str, tuple[str, Tensor]]] = {}
    saved: dict[str, dict[str, Tensor]] = {p: {} for p in saved_paths}
    biases: dict[str, Tensor] = {}
    base_weights: dict[str, Tensor] = {}
    magnitudes: dict[str, Tensor] = {}
    modules = dict(walk(model))
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"{source}: key {key!r} does not start with {PREFIX!r} (not a PEFT LoRA file)")
        name = key[len(PREFIX):]
        m = _LORA_KEY.match(name)
        if m:
            which = "A" if m["which"] in ("lora_A.weight", "lora_embedding_A") else "B"
            pairs.setdefault(m["path"], {})[which] = (key, t)
            continue
        owner = next((p for p in saved_paths if name.startswith(p + ".")), None)
        if owner is not None:
            saved[owner][name[len(owner) + 1:]] = t
            continue
        if config.bias != "none" and name.endswith("bias"):
            biases[name] = t
            continue
        if name.endswith(".base_layer.weight"):
            base_weights[name[: -len(".base_layer.weight")]] = t
            continue
        if name.endswith("." + dora.KEY):
            if not config.use_dora:
                raise AdapterFileError(f"{source}: key {key!r} is a DoRA magnitude but the config has use_dora=false")
            magnitudes[name[: -len(dora.KEY) - 1]] = t
            continue
        raise AdapterFileError(f"{source}: unexpected key {key!r} for a LoRA adapter of {type(model).__name__}")

    lora: dict[str, tuple[Tensor, Tensor]] = {}
    for path, pair in pairs.items():
        for need in ("A", "B"):
            if need not in pair:
                have = pair["B" if need == "A" else "A"][0]
                raise AdapterFileError(f"{source}: has {have!r} but its lora_{need} partner is missing")
        (ka, A), (kb, B) = pair["A"], pair["B"]
        module = modules.get(path)
        if module is None:
            raise AdapterFileError(
                f"{source}: key {ka!r} names module {path!r}, which this {type(model).__name__} does not have "
                "(an adapter for another model?)"
            )
        base = module.base_layer if isinstance(module, LoraLayer) else module
        kind = kinds.kind_of(base)
        if kind is None:
            raise AdapterFileError(f"{source}: module {path!r} is a {type(base).__name__}, which lorakit cannot wrap")
        if not ka.endswith(kind.keys[0]) or not kb.endswith(kind.keys[1]):
            raise AdapterFileError(f"{source}: key {ka!r} does not fit a {kind.name} layer (expects {kind.keys})")
        r = A.shape[0] if A.dim() else 0
        want_a, want_b = kind.a_shape(base, r), kind.b_shape(base, r)
        if r == 0 or tuple(A.shape) != tuple(want_a):
            raise AdapterFileError(f"{source}: {ka!r} has shape {tuple(A.shape)}, but {path} needs {tuple(want_a)}")
        if tuple(B.shape) != tuple(want_b):
            raise AdapterFileError(f"{source}: {kb!r} has shape {tuple(B.shape)}, but {path} needs {tuple(want_b)}")
        if config.rank_for(path) != r:
            raise AdapterFileError(
                f"{source}: {ka!r} has rank {r} but the config says r={config.rank_for(path)} for {path}"
            )
        lora[path] = (A.reshape(r, -1), B.reshape(B.shape[0], r))
        if changes_base(config.init) and (kind.channel_dim != -1 or not kind.linear_like):
            raise AdapterFileError(f"{source}: init_lora_weights={config.init!r} on {path}, a {kind.name} layer")
        if config.use_dora:
            mag, km = magnitudes.get(path), f"{PREFIX}{path}.{dora.KEY}"
            if mag is None:
                raise AdapterFileError(f"{source}: use_dora is true but {km!r} is missing")
            if tuple(mag.shape) != dora.file_shape(kind, base):
                raise AdapterFileError(
                    f"{source}: {km!r} has shape {tuple(mag.shape)}, but {path} needs {dora.file_shape(kind, base)}")
            magnitudes[path] = mag.reshape(-1)
    for path in magnitudes.keys() - lora.keys():
        raise AdapterFileError(f"{source}: {PREFIX}{path}.{dora.KEY} has no lora_A/lora_B beside it")

    for path, sd in saved.items():
        mod = modules[path]
        original = mod.original_module if isinstance(mod, ModulesToSave) else mod
        want = original.state_dict()
        if not sd:
            raise AdapterFileError(f"{source}: config lists {path!r} in modules_to_save but the file has no weights for it")
        for k in want.keys() - sd.keys():
            raise AdapterFileError(f"{source}: missing key {PREFIX}{path}.{k} for modules_to_save {path!r}")
        for k in sd.keys() - want.keys():
            raise AdapterFileError(f"{source}: unexpected key {PREFIX}{path}.{k} for modules_to_save {path!r}")
        head = _head_keys(model, original)
        resizable = head if config.task_type in CLASSIFICATION_TASKS else set()
        for k, t in sd.items():
            w = tuple(want[k].shape)
            if tuple(t.shape) == w or (k in resizable and t.dim() == len(w) and t.shape[1:] == w[1:] and t.shape[0]):
                continue
            hint = (f" (a classification head with its own label count needs task_type in {CLASSIFICATION_TASKS} "
                    f"in {CONFIG_NAME})" if k in head and not resizable else "")
            raise AdapterFileError(
                f"{source}: {PREFIX}{path}.{k} has shape {tuple(t.shape)}, but the model's is {w}{hint}")
        rows = {k: sd[k].shape[0] for k in resizable & sd.keys()}
        if len(set(rows.values())) > 1:
            raise AdapterFileError(f"{source}: the head {path!r} disagrees on its label count: "
                                   + ", ".join(f"{PREFIX}{path}.{k} has {n} rows" for k, n in rows.items()))
    params = dict(model.named_parameters()) if biases else {}
    for name, t in biases.items():
        target = _bias_param(params, name)
        if target is None:
            raise AdapterFileError(f"{source}: bias key {PREFIX}{name} names no parameter of this model")
        if tuple(target.shape) != tuple(t.shape):
            raise AdapterFileError(f"{source}: {PREFIX}{name} has shape {tuple(t.shape)}, model's is {tuple(target.shape)}")
    for path, t in base_weights.items():
        module = modules.get(path)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if path not in lora or base is None or tuple(base.weight.shape) != tuple(t.shape):
            raise AdapterFileError(f"{source}: unexpected key {PREFIX}{path}.base_layer.weight of shape {tuple(t.shape)}")
    if not lora and not any(saved.values()):
        raise AdapterFileError(f"{source}: holds no LoRA weights")
    if config.targets is not None and lora:  # PEFT injects by the config: it must name these layers
        covered = [p for p in lora if matches(config, p) or (config.targets == "all-linear")]
        if not covered:
            raise AdapterFileError(
                f"{source}: config target_modules {config.targets!r} match none of the file's layers "
                f"(e.g. {next(iter(lora))!r})"
            )
        if len(covered) < len(lora):
            stray = sorted(set(lora) - set(covered))
            warnings.warn(f"{source}: layers {stray[:5]} have weights but are not in target_modules; "
                          "lorakit loads them, PEFT would not", stacklevel=3)
    return _Plan(lora, {p: sd for p, sd in saved.items() if sd}, biases, base_weights, magnitudes)


CLASSIFICATION_TASKS = ("SEQ_CLS", "TOKEN_CLS")


def _head_keys(model: nn.Module, module: nn.Module) -> set[str]:
    """The state-dict keys of `module`'s output layer if it computes the model's logits: its last
    Linear, with config.num_labels outputs. A classification adapter's copy may give that layer
    its own output count (its own labels); every other shape must match the model's."""
    last = next((n for n, m in reversed(list(module.named_modules())) if isinstance(m, nn.Linear)), None)
    if last is None:
        return set()
    linear = module.get_submodule(last)
    n_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if n_labels is not None and linear.out_features != n_labels:
        return set()
    prefix = f"{last}." if last else ""
    return {prefix + k for k in linear.state_dict()}


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter: str = "default", *,
                 trainable: bool = False, replace: bool = False, activate: bool | None = None) -> nn.Module:
    """Load a PEFT-format adapter folder as adapter `adapter`, wrapping the layers it needs.

    All or nothing: every key, shape and config field is checked before the model changes.
    `activate`: make it the active adapter (default: only if no adapter is active yet).
    `trainable`: let its parameters train (for resuming); the base is frozen either way.
    `replace`: swap out an existing adapter of the same name, after the new one passed all checks.
    """
    check_adapter_name(adapter)
    files = read_adapter_files(path)
    config, tensors = files.config, files.tensors
    source = str(Path(path) / WEIGHTS_NAME)
    state = state_of(model)
    if state is not None and adapter in state.configs and not replace:
        raise LoraError(f"adapter {adapter!r} is already loaded; pass replace=True or another name")
    plan = _plan(model, config, tensors, source)
    first = state is None or not state.configs
    if state is not None and adapter in state.configs:
        from .adapters import delete_adapter

        delete_adapter(model, adapter, unwrap=False)
    state = state_of(model, create=True)
    try:
        own = _apply(model, state, adapter, config, plan)
    except Exception as e:
        from .adapters import delete_adapter

        if adapter in state.configs:
            delete_adapter(model, adapter)
        raise LoraError(f"{source}: loading failed ({e}); the model was left unchanged") from e
    if activate or (activate is None and not state.active):
        state.active = (adapter,)
    if first:  # the base is frozen once, when its first adapter arrives (as inject() does)
        for p in model.parameters():
            p.requires_grad_(False)
    for p in own:
        p.requires_grad_(trainable)
    return model


@torch.no_grad()
def _apply(model: nn.Module, state, adapter: str, config: LoraConfig, plan: _Plan) -> list[nn.Parameter]:
    """Carry out the plan; returns the adapter's parameters (what trains for it)."""
    state.configs[adapter] = config
    fan_in_fan_out = False
    params: list[nn.Parameter] = []
    for path, (A, B) in plan.lora.items():
        layer = _wrap(model, path, state)
        fan_in_fan_out |= layer.kind.fan_in_fan_out
        alpha = plan.alphas[path] if path in plan.alphas else config.alpha_for(path)
        layer.add(adapter, A.shape[0], alpha, rslora=config.rslora, dropout=config.dropout,
                  init=config.init, use_dora=config.use_dora, path=path, weights=(A, B))
        if changes_base(config.init):  # PiSSA/OLoRA re-derived the residual base; A, B come from the file
            layer.lora_A[adapter].copy_(A)
            layer.lora_B[adapter].copy_(B)
        if path in plan.magnitudes:
            layer.lora_magnitude_vector[adapter].copy_(plan.magnitudes[path])
            params.append(layer.lora_magnitude_vector[adapter])
        params += [layer.lora_A[adapter], layer.lora_B[adapter]]
    for path, sd in plan.saved.items():
        mod = _save_module(model, path, state)
        mod.add(adapter, sd)
        params += list(mod.modules_to_save[adapter].parameters())
    for path, t in plan.base_weights.items():
        w = model.get_submodule(path).base_layer.weight
        if not torch.equal(w, t.to(w.dtype)):  # PEFT saves whole embeddings; its loader writes them
            warnings.warn(f"{path}: the adapter carries its own base weight (PEFT save_embedding_layers); "
                          "writing it into the base model", stacklevel=3)
            w.copy_(t.to(w.dtype))
    named = dict(model.named_parameters()) if plan.biases else {}
    for name, t in plan.biases.items():
        p = _bias_param(named, name)
        p.copy_(t.to(p.dtype))
        params.append(p)
    if fan_in_fan_out != config.fan_in_fan_out:
        state.configs[adapter] = config.replace(fan_in_fan_out=fan_in_fan_out)
    return params


def _bias_param(params: dict[str, nn.Parameter], name: str) -> nn.Parameter | None:
    """A bias by its PEFT key, whether or not its layer is wrapped (`.base_layer.`) here yet."""
    for cand in (name, name.replace(".base_layer.bias", ".bias"), re.sub(r"\.bias$", ".base_layer.bias", name)):
        if cand in params:
            return params[cand]
    return None
