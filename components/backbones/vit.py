"""Vision Transformer prompted backbone (timm ``vit_*``; the UCAD paper uses ``vit_base_patch16_224``).

Features are the patch tokens (class/register tokens dropped) after block ``feature_layer``
(default 5, 0-based); ``key_features`` are the un-prompted patch tokens after block ``key_layer``
(default 5). Blocks past the deeper of the two are never run, and are dropped after loading.

Prompts are prefix-tuning prompts: each block in ``prompt.layers`` gets ``prompt.length``
learnable key and value vectors per head that every token can attend to. The attention with
prefixes is implemented here on top of timm's frozen block weights (timm is not modified):

    out_h = softmax(q_h K_h^T / sqrt(d)) V_h + tanh(g_h) * softmax(q_h P^k_h^T / sqrt(d)) P^v_h

i.e. the prefix attention is a separate softmax whose contribution is scaled by a per-head gate
``g_h`` initialised at zero (the zero-init gated prefix form of LLaMA-Adapter). With the gate at zero
a fresh prompt is exactly the identity, so training starts from the pretrained features and
different tasks' prompts start equal; the gate receives a gradient from the first step, after which
the prefixes do too. The classic joint-softmax prefix form cannot be an identity at initialisation
(prefix logits always take attention mass).

Weights: ``backbone.checkpoint`` (a local .safetensors/.pth/.bin file) when set; else the timm
pretrained weights from the local Hugging Face / torch-hub cache, never downloaded; missing ->
``WeightsError`` naming ``backbone.checkpoint``. ``backbone.pretrained=false`` = random init.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn
from torch import nn

from components.backbones.base import PromptedBackbone, TaskPrompt
from components.backbones.common import check_images, freeze, renormalise
from components.backbones.weights import CHECKPOINT_KEY, read_state_dict
from components.config import BackboneConfig, ConfigError
from components.errors import WeightsError

log = logging.getLogger(__name__)

DEFAULT_FEATURE_LAYER = 5
DEFAULT_KEY_LAYER = 5
PREFIX_INIT_STD = 0.02


class PrefixPrompt(nn.Module):
    """Key/value prefixes (length, dim) and a zero-initialised per-head gate for one block."""

    def __init__(self, length: int, dim: int, num_heads: int) -> None:
        super().__init__()
        self.key = nn.Parameter(torch.randn(length, dim) * PREFIX_INIT_STD)
        self.value = nn.Parameter(torch.randn(length, dim) * PREFIX_INIT_STD)
        self.gate = nn.Parameter(torch.zeros(num_heads))


class VitPrompt(TaskPrompt):
    """One task's prefixes, keyed by block index."""

    def __init__(self, layers: list[int], length: int, dim: int, num_heads: int) -> None:
        super().__init__()
        self.prefixes = nn.ModuleDict({str(i): PrefixPrompt(length, dim, num_heads) for i in layers})

    def for_block(self, index: int) -> PrefixPrompt | None:
        """The prefixes of block ``index`` (None when that block is not prompted)."""
        return self.prefixes[str(index)] if str(index) in self.prefixes else None


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(..., L, H*d) -> (..., H, L, d)."""
    *lead, length, dim = x.shape
    return x.reshape(*lead, length, num_heads, dim // num_heads).transpose(-3, -2)


def prefixed_attention(attn: nn.Module, x: torch.Tensor, prefix: PrefixPrompt) -> torch.Tensor:
    """timm ``Attention`` forward with gated key/value prefixes (frozen weights, eval mode)."""
    batch, tokens, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v)
    prefix_k = _split_heads(prefix.key, heads).unsqueeze(0).expand(batch, -1, -1, -1)
    prefix_v = _split_heads(prefix.value, heads).unsqueeze(0).expand(batch, -1, -1, -1)
    prefix_out = F.scaled_dot_product_attention(q, prefix_k, prefix_v)
    out = out + torch.tanh(prefix.gate).view(1, heads, 1, 1) * prefix_out
    out = attn.norm(out.transpose(1, 2).reshape(batch, tokens, heads * head_dim))
    if gate is not None:
        out = out * gate
    return attn.proj(out)


def prefixed_block(block: Block, x: torch.Tensor, prefix: PrefixPrompt) -> torch.Tensor:
    """timm pre-norm ``Block`` forward (eval mode) with prefixes in its attention."""
    x = x + block.ls1(prefixed_attention(block.attn, block.norm1(x), prefix))
    return x + block.ls2(block.mlp(block.norm2(x)))


class VitBackbone(PromptedBackbone):
    """Frozen timm ViT with prefix-tuning task prompts (see module docstring)."""

    def __init__(
        self,
        net: VisionTransformer,
        feature_layer: int = DEFAULT_FEATURE_LAYER,
        key_layer: int = DEFAULT_KEY_LAYER,
        prompt_layers: list[int] | None = None,
        prompt_length: int = 4,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        depth = len(net.blocks)
        for key, layer in (("backbone.feature_layer", feature_layer), ("backbone.key_layer", key_layer)):
            if not 0 <= layer < depth:
                raise ConfigError(f"{key}={layer} is out of range: this ViT has blocks 0..{depth - 1}")
        layers = sorted(set(prompt_layers if prompt_layers is not None else range(feature_layer + 1)))
        if any(i < 0 for i in layers):
            raise ConfigError(f"backbone.prompt.layers={layers}: block indices must be >= 0")
        if prompt_length < 1:
            raise ConfigError(f"backbone.prompt.length={prompt_length} must be >= 1")
        unused = [i for i in layers if i > feature_layer]
        if unused:
            log.warning("backbone.prompt.layers %s are past feature_layer=%d and cannot change features; ignored", unused, feature_layer)
        unsupported = [i for i in layers if i <= feature_layer and not isinstance(net.blocks[i], Block)]
        if unsupported:
            raise ConfigError(f"backbone.name: blocks {unsupported} are not standard pre-norm timm Blocks; prefix prompts unsupported")
        self.prompt_layers = [i for i in layers if i <= feature_layer]
        self.prompt_length = prompt_length
        self.feature_layer = feature_layer
        self.key_layer = key_layer
        last = max(feature_layer, key_layer)
        net.blocks = net.blocks[: last + 1]
        net.norm = nn.Identity()
        net.reset_classifier(0)
        self.net = freeze(net).to(device)
        self.mean = tuple(net.pretrained_cfg.get("mean", (0.5, 0.5, 0.5)))
        self.std = tuple(net.pretrained_cfg.get("std", (0.5, 0.5, 0.5)))
        self.feature_dim = self.key_dim = int(net.embed_dim)
        self.num_heads = int(net.blocks[0].attn.num_heads)
        self.patch_size = int(net.patch_embed.patch_size[0])

    @property
    def device(self) -> torch.device:
        return self.net.patch_embed.proj.weight.device

    def train(self, mode: bool = True) -> "VitBackbone":
        """The frozen network always stays in eval mode (no dropout, no drop-path)."""
        super().train(mode)
        self.net.eval()
        return self

    def grid_size(self, image_size: int) -> tuple[int, int]:
        side = math.floor(image_size / self.patch_size)
        return side, side

    def new_prompt(self) -> VitPrompt:
        return VitPrompt(self.prompt_layers, self.prompt_length, self.feature_dim, self.num_heads).to(self.device)

    def features(self, images: torch.Tensor, prompt: TaskPrompt | None = None) -> torch.Tensor:
        if prompt is not None and not isinstance(prompt, VitPrompt):
            raise TypeError(f"a ViT backbone needs a VitPrompt, got {type(prompt).__name__}")
        return self._tokens(images, self.feature_layer, prompt)

    def key_features(self, images: torch.Tensor) -> torch.Tensor:
        return self._tokens(images, self.key_layer, None)

    def _tokens(self, images: torch.Tensor, layer: int, prompt: VitPrompt | None) -> torch.Tensor:
        """Patch tokens (B, N, C) after block ``layer``."""
        check_images(images)
        x = renormalise(images.to(self.device), self.mean, self.std)
        x = self.net.norm_pre(self.net._pos_embed(self.net.patch_embed(x)))
        for index in range(layer + 1):
            block = self.net.blocks[index]
            prefix = prompt.for_block(index) if prompt is not None else None
            x = block(x) if prefix is None else prefixed_block(block, x, prefix)
        return x[:, self.net.num_prefix_tokens :]


def _cached_pretrained_file(name: str) -> Path | None:
    """Pretrained weights of timm model ``name`` in the local HF hub or torch-hub cache (never downloads)."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.file:
        return Path(cfg.file) if Path(cfg.file).is_file() else None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    if cfg.url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if candidate.is_file():
            return candidate
    return None


