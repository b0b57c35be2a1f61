"""``fastvit plot``: real PNGs from a ``fastvit bench --quick`` run and from the committed CPU results,
one panel per dtype and mode, and clear errors for files that cannot be plotted."""

from __future__ import annotations

import copy
import json
import os

import pytest
from pictures import assert_picture

from fastvit import cli
from fastvit.tools.plot import PlotError, load_results, plot_results

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMITTED = os.path.join(ROOT, "benchmarks", "results", "cpu-latest.json")
FIGURES = ("models", "attention_tflops", "attention_memory")


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """A real results document: attention shapes with every backend, a model vs vit-pytorch and timm."""
    path = tmp_path_factory.mktemp("bench") / "quick.json"
    rc = cli.main(["bench", "--quick", "--device", "cpu", "--models", "levit_128s",
                   "--shapes", "vit_s16_224,levit_256_stage2,cvt_13_stage1", "--group-seconds", "0.05",
                   "--json", str(path)])
    assert rc == 0
    return path


def test_plot_command_draws_every_figure_of_a_quick_bench_run(quick_results, tmp_path, capsys):
    out_dir = tmp_path / "pictures"
    assert cli.main(["plot", str(quick_results), "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    for figure in FIGURES:
        path = out_dir / f"quick_{figure}.png"
        assert f"wrote {path}" in printed.replace("\n", " "), printed
        pixels = assert_picture(path)
        height, width = pixels.shape[:2]
        assert width == (900 if figure == "models" else 750) and height >= 300, (figure, width, height)


def test_default_out_dir_is_the_results_folder(quick_results, tmp_path, capsys):
    copy_path = tmp_path / "copy.json"
    copy_path.write_text(quick_results.read_text())
    assert cli.main(["plot", str(copy_path)]) == 0
    for figure in FIGURES:
        assert_picture(tmp_path / f"copy_{figure}.png")


def _with_backward_and_bf16(doc: dict) -> dict:
    """The committed document plus fwd+bwd copies of its rows and bf16 copies of its attention rows."""
    doc = copy.deepcopy(doc)
    extra = []
    for row in doc["results"]:
        if row["status"] != "ok":
            continue
        slower = dict(row, mode="fwd+bwd", median_ms=row["median_ms"] * 3)
        if "img_per_s" in row:
            slower["img_per_s"] = row["img_per_s"] / 3
        if "gflops" in row:
            slower["gflops"] = row["gflops"] * 3.5 / 3
        extra.append(slower)
        if row["kind"] == "attention":
            extra.append(dict(row, dtype="bf16", gflops=row["gflops"] * 2))
    doc["results"] += extra
    return doc


def test_one_panel_per_dtype_and_mode(tmp_path):
    doc = _with_backward_and_bf16(load_results(COMMITTED))
    paths = plot_results(doc, str(tmp_path), "two")
    assert [os.path.basename(p) for p in paths] == [f"two_{f}.png" for f in FIGURES]
    models = assert_picture(paths[0])
    assert models.shape[1] == 1800  # fwd and fwd+bwd side by side
    for path in paths[1:]:
        assert assert_picture(path).shape[:2] == (500, 1950)  # fp32 fwd, fp32 fwd+bwd, bf16 fwd
    # only one kind of row: only its figures
    only_models = dict(doc, results=[r for r in doc["results"] if r["kind"] == "model"])
    assert [os.path.basename(p) for p in plot_results(only_models, str(tmp_path), "m")] == ["m_models.png"]


def test_committed_results_plot_and_the_readme_shows_one(tmp_path):
    paths = plot_results(load_results(COMMITTED), str(tmp_path), "cpu-latest")
    assert len(paths) == 3
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    shown = os.path.join(ROOT, "benchmarks", "results", "cpu-latest_models.png")
    assert "benchmarks/results/cpu-latest_models.png" in readme
    assert_picture(shown)
    assert os.path.getsize(shown) < 150 * 1024


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "not JSON"),
    ("[1, 2]", "not a fastvit bench results document"),
    ('{"kind": "fastvit-check"}', "not a fastvit bench results document (kind 'fastvit-check'"),
    ('{"kind": "fastvit-bench", "schema_version": 1}', "does not follow the results schema: missing top-level key"),
])
def test_files_that_cannot_be_plotted_exit_2_with_the_reason(tmp_path, capsys, content, message):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    assert cli.main(["plot", str(path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert message in err and str(path) in err, err
    assert not list(tmp_path.glob("*.png"))


def test_a_document_where_nothing_ran_is_an_error(tmp_path):
    doc = load_results(COMMITTED)
    doc["results"] = [dict(r, status="skipped", reason="not run here") for r in doc["results"]]
    with pytest.raises(PlotError, match="nothing to plot"):
        plot_results(doc, str(tmp_path))


def test_a_committed_allocator_table_is_not_mistaken_for_results():
    with pytest.raises(PlotError, match="not a fastvit bench results document"):
        load_results(os.path.join(ROOT, "benchmarks", "results", "cpu-allocator.json"))
    assert json.load(open(COMMITTED))["kind"] == "fastvit-bench"
