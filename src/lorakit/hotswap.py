"""Compiled models whose adapters change without recompiling.

A compiled model is specialised to what its forward reads: a Python adapter name (`set_adapter`),
a float scaling, a tensor's shape. Switching adapters or replacing one with another rank would
each compile the model again. `prepare_for_compile(model, max_rank)` gives every wrapped layer
fixed slot tensors (A padded with zeros to (max_rank, in), B to (out, max_rank), the scaling as a
0-d tensor) holding the active adapter, and the compiled forward reads only those. Then
`set_adapter`, `disable_adapters` and `hotswap_adapter` (new weights, any rank up to max_rank,
under an existing or a new name) are copies into the slots: zero recompiles. Zero rows of A and
columns of B add nothing, so the answers are the eager ones. PEFT's `hotswap_adapter` and
`prepare_model_for_compiled_hotswap` are the model (src/peft/utils/hotswap.py).

For inference: the slots are buffers, so nothing trains through them (compile a training run
without preparing: its graph holds the adapters' own parameters). One adapter active at a time;
plain LoRA adapters only (no DoRA, no modules_to_save heads, whose switch changes which module
runs); the layers an adapter may touch are those wrapped when the model was prepared.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .config import changes_base
from .errors import AdapterFileError, LoraError
from .io import WEIGHTS_NAME, plan_adapter, read_adapter_files
from .layer import lora_layers, require_state, saved_modules
from .variants import LORA, variant_for


def prepare_for_compile(model: nn.Module, max_rank: int) -> None:
    """Give every wrapped layer slot tensors for adapters up to rank `max_rank` and load the active
    adapter into them; call it before torch.compile(model)."""
    if not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank < 1:
        raise LoraError(f"prepare_for_compile: max_rank={max_rank!r} must be a positive integer")
    state = require_state(model)
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        if layer.merged:
            raise LoraError("prepare_for_compile: unmerge(model) first (merged adapters are in the weights)")
        for name in layer.lora_A:
            if layer.rank(name) > max_rank:
                raise LoraError(f"prepare_for_compile: adapter {name!r} has rank {layer.rank(name)} > max_rank={max_rank}")
            if layer.variants[name] is not LORA:
                raise LoraError(f"prepare_for_compile: adapter {name!r} is a {layer.variants[name].name} adapter; "
                                "hot swapping takes plain LoRA adapters")
    if saved_modules(model):
        raise LoraError("prepare_for_compile: adapters with modules_to_save (their own heads) switch which module "
                        "runs, which a compiled graph cannot do without recompiling")
    if len(state.active) > 1:
        raise LoraError(f"prepare_for_compile: one active adapter at a time, not {list(state.active)}")
    for layer in layers:
        layer.make_slots(max_rank)
    state.slot_layers = layers
    state.load_slots()


@torch.no_grad()
def hotswap_adapter(model: nn.Module, path: str | os.PathLike, adapter: str = "default") -> None:
    """Load the PEFT adapter at `path` as `adapter` (replacing one of that name, or a new one) into
    a model prepared with `prepare_for_compile`, in place: no module is added, no slot changes
    shape, so a compiled model does not recompile. Checked whole before anything changes."""
    state = require_state(model)
    if not state.slot_layers:
        raise LoraError("hotswap_adapter: call prepare_for_compile(model, max_rank) first")
    files = read_adapter_files(path, digest=False)
    config = files.config
    source = str(files.folder / WEIGHTS_NAME)
    if variant_for(config) is not LORA or changes_base(config.init):
        raise AdapterFileError(f"{source}: hot swapping takes plain LoRA adapters (no DoRA, no PiSSA/OLoRA)")
    plan = plan_adapter(model, config, files.tensors, source)
    wrapped = dict(lora_layers(model))
    max_rank = state.slot_layers[0].slot_A.shape[0]
    for p, (A, _) in plan.lora.items():
        if p not in wrapped:
            raise AdapterFileError(f"{source}: adapts {p}, which the prepared model does not wrap (new layers would "
                                   "change the compiled graph); prepare the model with an adapter covering it")
        if A.shape[0] > max_rank:
            raise AdapterFileError(f"{source}: rank {A.shape[0]} at {p} exceeds the prepared max_rank={max_rank}")
    if plan.saved or plan.biases or plan.base_weights:
        raise AdapterFileError(f"{source}: hot swapping takes LoRA weights only (no modules_to_save, biases or "
                               "base weights)")
    for path_, layer in wrapped.items():
        if adapter in layer.lora_A:
            layer.remove(adapter)
        if path_ in plan.lora:
            A, B = plan.lora[path_]
            layer.add(adapter, A.shape[0], plan.alphas[path_], rslora=config.rslora,
                      dropout=config.dropout, init=config.init, variant=LORA, path=path_, weights=(A, B))
            for p in layer.parameters_of(adapter):
                p.requires_grad_(False)
    state.configs[adapter] = config
    state.params.pop(adapter, None)
    if state.trainable is not None:
        state.trainable.discard(adapter)  # (its new parameters are frozen)
    state.load_slots()  # if it is the active adapter, its new values are what the model runs
