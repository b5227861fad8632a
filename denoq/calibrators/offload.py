"""Block-wise offloading: calibrate a denoiser while only one piece of it (a unit) holds its weights in memory.

The units are the modules `offload_units` picks: from the model down through its containers (ModuleList,
Sequential) and through every module holding one, to the first modules without: a UNet's `conv_in`,
`time_embedding`, each resnet, attention (Transformer2DModel: its norm, projections and each transformer block)
and sampler of every block; a DiT's, PixArt's or SD3's transformer blocks. Parameters owned directly by a module
above the units stay in memory, and so do all buffers (normalization statistics, position tables: small), copied
out of the checkpoint's file mapping (a model loaded from safetensors holds views of one mapping, which is
released only when no view is left).

`BlockOffload(model, folder)` writes every unit's parameters to `folder/<unit>.safetensors` and leaves them on the
`meta` device. A forward pre-hook loads a unit's parameters when the model calls it, or any module inside it that
owns parameters (DiT's head calls the first block's embedder directly), and a forward hook drops them when the
outermost such call returns, so a forward pass of the whole model holds one unit's weights at a time; the
calibrators' own hooks on the layers inside a block see it loaded, as without offloading. Code that reads weights
outside a forward pass (weight rounding) holds a unit loaded with `resident(model, [unit])`, a no-op for a model
that is not offloaded (`by_unit` groups layers so that each unit loads once). `substitute(model, {param: fn})` makes
a later load of that parameter take `fn()` instead of the file's tensor (sequential GPTQ's already-rounded prefix,
instead of a second copy of the model). Leaving the `BlockOffload` context loads every unit back and removes its
hooks: the model is as it was.

Peak memory while offloaded: the largest unit's parameters + the calibration's own data (trajectories, statistics,
a block's Hessians) + the resident rest, instead of the whole model + the same (`tools/offload_bench.py`).
A load or a drop puts new `Parameter` objects into the modules (a tensor cannot move to `meta` in place): hold
modules, not parameters, across them.
"""

from __future__ import annotations

import contextlib
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from denoq.errors import DenoqError

_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def offload_units(model: nn.Module) -> dict[str, nn.Module]:
    """The modules whose parameters load together, by module name, in registration order: from the model down
    through the containers (ModuleList, Sequential, ModuleDict) and through every module that has one as a child,
    to the first modules without one (a UNet block gives its resnets, attentions and samplers, a transformer model
    its blocks); those that own parameters."""
    units: dict[str, nn.Module] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, _CONTAINERS) or any(isinstance(c, _CONTAINERS) for c in child.children()):
                visit(path, child)
            elif next(child.parameters(), None) is not None:
                units[path] = child

    visit("", model)
    return units


