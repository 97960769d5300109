"""MTRMB: text encoder, KPMK fusion gradients, Eq. 5-8 losses, old-task invariance, round trip, masks fallback."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from components.backbones.text import PACKAGED_MINILM, TextEncoder, build_text_encoder, packaged_minilm_dir, product_sentence
from components.backbones.tiled import TiledBackbone, tiled_backbone
from components.config import Config, ConfigError, TextConfig, load_config
from components.errors import ContadError, WeightsError
from components.methods.mtrmb import MTRMB
from components.methods.coreset import nbytes
from components.methods.multimodal import TextImageFusion, cross_alignment_loss, key_pull_loss, refined_contrastive_loss
from components.methods.registry import build_method
from components.segment.fallback import structure_masks
from components.methods.ucad import UCAD
from components.segment.fallback import choose_masks
from components.types import ImageBatch, TaskData
from tests.methods_support import IMAGE_SIZE, PRODUCTS, ToyBackbone, label_maps_of, product_images, toy_config, toy_task


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return build_text_encoder(TextConfig())


def _mtrmb(minilm: TextEncoder, **mtrmb: object) -> MTRMB:
    cfg = toy_config("mtrmb")
    cfg.mtrmb.epochs = cfg.ucad.epochs
    for key, value in mtrmb.items():
        setattr(cfg.mtrmb, key, value)
    method = MTRMB(cfg, ToyBackbone())
    method._text_encoder = minilm  # share the loaded MiniLM between tests
    return method


@pytest.fixture(scope="module")
def trained(minilm: TextEncoder) -> MTRMB:
    method = _mtrmb(minilm)
    for product in PRODUCTS:
        method.fit_task(toy_task(product))
    return method


# ------------------------------------------------------------------ text encoder
def test_packaged_minilm_loads_offline_and_encodes_a_batch(minilm: TextEncoder) -> None:
    tokens, mask = minilm.encode(["a photo of a grid", "a photo of a hazelnut toy", "a photo of a pcb"])
    assert tokens.shape == (3, 32, 384) and mask.shape == (3, 32) and minilm.dim == 384
    assert mask[:, 0].all() and (mask.sum(dim=1) < 32).all()
    assert torch.count_nonzero(tokens[~mask]) == 0 and torch.isfinite(tokens).all()
    assert not torch.allclose(tokens[0], tokens[1])  # different sentences, different features
    again, _ = minilm.encode(["a photo of a grid"])
    torch.testing.assert_close(again[0], tokens[0], atol=1e-5, rtol=0)  # frozen, eval mode: deterministic (up to batch-size float order)


def _tiny_bert_dir(root: Path, with_weights: bool = True) -> Path:
    """A random-weight 2-layer BERT built from a config, saved with MiniLM's tokenizer files."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
    directory = root / "tiny-bert"
    BertModel(config).save_pretrained(directory)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(packaged_minilm_dir() / name, directory / name)
    if not with_weights:
        for weights in directory.glob("*.safetensors"):
            weights.unlink()
    return directory


def test_any_bert_like_checkpoint_goes_through_the_same_path(tmp_path: Path) -> None:
    directory = _tiny_bert_dir(tmp_path)
    encoder = build_text_encoder(TextConfig(checkpoint=str(directory), max_length=16))
    tokens, mask = encoder.encode(["a photo of a grid", "two words"])
    assert tokens.shape == (2, 16, 48) and encoder.dim == 48 and mask.any(dim=1).all()
    random = build_text_encoder(TextConfig(checkpoint=str(directory), pretrained=False, max_length=16))
    assert random.dim == 48 and random.encode(["x y"])[0].shape == (1, 16, 48)


def test_missing_text_weights_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"text\.checkpoint"):
        build_text_encoder(TextConfig(checkpoint=str(_tiny_bert_dir(tmp_path, with_weights=False))))
    with pytest.raises(WeightsError, match=r"text\.checkpoint"):
        build_text_encoder(TextConfig(checkpoint=str(tmp_path / "absent")))
    with pytest.raises(WeightsError, match=r"text\.name.*never downloaded"):
        build_text_encoder(TextConfig(name="bert-base-uncased"))


