"""Correctness of the GPU paths (run on a CUDA machine; the CPU test suite covers the rest).

Checks against independent references on the device: the fused linear node (forward and
gradients vs the dense W + s*B@A formula), per_row vs single-adapter runs, bf16 merge round trip
with keep_original, and a PEFT-saved adapter giving PEFT's logits. Exits non-zero on failure.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import warnings

import torch


def main() -> int:
    import lorakit as lk
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"  # "cpu": a smoke test of this script
    failures = []

    def check(name, ok, detail=""):
        print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
        if not ok:
            failures.append(name)

    torch.manual_seed(0)
    # fused linear vs dense formula, fp32 and bf16 base
    for dtype in (torch.float32, torch.bfloat16):
        lin = torch.nn.Linear(256, 192).to(dev, dtype)
        model = torch.nn.Sequential(lin)
        lk.inject(model, lk.LoraConfig(r=8, alpha=16, targets=["0"], init=False))
        layer = model[0]
        x = torch.randn(4, 33, 256, device=dev, dtype=dtype, requires_grad=True)
        out = model(x)
        A, B = layer.lora_A["default"], layer.lora_B["default"]
        W = layer.base_layer.weight.float()
        ref = x.float() @ (W + 2.0 * B @ A).T + layer.base_layer.bias.float()
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        err = (out.float() - ref).abs().max().item()
        check(f"fused forward {dtype}", err < tol * max(1, ref.abs().max().item()), f"err={err:.2e}")
        out.float().pow(2).sum().backward()
        gA = A.grad.clone()
        A.grad = None
        x2 = x.detach().float().requires_grad_(True)
        A2 = A.detach().clone().requires_grad_(True)
        (x2 @ (W + 2.0 * B.detach() @ A2).T + layer.base_layer.bias.float()).pow(2).sum().backward()
        rel = ((gA - A2.grad).norm() / A2.grad.norm()).item()
        check(f"fused grad A {dtype}", rel < (1e-4 if dtype == torch.float32 else 3e-2), f"rel={rel:.2e}")

    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    base = LlamaForCausalLM(cfg).to(dev).eval()
    ids = torch.randint(0, 512, (6, 17), device=dev)
    model = copy.deepcopy(base)
    for name, r in (("a", 8), ("b", 4), ("c", 16)):
        lk.inject(model, lk.LoraConfig(r=r, alpha=16, targets="all-linear", init=False), name)
    names = ["a", None, "b", "c", "a", "b"]
    with torch.no_grad(), lk.per_row(model, names):
        mixed = model(ids).logits
    worst = 0.0
    for i, n in enumerate(names):
        lk.set_adapter(model, n)
        with torch.no_grad():
            worst = max(worst, (model(ids[i:i + 1]).logits - mixed[i:i + 1]).abs().max().item())
    check("per_row == single-adapter runs (cuda)", worst < 1e-4, f"err={worst:.2e}")

    bf = copy.deepcopy(base).to(torch.bfloat16)
    lk.inject(bf, lk.LoraConfig(r=8, targets="all-linear", init=False))
    before = {k: v.clone() for k, v in bf.state_dict().items()}
    report = lk.merge(bf, keep_original=True)
    lk.unmerge(bf)
    exact = all(torch.equal(bf.state_dict()[k], v) for k, v in before.items())
    check("bf16 merge/unmerge bit-exact with keep_original (cuda)", exact, str(report))

    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ImportError:
        print("peft not installed here: PEFT check skipped (not counted)")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                                 init_lora_weights=False)).eval()
        with torch.no_grad():
            expected = pm(ids).logits
        d = tempfile.mkdtemp()
        pm.save_pretrained(d)
        ours = copy.deepcopy(base)
        lk.load_adapter(ours, d)
        with torch.no_grad():
            err = (ours(ids).logits - expected).abs().max().item()
        check("PEFT adapter -> lorakit logits (cuda)", err < 1e-4, f"err={err:.2e}")
        lk.save_adapter(ours, d + "/ours")
        back = PeftModel.from_pretrained(copy.deepcopy(base), d + "/ours").eval()
        with torch.no_grad():
            err = (back(ids).logits - expected).abs().max().item()
        check("lorakit adapter -> PEFT logits (cuda)", err < 1e-4, f"err={err:.2e}")
    print(f"{len(failures)} failed" if failures else "all GPU checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
