"""Block-wise reconstruction (BRECQ, Li et al., ICLR 2021, §3.2 and eq. 7): the learned quantizers of one top-level
block at a time (`weights.blocks_in_order`: conv_in, the time embedding, each down / mid / up block or
transformer block, the head), in forward order, each block's output matched to the FP model's

      L_b = ‖B̂_b(x̂_b) − B_b(x_b)‖² / ‖B_b(x_b)‖²                                                         (7)

where x̂_b is the block's input in the quantized model, every earlier block already holding its learned hard
rounding, and x_b and B_b(x_b) the FP model's input and output of the same block on the same calibration input
(so a block also corrects the error its prefix left). A block's output is every tensor it returns (a UNet down
block's hidden state and its skip connections). The inputs are `BlockInputs`: a seeded subset of the calibration
pool's (step, trajectory) inputs whose block arguments are cached on the CPU, taken by running the quantized
prefix and stopping the forward pass where the block is called, so each block costs one pass over the cache
for its inputs and one for its targets, however many iterations it learns for (under torchrun each rank captures
every R-th input and the captures are all-gathered).

The loop over the blocks, and the objectives that run the whole sampler instead of one block (AccuQuant's
window at block granularity), are in `accuquant.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from denoq.calibrators.calibset import CalibrationSet, StopForward
from denoq.calibrators.distributed import all_gather_objects, rank, world_size
from denoq.calibrators.simulate import TimestepClock
from denoq.errors import DenoqError
from denoq.sampling import EpsFn
from denoq.sampling.cond import Cond, timestep_index

CAPTURE_BATCH = 64  # calibration inputs per forward pass while caching a block's inputs or targets


def _capture(run: Callable[[], object], block: nn.Module, output: bool) -> Any:
    """Run `run` until `block` is called; return (args, kwargs) of the call (or its output with `output`),
    detached, without running the rest of the model."""
    box: list[Any] = []

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        box.append((args, kwargs))
        raise StopForward

    def post(_m: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> None:
        box.append(out)
        raise StopForward

    handle = (block.register_forward_hook(post, with_kwargs=True) if output
              else block.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    except StopForward:
        pass
    finally:
        handle.remove()
    if not box:
        raise DenoqError(f"block {type(block).__name__} was never called by the model's forward pass; block-wise "
                         "reconstruction needs every planned block on the forward path (accuquant.granularity="
                         "network)")
    return box[0]


@dataclass
class Batched:
    """A structure of arguments (nested tuples / dicts, `tree_flatten`'s spec) whose tensor leaves with the
    batch dimension are concatenated over the capture passes; the other leaves are the same in every pass."""

    spec: Any
    leaves: list[Any]
    batched: list[bool]

    @classmethod
    def gather(cls, parts: list[Any], sizes: list[int], positions: list[torch.Tensor] | None = None) -> Batched:
        """One structure from the captures `parts` of passes of `sizes` inputs each, concatenated, or with
        `positions` (where each part's inputs go: together 0 … Σ sizes − 1) placed there in one allocation."""
        flat = [tree_flatten(p) for p in parts]
        spec = flat[0][1]
        if any(s != spec for _, s in flat):
            raise DenoqError("a block was called with differently structured arguments across calibration batches; "
                             "use accuquant.granularity=network for this model")
        leaves, batched = [], []
        for i, first in enumerate(flat[0][0]):
            column = [f[0][i] for f in flat]
            is_batched = isinstance(first, torch.Tensor) and all(
                isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n for v, n in zip(column, sizes,
                                                                                                strict=True))
            if is_batched and positions is not None:
                out = first.new_empty((sum(sizes), *first.shape[1:]), device="cpu")
                for v, where in zip(column, positions, strict=True):
                    out[where] = v.detach().cpu()
                leaves.append(out)
            elif is_batched:
                leaves.append(torch.cat([v.detach().cpu() for v in column]))
            else:
                same = all((torch.equal(v, first) if isinstance(first, torch.Tensor) else v == first)
                           for v in column[1:])
                if not same:
                    raise DenoqError("a block argument without a batch dimension changes across calibration batches; "
                                     "use accuquant.granularity=network for this model")
                leaves.append(first)
            batched.append(is_batched)
        return cls(spec, leaves, batched)

    def rows(self, index: torch.Tensor, device: torch.device | None = None) -> Any:
        """The structure restricted to the inputs `index`."""
        leaves = [v[index].to(device) if b else v for v, b in zip(self.leaves, self.batched, strict=True)]
        return tree_unflatten(leaves, self.spec)

    def tensors(self) -> list[torch.Tensor]:
        """The batched tensor leaves (a block output's tensors)."""
        return [v for v, b in zip(self.leaves, self.batched, strict=True) if b]


def sample_inputs(pool: CalibrationSet, count: int, seed: int) -> list[tuple[int, int]]:
    """`count` distinct (step, trajectory) inputs of `pool` drawn with `seed` (all of them if it has fewer),
    sorted; trajectories by their global index (the same draw on every rank of a sharded pool)."""
    S, N = len(pool.t), pool.trajectories
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(S * N, generator=g)[:count].sort().values
    return [(int(i) // N, int(i) % N) for i in pick]


def _pool_batches(pool: CalibrationSet,
                  inputs: list[tuple[int, int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor, Cond]]:
    """(x, t, cond) of the (step, trajectory) `inputs`, CAPTURE_BATCH at a time."""
    for start in range(0, len(inputs), CAPTURE_BATCH):
        chunk = inputs[start:start + CAPTURE_BATCH]
        x, cond = pool.gather_states(chunk)
        yield x, torch.tensor([pool.t[s] for s, _ in chunk], dtype=torch.int64), cond


@dataclass
class BlockInputs:
    """One block's cached calibration data: its arguments in the quantized model (`args`, the (args, kwargs) of
    the call), the table rows of each input's timestep (`t`, for the simulated layers' clock) and the FP block's
    output on the FP model's own input (`target`)."""

    args: Batched
    t: torch.Tensor
    target: Batched

    def __len__(self) -> int:
        return self.t.shape[0]


def cache_block(q_eps: EpsFn, q_block: nn.Module, fp_eps: EpsFn, fp_block: nn.Module, pool: CalibrationSet,
                inputs: list[tuple[int, int]], num_train_timesteps: int) -> BlockInputs:
    """Capture `q_block`'s arguments while `q_eps` (the quantized model, its earlier blocks hard) runs the
    calibration `inputs` of `pool`, and `fp_block`'s outputs while `fp_eps` runs the same inputs. Under R ranks
    rank r captures the inputs at positions r, r + R, … and the captures are all-gathered back into the order of
    `inputs`: every rank holds the whole cache."""
    size, me = world_size(), rank()
    args, rows, outs, sizes, positions = [], [], [], [], []
    for lo, (x, t, cond) in zip(range(0, len(inputs), CAPTURE_BATCH), _pool_batches(pool, inputs), strict=True):
        own = torch.arange((me - lo) % size, x.shape[0], size)  # this rank's positions in the chunk
        if len(own) == 0:
            continue
        if size > 1:
            x, t, cond = x[own], t[own], None if cond is None else cond[own]
        args.append(_capture(lambda x=x, t=t, cond=cond: q_eps(x, t, cond), q_block, output=False))
        outs.append(_capture(lambda x=x, t=t, cond=cond: fp_eps(x, t, cond), fp_block, output=True))
        rows.append(timestep_index(t, num_train_timesteps))
        sizes.append(x.shape[0])
        positions.append(own + lo)
    if size == 1:
        return BlockInputs(Batched.gather(args, sizes), torch.cat(rows), Batched.gather(outs, sizes))
    parts = all_gather_objects((args, rows, outs, sizes, positions), "the block's cached inputs")
    args, rows, outs, sizes, positions = ([item for part in parts for item in part[k]] for k in range(5))
    order = torch.argsort(torch.cat(positions))
    return BlockInputs(Batched.gather(args, sizes, positions), torch.cat(rows)[order],
                       Batched.gather(outs, sizes, positions))


def block_loss(block: nn.Module, data: BlockInputs, index: torch.Tensor, clock: TimestepClock,
               part: torch.Tensor | None = None) -> torch.Tensor:
    """(7) on the cached inputs `index`: the block run on its quantized-model arguments with the simulated
    layers' `clock` at their timestep rows, against the FP block's outputs. With `part` (a subset of `index`: one
    rank's share of the batch) only those inputs run, and the error is still divided by the energy of all of
    `index`, so the ranks' losses (and gradients) add up to the whole batch's."""
    energy = sum(r.pow(2).sum() for r in _float_leaves(data.target.rows(index)))
    index = index if part is None else part
    args, kwargs = data.args.rows(index)
    clock.t = data.t[index]
    try:
        out = block(*args, **kwargs)
    finally:
        clock.t = None
    ref = data.target.rows(index)
    pairs = list(zip(tree_flatten(out)[0], tree_flatten(ref)[0], strict=True))
    pairs = [(o, r) for o, r in pairs if isinstance(r, torch.Tensor) and r.is_floating_point()]
    if not pairs:
        raise DenoqError(f"block {type(block).__name__} returns no floating-point tensor to reconstruct; use "
                         "accuquant.granularity=network")
    err = sum((o - r).pow(2).sum() for o, r in pairs)
    return err / energy.clamp_min(1e-12)


def _float_leaves(tree: Any) -> list[torch.Tensor]:
    return [v for v in tree_flatten(tree)[0] if isinstance(v, torch.Tensor) and v.is_floating_point()]
