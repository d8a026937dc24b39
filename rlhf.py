"""RLHF algorithms on top of the small-LLM lab: PPO today, the critic-free methods beside it.

llm_ppo.ipynb walks through every PPO piece below, shows its source (``utils.show_source``) and
checks it; llm_ppo_correct_dropout.ipynb runs the same code, so the notebooks cannot drift apart.

Sections
--------
1. Config, the logged metrics and the policy with a value head (``PPOConfig``, ``METRIC_COLUMNS``,
   ``PolicyWithValueHead``).
2. The pieces of one PPO iteration: log-probabilities (``response_log_distribution``,
   ``response_logprobs``), per-token rewards with the KL penalty (``token_rewards``), the exact KL for
   the loss (``exact_kl``), GAE (``compute_gae``), the clipped loss (``ppo_loss``), the KL controller,
   diagnostics.
3. Evaluation on held-out prompts (``evaluate_policy``).
4. The loop: ``ppo_rollout``, ``ppo_update``, ``ppo_optimizer``, ``train_ppo``, ``read_run``.
5. Critic-free methods (llm_grpo.ipynb): best-of-N from one pool of samples (``best_of_n``,
   ``best_of_n_kl_bound``), group advantages (``group_advantages``), the loss aggregations of GRPO, DAPO
   and Dr. GRPO (``aggregate_tokens``, ``critic_free_loss``), ``CriticFreeConfig``, the loop
   (``critic_free_rollout``, ``critic_free_update``, ``train_critic_free``) and a verifiable reward
   (``gold_positive_reward``).

Imports point one way: rlhf -> llm_lab -> utils.
"""
from __future__ import annotations

import csv
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llm_lab import context_length, generate_responses, gold_labels, position_ids_from_mask
from utils import check_param, progress_bar, set_seed


# ---------------------------------------------------------------------------
# 1. Config, the logged metrics and the policy with a value head
# ---------------------------------------------------------------------------

# One CSV row per iteration. Row 0 is the SFT model before any update. In every row, the first group is
# a held-out evaluation of the policy AFTER this iteration's update; the second group describes this
# iteration's training batch, sampled BEFORE the update, and the update made from it (NaN in row 0).
EVAL_COLUMNS = ("score", "p_positive", "kl", "response_length")
TRAIN_COLUMNS = ("rollout_score", "rollout_kl", "beta", "score_std", "advantage_std", "value_mean", "return_mean",
                 "explained_variance", "entropy", "clipfrac", "approx_kl", "value_loss", "updates", "seconds")
