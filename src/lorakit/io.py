"""Adapters on disk in PEFT's format, both ways.

A folder holds `adapter_config.json` (PEFT's field names) and `adapter_model.safetensors` with
keys `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (embeddings:
`.lora_embedding_A` / `.lora_embedding_B`; modules_to_save: `base_model.model.<path>.<param>`).
Adapters are untrusted files: only JSON and safetensors are read, never pickle. Loading checks
everything before it changes the model (all or nothing); saving builds the new folder beside the
old one and switches it in with one rename or one atomic exchange (crash-consistent).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as save_bytes
from torch import Tensor, nn

from . import kinds
from .adapters import delete_adapter
from .config import LoraConfig, changes_base, matches
from .errors import AdapterChangedError, AdapterFileError, LoraError, TargetError
from .files import recover, staged_versions, write_dir_atomic
from .inject import check_adapter_name, check_overlap, modules_to_save_paths
from .layer import (LoraLayer, ModulesToSave, lora_layers, require_adapter, require_state, save_module, saved_modules,
                    state_of, walk, wrap)
from .params import ParamLayer, by_module, file_path, find_parameter_targets, module_wrappers, param_dims, wrap_params
from .patterns import match_budget
from .tokens import FILE_SUFFIX as TOKEN_SUFFIX
from .tokens import TokenLayer, find_token_targets, wrap_tokens
from .tokens import file_key as token_file_key
from .variants import extra_keys, variant_for

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---- save -------------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, adapter: str = "default") -> dict[str, Tensor]:
    """The adapter's tensors under PEFT's keys (what `adapter_model.safetensors` holds)."""
    state = require_state(model)
    require_adapter(state, adapter)
    config = state.configs[adapter]
    out: dict[str, Tensor] = {}
    for path, layer in lora_layers(model):
        if adapter not in layer.lora_A:
            continue
        r, base, (ka, kb) = layer.rank(adapter), layer.base_layer, layer.kind.keys
        out[f"{PREFIX}{path}.{ka}"] = layer.lora_A[adapter].detach().reshape(layer.kind.a_shape(base, r))
        out[f"{PREFIX}{path}.{kb}"] = layer.lora_B[adapter].detach().reshape(layer.kind.b_shape(base, r))
        for suffix, t in layer.variants[adapter].file_tensors(layer, adapter).items():
            out[f"{PREFIX}{path}.{suffix}"] = t
        if config.bias == "lora_only" and getattr(base, "bias", None) is not None:
            out[f"{PREFIX}{path}.base_layer.bias"] = base.bias.detach()
    for path, wrapper in module_wrappers(model):
        if isinstance(wrapper, TokenLayer):  # a tied head's rows are the embedding's: saved once, there
            if wrapper.tied is None and adapter in wrapper.trainable_tokens_delta:
                out[PREFIX + token_file_key(path)] = wrapper.trainable_tokens_delta[adapter].detach()
            continue
        order = wrapper.params_of(adapter)
        for pname in order:  # PEFT's nesting: one `.base_layer` per parameter wrapper around this one
            t, where = wrapper.targets[pname], f"{PREFIX}{file_path(path, order, pname)}"
            out[f"{where}.lora_A.weight"] = t.lora_A[adapter].detach()
            out[f"{where}.lora_B.weight"] = t.lora_B[adapter].detach()
    for path, mod in saved_modules(model):
        if adapter in mod.modules_to_save:
            for k, v in mod.modules_to_save[adapter].state_dict().items():
                out[f"{PREFIX}{path}.{k}"] = v.detach()
    if config.bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias") and not re.search(r"\.(original_module|modules_to_save)\.", name):
                out[f"{PREFIX}{name}"] = p.detach()
    return {k: v.cpu().contiguous() for k, v in out.items()}


def write_weights(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file, byte-for-byte the same for the same tensors and metadata."""
    Path(path).write_bytes(_deterministic(save_bytes(tensors, metadata=metadata)))


