"""Shared code for the course notebooks.

Sections
--------
1. Reproducibility and device helpers (``set_seed``, ``get_device``).
2. The chapter's toy game, ``Lottery``, with the exact Bellman solution
   (``policy_values``, ``optimal_policy``) that every notebook compares its
   estimates with.
3. Plot helpers that return a matplotlib figure.
4. The small-LLM lab (corpus, tokenizer, GPT-2, reward model) used by the
   LLM notebooks.

The learning algorithms themselves live in the notebooks: reading them is the
lesson. This module holds only what several notebooks share.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

# ---------------------------------------------------------------------------
# 1. Reproducibility and device
# ---------------------------------------------------------------------------


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and (when installed) PyTorch on CPU and CUDA."""
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
    except ImportError:  # the game and its tests need no torch
        return
    torch.manual_seed(seed)  # also seeds every CUDA device


def get_device():
    """CUDA when a GPU is present, else CPU. Nothing in the course assumes CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------
# 2. The toy game
# ---------------------------------------------------------------------------

STATES = ("w", "l")  # 'w': the lottery is winning, 'l': it is losing
STATE_INDEX = {state: i for i, state in enumerate(STATES)}
STOP, DRAW = 0, 1  # the two actions
ACTIONS = (STOP, DRAW)
ACTION_NAMES = ("stop", "draw")


class Lottery:
    """The chapter's game, with Gymnasium-style ``reset`` and ``step``.

    The episode starts in ``'w'`` or ``'l'`` with probability 1/2 each.

    * action 0 (stop): the episode ends with reward 0;
    * action 1 (draw): the reward is drawn from N(+1, 1) in ``'w'`` and
      N(-1, 1) in ``'l'``; afterwards the episode ends with probability
      ``end_prob`` (0.01), otherwise the state switches to the other one with
      probability ``switch_prob`` (0 by default: the state stays).

    The defaults reproduce the chapter's game exactly. ``switch_prob > 0``
    makes the next state differ from the current one, which is what exposes a
    wrong ``V(s_{t+1})`` index in a TD or GAE implementation.

    The game has its own random generator, seeded only by ``reset(seed=...)``
    (``set_seed`` does not reach it): seed the first reset of a run, then call
    ``reset()`` without a seed to continue the same random stream.
    """

    def __init__(self, end_prob: float = 0.01, switch_prob: float = 0.0,
                 reward_means: Mapping[str, float] | None = None, reward_std: float = 1.0):
        if not 0.0 < end_prob <= 1.0:
            raise ValueError(f"end_prob must be in (0, 1], got {end_prob!r}")
        if not 0.0 <= switch_prob <= 1.0:
            raise ValueError(f"switch_prob must be in [0, 1], got {switch_prob!r}")
        if reward_std < 0:
            raise ValueError(f"reward_std must be >= 0, got {reward_std!r}")
        reward_means = dict(reward_means or {"w": 1.0, "l": -1.0})
        if set(reward_means) != set(STATES):
            raise ValueError(f"reward_means needs exactly the keys {STATES}, got {sorted(reward_means)}")
        self.end_prob = float(end_prob)
        self.switch_prob = float(switch_prob)
        self.reward_means = reward_means
        self.reward_std = float(reward_std)
        self._rng = np.random.default_rng()
        self.state: str | None = None
        self.done = True

    def __repr__(self) -> str:
        return (f"Lottery(end_prob={self.end_prob}, switch_prob={self.switch_prob}, "
                f"reward_means={self.reward_means}, reward_std={self.reward_std})")

    def reset(self, seed: int | None = None):
        """Start an episode. A seed re-seeds the game's own random generator."""
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self.state = STATES[int(self._rng.integers(2))]
        self.done = False
        return self.state, {}

    def step(self, action):
        """Play one action: returns ``(state, reward, terminated, truncated, info)``."""
        if self.done:
            raise RuntimeError("the episode has ended (or never started): call reset() first")
        if isinstance(action, (bool, np.bool_)) or not isinstance(action, (int, np.integer)) \
                or int(action) not in ACTIONS:
            raise ValueError(f"action must be 0 (stop) or 1 (draw), got {action!r}")
        if int(action) == STOP:
            self.done = True
            return self.state, 0.0, True, False, {}
        reward = float(self._rng.normal(self.reward_means[self.state], self.reward_std))
        if self._rng.random() < self.end_prob:
            self.done = True
        elif self.switch_prob > 0 and self._rng.random() < self.switch_prob:
            self.state = "l" if self.state == "w" else "w"
        return self.state, reward, self.done, False, {}


@dataclass
class Episode:
    """One played episode. ``states[t]`` is the state in which ``actions[t]`` was taken."""

    states: list
    actions: list
    rewards: list
    final_state: str

    def __len__(self) -> int:
        return len(self.rewards)


def play_episode(env: Lottery, choose_action: Callable[[str], int], seed: int | None = None,
                 max_steps: int = 100_000) -> Episode:
    """Play one episode with ``choose_action(state) -> action``.

    ``max_steps`` only guards against a policy that would never stop; with the
    default game an always-draw episode lasts 100 steps on average.
    """
    state, _ = env.reset(seed=seed)
    states, actions, rewards = [], [], []
    for _ in range(max_steps):
        action = choose_action(state)
        next_state, reward, terminated, truncated, _ = env.step(action)
        states.append(state)
        actions.append(int(action))
        rewards.append(reward)
        state = next_state
        if terminated or truncated:
            return Episode(states, actions, rewards, state)
    raise RuntimeError(f"episode did not end within max_steps={max_steps}")


