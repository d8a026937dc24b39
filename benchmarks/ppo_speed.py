"""PPO iteration speed on the lab's GPT-2: batched (as in llm_ppo.ipynb) vs one prompt at a time.

Usage:  python benchmarks/ppo_speed.py [--iterations 5] [--device cpu|cuda]

Configuration of the course's target: 64 prompts x 20 new tokens, 4 epochs x 4 minibatches,
every update done (no approx-KL early stop). The one-at-a-time loop does the same algorithm with
the same number of optimizer steps, but generates, scores and back-propagates each sample alone,
the way the chapter's original notebooks did. It prints figures; it asserts nothing.
"""
import argparse
import copy
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import llm_lab as lab  # noqa: E402
import rlhf  # noqa: E402
import utils  # noqa: E402


def one_at_a_time_iteration(policy, reference, tokenizer, reward_model, config, optimizer, prompts):
    """The same PPO iteration, with every model call on a single sample."""
    samples = []
    for prompt in prompts:
        rollout = lab.generate_responses(policy.lm, tokenizer, [prompt], config.max_new_tokens)
        q, qm, r, rm = rollout["query_ids"], rollout["query_mask"], rollout["response_ids"], rollout["response_mask"]
        with torch.no_grad():
            score = reward_model(rollout["texts"])
            old_lp, _, old_v = rlhf.response_logprobs(policy, q, qm, r, rm, with_values=True)
            ref_lp, _, _ = rlhf.response_logprobs(reference, q, qm, r, rm)
            rewards, _ = rlhf.token_rewards(old_lp, ref_lp, score.to(old_lp.device), rm, config.beta)
            adv, ret = rlhf.compute_gae(rewards, old_v, rm, config.gamma, config.lam)
        samples.append((q, qm, r, rm, old_lp, old_v, adv, ret))
    # whiten over the batch, as the batched version does
    flat = torch.cat([s[6][s[3].bool()] for s in samples])
    mean, std = flat.mean(), flat.std(unbiased=False)
    samples = [(*s[:6], (s[6] - mean) / (std + 1e-8) * s[3], s[7]) for s in samples]
    tokens = sum(int(s[3].sum()) for s in samples)
    for _ in range(config.ppo_epochs):
        order = np.random.permutation(len(samples))
        for start in range(0, len(samples), config.minibatch_size):
            optimizer.zero_grad(set_to_none=True)
            chunk = order[start:start + config.minibatch_size]
            for i in chunk:  # gradient accumulation, one sample at a time
                q, qm, r, rm, old_lp, old_v, adv, ret = samples[i]
                new_lp, ent, new_v = rlhf.response_logprobs(policy, q, qm, r, rm, with_values=True)
                loss, _ = rlhf.ppo_loss(new_lp, old_lp, adv, new_v, old_v, ret, ent, rm, config)
                (loss / len(chunk)).backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
            optimizer.step()
    return tokens


def batched_iteration(policy, reference, tokenizer, reward_model, config, optimizer, prompts):
    """One iteration of rlhf.train_ppo, the very functions the notebooks run: rollout batch, then updates."""
    batch = rlhf.ppo_rollout(policy, reference, tokenizer, reward_model, prompts, config, config.beta)
    rlhf.ppo_update(policy, optimizer, batch, config, config.beta)
    return int(batch["response_mask"].sum())


def measure(kind, iteration_fn, sft, tokenizer, reward_model, config, n_iterations, device):
    utils.set_seed(0)
    policy = rlhf.PolicyWithValueHead(copy.deepcopy(sft)).eval()
    reference = copy.deepcopy(sft).eval().requires_grad_(False)
    optimizer = rlhf.ppo_optimizer(policy, config)
    openings = lab.train_openings()
    rng = np.random.default_rng(0)
    times, tokens = [], []
    for i in range(n_iterations + 1):  # the first iteration warms up (allocations, lazy imports)
        prompts = [openings[j] for j in rng.integers(len(openings), size=config.batch_size)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        n_tokens = iteration_fn(policy, reference, tokenizer, reward_model, config, optimizer, prompts)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - start)
            tokens.append(n_tokens)
    seconds = float(np.median(times))
    # iterations differ in their sampled responses; a repeated run computes exactly the same numbers, so a
    # difference between two runs of this script comes from the machine, not the code
    print(f"{kind:>16}: {seconds:7.3f} s per iteration (median of {n_iterations}; fastest {min(times):.3f}, "
          f"slowest {max(times):.3f}), {np.mean(tokens) / seconds:8.0f} sampled tokens/s")
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else utils.get_device()
    sft, tokenizer, _ = lab.load_sft_model(progress=False, device=device)
    reward_model = lab.load_reward_model("lab", device=device, progress=False)
    config = rlhf.PPOConfig(batch_size=64, max_new_tokens=20, ppo_epochs=4, minibatch_size=16, early_stop_kl=None)
    print(f"device {device.type}, torch threads {torch.get_num_threads()}, "
          f"{config.batch_size} prompts x {config.max_new_tokens} new tokens, "
          f"{config.ppo_epochs} epochs x {config.batch_size // config.minibatch_size} minibatches")
    batched = measure("batched", batched_iteration, sft, tokenizer, reward_model, config, args.iterations, device)
    single = measure("one at a time", one_at_a_time_iteration, sft, tokenizer, reward_model, config,
                     max(1, args.iterations // 2), device)
    print(f"speed-up of the batched version: {single / batched:.1f}x")


if __name__ == "__main__":
    main()
