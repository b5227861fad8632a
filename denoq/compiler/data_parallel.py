"""The compile's side of data-parallel calibration (docs/distributed.md): what N ranks may run, the settings every
rank must share, the plan every rank must end with, and rank 0 alone writing.

Without a process group (or with one rank) every function here passes through: nothing is checked or exchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from denoq.calibrators.calibset import CalibrationSet
from denoq.calibrators.calibtimes import PROBE_SAMPLES
from denoq.calibrators.distributed import (
    broadcast_object,
    check_same,
    check_shardable,
    fingerprint,
    is_main,
    rank,
    shard_rows,
    world_size,
)
from denoq.calibrators.ptqd import PtqdStats
from denoq.compiler.load import ModelSpec
from denoq.compiler.recipe import Recipe
from denoq.errors import DenoqError
from denoq.plan import QuantPlan
from denoq.sampling.cond import Conditioning

T = TypeVar("T")

#: Trajectories per batch of the activation statistics (`collect_stats`' batch size).
STATS_BATCH = 64


def model_fingerprint(module: torch.nn.Module) -> str:
    """Names, shapes and a strided sample of every parameter's values: two ranks that loaded different weights
    (or another model) disagree here."""
    digest = hashlib.sha256()
    for name, p in module.named_parameters():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
        digest.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def settings_fingerprint(spec: ModelSpec, recipe: Recipe) -> str:
    """What every rank must share: the recipe's values, the model and the torch version."""
    text = json.dumps({"recipe": recipe.values, "model": spec.name, "weights": model_fingerprint(spec.module),
                       "torch": torch.__version__}, sort_keys=True, default=str)
    return fingerprint(text)


def check_ranks(spec: ModelSpec, recipe: Recipe, pool: CalibrationSet | None, guided: bool) -> None:
    """Before any calibration work, on every rank: DenoqError (the same line on every rank) for a calibration set
    that leaves a rank without rows in some batch, or settings that differ between the ranks. `pool`: the whole
    set a forward_loop recorded (None: denoq's own trajectories, `calib.samples` of them)."""
    size = world_size()
    if size == 1:
        return
    c = recipe.config
    n, what = (c.calib.samples, "calib.samples") if pool is None else (pool.trajectories, "the forward_loop's rows")
    check_shardable(n, STATS_BATCH // 2 if guided else STATS_BATCH, what)
    if c.activations.calib_timesteps == "srm":
        check_shardable(min(PROBE_SAMPLES, n), STATS_BATCH, "the srm probe's trajectories")
    sampled = c.weights.method == "adaround" and (c.accuquant.granularity == "network" or c.accuquant.window > 0)
    if sampled and min(c.accuquant.batch, c.calib.samples) < size:
        raise DenoqError(f"accuquant.batch={c.accuquant.batch} leaves ranks without trajectories in a batch under "
                         f"{size} ranks; set it (and calib.samples) to at least {size}")
    check_same(settings_fingerprint(spec, recipe), "settings fingerprint (recipe, model weights, torch version)",
               "start every rank with the same command, model folder and denoq / torch install")


def shard_pool(pool: CalibrationSet) -> CalibrationSet:
    """The calls a forward_loop made, under ranks: every rank ran the whole loop and recorded the same set
    (DenoqError on every rank, naming the first rank that did not), and keeps its shard of the trajectories by the
    rule denoq's own trajectories follow (`distributed.shard_rows`). One process: `pool` itself."""
    if world_size() == 1:
        return pool
    digest = hashlib.sha256(json.dumps([str(t) for t in pool.t]).encode())
    cond = pool.cond.tensors if isinstance(pool.cond, Conditioning) else {"": pool.cond}
    _hash_tensors(digest, {f"x.{i:05d}": x for i, x in enumerate(pool.x)}
                  | {f"cond.{k}": v for k, v in cond.items() if v is not None})
    check_same(digest.hexdigest()[:16], "forward_loop calls (inputs, timesteps, conditioning)",
               "make the loop the same on every rank: seed its noise, give it the same prompts or labels (every rank "
               "runs the whole loop and keeps its share of the rows)")
    return pool.shard(shard_rows(pool.trajectories))


def plan_fingerprint(plan: QuantPlan, ptqd: PtqdStats | None) -> str:
    """The plan's (and PTQD's) numbers and structure."""
    digest = hashlib.sha256(json.dumps(plan.meta(), sort_keys=True, default=str).encode())
    _hash_tensors(digest, plan.tensors() | ({} if ptqd is None else ptqd.to_tensors()))
    return digest.hexdigest()[:16]


def _hash_tensors(digest: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Each tensor's name and bytes into the hashlib `digest`, in name order."""
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def check_same_plan(plan: QuantPlan, ptqd: PtqdStats | None) -> None:
    """DenoqError on every rank unless every rank ended calibration with the same plan (a reduction that was not
    the same everywhere would show here)."""
    if world_size() > 1:
        check_same(plan_fingerprint(plan, ptqd), "plan", "report this: the ranks' reductions diverged; run the "
                   "calibration in one process meanwhile")


def on_main(run: Callable[[], T], what: str) -> T | None:
    """`run()` on rank 0 (returning its value there, None elsewhere) while the other ranks wait for its outcome:
    a DenoqError on rank 0 ends every rank with rank 0's line. One process: `run()`."""
    if world_size() == 1:
        return run()
    outcome: Any = None
    error: str | None = None
    if is_main():
        try:
            outcome = run()
        except DenoqError as exc:
            error = str(exc)
            broadcast_object(error, what)
            raise
        except BaseException as exc:
            broadcast_object(f"{type(exc).__name__}: {exc}", what)
            raise
    error = broadcast_object(error, what)
    if error is not None:
        raise DenoqError(f"rank 0 failed while {what}: {error}")
    return outcome if rank() == 0 else None


def share_folder(path: Path, what: str) -> None:
    """Rank 0's folder `path` (a member artifact it wrote) at `path` on every rank: rank 0 sends its files, sorted,
    one at a time, and the other ranks write them there (a scratch folder of their own). Nothing in one process."""
    if world_size() == 1:
        return
    files = sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.is_file()) if is_main() else None
    for name in broadcast_object(files, what):
        data = broadcast_object((path / name).read_bytes() if is_main() else None, f"{what}: {name}")
        if not is_main():
            target = path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
