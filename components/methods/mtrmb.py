"""MTRMB (multimodal task representation memory bank): UCAD + text-guided KPMK + RSCL.

Built on UCAD (``components/methods/ucad.py``) by subclassing: UCAD's task keys, key routing,
prompt training loop, knowledge coresets, scoring and state handling are reused unchanged. MTRMB
changes three things, all through UCAD's own seams:

1. **Per-task prompt = backbone prompt + KPMK parts** (``MTRMBPrompt``): the backbone's
   ``TaskPrompt``, the task's text-image fusion (``TextImageFusion``, paper Eqs. 3-4, holding the
   task's frozen text tokens as buffers) and the L2P-style learnable key K_t (Eq. 2).
2. **Features are fused**: MTRMB wraps the backbone (``FusedBackbone``) so that prompted features
   are the fused tokens I'. UCAD's knowledge coreset, held-out statistics and test-time scoring
   therefore all use I'; at test time an image is routed by the frozen key (un-prompted, as in
   UCAD) and then fused with the ROUTED task's fusion and text (both live in that task's prompt).
3. **Loss = Eq. 8**: ``contrastive_weight * L_contra + cross_loss_weight * L_cross +
   key_pull_weight * L_kp``. L_contra is RSCL's Eqs. 5-6 on the label maps (``mtrmb.rscl``; off:
   UCAD's structure-contrastive loss), L_cross (Eq. 7) is computed on I' and T' so the fusion gets
   gradient, L_kp = 1 - cos(q(x), K_t) with q(x) the mean frozen key feature of the image.
   The learnable keys are trained and stored as the paper says, but routing uses UCAD's coreset keys
   (Eq. 9 as written is circular; a single vector per task routes worse than a key set).

Forgetting (decision): **fusion weights are per task**. Each task trains a fresh fusion together
with its fresh prompt; both are frozen when the task ends and nothing of an old task is trained
again, so learning a new task leaves every stored tensor and every score of an old task
bit-identical (``tests/test_methods_mtrmb.py``). The cost is a small fusion per task
(about 2 * 4 * C * fusion_dim + (384 + C) * fusion_dim parameters with the rank-``fusion_dim`` text
projection, plus the task's padded text tokens; C = backbone feature width). At the defaults (C = 160,
fusion_dim 16) that is 0.16 MB per task; a full-rank text projection with fusion_dim 64 took 0.6 MB.

Tiling (``data.tile``; ``auto`` resolves as for UCAD, e.g. 448 px in 2 x 2 tiles of 224 on the real
sequence): ``FusedBackbone`` wraps the ``TiledBackbone`` it is given, so the task's backbone prompt is
applied in every tile, the tiles' patch features are stitched onto the full-resolution grid, and the
task's fusion then runs once on the stitched tokens I (text attends to the whole image). Training
gradients reach the prompt through every tile; keys, L_kp's query and routing use the tiled wrapper's
single un-tiled key pass.

Masks: with ``mtrmb.rscl`` the label maps come from ``mtrmb.masks_provider`` (Grounding DINO boxes
from ``masks.grounded_sam.prompts[product]`` (default: the product name), each box segmented by
SAM). When those weights are not configured, ``mtrmb.masks_fallback`` is used and the run records
it (``structure_masks``; metrics.json ``masks_provider_used``).

Text: one sentence per task (``text.prompts[product]`` or ``text.template``; several products of
one task joined by "and"), encoded once by the frozen text encoder (``components/backbones/text.py``)
when the task is learned; the sentence and its token features are stored with the task.

Switches: ``mtrmb.kpmk=false`` drops fusion, L_cross and L_kp; ``mtrmb.rscl=false`` uses UCAD's
loss on ``masks.provider`` maps; ``mtrmb.train_prompt=false`` keeps the backbone prompt at its
(training-free, UCAD) initial values so Eq. 8 trains only the fusion and the learnable key. With both off (and ``contrastive_weight=1``) MTRMB is UCAD trained for
``mtrmb.epochs`` exactly. ``mtrmb.epochs`` replaces ``ucad.epochs`` for MTRMB (UCAD's default, 0, is
training-free; without training the fusion stays the identity and MTRMB would be UCAD). The other
``ucad.*`` knobs (lr, batch size, key size, pairs per image, knowledge size) and ``memory.*`` apply
as for UCAD. The per-task feature choice is MTRMB's own (``mtrmb.feature_choices`` /
``mtrmb.feature_choice_margin``, UCAD's rule in ``components/methods/feature_choice.py``; opt-in: it passes the
validation protocol's accuracy clauses but not its training-time one, RESULTS section 3): every candidate trains its
own prompt and a fusion of its own feature width (``FusedBackbone.with_features``), and the task keeps the candidate
that separates its held-out normals from synthetic defects best. Memory accounting (decision, the same rule as
UCAD's): ``memory.budget_mb`` bounds everything stored per task, so the key, prompt, fusion weights, learnable key
and text tokens are reserved from it and the knowledge coreset gets the rest (``task_bytes`` / ``memory_bytes``).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import nn

from components.backbones.base import PromptedBackbone, TaskPrompt
from components.backbones.text import TextEncoder, build_text_encoder, task_sentence
from components.config import Config
from components.errors import ContadError
from components.methods.contrastive import structure_contrastive_loss
from components.methods.feature_cache import share_feature_cache
from components.methods.multimodal import TextImageFusion, cross_alignment_loss, key_pull_loss, refined_contrastive_loss
from components.methods.ucad import UCAD
from components.segment.fallback import MasksChoice, choose_masks
from components.types import TaskData

log = logging.getLogger(__name__)


class MTRMBPrompt(TaskPrompt):
    """One task's trainable parts: the backbone prompt and, with KPMK, its fusion and learnable key."""

    def __init__(self, inner: TaskPrompt, fusion: TextImageFusion | None, key_dim: int) -> None:
        super().__init__()
        self.inner = inner
        self.fusion = fusion
        if fusion is None:
            self.register_parameter("learnable_key", None)
        else:  # L2P initialisation: uniform(-1, 1)
            self.learnable_key = nn.Parameter(torch.rand(key_dim) * 2.0 - 1.0)


