"""llm_lab.py, the small-LLM lab: corpus, gold labeller, tokenizer, preference pairs, cache, sampling, hub path.

Every model here is tiny (a few steps, 32-wide) and cached in pytest's tmp_path,
so the whole file runs in well under a minute on a laptop CPU and never touches
the course's own artifacts/ folder nor the network.
"""
import collections
import shutil

import pytest
import torch

import llm_lab as lab
import utils

TINY_SFT = lab.SFTConfig(steps=5, n_sentences=200, n_embd=32)
TINY_REWARD = lab.RewardConfig(steps=5, n_pairs=100, n_embd=32)
DEGENERATE_KINDS = lab.DEGENERATE_KINDS  # rejected answers of the hardened pairs other than "negative"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: one thread is as fast, and far faster on a CPU shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return lab.lab_tokenizer()


@pytest.fixture(scope="module")
def tiny_sft(sft_cache):
    """(model, tokenizer, info) of the tiny SFT model, trained once for the module."""
    return sft_cache[1:]


def state_dicts_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


# ------------------------------------------------------------------ corpus ---

def test_corpus_is_seeded():
    assert lab.make_corpus(300, seed=3) == lab.make_corpus(300, seed=3)
    assert lab.make_corpus(300, seed=3) != lab.make_corpus(300, seed=4)


@pytest.mark.parametrize("n", [2, 301, 1000])
def test_corpus_is_half_positive_half_negative(n):
    counts = collections.Counter(row["label"] for row in lab.make_corpus(n, seed=1))
    assert set(counts) == {"positive", "negative"}
    assert counts["positive"] == (n + 1) // 2 and counts["negative"] == n // 2


def test_corpus_never_uses_held_out_openings():
    prompts = {row["prompt"] for row in lab.make_corpus(3000, seed=0)}
    assert not prompts & set(lab.HELD_OUT_OPENINGS)
    assert prompts <= set(lab.train_openings())
    assert not set(lab.train_openings()) & set(lab.HELD_OUT_OPENINGS)


def test_every_corpus_sentence_has_its_gold_label():
    corpus = lab.make_corpus(2000, seed=5)
    for row in corpus:
        assert row["text"] == f"{row['prompt']} {row['response']}"
        assert lab.gold_label(row["text"]) == row["label"], row["text"]
    assert lab.gold_labels([r["text"] for r in corpus]) == [r["label"] for r in corpus]


def test_make_corpus_rejects_a_tiny_size():
    with pytest.raises(ValueError, match="n_sentences"):
        lab.make_corpus(1)


# ------------------------------------------------------------ gold labeller ---

@pytest.mark.parametrize("text, label", [
    ("the movie was great .", "positive"),
    ("the movie was really wonderful and funny and i loved it .", "positive"),
    ("we saw it last night and we laughed all the way through .", "positive"),
    ("The Movie was great.", "positive"),                          # case and spacing are normalised
    ("the plot is boring and a waste of time .", "negative"),
    ("i watched this film with my kids and we walked out early .", "negative"),
    ("the music seemed great and boring .", "mixed"),              # both sentiments: grammatical but mixed
    ("the cast was great and i hated it .", "mixed"),
    ("the movie was great", "malformed"),                          # no full stop
    ("the movie was really great and", "malformed"),               # truncated
    ("the movie was great great joy loved so .", "malformed"),     # word salad of positive words
    ("the movie was", "malformed"),                                # the bare prompt
    ("the movie was great . the movie was great .", "malformed"),  # two sentences
    ("", "malformed"),
])
def test_gold_label_on_crafted_texts(text, label):
    assert lab.gold_label(text) == label


# ---------------------------------------------------------------- tokenizer ---

