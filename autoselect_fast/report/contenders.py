"""The report's contenders: ways of getting first-token logits for the same requests, each timed
per stage.

* ``transformers`` — the **baseline**: the unmodified model, ``model(**inputs, logits_to_keep=1)``
  on the inputs its processor writes (:mod:`.model_inputs`), with its own attention implementation
  and left-padded batch, as ``generate`` runs its prefill; every visual token.
* ``peers`` — how research forks prune: vision, the same Scorer and selection (eager, no CUDA graphs),
  then the kept tokens through the model's language model as a right-padded ``inputs_embeds`` batch
  with explicit position ids and the model's own attention.
* ``engine`` — :class:`~autoselect_fast.engine.AutoSelectEngine`: packed varlen prefill of the kept
  tokens; with every token kept it checks that the engine's own path is as fast as transformers'.
* ``transformers + CUDA graph`` — a stronger baseline, CUDA only: the unmodified model on the baseline's
  inputs with its vision tower and its language model each replayed from one CUDA graph
  (:mod:`.graphed`: what is and is not inside the graphs); every visual token.

A contender that cannot run here raises :class:`ContenderUnavailable` when it is built (``transformers +
CUDA graph`` on a CPU, or when a capture fails): the scenario leaves it out and says why.

Stages (:data:`STAGES`): ``prepare`` (host preparation: prompt checks, placeholder expansion, position
ids), ``vision``, ``prune`` (Scorer + selection), ``pack`` (projector, embeddings, positions, packing
or padding), ``prefill`` (language model + lm_head on the last tokens) and ``total``, the time to
first-token logits from the requests (processed pixels and token ids), every stage included.
Extending: a contender is a function ``(setup, requests, keep) -> Contender`` in :data:`CONTENDERS`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import presets
from ..engine import AutoSelectEngine, Request
from ..modules import Scorer
from ..presets import Preset
from ..timing import Stopwatch
from .flops import count_flops, flop_counter, module_flops
from .graphed import GRAPHED, GRAPHS_NEED_CUDA, GraphedModel
from .model_inputs import model_inputs

STAGES = ("prepare", "vision", "prune", "pack", "prefill", "total")
# The stages the engine times itself; its `prepare` is the rest of the time to first-token logits.
ENGINE_STAGES = ("vision", "prune", "pack", "prefill")
BASELINE = "transformers"
Keep = Optional[Union[int, float]]  # every token (None), a fixed K per image, or a keep ratio r in (0, 1)


@dataclass
class BenchSetup:
    """A built preset: the model, the Scorer and an engine that keeps every token (for shared stages)."""

    preset: Preset
    model: nn.Module
    scorer: Scorer
    device: torch.device
    dtype: torch.dtype
    engine: AutoSelectEngine = field(init=False)

    def __post_init__(self):
        self.engine = AutoSelectEngine(self.model, self.scorer, keep=None, score_cache_size=0)

    @classmethod
    def build(cls, preset: Preset, device: torch.device, dtype: torch.dtype) -> "BenchSetup":
        """The preset's model and Scorer with random weights (seed 0), in ``dtype`` on ``device``."""
        from ..models import get_adapter

        torch.manual_seed(0)
        model = presets.build_model(preset, device, dtype)
        scorer = Scorer(preset.scorer(get_adapter(model).feature_dim)).to(device=device, dtype=dtype).eval()
        return cls(preset, model, scorer, device, dtype)

    def engine_for(self, keep: Keep, *, cuda_graphs: bool = True) -> AutoSelectEngine:
        """An engine keeping every token (None), K per image (int) or ``max(1, round(r * N_i))`` (float r)."""
        budget = dict(keep_ratio=keep) if isinstance(keep, float) else dict(keep=keep)
        return AutoSelectEngine(self.model, self.scorer, **budget, score_cache_size=0, cuda_graphs=cuda_graphs)


class ContenderUnavailable(RuntimeError):
    """A contender cannot run on this setup (the message says why); the report leaves it out and says so."""


@dataclass
class Contender:
    """One way of getting first-token logits for a batch of requests.

    ``run()`` does one timed prefill and returns its stage times in ms (every key of :data:`STAGES`)
    and the ``(B, vocab)`` logits; ``flops()`` counts the LLM prefill's FLOPs; ``sequence_lengths``
    are the real tokens per request the LLM sees, ``llm_tokens`` what it runs over. ``runner``: the
    engine's :class:`~autoselect_fast.engine.runner.Runner` where the contender goes through one, so
    the report can say which of its stages replayed graphs and which ran eagerly.
    """

    name: str
    keep: Keep
    run: Callable[[], tuple[dict, Tensor]]
    flops: Callable[[], int]
    sequence_lengths: list[int]
    llm_tokens: int
    runner: Optional[object] = None


