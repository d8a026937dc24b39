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
    ("minibatch_size", 128, "minibatch_size"), ("lam", 1.5, "lam"), ("kl_horizon", 0.2, "kl_horizon"),
    ("kl_horizon", 0.1, "kl_horizon"), ("temperature", 0.0, "temperature")])
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
    with pytest.raises(ValueError, match="kl_horizon"):  # 1 + (-0.2) / 0.1 < 0 would flip beta's sign
        rlhf.KLController(0.2, adaptive=True, horizon=0.1)


def test_train_ppo_writes_the_metric_columns_and_first_ratio_is_one(tiny_lab, tmp_path):
    sft, tokenizer, reward_model = tiny_lab
    policy = rlhf.PolicyWithValueHead(copy.deepcopy(sft))
    first = {}
    config = PPOConfig(batch_size=8, minibatch_size=4, ppo_epochs=2, max_new_tokens=8)
    rows = rlhf.train_ppo(policy, copy.deepcopy(sft), tokenizer, reward_model, config, 2, lab.train_openings(),
                           lab.HELD_OUT_OPENINGS[:2], "tiny-run", tmp_path, eval_samples_per_prompt=2,
                           progress=False, on_first_minibatch=first.update)
    assert first["max_ratio_deviation"] == 0.0
    assert len(rows) == 3  # row 0 (the SFT model) and two iterations
    run = rlhf.read_run(tmp_path / "tiny-run.csv")
    assert tuple(run) == rlhf.METRIC_COLUMNS
    assert np.isfinite(np.stack([run[c] for c in rlhf.EVAL_COLUMNS])).all()
    assert np.isnan(np.stack([run[c][0] for c in rlhf.TRAIN_COLUMNS])).all()  # no update before row 1
    assert np.isfinite(np.stack([run[c][1:] for c in rlhf.TRAIN_COLUMNS])).all()
    assert run["kl"][0] == 0.0  # the policy starts as a copy of the reference
    assert abs(run["rollout_kl"][1]) < 1e-5  # the first batch is sampled before any update
    assert ((run["updates"][1:] >= 1) & (run["updates"][1:] <= 2 * 2)).all()


def test_evaluate_policy_returns_the_rollout_of_its_texts_and_keeps_the_random_stream(tiny_lab):
    sft, tokenizer, reward_model = tiny_lab
    torch.manual_seed(123)
    state_before = torch.random.get_rng_state()
    result = rlhf.evaluate_policy(sft, tokenizer, reward_model, lab.HELD_OUT_OPENINGS[:2], samples_per_prompt=3,
                                   max_new_tokens=6, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state_before)  # its own stream: training samples unchanged
    rollout = result["rollout"]
    assert rollout["response_ids"].shape[0] == len(result["texts"]) == 6
    assert result["texts"] == rollout["texts"] == [f"{p} {r}".strip() for p, r in zip(rollout["prompts"],
                                                                                       rollout["responses"])]
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


