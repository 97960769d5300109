"""IUF and the shared feature-reconstruction core: cache, growing OASA head, SCL gradient,
projected updates, retention, save/load, and a synthetic end-to-end ``contad run method=iuf``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from components.backbones.registry import build_backbone
from components.config import Config, ReconstructionConfig, load_config
from components.methods.feature_cache import feature_cache
from components.methods.iuf import IUF
from components.methods.iuf_network import ActivationSpan, ObjectDiscriminator, project_update, retain_, semantic_compression_loss
from components.methods.reconstruction import (
    Attention,
    IntegerMaskDropout,
    ReconstructionTransformer,
    build_feature_extractor,
    attention_bias,
    cached_features,
    calibrate_positions,
    error_maps,
    level_normalise,
    neighbour_mask,
    pooled_max_scores,
    position_profile,
    to_tokens,
    upsample_maps,
)
from components.methods.registry import build_method
from components.methods.state_io import MethodStateError
from components.types import ImageBatch, TaskData
from tests.methods_support import product_images

SIZE = 64


def tiny_iuf_config(*overrides: str) -> Config:
    """Random-weight Lite0 at 64 px (4 x 4 grid) and a small reconstruction network."""
    return load_config(None, [
        "method=iuf", "backbone.pretrained=false", "backbone.device=cpu", f"data.image_size={SIZE}",
        "reconstruction.hidden=32", "reconstruction.ffn=32", "reconstruction.heads=2",
        "iuf.epochs=2", "iuf.min_steps=0", "iuf.batch_size=4", "iuf.scl_tail_index=2", "iuf.score_pool=4", *overrides,
    ])


def tiny_iuf(*overrides: str) -> IUF:
    cfg = tiny_iuf_config(*overrides)
    method = build_method(cfg, build_backbone(cfg.backbone, SIZE))
    assert isinstance(method, IUF)
    return method


def task(product: str, n: int = 8, seed: int = 0) -> TaskData:
    """Normal 64 px toy images of ``product`` (train + 2 held out)."""
    train, held = product_images(product, n, seed, size=SIZE), product_images(product, 2, seed + 1, size=SIZE)
    return TaskData(name=product, products=[product],
                    train=ImageBatch(train, [product] * n, [f"{product}/train/{seed}-{i}" for i in range(n)]),
                    heldout=ImageBatch(held, [product] * 2, [f"{product}/held/{seed}-{i}" for i in range(2)]))


def test_cached_features_equal_on_the_fly_features_and_are_computed_once_per_image_content() -> None:
    cfg = tiny_iuf_config()
    extractor = build_feature_extractor(cfg.reconstruction, cfg.backbone)
    images = product_images("red", 5, seed=1, size=SIZE)
    cached = cached_features(extractor, images, batch_size=2)
    assert cached.shape == (5, extractor.channels, 4, 4) and extractor.channels == 16 + 24 + 40 + 112
    torch.testing.assert_close(cached, extractor(images))
    calls = []
    extractor.register_forward_hook(lambda *_: calls.append(1))
    again = cached_features(extractor, images[[3, 1]].clone(), batch_size=2)  # the same content in new tensors: no recomputation
    assert calls == [] and len(feature_cache(extractor)) == 5, "cached images must not be recomputed"
    torch.testing.assert_close(again, extractor(images[[3, 1]]))
    other = build_feature_extractor(cfg.reconstruction, cfg.backbone)
    cached_features(other, images[:1], batch_size=2)
    assert len(feature_cache(other)) == 1, "every extractor has its own cache"


def test_other_timm_cnn_without_checkpoint_names_the_key() -> None:
    from components.errors import WeightsError

    cfg = tiny_iuf_config("backbone.pretrained=true", "reconstruction.backbone=resnet18")
    with pytest.raises(WeightsError, match="reconstruction.checkpoint"):
        build_feature_extractor(cfg.reconstruction, cfg.backbone)


def test_scl_layers_beyond_the_decoder_are_refused() -> None:
    from components.errors import ContadError

    with pytest.raises(ContadError, match="iuf.scl_layers"):
        tiny_iuf("reconstruction.decoder_layers=1")


def test_oasa_head_growth_keeps_old_logits() -> None:
    torch.manual_seed(0)
    disc = ObjectDiscriminator((4, 4), dim=16, heads=2, blocks=2, ffn=16, dropout=0.0).eval()
    disc.head.grow(2)
    images = torch.randn(3, 3, SIZE, SIZE)
    maps_before, logits_before = disc(images)
    disc.head.grow(3)
    maps_after, logits_after = disc(images)
    assert logits_after.shape == (3, 5) and disc.head.classes == 5
    torch.testing.assert_close(logits_after[:, :2], logits_before)
    assert len(maps_after) == 2 and maps_after[0].shape == (3, 16, 16)
    torch.testing.assert_close(maps_after[1], maps_before[1])


def test_semantic_compression_loss_alone_carries_gradient() -> None:
    torch.manual_seed(0)
    net = ReconstructionTransformer(12, (4, 4), ReconstructionConfig(hidden=16, heads=2, ffn=16, dropout=0.0))
    _, latents = net(torch.randn(6, 16, 12))
    loss = semantic_compression_loss(latents[0], torch.randn(5, 16), tail_index=2, threshold=0.05)
    assert float(loss.detach()) > 0
    loss.backward()
    grads = [p.grad for p in net.decoder[0].parameters() if p.grad is not None]
    assert grads and max(float(g.abs().max()) for g in grads) > 0, "the compression loss must train the network"


def test_projection_scales_the_old_span_by_omega_and_passes_orthogonal_updates() -> None:
    dim = 8
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(0)))
    top, second, outside = rotation[:, 0], rotation[:, 1], rotation[:, 5]
    coeffs, _ = torch.linalg.qr(torch.randn(200, 2, generator=torch.Generator().manual_seed(1)))  # uncorrelated
    span = ActivationSpan(dim)
    span.add_task(3.0 * coeffs[:, :1] * top + 1.0 * coeffs[:, 1:] * second)  # old activations live in 2 directions
    basis, weights = span.basis(energy=0.9999)
    assert float(weights[0]) == 0.0 and math.isclose(float(weights[1]), math.log(2) / math.log(dim), rel_tol=1e-6)
    out = torch.randn(3, generator=torch.Generator().manual_seed(2))
    for direction, factor in ((top, 0.0), (second, math.log(2) / math.log(dim)), (outside, 1.0)):
        delta = torch.outer(out, direction)
        torch.testing.assert_close(project_update(delta, basis, weights), factor * delta, atol=1e-5, rtol=1e-4)


def test_retention_pulls_toward_the_old_model() -> None:
    param, old = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])
    retain_(param, old, 0.25)
    torch.testing.assert_close(param, torch.tensor([0.75, 2.5]))


def test_full_retention_keeps_every_old_weight_while_finetune_moves_them() -> None:
    kept = tiny_iuf("iuf.retention=1.0")
    kept.fit_task(task("red"))
    before = {n: p.detach().clone() for n, p in kept.network.named_parameters()}
    kept.fit_task(task("green", seed=3))
    for name, param in kept.network.named_parameters():
        old = before[name]
        torch.testing.assert_close(param[: old.shape[0]] if name.startswith("oasa.head.") else param, old, msg=name)
    assert kept.network.oasa is not None and kept.network.oasa.head.classes == 2

    moved = tiny_iuf("iuf.update_strategy=finetune")
    moved.fit_task(task("red"))
    before = moved.network.recon.input_proj.weight.detach().clone()
    moved.fit_task(task("green", seed=3))
    assert not torch.allclose(moved.network.recon.input_proj.weight, before)


def test_label_free_routing_and_standardisation_statistics_survive_a_round_trip(tmp_path: Path) -> None:
    # Routing is asserted without token standardisation: with standardised (small) reconstruction
    # gradients the global grad-norm clip no longer damps the CE gradient, and 12 CE steps on "blue"
    # alone bias this toy discriminator's grown head toward blue (class-incremental bias; see RESULTS
    # "IUF: session 12"). Save/load identity is asserted for both settings.
    images = torch.cat([product_images("red", 3, seed=9, size=SIZE), product_images("blue", 3, seed=9, size=SIZE)])
    for standardise in (False, True):
        override = f"iuf.standardise={str(standardise).lower()}"
        method = tiny_iuf("iuf.epochs=6", "iuf.ce_weight=2.0", override)
        method.fit_task(task("red"))
        method.fit_task(task("blue", seed=5))
        pred = method.predict(images)
        method.save(tmp_path / f"iuf-{override}")
        restored = tiny_iuf(override)
        restored.load(tmp_path / f"iuf-{override}")
        assert restored.tasks == ["red", "blue"] and restored.products == ["red", "blue"]
        assert pred.anomaly_maps.shape == (6, SIZE, SIZE) and restored.predict(images).routed_tasks == pred.routed_tasks
        if not standardise:
            assert pred.routed_tasks == ["red"] * 3 + ["blue"] * 3, "OASA routes each image without its label"
        else:
            assert restored.feature_stats is not None and torch.equal(restored.feature_stats[0], method.feature_stats[0])  # type: ignore[index]
    with pytest.raises(MethodStateError, match="architecture"):
        tiny_iuf("iuf.standardise=false").load(tmp_path / "iuf-iuf.standardise=true")


def test_pooled_max_score_is_the_max_of_the_average_pooled_map() -> None:
    maps = torch.zeros(1, 8, 8)
    maps[0, 2, 2] = 16.0  # a single hot pixel: its 4 x 4 average is 1
    maps[0, 6:8, 6:8] = 2.0  # a 2 x 2 blob: best 4 x 4 window averages 2 * 4 / 16
    assert float(pooled_max_scores(maps, 4)[0]) == pytest.approx(1.0)
    assert to_tokens(torch.zeros(2, 5, 3, 4)).shape == (2, 12, 5)


@pytest.mark.slow  # starts the session's Prefect test server (~2 min on a loaded 2-core machine)
def test_synthetic_end_to_end_run_with_a_joint_base_step(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    from flows.cli import main
    from tests.test_pipeline_helpers import TINY_OVERRIDES, make_tiny_products, shared_prefect_api

    shared_prefect_api(request)
    data = make_tiny_products(tmp_path / "data", n_products=3)
    out = tmp_path / "run"
    code = main(["run", "--out", str(out), f"data.root={data}", *TINY_OVERRIDES, "tracking.enabled=false",
                 f"masks.cache_dir={tmp_path / 'masks'}", "method=iuf", "protocol.base_tasks=2", "iuf.epochs=2", "iuf.min_steps=0",
                 "reconstruction.hidden=32", "reconstruction.ffn=32", "iuf.score_pool=4", "iuf.scl_tail_index=2"])
    assert code == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["method"] == "iuf" and doc["protocol"] == "2-1" and len(doc["steps"]) == 2
    final = doc["final"]["image_auroc"]
    assert all(final[p] is not None and 0.0 <= final[p] <= 1.0 for p in doc["tasks"])
    log = json.loads(next((out / "steps").glob("01-*/train_log.json")).read_text())
    assert log["log"]["update"] == "projected" and log["log"]["projected_layers"]


def test_early_stopping_keeps_the_best_epoch_on_heldout_training_normals() -> None:
    method = tiny_iuf("iuf.epochs=4", "iuf.early_stopping_patience=1")
    data = task("red")
    log = method.fit_task(data)
    losses = log["heldout_losses"]
    assert 1 <= len(losses) <= 4 and log["best_epoch"] == 1 + losses.index(min(losses))
    held = method._network_tokens(to_tokens(cached_features(method.extractor, data.heldout.images, method.config.reconstruction.batch_size)))
    assert method.heldout_loss(held, data.heldout.images) == pytest.approx(min(losses), rel=1e-5)


def test_neighbour_mask_bars_each_tokens_window_from_its_attention() -> None:
    mask = neighbour_mask((14, 14), 7)
    assert mask is not None and mask.shape == (196, 196)
    centre = 7 * 14 + 7
    barred = {r * 14 + c for r in range(4, 11) for c in range(4, 11)}
    assert {int(i) for i in torch.nonzero(~mask[centre])[:, 0]} == barred
    assert neighbour_mask((14, 14), 0) is None
    small = neighbour_mask((4, 4), 7)  # shrinks to 3 x 3 so that every token still sees something
    assert small is not None and bool(small.any(dim=1).all()) and not bool(small[5, 0])
    torch.manual_seed(0)
    attn = Attention(8, 2)
    x = torch.randn(1, 196, 8)
    out = attn(x, x, x, mask)[0, centre]
    inside, outside = x.clone(), x.clone()
    inside[0, centre + 1] += 5.0  # a neighbour: barred, the centre's output must not move
    outside[0, 0] += 5.0  # far away: attended
    torch.testing.assert_close(attn(x, inside, inside, mask)[0, centre], out)
    assert not torch.allclose(attn(x, outside, outside, mask)[0, centre], out)
    torch.testing.assert_close(attn(x, x, x, attention_bias(mask)), attn(x, x, x, mask))  # the transformer's float form


def test_integer_mask_dropout_is_inverted_dropout() -> None:
    torch.manual_seed(0)
    drop = IntegerMaskDropout(0.25)
    x = torch.rand(64, 200, 32) + 0.5
    y = drop(x)
    kept = y != 0
    assert abs(float(kept.float().mean()) - 0.75) < 0.01  # keep rate 1 - p
    torch.testing.assert_close(y[kept], x[kept] / 0.75)  # survivors scaled by 1 / (1 - p)
    x.requires_grad_(True)
    y = drop(x)
    y.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, (y != 0).float() / 0.75)  # gradient through the same mask
    assert drop.eval()(x) is x and IntegerMaskDropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        IntegerMaskDropout(1.0)


def test_pooled_image_inputs_give_the_network_the_same_outputs() -> None:
    method = tiny_iuf()
    images = product_images("red", 3, 0, size=SIZE)
    tokens = torch.randn(3, method.grid[0] * method.grid[1], method.extractor.channels)
    method.network.eval()
    pooled = method.network.image_inputs(images)
    assert pooled.shape[-1] < images.shape[-1]
    for got, want in zip(method.network(tokens, pooled), method.network(tokens, images), strict=True):
        if isinstance(want, list):
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, rtol=0, atol=0)
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert tiny_iuf("iuf.oasa=false").network.image_inputs(images).shape == (3, 0)


def test_layerwise_query_decoder_has_queries_per_layer_and_reconstructs() -> None:
    cfg = ReconstructionConfig(hidden=16, heads=2, ffn=16, encoder_layers=1, decoder_layers=2)
    net = ReconstructionTransformer(12, (4, 4), cfg, neighbor_mask=3, layerwise_queries=True)
    assert not hasattr(net, "queries") and all(layer.queries.shape == (16, 16) for layer in net.decoder)
    recon, latents = net(torch.randn(3, 16, 12))
    assert recon.shape == (3, 16, 12) and len(latents) == 2


def test_standardisation_uses_the_first_tasks_statistics_only() -> None:
    method = tiny_iuf("iuf.standardise=true")
    first = task("red")
    method.fit_task(first)
    assert method.feature_stats is not None
    raw = to_tokens(cached_features(method.extractor, first.train.images, method.config.reconstruction.batch_size))
    mean, std = method.feature_stats
    torch.testing.assert_close(mean, raw.reshape(-1, raw.shape[-1]).mean(0), rtol=1e-4, atol=1e-4)
    frozen = (mean.clone(), std.clone())
    method.fit_task(task("blue", seed=3))
    torch.testing.assert_close(method.feature_stats[0], frozen[0])
    torch.testing.assert_close(method.feature_stats[1], frozen[1])
    plain = tiny_iuf("iuf.standardise=false")
    plain.fit_task(first)
    assert plain.feature_stats is None


def test_level_normalisation_gives_every_level_the_same_norm_whatever_the_scale() -> None:
    tokens = torch.cat([torch.randn(2, 5, 3) * 100.0, torch.randn(2, 5, 9) * 0.01], dim=-1)
    normed = level_normalise(tokens, [3, 9])
    scale = math.sqrt(12 / 2)
    torch.testing.assert_close(normed[..., :3].norm(dim=-1), torch.full((2, 5), scale))
    torch.testing.assert_close(normed[..., 3:].norm(dim=-1), torch.full((2, 5), scale))
    torch.testing.assert_close(level_normalise(tokens * 7.0, [3, 9]), normed)  # no statistics: any product, any scale
    with pytest.raises(ValueError, match="do not add up"):
        level_normalise(tokens, [3, 8])


def test_iuf_level_norm_trains_on_level_normalised_tokens_and_is_checked_on_load(tmp_path: Path) -> None:
    method = tiny_iuf("iuf.level_norm=true")
    first = task("red")
    method.fit_task(first)
    raw = to_tokens(cached_features(method.extractor, first.train.images, method.config.reconstruction.batch_size))
    seen = method._network_tokens(raw)
    sizes = method.extractor.level_channels
    assert sum(sizes) == raw.shape[-1] and method.feature_stats is None
    for part in seen.split(sizes, dim=-1):
        torch.testing.assert_close(part.norm(dim=-1), torch.full(part.shape[:-1], math.sqrt(raw.shape[-1] / len(sizes))))
    images = product_images("red", 2, seed=9, size=SIZE)
    method.save(tmp_path / "levels")
    restored = tiny_iuf("iuf.level_norm=true")
    restored.load(tmp_path / "levels")
    torch.testing.assert_close(restored.predict(images).image_scores, method.predict(images).image_scores)
    with pytest.raises(MethodStateError, match="architecture"):
        tiny_iuf().load(tmp_path / "levels")
    with pytest.raises(Exception, match="at most one"):
        tiny_iuf_config("iuf.level_norm=true", "iuf.standardise=true")


def test_position_calibration_stops_a_noisy_border_ring_from_deciding_the_score() -> None:
    gen = torch.Generator().manual_seed(0)
    ring = torch.ones(8, 8, dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    normals = torch.where(ring, 3.0, 1.0) * (1 + 0.05 * torch.randn(20, 8, 8, generator=gen))  # border cells always err 3x more
    profile = position_profile(normals)
    assert float(profile.mean()) == pytest.approx(1.0) and float(profile[0, 0]) > 2 * float(profile[4, 4])
    torch.testing.assert_close(position_profile(7.0 * normals), profile)  # scale-free: products with other error levels share it
    defect = torch.where(ring, 3.0, 1.0)[None].clone()
    defect[0, 4, 4] = 2.5  # an interior defect, weaker than the border's usual error
    raw_top, calibrated_top = int(defect.flatten(1).argmax()), int(calibrate_positions(defect, profile).flatten(1).argmax())
    assert ring.flatten()[raw_top] and calibrated_top == 4 * 8 + 4
    flat = calibrate_positions(profile[None] * 5.0, profile)
    torch.testing.assert_close(flat, torch.full_like(flat, 5.0))


def test_iuf_position_calibration_scores_with_the_mean_profile_of_learned_products_and_saves_it(tmp_path: Path) -> None:
    method = tiny_iuf("iuf.score_calibration=position")
    first, second = task("red"), task("blue", seed=5)
    method.fit_task(first)
    method.fit_task(second)
    assert sorted(method.position_profiles) == ["blue", "red"]
    for profile in method.position_profiles.values():
        assert profile.shape == method.grid and float(profile.mean()) == pytest.approx(1.0)
    images = torch.cat([product_images("red", 2, seed=9, size=SIZE), product_images("blue", 2, seed=9, size=SIZE)])
    pred = method.predict(images)
    tokens = method._network_tokens(to_tokens(method.extractor(images)))
    recon, _, _ = method.network(tokens, images)
    mean_profile = (method.position_profiles["red"] + method.position_profiles["blue"]) / 2
    expected = upsample_maps(calibrate_positions(error_maps(recon, tokens, method.grid), mean_profile), (SIZE, SIZE), 0.0)
    torch.testing.assert_close(pred.image_scores, pooled_max_scores(expected, method.config.iuf.score_pool))
    method.config.iuf.score_calibration = "none"
    assert not torch.allclose(method.predict(images).image_scores, pred.image_scores), "the profile changes the scores"
    method.config.iuf.score_calibration = "position"
    method.save(tmp_path / "calibrated")
    restored = tiny_iuf("iuf.score_calibration=position")
    restored.load(tmp_path / "calibrated")
    torch.testing.assert_close(restored.predict(images).image_scores, pred.image_scores)
    plain = tiny_iuf("iuf.score_calibration=none")
    plain.fit_task(task("red"))
    plain.save(tmp_path / "plain")
    with pytest.raises(MethodStateError, match="score_calibration=position"):
        tiny_iuf("iuf.score_calibration=position").load(tmp_path / "plain")
