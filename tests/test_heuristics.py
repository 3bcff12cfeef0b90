"""Launch heuristics: the host helpers and the precision mapping (no kernel runs here)."""

import pytest
import torch
import triton

from pm_kernels import heuristics


def test_host_integer_helpers_match_triton():
    """`cdiv` / `next_pow2` replace triton.cdiv / triton.next_power_of_2 on the launch path
    (those are constexpr functions since Triton 3.5, microseconds per host call)."""
    for a in range(0, 300):
        assert heuristics.next_pow2(a) == max(1, triton.next_power_of_2(a)), a
        for b in range(1, 70):
            assert heuristics.cdiv(a, b) == triton.cdiv(a, b), (a, b)


def test_interpreting_follows_tritons_own_setting():
    assert heuristics.interpreting() == bool(triton.knobs.runtime.interpret)


@pytest.fixture
def restore_precision():
    saved = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(saved)


@pytest.mark.usefixtures("restore_precision")
@pytest.mark.parametrize("level, expected", [("highest", "ieee"), ("high", "tf32x3"),
                                             ("medium", "tf32")])
def test_fp32_input_precision_follows_torch(level, expected):
    torch.set_float32_matmul_precision(level)
    assert heuristics.input_precision(torch.float32) == expected
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        assert heuristics.input_precision(dt) == "ieee"


@pytest.mark.usefixtures("restore_precision")
@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
                    reason="the per-backend precision API arrived in torch 2.9")
@pytest.mark.parametrize("new, expected", [("tf32", "tf32"), ("ieee", "ieee")])
def test_fp32_input_precision_under_the_per_backend_api(new, expected):
    """Set through torch.backends.cuda.matmul.fp32_precision, the legacy getter raises (mixed
    APIs); the launchers must still pick a precision rather than fail every fp32 launch."""
    torch.backends.cuda.matmul.fp32_precision = new
    try:
        assert heuristics.input_precision(torch.float32) == expected
    finally:
        torch.backends.cuda.matmul.fp32_precision = "none"


def test_token_split_launches_no_program_without_tokens():
    """The launchers' grid: whole token blocks per program, every token owned by exactly one
    program, never more programs than asked, and none that owns nothing (such a program would
    still write a partial row that the final sums read)."""
    for bn in (16, 32, 128):
        for n in range(1, 300):
            blocks = heuristics.cdiv(n, bn)
            for split in range(1, 24):
                programs, per = heuristics.token_split(n, split, bn)
                assert per % bn == 0 and 1 <= programs <= min(split, blocks), (n, split, bn)
                assert (programs - 1) * per < n <= programs * per, (n, split, bn)
                # as balanced as whole blocks allow: no program takes more blocks than needed
                assert per // bn == heuristics.cdiv(blocks, min(split, blocks)), (n, split, bn)
    # The A100 backward at ViT-B/16 (split capped at 6 for 7 token blocks of 32): 4 programs
    # of 64 tokens; 6 would have left two of them without a token.
    assert heuristics.token_split(196, 6, 32) == (4, 64)
    with pytest.raises(ValueError, match="N >= 1"):
        heuristics.token_split(0, 4, 32)


@pytest.mark.parametrize("b, n, m", [(256, 196, 8), (8, 4096, 8), (1, 1024, 16), (256, 197, 1)])
def test_split_rule_is_what_the_gpu_configs_use(b, n, m, monkeypatch):
    """roofline counts bytes with `split_rule`; the GPU configs must use exactly that rule."""
    monkeypatch.setattr(heuristics, "_INTERPRETING", False)
    monkeypatch.setattr(heuristics, "num_sms", lambda device: 132)
    dev = torch.device("cpu")
    for backward, pick in ((False, heuristics.forward_config), (True, heuristics.backward_config)):
        cfg = pick(b, n, 768, m, torch.bfloat16, dev)
        assert cfg.split == heuristics.split_rule(backward, b, n, m, cfg.block_m, cfg.block_n, 2,
                                                  132)
    # The paper's backward: one program per token block, within the partial-bytes cap.
    if (b, n, m) == (256, 196, 8):
        cfg = heuristics.backward_config(b, n, 768, m, torch.bfloat16, dev)
        assert cfg.split == heuristics.cdiv(n, cfg.block_n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [8, 16])
