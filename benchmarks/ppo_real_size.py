"""What PPO costs at the size of a real GPT-2: seconds per iteration and peak memory.

The hub is out of reach here, so the policy is built locally with GPT-2 small's configuration
(12 layers, width 768, 12 heads, context 1024, the 50,257-token vocabulary; about 124 M parameters)
and random weights: the cost of an iteration does not depend on what the weights have learned,
only on their shapes (the responses always run to the length cap here, the worst case). The reward
model is a DistilBERT-sized classifier (6 layers, width 768) with its own WordPiece tokenizer. Both go
through the course's real path (`save_pretrained`, then `lab.load_policy` / `lab.load_reward_model`)
and one PPO iteration is `rlhf.ppo_rollout` + `rlhf.ppo_update`, the code the notebooks run, with the
hub preset of llm_ppo.ipynb (lr 1.41e-5, temperature 0.7, 4 epochs, minibatches of 4 prompts).

Each batch size runs in a fresh process, so its peak memory (the maximum resident set) is its own:

    python benchmarks/ppo_real_size.py                      # 16 x 20 and 64 x 20 tokens
    python benchmarks/ppo_real_size.py --batch-sizes 16 --iterations 3
    python benchmarks/ppo_real_size.py --batch-sizes 16 --dtype bfloat16   # bfloat16 weights (GPU, or a CPU with AMX)
    python benchmarks/ppo_real_size.py --batch-sizes 16 --minibatch-size 16 # one Adam step per epoch

Prints figures; asserts nothing. Targets on the course's 2-core CPU: at most 10 s per iteration at
16 x 20 tokens, at most 4 GB peak.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def build_models(folder: Path) -> None:
    """GPT-2 small's shapes with a word-level tokenizer of exactly 50,257 tokens, and a DistilBERT-sized classifier."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    import llm_lab as lab
    from hub_stand_ins import save_bert_classifier

    words = ["<|endoftext|>"] + lab.lab_vocabulary()
    words += [f"w{i}" for i in range(50257 - len(words))]               # filler words up to GPT-2's vocabulary
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", model_max_length=1024)
    config = GPT2Config(vocab_size=len(words), n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder / "policy")
    tokenizer.save_pretrained(folder / "policy")
    save_bert_classifier(folder / "reward", hidden_size=768, n_layers=6)


def measure(folder: Path, batch_size: int, n_iterations: int, max_new_tokens: int, dtype: str,
            minibatch_size: int) -> dict:
    """Runs in its own process: load both models, then time PPO iterations (the first one warms up)."""
    import copy

    import numpy as np
    import torch

    import llm_lab as lab
    import rlhf

    device = lab.get_device()
    policy_lm, tokenizer = lab.load_policy(str(folder / "policy"), device=device, dtype=getattr(torch, dtype))
    reward_model = lab.load_reward_model(str(folder / "reward"), device=device, dtype=getattr(torch, dtype))
    # random weights rarely draw <eos>: every response runs to max_new_tokens, the most expensive case
    config = rlhf.PPOConfig(batch_size=batch_size, minibatch_size=minibatch_size, ppo_epochs=4, lr=1.41e-5, beta=0.2,
                            temperature=0.7, max_new_tokens=max_new_tokens, early_stop_kl=None)
    policy = rlhf.PolicyWithValueHead(copy.deepcopy(policy_lm)).eval()
    reference = policy_lm.eval().requires_grad_(False)
    optimizer = rlhf.ppo_optimizer(policy, config)
    prompts = list(lab.train_openings())
    rng = np.random.default_rng(0)
    times, lengths, updates = [], [], []
    for _ in range(n_iterations + 1):
        batch_prompts = [prompts[i] for i in rng.integers(len(prompts), size=batch_size)]
        start = time.perf_counter()
        batch = rlhf.ppo_rollout(policy, reference, tokenizer, reward_model, batch_prompts, config, config.beta)
        stats = rlhf.ppo_update(policy, optimizer, batch, config, config.beta)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        lengths.append(batch["response_mask"].sum(1).float().mean().item())
        updates.append(sum(s["applied"] for s in stats))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # Linux reports KiB
    result = {"batch_size": batch_size, "seconds": times[1:], "mean_response_tokens": float(np.mean(lengths)),
              "peak_rss_gb": peak_gb, "dtype": dtype, "updates": updates[-1], "device": device.type, "threads": torch.get_num_threads(),
              "parameters": sum(p.numel() for p in policy_lm.parameters())}
    if device.type == "cuda":
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1024 ** 3
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations after one warm-up")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--minibatch-size", type=int, default=4, help="rows per Adam step (the hub preset: 4)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        folder, batch_size = args._worker.split(",")
        print(json.dumps(measure(Path(folder), int(batch_size), args.iterations, args.max_new_tokens, args.dtype,
                                 args.minibatch_size)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        build_models(folder)
        print(f"built GPT-2-small-sized policy and DistilBERT-sized reward model in {time.perf_counter() - start:.0f} s")
        for batch_size in args.batch_sizes:
            out = subprocess.run([sys.executable, __file__, "--_worker", f"{folder},{batch_size}",
                                  "--iterations", str(args.iterations), "--max-new-tokens", str(args.max_new_tokens),
                                  "--dtype", args.dtype, "--minibatch-size", str(args.minibatch_size)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            seconds = r["seconds"]
            line = (f"{r['batch_size']:3d} prompts x {args.max_new_tokens} tokens on {r['device']} "
                    f"({r['threads']} threads, policy {r['parameters'] / 1e6:.0f} M parameters, {r['dtype']}, "
                    f"{r['updates']} Adam steps per iteration): "
                    f"{min(seconds):.1f}-{max(seconds):.1f} s per iteration over {len(seconds)} iterations "
                    f"(mean response {r['mean_response_tokens']:.1f} tokens), peak memory {r['peak_rss_gb']:.2f} GB")
            if "peak_cuda_gb" in r:
                line += f", peak GPU memory {r['peak_cuda_gb']:.2f} GB"
            print(line, flush=True)


if __name__ == "__main__":
    main()
