"""Adapters on disk in PEFT's format, both ways.

A folder holds `adapter_config.json` (PEFT's field names) and `adapter_model.safetensors` with
keys `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (embeddings:
`.lora_embedding_A` / `.lora_embedding_B`; modules_to_save: `base_model.model.<path>.<param>`).
Adapters are untrusted files: only JSON and safetensors are read, never pickle. Loading checks
everything before it changes the model (all or nothing); saving writes a temporary folder and
renames it into place (atomic).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from . import dora, kinds
from .config import LoraConfig, matches
from .errors import AdapterFileError, LoraError
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
    """Write `adapter` as a PEFT adapter folder at `path`, atomically; returns the folder."""
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


def write_dir_atomic(dest: Path, writers: dict[str, Any]) -> None:
    """Write the files `writers` names ({file name: write(path)}) into folder `dest`, atomically.

    A new folder is built beside `dest` and renamed into place: readers see it whole or not at
    all. Into an existing folder each file is written to a temporary name and renamed over the old
    one, in the order given (weights before config), so a crash leaves every file either old or
    new, never half-written, and nothing else in the folder is touched.
    """
    dest = Path(dest)
    if not dest.exists():
        replace_dir(dest, lambda tmp: [_write_synced(tmp / name, write) for name, write in writers.items()])
        return
    if not dest.is_dir():
        raise LoraError(f"{dest}: exists and is not a folder")
    for name, write in writers.items():
        write_file_atomic(dest / name, write)


def write_file_atomic(path: Path, write: Any) -> None:
    """`write(tmp)` to a temporary file beside `path`, fsync, rename over `path`: the file is the
    old or the new one, never half-written. The temporary keeps `path`'s suffix (formats that
    go by it, e.g. matplotlib's, still see it)."""
    path = Path(path)
    tmp = path.parent / f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}"
    try:
        _write_synced(tmp, write)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_dir(dest: Path, build: Any) -> None:
    """Fill a new folder with `build(tmp)` beside `dest`, then swap it in for `dest` (whose old
    contents are dropped): readers never see a half-built folder. For folders the caller owns
    whole (an exported model); use write_dir_atomic to update files in a user's folder."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        build(tmp)
        old = None
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dest, old)
        os.rename(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_synced(path: Path, write: Any) -> None:
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# ---- load -------------------------------------------------------------------------------------
def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, Tensor]]:
    """Read and check an adapter folder's two files. Never unpickles anything."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterFileError(f"{folder}: no such adapter folder")
    cfg_file, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / PICKLE_NAME).is_file():
            raise AdapterFileError(
                f"{folder}: only {PICKLE_NAME} (a pickle file) is there, and lorakit never loads "
                "pickle: it can run arbitrary code. Convert it once, where you trust the file: "
                f"python -c \"import torch; from safetensors.torch import save_file; "
                f"save_file(torch.load('{PICKLE_NAME}', weights_only=True), '{WEIGHTS_NAME}')\""
            )
        raise AdapterFileError(f"{folder}: {WEIGHTS_NAME} is missing")
    if not cfg_file.is_file():
        raise AdapterFileError(f"{folder}: {CONFIG_NAME} is missing")
    try:
        data = json.loads(cfg_file.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{cfg_file}: not valid JSON ({e})") from None
    config = LoraConfig.from_peft(data, source=str(cfg_file))
    tensors: dict[str, Tensor] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
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
    if keys:
        sums = torch.stack([tensors[k].sum(dtype=torch.float32) for k in keys])
        suspects = (~torch.isfinite(sums)).nonzero().flatten().tolist()
        for key in (keys[i] for i in suspects):
            if not torch.isfinite(tensors[key]).all():
                raise AdapterFileError(f"{weights}: tensor {key!r} holds NaN or inf values")
    return config, tensors


@dataclass
class _Plan:
    """Everything load_adapter will do, worked out before it touches the model."""

    lora: dict[str, tuple[Tensor, Tensor]]  # module path -> (A as r x in, B as out x r)
    saved: dict[str, dict[str, Tensor]]  # modules_to_save path -> its state dict
    biases: dict[str, Tensor]  # parameter name in the wrapped model -> value
    base_weights: dict[str, Tensor]  # module path -> full base weight (PEFT's save_embedding_layers)
    magnitudes: dict[str, Tensor] = field(default_factory=dict)  # module path -> DoRA magnitude (out,)


_LORA_KEY = re.compile(r"^(?P<path>.+)\.(?P<which>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


def _plan(model: nn.Module, config: LoraConfig, tensors: dict[str, Tensor], source: str) -> _Plan:
    pairs: dict[str, dict[str, tuple[str, Tensor]]] = {}
    saved_paths = modules_to_save_paths(model, config)
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
    source = str(Path(path) / WEIGHTS_NAME)
    config, tensors = read_adapter(path)
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
        layer.add(adapter, A.shape[0], config.alpha_for(path), rslora=config.rslora, dropout=config.dropout,
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
