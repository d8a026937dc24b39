"""utils.py: the toy game, its exact Bellman solution, the plot helpers and the notebook helpers."""
import matplotlib

matplotlib.use("Agg")  # no display in tests

import numpy as np
import pytest

import utils
from utils import DRAW, STOP, Lottery, optimal_policy, play_episode, policy_values


def discounted_return(rewards, gamma):
    return float(sum(r * gamma**t for t, r in enumerate(rewards)))


def always(action):
    return lambda state: action


# ---------------------------------------------------------------- the game ---

def test_reset_and_step_signatures():
    env = Lottery()
    state, info = env.reset(seed=0)
    assert state in ("w", "l") and info == {}
    out = env.step(DRAW)
    assert len(out) == 5
    next_state, reward, terminated, truncated, info = out
    assert next_state in ("w", "l") and isinstance(reward, float)
    assert isinstance(terminated, bool) and truncated is False and info == {}


def test_stop_ends_the_episode_with_zero_reward():
    env = Lottery()
    state, _ = env.reset(seed=1)
    next_state, reward, terminated, truncated, _ = env.step(STOP)
    assert (next_state, reward, terminated, truncated) == (state, 0.0, True, False)


def test_same_seed_same_episode_and_different_seeds_differ():
    first = play_episode(Lottery(), always(DRAW), seed=123)
    second = play_episode(Lottery(), always(DRAW), seed=123)
    third = play_episode(Lottery(), always(DRAW), seed=124)
    assert first.rewards == second.rewards and first.states == second.states
    assert first.rewards != third.rewards


def test_start_state_is_fair_coin():
    env = Lottery()
    starts = [env.reset(seed=s)[0] for s in range(4000)]
    share_w = starts.count("w") / len(starts)
    assert abs(share_w - 0.5) < 0.03  # 4 standard errors


def test_episode_length_is_geometric_with_end_prob():
    env = Lottery()
    env.reset(seed=7)
    lengths = [len(play_episode(env, always(DRAW))) for _ in range(3000)]
    # Geometric(p=0.01): mean 100, std ~99.5, so the standard error is ~1.8.
    assert abs(np.mean(lengths) - 100) < 8


def test_reward_law_in_each_state():
    env = Lottery()
    env.reset(seed=11)
    by_state = {"w": [], "l": []}
    for _ in range(300):
        episode = play_episode(env, always(DRAW))
        for state, reward in zip(episode.states, episode.rewards):
            by_state[state].append(reward)
    for state, mean in (("w", 1.0), ("l", -1.0)):
        rewards = np.array(by_state[state])
        assert len(rewards) > 5000
        assert abs(rewards.mean() - mean) < 0.05
        assert abs(rewards.std() - 1.0) < 0.05


def test_state_stays_by_default_and_switches_when_asked():
    stay = play_episode(Lottery(), always(DRAW), seed=3)
    assert len(set(stay.states)) == 1
    env = Lottery(switch_prob=0.3)
    env.reset(seed=5)
    switches = steps = 0
    for _ in range(200):
        episode = play_episode(env, always(DRAW))
        trajectory = episode.states + [episode.final_state]
        # the last transition is the end of the episode, where no switch is drawn
        switches += sum(a != b for a, b in zip(trajectory[:-2], trajectory[1:-1]))
        steps += len(episode) - 1
    assert abs(switches / steps - 0.3) < 0.02


@pytest.mark.parametrize("gamma", [0.9, 0.5])
def test_monte_carlo_returns_match_the_bellman_solution(gamma):
    env = Lottery()
    env.reset(seed=21)
    returns = {"w": [], "l": []}
    for _ in range(4000):
        episode = play_episode(env, always(DRAW))
        returns[episode.states[0]].append(discounted_return(episode.rewards, gamma))
    truth = policy_values({"w": 1, "l": 1}, gamma)
    for state in ("w", "l"):
        sample = np.array(returns[state])
        stderr = sample.std() / np.sqrt(len(sample))
        assert abs(sample.mean() - truth[state]) < 4 * stderr + 1e-9


