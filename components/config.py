"""The one typed configuration object of contad, loaded from ``params.yaml``.

Every knob of the pipeline lives here. ``load_config`` reads a YAML file, applies
``key=value`` overrides (dotted keys, lists comma-separated) and validates the result;
unknown keys are an error. ``flatten_config`` turns it into primitives for MLflow.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError, field_validator, model_validator


class Section(BaseModel):
    """Base for every config section: unknown keys are rejected, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthConfig(Section):
    """Procedural synthetic products (``contad data synth``)."""

    products: PositiveInt = 5
    seed: int = 0
    image_size: PositiveInt = 256
    train_per_product: PositiveInt = 24
    test_good_per_product: NonNegativeInt = 10
    test_defect_per_type: NonNegativeInt = 4

    image_size: int = 256
    train_per_product: int = 24
    test_good_per_product: int = 10
    test_defect_per_type: int = 4
    depth: bool = False  # True: RGB + xyz object products in the MVTec 3D-AD layout (``contad data synth --depth``)


class DataConfig(Section):
    """Where the products live and how images are prepared for the model."""

    root: str = "data/synth"
    products: list[str] = Field(default_factory=list)  # ordered task sequence; [] = alphabetical
    image_size: PositiveInt = 224  # model input size (square resize)
    heldout_fraction: float = Field(0.1, ge=0, lt=1)  # slice of train/good held out for early stopping + thresholds
    num_workers: NonNegativeInt = 0
    tile: Annotated[int, Field(ge=32)] | Literal["auto"] | None = "auto"  # score overlapping tiles of this many px at data.image_size and stitch; None = one pass; auto = components/data/tiling.py
    tile_overlap: int = Field(default=0, ge=0)  # px shared by neighbouring tiles
    synth: SynthConfig = Field(default_factory=SynthConfig)
    depth_min_valid_fraction: float = Field(0.05, ge=0.0, le=1.0)  # validation: xyz must have at least this share of valid points


class ProtocolConfig(Section):
    """Task sequence protocol: plain ordered products, or IUF-style "X-Y with N steps"."""

    base_tasks: PositiveInt = 1  # X: products trained together as the first task
    step_tasks: PositiveInt = 1  # Y: products added per later step

    @property
    def name(self) -> str:
        if self.base_tasks == 1 and self.step_tasks == 1:
            return "sequential"
        return f"{self.base_tasks}-{self.step_tasks}"


class PromptConfig(Section):
    """Per-task prompts of a prompted backbone."""

    length: PositiveInt = 4  # ViT: prefix tokens per prompted layer
    layers: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4, 5])  # ViT blocks with prefixes
    spatial: bool = True  # CNN: additive spatial prompt besides channel scale/shift


class BackboneConfig(Section):
    """Frozen feature extractor."""

    name: str = "efficientnet_lite0"  # efficientnet_lite0 | vit_base_patch16_224 | any timm vit_*
    checkpoint: str | None = None  # local checkpoint path (ViT); None = timm/HF cache
    pretrained: bool = True  # False: random init (tests only)
    feature_layer: int | None = None  # None = backbone default (ViT: block 5; CNN: stage 3)
    feature_span: int = Field(default=2, ge=1)  # CNN: pyramid levels feature_layer-span+1 .. feature_layer, on the finest one's grid (3: stride 4)
    key_layer: int | None = None  # None = backbone default mid layer for task keys
    device: str = "auto"  # auto | cpu | cuda
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    # CNN patch features (PatchCore's locally aware aggregation); zero padding keeps border cells from scoring highest on a uniform texture:
    pool_size: int = Field(default=3, ge=1, le=9)  # odd neighbourhood side of the local average (1 = none)
    pool_padding: Literal["zeros", "reflect", "valid"] = "zeros"  # border cells: zero-padded / mirrored / valid-only mean
    feature_dim: int | None = Field(default=None, ge=2)  # channel reduction: each stage pooled to feature_dim/2 channels; None = raw concat


class FeatureChoice(Section):
    """Patch-feature settings a task may take instead of the backbone's (an unset key keeps its ``backbone.*`` value)."""

    feature_layer: int | None = Field(default=None, ge=1)
    feature_span: int | None = Field(default=None, ge=1)
    feature_dim: int | None = Field(default=None, ge=2)

    def label(self) -> str:
        """``"feature_layer=2"``-style text of the keys it sets."""
        return " ".join(f"{key}={value}" for key, value in self.model_dump(exclude_none=True).items()) or "backbone"