def _deterministic(data: bytes) -> bytes:
    """A safetensors file with its metadata keys in sorted order: safetensors writes them from a
    hash map, so two saves of one adapter would differ in bytes (and in digest) otherwise. The
    header keeps its length, so every tensor stays where it was."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    if not meta:
        return data
    text = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":")).encode()
    if len(text) > n:  # pragma: no cover - a header safetensors wrote otherwise than compact JSON
        return data
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n:]


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
    config_bytes = json.dumps(meta, indent=2, sort_keys=True, default=list).encode()
    # the weights name their config: a pair torn by a kill (in-place saves only) is detected and completed
    paired = {"format": "pt", PAIR_KEY: hashlib.sha256(config_bytes).hexdigest()}
    dest = Path(path)
    write_dir_atomic(dest, {
        WEIGHTS_NAME: lambda p: write_weights(tensors, p, paired),
        CONFIG_NAME: lambda p: p.write_bytes(config_bytes),
    })
    return dest


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
    digest: str  # sha256 hex over (len, config bytes, len, weights bytes), lengths as 8-byte big-endian;
    # "" when read with digest=False (a plain load: hashing was 44% of load_adapter's time)


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
                       max_bytes: int | None = None, expected_digest: str | None = None,
                       digest: bool = True) -> AdapterFiles:
    """Read and check an adapter folder's two files, each file's bytes once. Never unpickles.

    `root`: the folder and both files must resolve (symlinks followed) inside it, else
    AdapterFileError. `max_bytes`: a larger weights file is refused before it is read.
    `expected_digest`: bytes that hash otherwise are refused (AdapterChangedError) before they are
    parsed. The files are opened through one handle on the folder, so a concurrent save (which
    swaps the folder) yields the old pair or the new one, never a mix. `digest=False`: no hash is
    computed (AdapterFiles.digest is ""), for a caller that will not read the files again.
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
            recover(absolute)
    paired_ok = False
    for _ in range(5):
        try:
            return _read_once(shown, root_path, max_bytes, expected_digest, paired_ok, digest)
        except _Moved:
            continue
        except _Torn as torn:
            _complete_save(torn.folder, torn.config_sha)
            paired_ok = True  # completed; or no staged config: the config was edited since (read as it is)
    raise AdapterFileError(f"{shown}: kept changing while being read (a save in progress?); try again")


class _Torn(Exception):
    """The weights name another config than the one beside them: an in-place save killed between
    its two renames (completed from the config it staged), or a config edited by hand since the
    save (read as it is: no staged config matches)."""

    def __init__(self, folder: Path, config_sha: str):
        self.folder, self.config_sha = folder, config_sha


PAIR_KEY = "lorakit_config_sha256"  # in the weights file's metadata: the hash of the config saved with them


def _weights_metadata(weights: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header ({} if none or unreadable: the full
    parse reports a bad file)."""
    try:
        n = int.from_bytes(weights[:8], "little")
        if n > min(len(weights) - 8, 100 << 20):
            return {}
        meta = json.loads(weights[8:8 + n]).get("__metadata__") or {}
        return meta if isinstance(meta, dict) else {}
    except (ValueError, UnicodeDecodeError, AttributeError, RecursionError):
        return {}


def _complete_save(folder: Path, config_sha: str) -> bool:
    """Finish an in-place save killed between its renames: its new config, staged beside the old
    one, is renamed into place (found by the hash the new weights name). False if it is gone."""
    for staged in staged_versions(folder / CONFIG_NAME):
        try:
            if staged.stat().st_size <= MAX_CONFIG_BYTES and hashlib.sha256(staged.read_bytes()).hexdigest() == config_sha:
                os.replace(staged, folder / CONFIG_NAME)
                return True
        except OSError:
            continue
    return False


def _read_once(shown: Path, root: Path | None, max_bytes: int | None, expected: str | None = None,
               paired_ok: bool = False, want_digest: bool = True) -> AdapterFiles:
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
                    f"python -c \"import torch; from safetensors.torch import save as save_bytes; "
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
    paired = _weights_metadata(weights_bytes).get(PAIR_KEY)
    if not paired_ok and paired is not None and paired != hashlib.sha256(config_bytes).hexdigest():
        raise _Torn(folder, paired)
    hexdigest = ""
    if want_digest or expected is not None:
        digest = hashlib.sha256()
        for part in (config_bytes, weights_bytes):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
        hexdigest = digest.hexdigest()
    if expected is not None and hexdigest != expected:
        raise AdapterChangedError(
            f"{shown}: the adapter's files changed since they were checked and registered (sha256 {expected[:12]}... "
            f"now {hexdigest[:12]}...); they are not read until the adapter is registered again")
    config, tensors = _parse(shown, config_bytes, weights_bytes)
    return AdapterFiles(folder, config, tensors, hexdigest)


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
    files = read_adapter_files(path, digest=False)
    return files.config, files.tensors


@dataclass
class AdapterPlan:
    """Everything loading an adapter into a model will do, worked out (and checked) before the
    model changes: `plan_adapter`'s result, which load_adapter and the adapter bank carry out."""

    lora: dict[str, tuple[Tensor, Tensor]]  # module path -> (A as r x in, B as out x r)
    saved: dict[str, dict[str, Tensor]]  # modules_to_save path -> its state dict
    biases: dict[str, Tensor]  # parameter name in the wrapped model -> value
    base_weights: dict[str, Tensor]  # module path -> full base weight (PEFT's save_embedding_layers)
    extras: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # path -> the variant's tensors by suffix
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)  # module path -> file keys of A and B
    alphas: dict[str, float] = field(default_factory=dict)  # module path -> alpha (alpha_pattern applied)
    # LoRA on parameters (lorakit.params): (module path, parameter) -> (A (r*E, in), B (out, r*E)), in
    # each module's registration order
    params: dict[tuple[str, str], tuple[Tensor, Tensor]] = field(default_factory=dict)
    tokens: dict[str, tuple[list[int], Tensor]] = field(default_factory=dict)  # path -> (token ids, new rows)
    tied_tokens: dict[str, str] = field(default_factory=dict)  # tied head path -> the embedding path it follows


