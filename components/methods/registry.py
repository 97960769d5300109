"""The registered continual methods: the ONE list of method names, and building the one ``cfg.method`` names.

``METHOD_CLASSES`` maps each name to its class as ``"module:Class"``; this module imports nothing heavy,
so the configuration can validate method names against it without loading torch. ``METHODS`` is the
same registry as classes (imported on first access). A method's capabilities are its class attributes
(``components.methods.base``); nothing else in the code lists method names.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from components.backbones.base import PromptedBackbone
    from components.config import Config
    from components.methods.base import ContinualMethod

METHOD_CLASSES: dict[str, str] = {
    "ucad": "components.methods.ucad:UCAD",
    "patchcore_finetune": "components.methods.patchcore:PatchCoreFinetune",
    "patchcore_replay": "components.methods.patchcore:PatchCoreReplay",
    "patchcore_oracle": "components.methods.patchcore:PatchCoreOracle",
    "patchcore_joint": "components.methods.patchcore:PatchCoreJoint",
    "mtrmb": "components.methods.mtrmb:MTRMB",
    "lemo": "components.methods.lemo:LeMO",
    "iuf": "components.methods.iuf:IUF",
    "ib_iumad": "components.methods.ib_iumad:IBIUMAD",
}


class _Registry(Mapping[str, "type[ContinualMethod]"]):
    """``METHOD_CLASSES`` as classes, each imported when first asked for."""

    def __getitem__(self, name: str) -> type[ContinualMethod]:
        module, _, attribute = METHOD_CLASSES[name].partition(":")
        cls = getattr(import_module(module), attribute)
        if cls.name != name:
            raise AssertionError(f"registry: {METHOD_CLASSES[name]} is named {cls.name!r}, registered as {name!r}")
        return cls

    def __iter__(self) -> Iterator[str]:
        return iter(METHOD_CLASSES)

    def __len__(self) -> int:
        return len(METHOD_CLASSES)


METHODS: Mapping[str, type[ContinualMethod]] = _Registry()


def method_class(name: str) -> type[ContinualMethod]:
    """The registered class of method ``name`` (its capabilities are class attributes)."""
    from components.errors import ContadError

    if name not in METHOD_CLASSES:
        raise ContadError(f"method: unknown method {name!r} (choose from {sorted(METHOD_CLASSES)})")
    return METHODS[name]


def build_method(cfg: Config, backbone: PromptedBackbone) -> ContinualMethod:
    """A fresh, untrained ``cfg.method`` on top of ``backbone``."""
    return method_class(cfg.method)(cfg, backbone)


def uses_structure_masks(cfg: Config) -> bool:
    """Whether ``cfg.method`` trains with structure label maps (its ``needs_structure_masks``)."""
    return method_class(cfg.method).needs_structure_masks(cfg)
