"""Crash-consistent save_adapter (issue 13): a process saving two different adapters in turn into
one existing folder is SIGKILLed at random instants, many times; after every kill the folder must
read and load as exactly one of the two (config and tensors bit-exact), with the folder's other
files kept. The same checker, run against a deliberately non-atomic writer, must catch a mixed pair
(so it is able to fail).

The saving processes are forked from one "zygote" subprocess (python, PYTHONPATH=src) that has
imported lorakit once: a kill costs a fork, not a 1-second interpreter start.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit import files as lkfiles
from lorakit import io as lkio

ROOT = Path(__file__).resolve().parents[1]

ZYGOTE = textwrap.dedent('''
    import os, signal, sys, time, traceback
    from pathlib import Path
    import torch
    from torch import nn
    torch.set_num_threads(1)
    import lorakit as lk
    import lorakit.files as lkfiles
    import lorakit.io as lkio

    work = Path(sys.argv[1])

    def build(seed, r, alpha):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
        lk.inject(m, lk.LoraConfig(r=r, alpha=alpha, targets=["0", "2"]), "a")
        with torch.no_grad():
            for p in lk.adapter_parameters(m, "a"):
                p.normal_(0, 0.5)  # non-zero A and B
        return m

    models = [build(1, 4, 8.0), build(2, 6, 3.0)]  # different r AND alpha
    for i, m in enumerate(models):
        lk.save_adapter(m, work / f"ref{i}", "a")
    refs = [{n: (work / f"ref{i}" / n).read_bytes() for n in (lkio.WEIGHTS_NAME, lkio.CONFIG_NAME)} for i in (0, 1)]

    def naive(i, dest):
        """The old write_dir_atomic: each file replaced atomically, the pair not (the pause stands
        for the config's write and fsync, which came between the two renames)."""
        lkfiles.write_file_atomic(dest / lkio.WEIGHTS_NAME, lambda p: p.write_bytes(refs[i][lkio.WEIGHTS_NAME]))
        time.sleep(0.002)
        lkfiles.write_file_atomic(dest / lkio.CONFIG_NAME, lambda p: p.write_bytes(refs[i][lkio.CONFIG_NAME]))

    def worker(mode, dest):
        if mode == "fallback":  # as on a system without renameat2(RENAME_EXCHANGE)
            lkfiles._exchange = lambda a, b: False
        if mode == "inplace":  # as for a mount point: the folder cannot be switched, its files are
            lkfiles.os.path.ismount = lambda p: Path(p) == dest
        i = 1
        while True:
            target = dest / f"n{i}" if mode == "new" else dest
            if mode == "naive":
                naive(i % 2, target)
            else:
                lk.save_adapter(models[i % 2], target, "a")
            i += 1

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed workers are reaped at once (no zombies)
    print("ready", flush=True)
    for line in sys.stdin:
        mode, dest = line.split(maxsplit=1)
        pid = os.fork()
        if pid == 0:
            try:
                worker(mode, Path(dest.strip()))
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
            os._exit(1)
        print(pid, flush=True)
''')


class Zygote:
    def __init__(self, work: Path):
        script = work / "zygote.py"
        script.write_text(ZYGOTE)
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        self.errlog = open(work / "zygote.err", "w+")
        self.proc = subprocess.Popen([sys.executable, str(script), str(work)], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.errlog, text=True, bufsize=1)
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", self.stderr()

    def stderr(self) -> str:
        self.errlog.flush()
        self.errlog.seek(0)
        return self.errlog.read()

    def start(self, mode: str, dest: Path) -> int:
        self.proc.stdin.write(f"{mode} {dest}\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)
        self.errlog.close()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    work = tmp_path_factory.mktemp("zygote")
    z = Zygote(work)
    z.work = work
    z.refs = [lk.read_adapter_files(work / f"ref{i}") for i in (0, 1)]
    for ref in z.refs:
        assert all(t.abs().sum() > 0 for t in ref.tensors.values())
    assert z.refs[0].config.r != z.refs[1].config.r and z.refs[0].config.alpha != z.refs[1].config.alpha
    yield z
    z.close()


def _kill(z: Zygote, pid: int, delay: float) -> None:
    time.sleep(delay)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        raise AssertionError(f"the saving process died before it was killed:\n{z.stderr()}") from None
    deadline = time.time() + 5
    while time.time() < deadline:  # gone (reaped) before anyone looks at the folder
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} outlived SIGKILL")


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))


def classify(folder: Path, refs: list[lk.AdapterFiles]) -> str:
    """'0' or '1': the folder is exactly that adapter (read and loaded: config and tensors
    bit-exact); 'mixed': readable but neither; 'unreadable': it does not read or load."""
    try:
        config, tensors = lk.read_adapter(folder)
        model = lk.load_adapter(_model(), folder, "x")
    except lk.LoraError:
        return "unreadable"
    for i, ref in enumerate(refs):
        same_files = (config == ref.config and tensors.keys() == ref.tensors.keys()
                      and all(tensors[k].dtype == ref.tensors[k].dtype and torch.equal(tensors[k], ref.tensors[k])
                              for k in tensors))
        loaded = lk.adapter_state_dict(model, "x")
        same_load = (lk.get_config(model, "x").r == ref.config.r and lk.get_config(model, "x").alpha == ref.config.alpha
                     and loaded.keys() == ref.tensors.keys()
                     and all(torch.equal(loaded[k], ref.tensors[k]) for k in loaded))
        if same_files and same_load:
            return str(i)
    return "mixed"


def _existing_folder(work: Path, name: str, ref: Path) -> Path:
    """A folder as `lorakit train --out` leaves it: an adapter plus other files and a subfolder."""
    dest = work / name
    shutil.copytree(ref, dest)
    (dest / "metrics.json").write_text('{"loss": 1.5}')
    (dest / "checkpoints" / "step-00000007").mkdir(parents=True)
    (dest / "checkpoints" / "step-00000007" / "state.json").write_text('{"step": 7}')
    return dest


def _others_intact(dest: Path) -> bool:
    return ((dest / "metrics.json").read_text() == '{"loss": 1.5}'
            and (dest / "checkpoints" / "step-00000007" / "state.json").read_text() == '{"step": 7}')


def _leftovers(dest: Path) -> list[str]:
    beside = [p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.")]
    inside = [str(p.relative_to(dest)) for p in dest.rglob(".*")]
    return beside + inside


@pytest.mark.parametrize("mode", ["exchange", "fallback", "inplace"])
def test_sigkill_at_any_instant_leaves_one_whole_adapter(zygote, mode):
    rng = random.Random()
    dest = _existing_folder(zygote.work, f"dest-{mode}", zygote.work / "ref0")
    outcomes = []
    for _ in range(60):
        pid = zygote.start(mode, dest)
        _kill(zygote, pid, rng.uniform(0.0, 0.03))
        outcome = classify(dest, zygote.refs)
        assert outcome in ("0", "1"), f"after a kill the folder is {outcome}: {sorted(os.listdir(dest))}"
        assert _others_intact(dest)
        outcomes.append(outcome)
    assert set(outcomes) == {"0", "1"}, outcomes  # the kills landed at different points of the loop
    # a normal save after all those kills: whole, and every leftover of the killed saves is gone
    model = lk.load_adapter(_model(), zygote.work / "ref1", "a")
    lk.save_adapter(model, dest, "a")
    assert classify(dest, zygote.refs) == "1" and _others_intact(dest)
    assert _leftovers(dest) == []


def test_sigkill_during_new_folder_saves_leaves_nothing_or_a_whole_adapter(zygote):
    rng = random.Random()
    root = zygote.work / "new"
    root.mkdir()
    for _ in range(8):
        _kill(zygote, zygote.start("new", root), rng.uniform(0.0, 0.03))
        whole = [p for p in root.iterdir() if not p.name.startswith(".")]
        for folder in whole:
            assert classify(folder, zygote.refs) == str(int(folder.name[1:]) % 2), folder
        shutil.rmtree(root)
        root.mkdir()


def test_the_checker_catches_a_non_atomic_writer(zygote):
    """The old two-renames save, killed at random instants, leaves a mixed or unreadable pair
    sooner or later; the checker above must see it (else it could not fail)."""
    rng = random.Random()
    dest = _existing_folder(zygote.work, "dest-naive", zygote.work / "ref0")
    seen = []
    for _ in range(80):
        _kill(zygote, zygote.start("naive", dest), rng.uniform(0.0, 0.03))
        seen.append(classify(dest, zygote.refs))
        if seen[-1] in ("mixed", "unreadable"):
            break
    assert seen[-1] in ("mixed", "unreadable"), seen


def test_exchange_swaps_two_folders_or_reports_it_cannot(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("a")
    (b / "f").write_text("b")
    swapped = lkfiles._exchange(a, b)
    assert ((a / "f").read_text(), (b / "f").read_text()) == (("b", "a") if swapped else ("a", "b"))
    if sys.platform.startswith("linux"):
        assert lkfiles._renameat2() is not None


def test_save_keeps_symlinks_modes_and_a_symlinked_destination(tmp_path):
    model = lk.load_adapter(_model(), _saved_ref(tmp_path), "a")
    real = lk.save_adapter(model, tmp_path / "real", "a")
    (real / "notes.txt").write_text("n")
    os.chmod(real / "notes.txt", 0o640)
    (real / "link").symlink_to("notes.txt")
    os.chmod(real, 0o750)
    (tmp_path / "alias").symlink_to(real)
    lk.save_adapter(model, tmp_path / "alias", "a")
    assert (tmp_path / "alias").is_symlink() and os.readlink(real / "link") == "notes.txt"
    assert (real / "notes.txt").stat().st_mode & 0o777 == 0o640 and real.stat().st_mode & 0o777 == 0o750
    assert lk.read_adapter_files(tmp_path / "alias").digest == lk.read_adapter_files(real).digest
    cwd = os.getcwd()
    try:  # a process working inside the folder keeps working in the saved one
        os.chdir(real)
        lk.save_adapter(model, real, "a")
        assert Path(os.getcwd()) == real and Path("notes.txt").read_text() == "n"
    finally:
        os.chdir(cwd)


def _saved_ref(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    m = _model()
    lk.inject(m, lk.LoraConfig(r=2, targets=["0"]), "a")
    return lk.save_adapter(m, tmp_path / "ref", "a")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_an_in_place_save_torn_between_its_renames_is_completed_or_refused(zygote, tmp_path):
    """Where the folder cannot be switched (a mount point), a save renames its two files one after
    the other. Killed between them, new weights sit beside the old config: a read sees that the
    weights name another config and completes the save from what it staged. Without a staged
    config (a config edited by hand since the save) the pair is read as it is."""
    a, b = (zygote.work / f"ref{i}" for i in (0, 1))
    for staged in (True, False):
        dest = tmp_path / f"torn-{staged}"
        shutil.copytree(a, dest)
        (dest / lkio.WEIGHTS_NAME).write_bytes((b / lkio.WEIGHTS_NAME).read_bytes())  # the first rename happened
        if staged:
            stage = dest / f".save.tmp-{_dead_pid()}-0123abcd"
            stage.mkdir()
            (stage / lkio.CONFIG_NAME).write_bytes((b / lkio.CONFIG_NAME).read_bytes())
            assert classify(dest, zygote.refs) == "1"  # completed: the new adapter, whole
            assert (dest / lkio.CONFIG_NAME).read_bytes() == (b / lkio.CONFIG_NAME).read_bytes()
        else:
            config, _ = lk.read_adapter(dest)
            assert config == zygote.refs[0].config  # as it is
