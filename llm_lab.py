"""The small-LLM lab: everything RLHF needs, built inside the course in seconds on a CPU.

The Hugging Face hub is often out of reach (and always is in CI), so the lab makes its own:

    corpus of short movie-review sentences  ->  word-level tokenizer
    -> small GPT-2 trained as a causal LM (the SFT model)
    -> GPT-2 reward models trained on preference pairs (Bradley-Terry)

The corpus generator knows every word's sentiment and the grammar of its sentences, so
``gold_label`` can judge any text: the ground truth the learned reward model is held against.

Sections
--------
1. Corpus and grammar, the gold labeller (``make_corpus``, ``gold_label``).
2. Tokenizer and configs (``lab_tokenizer``, ``encode_texts``, ``SFTConfig``, ``RewardConfig``).
3. The artifact cache (safetensors + a manifest of config and checksums, in ``artifacts/``).
4. Training: the SFT model and the Bradley-Terry reward models (``preference_pairs``).
5. Sampling (``generate_responses``).
6. The real path: models from the hub or a local folder (``load_policy``, ``load_reward_model``).

Used by intuition_model, llm_ppo, llm_ppo_correct_dropout and llm_grpo; ``rlhf.py`` builds on it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig,
                          GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast)

from utils import count_parameters, get_device, progress_bar, set_seed

LAB_DIR = Path(__file__).resolve().parent / "artifacts"  # git-ignored cache of trained models
LAB_VERSION = 6  # part of every cache key: bump it when the corpus, pairs or training code change
LAB_THREADS = 2  # the lab trains on this many CPU threads, whatever the machine (see _lab_threads)
# GPT-2's tanh-approximated GELU, computed by one fused torch kernel instead of the five elementwise ops of
# "gelu_new": the same function, and a 10 % faster training step for models this small
LAB_ACTIVATION = "gelu_pytorch_tanh"


# ---------------------------------------------------------------------------
# 1. Corpus and grammar, the gold labeller
# ---------------------------------------------------------------------------

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"

# Neutral openings: the prompts. Subject + linking verb ("the movie was"), or a
# clause that continues with "it was ..." / "we ..." ("i watched this film with my kids and").
SUBJECTS = ("the movie", "the film", "this movie", "this film", "the story", "the acting",
            "the ending", "the music", "the plot", "the cast")
LINKING_VERBS = ("was", "is", "felt", "seemed")
CLAUSE_OPENINGS = ("i watched this film with my kids and", "we saw it last night and",
                   "i went to see it with friends and", "my wife picked this movie and",
                   "we rented it on a rainy sunday and", "i finally saw the film and")
# Held-out prompts: never in the SFT corpus nor in the reward model's training pairs.
HELD_OUT_OPENINGS = ("the music seemed", "this film felt", "the plot is", "the cast was",
                     "the ending felt", "the story is")  # every word also occurs in training openings

ADVERBS = ("really", "truly", "quite", "very", "so", "simply")
POSITIVE_ADJECTIVES = ("great", "wonderful", "brilliant", "moving", "funny", "beautiful",
                       "charming", "superb", "delightful", "excellent")
NEGATIVE_ADJECTIVES = ("boring", "awful", "terrible", "dull", "painful", "stupid", "weak",
                       "messy", "predictable", "bad")
# Tails: a fixed phrase, or "and <who> <verb> <what>" ("and we all enjoyed every minute").
TAIL_SUBJECTS = ("i", "we", "we all", "my kids")
POSITIVE_VERBS, NEGATIVE_VERBS = ("loved", "enjoyed"), ("hated", "regretted")
TAIL_OBJECTS = ("it", "every minute", "the whole thing")
POSITIVE_TAILS = ("and i would gladly watch it again", "from start to finish", "and a real joy to watch") + tuple(
    f"and {who} {verb} {what}" for who in TAIL_SUBJECTS for verb in POSITIVE_VERBS for what in TAIL_OBJECTS)
NEGATIVE_TAILS = ("and i want my money back", "from start to finish", "and a waste of time") + tuple(
    f"and {who} {verb} {what}" for who in TAIL_SUBJECTS for verb in NEGATIVE_VERBS for what in TAIL_OBJECTS)
# After a clause opening ("... with my kids and"): "it was <description>" or "<who> <verb> <what>".
POSITIVE_CLAUSES = ("we laughed all the way through",) + tuple(
    f"{who} {verb} {what}" for who in TAIL_SUBJECTS for verb in POSITIVE_VERBS for what in TAIL_OBJECTS)
NEGATIVE_CLAUSES = ("we fell asleep halfway", "we walked out early") + tuple(
    f"{who} {verb} {what}" for who in TAIL_SUBJECTS for verb in NEGATIVE_VERBS for what in TAIL_OBJECTS)

POSITIVE_WORDS = frozenset({*POSITIVE_ADJECTIVES, *POSITIVE_VERBS, "gladly", "joy", "laughed"})
NEGATIVE_WORDS = frozenset({*NEGATIVE_ADJECTIVES, *NEGATIVE_VERBS, "waste", "money", "asleep", "walked"})
GOLD_LABELS = ("positive", "negative", "mixed", "malformed")


def _alternatives(words) -> str:
    return "(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


def all_openings() -> tuple:
    """Every opening (prompt) of the grammar, training and held-out."""
    return tuple(f"{s} {v}" for s in SUBJECTS for v in LINKING_VERBS) + CLAUSE_OPENINGS


def train_openings() -> tuple:
    return tuple(o for o in all_openings() if o not in HELD_OUT_OPENINGS)


def _build_grammar_regex():
    adjective = _alternatives(POSITIVE_ADJECTIVES + NEGATIVE_ADJECTIVES)
    tail = _alternatives(set(POSITIVE_TAILS + NEGATIVE_TAILS))
    description = rf"(?:{_alternatives(ADVERBS)} )?{adjective}(?: and {adjective})?(?: {tail})? \."
    linking = rf"{_alternatives(SUBJECTS)} {_alternatives(LINKING_VERBS)} {description}"
    clause = rf"{_alternatives(CLAUSE_OPENINGS)} (?:it was {description}|{_alternatives(POSITIVE_CLAUSES + NEGATIVE_CLAUSES)} \.)"
    return re.compile(rf"(?:{linking}|{clause})")


_GRAMMAR = _build_grammar_regex()


def normalize_text(text: str) -> str:
    """Canonical form of a review: lower case, single spaces, the full stop as its own word."""
    return " ".join(text.lower().replace(".", " . ").split())


def gold_label(text: str) -> str:
    """The generator's own verdict on a text (prompt + response).

    'malformed' unless the text is exactly one sentence of the corpus grammar
    (opening + continuation + full stop); otherwise 'positive' / 'negative'
    when every sentiment-bearing word agrees, 'mixed' when both kinds occur.
    """
    text = normalize_text(text)
    if not _GRAMMAR.fullmatch(text):
        return "malformed"
    words = set(text.split())
    positive, negative = bool(words & POSITIVE_WORDS), bool(words & NEGATIVE_WORDS)
    if positive and negative:
        return "mixed"
    return "positive" if positive else "negative" if negative else "malformed"


def gold_labels(texts) -> list:
    return [gold_label(t) for t in texts]


def _continuation(rng: np.random.Generator, opening: str, positive: bool) -> str:
    """One grammatical, single-sentiment continuation of ``opening``."""
    adjectives = POSITIVE_ADJECTIVES if positive else NEGATIVE_ADJECTIVES
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    if opening in CLAUSE_OPENINGS and rng.random() < 0.5:
        return pick(POSITIVE_CLAUSES if positive else NEGATIVE_CLAUSES) + " ."
    words = []
    if rng.random() < 0.5:
        words.append(pick(ADVERBS))
    first = pick(adjectives)
    words.append(first)
    if rng.random() < 0.4:
        words += ["and", pick([a for a in adjectives if a != first])]
    if rng.random() < 0.5:
        words.append(pick(POSITIVE_TAILS if positive else NEGATIVE_TAILS))
    words.append(".")
    prefix = "it was " if opening in CLAUSE_OPENINGS else ""
    return prefix + " ".join(words)


def make_corpus(n_sentences: int = 5000, seed: int = 0, openings=None):
    """Seeded corpus of reviews, half positive and half negative.

    Returns a list of dicts ``{'prompt', 'response', 'text', 'label'}``;
    by default only the training openings are used (held-out prompts stay unseen).
    """
    if n_sentences < 2:
        raise ValueError(f"n_sentences must be >= 2, got {n_sentences}")
    rng = np.random.default_rng(seed)
    openings = tuple(openings or train_openings())
    corpus = []
    for i in range(n_sentences):
        positive = i % 2 == 0  # exactly half each
        opening = openings[int(rng.integers(len(openings)))]
        response = _continuation(rng, opening, positive)
        corpus.append({"prompt": opening, "response": response, "text": f"{opening} {response}",
                       "label": "positive" if positive else "negative"})
    order = rng.permutation(len(corpus))
    return [corpus[i] for i in order]


def lab_vocabulary() -> list:
    """Every word the grammar can produce (the tokenizer is trained on all of them)."""
    words = set(".")
    for phrase in (*all_openings(), *ADVERBS, *POSITIVE_ADJECTIVES, *NEGATIVE_ADJECTIVES, *POSITIVE_TAILS,
                   *NEGATIVE_TAILS, *POSITIVE_CLAUSES, *NEGATIVE_CLAUSES, "it was and"):
        words.update(phrase.split())
    return sorted(words)


# ---------------------------------------------------------------------------
# 2. Tokenizer and configs
# ---------------------------------------------------------------------------

def train_tokenizer(texts):
    """A word-level tokenizer trained with the ``tokenizers`` library, wrapped for ``transformers``.

    Special tokens: <pad> (id 0), <bos>, <eos>, <unk>. Padding is on the left,
    as generation with a batch of prompts needs.
    """
    backend = Tokenizer(models.WordLevel(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, BOS, EOS, UNK], min_frequency=1)
    backend.train_from_iterator(list(texts), trainer=trainer)
    # Every encoded text starts with <bos>, so the model always has a first token to condition on.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, backend.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, padding_side="left")


def position_ids_from_mask(attention_mask):
    """Positions 0, 1, 2, ... counted over real tokens only (left padding shifts nothing)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)


