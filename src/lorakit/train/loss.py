"""A causal-LM loss that never holds the logits: the LM head and cross-entropy fused, by chunks.

Why: with a frozen base, the largest tensors of a LoRA step are the logits (tokens x vocab, float32)
and what cross-entropy keeps of them (log-softmax, then their gradient): 3 x 33 MB for 512 tokens
of a 16k vocabulary, more than the adapters' whole share of the step. Here the forward walks the
tokens in chunks and, for each, computes the loss and at once the gradient with respect to the
hidden states, (softmax - onehot) @ W; only that (tokens x hidden) gradient is kept for backward.
The same matmuls as logits + F.cross_entropy + backward, without the big tensors (the approach of
Liger-Kernel's and torchtune's fused/chunked losses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import IGNORE

# model types whose loss is exactly backbone -> plain Linear head -> shifted mean cross-entropy
# (not e.g. Granite, which divides the logits by config.logits_scaling, or Gemma2's soft-capping)
_SAFE_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3", "olmo", "olmo2"}


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, W: Tensor, b: Tensor | None, labels: Tensor, chunk: int, grad: bool) -> Tensor:
        valid = labels != IGNORE
        acc = torch.promote_types(h.dtype, torch.float32)  # logits in float32 at least, as HF does
        n = valid.sum().clamp(min=1).to(acc)
        want_h, want_w = grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[1]
        want_b = grad and b is not None and ctx.needs_input_grad[2]
        gh = torch.empty_like(h) if want_h else None
        gW = torch.zeros_like(W, dtype=acc) if want_w else None
        gb = torch.zeros_like(b, dtype=acc) if want_b else None
        total = torch.zeros((), dtype=acc, device=h.device)
        ctx.dtypes = (h.dtype, W.dtype, None if b is None else b.dtype)
        for i in range(0, h.shape[0], chunk):
            hc, lc, vc = h[i:i + chunk], labels[i:i + chunk], valid[i:i + chunk]
            logits = F.linear(hc, W, b).to(acc)
            lse = torch.logsumexp(logits, -1)
            safe = lc.clamp(min=0)[:, None]
            total += ((lse - logits.gather(1, safe)[:, 0]) * vc).sum()
            if want_h or want_w or want_b:
                p = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
                p.scatter_add_(1, safe, -vc[:, None].to(p.dtype))  # minus the one-hot of valid rows
                p.mul_((vc.to(p.dtype) / n)[:, None])  # ignored rows: no gradient; mean over valid
                if want_h:
                    gh[i:i + chunk] = (p.to(W.dtype) @ W).to(h.dtype)
                if want_w:
                    gW.addmm_(p.t(), hc.to(acc))
                if want_b:
                    gb += p.sum(0)
        ctx.save_for_backward(gh, gW, gb)
        return total / n

    @staticmethod
    def backward(ctx, g: Tensor):
        grads = [None if t is None else (t * g).to(dt) for t, dt in zip(ctx.saved_tensors, ctx.dtypes)]
        return grads[0], grads[1], grads[2], None, None, None


def linear_cross_entropy(h: Tensor, W: Tensor, b: Tensor | None, labels: Tensor, chunk: int | None = None) -> Tensor:
    """mean over labels != -100 of cross_entropy(h @ W.T + b, labels), without keeping the logits.

    h: (N, hidden); W: (vocab, hidden); labels: (N,). Same value and gradients (h, W, b) as
    F.cross_entropy(F.linear(h, W, b).float(), labels, ignore_index=-100), to rounding.
    chunk: tokens per chunk (default: about 16 MB of float32 logits)."""
    if h.dim() != 2 or labels.shape != h.shape[:1]:
        raise ValueError(f"linear_cross_entropy wants h (N, hidden) and labels (N,), got {tuple(h.shape)} and "
                         f"{tuple(labels.shape)}")
    chunk = chunk or max(1, (4 << 20) // W.shape[0])
    return _LinearCrossEntropy.apply(h, W, b, labels, chunk, torch.is_grad_enabled())  # no-grad: loss only


def fusable_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(backbone, lm_head) when model(input_ids, labels=...).loss is exactly backbone -> lm_head ->
    shifted mean cross-entropy (a plain Linear head, no logit scaling or soft-capping), else None."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in _SAFE_TYPES or not hasattr(model, "get_output_embeddings"):
        return None
    head = model.get_output_embeddings()
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if (type(head) is not nn.Linear or backbone is None or head._forward_hooks or head._forward_pre_hooks
            or hasattr(head, "_hf_hook")):  # (accelerate replaces a dispatched module's forward)
        return None
    if getattr(cfg, "final_logit_softcapping", None) or any(
            getattr(cfg, k, None) not in (None, 1, 1.0) for k in ("logit_scale", "logits_scaling")):
        return None
    return backbone, head


def causal_lm_loss(model: nn.Module, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None,
                   **kwargs) -> Tensor:
    """model(input_ids, labels=labels).loss for a Hugging Face causal LM (labels shifted by one,
    -100 ignored, mean over the rest), with the LM head fused into the loss when the model allows
    (`fusable_head`): same value and gradients, without the logits in memory."""
    parts = fusable_head(model)
    if parts is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs).loss
    backbone, head = parts
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    h = h[:, :-1].reshape(-1, h.shape[-1])
    return linear_cross_entropy(h, head.weight, head.bias, labels[:, 1:].reshape(-1).to(h.device))