METRIC_COLUMNS = ("iteration",) + EVAL_COLUMNS + TRAIN_COLUMNS


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
    kl_in_reward: bool = True     # True: -beta * (log pi - log pi_ref) per token in the reward;
    #                               False: + beta / sigma_A * the exact KL, averaged over tokens, in the loss
    adaptive_kl: bool = False     # adapt beta towards target_kl (Ziegler et al. 2019)
    target_kl: float = 2.0        # target per-sequence KL for the adaptive controller
    kl_horizon: float = 1.0       # controller speed: beta changes by at most 20 % / kl_horizon per iteration
    temperature: float = 1.0      # sample from softmax(logits / T); every log-prob divides by the same T
    gamma: float = 1.0            # discount over response tokens
    lam: float = 0.95             # GAE lambda
    whiten_advantages: bool = True
    use_value_clipping: bool = True
    max_grad_norm: float = 1.0
    early_stop_kl: float | None = 0.02  # end an iteration's updates once a minibatch's approx_kl exceeds this
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
        # the controller multiplies beta by 1 + e / kl_horizon with e in [-0.2, 0.2]: a horizon of 0.2 or
        # less could make that factor 0 or negative, and a negative beta rewards drifting away
        check_param("kl_horizon", self.kl_horizon, low=0.2, low_open=True)
        check_param("temperature", self.temperature, low=0, low_open=True)
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
    language model and compete with the policy gradient (llm_ppo.ipynb measures both gradients).

    Calling it returns logits (batch, seq_len, vocab), or only at the positions ``logits_to_keep`` names,
    and values (batch, seq_len), float32: ``values[:, i]`` estimates the return from the state "tokens 0..i seen".
    """

    def __init__(self, lm, detach_value: bool = True):
        self.lm, self.detach_value = lm, detach_value
        weight = next(lm.parameters())
        self.value_head = torch.nn.Linear(lm.config.hidden_size, 1).to(device=weight.device, dtype=weight.dtype)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def parameters(self):
        return [*self.lm.parameters(), *self.value_head.parameters()]

    def train(self, mode: bool = True):
        self.lm.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, input_ids, attention_mask, position_ids, logits_to_keep: int | torch.Tensor = 0):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=True, logits_to_keep=logits_to_keep)
        hidden = out.hidden_states[-1]
        values = self.value_head(hidden.detach() if self.detach_value else hidden).squeeze(-1)
        return out.logits, values.float()


# ---------------------------------------------------------------------------
# 2. The pieces of one PPO iteration
# ---------------------------------------------------------------------------

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


def response_log_distribution(model, query_ids, query_mask, response_ids, response_mask, with_values: bool = False,
                              temperature: float = 1.0):
    """The log-probability of EVERY vocabulary token at every response position, in one forward pass.

    Sequence = prompt (left padded, length P) + response (length T). The token at position P + t is
    predicted by the logits at position P + t - 1, and V(s_t), the value *before* token t is
    generated, is read there too. The logits are divided by ``temperature``, as when sampling, and
    computed in float32 whatever the model's dtype. Returns log_probs (batch, T, vocab) and values
    (batch, T), or None without ``with_values``.
    """
    input_ids = torch.cat([query_ids, response_ids], dim=1)            # (B, P + T)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)     # (B, P + T)
    position_ids = position_ids_from_mask(attention_mask)
    prompt_len = query_ids.shape[1]
    # The output layer runs only at the T positions P - 1 .. P + T - 2 that predict a response token: with GPT-2
    # small's 50,257-token vocabulary it is about a third of the model's arithmetic. (Positions as a tensor:
    # transformers then gathers them into a contiguous copy; a strided slice is slow in bfloat16 on a CPU.)
    keep = torch.arange(prompt_len - 1, input_ids.shape[1] - 1, device=input_ids.device)  # (T,)
    if with_values:
        logits, values = model(input_ids, attention_mask, position_ids, logits_to_keep=keep)
        values = values[:, prompt_len - 1:-1]                          # (B, T)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       logits_to_keep=keep).logits
        values = None
    if logits.shape[1] != len(keep):  # a model that ignores logits_to_keep returns every position
        logits = logits[:, keep]
    logits = logits.float() / temperature                              # (B, T, vocab)
    return logits.log_softmax(-1), values


def sampled_logprobs_and_entropy(log_probs, response_ids, entropy_grad: bool = True):
    """From log_probs (batch, T, vocab): the sampled tokens' log-probabilities and the entropies, each (batch, T).

    ``entropy_grad=False`` leaves the entropies out of autograd: a logged diagnostic when the loss has no
    entropy bonus (c2 = 0), which spares the backward pass three operations over the whole vocabulary.
    """
    logprobs = log_probs.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    source = log_probs if entropy_grad else log_probs.detach()
    entropy = -(source.exp() * source).sum(-1)
    return logprobs, entropy


def response_logprobs(model, query_ids, query_mask, response_ids, response_mask, with_values: bool = False,
                      temperature: float = 1.0):
    """Log-probabilities of the response tokens, their entropies and (optionally) values, in ONE forward pass.

    Returns logprobs, entropy, values: each (batch, T) (values None without ``with_values``).
    """
    log_probs, values = response_log_distribution(model, query_ids, query_mask, response_ids, response_mask,
                                                  with_values, temperature)
    logprobs, entropy = sampled_logprobs_and_entropy(log_probs, response_ids)
    assert logprobs.shape == response_ids.shape
    return logprobs, entropy, values


def token_rewards(logprobs, ref_logprobs, scores, response_mask, beta: float):
    """Per-token reward: -beta * (log pi - log pi_ref) on every response token,
    plus the reward model's score on the last real response token. All (batch, T)."""
    kl = (logprobs - ref_logprobs) * response_mask
    rewards = -beta * kl
    last = response_mask.sum(1).long() - 1                              # index of the last real token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def exact_kl(log_probs, ref_log_probs, response_mask):
    """KL(pi(.|s_t) || pi_ref(.|s_t)) over the whole vocabulary at every response position: (batch, T).

    Summed over a response it is a sample of the sequence KL (by the chain rule, its mean over sampled
    responses IS the sequence KL) with far less noise than log pi - log pi_ref of the sampled tokens.
    Its gradient is that of the per-position KLs at the visited prefixes: the part of the sequence
    KL's gradient that keeps those states fixed (llm_ppo.ipynb, section 7).
    """
    return (log_probs.exp() * (log_probs - ref_log_probs)).sum(-1) * response_mask


