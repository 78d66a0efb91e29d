"""`python -m gptfast.plot`: a PNG of two runs side by side, drawn from their metrics."""

import json

import pytest

from gptfast.plot import main as plot_main
from gptfast.plot import plot_bench, plot_runs, read_run
from gptfast.trainer import Trainer

pytest.importorskip("matplotlib", reason="the plot extra is not installed")


def quiet(_):
    pass


@pytest.fixture
def two_runs(tiny_config, tmp_path):
    runs = []
    for name, lr in (("a", 1e-3), ("b", 3e-3)):
        out = tmp_path / name
        Trainer(tiny_config({"optim.lr": lr}, out_dir=out), log=quiet).run()
        runs.append(out)
    return runs


def test_two_runs_are_drawn_with_their_data(two_runs, tmp_path):
    png = tmp_path / "curves.png"
    fig = plot_runs(two_runs, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    loss_panel = fig.axes[0]
    lines = {line.get_label(): line for line in loss_panel.get_lines()}
    for run in two_runs:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if "loss" in r]
        val = [r for r in records if "val_loss" in r]
        drawn = lines[f"{run} train"]
        assert list(drawn.get_xdata()) == [r["tokens"] for r in train]
        assert list(drawn.get_ydata()) == [r["loss"] for r in train]
        assert list(lines[f"{run} val"].get_ydata()) == [r["val_loss"] for r in val]
    # wall time panel: hours of training
    time_panel = fig.axes[1]
    assert {line.get_label() for line in time_panel.get_lines()} == {f"{run} val" for run in two_runs}


def test_the_cli_writes_the_png_and_rejects_what_is_not_a_run(two_runs, tmp_path, capsys):
    png = tmp_path / "out.png"
    assert plot_main([str(r) for r in two_runs] + ["-o", str(png)]) == 0
    assert png.exists()
    assert plot_main([str(tmp_path / "nowhere"), "-o", str(tmp_path / "x.png")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_a_torn_last_line_is_skipped(two_runs):
    with open(two_runs[0] / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.')
    assert len(read_run(two_runs[0])["train"]) == 6


def test_benchmark_ratios_are_drawn(tmp_path):
    results = {"device": {"label": "test device", "git_sha": "abc"}, "rows": [
        {"suite": "ln", "case": "c1", "provider": "gptfast", "seconds": 1.0},
        {"suite": "ln", "case": "c1", "provider": "torch", "seconds": 2.0},
        {"suite": "ln", "case": "c1", "provider": "torch_compile", "seconds": 0.5},
        {"suite": "ce", "case": "c2", "provider": "torch", "seconds": 2.0},  # no gptfast row: not drawn
    ]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    fig = plot_bench(path, tmp_path / "bench.png")
    widths = sorted(round(bar.get_width(), 3) for bar in fig.axes[0].patches)
    assert widths == [0.5, 2.0]
    (tmp_path / "bad.json").write_text("{}")
    assert plot_main(["--bench", str(tmp_path / "bad.json"), "-o", str(tmp_path / "b.png")]) == 2


def test_the_learning_rate_is_drawn_empty_panels_left_out_and_the_figure_titled(two_runs, tmp_path):
    fig = plot_runs(two_runs, tmp_path / "c.png", log_loss=True)
    titles = [ax.get_title() for ax in fig.axes]
    # a CPU run records no MFU and no GPU memory: those panels are not drawn at all
    assert "MFU" not in titles and "peak memory (GiB)" not in titles
    assert all(ax.get_lines() for ax in fig.axes)
    lr_panel = fig.axes[titles.index("learning rate")]
    for run, line in zip(two_runs, lr_panel.get_lines()):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert list(line.get_ydata()) == [r["lr"] for r in records if "loss" in r]
    assert {ax.get_yscale() for ax in fig.axes if "loss" in ax.get_title()} == {"log"}
    assert fig.axes[titles.index("learning rate")].get_yscale() == "linear"
    assert fig._suptitle.get_text() == "a vs b"
    titled = plot_runs(two_runs, tmp_path / "d.png", title="lr sweep")
    assert titled._suptitle.get_text() == "lr sweep"
    assert {ax.get_yscale() for ax in titled.axes} == {"linear"}
