"""Training data: LLaVA-style conversation records read with the model's processor and chat template.

This module owns the dataset format and its tokenisation. One JSON object per line::

    {"image": "relative/or/absolute/path.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the shape?"},
                       {"from": "gpt", "value": "red"}, ...]}

``from`` is ``human``/``user`` or ``gpt``/``assistant`` (``role``/``content`` keys work too); the
first user turn holds ``<image>`` exactly once (it is moved to the front when missing). Turns are
rendered with the tokenizer's own chat template; the labels are the assistant turns' tokens (what
the template emits for them, end-of-turn tokens included), everything else is -100.

The whole file is scanned when the dataset is built: malformed records and unreadable images are
reported with their line number and skipped (``strict=True`` raises instead), so a bad line never
crashes an epoch. Images are decoded and processed lazily, in ``__getitem__``.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .objective import IGNORE_INDEX, TrainBatch

IMAGE_PLACEHOLDER = "<image>"
_USER, _ASSISTANT = ("human", "user"), ("gpt", "assistant")


@dataclass
class Sample:
    input_ids: Tensor  # (L,) with the image token once
    labels: Tensor  # (L,) -100 outside the answers
    pixel_values: Tensor
    image_size: Any  # the adapter's image size: None (LLaVA-1.5), (height, width) (LLaVA-NeXT), grid (t, h, w) (Qwen2.5-VL)
    source: str = ""  # "file:line" for messages


@dataclass
class Problem:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


def collate(samples: list[Sample], slots: list[int]) -> TrainBatch:
    return TrainBatch(
        input_ids=[s.input_ids for s in samples], labels=[s.labels for s in samples],
        pixel_values=[s.pixel_values for s in samples], image_sizes=[s.image_size for s in samples], slots=list(slots),
    )


def _messages(record: Any) -> list[dict]:
    """The record's turns as chat-template messages; ValueError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    if not isinstance(record.get("image"), str) or not record["image"]:
        raise ValueError("record has no 'image' path (a non-empty string)")
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise ValueError("record has no 'conversations' list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} must be an object, got {type(turn).__name__}")
        who, text = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        if who not in _USER + _ASSISTANT:
            raise ValueError(f"turn {i} has speaker {who!r}; allowed: {_USER + _ASSISTANT}")
        if not isinstance(text, str):
            raise ValueError(f"turn {i} has no text ('value' string)")
        messages.append({"role": "user" if who in _USER else "assistant", "content": text})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("record has no assistant ('gpt') turn to learn from")
    count = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if count > 1:
        raise ValueError(f"record has {count} '{IMAGE_PLACEHOLDER}' placeholders; one image per record is supported")
    if count == 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise ValueError("record has no user turn to hold the image")
        first_user["content"] = f"{IMAGE_PLACEHOLDER}\n{first_user['content']}"
    return messages


