"""Retrofit the Learnable Context-Aware Attention Mask (LCAAM) into existing PyTorch models.

    import lcaam_patch
    model = lcaam_patch.apply(model, mode="multilayer", fusion="mul")
"""

from .attention import AttentionBackend, AttentionRequest, lcaam_attention, register_backend
from .config import LCAAMConfig
from .errors import (
    AlreadyPatchedError,
    InvalidOptionError,
    LCAAMError,
    MissingBoundError,
    NoAttentionFoundError,
    NotPatchedError,
    SequenceTooLongError,
    StateDictError,
    UnknownAdapterError,
    UnsupportedModuleError,
    UpstreamVersionError,
)
from .generator import MaskGenerator
from .injector import apply, is_patched, patched_sites, remove
from .registry import (
    Adapter,
    SiteGeometry,
    get_adapter,
    presets,
    register_adapter,
    registered_adapters,
    unregister_adapter,
)
from .site import LCAAMSite
from .state import lcaam_state_dict, load_lcaam_state_dict
from .summary import PatchSummary, SiteSummary, summary

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AlreadyPatchedError",
    "AttentionBackend",
    "AttentionRequest",
    "InvalidOptionError",
    "LCAAMConfig",
    "LCAAMError",
    "LCAAMSite",
    "MaskGenerator",
    "MissingBoundError",
    "NoAttentionFoundError",
    "NotPatchedError",
    "PatchSummary",
    "SequenceTooLongError",
    "SiteGeometry",
    "SiteSummary",
    "StateDictError",
    "UnknownAdapterError",
    "UnsupportedModuleError",
    "UpstreamVersionError",
    "apply",
    "get_adapter",
    "is_patched",
    "lcaam_attention",
    "lcaam_state_dict",
    "load_lcaam_state_dict",
    "patched_sites",
    "presets",
    "register_adapter",
    "register_backend",
    "registered_adapters",
    "remove",
    "summary",
    "unregister_adapter",
]