def test_paper_forward_tile_keeps_two_programs_per_sm(dtype, m, monkeypatch):
    """Rule 2 of the tile tables: at B = 256 every program of the paper's grid must be resident
    at once, 2 per SM on an H100, i.e. registers * threads * 2 <= 64K. ptxas left to itself put
    the bf16 forward at 171-181 registers for 8 warps (one program per SM), so the tile caps
    them; a table edit that drops the cap, or raises warps past it, fails here."""
    monkeypatch.setattr(heuristics, "_INTERPRETING", False)
    monkeypatch.setattr(heuristics, "num_sms", lambda device: 132)
    cfg = heuristics.forward_config(256, 196, 768, m, dtype, torch.device("cpu"))
    assert cfg.maxnreg is not None, cfg
    assert cfg.maxnreg * cfg.num_warps * 32 * 2 <= 65536, cfg


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [8, 16])
def test_paper_backward_tile_keeps_three_programs_per_sm(dtype, m, monkeypatch):
    """The backward's 4-warp tile is capped so that three programs fit per SM (ptxas alone
    took up to 238 registers: two)."""
    monkeypatch.setattr(heuristics, "_INTERPRETING", False)
    monkeypatch.setattr(heuristics, "num_sms", lambda device: 132)
    cfg = heuristics.backward_config(256, 196, 768, m, dtype, torch.device("cpu"))
    assert cfg.maxnreg is not None, cfg
    assert cfg.maxnreg * cfg.num_warps * 32 * 3 <= 65536, cfg


@pytest.mark.parametrize("m", [1, 8, 16, 33, 64, 128, 256])
@pytest.mark.parametrize("d", [16, 100, 768, 1280, 4096])
def test_token_free_loops_take_wide_bounded_steps(d, m, monkeypatch):
    """The forward's query-operand loop and the delta kernel are a memory round trip per step:
    on a GPU they step wider than the token loops (3 steps at ViT-B/16), but never past 16
    elements per thread of a BLOCK_M x BLOCK_D tile (registers), never narrower than the token
    loops, never wider than D needs, and always a power of two (tl.arange)."""
    monkeypatch.setattr(heuristics, "_INTERPRETING", False)
    monkeypatch.setattr(heuristics, "num_sms", lambda device: 132)
    dev = torch.device("cpu")
    for dtype in (torch.bfloat16, torch.float32):
        fwd = heuristics.forward_config(256, 196, d, m, dtype, dev)
        bwd = heuristics.backward_config(256, 196, d, m, dtype, dev)
        delta = heuristics.delta_config(d, m, bwd)
        for warps, token_bd, bd in (
                (fwd.num_warps, fwd.block_d,
                 heuristics.prologue_block_d(d, m, fwd.num_warps, fwd.block_d)),
                (delta.num_warps, bwd.block_d, delta.block_d)):
            assert bd & (bd - 1) == 0 and bd >= token_bd, (bd, token_bd)
            assert bd <= max(token_bd, heuristics.next_pow2(d)), bd
            assert (bd == token_bd
                    or heuristics.block_m(m) * bd <= 16 * 32 * warps), (m, bd, warps)
        assert delta.block_m == bwd.block_m
    if (d, m) == (768, 8):                          # ViT-B/16 in bf16: 3 steps each
        fwd = heuristics.forward_config(256, 196, d, m, torch.bfloat16, dev)
        bwd = heuristics.backward_config(256, 196, d, m, torch.bfloat16, dev)
        assert heuristics.prologue_block_d(d, m, fwd.num_warps, fwd.block_d) == 256
        assert heuristics.delta_config(d, m, bwd).block_d == 256


def test_launches_run_on_the_tensors_gpu(monkeypatch):
    """Triton launches on the current CUDA device: the launchers make x's device current when
    it is another one (a model spread over GPUs without set_device), and only then."""
    import contextlib
    import types

    from pm_kernels.forward import device_of
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def on(dev):
        return device_of(types.SimpleNamespace(device=torch.device(dev)))
    for dev in ("cpu", "meta", "cuda", "cuda:0"):
        assert isinstance(on(dev), contextlib.nullcontext), dev
    ctx = on("cuda:1")
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
