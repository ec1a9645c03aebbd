"""The report as text (the terminal), markdown (the README's tables) and a PNG, plus the summary and
warning lines, all from the report's JSON-able dict."""
from __future__ import annotations

from typing import Optional

from .contenders import BASELINE, Keep
from .graphed import GRAPHED

LEGEND = (
    "legend: config = visual tokens kept per image (all N, or K); seq = longest LLM sequence of the batch "
    "(text + kept visual tokens); padded = tokens the LLM runs over (batch x longest for padded contenders, "
    "the sum of the sequences for the packed engine); prepare = host preparation (prompt checks, placeholder "
    "expansion, position ids; the transformers baseline gets its processor's inputs ready-made and computes its "
    "positions inside its forward); vision = vision tower; pruning = Scorer + top-K selection; pack = everything "
    "between pruning and the LLM (projector, embeddings, positions, packing or padding, merging); LLM prefill = "
    "language model + lm_head on the last token; TTFT = time from the requests to first-token logits, every "
    "stage included; GFLOPs = LLM prefill FLOPs as executed; TTFT x / prefill x = baseline time / this time; "
    "FLOP x = baseline FLOPs / these FLOPs (the speedup less work explains); '!' = speedup above FLOP x "
    f"(suspect); {GRAPHED} (CUDA only) = the unmodified model with its vision tower and its LLM each replayed "
    f"from one CUDA graph; TTFT x tf+graph = {GRAPHED}'s TTFT / the engine's; all times: median [min-max] over "
    "the repeats, ms."
)


def keep_label(keep: Keep) -> str:
    """``all``, ``K=64`` or ``r=0.222``."""
    if keep is None:
        return "all"
    return f"r={keep:.3f}" if isinstance(keep, float) else f"K={keep}"


def _config(r: dict) -> str:
    return keep_label(r["keep"])


def _row(scenario: dict, contender: str, keep) -> Optional[dict]:
    return next((r for r in scenario["rows"] if r["contender"] == contender and r["keep"] == keep), None)


def _gpu_measured(scenario: dict) -> bool:
    return all(r.get("gpu", {}).get("measured") for r in scenario["rows"])


def report_summary(report: dict) -> list[str]:
    """The headline ratios, one line each: the engine's own path against transformers, pruning against
    the baseline and its FLOP ratio, packing against the peers' padding, decoding speed."""
    lines = []
    for s in report["scenarios"]:
        base = s["rows"][0]
        for name in (GRAPHED, "engine"):
            full = _row(s, name, None)
            if full is not None:
                vs_graphed = f"; {1 / full['ttft_speedup_vs_graphed']:.2f}x the TTFT of {GRAPHED}" if "ttft_speedup_vs_graphed" in full else ""
                lines.append(f"{s['name']}: {'engine with every token kept' if name == 'engine' else name} takes "
                             f"{full['stages']['total']['median_ms'] / base['stages']['total']['median_ms']:.2f}x the TTFT of {base['contender']} "
                             f"(LLM prefill {full['stages']['prefill']['median_ms'] / base['stages']['prefill']['median_ms']:.2f}x){vs_graphed}")
        for r in s["rows"]:
            if r["contender"] == "engine" and r["keep"] is not None:
                x = r["speedup"]
                vs_graphed = f"; against {GRAPHED}: TTFT {r['ttft_speedup_vs_graphed']:.2f}x" if "ttft_speedup_vs_graphed" in r else ""
                vs_peers = f"; against the peers' padded batch: TTFT {r['ttft_speedup_vs_peers']:.2f}x (theirs / ours)" if "ttft_speedup_vs_peers" in r else ""
                lines.append(f"{s['name']}: engine {_config(r)}: prefill {x['prefill']:.2f}x, TTFT {x['ttft']:.2f}x faster than {base['contender']}; "
                             f"FLOP ratio {x['flops_ratio']:.2f}x (prefill speedup = {x['prefill'] / x['flops_ratio']:.2f} of it){vs_graphed}{vs_peers}")
    for d in report.get("decode", []):
        base = d["rows"][0]
        for r in d["rows"][1:]:
            lines.append(f"decode batch {d['batch']}: {r['contender']} {_config(r)}: decode {_rate(r['decode_tokens_per_s'])} tokens/s "
                         f"({_ratio(r['decode_tokens_per_s'], base['decode_tokens_per_s'])}x {base['contender']}'s generate), "
                         f"{r['generate_tokens_per_s']:.1f} tokens/s with the prefill "
                         f"({r['generate_tokens_per_s'] / base['generate_tokens_per_s']:.2f}x)")
    return lines