def tokenize_conversation(tokenizer, messages: list[dict], image_text: str, chat_template: Optional[str] = None) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a conversation rendered by the tokenizer's chat template (or ``chat_template``,
    e.g. the one a multimodal processor holds).

    The labels of assistant turn j are the tokens that rendering turn j adds after the generation
    prompt of turns < j. Raises ValueError when the template's renderings are not prefixes of each
    other (then the answer tokens cannot be located).
    """
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat_template; training renders conversations with the model's own template")
    messages = [{**m, "content": m["content"].replace(IMAGE_PLACEHOLDER, image_text)} for m in messages]

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(turns: list[dict], **kwargs) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, chat_template=chat_template, **kwargs)

    full_text = render(messages)
    full = ids(full_text)
    labels = [IGNORE_INDEX] * len(full)
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt_text = render(messages[:j], add_generation_prompt=True)
        upto_text = render(messages[: j + 1])
        if not (upto_text.startswith(prompt_text) and full_text.startswith(upto_text)):
            raise ValueError("the chat template's rendering of a prefix of the conversation is not a prefix of the whole")
        a, b = len(ids(prompt_text)), len(ids(upto_text))
        if full[:b] != ids(upto_text) or b <= a:
            raise ValueError(f"assistant turn {j} cannot be located in the tokenised conversation (tokens merge across the turn boundary)")
        labels[a:b] = full[a:b]
    return full, labels


class ConversationDataset(torch.utils.data.Dataset):
    """A JSONL file of conversation records with images under ``image_folder``.

    Args:
        path: the JSONL file.
        image_folder: base folder of relative image paths (default: the JSONL's folder).
        adapter: the model's adapter (``autoselect_fast.models.get_adapter``): image processing and layout.
        tokenizer: a tokenizer with a chat template, or a processor with ``.tokenizer`` (its own chat template,
            if it has one, is used: multimodal processors often hold the template, e.g. Qwen2.5-VL's).
        image_processor: default ``adapter.default_image_processor()``.
        strict: raise on the first bad record instead of skipping it.
    """

    def __init__(self, path: str, adapter, tokenizer, *, image_folder: Optional[str] = None, image_processor=None,
                 strict: bool = False, log=None):
        from PIL import Image

        self.path = path
        self.adapter = adapter
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        self.chat_template = getattr(tokenizer, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        self.image_processor = image_processor if image_processor is not None else adapter.default_image_processor()
        self.image_folder = image_folder if image_folder is not None else os.path.dirname(os.path.abspath(path))
        self.image_text = adapter.image_prompt_text(self.tokenizer)  # what <image> becomes in the template's input
        if not os.path.isfile(path):
            raise FileNotFoundError(f"training data file {path!r} does not exist")
        self.records: list[tuple[int, str, list[dict], Any]] = []  # (line, image path, messages, image size)
        self.problems: list[Problem] = []
        with open(path) as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    messages = _messages(record)
                    image_path = record["image"] if os.path.isabs(record["image"]) else os.path.join(self.image_folder, record["image"])
                    try:
                        with Image.open(image_path) as img:
                            img.verify()
                        with Image.open(image_path) as img:
                            width, height = img.size
                    except Exception as exc:  # noqa: BLE001 - any decoder error means "unreadable"
                        raise ValueError(f"image {image_path!r} cannot be read ({type(exc).__name__}: {exc})") from None
                    ids, _ = tokenize_conversation(self.tokenizer, messages, self.image_text, self.chat_template)
                    if ids.count(adapter.image_token_id) != 1:
                        raise ValueError(
                            f"the rendered conversation holds the image token (id {adapter.image_token_id}) "
                            f"{ids.count(adapter.image_token_id)} times, expected once"
                        )
                except (ValueError, json.JSONDecodeError) as exc:
                    problem = Problem(line_no, str(exc) if not isinstance(exc, json.JSONDecodeError) else f"not valid JSON ({exc.msg})")
                    if strict:
                        raise ValueError(f"{path}: {problem}") from None
                    self.problems.append(problem)
                    continue
                self.records.append((line_no, image_path, messages, (height, width)))
        if self.problems:
            (log or (lambda msg: print(msg, file=sys.stderr)))(
                f"{path}: skipped {len(self.problems)} bad record(s):\n" + "\n".join(f"  {p}" for p in self.problems)
            )
        if not self.records:
            raise ValueError(f"{path} holds no usable training record ({len(self.problems)} bad)")

    def __len__(self) -> int:
        return len(self.records)

    def num_visual_tokens(self, index: int) -> int:
        """N of record ``index`` (from the image header only; used to check K before training)."""
        height, width = self.records[index][3]
        return self.adapter.layout(self.adapter.image_size_of(height, width, self.image_processor)).num_tokens

    def __getitem__(self, index: int) -> Sample:
        from PIL import Image

        line_no, image_path, messages, _ = self.records[index]
        with Image.open(image_path) as img:
            image = img.convert("RGB")
        pixel_values, image_size = self.adapter.process_image(image, self.image_processor)
        ids, labels = tokenize_conversation(self.tokenizer, messages, self.image_text, self.chat_template)
        return Sample(torch.tensor(ids), torch.tensor(labels), pixel_values, image_size, f"{self.path}:{line_no}")


class SampleList(torch.utils.data.Dataset):
    """Already prepared samples (the synthetic experiment builds these in memory)."""

    def __init__(self, samples: list[Sample], num_tokens: list[int]):
        self.samples, self._num_tokens = samples, num_tokens

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    def num_visual_tokens(self, index: int) -> int:
        return self._num_tokens[index]