class UCADConfig(Section):
    """UCAD: task keys, prompts trained with structure-based contrastive loss, knowledge memory."""

    key_size: PositiveInt = 196  # k-center-greedy sample of un-prompted patch features per task
    knowledge_size: PositiveInt | None = None  # coreset rows of prompted patch features per task; None = memory.coreset_ratio within memory.budget_mb
    epochs: NonNegativeInt = 0  # prompt epochs; 0 = training-free prompts (kept on the validation protocol: benchmarks/RESULTS.md section 3)
    lr: PositiveFloat = 1e-2
    batch_size: PositiveInt = 8
    temperature: PositiveFloat = 0.1
    pairs_per_image: PositiveInt = 256  # patch pairs sampled per image for the contrastive loss
    early_stopping_patience: NonNegativeInt = 0  # 0 = fixed epochs; else stop on held-out train normals
    reweight: bool = False  # PatchCore-style re-weighting of the image score
    image_top_k: PositiveInt = 1  # image score = mean of the k highest patch scores (1 = max; reweight needs 1)
    normalise_scores: bool = True  # divide scores by the routed task's mean held-out normal score
    feature_choices: list[FeatureChoice] = Field(default_factory=list)  # per task, also fit these feature settings; keep the best on held-out normals + synthetic defects
    feature_choice_margin: NonNegativeFloat = 0.02  # image AUROC a choice must gain there over the backbone's features to replace them


class PatchCoreConfig(Section):
    """PatchCore baselines: finetune (forgets), replay, per-task oracle."""

    coreset_size: PositiveInt | None = None  # bank rows per task; None = memory.coreset_ratio within memory.budget_mb
    replay_buffer: NonNegativeInt = 20  # images kept from past tasks (patchcore_replay)
    num_neighbors: PositiveInt = 1
    reweight: bool = False
    normalise_scores: bool = True  # oracle: divide scores by the task's mean held-out normal score
    feature_choices: list[FeatureChoice] = Field(default_factory=list)  # oracle: per task, also fit these feature settings; keep the best on held-out normals + synthetic defects
    feature_choice_margin: NonNegativeFloat = 0.02  # oracle: image AUROC a choice must gain there over the backbone's features to replace them


class SAMConfig(Section):
    checkpoint: str | None = None  # ViT-B SAM checkpoint path
    model_type: str = "vit_b"
    points_per_side: PositiveInt = 16
    pred_iou_thresh: float = Field(0.86, ge=0, le=1)
    stability_score_thresh: float = Field(0.92, ge=0, le=1)
    min_mask_region_area: NonNegativeInt = 0


class GroundedSAMConfig(Section):
    dino_checkpoint: str | None = None  # local Grounding DINO directory (transformers format)
    box_threshold: float = Field(0.3, ge=0, le=1)
    text_threshold: float = Field(0.25, ge=0, le=1)
    prompts: dict[str, list[str]] = Field(default_factory=dict)  # product -> text prompts


class FelzenszwalbConfig(Section):
    scale: PositiveFloat = 200.0
    sigma: NonNegativeFloat = 0.5  # tuned on synthetic object products: object silhouette IoU >= 0.89
    min_size: NonNegativeInt = 200


class SLICConfig(Section):
    n_segments: PositiveInt = 32
    compactness: PositiveFloat = 10.0
    sigma: NonNegativeFloat = 1.0


class MasksConfig(Section):
    """Offline structure masks (label maps) for the contrastive loss."""

    provider: Literal["felzenszwalb", "slic", "sam", "grounded_sam"] = "felzenszwalb"
    cache_dir: str = "runs/mask_cache"
    image_size: PositiveInt = 224  # label maps are computed at this size
    workers: PositiveInt = 2
    device: str = "auto"  # sam / grounded_sam: auto | cpu | cuda
    sam: SAMConfig = Field(default_factory=SAMConfig)
    grounded_sam: GroundedSAMConfig = Field(default_factory=GroundedSAMConfig)
    felzenszwalb: FelzenszwalbConfig = Field(default_factory=FelzenszwalbConfig)
    slic: SLICConfig = Field(default_factory=SLICConfig)