def report_warnings(report: dict) -> list[str]:
    """One NOISY line per scenario with spread-out measurements, one SUSPECT line per speedup above its FLOP
    ratio, one EAGER line per engine row whose graphed runner ran a stage eagerly."""
    lines = []
    threshold = report["noise_threshold_max_over_min"]
    for s in report["scenarios"]:
        noisy = [f"{r['contender']} {_config(r)} (" + ", ".join(
            f"{'TTFT' if stage == 'total' else 'prefill'} {r['stages'][stage]['max_ms'] / r['stages'][stage]['min_ms']:.2f}" for stage in r["noisy"]) + ")"
            for r in s["rows"] if r["noisy"]]
        if noisy:
            lines.append(f"NOISY {s['name']}: max/min above {threshold} for {'; '.join(noisy)}. The machine was busy: "
                         "re-run on a quiet machine (or with more --repeats) before quoting these numbers.")
        for r in s["rows"]:
            if r.get("eager_stages"):
                which = "; ".join(f"{stage}: " + ", ".join(f"{reason} x{n}" for reason, n in reasons.items())
                                  for stage, reasons in r["eager_stages"].items())
                lines.append(f"EAGER {s['name']}: {r['contender']} {_config(r)} ran stages without its CUDA graphs ({which}): "
                             "its time is the eager path's for those stages.")
            if r["suspect"]:
                which = ", ".join(f"{kind} {r['speedup'][kind]:.2f}x" for kind in r["suspect"])
                lines.append(f"SUSPECT {s['name']}: {r['contender']} {_config(r)}: speedup ({which}) above the FLOP ratio "
                             f"{r['speedup']['flops_ratio']:.2f}x: less work cannot explain it; the baseline was slow (or the run noisy).")
    for d in report.get("decode", []):
        noisy = [f"{r['contender']} {_config(r)} (" + ", ".join(f"{key} {r[key]['max_ms'] / r[key]['min_ms']:.2f}" for key in r["noisy"]) + ")"
                 for r in d["rows"] if r["noisy"]]
        if noisy:
            lines.append(f"NOISY decode batch {d['batch']}: max/min above {threshold} for {'; '.join(noisy)}. The machine was busy: "
                         "re-run on a quiet machine (or with more --repeats) before quoting these numbers.")
    return lines


def _cell(stage: dict, width: int) -> str:
    digits = 2 if stage["median_ms"] < 10 else 1
    return f"{stage['median_ms']:.{digits}f} [{stage['min_ms']:.{digits}f}-{stage['max_ms']:.{digits}f}]".rjust(width)


def _vs_graphed(scenario: dict) -> bool:
    return any("ttft_speedup_vs_graphed" in r for r in scenario["rows"])


def _absent(scenario: dict) -> list[str]:
    """One line per contender the scenario left out, with the reason."""
    return [f"{name}: not run ({reason})" for name, reason in scenario.get("absent", {}).items()]


