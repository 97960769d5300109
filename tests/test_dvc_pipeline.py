"""``dvc repro`` of dvc.yaml in a temporary git+dvc repository on a tiny demo configuration.

End to end once; a second repro does nothing; a training parameter change reruns the continual
run and the report but neither data preparation, validation nor masks.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.config import config_to_dict, load_config
from tests.conftest import REPO_ROOT
from tests.test_pipeline_helpers import TINY_OVERRIDES, offline_env, shared_prefect_api

DVC = REPO_ROOT / ".venv" / "bin" / "dvc"
STAGES = ("prepare", "validate", "masks", "run", "report")


@pytest.fixture(scope="module")
def prefect_api(request: pytest.FixtureRequest) -> str:
    return shared_prefect_api(request)


def _sh(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout + done.stderr


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


def _write_params(repo: Path, *extra: str) -> None:
    cfg = load_config(REPO_ROOT / "params.yaml", [*TINY_OVERRIDES, "data.synth.products=2", "tracking.enabled=false", *extra])
    (repo / "params.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def test_dvc_yaml_stages_call_the_cli_with_existing_params() -> None:
    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    assert tuple(spec["stages"]) == STAGES
    defaults = config_to_dict(load_config(REPO_ROOT / "params.yaml"))
    for name, stage in spec["stages"].items():
        cmds = stage["cmd"] if isinstance(stage["cmd"], list) else [stage["cmd"]]
        assert cmds[-1].startswith("contad "), f"stage {name} must call the contad CLI"
        for key in stage.get("params", []):
            node = defaults
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"stage {name}: params key {key!r} is not in params.yaml"
                node = node[part]
    run = spec["stages"]["run"]
    assert "metrics" not in run and "plots" not in run, "metrics/plots live in the git-tracked results/ (report stage)"
    assert [next(iter(m)) for m in spec["stages"]["report"]["metrics"]] == ["results/summary.json"]
    # the committed dvc.lock names only outputs that are byte-identical on every machine and in every clone directory
    assert run["cmd"][0] == "rm -rf runs/pipeline", "the run's working state is not an output: start from an empty directory"
    outs = {next(iter(o)) if isinstance(o, dict) else o for o in run["outs"]}
    assert outs == {f"runs/pipeline/{name}" for name in ("figures", "report.md", "metrics.json", "matrices")}, outs
    assert "outs" not in spec["stages"]["validate"] and "outs" not in spec["stages"]["masks"], "they name absolute paths"
    assert not {"ucad", "method", "eval"} & set(spec["stages"]["masks"].get("params", [])), "training knobs must not invalidate masks"
    # Every config section that can change what `contad run` learns or reports invalidates the run stage;
    # only locations, serving, tracking, compute placement, streaming, drift watch, feedback and the demo may stay out.
    not_results = {"data", "masks", "tracking", "banks", "serve", "compute", "stream", "drift", "feedback", "demo"}
    listed = {key.split(".")[0] for key in run["params"]}
    missing = set(defaults) - not_results - listed
    assert not missing, f"dvc.yaml run stage misses params sections {sorted(missing)}"


@pytest.mark.slow
@pytest.mark.integration
def test_dvc_repro_end_to_end_then_noop_then_training_change(prefect_api: str, tmp_path: Path) -> None:
    if not DVC.exists():
        pytest.skip(f"dvc not installed at {DVC}")
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO_ROOT / "dvc.yaml", repo / "dvc.yaml")
    _write_params(repo)
    env = offline_env(prefect_api)
    _sh(["git", "init", "-q"], repo, env)
    _sh([str(DVC), "init", "-q"], repo, env)

    first = _sh([str(DVC), "repro"], repo, env)
    assert _ran(first) == set(STAGES), first[-3000:]
    metrics = json.loads((repo / "runs/pipeline/metrics.json").read_text())
    assert metrics["method"] == "ucad" and len(metrics["tasks"]) == 2
    assert (repo / "runs/report/comparison.md").is_file() or any((repo / "runs/report").iterdir())
    assert (repo / "runs/pipeline/matrices/average.csv").is_file()
    assert "results/summary.json" in _sh([str(DVC), "metrics", "show", "--json"], repo, env)
    assert (repo / "results" / "curves.csv").is_file() and (repo / "results" / "forgetting.csv").is_file()

    second = _sh([str(DVC), "repro"], repo, env)
    assert _ran(second) == set(), second[-3000:]

    # the committed lock is reproducible: the run again, from scratch, writes the same dvc.lock (no timestamps,
    # no run ids, no absolute paths in what it names)
    lock = (repo / "dvc.lock").read_text()
    again = _sh([str(DVC), "repro", "--force", "--single-item", "run"], repo, env)
    assert _ran(again) == {"run"}, again[-3000:]
    assert (repo / "dvc.lock").read_text() == lock

    _write_params(repo, "ucad.epochs=2")
    third = _sh([str(DVC), "repro"], repo, env)
    assert _ran(third) == {"run", "report"}, third[-3000:]



def _digests(root: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="numpy's portable kernels are pinned for x86-64")
def test_data_synth_files_are_what_every_x86_64_machine_makes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``contad data synth`` (DVC's prepare stage) == the same products made with numpy on its x86-64 baseline kernels,
    which every x86-64 CPU runs; numpy's AVX2/AVX-512 kernels flip a few pixels (3 of 74 files here on AVX-512)."""
    from flows.cli import PORTABLE_NUMPY_ENV, parse_args, set_portable_numpy

    env = {k: v for k, v in os.environ.items() if not k.startswith("NPY_")}
    contad = Path(sys.executable).with_name("contad")
    sizes = ["data.synth.image_size=96"]
    done = subprocess.run([str(contad), "data", "synth", "--out", str(tmp_path / "cli"), "--products", "2", *sizes],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    make = ("from pathlib import Path; from components.config import load_config; from components.data.synth import generate_products; "
            f"generate_products(Path({str(tmp_path / 'baseline')!r}), 2, 0, load_config('params.yaml', {sizes!r}).data.synth)")
    done = subprocess.run([sys.executable, "-c", make], cwd=REPO_ROOT, env={**env, **PORTABLE_NUMPY_ENV}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _digests(tmp_path / "cli") == _digests(tmp_path / "baseline")
    # set only for data synth, only before numpy is imported, never over the user's own choice
    for key in ("NPY_ENABLE_CPU_FEATURES", "NPY_DISABLE_CPU_FEATURES"):
        monkeypatch.delenv(key, raising=False)
    assert not set_portable_numpy(parse_args(["data", "synth", "--out", "x"]))  # numpy is imported in this process
    monkeypatch.delitem(sys.modules, "numpy")
    assert not set_portable_numpy(parse_args(["data", "validate", "x"])) and "NPY_ENABLE_CPU_FEATURES" not in os.environ
    monkeypatch.setenv("NPY_DISABLE_CPU_FEATURES", "X86_V4")
    assert not set_portable_numpy(parse_args(["data", "synth", "--out", "x"])) and "NPY_ENABLE_CPU_FEATURES" not in os.environ
    monkeypatch.delenv("NPY_DISABLE_CPU_FEATURES")
    assert set_portable_numpy(parse_args(["data", "synth", "--out", "x"])) and os.environ["NPY_ENABLE_CPU_FEATURES"] == "X86_V2"