# --- batches of episodes (policy_learning.ipynb shows and checks these; a2c.ipynb reuses them) ---------


def play_batch(env: Lottery, draw_prob: Mapping[str, float], n_episodes: int, rng: random.Random) -> list:
    """Play ``n_episodes`` with the fixed policy P(draw | s) = ``draw_prob[s]``; ``rng`` draws the actions."""
    uniform = rng.random

    def choose_action(state):
        return DRAW if uniform() < draw_prob[state] else STOP

    return [play_episode(env, choose_action) for _ in range(n_episodes)]


def to_padded_batch(episodes) -> dict:
    """Stack episodes of different lengths into tensors of shape (n_episodes, T_max).

    ``states``, ``actions``, ``rewards``; ``mask`` = 1 on real steps and 0 on padding;
    for actor-critic methods also ``next_states`` (the state after each step; for the
    last step, the state the episode ended in) and ``done`` (1 on each episode's last step).
    """
    import torch

    n, t_max = len(episodes), max(len(e) for e in episodes)
    arrays = {name: np.zeros((n, t_max), dtype=np.int64) for name in ("states", "next_states", "actions")}
    arrays.update({name: np.zeros((n, t_max), dtype=np.float32) for name in ("rewards", "mask", "done")})
    for i, episode in enumerate(episodes):  # one slice per episode, never one Python step per time step
        length = len(episode)
        state_ids = [STATE_INDEX[s] for s in episode.states]
        arrays["states"][i, :length] = state_ids
        arrays["next_states"][i, :length - 1] = state_ids[1:]
        arrays["next_states"][i, length - 1] = STATE_INDEX[episode.final_state]
        arrays["actions"][i, :length] = episode.actions
        arrays["rewards"][i, :length] = episode.rewards
        arrays["mask"][i, :length] = 1.0
        arrays["done"][i, length - 1] = 1.0
    return {name: torch.from_numpy(array) for name, array in arrays.items()}


def reward_to_go(rewards, gamma: float):
    """Discounted reward-to-go of a padded batch: rewards (N, T), zero after each episode's end -> G (N, T).

    G[:, t] = sum_{k >= t} gamma^(k - t) r[:, k], computed as G = R Γᵀ with the
    upper-triangular discount matrix Γ[t, k] = gamma^(k - t) for k >= t.
    """
    import torch

    steps = torch.arange(rewards.shape[-1])
    lag = steps[None, :] - steps[:, None]                                # (T, T): lag[t, k] = k - t
    discount = torch.where(lag >= 0, gamma ** lag.clamp(min=0).to(rewards.dtype),
                           torch.zeros((), dtype=rewards.dtype))         # (T, T): Γ, upper triangular
    return rewards @ discount.T                                          # (N, T)


def _as_draw_probabilities(policy) -> np.ndarray:
    """Accept {'w': p, 'l': p}, a length-2 sequence, or a (2, 2) table of P(a|s)."""
    if isinstance(policy, Mapping):
        if set(policy) != set(STATES):
            raise ValueError(f"policy needs exactly the keys {STATES}, got {sorted(policy)}")
        probs = np.array([policy[s] for s in STATES], dtype=float)
    else:
        probs = np.asarray(policy, dtype=float)
        if probs.shape == (2, 2):
            if not np.allclose(probs.sum(axis=1), 1.0):
                raise ValueError("each row of a (2, 2) policy table must sum to 1")
            probs = probs[:, DRAW]
        elif probs.shape != (2,):
            raise ValueError(f"policy must give P(draw | s) for the states {STATES}, got shape {probs.shape}")
    if np.any(probs < 0) or np.any(probs > 1):
        raise ValueError(f"draw probabilities must lie in [0, 1], got {probs}")
    return probs


