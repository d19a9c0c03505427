"""LoraConfig: one validated description of an adapter, and its PEFT `adapter_config.json` form."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import LoraError
from .patterns import (LAYERS_TEMPLATE, MAX_ENTRIES, MAX_PATTERN_CHARS, RANK_TEMPLATE, compile_pattern,
                       match_pattern, name_set, segment_run_match, short, suffix_match)

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
INIT_METHODS = (True, False, "default", "gaussian", "orthogonal", "eva", "mica", "pissa", "pissa_niter_N", "olora")
# init methods that only chose where A and B start (the base is untouched): their adapters are
# ordinary LoRA once trained. "eva" and "mica" derive A or B from data or from W: load-only here.
INIT_ONLY = ("default", "gaussian", "orthogonal", "eva", "mica")
LOAD_ONLY_INITS = ("eva", "mica")
# init methods that changed the base weights in a way lorakit cannot reproduce from the file:
# PEFT's own conversion turns such an adapter into an ordinary one (init_lora_weights=True).
BASE_CHANGING_INITS = ("corda", "loftq", "lora_ga")
CONVERSION_ROUTE = ("convert it with PEFT first: peft_model.save_pretrained(out_dir, "
                    "path_initial_model_for_weight_conversion=<folder of the adapter as first initialised>) writes "
                    "an ordinary LoRA adapter (init_lora_weights=True) for the original base model, which lorakit loads")


def refused_init(method: str) -> str:
    """Why an adapter made with `method` (one of BASE_CHANGING_INITS) cannot be loaded, and what to do."""
    what = {"corda": "CorDA moved part of W into the adapter (W became a residual)",
            "lora_ga": "LoRA-GA subtracted the adapter's starting point from W",
            "loftq": "LoftQ replaced W by its quantized residual"}[method]
    route = (CONVERSION_ROUTE if method != "loftq" else
             "a LoftQ adapter belongs to its LoftQ-quantized base: run it with PEFT on that base, or " + CONVERSION_ROUTE)
    return (f"init_lora_weights={method!r}: {what} when the adapter was made, and lorakit cannot redo that from "
            f"the adapter's files; {route}")
_NITER = re.compile(r"^pissa_niter_(\d{1,6})$")


def changes_base(method: object) -> bool:
    """Whether `init` is one of the methods that move part of W into the adapter (lorakit.init)."""
    return isinstance(method, str) and (method in ("pissa", "olora") or _NITER.match(method) is not None)


def svd_iterations(method: str) -> int | None:
    """N of "pissa_niter_N" (a randomized SVD with N iterations); None for the exact methods."""
    m = _NITER.match(method)
    return int(m.group(1)) if m else None

# our field name -> PEFT's adapter_config.json name
PEFT_NAMES = {
    "r": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "targets": "target_modules",
    "exclude": "exclude_modules",
    "rslora": "use_rslora",
    "modules_to_save": "modules_to_save",
    "bias": "bias",
    "fan_in_fan_out": "fan_in_fan_out",
    "init": "init_lora_weights",
    "use_dora": "use_dora",
    "rank_pattern": "rank_pattern",
    "alpha_pattern": "alpha_pattern",
    "layers_to_transform": "layers_to_transform",
    "layers_pattern": "layers_pattern",
    "task_type": "task_type",
    "base_model_name_or_path": "base_model_name_or_path",
    "inference_mode": "inference_mode",
    "target_parameters": "target_parameters",
    "lora_bias": "lora_bias",
    "trainable_token_indices": "trainable_token_indices",
}
# PEFT fields that carry no meaning for the LoRA math here: read silently.
PEFT_HARMLESS = {
    "peft_type", "peft_version", "auto_mapping", "revision", "megatron_core", "qalora_group_size",
    "ensure_weight_tying",
    "eva_config",  # EVA's settings for computing A from activations: used once, at initialisation
}
# PEFT features lorakit does not implement: fine at their default, refused otherwise (a silent
# ignore would give wrong outputs).
PEFT_FEATURE_DEFAULTS: dict[str, Any] = {
    "megatron_config": None, "loftq_config": {},
    "corda_config": None, "lora_ga_config": None, "velora_config": None,
    "alora_invocation_tokens": None, "use_qalora": False, "monteclora_config": None,
    "layer_replication": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
}


def _fail(field_name: str, value: Any, why: str) -> None:
    raise LoraError(f"LoraConfig.{field_name}={short(value)}: {why}")


def _check_patterns(name: str, value: Any, allow_all_linear: bool) -> Any:
    """Targets/exclude: a regex string (full match), a list of names (exact or dotted suffix)."""
    if value is None:
        return None
    if isinstance(value, str):
        if allow_all_linear and value == ALL_LINEAR:
            return value
        if not value:
            _fail(name, value, "empty pattern")
        compile_pattern(name, value, value)
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        _check_size(name, value)
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else list(value)
        if not items:
            _fail(name, value, "empty list: name at least one module")
        return _check_entries(name, value, items)
    _fail(name, value, "expected a list of module names, a regex string or 'all-linear'")


def _check_names(name: str, value: Any) -> list[str] | None:
    """target_parameters: a list of parameter names (exact key or dotted suffix; no regex, as PEFT)."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        _fail(name, value, "expected a list of parameter names such as ['mlp.experts.gate_up_proj'] (no regex, as PEFT)")
    _check_size(name, value)
    items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else list(value)
    return _check_entries(name, value, items)


