"""Build on the meta device, shard, then materialise and initialise shard by shard.

The trainer (``dinov2.launch.run.build_training``) never holds a full network in memory:

1. :func:`on_meta` constructs the meta-architecture under ``torch.device("meta")`` — shapes only,
   no storage (ViT-g's student, teacher and 131k-prototype heads cost nothing);
2. ``dinov2.distributed.parallelize`` shards every network over the mesh (on meta: FSDP2 only
   records the layout);
3. :func:`materialize` allocates each rank's shards on the device (``to_empty``) and initialises them:

   - a **trained** network (the student; each distilled student) with
     :class:`dinov2.layers.init.KeyedInit` — each parameter's values are a function of
     ``(train.seed, "{network}/{parameter name}")`` only, each rank draws only the rows of its
     shard, and the result is the same whatever the world size and mesh (tested at 1, 2 and 4
     processes, 1-D and 2-D meshes);
   - the **teacher** (an EMA of the student) and each **student EMA** (``{name}_ema``) by copying
     the source network's local shards, which line up one to one (same mesh, same layout);
   - a network that is **already materialised** (a distillation teacher loaded shard by shard,
     :func:`dinov2.distill.teacher_load.load_teacher_sharded`) is left alone;
   - buffers outside the networks (the softmax centres) start at zero, as their constructors do;

4. :func:`check_no_full_copy` asserts, from the local tensor sizes, that every sharded parameter
   holds at most its ``ceil(rows / shard)`` rows on this rank.

Unsharded runs (one process, ``distributed.fsdp=false``) take the same path minus step 2, so a
1-process run starts from exactly the weights of an N-process run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from dinov2.distributed.mesh import local_numel, shard_size
from dinov2.layers.init import Init, KeyedInit

M = TypeVar("M", bound=nn.Module)


def on_meta(build: Callable[[], M]) -> M:
    """``build()`` under the meta device: parameters and buffers get shapes, no storage."""
    with torch.device("meta"):
        return build()


def is_on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def init_network(network: nn.Module, init: Init) -> None:
    """Call ``init_weights(init)`` of the outermost modules that define it (backbone, heads)."""

    def visit(module: nn.Module) -> None:
        if callable(getattr(module, "init_weights", None)):
            module.init_weights(init)
            return
        for child in module.children():
            visit(child)

    visit(network)


def keyed_init(network: nn.Module, seed: int, prefix: str) -> None:
    """Initialise every parameter of ``network`` keyed by ``(seed, prefix/name)``; each exactly once."""
    init = KeyedInit.for_module(seed, network, prefix)
    init_network(network, init)
    counts = Counter(init.filled)
    expected = set(init.names.values())
    missing = sorted(expected - set(counts))
    twice = sorted(name for name, n in counts.items() if n > 1)
    if missing or twice:
        raise RuntimeError(f"init_weights left {missing[:3]} uninitialised and wrote {twice[:3]} twice")


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (an FSDP2 parameter or its state), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def copy_shards(target: nn.Module, source: nn.Module) -> None:
    """target ← source, local shard by local shard (same architecture, same sharding)."""
    src = dict(source.named_parameters())
    for name, param in target.named_parameters():
        if name not in src or src[name].shape != param.shape:
            raise RuntimeError(f"cannot initialise {name} from the source network: no parameter of that shape")
        local_shard(param).copy_(local_shard(src[name]))


def ema_source(name: str, trained: set[str]) -> str:
    """The trained network a non-trained network starts as a copy of: ``X_ema`` → ``X``; the
    self-distillation teacher → ``student``."""
    if name.endswith("_ema") and name[: -len("_ema")] in trained:
        return name[: -len("_ema")]
    if "student" in trained:
        return "student"
    raise RuntimeError(f"network {name!r} is neither trained nor the EMA of a trained network")


def materialize(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate and initialise everything of ``model`` still on the meta device (module docstring)."""
    networks = model.networks()
    trained = set(model.trained_networks())
    order = [n for n in networks if n in trained] + [n for n in networks if n not in trained]
    owned: set[int] = set()
    for name in order:
        network = networks[name]
        owned.update(id(t) for t in [*network.parameters(), *network.buffers()])
        if not is_on_meta(network):  # loaded already (a distillation teacher)
            if not any(hasattr(p, "to_local") for p in network.parameters()):
                network.to(device)
            continue
        if any(True for _ in network.buffers()):
            raise RuntimeError(f"network {name!r} has buffers: materialize() cannot initialise them")
        network.to_empty(device=device)
        if name in trained:
            keyed_init(network, seed, name)
        else:
            copy_shards(network, networks[ema_source(name, trained)])
        owned.update(id(t) for t in network.parameters())
    for module_name, module in model.named_modules():
        for key, buf in list(module._buffers.items()):
            if buf is not None and id(buf) not in owned:
                module._buffers[key] = torch.zeros_like(buf, device=device) if buf.is_meta else buf.to(device)
        for key, param in module._parameters.items():
            if param is not None and id(param) not in owned and param.is_meta:
                raise RuntimeError(f"parameter {module_name}.{key} outside the networks is still on the meta device")


def check_no_full_copy(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Assert that no sharded parameter holds more than its share of rows on this rank (the local
    tensors' sizes after construction); returns ``{network: (local elements, full elements)}``."""
    out = {}
    for name, network in model.networks().items():
        local_total = full_total = 0
        for pname, param in network.named_parameters():
            full_total += param.numel()
            if not hasattr(param, "to_local"):
                local_total += param.numel()
                continue
            local = param.to_local()
            limit = local_numel(tuple(param.shape), shard_size(param.device_mesh))
            if local.numel() > limit:
                raise AssertionError(f"{name}.{pname}: {local.numel()} local elements > its shard ({limit})")
            local_total += local.numel()
        out[name] = (local_total, full_total)
    return out
