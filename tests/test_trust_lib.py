"""Issue 13, library side: untrusted adapter configs and folders are handled in bounded time,
names are validated in full, modules_to_save entries must exist, adapter folders are read once
(with a digest, confined to a root), and `lorakit train` checks its optional dependencies first."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tiny import tiny_bert, tiny_llama

import lorakit as lk
from lorakit import config as lkconfig
from lorakit import patterns
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME

ROOT = Path(__file__).resolve().parents[1]
# Catastrophic on a module path for both `re` and `regex` (the \d{5} defeats regex's literal
# pre-check; (.|..|...)* splits a 30-character path in ~10^8 ways before failing).
HOSTILE = r"(.|..|...)*\d{5}"


def llama30():
    """A 30-layer Llama with tiny sizes: real module paths, ~300 of them."""
    return tiny_llama(num_hidden_layers=30, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- 1. pattern matching in bounded time -------------------------------------------------------
HOSTILE_CONFIGS = {
    "targets": dict(targets=HOSTILE),
    "exclude": dict(targets=["q_proj"], exclude=HOSTILE),
    "rank_pattern": dict(targets=["q_proj"], rank_pattern={HOSTILE: 4}),
    "alpha_pattern": dict(targets=["q_proj"], alpha_pattern={HOSTILE: 4.0}),
    "layers_pattern": dict(targets=["q_proj"], layers_to_transform=[0], layers_pattern=HOSTILE),
}


@pytest.mark.parametrize("field", list(HOSTILE_CONFIGS))
def test_hostile_pattern_fails_fast_and_lets_other_threads_run(field):
    model = llama30()
    before = _state(model)
    cfg = lk.LoraConfig(**HOSTILE_CONFIGS[field])
    ticks: list[float] = []
    stop = threading.Event()

    def ticker():  # runs only while the matcher releases the GIL
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.005)

    th = threading.Thread(target=ticker)
    th.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(lk.LoraError, match=rf"LoraConfig\.{field}: pattern .* took over .*simpler pattern"):
            lk.inject(model, cfg, "x")
        took = time.perf_counter() - t0
    finally:
        stop.set()
        th.join()
    assert took < 1.0, took
    assert took > 0.5 * patterns.MATCH_BUDGET_S  # it really was the budget that stopped it
    assert len(ticks) > 20, len(ticks)  # another thread kept running during the match
    assert lk.list_adapters(model) == [] and _same(before, _state(model))


def test_hostile_config_in_an_adapter_folder_fails_fast(tmp_path):
    model = llama30()
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, targets=["q_proj"]), "a")
    folder = lk.save_adapter(model, tmp_path / "bad", "a")
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta["rank_pattern"] = {HOSTILE: 2}
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    fresh = llama30()
    before = _state(fresh)
    t0 = time.perf_counter()
    with pytest.raises(lk.LoraError, match=r"bad.*rank_pattern: pattern"):
        lk.load_adapter(fresh, folder, "b")
    assert time.perf_counter() - t0 < 1.5  # budget 0.8 s + reading the folder
    assert _same(before, _state(fresh)) and lk.list_adapters(fresh) == []


def _calibrated_path(target_s: float) -> str:
    """A subject on which HOSTILE takes about `target_s` to fail (grown until it does)."""
    compiled = patterns._compiled(HOSTILE)
    for n in range(8, 40):
        s = "a" * n
        t0 = time.perf_counter()
        try:
            compiled.match(s, timeout=5)
        except TimeoutError:
            pass
        if time.perf_counter() - t0 > target_s:
            return s
    raise AssertionError("could not calibrate")


def test_one_budget_is_shared_by_every_match_of_an_operation():
    subject = _calibrated_path(0.03)  # each match alone: ~0.03-0.1 s, far inside any budget
    t0 = time.perf_counter()
    assert patterns.match_pattern("targets", HOSTILE, HOSTILE, subject) is None  # alone: fine
    one = time.perf_counter() - t0
    budget = max(0.2, 3 * one)
    t0 = time.perf_counter()
    with pytest.raises(lk.LoraError, match=r"targets: pattern .* took over"):
        with patterns.match_budget(budget):
            with patterns.match_budget(100.0):  # nested: joins the outer budget, no fresh one
                for _ in range(40):
                    patterns.match_pattern("targets", HOSTILE, HOSTILE, subject)
    took = time.perf_counter() - t0
    assert took < budget + one + 0.1, (took, budget, one)
    # the budget is released with its operation: the next one starts afresh
    assert patterns.match_pattern("targets", HOSTILE, HOSTILE, subject) is None


PEFT_PATTERNS = [
    dict(target_modules=r"^(?!.*vision).*\.(q_proj|v_proj)"),
    dict(target_modules=r".*\.layers\.(1|2|17)\.self_attn\.(q|k)_proj"),
    dict(target_modules=r"model\.layers\.\d+\.mlp\.(gate|up)_proj"),
    dict(target_modules=["q_proj", "v_proj", "down_proj"], exclude_modules=r".*\.layers\.[0-9]\..*"),
    dict(target_modules=["q_proj", "o_proj"], exclude_modules=["model.layers.3.self_attn.o_proj"]),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 5, 29], layers_pattern="layers"),
    dict(target_modules=["gate_proj"], layers_to_transform=[2, 3], layers_pattern=["blocks", "layers"]),
    dict(target_modules=["q_proj", "k_proj"], layers_to_transform=7),
]
RANK_PATTERNS = {r"q_proj": 4, r"model\.layers\.1\d\.self_attn\.k_proj": 6, r"layers\.(2|3)\..*v_proj": 2}


@pytest.mark.parametrize("kw", PEFT_PATTERNS, ids=range(len(PEFT_PATTERNS)))
def test_ordinary_patterns_match_as_peft_matches(kw):
    """Oracle: PEFT's own check_target_module_exists / get_pattern_key (Python's re)."""
    from peft import LoraConfig as PeftConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    model = llama30()
    theirs = PeftConfig(r=8, lora_alpha=8, rank_pattern=RANK_PATTERNS, alpha_pattern=RANK_PATTERNS, **kw)
    ours = lk.LoraConfig.from_peft({**kw, "r": 8, "lora_alpha": 8, "rank_pattern": RANK_PATTERNS,
                                    "alpha_pattern": RANK_PATTERNS})
    paths = [p for p, _ in model.named_modules() if p]
    hits = 0
    for path in paths:
        want = bool(check_target_module_exists(theirs, path))
        assert lkconfig.matches(ours, path) == want, path
        hits += want
        key = get_pattern_key(list(RANK_PATTERNS), path)
        assert ours.rank_for(path) == RANK_PATTERNS.get(key, 8), path
        assert ours.alpha_for(path) == RANK_PATTERNS.get(key, 8), path
    assert hits > 0
    assert len(lk.find_targets(model, ours)) == hits


@pytest.mark.parametrize("kw, field", [
    (dict(layers_pattern="("), "layers_pattern"),
    (dict(layers_pattern=["layers", "a(?P<idx>b)"]), "layers_pattern"),
    (dict(targets="q_proj)"), "targets"),
    (dict(targets=["q"], exclude="[z-a]"), "exclude"),
    (dict(rank_pattern={"(?<=a+)b": 2}), "rank_pattern"),  # valid for `regex`, not for Python's re
    (dict(alpha_pattern={"a)|(b": 2}), "alpha_pattern"),  # balanced only inside PEFT's template
    (dict(targets="(?:x){e<=1}"), "targets"),  # a `regex`-only feature (fuzzy matching): PEFT could not read it
    (dict(targets="(" * 1000 + "a" + ")" * 1000), "targets"),  # Python's parser: RecursionError
    (dict(targets="((a{1000}){1000}){1000}"), "targets"),  # `regex` would expand this at compile time
    (dict(targets="x" * 5000), "targets"),
    (dict(targets=["q"] * 10_001), "targets"),
    (dict(targets=["q" * 5000]), "targets"),
    (dict(rank_pattern={f"k{i}": 2 for i in range(10_001)}), "rank_pattern"),
    (dict(modules_to_save=["m"] * 10_001), "modules_to_save"),
    (dict(layers_to_transform=list(range(10_001))), "layers_to_transform"),
])
def test_bad_patterns_are_refused_when_the_config_is_made(kw, field):
    t0 = time.perf_counter()
    with pytest.raises(lk.LoraError, match=rf"LoraConfig\.{field}=") as err:
        lk.LoraConfig(**kw)
    assert time.perf_counter() - t0 < 1.0
    assert len(str(err.value)) < 1000  # a hostile value is not echoed whole


def test_layers_pattern_paren_in_a_peft_file_is_a_lora_error(tmp_path):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=2, targets=["q_proj"]), "a")
    folder = lk.save_adapter(model, tmp_path / "a", "a")
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta.update(layers_pattern="(", layers_to_transform=[0])
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(lk.LoraError, match=r"adapter_config.json: LoraConfig.layers_pattern='\('"):
        lk.read_adapter(folder)


def test_match_outside_any_budget_gets_the_default_budget_alone():
    t0 = time.perf_counter()
    with pytest.raises(lk.LoraError, match="took over 0.8 s"):
        patterns.match_pattern("targets", HOSTILE, HOSTILE, "model.layers.12.self_attn.q_proj", full=True)
    assert 0.5 < time.perf_counter() - t0 < 1.0


# ---- 2. adapter names ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a", "A9", "9lives", "x_y-z", "a" * 64])
def test_good_adapter_names(name):
    assert lk.inject(tiny_llama(), lk.LoraConfig(r=2, targets=["q_proj"]), name) is not None


@pytest.mark.parametrize("name", ["a\n", "a\nb", "", "a" * 65, "a" * 1_000_000, "_a", "-a", "a b", "a/b", "a.b",
                                  "é", "a\x00", "ａ"])
def test_bad_adapter_names_name_the_rule(name):
    with pytest.raises(lk.LoraError, match=r"use 1 to 64 ASCII letters, digits, '_' and '-', starting with a letter or digit") as err:
        lk.inject(tiny_llama(), lk.LoraConfig(r=2, targets=["q_proj"]), name)
    assert len(str(err.value)) < 400


# ---- 3. modules_to_save -------------------------------------------------------------------------
def test_inject_refuses_a_modules_to_save_entry_that_matches_nothing():
    model = tiny_bert()
    before = _state(model)
    with pytest.raises(lk.TargetError, match="modules_to_save entry 'clasifier' matches no module"):
        lk.inject(model, lk.LoraConfig(r=2, targets=["query"], modules_to_save=["classifier", "clasifier"]))
    assert _same(before, _state(model)) and not lk.list_adapters(model)


def test_load_refuses_a_modules_to_save_entry_that_matches_nothing(tmp_path):
    model = tiny_bert()
    lk.inject(model, lk.LoraConfig(r=2, targets=["query"], modules_to_save=["classifier"]), "a")
    folder = lk.save_adapter(model, tmp_path / "a", "a")
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta["modules_to_save"] = ["classifier", "pooler_head"]
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    fresh = tiny_bert()
    before = _state(fresh)
    with pytest.raises(lk.AdapterFileError, match=r"adapter_model.safetensors: modules_to_save entry 'pooler_head'"):
        lk.load_adapter(fresh, folder, "a")
    assert _same(before, _state(fresh))


def test_peft_automatic_classifier_names_may_match_nothing(tmp_path):
    """PEFT writes modules_to_save ["classifier", "score"] for every SEQ_CLS adapter; BERT has no
    `score`. Such files keep loading, and give the same weights back."""
    model = tiny_bert()
    lk.inject(model, lk.LoraConfig(r=2, targets=["query"], modules_to_save=["classifier", "score"],
                                   task_type="SEQ_CLS", init=False), "a")
    with torch.no_grad():
        model.classifier.modules_to_save["a"].weight.normal_()
    folder = lk.save_adapter(model, tmp_path / "a", "a")
    fresh = lk.load_adapter(tiny_bert(), folder, "a")
    assert torch.equal(fresh.classifier.modules_to_save["a"].weight, model.classifier.modules_to_save["a"].weight)
    with pytest.raises(lk.TargetError, match="'score'"):  # without the task type, no exemption
        lk.inject(tiny_bert(), lk.LoraConfig(r=2, targets=["query"], modules_to_save=["classifier", "score"]))


# ---- 5. read once, with a digest, confined ------------------------------------------------------
def _saved(tmp_path: Path, name: str = "a", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=2 + seed, alpha=4 + seed, targets=["q_proj", "v_proj"], init=False), "a")
    return lk.save_adapter(model, tmp_path / name, "a")


def test_read_adapter_files_digest_is_over_the_bytes_it_parsed(tmp_path):
    folder = _saved(tmp_path)
    files = lk.read_adapter_files(folder)
    cfg_bytes, w_bytes = (folder / CONFIG_NAME).read_bytes(), (folder / WEIGHTS_NAME).read_bytes()
    h = hashlib.sha256()
    for part in (cfg_bytes, w_bytes):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    assert files.digest == h.hexdigest()
    assert files.folder == folder.resolve()
    ref = load_file(str(folder / WEIGHTS_NAME))
    assert _same(files.tensors, ref)
    assert files.config == lk.LoraConfig.from_peft(json.loads(cfg_bytes))
    config, tensors = lk.read_adapter(folder)
    assert config == files.config and _same(tensors, ref)
    # a one-byte change of either file changes the digest; another adapter has another digest
    meta = json.loads(cfg_bytes)
    meta["lora_alpha"] = 5
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    assert lk.read_adapter_files(folder).digest != files.digest
    assert lk.read_adapter_files(_saved(tmp_path, "b", seed=1)).digest != files.digest
    # without a digest (a plain load: nothing will re-read the files) the same contents, no hash;
    # an expected digest is still checked
    plain = lk.read_adapter_files(folder, digest=False)
    assert plain.digest == "" and plain.config == lk.read_adapter_files(folder).config
    with pytest.raises(lk.AdapterChangedError):
        lk.read_adapter_files(folder, digest=False, expected_digest=files.digest)


def test_root_confines_the_folder_and_each_file(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    real = _saved(outside)
    inside = _saved(root, "ok")
    (root / "x").mkdir()
    assert lk.read_adapter_files(inside, root=root).folder == inside.resolve()
    assert lk.read_adapter_files(root / "x" / ".." / "ok", root=str(root)).folder == inside.resolve()
    with pytest.raises(lk.AdapterFileError, match="outside the adapters root"):
        lk.read_adapter_files(real, root=root)
    with pytest.raises(lk.AdapterFileError, match="outside the adapters root"):
        lk.read_adapter_files(root / ".." / "outside" / "a", root=root)
    (root / "folder_link").symlink_to(real)  # a symlinked folder that leads out
    with pytest.raises(lk.AdapterFileError, match="outside the adapters root"):
        lk.read_adapter_files(root / "folder_link", root=root)
    for name in (WEIGHTS_NAME, CONFIG_NAME):  # a real folder inside whose file leads out
        sneaky = root / f"sneaky_{name.split('.')[1]}"
        sneaky.mkdir()
        for n in (WEIGHTS_NAME, CONFIG_NAME):
            if n == name:
                (sneaky / n).symlink_to(real / n)
            else:
                (sneaky / n).write_bytes((inside / n).read_bytes())
        with pytest.raises(lk.AdapterFileError, match=rf"{name}: resolves to .*outside the adapters root"):
            lk.read_adapter_files(sneaky, root=root)
        assert lk.read_adapter_files(sneaky).folder == sneaky.resolve()  # without a root: fine
    linked = root / "linked_inside"  # symlinks that stay inside the root are fine
    linked.mkdir()
    for n in (WEIGHTS_NAME, CONFIG_NAME):
        (linked / n).symlink_to(inside / n)
    assert lk.read_adapter_files(linked, root=root).digest == lk.read_adapter_files(inside).digest


def test_max_bytes_refuses_before_reading(tmp_path):
    folder = _saved(tmp_path)
    size = (folder / WEIGHTS_NAME).stat().st_size
    assert lk.read_adapter_files(folder, max_bytes=size).tensors
    with pytest.raises(lk.AdapterFileError, match=rf"{WEIGHTS_NAME}: {size:,} bytes, over the limit of {size - 1:,}"):
        lk.read_adapter_files(folder, max_bytes=size - 1)
    huge = tmp_path / "huge"  # a sparse 64 GiB file: reading it would take minutes and all memory
    huge.mkdir()
    (huge / CONFIG_NAME).write_bytes((folder / CONFIG_NAME).read_bytes())
    with open(huge / WEIGHTS_NAME, "wb") as f:
        f.truncate(64 << 30)
    t0 = time.perf_counter()
    with pytest.raises(lk.AdapterFileError, match="over the limit"):
        lk.read_adapter_files(huge, max_bytes=100 << 20)
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("path", ["a\0b", "x" * 5000, "a/" * 200_000, "x" * 300])
def test_bad_paths_are_adapter_file_errors(path, tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(lk.AdapterFileError) as err:
        lk.read_adapter_files(path)
    with pytest.raises(lk.AdapterFileError):
        lk.read_adapter_files(tmp_path, root=path)
    with pytest.raises(lk.AdapterFileError):
        lk.load_adapter(tiny_llama(), path)
    assert time.perf_counter() - t0 < 2.0
    assert len(str(err.value)) < 400


def test_special_and_broken_files_are_refused_without_hanging(tmp_path):
    folder = _saved(tmp_path)
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    (fifo / CONFIG_NAME).write_bytes((folder / CONFIG_NAME).read_bytes())
    os.mkfifo(fifo / WEIGHTS_NAME)  # opening a FIFO to read blocks until a writer comes
    with pytest.raises(lk.AdapterFileError, match="not a regular file"):
        lk.read_adapter_files(fifo)
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / WEIGHTS_NAME).write_bytes((folder / WEIGHTS_NAME).read_bytes())
    (deep / CONFIG_NAME).write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(lk.AdapterFileError, match="not valid JSON"):
        lk.read_adapter_files(deep)
    loop = tmp_path / "loop"
    loop.mkdir()
    (loop / CONFIG_NAME).write_bytes((folder / CONFIG_NAME).read_bytes())
    (loop / WEIGHTS_NAME).symlink_to(loop / WEIGHTS_NAME)
    with pytest.raises(lk.AdapterFileError, match=WEIGHTS_NAME):
        lk.read_adapter_files(loop)


def test_reads_during_saves_see_one_adapter_or_the_other(tmp_path):
    """The two files are opened through one handle on the folder: a save that swaps the folder
    in between cannot hand a reader one old file and one new."""
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = tiny_llama()
        lk.inject(m, lk.LoraConfig(r=2 + 2 * seed, alpha=3 + seed, targets=["q_proj"], init=False), "a")
        models.append(m)
    dest = tmp_path / "dest"
    refs = []
    for i, m in enumerate(models):
        refs.append(lk.read_adapter_files(lk.save_adapter(m, tmp_path / f"ref{i}", "a")))
    lk.save_adapter(models[0], dest, "a")
    stop = threading.Event()

    def saver():
        i = 1
        while not stop.is_set():
            lk.save_adapter(models[i % 2], dest, "a")
            i += 1

    th = threading.Thread(target=saver)
    th.start()
    seen = set()
    try:
        reads_until = time.time() + 1.0  # a second of reads against ~3 ms saves, longer until both seen
        while time.time() < reads_until or (len(seen) < 2 and time.time() < reads_until + 5):
            files = lk.read_adapter_files(dest)
            match = [i for i, r in enumerate(refs) if r.digest == files.digest]
            assert match, "a read saw a mixed pair"
            assert files.config == refs[match[0]].config and _same(files.tensors, refs[match[0]].tensors)
            seen.add(match[0])
    finally:
        stop.set()
        th.join()
    assert seen == {0, 1}


def test_read_adapter_restores_a_folder_a_killed_fallback_swap_left_away(tmp_path):
    folder = _saved(tmp_path, "dest")
    want = lk.read_adapter_files(folder).digest
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that is no longer running
    old = tmp_path / f".dest.old-{dead.pid}-0123abcd"
    os.rename(folder, old)
    (tmp_path / f".dest.tmp-{dead.pid}-4567cdef").mkdir()  # the new folder, half built
    assert lk.read_adapter_files(folder).digest == want
    assert not old.exists()
    lk.save_adapter(_model_for_save(), folder, "a")  # and the next save removes the rest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


def _model_for_save() -> nn.Module:
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=2, targets=["q_proj"]), "a")
    return model


def test_live_writers_temporaries_are_kept(tmp_path):
    """Only leftovers of processes that no longer run are removed: two savers never delete each
    other's work."""
    folder = lk.save_adapter(_model_for_save(), tmp_path / "dest", "a")
    live = tmp_path / f".dest.tmp-{os.getppid()}-89abcdef"
    live.mkdir()
    inner = folder / f".metrics.tmp-{os.getppid()}-89abcdef.json"
    inner.write_text("{}")
    lk.save_adapter(_model_for_save(), folder, "a")
    assert live.is_dir() and (folder / inner.name).is_file()


