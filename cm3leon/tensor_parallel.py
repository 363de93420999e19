"""Tensor parallelism for models that do not fit one GPU, with PyTorch's own engine (DTensor).

Under `torchrun --nproc_per_node N` with `tp` ranks per model, the world is a 2-D mesh
("dp", "tp"): each group of `tp` consecutive ranks holds one copy of the model split by
attention heads and MLP columns (Megatron's layout: wq/wk/wv and w1/w3 column-sharded, wo and w2
row-sharded, so each block needs one all-reduce after attention and one after the MLP), and the
data is split across the `dp` groups as before. Embeddings, norms and the vocabulary projection
stay replicated: every rank of a group gets the same logits, draws the same counter-based
uniforms and so samples the same tokens with no extra communication.

Chameleon's qk-norm has one weight row per head, so each rank keeps the rows of its own heads.
The decode code reads head counts from the local shapes (transformer.py), so it runs unchanged
on a shard; the KV cache of a rank holds its n_kv_heads / tp heads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .errors import Cm3evalError
from .transformer import HeadNorm, Transformer


class TensorParallelError(Cm3evalError, ValueError):
    """A --tp setting that the world size or the model's shape cannot honour."""


@dataclass(frozen=True)
class ParallelLayout:
    """Where this process sits: `dp_rank` of `dp_size` data shards, `tp_rank` of `tp` model shards."""

    tp: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    mesh: object | None = None  # torch.distributed DeviceMesh with dims ("dp", "tp"), None when tp == 1

    @property
    def writes_outputs(self) -> bool:
        """Only one rank of a model group writes its samples (the others hold the same tokens)."""
        return self.tp_rank == 0


def check_tp(model_or_cfg, tp: int, world: int | None = None) -> None:
    """Raise TensorParallelError unless `tp` ranks can split this model (and the world, if given)."""
    cfg = model_or_cfg.config if isinstance(model_or_cfg, Transformer) else model_or_cfg
    if not isinstance(tp, int) or tp < 1:
        raise TensorParallelError(f"tp: must be an integer >= 1, got {tp!r}")
    if world is not None and world % tp:
        raise TensorParallelError(f"tp: the world of {world} ranks is not a multiple of tp={tp}")
    for name, n in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads), ("d_ff", cfg.d_ff)):
        if n % tp:
            raise TensorParallelError(f"tp: the model's {name}={n} is not divisible by tp={tp}")


# (tp, device type) -> (the default process group it was built on, the layout): the engine's Dist
# and the predictor ask for the same mesh, and building one is a collective that makes new groups
_LAYOUTS: dict[tuple[int, str], tuple[object, ParallelLayout]] = {}


def layout(tp: int = 1, device: str = "cpu") -> ParallelLayout:
    """The mesh for this process from torchrun's environment (an initialised process group).

    tp=1 needs no process group: data parallelism alone, as the engine's Dist does it. The same
    (tp, device type) on the same process group gives the same layout object (built once)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    import torch.distributed as dist

    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    if world % tp:
        raise TensorParallelError(f"tp: the world of {world} ranks is not a multiple of tp={tp}")
    if tp == 1:
        return ParallelLayout(1, 0, world, rank)
    if not dist.is_initialized():
        raise TensorParallelError(f"tp: tp={tp} needs torchrun (or an initialised torch.distributed process group)")
    from torch.distributed.device_mesh import init_device_mesh

    key, default_group = (tp, torch.device(device).type), dist.group.WORLD
    cached = _LAYOUTS.get(key)
    if cached is not None and cached[0] is default_group:
        return cached[1]
    mesh = init_device_mesh(key[1], (world // tp, tp), mesh_dim_names=("dp", "tp"))
    lay = ParallelLayout(tp, mesh["tp"].get_local_rank(), world // tp, mesh["dp"].get_local_rank(), mesh)
    _LAYOUTS[key] = (default_group, lay)
    return lay


def _shard_head_norm(norm: HeadNorm | None, tp: int, rank: int) -> None:
    if norm is None:
        return
    norm.weight = nn.Parameter(norm.weight.detach().chunk(tp, dim=0)[rank].clone(), requires_grad=False)
    norm.bias = nn.Parameter(norm.bias.detach().chunk(tp, dim=0)[rank].clone(), requires_grad=False)


def parallelize(model: Transformer, tp_mesh) -> Transformer:
    """Split `model` in place across the 1-D mesh `tp_mesh` (a ParallelLayout's mesh["tp"]).

    Every rank must hold the same weights before the call (load the same checkpoint); rank 0's
    are the ones distributed."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp, rank = tp_mesh.size(), tp_mesh.get_local_rank()
    check_tp(model, tp)
    if tp == 1:
        return model
    for block in model.layers:
        plan = {"attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel(),
                "feed_forward.w1": ColwiseParallel(), "feed_forward.w2": RowwiseParallel()}
        if block.feed_forward.w3 is not None:
            plan["feed_forward.w3"] = ColwiseParallel()
        parallelize_module(block, tp_mesh, plan)
        att = block.attention
        att.n_heads, att.n_kv_heads = att.n_heads // tp, att.n_kv_heads // tp
        _shard_head_norm(att.q_normalization, tp, rank)
        _shard_head_norm(att.k_normalization, tp, rank)
    return model
