"""The compiled operator against the grid_sample reference: values, the three
gradients, gradcheck, low precision, bad input, and torch.compile."""
import pytest
import torch

from detr_deform.layers import MSDeformAttn
from detr_deform.ops import load_compiled_op, ms_deform_attn


def make_inputs(shapes, batch=2, heads=3, channels=5, queries=7, points=4, dtype=torch.float64, spread=1.4,
                generator=None):
    g = generator or torch.Generator().manual_seed(0)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    levels = len(shapes)
    value = torch.randn(batch, int(areas.sum()), heads, channels, generator=g, dtype=dtype)
    # Spread beyond [0, 1] so that points outside the map are exercised.
    locations = (torch.rand(batch, queries, heads, levels, points, 2, generator=g, dtype=dtype) * spread
                 - (spread - 1) / 2)
    weights = torch.rand(batch, queries, heads, levels, points, generator=g, dtype=dtype)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    return value, spatial_shapes, level_start_index, locations, weights


def run_both(inputs, grad_seed=1):
    value, shapes, starts, locations, weights = inputs
    results = {}
    for impl in ("cpp", "pytorch"):
        leaves = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
        out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], impl=impl)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype)
        grads = torch.autograd.grad(out, leaves, grad_out)
        results[impl] = (out, *grads)
    return results


SHAPE_CASES = {
    "odd_multi_level": [(7, 5), (3, 9), (2, 1)],
    "single_level": [(6, 4)],
    "one_by_one_levels": [(1, 1), (1, 1)],
    "encoder_like": [(12, 20), (6, 10), (3, 5), (2, 3)],
}


@pytest.fixture(scope="module", autouse=True)
def compiled():
    load_compiled_op()


@pytest.mark.parametrize("case", sorted(SHAPE_CASES))
def test_float64_matches_reference_tightly(case):
    results = run_both(make_inputs(SHAPE_CASES[case]))
    for name, ours, ref in zip(("output", "grad_value", "grad_locations", "grad_weights"),
                               results["cpp"], results["pytorch"]):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10, msg=f"{case}: {name}")


@pytest.mark.parametrize("case", sorted(SHAPE_CASES))
def test_float32_matches_reference(case):
    results = run_both(make_inputs(SHAPE_CASES[case], dtype=torch.float32, channels=32, heads=2))
    for name, ours, ref in zip(("output", "grad_value", "grad_locations", "grad_weights"),
                               results["cpp"], results["pytorch"]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5, msg=f"{case}: {name}")


def test_points_far_outside_give_zero_output_and_gradient():
    value, shapes, starts, locations, weights = make_inputs([(4, 4), (2, 2)])
    locations = locations + 3.0  # every sample lies beyond the map
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], impl="cpp")
    out.sum().backward()
    assert torch.count_nonzero(out) == 0
    for leaf in leaves:
        assert torch.count_nonzero(leaf.grad) == 0


def test_non_contiguous_inputs():
    value, shapes, starts, locations, weights = make_inputs([(5, 3), (3, 2)], dtype=torch.float64)
    # Same values, strided memory.
    value_nc = value.transpose(1, 2).contiguous().transpose(1, 2)
    padded = torch.zeros(*locations.shape[:-1], 4, dtype=locations.dtype)
    padded[..., ::2] = locations
    locations_nc = padded[..., ::2]
    weights_nc = weights.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (value_nc.is_contiguous() or locations_nc.is_contiguous() or weights_nc.is_contiguous())
    ours = ms_deform_attn(value_nc, shapes, starts, locations_nc, weights_nc, impl="cpp")
    ref = ms_deform_attn(value, shapes, starts, locations, weights, impl="pytorch")
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64():
    value, shapes, starts, locations, weights = make_inputs([(3, 4), (2, 2)], batch=1, heads=2, channels=3,
                                                            queries=3, points=2, spread=1.0)
    leaves = tuple(t.clone().requires_grad_() for t in (value, locations, weights))

    def fn(v, loc, w):
        return ms_deform_attn(v, shapes, starts, loc, w, impl="cpp")

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_float32(dtype):
    inputs32 = make_inputs([(8, 6), (4, 3)], dtype=torch.float32, channels=32, heads=2)
    inputs_lp = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs32)
    value, shapes, starts, locations, weights = inputs_lp
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], impl="cpp")
    assert out.dtype == dtype
    out.float().sum().backward()
    # The float32 op evaluated at the same (rounded) inputs: only output
    # rounding and accumulation differ.
    ref_leaves = [t.detach().float().requires_grad_() for t in (value, locations, weights)]
    ref = ms_deform_attn(ref_leaves[0], shapes, starts, ref_leaves[1], ref_leaves[2], impl="cpp")
    ref.sum().backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(leaves[0].grad.float(), ref_leaves[0].grad, rtol=tol, atol=tol)
    torch.testing.assert_close(leaves[2].grad.float(), ref_leaves[2].grad, rtol=tol, atol=tol * 4)


