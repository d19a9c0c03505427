"""Training data: read JSONL or CSV, validate every record up front, tokenize, batch.

Every problem is reported before training starts, naming the file and line, because a typo
found after an hour of training is an hour lost.

classification: records {"text": str, "label": str | int}
causal-lm:      records {"prompt": str, "completion": str} (loss on the completion only) or
                {"text": str} (loss on every token)
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import LoraError

IGNORE = -100  # label value the loss skips (transformers' convention)


@dataclass(frozen=True)
class Example:
    """One validated record and where it came from (for error messages)."""

    where: str  # "file:line"
    text: str | None = None
    label: str | None = None
    prompt: str | None = None
    completion: str | None = None


def read_records(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, record) pairs from a .csv/.tsv (header row) or JSON Lines file."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"{path}: no such data file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LoraError(f"{path}: not UTF-8 text ({e})") from None
    if not raw.strip():
        raise LoraError(f"{path}: empty file (no examples)")
    if path.suffix.lower() in (".csv", ".tsv"):
        reader = csv.DictReader(raw.splitlines(keepends=True), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        out = []
        try:
            for row in reader:
                if None in row:
                    raise LoraError(f"{path}:{reader.line_num}: more fields than the header has columns")
                out.append((reader.line_num, row))
        except csv.Error as e:
            raise LoraError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
        if not out:
            raise LoraError(f"{path}: has a header but no examples")
        return out
    out = []
    for n, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except ValueError as e:
            raise LoraError(f"{path}:{n}: not valid JSON ({e.args[0] if e.args else e})") from None
    return out


def _string(path: Path, n: int, rec: dict, key: str, allow_empty: bool = False) -> str:
    v = rec[key]
    if not isinstance(v, str):
        raise LoraError(f"{path}:{n}: {key!r} must be a string, got {type(v).__name__} {v!r}")
    if not allow_empty and not v.strip():
        raise LoraError(f"{path}:{n}: {key!r} is empty")
    return v


def load_examples(path: str | Path, task: str) -> list[Example]:
    """Read and validate one data file for `task`."""
    path = Path(path)
    examples = []
    for n, rec in read_records(path):
        if not isinstance(rec, dict):
            raise LoraError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        where = f"{path}:{n}"
        if task == "classification":
            for key in ("text", "label"):
                if key not in rec:
                    raise LoraError(f"{path}:{n}: missing column {key!r} (classification needs 'text' and 'label'; "
                                    f"found {sorted(rec)})")
            label = rec["label"]
            if isinstance(label, bool) or not isinstance(label, (str, int)) or (isinstance(label, str) and not label.strip()):
                raise LoraError(f"{path}:{n}: 'label' must be a non-empty string or an integer, got {label!r}")
            examples.append(Example(where, text=_string(path, n, rec, "text"), label=str(label)))
        elif task == "causal-lm":
            if "prompt" in rec or "completion" in rec:
                for key in ("prompt", "completion"):
                    if key not in rec:
                        raise LoraError(f"{path}:{n}: missing column {key!r} (causal-lm needs 'prompt' and "
                                        f"'completion', or 'text'; found {sorted(rec)})")
                examples.append(Example(where, prompt=_string(path, n, rec, "prompt", allow_empty=True),
                                        completion=_string(path, n, rec, "completion")))
            elif "text" in rec:
                examples.append(Example(where, text=_string(path, n, rec, "text")))
            else:
                raise LoraError(f"{path}:{n}: missing column 'text' (causal-lm needs 'prompt' and 'completion', "
                                f"or 'text'; found {sorted(rec)})")
        else:
            raise LoraError(f"task {task!r}: expected 'classification' or 'causal-lm'")
    if not examples:
        raise LoraError(f"{path}: empty file (no examples)")
    return examples


def label_names(train: Sequence[Example]) -> list[str]:
    """Class names in a fixed order: numeric order if all are integers, else sorted text."""
    names = set(e.label for e in train)
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def check_eval_labels(eval_examples: Sequence[Example], labels: Sequence[str], train_path: str | Path) -> None:
    known = set(labels)
    for e in eval_examples:
        if e.label not in known:
            raise LoraError(f"{e.where}: label {e.label!r} never appears in the training data {train_path} "
                            f"(its labels: {list(labels)})")


@dataclass
class Encoded:
    """Token ids per example; labels are class ids (classification) or per-token targets."""

    input_ids: list[list[int]]
    labels: list[int] | list[list[int]]
    prompts: list[list[int] | None]  # causal-lm prompt ids, for generation (None: a "text" record)
    completions: list[str | None]

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(examples: Sequence[Example], task: str, tokenizer: Any, max_length: int,
           labels: Sequence[str] | None = None) -> Encoded:
    """Tokenize. causal-lm: prompt and completion are tokenized apart (as generation sees them),
    an EOS ends the completion, and the prompt is cut from the left if the pair is too long."""
    if task == "classification":
        index = {name: i for i, name in enumerate(labels or [])}
        ids = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)["input_ids"]
        return Encoded([list(x) for x in ids], [index[e.label] for e in examples], [None] * len(ids), [None] * len(ids))
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LoraError("causal-lm training needs a tokenizer with an end-of-sequence token")
    out = Encoded([], [], [], [])
    for e in examples:
        if e.completion is not None:
            p = list(tokenizer(e.prompt)["input_ids"]) if e.prompt else []
            c = list(tokenizer(e.completion, add_special_tokens=False)["input_ids"]) + [eos]
            c = c[:max_length]
            p = p[max(0, len(p) + len(c) - max_length):]
            out.input_ids.append(p + c)
            out.labels.append([IGNORE] * len(p) + c)
            out.prompts.append(p)
            out.completions.append(e.completion)
        else:
            ids = (list(tokenizer(e.text)["input_ids"]) + [eos])[:max_length]
            out.input_ids.append(ids)
            out.labels.append(list(ids))
            out.prompts.append(None)
            out.completions.append(None)
    return out


def collate(data: Encoded, idx: Sequence[int], pad_id: int, task: str) -> dict[str, torch.Tensor]:
    """Right-padded batch of the examples at `idx` (padding never counts in the loss)."""
    seqs = [data.input_ids[i] for i in idx]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, :len(s)] = 1
    if task == "classification":
        labels = torch.tensor([data.labels[i] for i in idx], dtype=torch.long)
    else:
        labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        for row, i in enumerate(idx):
            lab = data.labels[i]
            labels[row, :len(lab)] = torch.tensor(lab, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
