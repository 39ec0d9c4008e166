"""``masksub inspect``: what MaskSub does to one model, mode by mode (family and why, what the sub-branch drops, cost, gradient ratio, warnings).

May import the core (``step``, ``branches``, ``loss``, ``errors``) and timm (to build a model by name); never the trainer or an integration.
"""

from .report import ModeReport, describe, inspect_model, load_model

__all__ = ["ModeReport", "describe", "inspect_model", "load_model"]
