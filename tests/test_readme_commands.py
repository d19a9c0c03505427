"""The README's commands run as a reader would paste them: the first `lorakit train` command of
"Training" (on a small data file of its own names), `lorakit inspect DIR` on what it wrote, and
`lorakit --help` / `python -m lorakit --help` from "Command line". (The torchrun command has its
own test; `make demo` and `make test` run in CI.)"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.cli.serve import add_arguments
from lorakit.train.datasets import bbc_news, split, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin, where `lorakit` is installed


def bash_blocks(section: str) -> list[list[str]]:
    """The commands of a README section's ```bash blocks, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    body = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert body, f"README.md has no '## {section}' section"
    blocks = []
    for block in re.findall(r"^```bash\n(.*?)^```", body.group(1), re.S | re.M):
        commands, current = [], ""
        for line in block.splitlines():
            current += line.rstrip("\\").strip() + " "
            if not line.endswith("\\"):
                commands.append(current.split("  #")[0].strip())
                current = ""
        blocks.append([c for c in commands if c and not c.startswith("#")])
    return blocks


def run(cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    return subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_training_command_and_inspect_run_as_written(tmp_path):
    first = bash_blocks("Training: `lorakit train`")[0][0]
    assert first.startswith("lorakit train --model minilm") and "..." not in first
    args = shlex.split(first)
    for opt in ("--data", "--eval-data"):  # the files it names, made small: the command itself is unchanged
        train, test = split(bbc_news(), 24, 12, seed=0)
        write_jsonl(tmp_path / args[args.index(opt) + 1], train if opt == "--data" else test)
    done = run(first, tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    out = tmp_path / args[args.index("--out") + 1]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "classification" and 0.0 <= metrics["final_eval"]["accuracy"] <= 1.0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == int(args[args.index("--r") + 1]) and config["lora_alpha"] == int(args[args.index("--alpha") + 1])

    line = next(c for c in bash_blocks("Command line")[0] if c.startswith("lorakit inspect DIR"))
    done = run(line.replace("DIR", shlex.quote(str(out)), 1), tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    r = args[args.index("--r") + 1]
    assert re.search(rf"^\s+r\s+{r}$", done.stdout, re.M) and f"ranks [{r}]" in done.stdout, done.stdout[-2000:]
    assert (tmp_path / f"inspect-{out.name}.png").stat().st_size > 1000  # the plot, written here as it says


def test_help_commands_run_as_written(tmp_path):
    lines = bash_blocks("Command line")[0]
    helps = [c for c in lines if c.startswith("lorakit --help")]
    assert helps, "the README's Command line section lost its `lorakit --help` line"
    for cmd in helps:
        done = run(cmd, tmp_path)
        assert done.returncode == 0 and "demo" in done.stdout and "serve" in done.stdout, done.stderr[-2000:]
    done = run(f"{shlex.quote(sys.executable)} -m lorakit --help", tmp_path)
    assert done.returncode == 0 and "train" in done.stdout, done.stderr[-2000:]


def test_serve_dtype_takes_the_precision_names_too(capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for given, want in (("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp32", "float32"), ("auto", "auto")):
        assert parser.parse_args(["--dtype", given]).dtype == want
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "int4"])
    assert "invalid choice" in capsys.readouterr().err
