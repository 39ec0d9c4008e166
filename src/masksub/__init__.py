"""MaskSub: masked sub-branch training for any supervised PyTorch recipe.

A user with their own loop needs three names: ``MaskSub`` (the step), ``sub_branch`` (the
context that makes ``model(x)`` the sub-branch) and ``relaxed_loss`` (Eq. 3).
"""

from .branches import family_names, prepare, register_family, sub_branch
from .errors import MaskSubError
from .loss import relaxed_loss
from .step import MaskSub, StepOutput

__version__ = "0.1.0"

__all__ = [
    "MaskSub", "MaskSubError", "StepOutput", "family_names", "prepare", "register_family",
    "relaxed_loss", "sub_branch", "__version__",
]


def __getattr__(name: str):  # ``masksub.inspect.inspect_model`` after a plain ``import masksub``
    if name == "inspect":
        import importlib

        return importlib.import_module(".inspect", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