def policy_values(policy, gamma: float, env: Lottery | None = None) -> dict:
    """True state values V^pi of a stationary policy, by solving the Bellman equations.

    ``policy`` gives P(draw | s) per state. With p_s = P(draw | s), e the end
    probability and T the switching matrix:

        V(s) = p_s * ( mu_s + gamma * (1 - e) * sum_s' T[s, s'] V(s') )

    i.e. the linear system (I - gamma * P) V = r with r_s = p_s * mu_s and
    P[s, s'] = p_s * (1 - e) * T[s, s'].
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    env = env or Lottery()
    draw = _as_draw_probabilities(policy)
    means = np.array([env.reward_means[s] for s in STATES])
    switch = np.array([[1 - env.switch_prob, env.switch_prob],
                       [env.switch_prob, 1 - env.switch_prob]])
    transition = draw[:, None] * (1 - env.end_prob) * switch
    values = np.linalg.solve(np.eye(2) - gamma * transition, draw * means)
    return {s: float(values[i]) + 0.0 for i, s in enumerate(STATES)}  # + 0.0 turns -0.0 into 0.0


def optimal_policy(gamma: float, env: Lottery | None = None):
    """The optimal policy and its values: ``({'w': P(draw|w), 'l': P(draw|l)}, values)``.

    With two states and two actions there are only four deterministic
    policies, and an optimal one is always among them, so we evaluate all
    four exactly and keep the one whose values are largest in every state.
    """
    best = None
    for draw_w in (0.0, 1.0):
        for draw_l in (0.0, 1.0):
            policy = {"w": draw_w, "l": draw_l}
            values = policy_values(policy, gamma, env)
            if best is None or all(values[s] >= best[1][s] - 1e-12 for s in STATES):
                best = (policy, values)
    return best


# ---------------------------------------------------------------------------
# 3. Plot helpers (each returns the figure; the notebook displays it)
# ---------------------------------------------------------------------------

FIG_DPI = 80  # modest: keeps the stored notebooks small


def _new_axes(title: str, xlabel: str, ylabel: str, figsize=(7, 4)):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize, dpi=FIG_DPI)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _plot_per_state(ax, curves: Mapping[str, Sequence[float]], references: Mapping[str, float],
                    steps: Sequence[float] | None, curve_label, reference_label):
    """For each state, its curve (solid) and its reference value (dashed) in one colour; labels are functions of
    the state."""
    for i, state in enumerate(STATES):
        curve = np.asarray(curves[state], dtype=float)
        x = np.arange(len(curve)) if steps is None else np.asarray(steps)
        ax.plot(x, curve, color=f"C{i}", label=curve_label(state))
        ax.axhline(references[state], color=f"C{i}", linestyle="--", label=reference_label(state))


def plot_value_estimates(estimates: Mapping[str, Sequence[float]], true_values: Mapping[str, float],
                         steps: Sequence[float] | None = None, title: str = "Value estimates during training",
                         xlabel: str = "episode", curve_name: str = "estimate", reference_name: str = "true"):
    """V(s) over training (solid) against reference values (dashed), one colour per state.

    ``curve_name`` and ``reference_name`` name the two in the legend ("estimate" and "true" by default).
    """
    fig, ax = _new_axes(title, xlabel, "V(s)")
    _plot_per_state(ax, estimates, true_values, steps, curve_label=lambda state: f"{curve_name} V({state})",
                    reference_label=lambda state: f"{reference_name} V({state}) = {true_values[state]:.2f}")
    ax.legend(loc="best")
    fig.tight_layout()
    return fig


def plot_action_probabilities(draw_probabilities: Mapping[str, Sequence[float]], optimal: Mapping[str, float],
                              steps: Sequence[float] | None = None,
                              title: str = "P(draw | state) during training", xlabel: str = "episode"):
    """P(draw | s) over training (solid) against the optimal policy (dashed)."""
    fig, ax = _new_axes(title, xlabel, "P(draw | s)")
    _plot_per_state(ax, draw_probabilities, optimal, steps, curve_label=lambda state: f"P(draw | {state})",
                    reference_label=lambda state: f"optimal P(draw | {state}) = {optimal[state]:.0f}")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(loc="best")
    fig.tight_layout()
    return fig


def plot_runs_band(runs: Mapping[str, np.ndarray], steps: Sequence[float] | None = None,
                   title: str = "Mean over seeds ± one standard deviation", xlabel: str = "episode",
                   ylabel: str = "value", reference: float | None = None, reference_label: str = "target",
                   legend_below: bool = False):
    """Several seeds per method: the mean as a line and mean ± std as a band.

    ``runs[label]`` has shape (n_seeds, n_points). ``legend_below`` puts the legend under the axes, for
    bands so wide that no corner of the plot is free.
    """
    fig, ax = _new_axes(title, xlabel, ylabel)
    for i, (label, curves) in enumerate(runs.items()):
        curves = np.asarray(curves, dtype=float)
        if curves.ndim != 2:
            raise ValueError(f"runs[{label!r}] must have shape (n_seeds, n_points), got {curves.shape}")
        x = np.arange(curves.shape[1]) if steps is None else np.asarray(steps)
        mean, std = curves.mean(axis=0), curves.std(axis=0)
        ax.plot(x, mean, color=f"C{i}", label=f"{label} (n={curves.shape[0]})")
        ax.fill_between(x, mean - std, mean + std, color=f"C{i}", alpha=0.2)
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", label=reference_label)
    if legend_below:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    else:
        ax.legend(loc="best")
    fig.tight_layout()
    return fig


def check_param(name: str, value, *, low=None, high=None, low_open: bool = False, high_open: bool = False,
                integer: bool = False) -> None:
    """Raise a ``ValueError`` naming the hyperparameter when ``value`` is outside its range.

    Notebooks call this right after their ``parameters`` cell, so a bad value
    stops the notebook before any training starts.
    """
    if integer and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not integer and (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
                        or not np.isfinite(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")


# ---------------------------------------------------------------------------
# 4. The small-LLM lab
# ---------------------------------------------------------------------------
#
# The Hugging Face hub is often out of reach (and always is in CI), so the
# course builds every piece of RLHF itself, in seconds on a CPU:
#
#   corpus of short movie-review sentences  ->  word-level tokenizer
#   -> small GPT-2 trained as a causal LM (the SFT model)
#   -> GPT-2 reward model trained on preference pairs (Bradley-Terry)
#
# The corpus generator knows every word's sentiment and the grammar of its
# sentences, so ``gold_label`` can judge any text: the ground truth that the
# learned reward model is held against.

import contextlib
import hashlib
import json
import os
import re
import time
from pathlib import Path

LAB_DIR = Path(__file__).resolve().parent / "artifacts"  # git-ignored cache of trained models
LAB_VERSION = 6  # part of every cache key: bump it when the corpus, pairs or training code change
LAB_THREADS = 2  # the lab trains on this many CPU threads, whatever the machine (see _lab_threads)
# GPT-2's tanh-approximated GELU, computed by one fused torch kernel instead of the five elementwise ops of
# "gelu_new": the same function, and a 10 % faster training step for models this small
LAB_ACTIVATION = "gelu_pytorch_tanh"

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


def train_tokenizer(texts):
    """A word-level tokenizer trained with the ``tokenizers`` library, wrapped for ``transformers``.

    Special tokens: <pad> (id 0), <bos>, <eos>, <unk>. Padding is on the left,
    as generation with a batch of prompts needs.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

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
    import torch

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


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _config_key(kind: str, config) -> str:
    from dataclasses import asdict

    payload = json.dumps({"kind": kind, "lab_version": LAB_VERSION, **asdict(config)}, sort_keys=True)
    return f"{kind}-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"