class FusedBackbone(PromptedBackbone):
    """The backbone as MTRMB sees it: prompted features are the prompt's fused tokens I'.

    Key features and un-prompted features are the wrapped backbone's, untouched.
    """

    def __init__(self, inner: PromptedBackbone, new_fusion: Any | None) -> None:
        super().__init__()
        self.inner = inner
        self.feature_dim = inner.feature_dim
        self.key_dim = inner.key_dim
        self._new_fusion = new_fusion  # callable(feature width) -> TextImageFusion, or None without KPMK
        # Share the wrapped backbone's test-feature cache: un-prompted keys are the same features, and
        # fused features are cached under the MTRMBPrompt's digest (prompt + fusion + text).
        share_feature_cache(self, inner)

    def grid_size(self, image_size: int) -> tuple[int, int]:
        return self.inner.grid_size(image_size)

    def with_features(self, layer: int | None = None, span: int | None = None, dim: int | None = None) -> PromptedBackbone:
        """The fused backbone over the wrapped backbone's view with other feature settings: its prompts' fusions take
        that view's feature width (itself when nothing changes)."""
        inner = self.inner.with_features(layer, span, dim)
        return self if inner is self.inner else FusedBackbone(inner, self._new_fusion)

    def key_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner.key_features(images)

    def fused_features(self, images: torch.Tensor, prompt: MTRMBPrompt | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(I' (B, N, C), pooled T' (B, C) or None without fusion) of ``images``."""
        if prompt is None:
            return self.inner.features(images), None
        features = self.inner.features(images, prompt.inner)
        if prompt.fusion is None:
            return features, None
        return prompt.fusion(features)

    def features(self, images: torch.Tensor, prompt: TaskPrompt | None = None) -> torch.Tensor:
        if prompt is not None and not isinstance(prompt, MTRMBPrompt):
            raise TypeError(f"MTRMB needs an MTRMBPrompt, got {type(prompt).__name__}")
        return self.fused_features(images, prompt)[0]

    def new_prompt(self) -> MTRMBPrompt:
        inner = self.inner.new_prompt()  # first, so the backbone prompt's init is UCAD's under the same seed
        fusion = self._new_fusion(self.feature_dim) if self._new_fusion is not None else None
        device = next(iter(inner.parameters()), torch.empty(0)).device
        return MTRMBPrompt(inner, fusion, self.key_dim).to(device)


class MTRMB(UCAD):
    """UCAD with per-task text-image fusion (KPMK), refined structure contrast (RSCL) and Eq. 8."""

    name: ClassVar[str] = "mtrmb"
    choice_key: ClassVar[str] = "mtrmb.feature_choices"

    def __init__(self, config: Config, backbone: PromptedBackbone) -> None:
        self.texts: list[str] = []
        self._text_encoder: TextEncoder | None = None
        self._pending_text: tuple[torch.Tensor, torch.Tensor] | None = None
        cfg = config.mtrmb
        self.fusion_spec: dict[str, int | None] = {
            "text_dim": None,  # known once the text encoder is built (or from a loaded state)
            "text_length": config.text.max_length,
            "dim": cfg.fusion_dim,
            "heads": cfg.fusion_heads,
        }
        # MTRMB trains prompt + fusion + learnable key for mtrmb.epochs (UCAD's own default is training-free), and
        # chooses per task among mtrmb.feature_choices (each candidate with its own prompt and fusion), not UCAD's.
        config = config.model_copy(update={"ucad": config.ucad.model_copy(update={
            "epochs": cfg.epochs, "feature_choices": list(cfg.feature_choices), "feature_choice_margin": cfg.feature_choice_margin})})
        super().__init__(config, FusedBackbone(backbone, self._new_fusion if cfg.kpmk else None))

    # ------------------------------------------------------------------ masks
    @classmethod
    def needs_structure_masks(cls, config: Config) -> bool:
        """MTRMB always trains its prompts (``mtrmb.epochs``) on structure label maps."""
        return True

    @classmethod
    def structure_masks(cls, config: Config) -> MasksChoice:
        """Label-map provider of this run: ``mtrmb.masks_provider`` (or its fallback) with RSCL, else ``masks.provider``."""
        if config.mtrmb.rscl:
            return choose_masks(config.masks, config.mtrmb.masks_provider, config.mtrmb.masks_fallback)
        return choose_masks(config.masks, config.masks.provider, None)

    # ------------------------------------------------------------------ text
    def text_encoder(self) -> TextEncoder:
        """The frozen text encoder of ``text.*`` (built on first use: only learning a task needs it)."""
        if self._text_encoder is None:
            self._text_encoder = build_text_encoder(self.config.text)
        return self._text_encoder

    def _new_fusion(self, feature_dim: int) -> TextImageFusion:
        """A fresh fusion for patch features of width ``feature_dim`` (the task's feature settings' width)."""
        spec = self.fusion_spec
        if spec["text_dim"] is None:
            raise RuntimeError("mtrmb: the text width is unknown (no text encoded and no state loaded)")
        return TextImageFusion(feature_dim, int(spec["text_dim"]), int(spec["text_length"]), int(spec["dim"]), int(spec["heads"]))

    def _encode_task_text(self, sentence: str) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.text_encoder()
        if self.fusion_spec["text_dim"] not in (None, encoder.dim) or self.fusion_spec["text_length"] != encoder.max_length:
            raise ContadError(
                f"text encoder {encoder.source} gives {encoder.dim}-d x {encoder.max_length} tokens but the stored tasks "
                f"use {self.fusion_spec['text_dim']}-d x {self.fusion_spec['text_length']}; use the text.* settings of the run that trained them"
            )
        self.fusion_spec["text_dim"] = encoder.dim
        tokens, mask = encoder.encode([sentence])
        return tokens[0], mask[0]

    # ------------------------------------------------------------------ training
    def fit_task(self, data: TaskData) -> dict[str, Any]:
        """Learn one task: UCAD's key / prompt / knowledge steps with the task's text fusion and Eq. 8."""
        self._check_new(data)
        sentence = task_sentence(self.config.text, data.products or [data.name])
        if self.config.mtrmb.kpmk:
            self._pending_text = self._encode_task_text(sentence)
        try:
            train_log = super().fit_task(data)
        finally:
            self._pending_text = None
        self.texts.append(sentence)
        log.info("mtrmb: task %r text %r (kpmk %s, rscl %s)", data.name, sentence, self.config.mtrmb.kpmk, self.config.mtrmb.rscl)
        return {**train_log, "text": sentence, "kpmk": self.config.mtrmb.kpmk, "rscl": self.config.mtrmb.rscl}

    def _new_prompt(self, task_index: int, backbone: PromptedBackbone | None = None) -> MTRMBPrompt:
        prompt = super()._new_prompt(task_index, backbone)
        if not self.config.mtrmb.train_prompt:  # the backbone prompt stays at its (UCAD) initial values
            prompt.inner.requires_grad_(False)  # type: ignore[attr-defined]
        if self._pending_text is not None and prompt.fusion is not None:
            prompt.fusion.set_text(*(t.to(prompt.fusion.text.device) for t in self._pending_text))
        return prompt  # type: ignore[return-value]

    def _contrastive_loss(self, prompt: TaskPrompt, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                          backbone: PromptedBackbone | None = None) -> torch.Tensor:
        """Eq. 8: w_c L_contra + w_x L_cross + w_kp L_kp on one batch (UCAD's loss alone without KPMK/RSCL)."""
        cfg, ucad = self.config.mtrmb, self.config.ucad
        backbone = backbone or self.backbone
        images = images.to(self.device)
        fused, text = backbone.fused_features(images, prompt)  # type: ignore[attr-defined]
        if cfg.rscl:
            contra = refined_contrastive_loss(fused, labels, cfg.temperature, ucad.pairs_per_image, generator)  # Eqs. 5-6
        else:
            contra = structure_contrastive_loss(fused, labels, ucad.temperature, ucad.pairs_per_image, generator)
        total = contra if cfg.contrastive_weight == 1.0 else cfg.contrastive_weight * contra
        if text is None:
            return total
        total = total + cfg.cross_loss_weight * cross_alignment_loss(fused, text, cfg.cross_temperature)  # Eq. 7
        key = prompt.learnable_key  # type: ignore[attr-defined]
        if key is not None and cfg.key_pull_weight > 0:
            with torch.no_grad():  # q(x): mean frozen key feature (cached: the task key read the same images' features)
                query = self.key_features(images).to(key.device).mean(dim=1)
            total = total + cfg.key_pull_weight * key_pull_loss(query, key)
        return total

    # ------------------------------------------------------------------ state
    def state_meta(self) -> dict[str, Any]:
        return {
            **super().state_meta(),
            "mtrmb": self.config.mtrmb.model_dump(mode="json"),
            "text": {"sentences": list(self.texts), "encoder": self.config.text.checkpoint or self.config.text.name, "fusion": dict(self.fusion_spec)},
        }

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        stored = meta.get("mtrmb") or {}
        if bool(stored.get("kpmk", self.config.mtrmb.kpmk)) != self.config.mtrmb.kpmk:
            raise ContadError(f"state was trained with mtrmb.kpmk={stored['kpmk']}, but the config says {self.config.mtrmb.kpmk}")
        if any(name.endswith("/fusion.text_in.weight") for name in tensors):
            raise ContadError("state holds a full-rank MTRMB text projection (saved before the rank-mtrmb.fusion_dim fusion); retrain the tasks")
        text = meta.get("text") or {}
        if text.get("fusion"):
            self.fusion_spec = dict(text["fusion"])
        super().load_state(tensors, meta)
        self.texts = list(text.get("sentences") or [])
        if len(self.texts) != len(self.tasks):
            raise ContadError(f"state has {len(self.tasks)} tasks but {len(self.texts)} task sentences")