# ---- 6. lorakit train checks its optional dependencies first ------------------------------------
def test_train_without_matplotlib_fails_before_loading_anything(tmp_path):
    wrapper = ("import sys; sys.modules['matplotlib'] = None; from lorakit.cli import main; "
               "sys.exit(main(sys.argv[1:]))")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    args = ["train", "--model", str(tmp_path / "no-such-model"), "--data", str(tmp_path / "no-such.jsonl"),
            "--out", str(tmp_path / "out")]
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", wrapper, *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "matplotlib (the loss plot)" in done.stderr and "pip install 'lorakit[train]'" in done.stderr
    assert "no such" not in done.stderr  # neither the data nor the model was looked at
    assert not (tmp_path / "out").exists()
    assert time.perf_counter() - t0 < 60


def test_train_dependency_error_comes_before_data_and_model(tmp_path, monkeypatch, capsys):
    from lorakit.cli import main

    args = ["train", "--model", str(tmp_path / "no-such-model"), "--data", str(tmp_path / "no-such.jsonl"),
            "--out", str(tmp_path / "out"), "--quiet"]
    assert main(args) == 2  # control: with every library there, the data is what fails
    assert "no such data file" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert main([*args, "--quantize", "nf4"]) == 2
    err = capsys.readouterr().err
    assert "bitsandbytes (--quantize nf4)" in err and "pip install 'lorakit[quant]'" in err and "no such" not in err
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert main([*args, "--quantize", "nf4"]) == 2
    err = capsys.readouterr().err
    assert "tqdm (the progress bar)" in err and "pip install 'lorakit[quant]'" in err
    assert "pip install 'lorakit[train]'" in err