def test_product_sentences_and_config_validation() -> None:
    cfg = TextConfig(prompts={"pcb": "a green printed circuit board"})
    assert product_sentence(cfg, "pcb") == "a green printed circuit board"
    assert product_sentence(cfg, "hazelnut_toy") == "a photo of a hazelnut toy"
    assert TextConfig().name == PACKAGED_MINILM
    with pytest.raises(ConfigError, match="text.template"):
        load_config(None, ["text.template=a photo"])
    with pytest.raises(ConfigError, match="fusion_heads"):
        load_config(None, ["mtrmb.fusion_dim=10", "mtrmb.fusion_heads=4"])
    with pytest.raises(ConfigError, match="cross_loss_weight"):
        load_config(None, ["mtrmb.cross_loss_weight=-1"])


# ------------------------------------------------------------------ losses
def test_refined_contrastive_loss_matches_equations_5_and_6() -> None:
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])  # patches 0, 1 same segment; 2 other
    labels = torch.tensor([[1, 1, 2]])
    tau = 0.5
    s = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) / tau
    same = torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 1]])
    expected = ((-s * same + (1 - same) * torch.exp(s)).sum() / 9).item()
    assert refined_contrastive_loss(features, labels, tau, per_image=8).item() == pytest.approx(expected, rel=1e-6)
    unlabelled = refined_contrastive_loss(features, torch.tensor([[1, 1, 0]]), tau, per_image=8)
    assert unlabelled.item() == pytest.approx(-(2.0 * 4) / 4, rel=1e-6)  # only patches 0, 1: all pairs positive


def test_cross_and_key_pull_losses() -> None:
    image = torch.randn(2, 5, 8)
    uniform = cross_alignment_loss(torch.ones(2, 5, 8), torch.ones(2, 8), 0.5)
    assert uniform.item() == pytest.approx(math.log(5), rel=1e-6)  # equal similarities: the minimum
    assert cross_alignment_loss(image, torch.randn(2, 8), 0.5).item() > math.log(5)
    key = torch.tensor([1.0, 0.0])
    assert key_pull_loss(torch.tensor([[2.0, 0.0], [0.0, 3.0]]), key).item() == pytest.approx(0.5)


# ------------------------------------------------------------------ KPMK
def _fresh_prompt(method: MTRMB, minilm: TextEncoder):
    method.fusion_spec["text_dim"] = minilm.dim
    method._pending_text = method._encode_task_text("a photo of a red")
    prompt = method._new_prompt(0)
    method._pending_text = None
    return prompt


def test_fusion_and_prompt_get_gradient_from_cross_and_contrastive_losses(minilm: TextEncoder) -> None:
    method = _mtrmb(minilm)
    prompt = _fresh_prompt(method, minilm)
    images = product_images("red", 4, seed=3)
    plain = method.backbone.inner.features(images, prompt.inner)
    assert torch.equal(method.backbone.features(images, prompt), plain)  # untrained fusion = identity on I
    with torch.no_grad():  # as after a first optimiser step: output projections away from zero
        for attention in (prompt.fusion.text_to_image, prompt.fusion.image_to_text):
            attention.to_out.weight.normal_(0.0, 0.05)
        prompt.inner.scale.normal_(0.0, 0.1)
    fused, text = method.backbone.fused_features(images, prompt)

    cross = cross_alignment_loss(fused, text, 0.5)
    grads = torch.autograd.grad(cross, [p for p in prompt.parameters() if p is not prompt.learnable_key], allow_unused=True, retain_graph=True)
    names = [n for n, p in prompt.named_parameters() if p is not prompt.learnable_key]
    for name, grad in zip(names, grads, strict=True):
        assert grad is not None and torch.count_nonzero(grad) > 0, f"L_cross gives no gradient to {name}"

    labels = method._label_grid(label_maps_of(images), images.shape[-1])
    contra = refined_contrastive_loss(fused, labels, 0.5, 16, torch.Generator().manual_seed(0))
    image_path = {n: p for n, p in prompt.named_parameters() if n.startswith(("inner.", "fusion.text_in", "fusion.text_to_image"))}
    grads = torch.autograd.grad(contra, list(image_path.values()))
    for name, grad in zip(image_path, grads, strict=True):
        assert torch.count_nonzero(grad) > 0, f"L_contra gives no gradient to {name}"

    query = method.backbone.key_features(images).mean(dim=1)
    (key_grad,) = torch.autograd.grad(key_pull_loss(query, prompt.learnable_key), [prompt.learnable_key])
    assert torch.count_nonzero(key_grad) > 0


