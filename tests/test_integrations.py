"""lorakit.integrations: real transformers Trainer (and TRL SFTTrainer) runs on a tiny Llama.

Oracles: PEFT's own PeftModel.from_pretrained on every folder the trainer wrote (same logits as
lorakit's model), the tensors the model held when the trainer saved, and an uninterrupted run
(a run resumed from a middle checkpoint ends with the same adapter)."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

import lorakit as lk
from lorakit.integrations import LoraTrainerMixin, lora_trainer_class

from tiny import tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers import PreTrainedTokenizerFast, TrainerCallback, TrainingArguments  # noqa: E402

WORDS = ("the a market shares rose fell team won lost match film star new album band tour minister vote "
         "election party phone chip launch sales bank rates growth player coach season league").split()
CFG = lk.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], dropout=0.0)
CKPT_FILES = {"adapter_model.safetensors", "adapter_config.json", "training_args.bin", "optimizer.pt",
              "scheduler.pt", "trainer_state.json", "rng_state.pth", "tokenizer.json", "tokenizer_config.json"}


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory (nothing downloaded), ids inside the tiny vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def sentences(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (8,), generator=g)) for _ in range(n)]


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, seed: int = 0):
        ids = tokenizer()(sentences(n, seed), return_tensors="pt")["input_ids"]
        self.rows = [{"input_ids": r, "labels": r} for r in ids]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def model(*names: str) -> torch.nn.Module:
    m = tiny_llama(seed=0)
    for n in names:
        lk.inject(m, CFG, n)
    if names:
        lk.set_adapter(m, names[0])
    return m.train()


def args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4, learning_rate=2e-2,
                lr_scheduler_type="linear", warmup_steps=1, logging_steps=100, report_to=[], use_cpu=True, seed=0,
                data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def trainer(m, out, eval_dataset=None, **kw):
    from lorakit.integrations import LoraTrainer

    return LoraTrainer(model=m, args=args(out, **kw), train_dataset=Rows(), eval_dataset=eval_dataset,
                       processing_class=tokenizer())


def adapter(m, name: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lk.adapter_state_dict(m, name).items()}


def logits(m) -> torch.Tensor:
    x = tokenizer()(sentences(3, seed=9), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return m.eval()(x).logits


def peft_logits(folder) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return logits(peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(folder)))


def lorakit_logits(folder) -> torch.Tensor:
    m = tiny_llama(seed=0)
    lk.load_adapter(m, folder, "x")
    return logits(m)


class Snapshots(TrainerCallback):
    """The adapter as the model held it when the trainer saved each checkpoint."""

    def __init__(self, name: str):
        self.name, self.at = name, {}

    def on_save(self, args, state, control, model=None, **kw):
        self.at[state.global_step] = adapter(model, self.name)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One uninterrupted run: 4 steps, checkpoints at 2 and 4, then save_model."""
    out = tmp_path_factory.mktemp("run")
    m = model("a")
    t = trainer(m, out)
    snaps = Snapshots("a")
    t.add_callback(snaps)
    t.train()
    t.save_model(str(out / "final"))
    return out, m, snaps.at


def test_checkpoints_and_save_model_are_peft_adapters(run):
    out, m, snaps = run
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]
    base = logits(tiny_llama(seed=0))
    for step, folder in [(2, out / "checkpoint-2"), (4, out / "checkpoint-4"), (4, out / "final")]:
        files = {p.name for p in folder.iterdir()}
        assert "model.safetensors" not in files and "pytorch_model.bin" not in files
        if folder.name != "final":
            assert CKPT_FILES <= files, files
        else:
            assert {"adapter_model.safetensors", "adapter_config.json", "training_args.bin", "tokenizer.json"} <= files
        saved = load_file(folder / "adapter_model.safetensors")
        assert saved.keys() == snaps[step].keys()
        for k, v in saved.items():
            torch.testing.assert_close(v, snaps[step][k], rtol=0, atol=0)
        theirs = peft_logits(folder)
        torch.testing.assert_close(theirs, lorakit_logits(folder), rtol=1e-5, atol=1e-5)
        assert (theirs - base).abs().max() > 1e-3  # the adapter trained: the comparison means something
    torch.testing.assert_close(peft_logits(out / "final"), logits(m), rtol=1e-5, atol=1e-5)
    assert any(not torch.equal(snaps[2][k], snaps[4][k]) for k in snaps[4])  # the checkpoints differ


