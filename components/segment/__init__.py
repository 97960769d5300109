"""Offline structure masks: providers (felzenszwalb, slic, sam, grounded_sam), cache, grid helpers."""

from components.segment.cache import MaskCache, build_command, label_maps_for
from components.segment.provider import MaskProvider
from components.segment.registry import make_provider

__all__ = ["MaskCache", "MaskProvider", "build_command", "label_maps_for", "make_provider"]
