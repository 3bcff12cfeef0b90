"""The benchmark's bookkeeping, which runs without a GPU: merging runs into one results file
(`python -m bench --append`) and the README table generated from a results file
(`python -m bench --report`). Nothing here times anything."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import suite  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
CASE = suite.Case("ViT-B/16", "paper", 256, 196, 768, 8)


def _env(copy_gbs=3000.0, device="NVIDIA H100 80GB HBM3"):
    return dict(device=device, device_type="cuda", torch="2.11.0", triton="3.6.0", cuda="13.0",
                python="3.12", date="2026-11-25", copy_bandwidth_gbs=copy_gbs, cpu_threads=16)


def _rows(ms_by_provider, mode="forward"):
    return [suite._row(CASE, mode, p, torch.bfloat16, ms=ms) for p, ms in ms_by_provider.items()]


def test_append_replaces_same_key_and_keeps_each_runs_bandwidth(tmp_path):
    first = _rows({"pm_kernels": 0.5, "eager": 0.3})
    suite.finish(first, 3000.0)
    suite.write_results(first, _env(3000.0), tmp_path)

    second = _rows({"pm_kernels": 0.25})            # a re-run of one provider, slower copy
    merged, env = suite.merge_results(second, _env(1500.0), tmp_path)
    suite.finish(merged, 1500.0)
    by_provider = {r["provider"]: r for r in merged}
    assert [r["provider"] for r in merged] == ["pm_kernels", "eager"]      # provider order
    assert by_provider["pm_kernels"]["ms"] == 0.25                          # replaced
    assert by_provider["eager"]["ms"] == 0.3                                # kept
    ideal = by_provider["eager"]["ideal_bytes"]
    # The kept row's % of copy bandwidth is relative to its own run's copy (3000 GB/s), the new
    # row's to the new one (1500 GB/s).
    assert by_provider["eager"]["pct_copy_bw"] == pytest.approx(100 * ideal / 0.3e-3 / 1e9 / 3000)
    assert by_provider["pm_kernels"]["pct_copy_bw"] == pytest.approx(
        100 * ideal / 0.25e-3 / 1e9 / 1500)
    assert by_provider["pm_kernels"]["speedup_vs_eager"] == pytest.approx(0.3 / 0.25)
    assert env["copy_bandwidth_runs_gbs"] == [3000.0, 1500.0]


def test_append_refuses_another_device(tmp_path):
    rows = _rows({"eager": 0.3})
    suite.finish(rows, 3000.0)
    suite.write_results(rows, _env(), tmp_path)
    with pytest.raises(SystemExit, match="another device or versions"):
        suite.merge_results(rows, dict(_env(), torch="2.12.0"), tmp_path)


def test_append_refuses_another_dtype_before_running(tmp_path):
    """Rows are keyed by (case, mode, provider): an fp16 row must not replace a bf16 one (its
    speed-ups would then compare dtypes). The check runs before the benchmark does."""
    rows = _rows({"eager": 0.3})
    suite.finish(rows, 3000.0)
    suite.write_results(rows, _env(), tmp_path)
    suite.check_appendable(_env(), torch.bfloat16, tmp_path)          # same dtype: fine
    with pytest.raises(SystemExit, match="another dtype"):
        suite.check_appendable(_env(), torch.float16, tmp_path)


def test_markdown_report_is_generated_from_the_file(tmp_path):
    rows = (_rows({"pm_kernels": 0.5, "eager": 0.3, "sdpa": 0.2})
            + _rows({"pm_kernels": 1.0, "eager": 2.0}, mode="fwd+bwd"))
    rows[-2]["peak_mb"], rows[-1]["peak_mb"] = 155.0, 226.0
    suite.finish(rows, 3000.0)
    (path,) = [p for p in suite.write_results(rows, _env(), tmp_path) if p.suffix == ".json"]
    lines = suite.markdown_report(path).splitlines()
    table = [ln for ln in lines if ln.startswith("| ViT-B/16")]
    assert table == [
        f"| ViT-B/16 | forward | 0.500 | 0.300 | - | 0.200 | {rows[0]['pct_copy_bw']:.1f} "
        "| 0.60x | - | 0.40x |  |",
        f"| ViT-B/16 | fwd+bwd | 1.000 | 2.000 | - | - | {rows[3]['pct_copy_bw']:.1f} "
        "| 2.00x | - | - | 155 / 226 |",
    ]
    assert "NVIDIA H100 80GB HBM3" in lines[0] and "2026-11-25" in lines[0]


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_committed_results_files_are_complete(path):
    """Every committed GPU results file has its provenance and one pm_kernels row per paper case
    and mode, and the report renders them all."""
    data = json.loads(path.read_text())
    env = data["environment"]
    for key in ("device", "torch", "triton", "cuda", "date", "copy_bandwidth_gbs"):
        assert env.get(key), key
    paper = {(r["case"], r["mode"]) for r in data["rows"]
             if r["group"] == "paper" and r["provider"] == "pm_kernels"}
    report = suite.markdown_report(path)
    for case, mode in paper:
        assert f"| {case} | {mode} |" in report


def test_csv_has_every_column_when_merged_rows_predate_one(tmp_path):
    """Rows merged from an older results file lack columns added since (host_ms, graph_ms);
    the CSV takes the union of the columns instead of failing on the first newer row."""
    old, new = _rows({"eager": 0.3}), _rows({"pm_kernels": 0.5})
    for key in ("host_ms", "graph_ms"):
        del old[0][key]
    new[0]["host_ms"] = 0.1
    rows = old + new
    suite.finish(rows, 3000.0)
    (csv_path,) = [p for p in suite.write_results(rows, _env(), tmp_path) if p.suffix == ".csv"]
    header = csv_path.read_text().splitlines()[1].split(",")
    assert "host_ms" in header and "graph_ms" in header


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kernel", ["forward", "backward"])
def test_tune_candidates_are_well_formed(kernel, dtype, monkeypatch):
    """`python -m bench.tune` runs only on a lent GPU, where a crash in building its candidate
    list would cost device minutes: build the lists here, for the GPU heuristics of an H100."""
    from bench import tune
    from pm_kernels import heuristics

    monkeypatch.setattr(heuristics, "_INTERPRETING", False)
    monkeypatch.setattr(heuristics, "num_sms", lambda device: 132)
    for b, n, d, m in tune.SHAPES.values():
        pick = heuristics.forward_config if kernel == "forward" else heuristics.backward_config
        default = pick(b, n, d, m, dtype, torch.device("cpu"))
        cands = tune.candidates(kernel, default, b, n, m, dtype, 132)
        assert cands[0] == (default, True)
        # The A/B of the forward's raw form: bf16 only (fp16 never takes it).
        assert ((default, False) in cands) == (kernel == "forward" and dtype == torch.bfloat16)
        assert len(set(cands)) == len(cands)
        blocks = -(-n // 16)
        for cfg, _raw in cands:
            assert cfg.block_m == heuristics.block_m(m)
            for v in (cfg.block_n, cfg.block_d):
                assert v >= 16 and v & (v - 1) == 0, cfg
            assert cfg.num_warps in (4, 8, 16) and 1 <= cfg.num_stages <= 4, cfg
            assert cfg.maxnreg is None or 64 <= cfg.maxnreg <= 255, cfg
            assert 1 <= cfg.split <= blocks, cfg


def test_profile_kernel_times_per_call():
    """`python -m bench.profile`'s table: GPU events only (CPU ops carry the same names for
    their host side), summed per kernel name and divided by the calls profiled."""
    from types import SimpleNamespace

    from bench import profile

    def event(name, device, us):
        return SimpleNamespace(name=name, device_type=device,
                               time_range=SimpleNamespace(elapsed_us=lambda: us))
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [event("_backward_kernel", cuda, 30.0), event("_backward_kernel", cpu, 500.0),
              event("_delta_kernel", cuda, 4.0), event("_backward_kernel", cuda, 34.0),
              event("_delta_kernel", cuda, 6.0), event("reduce_kernel", cuda, 9.0)]
    rows = profile.kernel_times(events, iters=2)
    assert rows == [dict(kernel="_backward_kernel", launches=1.0, us=32.0),
                    dict(kernel="_delta_kernel", launches=1.0, us=5.0),
                    dict(kernel="reduce_kernel", launches=0.5, us=4.5)]

    # The attributes it reads, on the installed torch's own profiler events (CPU ones here).
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ones(4).add_(1)
    real = prof.events()
    assert real and all(e.device_type == cpu and e.time_range.elapsed_us() >= 0 for e in real)
    assert profile.kernel_times(real, iters=1) == []


def test_profile_calls_run(monkeypatch):
    """The three functions `bench.profile` times, run once each on a small shape (on the GPU
    they run at the paper's): a wrong argument there would otherwise first show on a lent GPU."""
    from bench import profile

    monkeypatch.setitem(profile.SHAPES, "tiny", (2, 20, 24, 3))
    fns = profile._calls("tiny", torch.device("cpu"), torch.bfloat16)
    assert set(fns) == set(profile.MODES)
    y, lse, stats, qsum, _ = fns["forward"]()
    assert y.shape == (2, 3, 24) and stats.shape == (2, 3, 20)
    dx, dq, dg, db = fns["backward"]()
    assert dx.shape == (2, 20, 24) and dq.shape == (3, 24) and dg.shape == db.shape == (24,)
    fns["fwd+bwd"]()


def test_profile_needs_a_gpu(monkeypatch):
    from bench import profile

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        profile.main(["--shapes", "vit-b"])


def test_results_are_written_after_every_case_and_appended_once(tmp_path, monkeypatch):
    """`python -m bench` writes its files after every case, so a run stopped by a time limit
    keeps its finished cases; with --append those per-case writes merge into the file as it was
    before the run (the run's copy bandwidth is recorded once, not once per case)."""
    small = [suite.Case("tiny-a", "paper", 1, 12, 16, 2), suite.Case("tiny-b", "paper", 1, 9, 8, 3)]
    monkeypatch.setattr(suite, "cpu_cases", lambda quick=False: small)
    monkeypatch.setattr(suite, "copy_bandwidth_gbs", lambda dev: 10.0)
    args = ["--save", "--out", str(tmp_path), "--providers", "eager", "--modes", "forward",
            "--quick", "--append"]
    assert suite.main(args) == 0
    first = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [r["case"] for r in first["rows"]] == ["tiny-a", "tiny-b"]

    make = suite.make_inputs

    def stop_at_second(case, *a, **k):            # the time limit strikes during case 2
        if case.name == "tiny-b":
            raise SystemExit(124)
        return make(case, *a, **k)
    monkeypatch.setattr(suite, "make_inputs", stop_at_second)
    with pytest.raises(SystemExit):
        suite.main(args)
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert sorted(r["case"] for r in data["rows"]) == ["tiny-a", "tiny-b"]   # b kept from run 1
    assert data["environment"]["copy_bandwidth_runs_gbs"] == [10.0, 10.0]


def test_plot_is_drawn_from_a_results_file(tmp_path):
    pytest.importorskip("matplotlib")
    rows = _rows({"pm_kernels": 0.5, "eager": 0.3})
    suite.finish(rows, 3000.0)
    json_path = suite.write_results(rows, _env(), tmp_path, with_plot=False)[0]
    assert not json_path.with_suffix(".png").exists()
    assert suite.main(["--plot", str(json_path)]) == 0
    assert json_path.with_suffix(".png").stat().st_size > 0
    # No timed row at all (every provider failed): no plot, no crash.
    failed = [suite._row(CASE, "forward", "pm_kernels", torch.bfloat16, error="boom")]
    assert suite.plot(failed, _env(), tmp_path / "none.png") is None
