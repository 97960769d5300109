"""ViT backbone: prefix attention, layer choice, weights from a local checkpoint or the offline cache."""

from __future__ import annotations

from pathlib import Path

import shutil

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file

from components.backbones.registry import build_backbone
from components.backbones.vit import PrefixPrompt, VitBackbone, prefixed_attention
from components.config import BackboneConfig, ConfigError
from components.errors import WeightsError

NAME = "vit_tiny_patch16_224"
SIZE = 64


def _config(**overrides: object) -> BackboneConfig:
    return BackboneConfig.model_validate({"name": NAME, "device": "cpu", "pretrained": False, **overrides})


def _images(n: int = 2, size: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, dict[str, Path]]:
    """A random 6-block tiny ViT at 224 px, saved by the test as .safetensors and as a wrapped .pth."""
    torch.manual_seed(2)
    net = timm.create_model(NAME, pretrained=False, depth=6).eval()
    folder = tmp_path_factory.mktemp("vit_ckpt")
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    paths = {".safetensors": folder / "vit.safetensors", ".pth": folder / "vit.pth"}
    save_file(state, str(paths[".safetensors"]))
    torch.save({"model": state}, paths[".pth"])
    return net, paths


def test_features_are_block5_patch_tokens_of_the_timm_model(reference) -> None:
    net, paths = reference
    backbone = build_backbone(_config(checkpoint=str(paths[".safetensors"])), 224)
    images = _images(size=224)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    timm_input = (images * std + mean - 0.5) / 0.5  # the model's own normalisation
    with torch.inference_mode():
        (expected,) = net.forward_intermediates(timm_input, indices=[5], output_fmt="NLC", intermediates_only=True)
        feats = backbone.features(images)
        keys = backbone.key_features(images)
    assert backbone.grid_size(224) == (14, 14) and feats.shape == (2, 196, 192)
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(keys, feats)
    assert len(backbone.net.blocks) == 6  # blocks past the feature/key layer are never run


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_checkpoint_saved_by_the_test_is_loaded(reference, suffix: str) -> None:
    net, paths = reference
    backbone = build_backbone(_config(checkpoint=str(paths[suffix])), 224)
    expected = net.state_dict()
    loaded = backbone.net.state_dict()
    for key, value in loaded.items():
        assert torch.equal(value, expected[key]), key
    assert len(loaded) > 50 and any(k.startswith("blocks.5.") for k in loaded)


def test_checkpoint_at_other_resolution_resamples_position_embeddings(reference) -> None:
    _, paths = reference
    backbone = build_backbone(_config(checkpoint=str(paths[".pth"])), SIZE)
    assert backbone.net.pos_embed.shape == (1, 1 + 16, 192)
    assert backbone.features(_images()).shape == (2, 16, 192)


def test_missing_or_mismatched_checkpoint_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="backbone.checkpoint"):
        build_backbone(_config(checkpoint=str(tmp_path / "absent.safetensors")), SIZE)
    other = tmp_path / "small.pth"
    torch.save(timm.create_model("vit_small_patch16_224", pretrained=False, depth=1, weight_init="skip").state_dict(), other)
    with pytest.raises(WeightsError, match="backbone.checkpoint"):
        build_backbone(_config(checkpoint=str(other)), SIZE)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        build_backbone(_config(checkpoint=str(garbage)), SIZE)


def _empty_caches(monkeypatch: pytest.MonkeyPatch, root: Path) -> Path:
    hub = root / "hf"
    hub.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(root / "torch"))
    return hub


def test_offline_missing_pretrained_weights_error_names_the_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _empty_caches(monkeypatch, tmp_path)
    with pytest.raises(WeightsError) as info:
        build_backbone(BackboneConfig(name="vit_base_patch16_224", device="cpu"), 224)
    message = str(info.value)
    assert "backbone.checkpoint" in message and "vit_base_patch16_224" in message and "pretrained=false" in message


def test_pretrained_weights_resolve_from_the_local_hf_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, reference) -> None:
    hub = _empty_caches(monkeypatch, tmp_path)
    net, paths = reference
    repo = hub / ("models--" + net.pretrained_cfg["hf_hub_id"].replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copy(paths[".safetensors"], snapshot / "model.safetensors")
    backbone = build_backbone(BackboneConfig(name=NAME, device="cpu"), 224)
    assert torch.equal(backbone.net.patch_embed.proj.weight, net.patch_embed.proj.weight)


def test_prefixed_attention_matches_explicit_formula(reference) -> None:
    attn = reference[0].blocks[0].attn
    prefix = PrefixPrompt(length=3, dim=192, num_heads=attn.num_heads)
    with torch.no_grad():
        prefix.gate.copy_(torch.linspace(-1.0, 1.0, attn.num_heads))
        prefix.key.mul_(50.0)  # make the prefix attention far from uniform
        prefix.value.mul_(50.0)
    x = torch.randn(2, 5, 192)
    heads, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(2, 5, 3, heads, d).permute(2, 0, 3, 1, 4)
    pk = prefix.key.reshape(3, heads, d).transpose(0, 1)
    pv = prefix.value.reshape(3, heads, d).transpose(0, 1)
    tokens = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, -1) @ v
    prefixes = torch.softmax(q @ pk.transpose(-1, -2) / d**0.5, -1) @ pv
    mixed = tokens + torch.tanh(prefix.gate).view(1, heads, 1, 1) * prefixes
    expected = attn.proj(mixed.transpose(1, 2).reshape(2, 5, 192))
    torch.testing.assert_close(prefixed_attention(attn, x, prefix), expected, rtol=1e-5, atol=1e-5)


def test_prompt_layers_and_length_follow_the_config() -> None:
    backbone = build_backbone(_config(prompt={"length": 2, "layers": [1, 3, 9]}, feature_layer=4), SIZE)
    assert isinstance(backbone, VitBackbone)
    prompt = backbone.new_prompt()
    assert sorted(prompt.prefixes) == ["1", "3"]  # block 9 lies past feature_layer=4
    assert prompt.prefixes["1"].key.shape == (2, 192) and prompt.prefixes["1"].gate.shape == (3,)
    assert len(backbone.net.blocks) == 6  # key_layer default 5


def test_out_of_range_layers_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="backbone.feature_layer"):
        build_backbone(_config(feature_layer=12), SIZE)
    with pytest.raises(ConfigError, match="backbone.prompt.layers"):
        build_backbone(_config(prompt={"layers": [0, 14]}), SIZE)
    with pytest.raises(ConfigError, match="backbone.feature_span=3"):  # a CNN pyramid setting
        build_backbone(_config(feature_span=3), SIZE)
