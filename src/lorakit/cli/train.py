"""`lorakit train`: fine-tune a model with LoRA on your data and write a PEFT adapter.

    lorakit train --model minilm --data train.jsonl --eval-data test.jsonl \\
        --task classification --epochs 2 --out runs/topic --save-every 50
    lorakit train ... --resume          # after a crash or a kill: continues, same result
    lorakit train --config run.toml     # the same options in a TOML file ([train] table or top level)
    torchrun --nproc-per-node 4 --no-python lorakit train ... --rank 8 [--strategy fsdp]   # N processes
"""

from __future__ import annotations

import argparse

from lorakit.quant import QUANTIZE
from lorakit.train import TrainConfig, train
from lorakit.train.dist import lost_peer

# flag -> TrainConfig field; None defaults so a TOML file can fill what the command line omits
_FLAGS: list[tuple[tuple[str, ...], dict]] = [
    (("--model",), dict(help="transformers model folder, or an embedded name: minilm, smollm2")),
    (("--data",), dict(help="training data, JSONL or CSV: {text,label} or {prompt,completion} or {text}")),
    (("--eval-data",), dict(help="held-out data in the same format, evaluated every epoch")),
    (("--task",), dict(choices=["classification", "causal-lm"], help="default: classification")),
    (("--targets",), dict(help="auto (default), all-linear, or module names: q_proj,v_proj (names of parameters, "
                               "such as mlp.experts.gate_up_proj, go to --target-parameters)")),
    (("--target-parameters",), dict(help="LoRA on nn.Parameters, e.g. MoE experts: mlp.experts.gate_up_proj,"
                                         "mlp.experts.down_proj (PEFT's target_parameters)")),
    # --rank first: under torchrun, `--r` is an ambiguous prefix of torchrun's own options (--rdzv-*,
    # --role, ...) and torchrun exits before lorakit starts; --r stays for one process
    (("--rank", "--r"), dict(type=int, dest="r", help="LoRA rank (default 8); --r is short for it outside torchrun")),
    (("--alpha",), dict(type=float, help="LoRA alpha (default 16)")),
    (("--dropout",), dict(type=float, help="LoRA dropout (default 0.05; 0 when parameters are targeted)")),
    (("--epochs",), dict(type=int, help="passes over the data (default 1)")),
    (("--steps",), dict(type=int, help="optimizer steps instead of --epochs")),
    (("--lr",), dict(type=float, help="learning rate (default 5e-4 LoRA, 5e-5 full, 1e-3 head-only)")),
    (("--batch-size",), dict(type=int, help="examples per step (default 8)")),
    (("--eval-batch-size",), dict(type=int, help="default: twice --batch-size")),
    (("--seed",), dict(type=int, help="seed for initialisation, data order and dropout (default 0)")),
    (("--max-length",), dict(type=int, help="tokens per example, longer ones are cut (default 256)")),
    (("--warmup",), dict(type=float, help="fraction of steps with linear warm-up (default 0.06)")),
    (("--weight-decay",), dict(type=float, help="AdamW weight decay (default 0)")),
    (("--max-new-tokens",), dict(type=int, help="causal-lm exact-match generation length (default 32)")),
    (("--out",), dict(help="output folder: adapter, metrics.json, loss.png, checkpoints/")),
    (("--save-every",), dict(type=int, help="checkpoint every N steps (default 0: never)")),
    (("--threads",), dict(type=int, help="torch CPU threads (default: torch's choice)")),
    (("--device",), dict(help="auto (default), cpu, cuda, cuda:N")),
    (("--strategy",), dict(choices=["ddp", "fsdp"],
                           help="under torchrun: ddp (default; adapter gradients all-reduced) or fsdp "
                                "(FSDP2: the frozen base sharded across processes); --batch-size is per process")),
    (("--precision",), dict(choices=["auto", "fp32", "bf16", "fp16"],
                            help="auto (default): bf16 where the hardware runs it fast (CUDA with bf16, CPUs with "
                                 "AMX-BF16/AVX512-BF16), else fp32. The base in that precision, LoRA's matmuls too; "
                                 "the adapter's master weights, gradients and optimizer state stay float32")),
    (("--quantize",), dict(choices=list(QUANTIZE),
                           help="hold the frozen base in 4/8 bits (QLoRA): nf4, fp4, int8 (bitsandbytes), int8-wo (torchao)")),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n", 2)[2]
    p.add_argument("--config", help="TOML file with the same options (command-line flags win)")
    for names, kw in _FLAGS:
        p.add_argument(*names, default=None, **kw)
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from the last checkpoint in --out (bit-identical to an uninterrupted run)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", default=None, help="full fine-tuning, for comparison")
    mode.add_argument("--head-only", action="store_true", default=None,
                      help="baseline: frozen base, train only the new classifier head")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the parsed flags describe (over --config's file when given)."""
    values = {k: v for k, v in vars(args).items() if k not in ("command", "config", "quiet") and v is not None}
    if args.quiet:
        values["progress"] = False
    if args.config:
        return TrainConfig.from_file(args.config, **values)
    return TrainConfig.from_dict(values, source="lorakit train")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        train(cfg)
    except RuntimeError as e:  # under torchrun: another process died mid-collective
        err = lost_peer(e, cfg.out)
        if err is None:
            raise
        raise err from None
    return 0
