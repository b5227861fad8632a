"""Data-parallel calibration: the process group's facts, the shard rule and the reductions (docs/distributed.md).

Under `torchrun` (or any initialized `torch.distributed` process group) every rank runs the same calibration on a
shard of the calibration trajectories and every statistic is reduced across ranks, so that all ranks end with the
plan one process would compute from the union of the shards. Without a process group (or with one rank) every
function here is the one-process identity: nothing is communicated.

- **Shard rule** (`shard_rows`): the seeded trajectory set is drawn whole on every rank (noise, labels, prompts:
  the same random numbers one process draws) and rank r records the trajectories r, r + R, r + 2R, … So every
  batch of consecutive trajectories a statistic pass takes holds rows of every rank (`check_shardable`), and the
  union over ranks is the one-process set.
- **Batches** (`RowLayout`): a collector still iterates the one-process batches; a rank holds its rows of each.
  What is drawn per batch (a random subsample of an activation) is drawn by every rank over the whole batch, each
  fills the values of its own rows and zeros elsewhere, and a sum across ranks restores exactly the subsample one
  process takes (`RowLayout.subsample`).
- **Reductions**: sums (PTQD's moments, the learned quantizers' gradients), maxima and minima (activation ranges),
  and gathers concatenated in rank order (`all_gather_objects`: GPTQ's inputs and roundings). Sums of floats are
  reduced in another order than one process adds them: the results agree to float rounding.
- **Failures**: a settings mismatch between ranks (`check_same`) and a lost rank (a collective that fails or times
  out, `DenoqError` from `collective`) end every rank with one line naming the rank and the cause.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from denoq.errors import DenoqError

T = TypeVar("T")

#: How long a rank waits for the others at a collective before it gives up (`init_from_environment`).
TIMEOUT = timedelta(minutes=30)


def active() -> bool:
    """Whether a process group with more than one rank is running (else every reduction is the identity)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of ranks, 1 without a process group."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Whether this rank writes (rank 0, or the only process)."""
    return rank() == 0


def init_from_environment(env: dict[str, str], timeout: timedelta = TIMEOUT) -> bool:
    """Join the process group `torchrun` describes in `env` (WORLD_SIZE > 1 with RANK, MASTER_ADDR, MASTER_PORT):
    NCCL where CUDA is available, gloo on the CPU. Returns whether a group was joined (False: one process)."""
    if int(env.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise DenoqError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process, or "
                         "install a torch with distributed support")
    if env.get("MASTER_PORT") == "0":  # torchrun's static rendezvous hands the ranks port 0, not the one it took
        raise DenoqError("MASTER_PORT is 0: the ranks cannot find each other (torchrun --master-port 0 passes 0 "
                         "on); on one node run torchrun --standalone, across nodes give --rdzv-endpoint HOST:PORT")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timeout)
    return True


def leave(finished: bool) -> None:
    """Leave the process group `init_from_environment` joined (at the end of a command). `finished` (every rank
    ran to the end): first wait for the others at a barrier, so no rank tears gloo down while a peer still
    completes its last collective (that aborts the peer); after an error, leave at once (a barrier would wait for
    ranks that may have died)."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            collective(dist.barrier, "the end of the run")
        dist.destroy_process_group()


def _device() -> torch.device:
    """Where the backend takes its tensors: the current CUDA device under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def collective(run: Callable[[], T], what: str) -> T:
    """`run()` (a collective); a failure of the group (a rank that died, a timeout) becomes one DenoqError line
    naming this rank, `what` was being reduced and the backend's words."""
    try:
        return run()
    except (RuntimeError, dist.DistError) as exc:
        cause = " ".join(str(exc).split())[:200]
        raise DenoqError(f"rank {rank()}: the other ranks were lost while reducing {what} ({cause}); a rank died "
                         "or timed out: its own message names the cause, fix it and run again") from exc


def all_reduce(t: torch.Tensor, op: str, what: str) -> torch.Tensor:
    """`t` reduced over the ranks with `op` ("sum", "max", "min"), returned on t's device and dtype; `t` itself in
    one process."""
    if not active():
        return t
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    buf = t.detach().to(_device()).clone().contiguous()
    collective(lambda: dist.all_reduce(buf, ops[op]), what)
    return buf.to(t.device, t.dtype)