class EvalConfig(Section):
    """Cross-task evaluation."""

    pixel_resolution: PositiveInt | None = None  # None = model input size
    aupro_fpr_limit: float = Field(0.3, gt=0, le=1)
    overlays_per_task: NonNegativeInt = 3
    smoothing_sigma: NonNegativeFloat = 4.0
    batch_size: PositiveInt = 16  # images per predict call during evaluation


class TrackingConfig(Section):
    """MLflow tracking and model registry."""

    enabled: bool = True
    uri: str = "sqlite:///runs/mlflow.db"
    experiment_prefix: str = "contad"
    registered_model: str = "contad-detector"


class PromotionConfig(Section):
    """Gate for moving the ``champion`` alias after an incremental run."""

    min_new_image_auroc: NonNegativeFloat = 0.8
    max_forgetting: NonNegativeFloat = 0.02  # max drop of image AUROC on every old product
    # feedback apply: max rise of a product's escape rate (defective test images decided OK) at its deployed threshold
    max_escape_rise: float = Field(0.02, ge=0.0, le=1.0)
    # Products with normal images only (no test set) are gated on their false-reject rate instead of AUROC:
    # the share of their reserved normals (never trained on, never used for thresholds) decided NG.
    max_false_reject_rate: float = Field(0.2, ge=0.0, le=1.0)
    reserved_normals_fraction: float = Field(0.2, gt=0.0, lt=1.0)  # share of such a product's train/good images reserved


class LeMOConfig(Section):
    """LeMO: frozen features + CoordConv 1x1 adapter, K learnable prototypes, AnoNCE loss, one online pass."""

    prototypes: int = Field(10, ge=2)  # K memory prototypes per task
    adapter_dim: int | None = Field(None, ge=1)  # D of the embedding; None = backbone feature dim
    adapter_init: Literal["identity", "random"] = "identity"  # identity needs adapter_dim = feature dim
    prototype_init: Literal["qr", "kmeans"] = "kmeans"  # kmeans = k-means of the first image; qr = "decoupled noise" (paper default)
    memory_update: Literal["frozen", "learned", "feature_enhanced"] = "learned"
    margin: float = Field(1e-5, ge=0.0)  # r of m(d, r) = max(d - r, 0)
    temperature: float = Field(0.1, gt=0.0)  # tau of AnoNCE
    positives: int = Field(3, ge=1)  # nearest prototypes per patch used as p+
    negatives: int = Field(3, ge=1)  # next nearest prototypes used as p-
    lr: float = Field(1e-3, gt=0.0)  # Adam
    weight_decay: float = Field(5e-4, ge=0.0)
    shared_adapter: bool = False  # True: one adapter for all tasks (forgets); False: one per task, key-routed
    key_size: int = Field(196, ge=1)  # k-center sample of pooled features per task for routing
    key_update_every: int = Field(8, ge=1)  # learned images between re-draws of the key sample
    feature_momentum: float = Field(0.1, gt=0.0, le=1.0)  # feature_enhanced: re-clustering step
    min_usage: float = Field(0.1, ge=0.0, lt=1.0)  # feature_enhanced: split prototypes used < min_usage / K
    batch_size: int = Field(8, ge=1)  # inference batch (training is batch 1, one pass)

    @model_validator(mode="after")
    def _counts_fit(self) -> "LeMOConfig":
        if self.positives + self.negatives > self.prototypes:
            raise ValueError(f"lemo.positives + lemo.negatives ({self.positives} + {self.negatives}) must not exceed lemo.prototypes ({self.prototypes})")
        return self


class StreamConfig(Section):
    """Online mode (``contad stream``): prequential scoring, online updates, checkpoints."""

    update: Literal["ok", "all"] = "ok"  # ok: only images decided OK are learned (NG ones are quarantined); all: every image
    warmup: int = Field(10, ge=1)  # a product with no calibrated threshold: images learned, undecided, before its threshold exists
    checkpoint_every: int = Field(50, ge=1)  # images between checkpoints (also one at exit)
    poll_s: float = Field(0.5, gt=0.0)  # folder watch: seconds between directory scans
    idle_timeout_s: float = Field(30.0, ge=0.0)  # folder watch: stop after this long without new files (0 = never)
    max_images: int | None = Field(None, ge=1)  # stop after this many new images (None = until the source ends)


