"""Session-wide benchmark state: the device, its measured ceilings, and the results files.

`pytest bench --benchmark-only` writes three files to bench/results/, named by device and time:
pytest-benchmark's own JSON (every timing), ours (one row per case and provider, with GB/s,
floor fractions, tokens/s, MFU, peak memory) and the same rows as a markdown table.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import numpy as np

import pytest
import torch

# Without a GPU the Triton kernels run through Triton's interpreter, switched on before any
# kernel is defined. Its timings say nothing about GPU speed; the results are labelled so.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.common import (RESULTS_DIR, bench_device, describe_device, format_seconds,  # noqa: E402
                          measure_bandwidth, sample_power, slug, write_results)

class JsonReport(os.PathLike):
    """What --benchmark-json is set to when the user gave none. pytest-benchmark >= 5.3 takes a
    path and opens it; older versions take an open file and write in `with json as f:`. This is
    both, and creates the file only when the report is written (no empty file on a crash)."""

    def __init__(self, path):
        self.path, self._file = path, None

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __enter__(self):
        self._file = open(self.path, "wb")
        return self._file

    def __exit__(self, *exc) -> None:
        self._file.close()


STEM = pytest.StashKey[str]()
ROWS = pytest.StashKey[list]()
INFO = pytest.StashKey[object]()
BANDWIDTH = pytest.StashKey[dict]()


def pytest_addoption(parser):
    parser.addoption("--emulate-vram", default=None, metavar="SIZE",
                     help="cap the GPU's memory to SIZE (e.g. 12GiB) to see what fits a smaller card")
    parser.addoption("--time-to-loss", default="quick", choices=("quick", "full", "round2"),
                     help="bench_time_to_loss.py: a few steps, one seed (the default: the harness's command stays "
                          "short), round 1's full protocol (over 90 minutes on a 2-core CPU) or round 2's "
                          "(its docstring says how long); both opt-in")
    parser.addoption("--memory-grid", default="quick", choices=("quick", "full"),
                     help="bench_memory.py: a few planner calibration cases (the default) or every config, "
                          "micro-batch, policy and provider")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    device = bench_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    when = datetime.datetime.now(datetime.timezone.utc)
    config.stash[STEM] = f"{slug(name)}_{when.strftime('%Y%m%d-%H%M%S')}"
    config.stash[ROWS] = []
    config.stash[BANDWIDTH] = {}
    if config.getoption("benchmark_only", False) and config.getoption("benchmark_json", None) is None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        config.option.benchmark_json = JsonReport(RESULTS_DIR / f"{config.stash[STEM]}.pytest-benchmark.json")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture(scope="session")
def device_info(request, device):
    info = describe_device(device)
    request.config.stash[INFO] = info
    sample_power(device, info, "start")
    return info


@pytest.fixture(scope="session")
def bandwidth(request, device, device_info) -> float:
    """Measured copy bandwidth (bytes/s): the floor every memory-bound kernel is held against."""
    value = measure_bandwidth(device)
    request.config.stash[BANDWIDTH]["value"] = value
    return value


@pytest.fixture
def record(request, device, device_info):
    """Append result rows; each is written to the results files at the end of the session."""
    rows = request.config.stash[ROWS]

    def add(row):
        rows.append(row)
        # as it is measured (run with -s to see it): a step stopped at its time limit keeps what it measured
        print(f"\ngptfast row: {row.suite} | {row.case} | {row.provider} | {format_seconds(row.seconds)} | "
              f"{', '.join(f'{k} {v}' for k, v in row.extra.items())}", flush=True)
        sample_power(device, device_info, f"{row.suite} {row.case} {row.provider}")
        return row

    return add


def pytest_benchmark_update_json(config, benchmarks, output_json):
    info = config.stash.get(INFO, None)
    output_json["gptfast"] = {"device": info.__dict__ if info else None,
                              "rows": [row.__dict__ for row in config.stash.get(ROWS, [])]}


def pytest_sessionfinish(session):
    rows = session.config.stash.get(ROWS, [])
    info = session.config.stash.get(INFO, None)
    if not rows or info is None:
        return
    stem = session.config.stash[STEM]
    when = datetime.datetime.strptime(stem.rsplit("_", 1)[1], "%Y%m%d-%H%M%S").replace(tzinfo=datetime.timezone.utc)
    json_path, md_path = write_results(rows, info, session.config.stash[BANDWIDTH].get("value"), when=when)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"gptfast results: {json_path} and {md_path}")
        reporter.write_line(md_path.read_text())


@pytest.fixture(scope="session")
def token_dir(tmp_path_factory) -> Path:
    """A dataset of random GPT-2 token ids: throughput does not depend on the text."""
    folder = tmp_path_factory.mktemp("bench_data") / "random"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 4_000_000), ("val", 200_000)):
        rng.integers(0, 50257, n, dtype=np.uint16).tofile(folder / f"{split}.bin")
    (folder / "meta.json").write_text(json.dumps({"name": "random", "vocab_size": 50257}))
    return folder.parent
