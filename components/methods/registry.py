"""Build the continual method named by ``cfg.method``."""

from __future__ import annotations

from components.backbones.base import PromptedBackbone
from components.config import Config
from components.errors import ContadError
from components.methods.base import ContinualMethod
from components.methods.ib_iumad import IBIUMAD
from components.methods.iuf import IUF
from components.methods.lemo import LeMO
from components.methods.mtrmb import MTRMB
from components.methods.patchcore import PatchCoreFinetune, PatchCoreJoint, PatchCoreOracle, PatchCoreReplay
from components.methods.ucad import UCAD
from components.segment.fallback import MasksChoice, choose_masks

METHODS: dict[str, type[ContinualMethod]] = {
    cls.name: cls for cls in (UCAD, PatchCoreFinetune, PatchCoreReplay, PatchCoreOracle, PatchCoreJoint, MTRMB, LeMO, IUF, IBIUMAD)
}


def build_method(cfg: Config, backbone: PromptedBackbone) -> ContinualMethod:
    """A fresh, untrained ``cfg.method`` on top of ``backbone``."""
    try:
        cls = METHODS[cfg.method]
    except KeyError:
        raise ContadError(f"method: unknown method {cfg.method!r} (choose from {sorted(METHODS)})") from None
    return cls(cfg, backbone)


def structure_masks(cfg: Config) -> MasksChoice:
    """The label-map provider a run of ``cfg.method`` uses (a method may ask for its own, with a fallback)."""
    chooser = getattr(METHODS.get(cfg.method), "structure_masks", None)
    if chooser is not None:
        return chooser(cfg)
    return choose_masks(cfg.masks, cfg.masks.provider, None)
