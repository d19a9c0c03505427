"""TrainConfig: every option of `lorakit train`, validated once; also readable from a TOML file."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import LoraError
from ..quant import QUANTIZE
from .precision import PRECISIONS

TASKS = ("classification", "causal-lm")
# Learning rates that work out of the box per mode (LoRA's update is small: it takes a larger lr).
DEFAULT_LR = {"lora": 5e-4, "full": 5e-5, "head": 1e-3}
DEFAULT_DROPOUT = 0.05  # LoRA dropout unless given; 0 when parameters are targeted (no input to drop out)
# Options that change the result: a checkpoint is resumed only when these agree.
RESULT_FIELDS = ("model", "task", "targets", "r", "alpha", "dropout", "epochs", "steps", "lr",
                 "batch_size", "seed", "full", "head_only", "max_length", "warmup", "weight_decay", "quantize")


@dataclass
class TrainConfig:
    """Options of one training run (the CLI flags, with '-' as '_')."""

    model: str
    data: str
    out: str
    task: str = "classification"
    eval_data: str | None = None
    targets: str | list[str] = "auto"  # auto | all-linear | list of module (or parameter) names
    target_parameters: list[str] | None = None  # LoRA on nn.Parameters (MoE experts): PEFT's target_parameters
    r: int = 8
    alpha: float = 16.0
    dropout: float | None = None  # None: DEFAULT_DROPOUT, or 0 when parameters are targeted (PEFT allows no other)
    epochs: int | None = None  # default 1 when neither epochs nor steps is given
    steps: int | None = None
    lr: float | None = None  # default DEFAULT_LR[mode]
    batch_size: int = 8
    eval_batch_size: int | None = None
    seed: int = 0
    save_every: int = 0  # 0: no checkpoints
    resume: bool = False
    full: bool = False  # full fine-tuning (every weight trains)
    head_only: bool = False  # baseline: frozen base, only the new task head trains
    max_length: int = 256
    warmup: float = 0.06  # fraction of the steps with a linear lr warm-up
    weight_decay: float = 0.0
    max_new_tokens: int = 32  # causal-lm exact-match generation
    threads: int | None = None  # torch CPU threads (None: torch's default)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True
    quantize: str | None = None  # nf4 | fp4 | int8 | int8-wo: the frozen base quantized (lorakit.quant)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (lorakit.train.precision)
    strategy: str = "ddp"  # ddp | fsdp: how torchrun's processes share the work (ignored in one process)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise LoraError(f"train option {name}={getattr(self, name)!r}: {why}")

        for name in ("model", "data", "out"):
            if not isinstance(getattr(self, name), (str, Path)) or not str(getattr(self, name)):
                bad(name, "required (a path or name)")
            setattr(self, name, str(getattr(self, name)))
        if self.eval_data is not None:
            self.eval_data = str(self.eval_data)
        if self.task not in TASKS:
            bad("task", f"expected one of {TASKS}")
        if isinstance(self.targets, str) and self.targets not in ("auto", "all-linear"):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if isinstance(self.targets, (list, tuple)):
            self.targets = list(self.targets)
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                bad("targets", "expected 'auto', 'all-linear' or a comma-separated list of module names")
        if isinstance(self.target_parameters, str):
            self.target_parameters = [t.strip() for t in self.target_parameters.split(",") if t.strip()]
        if self.target_parameters is not None and (
                not isinstance(self.target_parameters, (list, tuple)) or not self.target_parameters
                or not all(isinstance(t, str) and t for t in self.target_parameters)):
            bad("target_parameters", "expected a comma-separated list of parameter names: mlp.experts.gate_up_proj,...")
        if self.target_parameters is not None:
            self.target_parameters = list(self.target_parameters)
        for name in ("r", "batch_size", "max_length", "max_new_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, "must be a positive integer")
        for name in ("epochs", "steps", "eval_batch_size", "threads"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                bad(name, "must be a positive integer")
        if self.epochs is not None and self.steps is not None:
            bad("steps", "give epochs or steps, not both")
        if not isinstance(self.save_every, int) or isinstance(self.save_every, bool) or self.save_every < 0:
            bad("save_every", "must be a non-negative integer (0: no checkpoints)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            bad("seed", "must be an integer")
        for name in ("alpha", "weight_decay"):
            if not isinstance(getattr(self, name), (int, float)) or isinstance(getattr(self, name), bool):
                bad(name, "must be a number")
        if self.lr is not None and (not isinstance(self.lr, (int, float)) or self.lr <= 0):
            bad("lr", "must be a positive number")
        if self.dropout is not None and (not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1):
            bad("dropout", "must be in [0, 1)")
        if not isinstance(self.warmup, (int, float)) or not 0 <= self.warmup < 1:
            bad("warmup", "must be a fraction in [0, 1)")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            bad("quantize", f"expected one of {list(QUANTIZE)}")
        if self.strategy not in ("ddp", "fsdp"):
            bad("strategy", "expected ddp or fsdp")
        if self.precision not in PRECISIONS:
            bad("precision", f"expected one of {list(PRECISIONS)}")
        if self.quantize and self.full:
            bad("quantize", "full fine-tuning cannot train a quantized base; drop --full or --quantize")
        if self.full and self.head_only:
            bad("head_only", "choose --full or --head-only, not both")
        if self.head_only and self.task != "classification":
            bad("head_only", "only for classification (the head is the new classifier layer)")

    @property
    def mode(self) -> str:
        return "full" if self.full else "head" if self.head_only else "lora"

    @property
    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.mode]

    def result_options(self, precision: str = "fp32") -> dict[str, Any]:
        """The options that decide the result; `precision`: the one the run resolved to."""
        d = asdict(self)
        d["lr"] = self.learning_rate
        if d["dropout"] is None:  # as recorded before dropout could be left to the targets
            d["dropout"] = DEFAULT_DROPOUT
        out = {k: d[k] for k in RESULT_FIELDS}
        if self.target_parameters:  # only when used: checkpoints made before the option still resume
            out["target_parameters"] = self.target_parameters
        if precision != "fp32":  # (likewise: runs before --precision were float32)
            out["precision"] = precision
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """Options from a TOML file (keys as the CLI flags, '-' or '_'), then `overrides` on top."""
        values = _aliases(read_toml(path), str(path))
        values.update(_aliases({k: v for k, v in overrides.items() if v is not None}, "command line"))
        return cls.from_dict(values, source=str(path))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "options") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        values = _aliases({k.replace("-", "_"): v for k, v in values.items()}, source)
        unknown = sorted(set(values) - known)
        if unknown:
            raise LoraError(f"{source}: unknown train options {unknown}; known: {sorted(known)}")
        missing = [k for k in ("model", "data", "out") if values.get(k) is None]
        if missing:
            raise LoraError(f"{source}: missing required options {missing}")
        return cls(**values)


# option spellings that name the same field: `rank` is --rank's (the form torchrun lets through)
ALIASES = {"rank": "r"}


def _aliases(values: dict[str, Any], source: str) -> dict[str, Any]:
    out = dict(values)
    for alias, name in ALIASES.items():
        if alias in out:
            value = out.pop(alias)
            if name in out and out[name] != value:
                raise LoraError(f"{source}: {alias}={value!r} and {name}={out[name]!r} name the same option; give one")
            out[name] = value
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"{path}: no such config file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise LoraError(f"{path}: not valid TOML ({e})") from None
    # accept a [train] table or top-level keys
    return dict(data.get("train", data))
