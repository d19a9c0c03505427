"""Find target modules, wrap them with LoRA, freeze the base; which parameters train."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import kinds
from .config import ALL_LINEAR, LOAD_ONLY_INITS, LoraConfig, matches
from .errors import LoraError, TargetError
from .layer import (LoraLayer, ModulesToSave, lora_layers, require_adapter, require_state, save_module,
                    saved_modules, state_of, walk, wrap)
from .params import ModuleWrapper, find_parameter_targets, module_wrappers, outer_modules, wrap_params
from .patterns import dotted_suffixes, match_budget, name_set
from .tokens import find_token_targets, wrap_tokens
from .variants import variant_for

# transformers model_type -> default targets when LoraConfig.targets is None (as PEFT's table).
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{t: ["q_proj", "v_proj"] for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
        "opt", "gptj", "phi", "olmo", "olmo2", "smollm3", "granite", "stablelm", "cohere")},
    "gpt2": ["c_attn"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt_neox": ["query_key_value"], "falcon": ["query_key_value"], "bloom": ["query_key_value"],
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"],
}

MAX_ADAPTER_NAME = 64
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*", re.ASCII)


def check_adapter_name(name: str) -> str:
    """Names become dict keys, attribute names, URL parts and log lines: keep them short and plain
    (a full match, so a trailing newline is refused too)."""
    if not isinstance(name, str):
        raise LoraError(f"adapter name {name!r}: must be a string")
    if not name or len(name) > MAX_ADAPTER_NAME or not _ADAPTER_NAME.fullmatch(name):
        shown = repr(name) if len(name) <= 80 else f"{name[:80]!r}... ({len(name):,} characters)"
        raise LoraError(f"adapter name {shown}: use 1 to {MAX_ADAPTER_NAME} ASCII letters, digits, '_' and '-', "
                        "starting with a letter or digit")
    if hasattr(nn.ParameterDict(), name) or hasattr(nn.ModuleDict(), name):
        raise LoraError(f"adapter name {name!r} is reserved (an attribute of torch's containers); pick another")
    return name


def resolve_targets(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """Fill in per-architecture default targets when config.targets is None."""
    if config.targets is not None:
        return config
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return config.replace(targets=list(DEFAULT_TARGETS[model_type]))
    raise TargetError(
        f"LoraConfig.targets is None and there is no default for model type {model_type!r}: "
        "pass targets=[...] (module names), a regex, or 'all-linear'"
    )


def _candidates(model: nn.Module):
    """(path, base module) for every module a LoRA layer could sit on, skipping wrapper internals
    (a parameter or token-row wrapper stands as itself: it cannot take LoRA layers as well)."""
    for path, module in outer_modules(model):
        if isinstance(module, LoraLayer):
            yield path, module.base_layer
        elif not isinstance(module, ModulesToSave):
            yield path, module


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except Exception:  # some models raise instead of returning None
        return None


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Dotted paths of the modules `config` targets in `model` (pure: changes nothing).
    All its pattern matching shares one time budget (config.match_budget)."""
    with match_budget():
        return _find_targets(model, config)


def _find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    config = resolve_targets(model, config)
    found = []
    if config.targets == ALL_LINEAR:
        head = _output_head(model)
        lin = config.replace(targets=r".*")
        for path, module in _candidates(model):
            kind = kinds.kind_of(module)
            if kind and kind.linear_like and module is not head and matches(lin, path):
                found.append(path)
        return found
    for path, module in _candidates(model):
        if not matches(config, path):
            continue
        if isinstance(module, ModuleWrapper):
            if isinstance(config.targets, str):
                continue
            raise TargetError(f"module {path!r} is adapted through its parameters or token rows "
                              f"({type(module).__name__}); it cannot take LoRA layers as a module as well")
        kind = kinds.kind_of(module)
        if kind is None:
            if isinstance(config.targets, str) or list(module.children()):
                continue  # a regex or suffix that also hits containers: only wrap leaves we know
            raise TargetError(
                f"module {path!r} of type {type(module).__name__} matches targets but lorakit "
                f"cannot wrap it; supported types: {kinds.supported_names()}"
            )
        reason = kind.check(module) if kind.check else None
        if reason:
            raise TargetError(f"module {path!r}: {reason}")
        found.append(path)
    return found


def _no_match_error(model: nn.Module, config: LoraConfig) -> TargetError:
    names = [p for p, m in _candidates(model) if kinds.kind_of(m) is not None]
    tails = list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in names))
    return TargetError(
        f"targets {config.targets!r} match no module of {type(model).__name__}; "
        f"wrappable modules include {tails[:12]} (e.g. {names[:3]})"
    )


