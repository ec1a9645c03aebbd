"""The lmms-eval model ``autoselect``: every batch lmms-eval hands over goes through the engine as one packed batch.

lmms-eval builds it from ``--model autoselect --model_args ...`` (found through the ``lmms_eval.models``
entry point, see ``autoselect_fast.eval``). Model arguments:

* ``pretrained``: a transformers checkpoint directory saved with ``save_pretrained`` (model and
  processor: LLaVA-1.5, LLaVA-NeXT or Qwen2.5-VL), or a Hugging Face Hub model id (fetched with
  ``huggingface_hub.snapshot_download`` into its cache, when the path is not a directory).
* ``scorer``: a Scorer directory (``Scorer.save_pretrained``); needed by ``selector=scorer`` when a budget is set.
* ``keep`` (K per image) or ``keep_ratio`` (K = max(1, round(r * N))); neither: every token is kept.
* ``selector``: ``scorer`` (default), ``random``, ``norm``, ``divprune``, ``visionzip``
  (``autoselect_fast.selectors``); ``seed`` seeds ``random`` (and sampling).
* ``position_mode``: ``original`` (default) or ``compact``.
* ``device`` (default: cuda when available, else cpu), ``dtype`` (``fp32``/``fp16``/``bf16``; default fp16
  on cuda, fp32 on cpu), ``batch_size`` (requests per packed batch; lmms-eval's ``--batch_size`` when not
  given here), ``selection_backend`` (the engine's: ``auto``, ``ops``, ``reference``).

Two classes, one behaviour. :class:`AutoSelectChat` is the chat model (lmms-eval's recommended type: it
reads the task's ``doc_to_messages``) that ``--model autoselect`` resolves to; :class:`AutoSelectSimple`
is its twin for ``--force_simple``: lmms-eval sends multiple-choice (log-likelihood) requests only to
simple models. Both put the messages through the checkpoint's chat template, so the prompt is the
one the model was trained with.

* ``generate_until``: requests are grouped by their generation arguments and cut into batches of
  ``batch_size``; each batch is one :meth:`AutoSelectEngine.generate` call (one pruned, packed prefill,
  then batched decoding). ``max_new_tokens``, ``temperature`` (0: greedy), ``do_sample``, ``top_p``,
  ``top_k`` go to the engine; ``until`` stop strings end the answer at their first occurrence (a stop
  string that is one token of the vocabulary also stops decoding early); the model's EOS stops it.
  Beam search (``num_beams`` > 1) is refused.
* ``loglikelihood``: ``(mean negative log-likelihood of the continuation tokens, greedy?)`` per request,
  the convention of lmms-eval's own models (its multiple-choice scorer ranks choices by the smallest
  value). The continuation's tokens are those of context + continuation tokenised as one text, after
  the context's own (:func:`split_continuation`); one packed prefill per batch gives the logits of every
  continuation token. Each batch's prompts and images are built when it runs.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Optional, Sequence

import torch
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import GenerationResult, Instance, unwrap_generation_output
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages

from ..budget import check_budget_args, check_keep_fits
from ..engine import SELECTION_BACKENDS, AutoSelectEngine, Request
from ..local_checkpoint import load_scorer, open_checkpoint
from ..preflight import UsageError
from ..reference import POSITION_MODES
from ..selectors import SELECTORS, make_selector
from ..validation import DTYPES, check_choice, is_int

DEFAULT_MAX_NEW_TOKENS = 128


# lmms-eval 0.7.3's evaluator passes every model output through ``unwrap_generation_output``, which turns a
# ``(float, bool)`` pair into its ``str()`` and breaks its own multiple-choice scoring; the pair wrapped in a
# ``GenerationResult`` comes out unchanged. Wrapped only where the installed lmms-eval would mangle it.
_WRAP_LOGLIKELIHOOD = unwrap_generation_output((0.5, True))[0] != (0.5, True)


def _loglikelihood_result(pair: tuple[float, bool]):
    return GenerationResult(text=pair) if _WRAP_LOGLIKELIHOOD else pair


def _resolve_pretrained(pretrained: str) -> str:
    """A local directory as is; otherwise a Hub model id, fetched into the Hugging Face cache."""
    if os.path.isdir(pretrained):
        return pretrained
    if os.path.exists(pretrained) or pretrained.count("/") != 1:
        raise ValueError(f"pretrained={pretrained!r}: not a checkpoint directory (nor a Hub model id 'org/name')")
    from huggingface_hub import snapshot_download

    return snapshot_download(pretrained)


def split_continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context ids, continuation ids)`` of ``context + continuation`` tokenised as one text.

    Tokenised apart, a continuation can become tokens the joined text never has (SentencePiece /
    Metaspace tokenizers of Llama and Mistral turn " red" alone into "▁", "▁red"), so the joined text
    is tokenised and split after the context's own tokens. When the boundary merges (the joined ids do
    not start with the context's ids), the split is at their longest common prefix: the scored tokens
    then start with the merged token.
    """
    joined = list(tokenizer(context + continuation)["input_ids"])
    alone = list(tokenizer(context)["input_ids"])
    common = 0
    while common < min(len(joined), len(alone)) and joined[common] == alone[common]:
        common += 1
    if common == len(joined):
        raise ValueError(f"continuation {continuation!r} adds no tokens to the context")
    return joined[:common], joined[common:]


