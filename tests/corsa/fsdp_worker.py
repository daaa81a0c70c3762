"""One rank of tests/corsa/test_corsa_fsdp.py (run by torchrun): rank 0 loads the world model, rank 1
builds it on the meta device, both shard it; then the CoRSA step, generation and the adapter are compared
with an unsharded copy of rank 0's model; writes rank<N>.json."""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from data.tokenization import EncodedRequest, RequestCollator
from lit_common.sources import empty_causal_lm, load_causal_lm
from lit_corsa.lora import wrap_with_lora
from lit_corsa.objectives import resolve_objective
from lit_corsa.sharding import data_parallel_mesh, shard_from_rank0
from lit_corsa.step import EditStep


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    reference = wrap_with_lora(load_causal_lm("world:model"), 4, 8)
    for name, p in reference.named_parameters():  # LoRA B starts at zero; give it values so every path matters
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    # rank 0 holds the weights; rank 1 only the architecture, on the meta device (no weights read or allocated)
    model = copy.deepcopy(reference) if rank == 0 else wrap_with_lora(empty_causal_lm("world:model"), 4, 8)
    result = {"meta_before_sharding": all(p.is_meta for p in model.parameters())}
    mesh = init_device_mesh("cpu", (2,))
    shard_from_rank0(model, mesh)
    adapter = [p for p in model.parameters() if p.requires_grad]
    adapter_ref = [p for p in reference.parameters() if p.requires_grad]
    result |= {
        "base_sharded": all(isinstance(p, DTensor) for p in model.parameters() if not p.requires_grad),
        "local_base_weights": sum(p.to_local().numel() for p in model.parameters() if isinstance(p, DTensor)),
        "base_weights": sum(p.numel() for p in reference.parameters() if not p.requires_grad),
        "adapter_plain": not any(isinstance(p, DTensor) for p in adapter),
        "adapter_is_rank0s": all(torch.equal(a, b) for a, b in zip(adapter, adapter_ref)),
    }
    # each rank its own edits: the sharded step must give the unsharded step's gradient exactly
    requests = [EncodedRequest(i, [1, 5 + rank, 6, 7 + i], [9, 10 + rank], [11]) for i in range(2)]
    batch = RequestCollator(pad_id=0)(requests)
    logps = torch.tensor([[-3.0, -2.5], [-4.0, -1.0]])
    step = EditStep(resolve_objective("corsa"), beta=0.1, rho=0.05)
    grads, _ = step(model, adapter, batch, logps)
    grads_ref, _ = step(reference, adapter_ref, batch, logps)
    result["step_max_abs_diff"] = max((a - b).abs().max().item() for a, b in zip(grads, grads_ref))
    result["adapter_restored"] = all(torch.equal(a, b) for a, b in zip(adapter, adapter_ref))
    # gradient checkpointing (the 8B configs use it): recomputation inside backward all-gathers again
    checkpointed = wrap_with_lora(load_causal_lm("world:model"), 4, 8, gradient_checkpointing=True)
    checkpointed.load_state_dict(reference.state_dict())
    shard_from_rank0(checkpointed, mesh)
    checkpointed.train(), reference.train()
    grads_ckpt, _ = step(checkpointed, [p for p in checkpointed.parameters() if p.requires_grad], batch, logps)
    grads_ref, _ = step(reference, adapter_ref, batch, logps)
    result["checkpointed_step_max_abs_diff"] = max((a - b).abs().max().item() for a, b in zip(grads_ckpt, grads_ref))
    # generation of different lengths per rank: the shorter rank keeps joining the longer one's all-gathers
    model.eval(), reference.eval()
    prompt = torch.tensor([[1, 5, 6, 7]] * (1 + rank))
    kwargs = {"attention_mask": torch.ones_like(prompt), "max_new_tokens": 3 + 4 * rank, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        result["generation_equal"] = torch.equal(model.generate(input_ids=prompt, synced_gpus=True, **kwargs),
                                                 reference.generate(input_ids=prompt, **kwargs))
    try:
        data_parallel_mesh(init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel")))
        result["tensor_parallel_refused"] = ""
    except ValueError as error:
        result["tensor_parallel_refused"] = str(error)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