def test_empty_query_set():
    value, shapes, starts, locations, weights = make_inputs([(3, 3)], queries=0)
    out = ms_deform_attn(value, shapes, starts, locations, weights, impl="cpp")
    assert out.shape == (2, 0, 15)


BAD_INPUTS = {
    "value_rank": (lambda v, s, st, loc, w: (v[0], s, st, loc, w), ValueError, "value must be"),
    "locations_rank": (lambda v, s, st, loc, w: (v, s, st, loc[..., 0], w), ValueError, "sampling_locations must be"),
    "weights_shape": (lambda v, s, st, loc, w: (v, s, st, loc, w[..., :1]), ValueError, "attention_weights shape"),
    "level_count": (lambda v, s, st, loc, w: (v, s[:1], st[:1], loc, w), ValueError, "L = 1 levels"),
    "start_index_length": (lambda v, s, st, loc, w: (v, s, st[:1], loc, w), ValueError, "level_start_index must be"),
    "dtype_mix": (lambda v, s, st, loc, w: (v, s, st, loc.float(), w), TypeError, "share one dtype"),
    "int32_shapes": (lambda v, s, st, loc, w: (v, s.int(), st, loc, w), TypeError, "int64"),
    "integer_value": (lambda v, s, st, loc, w: (v.long(), s, st, loc.long(), w.long()), TypeError, "floating point"),
    "device_mix": (lambda v, s, st, loc, w: (v, s.to("meta"), st, loc, w), ValueError, "one device"),
    "not_a_tensor": (lambda v, s, st, loc, w: (v, s.tolist(), st, loc, w), TypeError, "must be a torch.Tensor"),
}


