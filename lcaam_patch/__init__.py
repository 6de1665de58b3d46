"""Retrofit the Learnable Context-Aware Attention Mask (LCAAM) into existing PyTorch models.

    import lcaam_patch
    model = lcaam_patch.apply(model, mode="multilayer", fusion="mul")

Layers: `backends` compute the fused attention, `adapters` know one upstream each,
`patching` (with `site`, `generators`, `config`) is the core that applies and removes
LCAAM, `tools` inspect a patched model, `cli` is the `lcaam-patch` command.
"""

from .adapters import (
    Adapter,
    get_adapter,
    presets,
    register_adapter,
    registered_adapters,
    unregister_adapter,
)
from .backends import (
    AttentionBackend,
    AttentionCall,
    AttentionResult,
    CallSpec,
    LowRankMask,
    lcaam_attention,
    register_backend,
    unregister_backend,
)
from .compat import install_legacy_aliases
from .config import LCAAMConfig
from .errors import (
    AlreadyPatchedError,
    BackendUnavailableError,
    ForwardReplacedError,
    GlobalModeError,
    InvalidOptionError,
    LauncherError,
    LCAAMError,
    MissingBoundError,
    NoAttentionFoundError,
    NotAModuleError,
    NotPatchedError,
    RegistrationError,
    SequenceTooLongError,
    StateDictError,
    UnknownAdapterError,
    UnsupportedModuleError,
    UpstreamVersionError,
    WrappedModelError,
)
from .generators import LCAAMGenerator, LowRankGenerator, MaskGenerator
from .patching import apply, is_patched, patched_sites, remove, reset_generators
from .pretrained import from_pretrained, save_pretrained
from .site import LCAAMSite, SiteGeometry, is_lcaam_key
from .state_dict import lcaam_state_dict, load_lcaam_state_dict
from .tools.capture import Capture, capture
from .tools.cost import CostRow, CostTable, cost
from .tools.summary import PatchSummary, SiteSummary, summary
from .tools.survey import SurveyEntry, survey
from .version import __version__

install_legacy_aliases()

__all__ = [
    "Adapter",
    "AlreadyPatchedError",
    "AttentionBackend",
    "AttentionCall",
    "AttentionResult",
    "BackendUnavailableError",
    "CallSpec",
    "Capture",
    "CostRow",
    "CostTable",
    "ForwardReplacedError",
    "GlobalModeError",
    "InvalidOptionError",
    "LCAAMConfig",
    "LCAAMError",
    "LCAAMGenerator",
    "LCAAMSite",
    "LauncherError",
    "LowRankGenerator",
    "LowRankMask",
    "MaskGenerator",
    "MissingBoundError",
    "NoAttentionFoundError",
    "NotAModuleError",
    "NotPatchedError",
    "PatchSummary",
    "RegistrationError",
    "SequenceTooLongError",
    "SiteGeometry",
    "SiteSummary",
    "StateDictError",
    "SurveyEntry",
    "UnknownAdapterError",
    "UnsupportedModuleError",
    "UpstreamVersionError",
    "WrappedModelError",
    "__version__",
    "apply",
    "capture",
    "cost",
    "from_pretrained",
    "get_adapter",
    "is_lcaam_key",
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
    "save_pretrained",
    "summary",
    "survey",
    "unregister_adapter",
    "unregister_backend",
]
