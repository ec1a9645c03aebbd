"""Batched decoding after the packed prefill: a static KV cache, CUDA graphs per batch-size bucket, stops on the device.

This module owns what happens between the first-token logits of a packed prefill and the generated
token ids (``docs/engine.md``, "Decode"): the decode state of a batch (a
:class:`~autoselect_fast.kv_cache.DecodeCache` that the prefill fills itself, plus static token,
position and logits buffers), the decode step (one language-model call over one new token per
request, ``lm_head``, cache lengths and positions advanced in place) and the loop around it (sampling,
stop detection on the device, read-back every few steps).

* **Positions** continue at each request's (largest position so far) + 1 on every M-RoPE row and
  count up by one per step (docs/design.md, "Position ids"; for Qwen2.5-VL this is the model's ``rope_deltas``
  rule applied to the pruned length).
* **CUDA graphs** (``cuda_graphs=True`` on a CUDA device): one graph per (batch-size bucket, capacity
  bucket), captured the first time it is needed (before the prefill writes the cache), replayed per
  step. A batch is padded up to its bucket (:data:`BATCH_BUCKETS`) with rows of length 0 whose results
  are never read; a batch above the largest bucket decodes eagerly and is counted
  (:attr:`DecodeRunner.stats`). Capacity is rounded up to a power of two (at least
  :data:`MIN_GRAPH_CAPACITY`); at most ``max_graphs`` states are kept, least recently used out first.
  A graph state is used by one call at a time: a concurrent call that needs the same one decodes
  eagerly with its own buffers (counted); the next user's stream waits for the last user's work on
  the device (an event, no host synchronisation). On a CPU, or with graphs off, every call allocates its own
  cache of exactly the capacity it needs and runs the same step eagerly.
* **Sampling** runs on the device after each step, outside the graph, with
  :func:`~autoselect_fast.engine.sampling.sample_next_tokens` as before: the same generators, the same
  draws in the same order, every request every step (finished ones too), so greedy and sampled tokens
  are those of a loop that reads the tokens back after every step.
* **Stops** (a stop token, or the request's limit) are detected on the device. The host reads the
  "every request has finished" flag every ``read_every`` steps (the loop's only synchronisation) and
  the tokens once at the end, then cuts each request after its first stop token or at its limit. A
  finished request keeps being computed until the next read-back; its extra tokens are dropped. When
  a request samples from torch's global generator, the generator is put back (:class:`GlobalGenerator`)
  to where it stood after the last draw the previous loop would have made, so the draws of those extra
  steps leave no trace.
"""
from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..attention import attention_call, install_dispatch
from ..kv_cache import DecodeCache, decode_attention
from ..ragged import to_device
from ..validation import is_int

__all__ = ["BATCH_BUCKETS", "MIN_GRAPH_CAPACITY", "DEFAULT_READ_EVERY", "DecodeStats", "DecodeState", "DecodeRunner",
           "ModelStep", "StopRule", "GlobalGenerator", "decode", "batch_bucket", "capacity_bucket", "check_read_every"]

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MIN_GRAPH_CAPACITY = 256
DEFAULT_READ_EVERY = 8
DEFAULT_MAX_GRAPHS = 8


def batch_bucket(batch_size: int) -> Optional[int]:
    """The smallest bucket holding ``batch_size`` requests, ``None`` above the largest."""
    return next((b for b in BATCH_BUCKETS if b >= batch_size), None)


def capacity_bucket(columns: int) -> int:
    """Cache columns of a graph state: the next power of two >= ``columns``, at least :data:`MIN_GRAPH_CAPACITY`."""
    return max(MIN_GRAPH_CAPACITY, 1 << (columns - 1).bit_length())


def check_read_every(value) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"read_every must be an int >= 1 (decode steps between read-backs of the finished flags), got {value!r}")
    return value


class ModelStep:
    """One decode step of a language model on a :class:`DecodeState`: embed the state's tokens, run the
    model over its cache with its mask and positions (attention: ``kv_cache.decode_attention``),
    ``lm_head`` into its logits, then advance the cache lengths and positions in place."""

    def __init__(self, language_model: nn.Module, embed_tokens: nn.Module, lm_head: nn.Module, cache_kwarg: str):
        if not isinstance(lm_head, nn.Linear):
            raise TypeError(f"lm_head must be an nn.Linear (its output sizes the static logits buffer), got {type(lm_head).__name__}")
        self.language_model, self.embed_tokens, self.lm_head, self.cache_kwarg = language_model, embed_tokens, lm_head, cache_kwarg
        self.config = language_model.config
        self.dtype = lm_head.weight.dtype
        self.device = lm_head.weight.device
        self.vocab_size = lm_head.out_features

    def __call__(self, state: "DecodeState") -> None:
        with torch.inference_mode():
            mask = state.cache.prepare_step()
            with attention_call(decode_attention):
                hidden = self.language_model(
                    inputs_embeds=self.embed_tokens(state.tokens)[:, None],
                    attention_mask=mask,  # 4-D: transformers passes it on as it is
                    position_ids=state.positions[:, None],  # the same position on every M-RoPE row
                    use_cache=True,
                    **{self.cache_kwarg: state.cache},
                ).last_hidden_state
            state.logits.copy_(self.lm_head(hidden[:, 0]))
            state.cache.advance()
            state.positions.add_(1)


