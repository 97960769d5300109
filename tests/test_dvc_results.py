"""DVC metrics and plots of results/ in a temporary git+DVC repository: diff across commits, offline pages.

No training: two ``metrics.json`` documents of a three-product sequence (the second forgets more)
go through ``contad report --dvc-dir results`` exactly as the DVC ``report`` stage calls it.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.eval.continual import AccuracyMatrix
from components.eval.dvc_export import CURVES_FILE, FORGETTING_FILE, SUMMARY_FILE, summary_metrics, write_dvc_files
from components.eval.metrics import METRIC_KEYS
from flows.cli import main
from tests.conftest import REPO_ROOT

DVC = Path(sys.executable).with_name("dvc")
PRODUCTS = ["alpha", "beta", "gamma"]
# image AUROC of (step, product): alpha drops from 0.98 to `late` once gamma is learned
LEARNED = {(0, "alpha"): 0.98, (1, "alpha"): 0.97, (1, "beta"): 0.90, (2, "beta"): 0.88, (2, "gamma"): 0.95}


def metrics_doc(late: float) -> dict:
    matrix = AccuracyMatrix(PRODUCTS, 3)
    for (step, product), value in {**LEARNED, (2, "alpha"): late}.items():
        matrix.record(step, product, {m: value for m in METRIC_KEYS})
    return matrix.to_metrics_json("ucad", "sequential")


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_dvc_files_hold_percent_and_leave_undefined_cells_empty(tmp_path: Path) -> None:
    doc = metrics_doc(late=0.70)
    write_dvc_files(doc, tmp_path)
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    # FM of image AUROC: alpha 98 -> 70 (28 points), beta 90 -> 88 (2 points): mean 15 %
    assert summary["forgetting"]["image_auroc"] == pytest.approx(15.0)
    assert summary["average"]["image_auroc"] == pytest.approx(100 * (0.70 + 0.88 + 0.95) / 3, abs=0.01)
    assert set(summary) == {"average", "forgetting", "routing_accuracy"}  # a few readable columns
    curves = {(r["step"], r["product"]): r for r in _rows(tmp_path / CURVES_FILE)}
    assert len(curves) == 9
    assert curves[("0", "gamma")]["image_auroc"] == "" and curves[("1", "gamma")]["image_auroc"] == ""  # not learned: empty, not 0
    assert float(curves[("2", "alpha")]["image_auroc"]) == pytest.approx(70.0)
    forgetting = {(r["step"], r["product"]): r["image_auroc"] for r in _rows(tmp_path / FORGETTING_FILE)}
    assert forgetting[("0", "alpha")] == "" and forgetting[("2", "gamma")] == ""  # no forgetting at the learning step
    assert float(forgetting[("1", "alpha")]) == pytest.approx(1.0) and float(forgetting[("2", "alpha")]) == pytest.approx(28.0)
    assert float(forgetting[("2", "beta")]) == pytest.approx(2.0)


def test_dvc_yaml_plots_name_fields_and_templates_that_exist() -> None:
    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    header = {CURVES_FILE: ["step", "task", "product", *METRIC_KEYS], FORGETTING_FILE: ["step", "task", "product", *METRIC_KEYS],
              "average.csv": ["step", "task", *METRIC_KEYS]}
    for entry in spec["plots"]:
        (name, plot), = entry.items()
        assert plot.get("x") and plot.get("y"), f"plot {name}: x and y must be explicit"
        for path, fields in plot["y"].items():
            fields = [fields] if isinstance(fields, str) else fields
            assert set(fields) | {plot["x"]} <= set(header[Path(path).name]), f"plot {name}: unknown field"
        assert (REPO_ROOT / ".dvc" / "plots" / f"{plot['template']}.json").is_file(), f"plot {name}: template missing"
    report = spec["stages"]["report"]
    assert [next(iter(m)) for m in report["metrics"]] == [f"results/{SUMMARY_FILE}"]
    assert "--dvc-dir results" in report["cmd"]


def test_offline_html_template_has_no_external_script() -> None:
    config = (REPO_ROOT / ".dvc" / "config").read_text()
    assert re.search(r"html_template\s*=\s*plots/offline.html", config)
    page = (REPO_ROOT / ".dvc" / "plots" / "offline.html").read_text()
    assert "{plot_divs}" in page and "{scripts}" not in page  # no {scripts}: DVC adds no CDN tags
    assert "window.vegaEmbed=" in page.replace(" ", "")
    assert not re.search(r"""<script[^>]*\ssrc\s*=""", page)
    vl_convert = pytest.importorskip("vl_convert")
    assert f"vl-convert-python {vl_convert.__version__}" in page, "regenerate with `contad plots-template`"


def _git_dvc_repo(repo: Path) -> None:
    repo.mkdir()
    shutil.copy(REPO_ROOT / "dvc.yaml", repo / "dvc.yaml")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "config", "user.email", "t@example.invalid"], cwd=repo, check=True)
    subprocess.run(["git", "config", "user.name", "t"], cwd=repo, check=True)
    subprocess.run([str(DVC), "init", "-q"], cwd=repo, check=True)
    shutil.copy(REPO_ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copytree(REPO_ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    (repo / ".gitignore").write_text("/runs/\n")


def _commit_run(repo: Path, doc: dict, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    run = repo / "runs" / "pipeline"
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.json").write_text(json.dumps(doc))
    monkeypatch.chdir(repo)
    assert main(["report", "runs/pipeline", "--out", "runs/report", "--dvc-dir", "results"]) == 0
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-q", "-m", message], cwd=repo, check=True)


def _dvc(repo: Path, *args: str) -> str:
    done = subprocess.run([str(DVC), *args], cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"dvc {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
@pytest.mark.integration
def test_metrics_and_plots_diff_across_commits_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not DVC.exists():
        pytest.skip(f"dvc not installed at {DVC}")
    repo = tmp_path / "repo"
    _git_dvc_repo(repo)
    _commit_run(repo, metrics_doc(late=0.96), "first run", monkeypatch)
    _commit_run(repo, metrics_doc(late=0.70), "second run forgets alpha", monkeypatch)

    diff = json.loads(_dvc(repo, "metrics", "diff", "HEAD~1", "HEAD", "--json"))
    changed = diff[f"results/{SUMMARY_FILE}"]
    assert changed["forgetting.image_auroc"]["old"] == pytest.approx(2.0)  # (98-96 + 90-88) / 2
    assert changed["forgetting.image_auroc"]["new"] == pytest.approx(15.0)
    assert "forgetting.image_auroc" in _dvc(repo, "metrics", "diff", "HEAD~1")
    shown = _dvc(repo, "metrics", "show")
    assert max(len(line) for line in shown.splitlines()) < 200, shown  # a readable table, not a 70-column row
    assert summary_metrics(metrics_doc(0.70))["forgetting"]["image_auroc"] == pytest.approx(15.0)

    _dvc(repo, "plots", "diff", "HEAD~1", "HEAD", "-o", "diff_plots")
    page = (repo / "diff_plots" / "index.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?https?://""", page), "dvc plots must not load anything from the network"
    for plot in ("image_auroc_per_product", "image_auroc_forgetting", "average_over_learned_products"):
        assert plot in page
    specs = [json.loads(s) for s in re.findall(r"var spec = (\{.*?\});\s*vegaEmbed", page, flags=re.S)]
    heat = next(s for s in specs if "facet" in s)
    revs = {d["rev"] for d in heat["data"]["values"]}
    assert len(revs) == 2  # one heatmap column per revision
    lines = next(s for s in specs if s.get("encoding", {}).get("color", {}).get("field") == "product")
    gamma = [d for d in lines["data"]["values"] if d["product"] == "gamma"]
    assert {d["image_auroc"] for d in gamma if d["step"] in ("0", "1", 0, 1)} == {""}  # empty, filtered by the template
    _dvc(repo, "plots", "show", "-o", "show_plots")
    assert not re.search(r"""(src|href)\s*=\s*["']?https?://""", (repo / "show_plots" / "index.html").read_text())


@pytest.mark.slow
def test_plots_template_command_regenerates_the_committed_page(tmp_path: Path) -> None:
    pytest.importorskip("vl_convert")
    assert main(["plots-template", "--out", str(tmp_path / "offline.html")]) == 0
    assert (tmp_path / "offline.html").read_text() == (REPO_ROOT / ".dvc" / "plots" / "offline.html").read_text()
