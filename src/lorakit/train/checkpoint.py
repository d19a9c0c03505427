"""Kill-safe training checkpoints: safetensors for tensors, JSON for the rest, never pickle.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding
  state.safetensors  trainable parameters ("param/<name>"), optimizer tensors
                     ("optim/<param index>/<key>"), torch RNG states ("rng/...")
  state.json         step, optimizer scalars and param groups, scheduler, Python RNG, loss and
                     eval history, the options that shape the result, the data fingerprints
It is built in a temp folder and renamed into place, so a folder named step-* is always whole;
older ones are deleted only after the new one exists. A SIGKILL at any instant leaves at least
the previous complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import LoraError
from ..files import fsync_dir, write_dir_atomic

DIRNAME = "checkpoints"
_STEP = re.compile(r"^step-(\d+)$")


def file_fingerprint(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def optimizer_to_flat(opt: torch.optim.Optimizer | dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state_dict (or the state_dict itself: whole tensors gathered from
    FSDP shards) into tensors (for safetensors) and JSON-able values."""
    sd = opt if isinstance(opt, dict) else opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim/{idx}/{key}"] = val.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = val
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = val
    for idx, vals in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(vals)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def save(out: str | Path, step: int, params: dict[str, torch.Tensor], opt: torch.optim.Optimizer | dict[str, Any],
         scheduler: Any, extra: dict[str, Any]) -> Path:
    """Write the checkpoint for `step` (atomically) and drop older ones."""
    root = Path(out) / DIRNAME
    root.mkdir(parents=True, exist_ok=True)
    tensors = {f"param/{k}": v.detach().cpu().contiguous() for k, v in params.items()}
    opt_tensors, opt_meta = optimizer_to_flat(opt)
    rng_tensors, rng_meta = rng_state()
    tensors.update(opt_tensors)
    tensors.update(rng_tensors)
    meta = dict(extra, step=step, optimizer=opt_meta, scheduler=scheduler.state_dict(), rng=rng_meta)
    try:
        text = json.dumps(meta)
    except TypeError as e:  # pragma: no cover - a new optimizer/scheduler with odd state
        raise LoraError(f"checkpoint state is not JSON-serialisable ({e})") from None
    dest = root / f"step-{step:08d}"
    write_dir_atomic(dest, {"state.safetensors": lambda p: save_file(tensors, str(p)),
                                   "state.json": lambda p: p.write_text(text)})
    fsync_dir(root)
    for old in root.iterdir():
        m = _STEP.match(old.name)
        if (m and int(m.group(1)) < step) or old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
    return dest


def latest(out: str | Path) -> Path | None:
    """The newest complete checkpoint folder under `out`, if any."""
    root = Path(out) / DIRNAME
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name))
             and (p / "state.json").is_file() and (p / "state.safetensors").is_file()]
    return max(found)[1] if found else None


def load(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        meta = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "state.safetensors"))
    except Exception as e:
        raise LoraError(f"checkpoint {folder} is unreadable ({type(e).__name__}: {e}); delete it to start over") from None
    return tensors, meta


def clear(out: str | Path) -> None:
    shutil.rmtree(Path(out) / DIRNAME, ignore_errors=True)