def _checkpoint_shapes(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Every tensor of the safetensors `files`: its file and shape (read from the headers only)."""
    shapes = {}
    for f in files:
        with safe_open(str(f), "pt") as handle:
            shapes.update({k: (f, tuple(handle.get_slice(k).get_shape())) for k in handle.keys()})
    return shapes


def _first_rows_match(source: Path, params: dict[str, torch.Tensor]) -> bool:
    """Whether each parameter's first row (first element of a vector) equals the checkpoint tensor's: a cheap
    check (a page per tensor) that the checkpoint is the one the weights came from."""
    with safe_open(str(source), "pt") as handle:
        return all(torch.equal((handle.get_slice(k)[:1] if p.dim() else handle.get_tensor(k)).to(p.dtype),
                               p.detach()[:1] if p.dim() else p.detach()) for k, p in params.items())


_OFFLOADED: weakref.WeakKeyDictionary[nn.Module, BlockOffload] = weakref.WeakKeyDictionary()


class BlockOffload:
    """Context manager keeping `model`'s units' parameters out of memory, in its checkpoint or `folder`, each
    loaded while the model runs through it (see the module docstring)."""

    def __init__(self, model: nn.Module, folder: Path, checkpoint: Iterable[Path] = ()) -> None:
        """`checkpoint`: the safetensors files the model's weights were loaded from (and still equal, as
        `load_model` leaves them); a unit whose parameters are all found there, with their shapes and first rows,
        is read back from there instead of being written to `folder`."""
        self.model = model
        self.folder = Path(folder)
        self.checkpoint = [Path(p) for p in checkpoint]
        self.units = offload_units(model)
        self.in_checkpoint: dict[str, Path] = {}  # unit → the checkpoint file that holds all its parameters
        self.loaded: dict[str, int] = {}      # unit → how many holders keep it loaded
        self.substitutes: dict[str, Callable[[], torch.Tensor]] = {}
        self.loads = 0                        # unit loads so far (what offloading costs in reads)
        self._handles: list = []

    def __enter__(self) -> BlockOffload:
        if self.model in _OFFLOADED:
            raise DenoqError("this model is offloaded already; leave the first BlockOffload before starting another")
        if any(p.device.type == "meta" for p in self.model.parameters()):
            raise DenoqError("the model has parameters on the meta device (not loaded); load its weights before "
                             "calibrating with calib.offload=disk")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._own_resident()
        shapes = _checkpoint_shapes(self.checkpoint)
        for name, unit in self.units.items():
            params = {full: m._parameters[key] for m, key, full in self._slots(name)}
            found = {shapes[k][0] for k, p in params.items() if k in shapes and shapes[k][1] == tuple(p.shape)}
            where = found.pop() if len(found) == 1 and all(k in shapes for k in params) else None
            if where is not None and _first_rows_match(where, params):
                self.in_checkpoint[name] = where  # read back from the file the weights came from
            else:
                save_file(self._own_tensors(name), str(self._file(name)))
            self._drop(name)
            for m in dict.fromkeys([unit, *(m for m, _, _ in self._slots(name))]):
                self._handles.append(m.register_forward_pre_hook(lambda _m, _a, n=name: self._hold(n)))
                self._handles.append(m.register_forward_hook(lambda _m, _a, _o, n=name: self._release(n),
                                                             always_call=True))
        _OFFLOADED[self.model] = self
        return self

    def __exit__(self, *exc: object) -> None:
        _OFFLOADED.pop(self.model, None)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.substitutes.clear()
        for name in self.units:
            if name not in self.loaded:
                self._load(name)
        self.loaded.clear()

    def _own_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Unit `name`'s parameters by their key in it, as safetensors writes them: each in storage of its own (a
        parameter sharing storage with one before it, a tied weight, is copied)."""
        seen: set[int] = set()
        out = {}
        for m, key, full in self._slots(name):
            t = m._parameters[key].detach()
            ptr = t.untyped_storage().data_ptr()
            out[full[len(name) + 1:]] = t.clone() if ptr in seen or not t.is_contiguous() else t
            seen.add(ptr)
        return out

    def _own_resident(self) -> None:
        """Copy what stays in memory (buffers, parameters outside the units) into memory of its own: a model loaded
        from safetensors holds views of one mapping of its file, which lives (and keeps every page read) as long
        as any view does."""
        in_units = {id(m) for unit in self.units.values() for m in unit.modules()}
        for m in self.model.modules():
            for key, b in m._buffers.items():
                if b is not None:
                    m._buffers[key] = b.clone()
            if id(m) not in in_units:
                for key, p in m._parameters.items():
                    if p is not None:
                        m._parameters[key] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)

    def unit_of(self, name: str) -> str | None:
        """The unit holding module `name` (None for a module outside every unit)."""
        parts = name.split(".")
        return next((p for p in (".".join(parts[:k]) for k in range(len(parts), 0, -1)) if p in self.units), None)

    def summary(self) -> dict[str, object]:
        """What offloading held and cost: the units, the largest one's parameters (MB) and the loads so far."""
        sizes = {name: sum(p.numel() * p.element_size() for p in unit.parameters())
                 for name, unit in self.units.items()}
        largest = max(sizes, key=sizes.__getitem__)
        return {"units": len(sizes), "largest_unit": largest, "largest_unit_mb": round(sizes[largest] / 2**20, 1),
                "from_checkpoint": len(self.in_checkpoint), "loads": self.loads}

    def _file(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def _slots(self, name: str) -> list[tuple[nn.Module, str, str]]:
        """(owner module, attribute, full dotted name) of every parameter of unit `name`."""
        return [(m, key, f"{name}.{path}.{key}" if path else f"{name}.{key}")
                for path, m in self.units[name].named_modules(remove_duplicate=False)
                for key, p in m._parameters.items() if p is not None]

    def _load(self, name: str) -> None:
        source = self.in_checkpoint.get(name)
        if source is None:
            saved = {f"{name}.{k}": v for k, v in load_file(str(self._file(name))).items()}
        else:
            with safe_open(str(source), "pt") as handle:
                saved = {full: handle.get_tensor(full) for _, _, full in self._slots(name)
                         if full not in self.substitutes}
        for m, key, full in self._slots(name):
            old = m._parameters[key]
            value = self.substitutes[full]() if full in self.substitutes else saved[full].to(old.dtype)
            m._parameters[key] = nn.Parameter(value, requires_grad=old.requires_grad)
        self.loads += 1

    def _drop(self, name: str) -> None:
        for m, key, _ in self._slots(name):
            p = m._parameters[key]
            m._parameters[key] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)

    def _hold(self, name: str) -> None:
        if name not in self.loaded:
            self._load(name)
        self.loaded[name] = self.loaded.get(name, 0) + 1

    def _release(self, name: str) -> None:
        self.loaded[name] -= 1
        if not self.loaded[name]:
            del self.loaded[name]
            self._drop(name)


