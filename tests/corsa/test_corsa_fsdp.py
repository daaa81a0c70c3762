"""FSDP for editing (lit_corsa.sharding), on 2 CPU processes with gloo: rank 1 starts from an empty (meta)
model and receives rank 0's weights, the frozen base is really sharded, the adapter is rank 0's, and the CoRSA step (two autograd.grad calls on one retained graph,
SAM's second pass, with and without gradient checkpointing) and generation give what the unsharded model gives."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sharded_base_gives_the_unsharded_step_and_generation(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests" / "corsa" / "fsdp_worker.py"), str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["meta_before_sharding"] == (rank == 1)
        assert r["base_sharded"] and r["adapter_plain"]
        assert r["local_base_weights"] < 0.6 * r["base_weights"]  # about half of the base on each of 2 ranks
        assert r["adapter_is_rank0s"], rank
        assert r["step_max_abs_diff"] == 0.0, rank
        assert r["checkpointed_step_max_abs_diff"] < 1e-6, rank
        assert r["adapter_restored"] and r["generation_equal"], rank
        assert "tensor_parallel_size=2" in r["tensor_parallel_refused"]
