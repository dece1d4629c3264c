"""The GPU rows' step figures are bounds, and both are computed right (issue 30 item 6).

XLA:GPU has no cost model: ``--plan --target cuda:...`` reports two lower bounds on the step time, the whole
program's ``max(FLOPs / peak, bytes / bandwidth)`` and the per-kernel sum of each kernel's own max, and the MFU
each gives as an upper bound. Checked here on a hand-written HLO module whose bounds are worked out by hand.
"""

import math

import pytest

from osum_jax.perf.aot import step_lines
from osum_jax.perf.hlo import analyse_hlo, roofline_bounds

# A loop of 4 iterations (XLA's known_trip_count) over two fused kernels on f32[256,256] (262,144 bytes each):
# a matmul fused with its tanh (compute-bound on the machine below) and an elementwise multiply (memory-bound);
# before the loop an asynchronous all-gather (start/done), which overlaps the kernels and is left out of the
# per-kernel bound but not out of the whole program's bytes.
MODULE = """HloModule bounds

%fused_dot (c: f32[256,256], d: f32[256,256]) -> f32[256,256] {
  %c = f32[256,256]{1,0} parameter(0)
  %d = f32[256,256]{1,0} parameter(1)
  %dd = f32[256,256]{1,0} dot(%c, %d), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %th = f32[256,256]{1,0} tanh(%dd)
}

%fused_mul (a: f32[256,256], b: f32[256,256]) -> f32[256,256] {
  %a = f32[256,256]{1,0} parameter(0)
  %b = f32[256,256]{1,0} parameter(1)
  ROOT %m = f32[256,256]{1,0} multiply(%a, %b)
}

%cond (p: (s32[], f32[256,256], f32[256,256])) -> pred[] {
  %p = (s32[], f32[256,256]{1,0}, f32[256,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (q: (s32[], f32[256,256], f32[256,256])) -> (s32[], f32[256,256], f32[256,256]) {
  %q = (s32[], f32[256,256]{1,0}, f32[256,256]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %h = f32[256,256]{1,0} get-tuple-element(%q), index=1
  %w = f32[256,256]{1,0} get-tuple-element(%q), index=2
  %f = f32[256,256]{1,0} fusion(%h, %w), kind=kOutput, calls=%fused_dot
  %e = f32[256,256]{1,0} fusion(%f, %h), kind=kLoop, calls=%fused_mul
  %one = s32[] constant(1)
  %next = s32[] add(%j, %one)
  ROOT %t = (s32[], f32[256,256]{1,0}, f32[256,256]{1,0}) tuple(%next, %e, %w)
}

ENTRY %main (x: f32[256,256], w0: f32[64,256]) -> f32[256,256] {
  %x = f32[256,256]{1,0} parameter(0)
  %w0 = f32[64,256]{1,0} parameter(1)
  %ags = (f32[64,256]{1,0}, f32[256,256]{1,0}) all-gather-start(%w0), dimensions={0}
  %agd = f32[256,256]{1,0} all-gather-done(%ags)
  %zero = s32[] constant(0)
  %init = (s32[], f32[256,256]{1,0}, f32[256,256]{1,0}) tuple(%zero, %x, %agd)
  %loop = (s32[], f32[256,256]{1,0}, f32[256,256]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  ROOT %out = f32[256,256]{1,0} get-tuple-element(%loop), index=1
}
"""

PEAK = 1e12  # FLOP/s
BANDWIDTH = 1e11  # bytes/s


