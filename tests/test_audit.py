"""Compile audit (no GPU needed) and byte accounting.

The audit compiles the kernels the GPU launch heuristics choose, for sm_80 and sm_90, and reads
ptxas's register / spill report and the shared memory of each binary. It asserts what the
heuristics promise (see the tile tables in `pm_kernels/heuristics.py`):
  * fp16 / bf16 kernels never spill registers at the paper's shapes (M = 8 and 16 merged
    tokens, D = 768 ... 1664), with LayerNorm parameters in x's dtype or in fp32 (autocast);
  * every compiled configuration, up to M = 256, fits its architecture's shared memory per block.

The kernels are compiled in a subprocess without TRITON_INTERPRET: conftest.py turns the
interpreter on for the CPU test run, and kernels decorated under it cannot be compiled. The
compile cache is `<repo>/.triton_cache/audit`, so re-runs take seconds; a cold run compiles
about 200 small binaries (~1 minute on 2 cores).
"""

import pytest
import torch

pytest.importorskip("triton")

from pm_kernels import audit, roofline  # noqa: E402
from pm_kernels.heuristics import Config  # noqa: E402

# A representative subset: every kernel, both token-count specialisations (196 is not a
# multiple of 16, 256 is), M = 8 / 16 (the paper) and 256 (the largest tile, for shared
# memory), the split path (B = 1) and the one-program-per-element path (B = 256). All the D of
# the paper map to the same binaries (D is a runtime argument, divisible by 16 in every case),
# so listing them costs nothing and documents what is covered. Variants: training with the
# LayerNorm parameters in x's dtype and in fp32 (autocast), inference, and a frozen x (the
# backward without dx, e.g. the merger behind a frozen backbone).
SUBSET = ["--arch", "80", "90", "--dtype", "fp16", "bf16",
          "--d", *map(str, audit.PAPER_D), "--n", "196", "256", "--m", "8", "16", "256",
          "--b", "1", "256", "--variant", "affine", "amp", "inference", "frozen-x"]


@pytest.fixture(scope="module")
def report():
    return audit.audit_subprocess(SUBSET, timeout=900)


def test_every_kernel_compiled_for_both_archs(report):
    rows = report["rows"]
    errors = [f"{r['kernel']} [{r['config']}] {r['dtype']} sm_{r['arch']}: {r['error']}"
              for r in rows if r["error"]]
    assert not errors, "\n".join(errors)
    assert not report["skipped_archs"], report["skipped_archs"]
    for arch in (80, 90):
        kernels = {r["kernel"] for r in rows if r["arch"] == arch}
        assert kernels == {"forward", "combine", "delta", "backward"}, (arch, kernels)
    assert all(r["registers"] > 0 for r in rows)
    # The disassembly worked: every forward / backward binary has its D sweeps as loops (the
    # backward three: its per-query sums, the score sweep and the dx sweep).
    for r in rows:
        if r["kernel"] in ("forward", "backward"):
            assert r["loops"] and len(r["loops"]) >= 2 and min(r["loops"]) > 10, r


def test_no_spills_at_paper_shapes(report):
    paper = [r for r in report["rows"]
             if r["arch"] in (80, 90) and r["dtype"] in ("fp16", "bf16")
             and any(audit.is_paper_shape(s) for s in r["shapes"])]
    # Both tiers of the paper (BLOCK_M = 16 serves M = 8 and 16), forward and backward.
    assert {r["kernel"] for r in paper} >= {"forward", "backward"}
    spilling = [f"{r['kernel']} [{r['config']}] {r['dtype']}/{r['variant']} sm_{r['arch']} "
                f"spec {r['spec']}: {r['spill_stores']} B spill stores, {r['registers']} regs"
                for r in paper if r["spill_stores"]]
    assert not spilling, "\n".join(spilling)


def test_shared_memory_within_each_arch_limit(report):
    assert any(r["config"].startswith("M256") for r in report["rows"])
    over = [f"{r['kernel']} [{r['config']}] {r['dtype']} sm_{r['arch']}: {r['shared']} B > "
            f"{r['smem_limit']} B" for r in report["rows"] if r["shared"] > r["smem_limit"]]
    assert not over, "\n".join(over)
    for r in report["rows"]:
        assert r["smem_limit"] == audit.ARCHS[r["arch"]].smem_per_block


