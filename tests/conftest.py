"""Fixtures shared by the test modules."""
import pytest
import torch

import llm_lab as lab


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory):
    """A tiny SFT model, its tokenizer and a tiny lab reward model, trained in seconds into a temporary cache."""
    cache = tmp_path_factory.mktemp("cache")
    sft, tokenizer, _ = lab.load_sft_model(lab.SFTConfig(steps=20, n_sentences=300, n_embd=32, n_head=2),
                                             cache_dir=cache, progress=False, device=torch.device("cpu"))
    reward_model, _ = lab.load_lab_reward_model(lab.RewardConfig(steps=5, n_pairs=100, n_embd=32, n_head=2),
                                                  cache_dir=cache, progress=False, device=torch.device("cpu"))
    return sft, tokenizer, reward_model
