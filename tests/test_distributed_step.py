"""DDP over 2 CPU processes == one process over the same global batch, also
with gradient accumulation (2 ranks x batch 2 x 2 micro-batches == batch 8);
NaN predictions on one rank make every rank skip the step (no hang)."""
import json

from pipeline_helpers import PYTHON, run


def test_ddp_step_equals_single_process_step(tmp_path):
    result = tmp_path / "result.json"
    done = run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29617",
                "tests/scripts/ddp_step.py", str(result)])
    assert done.returncode == 0, done.stderr[-3000:]
    values = json.loads(result.read_text())
    assert values["max_change"] > 1e-4  # the step really moved the weights
    assert values["max_diff"] < 1e-6, values
    assert values["accumulated_max_change"] > 1e-4
    assert values["accumulated_max_diff"] < 1e-6, values
    # Rank 1 alone had NaN predictions: both ranks saw a non-finite gradient norm and kept their weights.
    assert values["nan_step"] == [
        {"total_finite": True, "norm_finite": False, "unchanged": True, "any_rank_nonfinite": True},
        {"total_finite": False, "norm_finite": False, "unchanged": True, "any_rank_nonfinite": True}], values
