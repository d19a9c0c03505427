"""Kill-safe resume: a real `lorakit train` subprocess, killed with SIGKILL at an arbitrary step
(twice), resumed, must end with an adapter bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train_support import bert_folder, topic_records, write_jsonl

from lorakit.train import train

ROOT = Path(__file__).resolve().parents[1]
LORAKIT = [sys.executable, "-c", "import sys; from lorakit.cli import main; sys.exit(main(sys.argv[1:]))"]


def _cmd(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    # dropout on (LoRA 0.1 and BERT's own 0.1): the RNG state must be restored for identity
    return [*LORAKIT, "train", "--model", str(model), "--data", str(data),
            "--out", str(out), "--task", "classification", "--epochs", "12", "--batch-size", "4",
            "--lr", "5e-3", "--dropout", "0.1", "--seed", "3", "--threads", "1", "--save-every", "7",
            "--quiet", *extra]


def _steps_saved(out: Path) -> list[int]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.iterdir() if p.name.startswith("step-"))


def _run_and_kill(cmd: list[str], out: Path, after_step: int, rng: random.Random) -> int:
    """Start the run; once a checkpoint past `after_step` exists, SIGKILL it after a random delay
    (so the kill lands mid-step, mid-eval or mid-checkpoint-write). Returns the last saved step."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if any(s > after_step for s in _steps_saved(out)):
            time.sleep(rng.uniform(0.0, 0.15))
            break
        time.sleep(0.01)
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    log = proc.communicate()[0].decode()
    assert still_running, f"the run finished before it could be killed; make it longer\n{log}"
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()
    return max(_steps_saved(out))


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    model = bert_folder(tmp_path / "bert")
    data = write_jsonl(tmp_path / "train.jsonl", topic_records(48))
    evald = write_jsonl(tmp_path / "eval.jsonl", topic_records(12, seed=1))
    rng = random.Random()

    # reference: uninterrupted, in this process (one thread, like the subprocesses)
    ref = train(model=str(model), data=str(data), eval_data=str(evald), out=str(tmp_path / "ref"),
                task="classification", epochs=12, batch_size=4, lr=5e-3, dropout=0.1, seed=3,
                threads=1, progress=False)
    assert ref.metrics["steps"] == 144

    out = tmp_path / "killed"
    cmd = _cmd(model, data, out, "--eval-data", str(evald))
    first = _run_and_kill(cmd, out, after_step=0, rng=rng)
    second = _run_and_kill(cmd + ["--resume"], out, after_step=first, rng=rng)
    assert second > first
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resuming from step-{second:08d}" in done.stdout

    a = (tmp_path / "ref" / "adapter_model.safetensors").read_bytes()
    b = (out / "adapter_model.safetensors").read_bytes()
    assert a == b, f"adapter differs after kills at checkpoints {first}, {second}"
    assert (tmp_path / "ref" / "adapter_config.json").read_text() == (out / "adapter_config.json").read_text()
    got = json.loads((out / "metrics.json").read_text())
    assert got["loss_history"] == ref.metrics["loss_history"]
    assert got["epochs"] == ref.metrics["epochs"]
    assert got["resumed_from_steps"] == [first, second]
    assert not (out / "checkpoints").exists()  # cleaned up once the final files are written


def test_optimizer_state_round_trips_without_pickle():
    """AdamW state through safetensors tensors + JSON: the next step is identical."""
    import torch

    from lorakit.train import checkpoint

    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=0.1)
    for _ in range(3):
        p.grad = torch.randn(3, 2)
        opt.step()
    from safetensors.torch import load, save

    tensors, meta = checkpoint.optimizer_to_flat(opt)
    tensors, meta = load(save(tensors)), json.loads(json.dumps(meta))  # through the file formats
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.AdamW([q], lr=0.5)
    checkpoint.optimizer_from_flat(opt2, tensors, meta)
    g = torch.randn(3, 2)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(p, q)


def test_resume_refuses_other_options(tmp_path, monkeypatch):
    from lorakit import LoraError
    from lorakit.train import precision

    monkeypatch.setattr(precision, "cpu_bf16", lambda: "AMX-BF16")  # auto = bf16 (emulated where it is not fast)

    model = bert_folder(tmp_path / "bert")
    data = write_jsonl(tmp_path / "train.jsonl", topic_records(16))
    common = dict(model=str(model), data=str(data), out=str(tmp_path / "o"), epochs=2, batch_size=4,
                  threads=1, progress=False)
    # leave a checkpoint behind, as a killed run would: save at step 4, then "crash"
    from lorakit.train import checkpoint as ck

    real_clear = ck.clear
    ck.clear = lambda out: None  # keep the checkpoints the finished run would delete
    try:
        train(save_every=4, **common)
    finally:
        ck.clear = real_clear
    assert ck.latest(tmp_path / "o") is not None
    with pytest.raises(LoraError, match=r"other options.*lr"):
        train(resume=True, lr=1e-2, **common)
    with pytest.raises(LoraError, match=r"other options.*precision"):  # the run was bf16 (auto)
        train(resume=True, precision="fp32", **common)
    data.write_text(data.read_text() + json.dumps({"text": "goal", "label": "sport"}) + "\n")
    with pytest.raises(LoraError, match="data file changed"):
        train(resume=True, **common)
