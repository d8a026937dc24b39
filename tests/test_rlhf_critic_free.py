"""rlhf.py, section 5: best-of-N, group advantages, loss aggregations and the critic-free loop (llm_grpo.ipynb)."""
import copy
import dataclasses
import itertools

import numpy as np
import pytest
import torch

import llm_lab as lab
import rlhf


def test_best_of_n_kl_bound():
    assert rlhf.best_of_n_kl_bound(1) == 0.0
    assert rlhf.best_of_n_kl_bound([2, 64]) == pytest.approx([np.log(2) - 0.5, np.log(64) - 63 / 64])


def test_best_of_n_averages_over_every_subset():
    """The order-statistics weights give exactly the mean of the best over all n-subsets (brute force)."""
    rng = np.random.default_rng(0)
    scores, gold = rng.normal(size=(2, 7)), rng.integers(0, 2, size=(2, 7)).astype(float)
    result = rlhf.best_of_n(scores, [1, 2, 3, 7], {"score": scores, "gold": gold})
    for k, n in enumerate([1, 2, 3, 7]):
        for name, values in (("score", scores), ("gold", gold)):
            brute = np.mean([np.mean([values[p][max(subset, key=lambda i: scores[p][i])]
                                      for subset in itertools.combinations(range(7), n)]) for p in range(2)])
            assert result[name][k] == pytest.approx(brute, abs=1e-12)
    assert result["score"][0] == pytest.approx(scores.mean())
    assert (np.diff(result["score"]) >= 0).all()
    with pytest.raises(ValueError, match="n must be"):
        rlhf.best_of_n(scores, [8], {"score": scores})


def test_best_of_n_kl_distinct_repeated_and_single_answers():
    m = 64
    scores = np.arange(m, dtype=float)[None]
    distinct = rlhf.best_of_n(scores, [1, 2, 8, 64], {}, np.arange(m)[None])["kl"]
    i = np.arange(1, m + 1)
    for n, kl in zip([1, 2, 8, 64], distinct):
        q = (i / m) ** n - ((i - 1) / m) ** n
        assert kl == pytest.approx((q * np.log(np.where(q > 0, m * q, 1))).sum(), abs=1e-12)
        assert kl <= rlhf.best_of_n_kl_bound(n) + 1e-12
    assert distinct[0] == pytest.approx(0.0, abs=1e-12)
    # one answer always: best-of-n is the policy itself
    assert rlhf.best_of_n(scores, [8], {}, np.zeros((1, m), dtype=int))["kl"][0] == pytest.approx(0.0, abs=1e-12)
    # the best answer makes half the samples: best-of-n cannot leave it, the KL is at most log 2
    heavy = np.where(np.arange(m) >= m // 2, m, np.arange(m))[None]   # the top half is one answer
    kl = rlhf.best_of_n(heavy.astype(float), [64], {}, heavy)["kl"][0]
    assert kl == pytest.approx((1 - 0.5 ** 64) * np.log((1 - 0.5 ** 64) / 0.5) + sum(
        ((k / m) ** 64 - ((k - 1) / m) ** 64) * np.log(m * ((k / m) ** 64 - ((k - 1) / m) ** 64)) for k in range(1, 33)))
    assert kl < np.log(2) + 1e-12 < rlhf.best_of_n_kl_bound(64)


def test_group_advantages():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.5, -1.0, 3.0, 0.0]])
    dr = rlhf.group_advantages(rewards, "dr_grpo")
    assert torch.allclose(dr[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    rloo = rlhf.group_advantages(rewards, "rloo")
    assert torch.allclose(rloo, 4 / 3 * dr, atol=1e-6)
    assert rloo[2, 0].item() == pytest.approx(0.5 - (-1.0 + 3.0 + 0.0) / 3)
    grpo = rlhf.group_advantages(rewards, "grpo")
    assert torch.allclose(grpo[0], dr[0] / (rewards[0].std() + 1e-4))
    for advantage in (dr, rloo, grpo):
        assert torch.allclose(advantage.sum(1), torch.zeros(3), atol=1e-5)
        assert (advantage[1] == 0).all()                                      # all equal: 0, not NaN
    with pytest.raises(ValueError, match="at least 2"):
        rlhf.group_advantages(torch.ones(3, 1), "grpo")
    with pytest.raises(ValueError, match="method"):
        rlhf.group_advantages(rewards, "ppo")


@pytest.mark.parametrize("advantage", [-1.0, 2.0])
def test_exact_gradient_weights_of_the_three_aggregations(advantage):
    """Per-token gradient weight -d loss / d log pi at ratio 1, for a long (12) and a short (3) answer."""
    lengths = torch.tensor([12, 3])
    advantages = torch.full((2,), advantage)
    mask = (torch.arange(12) < lengths[:, None]).float()
    expected = {"sequence": [advantage / 24, advantage / 6], "token": [advantage / 15] * 2,
                "constant": [advantage / 40] * 2}                             # max_length 20, batch 2
    for aggregation, (long, short) in expected.items():
        config = rlhf.CriticFreeConfig(aggregation=aggregation, max_new_tokens=20)
        logprobs = torch.randn(2, 12).requires_grad_(True)
        loss, _ = rlhf.critic_free_loss(logprobs, logprobs.detach(), advantages, mask, config)
        (gradient,) = torch.autograd.grad(loss, logprobs)
        weight = -gradient
        assert torch.allclose(weight[0], long * mask[0], atol=1e-7), aggregation
        assert torch.allclose(weight[1], short * mask[1], atol=1e-7), aggregation
    with pytest.raises(ValueError, match="aggregation"):
        rlhf.aggregate_tokens(torch.zeros(2, 3), torch.ones(2, 3), "mean", 20)


def test_first_pass_loss_is_zero_but_not_its_gradient():
    torch.manual_seed(0)
    logits = torch.randn(8, 5, 11, requires_grad=True)                         # 2 groups of 4 answers, 5 tokens
    tokens = torch.randint(11, (8, 5))
    mask = (torch.arange(5) < torch.tensor([5, 2, 4, 1, 3, 5, 2, 2])[:, None]).float()
    logprobs = logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    advantages = rlhf.group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.3, 2.0, -1.0, 0.0]]), "grpo").flatten()
    loss, stats = rlhf.critic_free_loss(logprobs, logprobs.detach(), advantages, mask, rlhf.CriticFreeConfig())
    assert abs(loss.item()) < 1e-6 and stats["clipfrac"] == 0.0
    (gradient,) = torch.autograd.grad(loss, logits)
    assert gradient.norm() > 1e-3