@dataclass(frozen=True)
class SFTConfig:
    """Everything that decides the SFT model; a change means a retrain (it is the cache key)."""

    seed: int = 0
    n_sentences: int = 5000   # corpus size, half positive, half negative
    n_embd: int = 96          # width of the residual stream
    n_layer: int = 2
    n_head: int = 4
    n_positions: int = 48     # context length: longest prompt + response fits with room to spare
    dropout: float = 0.1      # GPT-2's usual value, in embeddings, attention and residuals
    steps: int = 700          # the held-out loss reaches its floor (~1.03 nats/token) by then, for seeds 0-2;
    batch_size: int = 64      # with 400-500 steps it can stall at ~1.08, where a third of the samples mix sentiments
    lr: float = 5e-3


@dataclass(frozen=True)
class RewardConfig:
    """Everything that decides a lab reward model (the cache key)."""

    seed: int = 0
    hardened: bool = True     # also reject degenerate answers: bare prompt, truncated, word salad
    n_pairs: int = 4000
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_positions: int = 48
    steps: int = 200
    batch_size: int = 64
    lr: float = 2e-3


def lab_tokenizer():
    """The lab's tokenizer: trained on the default corpus plus every grammar word (deterministic)."""
    texts = [row["text"] for row in make_corpus(2000, seed=0)] + [" ".join(lab_vocabulary())]
    return train_tokenizer(texts)