def _check_entries(name: str, value: Any, items: list) -> list[str]:
    """Every entry of a list of names: a non-empty string of bounded length."""
    for item in items:
        if not isinstance(item, str) or not item:
            _fail(name, value, f"every entry must be a non-empty string, got {short(item)}")
        if len(item) > MAX_PATTERN_CHARS:
            _fail(name, value, f"an entry of {len(item):,} characters (at most {MAX_PATTERN_CHARS:,})")
    return items


def _check_token_indices(value: Any) -> list[int] | dict[str, list[int]] | None:
    """trainable_token_indices: [ids] (the input embedding) or {module name: [ids]}; ids >= 0, no repeats."""
    name = "trainable_token_indices"
    if value is None:
        return None

    def ids(v: Any) -> list[int]:
        if not isinstance(v, (list, tuple)) or not v:
            _fail(name, value, f"expected a non-empty list of token ids, got {short(v)}")
        _check_size(name, v)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
            _fail(name, value, "token ids must be integers >= 0")
        if len(set(v)) != len(v):
            _fail(name, value, "a token id is listed twice")
        return list(v)
    if isinstance(value, dict):
        if not value:
            _fail(name, value, "an empty dict: name at least one embedding module")
        _check_size(name, value)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or not k or len(k) > MAX_PATTERN_CHARS:
                _fail(name, value, f"module names must be non-empty strings, got {short(k)}")
            out[k] = ids(v)
        return out
    return ids(value)


