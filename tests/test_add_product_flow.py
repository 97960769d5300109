"""``contad add-product``: validate -> masks -> train on the champion -> version -> evaluate all -> gate.

A 2-product sequence is trained once per session (``tracking_support.trained_base``); every
test works on its own copy of the resulting bank store and MLflow store.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from components.config import Config
from components.memory.store import BankStore
from flows.add_product import AddProductError, add_product_command
from flows.tracking import champion_version
from tests.tracking_support import TrainedBase, copy_base, trained_base


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> TrainedBase:
    return trained_base(tmp_path_factory)


def _copy(base: TrainedBase, tmp_path: Path, **promotion: float) -> tuple[Config, BankStore, MlflowClient]:
    cfg = copy_base(base, tmp_path / "work", **promotion)
    return cfg, BankStore(cfg.banks.store_dir), MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)


def _state(store: BankStore, client: MlflowClient) -> tuple[str | None, tuple[str, str | None] | None, int]:
    """(current bank version, champion (version, bank tag), number of model versions)."""
    versions = client.search_model_versions("name = 'contad-detector'")
    return store.current(), champion_version(client, "contad-detector"), len(versions)


def test_success_moves_bank_and_champion(base: TrainedBase, tmp_path: Path) -> None:
    cfg, store, client = _copy(base, tmp_path)
    before_bank, before_champion, n_versions = _state(store, client)
    assert before_champion is not None and before_champion[1] == before_bank

    assert add_product_command(cfg, base.new, name="newcomer", out=tmp_path / "out", via_server=False) == 0

    bank, champion, n_after = _state(store, client)
    assert bank != before_bank and n_after == n_versions + 1
    assert champion == (str(n_after), bank)
    manifest = store.show(bank)
    assert manifest["parent"] == before_bank
    assert manifest["products"]["newcomer"] == str(base.new.resolve())
    assert set(manifest["products"]) == {p.name for p in base.old} | {"newcomer"}
    assert set(manifest["metrics"]) == set(manifest["products"])  # every product re-evaluated
    assert manifest["tasks"][-1] == "newcomer" and manifest["step"] == 2
    step_run = client.get_run(client.get_model_version("contad-detector", champion[0]).run_id)
    assert step_run.data.tags["contad.task"] == "newcomer"
    assert {f"image_auroc/{p.name}" for p in base.old} | {"image_auroc/newcomer"} <= set(step_run.data.metrics)
    version = client.get_model_version("contad-detector", champion[0])
    assert version.tags["gate"] == "passed" and version.tags["bank_version"] == bank and version.tags["task"] == "newcomer"
    assert set(version.tags["products"].split(", ")) == set(manifest["products"]) and "`newcomer`" in version.description

    with pytest.raises(AddProductError, match="already learned"):
        add_product_command(cfg, base.new, name="newcomer", out=tmp_path / "again", via_server=False)


def test_gate_failure_keeps_bank_and_champion(base: TrainedBase, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, store, client = _copy(base, tmp_path, min_new_image_auroc=1.01)
    before_bank, before_champion, n_versions = _state(store, client)

    assert add_product_command(cfg, base.new, name="newcomer", out=tmp_path / "out", via_server=False) == 1

    assert "min_new_image_auroc" in capsys.readouterr().err
    bank, champion, n_after = _state(store, client)
    assert (bank, champion) == (before_bank, before_champion)
    assert n_after == n_versions + 1  # the rejected step is registered, just not champion
    rejected = [v for v in store.list() if v.tasks and v.tasks[-1] == "newcomer"]
    assert len(rejected) == 1 and not rejected[0].current  # kept (immutable record) but not current
    assert store.show(rejected[0].version)["gate"]["passed"] is False
    version = client.get_model_version("contad-detector", str(n_after))  # the rejected step's version says why
    assert version.tags["gate"] == "rejected" and "min_new_image_auroc" in version.tags["gate_reasons"]
    assert "Promotion gate: **rejected**" in version.description and version.tags["bank_version"] == rejected[0].version


def test_invalid_product_data_changes_nothing(base: TrainedBase, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg, store, client = _copy(base, tmp_path)
    before = _state(store, client)
    broken = tmp_path / "broken"
    shutil.copytree(base.new, broken)
    next(iter(sorted((broken / "train" / "good").iterdir()))).write_bytes(b"not an image")

    with pytest.raises(AddProductError, match="validat") as info:
        add_product_command(cfg, broken, name="broken", out=tmp_path / "out", via_server=False)

    assert "champion unchanged" in str(info.value)
    assert f"product folder {broken} " in str(info.value) and "contad-add-" not in str(info.value)  # the user's folder, not a temp copy
    assert str(broken) in caplog.text and "contad-add-" not in caplog.text  # log lines too
    assert _state(store, client) == before


def test_exception_mid_training_changes_nothing(base: TrainedBase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.methods.patchcore import PatchCoreFinetune

    cfg, store, client = _copy(base, tmp_path)
    before = _state(store, client)
    n_bank_versions = len(store.list())

    def explode(self: PatchCoreFinetune, data: object) -> dict:
        raise RuntimeError("injected training failure")

    monkeypatch.setattr(PatchCoreFinetune, "fit_task", explode)
    with pytest.raises(AddProductError, match="training the new task.*injected training failure"):
        add_product_command(cfg, base.new, name="newcomer", out=tmp_path / "out", via_server=False)

    assert _state(store, client) == before
    assert len(store.list()) == n_bank_versions


def test_cli_rejects_duplicates_and_bad_names(base: TrainedBase, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    cfg, store, client = _copy(base, tmp_path)
    before = _state(store, client)
    learned = base.old[0]
    overrides = [f"banks.store_dir={store.root}", f"tracking.uri={cfg.tracking.uri}", "method=patchcore_finetune"]
    assert main(["add-product", str(learned), *overrides, "--name", learned.name]) == 2
    assert f"product {learned.name!r} is already learned" in capsys.readouterr().err
    assert main(["add-product", str(learned), *overrides, "--name", "a/b"]) == 2
    assert "product name 'a/b' is invalid" in capsys.readouterr().err
    assert _state(store, client) == before


# ---------------------------------------------------------------------------------- normal images only
NORMALS_TRAIN = 20  # train/good images of the normals-only product


@pytest.fixture(scope="module")
def normals_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A product folder with train/good images only (no test/, no ground_truth/), as a new product arrives on a line."""
    from components.config import SynthConfig
    from components.data.synth import generate_products

    root = tmp_path_factory.mktemp("normals_only")
    synth = SynthConfig(products=3, seed=0, image_size=64, train_per_product=NORMALS_TRAIN, test_good_per_product=1, test_defect_per_type=1)
    name = generate_products(root, 3, 0, synth)[2]
    shutil.rmtree(root / name / "test")
    shutil.rmtree(root / name / "ground_truth")
    return root / name