# PEFT adds these to modules_to_save itself for these task types, so its configs list them whether
# or not the model has them (a BERT classifier has no `score`): they may match nothing.
PEFT_AUTO_SAVED: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",),
}


def modules_to_save_paths(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules `config.modules_to_save` names (exact path or dotted suffix; the
    outermost when nested). Every entry must name at least one module (TargetError otherwise):
    a misspelt head would silently stay untrained and unsaved."""
    if not config.modules_to_save:
        return []
    out: list[str] = []
    used: set[str] = set()
    wanted = name_set(tuple(config.modules_to_save))
    for path, _ in walk(model):
        hits = [m for m in dotted_suffixes(path) if m in wanted]
        if hits:
            used.update(hits)
            if not any(path.startswith(o + ".") for o in out):
                out.append(path)
    exempt = PEFT_AUTO_SAVED.get(config.task_type or "", ())
    for m in config.modules_to_save:
        if m not in used and m not in exempt:
            raise TargetError(f"modules_to_save entry {m!r} matches no module of {type(model).__name__}")
    return out


def inject(model: nn.Module, config: LoraConfig, adapter: str = "default") -> nn.Module:
    """Add adapter `adapter` to the layers `config` targets, activate it and make it (alone) trainable.

    Base parameters are frozen; modules_to_save get a trainable copy per adapter (the original
    stays). The model is changed in place and returned.
    """
    if not isinstance(config, LoraConfig):
        raise LoraError(f"inject() needs a LoraConfig, got {type(config).__name__}")
    check_adapter_name(adapter)
    state = state_of(model, create=True)
    if adapter in state.configs:
        raise LoraError(f"adapter {adapter!r} already exists; delete_adapter() it or pick another name")
    config = resolve_targets(model, config)
    if config.init in LOAD_ONLY_INITS:
        raise LoraError(
            f"LoraConfig.init={config.init!r}: lorakit loads adapters PEFT initialised this way (they are ordinary "
            "LoRA once made) but does not compute the initialisation itself ("
            + ("EVA needs activations from your data: PEFT's initialize_lora_eva_weights" if config.init == "eva" else
               "MiCA freezes an SVD-derived B: PEFT's init_lora_weights='mica'")
            + "); make the adapter with PEFT and load_adapter() it, or pick init True, 'gaussian' or 'orthogonal'")
    with match_budget():  # every pattern of the config, over every path: one time budget
        paths = find_targets(model, config)
        params = find_parameter_targets(model, config)
        tokens = find_token_targets(model, config)
        if not paths and not params and not tokens:
            raise _no_match_error(model, config)
        if config.targets and not paths and (params or tokens):
            raise _no_match_error(model, config)
        check_overlap(paths, [p for p, _ in params], list(tokens))
        save_paths = modules_to_save_paths(model, config)
        if config.modules_to_save and not save_paths:
            raise TargetError(f"modules_to_save {config.modules_to_save!r} match no module")
        ranks = {path: (config.rank_for(path), config.alpha_for(path)) for path in paths}
        param_ranks = {(p, n): (config.rank_for(f"{p}.{n}"), config.alpha_for(f"{p}.{n}")) for p, n in params}
    if config.init == "orthogonal":
        odd = sorted({r for r, _ in [*ranks.values(), *param_ranks.values()] if r % 2})
        if odd:
            raise LoraError(f"LoraConfig.init='orthogonal' needs even ranks (as in PEFT); got r={odd[0]}")
        if params:
            raise LoraError("LoraConfig.init='orthogonal' is not supported with target_parameters "
                            "(PEFT's ParamWrapper initialises A and B like a linear layer: True, 'gaussian' or False)")
    if config.lora_bias and any(kinds.kind_of(_base(model.get_submodule(p))).meets == "lookup" for p in paths):
        raise LoraError("lora_bias=True on an embedding layer: PEFT supports a bias on B for linear and convolution "
                        "layers only; leave embeddings out of targets")
    if params and any(kinds.kind_of(_base(model.get_submodule(p))).fan_in_fan_out for p in paths):
        raise LoraError("target_parameters cannot be combined with targets on transposed (fan_in_fan_out) layers such "
                        "as GPT-2's Conv1D: PEFT refuses fan_in_fan_out with parameter targets")
    fan_in_fan_out = False
    for path in paths:
        layer = wrap(model, path, state)
        fan_in_fan_out |= layer.kind.fan_in_fan_out
        r, alpha = ranks[path]
        weights = _orthogonal(layer.in_features, layer.out_features, r) if config.init == "orthogonal" else None
        layer.add(adapter, r, alpha, rslora=config.rslora, dropout=config.dropout, init=config.init,
                  variant=variant_for(config), path=path, weights=weights)
    for (path, pname), (r, alpha) in param_ranks.items():
        wrap_params(model, path, state).add(adapter, pname, r, alpha, rslora=config.rslora, init=config.init)
    for path, (ids, tied_to) in tokens.items():
        layer = wrap_tokens(model, path, state, tied_to)
        if tied_to is None:
            layer.add(adapter, ids)
    for path in save_paths:
        save_module(model, path, state).add(adapter)
    if config.targets == ALL_LINEAR:  # record what was matched, so PEFT finds the same layers
        config = config.replace(targets=paths)
    state.configs[adapter] = config.replace(fan_in_fan_out=fan_in_fan_out)
    state.active = (adapter,)
    mark_trainable(model, adapter)
    return model


def check_overlap(modules: list[str], params: list[str], tokens: list[str]) -> None:
    """A module is adapted one way: as a LoRA layer, through its parameters, or by token rows."""
    pairs = ((modules, params, "targets and target_parameters"),
             (modules, tokens, "targets and trainable_token_indices"),
             (params, tokens, "target_parameters and trainable_token_indices"))
    for a, b, what in pairs:
        both = sorted(set(a) & set(b))
        if both:
            raise TargetError(f"{both[0]!r} is named by both {what}; a module is adapted one way (as in PEFT)")


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


@torch.no_grad()
def _orthogonal(in_features: int, out_features: int, r: int) -> tuple[Tensor, Tensor]:
    """PEFT's "orthogonal" init (datta0.github.io/posts/rethink-lora-init): A and B from the two
    halves of a random orthogonal r x r matrix, so B @ A = 0 exactly (their row spaces are
    orthogonal) while neither factor is zero. A: (r, in), B: (out, r), float32."""
    Q, _ = torch.linalg.qr(torch.randn(r, r))
    A = torch.randn(in_features, r // 2).mm(Q[0::2, :]).T / 10.0
    B = torch.randn(r // 2, out_features).T.mm(Q[1::2, :]) / 10.0
    return A.contiguous(), B.contiguous()


def mark_trainable(model: nn.Module, adapter: str | None) -> None:
    """Freeze everything, then let `adapter`'s parameters (all adapters' if None) train."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter_parameters(model, adapter):
        p.requires_grad_(True)
    state = require_state(model)
    state.params.pop(adapter, None)
    state.trainable = set(state.configs) if adapter is None else {adapter}


