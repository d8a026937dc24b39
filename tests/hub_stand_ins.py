"""Stand-ins for hub models, built and saved locally, so the real path is tested offline.

`save_gpt2_like(folder)`: a GPT-2 with a byte-level BPE tokenizer that has no pad token (as the hub's
"gpt2"), saved with `save_pretrained`. `save_bert_classifier(folder)`: a BERT-style sentiment
classifier with its own WordPiece tokenizer and NEGATIVE/POSITIVE labels (as the hub's
distilbert-sst-2). Weights are random: these test the plumbing, not the quality.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (BertConfig, BertForSequenceClassification, GenerationConfig, GPT2Config, GPT2LMHeadModel,
                          PreTrainedTokenizerFast)

import llm_lab as lab


def _training_texts(n: int = 400) -> list:
    return [row["text"] for row in lab.make_corpus(n, seed=0)] + [" ".join(lab.lab_vocabulary())]


def gpt2_like_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Byte-level BPE like GPT-2's: '<|endoftext|>' is bos and eos, and there is no pad token."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_training_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", model_max_length=1024)


def save_gpt2_like(folder, n_embd: int = 32, n_layer: int = 2, n_head: int = 2, n_positions: int = 1024,
                   dtype=torch.float32, generation_config: GenerationConfig | None = None, seed: int = 0) -> Path:
    folder = Path(folder)
    tokenizer = gpt2_like_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).to(dtype)
    if generation_config is not None:
        model.generation_config = generation_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def bert_like_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """WordPiece with BERT's special tokens: [CLS] text [SEP], right padding with [PAD]."""
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend.train_from_iterator(_training_texts(), trainer=trainers.WordPieceTrainer(vocab_size=vocab_size,
                                                                                     special_tokens=special))
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", backend.token_to_id("[CLS]")),
                                                 ("[SEP]", backend.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)


def save_bert_classifier(folder, hidden_size: int = 32, n_layers: int = 1, dtype=torch.float32, seed: int = 0) -> Path:
    folder = Path(folder)
    tokenizer = bert_like_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=n_layers,
                        num_attention_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=512,
                        num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    BertForSequenceClassification(config).to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
