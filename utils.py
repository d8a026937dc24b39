"""What every notebook shares: reproducibility, the toy game with its exact solution, plots, checks.

Sections
--------
1. Reproducibility and device: ``set_seed``, ``get_device``.
2. The chapter's toy game ``Lottery``; batches of episodes as padded tensors (``play_batch``,
   ``to_padded_batch``, ``reward_to_go``; ``play_batches`` plays many policies at once); the exact
   Bellman solution (``policy_values``, its differentiable twin ``policy_values_torch``,
   ``optimal_policy``) that the toy notebooks hold every estimate against.
3. Plot helpers; each returns a matplotlib figure.
4. Notebook helpers: ``check_param`` (validates a hyperparameter, naming it), ``expected_failure``
   (shows a wrong version failing), ``show_source``, ``count_parameters``, ``progress_bar``.

Used by every notebook. The algorithms of value_learning, policy_learning, a2c and ddpg_td3 are
written out in those notebooks; the small-LLM lab lives in ``llm_lab.py`` and the RLHF algorithms in
``rlhf.py``, which build on this module (imports point one way: rlhf -> llm_lab -> utils).
"""
from __future__ import annotations

import contextlib
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

    The game has its own random generator (``set_seed`` does not reach it): seed it with
    ``Lottery(seed=...)`` or with the first ``reset(seed=...)`` of a run, then call ``reset()``
    without a seed to continue the same random stream. ``step`` returns Gymnasium's pair of end
    flags: ``terminated`` (the game itself ended: no future rewards, the value after it is 0) and
    ``truncated`` (stopped from outside, e.g. by a time limit: the state still had a future, so a
    learner bootstraps from it). The game never truncates: ``play_episode`` raises instead.
    """

    def __init__(self, end_prob: float = 0.01, switch_prob: float = 0.0,
                 reward_means: Mapping[str, float] | None = None, reward_std: float = 1.0,
                 seed: int | None = None):
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
        self._rng = np.random.default_rng(seed)
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


def play_batches(draw_prob, n_episodes: int, rng: np.random.Generator, env: Lottery | None = None,
                 dtype=None) -> dict:
    """Play ``n_episodes`` episodes for each of R policies at once: padded tensors of shape (R, n_episodes, T).

    ``draw_prob`` has shape (R, 2), P(draw | s) of each policy (states ordered as ``STATES``); the rules come
    from ``env`` (default ``Lottery()``), the random numbers from ``rng`` (a ``np.random.Generator``). The
    result holds the tensors of ``to_padded_batch`` with a leading run axis; T is the longest episode of all,
    float tensors have ``dtype`` (default: torch's default dtype). One numpy step advances every running
    episode at once, so the Python loop runs once per time step of the longest episode, not once per step of
    every episode: this is how the notebooks train many seeds together. Same rules as ``play_episode``
    (tests/test_game.py compares the statistics), not the same random stream.
    """
    import torch

    env = env or Lottery()
    draw_prob = np.asarray(draw_prob, dtype=float)
    if draw_prob.ndim != 2 or draw_prob.shape[1] != len(STATES) or np.any((draw_prob < 0) | (draw_prob > 1)):
        raise ValueError(f"draw_prob must be an (R, 2) array of probabilities, got {draw_prob!r}")
    n_runs, total = draw_prob.shape[0], draw_prob.shape[0] * n_episodes
    episode_draw_prob = np.repeat(draw_prob, n_episodes, axis=0)             # (R * n_episodes, 2)
    means = np.array([env.reward_means[s] for s in STATES])
    episode = np.arange(total)                                             # the episodes still running ...
    state = rng.integers(len(STATES), size=total)                          # ... and their current states
    steps = []  # one tuple of arrays per time step, over the episodes still running at that step
    while episode.size:
        n = episode.size
        draw = rng.random(n) < episode_draw_prob[episode, state]
        reward = np.where(draw, means[state] + env.reward_std * rng.standard_normal(n), 0.0)
        end = ~draw | (rng.random(n) < env.end_prob)                        # a stop always ends the episode
        next_state = state
        if env.switch_prob > 0:
            next_state = np.where(~end & (rng.random(n) < env.switch_prob), 1 - state, state)
        steps.append((episode, state, next_state, draw, reward, end))
        episode, state = episode[~end], next_state[~end]
    rows = np.concatenate([step[0] for step in steps])                     # (total steps,) episode of each step
    cols = np.repeat(np.arange(len(steps)), [step[0].size for step in steps])  # its time index
    batch = {}
    for k, (name, kind) in enumerate((("states", np.int64), ("next_states", np.int64), ("actions", np.int64),
                                      ("rewards", float), ("done", float)), start=1):
        padded = np.zeros((total, len(steps)), dtype=kind)
        padded[rows, cols] = np.concatenate([step[k] for step in steps])
        batch[name] = padded
    batch["mask"] = np.zeros((total, len(steps)))
    batch["mask"][rows, cols] = 1.0
    dtype = dtype or torch.get_default_dtype()
    return {name: torch.from_numpy(array).view(n_runs, n_episodes, len(steps)).to(
        torch.int64 if array.dtype == np.int64 else dtype) for name, array in batch.items()}


def reward_to_go(rewards, gamma: float):
    """Discounted reward-to-go of a padded batch: rewards (N, T), zero after each episode's end -> G (N, T).

    G[:, t] = sum_{k >= t} gamma^(k - t) r[:, k], computed as G = R Γᵀ with the
    upper-triangular discount matrix Γ[t, k] = gamma^(k - t) for k >= t.
    """
    import torch

    steps = torch.arange(rewards.shape[-1])
    powers = gamma ** steps.to(rewards.dtype)                            # (T,): γ^0, γ^1, ..., γ^(T-1)
    lag = steps[None, :] - steps[:, None]                                # (T, T): lag[t, k] = k - t
    discount = torch.triu(powers[lag.clamp(min=0)])                      # (T, T): Γ, zero below the diagonal
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


def policy_values_torch(draw_prob, gamma: float, env: Lottery | None = None):
    """``policy_values`` in torch: batched and differentiable, so autograd gives exact gradients of V^pi.

    ``draw_prob``: tensor (..., 2) of P(draw | s) -> V^pi, tensor (..., 2), states ordered as ``STATES``.
    The same Bellman system (I - gamma * P) V = r, solved by ``torch.linalg.solve`` for every policy of the
    batch; gradients flow back to ``draw_prob`` and to whatever produced it (logits, a network).
    """
    import torch

    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    env = env or Lottery()
    dtype = draw_prob.dtype
    means = torch.tensor([env.reward_means[s] for s in STATES], dtype=dtype)                     # (2,)
    switch = torch.tensor([[1 - env.switch_prob, env.switch_prob],
                           [env.switch_prob, 1 - env.switch_prob]], dtype=dtype)               # (2, 2)
    transition = draw_prob[..., :, None] * (1 - env.end_prob) * switch                         # (..., 2, 2)
    system = torch.eye(len(STATES), dtype=dtype) - gamma * transition                          # (..., 2, 2)
    return torch.linalg.solve(system, (draw_prob * means)[..., None]).squeeze(-1)              # (..., 2)


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


def _plot_per_state(ax, curves: Mapping[str, Sequence[float]], references: Mapping, steps: Sequence[float] | None,
                    curve_label, reference_label):
    """For each state, its curve (solid) and its reference (dashed) in one colour; labels are functions of the
    state. A reference is a number (a horizontal line) or a sequence as long as the curve (a dashed curve)."""
    for i, state in enumerate(STATES):
        curve = np.asarray(curves[state], dtype=float)
        x = np.arange(len(curve)) if steps is None else np.asarray(steps)
        reference = np.asarray(references[state], dtype=float)
        if reference.ndim == 0:
            ax.axhline(float(reference), color=f"C{i}", linestyle="--", linewidth=1.2, zorder=1,
                       label=reference_label(state))
        else:
            ax.plot(x, reference, color=f"C{i}", linestyle="--", linewidth=1.2, zorder=1,
                    label=reference_label(state))
        ax.plot(x, curve, color=f"C{i}", zorder=2, label=curve_label(state))


def plot_value_estimates(estimates: Mapping[str, Sequence[float]], true_values: Mapping,
                         steps: Sequence[float] | None = None, title: str = "Value estimates during training",
                         xlabel: str = "episode", curve_name: str = "estimate", reference_name: str = "true"):
    """V(s) over training (solid) against reference values (dashed), one colour per state.

    A reference is a number per state, or a sequence per state (e.g. V^pi of the policy at each point of
    training). ``curve_name`` and ``reference_name`` name the two in the legend ("estimate" and "true").
    """
    def reference_label(state):
        value = np.asarray(true_values[state], dtype=float)
        return f"{reference_name} V({state})" + (f" = {float(value):.2f}" if value.ndim == 0 else "")

    fig, ax = _new_axes(title, xlabel, "V(s)")
    _plot_per_state(ax, estimates, true_values, steps, curve_label=lambda state: f"{curve_name} V({state})",
                    reference_label=reference_label)
    ax.legend(loc="best")
    fig.tight_layout()
    return fig


def plot_action_probabilities(draw_probabilities: Mapping[str, Sequence[float]], optimal: Mapping[str, float],
                              steps: Sequence[float] | None = None,
                              title: str = "P(draw | state) during training", xlabel: str = "episode"):
    """P(draw | s) over training (solid) against the optimal policy (dashed)."""
    fig, ax = _new_axes(title, xlabel, "P(draw | s)")
    _plot_per_state(ax, draw_probabilities, optimal, steps, curve_label=lambda state: f"P(draw | {state})",
                    reference_label=lambda state: f"optimal P(draw | {state}) = {optimal[state]:g}")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(loc="best")
    fig.tight_layout()
    return fig


def plot_runs_band(runs: Mapping[str, np.ndarray], steps: Sequence[float] | None = None,
                   title: str | None = None, xlabel: str = "episode",
                   ylabel: str = "value", reference: float | None = None, reference_label: str = "target",
                   legend_below: bool = False, band: str = "std", quantiles: tuple = (0.1, 0.9)):
    """Several seeds per method: a line and a band over the seeds.

    ``runs[label]`` has shape (n_seeds, n_points). ``band="std"``: the mean and mean ± one standard
    deviation (for quantities without bounds); ``band="quantile"``: the median and the ``quantiles``
    of the seeds, which stay inside any range the curves stay in (a probability, a return that cannot
    beat the optimum). ``legend_below`` puts the legend under the axes, for bands so wide that no corner
    of the plot is free.
    """
    if band not in ("std", "quantile"):
        raise ValueError(f"band must be 'std' or 'quantile', got {band!r}")
    low_q, high_q = quantiles
    if title is None:
        title = ("Mean over seeds ± one standard deviation" if band == "std"
                 else f"Median over seeds, band from the {low_q:.0%} to the {high_q:.0%} quantile")
    fig, ax = _new_axes(title, xlabel, ylabel)
    if reference is not None:  # drawn first, so that a curve lying on it stays visible
        ax.axhline(reference, color="black", linestyle="--", linewidth=1.0, zorder=1, label=reference_label)
    for i, (label, curves) in enumerate(runs.items()):
        curves = np.asarray(curves, dtype=float)
        if curves.ndim != 2:
            raise ValueError(f"runs[{label!r}] must have shape (n_seeds, n_points), got {curves.shape}")
        x = np.arange(curves.shape[1]) if steps is None else np.asarray(steps)
        if band == "std":
            center, std = curves.mean(axis=0), curves.std(axis=0)
            low, high = center - std, center + std
        else:
            low, center, high = np.quantile(curves, [low_q, 0.5, high_q], axis=0)
        ax.plot(x, center, color=f"C{i}", zorder=3, label=f"{label} (n={curves.shape[0]})")
        ax.fill_between(x, low, high, color=f"C{i}", alpha=0.2, zorder=2)
    if legend_below:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    else:
        ax.legend(loc="best")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------
# 4. Notebook helpers
# ---------------------------------------------------------------------------

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



def mean_confidence_interval(samples, level: float = 0.95):
    """Mean of ``samples`` and its Student-t confidence interval: ``(mean, low, high)``.

    For paired comparisons pass the per-seed differences. The t quantile comes from the Cornish-Fisher
    expansion around the normal quantile (within 0.003 of the exact value for 5 or more degrees of freedom).
    """
    from statistics import NormalDist

    samples = np.asarray(samples, dtype=float)
    if samples.ndim != 1 or samples.size < 2 or not np.all(np.isfinite(samples)):
        raise ValueError(f"samples must be a 1-d array of at least 2 finite numbers, got {samples!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    dof, z = samples.size - 1, NormalDist().inv_cdf(0.5 + level / 2)
    t = (z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)
         + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * dof**3))
    mean = float(samples.mean())
    half_width = t * float(samples.std(ddof=1)) / np.sqrt(samples.size)
    return mean, mean - half_width, mean + half_width


def count_parameters(model) -> int:
    """Number of scalar parameters of a torch module."""
    return sum(p.numel() for p in model.parameters())


def progress_bar(iterable, enabled: bool = True, desc: str | None = None):
    """A tqdm progress bar over ``iterable`` (on stderr, which nbval does not compare); none when not ``enabled``."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, mininterval=0.5)


@contextlib.contextmanager
def expected_failure(*errors: type):
    """Run a deliberately wrong version inside ``with expected_failure(AssertionError):``.

    The error it raises is printed, as a reader should see it, and the cell goes on; if the wrong
    version does NOT fail, the check has no teeth and this raises. Unlike a cell that ends in an
    error, it lets "Run All", nbconvert and papermill run the whole notebook.
    """
    errors = errors or (AssertionError,)
    try:
        yield
    except errors as err:
        print(f"{type(err).__name__}, as expected: {err}")
    else:
        raise AssertionError(f"expected {' or '.join(e.__name__ for e in errors)}, but the wrong version passed")


def show_source(*functions):
    """Display the source of functions or classes in the notebook, so the lesson reads the code that runs.

    The code is shown as a Markdown code block: Jupyter highlights it, and the stored output is the plain
    source text, the same whatever version of a syntax highlighter is installed (nbval compares it).
    """
    import inspect
    from IPython.display import Markdown, display

    source = "\n\n".join(inspect.getsource(f).rstrip() for f in functions)
    display(Markdown(f"```python\n{source}\n```"))


# ---------------------------------------------------------------------------
# 5. Many runs in stacked tensors (ddpg_td3): a masked Adam and a band plot per variant
# ---------------------------------------------------------------------------

class MaskedAdam:
    """Adam (Kingma & Ba, 2015) for stacked models: every tensor in ``params`` has a leading model axis.

    ``step(grads, mask)`` updates only the models where ``mask`` (M,) is True. A model masked off keeps
    its weights, its moment estimates and its step count bit for bit; ``torch.optim.Adam`` given a zero
    gradient would still move it, since its first moment remembers earlier gradients.
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        import torch

        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = [torch.zeros_like(p) for p in params]                           # first moment, per weight
        self.v = [torch.zeros_like(p) for p in params]                           # second moment, per weight
        self.steps = torch.zeros(params[0].shape[0], device=params[0].device)    # updates so far, per model

    def step(self, grads, mask=None):
        import torch

        with torch.no_grad():
            if mask is None:
                mask = torch.ones(self.steps.shape, dtype=torch.bool, device=self.steps.device)
            beta1, beta2 = self.betas
            self.steps += mask
            t = self.steps.clamp(min=1)                                          # (M,): each model's own step count
            for p, g, m, v in zip(self.params, grads, self.m, self.v):
                shape = (-1,) + (1,) * (p.dim() - 1)
                on = mask.view(shape).to(p.dtype)                                # 1 for models that update, else 0
                m.lerp_(g, (1 - beta1) * on)                                     # m <- b1 m + (1 - b1) g
                v.lerp_(g * g, (1 - beta2) * on)                                 # v <- b2 v + (1 - b2) g^2
                step_size = (self.lr / (1 - beta1 ** t)).view(shape) * on        # lr / (1 - b1^t); 0 when masked off
                denominator = (v / (1 - beta2 ** t).view(shape)).sqrt_().add_(self.eps)
                p.addcdiv_(m * step_size, denominator, value=-1.0)               # p <- p - lr m_hat / (sqrt(v_hat) + eps)


def plot_seed_bands(curves: Mapping[str, np.ndarray], steps: Sequence[float], *, labels: Mapping | None = None,
                    colors: Mapping | None = None, wide: str | None = None, ax=None, title: str = "",
                    xlabel: str = "step", ylabel: str = "value", reference: float | None = None,
                    reference_label: str = "target", legend_columns: int = 2):
    """Several variants with several seeds each: per variant the mean over the seeds and a band of
    ± one sample standard deviation (ddof=1; no band for a single seed). Returns the figure.

    ``curves[name]`` has shape (n_seeds, n_points). ``labels`` and ``colors`` map names to legend text
    and colours (default: the name, and C0, C1, ... in the order of ``curves``). ``wide`` names a curve
    drawn first, in a wide line, so that a curve lying on top of it still shows. ``ax`` draws into
    existing axes. The legend goes under the axes, since early bands can fill every corner.
    """
    if ax is None:
        fig, ax = _new_axes(title, xlabel, ylabel, figsize=(7, 4.6))
    else:
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
    labels = labels or {name: name for name in curves}
    colors = colors or {name: f"C{i}" for i, name in enumerate(curves)}
    if reference is not None:  # drawn first, so that a curve lying on it stays visible
        ax.axhline(reference, color="black", linestyle="--", linewidth=1.0, zorder=1, label=reference_label)
    for name in sorted(curves, key=lambda n: n != wide):  # stable sort: `wide` first, the others in order
        values = np.asarray(curves[name], dtype=float)
        if values.ndim != 2:
            raise ValueError(f"curves[{name!r}] must have shape (n_seeds, n_points), got {values.shape}")
        mean = values.mean(axis=0)
        std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros_like(mean)
        ax.plot(steps, mean, color=colors[name], linewidth=4 if name == wide else 1.5,
                label=f"{labels[name]} (n={len(values)})")
        ax.fill_between(steps, mean - std, mean + std, color=colors[name], alpha=0.15)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=legend_columns, fontsize=8)
    ax.figure.tight_layout()
    return ax.figure


def lockstep_rollouts(envs, start_seeds: Sequence[int], policy: Callable, gamma: float, horizon: int,
                      score_steps: int | None = None) -> dict:
    """Roll a batched deterministic policy out in a grid of Gymnasium envs, all in lockstep.

    ``envs[r][i]`` (R rows of E envs) starts from ``reset(seed=start_seeds[i])``, the same state on every
    call. ``policy`` maps observations (R, E, obs_dim), float32, to env actions (R, E, act_dim). A rollout
    ends when it terminates or is truncated, after at most ``horizon`` steps. Returns (R, E) arrays:
    ``score``, the undiscounted return of the first ``score_steps`` steps (all if None); ``discounted``,
    sum_t gamma^t r_t; ``last_reward``, the reward of the last step; and ``start_obs`` (R, E, obs_dim).
    """
    start_obs = np.array([[env.reset(seed=seed)[0] for env, seed in zip(row, start_seeds)] for row in envs],
                         dtype=np.float32)
    shape = start_obs.shape[:2]
    score, discounted, last_reward = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    alive, obs = np.ones(shape, dtype=bool), start_obs.copy()
    for t in range(horizon):
        if not alive.any():
            break
        actions = policy(obs)                                                    # (R, E, act_dim)
        for r, i in zip(*np.nonzero(alive)):
            obs[r, i], reward, terminated, truncated, _ = envs[r][i].step(actions[r, i])
            if score_steps is None or t < score_steps:
                score[r, i] += reward
            discounted[r, i] += gamma ** t * reward
            last_reward[r, i] = reward
            alive[r, i] = not (terminated or truncated)
    return {"score": score, "discounted": discounted, "last_reward": last_reward, "start_obs": start_obs}


def write_run_csvs(log: Mapping[str, np.ndarray], run_names: Sequence[str], folder) -> None:
    """One CSV per run: ``folder/<run name>.csv`` with the columns of ``log`` (each (n_rows, n_runs));
    the first column is written as integers, the others with 4 decimals."""
    import csv
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    columns = list(log)
    for r, run_name in enumerate(run_names):
        with open(folder / f"{run_name}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for i in range(len(log[columns[0]])):
                writer.writerow([int(log[columns[0]][i, r])] + [f"{log[c][i, r]:.4f}" for c in columns[1:]])