def _packed(engine: AutoSelectEngine, requests: list[Request]):
    """The engine's packed batch of ``requests``, stage by stage (untimed)."""
    batch = engine.prepare(requests)
    features = engine.encode_images(batch.pixel_values, batch.image_sizes)
    return batch, engine.pack(batch, engine.prune(features, batch.budgets, positions=batch.token_positions))


def engine_contender(setup: BenchSetup, requests: list[Request], keep: Keep) -> Contender:
    engine = setup.engine_for(keep)

    def run():
        clock = Stopwatch(setup.device)
        with clock.stage("total"):  # from the requests to the logits: everything the caller waits for
            out = engine.prefill(requests, timings=True)
        ms = {stage: out.timings_ms[stage] for stage in ENGINE_STAGES}
        ms["total"] = clock.ms["total"]
        ms["prepare"] = ms["total"] - sum(ms[stage] for stage in ENGINE_STAGES)
        return ms, out.logits

    def flops():
        _, packed = _packed(engine, requests)
        return count_flops(lambda: engine.prefill_packed(packed))

    lengths = _packed(engine, requests)[1].cu_seqlens.diff().tolist()
    return Contender("engine", keep, run, flops, lengths, sum(lengths), runner=engine.runner)


def _right_padded(packed) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Packed ``(T, H)`` rows -> right-padded ``(B, L, H)`` embeds, ``(B, L)`` mask, positions, last index."""
    lengths = packed.cu_seqlens.diff().tolist()
    b, longest = len(lengths), max(lengths)
    device = packed.embeds.device
    row = torch.repeat_interleave(torch.arange(b, device=device), torch.tensor(lengths, device=device))
    col = torch.arange(packed.embeds.shape[0], device=device) - packed.cu_seqlens.to(device).long()[row]
    embeds = packed.embeds.new_zeros(b, longest, packed.embeds.shape[-1])
    embeds[row, col] = packed.embeds
    mask = torch.zeros(b, longest, dtype=torch.long, device=device)
    mask[row, col] = 1
    pos = packed.position_ids
    if pos.dim() == 1:
        positions = torch.zeros(b, longest, dtype=pos.dtype, device=device)
        positions[row, col] = pos
    else:  # M-RoPE (3, T) -> (3, B, L)
        positions = torch.zeros(pos.shape[0], b, longest, dtype=pos.dtype, device=device)
        positions[:, row, col] = pos
    return embeds, mask, positions, torch.tensor(lengths, device=device) - 1


def peers_contender(setup: BenchSetup, requests: list[Request], keep: Keep) -> Contender:
    """Kept tokens through the model's own language model as a padded ``inputs_embeds`` batch; vision and
    pruning run eagerly, as in the forks (no CUDA graphs: the engine's runner is what they lack)."""
    engine = setup.engine_for(keep, cuda_graphs=False)
    lm, lm_head = engine.adapter.language_model, engine.adapter.lm_head

    def padded_batch(clock: Optional[Stopwatch] = None):
        clock = clock or Stopwatch(setup.device)
        with clock.stage("prepare"):
            batch = engine.prepare(requests)
        with clock.stage("vision"):
            features = engine.encode_images(batch.pixel_values, batch.image_sizes)
        with clock.stage("prune"):
            pruned = engine.prune(features, batch.budgets, positions=batch.token_positions)
        with clock.stage("pack"):
            padded = _right_padded(engine.pack(batch, pruned))
        return padded

    def prefill(padded):
        embeds, mask, positions, last = padded
        hidden = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
        return lm_head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])

    @torch.inference_mode()
    def run():
        clock = Stopwatch(setup.device)
        padded = padded_batch(clock)
        with clock.stage("prefill"):
            logits = prefill(padded)
        clock.ms["total"] = sum(clock.ms.values())
        return clock.ms, logits

    @torch.inference_mode()
    def flops():
        padded = padded_batch()
        return count_flops(lambda: prefill(padded))

    lengths = _packed(engine, requests)[1].cu_seqlens.diff().tolist()
    return Contender("peers", keep, run, flops, lengths, len(lengths) * max(lengths))


def vision_tower(adapter) -> nn.Module:
    """The model's vision tower (LLaVA: ``vision_tower``; Qwen2.5-VL: ``visual``)."""
    return getattr(adapter, "tower", None) or adapter.inner.vision_tower