def test_a_policy_that_cannot_learn_is_refused_before_training(tiny_lab, tmp_path):
    sft, tokenizer, reward_model = tiny_lab
    frozen = copy.deepcopy(sft).requires_grad_(False)   # e.g. copied from a model an earlier run used as reference
    args = (tokenizer, reward_model, PPOConfig(), 1, lab.train_openings(), lab.HELD_OUT_OPENINGS, "x", tmp_path)
    with pytest.raises(ValueError, match="no trainable parameter"):
        rlhf.train_ppo(rlhf.PolicyWithValueHead(frozen), copy.deepcopy(sft), *args, progress=False)
    policy = rlhf.PolicyWithValueHead(copy.deepcopy(sft))
    for reference in (policy.lm, copy.copy(policy.lm)):    # the same model, or a shallow copy sharing its weights
        with pytest.raises(ValueError, match="share their weights"):
            rlhf.train_ppo(policy, reference, *args, progress=False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        rlhf.train_critic_free(frozen, copy.deepcopy(sft), tokenizer, reward_model, rlhf.critic_free_method("grpo"), 1,
                               lab.train_openings(), lab.HELD_OUT_OPENINGS, "x", tmp_path, reward_model,
                               progress=False)
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
    assert [s["applied"] for s in stats] == [True, False]


def toy_distributions(seed=0, vocab=7, positions=3):
    torch.manual_seed(seed)
    ref = torch.randn(1, positions, vocab).log_softmax(-1)
    logits = (ref + 0.8 * torch.randn(1, positions, vocab)).requires_grad_(True)  # a policy moved away from ref
    return logits, ref


def test_exact_kl_matches_its_definition_and_its_gradient_depends_on_the_reference():
    logits, ref = toy_distributions()
    mask = torch.tensor([[1, 1, 0]])
    kl = rlhf.exact_kl(logits.log_softmax(-1), ref, mask)
    p = logits.log_softmax(-1).exp()
    by_definition = (p * (p.log() - ref)).sum(-1) * mask
    assert torch.allclose(kl, by_definition, atol=1e-6) and kl[0, 2] == 0 and (kl[0, :2] > 0).all()
    (grad,) = torch.autograd.grad(kl.sum(), logits)
    other_ref = torch.randn_like(ref).log_softmax(-1)
    (other_grad,) = torch.autograd.grad(rlhf.exact_kl(logits.log_softmax(-1), other_ref, mask).sum(), logits)
    assert not torch.allclose(grad, other_grad)  # the gradient sees the reference


def test_loss_side_kl_alone_brings_the_policy_back_to_the_reference():
    """Gradient steps on beta * exact KL (the loss-side KL) reduce the KL; the old form, beta * mean(log pi -
    log pi_ref) of tokens sampled before the update with a detached reference, does not."""
    config = PPOConfig(kl_in_reward=False)
    mask = torch.ones(1, 3)

    def run(kl_term):
        logits, ref = toy_distributions(seed=1)
        logits = logits.detach().requires_grad_(True)
        torch.manual_seed(2)
        sampled = torch.distributions.Categorical(logits=logits.detach()).sample((256,)).squeeze(1)  # (256, 3)
        optimizer = torch.optim.SGD([logits], lr=0.5)
        before = rlhf.exact_kl(logits.log_softmax(-1), ref, mask).sum().item()
        for _ in range(50):
            loss = kl_term(logits.log_softmax(-1), ref, sampled)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return before, rlhf.exact_kl(logits.log_softmax(-1), ref, mask).sum().item()

    def exact_form(log_probs, ref, sampled):
        zeros = torch.zeros(1, 3)
        loss, _ = rlhf.ppo_loss(zeros, zeros, zeros, zeros, zeros, zeros, zeros, mask, config,
                                kl_per_token=rlhf.exact_kl(log_probs, ref, mask), beta=3.0)
        return loss  # beta 3 x the mean over 3 tokens = the KL summed over the response

    def sampled_k1_form(log_probs, ref, sampled):
        new = log_probs.expand(len(sampled), -1, -1).gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        old_ref = ref.expand(len(sampled), -1, -1).gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        return (new - old_ref).mean()

    before, after = run(exact_form)
    assert after < 0.05 * before
    before_k1, after_k1 = run(sampled_k1_form)
    assert after_k1 > before_k1  # it pushes the policy away from where it sampled, not towards the reference


def test_loss_side_kl_is_averaged_over_tokens_like_the_policy_loss():
    """beta * KL enters the loss as beta times the mean over real tokens (not the sum per response, which would
    weigh the KL about the mean response length times more than the token-averaged policy loss does)."""
    config = PPOConfig(kl_in_reward=False)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    kl_per_token = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 9.0, 9.0, 9.0]]) * mask
    zeros = torch.zeros(2, 4)
    loss, stats = rlhf.ppo_loss(zeros, zeros, zeros, zeros, zeros, zeros, zeros, mask, config,
                                kl_per_token=kl_per_token, beta=2.0)
    assert stats["kl_loss"] == pytest.approx(1.5 / 5)
    assert loss.item() == pytest.approx(2.0 * 1.5 / 5)