class DecodeState:
    """Static buffers of one decode batch and its step.

    ``tokens`` ``(rows,)`` what the next step feeds; ``positions`` ``(rows,)`` their position ids;
    ``logits`` ``(rows, vocab)`` what the step writes; ``cache`` the KV cache. Rows past the batch's
    requests (a graph bucket's padding) stay at length 0 and are never read.
    """

    def __init__(self, model_step: ModelStep, rows: int, capacity: int):
        self.model_step, self.rows, self.capacity = model_step, rows, capacity
        device = model_step.device
        self.cache = DecodeCache.for_config(model_step.config, rows, capacity, dtype=model_step.dtype, device=device)
        self.tokens = torch.zeros(rows, dtype=torch.int64, device=device)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=device)
        self.logits = torch.zeros(rows, model_step.vocab_size, dtype=model_step.dtype, device=device)
        self.graph: Optional["torch.cuda.CUDAGraph"] = None
        self.steps = 0  # steps since the last release (for the runner's stats)
        self.lock = threading.Lock()
        self.released: Optional["torch.cuda.Event"] = None  # recorded on the last user's stream at release

    def step(self) -> None:
        """One decode step: the graph's replay once captured, else the eager step."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self.model_step(self)
        self.steps += 1

    def capture(self, warmup: int = 2) -> None:
        """Capture the step in a CUDA graph, after ``warmup`` eager steps on a side stream (cuBLAS set-up;
        capture needs them off the default stream). They write into the cache; the prefill that follows
        sets every row's state again."""
        device = self.cache.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self.model_step(self)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads' syncs and allocations during this capture neither fail nor spoil it
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.model_step(self)
        self.graph = graph


@dataclass
class DecodeStats:
    """What the decode runner did: steps replayed from graphs and run eagerly, captures, eager calls by reason."""

    graph_steps: int = 0
    eager_steps: int = 0
    captures: int = 0
    eager_above_buckets: int = 0  # calls whose batch is above the largest bucket
    eager_busy: int = 0  # calls whose graph state was in use by another call

    def as_dict(self) -> dict:
        return asdict(self)


class DecodeRunner:
    """The decode states of one engine: per-call eager states, or graph states kept per bucket on CUDA.

    Args:
        model_step: the language model's :class:`ModelStep`.
        cuda_graphs: capture and replay the decode step on a CUDA device (ignored elsewhere).
        max_graphs: graph states kept at most (each holds its own KV cache).
        warmup: eager steps before a capture.
    """

    def __init__(self, model_step: ModelStep, *, cuda_graphs: bool = True, max_graphs: int = DEFAULT_MAX_GRAPHS, warmup: int = 2):
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be a bool, got {cuda_graphs!r}")
        for name, value in (("max_graphs", max_graphs), ("warmup", warmup)):
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.model_step = model_step
        self.graphs = cuda_graphs and model_step.device.type == "cuda"
        self.max_graphs, self.warmup = max_graphs, warmup
        self.stats = DecodeStats()
        self._states: OrderedDict[tuple[int, int], DecodeState] = OrderedDict()
        self._lock = threading.Lock()

    def acquire(self, batch_size: int, capacity: int) -> DecodeState:
        """A state for ``batch_size`` requests and ``capacity`` cache columns; give it back with :meth:`release`."""
        bucket = batch_bucket(batch_size) if self.graphs else None
        if bucket is None:
            if self.graphs:
                with self._lock:
                    self.stats.eager_above_buckets += 1
            return DecodeState(self.model_step, batch_size, capacity)
        key = (bucket, capacity_bucket(capacity))
        with self._lock:
            state = self._states.get(key)
            if state is not None:
                if not state.lock.acquire(blocking=False):
                    self.stats.eager_busy += 1
                    return DecodeState(self.model_step, batch_size, capacity)
                self._states.move_to_end(key)
                if state.released is not None:  # the last user may have run on another stream: order after it, on the device
                    torch.cuda.current_stream(state.cache.device).wait_event(state.released)
                return state
            state = DecodeState(self.model_step, *key)
            state.lock.acquire()
            self._states[key] = state
            for old_key in [k for k, s in self._states.items() if k != key and not s.lock.locked()][: max(0, len(self._states) - self.max_graphs)]:
                del self._states[old_key]  # least recently used first; its memory goes once no call holds it
            self.stats.captures += 1
        try:
            install_dispatch(self.model_step.config)
            state.capture(self.warmup)
        except BaseException:
            with self._lock:
                self._states.pop(key, None)
            state.lock.release()
            raise
        return state

    def release(self, state: DecodeState) -> None:
        """Count the state's steps and free it for the next call (a graph state) or let it go (an eager one)."""
        with self._lock:
            if state.graph is not None:
                self.stats.graph_steps += state.steps
            else:
                self.stats.eager_steps += state.steps
        state.steps = 0
        if state.graph is not None:
            state.released = torch.cuda.Event()
            state.released.record(torch.cuda.current_stream(state.cache.device))
        if state.lock.locked():
            state.lock.release()


