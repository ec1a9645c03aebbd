"""The ``decode`` scenario: tokens per second of the engine's ``generate`` against transformers'
``generate`` on the same requests, greedy, with the same number of new tokens and no stop token (the
engine gets none; transformers' end-of-sequence token is held back with ``min_new_tokens``).

Decoding speed is taken apart from the prefill: each round times ``generate`` with one new token and
with ``n`` new tokens; decode tokens/s is ``batch * (n - 1)`` over the difference of their medians.
The configurations are timed interleaved, in an order that turns each round, as the prefill scenarios are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..engine import Request
from ..timing import Stopwatch, is_noisy, summarize, turning_order
from .contenders import BASELINE, BenchSetup, Keep
from .model_inputs import model_inputs
from .render import keep_label
from .settings import ReportSettings
from .workloads import synthetic_requests


@dataclass
class Decoder:
    """One way of generating: ``generate(n)`` returns exactly ``n`` new token ids per request."""

    name: str
    keep: Keep
    generate: Callable[[int], list[list[int]]]


def transformers_decoder(setup: BenchSetup, requests: list[Request]) -> Decoder:
    """The unmodified model's ``generate`` (its own padded batch and KV cache, every visual token)."""
    from transformers import GenerationConfig

    inputs = model_inputs(setup.engine.adapter, setup.engine.prepare(requests))
    inputs.pop("position_ids", None)  # generate derives them from the attention mask
    prompt_length = inputs["input_ids"].shape[1]
    pad = setup.model.config.get_text_config().pad_token_id or 0

    @torch.inference_mode()
    def generate(n: int) -> list[list[int]]:
        config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)
        out = setup.model.generate(**inputs, generation_config=config)
        return out[:, prompt_length:].tolist()

    return Decoder(BASELINE, None, generate)


def engine_decoder(setup: BenchSetup, requests: list[Request], keep: Keep) -> Decoder:
    """``AutoSelectEngine.generate`` at ``keep`` (no stop token: every request gets ``n`` tokens)."""
    engine = setup.engine_for(keep)

    def generate(n: int) -> list[list[int]]:
        return engine.generate(requests, max_new_tokens=n).token_ids

    return Decoder("engine", keep, generate)


def run_decode(setup: BenchSetup, batch: int, keeps: list[int], settings: ReportSettings, bar) -> dict:
    """Tokens per second of transformers' ``generate``, the engine's with every token and at the
    smallest K, on ``batch`` requests of the preset's prompt shape.

    Per configuration: ``one_token_ms`` and ``all_tokens_ms`` (``generate`` of 1 and of ``n`` new
    tokens, median [min-max]); ``decode_tokens_per_s`` = ``batch * (n - 1)`` over the difference of
    their medians, ``None`` when that difference is not positive (decoding hidden in the noise: more
    ``decode_tokens`` or repeats); ``generate_tokens_per_s`` = ``batch * n`` over ``all_tokens_ms``,
    the prefill included.
    """
    requests = synthetic_requests(setup.engine, setup.preset, batch)
    n = settings.decode_tokens
    decoders = [transformers_decoder(setup, requests), engine_decoder(setup, requests, None)]
    if keeps:
        decoders.append(engine_decoder(setup, requests, min(keeps)))
    samples = [{"one": [], "all": []} for _ in decoders]
    tokens: list[list[list[int]]] = [[] for _ in decoders]
    for round_ in range(settings.warmup + settings.repeats):
        for i in turning_order(len(decoders), round_):  # as in the prefill scenarios
            d, store = decoders[i], samples[i]
            bar.set_postfix_str(f"decode batch {batch}: {d.name} {keep_label(d.keep)}")
            clock = Stopwatch(setup.device)
            with clock.stage("one"):
                d.generate(1)
            with clock.stage("all"):
                tokens[i] = d.generate(n)
            if any(len(t) != n for t in tokens[i]):
                raise RuntimeError(f"{d.name} generated {[len(t) for t in tokens[i]]} tokens per request, asked for {n}")
            if round_ >= settings.warmup:
                for key in store:
                    store[key].append(clock.ms[key])
            bar.update(1)
    rows = []
    for d, store, out in zip(decoders, samples, tokens):
        one, every = summarize(store["one"]), summarize(store["all"])
        decode_ms = every["median_ms"] - one["median_ms"]
        row = {
            "contender": d.name,
            "keep": d.keep,
            "one_token_ms": one,
            "all_tokens_ms": every,
            "decode_tokens_per_s": batch * (n - 1) * 1e3 / decode_ms if decode_ms > 0 else None,
            "generate_tokens_per_s": batch * n * 1e3 / every["median_ms"],
            "noisy": [key for key, t in (("one_token_ms", one), ("all_tokens_ms", every)) if is_noisy(t)],
        }
        if d.keep is None and d.name != BASELINE:  # every token kept: greedy tokens comparable with the baseline's
            row["same_tokens_as_baseline"] = out == tokens[0]
        rows.append(row)
    return {
        "name": "decode",
        "batch": batch,
        "new_tokens": n,
        "description": f"{batch} request(s) of the preset's prompt, {n} new tokens each, greedy, no stop token; "
                       f"decode tokens/s = batch x {n - 1} / (generate of {n} tokens - generate of 1)",
        "rows": rows,
    }
