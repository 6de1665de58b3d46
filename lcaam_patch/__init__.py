"""Retrofit the Learnable Context-Aware Attention Mask (LCAAM) into existing PyTorch models.

    import lcaam_patch
    model = lcaam_patch.apply(model, mode="multilayer", fusion="mul")
"""

from . import backends_flex, backends_triton  # noqa: F401 - register the flex and triton backends
from .attention import (
    AttentionBackend,
    AttentionRequest,
    LowRankMask,
    lcaam_attention,
    register_backend,
)
from .capture import Capture, capture
from .config import LCAAMConfig
from .cost import CostRow, CostTable, cost
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
from .injector import (
    SurveyEntry,
    apply,
    is_patched,
    patched_sites,
    remove,
    reset_generators,
    survey,
)
from .lowrank import LowRankGenerator
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
    "Capture",
    "CostRow",
    "CostTable",
    "InvalidOptionError",
    "LCAAMConfig",
    "LCAAMError",
    "LCAAMSite",
    "LowRankGenerator",
    "LowRankMask",
    "MaskGenerator",
    "MissingBoundError",
    "NoAttentionFoundError",
    "NotPatchedError",
    "PatchSummary",
    "SequenceTooLongError",
    "SiteGeometry",
    "SiteSummary",
    "StateDictError",
    "SurveyEntry",
    "UnknownAdapterError",
    "UnsupportedModuleError",
    "UpstreamVersionError",
    "apply",
    "capture",
    "cost",
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
    "reset_generators",
    "summary",
    "survey",
    "unregister_adapter",
]
