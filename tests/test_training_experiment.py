"""The learning experiment in a shortened form: a trained Scorer must beat random selection clearly.

Same code path as ``python -m autoselect_fast.training.experiment`` (synthetic task, tiny LLaVA
pretrained with every token, Scorer + Denoiser trained at K = N/8, hard top-K through
AutoSelectEngine), with fewer samples and steps and without the ablations (about 1-2 minutes on a
quiet 2-core CPU). The full run's numbers are in the README.
"""
import torch

from autoselect_fast.training.experiment import ExperimentSettings, run_experiment


def test_trained_scorer_beats_random_selection(tmp_path):
    threads = torch.get_num_threads()
    settings = ExperimentSettings(
        tag="ci", out_dir=str(tmp_path), train_samples=1200, test_samples=120, pretrain_steps=300, steps=80,
        batch_size=16, ablations=False, plot=False, progress=False, threads=1,
        backend="reference",  # the Triton interpreter (TRITON_INTERPRET=1 in tests) would take minutes here
    )
    try:
        result = run_experiment(settings, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    s = result["summary"]
    methods = result["methods"]
    assert result["frozen_vlm_bit_identical"]
    assert s["every_token_accuracy"] >= 0.6, s  # the VLM learned the task with every token
    assert s["trained_minus_random_points"] >= 20, s  # learning: the trained Scorer finds the answer token
    assert methods["trained"]["target_kept_rate"] >= methods["random K"]["target_kept_rate"] + 0.3, methods
    assert (tmp_path / "training-experiment-ci.json").exists()
