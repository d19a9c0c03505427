"""`lorakit train` under torchrun: 2 CPU processes (gloo), DDP and FSDP2, against 1 process.

The oracle is the single-process run with the same global batch (batch 8 vs 2 x 4): same
examples per step, so the adapters agree up to float rounding. The data has 41 examples, so the
last global batch of each epoch holds one example and one process gets none: its loss weight is
0, and the comparison fails if the losses are not weighted by each process's share. Dropout is
off everywhere (LoRA and the tiny BERT's own), as the processes draw different masks.

Four torchrun launches (DDP, FSDP, FSDP killed mid-run, its 2-process resume); the 1-process
reference and the 1-process resume run in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train_support import bert_folder, topic_records, write_jsonl

from lorakit.train import train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or sys.platform != "linux",
                                reason="needs torch.distributed (gloo) and /proc")

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = dict(task="classification", epochs=6, lr=5e-3, dropout=0.0, seed=3, threads=1, precision="fp32")
GLOBAL_BATCH = 8
TOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = bert_folder(root / "bert")
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (model / "config.json").write_text(json.dumps(cfg))
    data = write_jsonl(root / "train.jsonl", topic_records(41))
    evald = write_jsonl(root / "eval.jsonl", topic_records(8, seed=1))
    entry = root / "entry.py"  # torchrun runs a script: the `lorakit` command of this tree
    entry.write_text("import sys\nfrom lorakit.cli import main\nsys.exit(main())\n")
    ref = train(model=str(model), data=str(data), eval_data=str(evald), out=str(root / "ref"),
                batch_size=GLOBAL_BATCH, progress=False, **OPTIONS)
    assert ref.metrics["steps"] == 36  # ceil(41 / 8) = 6 per epoch
    return dict(root=root, model=model, data=data, eval=evald, entry=entry, ref=ref)


def _torchrun(s, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(s["entry"]), "train", "--model", str(s["model"]), "--data", str(s["data"]),
           "--eval-data", str(s["eval"]), "--out", str(out), "--batch-size", str(GLOBAL_BATCH // 2),
           *[a for k, v in OPTIONS.items() for a in (f"--{k.replace('_', '-')}", str(v))], *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log[-4000:]
    return log


def _assert_same_adapter(a_dir: Path, b_dir: Path) -> None:
    a, b = load_file(a_dir / "adapter_model.safetensors"), load_file(b_dir / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.allclose(a[k], b[k], rtol=0, atol=TOL), (k, (a[k] - b[k]).abs().max().item())
    # the adapter trained: B moved away from its zero init (a shard-only or empty file fails here)
    assert all(b[k].abs().max() > 1e-3 for k in b if "lora_B" in k)
    assert json.loads((a_dir / "adapter_config.json").read_text()) == json.loads((b_dir / "adapter_config.json").read_text())


def _assert_same_history(ref: dict, got: dict) -> None:
    assert [s for s, _ in got["loss_history"]] == [s for s, _ in ref["loss_history"]]
    for (_, x), (_, y) in zip(ref["loss_history"], got["loss_history"]):
        assert abs(x - y) < TOL
    for e_ref, e_got in zip(ref["epochs"], got["epochs"], strict=True):
        assert abs(e_ref["eval"]["loss"] - e_got["eval"]["loss"]) < TOL


def test_ddp_two_processes_train_the_one_process_adapter(setup):
    out = setup["root"] / "ddp"
    log = _finish(_torchrun(setup, out, "--strategy", "ddp"))
    _assert_same_adapter(setup["ref"].out, out)
    m = json.loads((out / "metrics.json").read_text())
    _assert_same_history(setup["ref"].metrics, m)
    d = m["distributed"]
    assert (d["strategy"], d["world_size"], d["backend"]) == ("ddp", 2, "gloo")
    # DDP reduces the adapter (LoRA A/B + the classifier copy) and nothing of the frozen base
    assert d["reduced_bytes"] == d["trainable_bytes"] == 4 * m["trainable_params"]
    assert d["reduced_tensors"] == d["trainable_tensors"] and d["frozen_bytes"] > 10 * d["trainable_bytes"]
    # rank 0 alone logs and writes
    assert log.count("lorakit train: lora done") == 1
    assert log.count("epoch 6 (step 36/36)") == 1
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "loss.png", "metrics.json"]


def test_fsdp_two_processes_train_the_one_process_adapter_and_peft_loads_it(setup):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = setup["root"] / "fsdp"
    _finish(_torchrun(setup, out, "--strategy", "fsdp"))
    _assert_same_adapter(setup["ref"].out, out)
    m = json.loads((out / "metrics.json").read_text())
    _assert_same_history(setup["ref"].metrics, m)
    d = m["distributed"]
    assert d["strategy"] == "fsdp" and d["fsdp_units"] >= 3  # embeddings, 2 layers (+ root)
    whole = d["frozen_bytes"] + d["trainable_bytes"]
    assert d["local_param_bytes"] <= 0.55 * whole  # each process holds about half of the base

    # independent reader: PEFT loads the file written from shards onto a fresh base and predicts
    # as the single-process model does
    base = AutoModelForSequenceClassification.from_pretrained(setup["model"], num_labels=3)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    ref_model = setup["ref"].model.eval()
    x = torch.randint(3, 300, (4, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=x).logits, ref_model(input_ids=x).logits,
                                   rtol=0, atol=1e-4)


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (a child of the launcher)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and f"RANK={rank}".encode() in (d / "environ").read_bytes().split(b"\0"):
                return int(d.name)
        except (OSError, IndexError, ValueError):
            continue
    return None


def test_killed_rank_fails_the_job_and_resume_continues_with_1_or_2_processes(setup):
    out = setup["root"] / "killed"
    proc = _torchrun(setup, out, "--strategy", "fsdp", "--save-every", "3")
    ckdir, deadline = out / "checkpoints", time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if ckdir.is_dir() and any(p.name.startswith("step-") for p in ckdir.iterdir()):
            break
        time.sleep(0.01)
    victim = _rank_pid(proc.pid, 1)
    assert proc.poll() is None and victim is not None, "the run ended before it could be killed"
    os.kill(victim, signal.SIGKILL)
    log = proc.communicate(timeout=60)[0]

    assert proc.returncode != 0
    assert "SIGKILL" in log or "Signal 9" in log, log[-3000:]  # torchrun's summary names rank 1
    # rank 0's own message (unless torchrun's SIGTERM reached it first)
    assert "lost contact with another training process" in log or "SIGTERM" in log, log[-3000:]
    assert not (out / "metrics.json").exists()
    saved = sorted(int(p.name[5:]) for p in ckdir.iterdir() if p.name.startswith("step-"))
    assert saved and saved[-1] < 36
    # the checkpoint holds whole tensors (gathered from the shards), not one process's half
    state = load_file(ckdir / f"step-{saved[-1]:08d}" / "state.safetensors")
    ref_adapter = load_file(setup["ref"].out / "adapter_model.safetensors")
    a_key = next(k for k in state if k.startswith("param/") and k.endswith("query.lora_A.default"))
    assert state[a_key].shape == next(v for k, v in ref_adapter.items() if "query.lora_A" in k).shape

    # --resume with 2 processes (FSDP: rank 0 reads the checkpoint and sends it; each process
    # cuts its shards of the weights and the optimizer state), on a copy of the killed run
    again = setup["root"] / "killed-2proc"
    shutil.copytree(out, again)
    log = _finish(_torchrun(setup, again, "--strategy", "fsdp", "--save-every", "3", "--resume"))
    assert f"resuming from step-{saved[-1]:08d}" in log
    _assert_same_adapter(setup["ref"].out, again)
    _assert_same_history(setup["ref"].metrics, json.loads((again / "metrics.json").read_text()))

    # --resume with another world size (1 process, same global batch): the reference adapter
    res = train(model=str(setup["model"]), data=str(setup["data"]), eval_data=str(setup["eval"]), out=str(out),
                batch_size=GLOBAL_BATCH, resume=True, save_every=3, progress=False, **OPTIONS)
    assert res.metrics["resumed_from_steps"] == [saved[-1]]
    _assert_same_adapter(setup["ref"].out, out)
    _assert_same_history(setup["ref"].metrics, res.metrics)


@pytest.mark.parametrize("n", [1, 7, 16, 41, 64])
def test_two_processes_see_the_one_process_global_batches(n):
    """The sharding rule itself: at every step, ranks 0 and 1 with batch 4 hold exactly the
    examples of the 1-process batch of 8 (none twice, none dropped), and agree on the step count."""
    from lorakit.train.dist import Dist

    one, ranks = Dist(), [Dist(rank=r, world_size=2) for r in range(2)]
    steps = one.batches_per_epoch(n, 8)
    assert [d.batches_per_epoch(n, 4) for d in ranks] == [steps, steps]
    for epoch in range(2):
        order = one.epoch_order(n, epoch, seed=5)
        parts = [d.epoch_order(n, epoch, seed=5) for d in ranks]
        for i in range(steps):
            merged = sorted(x for p in parts for x in p[i * 4:(i + 1) * 4])
            assert merged == sorted(order[i * 8:(i + 1) * 8])


def test_lost_peer_only_explains_communication_failures(monkeypatch, tmp_path):
    from lorakit.train.dist import lost_peer

    err = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
    assert lost_peer(err, tmp_path) is None  # one process: not ours to explain
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), tmp_path) is None
    msg = str(lost_peer(err, tmp_path))
    assert "lost contact with another training process" in msg and "no checkpoint was written yet" in msg
