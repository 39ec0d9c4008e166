"""``masksub bench``: the cost of a MaskSub step beside a plain one (``cli``), the reference
steps it times (``steps``: the paper's recipe written independently) and FLOP counting (``flops``).

May import the core (``step``, ``branches``, ``errors``) and timm; never the trainer or an integration.
"""