def test_parse_ptxas_log():
    log = """ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_backward_kernel' for 'sm_80'
ptxas info    : Function properties for _backward_kernel
    24 bytes stack frame, 16 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 24 bytes cumulative stack size
"""
    assert audit.parse_ptxas(log) == dict(registers=128, stack=24, spill_stores=16,
                                          spill_loads=20)
    assert audit.parse_ptxas("no report here") is None


def test_innermost_loops_of_a_sass_listing():
    # An outer loop 0x10..0x60 holding an inner one 0x20..0x40, a second innermost loop
    # 0x70..0x90 and the trap after EXIT (a branch to itself): two innermost loops, 3 and 3.
    lines = {0x00: "MOV R1, c[0x0][0x28]", 0x10: "IADD3 R2, R2, 0x1, RZ",
             0x20: "LDG.E R4, [R2.64]", 0x30: "FADD R5, R5, R4", 0x40: "@P0 BRA 0x20",
             0x50: "ISETP.GE.AND P1, PT, R2, R3, PT", 0x60: "@!P1 BRA 0x10",
             0x70: "HMMA.16816.F32 R8, R12, R16, R8", 0x80: "FMUL R9, R9, R10",
             0x90: "@P2 BRA 0x70", 0xa0: "EXIT", 0xb0: "BRA 0xb0"}
    sass = "\n".join(f"        /*{a:04x}*/                   {t} ;   /* 0x000 */"
                     for a, t in lines.items())
    assert audit.innermost_loops(sass) == [3, 3]
    assert audit.innermost_loops("no code") == []


# ----------------------------------------------------------------------------------------------
# Byte accounting (pure arithmetic, explicit configs: independent of the interpreter)
# ----------------------------------------------------------------------------------------------

def test_forward_bytes_single_program_per_element():
    b, n, d, m = 256, 196, 768, 8
    cfg = Config(16, 64, 64, split=1)
    r = roofline.forward_bytes(b, n, d, m, torch.float16, config=cfg)
    assert r.ideal == {"x": b * n * d * 2, "y": b * m * d * 2, "params": (m + 2) * d * 2}
    assert len(r.launches) == 1                        # split 1: no combine kernel
    # Designed DRAM traffic is the ideal plus what the backward reads: the log-sum-exp, the
    # token statistics (k, mu - k, rstd) and c_s ...
    assert r.dram_bytes == r.ideal_bytes + b * m * 4 + (b * 3 * n + m) * 4
    # ... and the accumulator round trips of the 4 token blocks (3 read + 3 write) hit L2.
    assert r.launches[0].l2["scratch (L2)"] == b * 6 * m * d * 4
    # An inference forward saves no statistics.
    inference = roofline.forward_bytes(b, n, d, m, torch.float16, config=cfg, save_stats=False)
    assert inference.dram_bytes == r.ideal_bytes + b * m * 4


def test_forward_bytes_split_partials_are_written_and_read():
    b, n, d, m = 1, 4096, 1024, 16
    r = roofline.forward_bytes(b, n, d, m, torch.bfloat16, config=Config(16, 64, 64, split=8))
    fwd, comb = r.launches
    part = 8 * m * d * 4
    assert fwd.dram["split partials (acc)"] == part == comb.dram["split partials (acc)"]
    assert r.split == 8 and r.overhead > 1


def test_backward_bytes_partials_and_token_ranges():
    b, n, d, m = 2, 100, 64, 4
    # split 3 over 100 tokens in blocks of 16: 48 + 48 + 4 tokens -> 3 + 3 + 1 token blocks
    assert roofline.token_ranges(n, 3, 16) == [(48, 3), (48, 3), (4, 1)]
    # 4 asked over 20 tokens: whole blocks of 16, so two programs (none without tokens)
    assert roofline.token_ranges(20, 4, 16) == [(16, 1), (4, 1)]
    r = roofline.backward_bytes(b, n, d, m, torch.float32, config=Config(16, 16, 32, split=3))
    delta, main, red = r.launches
    parts = b * 3
    assert main.dram["partials (dW, dg)"] == parts * (m * d + d) * 4
    assert red.dram["dW partials"] == parts * m * d * 4
    # db is summed from dy by the delta kernel: one (D,) row per batch element
    assert delta.dram["db partials"] == red.dram["db partials"] == b * d * 4
    assert r.ideal["dx"] == main.dram["dx"] == b * n * d * 4
    assert main.dram["saved statistics"] == (b * 3 * n + m) * 4
    # op(dy g) per batch element and op(W g) once, written by the delta kernel, read back
    assert delta.dram["score operands"] == main.dram["score operands"] == (b * m * d + m * d) * 4
