"""MaskSub where its users already train: the Hugging Face Trainer and open_clip.

Each module imports its framework on use, so ``import masksub.integrations`` costs nothing:
``masksub.integrations.hf`` needs transformers (+ accelerate), ``masksub.integrations.clip``
needs open_clip.
"""