def test_switching_game_values_match_simulation():
    env = Lottery(switch_prob=0.2)
    env.reset(seed=8)
    gamma = 0.9
    returns = {"w": [], "l": []}
    for _ in range(4000):
        episode = play_episode(env, lambda s: DRAW if s == "w" else (DRAW if env._rng.random() < 0.5 else STOP))
        returns[episode.states[0]].append(discounted_return(episode.rewards, gamma))
    truth = policy_values({"w": 1.0, "l": 0.5}, gamma, env)
    for state in ("w", "l"):
        sample = np.array(returns[state])
        assert abs(sample.mean() - truth[state]) < 4 * sample.std() / np.sqrt(len(sample))


def test_constructor_seed_makes_the_game_reproducible():
    first = play_episode(Lottery(seed=5), always(DRAW))
    second = play_episode(Lottery(seed=5), always(DRAW))
    assert first.rewards == second.rewards and first.states == second.states


@pytest.mark.parametrize("bad", [2, -1, 0.5, "draw", None, True])
def test_invalid_action_raises(bad):
    env = Lottery()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(bad)


def test_step_after_end_or_before_reset_raises():
    env = Lottery()
    with pytest.raises(RuntimeError, match="reset"):
        env.step(DRAW)
    env.reset(seed=0)
    env.step(STOP)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(DRAW)


def test_numpy_integer_actions_are_accepted():
    env = Lottery()
    env.reset(seed=0)
    env.step(np.int64(1))


@pytest.mark.parametrize("kwargs", [dict(end_prob=0), dict(end_prob=1.5), dict(switch_prob=-0.1),
                                    dict(reward_std=-1), dict(reward_means={"w": 1})])
def test_bad_game_parameters_raise(kwargs):
    with pytest.raises(ValueError):
        Lottery(**kwargs)


# ---------------------------------------------------------------- the solver ---

def test_always_draw_values_from_the_issue():
    values = policy_values({"w": 1, "l": 1}, 0.9)
    assert values["w"] == pytest.approx(1 / (1 - 0.9 * 0.99))
    assert values["w"] == pytest.approx(9.17, abs=0.01)
    assert values["l"] == pytest.approx(-9.17, abs=0.01)


def test_policy_formats_agree():
    as_dict = policy_values({"w": 0.3, "l": 0.6}, 0.95)
    as_pair = policy_values([0.3, 0.6], 0.95)
    as_table = policy_values([[0.7, 0.3], [0.4, 0.6]], 0.95)
    assert as_dict == pytest.approx(as_pair) and as_dict == pytest.approx(as_table)


def test_values_satisfy_the_bellman_equation_with_switching():
    env = Lottery(switch_prob=0.25, end_prob=0.05)
    policy = {"w": 0.8, "l": 0.3}
    gamma = 0.97
    v = policy_values(policy, gamma, env)
    other = {"w": "l", "l": "w"}
    for s in ("w", "l"):
        expected_next = 0.75 * v[s] + 0.25 * v[other[s]]
        rhs = policy[s] * (env.reward_means[s] + gamma * (1 - env.end_prob) * expected_next)
        assert v[s] == pytest.approx(rhs)


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99, 1.0])
def test_optimal_policy_draws_in_w_and_stops_in_l(gamma):
    policy, values = optimal_policy(gamma)
    assert policy == {"w": 1.0, "l": 0.0}
    assert values["l"] == 0.0
    assert values["w"] == pytest.approx(1 / (1 - gamma * 0.99))
    # no other policy beats it in any state
    for p in np.linspace(0, 1, 11):
        for q in np.linspace(0, 1, 11):
            other = policy_values({"w": p, "l": q}, gamma)
            assert other["w"] <= values["w"] + 1e-9 and other["l"] <= values["l"] + 1e-9


@pytest.mark.parametrize("bad", [{"w": 1.2, "l": 0}, {"w": 1}, [0.5], [[0.5, 0.6], [1, 0]]])
def test_solver_rejects_bad_policies(bad):
    with pytest.raises(ValueError):
        policy_values(bad, 0.9)


def test_solver_rejects_bad_gamma():
    with pytest.raises(ValueError, match="gamma"):
        policy_values({"w": 1, "l": 1}, 1.5)