def adapter_parameters(model: nn.Module, adapter: str | None = None) -> list[nn.Parameter]:
    """The parameters that train for `adapter` (every adapter if None): A, B (not B for a MiCA
    adapter: PEFT keeps it frozen), a variant's own tensors, LoRA on parameters and token rows,
    modules_to_save copies, and biases when the adapter's config says bias='all' or 'lora_only'."""
    state = require_state(model)
    names = list(state.configs) if adapter is None else [adapter]
    for n in names:
        require_adapter(state, n)
    params: dict[int, nn.Parameter] = {}
    for _, layer in lora_layers(model):
        for n in names:
            if n in layer.lora_A:
                frozen = layer.lora_B[n] if state.configs[n].init == "mica" else None  # MiCA trains A only
                params.update({id(p): p for p in layer.parameters_of(n) if p is not frozen})
                if state.configs[n].bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
                    params[id(layer.base_layer.bias)] = layer.base_layer.bias
    for _, wrapper in module_wrappers(model):
        for n in names:
            params.update({id(p): p for p in wrapper.parameters_of(n)})
    for _, mod in saved_modules(model):
        for n in names:
            if n in mod.modules_to_save:
                params.update({id(p): p for p in mod.modules_to_save[n].parameters()})
    if any(state.configs[n].bias == "all" for n in names):
        for pname, p in model.named_parameters():
            if pname.endswith("bias") and ".original_module." not in pname:
                params[id(p)] = p
    return list(params.values())


@dataclass(frozen=True)
class ParamSummary:
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable {100 * self.fraction:.2f}% ({self.trainable:,} of {self.total:,})"


def param_summary(model: nn.Module) -> ParamSummary:
    """Trainable vs all parameters (shared parameters counted once)."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return ParamSummary(trainable, total)
