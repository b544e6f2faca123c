"""tools/kernel_report.py: the parsers of nvcc's -Xptxas -v and cuobjdump -sass output on fixed text,
and the memory traffic of the emulated kernels (the trace flavour of the harness, in a subprocess:
a process keeps the first harness flavour it loads)."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import kernel_report  # noqa: E402

PTXAS = textwrap.dedent("""
    ptxas info    : 0 bytes gmem
    ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
    ptxas info    : Function properties for _Z3fooPf
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 40 registers, used 0 barriers, 376 bytes cmem[0]
    ptxas info    : Compiling entry function '_Z3barPf' for 'sm_90'
    ptxas info    : Function properties for _Z3barPf
        8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
    ptxas info    : Used 255 registers, 1024 bytes smem, 376 bytes cmem[0]
""")

SASS = textwrap.dedent("""
        Function : _Z3fooPf
        .headerflags    @"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
.L_x_1:
        /*0020*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0030*/                   LDG.E R3, desc[UR4][R4.64+0x4] ;
        /*0040*/                   LDG.E R6, desc[UR4][R4.64+0x8] ;
        /*0050*/                   LDG.E R7, desc[UR4][R4.64+0xc] ;
        /*0060*/                   FFMA R8, R2, R3, R8 ;
        /*0070*/               @P0 BRA `(.L_x_1) ;
        /*0080*/                   NOP ;
        /*0090*/                   EXIT ;
""")


def test_ptxas_report_is_parsed():
    kernels = kernel_report.parse_ptxas(PTXAS)
    assert kernels == {"_Z3fooPf": {"registers": 40, "spill_stores": 0, "spill_loads": 0, "smem": 0},
                       "_Z3barPf": {"registers": 255, "spill_stores": 8, "spill_loads": 4, "smem": 1024}}


def test_sass_instructions_and_the_per_sample_loop():
    """NOPs are not counted; the loop is the backward branch's span holding >= 4 global loads."""
    assert kernel_report.parse_sass(SASS) == {"_Z3fooPf": {"instructions": 9, "per_sample_loop": 6}}


def test_targets_without_compile_facts_are_not_counted_as_met():
    figures = {"traffic": {"coco": {"fp32": {"forward": {"value_read": 16.0}, "atomic backward":
                                              {"grad_value": 16.0}}}}}
    rows = kernel_report.targets(figures)
    assert len(rows) == 7 and sum(met is True for _, met, _ in rows) == 2
    assert all(met is None for name, met, _ in rows if "bf16" in name or "SASS" in name or "spills" in name)


def test_emulated_traffic_follows_the_thread_mapping():
    """Lanes over channels: a 32-channel row is 4 sectors in fp32 and 2 in bf16, so bf16 value reads are
    exactly half of fp32's; each tap on the map is one row read by the forward and one row of 32 lane
    atomics in the backward (fp32 buffer in both precisions): atomics = 8 x grad_value sectors; at most
    four taps per sample: <= 16 sectors."""
    code = "import json, kernel_report; print(json.dumps(kernel_report.traffic('coco', 'fp32', 16))); " \
           "print(json.dumps(kernel_report.traffic('coco', 'bf16', 16)))"
    done = subprocess.run([sys.executable, "-c", "from detr_deform.ops import emulation; "
                           "emulation.load_emulation(trace=True); " + code], cwd=ROOT / "tools",
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    fp32, bf16 = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    forward = fp32["forward"]["value_read"]
    assert 8 < forward <= 16
    assert bf16["forward"]["value_read"] == forward / 2
    for traffic in (fp32, bf16):
        atomic = traffic["atomic backward"]
        assert atomic["value_read"] == traffic["forward"]["value_read"]
        assert atomic["grad_value"] == forward and atomic["atomics"] == 8 * forward
        assert traffic["deterministic backward"]["atomics"] == 0 and traffic["gather"]["atomics"] == 0


def test_sass_loops_with_address_targets():
    """cuobjdump for sm_90 prints branch targets as addresses; the loop is found the same way."""
    sass = textwrap.dedent("""
            Function : _Z3bazPf
            /*0000*/                   LDC R1, c[0x0][0x28] ;
            /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
            /*0020*/               @P1 LDG.E.128.CONSTANT R8, desc[UR4][R6.64] ;
            /*0030*/               @P2 LDG.E.128.CONSTANT R12, desc[UR4][R6.64+0x10] ;
            /*0040*/                   LDG.E.CONSTANT R3, desc[UR4][R4.64+0x4] ;
            /*0050*/                   FFMA R8, R2, R3, R8 ;
            /*0060*/              @!P3 BRA 0x10 ;
            /*0070*/                   EXIT ;
            /*0080*/                   BRA 0x80;
    """)
    assert kernel_report.parse_sass(sass) == {"_Z3bazPf": {"instructions": 9, "per_sample_loop": 6}}
