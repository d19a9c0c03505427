"""`lorakit demo`: a small end-to-end tour on a tiny Llama built from a config (offline, seconds).

inject -> a few training steps -> save (PEFT format) -> reload -> swap -> merge/unmerge.
"""

from __future__ import annotations

import argparse
import tempfile


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="folder for the adapters (default: a temp folder)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit as lk

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    checksum = lambda: sum(p.double().sum().item() for p in model.parameters())  # noqa: E731
    base_sum = checksum()
    out = args.out or tempfile.mkdtemp(prefix="lorakit-demo-")
    # two tasks: "echo" (predict the same token) and "next" (predict token+1)
    x = torch.randint(0, 255, (8, 16))
    tasks = {"echo": x, "next": x + 1}
    for name, target in tasks.items():
        lk.inject(model, lk.LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj", "down_proj"]), name)
        opt = torch.optim.AdamW(lk.adapter_parameters(model, name), lr=2e-2)
        for step in range(40):
            loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), target.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"adapter {name!r}: loss {loss.item():.3f}   {lk.param_summary(model)}")
        lk.save_adapter(model, f"{out}/{name}", name)
    for name in tasks:
        lk.delete_adapter(model, name)
    for name in tasks:
        lk.load_adapter(model, f"{out}/{name}", name)
    for name, target in tasks.items():
        lk.set_adapter(model, name)
        acc = (model(x).logits.argmax(-1) == target).float().mean().item()
        print(f"set_adapter({name!r}): accuracy on its task {acc:.2f}")
    logits = model(x).logits
    report = lk.merge(model, keep_original=True)
    print(f"{report}; merged vs unmerged max diff {(model(x).logits - logits).abs().max().item():.2e}")
    lk.unmerge(model)
    lk.unload(model)
    print(f"base weights unchanged: {abs(checksum() - base_sum) == 0.0}; adapters saved in {out}")
    return 0
