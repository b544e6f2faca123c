"""DDP over 2 CPU processes == one process over the same global batch, also
with gradient accumulation (2 ranks x batch 2 x 2 micro-batches == batch 8);
NaN predictions on one rank make every rank skip the step (no hang)."""
import json

from detr_deform.engine.ddp_check import agreement_problems, summed_terms

from pipeline_helpers import PYTHON, run

SIZE = 64  # tests/scripts/ddp_step.py's images


def test_ddp_step_equals_single_process_step(tmp_path):
    result = tmp_path / "result.json"
    done = run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                "tests/scripts/ddp_step.py", str(result)])
    assert done.returncode == 0, done.stderr[-3000:]
    values = json.loads(result.read_text())
    # The step really moved the weights (AdamW's first step moves each by about lr = 1e-3) ...
    assert values["max_change"] > 1e-4
    assert values["accumulated_max_change"] > 1e-4
    # ... and both steps are the single-process step up to float32 rounding: the bounds follow from
    # the computation (sizes, dtype, number of summed terms), derived in detr_deform/engine/ddp_check.py.
    for key, images in (("step", 4), ("accumulated_step", 8)):
        assert agreement_problems(values[key], summed_terms(images, SIZE, SIZE)) == [], values
    # Rank 1 alone had NaN predictions: both ranks saw a non-finite gradient norm and kept their weights.
    assert values["nan_step"] == [
        {"total_finite": True, "norm_finite": False, "unchanged": True, "any_rank_nonfinite": True},
        {"total_finite": False, "norm_finite": False, "unchanged": True, "any_rank_nonfinite": True}], values
