"""Hugging Face trainers that save and resume lorakit adapters in PEFT's files, not whole models.

transformers' `Trainer` trains a model with lorakit adapters as it is, but saves it with
`save_pretrained`: every weight under lorakit's own keys, which PEFT cannot read and from which
`resume_from_checkpoint` fails. `LoraTrainerMixin` replaces the three methods that write and read
the model (`_save`, `_load_from_checkpoint`, `_load_best_model`); the trainer's own loop,
optimizer, scheduler, RNG and `trainer_state.json` handling stay as they are.

    from lorakit.integrations import LoraTrainer          # = LoraTrainerMixin + transformers.Trainer
    from lorakit.integrations import LoraSFTTrainer       # = LoraTrainerMixin + trl.SFTTrainer
    MyTrainer = lora_trainer_class(MyTrainerSubclass)     # any Trainer subclass

The classes are built on first access, so importing lorakit (or this module) imports neither
transformers nor trl.

Folder layout (each checkpoint-N/ and `save_model`'s folder), PEFT's layout for several adapters:
the first active adapter at the top (`adapter_model.safetensors` + `adapter_config.json`, what
`PeftModel.from_pretrained(base, folder)` loads), every other adapter of the model in
`folder/<name>/`, then the tokenizer / processing class and `training_args.bin`. Resuming (and
`load_best_model_at_end`) copies the saved values into the adapters' existing parameters, so the
optimizer and a DDP wrapper keep valid references.

Tested here in one process on CPU (Trainer and TRL's SFTTrainer). Under DDP / FSDP the model is
unwrapped through the trainer's accelerator and a gathered state_dict is written when the trainer
passes one (FSDP FULL_STATE_DICT, DeepSpeed ZeRO-3; with FSDP SHARDED_STATE_DICT transformers
never calls `_save`); those paths follow transformers' hooks but are not run by the tests.
"""

from __future__ import annotations

import importlib
import os
import re
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .adapters import active_adapters, delete_adapter, get_config, list_adapters, set_adapter
from .errors import LoraError
from .inject import adapter_parameters
from .io import CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict, load_adapter, save_adapter
from .layer import state_of

TRAINING_ARGS_NAME = "training_args.bin"  # transformers' name, written beside the adapter as Trainer does
_CHECKPOINT = re.compile(r"checkpoint-\d+")  # the Trainer's own folders: never an adapter's name here
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


# ---- the folder layout --------------------------------------------------------------------------
def save_adapters(model: nn.Module, folder: str | os.PathLike, *, state_dict: dict[str, Tensor] | None = None
                  ) -> list[str]:
    """Write every adapter of `model` into `folder`: the first active one at the top, each other in
    `folder/<name>/`. Returns the names, top first.

    `state_dict`: the model's full state dict as a sharded trainer gathered it (FSDP's
    FULL_STATE_DICT, DeepSpeed ZeRO-3); the adapters are written from its tensors, since the
    model's own parameters hold only this process's shard.
    """
    names = list_adapters(model)
    active = active_adapters(model)
    if not names:
        raise LoraError("save_adapters: the model has no lorakit adapter; inject() or load_adapter() one first")
    if not active:
        raise LoraError("save_adapters: no adapter is active (set_adapter(model, None)?); "
                        "set_adapter(model, name) to choose the one saved at the top of the folder")
    order = [active[0]] + [n for n in names if n != active[0]]
    for n in order[1:]:
        if _CHECKPOINT.fullmatch(n):
            raise LoraError(f"save_adapters: adapter {n!r} would be saved in {n}/, the name of a Trainer "
                            "checkpoint folder; rename the adapter")
    with _gathered(model, state_dict):
        for i, n in enumerate(order):
            save_adapter(model, folder if i == 0 else os.path.join(folder, n), n)
    return order


def load_adapters(model: nn.Module, folder: str | os.PathLike) -> list[str]:
    """Read back what `save_adapters` wrote, into `model`; returns the names loaded, top first.

    The top adapter goes to the model's first active adapter ("default" when none is active), each
    subfolder holding an adapter to the adapter of its name. An adapter that already exists with
    the same layers, shapes and config gets the values copied into its existing parameters, so an
    optimizer, DDP or a user's `optimizers=(opt, sched)` that hold them stay valid; otherwise it is
    loaded anew (`load_adapter(..., replace=True)`). Which adapters are active and which train is
    as before; an adapter new to the model trains only if it is the top one, which a model without
    an active adapter then activates.
    """
    folder = os.fspath(folder)
    if not os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
        raise LoraError(f"{folder}: no {WEIGHTS_NAME} here; not a folder written by a LoRA trainer "
                        "(a plain Trainer checkpoint holds the whole model and cannot be resumed as an adapter)")
    before = active_adapters(model)
    top = before[0] if before else "default"
    subs = sorted(d for d in os.listdir(folder) if not _CHECKPOINT.fullmatch(d) and d != top
                  and os.path.isfile(os.path.join(folder, d, WEIGHTS_NAME))
                  and os.path.isfile(os.path.join(folder, d, CONFIG_NAME)))
    trains = {n: any(p.requires_grad for p in adapter_parameters(model, n)) for n in list_adapters(model)}
    trains.setdefault(top, True)
    for n, path in [(top, folder)] + [(d, os.path.join(folder, d)) for d in subs]:
        _load_one(model, path, n)
    set_adapter(model, before or [top])
    # set_adapter applied PEFT's rule; put back what trained before (frozen first: biases are shared)
    for want in (False, True):
        for n in list_adapters(model):
            if trains.get(n, False) == want:
                for p in adapter_parameters(model, n):
                    p.requires_grad_(want)
    state_of(model).trainable = None  # set by hand: the next set_adapter looks at every adapter again
    return [top] + subs


