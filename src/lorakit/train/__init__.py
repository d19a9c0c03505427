"""Fine-tune a model with LoRA (or fully, for comparison) on JSONL/CSV data; kill-safe resume.

    from lorakit.train import train
    result = train(model="minilm", data="train.jsonl", eval_data="test.jsonl",
                   task="classification", out="runs/topic", epochs=2)
    result.metrics["final_eval"]["accuracy"]

The same as `lorakit train --model minilm --data train.jsonl ...`; a TOML file can hold the
options (`TrainConfig.from_file`).
"""

from .config import TrainConfig
from .loop import TrainResult, generate, resolve_device, train
from .loss import causal_lm_loss, linear_cross_entropy

__all__ = ["TrainConfig", "TrainResult", "causal_lm_loss", "generate", "linear_cross_entropy", "resolve_device", "train"]