def test_normals_only_product_is_added_and_gated_on_reserved_false_rejects(base: TrainedBase, normals_only: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """No test set: the gate ignores AUROC (min 1.01 would reject any AUROC-gated product) and checks the
    false-reject rate on the reserved normals, which never reach training or calibration."""
    from components.data.loading import heldout_count, reserved_count
    from components.eval.continual import RESERVED_FRR
    from components.eval.thresholds import read_calibration

    cfg, store, client = _copy(base, tmp_path, min_new_image_auroc=1.01, max_false_reject_rate=1.0, reserved_normals_fraction=0.5)
    before_bank, _, n_versions = _state(store, client)

    assert add_product_command(cfg, normals_only, name="newcomer", out=tmp_path / "out", via_server=False) == 0

    bank, champion, n_after = _state(store, client)
    assert bank != before_bank and champion == (str(n_after), bank) and n_after == n_versions + 1
    manifest = store.show(bank)
    gate = manifest["gate"]
    assert gate["passed"] and gate["reasons"] == []
    n_reserved = reserved_count(NORMALS_TRAIN, 0.5)
    rate = gate["false_reject_rates"]["newcomer"]
    assert manifest["metrics"]["newcomer"] == {RESERVED_FRR: rate}  # no AUROC for it: not evaluable
    assert round(rate * n_reserved, 6).is_integer()
    assert all(manifest["metrics"][p.name]["image_auroc"] is not None for p in base.old)  # forgetting still measured on tests
    calibration = read_calibration(store.checkout(bank, tmp_path / "checkout"))
    assert calibration is not None  # thresholds came from the held-out part of the NON-reserved normals only
    # its own held-out normals (from the non-reserved ones), plus the other products' held-out normals that the one
    # patchcore_finetune bank routes to it: the sample of the deployed rule (threshold by routed task)
    own = heldout_count(NORMALS_TRAIN - n_reserved, cfg.data.heldout_fraction)
    assert calibration.for_task("newcomer").n_images >= own and calibration.samples["newcomer"].leave_out == ()
    assert "normal images only" in capsys.readouterr().out


def test_normals_only_product_over_the_false_reject_limit_changes_nothing(base: TrainedBase, normals_only: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Thresholds set to reject 90 % of normals and a zero false-reject limit: rejected, champion and CURRENT stay."""
    cfg, store, client = _copy(base, tmp_path, max_false_reject_rate=0.0)
    cfg.decision.target_fpr = 0.9
    cfg.data.heldout_fraction = 0.5  # enough held-out normals that the 90 % threshold is not their maximum
    before_bank, before_champion, n_versions = _state(store, client)

    assert add_product_command(cfg, normals_only, name="newcomer", out=tmp_path / "out", via_server=False) == 1

    assert "promotion.max_false_reject_rate 0.0" in capsys.readouterr().err
    bank, champion, n_after = _state(store, client)
    assert (bank, champion) == (before_bank, before_champion) and n_after == n_versions + 1
    rejected = [v for v in store.list() if v.tasks and v.tasks[-1] == "newcomer"]
    assert len(rejected) == 1 and not rejected[0].current
    assert store.show(rejected[0].version)["gate"]["false_reject_rates"]["newcomer"] > 0.0