def test_per_kernel_bound_of_a_hand_written_module():
    """Worked out by hand (microseconds; an f32[256,256] array is 262,144 bytes):

    * the matmul fusion, per iteration: 2 * 256^3 = 33,554,432 FLOPs -> 33.554432 us at peak; it reads two arrays
      and writes one, 786,432 bytes -> 7.86432 us: compute-bound, 33.554432 us;
    * the multiply fusion: no FLOPs counted, 786,432 bytes -> 7.86432 us;
    * the loop counter's add (two s32 read, one written: 12 bytes) 0.00012 us and the condition's compare (two
      s32 read, one pred written: 9 bytes) 0.00009 us;
    * per iteration 33.554432 + 7.86432 + 0.00021 = 41.418962 us, 4 iterations: 165.675848 us. The all-gather (start and done) is not a kernel of
      the compute stream: left out.

    The whole program: 4 x 33,554,432 FLOPs = 134.217728 us at peak; bytes 4 x (2 x 786,432 + 21) = 6,291,540 in
    the loop, plus the all-gather's start (reads 65,536, writes its 65,536 + 262,144 tuple: 393,216) and done
    (reads that tuple, writes 262,144: 589,824), 7,274,580 bytes -> 72.7458 us; the bound is the larger,
    134.217728 us. Summed per kernel, the FLOPs cannot hide behind the multiply's bytes: 165.68 > 134.22 us."""
    hlo = analyse_hlo(MODULE)
    assert hlo["flops"] == 4 * 33_554_432
    assert hlo["hbm_bytes"] == 7_274_580
    assert sum(k * f for k, f, _, _ in hlo["kernel_costs"]) == hlo["flops"]  # every FLOP is some kernel's
    b = roofline_bounds(hlo, PEAK, BANDWIDTH)
    assert math.isclose(b["program_seconds"], 134.217728e-6, rel_tol=1e-12), b
    assert math.isclose(b["per_kernel_seconds"], 165.675848e-6, rel_tol=1e-12), b
    shares = dict(b["top_kernels"])  # both fusions share the label "fusion" (the module has no op_name metadata)
    assert math.isclose(shares["fusion"], (33.554432 + 7.86432) / 41.418962, rel_tol=1e-12), shares
    assert set(shares) == {"fusion", "add", "compare"}


def test_a_memory_bound_machine_changes_which_side_binds_each_kernel():
    """The same module on a machine with 100x the bandwidth (1e13 bytes/s): the multiply costs 0.0786432 us, the
    matmul fusion still its 33.554432 us of FLOPs, the scalars 0.0000012 + 0.0000009 us; 4 iterations:
    4 x 33.6330773 = 134.5323092 us. The whole program: max(134.217728, 0.727458) = 134.217728 us."""
    b = roofline_bounds(analyse_hlo(MODULE), PEAK, 1e13)
    assert math.isclose(b["per_kernel_seconds"], 134.5323092e-6, rel_tol=1e-12), b
    assert math.isclose(b["program_seconds"], 134.217728e-6, rel_tol=1e-12), b


REPORT_GPU = {"step_basis": "roofline bounds (no cost model)", "step_ms_bound_program": 224.0,
              "step_ms_bound_per_kernel": 330.0, "mfu_bound_program": 0.752, "mfu_bound_per_kernel": 0.51,
              "tokens_per_second_bound": 1234.0}


def test_gpu_report_labels_every_figure_as_a_bound():
    """No bare "MFU 75.2 %" on a GPU target: each figure says which bound it is, step times as lower bounds."""
    text = "\n".join(step_lines(REPORT_GPU))
    assert "step time >= 224.0 ms, MFU <= 75.2% (whole-program roofline bound" in text
    assert "step time >= 330.0 ms, MFU <= 51.0% (per-kernel roofline bound" in text
    assert "<= 1234 LLM tokens/s per device" in text
    for line in text.splitlines():
        if "MFU" in line:
            assert "MFU <=" in line and "bound" in line, line


def test_tpu_report_keeps_its_cost_model_mfu_labelled():
    r = {"step_basis": "TPU cost model", "step_seconds": 0.0752, "tokens_per_second": 99.0, "mfu": 0.415}
    (line,) = step_lines(r)
    assert "75.2 ms (TPU cost model)" in line and "MFU 41.5% (TPU cost model)" in line


@pytest.mark.parametrize("r", [{"step_basis": "no peak known for this device"}])
def test_no_peak_no_step_figure(r):
    (line,) = step_lines(r)
    assert "MFU" not in line and "no peak known" in line
