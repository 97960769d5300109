"""benchmarks/validation_levers.py wiring, and the issue-33 rule that benchmark scripts reading test data say so."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import validation_levers as levers
from components.config import Config

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# How a benchmark reaches the test split: the pipeline's test batches, the manifest's test rows, or `contad run`/evaluation.
READS_TEST = re.compile(r"test_batch\(|\[\"split\"\] == \"test\"|\"run\", \"--out\"|evaluate_all_tasks")


def test_every_rescored_row_has_a_trained_source_on_the_same_sequence() -> None:
    for row, source in levers.RESCORED_FROM.items():
        assert row in levers.RESCORED_ROWS and source in levers.TRAINED_ROWS
        assert (row in levers.ROWS_3D) == (source in levers.ROWS_3D)
    assert set(levers.RESCORED_ROWS) == set(levers.RESCORED_FROM)
    assert levers.sequence_of("ibiumad", "ad", "3d") == ("3d", levers.PRODUCTS_3D)
    assert levers.sequence_of("iuf_standardise", "ad", "3d") == ("ad", levers.PRODUCTS)


@pytest.mark.parametrize("row, section, key, value", [("ibiumad_sum", "ib_iumad", "combine", "sum"), ("top10", "ucad", "image_top_k", 10)])
def test_rescored_scores_with_the_changed_setting_and_restores_the_method_config(monkeypatch: pytest.MonkeyPatch, row: str, section: str,
                                                                                  key: str, value: object) -> None:
    seen = []
    monkeypatch.setattr(levers, "evaluate_validation", lambda method, vset, cfg: seen.append(getattr(getattr(method.config, section), key)) or {})
    original = Config()
    method = SimpleNamespace(config=original)
    levers.rescored(method, None, levers.RESCORED_ROWS[row])
    assert seen == [value] and method.config is original and getattr(getattr(original, section), key) != value


def test_a_row_keeps_its_own_data_settings_on_a_shared_validation_set() -> None:
    """Rows share a validation set when only non-size data settings differ: a row must not take the first row's
    ``data`` section with it (``overlap64`` scored as the default did, before this was fixed)."""
    from components.config import load_config

    default = load_config("params.yaml", ["data.tile=auto"])
    resolved = default.model_copy(deep=True)
    resolved.data.image_size, resolved.data.tile = 448, 224
    vset = SimpleNamespace(cfg=resolved)
    row = load_config("params.yaml", ["data.tile=auto", *levers.TRAINED_ROWS["overlap64"]])
    cfg = levers.row_config(row, vset)
    assert (cfg.data.image_size, cfg.data.tile, cfg.data.tile_overlap) == (448, 224, 64)
    assert row.data.tile == "auto"  # the row's own config is not changed


def test_benchmarks_that_read_the_test_split_say_so_and_choose_no_default() -> None:
    readers = []
    for path in sorted(BENCHMARKS.glob("*.py")):
        source = path.read_text()
        if not READS_TEST.search(source):
            continue
        readers.append(path.name)
        doc = " ".join((ast.get_docstring(ast.parse(source)) or "").split())
        assert "Reads the test split" in doc and "not used to choose defaults" in doc, path.name
    assert {"real_sequence.py", "feature_sweep.py", "bench_iuf.py", "bench_ib_iumad.py"} <= set(readers)
    assert "validation_levers.py" not in readers


def test_rule_check_applies_each_accuracy_clause_over_the_common_seeds(tmp_path: Path) -> None:
    import json

    def write(row: str, seed: int, images: dict[str, float], aupro: float) -> None:
        per = {p: {"image_auroc": v, "aupro": aupro, "pixel_auroc": 0.9} for p, v in images.items()}
        mean = {"image_auroc": sum(images.values()) / len(images), "aupro": aupro, "pixel_auroc": 0.9}
        (tmp_path / f"seed{seed}").mkdir(exist_ok=True)
        (tmp_path / f"seed{seed}" / f"{row}.json").write_text(json.dumps({"row": row, "seed": seed, "per_product": per, "mean": mean}))

    for seed in (0, 1):
        write("default", seed, {"a": 0.8, "b": 0.8}, 0.5)
        write("better", seed, {"a": 0.84, "b": 0.79}, 0.5)  # +0.015 mean, b -0.01: passes
        write("hurts_one", seed, {"a": 0.9, "b": 0.77}, 0.5)  # +0.035 mean, b -0.03: a product loses > 0.02
        write("blurs", seed, {"a": 0.84, "b": 0.80}, 0.48)  # +0.02 mean, AUPRO -0.02
    write("one_seed", 0, {"a": 0.9, "b": 0.9}, 0.5)
    table = levers.rule_check(tmp_path, ["default", "better", "hurts_one", "blurs", "one_seed", "missing"])
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert set(rows) == {"better", "hurts_one", "blurs", "one_seed"}  # a row with no result is left out
    assert rows["better"].endswith("| pass |") and "| 0,1 |" in rows["better"]
    assert rows["hurts_one"].endswith("| fail |") and "b (-0.0300)" in rows["hurts_one"]
    assert rows["blurs"].endswith("| fail |") and "-0.0200" in rows["blurs"]
    assert "| 0 |" in rows["one_seed"]  # only the seeds both rows have
    write("mtrmb", 0, {"a": 0.5, "b": 0.5}, 0.5)
    write("mtrmb_lite1", 0, {"a": 0.52, "b": 0.52}, 0.5)
    table = levers.rule_check(tmp_path, ["default", "mtrmb", "mtrmb_lite1"])
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == ["| mtrmb_lite1 (vs mtrmb)"]  # against its own method
    assert "+0.0200" in table and table.endswith("| pass |")