@dataclass
class StopRule:
    """Per request: at most ``limits[r]`` new tokens, and its stop token ids (kept in its output)."""

    limits: list[int]
    stop_tokens: list[frozenset]

    def cut(self, tokens: Sequence[int], request: int) -> list[int]:
        """The request's output: up to and including its first stop token, at most its limit."""
        out = []
        for t in tokens[: self.limits[request]]:
            out.append(t)
            if t in self.stop_tokens[request]:
                break
        return out

    def stop_table(self, device: torch.device) -> Optional[Tensor]:
        """``(B, S)`` stop ids per request, padded with -1 (never a token); ``None`` without any."""
        widest = max(len(s) for s in self.stop_tokens)
        if not widest:
            return None
        table = torch.full((len(self.stop_tokens), widest), -1, dtype=torch.int64)
        for r, stops in enumerate(self.stop_tokens):
            table[r, : len(stops)] = torch.tensor(sorted(stops), dtype=torch.int64)
        return to_device(table, device)


class GlobalGenerator:
    """torch's default generator of a device: its state read and set on the host (CPU: the Mersenne
    Twister state; CUDA: Philox seed and offset), no device synchronisation."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def get(self) -> Tensor:
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()

    def set(self, state: Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)


def decode(state: DecodeState, first_logits: Tensor, next_positions: Tensor, rule: StopRule,
           sample: Callable[[Tensor], Tensor], *, read_every: int = DEFAULT_READ_EVERY,
           global_generator: Optional[GlobalGenerator] = None) -> list[list[int]]:
    """New token ids per request of a prefilled batch (rows ``0..B-1`` of ``state``, its cache filled).

    ``first_logits`` ``(B, vocab)`` from the prefill; ``next_positions`` ``(B,)`` each request's first
    decode position; ``sample(logits (B, vocab)) -> (B,)`` the next tokens, on the device. With
    ``global_generator`` (``sample`` draws from it), its state after each of the last ``read_every``
    draws is kept, and the one after the last draw a request needed is restored at the end.
    """
    batch, device = first_logits.shape[0], first_logits.device
    steps = max(rule.limits)
    out = first_logits.new_empty((batch, steps), dtype=torch.int64)  # on the logits' device
    done = first_logits.new_zeros(batch, dtype=torch.bool)
    limits = to_device(torch.tensor(rule.limits, dtype=torch.int64), device)
    stops = rule.stop_table(device)
    state.positions[:batch].copy_(next_positions)
    state.positions[batch:].zero_()
    state.tokens.zero_()
    tokens = sample(first_logits)
    after_draw = deque(maxlen=read_every)  # (draws so far, global generator state)
    if global_generator is not None:
        after_draw.append((1, global_generator.get()))
    taken = 0
    while True:
        out[:, taken] = tokens
        taken += 1
        done |= limits <= taken
        if stops is not None:
            done |= (tokens[:, None] == stops).any(-1)
        if taken == steps or (taken % read_every == 0 and bool(done.all())):  # the loop's only host read
            break
        state.tokens[:batch].copy_(tokens)
        state.step()
        tokens = sample(state.logits[:batch])
        if global_generator is not None:
            after_draw.append((taken + 1, global_generator.get()))
    outputs = [rule.cut(row, r) for r, row in enumerate(out[:, :taken].tolist())]
    needed = max(len(o) for o in outputs)  # draws the previous loop made: one per token of the longest output
    if global_generator is not None and needed < taken:
        # The batch finished at draw `needed`, found at the read-back after draw `taken`: all within the last read_every.
        global_generator.set(dict(after_draw)[needed])
    return outputs
