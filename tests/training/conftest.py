"""Fixtures of the training tests: one torch thread, and the tiny Llama scaled to train fast."""

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.models.loader import load_model


@pytest.fixture
def one_thread():
    """One intra-op thread: at these tiny shapes a second thread only adds synchronization, and
    on a loaded 2-core machine each parallel region waits for a descheduled thread (10x slower
    steps measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def load_scaled():
    """``load_scaled(model_dir)``: a tiny model for training, its matrices scaled x10 (init std
    0.2): at std 0.02 its logits stay within about +-1 (tied embeddings), and no adapter moves
    the loss far from ln(vocab); at 0.2 a few steps teach it a fixed answer."""
    def load(model_dir):
        loaded = load_model(ModelConfig(model=str(model_dir), dtype="float32"),
                            for_training=True)
        with torch.no_grad():
            for p in loaded.model.parameters():
                if p.dim() == 2:
                    p.mul_(10.0)
        return loaded
    return load