def sampling_seed(seed: int, task: str, doc_id, occurrence: int) -> int:
    """The sampling seed of the ``occurrence``-th request of (``task``, ``doc_id``) in a call: a hash, so
    repeats of a document sample differently; a non-negative 63-bit int (any int suits ``Request.seed``)."""
    digest = hashlib.blake2b(f"{seed}|{task}|{doc_id}|{occurrence}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _int_arg(name: str, value, lowest: int) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not is_int(value) or value < lowest:
        raise ValueError(f"{name} must be an int >= {lowest}, got {value!r}")
    return value


class _AutoSelectLMM(lmms):
    """What the chat and simple classes share: loading, the engine, batching, prompts, both request types."""

    def __init__(
        self,
        pretrained: str,
        scorer: Optional[str] = None,
        keep: Optional[int] = None,
        keep_ratio: Optional[float] = None,
        selector: str = "scorer",
        position_mode: str = "original",
        device: Optional[str] = None,
        dtype: Optional[str] = None,
        batch_size: int = 1,
        seed: int = 0,
        selection_backend: str = "auto",
        **unknown: Any,
    ) -> None:
        super().__init__()
        unknown.pop("max_batch_size", None)  # lmms-eval passes it to every model; only for batch_size=auto
        if unknown:
            raise ValueError(f"unknown model argument(s) {sorted(unknown)} for --model autoselect; allowed: pretrained, scorer, keep, "
                             "keep_ratio, selector, position_mode, device, dtype, batch_size, seed, selection_backend")
        # Every argument is checked before any weight is read.
        if keep is not None:
            keep = _int_arg("keep", keep, 1)
        if is_int(keep_ratio):
            keep_ratio = float(keep_ratio)
        check_budget_args(keep, keep_ratio, required=False)
        if selector not in SELECTORS:
            raise ValueError(f"selector must be one of {list(SELECTORS)}, got {selector!r}")
        if position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {list(POSITION_MODES)}, got {position_mode!r}")
        check_choice("selection_backend", selection_backend, SELECTION_BACKENDS)
        self.batch_size_per_gpu = _int_arg("batch_size", batch_size, 1)
        self.seed = _int_arg("seed", seed, 0)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or ("fp16" if device.type == "cuda" else "fp32")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        pruning = keep is not None or keep_ratio is not None
        if selector == "scorer" and pruning and scorer is None:
            raise ValueError("selector=scorer with a budget (keep / keep_ratio) needs scorer=DIR (a Scorer saved with "
                             f"Scorer.save_pretrained); the training-free selectors {[s for s in SELECTORS if s != 'scorer']} need none")
        try:
            self.checkpoint = open_checkpoint(_resolve_pretrained(str(pretrained)))
            loaded_scorer = None
            if scorer is not None:
                loaded_scorer = load_scorer(str(scorer), self.checkpoint.skeleton_adapter.feature_dim, str(pretrained))
        except UsageError as exc:  # the loaders name command-line flags; here they are model arguments
            raise ValueError(str(exc).replace("--model ", "pretrained=").replace("--scorer ", "scorer=")) from None
        self._check_model_args(selector, loaded_scorer, keep)
        self.model = self.checkpoint.load_model(device, DTYPES[dtype], progress=False)
        if loaded_scorer is not None:
            loaded_scorer = loaded_scorer.to(device=device, dtype=DTYPES[dtype])
        self.engine = AutoSelectEngine(
            self.model, loaded_scorer, keep=keep, keep_ratio=keep_ratio, selector=selector, seed=self.seed,
            position_mode=position_mode, selection_backend=selection_backend, image_processor=self.checkpoint.image_processor,
            tokenizer=self.checkpoint.tokenizer,
        )
        self.tokenizer = self.checkpoint.tokenizer
        self._device = device
        self.eos_token_ids = self._eos_ids()
        self.image_text = self.checkpoint.image_token

    def _check_model_args(self, selector: str, loaded_scorer, keep: Optional[int]) -> None:
        """What the engine would refuse on this model, checked on the weightless skeleton: the selector
        (visionzip needs a [CLS] token) and, where every image has the same N, keep <= N."""
        adapter = self.checkpoint.skeleton_adapter
        if not (selector == "scorer" and loaded_scorer is None):  # the engine builds no selector then
            make_selector(selector, scorer=loaded_scorer, seed=self.seed).check_model(adapter)
        check_keep_fits(keep, adapter)  # the engine's own check, run again at its construction

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        """``--model_args`` win over lmms-eval's own ``--batch_size`` / ``--device`` (which it always passes)."""
        args = lmms_utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    def _eos_ids(self) -> list[int]:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    # -- prompts ------------------------------------------------------------------------------------
    def _prompt(self, hf_messages: list[dict], images: list) -> str:
        """The chat template's rendering of ``hf_messages`` (with the generation prompt); a checkpoint
        without a template gets one image placeholder per image before the text."""
        if getattr(self.checkpoint.processor, "chat_template", None):
            return self.checkpoint.processor.apply_chat_template(hf_messages, add_generation_prompt=True)
        texts = [c["text"] for m in hf_messages for c in m["content"] if c.get("type") == "text"]
        return "".join(f"{self.image_text}\n" for _ in images) + "\n".join(texts)

    def _context_messages(self, context: str, visuals: list) -> tuple[list[dict], list]:
        """Messages of a simple (text + visuals) request: the images first, unless the text places them itself."""
        images = [v for v in visuals or [] if v is not None]
        for v in images:
            if isinstance(v, (str, dict)):
                raise ValueError(f"--model autoselect answers questions about still images; got a {type(v).__name__} visual (video or audio)")
        placed = context.count(self.image_text)
        if placed not in (0, len(images)):
            raise ValueError(f"the context holds {placed} image placeholder(s) {self.image_text!r} but the request has {len(images)} image(s)")
        content = ([] if placed else [{"type": "image"} for _ in images]) + [{"type": "text", "text": context}]
        return [{"role": "user", "content": content}], images

    def _chat_request(self, doc_to_messages, doc_id, task, split) -> tuple[str, list]:
        raw = doc_to_messages(self.task_dict[task][split][doc_id])
        messages = ChatMessages(messages=raw)
        images, videos, audios = messages.extract_media()
        if videos or audios:
            raise ValueError("--model autoselect answers questions about still images; this request holds video or audio")
        return self._prompt(messages.to_hf_messages(), images), images

    # -- generation ---------------------------------------------------------------------------------
    def _gen_kwargs(self, req: Instance) -> dict:
        """The request's generation arguments (where they sit in ``req.args`` differs by model type)."""
        raise NotImplementedError

    def _generation_input(self, req: Instance) -> tuple[str, list]:
        """``(prompt, images)`` of a generate_until request: decodes its images."""
        raise NotImplementedError

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Requests with equal generation arguments share packed batches of ``batch_size``; answers come back
        in lmms-eval's order. Grouping reads the generation arguments only: each batch's prompts and
        images are built when it runs."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(self._gen_kwargs(req).items())), []).append(i)
        # every group's arguments are checked before the first image is decoded
        plans = [(self._generation_settings(self._gen_kwargs(requests[m[0]])), m) for m in groups.values()]
        seeds = self._sampling_seeds(requests)
        answers: list[Optional[str]] = [None] * len(requests)
        for settings, members in plans:
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                batch = []
                for i in chunk:
                    prompt, images = self._generation_input(requests[i])
                    batch.append(Request(prompt, images=images, seed=seeds[i], stop_token_ids=settings["stop_ids"]))
                out = self.engine.generate(batch, max_new_tokens=settings["max_new_tokens"], eos_token_id=self.eos_token_ids or None,
                                           do_sample=settings["do_sample"], temperature=settings["temperature"],
                                           top_k=settings["top_k"], top_p=settings["top_p"])
                for i, ids in zip(chunk, out.token_ids):
                    answers[i] = self._cut(self.tokenizer.decode(ids, skip_special_tokens=True), settings["until"])
        return answers

    def _sampling_seeds(self, requests: list[Instance]) -> list[int]:
        """Per request :func:`sampling_seed`; lmms-eval sends a document's ``repeats`` as repeated requests,
        which the occurrence count tells apart."""
        seen: dict[tuple, int] = {}
        seeds = []
        for req in requests:
            doc_id, task = req.args[3], req.args[4]
            occurrence = seen.get((task, doc_id), 0)
            seen[(task, doc_id)] = occurrence + 1
            seeds.append(sampling_seed(self.seed, task, doc_id, occurrence))
        return seeds

    def _generation_settings(self, gen_kwargs: dict) -> dict:
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if not all(isinstance(u, str) for u in until):
            raise ValueError(f"until must be a string or a list of strings, got {gen_kwargs.get('until')!r}")
        if int(gen_kwargs.get("num_beams", 1) or 1) != 1:
            raise ValueError(f"num_beams={gen_kwargs['num_beams']}: --model autoselect decodes greedily or by sampling, not by beam search")
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        do_sample = bool(gen_kwargs.get("do_sample", False)) or temperature > 0
        if do_sample and temperature == 0:  # do_sample with temperature 0 is greedy, as in lmms-eval's models
            do_sample = False
        unk = self.tokenizer.unk_token_id
        stop_ids = []
        for text in until:  # a stop string that is itself one token also stops decoding early
            token = self.tokenizer.convert_tokens_to_ids(text)
            if isinstance(token, int) and token != unk and self.tokenizer.convert_ids_to_tokens(token) == text:
                stop_ids.append(token)
        top_p = gen_kwargs.get("top_p")
        top_k = gen_kwargs.get("top_k")
        max_new = gen_kwargs.get("max_new_tokens")  # None (as some task YAMLs write it): the default
        return {
            "until": until, "stop_ids": stop_ids, "do_sample": do_sample, "temperature": temperature if do_sample else 1.0,
            "top_p": 1.0 if top_p is None or not do_sample else float(top_p), "top_k": 0 if top_k is None or not do_sample else int(top_k),
            "max_new_tokens": _int_arg("max_new_tokens", DEFAULT_MAX_NEW_TOKENS if max_new is None else max_new, 1),
        }

    @staticmethod
    def _cut(text: str, until: Sequence[str]) -> str:
        """``text`` up to the first occurrence of any stop string."""
        end = min([text.find(u) for u in until if u and u in text], default=len(text))
        return text[:end]

    # -- log-likelihood -----------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list:
        """``(mean NLL of the continuation, greedy?)`` per request (see the module docstring); each batch's
        prompts and images are built when it runs."""
        results: list = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            results.extend(self._loglikelihood_batch([self._loglikelihood_input(req) for req in chunk]))
        return results

    def _loglikelihood_input(self, req: Instance) -> tuple[str, list, str]:
        """``(prompt, images, continuation)`` of a loglikelihood request: decodes its images."""
        context, continuation, doc_to_visual, doc_id, task, split = req.args
        doc = self.task_dict[task][split][doc_id]
        if callable(continuation):
            continuation = continuation(doc)
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        messages, images = self._context_messages(context, visuals)
        return self._prompt(messages, images), images, str(continuation)

    def _loglikelihood_batch(self, items: list[tuple[str, list, str]]) -> list:
        requests, targets = [], []
        for prompt, images, continuation in items:
            context_ids, continuation_ids = split_continuation(self.tokenizer, prompt, continuation)
            requests.append(Request(context_ids + continuation_ids, images=images))
            targets.append(continuation_ids)
        # Row j of a request's tail logits predicts its token j+1: the last len(continuation)+1 rows hold
        # the predictions of every continuation token (and one after the last, unused).
        out = self.engine.prefill(requests, tail_logits=[len(t) + 1 for t in targets])
        results = []
        for logits, target in zip(out.tail_logits, targets):
            log_probs = torch.log_softmax(logits[:-1].float(), dim=-1)
            target_t = torch.tensor(target, device=log_probs.device)
            token_ll = log_probs.gather(1, target_t[:, None])[:, 0]
            greedy = bool((log_probs.argmax(-1) == target_t).all())
            results.append(_loglikelihood_result((float(-token_ll.mean()), greedy)))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("--model autoselect answers single-round questions (generate_until, loglikelihood)")


class AutoSelectChat(_AutoSelectLMM):
    """Chat model (``is_simple = False``): reads the task's ``doc_to_messages``."""

    is_simple = False

    def _gen_kwargs(self, req: Instance) -> dict:
        return dict(req.args[2])

    def _generation_input(self, req: Instance) -> tuple[str, list]:
        _, doc_to_messages, _, doc_id, task, split = req.args
        return self._chat_request(doc_to_messages, doc_id, task, split)


class AutoSelectSimple(_AutoSelectLMM):
    """Simple model (``is_simple = True``, for ``--force_simple``): reads ``doc_to_text`` and ``doc_to_visual``."""

    is_simple = True

    def _gen_kwargs(self, req: Instance) -> dict:
        return dict(req.args[1])

    def _generation_input(self, req: Instance) -> tuple[str, list]:
        context, _, doc_to_visual, doc_id, task, split = req.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        messages, images = self._context_messages(context, visuals)
        return self._prompt(messages, images), images


__all__ = ["AutoSelectChat", "AutoSelectSimple"]
