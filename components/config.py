"""The one typed configuration object of contad, loaded from ``params.yaml``.

Every knob of the pipeline lives here. ``load_config`` reads a YAML file, applies
``key=value`` overrides (dotted keys, lists comma-separated) and validates the result;
unknown keys are an error. ``flatten_config`` turns it into primitives for MLflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class Section(BaseModel):
    """Base for every config section: unknown keys are rejected, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthConfig(Section):
    """Procedural synthetic products (``contad data synth``)."""

    products: int = 5
    seed: int = 0
    image_size: int = 256
    train_per_product: int = 24
    test_good_per_product: int = 10
    test_defect_per_type: int = 4


class DataConfig(Section):
    """Where the products live and how images are prepared for the model."""

    root: str = "data/synth"
    products: list[str] = Field(default_factory=list)  # ordered task sequence; [] = alphabetical
    image_size: int = 224  # model input size (square resize)
    heldout_fraction: float = 0.1  # slice of train/good held out for early stopping + thresholds
    num_workers: int = 0
    tile: int | None = Field(default=None, ge=32)  # score overlapping tiles of this many px at data.image_size and stitch; None = one pass
    tile_overlap: int = Field(default=32, ge=0)  # px shared by neighbouring tiles
    synth: SynthConfig = Field(default_factory=SynthConfig)


class ProtocolConfig(Section):
    """Task sequence protocol: plain ordered products, or IUF-style "X-Y with N steps"."""

    base_tasks: int = 1  # X: products trained together as the first task
    step_tasks: int = 1  # Y: products added per later step

    @property
    def name(self) -> str:
        if self.base_tasks == 1 and self.step_tasks == 1:
            return "sequential"
        return f"{self.base_tasks}-{self.step_tasks}"


class PromptConfig(Section):
    """Per-task prompts of a prompted backbone."""

    length: int = 4  # ViT: prefix tokens per prompted layer
    layers: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4, 5])  # ViT blocks with prefixes
    spatial: bool = True  # CNN: additive spatial prompt besides channel scale/shift


class BackboneConfig(Section):
    """Frozen feature extractor."""

    name: str = "efficientnet_lite0"  # efficientnet_lite0 | vit_base_patch16_224 | any timm vit_*
    checkpoint: str | None = None  # local checkpoint path (ViT); None = timm/HF cache
    pretrained: bool = True  # False: random init (tests only)
    feature_layer: int | None = None  # None = backbone default (ViT: block 5; CNN: stage 3)
    key_layer: int | None = None  # None = backbone default mid layer for task keys
    device: str = "auto"  # auto | cpu | cuda
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    # CNN patch features (PatchCore's locally aware aggregation), chosen on real-ad (benchmarks/RESULTS.md):
    pool_size: int = Field(default=3, ge=1, le=9)  # odd neighbourhood side of the local average (1 = none)
    pool_padding: Literal["zeros", "reflect", "valid"] = "zeros"  # border cells: zero-padded / mirrored / valid-only mean
    feature_dim: int | None = Field(default=None, ge=2)  # channel reduction: each stage pooled to feature_dim/2 channels; None = raw concat


class UCADConfig(Section):
    """UCAD: task keys, prompts trained with structure-based contrastive loss, knowledge memory."""

    key_size: int = 196  # k-center-greedy sample of un-prompted patch features per task
    knowledge_size: int | None = None  # coreset rows of prompted patch features per task; None = memory.coreset_ratio within memory.budget_mb
    epochs: int = 0  # prompt epochs; 0 = training-free prompts (measured on real-ad, benchmarks/RESULTS.md)
    lr: float = 1e-2
    batch_size: int = 8
    temperature: float = 0.1
    pairs_per_image: int = 256  # patch pairs sampled per image for the contrastive loss
    early_stopping_patience: int = 0  # 0 = fixed epochs; else stop on held-out train normals
    reweight: bool = False  # PatchCore-style re-weighting of the image score
    normalise_scores: bool = True  # divide scores by the routed task's mean held-out normal score


class PatchCoreConfig(Section):
    """PatchCore baselines: finetune (forgets), replay, per-task oracle."""

    coreset_size: int | None = None  # bank rows per task; None = memory.coreset_ratio within memory.budget_mb
    replay_buffer: int = 20  # images kept from past tasks (patchcore_replay)
    num_neighbors: int = 1
    reweight: bool = False
    normalise_scores: bool = True  # oracle: divide scores by the task's mean held-out normal score


class SAMConfig(Section):
    checkpoint: str | None = None  # ViT-B SAM checkpoint path
    model_type: str = "vit_b"
    points_per_side: int = 16
    pred_iou_thresh: float = 0.86
    stability_score_thresh: float = 0.92
    min_mask_region_area: int = 0


class GroundedSAMConfig(Section):
    dino_checkpoint: str | None = None  # local Grounding DINO directory (transformers format)
    box_threshold: float = 0.3
    text_threshold: float = 0.25
    prompts: dict[str, list[str]] = Field(default_factory=dict)  # product -> text prompts


class FelzenszwalbConfig(Section):
    scale: float = 200.0
    sigma: float = 0.5  # tuned on synthetic object products: object silhouette IoU >= 0.89
    min_size: int = 200


