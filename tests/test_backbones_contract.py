"""The PromptedBackbone contract, checked on every backbone (real Lite0 weights, small random ViT)."""

from __future__ import annotations

import pytest
import torch

from components.backbones.base import PromptedBackbone, TaskPrompt
from components.backbones.registry import build_backbone
from components.config import BackboneConfig

IMAGE_SIZE = 96

CONFIGS = {
    "efficientnet_lite0": BackboneConfig(name="efficientnet_lite0", device="cpu"),
    "vit_tiny_random": BackboneConfig.model_validate(
        {"name": "vit_tiny_patch16_224", "device": "cpu", "pretrained": False, "prompt": {"length": 3, "layers": [0, 2, 5]}}
    ),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def backbone(request: pytest.FixtureRequest) -> PromptedBackbone:
    return build_backbone(CONFIGS[request.param], IMAGE_SIZE)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3))


def _perturbed(prompt: TaskPrompt, seed: int, scale: float = 0.5) -> TaskPrompt:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in prompt.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return prompt


def test_weights_frozen_and_eval_prompt_trainable(backbone: PromptedBackbone) -> None:
    assert all(not p.requires_grad for p in backbone.parameters())
    assert not any(m.training for m in backbone.modules())
    backbone.train()
    assert not any(m.training for m in backbone.modules() if m is not backbone)
    backbone.eval()
    prompt = backbone.new_prompt()
    params = list(prompt.parameters())
    assert params and all(p.requires_grad for p in params)


def test_shapes_match_grid_and_dims(backbone: PromptedBackbone, images: torch.Tensor) -> None:
    with torch.inference_mode():
        feats = backbone.features(images)
        keys = backbone.key_features(images)
    h, w = backbone.grid_size(IMAGE_SIZE)
    assert feats.shape == (2, h * w, backbone.feature_dim)
    assert keys.shape[0] == 2 and keys.shape[2] == backbone.key_dim and keys.shape[1] <= h * w


def test_fresh_prompt_is_identity_and_perturbed_prompt_changes(backbone: PromptedBackbone, images: torch.Tensor) -> None:
    with torch.no_grad():
        plain = backbone.features(images)
        fresh = backbone.features(images, backbone.new_prompt())
        moved = backbone.features(images, _perturbed(backbone.new_prompt(), seed=1))
    torch.testing.assert_close(fresh, plain, rtol=0, atol=1e-6)
    assert (moved - plain).abs().mean() > 1e-3 * plain.abs().mean()


def test_gradient_reaches_every_prompt_parameter_only(backbone: PromptedBackbone, images: torch.Tensor) -> None:
    prompt = _perturbed(backbone.new_prompt(), seed=2, scale=0.1)
    backbone.features(images, prompt).pow(2).mean().backward()
    for name, param in prompt.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in backbone.parameters())


def test_fresh_prompt_gets_a_gradient(backbone: PromptedBackbone, images: torch.Tensor) -> None:
    prompt = backbone.new_prompt()
    backbone.features(images, prompt).pow(2).mean().backward()
    grads = [p.grad.abs().sum() for p in prompt.parameters() if p.grad is not None]
    assert grads and sum(grads) > 0


def test_prompts_of_different_tasks_do_not_interact(backbone: PromptedBackbone, images: torch.Tensor) -> None:
    task_a = _perturbed(backbone.new_prompt(), seed=4)
    task_b = backbone.new_prompt()
    with torch.no_grad():
        before = backbone.features(images, task_a)
        _perturbed(task_b, seed=5)
        other = backbone.features(images, task_b)
        after = backbone.features(images, task_a)
    assert torch.equal(before, after)
    assert not torch.allclose(before, other)


def test_key_features_ignore_prompts_and_are_deterministic(backbone: PromptedBackbone, images: torch.Tensor) -> None:
    with torch.no_grad():
        first = backbone.key_features(images)
        backbone.features(images, _perturbed(backbone.new_prompt(), seed=6))
        second = backbone.key_features(images)
        assert torch.equal(first, second)
        assert torch.equal(backbone.features(images), backbone.features(images))


def test_prompt_state_dict_round_trip(backbone: PromptedBackbone, images: torch.Tensor) -> None:
    trained = _perturbed(backbone.new_prompt(), seed=7)
    restored = backbone.new_prompt()
    restored.load_state_dict(trained.state_dict())
    with torch.no_grad():
        assert torch.equal(backbone.features(images, trained), backbone.features(images, restored))


def test_batch_composition_does_not_change_features(backbone: PromptedBackbone, images: torch.Tensor) -> None:
    prompt = _perturbed(backbone.new_prompt(), seed=8)
    with torch.no_grad():
        both = backbone.features(images, prompt)
        single = backbone.features(images[:1], prompt)
    torch.testing.assert_close(both[:1], single, rtol=1e-4, atol=1e-5)