class DriftConfig(Section):
    """Drift watch of serve-api and stream (``components.eval.drift``): OK scores per product against calibration."""

    enabled: bool = True
    window: int = Field(50, ge=5)  # OK-decided images per product in one comparison window
    alpha: float = Field(0.01, gt=0.0, lt=1.0)  # KS test significance: ~alpha of undrifted windows alarm


class BanksConfig(Section):
    """Versioned memory-bank store."""

    store_dir: str = "runs/banks"
    lock_timeout_s: NonNegativeFloat = 3600.0  # how long a command waits for another one's lock on the store


class FeedbackConfig(Section):
    """Operator feedback (``contad feedback``): verdicts on images the line has seen, learned into a new bank version."""

    min_images: int = Field(5, ge=1)  # false rejects marked good needed before ``feedback apply`` builds a version (unless --force)
    patch_share: float = Field(0.1, gt=0.0, le=1.0)  # most of a false reject's patches added (farthest first, only until it is decided OK)


class DecisionConfig(Section):
    """OK/NG decisions: per-task thresholds calibrated on held-out TRAINING normals only."""

    target_fpr: float = Field(0.01, ge=0.0, lt=1.0)  # false-reject rate the image threshold is set for (changeable at load time)
    pixel_fpr: float = Field(0.001, ge=0.0, lt=1.0)  # fraction of normal pixels above the contour threshold
    synthetic_variants: int = Field(2, ge=0, le=16)  # synthetic defects pasted per held-out normal for the escape estimate (0 = none)
    # other promises the evaluation also reads escape / false-reject rates at (components/eval/operating_points.py)
    operating_points: list[float] = Field(default_factory=lambda: [0.01, 0.05, 0.1])

    @field_validator("operating_points")
    @classmethod
    def _points_are_rates(cls, value: list[float]) -> list[float]:
        bad = [p for p in value if not 0.0 < p < 1.0]
        if bad:
            raise ValueError(f"every operating point is a false-reject rate in (0, 1), got {bad}")
        return sorted(set(value))


class ServeConfig(Section):
    """The REST inference service (``contad serve-api``) and ``contad predict``."""

    host: str = "127.0.0.1"  # a non-loopback address needs a token (token_env)
    port: int = Field(8000, ge=0, le=65535)
    model: str = "models:/contad-detector@champion"  # registry URI; ``contad serve-api --bank DIR`` overrides
    token_env: str = "CONTAD_API_TOKEN"  # env var holding the bearer token; unset/empty = no auth
    max_bytes: int = Field(20_000_000, ge=1)  # largest accepted request body
    max_pixels: int = Field(40_000_000, ge=1)  # largest accepted decoded image (width * height)
    request_timeout_s: float = Field(30.0, gt=0)  # inference time limit per request (503 after)
    read_timeout_s: float = Field(10.0, gt=0)  # a client must send its request headers, then its body, each within this (slow clients are cut)
    max_concurrent: int = Field(2, ge=1)  # inferences running at once; more wait (bounded by the timeout)
    reload_poll_s: float = Field(10.0, ge=0)  # how often the champion alias is polled; 0 = never reload
    heatmap_size: int = Field(256, ge=16, le=2048)  # side of returned heat-map overlays
    feedback_cache: int = Field(256, ge=0)  # serve-api keeps the last N predictions (image bytes + decision) for POST /v1/feedback?prediction_id=; 0 = off
    feedback_cache_mb: float = Field(256.0, gt=0.0)  # ... and drops the oldest while their images hold more than this many MB