def _save_artifact(folder: Path, kind: str, config, model, tokenizer, info: dict) -> None:
    """save_pretrained (safetensors) into a temporary folder, then move it into place atomically."""
    from dataclasses import asdict
    import shutil

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
    from dataclasses import asdict
    from transformers import PreTrainedTokenizerFast

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


@contextlib.contextmanager
def _lab_threads():
    """Train the lab's models on a fixed number of CPU threads (LAB_THREADS).

    torch splits matrix products differently for different thread counts, so the
    trained weights differ in the last bits; with a fixed count they come out the
    same whichever notebook (or 2-core machine) trains them first, and the stored
    notebook outputs stay valid."""
    import torch

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
    import torch

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


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, mininterval=0.5)


def train_sft_model(config: SFTConfig = SFTConfig(), tokenizer=None, progress: bool = True, device=None):
    """Train a small GPT-2 from scratch on the corpus as a causal LM.

    Returns ``(model, tokenizer, info)``; ``info`` holds the loss curve, the
    held-out loss, the training time and the parameter count.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

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
    for rows in _progress(batches, progress, "SFT"):
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

    def __call__(self, texts) -> "torch.Tensor":  # noqa: F821
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
        import torch

        texts = list(texts)
        if not texts:
            raise ValueError("texts is empty: give at least one text to score")
        with torch.no_grad():
            return torch.cat([self.logits(texts[i:i + self.batch_size])
                              for i in range(0, len(texts), self.batch_size)])


def train_reward_model(config: RewardConfig = RewardConfig(), tokenizer=None, progress: bool = True, device=None):
    """Bradley-Terry training: minimise -log sigma(r(chosen) - r(rejected)) over preference pairs.

    Returns ``(LabRewardModel, info)`` with the loss curve, held-out pairwise
    accuracy (per kind of rejected answer; pairs from held-out openings), time
    and parameter count.
    """
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2ForSequenceClassification

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
    for rows in _progress(batches, progress, "reward model"):
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
    from transformers import GPT2LMHeadModel

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
    from transformers import GPT2ForSequenceClassification

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


# --- sampling --------------------------------------------------------------


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


def generate_responses(model, tokenizer, prompts, max_new_tokens: int = 20, do_sample: bool = True,
                       temperature: float = 1.0):
    """Sample a response for every prompt, as one batch.

    Pure sampling from the model's distribution (``top_k=0, top_p=1.0``, no
    hidden warpers) so that the log-probabilities PPO computes later are the
    probabilities the tokens were really drawn with. Returns a dict with
    ``query_ids``/``query_mask`` (batch, prompt_len), ``response_ids``/``response_mask``
    (batch, T), T = the longest response (at most ``max_new_tokens``), and the decoded ``responses``.
    """
    import torch

    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    query = encode_texts(tokenizer, prompts, device)
    prompt_len = query["input_ids"].shape[1]
    if prompt_len + max_new_tokens > context_length(model):
        raise ValueError(f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"context of {context_length(model)} tokens")
    with torch.no_grad():
        sequences = model.generate(input_ids=query["input_ids"], attention_mask=query["attention_mask"],
                                   do_sample=do_sample, top_k=0, top_p=1.0, temperature=temperature,
                                   max_new_tokens=max_new_tokens, min_new_tokens=0,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    # generation stops once every row has ended, so T is the longest response of this batch, not
    # max_new_tokens: every later forward pass over the batch skips the padding columns
    response_ids = sequences[:, prompt_len:]                                    # (B, T), T <= max_new_tokens
    response_mask = response_mask_from_ids(response_ids, tokenizer.eos_token_id)
    responses = tokenizer.batch_decode(response_ids * response_mask + tokenizer.pad_token_id * (1 - response_mask),
                                       skip_special_tokens=True)
    return {"query_ids": query["input_ids"], "query_mask": query["attention_mask"], "response_ids": response_ids,
            "response_mask": response_mask, "prompts": prompts, "responses": [r.strip() for r in responses]}


def join_prompt_response(prompts, responses) -> list:
    return [f"{p} {r}".strip() for p, r in zip(prompts, responses)]


# --- the real path: models from the Hugging Face hub or a local folder -------


def _hub_reachable(timeout: float = 2.0) -> bool:
    import socket

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


def _from_pretrained(loader, name_or_path: str, what: str):
    try:
        return loader.from_pretrained(name_or_path, **_pretrained_kwargs(name_or_path))
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


def load_policy(name_or_path: str = "lab", device=None, sft_config: SFTConfig = SFTConfig(), progress: bool = True):
    """A causal LM and its tokenizer: ``'lab'`` (the embedded SFT model) or any hub name / local folder.

    Returns ``(model, tokenizer)`` on ``device`` (CUDA when present), in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or get_device()
    if name_or_path == "lab":
        model, tokenizer, _ = load_sft_model(sft_config, progress=progress, device=device)
        return model, tokenizer
    model = _from_pretrained(AutoModelForCausalLM, name_or_path, "policy model")
    tokenizer = _prepare_tokenizer(_from_pretrained(AutoTokenizer, name_or_path, "policy tokenizer"), "left")
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
        import torch

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
                log_probs = logits.log_softmax(-1)
                positive = log_probs[:, self.positive_label]
                # log-odds log p / (1 - p): unbounded like the lab's Bradley-Terry score
                scores.append(positive - torch.log1p(-positive.exp().clamp(max=1 - 1e-6)))
        return torch.cat(scores)