def test_clipping_stops_the_gradient_beyond_the_clip_range():
    advantages = torch.tensor([1.0, -1.0])
    old = torch.zeros(2, 1)
    new = torch.log(torch.tensor([[1.5], [0.5]])).requires_grad_(True)     # ratios 1.5 (A > 0) and 0.5 (A < 0)
    loss, stats = rlhf.critic_free_loss(new, old, advantages, torch.ones(2, 1), rlhf.CriticFreeConfig(clip_range=0.2))
    (gradient,) = torch.autograd.grad(loss, new)
    assert stats["clipfrac"] == 1.0 and (gradient == 0).all()


def test_kl_in_the_loss_is_aggregated_like_the_surrogate():
    config = rlhf.CriticFreeConfig(aggregation="constant", beta=0.5, max_new_tokens=10)
    zeros, mask = torch.zeros(2, 4), torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 9.0, 9.0]])
    loss, _ = rlhf.critic_free_loss(zeros, zeros, torch.zeros(2), mask, config, kl_per_token=kl)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 3.0) / (2 * 10))


def test_config_validation_and_methods():
    assert rlhf.critic_free_method("grpo").aggregation == "sequence"
    assert rlhf.critic_free_method("dr_grpo").aggregation == "constant"
    assert rlhf.critic_free_method("rloo").kl_in_reward and rlhf.critic_free_method("rloo").advantage == "rloo"
    for field, value in (("group_size", 1), ("lr", 0.0), ("beta", -0.1), ("clip_range", 0.0), ("epochs", 0),
                         ("advantage", "ppo"), ("aggregation", "mean")):
        with pytest.raises(ValueError, match=field):
            rlhf.critic_free_method("grpo", **{field: value})
    with pytest.raises(ValueError, match="method"):
        rlhf.critic_free_method("ppo")


