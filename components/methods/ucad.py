"""UCAD (Liu et al., AAAI 2024): task keys, structure-contrastive prompts, per-task knowledge.

Per task ``t`` the method stores
- a *key*: a k-center-greedy sample of the un-prompted key features of the task's training images;
- a *prompt*: a fresh ``TaskPrompt`` trained with the structure-based contrastive loss on the
  structure label maps (patches of one segment attract, of different segments repel);
- a *knowledge* memory: a k-center-greedy coreset of the prompted patch features, selected on a
  Johnson-Lindenstrauss projection; ``ucad.knowledge_size`` rows when set, else
  ``memory.coreset_ratio`` of the patches, capped so that key + prompt + knowledge fit in the
  per-product ``memory.budget_mb`` (the same budget as a PatchCore bank).

At test time each image is routed, without any task label, to the task whose key is nearest
(one un-prompted pass for all stored tasks), then scored with one prompted pass: the patch scores
are nearest-neighbour distances to that task's knowledge, the image score their maximum
(optionally PatchCore re-weighted), and the anomaly map their bilinearly upsampled, Gaussian
smoothed grid.

Without label maps (``TaskData.label_maps is None``) or with ``ucad.epochs = 0`` (the default,
see benchmarks/RESULTS.md) the prompt is left at its initialisation (training-free prompt) and
only the key and knowledge are learned.

Feature settings per task (``ucad.feature_choices``, e.g. ``[{feature_span: 3, feature_dim: 96}]``): a
task's knowledge can be made of other patch features than ``backbone.*`` says (another pyramid level,
span or channel reduction), chosen per task when it is learned by the rule of ``components/methods/feature_choice.py``
(shared with the PatchCore oracle): every candidate (the backbone's own settings first) gets its own prompt and
knowledge (while prompts are untrained, all candidates' features come from one backbone pass:
``PromptedBackbone.features_of_views``), is scored on the task's held-out training normals and synthetic defects
pasted on them, and replaces the backbone's settings only when its image AUROC there is higher by
``ucad.feature_choice_margin`` or more. The chosen settings (None = the backbone's) are stored per task
(``feature_settings``); routing keys do not depend on them. Scoring, calibration, the anomaly map's patch grid,
feedback (``extend_task``), the ONNX export and the deployed detector all use the task's own features
(``task_backbone``).

Scores are divided by the routed task's mean held-out-normal image score
(``ucad.normalise_scores``), so products are comparable. Test-image features (un-prompted keys,
prompted features per image and prompt) are cached on the backbone and reused across steps.

Stages, each its own method (for methods built on UCAD): ``_build_key``, ``_train_prompt``,
``_build_knowledge``, ``_heldout_stats``; inference: ``route``, ``task_features``,
``score_features``, ``score_scale``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from components.backbones.base import PromptedBackbone, TaskPrompt
from components.config import Config, FeatureChoice
from components.errors import ContadError
from components.methods.base import ContinualMethod
from components.methods.contrastive import structure_contrastive_loss
from components.methods.coreset import coreset, memory_coreset, nbytes
from components.methods.early_stopping import early_stopping, stopping_log
from components.methods.extract import batched, module_device
from components.methods.feature_cache import feature_cache, module_digest
from components.methods.feature_choice import (FeatureViews, choice_defects, choice_report, chosen_index, features_of_views, label, settings_from_meta,
                                               settings_meta, skip_reason, synthetic_auroc)
from components.methods.knn import NearestNeighbours
from components.methods.pruned_scores import leave_one_out_image_scores, unmapped_image_scores
from components.methods.routing import KeyRouter
from components.methods.scoring import anomaly_maps, heldout_score_stats, normalisation_scale, score_patches
from components.progress import progress_bar
from components.segment.grid import downsample_label_map
from components.types import Prediction, TaskData

log = logging.getLogger(__name__)

@dataclass
class KnowledgeFit:
    """One candidate's prompt and knowledge for a task (``choice`` None = the backbone's feature settings)."""

    choice: FeatureChoice | None
    prompt: TaskPrompt
    train_log: dict[str, Any]
    knowledge: torch.Tensor
    owners: torch.Tensor  # (M,) the training image each knowledge row came from
    features: torch.Tensor | None  # (B, N, C) the training images' features, kept until the leave-one-out scores are made
    leave_out: torch.Tensor | None = None  # raw leave-one-out image scores of the training images (the chosen fit only)
    synthetic: dict[str, float] = field(default_factory=dict)  # image AUROC on held-out normals + synthetic defects
    heldout: torch.Tensor | None = None  # raw image scores of the held-out normals, where the choice already made them


class UCAD(ContinualMethod):
    """Unsupervised continual anomaly detection with task-routed prompts and knowledge."""

    name: ClassVar[str] = "ucad"
    choice_key: ClassVar[str] = "ucad.feature_choices"  # the config key of the feature settings a task may choose (named in errors)
    tiles_inputs: ClassVar[bool] = True
    frozen_task_memory: ClassVar[bool] = True

    @classmethod
    def needs_structure_masks(cls, config: Config) -> bool:
        """Structure label maps train the prompts: needed only when ``ucad.epochs`` > 0."""
        return config.ucad.epochs > 0

    def __init__(self, config: Config, backbone: PromptedBackbone) -> None:
        super().__init__(config, backbone)
        self.keys: list[torch.Tensor] = []
        self.prompts: list[TaskPrompt] = []
        self.knowledge: list[torch.Tensor] = []
        self.score_stats: list[dict[str, float]] = []
        self.feature_settings: list[FeatureChoice | None] = []  # per task: its feature settings (None = the backbone's)
        self._router: KeyRouter | None = None
        self._memories: dict[int, NearestNeighbours] = {}
        self.views = FeatureViews(backbone, self.config.ucad.feature_choices, self.choice_key)  # refuses settings up front

    @property
    def device(self) -> torch.device:
        return module_device(self.backbone)

    # ------------------------------------------------------------------ training
    def fit_task(self, data: TaskData) -> dict[str, Any]:
        """Learn the key, prompt and knowledge of one new task from its normal training images."""
        self._check_new(data)
        started = time.perf_counter()
        task_index = len(self.tasks)
        images = data.train.images
        log.info("ucad: task %d %r, %d training images", task_index, data.name, len(images))

        key = self._build_key(data)
        fit, choice = self._fit_knowledge(data, task_index, key)
        self._finish_leave_out(fit, images.shape[-1])
        self._fit_scores = (data.name, fit.leave_out) if fit.leave_out is not None else None  # -> calibration_scores

        self.tasks.append(data.name)
        self.keys.append(key)
        self.prompts.append(fit.prompt)
        self.knowledge.append(fit.knowledge)
        self.feature_settings.append(fit.choice)
        self._router = None
        # the held-out normals' raw scores: the choice made them with the same features and knowledge (identical numbers)
        self.score_stats.append(heldout_score_stats(fit.heldout) if fit.heldout is not None else self._heldout_stats(data, task_index))
        seconds = time.perf_counter() - started
        log.info("ucad: task %r done in %.1fs (key %d, knowledge %d, features %s)", data.name, seconds, len(key), len(fit.knowledge),
                 label(fit.choice))
        return {
            "task": data.name,
            "key_size": int(key.shape[0]),
            "knowledge_size": int(fit.knowledge.shape[0]),
            "memory_bytes": self.task_bytes(task_index),
            "train_images": int(len(images)),
            "seconds": seconds,
            **fit.train_log,
            "features": label(fit.choice),
            **({"feature_choice": choice} if choice else {}),
            "heldout_score_stats": self.score_stats[-1],
        }

    # ------------------------------------------------------------------ feature settings per task
    def _view(self, choice: FeatureChoice | None) -> PromptedBackbone:
        """The backbone with ``choice``'s feature settings (None: ``self.backbone``)."""
        return self.views.view(choice)

    def task_backbone(self, task_index: int) -> PromptedBackbone:
        """The backbone that makes task ``task_index``'s prompted features (its own feature settings)."""
        return self._view(self.feature_settings[task_index])

    def _fit_candidate(self, data: TaskData, key: torch.Tensor, choice: FeatureChoice | None, trained: tuple[TaskPrompt, dict[str, Any]],
                       features: torch.Tensor | None = None) -> KnowledgeFit:
        """The new task's knowledge with ``choice``'s features under its ``trained`` (prompt, log), from the training images'
        ``features`` when given (else extracted here)."""
        prompt, train_log = trained
        reserved = nbytes([key, *prompt.state_dict().values()])
        knowledge, owners, feats = self._build_knowledge(data, prompt, reserved, backbone=self._view(choice), features=features)
        return KnowledgeFit(choice, prompt, train_log, knowledge, owners, feats)

    def _finish_leave_out(self, fit: KnowledgeFit, image_size: int) -> None:
        """The chosen fit's raw leave-one-out image scores of its ``image_size`` px training images (None with
        ``ucad.reweight`` or a single image); its kept features are released. Only the fit a task keeps pays for this search."""
        cfg, feats = self.config.ucad, fit.features
        fit.features = None
        if feats is None or cfg.reweight or feats.shape[0] < 2:
            return
        grid = self._view(fit.choice).grid_size(image_size)
        fit.leave_out = leave_one_out_image_scores(feats, NearestNeighbours(fit.knowledge), fit.knowledge, fit.owners,
                                                   top_k=cfg.image_top_k, grid=grid)

    def _fit_knowledge(self, data: TaskData, task_index: int, key: torch.Tensor) -> tuple[KnowledgeFit, dict[str, Any]]:
        """The new task's prompt and knowledge with the feature settings chosen on its held-out normals + synthetic
        defects (``components/methods/feature_choice.py``), and what the choice measured (empty without choices)."""
        candidates = self.views.candidates
        skipped = skip_reason(len(data.heldout)) if len(candidates) > 1 else None
        if len(candidates) == 1 or skipped:
            if skipped:
                log.info("ucad: task %r has %s: the backbone's features, no choice", data.name, skipped)
            return self._fit_candidate(data, key, None, self._train_prompt(data, task_index)), ({"skipped": skipped} if skipped else {})
        defects = choice_defects(data.heldout, self.config.seed + task_index)
        trained = [self._train_prompt(data, task_index, self._view(choice)) for choice in candidates]
        views = [(self._view(choice), prompt) for choice, (prompt, _) in zip(candidates, trained)]
        # every candidate's features of the training images and the defects, in one network pass where prompts allow
        train_feats = features_of_views(self.backbone, views, data.train.images, self.config.ucad.batch_size, f"{data.name}: knowledge")
        defect_feats = features_of_views(self.backbone, views, defects.images, self.config.ucad.batch_size, f"{data.name}: synthetic defects")
        fits: list[KnowledgeFit] = []
        for i, choice in enumerate(candidates):
            fit = self._fit_candidate(data, key, choice, trained[i], features=train_feats[i])
            train_feats[i] = None  # the fit holds them now (until it can no longer be chosen)
            heldout = self._prompted_features(data.heldout.images, self._view(choice), fit.prompt, choice)  # cached: calibration reuses them
            fit.heldout = self._candidate_scores(fit, heldout, data.heldout.images.shape[-1])
            defect = self._candidate_scores(fit, defect_feats[i], defects.images.shape[-1])
            defect_feats[i] = None
            fit.synthetic = {"image_auroc": synthetic_auroc(fit.heldout, defect)}
            fits.append(fit)
            leader = max(fits[1:], key=lambda f: f.synthetic["image_auroc"], default=None)
            for other in fits[1:]:
                if other is not leader:  # can no longer be chosen: its kept features go
                    other.features = None
            log.info("ucad: task %r features %s: held-out synthetic image AUROC %.4f", data.name, label(choice), fit.synthetic["image_auroc"])
        aurocs = [f.synthetic["image_auroc"] for f in fits]
        margin = self.config.ucad.feature_choice_margin
        chosen = chosen_index(aurocs, margin)
        return fits[chosen], choice_report(candidates, aurocs, chosen, margin, len(data.heldout), len(defects))

    def _candidate_scores(self, fit: KnowledgeFit, feats: torch.Tensor, image_size: int) -> torch.Tensor:
        """Raw image scores of a candidate's prompted features ``feats`` of ``image_size`` px images against its knowledge."""
        grid = self._view(fit.choice).grid_size(image_size)
        return self._image_scores(feats, NearestNeighbours(fit.knowledge), fit.knowledge, grid)

    def _image_scores(self, feats: torch.Tensor, memory: NearestNeighbours, knowledge: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B,) raw image scores of prompted features against ``knowledge``, as ``score_patches`` makes them (no map needed)."""
        return unmapped_image_scores(feats, memory, knowledge, grid, self.config.ucad.reweight, top_k=self.config.ucad.image_top_k)

    def key_features(self, images: torch.Tensor, desc: str | None = None) -> torch.Tensor:
        """(B, N, C) un-prompted key features of ``images`` (on the CPU), through the feature cache: routing, the task key and
        MTRMB's per-batch key pull read the same features of the same image once."""
        bs = self.config.ucad.batch_size
        return feature_cache(self.backbone).features("key", self.backbone.key_features, images, bs, self.device, desc=desc)

    def _build_key(self, data: TaskData) -> torch.Tensor:
        """The task key: a k-center-greedy sample of the un-prompted key features of its training images."""
        cfg = self.config.ucad
        key_feats = self.key_features(data.train.images, desc=f"{data.name}: keys")
        memory = self.config.memory
        return coreset(key_feats.reshape(-1, key_feats.shape[-1]), cfg.key_size, memory.projection_dim, self.config.seed, memory.preselect_factor)

    def _build_knowledge(self, data: TaskData, prompt: TaskPrompt, reserved_bytes: int,
                         backbone: PromptedBackbone | None = None, features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The task knowledge (budgeted coreset of the prompted patch features of its training images, made by
        ``backbone``, default ``self.backbone``, unless given as ``features``), the training image of each knowledge
        row, and the (B, N, C) features it was drawn from (for ``_finish_leave_out``)."""
        cfg, backbone = self.config.ucad, backbone or self.backbone
        feats = features if features is not None else batched(lambda x: backbone.features(x, prompt), data.train.images, cfg.batch_size,
                                                               self.device, desc=f"{data.name}: knowledge")
        flat = feats.reshape(-1, feats.shape[-1])
        index = memory_coreset(flat, self.config.memory, seed=self.config.seed, reserved_bytes=reserved_bytes, size=cfg.knowledge_size)
        return flat[index].contiguous(), index // feats.shape[1], feats

    def extend_task(self, task: str, images: torch.Tensor, share: float = 1.0) -> dict[str, Any]:
        """Operator feedback: append the prompted patch features of normal ``images`` to ``task``'s knowledge: all of
        them (``share`` 1), else the ``share`` of them farthest from the knowledge (the patches that made the images
        score high; each image's score then drops to at most its (1 - share) patch-distance quantile, roughly). Images
        that routing sends to another task also add
        their key features (a coreset of ``ucad.key_size`` rows at most) to ``task``'s key. The prompt, the score
        scale (held-out statistics) and every other task's key, prompt and knowledge stay as they were."""
        self._require_tasks()
        if task not in self.tasks:
            raise ContadError(f"task {task!r} is not learned (tasks: {self.tasks})")
        if len(images) == 0:
            raise ContadError(f"task {task!r}: no feedback images to learn")
        t, cfg, memory = self.tasks.index(task), self.config.ucad, self.config.memory
        backbone = self.task_backbone(t)
        feats = batched(lambda x: backbone.features(x, self.prompts[t]), images, cfg.batch_size, self.device, desc=f"{task}: feedback")
        flat = feats.reshape(-1, feats.shape[-1]).float()
        if share < 1.0:
            novel = self._memory(t).nearest_distance(flat).argsort(descending=True)[: max(1, round(share * len(flat)))]
            flat = flat[novel.sort().values]
        rows = flat
        misrouted = (self.route(images) != t).nonzero().flatten()
        keys_added = 0
        if len(misrouted):
            key_feats = self.key_features(images[misrouted], desc=f"{task}: feedback keys")  # cached: route() just read them
            key_flat = key_feats.reshape(-1, key_feats.shape[-1])
            new_keys = coreset(key_flat, min(cfg.key_size, len(key_flat)), memory.projection_dim, self.config.seed, memory.preselect_factor)
            self.keys[t] = torch.cat([self.keys[t], new_keys.to(self.keys[t])]).contiguous()
            keys_added = int(new_keys.shape[0])
        self.knowledge[t] = torch.cat([self.knowledge[t], rows.to(self.knowledge[t])]).contiguous()
        self._memories.pop(t, None)
        self._router = None
        return {"task": task, "images": int(len(images)), "knowledge_added": int(rows.shape[0]), "knowledge_size": int(self.knowledge[t].shape[0]),
                "keys_added": keys_added, "misrouted": int(len(misrouted)), "memory_bytes": self.task_bytes(t)}

    def task_bytes(self, task_index: int) -> int:
        """Bytes of task ``task_index``'s stored state (key + prompt + knowledge)."""
        return nbytes([self.keys[task_index], self.knowledge[task_index], *self.prompts[task_index].state_dict().values()])

    def _new_prompt(self, task_index: int, backbone: PromptedBackbone | None = None) -> TaskPrompt:
        """A deterministic fresh prompt of ``backbone`` (default ``self.backbone``) for task ``task_index`` (seeded; global RNG untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed + 1000 * (task_index + 1))
            return (backbone or self.backbone).new_prompt().to(self.device)

    def _label_grid(self, label_maps: torch.Tensor, image_size: int, backbone: PromptedBackbone | None = None) -> torch.Tensor:
        """(N, h*w) segment ids on ``backbone``'s (default ``self.backbone``) patch grid (mode downsampling)."""
        grid = (backbone or self.backbone).grid_size(image_size)
        return downsample_label_map(label_maps, grid).reshape(label_maps.shape[0], -1)

    def _contrastive_loss(self, prompt: TaskPrompt, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                          backbone: PromptedBackbone | None = None) -> torch.Tensor:
        feats = (backbone or self.backbone).features(images.to(self.device), prompt)
        cfg = self.config.ucad
        return structure_contrastive_loss(feats, labels, cfg.temperature, cfg.pairs_per_image, generator)

    @torch.no_grad()
    def heldout_loss(self, prompt: TaskPrompt, images: torch.Tensor, labels: torch.Tensor, backbone: PromptedBackbone | None = None) -> float:
        """Contrastive loss of ``prompt`` on held-out normals with a fixed patch sample (comparable across epochs)."""
        generator = torch.Generator().manual_seed(self.config.seed)
        bs = self.config.ucad.batch_size
        total, count = 0.0, 0
        for start in range(0, len(images), bs):
            loss = self._contrastive_loss(prompt, images[start : start + bs], labels[start : start + bs], generator, backbone)
            n = min(bs, len(images) - start)
            total += float(loss) * n
            count += n
        return total / max(count, 1)

    def _train_prompt(self, data: TaskData, task_index: int, backbone: PromptedBackbone | None = None) -> tuple[TaskPrompt, dict[str, Any]]:
        """Train a fresh prompt of ``backbone`` (default ``self.backbone``) with the structure contrastive loss
        (fixed epochs or early stopping)."""
        cfg = self.config.ucad
        backbone = backbone or self.backbone
        prompt = self._new_prompt(task_index, backbone)
        if cfg.epochs == 0:  # training-free prompt by configuration (the default, see benchmarks/RESULTS.md)
            return self._freeze(prompt), {"epoch_losses": [], "heldout_losses": [], "best_epoch": None, "prompt_trained": False}
        if data.label_maps is None:
            log.warning("ucad: task %r has no label maps; using the training-free (initial) prompt", data.name)
            return self._freeze(prompt), {"epoch_losses": [], "heldout_losses": [], "best_epoch": None, "prompt_trained": False}
        images = data.train.images
        if data.label_maps.shape[0] != len(images):
            raise ContadError(f"task {data.name!r}: {data.label_maps.shape[0]} label maps for {len(images)} training images")
        labels = self._label_grid(data.label_maps, images.shape[-1], backbone)
        heldout_count = len(data.heldout) if data.heldout_label_maps is not None else 0
        stopper = early_stopping(prompt, cfg.early_stopping_patience, heldout_count, f"ucad: task {data.name!r} (held-out label maps)", cfg.epochs)
        if stopper is not None:
            heldout_labels = self._label_grid(data.heldout_label_maps, images.shape[-1], backbone)
            stopper.step(0, self.heldout_loss(prompt, data.heldout.images, heldout_labels, backbone))  # the initial prompt is a candidate

        generator = torch.Generator().manual_seed(self.config.seed + task_index)
        params = [p for p in prompt.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=cfg.lr)
        epoch_losses: list[float] = []
        prompt.train()
        for epoch in range(1, cfg.epochs + 1):
            order = torch.randperm(len(images), generator=generator)
            running, seen = 0.0, 0
            for start in progress_bar(range(0, len(images), cfg.batch_size), desc=f"{data.name}: prompt epoch {epoch}", leave=False):
                batch = order[start : start + cfg.batch_size]
                loss = self._contrastive_loss(prompt, images[batch], labels[batch], generator, backbone)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                running += float(loss.detach()) * len(batch)
                seen += len(batch)
            epoch_losses.append(running / seen)
            log.info("ucad: task %r epoch %d contrastive loss %.4f", data.name, epoch, epoch_losses[-1])
            if stopper is None:
                continue
            prompt.eval()
            stop = stopper.step(epoch, self.heldout_loss(prompt, data.heldout.images, heldout_labels, backbone))
            prompt.train()
            if stop:
                log.info("ucad: task %r early stop at epoch %d (best %d)", data.name, epoch, stopper.best_epoch)
                break
        if stopper is not None:
            stopper.restore()
        return self._freeze(prompt), {"epoch_losses": epoch_losses, **stopping_log(stopper, len(epoch_losses)), "prompt_trained": True}

    @staticmethod
    def _freeze(prompt: TaskPrompt) -> TaskPrompt:
        for param in prompt.parameters():
            param.requires_grad_(False)
        return prompt.eval()

    def _heldout_stats(self, data: TaskData, task_index: int) -> dict[str, float]:
        """Image-score statistics of the task's held-out training normals under its own prompt (raw scores)."""
        if len(data.heldout) == 0:
            return {"count": 0}
        images = data.heldout.images
        feats = self.task_features(images, task_index)
        grid = self.task_backbone(task_index).grid_size(images.shape[-1])
        return heldout_score_stats(self._image_scores(feats, self._memory(task_index), self.knowledge[task_index], grid))

    def score_scale(self, task_index: int) -> float:
        """Divisor of task ``task_index``'s scores (``ucad.normalise_scores``; 1.0 when off)."""
        if not self.config.ucad.normalise_scores:
            return 1.0
        return normalisation_scale(self.score_stats[task_index])

    # ------------------------------------------------------------------ inference
    def _memory(self, task_index: int) -> NearestNeighbours:
        if task_index not in self._memories:
            self._memories[task_index] = NearestNeighbours(self.knowledge[task_index])
        return self._memories[task_index]

    def router(self) -> KeyRouter:
        """The key router over all stored tasks (keys stacked once, rebuilt after a new task)."""
        if self._router is None:
            self._router = KeyRouter(self.keys)
        return self._router

    def route(self, images: torch.Tensor) -> torch.Tensor:
        """(B,) routed task index of every image: one un-prompted backbone pass per image (cached across steps)."""
        bs = self.config.ucad.batch_size
        router = self.router()
        return torch.cat([router.route(self.key_features(images[s : s + bs])) for s in range(0, len(images), bs)])

    def task_features(self, images: torch.Tensor, task_index: int) -> torch.Tensor:
        """(B, N, C) features of ``images`` under task ``task_index``'s prompt and feature settings, cached per (image, prompt, settings)."""
        choice = self.feature_settings[task_index]
        return self._prompted_features(images, self._view(choice), self.prompts[task_index], choice)

    def _prompted_features(self, images: torch.Tensor, backbone: PromptedBackbone, prompt: TaskPrompt, choice: FeatureChoice | None) -> torch.Tensor:
        """(B, N, C) features of ``images`` by ``backbone`` (``choice``'s settings) under ``prompt``, through the feature cache."""
        kind = f"features/{module_digest(prompt)}" if choice is None else f"features@{label(choice)}/{module_digest(prompt)}"
        return feature_cache(backbone).features(kind, lambda x: backbone.features(x, prompt), images, self.config.ucad.batch_size, self.device)

    def score_features(self, feats: torch.Tensor, task_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch_scores (B, N), image_scores (B,)) of prompted features against task ``task_index``'s knowledge (raw)."""
        cfg = self.config.ucad
        patch_scores, image_scores, _ = score_patches(feats, self._memory(task_index), self.knowledge[task_index], cfg.reweight, top_k=cfg.image_top_k)
        return patch_scores, image_scores

    def _score_task(self, images: torch.Tensor, task_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch_scores (B, N), image_scores (B,)) of ``images`` under task ``task_index`` (raw scores).

        Features go through the feature cache: the held-out normals scored here for the score
        statistics are scored again by the pipeline's threshold calibration, which then reuses them.
        """
        return self.score_features(self.task_features(images, task_index), task_index)

    def predict(self, images: torch.Tensor, true_tasks: list[str] | None = None, depth: torch.Tensor | None = None) -> Prediction:
        """Route every image to a task (``true_tasks`` is ignored), then score it with that task."""
        self._require_tasks()
        b, _, h, w = images.shape
        routed = self.route(images)
        image_scores = torch.empty(b)
        maps = torch.empty(b, h, w)
        for task_index in routed.unique().tolist():
            members = (routed == task_index).nonzero().flatten()
            patch_scores, scores = self.score_features(self.task_features(images[members], task_index), task_index)
            scale = self.score_scale(task_index)
            image_scores[members] = scores / scale
            grid = self.task_backbone(task_index).grid_size(h)
            maps[members] = anomaly_maps(patch_scores / scale, grid, (h, w), self.config.eval.smoothing_sigma)
        return Prediction(image_scores=image_scores, anomaly_maps=maps, routed_tasks=[self.tasks[i] for i in routed.tolist()])

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for t in range(len(self.tasks)):
            tensors[f"key/{t}"] = self.keys[t]
            tensors[f"knowledge/{t}"] = self.knowledge[t]
            for name, value in self.prompts[t].state_dict().items():
                tensors[f"prompt/{t}/{name}"] = value.detach().cpu()
        return tensors

    def state_meta(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "config": self.config.ucad.model_dump(mode="json"),
            "backbone": self.config.backbone.model_dump(mode="json"),
            "image_size": self.config.data.image_size,
            "key_sizes": [int(k.shape[0]) for k in self.keys],
            "knowledge_sizes": [int(k.shape[0]) for k in self.knowledge],
            "memory_bytes": [self.task_bytes(t) for t in range(len(self.tasks))],
            "score_stats": list(self.score_stats),
            "feature_settings": settings_meta(self.feature_settings),
        }

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        tasks = list(meta["tasks"])
        if meta.get("backbone", {}).get("name", self.config.backbone.name) != self.config.backbone.name:
            raise ValueError(f"state was trained with backbone {meta['backbone']['name']!r}, not {self.config.backbone.name!r}")
        settings = settings_from_meta(meta, len(tasks))
        keys, knowledge, prompts = [], [], []
        for t in range(len(tasks)):
            keys.append(tensors[f"key/{t}"].float().contiguous())
            knowledge.append(tensors[f"knowledge/{t}"].float().contiguous())
            prefix = f"prompt/{t}/"
            prompt = self._new_prompt(t, self._view(settings[t]))
            prompt.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
            prompts.append(self._freeze(prompt.to(self.device)))
        self.tasks, self.keys, self.knowledge, self.prompts, self.feature_settings = tasks, keys, knowledge, prompts, settings
        self.score_stats = list(meta.get("score_stats", [{} for _ in tasks]))
        self._router = None
        self._memories = {}
