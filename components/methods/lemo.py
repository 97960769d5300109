"""LeMO (Gao et al., "Learning Memory for Online Anomaly Detection"), made continual and streamable.

The network and loss live in ``components/methods/lemo_net.py``; this module is the continual logic.

Per image (batch 1, one pass, one Adam step; ``lemo.*`` config):
1. one frozen backbone pass gives the multi-stage patch features (B, N, C) (EfficientNet-Lite0:
   stride-8 and stride-16 stages concatenated);
2. the task's adapter (CoordConv + 1x1 convolution) embeds them as z (N, D);
3. AnoNCE (Eq. 2) pulls every patch towards its ``positives`` nearest prototypes and away from the
   next ``negatives`` ones; the gradient trains the adapter and (``memory_update=learned`` or
   ``feature_enhanced``) the K prototypes; ``frozen`` keeps the QR prototypes fixed;
   ``feature_enhanced`` adds the ODC-style re-clustering/balancing step after each update.
Design decisions (the paper leaves them open or they fail at our scale): prototypes start as k-means of
the task's first image by default (``lemo.prototype_init=qr`` is the paper's "decoupled noise"; with
Adam at lr 1e-3 a prototype moves about lr * sqrt(D) per step, so noise prototypes cannot reach the
feature distribution within a 25-image stream); the adapter starts as the identity and embeddings are
L2-normalised (the scale of the unit-norm prototypes); D = feature dim; tau = 0.1; 3 positives and
3 negatives (CFA).
Scores: patch score = softmin weight of the nearest prototype x distance to it; the anomaly map is
the patch grid upsampled bilinearly and Gaussian smoothed (``eval.smoothing_sigma``); the image
score is the maximum of the map. The fit log reports how the held-out patches spread over the
prototypes and warns when one takes more than ``COLLAPSE_SHARE`` of them: on a texture the adapter
collapses the memory onto one or two prototypes and the scores separate little (grid is at chance:
benchmarks/RESULTS.md, the LeMO card).

Continual use (our design; the paper trains one model per class):
- Default: every task gets its own adapter, prototypes and Adam state, and a *key*: a k-center
  sample (``lemo.key_size``) of its 2x2-average-pooled frozen features, grown online (the pooled
  patches of every ``lemo.key_update_every`` learned images are merged into the key and the
  k-center sample is re-drawn; the queue is part of the saved state). At test
  time an image is routed by itself to the task with the nearest key (``KeyRouter``), using the
  same backbone pass that feeds the adapter, so routing costs no extra forward. Old tasks are never
  touched by later ones: no forgetting by construction unless routing fails.
- ``lemo.shared_adapter=true``: one adapter for all tasks (continues training on every new task,
  with a fresh Adam state per task); prototypes and keys stay per task. Earlier tasks' prototypes
  no longer match the drifted adapter: the accuracy matrix exposes this forgetting.
Streaming (``flows/stream.py``): ``add_task`` opens a task, ``frozen_features`` / ``score_features``
/ ``learn_features`` score and then learn one image at a time; the Adam moments are part of the
saved state, so a stream resumed from a checkpoint continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from components.backbones.base import PromptedBackbone
from components.config import Config
from components.errors import ContadError
from components.methods.base import ContinualMethod, StreamScore
from components.methods.coreset import coreset
from components.methods.extract import batched, module_device
from components.methods.lemo_net import LeMOAdapter, anonce_loss, enhance_prototypes, kmeans_prototypes, prototype_scores, prototype_shares, qr_prototypes
from components.methods.routing import KeyRouter
from components.methods.scoring import anomaly_maps
from components.progress import progress_bar
from components.types import Prediction, TaskData

log = logging.getLogger(__name__)

ADAM_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")
COLLAPSE_SHARE = 0.5  # one prototype taking more than this share of the held-out patches: warn (memory collapse)


class LeMO(ContinualMethod):
    """Online prototype memory with a learned adapter; one adapter + memory per task, key-routed."""

    name: ClassVar[str] = "lemo"
    learns_online: ClassVar[bool] = True

    def __init__(self, config: Config, backbone: PromptedBackbone) -> None:
        super().__init__(config, backbone)
        cfg = config.lemo
        if cfg.prototype_init == "qr" and cfg.prototypes > self.embed_dim:
            raise ContadError(f"lemo.prototypes={cfg.prototypes} exceeds the embedding dim {self.embed_dim} (lemo.adapter_dim, else the "
                              f"backbone's feature dim): lemo.prototype_init=qr draws orthonormal prototypes and needs at most that many "
                              "(lemo.prototype_init=kmeans has no such limit)")
        patches = math.prod(backbone.grid_size(config.data.image_size))
        if cfg.prototype_init == "kmeans" and cfg.prototypes > patches:
            raise ContadError(f"lemo.prototypes={cfg.prototypes} exceeds the {patches} patches of one image at data.image_size="
                              f"{config.data.image_size}: lemo.prototype_init=kmeans takes the first image's patch centres")
        self._reset()

    def _reset(self) -> None:
        """Forget every task (used before rebuilding a saved state)."""
        self.tasks = []
        self.keys: list[torch.Tensor] = []  # per task (K_t, C); empty until the task learned an image
        self.pending_keys: list[torch.Tensor] = []  # per task: pooled patches not yet merged into the key
        self.adapters: list[LeMOAdapter] = []  # per task, or a single one with shared_adapter
        self.prototypes: list[torch.nn.Parameter] = []  # per task (K, D)
        self.usage: list[torch.Tensor] = []  # per task (K,) assignment shares (feature_enhanced)
        self.optimizers: list[torch.optim.Adam] = []
        self.images_learned_per_task: list[int] = []
        self.prototypes_ready: list[bool] = []  # False until k-means init saw the first image
        self.score_stats: list[dict[str, float]] = []
        self._router: KeyRouter | None = None

    @property
    def device(self) -> torch.device:
        return module_device(self.backbone)

    @property
    def embed_dim(self) -> int:
        return self.config.lemo.adapter_dim or self.backbone.feature_dim

    # ------------------------------------------------------------------ tasks
    def _generator(self, task_index: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed + 1000 * (task_index + 1))

    def adapter_of(self, task_index: int) -> LeMOAdapter:
        return self.adapters[0 if self.config.lemo.shared_adapter else task_index]

    def add_task(self, name: str) -> int:
        """Open a new, empty task (fresh adapter unless shared, QR prototypes or a k-means placeholder, empty key); returns its index."""
        if name in self.tasks:
            raise ContadError(f"task {name!r} is already learned (tasks: {self.tasks})")
        cfg = self.config.lemo
        t = len(self.tasks)
        generator = self._generator(t)
        if not cfg.shared_adapter or not self.adapters:
            self.adapters.append(LeMOAdapter(self.backbone.feature_dim, self.embed_dim, cfg.adapter_init, generator).to(self.device))
        learn_memory = cfg.memory_update != "frozen"
        # k-means init replaces these by the first image's centres; until then (a stream scores an image before
        # learning it) they are the paper's QR noise, or zeros where K > D leaves no orthonormal set
        initial = (qr_prototypes(cfg.prototypes, self.embed_dim, generator) if cfg.prototypes <= self.embed_dim
                   else torch.zeros(cfg.prototypes, self.embed_dim))
        prototypes = torch.nn.Parameter(initial.to(self.device), requires_grad=learn_memory)
        self.tasks.append(name)
        self.prototypes.append(prototypes)
        self.usage.append(torch.full((cfg.prototypes,), 1.0 / cfg.prototypes))
        self.keys.append(torch.empty(0, self.backbone.feature_dim))
        self.pending_keys.append(torch.empty(0, self.backbone.feature_dim))
        self.images_learned_per_task.append(0)
        self.prototypes_ready.append(cfg.prototype_init == "qr")
        self.score_stats.append({})
        self.optimizers.append(self._new_optimizer(t))
        self._router = None
        return t

    def _new_optimizer(self, task_index: int) -> torch.optim.Adam:
        cfg = self.config.lemo
        params = list(self.adapter_of(task_index).parameters())
        if cfg.memory_update != "frozen":
            params.append(self.prototypes[task_index])
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    # ------------------------------------------------------------------ per image
    @torch.no_grad()
    def frozen_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, C) frozen multi-stage patch features (the only backbone pass LeMO needs)."""
        return self.backbone.features(images.to(self.device)).float()

    def _grid(self, n_patches: int) -> tuple[int, int]:
        grid = self.backbone.grid_size(self.config.data.image_size)
        if grid[0] * grid[1] != n_patches:
            raise ContadError(f"lemo: {n_patches} patches do not match the backbone grid {grid} at data.image_size={self.config.data.image_size}")
        return grid

    def key_features(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, N', C) routing features: the patch features average-pooled 2x2 on their grid."""
        b, n, c = feats.shape
        grid = self._grid(n)
        x = feats.transpose(1, 2).reshape(b, c, *grid)
        pooled = F.adaptive_avg_pool2d(x, ((grid[0] + 1) // 2, (grid[1] + 1) // 2))
        return pooled.flatten(2).transpose(1, 2).cpu()

    def learn_features(self, feats: torch.Tensor, task_index: int) -> float:
        """One online update of task ``task_index`` on one image's features (1, N, C); returns the AnoNCE loss."""
        cfg = self.config.lemo
        if feats.shape[0] != 1:
            raise ValueError(f"lemo learns one image at a time (batch 1), got a batch of {feats.shape[0]}")
        adapter, prototypes = self.adapter_of(task_index), self.prototypes[task_index]
        grid = self._grid(feats.shape[1])
        if not self.prototypes_ready[task_index]:
            with torch.no_grad():
                z0 = adapter(feats.to(self.device), grid)[0]
                prototypes.copy_(kmeans_prototypes(z0.cpu(), cfg.prototypes, self._generator(task_index)).to(self.device))
            self.prototypes_ready[task_index] = True
        self._grow_key(task_index, self.key_features(feats)[0])
        adapter.train()
        z = adapter(feats.to(self.device), grid)
        loss = anonce_loss(z, prototypes, cfg.positives, cfg.negatives, cfg.margin, cfg.temperature)
        optimizer = self.optimizers[task_index]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        adapter.eval()
        if cfg.memory_update == "feature_enhanced":
            enhance_prototypes(prototypes.data, self.usage[task_index], z.detach()[0], cfg.feature_momentum, cfg.min_usage)
        self.images_learned_per_task[task_index] += 1
        return float(loss.detach())

    def _grow_key(self, task_index: int, pooled: torch.Tensor) -> None:
        """Queue one image's pooled patches; every ``lemo.key_update_every`` images (and on the first) re-draw the k-center key."""
        pending = torch.cat([self.pending_keys[task_index], pooled])
        images_pending = pending.shape[0] // pooled.shape[0]
        if len(self.keys[task_index]) and images_pending < self.config.lemo.key_update_every:
            self.pending_keys[task_index] = pending
            return
        self.flush_key(task_index, pending)

    def flush_key(self, task_index: int, pending: torch.Tensor | None = None) -> None:
        """Merge the queued patches of task ``task_index`` into its key (k-center greedy, ``lemo.key_size``)."""
        pending = self.pending_keys[task_index] if pending is None else pending
        if len(pending):
            self.keys[task_index] = coreset(torch.cat([self.keys[task_index], pending]), self.config.lemo.key_size)
        self.pending_keys[task_index] = pending[:0]
        self._router = None

    @torch.no_grad()
    def patch_scores(self, feats: torch.Tensor, task_index: int) -> torch.Tensor:
        """(B, N) patch scores of features (B, N, C) under task ``task_index``."""
        z = self.adapter_of(task_index)(feats.to(self.device), self._grid(feats.shape[1]))
        return prototype_scores(z, self.prototypes[task_index].detach()).float().cpu()

    def score_features(self, feats: torch.Tensor, task_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image_scores (B,), anomaly_maps (B, S, S)) at ``data.image_size``; image score = map maximum."""
        size = self.config.data.image_size
        maps = anomaly_maps(self.patch_scores(feats, task_index), self._grid(feats.shape[1]), (size, size), self.config.eval.smoothing_sigma)
        return maps.flatten(1).max(dim=1).values, maps

    def route_features(self, feats: torch.Tensor) -> torch.Tensor:
        """(B,) task index of the nearest key for every image (tasks without a key are skipped)."""
        keyed = [t for t, key in enumerate(self.keys) if len(key)]
        if not keyed:
            raise ContadError("lemo: no task has learned an image yet; nothing to route to")
        if self._router is None:
            self._router = KeyRouter([self.keys[t] for t in keyed])
        return torch.tensor(keyed)[self._router.route(self.key_features(feats))]

    # ------------------------------------------------------------------ ContinualMethod
    def fit_task(self, data: TaskData) -> dict[str, Any]:
        """One online pass (batch 1, training images in a seeded random order) over a new task."""
        if len(data.train) == 0:
            raise ContadError(f"task {data.name!r} has no training images")
        started = time.perf_counter()
        t = self.add_task(data.name)
        images = data.train.images
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.config.seed + t))
        losses = []
        for i in progress_bar(order.tolist(), desc=f"{data.name}: lemo online pass", leave=False):
            losses.append(self.learn_features(self.frozen_features(images[i : i + 1]), t))
        self.flush_key(t)
        self.score_stats[t] = self._heldout_stats(data, t)
        seconds = time.perf_counter() - started
        log.info("lemo: task %r learned from %d images in %.1fs (AnoNCE %.4f -> %.4f)", data.name, len(images), seconds, losses[0], losses[-1])
        quarter = max(1, len(losses) // 4)
        return {
            "task": data.name,
            "train_images": len(images),
            "key_size": int(self.keys[t].shape[0]),
            "loss_first_quarter": sum(losses[:quarter]) / quarter,
            "loss_last_quarter": sum(losses[-quarter:]) / quarter,
            "seconds": seconds,
            "heldout_score_stats": self.score_stats[t],
        }

    def _heldout_stats(self, data: TaskData, task_index: int) -> dict[str, float]:
        if len(data.heldout) == 0:
            return {"count": 0}
        feats = batched(self.frozen_features, data.heldout.images, self.config.lemo.batch_size, self.device)
        scores = self.score_features(feats, task_index)[0]
        shares = self.prototype_usage(feats, task_index)
        if float(shares[0]) > COLLAPSE_SHARE:
            log.warning("lemo: task %r: one of %d prototypes takes %.0f%% of the held-out patches (memory collapse): "
                        "its scores may separate nothing (benchmarks/RESULTS.md, issue 32)", self.tasks[task_index], len(shares), 100 * float(shares[0]))
        return {"count": len(scores), "mean": float(scores.mean()), "std": float(scores.std()) if len(scores) > 1 else 0.0, "max": float(scores.max()),
                "prototype_top_share": float(shares[0]), "prototypes_in_use": int((shares > 0).sum())}

    @torch.no_grad()
    def prototype_usage(self, feats: torch.Tensor, task_index: int) -> torch.Tensor:
        """(K,) share of the patches of features (B, N, C) nearest to each prototype of task ``task_index``, most used first."""
        z = self.adapter_of(task_index)(feats.to(self.device), self._grid(feats.shape[1]))
        return prototype_shares(z, self.prototypes[task_index].detach()).cpu()

    def predict(self, images: torch.Tensor, true_tasks: list[str] | None = None, depth: torch.Tensor | None = None) -> Prediction:
        """Route every image by itself (``true_tasks`` is ignored) and score it with its task."""
        self._require_tasks()
        b, _, h, w = images.shape
        if h != self.config.data.image_size or w != h:
            raise ContadError(f"lemo: images are {h}x{w}, expected {self.config.data.image_size} square (data.image_size)")
        feats = batched(self.frozen_features, images, self.config.lemo.batch_size, self.device)
        routed = self.route_features(feats)
        scores, maps = torch.empty(b), torch.empty(b, h, w)
        for t in routed.unique().tolist():
            members = (routed == t).nonzero().flatten()
            scores[members], maps[members] = self.score_features(feats[members], t)
        return Prediction(image_scores=scores, anomaly_maps=maps, routed_tasks=[self.tasks[t] for t in routed.tolist()])

    # ------------------------------------------------------------------ streaming protocol
    def stream_task(self, task: str) -> None:
        if task not in self.tasks:
            self.add_task(task)

    def score_one(self, image: torch.Tensor, task: str) -> StreamScore:
        feats = self.frozen_features(image)
        score = float(self.score_features(feats, self.tasks.index(task))[0][0])
        try:
            routed: str | None = self.tasks[int(self.route_features(feats)[0])]
        except ContadError:  # no task has a key yet
            routed = None
        return StreamScore(score, routed, feats)

    def learn_one(self, scored: StreamScore, task: str) -> float | None:
        return self.learn_features(scored.handle, self.tasks.index(task))

    def images_learned(self, task: str) -> int:
        return self.images_learned_per_task[self.tasks.index(task)]

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for a, adapter in enumerate(self.adapters):
            for name, value in adapter.state_dict().items():
                tensors[f"adapter/{a}/{name}"] = value.detach().cpu()
        for t in range(len(self.tasks)):
            tensors[f"key/{t}"] = self.keys[t]
            tensors[f"pending_key/{t}"] = self.pending_keys[t]
            tensors[f"prototypes/{t}"] = self.prototypes[t].detach().cpu()
            tensors[f"usage/{t}"] = self.usage[t]
            for p, state in self.optimizers[t].state_dict()["state"].items():
                for name in ADAM_STATE_KEYS:
                    if name in state:
                        tensors[f"adam/{t}/{p}/{name}"] = torch.as_tensor(state[name]).detach().cpu().float()
        return tensors

    def state_meta(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "config": self.config.lemo.model_dump(mode="json"),
            "backbone": self.config.backbone.model_dump(mode="json"),
            "image_size": self.config.data.image_size,
            "images_learned": list(self.images_learned_per_task),
            "prototypes_ready": list(self.prototypes_ready),
            "score_stats": list(self.score_stats),
        }

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        saved = meta.get("config", {})
        for key in ("shared_adapter", "memory_update", "prototypes", "adapter_dim"):
            if key in saved and saved[key] != getattr(self.config.lemo, key):
                raise ValueError(f"state was trained with lemo.{key}={saved[key]!r}, config has {getattr(self.config.lemo, key)!r}")
        if meta.get("backbone", {}).get("name", self.config.backbone.name) != self.config.backbone.name:
            raise ValueError(f"state was trained with backbone {meta['backbone']['name']!r}, not {self.config.backbone.name!r}")
        self._reset()
        for name in meta["tasks"]:
            self.add_task(name)
        for a, adapter in enumerate(self.adapters):
            prefix = f"adapter/{a}/"
            adapter.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
        for t in range(len(self.tasks)):
            self.keys[t] = tensors[f"key/{t}"].float().contiguous()
            self.pending_keys[t] = tensors[f"pending_key/{t}"].float().contiguous()
            with torch.no_grad():
                self.prototypes[t].copy_(tensors[f"prototypes/{t}"])
            self.usage[t] = tensors[f"usage/{t}"].float().clone()
            self._load_adam(t, tensors)
        self.images_learned_per_task = [int(n) for n in meta["images_learned"]]
        self.prototypes_ready = [bool(r) for r in meta["prototypes_ready"]]
        self.score_stats = list(meta.get("score_stats", [{} for _ in self.tasks]))
        self._router = None

    def _load_adam(self, task_index: int, tensors: dict[str, torch.Tensor]) -> None:
        optimizer = self.optimizers[task_index]
        state_dict = optimizer.state_dict()
        prefix = f"adam/{task_index}/"
        for key, value in tensors.items():
            if key.startswith(prefix):
                p, name = key[len(prefix) :].split("/")
                entry = state_dict["state"].setdefault(int(p), {})
                entry[name] = value.clone() if name != "step" else value.reshape(()).clone()
        optimizer.load_state_dict(state_dict)