def format_scenario(scenario: dict) -> str:
    gpu, graphed = _gpu_measured(scenario), _vs_graphed(scenario)
    width = max(12, *(len(r["contender"]) for r in scenario["rows"]))
    lines = [
        f"scenario {scenario['name']}: {scenario['description']}; baseline = {scenario['baseline']}",
        f"{'config':>7} {'contender':>{width}} {'seq':>5} {'padded':>7} {'prepare':>15} {'vision':>17} {'pruning':>15} {'pack':>15} "
        f"{'LLM prefill':>21} {'TTFT':>21} {'GFLOPs':>7} {'prefill x':>9} {'TTFT x':>7} {'FLOP x':>6}"
        + (f" {'TTFT x tf+graph':>15}" if graphed else "") + (f" {'GPU busy':>8} {'kernels':>7}" if gpu else ""),
    ]
    for r in scenario["rows"]:
        s, x = r["stages"], r["speedup"]
        mark = {k: "!" if k in r["suspect"] else " " for k in ("ttft", "prefill")}
        vs_graphed = f"{r['ttft_speedup_vs_graphed']:.2f}" if "ttft_speedup_vs_graphed" in r else "-"
        lines.append(
            f"{_config(r):>7} {r['contender']:>{width}} {max(r['sequence_lengths']):>5} {r['llm_tokens']:>7} {_cell(s['prepare'], 15)} "
            f"{_cell(s['vision'], 17)} {_cell(s['prune'], 15)} {_cell(s['pack'], 15)} {_cell(s['prefill'], 21)} {_cell(s['total'], 21)} "
            f"{r['prefill_flops'] / 1e9:>7.1f} {x['prefill']:>8.2f}{mark['prefill']} {x['ttft']:>6.2f}{mark['ttft']} {x['flops_ratio']:>6.2f}"
            + (f" {vs_graphed:>15}" if graphed else "") + (f" {r['gpu']['busy_pct']:>7.0f}% {r['gpu']['kernels']:>7}" if gpu else "")
        )
    lines += _absent(scenario)
    if not gpu:
        lines.append(f"GPU busy % and kernels per prefill: {_not_measured(scenario)}")
    for r in scenario["rows"]:
        if "ttft_speedup_vs_peers" in r:
            lines.append(f"engine {_config(r)} against the peers' padded batch at the same K: TTFT {r['ttft_speedup_vs_peers']:.2f}x (peers' TTFT / engine's)")
    if scenario["batch"] > 1:
        lines.append("per request (a batched prefill gives every request its first token when the batch ends: "
                     "per-request TTFT = the batch's TTFT above):")
        seqs = {(r["contender"], r["keep"]): r["sequence_lengths"] for r in scenario["rows"]}
        keys = list(seqs)
        labels = [f"{name} {keep_label(k)}" for name, k in keys]
        column = max(16, *(len(label) for label in labels))
        lines.append(f"{'request':>8} {'text':>5} {'N':>5} " + " ".join(f"{label:>{column}}" for label in labels)
                     + "   (LLM tokens of the request)")
        for i, (text, n) in enumerate(zip(scenario["text_tokens"], scenario["visual_tokens"])):
            lines.append(f"{i:>8} {text:>5} {n:>5} " + " ".join(f"{seqs[key][i]:>{column}}" for key in keys))
        for r in scenario["rows"]:
            real = sum(r["sequence_lengths"])
            lines.append(f"  {r['contender']} {_config(r)}: {real} real tokens, LLM runs over {r['llm_tokens']} "
                         f"({100 * (r['llm_tokens'] - real) / r['llm_tokens']:.0f} % padding)")
    return "\n".join(lines)


def _not_measured(scenario: dict) -> str:
    reasons = {r.get("gpu", {}).get("reason", "not measured") for r in scenario["rows"] if not r.get("gpu", {}).get("measured")}
    return "; ".join(sorted(reasons))


def _rate(value: Optional[float]) -> str:
    return "hidden in noise" if value is None else f"{value:.1f}"


def _ratio(value: Optional[float], base: Optional[float]) -> str:
    return "-" if value is None or base is None else f"{value / base:.2f}"


