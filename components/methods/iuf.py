"""IUF (Tang et al., ECCV 2024): one reconstruction model for all products, updated step by step.

Per step (one task = one or several products trained jointly):
- frozen multi-stage CNN features (``reconstruction``), computed once per image and cached;
- with ``iuf.level_norm`` every pyramid level's slice of a token is scaled to unit norm (times
  sqrt(C / levels); no statistics, the same for every product); with ``iuf.standardise`` instead the
  tokens are standardised per channel with the FIRST task's training statistics (frozen afterwards);
- the UniAD-style reconstruction transformer learns to reconstruct them from jittered inputs; with
  ``iuf.neighbor_mask`` no token attends to its k x k window and ``iuf.layerwise_queries`` gives every
  decoder layer its own learned queries (UniAD's defences against the identity shortcut);
- OASA (``iuf.oasa``): a discriminator on the raw image, trained with cross-entropy on the product
  label (its head grows with every new product), whose block outputs multiply the queries of the
  encoder layers (Eq. 4). At test time it runs on the image itself: no product label;
- semantic compression loss (``iuf.scl``, Eqs. 5-7) on decoder latents, with live gradients;
- epochs: ``iuf.epochs``, raised so that every task gets at least ``iuf.min_steps`` updates;
- later steps (``iuf.update_strategy=projected``): every weight update of the ``projection_layers``
  is projected on the singular directions of old products' input activations and weighted by Omega
  (Eqs. 10-12), then all parameters are pulled toward the previous model (retention, Eq. 9).
  ``finetune`` = plain updates (the "w/o update strategy" ablation).

Loss: recon + ce_weight * CE + scl_weight * L_sc. Score: map = channel L2 norm of the
reconstruction error on the grid (with ``iuf.score_calibration=position`` divided by the relative
per-position error of the training normals, each product's profile taken right after its step and
averaged over the learned products: no label at test time), bilinearly upsampled (+ Gaussian
smoothing); image score = max of the ``score_pool`` average-pooled (unsmoothed) map. Epochs are
fixed, or early-stopped on the reconstruction loss of held-out TRAINING normals
(``iuf.early_stopping_patience``; the shared ``components/methods/early_stopping`` helper keeps the
best epoch's weights); never on test data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
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
from components.methods.iuf_network import (
    ActivationSpan,
    ObjectDiscriminator,
    input_activations,
    linear_layers,
    projected_step,
    retain_,
    semantic_compression_loss,
)
from components.methods.reconstruction import (
    ReconstructionTransformer,
    build_feature_extractor,
    cached_features,
    calibrate_positions,
    channel_stats,
    error_maps,
    feature_jitter,
    level_normalise,
    pooled_max_scores,
    position_profile,
    standardise,
    to_tokens,
    upsample_maps,
)
from components.methods.training_loop import train_epochs
from components.types import Prediction, TaskData

log = logging.getLogger(__name__)

# Architecture switches of states saved before a switch existed (a key missing from a state = its value here).
LEGACY_ARCHITECTURE: dict[str, Any] = {"neighbor_mask": 0, "layerwise_queries": False, "standardise": False, "level_norm": False}


@dataclass
class UpdateRule:
    """What one IUF parameter update needs besides its batch: the optimizer over the trainable parameters,
    the Eq. 12 projection bases of the projected layers (empty = plain update) and the Eq. 9 retention
    targets, resolved once per step: (parameter, its previous value, number of leading rows retained or
    None for all); empty = no retention."""

    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    modules: dict[str, nn.Linear]
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]]
    retention: list[tuple[nn.Parameter, torch.Tensor, int | None]]


class IUFNetwork(nn.Module):
    """Reconstruction transformer + optional OASA discriminator (same width, one category map per encoder layer)."""

    def __init__(self, channels: int, grid: tuple[int, int], config: Config) -> None:
        super().__init__()
        rcfg = config.reconstruction
        self.recon = ReconstructionTransformer(channels, grid, rcfg, neighbor_mask=config.iuf.neighbor_mask, layerwise_queries=config.iuf.layerwise_queries)
        self.oasa = ObjectDiscriminator(grid, rcfg.hidden, rcfg.heads, rcfg.encoder_layers, rcfg.ffn, rcfg.dropout) if config.iuf.oasa else None

    def image_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """What ``forward`` needs of raw images, computed once per task instead of once per batch: the OASA
        discriminator's pooled input (identical results: pooling it again is the identity), or (B, 0) without OASA."""
        return images.new_zeros(len(images), 0) if self.oasa is None else self.oasa.pool(images)

    def forward(self, tokens: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """(reconstruction (B, N, C), decoder latents, class logits or None) of input tokens and raw images."""
        modulations, logits = (None, None) if self.oasa is None else self.oasa(images)
        recon, latents = self.recon(tokens, modulations)
        return recon, latents, logits


class IUF(ContinualMethod):
    """Incremental unified framework: one reconstruction network for every product seen so far."""

    name: ClassVar[str] = "iuf"

    def __init__(self, config: Config, backbone: PromptedBackbone) -> None:
        super().__init__(config, backbone)
        bad = [i for i in config.iuf.scl_layers if not 0 <= i < config.reconstruction.decoder_layers]
        if bad:
            raise ContadError(f"iuf.scl_layers={config.iuf.scl_layers}: decoder layers {bad} do not exist (reconstruction.decoder_layers={config.reconstruction.decoder_layers})")
        with torch.random.fork_rng(devices=[]):  # seeded: random-weight extractors (tests) and the network are reproducible
            torch.manual_seed(config.seed)
            self.extractor = build_feature_extractor(config.reconstruction, config.backbone, backbone)
            self.device = next(self.extractor.net.parameters()).device
            self.grid = self.extractor.grid_size(config.data.image_size)
            self.network = IUFNetwork(self.extractor.channels, self.grid, config).to(self.device)
        self.products: list[str] = []
        self.task_of_product: dict[str, str] = {}
        self.spans: dict[str, ActivationSpan] = {}
        self.feature_stats: tuple[torch.Tensor, torch.Tensor] | None = None  # channel mean, std of the first task's training tokens
        self.position_profiles: dict[str, torch.Tensor] = {}  # per product: relative per-position error of its training normals

    def _set_feature_stats(self, tokens: torch.Tensor) -> None:
        """Channel mean and std of the first task's training tokens (frozen afterwards); only with ``iuf.standardise``."""
        if self.feature_stats is None and self.config.iuf.standardise:
            self.feature_stats = channel_stats(tokens)

    def _network_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The network's tokens: level-normalised (``iuf.level_norm``) or standardised per channel with the
        first task's statistics (``iuf.standardise``, once they exist); else the raw features."""
        if self.config.iuf.level_norm:
            return level_normalise(tokens, self.extractor.level_channels)
        return tokens if self.feature_stats is None else standardise(tokens, self.feature_stats)

    # ------------------------------------------------------------------ helpers
    def projected_modules(self) -> dict[str, nn.Linear]:
        """The ``nn.Linear`` layers named by ``iuf.projection_layers`` (fnmatch patterns)."""
        return linear_layers(self.network, self.config.iuf.projection_layers)

    def _recon_loss(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(recon, target) if self.config.iuf.recon_loss == "mse" else F.l1_loss(recon, target)

    def _check_new(self, data: TaskData) -> None:
        super()._check_new(data)
        known = sorted(set(data.products) & set(self.products))
        if known:
            raise ContadError(f"task {data.name!r}: products {known} are already learned")
        unknown = sorted(set(data.train.products) - set(data.products))
        if unknown:
            raise ContadError(f"task {data.name!r}: training images of products {unknown} not in the task's products {data.products}")

    # ------------------------------------------------------------------ training
    def fit_task(self, data: TaskData) -> dict[str, Any]:
        """Learn the task's products into the shared network (see the module docstring)."""
        self._check_new(data)
        cfg = self.config.iuf
        started = time.perf_counter()
        task_index = len(self.tasks)
        incremental = task_index > 0
        projected = incremental and cfg.update_strategy == "projected"
        generator = torch.Generator().manual_seed(self.config.seed + 7919 * (task_index + 1))
        old_classes = len(self.products)
        old_state = {n: p.detach().clone() for n, p in self.network.named_parameters()} if projected else {}
        if self.network.oasa is not None:
            self.network.oasa.head.grow(len(data.products), generator)
        class_of = {p: i for i, p in enumerate([*self.products, *data.products])}
        labels = torch.tensor([class_of[p] for p in data.train.products], dtype=torch.long)
        raw = to_tokens(cached_features(self.extractor, data.train.images, self.config.reconstruction.batch_size, f"{data.name}: features"))
        self._set_feature_stats(raw)
        feats = self._network_tokens(raw)
        stopper = early_stopping(self.network, cfg.early_stopping_patience, len(data.heldout), f"iuf: task {data.name!r}", cfg.epochs)
        held = (self._network_tokens(to_tokens(cached_features(self.extractor, data.heldout.images, self.config.reconstruction.batch_size))),
                self.network.image_inputs(data.heldout.images)) if stopper is not None else None
        bases = {n: self.spans[n].basis(cfg.projection_energy) for n in self.projected_modules() if n in self.spans} if projected else {}
        inputs = self.network.image_inputs(data.train.images)
        rule = self.update_rule(cfg.incremental_lr if incremental else cfg.lr, bases, old_state, old_classes)
        train_log = self._train(data.name, feats, inputs, labels, held, stopper, generator, rule)
        train_maps = self._add_spans(feats, inputs)
        if cfg.score_calibration == "position":
            self._add_position_profiles(train_maps, data.train.products)
        self.tasks.append(data.name)
        self.products.extend(data.products)
        self.task_of_product.update({p: data.name for p in data.products})
        seconds = time.perf_counter() - started
        log.info("iuf: task %r (%s) done in %.1fs", data.name, "projected" if projected else "plain", seconds)
        return {"task": data.name, "products": list(data.products), "train_images": len(data.train), "update": "projected" if projected else "plain",
                "projected_layers": sorted(bases), "seconds": seconds, **train_log}

    def _losses(self, tokens: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, windows: dict[int, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Recon, CE and SCL losses of one batch (jittered inputs); updates the SCL windows."""
        cfg = self.config.iuf
        noisy = feature_jitter(tokens, self.config.reconstruction.jitter_scale, generator)
        recon, latents, logits = self.network(noisy.to(self.device), images.to(self.device))
        losses = {"recon": self._recon_loss(recon, tokens.to(self.device))}
        if logits is not None:
            losses["ce"] = F.cross_entropy(logits, labels.to(self.device))  # Eq. 3
        if cfg.scl:
            terms = []
            for layer in cfg.scl_layers:
                terms.append(semantic_compression_loss(latents[layer], windows.get(layer), cfg.scl_tail_index, cfg.scl_threshold))
                if cfg.scl_window > 0:
                    fresh = latents[layer].detach().mean(dim=1)
                    windows[layer] = torch.cat([fresh, windows.get(layer, fresh[:0])])[: cfg.scl_window]
            losses["scl"] = torch.stack(terms).mean()
        return losses

    def _total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.config.iuf
        weights = {"recon": 1.0, "ce": cfg.ce_weight, "scl": cfg.scl_weight}
        return sum(weights[k] * v for k, v in losses.items())  # type: ignore[return-value]

    def update_rule(self, lr: float, bases: dict[str, tuple[torch.Tensor, torch.Tensor]], old_state: dict[str, torch.Tensor], old_classes: int) -> UpdateRule:
        """A fresh AdamW (``lr``, ``iuf.weight_decay``) over the trainable parameters, with the step's projection bases and retention target."""
        params = [p for p in self.network.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=self.config.iuf.weight_decay)
        return UpdateRule(optimizer, params, self.projected_modules(), bases, self._retention_targets(old_state, old_classes))

    def train_step(self, rule: UpdateRule, tokens: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                   windows: dict[int, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One update on one batch: losses, backward, gradient clipping, the (projected) optimizer step and
        retention toward the previous model; returns the batch's losses."""
        losses = self._losses(tokens, images, labels, windows, generator)
        rule.optimizer.zero_grad(set_to_none=True)
        self._total(losses).backward()
        nn.utils.clip_grad_norm_(rule.params, self.config.iuf.grad_clip)
        projected_step(rule.optimizer, rule.modules, rule.bases)
        rate = self.config.iuf.retention
        for param, old, rows in rule.retention:
            if rows is None:
                retain_(param.data, old, rate)
            else:
                retain_(param.data[:rows], old[:rows], rate)
        return losses

    def _train(self, task: str, feats: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, held: tuple[torch.Tensor, torch.Tensor] | None,
               stopper: EarlyStopping | None, generator: torch.Generator, rule: UpdateRule) -> dict[str, Any]:
        """``iuf.epochs`` epochs (raised to ``iuf.min_steps`` updates) of ``train_step`` on full batches (the
        last one takes the remainder); with ``stopper``, stop on the held-out loss and keep the best epoch."""
        cfg = self.config.iuf
        windows: dict[int, torch.Tensor] = {}  # SCL latent windows, emptied every epoch

        def update(batch: torch.Tensor) -> dict[str, torch.Tensor]:
            return self.train_step(rule, feats[batch], images[batch], labels[batch], windows, generator)

        return train_epochs(self.network, len(feats), update, generator, epochs=cfg.epochs, batch_size=cfg.batch_size, last_batch="merge",
                            where=f"iuf: task {task!r}", desc=f"iuf {task}", min_updates=cfg.min_steps, epoch_start=windows.clear,
                            stopper=stopper, heldout_loss=partial(self.heldout_loss, *held) if held is not None else None)

    def _retention_targets(self, old_state: dict[str, torch.Tensor], old_classes: int) -> list[tuple[nn.Parameter, torch.Tensor, int | None]]:
        """Eq. 9 targets: every parameter of ``old_state``; of the grown class head only the old products' rows."""
        named = dict(self.network.named_parameters())
        targets: list[tuple[nn.Parameter, torch.Tensor, int | None]] = []
        for name, old in old_state.items():
            param = named[name]
            if param.shape == old.shape:
                targets.append((param, old, None))
            elif name.startswith("oasa.head.") and old_classes > 0:
                targets.append((param, old, old_classes))
        return targets

    def _eval_reconstructions(self, tokens: torch.Tensor, images: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(token batch on the device, its reconstruction) per ``iuf.batch_size`` batch, eval mode, no jitter."""
        self.network.eval()
        bs = self.config.iuf.batch_size
        for start in range(0, len(tokens), bs):
            chunk = tokens[start : start + bs].to(self.device)
            recon, _, _ = self.network(chunk, images[start : start + bs].to(self.device))
            yield chunk, recon

    @torch.no_grad()
    def heldout_loss(self, tokens: torch.Tensor, images: torch.Tensor) -> float:
        """Mean reconstruction loss (no jitter, eval mode) of held-out training normals."""
        total = sum(float(self._recon_loss(recon, chunk)) * len(recon) for chunk, recon in self._eval_reconstructions(tokens, images))
        return total / max(1, len(tokens))

    @torch.no_grad()
    def _add_spans(self, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Add this task's input activations of every projected layer to its old-task span; returns the
        (B, h, w) error maps of the same forward pass (on the CPU)."""
        modules = self.projected_modules()
        with input_activations(modules) as collected:
            maps = torch.cat([error_maps(recon, chunk, self.grid).cpu() for chunk, recon in self._eval_reconstructions(tokens, images)])
        for name, chunks in collected.items():
            span = self.spans.setdefault(name, ActivationSpan(modules[name].in_features))
            span.add_task(torch.cat(chunks))
        return maps

    def _add_position_profiles(self, maps: torch.Tensor, products: list[str]) -> None:
        """Each new product's ``position_profile`` from the error maps of its training normals, with the
        network just trained."""
        for product in dict.fromkeys(products):
            rows = torch.tensor([p == product for p in products])
            self.position_profiles[product] = position_profile(maps[rows])

    def score_profile(self) -> torch.Tensor | None:
        """The profile that divides every error map (``iuf.score_calibration=position``): the mean of the
        learned products' profiles (no product label at test time); None without calibration."""
        if self.config.iuf.score_calibration != "position":
            return None
        return torch.stack([self.position_profiles[p] for p in self.products]).mean(0)

    # ------------------------------------------------------------------ inference
    def _grid_error_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(uncalibrated (B, h, w) error maps on the CPU, OASA class logits or None) of one batch of images."""
        chunk = images.to(self.device)
        tokens = self._network_tokens(to_tokens(self.extractor(chunk)))
        recon, _, logits = self.network(tokens, chunk)
        return error_maps(recon, tokens, self.grid).cpu(), logits

    @torch.no_grad()
    def raw_error_maps(self, images: torch.Tensor) -> torch.Tensor:
        """(B, h, w) grid error maps before any ``iuf.score_calibration`` (for figures and diagnosis)."""
        self.network.eval()
        bs = self.config.iuf.batch_size
        return torch.cat([self._grid_error_maps(images[i : i + bs])[0] for i in range(0, len(images), bs)])

    @torch.no_grad()
    def predict(self, images: torch.Tensor, true_tasks: list[str] | None = None, depth: torch.Tensor | None = None) -> Prediction:
        """Score images without any product label (``true_tasks`` is ignored)."""
        self._require_tasks()
        self.network.eval()
        b, _, h, w = images.shape
        scores, maps, routed = [], [], []
        bs = self.config.iuf.batch_size
        profile = self.score_profile()
        for start in range(0, b, bs):
            grid_maps, logits = self._grid_error_maps(images[start : start + bs])
            if profile is not None:
                grid_maps = calibrate_positions(grid_maps, profile)
            raw = upsample_maps(grid_maps, (h, w), 0.0)
            scores.append(pooled_max_scores(raw, self.config.iuf.score_pool))
            maps.append(upsample_maps(grid_maps, (h, w), self.config.iuf.smoothing_sigma))
            if logits is not None:
                routed += [self.task_of_product[self.products[i]] for i in logits.argmax(dim=1).tolist()]
            else:
                routed += [self.tasks[-1]] * len(grid_maps)
        return Prediction(image_scores=torch.cat(scores), anomaly_maps=torch.cat(maps), routed_tasks=routed)

    # ------------------------------------------------------------------ state
    def _architecture(self) -> dict[str, Any]:
        """The ``iuf.*`` switches that shape the stored network and its inputs (checked on load)."""
        cfg = self.config.iuf
        return {"neighbor_mask": cfg.neighbor_mask, "layerwise_queries": cfg.layerwise_queries, "standardise": cfg.standardise, "level_norm": cfg.level_norm}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"net/{k}": v.detach().cpu() for k, v in self.network.state_dict().items()}
        tensors.update({f"span/{n}": s.moment for n, s in self.spans.items()})
        if self.feature_stats is not None:
            tensors.update({"stats/mean": self.feature_stats[0], "stats/std": self.feature_stats[1]})
        tensors.update({f"profile/{p}": v for p, v in self.position_profiles.items()})
        return tensors

    def state_meta(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "products": list(self.products),
            "task_of_product": dict(self.task_of_product),
            "reconstruction": self.config.reconstruction.model_dump(mode="json"),
            "oasa": self.config.iuf.oasa,
            "architecture": self._architecture(),
            "image_size": self.config.data.image_size,
            "channels": self.extractor.channels,
        }

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        architecture = self._architecture()
        if (meta["reconstruction"] != self.config.reconstruction.model_dump(mode="json") or meta["oasa"] != self.config.iuf.oasa
                or {**LEGACY_ARCHITECTURE, **meta.get("architecture", {})} != architecture):
            raise ValueError("state was trained with other reconstruction/iuf.oasa/architecture settings than the current configuration")
        if meta["image_size"] != self.config.data.image_size:
            raise ValueError(f"state was trained at image size {meta['image_size']}, not {self.config.data.image_size}")
        profiles = {k[8:]: v for k, v in tensors.items() if k.startswith("profile/")}
        missing = [p for p in meta["products"] if p not in profiles]
        if self.config.iuf.score_calibration == "position" and missing:
            raise ValueError(f"iuf.score_calibration=position: the state has no position profile of products {missing} (trained with score_calibration=none)")
        self.products = list(meta["products"])
        self.task_of_product = dict(meta["task_of_product"])
        if self.network.oasa is not None:
            self.network.oasa.head.grow(len(self.products) - self.network.oasa.head.classes)
        self.network.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net/")}, strict=True)
        self.network.to(self.device).eval()
        self.spans = {k[5:]: ActivationSpan(v.shape[0], v) for k, v in tensors.items() if k.startswith("span/")}
        self.feature_stats = (tensors["stats/mean"], tensors["stats/std"]) if "stats/mean" in tensors else None
        self.position_profiles = profiles
        self.tasks = list(meta["tasks"])
