"""Exceptions raised by lcaam_patch; every message says how to fix the misuse."""

from __future__ import annotations


class LCAAMError(Exception):
    """Base class of every error lcaam_patch raises on misuse."""


class InvalidOptionError(LCAAMError, ValueError):
    """An option of `apply` has a value outside its choices."""


class NoAttentionFoundError(LCAAMError):
    """`apply` found no attention module that a registered adapter can patch."""


class UnsupportedModuleError(LCAAMError):
    """An attention module uses an option that its adapter cannot honour."""


class UpstreamVersionError(LCAAMError):
    """The installed upstream package is outside the adapter's supported versions."""


class AlreadyPatchedError(LCAAMError):
    """`apply` was called on a model that already carries LCAAM."""


class NotPatchedError(LCAAMError):
    """`remove` or a state-dict helper was called on a model without LCAAM."""


class SequenceTooLongError(LCAAMError, ValueError):
    """A forward pass has more tokens than the mask generator was built for."""


class MissingBoundError(LCAAMError):
    """The adapter cannot infer how many tokens a site sees; the user must say."""


class StateDictError(LCAAMError, KeyError):
    """`load_lcaam_state_dict` got a missing, unexpected or wrongly shaped key."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownAdapterError(LCAAMError, KeyError):
    """A preset or adapter name that is not registered."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class BackendUnavailableError(LCAAMError):
    """A named backend cannot compute a call, or no registered backend can."""


class RegistrationError(LCAAMError, ValueError):
    """`register_adapter` or `register_backend` got something that is not an adapter or a
    backend, or a name already taken."""


class NotAModuleError(LCAAMError, TypeError):
    """A function that takes a model got something that is not an `nn.Module`."""


class WrappedModelError(LCAAMError):
    """`apply` got a model already wrapped by DDP, FSDP, DataParallel or `torch.compile`."""


class GlobalModeError(LCAAMError):
    """`mode="global"` cannot give the exact result of this forward or backward."""


class LauncherError(LCAAMError):
    """`lcaam-patch run` cannot patch the script's model."""


class ForwardReplacedError(LCAAMError):
    """`remove` found a patched module whose forward was replaced after `apply`."""