def _check_size(name: str, value: Any) -> None:
    if len(value) > MAX_ENTRIES:
        _fail(name, value, f"{len(value):,} entries (at most {MAX_ENTRIES:,})")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class LoraConfig:
    """What to adapt and how. Field names are lorakit's; `to_peft()`/`from_peft()` use PEFT's.

    targets: list of module names (exact dotted path, or a suffix after a dot, as PEFT matches),
    a regex string (full match on the dotted path), "all-linear" (every linear-like layer but the
    output head), or None (a per-architecture default for known transformers models).
    """

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    targets: list[str] | str | None = None
    exclude: list[str] | str | None = None
    rslora: bool = False
    modules_to_save: list[str] | None = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    init: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    use_dora: bool = False  # DoRA: a learned magnitude per output row (lorakit.dora)
    # LoRA on nn.Parameters (MoE expert stacks): names matched as PEFT does, `key == name` or
    # `key.endswith("." + name)` for key = "<module path>.<parameter name>" (lorakit.params)
    target_parameters: list[str] | None = None
    lora_bias: bool = False  # a trainable bias on B (PEFT's lora_bias; the "lora_bias" variant)
    # rows of embeddings trained as new values (PEFT's TrainableTokens): a list of token ids for the
    # input embedding, or {module name: ids} (lorakit.tokens)
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            _fail("r", self.r, "must be a positive integer")
        if not _is_number(self.alpha):
            _fail("alpha", self.alpha, "must be a finite number")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            _fail("dropout", self.dropout, "must be a number in [0, 1)")
        for flag in ("rslora", "fan_in_fan_out", "inference_mode", "use_dora", "lora_bias"):
            if not isinstance(getattr(self, flag), bool):
                _fail(flag, getattr(self, flag), "must be True or False")
        self.target_parameters = _check_names("target_parameters", self.target_parameters)
        if self.targets == [] and self.target_parameters:
            self.targets = []  # PEFT's target_modules=[]: only the parameters are adapted
        else:
            self.targets = _check_patterns("targets", self.targets, allow_all_linear=True)
        self.exclude = _check_patterns("exclude", self.exclude, allow_all_linear=False)
        if self.target_parameters:  # PEFT's ParamWrapper refuses these (a parameter has no input to drop out)
            for name, bad in (("dropout", self.dropout != 0), ("use_dora", self.use_dora),
                              ("lora_bias", self.lora_bias), ("fan_in_fan_out", self.fan_in_fan_out)):
                if bad:
                    _fail(name, getattr(self, name), "cannot be used with target_parameters (as in PEFT: LoRA on a "
                          "parameter forms W + dW, with no input to drop out, no bias and no DoRA magnitude)")
        if self.target_parameters and changes_base(self.init):
            _fail("init", self.init, "cannot be used with target_parameters (it derives A and B from a weight matrix)")
        if self.lora_bias and self.use_dora:
            _fail("lora_bias", True, "cannot be combined with use_dora (as in PEFT)")
        self.trainable_token_indices = _check_token_indices(self.trainable_token_indices)
        if self.modules_to_save is not None:
            if not isinstance(self.modules_to_save, (list, tuple)) or not all(
                isinstance(m, str) and m for m in self.modules_to_save
            ):
                _fail("modules_to_save", self.modules_to_save, "must be a list of module names")
            _check_size("modules_to_save", self.modules_to_save)
            for m in self.modules_to_save:
                if len(m) > MAX_PATTERN_CHARS:
                    _fail("modules_to_save", self.modules_to_save,
                          f"an entry of {len(m):,} characters (at most {MAX_PATTERN_CHARS:,})")
            self.modules_to_save = list(self.modules_to_save)
        if self.bias not in BIAS_MODES:
            _fail("bias", self.bias, f"must be one of {BIAS_MODES}")
        if isinstance(self.init, str) and self.init in BASE_CHANGING_INITS:
            _fail("init", self.init, refused_init(self.init))
        if not (self.init is True or self.init is False or self.init in INIT_ONLY or changes_base(self.init)):
            _fail("init", self.init, f"must be one of {INIT_METHODS}")
        if self.lora_bias and self.init not in (True, False):
            _fail("lora_bias", True, f"needs init True or False (as in PEFT), got init={self.init!r}")
        if self.trainable_token_indices and self.modules_to_save:
            for m in self.trainable_token_indices if isinstance(self.trainable_token_indices, dict) else ():
                if m in self.modules_to_save:
                    _fail("trainable_token_indices", self.trainable_token_indices,
                          f"{m!r} is in modules_to_save too: train the whole module or some of its rows, not both")
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
                _fail(name, value, "must be a dict of {module pattern: value}")
            _check_size(name, value)
            for key in value:  # the key alone and as PEFT matches it (a key such as 'a)|(b' is refused)
                compile_pattern(name, key, key)
                compile_pattern(name, key, RANK_TEMPLATE.format(key))
        lp = self.layers_pattern
        if lp is not None and not (
            (isinstance(lp, str) and lp) or (isinstance(lp, (list, tuple)) and all(isinstance(x, str) and x for x in lp))
        ):
            _fail("layers_pattern", lp, "must be a name or a list of names")
        if isinstance(lp, (list, tuple)):
            _check_size("layers_pattern", lp)
        for pat in [lp] if isinstance(lp, str) else lp or []:  # interpolated into PEFT's regex
            compile_pattern("layers_pattern", pat, LAYERS_TEMPLATE.format(pat))
        if self.task_type is not None and not isinstance(self.task_type, str):
            _fail("task_type", self.task_type, "must be a string")
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            _fail("base_model_name_or_path", self.base_model_name_or_path, "must be a string")
        for key, val in dict(self.rank_pattern).items():
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                _fail("rank_pattern", {key: val}, "ranks must be positive integers")
        for key, val in dict(self.alpha_pattern).items():
            if not _is_number(val):
                _fail("alpha_pattern", {key: val}, "alphas must be finite numbers")
        ltt = self.layers_to_transform
        if isinstance(ltt, (list, tuple)):
            _check_size("layers_to_transform", ltt)
        if ltt is not None and not (
            (isinstance(ltt, int) and not isinstance(ltt, bool) and ltt >= 0)
            or (isinstance(ltt, (list, tuple))
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ltt))
        ):
            _fail("layers_to_transform", ltt, "must be a layer index or a list of layer indices")
        if isinstance(ltt, tuple):
            self.layers_to_transform = list(ltt)

    # ---- per-layer values -------------------------------------------------------------------
    def rank_for(self, path: str) -> int:
        key = _pattern_key(self.rank_pattern, path)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, path: str) -> float:
        key = _pattern_key(self.alpha_pattern, path, "alpha_pattern")
        return self.alpha_pattern[key] if key is not None else self.alpha

    # ---- PEFT adapter_config.json -----------------------------------------------------------
    def to_peft(self) -> dict[str, Any]:
        """The dict PEFT writes as adapter_config.json (PEFT's field names, its defaults elsewhere)."""
        out: dict[str, Any] = {"peft_type": "LORA"}
        for ours, theirs in PEFT_NAMES.items():
            out[theirs] = getattr(self, ours)
        return out

    @classmethod
    def from_peft(cls, data: Any, source: str = "adapter_config.json") -> "LoraConfig":
        """Read PEFT's dict. Unknown keys: a warning. Known PEFT features we lack: an error."""
        if not isinstance(data, dict):
            raise LoraError(f"{source}: expected a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise LoraError(f"{source}: peft_type is {peft_type!r}; lorakit reads LoRA adapters only")
        init = data.get("init_lora_weights")
        if isinstance(init, str) and init in BASE_CHANGING_INITS:  # before its *_config field is reported
            raise LoraError(f"{source}: {refused_init(init)}")
        theirs_to_ours = {v: k for k, v in PEFT_NAMES.items()}
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, val in data.items():
            if key in theirs_to_ours:
                kwargs[theirs_to_ours[key]] = val
            elif key in PEFT_FEATURE_DEFAULTS:
                default = PEFT_FEATURE_DEFAULTS[key]
                if val != default and not (default in (None, {}) and val in (None, {}, [])):
                    raise LoraError(
                        f"{source}: {key}={val!r} is a PEFT feature lorakit does not support"
                    )
            elif key not in PEFT_HARMLESS:
                unknown.append(key)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown config keys {sorted(unknown)}", stacklevel=3)
        for opt in ("rank_pattern", "alpha_pattern"):
            if kwargs.get(opt) is None:
                kwargs.pop(opt, None)
        try:
            return cls(**kwargs)
        except LoraError as e:
            raise LoraError(f"{source}: {e}") from None
        except TypeError as e:  # pragma: no cover - defensive
            raise LoraError(f"{source}: {e}") from None

    def replace(self, **changes: Any) -> "LoraConfig":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return type(self)(**values)


def _pattern_key(patterns: dict[str, Any], path: str, field_name: str = "rank_pattern") -> str | None:
    """PEFT's rule: a pattern key matches if the path ends with it after a dot (regex allowed)."""
    for key in patterns:
        if match_pattern(field_name, key, RANK_TEMPLATE.format(key), path):
            return key
    return None


def layer_index(path: str, layers_pattern: list[str] | str | None) -> int | None:
    """The transformer block index in a dotted path, as PEFT finds it for layers_to_transform."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        pats = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        m = None
        for pat in pats:
            m = match_pattern("layers_pattern", pat, LAYERS_TEMPLATE.format(pat), path)
            if m:
                break
    return int(m.group("idx")) if m else None


def matches(config: LoraConfig, path: str) -> bool:
    """Whether the module at dotted `path` is a target (PEFT's check_target_module_exists)."""
    if _match_list_or_regex(config.exclude, path, "exclude"):
        return False
    if config.modules_to_save and segment_run_match(path, name_set(tuple(config.modules_to_save))):
        return False
    t = config.targets
    if isinstance(t, str):
        return t != ALL_LINEAR and match_pattern("targets", t, t, path, full=True) is not None
    if t is None or not _match_list_or_regex(t, path, "targets"):
        return False
    ltt = config.layers_to_transform
    if ltt is None or (isinstance(ltt, list) and not ltt):
        return True
    idx = layer_index(path, config.layers_pattern)
    if idx is None:
        return False
    return idx == ltt if isinstance(ltt, int) else idx in ltt


def _match_list_or_regex(patterns: list[str] | str | None, path: str, field_name: str) -> bool:
    if not patterns:
        return False
    if isinstance(patterns, str):
        return match_pattern(field_name, patterns, patterns, path, full=True) is not None
    return suffix_match(path, name_set(tuple(patterns)))
