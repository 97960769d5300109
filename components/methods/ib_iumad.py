"""IB-IUMAD (incremental unified multimodal AD with an information bottleneck): RGB + depth, one model.

Network: ``components/methods/ib_iumad_net`` (paper: ../shared/papers/ib-iumad.txt; note with every gap:
../shared/methods/ib-iumad.md). Per step (a task = one or several products):
- frozen multi-stage CNN features of the RGB image and of the xyz point cloud turned into a
  normalised 3-channel image (``xyz_to_image``: height above the fitted background plane and its
  slopes), each computed once per image and cached; with ``standardise`` every modality's tokens are
  standardised per channel with the FIRST task's training statistics (frozen afterwards): the
  reconstruction targets start near the network's initial output, so a few hundred CPU steps suffice;
- per modality a Mamba decoder (Eq. 2, ES2D scan) conditions the encoder of that modality's
  reconstruction transformer and feeds a product classifier whose head grows with the products;
- IB fusion of the branches' middle/last decoder latents (Eqs. 4-5) -> F^g at the target features
  (RGB, or depth when ``modalities=depth``);
- loss (Eq. 10): ce * (CE_RGB + CE_Depth) + fusion * L_Fusion (Eq. 9) + ib * KL (Eq. 8) + anchor * CE(P(Y|F_fu))
  + recon * sum of branch reconstruction losses (the MRN target; ``recon_weight=0`` = paper only);
- ``update_strategy=projected``: IUF's projected update (Eqs. 10-12) + retention (Eq. 9) on later steps;
- ``early_stopping_patience`` > 0: ``epochs`` is the maximum; after every epoch the score-map losses
  (fusion * Eq. 9 + recon * branch reconstruction, clean inputs) on the task's held-out normal TRAINING
  images decide, and the best epoch's weights are kept (``components/methods/early_stopping``, shared with IUF).

Score: map = channel L2 norm of F^g - F_org on the grid (``score=fused``, the paper's), or that plus
every branch's reconstruction error (``fused+branches``), each standardised on the task's held-out
normal TRAINING images (never test data): ``score_calibration=images`` with the mean and std of those
images' image-level scores of that map (max of its pooled map: the scale that decides OK/NG),
``cells`` with the mean and std of the map's cells; then the cell-wise max (``combine=max``, so a
defect seen by one modality only is not diluted by the other modality's maps) or the sum; bilinear
upsampling (+ Gaussian smoothing); image score = max of the ``score_pool`` average-pooled unsmoothed
map. No product label at test time: the fused product head only names the routed task (reported,
never used for scoring).
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from components.backbones.base import PromptedBackbone
from components.config import Config
from components.errors import ContadError
from components.methods.base import ContinualMethod
from components.methods.early_stopping import EarlyStopping, early_stopping
from components.methods.ib_iumad_net.depth_image import xyz_to_image
from components.methods.ib_iumad_net.fusion import fusion_loss, ib_loss
from components.methods.ib_iumad_net.network import IBIUMADNetwork, NetworkOutput
from components.methods.iuf_network import ActivationSpan, input_activations, linear_layers, projected_step, retain_
from components.methods.reconstruction import (
    build_feature_extractor,
    cached_features,
    channel_stats,
    error_maps,
    feature_jitter,
    pooled_max_scores,
    standardise,
    to_tokens,
    upsample_maps,
)
from components.methods.training_loop import train_epochs
from components.types import ImageBatch, Prediction, TaskData

log = logging.getLogger(__name__)

FUSED = "fused"


class IBIUMAD(ContinualMethod):
    """One RGB + depth reconstruction model for every product seen so far."""

    name: ClassVar[str] = "ib_iumad"
    uses_depth: ClassVar[bool] = True

    def __init__(self, config: Config, backbone: PromptedBackbone) -> None:
        super().__init__(config, backbone)
        self.modalities = config.ib_iumad.modalities.split("+")
        self.target = "rgb" if "rgb" in self.modalities else "depth"
        self.extractor = build_feature_extractor(config.reconstruction, config.backbone, backbone)
        self.device = next(self.extractor.net.parameters()).device
        self.grid = self.extractor.grid_size(config.data.image_size)
        self.products: list[str] = []
        self.task_of_product: dict[str, str] = {}
        self.spans: dict[str, ActivationSpan] = {}
        self.map_means: dict[str, list[float]] = {}  # per score map: calibration mean on each task's held-out normals (score_calibration)
        self.map_stds: dict[str, list[float]] = {}  # ... and std
        self.feature_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per modality: channel mean, std (first task's training)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.network = IBIUMADNetwork(self.modalities, self.extractor.channels, self.grid, config.reconstruction, config.ib_iumad).to(self.device)

    # ------------------------------------------------------------------ inputs
    def _modality_images(self, images: torch.Tensor, depth: torch.Tensor | None, where: str) -> dict[str, torch.Tensor]:
        """Backbone inputs per modality: the RGB images, and the xyz point clouds as normalised 3-channel images."""
        out = {}
        if "rgb" in self.modalities:
            out["rgb"] = images
        if "depth" in self.modalities:
            if depth is None:
                raise ContadError(f"ib_iumad.modalities={self.config.ib_iumad.modalities}: {where} has no xyz point clouds (depth_path)")
            out["depth"] = xyz_to_image(depth)
        return out

    def _raw_tokens(self, batch: ImageBatch, desc: str | None = None) -> dict[str, torch.Tensor]:
        """(N, h*w, C) cached backbone feature tokens per modality of a batch."""
        inputs = self._modality_images(batch.images, batch.depth, batch.paths[0] if batch.paths else "the batch")
        return {m: to_tokens(cached_features(self.extractor, x, self.config.reconstruction.batch_size, f"{desc} {m}" if desc else None)) for m, x in inputs.items()}

    def _tokens(self, batch: ImageBatch, desc: str | None = None) -> dict[str, torch.Tensor]:
        """(N, h*w, C) standardised feature tokens per modality of a batch."""
        return self._standardised(self._raw_tokens(batch, desc))

    def _set_feature_stats(self, tokens: dict[str, torch.Tensor]) -> None:
        """Per modality, channel mean and std of the first task's training tokens (frozen afterwards)."""
        if self.feature_stats or not self.config.ib_iumad.standardise:
            return
        self.feature_stats = {m: channel_stats(t) for m, t in tokens.items()}

    def _standardised(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tokens standardised per channel (balanced channels and reconstruction targets near 0 at initialisation)."""
        if not self.feature_stats:
            return tokens
        return {m: standardise(t, self.feature_stats[m]) for m, t in tokens.items()}

    # ------------------------------------------------------------------ training
    def _check_new(self, data: TaskData) -> None:
        super()._check_new(data)
        known = sorted(set(data.products) & set(self.products))
        if known:
            raise ContadError(f"task {data.name!r}: products {known} are already learned")

    def fit_task(self, data: TaskData) -> dict[str, Any]:
        """Learn the task's products into the shared network (see the module docstring)."""
        self._check_new(data)
        cfg = self.config.ib_iumad
        started = time.perf_counter()
        projected = bool(self.tasks) and cfg.update_strategy == "projected"
        generator = torch.Generator().manual_seed(self.config.seed + 7919 * (len(self.tasks) + 1))
        old_state = {n: p.detach().clone() for n, p in self.network.named_parameters()} if projected else {}
        old_classes = len(self.products)
        self.network.grow(len(data.products), generator)
        class_of = {p: i for i, p in enumerate([*self.products, *data.products])}
        labels = torch.tensor([class_of[p] for p in data.train.products], dtype=torch.long)
        raw = self._raw_tokens(data.train, desc=f"{data.name}: features")
        self._set_feature_stats(raw)
        tokens = self._standardised(raw)
        bases = {n: self.spans[n].basis(cfg.projection_energy) for n in self._projected_modules() if n in self.spans} if projected else {}
        normals = data.heldout if len(data.heldout) > 0 else data.train  # training normals only, never test data
        heldout_tokens = self._tokens(normals)
        stopper = early_stopping(self.network, cfg.early_stopping_patience, len(data.heldout), f"ib_iumad: task {data.name!r}", cfg.epochs)
        history = self._train(data.name, tokens, labels, generator, old_state, old_classes, bases, heldout_tokens, stopper)
        history["heldout_loss"] = self._heldout_losses(heldout_tokens)["fusion"]
        if cfg.score_calibration == "images" and len(normals) < 2:  # no spread of image scores from one image
            log.warning("ib_iumad: task %r has %d held-out normal(s); image-score calibration on its %d training images", data.name, len(normals), len(data.train))
            normals, heldout_tokens = data.train, tokens
        self._record_calibration(heldout_tokens, (normals.images.shape[-2], normals.images.shape[-1]))
        if cfg.update_strategy == "projected":
            self._add_spans(tokens)
        self.tasks.append(data.name)
        self.products.extend(data.products)
        self.task_of_product.update({p: data.name for p in data.products})
        history["seconds"] = time.perf_counter() - started
        log.info("ib_iumad: task %r (%s) done in %.1fs", data.name, "projected" if projected else "plain", history["seconds"])
        return history

    def _losses(self, clean: dict[str, torch.Tensor], labels: torch.Tensor, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        noisy = {m: feature_jitter(t, self.config.reconstruction.jitter_scale, generator) if generator is not None else t for m, t in clean.items()}
        out = self.network({m: t.to(self.device) for m, t in clean.items()}, {m: t.to(self.device) for m, t in noisy.items()})
        labels = labels.to(self.device)
        kl, anchor = ib_loss(out.logits_fused, out.logits_guided, labels)
        losses = {
            "ce": sum(F.cross_entropy(b.logits, labels) for b in out.branches.values()),  # CE_RGB + CE_Depth
            "fusion": fusion_loss(out.guided, clean[self.target].to(self.device)),  # Eq. 9
            "ib": kl,  # Eq. 8
            "anchor": anchor,
            "recon": sum(F.mse_loss(b.reconstruction, clean[m].to(self.device)) for m, b in out.branches.items()),
        }
        return losses  # type: ignore[return-value]

    def _total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.config.ib_iumad
        weights = {"ce": cfg.ce_weight, "fusion": cfg.fusion_weight, "ib": cfg.ib_weight, "anchor": cfg.anchor_weight, "recon": cfg.recon_weight}
        return sum(weights[k] * v for k, v in losses.items())  # type: ignore[return-value]

    def _train(self, name: str, tokens: dict[str, torch.Tensor], labels: torch.Tensor, generator: torch.Generator,
               old_state: dict[str, torch.Tensor], old_classes: int, bases: dict[str, tuple[torch.Tensor, torch.Tensor]],
               heldout_tokens: dict[str, torch.Tensor], stopper: EarlyStopping | None) -> dict[str, Any]:
        """Train up to ``ib_iumad.epochs`` epochs (a last, shorter batch when the batch size does not divide the
        images); with ``stopper``, stop on the held-out loss and restore the best epoch."""
        cfg = self.config.ib_iumad
        params = [p for p in self.network.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        modules = self._projected_modules()
        named = dict(self.network.named_parameters())

        def update(batch: torch.Tensor) -> dict[str, torch.Tensor]:
            losses = self._losses({m: t[batch] for m, t in tokens.items()}, labels[batch], generator)
            optimizer.zero_grad(set_to_none=True)
            self._total(losses).backward()
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            projected_step(optimizer, modules, bases)
            return losses

        return train_epochs(self.network, len(labels), update, generator, epochs=cfg.epochs, batch_size=cfg.batch_size, last_batch="short",
                            where=f"ib_iumad: task {name!r}", desc=f"ib_iumad {name}",
                            after_update=partial(self._retain, named, old_state, old_classes) if old_state else None,
                            stopper=stopper, heldout_loss=partial(self._stopping_loss, heldout_tokens))

    def _projected_modules(self) -> dict[str, nn.Linear]:
        return linear_layers(self.network, self.config.ib_iumad.projection_layers)

    def _retain(self, named: dict[str, nn.Parameter], old_state: dict[str, torch.Tensor], old_classes: int) -> None:
        """IUF Eq. 9 on every parameter; of grown product heads only the old products' rows."""
        rate = self.config.ib_iumad.retention
        for name, old in old_state.items():
            param = named[name]
            if param.shape == old.shape:
                retain_(param.data, old, rate)
            elif old_classes > 0 and param.shape[1:] == old.shape[1:]:
                retain_(param.data[:old_classes], old[:old_classes], rate)

    @torch.no_grad()
    def _add_spans(self, tokens: dict[str, torch.Tensor]) -> None:
        """Add this task's input activations of every projected layer to its old-task span."""
        modules = self._projected_modules()
        with input_activations(modules) as collected:
            self._forward_batches(tokens)
        for name, chunks in collected.items():
            self.spans.setdefault(name, ActivationSpan(modules[name].in_features)).add_task(torch.cat(chunks))

    # ------------------------------------------------------------------ scoring
    def _forward_batches(self, tokens: dict[str, torch.Tensor]) -> list[tuple[dict[str, torch.Tensor], NetworkOutput]]:
        self.network.eval()
        outputs = []
        n = next(iter(tokens.values())).shape[0]
        for start in range(0, n, self.config.ib_iumad.batch_size):
            clean = {m: t[start : start + self.config.ib_iumad.batch_size].to(self.device) for m, t in tokens.items()}
            outputs.append((clean, self.network(clean, clean)))
        return outputs

    def _grid_maps(self, clean: dict[str, torch.Tensor], out: NetworkOutput) -> dict[str, torch.Tensor]:
        """(B, h, w) error maps: F^g vs the target features, and (``fused+branches``) each branch's reconstruction error."""
        maps = {FUSED: error_maps(out.guided, clean[self.target], self.grid)}
        if self.config.ib_iumad.score == "fused+branches":
            maps.update({m: error_maps(b.reconstruction, clean[m], self.grid) for m, b in out.branches.items()})
        return maps

    @torch.no_grad()
    def _heldout_losses(self, tokens: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean Eq. 9 fusion loss and summed branch reconstruction loss (no jitter, eval mode) on held-out training normals."""
        results = self._forward_batches(tokens)
        n = max(1, sum(out.guided.shape[0] for _, out in results))
        fusion = sum(float(fusion_loss(out.guided, clean[self.target])) * out.guided.shape[0] for clean, out in results)
        recon = sum(float(F.mse_loss(b.reconstruction, clean[m])) * out.guided.shape[0] for clean, out in results for m, b in out.branches.items())
        return {"fusion": fusion / n, "recon": recon / n}

    def _stopping_loss(self, tokens: dict[str, torch.Tensor]) -> float:
        """Early-stopping criterion: the losses behind the score maps, weighted as in training (fusion, recon)."""
        losses = self._heldout_losses(tokens)
        return self.config.ib_iumad.fusion_weight * losses["fusion"] + self.config.ib_iumad.recon_weight * losses["recon"]

    def _image_scores(self, grid_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B,) image scores of (B, h, w) grid maps at image ``size``: max of the pooled unsmoothed upsampled map."""
        return pooled_max_scores(upsample_maps(grid_map, size, 0.0), self.config.ib_iumad.score_pool)

    @torch.no_grad()
    def _record_calibration(self, tokens: dict[str, torch.Tensor], size: tuple[int, int]) -> None:
        """Per score map, mean and std on this task's held-out normal TRAINING images (to combine maps).

        ``score_calibration=images``: of the images' image-level scores of that map alone; ``cells``: of its grid cells.
        """
        values: dict[str, list[torch.Tensor]] = {}
        for clean, out in self._forward_batches(tokens):
            for k, v in self._grid_maps(clean, out).items():
                v = v.cpu()
                values.setdefault(k, []).append(self._image_scores(v, size) if self.config.ib_iumad.score_calibration == "images" else v.flatten())
        for k, chunks in values.items():
            flat = torch.cat(chunks).double()
            self.map_means.setdefault(k, []).append(float(flat.mean()))
            self.map_stds.setdefault(k, []).append(float(flat.std()) if flat.numel() > 1 else 0.0)

    def _combined(self, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        """One map: the fused error; several: each standardised with its held-out normal calibration, then the cell-wise max or summed."""
        if len(maps) == 1:
            return maps[FUSED]
        mean = {k: sum(v) / len(v) for k, v in self.map_means.items()}
        std = {k: max(sum(v) / len(v), 1e-8) for k, v in self.map_stds.items()}
        standardised = torch.stack([(m - mean[k]) / std[k] for k, m in maps.items()])
        return standardised.sum(dim=0) if self.config.ib_iumad.combine == "sum" else standardised.amax(dim=0)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, true_tasks: list[str] | None = None, depth: torch.Tensor | None = None) -> Prediction:
        """Score (B, 3, H, W) images (+ (B, 3, H, W) xyz) without any product label (``true_tasks`` is ignored)."""
        self._require_tasks()
        _, _, h, w = images.shape
        inputs = self._modality_images(images, depth, "the images to score")
        tokens = self._standardised({m: to_tokens(self.extractor(x.to(self.device))) for m, x in inputs.items()})
        scores, maps, routed = [], [], []
        for clean, out in self._forward_batches(tokens):
            grid_map = self._combined(self._grid_maps(clean, out)).cpu()
            scores.append(self._image_scores(grid_map, (h, w)))
            maps.append(upsample_maps(grid_map, (h, w), self.config.ib_iumad.smoothing_sigma))
            routed += [self.task_of_product[self.products[i]] for i in out.logits_fused.argmax(dim=1).tolist()]
        return Prediction(image_scores=torch.cat(scores), anomaly_maps=torch.cat(maps), routed_tasks=routed)

    # ------------------------------------------------------------------ state
    def _settings(self) -> dict[str, Any]:
        return {"reconstruction": self.config.reconstruction.model_dump(mode="json"), "ib_iumad": self.config.ib_iumad.model_dump(mode="json"),
                "image_size": self.config.data.image_size, "channels": self.extractor.channels}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"net/{k}": v.detach().cpu() for k, v in self.network.state_dict().items()}
        tensors.update({f"span/{n}": s.moment for n, s in self.spans.items()})
        tensors.update({f"stats/{m}/{k}": v for m, pair in self.feature_stats.items() for k, v in zip(("mean", "std"), pair, strict=True)})
        return tensors

    def state_meta(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "products": list(self.products), "task_of_product": dict(self.task_of_product),
                "map_means": self.map_means, "map_stds": self.map_stds, **self._settings()}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        settings = self._settings()
        changed = [k for k in settings if meta.get(k) != settings[k]]
        if changed:
            raise ValueError(f"state was trained with other settings ({', '.join(changed)}) than the current configuration")
        self.products = list(meta["products"])
        self.task_of_product = dict(meta["task_of_product"])
        self.map_means = {k: list(v) for k, v in meta["map_means"].items()}
        self.map_stds = {k: list(v) for k, v in meta["map_stds"].items()}
        self.network.grow(len(self.products) - self.network.fusion.head_fused.classes)
        self.network.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net/")}, strict=True)
        self.network.to(self.device).eval()
        self.spans = {k[5:]: ActivationSpan(v.shape[0], v) for k, v in tensors.items() if k.startswith("span/")}
        self.feature_stats = {m: (tensors[f"stats/{m}/mean"], tensors[f"stats/{m}/std"]) for m in self.modalities if f"stats/{m}/mean" in tensors}
        self.tasks = list(meta["tasks"])