def test_tokenizer_round_trip_on_corpus_texts(tokenizer):
    texts = [row["text"] for row in lab.make_corpus(500, seed=7)]
    texts += [f"{o} it was great ." for o in lab.HELD_OUT_OPENINGS]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.unk_token_id not in ids  # every grammar word is in the vocabulary
        assert len(ids) == len(text.split()) + 1  # word level: one token per word, plus <bos>
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_special_tokens_and_vocabulary(tokenizer):
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == [lab.PAD, lab.BOS, lab.EOS, lab.UNK]
    assert tokenizer.pad_token_id == 0 and tokenizer.padding_side == "left"
    assert set(lab.lab_vocabulary()) <= set(tokenizer.get_vocab())
    assert tokenizer("zebra")["input_ids"] == [tokenizer.bos_token_id, tokenizer.unk_token_id]
    assert lab.lab_tokenizer().get_vocab() == tokenizer.get_vocab()  # deterministic


def test_encode_texts_pads_on_the_left_with_positions(tokenizer):
    texts = ["the movie was great .", "the plot is"]
    batch = lab.encode_texts(tokenizer, texts)
    ids, mask, positions = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    assert ids.shape == mask.shape == positions.shape == (2, 6)
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
    assert ids[1, :2].tolist() == [tokenizer.pad_token_id] * 2
    assert ids[1, 2].item() == tokenizer.bos_token_id
    assert positions.tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]]
    with_eos = lab.encode_texts(tokenizer, texts, add_eos=True)
    assert with_eos["input_ids"].shape == (2, 7)
    assert with_eos["input_ids"][:, -1].tolist() == [tokenizer.eos_token_id] * 2
    assert with_eos["position_ids"][:, -1].tolist() == [6, 4]
    with pytest.raises(ValueError, match="empty"):
        lab.encode_texts(tokenizer, [])


# ------------------------------------------------------- preference pairs ---

def test_naive_preference_pairs_reject_negative_reviews_only():
    pairs = lab.preference_pairs(300, seed=0, hardened=False)
    assert len(pairs) == 300 and {kind for _, _, kind in pairs} == {"negative"}
    for chosen, rejected, _ in pairs:
        assert lab.gold_label(chosen) == "positive"
        assert lab.gold_label(rejected) == "negative"


def test_hardened_preference_pairs():
    pairs = lab.preference_pairs(600, seed=0, hardened=True)
    kinds = collections.Counter(kind for _, _, kind in pairs)
    assert set(kinds) == {"negative", *DEGENERATE_KINDS}
    assert all(kinds[k] >= 20 for k in DEGENERATE_KINDS)
    assert all(lab.gold_label(chosen) == "positive" for chosen, _, _ in pairs)
    assert pairs == lab.preference_pairs(600, seed=0, hardened=True)  # seeded
    openings = sorted(lab.all_openings(), key=len, reverse=True)
    for chosen, rejected, kind in pairs:  # the two answers continue the same (training) opening
        opening = next(o for o in openings if chosen.startswith(o + " "))
        assert opening in lab.train_openings()
        if kind == "corrupted":  # one or two words swapped, wherever they are
            assert len(rejected.split()) == len(chosen.split())
            assert 1 <= sum(a != b for a, b in zip(chosen.split(), rejected.split())) <= 2
        else:
            assert rejected == opening or rejected.startswith(opening + " ")
        if kind == "negative":
            assert lab.gold_label(rejected) == "negative"


def rejected_but_positive(pairs):
    """Degenerate 'rejected' answers that are in fact valid positive reviews (they teach the wrong order)."""
    return [(chosen, rejected, kind) for chosen, rejected, kind in pairs
            if kind != "negative" and lab.gold_label(rejected) == "positive"]


def test_degenerate_answers_are_not_valid_positive_reviews():
    # A random word salad can by chance be a grammatical review (about 1 in 2000): tolerated in training.
    training = lab.preference_pairs(4000, seed=0, hardened=True)
    degenerate = [p for p in training if p[2] != "negative"]
    assert len(rejected_but_positive(training)) <= 0.005 * len(degenerate), rejected_but_positive(training)[:5]


def test_held_out_pairs_use_held_out_openings_and_every_kind():
    pairs = lab.held_out_preference_pairs(seed=0)
    assert {kind for _, _, kind in pairs} == {"negative", *DEGENERATE_KINDS}
    for chosen, rejected, kind in pairs:
        assert any(chosen.startswith(o + " ") for o in lab.HELD_OUT_OPENINGS)
        assert lab.gold_label(chosen) == "positive"
        if kind == "negative":
            assert lab.gold_label(rejected) == "negative"
    assert rejected_but_positive(pairs) == []  # otherwise the accuracy measured on them means little


