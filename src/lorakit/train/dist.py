"""Everything that differs between one process and many, in one place.

`lorakit train` under `torchrun --nproc-per-node N` (one node or many) needs no other change:
`Dist.from_env` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK and joins the process group
(gloo on the CPU, nccl on GPUs). The loop asks this object how to wrap the model, which examples
this process sees, how to weight its loss, how to gather whole tensors for checkpoints and
adapters, and whether it is the process that writes files. With one process every method is the
identity, so single-process runs are bit-identical to what they were before.

Strategies (`--strategy`):
- ddp (default): every process holds the whole model; only trainable parameters (the adapter and
  modules_to_save) enter DDP's buckets and are all-reduced: DDP registers hooks only on
  parameters with requires_grad, and the frozen base is never broadcast (init_sync=False; every
  process loads the same files, and the trainable ones are broadcast from rank 0 instead).
- fsdp: FSDP2 (`torch.distributed.fsdp.fully_shard`) per transformer block and at the root; the
  frozen base is sharded across processes, the LoRA parameters are sharded DTensors that train;
  checkpoints and the final adapter gather whole tensors first (an adapter written from shards
  would hold only this process's slice, or nothing).

Data: `--batch-size` is per process. The global batch i of an epoch is the same examples,
whatever the number of processes: positions [i*B*W, (i+1)*B*W) of the epoch's shuffle, rank r
taking every W-th (DistributedSampler's rule, without its padding). Each process's loss is
weighted by its share of the global batch's examples (or label tokens for causal-lm), so the
averaged gradient is the gradient of the global batch's mean loss: 1 process with batch 2B and
2 processes with batch B train the same adapter (up to float rounding), even for a short last
batch or uneven token counts.
"""

from __future__ import annotations

import atexit
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LoraError
from . import checkpoint
from .data import IGNORE