@pytest.mark.parametrize("fresh", ["injected", "bare"])
def test_resume_from_the_middle_matches_the_uninterrupted_run(run, tmp_path, fresh):
    """Resume a new model (the adapter injected as before, or none at all) from checkpoint-2."""
    out, m, _ = run
    m2 = model("a") if fresh == "injected" else tiny_llama(seed=0).train()
    t = trainer(m2, tmp_path)
    t.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    name = "a" if fresh == "injected" else "default"
    assert lk.active_adapters(m2) == [name]
    want, got = adapter(m, "a"), adapter(m2, name)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
    assert os.path.isfile(tmp_path / "checkpoint-4" / "adapter_model.safetensors")


def test_resume_copies_into_the_existing_parameters(run):
    """An optimizer (or DDP) holding the adapter's parameters keeps them: the load copies values."""
    out, _, snaps = run
    m = model("a")
    before = lk.adapter_parameters(m, "a")
    t = trainer(m, out / "unused")
    t._load_from_checkpoint(str(out / "checkpoint-2"))
    after = lk.adapter_parameters(m, "a")
    assert [id(p) for p in after] == [id(p) for p in before]
    assert all(p.requires_grad for p in after)
    got = adapter(m, "a")
    for k, v in snaps[2].items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)


def test_load_best_model_at_end(tmp_path):
    """'Best' = highest eval loss (on the training rows, falling), so the best checkpoint is the first one,
    not the final state; it is copied into the parameters the trainer holds."""
    m = model("a")
    params = [id(p) for p in lk.adapter_parameters(m, "a")]
    snaps = Snapshots("a")
    t = trainer(m, tmp_path, eval_dataset=Rows(), eval_strategy="steps", eval_steps=2,
                load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True)
    t.add_callback(snaps)
    t.train()
    assert t.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    assert [id(p) for p in lk.adapter_parameters(m, "a")] == params
    got = adapter(m, "a")
    assert any(not torch.equal(snaps.at[2][k], snaps.at[4][k]) for k in got)
    for k, v in snaps.at[2].items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)