def test_long_name_lists_match_in_time_bounded_by_the_path():
    """targets / modules_to_save lists of up to 10,000 names (an untrusted config may carry that
    many): every path is matched by set lookups; a regex or `endswith` per name took 0.65 s a path."""
    from lorakit.config import matches

    names = [f"nope{i}.x" for i in range(9990)]
    paths = [f"model.layers.{i}.self_attn.q_proj" for i in range(2000)]
    t = time.time()
    assert all(matches(lk.LoraConfig(r=2, targets=names + ["q_proj"]), p) for p in paths[:1000])
    cfg = lk.LoraConfig(r=2, targets=["q_proj"], modules_to_save=names + ["self_attn"])
    assert not any(matches(cfg, p) for p in paths[1000:])  # inside a saved module: not a target
    assert time.time() - t < 10  # 2000 paths: hours with a regex per name, ~0.2 s here
    # PEFT's two rules, as before: a dotted suffix for targets, whole segments for modules_to_save
    assert matches(lk.LoraConfig(r=2, targets=["attn.q_proj"]), "model.self_attn.q_proj") is False
    assert matches(lk.LoraConfig(r=2, targets=["self_attn.q_proj"]), "model.self_attn.q_proj")
    assert matches(lk.LoraConfig(r=2, targets=["q_proj"], modules_to_save=["attn"]), "model.self_attn.q_proj")
