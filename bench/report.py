"""Writes a run's results: result.json, report.md (tables) and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

PATHS = [  # (key in the results, label)
    ("engine", "engine in-process (no Triton)"),
    ("triton", "Triton granite_vision (Python client)"),
    ("perf_analyzer", "Triton granite_vision (perf_analyzer)"),
    ("ensemble", "Triton granite_vision_ensemble (Python client)"),
]


def write_json(out_dir: Path, result: dict) -> Path:
    path = out_dir / "result.json"
    path.write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def _f(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def _row(label: str, level, s: dict) -> str:
    if "tokens_per_s" not in s:
        return f"| {label} | {level} | {s.get('requests', 0)} | failed: {s.get('error_examples')} |||||||||"
    t, i = s["ttft_ms"], s["itl_ms"]
    errors = f" ({s['errors']} failed)" if s.get("errors") else ""
    return (f"| {label} | {level} | {s['requests']}{errors} | {_f(s['tokens_per_s'])} | {_f(s['requests_per_s'], 2)} | "
            f"{_f(t['p50'], 0)} | {_f(t['p95'], 0)} | {_f(t['p99'], 0)} | "
            f"{_f(i['p50'], 2)} | {_f(i['p95'], 2)} | {_f(i['p99'], 2)} |")


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Benchmark {result['started']}", "",
             f"Wall time {_f(result.get('wall_s', math.nan) / 60, 1)} min. Machine: {m['cpus']} CPUs, "
             f"fp32 matmul {_f(m['matmul_gflops'])} GFLOP/s (best of MKL and oneDNN), memory {_f(m['bandwidth_gbs'])} GB/s "
             f"(copy {_f(m['copy_gbs'])}, read {_f(m['read_gbs'])}); load average at start {m['loadavg_start']}, "
             f"end {m.get('loadavg_end')}. Served with compile_backend "
             f"`{result['args'].get('compile', 'eager')}` and cpu_gemm `{result['args'].get('cpu_gemm', 'mkl')}`.", ""]
    for name, ck in result["checkpoints"].items():
        lines += [f"## {name}: `{ck['checkpoint']}`", "",
                  f"{ck['params_m']:.1f} M parameters; prompts of {ck.get('prompt_tokens', '?')} tokens "
                  f"(one {ck['image_size'][0]}x{ck['image_size'][1]} image), {ck['max_tokens']} new tokens each, "
                  f"greedy. Requests per level: {ck['requests_per_level']}.", "",
                  "| path | concurrency | requests | tokens/s | requests/s | TTFT p50 ms | p95 | p99 | "
                  "ITL p50 ms | p95 | p99 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        if "transformers" in ck:
            lines.append(_row("transformers generate()", "1 (serial)", ck["transformers"]))
        for key, label in PATHS:
            for level, summary in ck.get(key, {}).items():
                lines.append(_row(label, level, summary))
        pa = {c: v["own"] for c, v in ck.get("perf_analyzer_own", {}).items()}
        if pa:
            lines += ["", "perf_analyzer's own summary (its latency runs from sending to the last response): " +
                      "; ".join(f"c={c}: {_f(v['infer_per_s'], 2)} infer/s, {_f(v['responses_per_s'], 1)} "
                                f"responses/s, latency p50 {_f(v['latency_p50_ms'], 0)} ms" for c, v in pa.items())]
        r = ck.get("ratios", {})
        if r:
            lines += ["", "| ratio | value |", "|---|---|"]
            for key, value in r.items():
                lines.append(f"| {key} | {_f(value, 2) if isinstance(value, (int, float)) else value} |")
        if ck.get("peer", {}).get("comparison"):
            from bench.phases import peer_compare

            lines += peer_compare.markdown(ck["peer"]["comparison"])
        if ck.get("openai", {}).get("comparison"):
            from bench.phases import openai_front

            lines += openai_front.markdown(ck["openai"])
        if "proxy" in ck:
            from bench.phases import proxy

            lines += proxy.markdown(ck["proxy"])
        if ck.get("prefix"):
            from bench.phases import prefix

            lines += prefix.markdown(ck["prefix"])
        if ck.get("documents"):
            from bench.phases import documents

            lines += documents.markdown(ck["documents"])
        if ck.get("structured"):
            from bench.phases import structured

            lines += structured.markdown(ck["structured"])
        roof = ck.get("roofline")
        if roof:
            lines += ["", f"Roofline ({roof['crops']} crops per image, prompt {roof['prompt_tokens']} tokens, "
                          f"decode at context {roof['decode_context']}):", "",
                      "| phase | measured ms | roofline ms | bound | GFLOP/s | GB/s | fraction of roofline |",
                      "|---|---|---|---|---|---|---|"]
            for phase, v in roof.items():
                if isinstance(v, dict) and "fraction" in v:
                    lines.append(f"| {phase} | {_f(v['measured_ms'])} | {_f(max(v['compute_ms'], v['memory_ms']))} | "
                                 f"{v['bound']} | {_f(v['achieved_gflops'])} | {_f(v['achieved_gbs'])} | "
                                 f"{_f(v['fraction'], 2)} |")
        lines.append("")
    if result.get("full"):
        from bench.phases import full

        lines += ["## full: the 2b shape", *full.markdown(result["full"]), ""]
    targets = result.get("targets", [])
    if targets:
        lines += ["## Targets", "", "| checkpoint | target | value | met |", "|---|---|---|---|"]
        for t in targets:
            lines.append(f"| {t['checkpoint']} | {t['name']} {t['target']} | {_f(t['value'], 2)} | "
                         f"{'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def plots(out_dir: Path, result: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    written = []
    for name, ck in result["checkpoints"].items():
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for key, label in PATHS:
            series = {int(c): s["tokens_per_s"] for c, s in ck.get(key, {}).items() if "tokens_per_s" in s}
            if series:
                xs = sorted(series)
                ax.plot(xs, [series[x] for x in xs], marker="o", label=label)
        hf = ck.get("transformers", {}).get("tokens_per_s")
        if hf:
            ax.axhline(hf, color="grey", linestyle="--", label="transformers generate(), serial")
        ax.set(xlabel="concurrent streams", ylabel="generated tokens/s", title=f"{name}: throughput vs concurrency")
        _log_axis(ax.xaxis, result["levels"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / f"{name}-throughput.png"))

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        panels = ((axes[0], "ttft_ms", "time to first token"), (axes[1], "itl_ms", "inter-token latency"))
        for ax, metric, title in panels:
            for (key, label), color in zip(PATHS, ("C0", "C1", "C2", "C3")):
                data = {int(c): s[metric] for c, s in ck.get(key, {}).items() if metric in s}
                if not data:
                    continue
                xs = sorted(data)
                for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
                    ax.plot(xs, [data[x][q] for x in xs], style, color=color, marker="o", markersize=3,
                            label=f"{label} {q}" if metric == "ttft_ms" else None)
            ax.set(yscale="log", xlabel="concurrent streams", ylabel="ms", title=f"{name}: {title}")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            _log_axis(ax.xaxis, result["levels"])
            ax.grid(alpha=0.3)
        fig.legend(fontsize=6, loc="lower center", ncol=4, bbox_to_anchor=(0.5, -0.12))
        written.append(_save(fig, out_dir / f"{name}-latency.png"))
    return written


def _log_axis(axis, levels: list[int]) -> None:
    """Concurrency on a log2 axis, labelled with the levels themselves."""
    from matplotlib.ticker import NullLocator

    axis.axes.set_xscale("log", base=2)
    axis.set_ticks(levels, [str(c) for c in levels])
    axis.set_minor_locator(NullLocator())


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")  # keeps a legend placed below the axes
    plt.close(fig)
    return path