class GoldReward(lab.TextRewardModel):
    """A perfect judge built from the gold labeller (or its opposite), to test pairwise_accuracy."""

    def __init__(self, sign=1.0):
        self.sign = sign

    def __call__(self, texts):
        return torch.tensor([self.sign * (lab.gold_label(t) == "positive") for t in texts], dtype=torch.float)


def test_pairwise_accuracy_per_kind():
    pairs = lab.held_out_preference_pairs(seed=0, n_pairs=200)
    pairs = [p for p in pairs if lab.gold_label(p[1]) != "positive"]  # pairs the gold labeller can order
    perfect = lab.pairwise_accuracy(GoldReward(1.0), pairs)
    assert set(perfect) == {"all", "negative", *DEGENERATE_KINDS}
    assert all(v == 1.0 for v in perfect.values())
    assert all(v == 0.0 for v in lab.pairwise_accuracy(GoldReward(-1.0), pairs).values())


# -------------------------------------------------------------------- cache ---

@pytest.fixture(scope="module")
def sft_cache(tmp_path_factory):
    """A cache folder in which the tiny SFT model was just trained: (folder, model, tokenizer, info)."""
    folder = tmp_path_factory.mktemp("sft_cache")
    model, tokenizer, info = lab.load_sft_model(TINY_SFT, cache_dir=folder, progress=False)
    return folder, model, tokenizer, info


@pytest.fixture(scope="module")
def reward_cache(tmp_path_factory):
    """A cache folder in which the tiny (hardened) reward model was just trained: (folder, model, info)."""
    folder = tmp_path_factory.mktemp("reward_cache")
    reward_model, info = lab.load_lab_reward_model(TINY_REWARD, cache_dir=folder, progress=False)
    return folder, reward_model, info


def test_epoch_batches_visit_every_row_once_per_epoch():
    batches = lab._epoch_batches(10, batch_size=3, steps=6, generator=torch.Generator().manual_seed(0))
    assert len(batches) == 6 and all(len(b) == 3 for b in batches)  # full batches only: 3 per epoch of 10 rows
    for epoch in (batches[:3], batches[3:]):
        rows = torch.cat(epoch).tolist()
        assert len(set(rows)) == 9 and set(rows) <= set(range(10))  # no row twice within an epoch


def test_epoch_batches_by_length_group_similar_lengths():
    lengths = torch.tensor([5, 1, 9, 1, 5, 9, 1, 5, 9])
    batches = lab._epoch_batches(9, batch_size=3, steps=6, generator=torch.Generator().manual_seed(0),
                                   lengths=lengths)
    assert all(len(set(lengths[b].tolist())) == 1 for b in batches)  # each batch: one length
    with pytest.raises(ValueError, match="batch_size"):
        lab._epoch_batches(2, batch_size=3, steps=1, generator=torch.Generator())


def test_sft_cache_trains_then_loads_identical_weights(sft_cache):
    folder, model, tokenizer, info = sft_cache
    assert info["from_cache"] is False
    assert len(info["losses"]) == TINY_SFT.steps and info["held_out_loss"] > 0
    assert info["parameters"] == utils.count_parameters(model)
    again, tokenizer2, info2 = lab.load_sft_model(TINY_SFT, cache_dir=folder, progress=False)
    assert info2["from_cache"] is True
    assert state_dicts_equal(model, again)
    assert info2["losses"] == info["losses"] and info2["held_out_loss"] == info["held_out_loss"]
    assert tokenizer2.get_vocab() == tokenizer.get_vocab() and tokenizer2.padding_side == "left"
    assert not again.training  # loaded in eval mode