def test_two_adapters_train_the_active_one_and_save_both(tmp_path):
    """inject a, inject b, set_adapter a: the Trainer trains a (b untouched); the folder holds a at
    the top and b in b/, each loaded by PEFT to lorakit's logits, and both come back in place."""
    m = model("a", "b")
    lk.set_adapter(m, "b")
    torch.manual_seed(3)
    with torch.no_grad():
        for p in lk.adapter_parameters(m, "b"):
            p.normal_(0, 0.3)
    lk.set_adapter(m, "a")
    b0 = adapter(m, "b")
    a0 = adapter(m, "a")
    t = trainer(m, tmp_path, max_steps=2)
    t.train()
    assert all(torch.equal(v, b0[k]) for k, v in adapter(m, "b").items())
    assert not all(torch.equal(v, a0[k]) for k, v in adapter(m, "a").items())
    folder = tmp_path / "checkpoint-2"
    assert {p.name for p in (folder / "b").iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
    torch.testing.assert_close(peft_logits(folder), logits(m), rtol=1e-5, atol=1e-5)
    lk.set_adapter(m, "b")
    torch.testing.assert_close(peft_logits(folder / "b"), logits(m), rtol=1e-5, atol=1e-5)
    # back into a fresh two-adapter model: both in place, a still the one that trains
    m2 = model("a", "b")
    ids = {n: [id(p) for p in lk.adapter_parameters(m2, n)] for n in ("a", "b")}
    assert trainer(m2, tmp_path / "unused")._load_from_checkpoint(str(folder)) is None
    assert lk.active_adapters(m2) == ["a"]
    for n in ("a", "b"):
        assert [id(p) for p in lk.adapter_parameters(m2, n)] == ids[n]
        assert all(p.requires_grad == (n == "a") for p in lk.adapter_parameters(m2, n))
        for k, v in adapter(m2, n).items():
            torch.testing.assert_close(v, adapter(m, n)[k], rtol=0, atol=0)


def test_a_gathered_state_dict_is_what_gets_written(tmp_path):
    """Under FSDP / ZeRO-3 the trainer passes the gathered full state dict to _save: use it."""
    m = model("a")
    t = trainer(m, tmp_path)
    mine = adapter(m, "a")
    sd = {f"module.{k}": (v * 2 + 1 if ".lora_" in k else v) for k, v in m.state_dict().items()}
    t._save(str(tmp_path / "gathered"), state_dict=sd)
    saved = load_file(tmp_path / "gathered" / "adapter_model.safetensors")
    for k, v in mine.items():
        torch.testing.assert_close(saved[k], v * 2 + 1, rtol=0, atol=0)
    for k, v in adapter(m, "a").items():  # the model's own parameters are back
        assert torch.equal(v, mine[k])
    sd = {k: v for k, v in sd.items() if "layers.1.self_attn.v_proj.lora_B" not in k}
    with pytest.raises(lk.LoraError, match=r"layers\.1\.self_attn\.v_proj\.lora_B.*FULL_STATE_DICT"):
        t._save(str(tmp_path / "partial"), state_dict=sd)


def test_user_errors(tmp_path):
    m = model("a")
    t = trainer(m, tmp_path)
    with pytest.raises(lk.LoraError, match="no adapter_model.safetensors"):
        t._load_from_checkpoint(str(tmp_path))
    with pytest.raises(lk.LoraError, match="not a transformers Trainer"):
        lora_trainer_class(dict)
    lk.set_adapter(m, None)
    with pytest.raises(lk.LoraError, match="no adapter is active"):
        t.save_model(str(tmp_path / "x"))
    with pytest.raises(lk.LoraError, match="no lorakit adapter"):
        trainer(tiny_llama(), tmp_path).save_model(str(tmp_path / "y"))


def test_classes_are_built_lazily():
    code = ("import sys, lorakit, lorakit.integrations as li; "
            "assert 'transformers' not in sys.modules and 'trl' not in sys.modules; "
            "T = li.LoraTrainer; import transformers, pickle; "
            "assert issubclass(T, li.LoraTrainerMixin) and issubclass(T, transformers.Trainer); "
            "assert T.__mro__[1:3] == (li.LoraTrainerMixin, transformers.Trainer); "
            "assert pickle.loads(pickle.dumps(T)) is T and li.lora_trainer_class(transformers.Trainer) is T; "
            "assert 'trl' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert issubclass(lora_trainer_class(transformers.Trainer), LoraTrainerMixin)


def test_trl_sft_trainer_writes_and_resumes_peft_adapters(tmp_path):
    """TRL's SFTTrainer on an in-memory text dataset: its checkpoints are PEFT adapters, and a run
    resumed from checkpoint-2 ends where the uninterrupted one did."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig

    from lorakit.integrations import LoraSFTTrainer

    def sft(m, out):
        cfg = SFTConfig(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                        learning_rate=2e-2, report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
                        logging_steps=100, max_length=16, bf16=False)  # SFTConfig's default is bf16
        return LoraSFTTrainer(model=m, args=cfg, train_dataset=Dataset.from_dict({"text": sentences(16)}),
                              processing_class=tokenizer())

    m = model("a")
    snaps = Snapshots("a")
    t = sft(m, tmp_path / "full")
    t.add_callback(snaps)
    t.train()
    for step in (2, 4):
        folder = tmp_path / "full" / f"checkpoint-{step}"
        assert CKPT_FILES <= {p.name for p in folder.iterdir()}
        saved = load_file(folder / "adapter_model.safetensors")
        assert all(torch.equal(v, snaps.at[step][k]) for k, v in saved.items()) and saved.keys() == snaps.at[step].keys()
        torch.testing.assert_close(peft_logits(folder), lorakit_logits(folder), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(peft_logits(tmp_path / "full" / "checkpoint-4"), logits(m), rtol=1e-5, atol=1e-5)
    m2 = model("a")
    sft(m2, tmp_path / "resumed").train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    want, got = adapter(m, "a"), adapter(m2, "a")
    assert any(not torch.equal(want[k], snaps.at[2][k]) for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
