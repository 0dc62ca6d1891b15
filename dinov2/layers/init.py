"""Parameter initialisation, eager or keyed by (seed, parameter name).

Every module that owns parameters describes its initial distributions once, in
``init_weights(init)``, by calling the fillers of an :class:`Init` (``trunc_normal_``, ``normal_``,
``constant_``, ``zeros_``, ``ones_``) on its parameters. Two implementations exist:

- :data:`EAGER` fills in place from torch's global generator (``torch.nn.init``): what
  ``reset_parameters()`` does when a module is built on a real device (evaluation, interop, tests).
- :class:`KeyedInit` is what training uses (``dinov2.distributed.meta_init``). The values of a
  parameter are a function of ``(seed, name)`` only — its fully qualified name in the network, e.g.
  ``student/backbone.blocks.3.attn.qkv.weight`` — never of the world size, the mesh, the device or
  the order in which parameters are visited. The parameter is cut along its first dimension into
  *row groups* of about :data:`GROUP_NUMEL` elements; group ``g`` is drawn from its own CPU generator
  seeded with a hash of ``(seed, name, g)``. A rank that holds rows ``[a, b)`` of a sharded parameter
  (an FSDP2 ``Shard(0)`` DTensor, on any 1-D or 2-D mesh) draws only the groups that overlap
  ``[a, b)``: no rank ever materialises a large parameter in full, and the concatenation of every
  rank's rows is exactly what one process draws for the whole tensor.

The keyed values follow the same distributions as the eager ones (same ``std``, bounds, constants;
tested), but are not the same numbers: a run initialised keyed at seed ``s`` is a different, equally
valid draw from the one ``torch.manual_seed(s)`` + eager init gives. That is the price of weights
that do not depend on how the job is laid out.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

GROUP_NUMEL = 1 << 20  # elements per row group drawn from one generator (rounded to whole rows)

Sampler = Callable[[Tensor, torch.Generator | None], None]


class Init:
    """Fillers for ``init_weights``; each writes ``param`` in place (see the module docstring)."""

    def fill(self, param: Tensor, sample: Sampler) -> None:
        raise NotImplementedError

    def trunc_normal_(self, param: Tensor, std: float, a: float | None = None, b: float | None = None) -> None:
        """Normal(0, std²) truncated to the absolute bounds ``[a, b]`` (default ±2, as ``nn.init``)."""
        lo = -2.0 if a is None else a
        hi = 2.0 if b is None else b
        self.fill(param, lambda t, g: nn.init.trunc_normal_(t, std=std, a=lo, b=hi, generator=g))

    def normal_(self, param: Tensor, std: float) -> None:
        self.fill(param, lambda t, g: t.normal_(0.0, std, generator=g))

    def uniform_(self, param: Tensor, a: float, b: float) -> None:
        self.fill(param, lambda t, g: t.uniform_(a, b, generator=g))

    def constant_(self, param: Tensor, value: float) -> None:
        self.fill(param, lambda t, g: t.fill_(value))

    def zeros_(self, param: Tensor) -> None:
        self.constant_(param, 0.0)

    def ones_(self, param: Tensor) -> None:
        self.constant_(param, 1.0)


class EagerInit(Init):
    """In place, from torch's global generator (the classic ``reset_parameters`` behaviour)."""

    def fill(self, param: Tensor, sample: Sampler) -> None:
        with torch.no_grad():
            sample(param, None)


EAGER = EagerInit()


def group_key(seed: int, name: str, group: int) -> int:
    """The 63-bit generator seed of row group ``group`` of parameter ``name``."""
    digest = hashlib.blake2b(f"{seed}/{name}/{group}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def rows_per_group(shape: torch.Size | tuple[int, ...]) -> int:
    row_numel = math.prod(shape[1:]) if len(shape) > 1 else 1
    return max(1, GROUP_NUMEL // max(row_numel, 1))


def keyed_rows(
    seed: int, name: str, shape: tuple[int, ...], start: int, stop: int, sample: Sampler, dtype=torch.float32
) -> Tensor:
    """Rows ``[start, stop)`` (first dimension) of parameter ``name`` of full ``shape``, drawn keyed.
    A 0-d parameter is one row."""
    shape = tuple(shape) if len(shape) else (1,)
    per = rows_per_group(shape)
    pieces = []
    for group in range(start // per, -(-stop // per) if stop > start else start // per):
        g0 = group * per
        n = min(per, shape[0] - g0)
        buf = torch.empty((n, *shape[1:]), dtype=dtype)
        generator = torch.Generator().manual_seed(group_key(seed, name, group))
        sample(buf, generator)
        pieces.append(buf[max(start - g0, 0) : min(stop - g0, n)])
    if not pieces:
        return torch.empty((0, *shape[1:]), dtype=dtype)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def local_row_range(param: Tensor) -> tuple[Tensor, int, int]:
    """``(local tensor, first row, end row)`` of ``param`` in its full tensor: the whole tensor for a
    plain tensor; for a DTensor, the rows its ``Shard(0)`` placement gives this rank (torch.chunk
    semantics, FSDP2's layout; replicated mesh dimensions hold every row)."""
    if not hasattr(param, "to_local"):
        rows = param.shape[0] if param.dim() else 1
        return param, 0, rows
    local = param.to_local()
    rows = param.shape[0] if param.dim() else 1
    start, size = 0, rows
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_shard():
            if placement.dim != 0:
                raise NotImplementedError(f"keyed init supports Shard(0) only, got {placement}")
            n = param.device_mesh.size(mesh_dim)
            index = param.device_mesh.get_local_rank(mesh_dim)
            chunk = -(-size // n)
            offset = min(index * chunk, size)
            start, size = start + offset, max(min(chunk, size - offset), 0)
    local_rows = local.shape[0] if local.dim() else 1
    if local_rows != size:
        raise RuntimeError(f"local shard has {local_rows} rows, expected {size} (rows {start}..{start + size})")
    return local, start, start + size


class KeyedInit(Init):
    """Fills a parameter with its keyed values (module docstring). ``names`` maps each parameter
    object (by ``id``) to its key, typically ``f"{network}/{qualified name}"``; :attr:`filled` records
    the keys written, so a caller can check that every parameter was initialised exactly once."""

    def __init__(self, seed: int, names: Mapping[int, str]) -> None:
        self.seed = seed
        self.names = names
        self.filled: list[str] = []

    @classmethod
    def for_module(cls, seed: int, module: nn.Module, prefix: str) -> KeyedInit:
        return cls(seed, {id(p): f"{prefix}/{n}" for n, p in module.named_parameters()})

    def fill(self, param: Tensor, sample: Sampler) -> None:
        name = self.names.get(id(param))
        if name is None:
            raise KeyError(f"parameter of shape {tuple(param.shape)} has no key (not a parameter of this network)")
        local, start, stop = local_row_range(param)
        values = keyed_rows(self.seed, name, tuple(param.shape), start, stop, sample)
        with torch.no_grad():
            local.copy_(values.reshape(local.shape))
        self.filled.append(name)