def _missing_weights_message(name: str) -> str:
    cfg = timm.models.get_pretrained_cfg(name)
    source = (cfg.hf_hub_id or cfg.url) if cfg is not None else None
    source = source or "(timm knows no pretrained source)"
    return (
        f"backbone.name={name}: pretrained weights are not in the local timm/Hugging Face cache "
        f"(looked for {source}; nothing is downloaded at run time). Fix: set {CHECKPOINT_KEY} in params.yaml "
        f"(or override {CHECKPOINT_KEY}=/path/to/weights.safetensors) to a local .safetensors/.pth/.bin file, "
        f"or pre-fill the cache (HF_HOME) with {source}, or use backbone.name=efficientnet_lite0 "
        "(weights ship with the package); backbone.pretrained=false gives random weights (tests only)."
    )


def _unused_key(key: str, depth: int) -> bool:
    """Checkpoint entries the truncated feature extractor has no place for (head, final norm, deeper blocks)."""
    if key.startswith(("head.", "fc_norm.", "norm.")):
        return True
    return key.startswith("blocks.") and int(key.split(".")[1]) >= depth


def load_vit_weights(net: VisionTransformer, path: Path) -> None:
    """Load a local ViT checkpoint into ``net`` (head and blocks past ``net``'s depth ignored, position embeddings resampled)."""
    depth = len(net.blocks)
    state = checkpoint_filter_fn(read_state_dict(path), net)
    state = {k: v for k, v in state.items() if not _unused_key(k, depth)}
    net.norm = nn.Identity()  # features are raw block outputs; the final norm is never used
    net.reset_classifier(0)
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise WeightsError(f"{CHECKPOINT_KEY}: {path} does not fit backbone {net.pretrained_cfg.get('architecture')}: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"{CHECKPOINT_KEY}: {path} does not match {net.pretrained_cfg.get('architecture', 'the ViT')}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def build_vit(cfg: BackboneConfig, image_size: int, device: torch.device) -> VitBackbone:
    """The prompted timm ViT described by ``cfg`` for ``image_size`` inputs.

    Only the blocks up to the deeper of the feature and key layers are built and loaded.
    """
    feature_layer = cfg.feature_layer if cfg.feature_layer is not None else DEFAULT_FEATURE_LAYER
    key_layer = cfg.key_layer if cfg.key_layer is not None else DEFAULT_KEY_LAYER
    _check_layers(cfg.name, {"backbone.feature_layer": [feature_layer], "backbone.key_layer": [key_layer], "backbone.prompt.layers": cfg.prompt.layers})
    if cfg.feature_span != 2:
        raise ConfigError(f"backbone.feature_span={cfg.feature_span}: a pyramid setting of the EfficientNet-Lite backbones; {cfg.name} has one token grid (leave it at 2)")
    weights: Path | None = None
    if cfg.checkpoint is not None:
        weights = Path(cfg.checkpoint)
    elif cfg.pretrained:
        weights = _cached_pretrained_file(cfg.name)
        if weights is None:
            raise WeightsError(_missing_weights_message(cfg.name))
        log.info("loading %s weights from the local cache %s", cfg.name, weights)
    depth = max(feature_layer, key_layer) + 1
    init = "skip" if weights is not None else ""  # loaded weights replace the random initialisation
    net = timm.create_model(cfg.name, pretrained=False, img_size=image_size, depth=depth, num_classes=0, weight_init=init)
    if weights is not None:
        load_vit_weights(net, weights)
    return VitBackbone(
        net,
        feature_layer=feature_layer,
        key_layer=key_layer,
        prompt_layers=list(cfg.prompt.layers),
        prompt_length=cfg.prompt.length,
        device=device,
    )


def _check_layers(name: str, layers: dict[str, list[int]]) -> None:
    """Raise ``ConfigError`` unless ``name`` is a plain timm ViT having every block index in ``layers``."""
    try:
        with torch.device("meta"):  # architecture only: no memory, no initialisation
            full = timm.create_model(name, pretrained=False, num_classes=0, weight_init="skip")
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ConfigError(f"backbone.name={name!r} is not a timm ViT: {exc}") from exc
    if not isinstance(full, VisionTransformer):
        raise ConfigError(f"backbone.name={name!r} is not a plain timm VisionTransformer ({type(full).__name__})")
    depth = len(full.blocks)
    for key, indices in layers.items():
        bad = [i for i in indices if not 0 <= i < depth]
        if bad:
            raise ConfigError(f"{key}: block(s) {bad} out of range: {name} has blocks 0..{depth - 1}")
