"""``masksub bench``: the cost of a MaskSub step beside a plain one (``cli``), the reference
steps it times (``steps``: the paper's recipe written independently) and FLOP counting (``flops``).
``evidence`` is the one prepared GPU call (``benchmarks/gpu_evidence.sh``): it runs ``masksub
bench`` and ``masksub compare`` as processes under a time budget and checks the goals.

May import the core (``step``, ``branches``, ``errors``) and timm; never the trainer or an
integration. ``evidence`` alone also imports, on use, the compare table/plot helpers (to merge
the runs), and with ``--in-process`` (the test suite's rehearsal) the whole ``masksub.cli``.
"""