@pytest.mark.parametrize("impl", ["cpp", "pytorch"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_clear_error(case, impl):
    mutate, error, message = BAD_INPUTS[case]
    args = mutate(*make_inputs([(4, 3), (2, 2)]))
    with pytest.raises(error, match=message):
        ms_deform_attn(*args, impl=impl)


@pytest.mark.parametrize("impl", ["cpp", "pytorch"])
def test_shapes_not_summing_to_value_length(impl):
    value, shapes, starts, locations, weights = make_inputs([(4, 3), (2, 2)])
    wrong = torch.tensor([[5, 3], [2, 2]])  # 19 positions, value holds 16
    with pytest.raises((ValueError, RuntimeError), match="sum to 19 positions"):
        ms_deform_attn(value, wrong, torch.tensor([0, 15]), locations, weights, impl=impl)
    with pytest.raises((ValueError, RuntimeError), match=r"level_start_index\[1\] = 3"):
        ms_deform_attn(value, shapes, torch.tensor([0, 3]), locations, weights, impl=impl)


def test_compiled_op_rejects_inconsistent_layout_directly():
    """The C++ entry point validates too, so torch.ops callers cannot read out of bounds."""
    value, shapes, starts, locations, weights = make_inputs([(4, 3), (2, 2)])
    with pytest.raises(RuntimeError, match="sum to 28 positions"):
        torch.ops.detr_deform.ms_deform_attn_forward(value, torch.tensor([[4, 3], [4, 4]]), torch.tensor([0, 12]),
                                                     locations, weights)
    with pytest.raises(RuntimeError, match="non-positive spatial shape"):
        torch.ops.detr_deform.ms_deform_attn_forward(value, torch.tensor([[16, 1], [0, 7]]), torch.tensor([0, 16]),
                                                     locations, weights)


def test_unknown_impl():
    with pytest.raises(ValueError, match="impl must be"):
        ms_deform_attn(*make_inputs([(2, 2)]), impl="cuda")


def test_torch_compile_fullgraph_traces_module_with_op():
    torch._dynamo.reset()
    layer = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2, impl="cpp")
    shapes = torch.tensor([[6, 5], [3, 3]])
    starts = torch.tensor([0, 30])
    src = torch.randn(2, 39, 32)
    query = torch.randn(2, 11, 32)
    reference = torch.rand(2, 11, 2, 2)
    eager = layer(query, reference, src, shapes, starts)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(query, reference, src, shapes, starts)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert layer.value_proj.weight.grad is not None


class _RecordForwardDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.name() in ("detr_deform::ms_deform_attn_forward", "detr_deform::ms_deform_attn_backward"):
            self.calls.append((func.name().split("_")[-1], [a.dtype for a in args if isinstance(a, torch.Tensor)],
                               [t.dtype for t in (out if isinstance(out, tuple) else (out,))]))
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_under_autocast_runs_the_half_kernels_with_float32_locations(dtype):
    """Under autocast the layer no longer casts value up: the op receives value in the autocast dtype and
    the sampling locations and weights in float32 (forward), and the backward hands each gradient back
    in its input's dtype. The result stays close to the float32 layer (bf16 / fp16 rounding of the
    Linear layers' inputs and outputs: 2e-2 / 3e-3 of the largest magnitude, as for the op itself)."""
    torch.manual_seed(0)
    layer = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2, impl="cpp")
    shapes, starts = torch.tensor([[6, 5], [3, 3]]), torch.tensor([0, 30])
    src, query, reference = torch.randn(2, 39, 32), torch.randn(2, 11, 32), torch.rand(2, 11, 2, 2)
    full = layer(query, reference, src, shapes, starts).detach()
    with _RecordForwardDtypes() as recorder:
        with torch.autocast("cpu", dtype=dtype):
            out = layer(query, reference, src, shapes, starts)
        out.float().sum().backward()
    forward = [c for c in recorder.calls if c[0] == "forward"]
    backward = [c for c in recorder.calls if c[0] == "backward"]
    assert forward == [("forward", [dtype, torch.int64, torch.int64, torch.float32, torch.float32], [dtype])]
    assert backward == [("backward", [dtype, dtype, torch.int64, torch.int64, torch.float32, torch.float32],
                         [dtype, torch.float32, torch.float32])]
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(out.float(), full, rtol=tol, atol=tol * float(full.abs().max()))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("impl", ["cpp", "pytorch"])
def test_mixed_precision_op_matches_float32_on_the_rounded_value(impl):
    """bf16 value + float32 locations / weights: output and grad_value in bf16, grad_locations and
    grad_weights in float32, equal to the float32 computation on the bf16-rounded value (bf16 -> float32
    is exact, and grad_output is bf16-valued in both: only the final rounding to bf16 of the output and
    grad_value differs, at most half a bf16 step, 2^-9 relative; tolerance 2^-8)."""
    value, shapes, starts, locations, weights = make_inputs([(5, 4), (3, 2)], dtype=torch.float32, channels=8)
    value16 = value.to(torch.bfloat16)
    grad_out = torch.randn(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3]).bfloat16().float()
    results = {}
    for name, v in (("mixed", value16), ("float", value16.float())):
        leaves = [t.clone().requires_grad_() for t in (v, locations, weights)]
        out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], impl=impl)
        results[name] = (out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(out.dtype)))
    mixed, single = results["mixed"], results["float"]
    assert [t.dtype for t in mixed] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    for a, b in zip(mixed[:2], single[:2]):
        torch.testing.assert_close(a.float(), b, rtol=2**-8, atol=2**-8 * float(b.abs().max()))
    for a, b in zip(mixed[2:], single[2:]):
        # Same float32 arithmetic on the same (exactly converted) inputs: float32 rounding at most.
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))
