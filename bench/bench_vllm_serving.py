"""Serving through vLLM with and without the AutoSelect plugin: one batch of Qwen2.5-VL requests with
images of mixed sizes, timed end to end (requests/s) and to the first token of every request.

    python bench/bench_vllm_serving.py [--out bench/results/vllm-serving-cpu.json] [--requests 16]

Needs vLLM (run it with the interpreter of the environment ``.ci/vllm_env.sh`` builds,
``.venv-vllm/bin/python``). The model is a random-weight Qwen2.5-VL saved on the spot (timing needs no
trained weights): text width 512, 8 layers, head dim 64; vision tower width 128, 4 blocks; a
Scorer of width 128 with one block. The batch: ``--requests`` requests, image i with
N_i = 16 .. 256 merged tokens (different sizes), prompts of 10-120 text tokens.

Contenders, one ``vllm.LLM`` each, started one after the other (same settings, float32, eager):
  * ``in-tree``: vLLM's own Qwen2.5-VL, every token (the baseline);
  * ``plugin r=1``: the plugin keeping every token (it then takes vLLM's own path: no selection, no
    fingerprints; any difference to in-tree is the plugin's bookkeeping or noise);
  * ``plugin r``: the plugin at each ``--keep-ratios`` value.
Measured per contender, after one untimed warm-up batch, as the median of ``--repeats`` batches (each
with pictures of its own, prefix caching off, so no batch reuses another's work):
``generate`` of the whole batch with ``--max-tokens`` greedy tokens (requests/s, output tokens/s) and
with one token (batch TTFT: all requests' first tokens). Benchmarks state numbers, they assert nothing.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # tiny_checkpoints: saved models


def build_checkpoint(directory: str) -> str:
    import torch
    from tiny_checkpoints import save_qwen2_5_vl

    from autoselect_fast.modules import Scorer, ScorerConfig

    save_qwen2_5_vl(directory, min_pixels=28 * 28 * 16, max_pixels=28 * 28 * 256, for_vllm=True,
                    text_overrides=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                                        num_key_value_heads=4, max_position_embeddings=4096,
                                        rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}),
                    vision_overrides=dict(hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=512))
    torch.manual_seed(1)
    Scorer(ScorerConfig(input_dim=4 * 128, hidden_dim=128, num_layers=1, num_heads=4)).save_pretrained(os.path.join(directory, "scorer"))
    return directory


def make_batch(count: int, seed: int = 0) -> list[dict]:
    import numpy as np
    from PIL import Image

    shapes = np.random.RandomState(0)  # sizes and prompt words: the same in every batch
    pixels = np.random.RandomState(1000 + seed)  # the pictures: new in every batch
    batch = []
    for i in range(count):
        groups = round(16 + (256 - 16) * i / max(1, count - 1))  # N_i from 16 to 256 merged tokens
        rows = max(2, int(groups**0.5))
        cols = max(2, groups // rows)
        picture = Image.fromarray(pixels.randint(0, 256, (rows * 28, cols * 28, 3), dtype=np.uint8))
        words = " ".join(f"w{w}" for w in shapes.randint(0, 80, size=10 + (110 * i) // max(1, count - 1)))
        text = f"<|im_start|> user <|vision_start|><|image_pad|><|vision_end|> {words} <|im_end|> <|im_start|> assistant"
        batch.append({"prompt": text, "multi_modal_data": {"image": picture}})
    return batch


def time_contender(checkpoint: str, hf_overrides, args) -> dict:
    """Every timed batch has pictures of its own (seeded, the same for every contender) and prefix
    caching is off: nothing a previous batch computed (KV blocks, encoder outputs) can be reused."""
    import vllm

    llm = vllm.LLM(model=checkpoint, enforce_eager=True, dtype="float32", max_model_len=2048, max_num_seqs=args.requests,
                   seed=0, enable_prefix_caching=False, limit_mm_per_prompt={"image": 1, "video": 0},
                   **({"hf_overrides": hf_overrides} if hf_overrides else {}))
    full = vllm.SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    first = vllm.SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    try:
        warm = llm.generate(make_batch(args.requests, seed=0), full, use_tqdm=False)
        prompt_tokens = sum(len(o.prompt_token_ids) for o in warm)
        generate_s, ttft_s = [], []
        for rep in range(args.repeats):
            ttft_batch, full_batch = make_batch(args.requests, seed=2 * rep + 1), make_batch(args.requests, seed=2 * rep + 2)
            t0 = time.perf_counter()
            llm.generate(ttft_batch, first, use_tqdm=False)
            ttft_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            outs = llm.generate(full_batch, full, use_tqdm=False)
            generate_s.append(time.perf_counter() - t0)
        assert all(len(o.outputs[0].token_ids) == args.max_tokens for o in outs)
    finally:
        del llm
        gc.collect()
    g, t = statistics.median(generate_s), statistics.median(ttft_s)
    return {"prompt_tokens": prompt_tokens, "generate_s": generate_s, "ttft_s": ttft_s, "generate_median_s": g, "ttft_median_s": t,
            "requests_per_s": args.requests / g, "output_tokens_per_s": args.requests * args.max_tokens / g}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("bench", "out", "vllm-serving.json"), help="JSON output path")
    parser.add_argument("--requests", type=int, default=16, help="requests in the batch")
    parser.add_argument("--max-tokens", type=int, default=16, help="greedy tokens per request in the throughput run")
    parser.add_argument("--keep-ratios", type=float, nargs="+", default=[2 / 9, 1 / 9], help="plugin budgets timed besides r = 1")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per contender (median)")
    args = parser.parse_args(argv)

    import torch
    import vllm

    from autoselect_fast.timing import environment
    from autoselect_fast.vllm_plugin import ARCHITECTURE

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_checkpoint(tmp)
        plugin = {"architectures": [ARCHITECTURE], "autoselect_scorer": os.path.join(checkpoint, "scorer")}
        contenders = [("in-tree", None), ("plugin r=1", {**plugin, "autoselect_keep_ratio": 1.0})]
        contenders += [(f"plugin r={r:.3f}", {**plugin, "autoselect_keep_ratio": r}) for r in args.keep_ratios]
        rows = []
        for name, hf in contenders:
            print(f"== {name}", flush=True)
            rows.append({"contender": name, **time_contender(checkpoint, hf, args)})
    base = rows[0]
    env = environment("cuda" if torch.cuda.is_available() else "cpu")  # where vLLM ran: its GPU when torch sees one
    print(f"\n{args.requests} requests, {args.max_tokens} greedy tokens each, vLLM {vllm.__version__}, torch {torch.__version__}, "
          f"{env['device']}; median of {args.repeats} batches")
    print("| contender | prompt tokens | requests/s | output tokens/s | batch TTFT s | throughput × | TTFT × |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        row["throughput_speedup"] = row["requests_per_s"] / base["requests_per_s"]
        row["ttft_speedup"] = base["ttft_median_s"] / row["ttft_median_s"]
        print(f"| {row['contender']} | {row['prompt_tokens']:,} | {row['requests_per_s']:.2f} | {row['output_tokens_per_s']:.1f} | "
              f"{row['ttft_median_s']:.2f} | {row['throughput_speedup']:.2f}× | {row['ttft_speedup']:.2f}× |")
    report = {"benchmark": "vllm_serving", "vllm": vllm.__version__, "environment": env,
              "requests": args.requests, "max_tokens": args.max_tokens, "repeats": args.repeats, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
