"""The README's torchrun command runs as written, and `--rank` is the rank's name that torchrun
lets through (torchrun's own parser reads `--r` as an ambiguous abbreviation of its options)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.cli.train import add_arguments, config_from_args
from lorakit.train import TrainConfig
from lorakit.train.datasets import bbc_headlines, split, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: `torchrun` and `lorakit` as the README names them


def readme_torchrun_command() -> str:
    """The first torchrun command of the README's "Distributed training" bash block, with its
    continuation lines, exactly as a reader would paste it."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Distributed training\n(.*?)^## ", text, re.S | re.M)
    assert section, "README.md has no '## Distributed training' section"
    block = re.search(r"^```bash\n(.*?)^```", section.group(1), re.S | re.M)
    assert block, "the 'Distributed training' section has no ```bash block"
    lines = block.group(1).splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("torchrun ")), None)
    assert start is not None, "no line of the block starts with 'torchrun '"
    end = start
    while lines[end].endswith("\\"):
        end += 1
    return "\n".join(lines[start:end + 1])


def test_readme_torchrun_command_runs_as_written(tmp_path):
    cmd = readme_torchrun_command()
    assert "--rank 4" in cmd and "--r " not in cmd and "lorakit train" in cmd and "train.jsonl" in cmd
    train, _ = split(bbc_headlines(), 16, 0, seed=0)
    write_jsonl(tmp_path / "train.jsonl", train)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    out = tmp_path / "runs" / "topic"
    assert (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4


def _parse(*argv: str) -> TrainConfig:
    """What `lorakit train <argv>` would train, through the command's own parser."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


COMMON = ("--model", "minilm", "--data", "train.jsonl", "--out", "runs/topic")


def test_rank_and_r_are_one_option(tmp_path):
    long, short = _parse(*COMMON, "--rank", "4"), _parse(*COMMON, "--r", "4")
    assert long.r == short.r == 4 and long == short
    assert _parse(*COMMON, "--rank=6").r == 6
    assert _parse(*COMMON).r == 8
    for key in ("r", "rank"):  # a TOML file may say either; the command line wins over it
        toml = tmp_path / f"{key}.toml"
        toml.write_text(f'[train]\nmodel = "minilm"\ndata = "d.jsonl"\nout = "o"\n{key} = 12\n')
        assert _parse("--config", str(toml)).r == 12
        assert _parse("--config", str(toml), "--rank", "3").r == 3
        assert _parse("--config", str(toml), "--r", "3").r == 3


def test_rank_given_twice_differently_is_an_error(tmp_path):
    import lorakit as lk

    with pytest.raises(lk.LoraError, match="rank=4 and r=6"):
        TrainConfig.from_dict({"model": "m", "data": "d", "out": "o", "rank": 4, "r": 6})
    toml = tmp_path / "both.toml"
    toml.write_text('model = "m"\ndata = "d"\nout = "o"\nr = 2\nrank = 3\n')
    with pytest.raises(lk.LoraError, match="both.toml: rank=3 and r=2"):
        TrainConfig.from_file(toml)
    assert TrainConfig.from_dict({"model": "m", "data": "d", "out": "o", "rank": 4, "r": 4}).r == 4