def sum_floats(values: list[float], what: str) -> list[float]:
    """Each of `values` summed over the ranks (one all-reduce in float64; every rank passes the same number of
    values, in the same order); `values` themselves in one process."""
    if not active():
        return values
    return all_reduce(torch.tensor(values, dtype=torch.float64), "sum", what).tolist()


def sum_tables(tables: dict[Any, dict[Any, float]], what: str) -> dict[Any, dict[Any, float]]:
    """Every value of `tables` summed over the ranks (one `sum_floats`; every rank builds the same keys in the same
    order); the same values in one process."""
    keys = [(a, b) for a, row in tables.items() for b in row]
    total = sum_floats([tables[a][b] for a, b in keys], what)
    out: dict[Any, dict[Any, float]] = {a: {} for a in tables}
    for (a, b), v in zip(keys, total, strict=True):
        out[a][b] = v
    return out


def ordered_sum(parts: list[torch.Tensor], shape: tuple[int, ...], what: str) -> torch.Tensor | None:
    """The sum of every rank's `parts` (each [shape], float64), rank 0's first, each rank's in its order, added one
    at a time left to right: ((p₁ + p₂) + p₃) + …, bit for bit the sum one process takes over the concatenated
    list (an all-reduce adds in another order, which tips roundings). Rank r receives the running sum from rank
    r − 1, adds its parts and passes it on; the last rank's total is broadcast. None when no rank has a part.
    One process: the left-to-right sum of `parts`."""
    total = None
    if active() and rank() > 0:
        total = _receive_optional(shape, rank() - 1, what)
    for part in parts:
        total = part.clone() if total is None else total.add_(part)
    if not active():
        return total
    if rank() < world_size() - 1:
        _send_optional(total, rank() + 1, what)
    flag = torch.tensor([0 if total is None or rank() != world_size() - 1 else 1], dtype=torch.int64)
    if all_reduce(flag, "max", what).item() == 0:
        return None
    buf = total if rank() == world_size() - 1 else torch.empty(shape, dtype=torch.float64)
    device_buf = buf.to(_device()).contiguous()
    collective(lambda: dist.broadcast(device_buf, src=world_size() - 1), what)
    return device_buf.to(buf.device)


def _send_optional(t: torch.Tensor | None, dst: int, what: str) -> None:
    """`t` (or that there is none) to rank `dst`: a flag, then the tensor."""
    collective(lambda: dist.send(torch.tensor([t is not None], dtype=torch.int64).to(_device()), dst), what)
    if t is not None:
        collective(lambda: dist.send(t.to(_device()).contiguous(), dst), what)


def _receive_optional(shape: tuple[int, ...], src: int, what: str) -> torch.Tensor | None:
    """What `_send_optional` sent from rank `src`: a float64 tensor of `shape`, or None."""
    flag = torch.zeros(1, dtype=torch.int64, device=_device())
    collective(lambda: dist.recv(flag, src), what)
    if not flag.item():
        return None
    buf = torch.empty(shape, dtype=torch.float64, device=_device())
    collective(lambda: dist.recv(buf, src), what)
    return buf.cpu()


def all_reduce_grads(params: list[torch.Tensor], what: str) -> None:
    """Sum every rank's `.grad` of `params` in place (one all-reduce over their concatenation; a missing grad counts
    as zeros); nothing in one process."""
    if not active():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce(torch.cat([g.reshape(-1) for g in grads]), "sum", what)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def all_gather_objects(obj: Any, what: str) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order; `[obj]` in one process."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    collective(lambda: dist.all_gather_object(out, obj), what)
    return out


def broadcast_object(obj: Any, what: str) -> Any:
    """Rank 0's `obj` on every rank (for a result that is not itself deterministic across ranks)."""
    if not active():
        return obj
    box = [obj]
    collective(lambda: dist.broadcast_object_list(box, src=0), what)
    return box[0]


