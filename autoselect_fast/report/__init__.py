"""The benchmark report: the engine against the unmodified transformers model, timed in one run.

``autoselect-fast bench`` builds a preset (``autoselect_fast.presets``: real transformers classes,
random weights) and times, interleaved (A B C A B C ...: every contender sees the same machine
state), the **contenders** of :mod:`.contenders` (``transformers``, the baseline; on CUDA ``transformers
+ CUDA graph``, the same model with its vision tower and its LLM each replayed from one CUDA graph
(:mod:`.graphed`), absent with a one-line note elsewhere; ``peers``, the padded way research forks
prune; ``engine``) on the same requests (:mod:`.workloads`), in the
**scenarios** of :mod:`.scenarios` (``single``, ``mixed``, ``serving``) and, when asked, the
``decode`` scenario of :mod:`.decode` (tokens/s against transformers' ``generate``).

A configuration's ``keep`` is ``None`` (every token), an int K (a fixed budget per image) or a float
r in (0, 1) (a keep ratio: the engine's ``keep_ratio``).

Per contender and configuration the report gives the stages prepare, vision, pruning, pack and LLM
prefill, and the TTFT from the requests to first-token logits (medians with min-max over the repeats),
LLM prefill FLOPs as executed (:mod:`.flops`; attention counted as full L x L products, padding
included), speedups against the baseline of the same scenario (and the engine's TTFT against
``transformers + CUDA graph`` where it ran) and, on CUDA, GPU busy % and kernels
launched per prefill (:mod:`.profile`). A speedup above the FLOP ratio is flagged as suspect (the
baseline is slower than its FLOPs explain), and a spread of max/min above
``timing.NOISE_MAX_OVER_MIN`` as noisy. The pruning module is also timed alone (:mod:`.pruning`, the
home of that benchmark). Settings are checked once, in :meth:`ReportSettings.validate`; the tables
are drawn by :mod:`.render`.

Modules: ``workloads`` (requests), ``flops``, ``model_inputs`` (the unmodified model's inputs),
``graphed`` (its CUDA-graph steps), ``contenders``, ``pruning``, ``profile``, ``scenarios``, ``decode``, ``render``, ``settings``,
``run`` (:func:`run_report`).
"""
from .contenders import (
                        BASELINE,
                        CONTENDERS,
                        STAGES,
                        BenchSetup,
                        Contender,
                        ContenderUnavailable,
                        Keep,
                        engine_contender,
                        graphed_contender,
                        peers_contender,
                        transformers_contender,
                        vision_tower,
)
from .decode import Decoder, engine_decoder, run_decode, transformers_decoder
from .flops import count_flops, flop_counter, module_flops, sdpa_flops, varlen_flops
from .graphed import GRAPHED, GRAPHED_DESCRIPTION, GraphedModel, qwen_vision_metadata
from .model_inputs import MODEL_INPUTS, expanded_sequences, llava_model_inputs, model_inputs, qwen2_5_vl_model_inputs
from .profile import kernel_profile
from .pruning import pruning_calls, published_pruning_inputs, time_pruning_module
from .render import (
                        LEGEND,
                        format_decode,
                        format_markdown,
                        format_report,
                        format_scenario,
                        keep_label,
                        plot_report,
                        report_summary,
                        report_warnings,
)
from .run import report_stem, run_report
from .scenarios import SUSPECT_MARGIN, Scenario, build_scenarios, pruning_module_alone, run_scenario, serving_scenario
from .settings import DTYPES, ReportPlan, ReportSettings, SettingError
from .workloads import (
                        SERVING_ASPECTS,
                        SERVING_RATIOS,
                        SERVING_TEXT,
                        mixed_text_lengths,
                        request_text_tokens,
                        request_visual_tokens,
                        serving_image_processor,
                        serving_image_sizes,
                        serving_requests,
                        serving_visual_tokens,
                        supports_serving,
                        synthetic_image,
                        synthetic_prompt,
                        synthetic_requests,
)

__all__ = [
    "BASELINE", "CONTENDERS", "DTYPES", "GRAPHED", "GRAPHED_DESCRIPTION", "LEGEND", "MODEL_INPUTS", "SERVING_ASPECTS", "SERVING_RATIOS", "SERVING_TEXT", "STAGES",
    "SUSPECT_MARGIN", "BenchSetup", "Contender", "ContenderUnavailable", "Decoder", "GraphedModel", "Keep", "ReportPlan", "ReportSettings", "Scenario", "SettingError",
    "build_scenarios", "count_flops", "engine_contender", "engine_decoder", "expanded_sequences", "flop_counter", "format_decode",
    "format_markdown", "format_report", "format_scenario", "graphed_contender", "keep_label", "kernel_profile", "llava_model_inputs", "mixed_text_lengths",
    "model_inputs", "module_flops", "peers_contender", "plot_report", "pruning_calls", "pruning_module_alone",
    "published_pruning_inputs", "qwen2_5_vl_model_inputs", "qwen_vision_metadata", "report_stem", "report_summary", "report_warnings", "request_text_tokens",
    "request_visual_tokens", "run_decode", "run_report", "run_scenario", "sdpa_flops", "serving_image_processor", "serving_image_sizes",
    "serving_requests", "serving_scenario", "serving_visual_tokens", "supports_serving", "synthetic_image", "synthetic_prompt",
    "synthetic_requests", "time_pruning_module", "transformers_contender", "transformers_decoder", "varlen_flops", "vision_tower",
]