def encode_texts(tokenizer, texts, device=None, add_eos: bool = False):
    """Tokenize a batch with left padding: returns input_ids, attention_mask, position_ids, each (batch, seq_len)."""
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: give at least one text")
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    if add_eos:  # one <eos> column on the right: with left padding every row ends there, so it is real for all
        eos = torch.full((len(texts), 1), tokenizer.eos_token_id, dtype=input_ids.dtype)
        input_ids = torch.cat([input_ids, eos], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(eos)], dim=1)
    out = {"input_ids": input_ids, "attention_mask": attention_mask,
           "position_ids": position_ids_from_mask(attention_mask)}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


# ---------------------------------------------------------------------------
# 3. The artifact cache
# ---------------------------------------------------------------------------

def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _config_key(kind: str, config) -> str:
    payload = json.dumps({"kind": kind, "lab_version": LAB_VERSION, **asdict(config)}, sort_keys=True)
    return f"{kind}-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"


def _save_artifact(folder: Path, kind: str, config, model, tokenizer, info: dict) -> None:
    """save_pretrained (safetensors) into a temporary folder, then move it into place atomically."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    files = {p.name: _file_digest(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    manifest = {"kind": kind, "config": asdict(config), "files": files, "info": info}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _load_artifact(folder: Path, kind: str, config, model_class):
    """Load a cached artifact, or return None (with the reason printed) when it cannot be trusted."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("kind") != kind or manifest.get("config") != asdict(config):
            raise ValueError("its config differs from the requested one")
        for name, digest in manifest["files"].items():
            if _file_digest(folder / name) != digest:
                raise ValueError(f"{name} is damaged (checksum mismatch)")
        model = model_class.from_pretrained(folder, use_safetensors=True, local_files_only=True)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # a damaged or stale cache is retrained, never used
        print(f"cached {kind} model in {folder.name} not used ({err}); training it again")
        return None
    return model, tokenizer, manifest["info"]