def test_temperature_sampling_and_recomputed_logprobs_agree(tiny_lab):
    sft, tokenizer, _ = tiny_lab
    prompts = list(lab.HELD_OUT_OPENINGS) * 2
    torch.manual_seed(0)
    out = lab.generate_responses(sft, tokenizer, prompts, max_new_tokens=8, temperature=0.7, return_logprobs=True)
    ids = (out["query_ids"], out["query_mask"], out["response_ids"], out["response_mask"])
    with torch.no_grad():
        at_temperature, _, _ = rlhf.response_logprobs(sft, *ids, temperature=0.7)
        at_one, _, _ = rlhf.response_logprobs(sft, *ids)
    real = out["response_mask"].bool()
    assert torch.allclose(at_temperature[real], out["sampler_logprobs"][real], atol=1e-4)
    assert not torch.allclose(at_one[real], out["sampler_logprobs"][real], atol=1e-2)  # forgetting T is caught


def test_policy_value_head_follows_the_language_model_dtype(tiny_lab):
    sft, tokenizer, _ = tiny_lab
    policy = rlhf.PolicyWithValueHead(copy.deepcopy(sft).to(torch.bfloat16))
    assert policy.value_head.weight.dtype == torch.bfloat16
    out = lab.generate_responses(policy.lm, tokenizer, ["the plot is"], max_new_tokens=4)
    logprobs, entropy, values = rlhf.response_logprobs(
        policy, out["query_ids"], out["query_mask"], out["response_ids"], out["response_mask"], with_values=True)
    assert logprobs.dtype == entropy.dtype == values.dtype == torch.float32


