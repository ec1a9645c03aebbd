"""The learning experiment in a shortened form: a trained Scorer must beat random, norm and VisionZip-style selection.

Same code path as ``python -m autoselect_fast.training.experiment`` (synthetic task, tiny LLaVA
pretrained with every token, Scorer + Denoiser trained at K = N/8, hard top-K), with fewer samples and
steps and without the ablations (about 1-2 minutes on a quiet 2-core CPU). Here the answers go
directly through ``AutoSelectEngine`` (``through="engine"``); ``tests/test_lmms_eval.py`` runs the same
experiment through the lmms-eval model where lmms-eval is installed. The full run's numbers are in the README.
"""
import torch

from autoselect_fast.training.experiment import TRAINING_FREE, ExperimentSettings, run_experiment

CI_SETTINGS = dict(
    train_samples=1200, test_samples=120, pretrain_steps=300, steps=80, batch_size=16, ablations=False, plot=False, progress=False,
    threads=1, backend="reference",  # the Triton interpreter (TRITON_INTERPRET=1 in tests) would take minutes here
)


def check_learning(result: dict) -> None:
    s, methods = result["summary"], result["methods"]
    assert result["frozen_vlm_bit_identical"]
    assert s["every_token_accuracy"] >= 0.6, s  # the VLM learned the task with every token
    assert s["trained_minus_random_points"] >= 20, s  # learning: the trained Scorer finds the answer token
    assert methods["trained"]["target_kept_rate"] >= methods["random"]["target_kept_rate"] + 0.3, methods
    # Above random, norm and the VisionZip-style selector. DivPrune is not asserted against: on this task it
    # keeps the answer token almost always (the answer is the image's most unusual token) and matched or
    # beat the trained Scorer in the full run (README, "Does the Scorer learn?").
    accuracies = {m: methods[m]["accuracy"] for m in ("every token", "trained", *TRAINING_FREE)}
    for name in ("random", "norm", "visionzip"):
        assert s["trained_accuracy"] >= methods[name]["accuracy"] + 0.2, accuracies
    assert set(methods) == {"every token", "trained", *TRAINING_FREE}


def test_trained_scorer_beats_random_norm_and_visionzip(tmp_path):
    threads = torch.get_num_threads()
    settings = ExperimentSettings(tag="ci", out_dir=str(tmp_path), through="engine", **CI_SETTINGS)
    try:
        result = run_experiment(settings, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    check_learning(result)
    assert result["summary"]["lmms_eval_answers_equal_engine"] is None  # not measured through lmms-eval here
    assert (tmp_path / "training-experiment-ci.json").exists()
