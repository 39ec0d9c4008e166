"""``masksub compare`` and ``masksub plot``: settings run side by side through the trainer
(``cli``), their results table (``table``) and the Figure 2 plots (``plot``).

May import the core and the trainer (``masksub.train``), and matplotlib on use; never an integration.
"""