def load_reward_model(name_or_path: str = "lab", device=None, reward_config: RewardConfig = RewardConfig(),
                      positive_label: int | None = None, progress: bool = True) -> TextRewardModel:
    """A reward model behind the one interface ``texts -> scores``: ``'lab'`` or a hub / local classifier."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = device or get_device()
    if name_or_path == "lab":
        return load_lab_reward_model(reward_config, progress=progress, device=device)[0]
    model = _from_pretrained(AutoModelForSequenceClassification, name_or_path, "reward model")
    tokenizer = _from_pretrained(AutoTokenizer, name_or_path, "reward tokenizer")
    tokenizer = _prepare_tokenizer(tokenizer, tokenizer.padding_side)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return ClassifierRewardModel(model.to(device), tokenizer, positive_label)


# ---------------------------------------------------------------------------
# 5. PPO for the small LLM (shared by llm_ppo.ipynb and llm_ppo_correct_dropout.ipynb)
# ---------------------------------------------------------------------------
#
# llm_ppo.ipynb walks through every function below, shows its source
# (``show_source``) and checks it; both PPO notebooks then run this single copy,
# so they cannot drift apart.

import csv
import warnings

METRIC_COLUMNS = ("iteration", "score", "p_positive", "ref_score", "ref_p_positive", "kl", "entropy", "clipfrac",
                  "approx_kl", "value_loss", "explained_variance", "response_length", "seconds")


def show_source(*functions):
    """Display the source of functions or classes in the notebook, so the lesson reads the code that runs."""
    import inspect
    from IPython.display import Code, display

    display(Code("\n\n".join(inspect.getsource(f) for f in functions), language="python"))


@dataclass
class PPOConfig:
    """Every PPO hyperparameter, with the defaults the notebooks use."""

    batch_size: int = 64          # prompts per iteration (one rollout batch)
    max_new_tokens: int = 20      # response length cap
    ppo_epochs: int = 4           # passes over the rollout batch
    minibatch_size: int = 16      # 64 / 16 = 4 minibatches per epoch
    lr: float = 3e-4              # Adam learning rate of the language model
    value_lr: float = 3e-3        # Adam learning rate of the value head (a linear probe learns faster)
    clip_range: float = 0.2       # epsilon of the clipped surrogate
    clip_range_value: float = 0.2  # the value loss is clipped around the old values, too
    value_coef: float = 0.5       # c1
    entropy_coef: float = 0.0     # c2 (entropy bonus)
    beta: float = 0.3             # KL coefficient (initial value when adaptive)
    kl_in_reward: bool = True     # True: -beta * KL per token in the reward; False: + beta * KL in the loss
    adaptive_kl: bool = False     # adapt beta towards target_kl (Ziegler et al. 2019)
    target_kl: float = 2.0        # target per-sequence KL for the adaptive controller
    kl_horizon: float = 1.0       # controller speed: beta changes by at most 20 % / kl_horizon per iteration
    gamma: float = 1.0            # discount over response tokens
    lam: float = 0.95             # GAE lambda
    whiten_advantages: bool = True
    use_value_clipping: bool = True
    max_grad_norm: float = 1.0
    early_stop_kl: float | None = 0.02  # end an iteration's updates once a minibatch's approx_kl exceeds this (None: never)
    dropout: bool = False         # True = dropout ACTIVE in rollouts and log-prob passes (the bug, see notebook 6)

    def validate(self, context: int | None = None, prompt_length: int = 0) -> None:
        """Raise a ValueError naming the first bad hyperparameter, before any training."""
        check_param("batch_size", self.batch_size, low=1, integer=True)
        check_param("max_new_tokens", self.max_new_tokens, low=1, integer=True)
        check_param("ppo_epochs", self.ppo_epochs, low=1, integer=True)
        check_param("minibatch_size", self.minibatch_size, low=1, integer=True)
        if self.minibatch_size > self.batch_size:
            raise ValueError(f"minibatch_size ({self.minibatch_size}) must not exceed batch_size ({self.batch_size})")
        check_param("lr", self.lr, low=0, low_open=True)
        check_param("value_lr", self.value_lr, low=0, low_open=True)
        check_param("clip_range", self.clip_range, low=0, low_open=True)
        check_param("clip_range_value", self.clip_range_value, low=0, low_open=True)
        check_param("value_coef", self.value_coef, low=0)
        check_param("entropy_coef", self.entropy_coef, low=0)
        check_param("beta", self.beta, low=0)
        check_param("target_kl", self.target_kl, low=0, low_open=True)
        check_param("kl_horizon", self.kl_horizon, low=0, low_open=True)
        check_param("gamma", self.gamma, low=0, high=1)
        check_param("lam", self.lam, low=0, high=1)
        check_param("max_grad_norm", self.max_grad_norm, low=0, low_open=True)
        if self.early_stop_kl is not None:
            check_param("early_stop_kl", self.early_stop_kl, low=0, low_open=True)
        if context is not None and prompt_length + self.max_new_tokens > context:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) plus the longest prompt ({prompt_length} tokens) "
                             f"exceeds the model's context of {context} tokens")


class PolicyWithValueHead:
    """The PPO policy: a causal LM plus a linear value head on its last hidden state.

    With ``detach_value`` (the default) the value loss trains only the head: the
    critic's squared errors, in reward units, would otherwise flow into the
    language model and disturb the policy gradient (llm_ppo.ipynb measures it).

    Calling it returns logits (batch, seq_len, vocab) and values (batch, seq_len):
    ``values[:, i]`` estimates the return from the state "tokens 0..i seen".
    """

    def __init__(self, lm, detach_value: bool = True):
        import torch

        self.lm, self.detach_value = lm, detach_value
        hidden = lm.config.hidden_size
        self.value_head = torch.nn.Linear(hidden, 1).to(next(lm.parameters()).device)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def parameters(self):
        return [*self.lm.parameters(), *self.value_head.parameters()]

    def train(self, mode: bool = True):
        self.lm.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, input_ids, attention_mask, position_ids):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=True)
        hidden = out.hidden_states[-1]
        values = self.value_head(hidden.detach() if self.detach_value else hidden).squeeze(-1)
        return out.logits, values


def masked_mean(x, mask, dim=None):
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x, mask, eps: float = 1e-8):
    """Normalise to mean 0, std 1 over the real (masked-in) tokens; padding stays 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) / (var + eps).sqrt() * mask


