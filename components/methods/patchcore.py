"""PatchCore baselines on un-prompted backbone features: finetune, replay, per-task oracle.

- ``PatchCoreFinetune``: one memory bank, refit on each new task's data only (forgets by design).
- ``PatchCoreReplay``: one bank refit on the new task plus a fixed buffer of past training images
  (``patchcore.replay_buffer`` images in total, an equal share per task; part of the saved state).
- ``PatchCoreOracle``: one bank per task, scored with the TRUE task of each image (upper bound). With
  ``patchcore.feature_choices`` each task's bank may take other patch features than ``backbone.*`` says, chosen
  when the task is learned on its held-out normals + synthetic defects by the rule UCAD uses
  (``components/methods/feature_choice.py``), so the oracle stays the per-product bound of a method that chooses.

The banks are k-center-greedy coresets of the patch features, selected on a Johnson-Lindenstrauss
random projection (``memory.projection_dim``): ``patchcore.coreset_size`` rows when set, else
``memory.coreset_ratio`` of the task's patches, capped by the per-product ``memory.budget_mb``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import torch

from components.backbones.base import PromptedBackbone
from components.config import Config, FeatureChoice, MemoryConfig
from components.errors import ContadError
from components.methods.base import ContinualMethod
from components.methods.coreset import coreset_candidates, k_center_greedy, memory_coreset, memory_rows, nbytes
from components.methods.extract import batched, module_device
from components.methods.feature_cache import feature_cache
from components.methods.feature_choice import (FeatureViews, choice_defects, choice_report, chosen_index, features_of_views, label, settings_from_meta,
                                               settings_meta, skip_reason, synthetic_auroc)
from components.methods.knn import NearestNeighbours
from components.methods.pruned_scores import leave_one_out_image_scores, unmapped_image_scores
from components.methods.scoring import anomaly_maps, heldout_score_stats, normalisation_scale, score_patches
from components.types import Prediction, TaskData

log = logging.getLogger(__name__)

# Inference/extraction batch size of the baselines.
BATCH_SIZE = 8


class MemoryBank:
    """A coreset of patch features with the task each row came from, and its nearest-neighbour index."""

    def __init__(self, features: torch.Tensor, origin: torch.Tensor, row_image: torch.Tensor | None = None) -> None:
        self.features = features.float().contiguous()
        self.origin = origin.long().contiguous()
        self.row_image = row_image  # training image of each row (only right after ``fit``; not saved)
        self.index = NearestNeighbours(self.features)

    @classmethod
    def fit(cls, features: torch.Tensor, origin: torch.Tensor, memory: MemoryConfig, size: int | None = None, seed: int = 0) -> MemoryBank:
        """Budgeted coreset of ``features`` (B, N, C) whose image ``i`` came from task ``origin[i]``.

        ``size`` rows when given, else ``memory.coreset_ratio`` of the patches within ``memory.budget_mb``.
        """
        b, n, c = features.shape
        flat_origin = origin.long().repeat_interleave(n)
        index = memory_coreset(features.reshape(b * n, c), memory, seed=seed, size=size)
        return cls(features.reshape(b * n, c)[index], flat_origin[index], index // n)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored rows (features + origin)."""
        return nbytes([self.features, self.origin])

    def score(self, features: torch.Tensor, reweight: bool, num_neighbors: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(patch_scores (B, N), image_scores (B,), majority origin task of the patches' nearest rows (B,))."""
        patch_scores, image_scores, nn_index = score_patches(features, self.index, self.features, reweight, num_neighbors)
        owner = self.origin[nn_index].mode(dim=1).values
        return patch_scores, image_scores, owner


class _PatchCoreBase(ContinualMethod):
    """Shared feature extraction, scoring and map making of the PatchCore baselines."""

    tiles_inputs: ClassVar[bool] = True

    def __init__(self, config: Config, backbone: PromptedBackbone) -> None:
        super().__init__(config, backbone)

    def _features(self, images: torch.Tensor, desc: str | None = None) -> torch.Tensor:
        return batched(self.backbone.features, images, BATCH_SIZE, module_device(self.backbone), desc=desc)

    def _fit_bank(self, feats: torch.Tensor, origin: torch.Tensor) -> MemoryBank:
        """The task's bank: ``patchcore.coreset_size`` rows or the ``memory`` ratio/budget coreset."""
        return MemoryBank.fit(feats, origin, self.config.memory, self.config.patchcore.coreset_size, self.config.seed)

    def _predict_with(self, bank: MemoryBank, images: torch.Tensor, choice: FeatureChoice | None = None,
                      backbone: PromptedBackbone | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image_scores, anomaly_maps, owner task index) of ``images`` against ``bank``, whose features ``backbone``
        (``choice``'s settings; default the backbone's own) makes."""
        _, _, h, w = images.shape
        backbone = backbone or self.backbone
        feats = self._cached_features(images, choice, backbone)
        patch_scores, image_scores, owner = bank.score(feats, self.config.patchcore.reweight, self.config.patchcore.num_neighbors)
        maps = anomaly_maps(patch_scores, backbone.grid_size(h), (h, w), self.config.eval.smoothing_sigma)
        return image_scores, maps, owner

    def _cached_features(self, images: torch.Tensor, choice: FeatureChoice | None, backbone: PromptedBackbone) -> torch.Tensor:
        """(B, N, C) features of ``images`` by ``backbone`` (``choice``'s settings), through the feature cache."""
        kind = "features/none" if choice is None else f"features@{label(choice)}/none"
        return feature_cache(backbone).features(kind, backbone.features, images, BATCH_SIZE, module_device(self.backbone))

    def _bank_meta(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "config": self.config.patchcore.model_dump(mode="json"),
            "backbone": self.config.backbone.model_dump(mode="json"),
            "image_size": self.config.data.image_size,
        }


class PatchCoreFinetune(_PatchCoreBase):
    """One PatchCore bank refit on each new task's data only: it forgets earlier tasks."""

    name: ClassVar[str] = "patchcore_finetune"

    def __init__(self, config: Config, backbone: PromptedBackbone) -> None:
        super().__init__(config, backbone)
        self.bank: MemoryBank | None = None

    def fit_task(self, data: TaskData) -> dict[str, Any]:
        self._check_new(data)
        started = time.perf_counter()
        feats = self._features(data.train.images, desc=f"{data.name}: features")
        origin = torch.full((feats.shape[0],), len(self.tasks))
        self.bank = self._fit_bank(feats, origin)
        self.tasks.append(data.name)
        return {"task": data.name, "bank_size": int(self.bank.features.shape[0]), "memory_bytes": self.bank.nbytes,
                "train_images": len(data.train), "seconds": time.perf_counter() - started}

    def predict(self, images: torch.Tensor, true_tasks: list[str] | None = None, depth: torch.Tensor | None = None) -> Prediction:
        self._require_tasks()
        assert self.bank is not None
        scores, maps, owner = self._predict_with(self.bank, images)
        return Prediction(image_scores=scores, anomaly_maps=maps, routed_tasks=[self.tasks[i] for i in owner.tolist()])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.bank is None:
            return {}
        return {"bank/features": self.bank.features, "bank/origin": self.bank.origin}

    def state_meta(self) -> dict[str, Any]:
        return self._bank_meta()

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.tasks = list(meta["tasks"])
        self.bank = MemoryBank(tensors["bank/features"], tensors["bank/origin"]) if self.tasks else None


class PatchCoreReplay(PatchCoreFinetune):
    """One bank refit on the new task plus a fixed-size buffer of past tasks' training images."""

    name: ClassVar[str] = "patchcore_replay"

    def __init__(self, config: Config, backbone: PromptedBackbone) -> None:
        super().__init__(config, backbone)
        self.buffer_images: list[torch.Tensor] = []  # per task, images in a fixed random order

    def _shares(self, n_tasks: int) -> list[int]:
        """Equal split of ``patchcore.replay_buffer`` images over ``n_tasks`` (earlier tasks get the remainder)."""
        total = self.config.patchcore.replay_buffer
        return [total // n_tasks + (1 if t < total % n_tasks else 0) for t in range(n_tasks)]

    def fit_task(self, data: TaskData) -> dict[str, Any]:
        self._check_new(data)
        started = time.perf_counter()
        task_index = len(self.tasks)
        replay = [imgs for imgs in self.buffer_images if len(imgs)]
        replay_origin = [torch.full((len(imgs),), t) for t, imgs in enumerate(self.buffer_images) if len(imgs)]
        images = torch.cat([data.train.images, *replay])
        origin = torch.cat([torch.full((len(data.train),), task_index), *replay_origin])
        feats = self._features(images, desc=f"{data.name}: features (+{len(images) - len(data.train)} replayed)")
        self.bank = self._fit_bank(feats, origin)
        self.tasks.append(data.name)
        self._update_buffer(data.train.images, task_index)
        return {
            "task": data.name,
            "bank_size": int(self.bank.features.shape[0]),
            "memory_bytes": self.bank.nbytes + sum(int(b.numel() * b.element_size()) for b in self.buffer_images),
            "train_images": len(data.train),
            "replayed_images": len(images) - len(data.train),
            "buffer_sizes": [len(b) for b in self.buffer_images],
            "seconds": time.perf_counter() - started,
        }

    def _update_buffer(self, images: torch.Tensor, task_index: int) -> None:
        """Add a seeded random sample of the new task and shrink old tasks to their equal share."""
        shares = self._shares(task_index + 1)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.config.seed + task_index))
        new = images[order[: shares[-1]]].detach().cpu().float().contiguous()
        self.buffer_images = [imgs[:share].contiguous() for imgs, share in zip(self.buffer_images, shares[:-1], strict=True)] + [new]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = super().state_tensors()
        for t, imgs in enumerate(self.buffer_images):
            tensors[f"buffer/{t}"] = imgs
        return tensors

    def state_meta(self) -> dict[str, Any]:
        return {**super().state_meta(), "buffer_sizes": [len(b) for b in self.buffer_images]}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().load_state(tensors, meta)
        self.buffer_images = [tensors[f"buffer/{t}"] for t in range(len(self.tasks))]


class PatchCoreOracle(_PatchCoreBase):
    """One PatchCore bank per task, each image scored by its TRUE task's bank (upper bound); per-task feature
    settings chosen on held-out normals + synthetic defects with ``patchcore.feature_choices``."""

    name: ClassVar[str] = "patchcore_oracle"
    uses_task_labels: ClassVar[bool] = True
    frozen_task_memory: ClassVar[bool] = True

    def __init__(self, config: Config, backbone: PromptedBackbone) -> None:
        super().__init__(config, backbone)
        self.banks: list[MemoryBank] = []
        self.score_stats: list[dict[str, float]] = []
        self.feature_settings: list[FeatureChoice | None] = []  # per task: its feature settings (None = the backbone's)
        self.views = FeatureViews(backbone, self.config.patchcore.feature_choices, "patchcore.feature_choices")  # refuses settings up front

    def task_backbone(self, task_index: int) -> PromptedBackbone:
        """The backbone that makes task ``task_index``'s patch features (its own feature settings)."""
        return self.views.view(self.feature_settings[task_index])

    def fit_task(self, data: TaskData) -> dict[str, Any]:
        self._check_new(data)
        started = time.perf_counter()
        task_index = len(self.tasks)
        choice, bank, feats, heldout, report = self._chosen_bank(data, task_index)
        view = self.views.view(choice)
        self.banks.append(bank)
        self.tasks.append(data.name)
        self.feature_settings.append(choice)
        self._fit_scores = None
        if not self.config.patchcore.reweight and bank.row_image is not None and len(feats) > 1:  # -> calibration_scores
            grid = view.grid_size(data.train.images.shape[-1])
            scores = leave_one_out_image_scores(feats, bank.index, bank.features, bank.row_image, self.config.patchcore.num_neighbors, grid=grid)
            self._fit_scores = (data.name, scores)
        if heldout is None:
            heldout = self._predict_with(bank, data.heldout.images, choice, view)[0] if len(data.heldout) else torch.empty(0)
        self.score_stats.append(heldout_score_stats(heldout))
        return {"task": data.name, "bank_size": int(bank.features.shape[0]), "memory_bytes": bank.nbytes,
                "train_images": len(data.train), "seconds": time.perf_counter() - started,
                "features": label(choice), **({"feature_choice": report} if report else {})}

    def _chosen_bank(self, data: TaskData, task_index: int
                     ) -> tuple[FeatureChoice | None, MemoryBank, torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """(feature settings, bank, training features, raw held-out normal scores where the choice made them) of the new
        task, chosen as ``components/methods/feature_choice.py`` says, and what the choice measured (empty without choices)."""
        candidates = self.views.candidates
        origin = torch.full((len(data.train),), task_index)
        skipped = skip_reason(len(data.heldout)) if len(candidates) > 1 else None
        if len(candidates) == 1 or skipped:
            if skipped:
                log.info("%s: task %r has %s: the backbone's features, no choice", self.name, data.name, skipped)
            feats = self._features(data.train.images, desc=f"{data.name}: features")
            return None, self._fit_bank(feats, origin), feats, None, ({"skipped": skipped} if skipped else {})
        defects = choice_defects(data.heldout, self.config.seed + task_index)
        views = [(self.views.view(choice), None) for choice in candidates]
        train = features_of_views(self.backbone, views, data.train.images, BATCH_SIZE, f"{data.name}: features")
        defect_feats = features_of_views(self.backbone, views, defects.images, BATCH_SIZE, f"{data.name}: synthetic defects")
        fits, normals, aurocs = [], [], []
        cfg = self.config.patchcore
        for i, choice in enumerate(candidates):
            bank, view = self._fit_bank(train[i], origin), views[i][0]
            heldout = self._cached_features(data.heldout.images, choice, view)  # cached: calibration's predict reuses them
            normal = self._image_scores(bank, heldout, view.grid_size(data.heldout.images.shape[-1]))  # the kept one's: the statistics
            defect = self._image_scores(bank, defect_feats[i], view.grid_size(defects.images.shape[-1]))
            aurocs.append(synthetic_auroc(normal, defect))
            fits.append(bank)
            normals.append(normal)
            log.info("%s: task %r features %s: held-out synthetic image AUROC %.4f", self.name, data.name, label(choice), aurocs[-1])
        chosen = chosen_index(aurocs, cfg.feature_choice_margin)
        report = choice_report(candidates, aurocs, chosen, cfg.feature_choice_margin, len(data.heldout), len(defects))
        return candidates[chosen], fits[chosen], train[chosen], normals[chosen], report

    def _image_scores(self, bank: MemoryBank, feats: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B,) raw image scores of ``feats`` against ``bank``, as ``predict`` makes them (no map needed)."""
        cfg = self.config.patchcore
        return unmapped_image_scores(feats, bank.index, bank.features, grid, cfg.reweight, cfg.num_neighbors)

    def predict(self, images: torch.Tensor, true_tasks: list[str] | None = None, depth: torch.Tensor | None = None) -> Prediction:
        """Score each image with the bank of its true task (``true_tasks`` is required)."""
        self._require_tasks()
        if true_tasks is None or len(true_tasks) != images.shape[0]:
            raise ContadError(f"{self.name} needs the true task of every image (got {None if true_tasks is None else len(true_tasks)} for {images.shape[0]} images)")
        unknown = sorted(set(true_tasks) - set(self.tasks))
        if unknown:
            raise ContadError(f"{self.name}: tasks {unknown} were never learned (learned: {self.tasks})")
        b, _, h, w = images.shape
        image_scores, maps = torch.empty(b), torch.empty(b, h, w)
        for task in sorted(set(true_tasks)):
            members = torch.tensor([i for i, t in enumerate(true_tasks) if t == task])
            task_index = self.tasks.index(task)
            choice = self.feature_settings[task_index]
            scores, task_maps, _ = self._predict_with(self.banks[task_index], images[members], choice, self.views.view(choice))
            scale = self.score_scale(task_index)
            image_scores[members], maps[members] = scores / scale, task_maps / scale
        return Prediction(image_scores=image_scores, anomaly_maps=maps, routed_tasks=list(true_tasks))

    def score_scale(self, task_index: int) -> float:
        """Divisor of task ``task_index``'s scores and maps (``patchcore.normalise_scores``; 1.0 when off)."""
        if not self.config.patchcore.normalise_scores:
            return 1.0
        return normalisation_scale(self.score_stats[task_index])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"bank/{t}/features": bank.features for t, bank in enumerate(self.banks)}

    def state_meta(self) -> dict[str, Any]:
        return {**self._bank_meta(), "score_stats": list(self.score_stats), "memory_bytes": [bank.nbytes for bank in self.banks],
                "feature_settings": settings_meta(self.feature_settings)}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.tasks = list(meta["tasks"])
        self.feature_settings = settings_from_meta(meta, len(self.tasks))
        for choice in self.feature_settings:
            self.views.view(choice)  # settings this backbone cannot take fail here, naming patchcore.feature_choices
        self.banks = [MemoryBank(tensors[f"bank/{t}/features"], torch.full((tensors[f"bank/{t}/features"].shape[0],), t)) for t in range(len(self.tasks))]
        self.score_stats = list(meta.get("score_stats", [{"count": 0} for _ in self.tasks]))


class PatchCoreJoint(PatchCoreFinetune):
    """One bank re-selected at every step from the training patches of EVERY task seen so far (no task label).

    Joint training at the oracle's memory: after task t the bank is one k-center coreset, of the sum of
    the tasks' coreset sizes (each ``memory.coreset_ratio`` / ``patchcore.coreset_size`` within
    ``memory.budget_mb``, so t x the per-product budget), over the union of all tasks' patches. Shared
    structure is stored once and the budget goes where the union is most diverse, which a per-task
    bank (the oracle's) cannot do. To re-select without keeping every patch (1.3 M rows on the real
    sequence), each task keeps the candidates of the coreset's composable first stage
    (``coreset_candidates``: ``memory.preselect_factor`` x its coreset size); the final greedy runs over
    their union. They are part of the saved state: what re-training jointly costs.
    """

    name: ClassVar[str] = "patchcore_joint"

    def __init__(self, config: Config, backbone: PromptedBackbone) -> None:
        super().__init__(config, backbone)
        self.candidates: list[torch.Tensor] = []  # per task, its coreset candidates (rows, C)
        self.task_rows: list[int] = []  # per task, its coreset size

    def fit_task(self, data: TaskData) -> dict[str, Any]:
        self._check_new(data)
        started = time.perf_counter()
        feats = self._features(data.train.images, desc=f"{data.name}: features")
        self._keep_candidates(feats.flatten(0, 1))
        self.tasks.append(data.name)
        self.bank = self._joint_bank()
        return {"task": data.name, "bank_size": int(self.bank.features.shape[0]), "bank_bytes": self.bank.nbytes,
                "memory_bytes": self.bank.nbytes + nbytes(self.candidates), "candidate_rows": [len(rows) for rows in self.candidates],
                "train_images": len(data.train), "seconds": time.perf_counter() - started}

    def _keep_candidates(self, rows: torch.Tensor) -> None:
        """Append one task's coreset size and the candidates of its coreset's first stage, from its patches ``rows`` (N, C)."""
        memory = self.config.memory
        k = memory_rows(rows.shape[0], rows.shape[1], memory, size=self.config.patchcore.coreset_size)
        picked = coreset_candidates(rows, k, memory.projection_dim, self.config.seed, memory.preselect_factor)
        self.candidates.append(rows[picked].float().contiguous())
        self.task_rows.append(k)

    def _joint_bank(self) -> MemoryBank:
        """The coreset of ``sum(task_rows)`` rows over every task's candidates (the first task's first row first)."""
        union = torch.cat(self.candidates)
        origin = torch.cat([torch.full((len(rows),), t, dtype=torch.long) for t, rows in enumerate(self.candidates)])
        memory = self.config.memory
        index = k_center_greedy(union, sum(self.task_rows), projection_dim=memory.projection_dim, seed=self.config.seed,
                                preselect_factor=memory.preselect_factor)
        return MemoryBank(union[index], origin[index])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().state_tensors(), **{f"candidates/{t}": rows for t, rows in enumerate(self.candidates)}}

    def state_meta(self) -> dict[str, Any]:
        return {**super().state_meta(), "task_rows": list(self.task_rows)}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().load_state(tensors, meta)
        if "task_rows" not in meta and self.bank is not None:
            self._from_store_everything()
            return
        self.candidates = [tensors[f"candidates/{t}"] for t in range(len(self.tasks))]
        self.task_rows = [int(k) for k in meta.get("task_rows", [])]  # an earlier state of no task has none

    def _from_store_everything(self) -> None:
        """A state of the earlier joint (a bank of EVERY training patch, no candidates): it keeps scoring with
        that bank, and each task's candidates are derived from its stored patches exactly as ``fit_task`` keeps
        them (same rows, same order), so a further task re-selects as if it had been trained by this code."""
        assert self.bank is not None
        log.warning("patchcore_joint: a state of the earlier store-everything joint (%d rows); it scores with that bank, "
                    "and a further task re-selects one bounded bank", self.bank.features.shape[0])
        self.candidates, self.task_rows = [], []
        for t in range(len(self.tasks)):
            self._keep_candidates(self.bank.features[self.bank.origin == t])
