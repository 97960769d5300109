"""Which structure-mask provider a run really uses, and why (recorded so ablations never run on the wrong masks).

A method may ask for a model provider (MTRMB's RSCL asks for ``grounded_sam``). When that provider's
weights are not configured (their config key is ``null``), a fallback provider is used instead and
the choice is reported: ``metrics.json`` -> ``masks_provider_used`` (+ requested provider and reason),
the run report and an MLflow param. A configured path that does not exist is NOT a fallback case:
the provider raises ``WeightsError`` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from components.config import Config, MasksConfig

# Weight keys each model provider needs, in the order they are checked.
PROVIDER_WEIGHT_KEYS: dict[str, tuple[str, ...]] = {
    "sam": ("masks.sam.checkpoint",),
    "grounded_sam": ("masks.grounded_sam.dino_checkpoint", "masks.sam.checkpoint"),
}


@dataclass(frozen=True)
class MasksChoice:
    """The provider a run asked for, the one it uses, why they differ, and the config to build it with."""

    requested: str
    used: str
    reason: str | None
    config: MasksConfig

    @property
    def fell_back(self) -> bool:
        return self.used != self.requested

    def record(self) -> dict[str, Any]:
        """``metrics.json`` entries: ``masks_provider_used``, ``masks_provider_requested``, ``masks_fallback_reason``."""
        return {"masks_provider_used": self.used, "masks_provider_requested": self.requested, "masks_fallback_reason": self.reason}


def _config_value(cfg: MasksConfig, dotted_key: str) -> Any:
    value: Any = cfg
    for part in dotted_key.split(".")[1:]:  # drop the leading "masks"
        value = getattr(value, part)
    return value


def unconfigured_weights(cfg: MasksConfig, provider: str) -> str | None:
    """The first weight key ``provider`` needs that is not set (None: all set, or the provider needs none)."""
    for key in PROVIDER_WEIGHT_KEYS.get(provider, ()):
        if _config_value(cfg, key) is None:
            return key
    return None


def choose_masks(cfg: MasksConfig, requested: str, fallback: str | None) -> MasksChoice:
    """``requested`` when its weights are configured (or no ``fallback`` is allowed), else ``fallback``."""
    missing = unconfigured_weights(cfg, requested)
    if missing is None or fallback is None:
        used, reason = requested, None
    else:
        used, reason = fallback, f"{missing} is not set (weights are never downloaded)"
    config = cfg if cfg.provider == used else cfg.model_copy(update={"provider": used})
    return MasksChoice(requested=requested, used=used, reason=reason, config=config)


def structure_masks(cfg: Config) -> MasksChoice:
    """The label-map provider a run of ``cfg.method`` uses: the method's own choice (a ``structure_masks``
    classmethod, e.g. MTRMB's provider with a fallback) or ``masks.provider``."""
    from components.methods.registry import method_class

    chooser = getattr(method_class(cfg.method), "structure_masks", None)
    if chooser is not None:
        return chooser(cfg)
    return choose_masks(cfg.masks, cfg.masks.provider, None)
