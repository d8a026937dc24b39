"""rlhf.py: the PPO pieces shared by llm_ppo.ipynb and llm_ppo_correct_dropout.ipynb."""
import copy

import numpy as np
import pytest
import torch

import llm_lab as lab
import rlhf
from rlhf import PPOConfig


def test_gae_lambda_one_is_monte_carlo_return_minus_value():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    gamma = 0.9
    advantages, returns = rlhf.compute_gae(rewards, values, mask, gamma, lam=1.0)
    for b in range(3):
        n = int(mask[b].sum())
        for t in range(n):
            mc = sum(gamma ** (k - t) * rewards[b, k] for k in range(t, n))
            assert advantages[b, t].item() == pytest.approx((mc - values[b, t]).item(), abs=1e-5)
            assert returns[b, t].item() == pytest.approx(mc.item(), abs=1e-5)
    assert (advantages[mask == 0] == 0).all()


def test_gae_lambda_zero_is_td_error():
    torch.manual_seed(1)
    rewards, values = torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    advantages, _ = rlhf.compute_gae(rewards, values, mask, gamma=0.8, lam=0.0)
    for b in range(2):
        n = int(mask[b].sum())
        for t in range(n):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            td = rewards[b, t] + 0.8 * next_value - values[b, t]
            assert advantages[b, t].item() == pytest.approx(float(td), abs=1e-6)


def test_token_rewards_put_the_score_on_the_last_real_token():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -9.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = rlhf.token_rewards(logprobs, ref, torch.tensor([10.0, 20.0]), mask, beta=0.5)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.25, 0.0, 10.5], [-0.5, 20.0, 0.0]]))


def test_whiten_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    w = rlhf.whiten(x, mask)
    real = w[mask.bool()]
    assert real.mean().abs() < 1e-6 and (real.std(unbiased=False) - 1).abs() < 1e-4
    assert (w[~mask.bool()] == 0).all()


def test_ppo_loss_clipping_and_ratio_one():
    config = PPOConfig()
    old = torch.log(torch.tensor([[0.15, 0.5]]))
    new = torch.log(torch.tensor([[0.25, 0.5]]))          # seed 001's example: 0.15 -> 0.25
    mask = torch.ones(1, 2)
    zeros = torch.zeros(1, 2)
    advantages = torch.tensor([[1.0, 1.0]])
    loss, stats = rlhf.ppo_loss(new, old, advantages, zeros, zeros, zeros, zeros, mask, config)
    # token 1: ratio 5/3 clipped to 1.2; token 2: ratio 1
    assert loss.item() == pytest.approx(-(1.2 + 1.0) / 2, abs=1e-6)
    assert stats["clipfrac"] == pytest.approx(0.5)
    _, same = rlhf.ppo_loss(old, old, advantages, zeros, zeros, zeros, zeros, mask, config)
    assert same["max_ratio_deviation"] == 0.0 and same["approx_kl"] == 0.0


@pytest.mark.parametrize("field,value,word", [
    ("beta", -0.1, "beta"), ("clip_range", 0.0, "clip_range"), ("lr", 0.0, "lr"),
    ("minibatch_size", 128, "minibatch_size"), ("lam", 1.5, "lam")])
def test_bad_hyperparameters_raise_naming_them(field, value, word):
    with pytest.raises(ValueError, match=word):
        PPOConfig(**{field: value}).validate()


def test_max_new_tokens_beyond_context_raises():
    with pytest.raises(ValueError, match="max_new_tokens"):
        PPOConfig(max_new_tokens=60).validate(context=48, prompt_length=5)


def test_kl_controller():
    fixed = rlhf.KLController(0.2)
    assert fixed.update(100.0) == 0.2
    adaptive = rlhf.KLController(0.2, adaptive=True, target=2.0, horizon=1.0)
    assert adaptive.update(10.0) == pytest.approx(0.24)   # error clipped to +0.2
    assert adaptive.update(1.8) == pytest.approx(0.24 * 0.9)


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    sft, tokenizer, _ = lab.load_sft_model(lab.SFTConfig(steps=20, n_sentences=300, n_embd=32, n_head=2),
                                             cache_dir=cache, progress=False, device=torch.device("cpu"))
    reward_model, _ = lab.load_lab_reward_model(lab.RewardConfig(steps=5, n_pairs=100, n_embd=32, n_head=2),
                                                  cache_dir=cache, progress=False, device=torch.device("cpu"))
    return sft, tokenizer, reward_model


def test_train_ppo_writes_the_metric_columns_and_first_ratio_is_one(tiny_lab, tmp_path):
    sft, tokenizer, reward_model = tiny_lab
    policy = rlhf.PolicyWithValueHead(copy.deepcopy(sft))
    first = {}
    config = PPOConfig(batch_size=8, minibatch_size=4, ppo_epochs=2, max_new_tokens=8)
    rows = rlhf.train_ppo(policy, copy.deepcopy(sft), tokenizer, reward_model, config, 2, lab.train_openings(),
                           lab.HELD_OUT_OPENINGS[:2], "tiny-run", tmp_path, eval_samples_per_prompt=2,
                           progress=False, on_first_minibatch=first.update)
    assert first["max_ratio_deviation"] == 0.0
    assert len(rows) == 2
    run = rlhf.read_run(tmp_path / "tiny-run.csv")
    assert tuple(run) == rlhf.METRIC_COLUMNS
    assert np.isfinite(np.stack(list(run.values()))).all()
    assert abs(run["kl"][0]) < 1e-5  # the policy starts as a copy of the reference


