"""Trainable token rows (PEFT's `trainable_token_indices`, its TrainableTokens layer).

Some rows of an embedding (new special tokens, say) are trained as whole new values while the
rest of the matrix stays frozen. Per adapter and module: the token ids (from the config; they are
not in the file) and `trainable_tokens_delta`, an (n_ids, dim) parameter holding the rows' new
values, initialised as a copy of the original rows (absolute rows, not a difference, as PEFT).

forward: the module's own forward (so a scaled embedding keeps its scale) on
    W' = W.index_copy(0, ids, rows)
for each active adapter in turn (two active adapters may not share an id: PEFT refuses that too).
With tied embeddings (the output head's weight is the input embedding's), the head is wrapped too
and follows the embedding's adapters, so logits use the same new rows; only the embedding's rows
are saved. An untied head named in the dict form gets rows of its own (saved under its path).
Merging writes the rows into the weight (a tied head sees them), unmerging puts the original rows
back exactly (they are kept at merge time, as PEFT keeps `trainable_tokens_original`).

Saved key: `base_model.model.<module path>.token_adapter.trainable_tokens_delta`. Which module a
config names: a list -> the model's input embedding (`get_input_embeddings()`, else a module
called `embed_tokens`); a dict -> every module whose path ends with the key (PEFT's `endswith`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .config import LoraConfig
from .errors import LoraError, TargetError
from .layer import LoraLayer, LoraState, ModulesToSave, adapter_dtype, replace_module
from .params import ModuleWrapper, module_wrappers, outer_modules

FILE_SUFFIX = "token_adapter.trainable_tokens_delta"


class TokenLayer(ModuleWrapper):
    """Wraps an embedding (or an output head) whose rows `ids` some adapters replace.

    tied: the TokenLayer of the input embedding whose weight this module shares (a tied output
    head): it holds no rows of its own and applies that layer's adapters.
    """

    def __init__(self, base_layer: nn.Module, state: LoraState, tied: "TokenLayer | None" = None):
        super().__init__(base_layer, state)
        self.trainable_tokens_delta = nn.ParameterDict()  # adapter -> (n_ids, dim) new rows
        self.token_indices: dict[str, list[int]] = {}
        self.kept: dict[str, Tensor] = {}  # adapter -> the rows it overwrote when merged
        self._tied = [tied] if tied is not None else []  # a list: not registered as a submodule
        self._index: dict[tuple[str, torch.device], Tensor] = {}

    @property
    def tied(self) -> "TokenLayer | None":
        return self._tied[0] if self._tied else None

    def source(self) -> "TokenLayer":
        """The layer holding the rows this one applies (itself, or the embedding it is tied to)."""
        return self._tied[0] if self._tied else self

    def adapters(self) -> list[str]:
        return list(self.source().trainable_tokens_delta)

    def add(self, adapter: str, ids: list[int], values: Tensor | None = None) -> None:
        """Rows `ids` for `adapter`: `values`, or a copy of the current rows (PEFT's init)."""
        if self.tied is not None:
            raise LoraError("a tied TokenLayer follows its embedding's rows; add them there")
        weight = self.base_layer.weight
        rows = weight.shape[0]
        bad = [i for i in ids if i >= rows]
        if bad:
            raise LoraError(f"trainable_token_indices: ids {bad[:5]} are out of range for "
                            f"{type(self.base_layer).__name__} with {rows} rows")
        dtype = adapter_dtype(weight)
        if values is None:
            values = weight.detach()[torch.tensor(ids, device=weight.device)].to(dtype).clone()
        else:
            values = values.to(dtype=dtype, device=weight.device).contiguous()
        self.trainable_tokens_delta[adapter] = nn.Parameter(values)
        self.token_indices[adapter] = list(ids)

    def remove(self, adapter: str) -> None:
        if adapter in self.merged:
            raise LoraError(f"adapter {adapter!r} is merged into the weights: unmerge(model) first")
        if adapter in self.trainable_tokens_delta:
            del self.trainable_tokens_delta[adapter]
        self.token_indices.pop(adapter, None)
        self._index = {k: v for k, v in self._index.items() if k[0] != adapter}

    def parameters_of(self, adapter: str) -> list[nn.Parameter]:
        d = self.trainable_tokens_delta
        return [d[adapter]] if adapter in d else []

    def ids(self, adapter: str, device: torch.device) -> Tensor:
        key = (adapter, device)
        if key not in self._index:
            self._index[key] = torch.tensor(self.token_indices[adapter], dtype=torch.long, device=device)
        return self._index[key]

    # ---- forward ----------------------------------------------------------------------------
    def _check_disjoint(self, names: list[str]) -> None:
        seen: dict[int, str] = {}
        for n in names:
            for i in self.token_indices[n]:
                if i in seen:
                    raise LoraError(f"adapters {seen[i]!r} and {n!r} both replace token row {i}: active or merged "
                                    "adapters must train disjoint token ids (as in PEFT)")
                seen[i] = n

    def replaced_weight(self, W: Tensor, names: list[str]) -> Tensor:
        src = self.source()
        for n in names:
            W = W.index_copy(0, src.ids(n, W.device), src.trainable_tokens_delta[n].to(W.dtype))
        return W

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        st = self.state
        if st.rows is not None:
            self.refuse_rows(st, "replace token rows (trainable_token_indices)")
        if st.disabled:
            return self.base_layer(*args, **kwargs)
        src = self.source()
        names = [n for n in st.active if n in src.trainable_tokens_delta and n not in src.merged]
        if not names:
            return self.base_layer(*args, **kwargs)
        src._check_disjoint(names + [n for n in src.merged if n not in names])
        W = self.replaced_weight(self.base_layer.weight, names)
        return torch.func.functional_call(self.base_layer, {"weight": W}, args, kwargs)

    # ---- merge ------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, adapter: str) -> float:
        """Write the adapter's rows into the weight (a tied head sees them); the overwritten rows
        are kept, so unmerging is exact. Returns the rounding error of the stored rows."""
        self._check_disjoint(self.merged + [adapter])
        weight = self.base_layer.weight
        idx = self.ids(adapter, weight.device)
        self.kept[adapter] = weight[idx].clone()
        rows = self.trainable_tokens_delta[adapter].detach()
        weight.index_copy_(0, idx, rows.to(weight.dtype))
        self.merged.append(adapter)
        return (weight[idx].float() - rows.float()).abs().max().item()

    @torch.no_grad()
    def unmerge_last(self) -> str:
        adapter = self.merged.pop()
        weight = self.base_layer.weight
        weight.index_copy_(0, self.ids(adapter, weight.device), self.kept.pop(adapter))
        return adapter

    def merged_weight(self, names: list[str]) -> Tensor | None:
        """The weight with the named adapters' rows (those not merged yet) written in; None if none."""
        src = self.source()
        todo = [n for n in names if n in src.trainable_tokens_delta and n not in src.merged]
        if not todo:
            return None
        src._check_disjoint(src.merged + todo)
        return self.replaced_weight(self.base_layer.weight.detach(), todo)

    def extra_repr(self) -> str:
        if self.tied is not None:
            return "tied to the input embedding's token rows"
        return f"token_indices={self.token_indices}, merged={self.merged}"


def token_layers(model: nn.Module) -> list[tuple[str, TokenLayer]]:
    return [(n, m) for n, m in module_wrappers(model) if isinstance(m, TokenLayer)]


def _input_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        return get() if callable(get) else None
    except Exception:  # some models raise instead of returning None
        return None


def find_token_targets(model: nn.Module, config: LoraConfig) -> dict[str, tuple[list[int], str | None]]:
    """{module path: (token ids, path of the embedding it is tied to or None)} for the config's
    trainable_token_indices, PEFT's way (see the module docstring). Tied output heads are included
    (they follow the embedding, no ids of their own to save). TargetError for a name that matches
    nothing, a module that cannot take rows, or a tied head asked for other ids than its embedding."""
    tti = config.trainable_token_indices
    if not tti:
        return {}
    modules = list(outer_modules(model))
    emb = _input_embedding(model)
    emb_path = next((p for p, m in modules if m is emb), None) if emb is not None else None
    wanted = tti if isinstance(tti, dict) else {emb_path or "embed_tokens": tti}
    found: dict[str, list[int]] = {}
    used: set[str] = set()
    for p, _ in modules:  # PEFT's rule, path.endswith(key), as lookups of each suffix of the path:
        for i in range(len(p)):  # time linear in the paths, whatever the number of keys
            key = p[i:]
            if key in wanted:
                if p in found and found[p] != wanted[key]:
                    raise TargetError(f"trainable_token_indices: {p!r} is named by two entries with different ids")
                found[p] = wanted[key]
                used.add(key)
    for key in wanted:
        if key not in used:
            raise TargetError(f"trainable_token_indices: {key!r} matches no module of {type(model).__name__}")
    out: dict[str, tuple[list[int], str | None]] = {}
    by_path = dict(modules)
    emb_weight = _weight(by_path[emb_path]) if emb_path is not None else None
    tied = [p for p, m in modules if p != emb_path and emb_weight is not None and _weight(m) is emb_weight]
    for path, ids in found.items():
        module = by_path[path]
        w = _weight(module)
        if _foreign(module):
            raise TargetError(f"trainable_token_indices: {path!r} already carries {type(module).__name__} adapters; "
                              "a module's rows are trained either as token rows or by LoRA / modules_to_save, not both")
        if w is None or w.dim() != 2:
            raise TargetError(f"trainable_token_indices: {path!r} ({type(module).__name__}) has no 2-D weight whose "
                              "rows are tokens")
        bad = [i for i in ids if i >= w.shape[0]]
        if bad:
            raise TargetError(f"trainable_token_indices: ids {bad[:5]} are out of range for {path!r} with "
                              f"{w.shape[0]} rows")
        if path in tied:
            if emb_path not in found or found[emb_path] != ids:
                raise TargetError(
                    f"trainable_token_indices: {path!r} shares its weight with the input embedding {emb_path!r} "
                    "(tied); list the rows on the embedding (a tied head follows them), with the same ids if both are named")
            continue
        out[path] = (ids, None)
    if emb_path in out:
        for path in tied:
            if _foreign(by_path[path]):
                raise TargetError(f"trainable_token_indices: {path!r} shares the input embedding's weight (tied) and "
                                  f"already carries {type(by_path[path]).__name__} adapters; its rows cannot follow the "
                                  "embedding's token rows")
            out[path] = (out[emb_path][0], emb_path)
    return out


def _foreign(module: nn.Module) -> bool:
    """A module already wrapped by something else than a TokenLayer."""
    return isinstance(module, (LoraLayer, ModulesToSave)) or (
        isinstance(module, ModuleWrapper) and not isinstance(module, TokenLayer))


def _weight(module: nn.Module) -> Tensor | None:
    if isinstance(module, (ModuleWrapper, LoraLayer)):
        module = module.base_layer
    elif isinstance(module, ModulesToSave):
        module = module.original_module
    w = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    return w


def wrap_tokens(model: nn.Module, path: str, state: LoraState, tied_to: str | None = None) -> TokenLayer:
    """The TokenLayer at `path`, wrapping the module first if needed; `tied_to`: the path of the
    embedding TokenLayer a tied head follows."""
    module = model.get_submodule(path)
    if isinstance(module, TokenLayer):
        return module
    tied = model.get_submodule(tied_to) if tied_to is not None else None
    layer = TokenLayer(module, state, tied=tied).train(module.training)
    replace_module(model, path, layer)
    return layer


def file_key(path: str) -> str:
    return f"{path}.{FILE_SUFFIX}"