class SLICConfig(Section):
    n_segments: int = 32
    compactness: float = 10.0
    sigma: float = 1.0


class MasksConfig(Section):
    """Offline structure masks (label maps) for the contrastive loss."""

    provider: Literal["felzenszwalb", "slic", "sam", "grounded_sam"] = "felzenszwalb"
    cache_dir: str = "runs/mask_cache"
    image_size: int = 224  # label maps are computed at this size
    workers: int = 2
    device: str = "auto"  # sam / grounded_sam: auto | cpu | cuda
    sam: SAMConfig = Field(default_factory=SAMConfig)
    grounded_sam: GroundedSAMConfig = Field(default_factory=GroundedSAMConfig)
    felzenszwalb: FelzenszwalbConfig = Field(default_factory=FelzenszwalbConfig)
    slic: SLICConfig = Field(default_factory=SLICConfig)


class EvalConfig(Section):
    """Cross-task evaluation."""

    pixel_resolution: int | None = None  # None = model input size
    aupro_fpr_limit: float = 0.3
    threshold_quantile: float = 0.99  # binary threshold from held-out training normals
    overlays_per_task: int = 3
    smoothing_sigma: float = 4.0
    batch_size: int = 16  # images per predict call during evaluation


class TrackingConfig(Section):
    """MLflow tracking and model registry."""

    enabled: bool = True
    uri: str = "sqlite:///runs/mlflow.db"
    experiment_prefix: str = "contad"
    registered_model: str = "contad-detector"


class PromotionConfig(Section):
    """Gate for moving the ``champion`` alias after an incremental run."""

    min_new_image_auroc: float = 0.8
    max_forgetting: float = 0.02  # max drop of image AUROC on every old product


class BanksConfig(Section):
    """Versioned memory-bank store."""

    store_dir: str = "runs/banks"


class MemoryConfig(Section):
    """Per-product memory of the memory-based methods (PatchCore banks, UCAD knowledge)."""

    budget_mb: float = Field(default=2.0, gt=0)  # float32 bytes of memory rows per product (bank / knowledge+key)
    coreset_ratio: float = Field(default=0.1, gt=0, le=1)  # k-center-greedy coreset size as a fraction of patches
    projection_dim: int | None = Field(default=64, ge=1)  # Johnson-Lindenstrauss projection for the greedy selection; None = off


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
    rscl: bool = True  # Eq. 5-6 contrastive loss on Grounded-SAM label maps (off: UCAD's loss on masks.provider)
    contrastive_weight: float = Field(1.0, ge=0.0)  # weight of L_contra in Eq. 8
    cross_loss_weight: float = Field(1.0, ge=0.0)  # weight of L_cross (Eq. 7) in Eq. 8
    key_pull_weight: float = Field(1.0, ge=0.0)  # lambda of L_kp in Eq. 8
    temperature: float = Field(0.5, gt=0.0)  # tau of the RSCL similarities (UCAD code: 0.5)
    cross_temperature: float = Field(0.5, gt=0.0)  # tau of the patch-text similarities in L_cross
    fusion_dim: int = Field(64, ge=4)  # inner width of the two cross-attentions
    fusion_heads: int = Field(4, ge=1)  # attention heads (must divide fusion_dim)
    masks_provider: Literal["grounded_sam", "sam"] = "grounded_sam"  # RSCL label maps ("sam" = the paper's "w/o GD")
    masks_fallback: Literal["felzenszwalb", "slic"] = "felzenszwalb"  # used (and recorded) when those weights are not configured

    @field_validator("fusion_heads")
    @classmethod
    def _heads_divide_dim(cls, value: int, info: Any) -> int:
        dim = info.data.get("fusion_dim")
        if dim is not None and dim % value:
            raise ValueError(f"must divide mtrmb.fusion_dim={dim}")
        return value


class Config(Section):
    """Root configuration: one object for the whole pipeline."""

    method: Literal["ucad", "patchcore_finetune", "patchcore_replay", "patchcore_oracle", "patchcore_joint", "mtrmb"] = "ucad"
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
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    mtrmb: MTRMBConfig = Field(default_factory=MTRMBConfig)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file/key and the problem."""


def _parse_scalar(text: str) -> Any:
    """Parse one override value with YAML rules (``true``, ``3``, ``0.1``, ``null``...)."""
    return yaml.safe_load(text) if text.strip() else ""


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
    """Apply ``key=value`` overrides (dotted keys; list fields take comma-separated values)."""
    out = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if _expected_is_list(Config, key):
            parsed: Any = [] if value.strip() in ("", "[]") else [_parse_scalar(v) for v in value.split(",")]
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


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Config:
    """Load ``path`` (missing file or None = defaults), apply overrides, validate."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None and Path(path).exists():
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        raw = loaded
    elif path is not None and str(path) != "params.yaml":
        raise ConfigError(f"config file {path} does not exist")
    raw = apply_overrides(raw, overrides or [])
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        where = source if not overrides else f"{source} with overrides {overrides}"
        raise ConfigError(_format_errors(exc, where)) from None


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
