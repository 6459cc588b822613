"""Fixtures of the LLM tests."""
import pytest


def train_bpe(vocab_size: int = 400):
    """A byte-level BPE of ``vocab_size`` tokens trained in memory on stdlib docstrings (no files, no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from smallify.llm.text import default_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(default_texts()[:200], trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return train_bpe()