def format_decode(decode: dict) -> str:
    """One decode scenario: generate of 1 and of n tokens (median [min-max] ms), decode and end-to-end
    tokens per second, each against the baseline's."""
    n = decode["new_tokens"]
    base = decode["rows"][0]
    lines = [f"decode batch {decode['batch']}: {decode['description']}; baseline = {base['contender']}",
             f"{'config':>7} {'contender':>12} {'generate 1 token':>21} {f'generate {n} tokens':>21} {'decode tok/s':>15} {'x':>6} "
             f"{'generate tok/s':>15} {'x':>6}"]
    for r in decode["rows"]:
        same = r.get("same_tokens_as_baseline")
        note = "" if same is None else ("  greedy tokens = the baseline's" if same else "  greedy tokens differ from the baseline's")
        lines.append(
            f"{_config(r):>7} {r['contender']:>12} {_cell(r['one_token_ms'], 21)} {_cell(r['all_tokens_ms'], 21)} "
            f"{_rate(r['decode_tokens_per_s']):>15} {_ratio(r['decode_tokens_per_s'], base['decode_tokens_per_s']):>6} "
            f"{r['generate_tokens_per_s']:>15.1f} {r['generate_tokens_per_s'] / base['generate_tokens_per_s']:>6.2f}{note}"
        )
    return "\n".join(lines)


def format_report(report: dict) -> str:
    """The whole report as the terminal shows it."""
    env = report["environment"]
    lines = [
        f"{report['preset']} | {env['device']} | torch {env['torch']} | {report['dtype']} | N = {report['shapes']['visual_tokens_per_image']} | "
        f"median of {report['repeats']} interleaved rounds after {report['warmup']} warm-up [min-max], ms",
        f"baseline: {report['baseline']}",
        *_graphed_line(report),
        LEGEND,
    ]
    for scenario in report["scenarios"]:
        lines += ["", format_scenario(scenario)]
    for decode in report.get("decode", []):
        lines += ["", format_decode(decode)]
    single = report["scenarios"][0]
    lines.append("")
    for p in report["pruning_module_alone"]:
        inside = _row(single, "engine", p["keep"])
        share = inside["stages"]["prune"]["median_ms"] / inside["stages"]["total"]["median_ms"]
        lines.append(f"pruning module at K={p['keep']}: {p['median_ms']:.3f} ms timed alone, "
                     f"{inside['stages']['prune']['median_ms']:.3f} ms inside the engine's TTFT = {100 * share:.2f} % of TTFT")
    lines += ["", "summary (medians):", *(f"  {line}" for line in report["summary"])]
    if report["warnings"]:
        lines += ["", *report["warnings"]]
    return "\n".join(lines)


def _graphed_line(report: dict) -> list[str]:
    """The stronger baseline's description, when some scenario ran it."""
    ran = any(_row(s, GRAPHED, None) is not None for s in report["scenarios"])
    return [f"stronger baseline: {report['graphed_baseline']}"] if ran and "graphed_baseline" in report else []