def test_changed_config_is_a_different_cache_entry(sft_cache, tmp_path):
    folder, model, _, _ = sft_cache
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    other = lab.SFTConfig(steps=2, n_sentences=200, n_embd=32)
    other_model, _, info = lab.load_sft_model(other, cache_dir=tmp_path, progress=False)
    assert info["from_cache"] is False and len(info["losses"]) == 2
    assert not state_dicts_equal(model, other_model)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
    assert lab.load_sft_model(TINY_SFT, cache_dir=tmp_path, progress=False)[2]["from_cache"] is True
    assert lab.load_sft_model(other, cache_dir=tmp_path, progress=False)[2]["from_cache"] is True


def test_damaged_safetensors_is_detected_and_retrained(sft_cache, tmp_path, capsys):
    folder, model, _, _ = sft_cache
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    weights = entry / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    for i in range(len(raw) - 64, len(raw) - 32):  # flip bytes inside the tensor data
        raw[i] ^= 0xFF
    weights.write_bytes(bytes(raw))
    capsys.readouterr()
    retrained, _, info = lab.load_sft_model(TINY_SFT, cache_dir=tmp_path, progress=False)
    assert info["from_cache"] is False
    assert "damaged" in capsys.readouterr().out
    assert state_dicts_equal(model, retrained)  # same seed, same weights: the damaged bytes were not used
    assert lab.load_sft_model(TINY_SFT, cache_dir=tmp_path, progress=False)[2]["from_cache"] is True


def test_reward_model_cache_and_interface(reward_cache, tmp_path):
    folder, reward_model, info = reward_cache
    assert info["from_cache"] is False and len(info["losses"]) == TINY_REWARD.steps
    assert set(info["held_out_accuracy"]) == {"all", "negative", *DEGENERATE_KINDS}
    again, info2 = lab.load_lab_reward_model(TINY_REWARD, cache_dir=folder, progress=False)
    assert info2["from_cache"] is True
    assert state_dicts_equal(reward_model.model, again.model)
    assert info2["held_out_accuracy"] == info["held_out_accuracy"]
    texts = ["the plot is great .", "the plot is", "the cast was dull and i hated it ."]
    scores = again(texts)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert torch.allclose(scores[:1], again(texts[:1]), atol=1e-5)  # padding does not change a score
    with pytest.raises(ValueError, match="empty"):
        again([])


def test_hardened_is_part_of_the_reward_cache_key():
    naive, hardened = lab.RewardConfig(hardened=False), lab.RewardConfig(hardened=True)
    assert lab._config_key("reward", naive) != lab._config_key("reward", hardened)
    assert lab._config_key("reward", hardened) == lab._config_key("reward", lab.RewardConfig())


# ----------------------------------------------------------------- sampling ---

def test_generate_responses_shapes_and_masks(tiny_sft):
    model, tokenizer, _ = tiny_sft
    prompts = ["the plot is", "i watched this film with my kids and", "the cast was"]
    torch.manual_seed(0)
    out = lab.generate_responses(model, tokenizer, prompts, max_new_tokens=7)
    prompt_len = lab.encode_texts(tokenizer, prompts)["input_ids"].shape[1]
    assert out["query_ids"].shape == out["query_mask"].shape == (3, prompt_len)
    mask = out["response_mask"]
    # as wide as the longest response: it ends with <eos> in the last column or has max_new_tokens tokens
    assert out["response_ids"].shape == mask.shape == (3, int(mask.sum(1).max())) and mask.shape[1] <= 7
    assert out["prompts"] == prompts and len(out["responses"]) == 3
    assert set(mask.unique().tolist()) <= {0, 1}
    assert (mask[:, 1:] <= mask[:, :-1]).all()  # ones, then zeros after the first <eos>
    assert (mask[:, 0] == 1).all()
    torch.manual_seed(0)
    assert lab.generate_responses(model, tokenizer, prompts, max_new_tokens=7)["responses"] == out["responses"]


def test_response_mask_cuts_after_the_first_eos():
    ids = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 2, 5, 5]])
    assert lab.response_mask_from_ids(ids, eos_token_id=2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1],
                                                                         [1, 0, 0, 0]]


def test_generate_responses_rejects_bad_requests(tiny_sft):
    model, tokenizer, _ = tiny_sft
    with pytest.raises(ValueError, match="empty"):
        lab.generate_responses(model, tokenizer, [])
    with pytest.raises(ValueError, match="context"):
        lab.generate_responses(model, tokenizer, ["the plot is"], max_new_tokens=TINY_SFT.n_positions)
    with pytest.raises(ValueError, match="max_new_tokens"):
        lab.generate_responses(model, tokenizer, ["the plot is"], max_new_tokens=0)


