"""Human-readable numbers and the terminal breakdown of a simulated step."""

from __future__ import annotations


def seconds(value: float) -> str:
    if value >= 1:
        return f"{value:.3f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.2f} ms"
    return f"{value * 1e6:.1f} us"


def nbytes(value: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def serving_rows(s: dict) -> list[tuple[str, str]]:
    """The serving rows (prefill, decode summaries); none for other modes."""
    if "ttft_s" in s:
        rows = [("time to first token", seconds(s["ttft_s"])),
                ("input tokens/s per GPU", f"{s['input_tokens_per_s_per_gpu']:,.0f}")]
    elif "tpot_s" in s:
        rows = [("time per output token", seconds(s["tpot_s"])),
                ("output tokens/s per GPU", f"{s['output_tokens_per_s_per_gpu']:,.0f}")]
    else:
        return []
    return rows + [
        ("requests", f"{s['requests_per_step']:,} ({s['attention_dp']} attention-DP ranks "
                     f"x TP{s['attention_tp']}; isl {s['isl']}, osl {s['osl']})"),
        ("KV cache per GPU", f"{nbytes(s['kv_cache_bytes_per_gpu'])} ({s['kv_dtype']})"),
        ("TP all-reduces", f"attention {seconds(s['attention_tp_allreduce_time_s'])}, "
                           f"MoE (TP{s['moe_tp']}) {seconds(s['moe_tp_allreduce_time_s'])}"),
    ]


def routing_words(s: dict) -> str:
    """Where the step's routing comes from, in words."""
    if s["routing_source"] == "synthetic":
        words = f"synthetic, gate {s['routing_gate']}, {s['routing_draws']} layer draw(s)"
    else:
        how = ("the captured choices of gate" if s["routing_source"].endswith("(captured)")
               else "its stored scores re-routed by gate")
        words = f"trace {s['routing_trace']}: {how} {s['routing_gate']}"
    if s["placement"] != "contiguous":
        words += f"; placement {s['placement']}, {s['redundant_experts']} redundant experts"
    return words


def breakdown_rows(s: dict) -> list[tuple[str, str]]:
    """(label, value) rows shared by the terminal output and the report."""
    return [("routing", routing_words(s))] + serving_rows(s) + [
        ("step time", seconds(s["step_time_s"])),
        ("tokens/s", f"{s['tokens_per_s']:,.0f} ({s['tokens_per_s'] / s['gpus']:,.0f} per GPU)"),
        ("MFU", f"{s['mfu']:.1%} ({s['model_tflops_per_gpu']:.0f} model TFLOP/s per GPU)"),
        ("attention", seconds(s["attention_time_s"])),
        ("expert GEMMs", f"{seconds(s['expert_compute_time_s'])} "
                         f"(slowest GPU {seconds(s['expert_compute_max_time_s'])})"),
        ("shared experts", seconds(s["shared_expert_time_s"])),
        ("dense FFN + LM head", seconds(s["dense_ffn_time_s"] + s["lm_head_time_s"])),
        ("dispatch", seconds(s["dispatch_time_s"])),
        ("combine", seconds(s["combine_time_s"])),
        ("exposed communication", seconds(s["comm_exposed_time_s"])),
        ("waiting for slower peers", seconds(s["comm_wait_time_s"])),
        ("NVLink bytes", nbytes(s["nvlink_bytes"])),
        ("RDMA bytes", nbytes(s["rdma_bytes"])),
        ("busiest link class", s["bottleneck_link"]),
        ("GPU load max/mean", f"{s['max_over_mean_gpu_load']:.3f}"),
        ("dropped assignments", f"{s['tokens_dropped']:,} ({s['dropped_token_fraction']:.2%})"),
    ]


def headline(s: dict, topology: str) -> str:
    return (f"{s['scenario']}: {s['mode']} step on {s['gpus']} GPUs "
            f"({s['ep_groups']} x EP{s['ep']}, {s['nodes']} node(s) of {topology}), "
            f"{s['dispatch_kernel']}")


def format_summary(s: dict, topology: str) -> str:
    rows = breakdown_rows(s)
    width = max(len(label) for label, _ in rows)
    lines = [headline(s, topology)]
    lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    passes = "forward+backward" if s["mode"] == "train" else "the forward pass"
    lines.append("  (times are per GPU and per step, summed over layers, micro-batches and "
                 f"{passes}; see docs/metrics.md)")
    return "\n".join(lines)