def response_logprobs(model, query_ids, query_mask, response_ids, response_mask, with_values: bool = False):
    """Log-probabilities of the response tokens, their entropies and (optionally) values, in ONE forward pass.

    Sequence = prompt (left padded, length P) + response (length T). The token
    at position P + t is predicted by the logits at position P + t - 1, and
    V(s_t), the value *before* token t is generated, is read there too.
    Returns logprobs, entropy, values: each (batch, T).
    """
    import torch

    input_ids = torch.cat([query_ids, response_ids], dim=1)            # (B, P + T)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)     # (B, P + T)
    position_ids = position_ids_from_mask(attention_mask)
    prompt_len, response_len = query_ids.shape[1], response_ids.shape[1]
    if with_values:
        logits, values = model(input_ids, attention_mask, position_ids)
        values = values[:, prompt_len - 1:-1]                          # (B, T)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        values = None
    logits = logits[:, prompt_len - 1:-1].float()                      # (B, T, vocab)
    log_probs_all = logits.log_softmax(-1)
    logprobs = log_probs_all.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
    entropy = -(log_probs_all.exp() * log_probs_all).sum(-1)           # (B, T)
    assert logprobs.shape == (query_ids.shape[0], response_len)
    return logprobs, entropy, values


def token_rewards(logprobs, ref_logprobs, scores, response_mask, beta: float):
    """Per-token reward: -beta * (log pi - log pi_ref) on every response token,
    plus the reward model's score on the last real response token. All (batch, T)."""
    import torch

    kl = (logprobs - ref_logprobs) * response_mask
    rewards = -beta * kl
    last = response_mask.sum(1).long() - 1                              # index of the last real token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def compute_gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation over the response tokens, for a whole batch.

        delta_t = r_t + gamma * V(s_{t+1}) * m_{t+1} - V(s_t)
        A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}

    ``mask`` (batch, T) is 1 on real tokens; past the last real token the
    episode has ended, so V(s_{t+1}) and A_{t+1} count as 0 there.
    Returns advantages and returns (= advantages + values), each (batch, T).
    """
    import torch

    T = rewards.shape[1]
    mask = mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_mask = mask[:, t + 1] if t + 1 < T else torch.zeros_like(mask[:, 0])
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        next_advantage = delta + gamma * lam * next_mask * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_loss(new_logprobs, old_logprobs, advantages, new_values, old_values, returns, entropy, mask,
             config: PPOConfig, kl_to_ref=None, beta: float = 0.0):
    """The PPO objective as a loss to minimise (the chapter's L = L_CLIP - c1 L_VF - beta L_KL + c2 H, negated).

    Returns the loss and a dict of diagnostics (floats).
    """
    import torch

    ratio = torch.exp(new_logprobs - old_logprobs)                      # (B, T)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - config.clip_range, 1 + config.clip_range) * advantages
    policy_loss = -masked_mean(torch.min(unclipped, clipped), mask)

    value_error = (new_values - returns) ** 2
    if config.use_value_clipping:
        clipped_values = old_values + torch.clamp(new_values - old_values, -config.clip_range_value,
                                                  config.clip_range_value)
        value_error = torch.max(value_error, (clipped_values - returns) ** 2)
    value_loss = 0.5 * masked_mean(value_error, mask)

    mean_entropy = masked_mean(entropy, mask)
    loss = policy_loss + config.value_coef * value_loss - config.entropy_coef * mean_entropy
    if kl_to_ref is not None and not config.kl_in_reward:
        loss = loss + beta * masked_mean(kl_to_ref, mask)

    with torch.no_grad():
        log_ratio = new_logprobs - old_logprobs
        stats = {
            "policy_loss": policy_loss.item(),
            "value_loss": value_loss.item(),
            "entropy": mean_entropy.item(),
            "clipfrac": masked_mean(((ratio - 1).abs() > config.clip_range).float(), mask).item(),
            "approx_kl": masked_mean(ratio - 1 - log_ratio, mask).item(),   # k3 estimator, >= 0
            "max_ratio_deviation": ((ratio - 1).abs() * mask).max().item(),
        }
    return loss, stats


class KLController:
    """Fixed beta, or the adaptive rule beta <- beta * (1 + clip((KL - target) / target, -0.2, 0.2) / horizon)."""

    def __init__(self, beta: float, adaptive: bool = False, target: float = 2.0, horizon: float = 1.0):
        self.beta, self.adaptive, self.target, self.horizon = beta, adaptive, target, horizon

    def update(self, kl: float) -> float:
        if self.adaptive:
            error = float(np.clip((kl - self.target) / self.target, -0.2, 0.2))
            self.beta *= 1 + error / self.horizon
        return self.beta


def explained_variance(values, returns, mask) -> float:
    """1 - Var(returns - values) / Var(returns) over real tokens: 1 is a perfect critic, 0 a useless one."""
    v, r = values[mask.bool()], returns[mask.bool()]
    var = r.var()
    return float("nan") if var == 0 else float(1 - (r - v).var() / var)


def evaluate_policy(lm, tokenizer, reward_model, prompts, samples_per_prompt: int, max_new_tokens: int,
                    seed: int, dropout: bool = False):
    """Mean reward-model score and gold share of positive reviews on sampled responses to ``prompts``.

    Returns them with the texts, their gold labels and the ``generate_responses`` dict (token ids and
    masks, for callers that measure more on the same samples). Uses its own random stream
    (``fork_rng``), so evaluating does not change the training run's samples.
    """
    import torch

    prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    was_training = lm.training
    lm.train(dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rollout = generate_responses(lm, tokenizer, prompts, max_new_tokens)
    lm.train(was_training)
    texts = join_prompt_response(rollout["prompts"], rollout["responses"])
    scores = reward_model(texts)
    labels = gold_labels(texts)
    return {"score": scores.mean().item(), "p_positive": labels.count("positive") / len(labels),
            "texts": texts, "labels": labels, "rollout": rollout}


def ppo_rollout(policy: PolicyWithValueHead, ref_lm, tokenizer, reward_model, prompts, config: PPOConfig,
                beta: float) -> dict:
    """Steps 1-4 of a PPO iteration, for a whole batch of prompts at once.

    Sample a response per prompt, score it, compute the old policy's and the
    reference's log-probs and the old values, the per-token rewards and the
    advantages. Returns a dict of tensors, each (batch, T) unless noted.
    """
    import torch

    device = next(policy.lm.parameters()).device
    # 1. rollout: sampled responses (dropout only if the config asks for the bug)
    policy.train(config.dropout)
    rollout = generate_responses(policy.lm, tokenizer, prompts, config.max_new_tokens)
    q_ids, q_mask = rollout["query_ids"], rollout["query_mask"]       # (B, P)
    r_ids, r_mask = rollout["response_ids"], rollout["response_mask"]  # (B, T)
    with torch.no_grad():
        # 2. score with the reward model; log-probs and values of the old policy and the reference
        scores = reward_model(join_prompt_response(prompts, rollout["responses"])).to(device)  # (B,)
        old_logprobs, _, old_values = response_logprobs(policy, q_ids, q_mask, r_ids, r_mask, True)
        ref_logprobs, _, _ = response_logprobs(ref_lm, q_ids, q_mask, r_ids, r_mask)
        # 3. per-token rewards (KL in the reward, or 0 there when it goes into the loss)
        rewards, kl = token_rewards(old_logprobs, ref_logprobs, scores, r_mask, beta if config.kl_in_reward else 0.0)
        # 4. advantages over the response tokens
        advantages, returns = compute_gae(rewards, old_values, r_mask, config.gamma, config.lam)
        if config.whiten_advantages:
            advantages = whiten(advantages, r_mask)
    return {"query_ids": q_ids, "query_mask": q_mask, "response_ids": r_ids, "response_mask": r_mask,
            "scores": scores, "old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs, "old_values": old_values,
            "kl": kl, "advantages": advantages, "returns": returns}


def ppo_update(policy: PolicyWithValueHead, optimizer, batch: dict, config: PPOConfig, beta: float,
               where: str = "") -> list:
    """Step 5: ``ppo_epochs`` passes of shuffled minibatch updates of the clipped objective on one rollout batch.

    Stops early once a minibatch's approx-KL exceeds ``config.early_stop_kl``
    (measured before that minibatch's update, which is then skipped). Returns
    the diagnostics of every minibatch whose loss was computed.
    """
    import torch

    device = batch["response_ids"].device
    n_rows = len(batch["response_ids"])
    policy.train(config.dropout)  # eval mode (dropout off) unless the config asks for the bug
    stats_log = []
    for epoch in range(config.ppo_epochs):
        order = torch.randperm(n_rows)
        for k, start_row in enumerate(range(0, n_rows, config.minibatch_size)):
            rows = order[start_row:start_row + config.minibatch_size].to(device)
            mb = {name: value[rows] for name, value in batch.items()}        # each (minibatch, ...)
            new_logprobs, entropy, new_values = response_logprobs(
                policy, mb["query_ids"], mb["query_mask"], mb["response_ids"], mb["response_mask"], True)
            loss, stats = ppo_loss(new_logprobs, mb["old_logprobs"], mb["advantages"], new_values, mb["old_values"],
                                   mb["returns"], entropy, mb["response_mask"], config,
                                   kl_to_ref=new_logprobs - mb["ref_logprobs"], beta=beta)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"PPO loss is {loss.item()} ({where + ', ' if where else ''}epoch {epoch}, minibatch {k}; "
                    f"policy loss {stats['policy_loss']}, value loss {stats['value_loss']}): "
                    f"lower lr or check the rewards")
            stats_log.append(stats)
            if config.early_stop_kl is not None and stats["approx_kl"] > config.early_stop_kl:
                return stats_log  # this rollout has moved the policy far enough: skip the remaining updates
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
            optimizer.step()
    return stats_log


def ppo_optimizer(policy: PolicyWithValueHead, config: PPOConfig):
    """Adam with its own learning rate for the value head; the fused kernel updates all parameters at once."""
    import torch

    return torch.optim.Adam([{"params": list(policy.lm.parameters()), "lr": config.lr},
                             {"params": list(policy.value_head.parameters()), "lr": config.value_lr}],
                            fused=True)


def train_ppo(policy: PolicyWithValueHead, ref_lm, tokenizer, reward_model, config: PPOConfig, n_iterations: int,
              train_prompts, eval_prompts, run_name: str, run_dir: Path | str, seed: int = 0,
              eval_samples_per_prompt: int = 16, progress: bool = True, on_first_minibatch=None):
    """The whole PPO loop; one CSV row of ``METRIC_COLUMNS`` per iteration in ``run_dir/run_name.csv``.

    Each iteration: sample a batch of prompts, then ``ppo_rollout`` (generate,
    score, per-token rewards with the KL penalty, GAE) and ``ppo_update``
    (``ppo_epochs`` passes of minibatch updates of the clipped objective), then
    evaluate on the held-out prompts. Returns the list of metric rows (dicts).
    """
    train_prompts = list(train_prompts)
    longest_prompt = max(len(tokenizer(p)["input_ids"]) for p in train_prompts + list(eval_prompts))
    config.validate(context_length(policy.lm), longest_prompt)
    check_param("n_iterations", n_iterations, low=1, integer=True)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", run_name):
        raise ValueError(f"run_name must use letters, digits, '_', '.', '-' only, got {run_name!r}")
    run_path = Path(run_dir) / f"{run_name}.csv"
    run_path.parent.mkdir(parents=True, exist_ok=True)

    set_seed(seed)
    optimizer = ppo_optimizer(policy, config)
    kl_controller = KLController(config.beta, config.adaptive_kl, config.target_kl, config.kl_horizon)
    ref_lm.train(config.dropout)  # the reference is frozen; dropout (if on) still perturbs it
    for p in ref_lm.parameters():
        p.requires_grad_(False)
    ref_eval = evaluate_policy(ref_lm, tokenizer, reward_model, eval_prompts, eval_samples_per_prompt * 4,
                               config.max_new_tokens, seed=seed + 1)
    rng = np.random.default_rng(seed)
    rows, negative_kl_streak = [], 0
    with open(run_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        for iteration in _progress(range(1, n_iterations + 1), progress, run_name):
            start = time.perf_counter()
            beta = kl_controller.beta
            prompts = [train_prompts[i] for i in rng.integers(len(train_prompts), size=config.batch_size)]
            batch = ppo_rollout(policy, ref_lm, tokenizer, reward_model, prompts, config, beta)
            stats_log = ppo_update(policy, optimizer, batch, config, beta, where=f"iteration {iteration}")
            if iteration == 1 and on_first_minibatch is not None:
                on_first_minibatch(stats_log[0])  # weights not yet updated: the ratio must be exactly 1
            seconds = time.perf_counter() - start
            mean_kl = batch["kl"].sum(1).mean().item()  # per-sequence sum of log pi - log pi_ref, batch mean
            kl_controller.update(mean_kl)
            negative_kl_streak = negative_kl_streak + 1 if mean_kl < 0 else 0
            if negative_kl_streak == 3:
                warnings.warn(f"KL to the reference has been negative for 3 iterations in a row (now {mean_kl:.3f}): "
                              "sampling and scoring disagree (dropout on? a sampling warper?)")
            evaluation = evaluate_policy(policy.lm, tokenizer, reward_model, eval_prompts, eval_samples_per_prompt,
                                         config.max_new_tokens, seed=seed + 1000 + iteration, dropout=config.dropout)
            row = {
                "iteration": iteration,
                "score": evaluation["score"],
                "p_positive": evaluation["p_positive"],
                "ref_score": ref_eval["score"],
                "ref_p_positive": ref_eval["p_positive"],
                "kl": mean_kl,
                "entropy": float(np.mean([s["entropy"] for s in stats_log])),
                "clipfrac": float(np.mean([s["clipfrac"] for s in stats_log])),
                "approx_kl": float(np.mean([s["approx_kl"] for s in stats_log])),
                "value_loss": float(np.mean([s["value_loss"] for s in stats_log])),
                "explained_variance": explained_variance(batch["old_values"], batch["returns"], batch["response_mask"]),
                "response_length": batch["response_mask"].sum(1).float().mean().item(),
                "seconds": seconds,
            }
            writer.writerow(row)
            f.flush()
            rows.append({**row, "beta": beta})
    return rows


def read_run(path) -> dict:
    """A run's CSV as a dict of column -> numpy array."""
    with open(path) as f:
        records = list(csv.DictReader(f))
    return {column: np.array([float(r[column]) for r in records]) for column in records[0]}
