"""``dvc repro`` of dvc.yaml in a temporary git+dvc repository on a tiny demo configuration.

End to end once; a second repro does nothing; a training parameter change reruns the continual
run and the report but neither data preparation, validation nor masks.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
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
        assert stage["cmd"].startswith("contad "), f"stage {name} must call the contad CLI"
        for key in stage.get("params", []):
            node = defaults
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"stage {name}: params key {key!r} is not in params.yaml"
                node = node[part]
    run = spec["stages"]["run"]
    assert "metrics" not in run and "plots" not in run, "metrics/plots live in the git-tracked results/ (report stage)"
    assert [next(iter(m)) for m in spec["stages"]["report"]["metrics"]] == ["results/summary.json"]
    assert "runs/mask_cache" in run["deps"] and "runs/mask_cache" in spec["stages"]["masks"]["outs"]
    assert not {"ucad", "method", "eval"} & set(spec["stages"]["masks"].get("params", [])), "training knobs must not invalidate masks"
    # Every config section that can change what `contad run` learns or reports invalidates the run stage;
    # only locations, serving, tracking, compute placement, streaming and the demo may stay out.
    not_results = {"data", "masks", "tracking", "banks", "serve", "compute", "stream", "demo"}
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

    _write_params(repo, "ucad.epochs=2")
    third = _sh([str(DVC), "repro"], repo, env)
    assert _ran(third) == {"run", "report"}, third[-3000:]