class _ModuleTimer:
    """Wall time spent inside some modules during one call, via forward hooks (removed on exit)."""

    def __init__(self, device: torch.device, modules: dict[str, Sequence[nn.Module]]):
        self.device, self.modules, self.ms, self._t0, self._handles = device, modules, {}, {}, []

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        for stage, modules in self.modules.items():
            self.ms[stage] = 0.0
            for m in modules:
                self._handles.append(m.register_forward_pre_hook(lambda mod, args: self._start(mod)))
                self._handles.append(m.register_forward_hook(lambda mod, args, out, stage=stage: self._stop(mod, stage)))
        return self

    def _start(self, module):
        self._sync()
        self._t0[id(module)] = time.perf_counter()

    def _stop(self, module, stage):
        self._sync()
        self.ms[stage] += (time.perf_counter() - self._t0.pop(id(module))) * 1e3

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()


def transformers_contender(setup: BenchSetup, requests: list[Request], keep: Keep = None) -> Contender:
    """The unmodified model's forward over its own padded batch (every visual token; ``keep`` must be None).

    Its inputs are built before the timer, as its processor builds them; its positions are computed
    inside the timed forward (Qwen2.5-VL's M-RoPE) or from the mask (LLaVA). Its ``prepare`` is 0 and
    its ``pack`` is the forward's time outside the vision tower and the language model."""
    if keep is not None:
        raise ValueError(f"the transformers baseline keeps every visual token, got keep={keep}")
    model, adapter = setup.model, setup.engine.adapter
    inputs = model_inputs(adapter, setup.engine.prepare(requests))
    stage_modules = {"vision": [vision_tower(adapter)], "prefill": [adapter.language_model, adapter.lm_head]}

    @torch.inference_mode()
    def forward():
        return model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1]

    def run():
        clock = Stopwatch(setup.device)
        with _ModuleTimer(setup.device, stage_modules) as inside, clock.stage("total"):
            logits = forward()
        ms = {"prepare": 0.0, "vision": inside.ms["vision"], "prune": 0.0, "prefill": inside.ms["prefill"], "total": clock.ms["total"]}
        ms["pack"] = ms["total"] - ms["vision"] - ms["prefill"]
        return ms, logits

    def flops():
        with flop_counter() as counter:
            forward()
        return module_flops(counter, model, stage_modules["prefill"])

    lengths = inputs["attention_mask"].sum(-1).tolist()
    return Contender(BASELINE, None, run, flops, lengths, inputs["input_ids"].numel())


def graphed_contender(setup: BenchSetup, requests: list[Request], keep: Keep = None) -> Contender:
    """``transformers + CUDA graph``: the baseline's inputs (built before the timer, as for it), then per run
    host preparation, the vision graph, the eager merge and the LLM graph (:class:`~.graphed.GraphedModel`).

    Stages as the baseline's: ``prepare`` 0 (its inputs are ready-made), ``vision`` the tower's host
    preparation, copy-in and graph, ``prefill`` the copy-in, LLM graph and logits copy-out, ``pack`` the
    rest (embeddings, placeholder merge, positions). The graphs are captured here, untimed. Raises
    :class:`ContenderUnavailable` off CUDA or when a capture fails."""
    if keep is not None:
        raise ValueError(f"{GRAPHED} keeps every visual token, got keep={keep}")
    if setup.device.type != "cuda":
        raise ContenderUnavailable(GRAPHS_NEED_CUDA.format(device=setup.device.type))
    inputs = model_inputs(setup.engine.adapter, setup.engine.prepare(requests))
    graphed = GraphedModel(setup.model, setup.engine.adapter, inputs)
    try:
        graphed.capture()
    except Exception as exc:  # noqa: BLE001 - the scenario reports the contender as absent, with this reason
        raise ContenderUnavailable(f"CUDA graph capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from exc

    @torch.inference_mode()
    def run():
        clock = Stopwatch(setup.device)
        with clock.stage("total"):
            with clock.stage("vision"):
                features = graphed.encode()
            with clock.stage("pack"):
                lm_inputs = graphed.lm_inputs(features)
            with clock.stage("prefill"):
                logits = graphed.prefill(lm_inputs)
        ms = {"prepare": 0.0, "vision": clock.ms["vision"], "prune": 0.0, "prefill": clock.ms["prefill"], "total": clock.ms["total"]}
        ms["pack"] = ms["total"] - ms["vision"] - ms["prefill"]
        return ms, logits

    @torch.inference_mode()
    def flops():
        return count_flops(graphed.lm_step)  # the LLM graph's body, eagerly, on the batch in its static buffers

    lengths = inputs["attention_mask"].sum(-1).tolist()
    return Contender(GRAPHED, None, run, flops, lengths, inputs["input_ids"].numel())


CONTENDERS: dict[str, Callable[[BenchSetup, list[Request], Keep], Contender]] = {
    "transformers": transformers_contender,
    GRAPHED: graphed_contender,
    "peers": peers_contender,
    "engine": engine_contender,
}
