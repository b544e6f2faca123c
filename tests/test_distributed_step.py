"""DDP over 2 CPU processes == one process over the same global batch, also
with gradient accumulation (2 ranks x batch 2 x 2 micro-batches == batch 8);
NaN predictions on one rank make every rank skip the step (no hang)."""
import json

from pipeline_helpers import PYTHON, run


def test_ddp_step_equals_single_process_step(tmp_path):
    result = tmp_path / "result.json"
    done = run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                "tests/scripts/ddp_step.py", str(result)])
    assert done.returncode == 0, done.stderr[-3000:]
    values = json.loads(result.read_text())
    # The step really moved the weights (AdamW's first step moves each by about lr = 1e-3) ...
    assert values["max_change"] > 1e-4
    assert values["accumulated_max_change"] > 1e-4
    # ... and both steps are the single-process step up to float32 rounding. The tolerances follow
    # from the computation, not from one machine (float results differ in their last bits between
    # CPU kinds: AVX2 vs AVX-512 kernels, per-batch-size convolution algorithms):
    # - gradients: DDP sums the same per-image terms in another grouping (2 ranks x 2 images, then
    #   an average, vs 4 images), so an element may differ by the rounding of its sum, at most
    #   n * u * sum|terms| for n terms (recursive summation). A trained weight of the tiny model sums
    #   at most images x 256 positions per element (layer2's input, a 64x64 image at stride 4; the stem
    #   and layer1 are frozen as in the official code): n = 1024 for the 4-image step, 2048 for the
    #   8-image accumulated one, allowed n u relative to the tensor's largest gradient (u = 2^-24).
    # - weights: the gradients' difference moves a weight by lr * |d(g / (|g| + eps))| (exact,
    #   from both runs' gradients; up to lr * |dg| / eps near g = 0: that is why a plain bound on the
    #   weights, e.g. 1e-6, held on one CPU kind and failed on another). What remains is the rounding
    #   of the update itself: about 10 float32 roundings along torch's AdamW update per run, each at
    #   most u * (|w| + lr), so 20 for the pair.
    for key, images in (("step", 4), ("accumulated_step", 8)):
        assert values[key]["grad_ulps"] <= images * 256, values
        assert values[key]["weight_excess_ulps"] <= 20, values
    # Rank 1 alone had NaN predictions: both ranks saw a non-finite gradient norm and kept their weights.
    assert values["nan_step"] == [
        {"total_finite": True, "norm_finite": False, "unchanged": True, "any_rank_nonfinite": True},
        {"total_finite": False, "norm_finite": False, "unchanged": True, "any_rank_nonfinite": True}], values