# ---------------------------------------------------------------------------
# 4. Training: the SFT model and the Bradley-Terry reward models
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def _lab_threads():
    """Train the lab's models on a fixed number of CPU threads (LAB_THREADS).

    torch splits matrix products differently for different thread counts, so the
    trained weights differ in the last bits; with a fixed count they come out the
    same whichever notebook (or 2-core machine) trains them first, and the stored
    notebook outputs stay valid."""
    previous = torch.get_num_threads()
    torch.set_num_threads(LAB_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _epoch_batches(n_rows: int, batch_size: int, steps: int, generator, lengths=None):
    """Row indices for ``steps`` training batches, epoch after epoch (every row once per epoch).

    Each epoch shuffles the rows and cuts them into full batches in random order.
    With ``lengths`` the shuffled rows are first sorted by length (a stable sort
    keeps the shuffle within a length), so that each batch holds rows of about
    the same length and, trimmed to its longest row, spends almost no compute on
    padding. That suits the reward model (every pair weighs the same in its loss);
    the SFT model does not use it: its loss averages over the tokens of a batch,
    so batches of short sentences would outweigh the long sentences that teach a
    review to keep its sentiment (measured: a third of the samples came out mixed).
    """
    batches = []
    while len(batches) < steps:
        order = torch.randperm(n_rows, generator=generator)
        if lengths is not None:
            order = order[torch.sort(torch.as_tensor(lengths)[order], stable=True).indices]
        epoch = [rows for rows in order.split(batch_size) if len(rows) == batch_size]
        if not epoch:
            raise ValueError(f"batch_size ({batch_size}) is larger than the {n_rows} training rows")
        batches.extend(epoch[i] for i in torch.randperm(len(epoch), generator=generator))
    return batches[:steps]


def train_sft_model(config: SFTConfig = SFTConfig(), tokenizer=None, progress: bool = True, device=None):
    """Train a small GPT-2 from scratch on the corpus as a causal LM.

    Returns ``(model, tokenizer, info)``; ``info`` holds the loss curve, the
    held-out loss, the training time and the parameter count.
    """
    device = device or get_device()
    tokenizer = tokenizer or lab_tokenizer()
    set_seed(config.seed)
    model_config = GPT2Config(vocab_size=len(tokenizer), n_positions=config.n_positions, n_embd=config.n_embd,
                              n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=config.dropout,
                              embd_pdrop=config.dropout, attn_pdrop=config.dropout,
                              activation_function=LAB_ACTIVATION,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(model_config).to(device)

    def batch_of(texts):
        batch = encode_texts(tokenizer, texts, device, add_eos=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # no loss on padding
        return batch, labels

    corpus = [row["text"] for row in make_corpus(config.n_sentences, seed=config.seed)]
    held_out = [row["text"] for row in make_corpus(500, seed=config.seed + 10_000)]
    train_batch, train_labels = batch_of(corpus)  # (n_sentences, seq_len), tokenized once
    if train_batch["input_ids"].shape[1] > config.n_positions:
        raise ValueError(f"n_positions={config.n_positions} is shorter than the longest sentence")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01, fused=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps,
                                                   pct_start=0.1)
    lengths = train_batch["attention_mask"].sum(1).cpu()  # (n_sentences,) tokens per sentence, <eos> included
    batches = _epoch_batches(len(corpus), config.batch_size, config.steps, torch.Generator().manual_seed(config.seed))
    losses = []
    start = time.perf_counter()
    model.train()
    for rows in progress_bar(batches, progress, "SFT"):
        # trim the batch to its longest row: left padding puts the padding in the first columns
        width = int(lengths[rows].max())
        rows = rows.to(device)
        inputs = {k: v[rows, -width:] for k, v in train_batch.items()}
        loss = model(**inputs, labels=train_labels[rows, -width:]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        batch, labels = batch_of(held_out)
        held_out_loss = model(**batch, labels=labels).loss.item()
    info = {"losses": losses, "held_out_loss": held_out_loss, "seconds": seconds,
            "parameters": count_parameters(model)}
    return model, tokenizer, info


DEGENERATE_KINDS = ("bare prompt", "truncated", "corrupted", "run-on", "word salad")


def preference_pairs(n_pairs: int, seed: int, openings=None, hardened: bool = False):
    """Preference pairs ``(chosen, rejected, kind)`` for the same opening.

    The chosen text is always a positive review. The rejected one is a
    negative review ('negative'); with ``hardened`` 40 % of the pairs reject a
    degenerate answer instead: the bare prompt, a truncated positive review,
    one with a word or two swapped for random ones, a positive review running
    on past its full stop, or word salad made of positive words.
    """
    rng = np.random.default_rng(seed)
    openings = tuple(openings or train_openings())
    positive_words = list(POSITIVE_ADJECTIVES) + ["loved", "joy", "enjoyed", "really", "so", "and", "minute"]
    vocabulary = lab_vocabulary()
    pairs = []
    for _ in range(n_pairs):
        opening = openings[int(rng.integers(len(openings)))]
        chosen = f"{opening} {_continuation(rng, opening, positive=True)}"
        kind = "negative"
        if hardened and rng.random() < 0.4:
            kind = DEGENERATE_KINDS[int(rng.integers(len(DEGENERATE_KINDS)))]
        if kind == "negative":
            rejected = f"{opening} {_continuation(rng, opening, positive=False)}"
        elif kind == "bare prompt":
            rejected = opening
        elif kind == "truncated":  # cut short, with or without a full stop: "the plot was really ."
            words = _continuation(rng, opening, positive=True).split()
            kept = words[:int(rng.integers(1, len(words) - 1))] if len(words) > 2 else words[:1]
            rejected = " ".join([opening] + kept + (["."] if rng.random() < 0.5 else []))
        elif kind == "corrupted":  # one or two words swapped for random vocabulary: no longer a sentence
            words = chosen.split()
            for position in rng.choice(len(words), size=min(2, len(words)), replace=False)[:int(rng.integers(1, 3))]:
                words[position] = vocabulary[int(rng.integers(len(vocabulary)))]
            rejected = " ".join(words)
        elif kind == "run-on":  # a good review followed by more words after the full stop
            extra = rng.choice(positive_words + ["."], size=int(rng.integers(1, 6)))
            rejected = f"{chosen} {' '.join(extra)}"
        else:
            salad = rng.choice(positive_words, size=int(rng.integers(3, 12)))
            rejected = " ".join([opening, *salad] + (["."] if rng.random() < 0.5 else []))
        if kind != "negative" and gold_label(rejected) == "positive":
            # the cut, swap or salad happened to give a valid review ("the film was charming ."):
            # rejecting it would teach the reward model a falsehood, so this pair rejects a negative review
            rejected, kind = f"{opening} {_continuation(rng, opening, positive=False)}", "negative"
        pairs.append((chosen, rejected, kind))
    return pairs


class TextRewardModel:
    """The one interface every reward model offers: a list of texts -> a tensor of scores, shape (batch,)."""

    def __call__(self, texts) -> torch.Tensor:
        raise NotImplementedError


class LabRewardModel(TextRewardModel):
    """GPT-2 trunk + scalar head, read at the last real token (GPT2ForSequenceClassification, 1 label)."""

    def __init__(self, model, tokenizer, batch_size: int = 256):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size

    @property
    def device(self):
        return next(self.model.parameters()).device

    def logits(self, texts):
        """Scores of one batch of texts, (batch,); ``__call__`` splits long lists and turns gradients off."""
        batch = encode_texts(self.tokenizer, texts, self.device)
        if batch["input_ids"].shape[1] > self.model.config.n_positions:
            raise ValueError(f"a text is longer than the reward model's context ({self.model.config.n_positions} tokens)")
        return self.model(**batch).logits.squeeze(-1)

    def __call__(self, texts):
        texts = list(texts)
        if not texts:
            raise ValueError("texts is empty: give at least one text to score")
        with torch.no_grad():
            return torch.cat([self.logits(texts[i:i + self.batch_size]).float()
                              for i in range(0, len(texts), self.batch_size)])


def train_reward_model(config: RewardConfig = RewardConfig(), tokenizer=None, progress: bool = True, device=None):
    """Bradley-Terry training: minimise -log sigma(r(chosen) - r(rejected)) over preference pairs.

    Returns ``(LabRewardModel, info)`` with the loss curve, held-out pairwise
    accuracy (per kind of rejected answer; pairs from held-out openings), time
    and parameter count.
    """
    device = device or get_device()
    tokenizer = tokenizer or lab_tokenizer()
    set_seed(config.seed)
    model_config = GPT2Config(vocab_size=len(tokenizer), n_positions=config.n_positions, n_embd=config.n_embd,
                              n_layer=config.n_layer, n_head=config.n_head, num_labels=1,
                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function=LAB_ACTIVATION,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    model = GPT2ForSequenceClassification(model_config).to(device)
    reward_model = LabRewardModel(model, tokenizer)
    pairs = preference_pairs(config.n_pairs, config.seed, hardened=config.hardened)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01, fused=True)
    # tokenize once: chosen texts in rows 0..n-1, rejected ones in rows n..2n-1, left padded
    encoded = encode_texts(tokenizer, [p[0] for p in pairs] + [p[1] for p in pairs], device)
    if encoded["input_ids"].shape[1] > config.n_positions:
        raise ValueError(f"n_positions={config.n_positions} is shorter than the longest preference text")
    text_lengths = encoded["attention_mask"].sum(1).cpu()                 # (2 * n_pairs,)
    pair_lengths = torch.maximum(text_lengths[:len(pairs)], text_lengths[len(pairs):])  # (n_pairs,)
    batches = _epoch_batches(len(pairs), config.batch_size, config.steps, torch.Generator().manual_seed(config.seed),
                             lengths=pair_lengths)
    losses = []
    start = time.perf_counter()
    model.train()
    for rows in progress_bar(batches, progress, "reward model"):
        width = int(pair_lengths[rows].max())  # left padding: the last `width` columns hold every token
        both = torch.cat([rows, rows + len(pairs)]).to(device)  # chosen rows, then their rejected partners
        batch = {k: v[both, -width:] for k, v in encoded.items()}
        scores = model(**batch).logits.squeeze(-1)  # one forward for both halves: (2 * batch,)
        loss = -F.logsigmoid(scores[:len(rows)] - scores[len(rows):]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    model.eval()
    info = {"losses": losses, "seconds": seconds, "parameters": count_parameters(model),
            "held_out_accuracy": pairwise_accuracy(reward_model, held_out_preference_pairs(config.seed))}
    return reward_model, info


def held_out_preference_pairs(seed: int = 0, n_pairs: int = 600):
    """Pairs on the held-out openings, every kind of rejected answer present."""
    return preference_pairs(n_pairs, seed + 20_000, openings=HELD_OUT_OPENINGS, hardened=True)


def pairwise_accuracy(reward_model, pairs) -> dict:
    """Share of pairs with r(chosen) > r(rejected), overall and per kind of rejected answer."""
    chosen = reward_model([p[0] for p in pairs])
    rejected = reward_model([p[1] for p in pairs])
    correct = (chosen > rejected).cpu().numpy()
    kinds = np.array([p[2] for p in pairs])
    result = {"all": float(correct.mean())}
    for kind in dict.fromkeys(kinds):
        result[str(kind)] = float(correct[kinds == kind].mean())  # plain str: same keys fresh or from the cache JSON
    return result


def load_sft_model(config: SFTConfig = SFTConfig(), cache_dir: Path | str | None = None, progress: bool = True,
                   device=None):
    """The SFT model from the cache, or trained (and cached) when missing, stale or damaged.

    Returns ``(model, tokenizer, info)``; ``info['from_cache']`` says which.
    """
    device = device or get_device()
    folder = Path(cache_dir or LAB_DIR) / _config_key("sft", config)
    cached = _load_artifact(folder, "sft", config, GPT2LMHeadModel)
    if cached is not None:
        model, tokenizer, info = cached
        return model.to(device).eval(), tokenizer, {**info, "from_cache": True}
    with _lab_threads():
        model, tokenizer, info = train_sft_model(config, progress=progress, device=device)
    _save_artifact(folder, "sft", config, model, tokenizer, info)
    return model.eval(), tokenizer, {**info, "from_cache": False}


def load_lab_reward_model(config: RewardConfig = RewardConfig(), cache_dir: Path | str | None = None,
                          progress: bool = True, device=None):
    """The lab reward model from the cache, or trained (and cached). Returns ``(LabRewardModel, info)``."""
    device = device or get_device()
    folder = Path(cache_dir or LAB_DIR) / _config_key("reward", config)
    cached = _load_artifact(folder, "reward", config, GPT2ForSequenceClassification)
    if cached is not None:
        model, tokenizer, info = cached
        return LabRewardModel(model.to(device), tokenizer), {**info, "from_cache": True}
    with _lab_threads():
        reward_model, info = train_reward_model(config, progress=progress, device=device)
    _save_artifact(folder, "reward", config, reward_model.model, reward_model.tokenizer, info)
    return reward_model, {**info, "from_cache": False}


# ---------------------------------------------------------------------------
# 5. Sampling
# ---------------------------------------------------------------------------

def context_length(model) -> int:
    config = model.config
    return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings"))


def response_mask_from_ids(response_ids, eos_token_id: int):
    """1 for the response tokens up to and including the first <eos>, 0 after it: (batch, new_tokens).

    ``generate`` fills finished rows with padding, and for hub models the pad
    token is often the eos token itself, so the mask is cut at the first eos.
    """
    is_eos = (response_ids == eos_token_id).long()
    eos_before = is_eos.cumsum(dim=1) - is_eos  # number of eos strictly before each position
    return (eos_before == 0).long()


def sampling_config(tokenizer, max_new_tokens: int, temperature: float = 1.0, do_sample: bool = True,
                    **outputs) -> GenerationConfig:
    """A generation config that draws from the model's own distribution (its logits divided by
    ``temperature``) and nothing else: no top-k, no top-p, no repetition penalty, no n-gram blocking,
    no minimum length. ``do_sample=False`` is greedy decoding. ``outputs`` are options such as
    ``output_scores=True``."""
    sampling = dict(temperature=temperature, top_k=0, top_p=1.0, typical_p=1.0, min_p=0.0, epsilon_cutoff=0.0,
                    eta_cutoff=0.0) if do_sample else {}
    return GenerationConfig(do_sample=do_sample, num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0,
                            repetition_penalty=1.0, no_repeat_ngram_size=0,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                            bos_token_id=tokenizer.bos_token_id, **sampling, **outputs)


def generate_responses(model, tokenizer, prompts, max_new_tokens: int = 20, do_sample: bool = True,
                       temperature: float = 1.0, return_logprobs: bool = False):
    """Sample a response for every prompt, as one batch.

    Pure sampling (``sampling_config``): whatever generation settings a checkpoint ships with are set
    aside while it samples, so that the log-probabilities PPO computes later, from logits / ``temperature``,
    are the probabilities the tokens were really drawn with. Returns a dict with
    ``query_ids``/``query_mask`` (batch, prompt_len), ``response_ids``/``response_mask`` (batch, T),
    T = the longest response (at most ``max_new_tokens``), the decoded ``responses``, and ``texts``:
    prompt and response decoded together (what a reward model reads; exact for any tokenizer, where
    gluing two strings with a space is not). ``return_logprobs`` adds ``sampler_logprobs`` (batch, T):
    the log-probability of each sampled token under the distribution it was drawn from.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = next(model.parameters()).device
    query = encode_texts(tokenizer, prompts, device)
    prompt_len = query["input_ids"].shape[1]
    if prompt_len + max_new_tokens > context_length(model):
        raise ValueError(f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"context of {context_length(model)} tokens")
    config = sampling_config(tokenizer, max_new_tokens, temperature, do_sample,
                             output_scores=return_logprobs, return_dict_in_generate=True)
    checkpoint_config, model.generation_config = model.generation_config, GenerationConfig()  # library defaults only
    try:
        with torch.no_grad():
            out = model.generate(input_ids=query["input_ids"], attention_mask=query["attention_mask"],
                                 generation_config=config)
    finally:
        model.generation_config = checkpoint_config
    # generation stops once every row has ended, so T is the longest response of this batch, not
    # max_new_tokens: every later forward pass over the batch skips the padding columns
    response_ids = out.sequences[:, prompt_len:]                                # (B, T), T <= max_new_tokens
    response_mask = response_mask_from_ids(response_ids, tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id
    real_response = response_ids * response_mask + pad * (1 - response_mask)    # (B, T), padding after <eos>
    real_query = query["input_ids"] * query["attention_mask"] + pad * (1 - query["attention_mask"])
    result = {"query_ids": query["input_ids"], "query_mask": query["attention_mask"], "response_ids": response_ids,
              "response_mask": response_mask, "prompts": prompts,
              "responses": [r.strip() for r in tokenizer.batch_decode(real_response, skip_special_tokens=True)],
              "texts": [t.strip() for t in tokenizer.batch_decode(torch.cat([real_query, real_response], dim=1),
                                                                  skip_special_tokens=True)]}
    if return_logprobs:
        step_logprobs = torch.stack(out.scores, dim=1).float().log_softmax(-1)  # (B, T, vocab), as sampled
        result["sampler_logprobs"] = step_logprobs.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    return result


# ---------------------------------------------------------------------------
# 6. The real path: models from the Hugging Face hub or a local folder
# ---------------------------------------------------------------------------

def _hub_reachable(timeout: float = 2.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _pretrained_kwargs(name_or_path: str) -> dict:
    """Local folders load offline; a hub name is tried only when the hub answers, so nothing hangs."""
    if Path(name_or_path).is_dir():
        return {"local_files_only": True}
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or not _hub_reachable()
    if offline:
        # a model already in the local Hugging Face cache still loads
        return {"local_files_only": True}
    return {}


def _from_pretrained(loader, name_or_path: str, what: str, **kwargs):
    try:
        return loader.from_pretrained(name_or_path, **_pretrained_kwargs(name_or_path), **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"could not load the {what} {name_or_path!r}: it is not a local folder saved with save_pretrained, "
            f"and the Hugging Face hub is unreachable or does not have it. Use the embedded default 'lab' "
            f"(trained inside the course) or a local path. ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None


def _prepare_tokenizer(tokenizer, padding_side: str):
    if tokenizer.pad_token is None:  # GPT-2 has none: pad with eos, the attention mask hides it
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_policy(name_or_path: str = "lab", device=None, sft_config: SFTConfig = SFTConfig(), progress: bool = True,
                dtype=torch.float32):
    """A causal LM and its tokenizer: ``'lab'`` (the embedded SFT model) or any hub name / local folder.

    Returns ``(model, tokenizer)`` on ``device`` (CUDA when present), in eval mode, with weights in
    ``dtype``: float32 unless asked otherwise, whatever dtype the checkpoint was saved in (transformers
    would otherwise keep a bfloat16 checkpoint in bfloat16). ``torch.bfloat16`` halves the memory of the
    weights; PPO still computes log-probabilities, ratios and KL in float32. A hub model with tied input and
    output embeddings gets a sparse input-side gradient (see the comment below).
    """
    device = device or get_device()
    if name_or_path == "lab":
        model, tokenizer, _ = load_sft_model(sft_config, progress=progress, device=device)
        return model.to(dtype), tokenizer
    model = _from_pretrained(AutoModelForCausalLM, name_or_path, "policy model", dtype=dtype)
    tokenizer = _prepare_tokenizer(_from_pretrained(AutoTokenizer, name_or_path, "policy tokenizer"), "left")
    embedding, output_layer = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(embedding, torch.nn.Embedding) and embedding.weight is getattr(output_layer, "weight", None):
        # Input and output embeddings tied (GPT-2): the input side's gradient has rows only for the batch's tokens.
        # Sparse, it is added into the output layer's dense gradient, instead of first filling a (vocabulary x
        # width) matrix of zeros on every backward pass (154 MB at GPT-2 small's size, about 0.12 s per backward
        # pass on a 2-core CPU). Every PPO and GRPO loss reaches the logits, so the summed gradient is dense and
        # Adam and gradient clipping see no change. A loss of your own that reaches only the hidden states would
        # leave a sparse gradient, which Adam refuses: set ``model.get_input_embeddings().sparse = False`` then.
        embedding.sparse = True
    return model.to(device).eval(), tokenizer


class ClassifierRewardModel(TextRewardModel):
    """Any sequence classifier as a reward: the log-odds of its positive label, with its own tokenizer."""

    def __init__(self, model, tokenizer, positive_label: int | None = None, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        labels = {int(i): str(name).lower() for i, name in (model.config.id2label or {}).items()}
        if positive_label is None:
            matches = [i for i, name in labels.items() if name.startswith("pos")]
            positive_label = matches[0] if matches else model.config.num_labels - 1
        self.positive_label = positive_label

    def __call__(self, texts):
        texts = list(texts)
        if not texts:
            raise ValueError("texts is empty: give at least one text to score")
        device = next(self.model.parameters()).device
        scores = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                       truncation=True).to(device)
                logits = self.model(**batch).logits.float()  # (batch, num_labels)
                if logits.shape[-1] == 1:
                    scores.append(logits[:, 0])
                    continue
                # log-odds log p / (1 - p) of the positive label, unbounded like the lab's Bradley-Terry score;
                # computed from the logits, exact even where p rounds to 1 (two labels: logit_pos - logit_neg)
                others = logits.clone()
                others[:, self.positive_label] = -torch.inf
                scores.append(logits[:, self.positive_label] - others.logsumexp(-1))
        return torch.cat(scores)


def load_reward_model(name_or_path: str = "lab", device=None, reward_config: RewardConfig = RewardConfig(),
                      positive_label: int | None = None, progress: bool = True, dtype=torch.float32) -> TextRewardModel:
    """A reward model behind the one interface ``texts -> scores``: ``'lab'`` or a hub / local classifier,
    with weights in ``dtype`` (float32 unless asked otherwise; scores are float32 either way)."""
    device = device or get_device()
    if name_or_path == "lab":
        reward_model = load_lab_reward_model(reward_config, progress=progress, device=device)[0]
        reward_model.model.to(dtype)
        return reward_model
    model = _from_pretrained(AutoModelForSequenceClassification, name_or_path, "reward model", dtype=dtype)
    tokenizer = _from_pretrained(AutoTokenizer, name_or_path, "reward tokenizer")
    tokenizer = _prepare_tokenizer(tokenizer, tokenizer.padding_side)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return ClassifierRewardModel(model.to(device), tokenizer, positive_label)
