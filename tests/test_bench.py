"""The benchmark harness's own logic, on the CPU: figures, device handling and results files."""

import json

import pytest
import torch

from bench import common
from bench.common import (DeviceInfo, Row, bandwidth_row, format_table, peak_flops, speedups, versus_fastest,
                          write_results)


REPO_ROOT = common.RESULTS_DIR.parents[1]
RESULTS = common.RESULTS_DIR


def info(kind="cuda", name="NVIDIA GeForce RTX 4070"):
    return DeviceInfo(kind, name, name, "2.13.0", "3.9.0", "abc123")


def test_bandwidth_row_arithmetic():
    row = bandwidth_row("layernorm", "fwd", "gptfast", seconds=1e-4, bytes_moved=50_000_000, bandwidth=1e12)
    assert row.gbps == pytest.approx(500.0)  # 5e7 B / 1e-4 s = 5e11 B/s
    assert row.floor_fraction == pytest.approx(0.5)


def test_each_case_names_its_fastest_provider_and_the_best_peer():
    rows = [Row("ce", "a", "gptfast", 2.0), Row("ce", "a", "torch", 4.0), Row("ce", "a", "liger", 1.0),
            Row("ce", "a", "cce", 1.6), Row("ce", "b", "gptfast", 1.0), Row("ce", "b", "torch", 3.0),
            Row("ln", "c", "torch", 1.0)]
    assert versus_fastest(rows) == {("ce", "a"): "fastest: liger; gptfast 0.50x of it; vs best peer (liger) 0.50x",
                                    ("ce", "b"): "fastest: gptfast"}
    info = DeviceInfo("cuda", "GPU", "GPU", "2", "3", "sha")
    assert "| fastest: liger; gptfast 0.50x of it; vs best peer (liger) 0.50x |" in format_table(rows, info, None)


def test_speedups_compare_each_case_with_gptfast():
    rows = [Row("s", "a", "gptfast", 1.0), Row("s", "a", "torch", 1.5), Row("s", "a", "torch_compile", 0.8),
            Row("s", "b", "torch", 2.0)]
    assert speedups(rows) == {("s", "a"): {"torch": 1.5, "torch_compile": 0.8}}


def test_peak_from_table_measured_or_none(monkeypatch):
    assert peak_flops(info(), torch.device("cuda")) == (58.3e12, "table")
    monkeypatch.setattr(common, "measure_matmul_peak", lambda device: 123e12)
    assert peak_flops(info(name="NVIDIA Future GPU"), torch.device("cuda")) == (123e12, "measured peak")
    assert peak_flops(info(kind="cpu", name="x86_64"), torch.device("cpu")) == (None, "none on CPU")


def test_results_files(tmp_path):
    rows = [bandwidth_row("layernorm", "fwd N=8 C=4 bf16", "gptfast", 2e-6, 1000, 1e9),
            bandwidth_row("layernorm", "fwd N=8 C=4 bf16", "torch", 4e-6, 1000, 1e9),
            Row("train", "small_4070 (12GiB VRAM)", "gptfast", 1.5, extra={"tokens/s": "349,525", "MFU": None})]
    json_path, md_path = write_results(rows, info(), 1e9, directory=tmp_path)
    assert json_path.name.startswith("nvidia-geforce-rtx-4070_") and md_path.suffix == ".md"
    payload = json.loads(json_path.read_text())
    assert payload["device"]["name"] == "NVIDIA GeForce RTX 4070" and payload["device"]["git_sha"] == "abc123"
    assert payload["device"]["torch_version"] == "2.13.0" and payload["bandwidth_bytes_per_s"] == 1e9
    assert [r["provider"] for r in payload["rows"]] == ["gptfast", "torch", "gptfast"]
    table = md_path.read_text()
    assert "Device: **NVIDIA GeForce RTX 4070**" in table and "commit abc123" in table
    assert "| layernorm | fwd N=8 C=4 bf16 | gptfast | 2.0 us | 0 | 50% | 2.00x vs torch | fastest: gptfast |  |" in table
    assert "tokens/s 349,525" in table and "MFU" not in table.split("tokens/s")[1].split("|")[0]


def test_cpu_figures_are_labelled():
    cpu = common.describe_device(torch.device("cpu"))
    assert cpu.kind == "cpu" and "not comparable with GPU figures" in cpu.label
    assert "Triton interpreter" in format_table([], cpu, None)


@pytest.mark.slow
def test_the_benchmark_command_runs_and_writes_its_results(tmp_path):
    """The README's `pytest bench --benchmark-only`, at the CPU's smallest cases, end to end: every
    bench_*.py runs and the session writes pytest-benchmark's JSON, ours and the markdown table
    (a crash at the end of the session once left no results and a 0-byte file)."""
    import subprocess
    import sys

    before = set(RESULTS.glob("cpu_*"))
    run = subprocess.run([sys.executable, "-m", "pytest", "bench", "--benchmark-only", "-q", "-p", "no:cacheprovider"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    new = sorted(set(RESULTS.glob("cpu_*")) - before)
    try:
        suffixes = sorted(p.name.split(".", 1)[1] for p in new)
        assert suffixes == ["json", "md", "pytest-benchmark.json"], new
        assert all(p.stat().st_size > 0 for p in new)
        ours = next(p for p in new if p.name.endswith(".json") and not p.name.endswith("pytest-benchmark.json"))
        suites = {row["suite"] for row in json.loads(ours.read_text())["rows"]}
        assert {"layernorm", "cross_entropy", "linear_cross_entropy", "adamw", "train", "memory", "compile",
                "fp8"} <= suites, suites
        assert json.loads(next(p for p in new if p.name.endswith("pytest-benchmark.json")).read_text())["benchmarks"]
    finally:
        for path in new:
            path.unlink()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the script's answer on a machine without a GPU")
@pytest.mark.parametrize("args, message", [(["bench_trian"], "unknown step 'bench_trian'"),
                                           (["tests_gpu"], "no CUDA device")])
def test_gpu_check_refuses_what_it_cannot_run(args, message):
    """bench/gpu_check.sh: a misspelt step, or no GPU, is one error line and exit code 2, and no
    results folder is made."""
    import subprocess

    before = set(RESULTS.glob("gpu-check_*"))
    run = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), *args], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run
    assert set(RESULTS.glob("gpu-check_*")) == before