def test_log_distribution_reads_the_output_layer_only_where_response_tokens_are_predicted(tiny_lab):
    sft, tokenizer, _ = tiny_lab
    torch.manual_seed(0)
    out = lab.generate_responses(sft, tokenizer, list(lab.HELD_OUT_OPENINGS), max_new_tokens=6)
    ids = (out["query_ids"], out["query_mask"], out["response_ids"], out["response_mask"])
    policy = rlhf.PolicyWithValueHead(sft)
    with torch.no_grad():
        log_probs, values = rlhf.response_log_distribution(policy, *ids, with_values=True, temperature=0.7)
        input_ids = torch.cat([ids[0], ids[2]], 1)
        attention_mask = torch.cat([ids[1], ids[3]], 1)
        full_logits, full_values = policy(input_ids, attention_mask, lab.position_ids_from_mask(attention_mask))
    prompt_length = ids[0].shape[1]
    assert log_probs.shape == (*ids[2].shape, len(tokenizer))
    expected = (full_logits[:, prompt_length - 1:-1] / 0.7).log_softmax(-1)  # every position, then sliced
    assert torch.allclose(log_probs, expected, atol=1e-6)
    assert torch.equal(values, full_values[:, prompt_length - 1:-1])

    class IgnoresLogitsToKeep(torch.nn.Module):  # like a model without the argument: logits at every position
        def forward(self, input_ids, attention_mask, position_ids, **unused):
            return sft(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    with torch.no_grad():
        from_all_positions, _ = rlhf.response_log_distribution(IgnoresLogitsToKeep(), *ids, temperature=0.7)
    assert torch.allclose(from_all_positions, log_probs, atol=1e-6)


def test_entropy_bonus_still_trains_the_policy_when_its_coefficient_is_positive(tiny_lab):
    """ppo_update leaves the entropy out of autograd only when c2 = 0: with c2 > 0 the update must differ."""
    sft, tokenizer, reward_model = tiny_lab
    torch.manual_seed(0)
    policy = rlhf.PolicyWithValueHead(copy.deepcopy(sft))
    batch = rlhf.ppo_rollout(policy, copy.deepcopy(sft), tokenizer, reward_model, list(lab.train_openings()[:8]),
                             PPOConfig(max_new_tokens=6), beta=0.1)
    updated = []
    for entropy_coef in (0.0, 0.0, 0.5):
        config = PPOConfig(batch_size=8, minibatch_size=8, ppo_epochs=1, early_stop_kl=None, entropy_coef=entropy_coef)
        fresh = rlhf.PolicyWithValueHead(copy.deepcopy(sft))
        torch.manual_seed(1)  # the same minibatch order each time
        rlhf.ppo_update(fresh, rlhf.ppo_optimizer(fresh, config), batch, config, beta=0.1)
        updated.append(torch.cat([p.detach().flatten() for p in fresh.lm.parameters()]))
    assert torch.equal(updated[0], updated[1])      # the comparison is exact: only c2 may make a difference
    assert not torch.equal(updated[0], updated[2])


def test_entropy_left_out_of_autograd_changes_no_gradient_when_its_coefficient_is_zero(tiny_lab):
    sft, tokenizer, _ = tiny_lab
    torch.manual_seed(0)
    out = lab.generate_responses(sft, tokenizer, list(lab.HELD_OUT_OPENINGS), max_new_tokens=6)
    ids = (out["query_ids"], out["query_mask"], out["response_ids"], out["response_mask"])
    mask = out["response_mask"]
    gradients = []
    for entropy_grad in (True, False):
        policy = rlhf.PolicyWithValueHead(copy.deepcopy(sft))
        log_probs, values = rlhf.response_log_distribution(policy, *ids, with_values=True)
        logprobs, entropy = rlhf.sampled_logprobs_and_entropy(log_probs, ids[2], entropy_grad=entropy_grad)
        assert entropy.requires_grad == entropy_grad
        advantages = torch.linspace(-1, 1, mask.numel()).view_as(mask) * mask
        loss, _ = rlhf.ppo_loss(logprobs, logprobs.detach() - 0.05, advantages, values, values.detach(),
                                values.detach() + 1, entropy, mask, PPOConfig(entropy_coef=0.0))
        loss.backward()
        gradients.append([p.grad.clone() for p in policy.lm.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*gradients))


# --- the real path: hub-shaped models built and saved here (no download) ------------------------------

@pytest.fixture(scope="module")
def hub_like(tmp_path_factory):
    from hub_stand_ins import save_bert_classifier, save_gpt2_like
    from transformers import GenerationConfig

    root = tmp_path_factory.mktemp("hub_like")
    return {"policy": save_gpt2_like(root / "gpt2"),
            "policy_bf16": save_gpt2_like(root / "gpt2-bf16", dtype=torch.bfloat16),
            "policy_with_settings": save_gpt2_like(root / "gpt2-settings", generation_config=GenerationConfig(
                do_sample=True, top_k=5, repetition_penalty=1.8, no_repeat_ngram_size=2)),
            "reward": save_bert_classifier(root / "bert"),
            "reward_bf16": save_bert_classifier(root / "bert-bf16", dtype=torch.bfloat16)}


def test_checkpoint_generation_settings_do_not_leak_into_sampling(hub_like):
    model, tokenizer = lab.load_policy(str(hub_like["policy_with_settings"]), device=torch.device("cpu"))
    assert model.generation_config.repetition_penalty == 1.8  # the checkpoint asks for it
    prompts = ["the movie was", "we saw it last night and"] * 4

    def sampled_and_recomputed(generate):
        torch.manual_seed(0)
        out = generate()
        ids = (out["query_ids"], out["query_mask"], out["response_ids"], out["response_mask"])
        with torch.no_grad():
            recomputed, _, _ = rlhf.response_logprobs(model, *ids)
        real = out["response_mask"].bool()
        return out["sampler_logprobs"][real], recomputed[real]

    sampler, recomputed = sampled_and_recomputed(
        lambda: lab.generate_responses(model, tokenizer, prompts, max_new_tokens=12, return_logprobs=True))
    assert torch.allclose(sampler, recomputed, atol=1e-4)

    def with_checkpoint_settings():  # generate with the same request, but the checkpoint's config left in place
        query = lab.encode_texts(tokenizer, prompts)
        config = lab.sampling_config(tokenizer, 12, output_scores=True, return_dict_in_generate=True)
        config.top_k, config.repetition_penalty, config.no_repeat_ngram_size = None, None, None  # "not set"
        with torch.no_grad():
            out = model.generate(input_ids=query["input_ids"], attention_mask=query["attention_mask"],
                                 generation_config=config)
        response = out.sequences[:, query["input_ids"].shape[1]:]
        mask = lab.response_mask_from_ids(response, tokenizer.eos_token_id)
        step = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
        return {"query_ids": query["input_ids"], "query_mask": query["attention_mask"], "response_ids": response,
                "response_mask": mask, "sampler_logprobs": step}

    leaked, recomputed = sampled_and_recomputed(with_checkpoint_settings)
    assert not torch.allclose(leaked, recomputed, atol=1e-2)  # the check has teeth: leaked settings are caught


@pytest.mark.parametrize("policy_key,reward_key", [("policy", "reward"), ("policy_bf16", "reward_bf16")])
def test_real_path_trains_end_to_end(hub_like, tmp_path, policy_key, reward_key):
    """A byte-level BPE GPT-2 without a pad token and a WordPiece BERT classifier, through load_policy,
    load_reward_model and train_ppo; a bfloat16 checkpoint loads in float32 unless asked otherwise."""
    cpu = torch.device("cpu")
    model, tokenizer = lab.load_policy(str(hub_like[policy_key]), device=cpu)
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>" and tokenizer.padding_side == "left"
    reward_model = lab.load_reward_model(str(hub_like[reward_key]), device=cpu)
    assert isinstance(reward_model, lab.ClassifierRewardModel) and reward_model.positive_label == 1
    policy = rlhf.PolicyWithValueHead(copy.deepcopy(model))
    first = {}
    config = PPOConfig(batch_size=8, minibatch_size=4, ppo_epochs=2, max_new_tokens=8, temperature=0.7, lr=1e-4)
    rlhf.train_ppo(policy, copy.deepcopy(model), tokenizer, reward_model, config, 2, lab.train_openings(),
                   lab.HELD_OUT_OPENINGS[:2], "hub", tmp_path, eval_samples_per_prompt=2, progress=False,
                   on_first_minibatch=first.update, gold_labeller=None)
    assert first["max_ratio_deviation"] < 1e-6
    run = rlhf.read_run(tmp_path / "hub.csv")
    assert len(run["iteration"]) == 3 and np.isnan(run["p_positive"]).all()  # no gold labels for hub text
    assert np.isfinite(np.stack([run[c] for c in rlhf.METRIC_COLUMNS if c != "p_positive"])[:, 1:]).all()


@pytest.mark.parametrize("key", ["policy", "policy_bf16"])
def test_tied_embedding_gets_the_dense_gradient_through_a_sparse_one(hub_like, key):
    """load_policy makes the input side of GPT-2's tied embedding send a sparse gradient (no vocabulary-sized
    matrix of zeros per backward pass); the parameter's gradient is the same dense one as without it."""
    dtype = torch.bfloat16 if key == "policy_bf16" else torch.float32
    model, tokenizer = lab.load_policy(str(hub_like[key]), device=torch.device("cpu"), dtype=dtype)
    embedding = model.get_input_embeddings()
    assert embedding.sparse and embedding.weight is model.get_output_embeddings().weight
    batch = tokenizer(["the movie was good and the plot was good", "we saw it"], return_tensors="pt", padding=True)
    gradients = []
    for sparse in (True, False):
        embedding.sparse = sparse
        model.zero_grad(set_to_none=True)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        assert embedding.weight.grad.layout == torch.strided
        gradients.append(embedding.weight.grad.float())
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert torch.allclose(gradients[0], gradients[1], atol=tolerance * gradients[1].abs().max().item())


def test_bfloat16_weights_on_request_still_train(hub_like, tmp_path):
    cpu = torch.device("cpu")
    model, tokenizer = lab.load_policy(str(hub_like["policy_bf16"]), device=cpu, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    reward_model = lab.load_reward_model(str(hub_like["reward"]), device=cpu, dtype=torch.bfloat16)
    policy = rlhf.PolicyWithValueHead(copy.deepcopy(model))
    config = PPOConfig(batch_size=4, minibatch_size=4, ppo_epochs=1, max_new_tokens=6, lr=1e-4, early_stop_kl=None)
    rows = rlhf.train_ppo(policy, copy.deepcopy(model), tokenizer, reward_model, config, 1, lab.train_openings(),
                          lab.HELD_OUT_OPENINGS[:1], "bf16", tmp_path, eval_samples_per_prompt=2, progress=False,
                          gold_labeller=None)
    assert np.isfinite(rows[-1]["score"]) and np.isfinite(rows[-1]["kl"]) and rows[-1]["updates"] == 1
