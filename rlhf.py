"""RLHF algorithms on top of the small-LLM lab: PPO today, the critic-free methods beside it.

llm_ppo.ipynb walks through every PPO piece below, shows its source (``utils.show_source``) and
checks it; llm_ppo_correct_dropout.ipynb runs the same code, so the notebooks cannot drift apart.

Sections
--------
1. Config and the policy with a value head (``PPOConfig``, ``PolicyWithValueHead``).
2. The pieces of one PPO iteration: log-probs (``response_logprobs``), per-token rewards with the KL
   penalty (``token_rewards``), GAE (``compute_gae``), the clipped loss (``ppo_loss``), the KL
   controller, diagnostics.
3. Evaluation on held-out prompts (``evaluate_policy``).
4. The loop: ``ppo_rollout``, ``ppo_update``, ``ppo_optimizer``, ``train_ppo``, ``read_run``.

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

from llm_lab import (context_length, generate_responses, gold_labels, join_prompt_response,
                     position_ids_from_mask)
from utils import check_param, progress_bar, set_seed


# ---------------------------------------------------------------------------
# 1. Config and the policy with a value head
# ---------------------------------------------------------------------------

METRIC_COLUMNS = ("iteration", "score", "p_positive", "ref_score", "ref_p_positive", "kl", "entropy", "clipfrac",
                  "approx_kl", "value_loss", "explained_variance", "response_length", "seconds")


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


def response_logprobs(model, query_ids, query_mask, response_ids, response_mask, with_values: bool = False):
    """Log-probabilities of the response tokens, their entropies and (optionally) values, in ONE forward pass.

    Sequence = prompt (left padded, length P) + response (length T). The token
    at position P + t is predicted by the logits at position P + t - 1, and
    V(s_t), the value *before* token t is generated, is read there too.
    Returns logprobs, entropy, values: each (batch, T).
    """
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


# ---------------------------------------------------------------------------
# 3. Evaluation on held-out prompts
# ---------------------------------------------------------------------------

def evaluate_policy(lm, tokenizer, reward_model, prompts, samples_per_prompt: int, max_new_tokens: int,
                    seed: int, dropout: bool = False):
    """Mean reward-model score and gold share of positive reviews on sampled responses to ``prompts``.

    Returns them with the texts, their gold labels and the ``generate_responses`` dict (token ids and
    masks, for callers that measure more on the same samples). Uses its own random stream
    (``fork_rng``), so evaluating does not change the training run's samples.
    """
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
        for iteration in progress_bar(range(1, n_iterations + 1), progress, run_name):
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