def test_policy_values_torch_matches_the_numpy_solver_in_a_batch():
    import torch

    env = Lottery(switch_prob=0.25, end_prob=0.05)
    draw = torch.tensor([[0.8, 0.3], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    values = utils.policy_values_torch(draw, 0.97, env)
    assert values.shape == (4, 2)
    for row, v in zip(draw.tolist(), values.tolist()):
        expected = policy_values(row, 0.97, env)
        assert v == pytest.approx([expected["w"], expected["l"]], abs=1e-12)


def test_policy_values_torch_gradient_equals_finite_differences():
    import torch

    env = Lottery(switch_prob=0.2)
    logits = torch.tensor([0.7, -0.4], dtype=torch.float64, requires_grad=True)
    objective = utils.policy_values_torch(torch.sigmoid(logits), 0.9, env).mean()  # J = (V(w) + V(l)) / 2
    objective.backward()

    def j_numpy(z):
        return 0.5 * sum(policy_values(1 / (1 + np.exp(-np.asarray(z))), 0.9, env).values())

    h = 1e-6
    for i in range(2):
        step = np.eye(2)[i] * h
        z = logits.detach().numpy()
        finite_difference = (j_numpy(z + step) - j_numpy(z - step)) / (2 * h)
        assert logits.grad[i].item() == pytest.approx(finite_difference, rel=1e-6)


# ---------------------------------------------------------------- batched episodes ---

def test_play_batches_layout_matches_to_padded_batch():
    batch = utils.play_batches(np.array([[0.9, 0.5], [0.0, 0.0], [1.0, 1.0]]), 50, np.random.default_rng(0),
                               env=Lottery(end_prob=0.2, switch_prob=0.3))
    n_runs, n_episodes, t_max = batch["states"].shape
    assert (n_runs, n_episodes) == (3, 50) and all(t.shape == (3, 50, t_max) for t in batch.values())
    lengths = batch["mask"].sum(-1)                                            # (3, 50)
    assert lengths.min() >= 1 and lengths.max() == t_max
    assert torch_equal(batch["done"].sum(-1), 1)                              # exactly one last step per episode
    last = (lengths - 1).long()
    assert torch_equal(batch["done"].gather(-1, last[..., None]).squeeze(-1), 1)
    real = batch["mask"].bool()
    following = batch["states"][..., 1:][real[..., 1:]]                        # states of steps 1.. of each episode
    assert torch_equal(batch["next_states"][..., :-1][real[..., 1:]], following)
    assert torch_equal(lengths[1], 1) and torch_equal(batch["actions"][1, :, 0], STOP)  # never draws: one stop
    assert torch_equal(batch["rewards"][1], 0)
    stops = (batch["actions"] == STOP) & real
    assert torch_equal(batch["done"][stops], 1)                                # a stop always ends the episode


def torch_equal(tensor, value):
    return bool((tensor == value).all())


@pytest.mark.parametrize("switch_prob", [0.0, 0.3])
def test_play_batches_returns_match_the_bellman_solution(switch_prob):
    env = Lottery(switch_prob=switch_prob, end_prob=0.05)
    policy = [0.8, 0.4]
    batch = utils.play_batches(np.array([policy]), 20000, np.random.default_rng(1), env=env)
    returns = utils.reward_to_go(batch["rewards"][0], 0.9)[:, 0].numpy()     # G_0 of every episode
    start = batch["states"][0, :, 0].numpy()
    truth = policy_values(policy, 0.9, env)
    for i, state in enumerate(utils.STATES):
        sample = returns[start == i]
        assert abs(sample.mean() - truth[state]) < 4 * sample.std() / np.sqrt(len(sample))


def test_play_batches_episode_lengths_are_geometric():
    batch = utils.play_batches(np.ones((2, 2)), 3000, np.random.default_rng(2))  # always draw, end_prob 0.01
    lengths = batch["mask"].sum(-1).numpy().ravel()
    assert abs(lengths.mean() - 100) < 6  # standard error about 1.3


def test_play_batches_rejects_bad_probabilities():
    with pytest.raises(ValueError, match="draw_prob"):
        utils.play_batches(np.array([0.5, 0.5]), 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="draw_prob"):
        utils.play_batches(np.array([[0.5, 1.5]]), 3, np.random.default_rng(0))


# ---------------------------------------------------------------- plot helpers ---

def _texts(fig):
    ax = fig.axes[0]
    return ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), [t.get_text() for t in ax.get_legend().get_texts()]


def test_plot_value_estimates_has_truth_as_dashed_lines():
    truth = {"w": 9.17, "l": -9.17}
    fig = utils.plot_value_estimates({"w": np.linspace(0, 9, 50), "l": np.linspace(0, -9, 50)}, truth)
    title, xlabel, ylabel, legend = _texts(fig)
    assert title and xlabel and ylabel == "V(s)"
    assert any("true V(w)" in t for t in legend)
    dashed = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert sorted(round(line.get_ydata()[0], 2) for line in dashed) == [-9.17, 9.17]
    assert fig.dpi <= 100


def test_plot_action_probabilities():
    fig = utils.plot_action_probabilities({"w": np.linspace(0.5, 1, 20), "l": np.linspace(0.5, 0, 20)},
                                          {"w": 1.0, "l": 0.0}, steps=np.arange(20) * 10)
    title, xlabel, ylabel, legend = _texts(fig)
    assert title and xlabel == "episode" and "P(draw" in ylabel and len(legend) == 4


def test_plot_runs_band():
    rng = np.random.default_rng(0)
    fig = utils.plot_runs_band({"A": rng.normal(size=(5, 30)), "B": rng.normal(size=(5, 30))},
                               reference=1.0, ylabel="return")
    title, xlabel, ylabel, legend = _texts(fig)
    assert ylabel == "return" and "A (n=5)" in legend and "target" in legend
    assert len(fig.axes[0].collections) == 2  # one band per method
    with pytest.raises(ValueError, match="n_seeds"):
        utils.plot_runs_band({"A": np.zeros(3)})


def test_plot_runs_band_quantile_band_stays_inside_the_range_of_the_curves():
    rng = np.random.default_rng(0)
    curves = rng.uniform(0, 1, size=(5, 30))
    fig = utils.plot_runs_band({"A": curves}, band="quantile", reference=1.0)
    (band,) = fig.axes[0].collections
    vertices = band.get_paths()[0].vertices[:, 1]
    assert vertices.min() >= curves.min() and vertices.max() <= curves.max()
    assert "Median" in fig.axes[0].get_title()
    with pytest.raises(ValueError, match="band"):
        utils.plot_runs_band({"A": curves}, band="minmax")


def test_plot_value_estimates_accepts_reference_curves():
    steps = np.arange(20)
    fig = utils.plot_value_estimates({"w": np.linspace(0, 9, 20), "l": np.zeros(20)},
                                     {"w": np.linspace(1, 9, 20), "l": np.full(20, -1.0)}, steps=steps,
                                     reference_name="V^pi")
    dashed = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 2 and len(dashed[0].get_ydata()) == 20
    assert "V^pi V(w)" in _texts(fig)[3]


def test_plot_runs_band_legend_below_leaves_the_axes_free():
    rng = np.random.default_rng(0)
    fig = utils.plot_runs_band({"A": rng.normal(size=(5, 30))}, reference=0.0, legend_below=True)
    fig.canvas.draw()
    legend_box = fig.axes[0].get_legend().get_window_extent()
    axes_box = fig.axes[0].get_window_extent()
    assert legend_box.y1 < axes_box.y0  # entirely under the plotting area
    assert legend_box.y0 >= 0  # and still inside the figure


# ---------------------------------------------------------------- hyperparameter checks ---

def test_check_param_names_the_parameter():
    utils.check_param("gamma", 0.9, low=0, high=1)
    utils.check_param("episodes", 10, low=1, integer=True)
    with pytest.raises(ValueError, match="gamma must be <= 1"):
        utils.check_param("gamma", 1.5, low=0, high=1)
    with pytest.raises(ValueError, match="lr must be > 0"):
        utils.check_param("lr", 0.0, low=0, low_open=True)
    with pytest.raises(ValueError, match="episodes must be an integer"):
        utils.check_param("episodes", 2.5, low=1, integer=True)
    with pytest.raises(ValueError, match="beta must be a finite number"):
        utils.check_param("beta", float("nan"), low=0)


@pytest.mark.parametrize("n, t_quantile", [(6, 2.5706), (10, 2.2622), (20, 2.0930), (30, 2.0452)])
def test_mean_confidence_interval_uses_the_t_quantile(n, t_quantile):
    samples = np.arange(n, dtype=float) ** 1.5
    mean, low, high = utils.mean_confidence_interval(samples)
    standard_error = samples.std(ddof=1) / np.sqrt(n)
    assert mean == pytest.approx(samples.mean())
    assert (high - mean) / standard_error == pytest.approx(t_quantile, abs=3e-3)
    assert mean - low == pytest.approx(high - mean)
    with pytest.raises(ValueError, match="samples"):
        utils.mean_confidence_interval([1.0])


def test_reward_to_go_matches_its_definition():
    import torch

    rewards = torch.tensor([[1.0, -2.0, 0.5, 3.0], [2.0, 1.0, 0.0, 0.0]])  # second episode padded after 2 steps
    gamma = 0.9
    expected = [[sum(gamma ** (k - t) * float(row[k]) for k in range(t, 4)) for t in range(4)] for row in rewards]
    assert torch.allclose(utils.reward_to_go(rewards, gamma), torch.tensor(expected))


def test_padded_batch_of_played_episodes():
    import random

    env = utils.Lottery(end_prob=0.3)
    env.reset(seed=0)
    episodes = utils.play_batch(env, {"w": 1.0, "l": 1.0}, 5, random.Random(0))  # always draw
    batch = utils.to_padded_batch(episodes)
    lengths = [len(e) for e in episodes]
    assert all(t.shape == (5, max(lengths)) for t in batch.values())
    assert batch["mask"].sum(1).tolist() == lengths and batch["done"].sum().item() == 5
    for i, episode in enumerate(episodes):
        last = lengths[i] - 1
        assert batch["done"][i, last] == 1 and batch["actions"][i, :lengths[i]].tolist() == episode.actions
        assert batch["next_states"][i, last] == utils.STATE_INDEX[episode.final_state]
        assert batch["next_states"][i, :last].tolist() == batch["states"][i, 1:lengths[i]].tolist()


def test_utils_imports_neither_the_lab_nor_rlhf():
    """Imports point one way, rlhf -> llm_lab -> utils: the toy notebooks never load the LLM code."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(utils.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"llm_lab", "rlhf", "transformers"}


def test_show_source_displays_the_plain_source_as_a_python_code_block(monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    utils.show_source(utils.reward_to_go, utils.check_param)
    (markdown,) = shown
    import inspect

    expected = inspect.getsource(utils.reward_to_go).rstrip() + "\n\n" + inspect.getsource(utils.check_param).rstrip()
    assert markdown.data == f"```python\n{expected}\n```"


def test_expected_failure_prints_the_error_and_fails_when_nothing_fails(capsys):
    with utils.expected_failure(AssertionError):
        raise AssertionError("one is not two")
    assert capsys.readouterr().out == "AssertionError, as expected: one is not two\n"
    with pytest.raises(AssertionError, match="the wrong version passed"):
        with utils.expected_failure(AssertionError):
            pass
    with pytest.raises(KeyError):  # an error of another kind is a real error
        with utils.expected_failure(AssertionError):
            {}["missing"]


# ------------------------------------------------- stacked runs (ddpg_td3) ---

def test_masked_adam_equals_torch_adam_and_leaves_masked_models_untouched():
    import torch

    torch.manual_seed(0)
    weights = torch.randn(3, 4, 5)                                       # 3 stacked models
    ours, reference = weights.clone(), weights.clone().requires_grad_()
    ours_adam, torch_adam = utils.MaskedAdam([ours], lr=0.01), torch.optim.Adam([reference], lr=0.01)
    for _ in range(3):
        gradient = torch.randn(3, 4, 5)
        ours_adam.step([gradient])
        reference.grad = gradient.clone()
        torch_adam.step()
    assert torch.allclose(ours, reference.detach(), rtol=1e-5, atol=1e-7)
    held = [ours.clone(), ours_adam.m[0].clone(), ours_adam.v[0].clone(), ours_adam.steps.clone()]
    ours_adam.step([torch.randn(3, 4, 5)], mask=torch.tensor([True, False, True]))
    after = [ours, ours_adam.m[0], ours_adam.v[0], ours_adam.steps]
    assert all(torch.equal(a[1], h[1]) for a, h in zip(after, held))      # model 1: weights, moments, step count
    assert all(not torch.equal(a[0], h[0]) for a, h in zip(after, held))  # model 0 moved
    reference.grad = torch.zeros_like(reference)                         # torch's Adam with a zero gradient ...
    before = reference.detach().clone()
    torch_adam.step()
    assert not torch.equal(reference.detach(), before)                   # ... still moves: why MaskedAdam exists


def test_plot_seed_bands_draws_mean_and_sample_std_with_the_wide_curve_first():
    curves = {"a": np.array([[0.0, 1.0, 2.0], [2.0, 3.0, 6.0]]), "b": np.array([[1.0, 1.0, 1.0]])}
    fig = utils.plot_seed_bands(curves, steps=[0, 10, 20], labels={"a": "A", "b": "B"}, wide="b",
                                reference=-1.0, title="t", xlabel="x", ylabel="y")
    ax = fig.axes[0]
    lines = [line for line in ax.get_lines() if line.get_label() != "target"]
    assert [line.get_label() for line in lines] == ["B (n=1)", "A (n=2)"]     # the wide one is drawn first
    assert lines[0].get_linewidth() == 4 and lines[1].get_linewidth() == 1.5
    assert np.allclose(lines[1].get_ydata(), [1.0, 2.0, 4.0])
    band_a = ax.collections[1].get_paths()[0].vertices[:, 1]                 # the polygon of a's band
    std = curves["a"].std(axis=0, ddof=1)
    assert np.isclose(band_a.max(), (curves["a"].mean(0) + std).max())
    assert np.isclose(band_a.min(), (curves["a"].mean(0) - std).min())
    assert np.isfinite(ax.collections[0].get_paths()[0].vertices).all()     # one seed: a flat band, no nan
    assert ax.get_title() == "t" and "target" in [t.get_text() for t in ax.get_legend().get_texts()]
    with pytest.raises(ValueError, match="curves"):
        utils.plot_seed_bands({"a": np.zeros(3)}, steps=[0, 1, 2])


class _Walk:
    """A 1-d walk for the rollout test: starts at the seed, moves by the action, reward -|position|,
    terminates once the position reaches 3."""

    def reset(self, seed=None):
        self.x = float(seed)
        return np.array([self.x], dtype=np.float32), {}

    def step(self, action):
        self.x += float(action[0])
        return np.array([self.x], dtype=np.float32), -abs(self.x), self.x >= 3, False, {}


def test_lockstep_rollouts_scores_discounts_and_stops_each_rollout_on_its_own():
    envs = [[_Walk(), _Walk()] for _ in range(2)]                      # 2 runs x 2 start states (seeds 0 and 1)
    seen = []

    def policy(obs):  # run 0 moves +1 per step, run 1 stays
        seen.append(obs.shape)
        return np.stack([np.ones_like(obs[0]), np.zeros_like(obs[1])])

    out = utils.lockstep_rollouts(envs, [0, 1], policy, gamma=0.5, horizon=5, score_steps=2)
    assert seen[0] == (2, 2, 1) and len(seen) == 5
    assert out["start_obs"][:, :, 0].tolist() == [[0, 1], [0, 1]]
    # run 0 from 0: rewards -1, -2, -3 (terminated); from 1: -2, -3 (terminated). Run 1: 0 and -1 for 5 steps
    assert out["score"].tolist() == [[-3.0, -5.0], [0.0, -2.0]]
    assert np.allclose(out["discounted"], [[-1 - 1 - 0.75, -2 - 1.5], [0.0, -(1 + 0.5 + 0.25 + 0.125 + 0.0625)]])
    assert out["last_reward"].tolist() == [[-3.0, -3.0], [0.0, -1.0]]
    again = utils.lockstep_rollouts(envs, [0, 1], policy, gamma=0.5, horizon=0)
    assert np.array_equal(again["start_obs"], out["start_obs"]) and not again["score"].any()


def test_write_run_csvs_writes_one_file_per_run(tmp_path):
    log = {"step": np.array([[0, 0], [10, 10]]), "value": np.array([[0.5, 1.0], [1.5, 2.25]])}
    utils.write_run_csvs(log, ["a", "b"], tmp_path / "runs")
    assert (tmp_path / "runs" / "a.csv").read_text().splitlines() == ["step,value", "0,0.5000", "10,1.5000"]
    assert (tmp_path / "runs" / "b.csv").read_text().splitlines() == ["step,value", "0,1.0000", "10,2.2500"]