def test_training_moves_fusion_prompt_and_learnable_key(trained: MTRMB) -> None:
    prompt = trained.prompts[0]
    assert torch.count_nonzero(prompt.fusion.text_to_image.to_out.weight) > 0
    assert torch.count_nonzero(prompt.inner.scale) > 0
    assert not any(p.requires_grad for p in prompt.parameters())  # frozen after its task
    assert trained.texts == [f"a photo of a {p}" for p in PRODUCTS]


def test_mtrmb_epochs_train_even_when_ucad_is_training_free(minilm: TextEncoder) -> None:
    cfg = toy_config("mtrmb", epochs=0)  # UCAD's default: training-free prompts
    method = MTRMB(cfg, ToyBackbone())  # mtrmb.epochs (default 1) trains prompt + fusion anyway
    method._text_encoder = minilm
    log = method.fit_task(toy_task("red", n_train=4, n_heldout=1))
    assert log["prompt_trained"] is True and len(log["epoch_losses"]) == 1
    assert torch.count_nonzero(method.prompts[0].fusion.text_to_image.to_out.weight) > 0


def test_key_features_of_each_training_image_are_extracted_once(minilm: TextEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    # the task key and Eq. 8's key pull (every batch of every epoch) read the same un-prompted features: one pass per image
    method = _mtrmb(minilm, epochs=3)
    extracted: list[int] = []
    original = ToyBackbone.key_features
    monkeypatch.setattr(ToyBackbone, "key_features", lambda self, images: extracted.append(len(images)) or original(self, images))
    task = toy_task("red", n_train=6, n_heldout=2)
    log = method.fit_task(task)
    assert len(log["epoch_losses"]) == 3 and sum(extracted) == len(task.train)
    assert not torch.equal(method.prompts[0].learnable_key, method._new_prompt(0).learnable_key)  # the pull still pulled


def test_frozen_backbone_prompt_trains_only_fusion_and_key(minilm: TextEncoder) -> None:
    method = _mtrmb(minilm, train_prompt=False)
    method.fit_task(toy_task("red", n_train=4, n_heldout=1))
    prompt, initial = method.prompts[0], method._new_prompt(0)  # the same seeded initialisation, untrained
    for name, param in prompt.inner.named_parameters():
        assert torch.equal(param, dict(initial.inner.named_parameters())[name]), f"backbone prompt {name} moved"
    assert torch.count_nonzero(prompt.fusion.text_to_image.to_out.weight) > 0
    assert not torch.equal(prompt.learnable_key, initial.learnable_key)


def test_routes_and_detects_with_the_routed_tasks_text(trained: MTRMB) -> None:
    images = torch.cat([product_images(p, 4, seed=50 + i) for i, p in enumerate(PRODUCTS)])
    pred = trained.predict(images)
    assert pred.routed_tasks == [p for p in PRODUCTS for _ in range(4)]
    for i, product in enumerate(PRODUCTS):
        other = [p for p in PRODUCTS if p != product][0]
        good = trained.predict(product_images(product, 5, seed=90 + i)).image_scores
        bad = trained.predict(product_images(product, 5, seed=95 + i, defect=other)).image_scores
        assert bad.min() > good.max(), product
    red = product_images("red", 3, seed=11)
    own = trained._score_task(red, 0)[1]
    assert torch.equal(trained.predict(red).image_scores, own / trained.score_scale(0))  # task 0: prompt + fusion + text
    swapped = trained.prompts[0].fusion.text.clone()
    try:  # another task's text under the same fusion gives other scores: the text is used
        trained.prompts[0].fusion.text.copy_(trained.prompts[1].fusion.text)
        assert not torch.equal(trained._score_task(red, 0)[1], own)
    finally:
        trained.prompts[0].fusion.text.copy_(swapped)


def test_learning_a_new_task_leaves_old_tensors_and_scores_bit_identical(minilm: TextEncoder) -> None:
    method = _mtrmb(minilm)
    method.fit_task(toy_task("red"))
    images = torch.cat([product_images("red", 4, seed=21), product_images("red", 3, seed=22, defect="green")])
    before = {name: t.clone() for name, t in method.state_tensors().items()}
    scores, maps = method.predict(images).image_scores, method.predict(images).anomaly_maps
    task_scores = method._score_task(images, 0)

    method.fit_task(toy_task("green"))
    after = method.state_tensors()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert any(name.startswith("prompt/1/fusion.") for name in after)  # task 2 got its own fusion
    again = method.predict(images)
    assert again.routed_tasks == ["red"] * len(images)
    assert torch.equal(again.image_scores, scores) and torch.equal(again.anomaly_maps, maps)
    assert all(torch.equal(a, b) for a, b in zip(method._score_task(images, 0), task_scores, strict=True))


def test_default_fusion_is_a_small_part_of_the_task_memory_budget(trained: MTRMB) -> None:
    cfg = load_config(None, [])
    fusion = TextImageFusion(160, 384, cfg.text.max_length, cfg.mtrmb.fusion_dim, cfg.mtrmb.fusion_heads)  # default backbone width
    assert nbytes(list(fusion.state_dict().values())) < 0.1 * cfg.memory.budget_mb * 2**20
    # everything stored per task (key, prompt, fusion, learnable key, text, knowledge) is counted
    prompt_bytes = nbytes(list(trained.prompts[0].state_dict().values()))
    assert any(name.startswith("fusion.text") for name in trained.prompts[0].state_dict())
    assert trained.task_bytes(0) == nbytes([trained.keys[0], trained.knowledge[0]]) + prompt_bytes


def test_state_with_the_old_full_rank_text_projection_is_refused(trained: MTRMB, minilm: TextEncoder) -> None:
    tensors = dict(trained.state_tensors())
    tensors["prompt/0/fusion.text_in.weight"] = torch.zeros(160, 384)
    with pytest.raises(ContadError, match="full-rank"):
        _mtrmb(minilm).load_state(tensors, trained.state_meta())


def test_saved_state_keeps_the_task_sentences_and_loads_without_a_text_encoder(trained: MTRMB, tmp_path: Path, minilm: TextEncoder) -> None:
    # identical scores after a round trip: tests/test_methods_contract.py (every method)
    out = trained.save(tmp_path / "mtrmb")
    meta = json.loads((out / "model.json").read_text())
    assert meta["method"] == "mtrmb" and meta["state"]["text"]["sentences"] == trained.texts
    restored = build_method(toy_config("mtrmb"), ToyBackbone())
    restored.load(out)
    restored.predict(product_images("red", 2, seed=30))  # no text encoder needed to load or predict
    assert restored._text_encoder is None and restored.texts == trained.texts


def test_product_text_from_config_is_stored_with_the_task(minilm: TextEncoder, tmp_path: Path) -> None:
    from flows.cli import with_product_text

    method = _mtrmb(minilm)
    method.config = with_product_text(method.config, "red", "  a red striped fabric ", via_server=False)
    method.fit_task(toy_task("red", n_train=4, n_heldout=1))
    meta = json.loads((method.save(tmp_path / "m") / "model.json").read_text())
    assert meta["state"]["text"]["sentences"] == ["a red striped fabric"]
    expected, _ = minilm.encode(["a red striped fabric"])
    assert torch.equal(method.prompts[0].fusion.text, expected[0])


def test_switches_off_is_exactly_ucad(minilm: TextEncoder) -> None:
    method = _mtrmb(minilm, kpmk=False, rscl=False)
    ucad = UCAD(toy_config(), ToyBackbone())
    for product in ("red", "green"):
        method.fit_task(toy_task(product, n_train=6))
        ucad.fit_task(toy_task(product, n_train=6))
    images = torch.cat([product_images("red", 3, seed=5, defect="blue"), product_images("green", 3, seed=6)])
    assert torch.equal(method.predict(images).image_scores, ucad.predict(images).image_scores)
    assert not any(".fusion" in name or "learnable_key" in name for name in method.state_tensors())


# ------------------------------------------------------------------ masks
def test_rscl_masks_fall_back_and_say_so() -> None:
    cfg = toy_config("mtrmb")
    choice = structure_masks(cfg)
    assert (choice.requested, choice.used, choice.config.provider) == ("grounded_sam", "felzenszwalb", "felzenszwalb")
    assert "masks.grounded_sam.dino_checkpoint" in choice.reason
    assert choice.record()["masks_provider_used"] == "felzenszwalb"
    cfg.masks.grounded_sam.dino_checkpoint = "/models/gdino"
    assert "masks.sam.checkpoint" in structure_masks(cfg).reason
    cfg.masks.sam.checkpoint = "/models/sam.pth"
    configured = structure_masks(cfg)
    assert configured.used == "grounded_sam" and configured.reason is None and not configured.fell_back
    cfg.mtrmb.rscl = False  # UCAD's loss on masks.provider, like UCAD
    assert structure_masks(cfg).used == cfg.masks.provider == "felzenszwalb"
    ucad = toy_config("ucad")
    ucad.masks.provider = "sam"  # no fallback for UCAD: the provider itself raises WeightsError
    assert structure_masks(ucad).used == "sam"
    assert choose_masks(ucad.masks, "sam", "slic").used == "slic"


def test_add_product_text_option_sets_the_products_sentence() -> None:
    from components.errors import ContadError
    from flows.cli import parse_args, with_product_text

    args = parse_args(["add-product", "data/new", "--name", "bolt", "--text", "a photo of a steel bolt", "method=mtrmb"])
    assert args.text == "a photo of a steel bolt" and args.overrides == ["method=mtrmb"]
    cfg = with_product_text(toy_config("mtrmb"), args.name, args.text, via_server=False)
    assert product_sentence(cfg.text, "bolt") == "a photo of a steel bolt"
    assert with_product_text(cfg, "bolt", None, via_server=False) is cfg
    with pytest.raises(ContadError, match="text.prompts.bolt"):
        with_product_text(cfg, "bolt", "a bolt", via_server=True)
    with pytest.raises(ContadError, match="empty"):
        with_product_text(cfg, "bolt", "  ", via_server=False)


# ------------------------------------------------------------------ tiling (data.tile)
TILE, BIG = IMAGE_SIZE, 2 * IMAGE_SIZE  # the toy backbone is built for 32 px tiles; images are 64 px (2 x 2 tiles)


def _tiled_config() -> Config:
    cfg = toy_config("mtrmb")
    cfg.mtrmb.epochs = cfg.ucad.epochs
    cfg.data.image_size, cfg.data.tile, cfg.data.tile_overlap = BIG, TILE, 0
    return cfg


def _tiled_mtrmb(minilm: TextEncoder) -> MTRMB:
    method = MTRMB(_tiled_config(), tiled_backbone(ToyBackbone(TILE), BIG, TILE, 0))
    method._text_encoder = minilm
    return method


def _big_task(product: str, n_train: int = 8, n_heldout: int = 3) -> TaskData:
    train, held = product_images(product, n_train, 0, size=BIG), product_images(product, n_heldout, 1, size=BIG)
    return TaskData(
        name=product, products=[product],
        train=ImageBatch(images=train, products=[product] * n_train, paths=[f"{product}/train/{i}.png" for i in range(n_train)]),
        heldout=ImageBatch(images=held, products=[product] * n_heldout, paths=[f"{product}/held/{i}.png" for i in range(n_heldout)]),
        label_maps=label_maps_of(train), heldout_label_maps=label_maps_of(held),
    )


@pytest.fixture(scope="module")
def tiled_trained(minilm: TextEncoder) -> MTRMB:
    method = _tiled_mtrmb(minilm)
    for product in ("red", "green"):
        method.fit_task(_big_task(product))
    return method


def test_tiled_prompt_and_fusion_get_gradient_through_every_tile(minilm: TextEncoder) -> None:
    method = _tiled_mtrmb(minilm)
    assert isinstance(method.backbone.inner, TiledBackbone)  # FusedBackbone wraps the tiled backbone
    prompt = _fresh_prompt(method, minilm)
    with torch.no_grad():
        for attention in (prompt.fusion.text_to_image, prompt.fusion.image_to_text):
            attention.to_out.weight.normal_(0.0, 0.05)
        prompt.inner.scale.normal_(0.0, 0.1)
    images = product_images("red", 2, seed=3, size=BIG)
    fused, text = method.backbone.fused_features(images, prompt)
    assert fused.shape == (2, (BIG // 8) ** 2, ToyBackbone.feature_dim)  # stitched 8 x 8 grid, fused once
    # the backbone prompt is applied in each tile: the bottom-right tile alone, prompted, is that corner of I
    corner = method.backbone.inner.inner.features(images[:, :, TILE:, TILE:], prompt.inner)
    stitched = method.backbone.inner.features(images, prompt.inner).reshape(2, 8, 8, -1)
    assert torch.allclose(stitched[:, 4:, 4:], corner.reshape(2, 4, 4, -1), atol=1e-6)
    loss = cross_alignment_loss(fused, text, 0.5) + refined_contrastive_loss(
        fused, method._label_grid(label_maps_of(images), BIG), 0.5, 16, torch.Generator().manual_seed(0))
    named = [(n, p) for n, p in prompt.named_parameters() if p is not prompt.learnable_key]
    grads = torch.autograd.grad(loss, [p for _, p in named])
    for (name, _), grad in zip(named, grads, strict=True):
        assert torch.count_nonzero(grad) > 0, f"no gradient to {name} through the tiles"
    spatial = torch.autograd.grad(method.backbone.inner.features(images[:, :, TILE:, :TILE], prompt.inner).sum(), prompt.inner.spatial)[0]
    assert torch.count_nonzero(spatial) > 0


def test_tiled_mtrmb_trains_routes_scores_and_counts_its_memory(tiled_trained: MTRMB) -> None:
    assert all(torch.count_nonzero(p.fusion.text_to_image.to_out.weight) > 0 for p in tiled_trained.prompts)  # trained through tiles
    assert [s["count"] for s in tiled_trained.score_stats] == [3, 3]  # held-out normalisation at 64 px
    assert all(k.shape[1] == ToyBackbone.feature_dim and len(k) <= 48 for k in tiled_trained.knowledge)
    prompt_bytes = nbytes(list(tiled_trained.prompts[1].state_dict().values()))
    assert tiled_trained.task_bytes(1) == nbytes([tiled_trained.keys[1], tiled_trained.knowledge[1]]) + prompt_bytes
    good = torch.cat([product_images("red", 4, seed=60, size=BIG), product_images("green", 4, seed=61, size=BIG)])
    bad = torch.cat([product_images("red", 4, seed=62, size=BIG, defect="blue"), product_images("green", 4, seed=63, size=BIG, defect="blue")])
    pred_good, pred_bad = tiled_trained.predict(good), tiled_trained.predict(bad)
    assert pred_good.routed_tasks == ["red"] * 4 + ["green"] * 4 == pred_bad.routed_tasks
    assert pred_good.anomaly_maps.shape == (8, BIG, BIG)
    for members in (slice(0, 4), slice(4, 8)):
        assert pred_bad.image_scores[members].min() > pred_good.image_scores[members].max()
    red = good[:4]  # test-time fusion uses the routed task's prompt, fusion and text
    assert torch.equal(pred_good.image_scores[:4], tiled_trained._score_task(red, 0)[1] / tiled_trained.score_scale(0))


def test_tiled_save_load_round_trip_gives_identical_scores(tiled_trained: MTRMB, tmp_path: Path) -> None:
    images = torch.cat([product_images("red", 3, seed=70, size=BIG, defect="green"), product_images("green", 3, seed=71, size=BIG)])
    pred = tiled_trained.predict(images)
    restored = build_method(_tiled_config(), tiled_backbone(ToyBackbone(TILE), BIG, TILE, 0))
    restored.load(tiled_trained.save(tmp_path / "tiled"))
    again = restored.predict(images)
    assert torch.equal(again.image_scores, pred.image_scores) and torch.equal(again.anomaly_maps, pred.anomaly_maps)
    assert again.routed_tasks == pred.routed_tasks


def test_detector_serves_mtrmb_through_the_tiled_backbone(minilm: TextEncoder, tmp_path: Path) -> None:
    from components.backbones.registry import build_backbone
    from components.decision import Detector, normalise
    from components.eval.thresholds import calibrate_heldout, write_calibration

    cfg = Config(method="mtrmb")  # packaged EfficientNet-Lite0 weights, 128 px in 2 x 2 tiles of 64
    cfg.backbone.device = "cpu"
    cfg.data.image_size, cfg.data.tile = 128, 64
    cfg.ucad.key_size, cfg.ucad.knowledge_size, cfg.ucad.batch_size, cfg.ucad.pairs_per_image = 8, 64, 4, 16
    torch.manual_seed(0)
    method = MTRMB(cfg, tiled_backbone(build_backbone(cfg.backbone, 64), 128, 64, 0))
    method._text_encoder = minilm
    rgbs = [(torch.rand(128, 128, 3) * 255).to(torch.uint8).numpy() for _ in range(6)]
    images = normalise(rgbs, 128)
    batch = ImageBatch(images=images[:4], products=["a"] * 4, paths=[""] * 4)
    method.fit_task(TaskData(name="a", products=["a"], train=batch, heldout=batch, label_maps=label_maps_of(images[:4]), heldout_label_maps=label_maps_of(images[:4])))
    assert method.prompts[0].fusion is not None and torch.count_nonzero(method.prompts[0].fusion.text_to_image.to_out.weight) > 0
    method_dir = method.save(tmp_path / "method")
    write_calibration(method_dir, calibrate_heldout(method, batch, cfg))
    detector = Detector.from_method_dir(method_dir, cfg)
    assert isinstance(detector.method.backbone.inner, TiledBackbone) and detector.image_size == 128
    verdicts = detector.decide(rgbs[4:])
    expected = method.predict(images[4:]).image_scores
    assert [v.score for v in verdicts] == pytest.approx(expected.tolist(), rel=1e-5)
    assert verdicts[0].anomaly_map.shape == (128, 128)


# ------------------------------------------------------------------ feature settings per task
def test_each_task_chooses_its_features_with_a_prompt_and_fusion_of_their_width(minilm: TextEncoder, tmp_path: Path) -> None:
    from components.config import FeatureChoice
    from components.methods.state_io import load_method_state, save_method_state
    from tests.methods_support import BlindAtDefaultToy, FineToy

    def build(**mtrmb: object) -> MTRMB:
        cfg = toy_config("mtrmb")
        cfg.mtrmb.epochs = 1
        for key, value in mtrmb.items():
            setattr(cfg.mtrmb, key, value)
        method = MTRMB(cfg, BlindAtDefaultToy())
        method._text_encoder = minilm
        return method

    method = build(feature_choices=[FeatureChoice(feature_layer=2)])
    log = method.fit_task(toy_task("red", n_heldout=6))
    assert log["features"] == log["feature_choice"]["chosen"] == "feature_layer=2"  # the configured layer is blind: ties
    fusion = method.prompts[0].fusion
    assert fusion is not None and fusion.text_in[1].out_features == FineToy.feature_dim  # the chosen view's width
    assert method.knowledge[0].shape[1] == FineToy.feature_dim
    few = method.fit_task(toy_task("green", n_heldout=3))  # too few held-out normals: the backbone's settings
    assert few["feature_choice"]["skipped"].startswith("3 held-out normals")
    assert method.prompts[1].fusion.text_in[1].out_features == ToyBackbone.feature_dim
    images = torch.cat([product_images("red", 3, seed=40), product_images("red", 3, seed=41, defect="blue"), product_images("green", 2, seed=42)])
    pred = method.predict(images)
    assert pred.routed_tasks == ["red"] * 6 + ["green"] * 2
    assert pred.image_scores[3:6].min() > pred.image_scores[:3].max()  # the fine layer sees red's defects

    save_method_state(method, tmp_path / "m")
    loaded = build(feature_choices=[FeatureChoice(feature_layer=2)])
    load_method_state(loaded, tmp_path / "m")
    again = loaded.predict(images)
    assert torch.equal(again.image_scores, pred.image_scores) and torch.equal(again.anomaly_maps, pred.anomaly_maps)

    # MTRMB reads its own key, not UCAD's, and names it when the backbone cannot take a setting
    plain = build()
    assert plain.views.candidates == [None] and plain.config.ucad.feature_choices == []
    cfg = toy_config("mtrmb")
    cfg.ucad.feature_choices = [FeatureChoice(feature_layer=2)]
    assert MTRMB(cfg, BlindAtDefaultToy()).views.candidates == [None]
    cfg.mtrmb.feature_choices = [FeatureChoice(feature_layer=2)]
    with pytest.raises(ConfigError, match=r"mtrmb.feature_choices \(feature_layer=2\)"):
        MTRMB(cfg, ToyBackbone())
