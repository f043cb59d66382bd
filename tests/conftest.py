import random

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A real byte-level BPE trained on a few sentences (seconds)."""
    from mmdiff.tokenizer import train_tokenizer

    texts = ["how many red circles are there?", "where is the blue square?", "yes", "no", "top left",
             "a small red circle at the top left", "describe the image."] * 20
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="session")
def world_tokenizer():
    """The shipped recipe's tokenizer on a smaller corpus: questions and answers of the world."""
    from mmdiff.data.questions import world_texts
    from mmdiff.tokenizer import train_tokenizer

    return train_tokenizer(world_texts(3000, seed="tests"), vocab_size=768)