def fingerprint(text: str) -> str:
    """A short stable hash of `text` (settings, a plan) to compare across ranks."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same(value: str, what: str, fix: str) -> None:
    """DenoqError on every rank, naming the first rank whose `value` differs from rank 0's, when the ranks do not
    all hold the same `value` (e.g. the fingerprint of the recipe and the model)."""
    values = all_gather_objects(value, what)
    odd = [r for r, v in enumerate(values) if v != values[0]]
    if odd:
        raise DenoqError(f"rank {odd[0]}'s {what} differs from rank 0's ({values[odd[0]]} vs {values[0]}); {fix}")


# -- the shard rule ------------------------------------------------------------------------------------------------
def shard_rows(n: int) -> torch.Tensor | None:
    """The global indices of the trajectories this rank records out of `n` (r, r + R, …; int64, ascending), None
    in one process (all of them)."""
    if not active():
        return None
    return torch.arange(rank(), n, world_size(), dtype=torch.int64)


def check_shardable(n: int, batch: int, what: str) -> None:
    """DenoqError unless every batch of `batch` consecutive trajectories out of `n` holds a row of every rank (the
    per-batch subsamples of activation statistics need every rank in every batch)."""
    size = world_size()
    last = n % batch
    if n < size or 0 < last < size:
        short = n if n < size else last
        raise DenoqError(f"{what}: {n} trajectories leave {short} in a batch of up to {batch}, fewer than the "
                         f"{size} ranks; choose a number of trajectories whose remainder modulo {batch} is 0 or at "
                         f"least {size} (e.g. a multiple of {size})")


@dataclass(frozen=True)
class RowLayout:
    """This rank's rows of one one-process batch: the batch has `total` rows, `local` [k] are the positions (in
    it, ascending) of the k rows this rank holds, in the order it holds them."""

    total: int
    local: torch.Tensor

    @classmethod
    def of(cls, rows: torch.Tensor, lo: int, total: int, doubled: bool) -> RowLayout:
        """The layout of global trajectory rows `rows` (ascending) within the batch of trajectories [lo, lo +
        total); `doubled`: the model sees the batch twice (classifier-free guidance's null half first)."""
        pos = rows - lo
        return cls(2 * total, torch.cat([pos, pos + total])) if doubled else cls(total, pos)

    def place(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` (this rank's rows of a per-row quantity [k, …]) at their positions of the one-process batch, zeros
        elsewhere: the sum over the ranks is the one-process batch's rows, exactly (x + 0 = x)."""
        if rows.shape[0] != len(self.local):
            raise DenoqError(f"an activation of shape {tuple(rows.shape)} does not lead with the batch's "
                             f"{len(self.local)} rows; data-parallel calibration needs batch-major activations: run "
                             "it in one process")
        out = rows.new_zeros((self.total, *rows.shape[1:]))
        out[self.local.to(rows.device)] = rows
        return out

    def subsample(self, x: torch.Tensor, m: int, generator: torch.Generator) -> torch.Tensor:
        """This rank's part of the one-process subsample of a batch activation: one process flattens the whole
        batch's `x` and keeps all of it (≤ `m` values) or `m` values at `randint` positions from `generator`. Every
        rank draws the same positions; values in its own rows are filled, the others are 0, so the sum over the
        ranks is the one-process subsample."""
        k = len(self.local)
        if x.shape[0] != k or x.numel() % k:
            raise DenoqError(f"an activation of shape {tuple(x.shape)} does not lead with the batch's {k} rows; "
                             "data-parallel calibration needs batch-major activations: run it in one process")
        per_row = x.numel() // k
        numel = per_row * self.total
        idx = (torch.randint(0, numel, (m,), generator=generator) if numel > m
               else torch.arange(numel, dtype=torch.int64))
        owner = torch.full((self.total,), -1, dtype=torch.int64)
        owner[self.local] = torch.arange(k)
        row = owner[idx // per_row]
        mine = row >= 0
        out = torch.zeros(idx.numel(), dtype=x.dtype)
        flat = x.reshape(-1)
        out[mine] = flat[(row[mine] * per_row + idx[mine] % per_row).to(flat.device)].cpu()
        return out