def test_gold_positive_reward():
    texts = ["the plot is great .", "the plot is awful .", "the plot is great and", "the plot is great and awful ."]
    assert rlhf.gold_positive_reward(texts).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_rollout_groups_and_kl_placement(tiny_lab):
    sft, tokenizer, reward_model = tiny_lab
    reference = copy.deepcopy(sft).requires_grad_(False)
    prompts = list(lab.HELD_OUT_OPENINGS[:3])
    for name in ("grpo", "rloo"):
        config = rlhf.critic_free_method(name, group_size=4, max_new_tokens=6, beta=0.5)
        torch.manual_seed(0)
        batch = rlhf.critic_free_rollout(sft, reference, tokenizer, reward_model, prompts, config)
        assert batch["response_ids"].shape[0] == 12 and batch["advantages"].shape == (12,)
        assert torch.allclose(batch["advantages"].view(3, 4).sum(1), torch.zeros(3), atol=1e-5)
        assert torch.allclose(batch["kl"], torch.zeros(12), atol=1e-5)          # the policy is the reference
        assert ("ref_log_probs" in batch) == (not config.kl_in_reward)         # loss-side KL needs the distribution
    # a policy that moved: the reward-side KL enters the rewards, the loss-side one does not
    moved = copy.deepcopy(sft)
    with torch.no_grad():
        moved.lm_head.weight.add_(0.3 * torch.randn_like(moved.lm_head.weight))
    for in_reward in (True, False):
        config = rlhf.critic_free_method("dr_grpo", group_size=4, max_new_tokens=6, beta=0.5, kl_in_reward=in_reward)
        torch.manual_seed(1)
        batch = rlhf.critic_free_rollout(moved, reference, tokenizer, reward_model, prompts, config)
        expected = batch["scores"] - 0.5 * batch["kl"] if in_reward else batch["scores"]
        assert torch.allclose(batch["rewards"], expected)


def test_rloo_and_dr_grpo_take_the_same_adam_step(tiny_lab):
    sft, tokenizer, reward_model = tiny_lab
    torch.manual_seed(0)
    config = rlhf.critic_free_method("dr_grpo", group_size=4, max_new_tokens=6)
    batch = rlhf.critic_free_rollout(sft, sft, tokenizer, reward_model, list(lab.HELD_OUT_OPENINGS[:4]), config)
    steps = []
    for method in ("dr_grpo", "rloo"):
        policy = copy.deepcopy(sft)
        optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
        advantages = rlhf.group_advantages(batch["rewards"].view(-1, 4), method).flatten()
        rlhf.critic_free_update(policy, optimizer, {**batch, "advantages": advantages},
                                dataclasses.replace(config, epochs=1, minibatch_size=16, max_grad_norm=1e9))
        steps.append(torch.cat([(p - p0).flatten() for p, p0 in zip(policy.parameters(), sft.parameters())]).detach())
    # a constant factor on the gradient drops out of Adam's step, up to its eps = 1e-8 (tiny gradients)
    assert (steps[0] - steps[1]).norm() < 1e-2 * steps[0].norm()


def test_train_critic_free_writes_the_columns(tiny_lab, tmp_path):
    sft, tokenizer, reward_model = tiny_lab
    for name in ("grpo", "rloo"):
        policy, reference = copy.deepcopy(sft), copy.deepcopy(sft)
        config = rlhf.critic_free_method(name, group_size=2, prompts_per_iteration=2, max_new_tokens=6,
                                         minibatch_size=2, beta=0.1)
        rows = rlhf.train_critic_free(policy, reference, tokenizer, rlhf.gold_positive_reward, config, 2,
                                      lab.train_openings()[:4], lab.HELD_OUT_OPENINGS[:2], f"tiny-{name}", tmp_path,
                                      reward_model, eval_samples_per_prompt=2, progress=False)
        assert len(rows) == 3
        run = rlhf.read_run(tmp_path / f"tiny-{name}.csv")
        assert tuple(run) == rlhf.CRITIC_FREE_COLUMNS
        assert run["kl"][0] == 0.0 and np.isfinite(np.stack([run[c] for c in rlhf.EVAL_COLUMNS])).all()
        assert np.isnan(np.stack([run[c][0] for c in rlhf.CRITIC_FREE_TRAIN_COLUMNS])).all()
        assert ((run["reward"][1:] >= 0) & (run["reward"][1:] <= 1)).all()
        assert ((run["equal_reward_groups"][1:] >= 0) & (run["equal_reward_groups"][1:] <= 1)).all()
    with pytest.raises(ValueError, match="run_name"):
        rlhf.train_critic_free(copy.deepcopy(sft), sft, tokenizer, reward_model, rlhf.critic_free_method("grpo"), 1,
                               lab.train_openings(), lab.HELD_OUT_OPENINGS, "bad name", tmp_path, reward_model)
