"""FSDP for editing: shard the frozen base model, keep the LoRA adapter whole on every rank.

The CoRSA step takes its two task gradients with ``torch.autograd.grad`` on the adapter and projects,
perturbs and restores them as whole tensors. Sharding the *base* with FSDP2 (``fully_shard``, one unit per
decoder block plus the root) gives the memory saving that matters (the base is >99 % of the weights),
while the adapter is excluded from sharding (``ignored_params``): its gradients are then ordinary
tensors, PCGrad and SAM run unchanged, and the module all-reduces the merged update once per optimiser
step exactly as under DDP. FSDP's hooks all-gather each block's weights for the forward and again for
every backward (including the second vector-Jacobian product on a retained graph), so a sharded run
computes the same numbers as a DDP run.

Only rank 0 reads the checkpoint: the other ranks build the architecture on the meta device (no memory),
and each rank receives its shard of rank 0's weights, so a node never holds more than one full copy.
Every rank must then run the same forwards in the same order (each one all-gathers), which the
evaluator respects in ``lockstep`` mode and ``generate`` with ``synced_gpus``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    set_model_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from lit_common.layers import find_decoder_blocks


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D data-parallel mesh of Lightning's ``ModelParallelStrategy``; tensor parallelism is refused
    because the LoRA adapter is not split across tensor-parallel ranks here."""
    if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() != 1:
        raise ValueError(
            f"tensor parallelism is not supported for editing (tensor_parallel_size={mesh['tensor_parallel'].size()}): "
            "use ModelParallelStrategy(data_parallel_size=<world size>, tensor_parallel_size=1), which shards the "
            "frozen base over all ranks (FSDP2)"
        )
    return mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh


def loads_weights(mesh: DeviceMesh) -> bool:
    """Whether this rank reads the checkpoint (rank 0 of the mesh); the others build on the meta device."""
    return mesh.get_local_rank() == 0


def shard_from_rank0(model: nn.Module, mesh: DeviceMesh) -> None:
    """``fully_shard`` every decoder block and the root over ``mesh``, leaving the trainable parameters
    out, and give every rank its shard of rank 0's base, rank 0's adapter whole, and rank 0's buffers
    (the rotary tables are not in the state dict). ``model`` holds the weights on rank 0; elsewhere its
    contents are ignored (build it on the meta device)."""
    adapter = [p for p in model.parameters() if p.requires_grad]
    if not adapter:
        raise ValueError("no trainable parameters to keep out of sharding: wrap the model with LoRA first")
    full_state = model.state_dict() if loads_weights(mesh) else {}
    for module in (*find_decoder_blocks(model), model):  # the blocks first, then the root takes the rest
        fully_shard(module, mesh=mesh, ignored_params=set(adapter))
    register_fsdp_forward_method(model, "generate")  # generate() bypasses forward(); all-gather for it too
    if not loads_weights(mesh):
        model.to_empty(device=_mesh_device(mesh))
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer, group=mesh.get_group(), group_src=0)
    sharded = [p for p in model.parameters() if isinstance(p, DTensor)]
    rank_zero_info(
        f"FSDP2: frozen base sharded over {mesh.size()} rank(s), {sum(p.to_local().numel() for p in sharded):,} of "
        f"{sum(p.numel() for p in sharded):,} weights on this rank; LoRA adapter replicated "
        f"({sum(p.numel() for p in adapter):,} weights); weights read by rank 0 only"
    )


def _mesh_device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.accelerator.current_device_index())
