import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402

from distrag.models.tiny import make_tiny_causal_lm, make_tiny_encoder  # noqa: E402


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    """A 2-layer random BERT with a sentence-transformers mean-pooling config."""
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny_encoder"))


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A 2-layer random Llama with a ChatML chat template."""
    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny_lm"))
