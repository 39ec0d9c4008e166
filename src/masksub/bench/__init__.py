"""``masksub bench``: the cost of a MaskSub step beside a plain one (``cli``), the reference
steps it times (``steps``: the paper's recipe written independently) and FLOP counting (``flops``).

May import the core (``step``, ``branches``, ``errors``) and timm; never the trainer or an
integration. The project's own GPU campaign, which runs ``masksub bench`` and ``masksub compare``
as commands under a time budget, is ``benchmarks/gpu_evidence.py``, outside the package.
"""