def _load_one(model: nn.Module, path: str, name: str) -> None:
    if name not in list_adapters(model):
        load_adapter(model, path, name, activate=False)
        return
    tmp = _spare_name(model)
    load_adapter(model, path, tmp, activate=False)
    try:
        same = _layout(model, tmp) == _layout(model, name)
        if same:
            with torch.no_grad():
                for dst, src in zip(adapter_parameters(model, name), adapter_parameters(model, tmp)):
                    if dst is not src:  # shared base biases were written by the load itself
                        _copy_into(dst, src)
    finally:
        delete_adapter(model, tmp)
    if not same:
        load_adapter(model, path, name, replace=True, activate=False)


def _layout(model: nn.Module, name: str) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """What must agree for a copy in place to mean the same as a load: keys, shapes and config."""
    shapes = {k: tuple(v.shape) for k, v in adapter_state_dict(model, name).items()}
    config = {k: v for k, v in get_config(model, name).to_peft().items() if k != "base_model_name_or_path"}
    return shapes, config


def _spare_name(model: nn.Module) -> str:
    taken, i = set(list_adapters(model)), 0
    while f"lorakit-loading-{i}" in taken:
        i += 1
    return f"lorakit-loading-{i}"


def _copy_into(dst: Tensor, src: Tensor) -> None:
    """dst <- src in place; a sharded (DTensor) parameter takes its own shard of the full value."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(dst, DTensor):
            src = distribute_tensor(src.to(dst.device), dst.device_mesh, dst.placements)
    dst.copy_(src.to(dst.dtype))


@contextmanager
def _gathered(model: nn.Module, state_dict: dict[str, Tensor] | None) -> Iterator[None]:
    """For the block, each adapter parameter reads its tensor from `state_dict` (its full value
    under the model's own parameter name), then the model's own parameters come back."""
    if state_dict is None:
        yield
        return
    full = {_plain_key(k): v for k, v in state_dict.items()}
    wanted = {id(p) for p in adapter_parameters(model)}
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for mname, mod in model.named_modules(remove_duplicate=False):
            for pname, p in list(mod._parameters.items()):
                if p is None or id(p) not in wanted:
                    continue
                key = f"{mname}.{pname}" if mname else pname
                if key not in full:
                    raise LoraError(f"save_adapters: the gathered state_dict has no {key!r} ({len(full)} keys); "
                                    "under DeepSpeed ZeRO-3 set stage3_gather_16bit_weights_on_model_save=true, "
                                    "under FSDP use state_dict_type FULL_STATE_DICT")
                swapped.append((mod, pname, p))
                mod._parameters[pname] = nn.Parameter(full[key], requires_grad=p.requires_grad)
        yield
    finally:
        for mod, pname, p in swapped:
            mod._parameters[pname] = p


def _plain_key(key: str) -> str:
    """A state-dict key without the wrappers' prefixes (DDP, torch.compile, FSDP1, checkpointing)."""
    for prefix in _WRAPPER_PREFIXES:
        key = key.replace(prefix, "") if prefix.startswith("_") else key.removeprefix(prefix)
    return key


# ---- the trainers -------------------------------------------------------------------------------
class LoraTrainerMixin:
    """Put before a transformers `Trainer` class in the bases: checkpoints and `save_model` write
    PEFT adapters (`save_adapters`), `resume_from_checkpoint` and `load_best_model_at_end` read
    them back in place (`load_adapters`). Only the main process writes; the model is unwrapped
    from DDP / FSDP / torch.compile first, and a gathered state_dict is what gets written when
    the trainer passes one. Optimizer, scheduler, RNG and trainer state stay the trainer's."""

    args: Any
    model: nn.Module
    accelerator: Any
    processing_class: Any
    data_collator: Any
    state: Any

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_adapters(self._lora_model(self.model), output_dir, state_dict=state_dict)
        tokenizer = self.processing_class
        if tokenizer is None:  # as Trainer._save: the collator's tokenizer when no processing class was given
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_adapters(self._lora_model(model if model is not None else self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _lora_model(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model, keep_torch_compile=False)


_LAZY = {"LoraTrainer": ("transformers", "Trainer"), "LoraSFTTrainer": ("trl", "SFTTrainer")}
_BUILT: dict[type, type] = {}


def lora_trainer_class(base: type) -> type:
    """`base` (transformers' Trainer or any subclass of it) with LoraTrainerMixin in front, built
    once per base: `LoraTrainer` is lora_trainer_class(transformers.Trainer)."""
    from transformers import Trainer

    if not (isinstance(base, type) and issubclass(base, Trainer)):
        raise LoraError(f"lora_trainer_class: {base!r} is not a transformers Trainer class")
    if issubclass(base, LoraTrainerMixin):
        return base
    if base not in _BUILT:
        name = f"Lora{base.__name__.removeprefix('Lora')}"
        _BUILT[base] = type(name, (LoraTrainerMixin, base), {
            "__module__": __name__,  # type() names it `name`: pickle finds it through __getattr__
            "__doc__": f"{base.__module__}.{base.__name__} that saves and resumes lorakit adapters in PEFT's "
                       "format (see lorakit.integrations)."})
    return _BUILT[base]


def __getattr__(name: str) -> type:
    """LoraTrainer / LoraSFTTrainer, built on first access so that transformers and trl are
    imported only by those who use them."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    package, attr = _LAZY[name]
    try:
        base = getattr(importlib.import_module(package), attr)
    except ImportError as e:
        raise ImportError(f"lorakit.integrations.{name} needs {package}: pip install {package} ({e})") from e
    cls = lora_trainer_class(base)
    globals()[name] = cls
    return cls


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
