"""LeMO: QR prototypes, AnoNCE and its gradients, memory-update variants, continual routing, state round trip."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from components.config import Config, ConfigError, load_config
from components.errors import ContadError
from components.methods.lemo import LeMO
from components.methods.lemo_net import LeMOAdapter, anonce_loss, kmeans_prototypes, prototype_scores, qr_prototypes
from components.methods.registry import build_method
from tests.methods_support import ToyBackbone, product_images, toy_config, toy_task


def lemo_config(**lemo: object) -> Config:
    cfg = toy_config("lemo")
    cfg.lemo.key_size = 8
    cfg.lemo.batch_size = 4
    for key, value in lemo.items():
        setattr(cfg.lemo, key, value)
    return cfg


def test_qr_prototypes_are_orthonormal() -> None:
    prototypes = qr_prototypes(10, 24, torch.Generator().manual_seed(3))
    assert prototypes.shape == (10, 24)
    torch.testing.assert_close(prototypes @ prototypes.T, torch.eye(10), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="lemo.prototypes"):
        qr_prototypes(30, 24, torch.Generator())


def test_anonce_matches_equation_2_by_hand() -> None:
    z = torch.tensor([[[0.0, 0.0]]])  # one patch at the origin
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 9.0]])  # distances 1, 2, 3, 9
    r, tau = 0.5, 0.25
    pos = [math.exp(-(d - r) / tau) for d in (1.0, 2.0)]
    neg = [math.exp(-(3.0 - r) / tau)]  # one negative: the third nearest; the farthest is unused
    expected = -math.log(sum(pos) / (sum(pos) + sum(neg)))
    assert anonce_loss(z, prototypes, positives=2, negatives=1, margin=r, temperature=tau).item() == pytest.approx(expected, rel=1e-5)


def test_scores_are_zero_on_a_prototype_and_grow_with_distance() -> None:
    prototypes = qr_prototypes(4, 6, torch.Generator().manual_seed(0))
    z = torch.stack([prototypes[1], 0.5 * prototypes[1] + 0.5 * prototypes[2], -prototypes[0]])[None]
    scores = prototype_scores(z, prototypes)[0]
    assert scores[0].item() == pytest.approx(0.0, abs=1e-5)
    assert 0 < scores[1] < scores[2]


def test_identity_adapter_starts_at_normalised_features() -> None:
    adapter = LeMOAdapter(24, 24, "identity", torch.Generator())
    feats = torch.randn(2, 16, 24)
    torch.testing.assert_close(adapter(feats, (4, 4)), torch.nn.functional.normalize(feats, dim=2))


@pytest.mark.parametrize("memory_update", ["learned", "frozen", "feature_enhanced"])
def test_anonce_gradient_reaches_adapter_and_prototypes_unless_frozen(memory_update: str) -> None:
    cfg = lemo_config(memory_update=memory_update, adapter_init="random", prototype_init="qr")
    method = LeMO(cfg, ToyBackbone())
    t = method.add_task("red")
    feats = method.frozen_features(product_images("red", 1, seed=0))
    adapter, prototypes = method.adapter_of(t), method.prototypes[t]
    loss = anonce_loss(adapter(feats, (4, 4)), prototypes, cfg.lemo.positives, cfg.lemo.negatives, cfg.lemo.margin, cfg.lemo.temperature)
    loss.backward()
    assert adapter.proj.weight.grad is not None and adapter.proj.weight.grad.abs().sum() > 0
    if memory_update == "frozen":
        assert prototypes.grad is None and not prototypes.requires_grad
    else:
        assert prototypes.grad is not None and prototypes.grad.abs().sum() > 0
    before = prototypes.detach().clone()
    adapter.zero_grad()
    method.learn_features(feats, t)
    assert torch.equal(prototypes.detach(), before) == (memory_update == "frozen")


def test_feature_enhanced_keeps_usage_a_distribution() -> None:
    method = LeMO(lemo_config(memory_update="feature_enhanced", min_usage=0.5), ToyBackbone())
    t = method.add_task("red")
    for i in range(4):
        method.learn_features(method.frozen_features(product_images("red", 1, seed=i)), t)
    assert method.usage[t].sum().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.isfinite(method.prototypes[t]).all()


def test_more_prototypes_than_embedding_dims_need_the_kmeans_init() -> None:
    """k-means centres have no K <= D limit (a placeholder, not QR, waits for the first image); QR init says so up front."""
    method = LeMO(lemo_config(prototype_init="kmeans", adapter_init="random", adapter_dim=8, prototypes=12), ToyBackbone())
    method.fit_task(toy_task("red", n_train=3, n_heldout=1))
    assert method.prototypes[0].shape == (12, 8) and method.prototypes_ready[0]
    with pytest.raises(ContadError, match=r"lemo.prototypes=12 exceeds the embedding dim 8 .*lemo.prototype_init=qr"):
        LeMO(lemo_config(prototype_init="qr", adapter_init="random", adapter_dim=8, prototypes=12), ToyBackbone())
    with pytest.raises(ContadError, match=r"lemo.prototypes=20 exceeds the 16 patches of one image"):  # 4 x 4 toy grid
        LeMO(lemo_config(prototype_init="kmeans", adapter_init="random", adapter_dim=8, prototypes=20), ToyBackbone())


def test_kmeans_init_uses_the_first_image() -> None:
    method = LeMO(lemo_config(prototype_init="kmeans"), ToyBackbone())
    t = method.add_task("red")
    feats = method.frozen_features(product_images("red", 1, seed=0))
    assert not method.prototypes_ready[t]
    with torch.no_grad():
        z = method.adapter_of(t)(feats, (4, 4))[0]
    expected = kmeans_prototypes(z, 10, method._generator(t))
    method.optimizers[t] = torch.optim.SGD([method.prototypes[t]], lr=0.0)  # isolate the initialisation
    method.learn_features(feats, t)
    assert method.prototypes_ready[t]
    torch.testing.assert_close(method.prototypes[t].detach(), expected)


def test_fit_log_reports_and_warns_about_a_collapsed_memory(caplog: pytest.LogCaptureFixture) -> None:
    method = LeMO(lemo_config(), ToyBackbone())
    data = toy_task("red", n_train=6)
    stats = method.fit_task(data)["heldout_score_stats"]
    assert 0.0 < stats["prototype_top_share"] <= 1.0 and 1 <= stats["prototypes_in_use"] <= 10
    feats = method.frozen_features(data.heldout.images)
    with torch.no_grad():  # every prototype but one on the far side of the embeddings: one takes every patch
        centre = method.adapter_of(0)(feats, (4, 4)).mean(dim=(0, 1))
        method.prototypes[0].copy_(-centre.expand(10, -1))
        method.prototypes[0][3] = centre
    shares = method.prototype_usage(feats, 0)
    assert shares[0].item() == 1.0 and shares[1:].sum().item() == 0.0
    caplog.clear()
    assert method._heldout_stats(data, 0)["prototypes_in_use"] == 1
    assert "memory collapse" in caplog.text


def test_routing_and_no_forgetting_with_per_task_adapters() -> None:
    method = LeMO(lemo_config(), ToyBackbone())
    method.fit_task(toy_task("red", n_train=8))
    probe = torch.cat([product_images("red", 3, seed=50), product_images("red", 3, seed=51, defect="blue")])
    before = method.predict(probe).image_scores
    method.fit_task(toy_task("green", n_train=8))
    test = torch.cat([product_images("red", 3, seed=60), product_images("green", 3, seed=61)])
    assert method.predict(test).routed_tasks == ["red"] * 3 + ["green"] * 3
    assert torch.equal(method.predict(probe).image_scores, before), "learning green must not change red's scores"
    assert (method.predict(probe).image_scores[3:].mean() > method.predict(probe).image_scores[:3].mean()).item()


def test_shared_adapter_changes_old_tasks() -> None:
    method = LeMO(lemo_config(shared_adapter=True), ToyBackbone())
    method.fit_task(toy_task("red", n_train=8))
    probe = product_images("red", 3, seed=50)
    before = method.predict(probe).image_scores
    method.fit_task(toy_task("green", n_train=8))
    assert len(method.adapters) == 1
    assert not torch.allclose(method.predict(probe).image_scores, before), "the shared adapter drifts with the new task"


def test_adam_moments_are_saved_so_online_learning_continues_identically(tmp_path: Path) -> None:
    cfg = lemo_config()
    images = product_images("red", 5, seed=7)
    a = LeMO(cfg, ToyBackbone())
    t = a.add_task("red")
    for i in range(3):
        a.learn_features(a.frozen_features(images[i : i + 1]), t)
    a.save(tmp_path / "state")
    b = LeMO(cfg, ToyBackbone())
    b.load(tmp_path / "state")  # identical scores right after loading: tests/test_methods_contract.py
    for method in (a, b):  # Adam moments are part of the state: later updates match too
        for i in range(3, 5):
            method.learn_features(method.frozen_features(images[i : i + 1]), 0)
    for name, tensor in a.state_tensors().items():
        torch.testing.assert_close(b.state_tensors()[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_registry_and_config_validation() -> None:
    assert isinstance(build_method(lemo_config(), ToyBackbone()), LeMO)
    with pytest.raises(ConfigError, match="lemo.positives"):
        load_config(None, ["lemo.prototypes=4", "lemo.positives=3", "lemo.negatives=3"])
    with pytest.raises(ConfigError, match="lemo.memory_update"):
        load_config(None, ["lemo.memory_update=sometimes"])