_LORA_KEY = re.compile(r"^(?P<path>.+)\.(?P<which>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


def plan_adapter(model: nn.Module, config: LoraConfig, tensors: dict[str, Tensor], source: str) -> AdapterPlan:
    """Check `tensors` (an adapter file's) against `model` and `config`: every key, shape and
    config field; AdapterFileError naming `source` otherwise. Every pattern match of the config
    shares one time budget (a hostile regex fails here, before the model changes)."""
    with match_budget(source=source):
        try:
            saved_paths = modules_to_save_paths(model, config)
            ptargets = by_module(find_parameter_targets(model, config))
            ttargets = find_token_targets(model, config)
        except TargetError as e:
            raise AdapterFileError(f"{source}: {e}") from None
        expected = {f"{file_path(path, order, pname)}": (path, pname)
                    for path, order in ptargets.items() for pname in order}
        plan = _plan_checked(model, config, tensors, source, saved_paths, expected, ttargets)
        plan.alphas.update({path: config.alpha_for(path) for path in plan.lora})
        try:
            check_overlap(list(plan.lora), list(ptargets), list(ttargets))
        except TargetError as e:
            raise AdapterFileError(f"{source}: {e}") from None
    return plan


def _plan_checked(model: nn.Module, config: LoraConfig, tensors: dict[str, Tensor], source: str,
                  saved_paths: list[str], expected: dict[str, tuple[str, str]] | None = None,
                  ttargets: dict[str, tuple[list[int], str | None]] | None = None) -> AdapterPlan:
    """`expected`: file path -> (module path, parameter) of the config's parameter targets;
    `ttargets`: its token-row targets (tokens.find_token_targets)."""
    expected, ttargets = expected or {}, ttargets or {}
    pairs: dict[str, dict[str, tuple[str, Tensor]]] = {}
    saved: dict[str, dict[str, Tensor]] = {p: {} for p in saved_paths}
    biases: dict[str, Tensor] = {}
    base_weights: dict[str, Tensor] = {}
    extras: dict[str, dict[str, Tensor]] = {}  # path -> {suffix: tensor} of a variant (DoRA's magnitude)
    rows: dict[str, tuple[str, Tensor]] = {}  # trainable token rows: module path -> (key, tensor)
    variant, known = variant_for(config), extra_keys()
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
        if name.endswith("." + TOKEN_SUFFIX):
            rows[name[: -len(TOKEN_SUFFIX) - 1]] = (key, t)
            continue
        owner = next((p for p in saved_paths if name.startswith(p + ".")), None)
        if owner is not None:
            saved[owner][name[len(owner) + 1:]] = t
            continue
        suffix = next((k for k in known if name.endswith("." + k)), None)
        if suffix is not None:
            if suffix not in variant.file_keys:
                raise AdapterFileError(f"{source}: key {key!r} belongs to a {known[suffix].name} adapter but the config "
                                       f"describes a {variant.name} one")
            extras.setdefault(name[: -len(suffix) - 1], {})[suffix] = t
            continue
        if config.bias != "none" and name.endswith("bias"):
            biases[name] = t
            continue
        if name.endswith(".base_layer.weight"):
            base_weights[name[: -len(".base_layer.weight")]] = t
            continue
        raise AdapterFileError(f"{source}: unexpected key {key!r} for a LoRA adapter of {type(model).__name__}")

    param_pairs = _plan_params(model, config, pairs, expected, source)
    tokens, tied_tokens = _plan_tokens(model, ttargets, rows, source)
    lora: dict[str, tuple[Tensor, Tensor]] = {}
    keys: dict[str, tuple[str, str]] = {}
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
        keys[path] = (ka, kb)
        if changes_base(config.init) and (kind.channel_dim != -1 or not kind.linear_like):
            raise AdapterFileError(f"{source}: init_lora_weights={config.init!r} on {path}, a {kind.name} layer")
        for suffix in variant.file_keys:
            t, key = extras.get(path, {}).get(suffix), f"{PREFIX}{path}.{suffix}"
            if t is None:
                raise AdapterFileError(f"{source}: a {variant.name} adapter needs {key!r}, which is missing")
            why = variant.check_file(kind, base, suffix, t)
            if why:
                raise AdapterFileError(f"{source}: {key!r} {why}")
    for path in extras.keys() - lora.keys():
        raise AdapterFileError(f"{source}: {PREFIX}{path}.{next(iter(extras[path]))} has no lora_A/lora_B beside it")

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
    if not lora and not any(saved.values()) and not param_pairs and not tokens:
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
    return AdapterPlan(lora, {p: sd for p, sd in saved.items() if sd}, biases, base_weights, extras, keys=keys,
                       params=param_pairs, tokens=tokens, tied_tokens=tied_tokens)


def _plan_params(model: nn.Module, config: LoraConfig, pairs: dict[str, dict[str, tuple[str, Tensor]]],
                 expected: dict[str, tuple[str, str]], source: str) -> dict[tuple[str, str], tuple[Tensor, Tensor]]:
    """Take the A/B pairs of the config's parameter targets out of `pairs` (their file paths carry
    PEFT's nesting, see lorakit.params) and check them: present, shaped (r*E, in) and (out, r*E)."""
    out: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
    for fpath, (path, pname) in expected.items():
        pair = pairs.pop(fpath, {})
        where = f"{PREFIX}{fpath}"
        for need in ("A", "B"):
            if need not in pair:
                raise AdapterFileError(
                    f"{source}: target_parameters names {path}.{pname}, whose {where}.lora_{need}.weight is missing "
                    "(PEFT saves the parameters of one module nested in their registration order: the first one "
                    "under the most '.base_layer' segments)")
        (ka, A), (kb, B) = pair["A"], pair["B"]
        module = model.get_submodule(path)
        E, n_in, n_out, _ = param_dims(module.base_layer if isinstance(module, ParamLayer) else module, pname)
        key = f"{path}.{pname}"
        r = config.rank_for(key)
        if tuple(A.shape) != (r * E, n_in):
            raise AdapterFileError(f"{source}: {ka!r} has shape {tuple(A.shape)}, but {key} (E={E} experts, rank {r}) "
                                   f"needs {(r * E, n_in)}")
        if tuple(B.shape) != (n_out, r * E):
            raise AdapterFileError(f"{source}: {kb!r} has shape {tuple(B.shape)}, but {key} (E={E} experts, rank {r}) "
                                   f"needs {(n_out, r * E)}")
        out[(path, pname)] = (A, B)
    return out


def _plan_tokens(model: nn.Module, targets: dict[str, tuple[list[int], str | None]],
                 rows: dict[str, tuple[str, Tensor]], source: str) -> tuple[dict, dict[str, str]]:
    """Check the file's token rows against the config's token targets (ids come from the config)."""
    tokens: dict[str, tuple[list[int], Tensor]] = {}
    tied: dict[str, str] = {}
    for path, (ids, tied_to) in targets.items():
        if tied_to is not None:
            tied[path] = tied_to
            continue
        key = f"{PREFIX}{token_file_key(path)}"
        if path not in rows:
            raise AdapterFileError(f"{source}: trainable_token_indices names {path!r}, but {key!r} is missing")
        _, t = rows.pop(path)
        module = model.get_submodule(path)
        w = (module.base_layer if isinstance(module, TokenLayer) else module).weight
        if tuple(t.shape) != (len(ids), w.shape[1]):
            raise AdapterFileError(f"{source}: {key!r} has shape {tuple(t.shape)}, but {len(ids)} token ids of "
                                   f"{path} need {(len(ids), w.shape[1])}")
        tokens[path] = (ids, t)
    for path, (key, _) in rows.items():
        raise AdapterFileError(f"{source}: {key!r} holds token rows for {path!r}, which the config's "
                               "trainable_token_indices does not name (or which follows a tied embedding)")
    return tokens, tied


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
    files = read_adapter_files(path, digest=False)
    config, tensors = files.config, files.tensors
    source = str(Path(path) / WEIGHTS_NAME)
    state = state_of(model)
    if state is not None and adapter in state.configs and not replace:
        raise LoraError(f"adapter {adapter!r} is already loaded; pass replace=True or another name")
    plan = plan_adapter(model, config, tensors, source)
    first = state is None or not state.configs
    replaced = state is not None and adapter in state.configs
    if replaced:  # every check passed: only a failure inside _apply itself (memory) can follow
        delete_adapter(model, adapter, unwrap=False)
    state = state_of(model, create=True)
    try:
        own = _apply(model, state, adapter, config, plan)
    except Exception as e:
        if adapter in state.configs:
            delete_adapter(model, adapter)
        left = (f"the adapter {adapter!r} it replaced was already removed; the rest of the model is unchanged"
                if replaced else "the model was left unchanged")
        raise LoraError(f"{source}: loading failed ({e}); {left}") from e
    if activate or (activate is None and not state.active):
        state.active = (adapter,)
    if first:  # the base is frozen once, when its first adapter arrives (as inject() does)
        for p in model.parameters():
            p.requires_grad_(False)
        state.trainable = set()
    for p in own:
        p.requires_grad_(trainable)
    state.params.pop(adapter, None)
    if state.trainable is not None:
        (state.trainable.add if trainable else state.trainable.discard)(adapter)
    return model


@torch.no_grad()
def _apply(model: nn.Module, state: Any, adapter: str, config: LoraConfig, plan: AdapterPlan) -> list[nn.Parameter]:
    """Carry out the plan; returns the adapter's parameters (what trains for it)."""
    state.configs[adapter] = config
    fan_in_fan_out = False
    params: list[nn.Parameter] = []
    variant = variant_for(config)
    for path, (A, B) in plan.lora.items():
        layer = wrap(model, path, state)
        fan_in_fan_out |= layer.kind.fan_in_fan_out
        alpha = plan.alphas[path]
        layer.add(adapter, A.shape[0], alpha, rslora=config.rslora, dropout=config.dropout,
                  init=config.init, variant=variant, path=path, weights=(A, B))
        if changes_base(config.init):  # PiSSA/OLoRA re-derived the residual base; A, B come from the file
            layer.lora_A[adapter].copy_(A)
            layer.lora_B[adapter].copy_(B)
        if path in plan.extras:
            variant.load(layer, adapter, plan.extras[path])
        frozen = layer.lora_B[adapter] if config.init == "mica" else None  # MiCA trains A only (as PEFT)
        if frozen is not None:
            frozen.requires_grad_(False)
        params += [p for p in layer.parameters_of(adapter) if p is not frozen]
    for (path, pname), (A, B) in plan.params.items():
        wrapper = wrap_params(model, path, state)
        key = f"{path}.{pname}"
        wrapper.add(adapter, pname, config.rank_for(key), config.alpha_for(key), rslora=config.rslora, weights=(A, B))
    for path, (ids, rows) in plan.tokens.items():
        wrap_tokens(model, path, state).add(adapter, ids, values=rows)
    for path, emb in plan.tied_tokens.items():
        wrap_tokens(model, path, state, emb)
    for _, wrapper in module_wrappers(model):
        params += wrapper.parameters_of(adapter)
    for path, sd in plan.saved.items():
        mod = save_module(model, path, state)
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
