"""Accuracy through lmms-eval: the engine as an lmms-eval model, and an offline task.

This package owns the bridge to `lmms-eval <https://github.com/EvolvingLMMs-Lab/lmms-eval>`_ (the optional
extra ``pip install "autoselect-fast[eval]"``):

* ``autoselect_fast.eval.lmms_model``: the model ``autoselect`` (a chat model, lmms-eval's recommended type,
  plus its simple twin for ``--force_simple``), which answers every batch lmms-eval hands it through
  :class:`~autoselect_fast.engine.AutoSelectEngine` as one packed batch. lmms-eval finds it through the
  ``lmms_eval.models`` entry point declared in ``setup.py`` (:func:`model_manifest`), so after the
  install ``python -m lmms_eval --model autoselect --model_args pretrained=DIR,scorer=DIR,keep=64 ...``
  works from any directory.
* ``tasks/``: lmms-eval task files whose data are files in this package (no hub): ``autoselect_shapes``
  (the learning experiment's coloured-shape question, answered by generation) and
  ``autoselect_shapes_mc`` (the same questions scored by log-likelihood over the six colours). lmms-eval
  finds them with ``--include_path`` and :data:`TASKS_DIR` (``python -m autoselect_fast.eval`` prints it).
* ``autoselect_fast.eval.shapes_task``: writes that task's images and questions (``training.synthetic``).

Importing this package does not import lmms-eval; only ``lmms_model`` does.
"""
from __future__ import annotations

import os

MODEL_NAME = "autoselect"
TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")


def model_manifest():
    """The ``lmms_eval.models`` entry point: model ``autoselect``, chat class by default, simple class for
    ``--force_simple`` (lmms-eval sends log-likelihood requests to simple models only)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=MODEL_NAME,
        chat_class_path="autoselect_fast.eval.lmms_model.AutoSelectChat",
        simple_class_path="autoselect_fast.eval.lmms_model.AutoSelectSimple",
    )


__all__ = ["MODEL_NAME", "TASKS_DIR", "model_manifest"]