def is_offloaded(model: nn.Module) -> bool:
    """Whether `model` is inside a `BlockOffload`."""
    return model in _OFFLOADED


@contextlib.contextmanager
def resident(model: nn.Module, units: Iterable[str]) -> Iterator[None]:
    """Hold the named units of an offloaded `model` loaded inside the block (nothing to do for another model);
    `units` may name any module inside a unit (or the unit itself)."""
    store = _OFFLOADED.get(model)
    names = sorted({n for n in map(store.unit_of, units) if n is not None}) if store is not None else []
    for name in names:
        store._hold(name)
    try:
        yield
    finally:
        for name in names:
            store._release(name)


def by_unit(model: nn.Module, names: Iterable[str]) -> list[list[str]]:
    """`names` (module names) grouped by the unit of the offloaded `model` holding them, groups in the order of
    their first name; one group of all of them for a model that is not offloaded."""
    store = _OFFLOADED.get(model)
    names = list(names)
    if store is None:
        return [names] if names else []
    groups: dict[str | None, list[str]] = {}
    for name in names:
        groups.setdefault(store.unit_of(name), []).append(name)
    return list(groups.values())


@contextlib.contextmanager
def substitute(model: nn.Module, tensors: dict[str, Callable[[], torch.Tensor]]) -> Iterator[None]:
    """Inside the block, a unit of the offloaded `model` that loads parameter `name` (full dotted name) takes
    `tensors[name]()` instead of the saved value; `tensors` may grow while the block runs. A unit loaded already
    keeps what it holds until it is loaded again."""
    store = _OFFLOADED[model]
    store.substitutes = tensors
    try:
        yield
    finally:
        store.substitutes = {}


@contextlib.contextmanager
def offloaded(model: nn.Module, mode: str, checkpoint: Iterable[Path] = ()) -> Iterator[BlockOffload | None]:
    """`calib.offload`: inside the block, `model` is offloaded for "disk" (the units found in the safetensors
    `checkpoint` it was loaded from are read from there, the others from a temporary folder removed afterwards;
    `TMPDIR` picks where), and the `BlockOffload` is yielded; nothing happens for "none" (None is yielded)."""
    if mode == "none":
        yield None
        return
    if mode != "disk":
        raise DenoqError(f"calib.offload={mode!r} is not a mode; use none or disk")
    with (tempfile.TemporaryDirectory(prefix="denoq-offload-") as tmp,
          BlockOffload(model, Path(tmp), checkpoint) as store):
        yield store
