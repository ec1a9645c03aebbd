"""The offline lmms-eval task ``autoselect_shapes``: the learning experiment's questions as files.

The learning experiment's task (``training.synthetic``: which colour is the diamond, among striped
distractors and decoy squares and pluses on grey noise?) is rendered to PNG files with a JSON-lines file of questions and
answers, next to the task's YAML files and ``utils.py`` (lmms-eval reads ``shapes.jsonl`` with its
local ``json`` builder, paths relative to the YAML): nothing is fetched from a hub.

The copy in ``TASKS_DIR/autoselect_shapes`` is the experiment's default held-out set (seed 0: 400
images, 12 distractors, 8 decoys), written by::

    python -m autoselect_fast.eval.shapes_task

The experiment writes its own held-out set the same way (:func:`write_task`) into its work directory.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Optional, Sequence

from . import TASKS_DIR

TASK_DIR = os.path.join(TASKS_DIR, "autoselect_shapes")
DATA_FILE = "shapes.jsonl"
IMAGE_DIR = "images"
TASK_FILES = ("autoselect_shapes.yaml", "autoselect_shapes_mc.yaml", "utils.py")  # static: copied, never generated


def write_task(directory: str, samples: Sequence, *, copy_task_files: bool = True) -> str:
    """Write ``samples`` (``training.synthetic.TaskSample``) as the task's data into ``directory``:
    ``images/00000.png ...`` and ``shapes.jsonl`` (one doc per line: id, image, question, answer,
    choices, target_cell). With ``copy_task_files`` the YAML files and ``utils.py`` are copied too, so
    ``directory`` is a complete task for ``--include_path``. Returns ``directory``."""
    from PIL import Image

    from ..training import synthetic

    images = os.path.join(directory, IMAGE_DIR)
    if os.path.isdir(images):
        shutil.rmtree(images)
    os.makedirs(images)
    with open(os.path.join(directory, DATA_FILE), "w") as fh:
        for i, s in enumerate(samples):
            name = f"{IMAGE_DIR}/{i:05d}.png"
            Image.fromarray(s.image).save(os.path.join(directory, name), optimize=True)
            doc = {"id": i, "image": name, "question": s.question, "answer": s.answer, "choices": list(synthetic.COLOURS),
                   "target_cell": int(s.target_cell)}
            fh.write(json.dumps(doc) + "\n")
    if copy_task_files and os.path.abspath(directory) != os.path.abspath(TASK_DIR):
        for name in TASK_FILES:
            shutil.copyfile(os.path.join(TASK_DIR, name), os.path.join(directory, name))
    return directory


def default_samples(count: int = 400, seed: int = 0, distractors: int = 12, decoys: int = 8) -> list:
    """The learning experiment's held-out samples for ``seed`` (its ``make_samples(count, 2 * seed + 2)``)."""
    from ..models import get_adapter
    from ..training import synthetic

    tokenizer = synthetic.build_tokenizer()
    processor = get_adapter(synthetic.build_tiny_llava(tokenizer, seed=seed)).default_image_processor()
    return synthetic.make_samples(count, seed * 2 + 2, tokenizer, processor, distractors=distractors, decoys=decoys)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autoselect_fast.eval.shapes_task", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=TASK_DIR, help="task directory (default: the packaged copy)")
    p.add_argument("--count", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distractors", type=int, default=12)
    p.add_argument("--decoys", type=int, default=8)
    args = p.parse_args(argv)
    write_task(args.out, default_samples(args.count, args.seed, args.distractors, args.decoys))
    print(f"wrote {args.count} questions to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
