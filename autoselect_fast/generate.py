"""``autoselect-fast generate``: answer a question about an image with a local checkpoint and a Scorer.

Loads a transformers VLM saved on disk (LLaVA-1.5, LLaVA-NeXT, or any model with an adapter in
``autoselect_fast.models``) with its processor, puts the question through the processor's chat
template, and runs the engine's pruned prefill plus greedy decoding. Prints the answer, how many
visual tokens were kept and the time of each stage; ``full=True`` also answers with every visual
token through the same engine path, for comparison. All inputs are checked before any weight is
loaded (``autoselect_fast.local_checkpoint``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

from .engine import AutoSelectEngine, Request
from .local_checkpoint import check_inputs
from .validation import DTYPES


@dataclass
class GenerateSettings:
    model: str
    scorer: str
    image: str
    prompt: str
    keep: Optional[int] = None
    keep_ratio: Optional[float] = None
    full: bool = False
    max_new_tokens: int = 32
    device: torch.device = torch.device("cpu")
    dtype: str = "fp32"
    progress: bool = True


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _answer(engine: AutoSelectEngine, request: Request, settings: GenerateSettings, eos: list[int], tokenizer) -> dict:
    engine.prefill([request])  # warm-up: first calls allocate and pick kernels; also fills the score cache
    engine.clear_score_cache()
    start = time.perf_counter()
    out = engine.generate([request], max_new_tokens=settings.max_new_tokens, eos_token_id=eos or None, timings=True)
    wall_ms = (time.perf_counter() - start) * 1e3
    tokens, prefill = out.token_ids[0], out.prefill
    stages = dict(prefill.timings_ms)
    return {
        "answer": tokenizer.decode(tokens, skip_special_tokens=True),
        "token_ids": tokens,
        "kept_tokens": prefill.kept_tokens[0],
        "visual_tokens": prefill.visual_tokens[0],
        "sequence_length": prefill.sequence_lengths[0],
        "timings_ms": {**stages, "ttft": stages["total"], "rest": wall_ms - stages["total"], "wall": wall_ms},
    }


def _print_answer(label: str, result: dict, progress: bool) -> None:
    t = result["timings_ms"]
    n_new = len(result["token_ids"])
    print(f"{label}: {result['answer']!r}")
    print(f"  kept {result['kept_tokens']} of {result['visual_tokens']} visual tokens; LLM prefill over {result['sequence_length']} tokens")
    print(
        f"  ms: vision {t['vision']:.1f} | pruning {t['prune']:.1f} | pack {t['pack']:.1f} | LLM prefill {t['prefill']:.1f} "
        f"| TTFT {t['ttft']:.1f} | prompt preparation + decoding of {n_new} token(s) {t['rest']:.1f} | total {t['wall']:.1f}"
    )


def run_generate(settings: GenerateSettings) -> dict:
    """Check inputs, load, answer (pruned, and unpruned with ``full``); prints as it goes, returns the figures."""
    say = print if settings.progress else (lambda *a, **k: None)
    checked = check_inputs(settings.model, settings.scorer, settings.image, settings.keep, settings.keep_ratio)
    checkpoint, scorer, image, num_tokens, keep = checked.checkpoint, checked.scorer, checked.image, checked.num_tokens, checked.keep
    prompt = checkpoint.chat_prompt(settings.prompt)
    dtype = DTYPES[settings.dtype]
    say(f"[1/3] checked: {checkpoint.model_class.__name__}, image {image.width}x{image.height} -> N = {num_tokens} visual tokens, "
        f"keep K = {keep}, Scorer width {scorer.config.hidden_dim} x {scorer.config.num_layers} blocks")

    say("[2/3] loading")
    model = checkpoint.load_model(settings.device, dtype, progress=settings.progress)
    scorer = scorer.to(device=settings.device, dtype=dtype)
    eos = _eos_ids(model, checkpoint.tokenizer)
    request = Request(prompt, image=image, image_id=settings.image)
    common = dict(image_processor=checkpoint.image_processor, tokenizer=checkpoint.tokenizer)

    say(f"[3/3] generating up to {settings.max_new_tokens} token(s), greedy, after one warm-up prefill (single timed runs)")
    result = {"model": settings.model, "scorer": settings.scorer, "image": settings.image, "prompt": prompt,
              "device": str(settings.device), "dtype": settings.dtype, "visual_tokens": num_tokens, "keep": keep}
    engine = AutoSelectEngine(model, scorer, keep=keep, **common)
    result["pruned"] = _answer(engine, request, settings, eos, checkpoint.tokenizer)
    _print_answer(f"answer (K = {keep})", result["pruned"], settings.progress)
    if settings.full:
        full_engine = AutoSelectEngine(model, scorer, keep=None, **common)
        result["full"] = _answer(full_engine, request, settings, eos, checkpoint.tokenizer)
        _print_answer(f"answer (all {num_tokens} tokens)", result["full"], settings.progress)
        same = result["full"]["token_ids"] == result["pruned"]["token_ids"]
        speedup = result["full"]["timings_ms"]["ttft"] / result["pruned"]["timings_ms"]["ttft"]
        print(f"pruned and full answers are {'identical' if same else 'different'}; TTFT full / pruned = {speedup:.2f}x (single runs)")
    return result