def test_evaluate_policy_returns_the_rollout_of_its_texts_and_keeps_the_random_stream(tiny_lab):
    sft, tokenizer, reward_model = tiny_lab
    torch.manual_seed(123)
    state_before = torch.random.get_rng_state()
    result = rlhf.evaluate_policy(sft, tokenizer, reward_model, lab.HELD_OUT_OPENINGS[:2], samples_per_prompt=3,
                                   max_new_tokens=6, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state_before)  # its own stream: training samples unchanged
    rollout = result["rollout"]
    assert rollout["response_ids"].shape[0] == len(result["texts"]) == 6
    assert result["texts"] == lab.join_prompt_response(rollout["prompts"], rollout["responses"])
    again = rlhf.evaluate_policy(sft, tokenizer, reward_model, lab.HELD_OUT_OPENINGS[:2], samples_per_prompt=3,
                                  max_new_tokens=6, seed=7)
    assert again["texts"] == result["texts"] and again["score"] == result["score"]


def test_train_ppo_rejects_bad_input_before_training(tiny_lab, tmp_path):
    sft, tokenizer, reward_model = tiny_lab
    policy = rlhf.PolicyWithValueHead(copy.deepcopy(sft))
    with pytest.raises(ValueError, match="max_new_tokens"):
        rlhf.train_ppo(policy, copy.deepcopy(sft), tokenizer, reward_model, PPOConfig(max_new_tokens=100), 1,
                        lab.train_openings(), lab.HELD_OUT_OPENINGS, "x", tmp_path, progress=False)
    with pytest.raises(ValueError, match="run_name"):
        rlhf.train_ppo(policy, copy.deepcopy(sft), tokenizer, reward_model, PPOConfig(), 1,
                        lab.train_openings(), lab.HELD_OUT_OPENINGS, "a/b", tmp_path, progress=False)
    assert not list(tmp_path.iterdir())


def test_nan_loss_stops_with_a_message(tiny_lab, tmp_path):
    sft, tokenizer, _ = tiny_lab

    class NaNReward(lab.TextRewardModel):
        def __call__(self, texts):
            return torch.full((len(texts),), float("nan"))

    policy = rlhf.PolicyWithValueHead(copy.deepcopy(sft))
    config = PPOConfig(batch_size=4, minibatch_size=4, ppo_epochs=1, max_new_tokens=4, whiten_advantages=False)
    with pytest.raises(FloatingPointError, match="iteration 1, epoch 0, minibatch 0"):
        rlhf.train_ppo(policy, copy.deepcopy(sft), tokenizer, NaNReward(), config, 1, lab.train_openings(),
                        lab.HELD_OUT_OPENINGS[:1], "nan", tmp_path, eval_samples_per_prompt=1, progress=False)


def test_ppo_rollout_shapes_and_update_early_stop(tiny_lab):
    sft, tokenizer, reward_model = tiny_lab
    torch.manual_seed(0)
    policy = rlhf.PolicyWithValueHead(copy.deepcopy(sft))
    prompts = list(lab.train_openings()[:8])
    batch = rlhf.ppo_rollout(policy, copy.deepcopy(sft), tokenizer, reward_model, prompts, PPOConfig(max_new_tokens=6),
                              beta=0.1)
    n_new = batch["response_ids"].shape[1]
    assert n_new <= 6 and batch["query_ids"].shape[0] == 8 and batch["scores"].shape == (8,)
    for name in ("response_mask", "old_logprobs", "ref_logprobs", "old_values", "kl", "advantages", "returns"):
        assert batch[name].shape == (8, n_new), name
    assert torch.equal(batch["old_logprobs"], batch["ref_logprobs"])  # the policy is still the reference
    config = PPOConfig(batch_size=8, minibatch_size=4, ppo_epochs=3, early_stop_kl=None)
    optimizer = rlhf.ppo_optimizer(policy, config)
    assert len(rlhf.ppo_update(policy, optimizer, batch, config, beta=0.1)) == 3 * 2  # every minibatch
    # a threshold every moved policy exceeds: the first minibatch (ratio exactly 1, approx-KL 0) updates,
    # the second one measures a positive approx-KL and ends the iteration before its own update
    strict = PPOConfig(batch_size=8, minibatch_size=4, ppo_epochs=3, early_stop_kl=1e-9, lr=1e-2)  # a visible step
    fresh = rlhf.PolicyWithValueHead(copy.deepcopy(sft))
    stats = rlhf.ppo_update(fresh, rlhf.ppo_optimizer(fresh, strict), batch, strict, beta=0.1)
    assert len(stats) == 2 and stats[0]["approx_kl"] == 0.0 and stats[1]["approx_kl"] > 1e-9