# ------------------------------------------------------ hub / local models ---

def other_tokenizer():
    """A character-level tokenizer unlike the lab's: no pad token (as GPT-2), right padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]", "[END]"])
    backend.train_from_iterator([r["text"] for r in lab.make_corpus(200, seed=0)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[END]",
                                   padding_side="right")


@pytest.fixture(scope="module")
def local_models(tmp_path_factory):
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("local_models")
    tokenizer = other_tokenizer()
    common = dict(vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=1, n_head=2,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**common)).save_pretrained(root / "policy")
    classifier = GPT2ForSequenceClassification(GPT2Config(**common, num_labels=2,
                                                          id2label={0: "NEGATIVE", 1: "POSITIVE"},
                                                          label2id={"NEGATIVE": 0, "POSITIVE": 1}))
    classifier.save_pretrained(root / "reward")
    for name in ("policy", "reward"):
        tokenizer.save_pretrained(root / name)
    return root


def test_load_policy_from_a_local_folder(local_models):
    model, tokenizer = lab.load_policy(str(local_models / "policy"), device=torch.device("cpu"))
    assert model.config.n_embd == 16 and not model.training
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == tokenizer.eos_token == "[END]"
    prompts = ["the plot is", "we saw it last night and"]
    torch.manual_seed(0)
    out = lab.generate_responses(model, tokenizer, prompts, max_new_tokens=5)
    assert out["response_ids"].shape[0] == 2 and out["response_ids"].shape[1] <= 5 and len(out["responses"]) == 2


def test_load_reward_model_from_a_local_folder(local_models):
    reward_model = lab.load_reward_model(str(local_models / "reward"), device=torch.device("cpu"))
    assert isinstance(reward_model, lab.ClassifierRewardModel)
    assert reward_model.positive_label == 1
    texts = ["the plot is great .", "the plot is", "i watched this film with my kids and it was bad ."]
    scores = reward_model(texts)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    # the score is the log-odds of POSITIVE, and a text's score does not depend on its batch
    logits = reward_model.model(**reward_model.tokenizer(texts[:1], return_tensors="pt")).logits[0]
    assert torch.allclose(scores[0], logits[1] - logits[0], atol=1e-4)
    assert torch.allclose(scores[:1], reward_model(texts[:1]), atol=1e-4)


def test_lab_names_give_the_lab_models(sft_cache, reward_cache, monkeypatch):
    # 'lab' goes through load_sft_model / load_lab_reward_model: point them at the tiny cached models
    sft, reward = lab.load_sft_model, lab.load_lab_reward_model
    monkeypatch.setattr(lab, "load_sft_model", lambda config, **kw: sft(TINY_SFT, cache_dir=sft_cache[0], **kw))
    monkeypatch.setattr(lab, "load_lab_reward_model",
                        lambda config, **kw: reward(TINY_REWARD, cache_dir=reward_cache[0], **kw))
    model, tokenizer = lab.load_policy("lab", device=torch.device("cpu"), progress=False)
    assert model.config.n_embd == TINY_SFT.n_embd and tokenizer.padding_side == "left"
    reward_model = lab.load_reward_model("lab", device=torch.device("cpu"), progress=False)
    assert isinstance(reward_model, lab.LabRewardModel)
    assert reward_model(["the plot is great .", "the plot is"]).shape == (2,)


@pytest.mark.parametrize("loader", [lab.load_policy, lab.load_reward_model])
def test_unknown_model_name_offline_raises_a_clear_error(loader, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "no-such-owner/no-such-model-4242"
    with pytest.raises(ValueError) as err:
        loader(name, device=torch.device("cpu"))
    assert name in str(err.value) and "'lab'" in str(err.value)


def test_llm_lab_does_not_import_rlhf():
    """Imports point one way, rlhf -> llm_lab -> utils."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(lab.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert "rlhf" not in imported