class ComputeConfig(Section):
    """Where the embarrassingly parallel work runs (mask caching, per-product evaluation): ``flows/fanout.py``."""

    workers: int = Field(default=1, ge=1, le=256)  # > 1: a local Dask cluster of this many worker processes
    threads_per_worker: int = Field(default=1, ge=1, le=64)  # threads of each local Dask worker
    dask_address: str | None = None  # e.g. tcp://scheduler:8786: an existing Dask cluster (overrides workers)

    @property
    def fanout(self) -> bool:
        """Whether work is fanned out to Dask (a local cluster or ``dask_address``)."""
        return self.workers > 1 or bool(self.dask_address)

    @field_validator("dask_address")
    @classmethod
    def _scheduler_address(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError(f"{value!r} is not a Dask scheduler address (e.g. tcp://scheduler:8786)")
        return value or None


class ReconstructionConfig(Section):
    """Feature-reconstruction core (UniAD style) shared by the reconstruction methods (IUF)."""

    backbone: str = "efficientnet_lite0"  # frozen CNN: efficientnet_lite0 (packaged weights) or any timm CNN
    checkpoint: str | None = None  # local weights; required for any backbone other than efficientnet_lite0
    stages: list[int] = Field(default_factory=lambda: [0, 1, 2, 3])  # pyramid levels, resized and concatenated
    stride: int = Field(16, ge=1)  # feature grid = image_size / stride (14 x 14 at 224 px)
    hidden: int = Field(96, ge=8)  # transformer width (authors: 256; CPU-friendly default)
    heads: int = Field(4, ge=1)
    encoder_layers: int = Field(2, ge=1)  # authors: 4
    decoder_layers: int = Field(2, ge=1)  # authors: 4
    ffn: int = Field(192, ge=8)  # authors: 1024
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    jitter_scale: float = Field(20.0, ge=0.0)  # training noise f + N(0,1) * ||f|| / C * scale; 0 = off
    batch_size: int = Field(16, ge=1)  # feature-extraction batch

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ReconstructionConfig:
        if self.hidden % self.heads:
            raise ValueError(f"reconstruction.hidden={self.hidden} must be divisible by reconstruction.heads={self.heads}")
        if not self.stages:
            raise ValueError("reconstruction.stages must name at least one pyramid level")
        return self


class IUFConfig(Section):
    """IUF: one reconstruction model for all products, object-aware attention, compression, projected updates."""

    oasa: bool = True  # object-aware self-attention (product discriminator modulating encoder queries)
    scl: bool = True  # semantic compression loss
    update_strategy: Literal["projected", "finetune"] = "projected"  # incremental steps
    neighbor_mask: int = Field(7, ge=0)  # UniAD neighbour-masked attention: a token never attends to its k x k window; 0 = full attention
    standardise: bool = False  # per-channel standardisation with the FIRST task's training statistics (frozen); off: it mis-scales later products
    level_norm: bool = False  # every pyramid level's token slice scaled to unit norm (x sqrt(C / levels)): product-independent, levels weigh the same
    layerwise_queries: bool = True  # UniAD decoder: learned queries in every layer attending to the encoder output, then the previous layer
    epochs: int = Field(12, ge=1)  # per step (max epochs with early stopping)
    min_steps: int = Field(600, ge=0)  # at least this many optimizer steps per task: small products get more epochs
    early_stopping_patience: int = Field(0, ge=0)  # 0 = fixed epochs; else stop on held-out training normals
    batch_size: int = Field(16, ge=2)
    lr: float = Field(1e-3, gt=0.0)  # AdamW, base step
    incremental_lr: float = Field(1e-3, gt=0.0)  # AdamW, later steps
    weight_decay: float = Field(1e-4, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    recon_loss: Literal["mse", "l1"] = "mse"  # code: MSE; paper Eq. 1: L1
    ce_weight: float = Field(0.5, ge=0.0)  # lambda_1 (OASA cross-entropy)
    scl_weight: float = Field(1.0, ge=0.0)  # lambda_2 (semantic compression)
    scl_tail_index: int = Field(4, ge=1)  # t: penalise singular values sigma_i, i >= t (0-based)
    scl_threshold: float = Field(0.0, ge=0.0, lt=1.0)  # also penalise sigma_i / sum(sigma) below this; 0 = off
    scl_window: int = Field(32, ge=0)  # detached rows of earlier batches stacked under the batch for the SVD
    scl_layers: list[int] = Field(default_factory=lambda: [0, 1])  # decoder layers whose latents are compressed
    retention: float = Field(0.02, ge=0.0, le=1.0)  # theta <- (1 - r) theta + r theta_old after every update
    projection_layers: list[str] = Field(default_factory=lambda: ["recon.*", "oasa.blocks.*"])  # fnmatch on nn.Linear names
    projection_energy: float = Field(0.99, gt=0.0, le=1.0)  # old-activation span = top directions holding this energy
    score_pool: int = Field(16, ge=1)  # image score = max of the score_pool x score_pool average-pooled map
    smoothing_sigma: float = Field(4.0, ge=0.0)  # Gaussian smoothing of the upsampled map (px); 0 = off
    score_calibration: Literal["none", "position"] = "position"  # position: error map / relative per-position error of the training normals, averaged over learned products

    @model_validator(mode="after")
    def _one_normalisation(self) -> IUFConfig:
        if self.standardise and self.level_norm:
            raise ValueError("iuf.standardise and iuf.level_norm are two feature normalisations: set at most one to true")
        return self


class IBIUMADConfig(Section):
    """IB-IUMAD: RGB + depth reconstruction branches with Mamba decoders and information-bottleneck fusion."""

    modalities: Literal["rgb+depth", "rgb", "depth"] = "rgb+depth"
    fusion: Literal["cross_attention", "add", "concat"] = "cross_attention"
    update_strategy: Literal["finetune", "projected"] = "finetune"  # paper: plain retraining; projected = IUF's Eqs. 9-12
    score: Literal["fused", "fused+branches"] = "fused+branches"  # fused: |F^g - F_org| only (paper); +branches: plus each branch's reconstruction error
    combine: Literal["sum", "max"] = "max"  # fused+branches: cell-wise max (a defect one modality sees is not averaged away) or sum of the standardised maps
    score_calibration: Literal["cells", "images"] = "images"  # standardise each map with its held-out normals' image scores (images) or cells (cells)
    standardise: bool = True  # per-channel standardisation of every modality's tokens with the first task's training statistics
    mamba_state: int = Field(16, ge=1)  # SSM state size N
    mamba_expand: int = Field(2, ge=1)  # ESSM inner width = expand * reconstruction.hidden
    head_hidden: int = Field(64, ge=1)  # product classifier hidden width
    fusion_heads: int = Field(4, ge=1)  # cross-attention heads (must divide the fused width)
    bottleneck: int = Field(64, ge=1)  # width of z
    bottleneck_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    epochs: int = Field(12, ge=1)  # the maximum when early_stopping_patience > 0
    early_stopping_patience: int = Field(0, ge=0)  # 0 = fixed epochs; else stop on held-out training normals, keep the best epoch
    batch_size: int = Field(16, ge=2)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    ce_weight: float = Field(1.0, ge=0.0)  # CE_RGB + CE_Depth (Eq. 10)
    fusion_weight: float = Field(1.0, ge=0.0)  # L_Fusion (Eq. 9)
    ib_weight: float = Field(1.0, ge=0.0)  # L_IB KL (Eq. 8)
    anchor_weight: float = Field(1.0, ge=0.0)  # CE on P(Y|F_fu) anchoring the KL
    recon_weight: float = Field(1.0, ge=0.0)  # per-branch reconstruction of clean features (the MRN target); 0 = paper Eq. 10 only
    retention: float = Field(0.05, ge=0.0, le=1.0)  # projected: theta <- (1 - r) theta + r theta_old
    projection_layers: list[str] = Field(default_factory=lambda: ["branches.*.recon.*"])  # projected: fnmatch on nn.Linear names
    projection_energy: float = Field(0.99, gt=0.0, le=1.0)
    score_pool: int = Field(16, ge=1)  # image score = max of the score_pool x score_pool average-pooled map
    smoothing_sigma: float = Field(4.0, ge=0.0)  # Gaussian smoothing of the upsampled map (px); 0 = off


class MemoryConfig(Section):
    """Per-product memory of the memory-based methods (PatchCore banks, UCAD knowledge)."""

    budget_mb: float = Field(default=2.0, gt=0)  # float32 bytes of memory rows per product (bank / knowledge+key)
    coreset_ratio: float = Field(default=0.1, gt=0, le=1)  # k-center-greedy coreset size as a fraction of patches
    projection_dim: int | None = Field(default=64, ge=1)  # Johnson-Lindenstrauss projection for the greedy selection; None = off
    preselect_factor: int | None = Field(default=16, ge=1)  # greedy over at most factor x rows, preselected blockwise; None = over all


class TextConfig(Section):
    """Frozen text encoder and the per-product sentences of text-guided methods (MTRMB)."""

    name: str = "all-MiniLM-L6-v2"  # packaged offline MiniLM, or any Hugging Face BERT-like model id
    checkpoint: str | None = None  # local model directory or hub id (read from the HF cache only); None = text.name
    pretrained: bool = True  # False: random weights from the model's config (tests only)
    max_length: int = Field(32, ge=4, le=512)  # tokens per sentence (padded / truncated)
    template: str = "a photo of a {product}"  # sentence of a product without an entry in ``prompts``
    prompts: dict[str, str] = Field(default_factory=dict)  # product -> sentence (add-product --text sets it)

    @field_validator("template")
    @classmethod
    def _template_names_product(cls, value: str) -> str:
        if "{product}" not in value:
            raise ValueError("must contain {product}")
        return value


class MTRMBConfig(Section):
    """MTRMB: UCAD + text-guided key-prompt-knowledge memory (KPMK) + refined structure contrast (RSCL)."""

    epochs: int = Field(1, ge=0)  # Eq. 8 training epochs per task (replaces ucad.epochs for MTRMB)
    kpmk: bool = True  # text cross-attention fusion, L_cross and the learnable-key pull term L_kp
    train_prompt: bool = True  # Eq. 8 also trains the backbone prompt (false: UCAD's training-free prompt; fusion + key only)
    rscl: bool = True  # Eq. 5-6 contrastive loss on Grounded-SAM label maps (off: UCAD's loss on masks.provider)
    contrastive_weight: float = Field(1.0, ge=0.0)  # weight of L_contra in Eq. 8
    cross_loss_weight: float = Field(1.0, ge=0.0)  # weight of L_cross (Eq. 7) in Eq. 8
    key_pull_weight: float = Field(1.0, ge=0.0)  # lambda of L_kp in Eq. 8
    temperature: float = Field(0.5, gt=0.0)  # tau of the RSCL similarities (UCAD code: 0.5)
    cross_temperature: float = Field(0.5, gt=0.0)  # tau of the patch-text similarities in L_cross
    fusion_dim: int = Field(16, ge=4)  # inner width of the two cross-attentions and rank of the text projection
    fusion_heads: int = Field(2, ge=1)  # attention heads (must divide fusion_dim)
    feature_choices: list[FeatureChoice] = Field(default_factory=list)  # per task, also fit these feature settings (each with its own prompt and fusion); keep the best on held-out normals + synthetic defects
    feature_choice_margin: NonNegativeFloat = 0.02  # image AUROC a choice must gain there over the backbone's features to replace them
    masks_provider: Literal["grounded_sam", "sam"] = "grounded_sam"  # RSCL label maps ("sam" = the paper's "w/o GD")
    masks_fallback: Literal["felzenszwalb", "slic"] = "felzenszwalb"  # used (and recorded) when those weights are not configured

    @field_validator("fusion_heads")
    @classmethod
    def _heads_divide_dim(cls, value: int, info: Any) -> int:
        dim = info.data.get("fusion_dim")
        if dim is not None and dim % value:
            raise ValueError(f"must divide mtrmb.fusion_dim={dim}")
        return value


class DemoConfig(Section):
    """``contad demo``: the method of the run (``method``) plus a baseline run and a comparison report."""

    baseline: str | None = "patchcore_finetune"  # a method that forgets, so the forgetting views show something; null: none

    @field_validator("baseline")
    @classmethod
    def _known_method(cls, value: str | None) -> str | None:
        return None if value is None else known_method(value, " or null")


def known_method(value: str, alternatives: str = "") -> str:
    """``value`` when it names a registered method (``components.methods.registry``), else ``ValueError``."""
    from components.methods.registry import METHOD_CLASSES  # a plain table: no torch import

    if value not in METHOD_CLASSES:
        raise ValueError(f"unknown method {value!r} (choose from {', '.join(METHOD_CLASSES)}{alternatives})")
    return value


class Config(Section):
    """Root configuration: one object for the whole pipeline.

    ``overrides``: the ``key=value`` overrides it was loaded with (``load_config``), so a deployed
    detector can tell what a user asked for explicitly from what a params file says.
    """

    _overrides: list[str] = PrivateAttr(default_factory=list)

    @property
    def overrides(self) -> list[str]:
        return list(self._overrides)

    method: str = "ucad"  # a name registered in components.methods.registry

    @field_validator("method")
    @classmethod
    def _registered(cls, value: str) -> str:
        return known_method(value)

    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    protocol: ProtocolConfig = Field(default_factory=ProtocolConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    ucad: UCADConfig = Field(default_factory=UCADConfig)
    patchcore: PatchCoreConfig = Field(default_factory=PatchCoreConfig)
    masks: MasksConfig = Field(default_factory=MasksConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    banks: BanksConfig = Field(default_factory=BanksConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    decision: DecisionConfig = Field(default_factory=DecisionConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    lemo: LeMOConfig = Field(default_factory=LeMOConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    reconstruction: ReconstructionConfig = Field(default_factory=ReconstructionConfig)
    iuf: IUFConfig = Field(default_factory=IUFConfig)
    ib_iumad: IBIUMADConfig = Field(default_factory=IBIUMADConfig)

    text: TextConfig = Field(default_factory=TextConfig)
    mtrmb: MTRMBConfig = Field(default_factory=MTRMBConfig)
    demo: DemoConfig = Field(default_factory=DemoConfig)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file/key and the problem."""


def _parse_scalar(text: str) -> Any:
    """Parse one override value with YAML rules (``true``, ``3``, ``0.1``, ``null``...)."""
    return yaml.safe_load(text) if text.strip() else ""


def _parse_flow_list(key: str, value: str) -> list[Any]:
    """A list override written as a YAML flow sequence (``[2, 4]``, ``[{feature_layer: 2}]``)."""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}={value!r}: not a YAML list ({' '.join(str(exc).split())})") from None
    if not isinstance(parsed, list):
        raise ConfigError(f"override {key}={value!r}: not a YAML list")
    return parsed


def _expected_is_list(model: type[BaseModel], dotted: str) -> bool:
    """Whether the field at ``dotted`` is declared as a list."""
    cls: Any = model
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        field = cls.model_fields.get(part)
        if field is None:
            return False
        ann = field.annotation
        if i == len(parts) - 1:
            return getattr(ann, "__origin__", None) is list or str(ann).startswith("list")
        cls = ann
        if not isinstance(cls, type) or not issubclass(cls, BaseModel):
            return False
    return False


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys; list fields take comma-separated values or a YAML flow sequence)."""
    out = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if _expected_is_list(Config, key):
            if value.strip().startswith("["):  # a YAML flow sequence: [a, b] or [{key: 1}, ...]
                parsed: Any = _parse_flow_list(key, value)
            else:
                parsed = [] if value.strip() == "" else [_parse_scalar(v) for v in value.split(",")]
        else:
            parsed = _parse_scalar(value)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = parsed
    return out


def _suggest_key(loc: tuple[Any, ...]) -> str:
    """``"; did you mean a.b?"`` for an unknown key at ``loc`` when a field of that section is close, else ``""``."""
    cls: Any = Config
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part)) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return ""
        cls = field.annotation
    if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(cls.model_fields), n=1, cutoff=0.6)
    return f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?" if close else ""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = "unknown key" + _suggest_key(tuple(e["loc"])) if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Config:
    """Load ``path`` (missing file or None = defaults), apply overrides, validate."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None and Path(path).exists():
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc  # one line
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not a YAML text file (byte {exc.start} is not UTF-8 text)") from None
        except OSError as exc:
            raise ConfigError(f"config file {path}: cannot be read ({exc.strerror or exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        raw = loaded
    elif path is not None and str(path) != "params.yaml":
        raise ConfigError(f"config file {path} does not exist")
    raw = apply_overrides(raw, overrides or [])
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        where = source if not overrides else f"{source} with overrides {overrides}"
        raise ConfigError(_format_errors(exc, where)) from None
    cfg._overrides = list(overrides or [])
    return cfg


def flatten_config(cfg: BaseModel, prefix: str = "") -> dict[str, str | int | float | bool]:
    """Flatten to ``{"a.b.c": primitive}`` (lists/dicts/None become strings) for MLflow params."""
    flat: dict[str, str | int | float | bool] = {}
    for name, value in cfg:
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            flat.update(flatten_config(value, key + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[key] = value
        elif isinstance(value, list):
            flat[key] = ",".join(str(v) for v in value)
        else:
            flat[key] = "null" if value is None else str(value)
    return flat


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain JSON/YAML-able dict of the whole config."""
    return cfg.model_dump(mode="json")
