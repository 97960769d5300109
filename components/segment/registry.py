"""Build the configured mask provider (model-based providers are imported only when asked for)."""

from __future__ import annotations

from components.config import MasksConfig
from components.segment.provider import MaskProvider

PROVIDERS = ("felzenszwalb", "slic", "sam", "grounded_sam")


def make_provider(cfg: MasksConfig) -> MaskProvider:
    """The ``cfg.provider`` mask provider; SAM / Grounding DINO load their local checkpoints."""
    if cfg.provider == "felzenszwalb":
        from components.segment.classical import FelzenszwalbProvider

        return FelzenszwalbProvider(cfg)
    if cfg.provider == "slic":
        from components.segment.classical import SLICProvider

        return SLICProvider(cfg)
    if cfg.provider == "sam":
        from components.segment.sam import SAMProvider

        return SAMProvider(cfg)
    if cfg.provider == "grounded_sam":
        from components.segment.grounded_sam import GroundedSAMProvider

        return GroundedSAMProvider(cfg)
    raise ValueError(f"masks.provider: unknown provider {cfg.provider!r}; one of {PROVIDERS}")