def format_markdown(report: dict) -> str:
    """The README's tables: one per scenario, medians in ms, then the summary and any warnings."""
    env = report["environment"]
    out = [
        f"`{report['preset']}` preset, {env['device']}, torch {env['torch']}, transformers {env['transformers']}, {report['dtype']}; "
        f"median of {report['repeats']} interleaved rounds after {report['warmup']} warm-up (min-max in the JSON). "
        f"Baseline: {report['baseline']}.",
        *(f"{line[0].upper()}{line[1:]}." for line in _graphed_line(report)),
    ]
    for s in report["scenarios"]:
        gpu, graphed = _gpu_measured(s), _vs_graphed(s)
        out += ["", f"**{s['name']}** ({s['description']}):", "",
                "| config | contender | LLM seq | LLM tokens | prepare ms | vision ms | pruning ms | pack ms | LLM prefill ms | TTFT ms "
                "| prefill GFLOPs | prefill × | TTFT × | FLOP × |" + (f" TTFT × {GRAPHED} |" if graphed else "") + (" GPU busy | kernels |" if gpu else ""),
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if graphed else "") + ("---|---|" if gpu else "")]
        for r in s["rows"]:
            st, x = r["stages"], r["speedup"]
            mark = {k: " (!)" if k in r["suspect"] else "" for k in ("ttft", "prefill")}
            vs_graphed = f" {r['ttft_speedup_vs_graphed']:.2f}× |" if "ttft_speedup_vs_graphed" in r else " – |"
            out.append(
                f"| {_config(r)} | {r['contender']} | {max(r['sequence_lengths'])} | {r['llm_tokens']} | {st['prepare']['median_ms']:.1f} | "
                f"{st['vision']['median_ms']:.1f} | {st['prune']['median_ms']:.2f} | {st['pack']['median_ms']:.1f} | {st['prefill']['median_ms']:.1f} | "
                f"{st['total']['median_ms']:.1f} | {r['prefill_flops'] / 1e9:.1f} | {x['prefill']:.2f}×{mark['prefill']} | {x['ttft']:.2f}×{mark['ttft']} | "
                f"{x['flops_ratio']:.2f}× |" + (vs_graphed if graphed else "") + (f" {r['gpu']['busy_pct']:.0f} % | {r['gpu']['kernels']} |" if gpu else "")
            )
        for line in _absent(s):
            out += ["", f"{line}."]
        if not gpu:
            out += ["", f"GPU busy % and kernels per prefill: {_not_measured(s)}."]
    for d in report.get("decode", []):
        base = d["rows"][0]
        out += ["", f"**decode, batch {d['batch']}** ({d['description']}):", "",
                f"| config | contender | generate 1 token ms | generate {d['new_tokens']} tokens ms | decode tokens/s | × | "
                "generate tokens/s | × |", "|---|---|---|---|---|---|---|---|"]
        for r in d["rows"]:
            out.append(f"| {_config(r)} | {r['contender']} | {r['one_token_ms']['median_ms']:.1f} | {r['all_tokens_ms']['median_ms']:.1f} | "
                       f"{_rate(r['decode_tokens_per_s'])} | {_ratio(r['decode_tokens_per_s'], base['decode_tokens_per_s'])}× | "
                       f"{r['generate_tokens_per_s']:.1f} | {r['generate_tokens_per_s'] / base['generate_tokens_per_s']:.2f}× |")
    out += ["", *(f"* {line}" for line in report["summary"])]
    if report["warnings"]:
        out += ["", "Warnings of this run:", "", *(f"* {line}" for line in report["warnings"])]
    return "\n".join(out) + "\n"


def plot_report(report: dict, path: str) -> None:
    """TTFT against K for the single scenario, and one bar chart per batch scenario, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = report["scenarios"]
    fig, axes = plt.subplots(1, len(scenarios), figsize=(6 * len(scenarios), 4), squeeze=False)
    single = scenarios[0]
    ax = axes[0][0]
    colours = {"transformers": "tab:gray", GRAPHED: "tab:green", "engine": "tab:blue", "peers": "tab:orange"}
    for name in ("engine", "peers"):
        pruned = [r for r in single["rows"] if r["contender"] == name and r["keep"] is not None]
        if pruned:
            ax.plot([r["keep"] for r in pruned], [r["stages"]["total"]["median_ms"] for r in pruned], "o-", color=colours[name], label=f"{name}, pruned")
    for r in single["rows"]:
        if r["keep"] is None:
            ax.axhline(r["stages"]["total"]["median_ms"], color=colours[r["contender"]], linestyle="--" if r["contender"] != BASELINE else "-",
                       label=f"{r['contender']}, all {report['shapes']['visual_tokens_per_image']} tokens")
    ax.set_xlabel("visual tokens kept (K)")
    ax.set_ylabel("TTFT, ms (median)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{single['description'][:60]}", fontsize=8)
    ax.legend(fontsize=7)
    for scenario, ax in zip(scenarios[1:], axes[0][1:]):
        rows = scenario["rows"]
        labels = [f"{r['contender']}\n{_config(r)}" for r in rows]
        medians = [r["stages"]["total"]["median_ms"] for r in rows]
        errors = [[m - r["stages"]["total"]["min_ms"] for m, r in zip(medians, rows)], [r["stages"]["total"]["max_ms"] - m for m, r in zip(medians, rows)]]
        ax.bar(labels, medians, yerr=errors, color=[colours[r["contender"]] for r in rows], capsize=3)
        ax.set_ylabel("batch TTFT, ms (median, min-max)")
        ax.set_title(scenario["description"][:70], fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"{report['preset']} on {report['environment']['device']}, {report['dtype']}; baseline: unmodified transformers", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
