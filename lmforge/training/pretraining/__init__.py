"""Pretraining a GPT from scratch (``lmforge pretrain``): ``pretrain()`` and ``PretrainConfig``.

``config.py`` the settings; ``tokens.py`` the corpus as a memory-mapped token file;
``prepare.py`` the run directory, tokenizer, data, model, optimizer and schedule;
``checkpoint.py`` atomic checkpoints; ``devices.py`` the device and autocast dtype;
``run.py`` the loop.
"""

from lmforge.training.pretraining.config import PretrainConfig
from lmforge.training.pretraining.run import PretrainResult, pretrain

__all__ = ["PretrainConfig", "PretrainResult", "pretrain"]