def compute_gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation over the response tokens, for a whole batch.

        delta_t = r_t + gamma * V(s_{t+1}) * m_{t+1} - V(s_t)
        A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}

    ``mask`` (batch, T) is 1 on real tokens; past the last real token the
    episode has ended, so V(s_{t+1}) and A_{t+1} count as 0 there.
    Returns advantages and returns (= advantages + values), each (batch, T).
    """
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
             config: PPOConfig, kl_per_token=None, beta: float = 0.0):
    """The PPO objective as a loss to minimise (the chapter's L = L_CLIP - c1 L_VF - beta L_KL + c2 H, negated).

    ``kl_per_token`` (batch, T), the exact KL of ``exact_kl``, enters the loss when the config puts the
    KL there (``kl_in_reward=False``), as beta times its mean over the real tokens: averaged like the
    policy loss, so one beta weighs score against KL about as the reward-side KL does (llm_ppo.ipynb, section 7).
    Returns the loss and a dict of diagnostics (floats).
    """
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
    kl_loss = torch.zeros(())
    if kl_per_token is not None and not config.kl_in_reward:
        kl_loss = masked_mean(kl_per_token, mask)                        # nats per token, like the policy loss
        loss = loss + beta * kl_loss

    with torch.no_grad():
        log_ratio = new_logprobs - old_logprobs
        stats = {
            "policy_loss": policy_loss.item(),
            "value_loss": value_loss.item(),
            "kl_loss": kl_loss.item(),
            "entropy": mean_entropy.item(),
            "clipfrac": masked_mean(((ratio - 1).abs() > config.clip_range).float(), mask).item(),
            "approx_kl": masked_mean(ratio - 1 - log_ratio, mask).item(),   # k3 estimator, >= 0
            "max_ratio_deviation": ((ratio - 1).abs() * mask).max().item(),
        }
    return loss, stats


class KLController:
    """Fixed beta, or the adaptive rule beta <- beta * (1 + clip((KL - target) / target, -0.2, 0.2) / horizon)."""

    def __init__(self, beta: float, adaptive: bool = False, target: float = 2.0, horizon: float = 1.0):
        if adaptive and horizon <= 0.2:
            raise ValueError(f"kl_horizon must be > 0.2 (it can turn beta negative), got {horizon}")
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


# ---------------------------------------------------------------------------
# 3. Evaluation on held-out prompts
# ---------------------------------------------------------------------------

def evaluate_policy(lm, tokenizer, reward_model, prompts, samples_per_prompt: int, max_new_tokens: int,
                    seed: int, dropout: bool = False, temperature: float = 1.0, reference=None,
                    gold_labeller=gold_labels):
    """Held-out evaluation on sampled responses to ``prompts``.

    Returns the mean reward-model ``score``, the gold share of positive reviews ``p_positive``
    (NaN when ``gold_labeller`` is None: the lab's grammar cannot judge a hub model's text), the
    per-sequence ``kl`` to ``reference`` (the exact KL summed over each response, then averaged; NaN
    without a reference), the mean ``response_length`` in tokens, the ``texts``, their gold ``labels``
    and the ``rollout`` (token ids and masks, for callers that measure more on the same samples).
    Samples from its own random stream (``fork_rng``, on the CPU and on the model's GPU), so evaluating
    does not change the training run's samples. Exception: with ``dropout=True`` the two KL passes
    draw their dropout masks from the global stream (only llm_ppo_correct_dropout's dropout_on runs).
    """
    prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    device = next(lm.parameters()).device
    was_training = lm.training
    lm.train(dropout)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        rollout = generate_responses(lm, tokenizer, prompts, max_new_tokens, temperature=temperature)
    texts = rollout["texts"]
    scores = reward_model(texts)
    labels = gold_labeller(texts) if gold_labeller is not None else [None] * len(texts)
    kl = float("nan")
    if reference is not None:
        with torch.no_grad():
            ids = (rollout["query_ids"], rollout["query_mask"], rollout["response_ids"], rollout["response_mask"])
            log_probs, _ = response_log_distribution(lm, *ids, temperature=temperature)
            ref_log_probs, _ = response_log_distribution(reference, *ids, temperature=temperature)
            kl = exact_kl(log_probs, ref_log_probs, rollout["response_mask"]).sum(1).mean().item()
    lm.train(was_training)
    return {"score": scores.mean().item(),
            "p_positive": labels.count("positive") / len(labels) if gold_labeller is not None else float("nan"),
            "kl": kl, "response_length": rollout["response_mask"].sum(1).float().mean().item(),
            "texts": texts, "labels": labels, "rollout": rollout}


# ---------------------------------------------------------------------------
# 4. The loop
# ---------------------------------------------------------------------------

def ppo_rollout(policy: PolicyWithValueHead, ref_lm, tokenizer, reward_model, prompts, config: PPOConfig,
                beta: float) -> dict:
    """Steps 1-4 of a PPO iteration, for a whole batch of prompts at once.

    Sample a response per prompt, score it, compute the old policy's and the
    reference's log-probs and the old values, the per-token rewards and the
    advantages. Returns a dict of tensors, each (batch, T) unless noted.
    """
    device = next(policy.lm.parameters()).device
    T = config.temperature
    # 1. rollout: sampled responses (dropout only if the config asks for the bug)
    policy.train(config.dropout)
    rollout = generate_responses(policy.lm, tokenizer, prompts, config.max_new_tokens, temperature=T)
    ids = (rollout["query_ids"], rollout["query_mask"], rollout["response_ids"], rollout["response_mask"])
    r_mask = rollout["response_mask"]                                  # (B, T)
    with torch.no_grad():
        # 2. score with the reward model; log-probs and values of the old policy and the reference
        scores = reward_model(rollout["texts"]).to(device)              # (B,)
        old_logprobs, _, old_values = response_logprobs(policy, *ids, with_values=True, temperature=T)
        ref_log_probs, _ = response_log_distribution(ref_lm, *ids, temperature=T)  # (B, T, vocab)
        ref_logprobs, _ = sampled_logprobs_and_entropy(ref_log_probs, rollout["response_ids"])
        # 3. per-token rewards (KL in the reward, or 0 there when it goes into the loss)
        rewards, kl = token_rewards(old_logprobs, ref_logprobs, scores, r_mask, beta if config.kl_in_reward else 0.0)
        # 4. advantages over the response tokens
        advantages, returns = compute_gae(rewards, old_values, r_mask, config.gamma, config.lam)
        raw_advantage_std = masked_mean((advantages - masked_mean(advantages, r_mask)) ** 2, r_mask).sqrt()
        if config.whiten_advantages:
            advantages = whiten(advantages, r_mask)
    batch = {"query_ids": ids[0], "query_mask": ids[1], "response_ids": ids[2], "response_mask": r_mask,
             "scores": scores, "old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs, "old_values": old_values,
             "kl": kl, "advantages": advantages, "returns": returns, "raw_advantage_std": raw_advantage_std}
    if not config.kl_in_reward:
        batch["ref_log_probs"] = ref_log_probs                         # (B, T, vocab), for the exact KL in the loss
    return batch


def ppo_update(policy: PolicyWithValueHead, optimizer, batch: dict, config: PPOConfig, beta: float,
               where: str = "") -> list:
    """Step 5: ``ppo_epochs`` passes of shuffled minibatch updates of the clipped objective on one rollout batch.

    Stops early once a minibatch's approx-KL exceeds ``config.early_stop_kl``
    (measured before that minibatch's update, which is then skipped). Returns
    the diagnostics of every minibatch whose loss was computed; ``applied`` says
    whether its update was made.
    """
    device = batch["response_ids"].device
    n_rows = len(batch["response_ids"])
    per_row = {name: value for name, value in batch.items() if value.dim() > 0}  # minibatches slice these
    policy.train(config.dropout)  # eval mode (dropout off) unless the config asks for the bug
    # In the reward, beta * KL is divided by the advantages' standard deviation when they are whitened; in the
    # loss it is divided by this batch's equivalent, so that one beta is on the same scale in both places.
    loss_beta = beta / max(batch["raw_advantage_std"].item(), 1e-8) if config.whiten_advantages else beta
    stats_log = []
    for epoch in range(config.ppo_epochs):
        order = torch.randperm(n_rows)
        for k, start_row in enumerate(range(0, n_rows, config.minibatch_size)):
            rows = order[start_row:start_row + config.minibatch_size].to(device)
            mb = {name: value[rows] for name, value in per_row.items()}      # each (minibatch, ...)
            log_probs, new_values = response_log_distribution(
                policy, mb["query_ids"], mb["query_mask"], mb["response_ids"], mb["response_mask"], True,
                config.temperature)
            new_logprobs, entropy = sampled_logprobs_and_entropy(log_probs, mb["response_ids"],
                                                                 entropy_grad=config.entropy_coef > 0)
            kl_per_token = None if config.kl_in_reward else exact_kl(log_probs, mb["ref_log_probs"],
                                                                      mb["response_mask"])
            loss, stats = ppo_loss(new_logprobs, mb["old_logprobs"], mb["advantages"], new_values, mb["old_values"],
                                   mb["returns"], entropy, mb["response_mask"], config, kl_per_token, loss_beta)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"PPO loss is {loss.item()} ({where + ', ' if where else ''}epoch {epoch}, minibatch {k}; "
                    f"policy loss {stats['policy_loss']}, value loss {stats['value_loss']}): "
                    f"lower lr or check the rewards")
            stats_log.append(stats)
            stats["applied"] = not (config.early_stop_kl is not None and stats["approx_kl"] > config.early_stop_kl)
            if not stats["applied"]:
                return stats_log  # this rollout has moved the policy far enough: skip the remaining updates
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
            optimizer.step()
    return stats_log


def ppo_optimizer(policy: PolicyWithValueHead, config: PPOConfig):
    """Adam with its own learning rate for the value head; the fused kernel updates all parameters at once."""
    return torch.optim.Adam([{"params": list(policy.lm.parameters()), "lr": config.lr},
                             {"params": list(policy.value_head.parameters()), "lr": config.value_lr}],
                            fused=True)


def _training_metrics(batch: dict, stats_log: list, beta: float, seconds: float) -> dict:
    """The TRAIN_COLUMNS of one iteration, from its rollout batch and the diagnostics of its update."""
    mask = batch["response_mask"]

    def mean_of(key):
        return float(np.mean([s[key] for s in stats_log]))

    return {"rollout_score": batch["scores"].mean().item(), "rollout_kl": batch["kl"].sum(1).mean().item(),
            "beta": beta, "score_std": batch["scores"].std(unbiased=False).item(),
            "advantage_std": batch["raw_advantage_std"].item(),
            "value_mean": masked_mean(batch["old_values"], mask).item(),
            "return_mean": masked_mean(batch["returns"], mask).item(),
            "explained_variance": explained_variance(batch["old_values"], batch["returns"], mask),
            "entropy": mean_of("entropy"), "clipfrac": mean_of("clipfrac"), "approx_kl": mean_of("approx_kl"),
            "value_loss": mean_of("value_loss"), "updates": sum(s["applied"] for s in stats_log), "seconds": seconds}


def check_policy_and_reference(policy_lm, ref_lm) -> None:
    """Raise a ValueError before training if the policy shares weights with its reference, or has nothing to train.

    The training loops freeze their reference (``requires_grad_(False)``), and ``copy.deepcopy`` copies that
    flag: a policy copied from a model that an earlier run used as its reference has nothing to train, and
    Adam skips parameters without gradients, so the run would go through without an error.
    """
    reference_storage = {p.data_ptr() for p in ref_lm.parameters() if p.numel() > 0}
    if policy_lm is ref_lm or any(p.data_ptr() in reference_storage for p in policy_lm.parameters()):
        raise ValueError("the policy and the reference share their weights: pass a copy as the reference "
                         "(copy.deepcopy), or training would drag the reference along")
    if not any(p.requires_grad for p in policy_lm.parameters()):
        raise ValueError("the policy has no trainable parameter (requires_grad is False everywhere): was it copied "
                         "from a model an earlier run froze as its reference? Copy it from an unfrozen model, or call "
                         "requires_grad_(True) on it")


def run_csv_path(run_dir: Path | str, run_name: str) -> Path:
    """``run_dir/run_name.csv``, with ``run_dir`` created; a name that is not a plain file name is refused."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", run_name):
        raise ValueError(f"run_name must use letters, digits, '_', '.', '-' only, got {run_name!r}")
    run_path = Path(run_dir) / f"{run_name}.csv"
    run_path.parent.mkdir(parents=True, exist_ok=True)
    return run_path


def train_ppo(policy: PolicyWithValueHead, ref_lm, tokenizer, reward_model, config: PPOConfig, n_iterations: int,
              train_prompts, eval_prompts, run_name: str, run_dir: Path | str, seed: int = 0,
              eval_samples_per_prompt: int = 16, progress: bool = True, on_first_minibatch=None,
              gold_labeller=gold_labels):
    """The whole PPO loop; one CSV row of ``METRIC_COLUMNS`` per iteration in ``run_dir/run_name.csv``.

    Row 0 evaluates the SFT model before any update. Each iteration: sample a batch of prompts, then
    ``ppo_rollout`` (generate, score, per-token rewards with the KL penalty, GAE) and ``ppo_update``
    (``ppo_epochs`` passes of minibatch updates of the clipped objective), then evaluate on the
    held-out prompts. ``gold_labeller=None`` for models the lab's grammar cannot judge.
    Returns the list of metric rows (dicts).
    """
    train_prompts = list(train_prompts)
    longest_prompt = max(len(tokenizer(p)["input_ids"]) for p in train_prompts + list(eval_prompts))
    config.validate(context_length(policy.lm), longest_prompt)
    check_param("n_iterations", n_iterations, low=1, integer=True)
    check_policy_and_reference(policy.lm, ref_lm)
    run_path = run_csv_path(run_dir, run_name)

    set_seed(seed)
    optimizer = ppo_optimizer(policy, config)
    kl_controller = KLController(config.beta, config.adaptive_kl, config.target_kl, config.kl_horizon)
    ref_lm.train(config.dropout)  # the reference is frozen; dropout (if on) still perturbs it
    for p in ref_lm.parameters():
        p.requires_grad_(False)
    rng = np.random.default_rng(seed)
    rows, negative_kl_streak = [], 0
    with open(run_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        for iteration in progress_bar(range(0, n_iterations + 1), progress, run_name):
            row = {"iteration": iteration, **dict.fromkeys(TRAIN_COLUMNS, float("nan"))}
            if iteration > 0:
                start = time.perf_counter()
                beta = kl_controller.beta
                prompts = [train_prompts[i] for i in rng.integers(len(train_prompts), size=config.batch_size)]
                batch = ppo_rollout(policy, ref_lm, tokenizer, reward_model, prompts, config, beta)
                stats_log = ppo_update(policy, optimizer, batch, config, beta, where=f"iteration {iteration}")
                if iteration == 1 and on_first_minibatch is not None:
                    on_first_minibatch(stats_log[0])  # weights not yet updated: the ratio must be exactly 1
                row.update(_training_metrics(batch, stats_log, beta, time.perf_counter() - start))
                kl_controller.update(row["rollout_kl"])
                negative_kl_streak = negative_kl_streak + 1 if row["rollout_kl"] < 0 else 0
                if negative_kl_streak == 3:
                    warnings.warn(f"KL to the reference has been negative for 3 iterations in a row "
                                  f"(now {row['rollout_kl']:.3f}): sampling and scoring disagree (dropout on? "
                                  "a sampling warper? a temperature missing from a log-prob pass?)")
            evaluation = evaluate_policy(policy.lm, tokenizer, reward_model, eval_prompts, eval_samples_per_prompt,
                                         config.max_new_tokens, seed=seed + 1000 + iteration, dropout=config.dropout,
                                         temperature=config.temperature, reference=ref_lm,
                                         gold_labeller=gold_labeller)
            row.update({column: evaluation[column] for column in EVAL_COLUMNS})
            writer.writerow(row)
            f.flush()
            rows.append(row)
    return rows


def read_run(path) -> dict:
    """A run's CSV as a dict of column -> numpy array (row 0: the SFT model, before any update)."""
    with open(path) as f:
        records = list(csv.DictReader(f))
    return {column: np.array([float(r[column]) for r in records]) for column in records[0]}


# ---------------------------------------------------------------------------
# 5. Critic-free methods: best-of-N, RLOO, GRPO, Dr. GRPO
# ---------------------------------------------------------------------------

def best_of_n_kl_bound(n):
    """log n - (n - 1) / n: KL(best-of-n || policy) when no two answers tie, an upper bound otherwise."""
    n = np.asarray(n, dtype=float)
    return np.log(n) - (n - 1) / n


def best_of_n(scores, ns, values: dict, answers=None) -> dict:
    """Best-of-n for every n in ``ns``, from M samples per prompt and no further sampling.

    ``scores`` (prompts, M): the reward model's score of each sample. Ranked by score, the sample of rank
    k (1 = lowest) is the best of a random n-subset of the M with probability C(k-1, n-1) / C(M, n);
    weighting by it averages each array of ``values`` (name -> (prompts, M)) over ALL n-subsets: an
    unbiased estimate of its mean under best-of-n. With ``answers`` (prompts, M; equal entries = the
    same answer), ``kl`` is the KL of best-of-n to the policy computed on the samples' own distribution
    (each distinct answer weighted by its frequency), averaged over prompts. Returns name -> (len(ns),).
    """
    scores = np.asarray(scores, dtype=float)
    n_prompts, m = scores.shape
    order = np.argsort(scores, axis=1, kind="stable")                         # (prompts, M), ascending
    log_factorial = np.concatenate([[0.0], np.log(np.arange(1, m + 1)).cumsum()])
    log_comb = lambda a, b: log_factorial[a] - log_factorial[b] - log_factorial[a - b]  # noqa: E731
    result = {name: [] for name in values} | ({"kl": []} if answers is not None else {})
    for n in ns:
        if not 1 <= n <= m:
            raise ValueError(f"n must be between 1 and the {m} samples per prompt, got {n}")
        weight = np.array([np.exp(log_comb(k - 1, n - 1) - log_comb(m, n)) if k >= n else 0.0
                           for k in range(1, m + 1)])                          # (M,), sums to 1
        for name, value in values.items():
            ranked = np.take_along_axis(np.asarray(value, dtype=float), order, axis=1)
            result[name].append(float((ranked @ weight).mean()))
        if answers is not None:
            kls = []
            for row in range(n_prompts):
                first_seen = {}
                for i in order[row]:                 # distinct answers, by score, each with its frequency
                    first_seen[answers[row][i]] = first_seen.get(answers[row][i], 0) + 1
                p = np.array(list(first_seen.values())) / m
                upper = np.minimum(p.cumsum(), 1.0)
                q = upper ** n - (upper - p).clip(min=0) ** n               # best-of-n's probability of each
                kls.append(float((q * np.log(np.where(q > 0, q / p, 1.0))).sum()))
            result["kl"].append(float(np.mean(kls)))
    return {name: np.array(v) for name, v in result.items()}


def group_advantages(rewards, method: str, eps: float = 1e-4):
    """One advantage per response from the G rewards of its group: ``rewards`` (prompts, G) -> (prompts, G).

    ``grpo``: (r - mean) / (std + eps), std with Bessel's correction (as TRL); ``dr_grpo``: r - mean;
    ``rloo``: r minus the mean of the OTHER G - 1 rewards, which is G / (G - 1) * (r - mean).
    """
    group_size = rewards.shape[1]
    if group_size < 2:
        raise ValueError(f"a group needs at least 2 responses, got {group_size}")
    centred = rewards - rewards.mean(1, keepdim=True)
    if method == "grpo":
        return centred / (rewards.std(1, keepdim=True) + eps)
    if method == "dr_grpo":
        return centred
    if method == "rloo":
        return rewards - (rewards.sum(1, keepdim=True) - rewards) / (group_size - 1)
    raise ValueError(f"method must be one of {ADVANTAGES}, got {method!r}")


ADVANTAGES = ("grpo", "dr_grpo", "rloo")
AGGREGATIONS = ("sequence", "token", "constant")


def aggregate_tokens(per_token, mask, aggregation: str, max_length: int):
    """Reduce a per-token loss (batch, T) to one number, as the methods differ:

    ``sequence``: each response's mean over its own |o_i| tokens, then the mean over responses (GRPO);
    ``token``: the sum over every token of the batch / their number (DAPO);
    ``constant``: the sum over every token / (batch * max_length), a divisor that no length changes (Dr. GRPO).
    """
    mask = mask.to(per_token.dtype)
    total = per_token * mask
    if aggregation == "sequence":
        return (total.sum(1) / mask.sum(1).clamp(min=1)).mean()
    if aggregation == "token":
        return total.sum() / mask.sum().clamp(min=1)
    if aggregation == "constant":
        return total.sum() / (len(mask) * max_length)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


@dataclass
class CriticFreeConfig:
    """The hyperparameters of RLOO, GRPO and Dr. GRPO (``critic_free_method`` gives each its defaults)."""

    advantage: str = "grpo"       # "grpo" | "dr_grpo" | "rloo" (group_advantages)
    aggregation: str = "sequence"  # "sequence" (GRPO) | "token" (DAPO) | "constant" (Dr. GRPO, RLOO)
    group_size: int = 8           # G responses per prompt
    prompts_per_iteration: int = 8  # 8 prompts x 8 responses = 64 responses, PPO's 64 x 1
    max_new_tokens: int = 20      # also the constant aggregation's max_length
    epochs: int = 2               # passes over each rollout batch
    minibatch_size: int = 32      # responses per gradient step
    lr: float = 3e-4              # Adam learning rate
    clip_range: float = 0.2       # epsilon of the clipped surrogate
    beta: float = 0.0             # KL coefficient
    kl_in_reward: bool = False    # False: beta * exact KL per token in the loss, aggregated like the surrogate;
    #                               True: reward = score - beta * sum_t (log pi - log pi_ref), as RLOO and PPO
    temperature: float = 1.0
    max_grad_norm: float = 1.0

    def validate(self) -> None:
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"advantage must be one of {ADVANTAGES}, got {self.advantage!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        check_param("group_size", self.group_size, low=2, integer=True)
        for name in ("prompts_per_iteration", "max_new_tokens", "epochs", "minibatch_size"):
            check_param(name, getattr(self, name), low=1, integer=True)
        for name in ("lr", "clip_range", "temperature", "max_grad_norm"):
            check_param(name, getattr(self, name), low=0, low_open=True)
        check_param("beta", self.beta, low=0)


def critic_free_method(name: str, **overrides) -> CriticFreeConfig:
    """The config of ``grpo`` (normalised advantage, per-sequence mean, KL in the loss), ``dr_grpo``
    (r - mean, constant divisor, KL in the loss) or ``rloo`` (leave-one-out, constant divisor, KL in the reward)."""
    defaults = {"grpo": dict(advantage="grpo", aggregation="sequence"),
                "dr_grpo": dict(advantage="dr_grpo", aggregation="constant"),
                "rloo": dict(advantage="rloo", aggregation="constant", kl_in_reward=True)}
    if name not in defaults:
        raise ValueError(f"method must be one of {tuple(defaults)}, got {name!r}")
    config = CriticFreeConfig(**{**defaults[name], **overrides})
    config.validate()
    return config


def critic_free_loss(new_logprobs, old_logprobs, advantages, mask, config: CriticFreeConfig, kl_per_token=None):
    """The GRPO family's loss: the clipped surrogate with ONE advantage per response, ``advantages`` (batch,),
    on each of its tokens, plus ``config.beta`` times the per-token KL when given, both aggregated by
    ``config.aggregation``. Returns the loss and a dict of diagnostics (floats)."""
    ratio = torch.exp(new_logprobs - old_logprobs)                             # (B, T)
    advantage = advantages.unsqueeze(1)                                        # (B, 1), the same on every token
    surrogate = torch.min(ratio * advantage, ratio.clamp(1 - config.clip_range, 1 + config.clip_range) * advantage)
    per_token = -surrogate if kl_per_token is None else -surrogate + config.beta * kl_per_token
    loss = aggregate_tokens(per_token, mask, config.aggregation, config.max_new_tokens)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean(((ratio - 1).abs() > config.clip_range).float(), mask).item(),
                 "approx_kl": masked_mean(ratio - 1 - (new_logprobs - old_logprobs), mask).item()}
    return loss, stats


# Like METRIC_COLUMNS: row 0 is the SFT model, EVAL_COLUMNS evaluate the policy after the iteration's update,
# the rest describe the iteration's training batch (sampled before the update) and its update (NaN in row 0).
CRITIC_FREE_TRAIN_COLUMNS = ("reward", "reward_std", "equal_reward_groups", "rollout_kl", "length_positive_advantage",
                             "length_negative_advantage", "clipfrac", "entropy", "seconds")
CRITIC_FREE_COLUMNS = ("iteration",) + EVAL_COLUMNS + CRITIC_FREE_TRAIN_COLUMNS


def critic_free_rollout(policy, ref_lm, tokenizer, reward_fn, prompts, config: CriticFreeConfig) -> dict:
    """G responses for each prompt, sampled as ONE batch, scored by ``reward_fn`` (texts -> (batch,)), the old
    and reference log-probabilities, and one group advantage per response. Returns a dict of tensors."""
    device = next(policy.parameters()).device
    T, G = config.temperature, config.group_size
    rollout = generate_responses(policy, tokenizer, [p for p in prompts for _ in range(G)], config.max_new_tokens,
                                 temperature=T)
    ids = (rollout["query_ids"], rollout["query_mask"], rollout["response_ids"], rollout["response_mask"])
    mask = rollout["response_mask"]                                          # (B, T), B = prompts * G
    with torch.no_grad():
        scores = reward_fn(rollout["texts"]).to(device).float()             # (B,)
        old_logprobs, _ = sampled_logprobs_and_entropy(
            response_log_distribution(policy, *ids, temperature=T)[0], ids[2])
        ref_log_probs, _ = response_log_distribution(ref_lm, *ids, temperature=T)  # (B, T, vocab)
        ref_logprobs, _ = sampled_logprobs_and_entropy(ref_log_probs, ids[2])
        kl = ((old_logprobs - ref_logprobs) * mask).sum(1)                    # (B,) k1 per response
        rewards = scores - config.beta * kl if config.kl_in_reward else scores
        advantages = group_advantages(rewards.view(-1, G), config.advantage).view(-1)  # (B,)
    batch = {"query_ids": ids[0], "query_mask": ids[1], "response_ids": ids[2], "response_mask": mask,
             "old_logprobs": old_logprobs, "advantages": advantages, "scores": scores, "kl": kl,
             "rewards": rewards}
    if config.beta > 0 and not config.kl_in_reward:
        batch["ref_log_probs"] = ref_log_probs                               # for the exact KL in the loss
    return batch


def critic_free_update(policy, optimizer, batch: dict, config: CriticFreeConfig, where: str = "") -> list:
    """``config.epochs`` passes of shuffled minibatch steps on one rollout batch; returns each step's diagnostics."""
    n_rows = len(batch["response_ids"])
    stats_log = []
    for epoch in range(config.epochs):
        order = torch.randperm(n_rows).to(batch["response_ids"].device)
        for start in range(0, n_rows, config.minibatch_size):
            mb = {name: value[order[start:start + config.minibatch_size]] for name, value in batch.items()}
            log_probs, _ = response_log_distribution(policy, mb["query_ids"], mb["query_mask"], mb["response_ids"],
                                                     mb["response_mask"], temperature=config.temperature)
            new_logprobs, entropy = sampled_logprobs_and_entropy(log_probs, mb["response_ids"])
            kl_per_token = (exact_kl(log_probs, mb["ref_log_probs"], mb["response_mask"])
                            if "ref_log_probs" in mb else None)
            loss, stats = critic_free_loss(new_logprobs, mb["old_logprobs"], mb["advantages"], mb["response_mask"],
                                           config, kl_per_token)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} ({where + ', ' if where else ''}epoch {epoch}): "
                                         "lower lr or check the rewards")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
            optimizer.step()
            stats_log.append({**stats, "entropy": masked_mean(entropy.detach(), mb["response_mask"]).item()})
    return stats_log


def gold_positive_reward(texts):
    """A verifiable reward: 1 when the gold labeller calls the text positive, else 0, (batch,) float32."""
    return torch.tensor([label == "positive" for label in gold_labels(texts)], dtype=torch.float32)


def train_critic_free(policy, ref_lm, tokenizer, reward_fn, config: CriticFreeConfig, n_iterations: int,
                      train_prompts, eval_prompts, run_name: str, run_dir: Path | str, eval_reward_model,
                      seed: int = 0, eval_samples_per_prompt: int = 16, progress: bool = True,
                      gold_labeller=gold_labels):
    """RLOO / GRPO / Dr. GRPO: one CSV row of ``CRITIC_FREE_COLUMNS`` per iteration in ``run_dir/run_name.csv``.

    ``policy`` is a plain causal LM: no value head. Row 0 evaluates the SFT model; every row's EVAL_COLUMNS
    evaluate the policy after that iteration's update on ``eval_prompts``, scored by ``eval_reward_model``
    (whatever ``reward_fn`` trains on), as ``train_ppo`` does. Returns the rows (dicts).
    """
    config.validate()
    check_param("n_iterations", n_iterations, low=1, integer=True)
    check_policy_and_reference(policy, ref_lm)
    run_path = run_csv_path(run_dir, run_name)
    set_seed(seed)
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr, fused=True)
    policy.eval()
    ref_lm.eval().requires_grad_(False)
    rng = np.random.default_rng(seed)
    train_prompts, rows = list(train_prompts), []
    with open(run_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CRITIC_FREE_COLUMNS)
        writer.writeheader()
        for iteration in progress_bar(range(n_iterations + 1), progress, run_name):
            row = {"iteration": iteration, **dict.fromkeys(CRITIC_FREE_TRAIN_COLUMNS, float("nan"))}
            if iteration > 0:
                start = time.perf_counter()
                prompts = [train_prompts[i] for i in rng.integers(len(train_prompts), size=config.prompts_per_iteration)]
                batch = critic_free_rollout(policy, ref_lm, tokenizer, reward_fn, prompts, config)
                stats_log = critic_free_update(policy, optimizer, batch, config, where=f"iteration {iteration}")
                lengths, advantages = batch["response_mask"].sum(1).float(), batch["advantages"]
                groups = batch["rewards"].view(-1, config.group_size)
                row.update({
                    "reward": batch["scores"].mean().item(), "reward_std": groups.std(1).mean().item(),
                    "equal_reward_groups": (groups == groups[:, :1]).all(1).float().mean().item(),
                    "rollout_kl": batch["kl"].mean().item(),
                    "length_positive_advantage": lengths[advantages > 0].mean().item(),
                    "length_negative_advantage": lengths[advantages < 0].mean().item(),
                    "clipfrac": float(np.mean([s["clipfrac"] for s in stats_log])),
                    "entropy": float(np.mean([s["entropy"] for s in stats_log])),
                    "seconds": time.perf_counter() - start})
            evaluation = evaluate_policy(policy, tokenizer, eval_reward_model, eval_prompts, eval_samples_per_prompt,
                                         config.max_new_tokens, seed=seed + 1000 + iteration,
                                         temperature=config.temperature, reference=ref_lm, gold_labeller=gold_labeller)
            row.update({column: evaluation[column] for column in EVAL_COLUMNS})
            writer.writerow(row)
            f.flush()
            rows.append(row)
    return rows
