"""The training loop behind `lorakit train` and `lorakit.train.train(...)`.

One loop for LoRA, full fine-tuning (`full=True`) and the head-only baseline (`head_only=True`):
the only difference is which parameters train and what is written at the end, so comparisons
between them are like for like.

Resuming is exact: the data order of an epoch depends only on (seed, epoch), and a checkpoint
holds the trainable weights, the optimizer and scheduler states, the RNG states (dropout) and the
position in the data, so a run killed at any point and resumed computes the same steps, in the
same order, on the same numbers as an uninterrupted one (bit-identical on CPU).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk

from .. import quant
from ..errors import LoraError
from ..files import replace_dir
from ..inject import DEFAULT_TARGETS
from ..io import WEIGHTS_NAME
from ..models import contiguous_head_input, load_model
from ..params import split_targets
from . import checkpoint, data, metrics, precision
from .config import DEFAULT_DROPOUT, TrainConfig
from .dist import Dist
from .loss import causal_lm_loss

# which modules are the task head when the loader does not say (already fine-tuned folders)
HEAD_NAMES = ("classifier", "score")


@dataclass
class TrainResult:
    """What `train` returns: the output folder, the metrics dict (as in metrics.json) and the
    trained model and tokenizer, still in memory (for a notebook to keep using)."""

    out: Path
    metrics: dict[str, Any]
    model: nn.Module
    tokenizer: Any


def train(config: TrainConfig | None = None, /, *, callback: Callable[[dict], None] | None = None,
          **options: Any) -> TrainResult:
    """Train as `lorakit train` does. Pass a TrainConfig, or its fields as keywords:

        train(model="minilm", data="train.jsonl", eval_data="test.jsonl", task="classification",
              out="runs/topic", epochs=2)

    `callback(event)` receives {"event": "step", "step", "total", "loss", "tok_s", "epoch"} (at
    most ~4 per second) and {"event": "epoch", ...the epoch's record}: for custom progress displays.
    """
    if config is None:
        config = TrainConfig.from_dict(options)
    elif options:
        config = TrainConfig.from_dict({**config.to_dict(), **options})
    check_dependencies(config)
    return _Run(config, callback).run()


# (module, what it is for, the extra that installs it)
_ALWAYS = [("transformers", "models and tokenizers", "train"), ("tqdm", "the progress bar", "train"),
           ("matplotlib", "the loss plot", "train")]


def _installed(module: str) -> bool:
    """Importable, without importing it (None in sys.modules, as for a blocked module, counts as not)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_dependencies(config: TrainConfig) -> None:
    """Fail before any data or model is loaded when an optional library the run will need is
    missing (without matplotlib a run used to train to the end, then crash on the final plot)."""
    needs = list(_ALWAYS)
    if config.quantize:
        needs.append((quant.LIBRARY[config.quantize], f"--quantize {config.quantize}", "quant"))
    missing = [(m, why, extra) for m, why, extra in needs if not _installed(m)]
    if missing:
        extras = sorted({extra for _, _, extra in missing})
        raise LoraError("lorakit train needs " + ", ".join(f"{m} ({why})" for m, why, _ in missing)
                        + ", not installed here: " + " and ".join(f"pip install 'lorakit[{e}]'" for e in extras))


def _linear_schedule(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


class _Run:
    def __init__(self, cfg: TrainConfig, callback: Callable[[dict], None] | None = None):
        self.cfg = cfg
        self.callback = callback
        self.dist = Dist.from_env(cfg.strategy, cfg.device)
        self.out = Path(cfg.out).resolve()

    # ---- set-up -------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        t0 = time.time()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        self.precision = precision.resolve(cfg.precision, self.device, full=cfg.full)  # before anything loads
        if self.dist.is_main and cfg.progress:
            print(f"lorakit train: precision {self.precision.name} ({self.precision.why})", flush=True)
        train_ex = data.load_examples(cfg.data, cfg.task)
        eval_ex = data.load_examples(cfg.eval_data, cfg.task) if cfg.eval_data else []
        self.labels = None
        if cfg.task == "classification":
            self.labels = data.label_names(train_ex)
            if len(self.labels) < 2:
                raise LoraError(f"{cfg.data}: every example has label {self.labels[0]!r}; classification needs two or more")
            data.check_eval_labels(eval_ex, self.labels, cfg.data)
        if self.out.exists() and not self.out.is_dir():
            raise LoraError(f"--out {self.out}: exists and is not a folder")

        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        loaded = load_model(cfg.model, cfg.task, self.labels, dtype=self.precision.dtype, quantize=cfg.quantize,
                            device=str(self.device))
        self.tok = loaded.tokenizer
        model = loaded.model.to(self.dist.load_device(self.device))
        self.base_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
        self.model = model
        self.trainable = self._prepare(model, loaded.new_modules)
        self.train_enc = data.encode(train_ex, cfg.task, self.tok, cfg.max_length, self.labels)
        self.eval_enc = data.encode(eval_ex, cfg.task, self.tok, cfg.max_length, self.labels) if eval_ex else None
        self.load_s = time.time() - t0
        return self._loop(t0)

    def _prepare(self, model: nn.Module, new_modules: list[str]) -> dict[str, nn.Parameter]:
        """Decide what trains. LoRA: adapters on the targets, plus a full copy of any freshly
        initialised head (it has to be learned and saved with the adapter)."""
        cfg = self.cfg
        names = dict(model.named_modules())
        heads = [m for m in new_modules if m in names] if cfg.task == "classification" else []
        if cfg.task == "classification" and not heads:
            heads = [h for h in HEAD_NAMES if h in names]
        if cfg.mode == "full":
            for p in model.parameters():
                p.requires_grad_(True)
        elif cfg.mode == "head":
            for p in model.parameters():
                p.requires_grad_(False)
            for h in heads:
                for p in names[h].parameters():
                    p.requires_grad_(True)
        else:
            targets: Any = cfg.targets
            if targets == "auto":
                model_type = getattr(model.config, "model_type", None)
                targets = None if model_type in DEFAULT_TARGETS else "all-linear"
            params = list(cfg.target_parameters or [])
            if isinstance(targets, list):  # entries naming parameters (MoE experts) go to target_parameters
                targets, named = split_targets(model, targets)
                params += [p for p in named if p not in params]
            dropout = cfg.dropout if cfg.dropout is not None else 0.0 if params else DEFAULT_DROPOUT
            lcfg = lk.LoraConfig(
                r=cfg.r, alpha=cfg.alpha, dropout=dropout, targets=targets, target_parameters=params or None,
                modules_to_save=heads or None,
                task_type="SEQ_CLS" if cfg.task == "classification" else "CAUSAL_LM",
                base_model_name_or_path=cfg.model,
            )
            lk.inject(model, lcfg, "default")
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not trainable:
            raise LoraError("nothing to train: no parameter requires a gradient")
        return trainable

    # ---- the loop -----------------------------------------------------------------------------
    def _loop(self, t0: float) -> TrainResult:
        from tqdm.auto import tqdm

        cfg, dist, model = self.cfg, self.dist, self.model
        n = len(self.train_enc)
        bpe = dist.batches_per_epoch(n, cfg.batch_size)  # global batches per epoch
        total = cfg.steps if cfg.steps is not None else (cfg.epochs or 1) * bpe
        wrapped = dist.wrap(model)  # before the optimizer: FSDP swaps parameters for shards
        self.trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
        opt = torch.optim.AdamW(list(self.trainable.values()), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        scaler = torch.amp.GradScaler(self.device.type) if self.precision.needs_scaler else None
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _linear_schedule(int(cfg.warmup * total), total))
        fingerprint = {
            "options": {**cfg.result_options(self.precision.name), "batch_size": cfg.batch_size * dist.world_size},
            "data": checkpoint.file_fingerprint(cfg.data),
            "eval_data": checkpoint.file_fingerprint(cfg.eval_data) if cfg.eval_data else None,
        }
        hist: dict[str, Any] = {"loss_history": [], "epochs": [], "tokens": 0, "train_time_s": 0.0,
                                "segments": 0, "resumed_from": []}
        start = 0
        ck = dist.latest_checkpoint(lambda: checkpoint.latest(self.out)) if cfg.resume else None
        if ck is not None:
            start, hist = self._restore(ck, opt, sched, fingerprint, scaler)
        elif cfg.resume and dist.is_main:
            print(f"lorakit train: no checkpoint in {self.out / checkpoint.DIRNAME}; starting from step 0", flush=True)
        if ck is None and dist.is_main:
            checkpoint.clear(self.out)
        hist["segments"] += 1

        memory_method = metrics.reset_peak_memory()
        rss_before = metrics.current_rss_mb()
        bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, mininterval=0.5,
                   desc=f"{cfg.mode} {cfg.task}", disable=not (cfg.progress and dist.is_main))
        model.train()
        order, order_epoch, ema = [], -1, None
        seg_tokens, seg_start, last_event = 0, time.time(), 0.0
        epoch_losses = [v for s, v in hist["loss_history"] if (s - 1) // bpe == start // bpe] if start % bpe else []
        for step in range(start, total):
            epoch, i = divmod(step, bpe)
            if epoch != order_epoch:
                order, order_epoch = dist.epoch_order(n, epoch, cfg.seed), epoch
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            batch = {k: v.to(self.device) for k, v in data.collate(self.train_enc, idx or [0], self.tok.pad_token_id, cfg.task).items()}
            if wrapped is model and cfg.task != "classification":  # one process: logits never materialised
                raw = causal_lm_loss(model, **batch)
            else:  # DDP/FSDP sync through their wrapper's forward
                raw = wrapped(**batch).loss
            loss = dist.scale_loss(raw, batch["labels"], cfg.task, real=bool(idx))
            opt.zero_grad(set_to_none=True)
            if scaler is not None:  # fp16: the loss scaled up so small gradients survive, unscaled to step
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            sched.step()
            value = dist.reduce_mean(loss.item())
            if not math.isfinite(value):
                raise LoraError(f"loss became {value} at step {step + 1}; lower --lr (now {cfg.learning_rate})")
            hist["loss_history"].append([step + 1, value])
            epoch_losses.append(value)
            seg_tokens += int(batch["attention_mask"].sum())
            ema = value if ema is None else 0.9 * ema + 0.1 * value
            elapsed = time.time() - seg_start
            bar.set_postfix(loss=f"{ema:.4f}", tok_s=f"{seg_tokens / max(elapsed, 1e-9):,.0f}", epoch=epoch + 1, refresh=False)
            bar.update(1)
            if self.callback and (time.time() - last_event > 0.25 or step == total - 1):
                last_event = time.time()
                self.callback({"event": "step", "step": step + 1, "total": total, "loss": ema,
                               "tok_s": seg_tokens / max(elapsed, 1e-9), "epoch": epoch + 1})
            if i == bpe - 1 or step == total - 1:
                record = {"epoch": epoch + 1, "step": step + 1, "train_loss": sum(epoch_losses) / len(epoch_losses)}
                if self.eval_enc is not None:
                    record["eval"] = self.evaluate(model, bar)
                    model.train()
                    if dist.is_main:
                        bar.write(f"epoch {epoch + 1} (step {step + 1}/{total}): train loss {record['train_loss']:.4f}, "
                                  + ", ".join(f"eval {k} {v:.4f}" for k, v in record["eval"].items()))
                hist["epochs"].append(record)
                if self.callback:
                    self.callback({"event": "epoch", **record})
                epoch_losses = []
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
                params, opt_state = dist.full_state(self.trainable, opt)  # every process: FSDP gathers
                hist_now = dict(hist, tokens=hist["tokens"] + seg_tokens,
                                train_time_s=hist["train_time_s"] + time.time() - seg_start)
                if dist.is_main:
                    checkpoint.save(self.out, step + 1, params, opt_state, sched,
                                    {"fingerprint": fingerprint, "history": hist_now,
                                     "scaler": scaler.state_dict() if scaler is not None else None})
        bar.close()
        train_s = time.time() - seg_start
        hist["tokens"] += seg_tokens
        hist["train_time_s"] += train_s
        peak = metrics.peak_memory_mb()
        result = self._finish(hist, total, bpe, start, t0, peak, rss_before, memory_method, train_s, seg_tokens)
        return result

    def _restore(self, ck: Path, opt, sched, fingerprint: dict[str, Any], scaler=None) -> tuple[int, dict[str, Any]]:
        tensors, meta = self.dist.load_checkpoint(checkpoint.load, ck)
        old = meta.get("fingerprint", {})
        if old.get("options") != fingerprint["options"]:
            was, now = old.get("options", {}), fingerprint["options"]
            diff = {k: (was.get(k), now.get(k)) for k in {**was, **now} if was.get(k) != now.get(k)}
            raise LoraError(f"--resume: checkpoint {ck} was made with other options (checkpoint vs now: {diff}); "
                            "use the same options, or drop --resume to start over")
        for key in ("data", "eval_data"):
            if old.get(key) != fingerprint[key]:
                raise LoraError(f"--resume: the {key.replace('_', '-')} file changed since checkpoint {ck}; "
                                "resume needs the same data (or drop --resume to start over)")
        missing = [k for k in self.trainable if f"param/{k}" not in tensors]
        if missing:
            raise LoraError(f"--resume: checkpoint {ck} lacks parameters {missing[:3]}")
        tensors = self.dist.local_tensors(tensors, self.trainable)
        with torch.no_grad():
            for k, p in self.trainable.items():
                p.copy_(tensors[f"param/{k}"])
        checkpoint.optimizer_from_flat(opt, tensors, meta["optimizer"])
        sched.load_state_dict(meta["scheduler"])
        if scaler is not None and meta.get("scaler"):  # fp16: the loss scale it had reached, not a fresh 65536
            scaler.load_state_dict(meta["scaler"])
        checkpoint.set_rng_state(tensors, meta["rng"])
        hist = meta["history"]
        hist["resumed_from"].append(meta["step"])
        if self.dist.is_main:
            print(f"lorakit train: resuming from {ck.name} (step {meta['step']})", flush=True)
        return meta["step"], hist

    # ---- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, bar: Any = None) -> dict[str, float]:
        model.eval()
        enc, cfg = self.eval_enc, self.cfg
        bs = cfg.eval_batch_size or cfg.batch_size * 2
        loss_sum, count, preds = 0.0, 0, []
        for start in range(0, len(enc), bs):
            idx = list(range(start, min(start + bs, len(enc))))
            batch = {k: v.to(self.device) for k, v in data.collate(enc, idx, self.tok.pad_token_id, cfg.task).items()}
            labels = batch.pop("labels")
            if cfg.task == "classification":
                logits = model(**batch).logits.float()
                loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
                count += len(idx)
                preds += logits.argmax(-1).tolist()
            else:  # the fused loss, as in training: 20 x 128 tokens of a 49k vocabulary are 0.5 GB per
                n = int((labels[:, 1:] != data.IGNORE).sum())  # float32 copy of the logits, and
                loss_sum += causal_lm_loss(model, labels=labels, **batch).item() * n  # cross-entropy made 3
                count += n
        loss = loss_sum / max(count, 1)
        if cfg.task == "classification":
            gold = list(enc.labels)
            return {"loss": loss, "accuracy": metrics.accuracy(preds, gold),
                    "macro_f1": metrics.macro_f1(preds, gold, len(self.labels))}
        out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        pairs = [(p, c) for p, c in zip(enc.prompts, enc.completions) if p is not None]
        if pairs:
            texts = generate(model, self.tok, [p for p, _ in pairs], cfg.max_new_tokens, self.device, bs)
            out["exact_match"] = sum(metrics.same_answer(t, c) for t, (_, c) in zip(texts, pairs)) / len(pairs)
        return out

    # ---- outputs ------------------------------------------------------------------------------
    def _finish(self, hist, total, bpe, start, t0, peak, rss_before, memory_method, train_s, seg_tokens) -> TrainResult:
        cfg, model = self.cfg, self.model
        summary = lk.param_summary(model) if cfg.mode == "lora" else None
        trainable = sum(p.numel() for p in self.trainable.values())
        total_params = summary.total if summary else sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        m: dict[str, Any] = {
            "task": cfg.task, "mode": cfg.mode, "model": cfg.model,
            "data": str(cfg.data), "eval_data": cfg.eval_data,
            "trainable_params": trainable, "total_params": total_params,
            "trainable_fraction": trainable / total_params,
            "adapter_bytes": None, "base_bytes": self.base_bytes,
            "peak_memory_mb": round(peak, 1), "rss_before_training_mb": round(rss_before, 1),
            "peak_memory_method": memory_method,
            "wall_time_s": round(time.time() - t0, 2) if not hist["resumed_from"] else None,
            "load_time_s": round(self.load_s, 2),
            "train_time_s": round(hist["train_time_s"], 2),
            "tokens_per_s": round(seg_tokens / max(train_s, 1e-9), 1),
            "steps": total, "steps_per_epoch": bpe, "epochs_run": math.ceil(total / bpe),
            "train_examples": len(self.train_enc),
            "eval_examples": len(self.eval_enc) if self.eval_enc is not None else 0,
            "labels": self.labels, "resumed_from_steps": hist["resumed_from"],
            "final_eval": hist["epochs"][-1].get("eval") if hist["epochs"] else None,
            "epochs": hist["epochs"], "loss_history": hist["loss_history"],
            "device": str(self.device), "threads": torch.get_num_threads(),
            "precision": self.precision.name, "precision_reason": self.precision.why,
            "distributed": self.dist.describe(),
            "config": cfg.to_dict(),
        }
        if self.device.type == "cuda":
            m["peak_cuda_memory_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        self.dist.gather_for_save(model, everything=cfg.mode != "lora")  # FSDP: whole tensors
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if cfg.mode == "lora":
                m["adapter_bytes"] = self._write_adapter()
            else:
                m["adapter_bytes"] = self._write_model()
            metrics.write_json_atomic(self.out / "metrics.json", m)
            metrics.plot_loss(m, self.out / "loss.png")
            checkpoint.clear(self.out)
            parts = [f"{cfg.mode} done in {m['train_time_s']:.1f}s of training",
                     f"trainable {trainable:,} of {total_params:,} ({100 * m['trainable_fraction']:.2f}%)"]
            if m["final_eval"]:
                parts.append(", ".join(f"{k} {v:.4f}" for k, v in m["final_eval"].items()))
            parts += [f"peak memory {m['peak_memory_mb']:.0f} MB", f"wrote {self.out}"]
            print("lorakit train: " + "; ".join(parts), flush=True)
        self.dist.barrier()
        return TrainResult(self.out, m, model, self.tok)

    def _write_adapter(self) -> int:
        """adapter_model.safetensors + adapter_config.json, each replaced atomically; other files
        and folders in --out are left alone."""
        lk.save_adapter(self.model, self.out, "default", base_model_name_or_path=self.cfg.model)
        return (self.out / WEIGHTS_NAME).stat().st_size

    def _write_model(self) -> int:
        """Full/head runs: a plain transformers folder DIR/model (loadable with from_pretrained)."""
        dest = self.out / "model"
        replace_dir(dest, lambda tmp: (self.model.save_pretrained(tmp), self.tok.save_pretrained(tmp)))
        return sum(f.stat().st_size for f in dest.glob("*.safetensors"))


def resolve_device(name: str) -> torch.device:
    """--device: "auto" is CUDA when present, else the CPU; a LoraError for one this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise LoraError(f"--device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoraError(f"--device {name!r}: CUDA is not available here")
    return dev


@torch.no_grad()
def generate(model: nn.Module, tok: Any, prompts: list[list[int]], max_new_tokens: int,
             device: torch.device | str = "cpu", batch_size: int = 16) -> list[str]:
    """Greedy continuations of token-id prompts (left-padded batches), decoded up to EOS."""
    was_training = model.training
    model.eval()
    hook = contiguous_head_input(model)  # the head of a frozen model would take torch's slow path
    try:
        out = _generate_batches(model, tok, prompts, max_new_tokens, device, batch_size)
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    return out


def _generate_batches(model: nn.Module, tok: Any, prompts: list[list[int]], max_new_tokens: int,
                      device: torch.device | str, batch_size: int) -> list[str]:
    pad = tok.pad_token_id
    out: list[str] = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, p in enumerate(chunk):
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tok.eos_token_id)
        for row in gen[:, width:].tolist():
            if tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id)]
            out.append(tok.decode(row, skip_special_tokens=True))
    return out