STRATEGIES = ("ddp", "fsdp")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "single"  # single | ddp | fsdp
    backend: str | None = None  # gloo | nccl
    device_type: str = "cpu"
    info: dict[str, Any] = field(default_factory=dict)  # what wrap() did, for metrics.json

    @classmethod
    def from_env(cls, strategy: str = "ddp", device: str = "auto") -> "Dist":
        """One process unless torchrun (or another launcher) set WORLD_SIZE > 1."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if strategy not in STRATEGIES:
            raise LoraError(f"--strategy {strategy!r}: expected one of {STRATEGIES}")
        import torch.distributed as tdist

        try:
            rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        except (KeyError, ValueError) as e:
            raise LoraError(f"WORLD_SIZE={world} but RANK is missing or bad ({e}); launch with torchrun") from None
        try:
            kind = "cuda" if device == "auto" and torch.cuda.is_available() else torch.device(
                "cpu" if device == "auto" else device).type
        except RuntimeError as e:
            raise LoraError(f"--device {device!r}: {e}") from None
        if kind == "cuda":
            if not torch.cuda.is_available():
                raise LoraError(f"--device {device!r}: CUDA is not available here")
            if ":" in device and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
                raise LoraError(f"--device {device}: under torchrun each process takes cuda:LOCAL_RANK; "
                                "pass --device cuda (or auto)")
            torch.cuda.set_device(local)
        backend = "nccl" if kind == "cuda" else "gloo"
        if not tdist.is_initialized():
            tdist.init_process_group(backend)
            atexit.register(_destroy)
        return cls(rank, world, local, strategy, backend, kind)

    @property
    def is_main(self) -> bool:
        """Only this process writes checkpoints, adapters, metrics and plots, and shows progress."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp" and self.world_size > 1

    def load_device(self, device: torch.device) -> torch.device:
        """Where the loaded model goes before wrap(): FSDP keeps it on the CPU and moves only this
        process's shards to the GPU (the point of FSDP is a base that does not fit on one)."""
        return torch.device("cpu") if self.sharded else device

    # ---- model --------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the loop calls forward on. Call it before building the optimizer: FSDP
        replaces the parameters by sharded ones (same names)."""
        if self.world_size == 1:
            return model
        import torch.distributed as tdist

        trainable = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():  # the same LoRA init everywhere, whatever each process's RNG did
            for p in trainable:
                tdist.broadcast(p.data, src=0)
        frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        self.info.update(strategy=self.strategy, world_size=self.world_size, backend=self.backend,
                         trainable_tensors=len(trainable), frozen_bytes=frozen,
                         trainable_bytes=sum(p.numel() * p.element_size() for p in trainable))
        if self.strategy == "fsdp":
            return self._fully_shard(model)
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model, device_ids=[torch.cuda.current_device()] if self.device_type == "cuda" else None,
                  forward_sync_buffers=False, init_sync=False,
                  static_graph=True)  # copes with adapter parameters that get no gradient
        logged = ddp._get_ddp_logging_data()
        # what DDP will all-reduce: only the requires_grad parameters (checked in the tests)
        self.info.update(reduced_tensors=int(logged.get("num_parameter_tensors", -1)),
                         reduced_bytes=int(logged.get("total_parameter_size_bytes", -1)))
        return ddp

    def _fully_shard(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if any(type(p).__name__ not in ("Parameter", "Tensor") for p in model.parameters()):
            raise LoraError("--strategy fsdp: the model holds quantized or custom parameters "
                            f"({sorted({type(p).__name__ for p in model.parameters()} - {'Parameter'})}); "
                            "use --strategy ddp")
        mesh = init_device_mesh(self.device_type, (self.world_size,))
        blocks = set(getattr(model, "_no_split_modules", None) or ())
        units = [m for m in model.modules() if type(m).__name__ in blocks and m is not model]
        for m in units:  # one all-gather per transformer block: only one block is ever whole
            fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        local = sum(_local(p).numel() * p.element_size() for p in model.parameters())
        self.info.update(fsdp_units=len(units) + 1, local_param_bytes=local)
        return model

    # ---- data ---------------------------------------------------------------------------------
    def epoch_order(self, n: int, epoch: int, seed: int) -> list[int]:
        """This process's example indices for `epoch`: a shuffle that depends only on (seed, epoch),
        never on the global RNG, so a resumed run sees the same order; rank r takes every
        world_size-th index (DistributedSampler's rule)."""
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        return order[self.rank::self.world_size]

    def batches_per_epoch(self, n: int, batch_size: int) -> int:
        """Global batches of batch_size * world_size examples: the same count on every process
        (a process whose share of a short last batch is empty still takes part, with weight 0)."""
        return math.ceil(n / (batch_size * self.world_size))

    def scale_loss(self, loss: Tensor, labels: Tensor, task: str, real: bool = True) -> Tensor:
        """This process's mean loss, weighted so that the average over processes (what DDP and
        FSDP do to gradients) is the global batch's mean loss. `real=False`: a stand-in batch."""
        if self.world_size == 1:
            return loss
        import torch.distributed as tdist

        if not real:
            n = 0
        elif task == "classification":
            n = labels.shape[0]
        else:  # the loss counts label tokens after the shift
            n = int((labels[:, 1:] != IGNORE).sum())
        total = torch.tensor([float(n)], device=self._comm_device())
        tdist.all_reduce(total)
        return loss * (n * self.world_size / max(total.item(), 1.0))

    def reduce_mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        import torch.distributed as tdist

        t = torch.tensor([value], dtype=torch.float64 if self.device_type == "cpu" else torch.float32,
                         device=self._comm_device())
        tdist.all_reduce(t)
        return t.item() / self.world_size

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as tdist

            tdist.barrier()

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.device_type == "cuda" else torch.device("cpu")

    # ---- checkpoints and saving ---------------------------------------------------------------
    def full_state(self, params: dict[str, Tensor], opt: torch.optim.Optimizer
                   ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Trainable weights and the optimizer's state_dict as whole tensors, for a checkpoint
        that any number of processes can resume. Under FSDP every process must call it (it
        all-gathers the shards); otherwise it returns what it was given."""
        sd = opt.state_dict()
        if not self.sharded:
            return params, sd
        with torch.no_grad():  # sorted: the same collective order on every process, whatever
            whole = {k: _full(v) for k, v in params.items()}  # order a loaded state came in
            state = {i: {k: _full(sd["state"][i][k]) for k in sorted(sd["state"][i])} for i in sorted(sd["state"])}
        return whole, {"state": state, "param_groups": sd["param_groups"]}

    def local_tensors(self, tensors: dict[str, Tensor], params: dict[str, Tensor]) -> dict[str, Tensor]:
        """A checkpoint's whole tensors cut to this process's shards (FSDP), so that they can be
        copied into the parameters and the optimizer. No communication: every process has them."""
        if not self.sharded:
            return tensors
        from torch.distributed.tensor import DTensor, distribute_tensor

        plist = list(params.values())
        out = {}
        for key, t in tensors.items():
            like = None
            if key.startswith("param/"):
                like = params.get(key[len("param/"):])
            elif key.startswith("optim/"):
                i = int(key.split("/")[1])
                if i < len(plist) and tuple(t.shape) == tuple(plist[i].shape):
                    like = plist[i]
            if isinstance(like, DTensor):
                t = distribute_tensor(t.to(like.device, like.dtype), like.device_mesh, like.placements,
                                      src_data_rank=None)
            out[key] = t
        return out

    def gather_for_save(self, model: nn.Module, everything: bool = False) -> None:
        """Before writing the adapter (or the model): swap sharded parameters for whole ones, so
        that the files hold complete tensors. Trainable ones only, unless `everything` (full and
        head-only runs save the whole model). Every process must call it (all-gather)."""
        if not self.sharded:
            return
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()  # a known state: every managed parameter registered as its shard
        with torch.no_grad():
            for m in model.modules():
                for name, p in list(m._parameters.items()):
                    if isinstance(p, DTensor) and (everything or p.requires_grad):
                        m._parameters[name] = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)

    def latest_checkpoint(self, find) -> Path | None:
        """`find()` on rank 0 (the process that writes checkpoints), shared with the others, so a
        multi-node job resumes even when --out is on rank 0's local disk."""
        if self.world_size == 1:
            return find()
        found = find() if self.is_main else None
        text = self._share_bytes(json.dumps(str(found) if found else None).encode() if self.is_main else None)
        value = json.loads(text.decode())
        return Path(value) if value else None

    def load_checkpoint(self, load, folder: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """`load(folder)` on rank 0, sent to the others as safetensors + JSON bytes (no pickle)."""
        if self.world_size == 1:
            return load(folder)
        from safetensors.torch import load as st_load
        from safetensors.torch import save as st_save

        tensors, meta = load(folder) if self.is_main else ({}, {})
        blob = self._share_bytes(st_save(tensors) if self.is_main else None)
        text = self._share_bytes(json.dumps(meta).encode() if self.is_main else None)
        return st_load(blob), json.loads(text.decode())

    def _share_bytes(self, data: bytes | None) -> bytes:
        import torch.distributed as tdist

        dev = self._comm_device()
        size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=dev)
        tdist.broadcast(size, src=0)
        n = int(size.item())
        if n == 0:
            return b""
        buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev) if self.is_main
               else torch.empty(n, dtype=torch.uint8, device=dev))
        tdist.broadcast(buf, src=0)
        return buf.cpu().numpy().tobytes()

    def describe(self) -> dict[str, Any] | None:
        """For metrics.json: strategy, processes, backend, and what was reduced or sharded."""
        return dict(self.info) if self.world_size > 1 else None


_COMM_FAILURE = ("gloo", "nccl", "connection reset", "connection closed", "socket", "timed out", "broken pipe")


def lost_peer(error: BaseException, out: str | Path) -> LoraError | None:
    """The clear message for a multi-process run whose collective failed: another process died
    (killed, out of memory, crashed), and the job stops. None for other errors (re-raise them)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as tdist

    text = str(error).strip()
    if not (isinstance(error, tdist.DistError) or any(s in text.lower() for s in _COMM_FAILURE)):
        return None
    ck = checkpoint.latest(out)
    then = (f"rerun the same command with --resume to continue from {ck} (any number of processes, "
            "same global batch)") if ck else "no checkpoint was written yet (--save-every N writes them)"
    first = text.splitlines()[0][:300] if text else type(error).__name__
    return LoraError(f"rank {os.environ.get('RANK', '?')}: lost contact with another training process, so the job "
                     f"stops ({first}). torchrun's summary names the process that failed first; {then}")


def _local(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _full(t: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _destroy() -> None:
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.destroy_process_group()
