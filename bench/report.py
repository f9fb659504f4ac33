"""The benchmark's report: results.json's numbers as results.md's tables, and the speed issue's targets.

Owns: the table rows of every path (baseline, server, int8 and multi-GPU servers, engine alone, warm
caches, the open loop's section from openloop.markdown_lines), the per-step breakdown, peak memory and
KV-blocks-free lines, the speed issue's goals (`targets`: goal, measured, status, gap) and the labels of
the multi-GPU layouts. Reads only the results dict, so `benchmark.py --markdown-only` rewrites results.md
without a GPU. Does not own: the runs that fill results.json or the command line (benchmark.py), the
load generators and their rows (loadgen.py, openloop.py), the figure (plot.py).
"""
from __future__ import annotations

from pathlib import Path

import openloop

LAYOUT_LABELS = {"tp2": "Triton server, tensor parallel over 2 GPUs", "tp4": "Triton server, tensor parallel over 4 GPUs",
                 "dp2": "Triton server, data parallel on 2 GPUs", "dp4": "Triton server, data parallel on 4 GPUs"}


def int8_weight_bytes_per_step(bf16_bytes: int, llm: dict | None = None) -> int:
    """The bf16 step's bytes with the seven projections int8 (1 byte per weight + a float32 scale per
    output channel), at the V1-1 LLaMA shapes."""
    from internvl_serve.random_weights import V1_1_SHEET_CONFIG

    c = llm or V1_1_SHEET_CONFIG["llm_config"]
    h, f, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    weights = n * (4 * h * h + 3 * h * f)
    scales = n * (5 * h + 2 * f)
    return bf16_bytes - 2 * weights + weights + 4 * scales


def _engine_alone_keys(results: dict) -> list[str]:
    return [k for k in results if k.startswith("engine_alone") and isinstance(results[k], dict)]


def _compare_runs(results: dict) -> list[tuple[str, str]]:
    """The --server-compare runs: (key, spec) of each results["server[<spec>]"]."""
    return [(k, k[len("server["):-1]) for k in results
            if k.startswith("server[") and k.endswith("]") and isinstance(results[k], list)]


def _cpu_lines(rows: list[tuple[str, dict]]) -> list[str]:
    """The table of cores each process kept busy during each server level (proc_cpu.py): a process near
    1.0 is a single thread's ceiling (the load generator, the gRPC guard: one asyncio loop each)."""
    if not rows:
        return []
    names = list(dict.fromkeys(name for _, row in rows for name in row["cpu_cores"]))
    lines = ["", "CPU cores each process kept busy during each server level (CPU seconds / the level's wall "
             "time, from /proc; '<model> children': the processes a model's stubs started, the llm's engine "
             "process):", "", "| path | streams | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for label, row in rows:
        cells = [row["cpu_cores"].get(name) for name in names]
        lines.append(f"| {label} | {row['concurrency']} | "
                     + " | ".join("" if c is None else f"{c:.2f}" for c in cells) + " |")
    return lines


def _server_row(results: dict, key: str, streams: int) -> dict | None:
    return next((r for r in results.get(key, []) if r["concurrency"] == streams), None)


def targets(results: dict) -> list[dict]:
    """The speed issue's targets beside the measured values: name, goal, measured, status, gap."""
    floor = results.get("hbm_floor_ms")
    seq = results.get("baseline_sequential", {}).get("output_tok_per_s")
    rows = []

    def add(name, goal, value, limit, kind, unit="", fmt="{:.1f}"):
        if value is None or limit is None or value != value:
            rows.append({"target": name, "goal": goal, "measured": "not measured", "status": "n/a", "gap": ""})
            return
        met = value <= limit if kind == "max" else value >= limit
        factor = value / limit if kind == "max" else limit / value
        gap = "" if met else (f"{factor:.2f}x over ({100 * (factor - 1):.0f}% above the goal)" if kind == "max"
                              else f"{factor:.2f}x short (reaches {100 / factor:.0f}% of the goal)")
        rows.append({"target": name, "goal": goal, "measured": fmt.format(value) + unit,
                     "status": "met" if met else "missed", "gap": gap, "value": value, "limit": limit})

    for key, label in (("server", ""), ("server_int8", " (int8 weights)")):
        if key != "server" and key not in results:
            continue
        one = _server_row(results, key, 1)
        itl = one["itl_p50_ms"] if one else None
        goal = f"<= 1.2x the bf16 HBM floor ({1.2 * floor:.2f} ms)" if floor else "<= 1.2x the HBM floor"
        add(f"ITL p50 at 1 stream{label}", goal, itl, 1.2 * floor if floor else None, "max",
            " ms" + (f" = {itl / floor:.2f}x the floor" if itl and floor else ""))
        add(f"TTFT p50 at 1 stream{label}", "<= 80 ms", one["ttft_p50_ms"] if one else None, 80.0, "max", " ms",
            "{:.0f}")
    r32 = _server_row(results, "server", 32)
    r64 = _server_row(results, "server", 64)
    add("output tok/s at 32 streams", ">= 2000 tok/s", r32["output_tok_per_s"] if r32 else None, 2000.0, "min",
        " tok/s")
    add("output tok/s at 64 streams", ">= 2800 tok/s", r64["output_tok_per_s"] if r64 else None, 2800.0, "min",
        " tok/s")
    add("speed-up at 32 streams over sequential transformers chat", ">= 60x",
        r32["output_tok_per_s"] / seq if r32 and seq else None, 60.0, "min", "x")
    add("ITL p50 at 32 streams", "<= 20 ms", r32["itl_p50_ms"] if r32 else None, 20.0, "max", " ms")
    add("TTFT p50 at 32 streams", "<= 300 ms", r32["ttft_p50_ms"] if r32 else None, 300.0, "max", " ms", "{:.0f}")
    add("TTFT p95 at 32 streams", "<= 800 ms", r32["ttft_p95_ms"] if r32 else None, 800.0, "max", " ms", "{:.0f}")
    alone = results.get("engine_alone", {})
    a32 = next((r for r in alone.get("levels", []) if r["concurrency"] == 32), None) if "levels" in alone else None
    add("the server within 15 % of the engine alone at 32 streams", ">= 0.85x the engine alone",
        r32["output_tok_per_s"] / a32["output_tok_per_s"] if r32 and a32 else None, 0.85, "min", "x", "{:.2f}")
    add("vision ms/image at batch 8 (eager)", "<= 17 ms", results.get("vision_ms_per_image_b8"), 17.0, "max", " ms")
    if "vision_compiled_ms_per_image_b8" in results:
        add("vision ms/image at batch 8 (compiled blocks, as served)", "<= 17 ms",
            results["vision_compiled_ms_per_image_b8"], 17.0, "max", " ms")
    if "vision_fp8_compiled_ms_per_image_b8" in results:
        add("vision ms/image at batch 8 (fp8 matmuls, compiled; opt-in)", "<= 17 ms",
            results["vision_fp8_compiled_ms_per_image_b8"], 17.0, "max", " ms")
    after = results.get("server_after", {})
    kv = after.get("kv_blocks_used_after")
    if r64 is None:
        rows.append({"target": "64 streams", "goal": "no error, no OOM; every KV block free after the run",
                     "measured": "not measured", "status": "n/a", "gap": ""})
    else:
        kv_text = ("not measured" if "server_after" not in results else "not available") if kv is None else str(kv)
        status = "missed" if r64["errors"] or (kv is not None and kv != 0) else (
            "met" if kv == 0 else f"no errors; KV check {kv_text}")
        rows.append({"target": "64 streams", "goal": "no error, no OOM; every KV block free after the run",
                     "measured": f"{r64['errors']} errors of {r64['requests']}; KV blocks in use after: {kv_text}",
                     "status": status,
                     "gap": f"first error: {r64.get('first_error')}" if r64["errors"] else
                            (f"{kv} blocks still held" if kv else "")})
    return rows


def _level_line(label: str, row: dict) -> str:
    """One closed-loop level (loadgen.summarize's row) as a row of the speed table."""
    return (f"| {label} | {row['concurrency']} | {row['output_tok_per_s']:.1f} | "
            f"{row['ttft_p50_ms']:.0f} / {row['ttft_p95_ms']:.0f} | "
            f"{row['itl_p50_ms']:.1f} / {row['itl_p95_ms']:.1f} | {row['errors']} |")


def markdown(results: dict) -> str:
    floor_ms = results["hbm_floor_ms"]
    seq = results.get("baseline_sequential", {})
    int8_bytes = int8_weight_bytes_per_step(results["llm_weight_bytes_per_step"])
    lines = [
        f"Device: {results['device']}; date {results['date']}; commit {results['commit']}.",
        f"HBM floor of one decode step: {results['llm_weight_bytes_per_step'] / 1e9:.2f} GB of LLM weights / "
        f"{results['copy_bandwidth_gbs']:.0f} GB/s copy bandwidth = {floor_ms:.2f} ms"
        + (f" (int8 projections: {int8_bytes / 1e9:.2f} GB, "
           f"{int8_bytes / (results['copy_bandwidth_gbs'] * 1e9) * 1e3:.2f} ms)." if "server_int8" in results else "."),
        f"Vision (bf16, our encoder): {results.get('vision_ms_per_image_b1', float('nan')):.1f} ms/image at batch 1, "
        f"{results.get('vision_ms_per_image_b8', float('nan')):.1f} ms/image at batch 8"
        + (f"; with each block torch.compiled (as the server runs it): "
           f"{results['vision_compiled_ms_per_image_b1']:.1f} and {results['vision_compiled_ms_per_image_b8']:.1f}."
           if "vision_compiled_ms_per_image_b8" in results else ".")
        + (f" With the vision model's `quantization: fp8` (the blocks' matmuls in e4m3, opt-in): "
           f"{results['vision_fp8_compiled_ms_per_image_b1']:.1f} and {results['vision_fp8_compiled_ms_per_image_b8']:.1f}, "
           f"embeddings {100 * results['vision_fp8_relative_error_b8']:.1f} % from bf16 (relative L2, random weights)."
           if "vision_fp8_compiled_ms_per_image_b8" in results else ""),
        ("Every request sent its own image (nothing cached)." if results.get("images", "distinct") == "distinct" else
         "Every request sent the same image: after the first, the KV prefix cache (and the vision embedding "
         "cache, where the server has one) hit, so TTFT is the warm-cache case."),
        "",
        "| path | streams | output tok/s | TTFT p50 / p95 ms | ITL p50 / p95 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    speed_rows: list[tuple[str, dict]] = []  # (label, level row) of the server and engine-alone rows
    if seq:
        for r in results.get("baseline_sequential_by_attention", {"": seq}).values():
            attn = f" ({r['attention']} attention)" if r.get("attention") else ""
            lines.append(f"| transformers chat, sequential{attn} | 1 | {r['output_tok_per_s']:.1f} | | "
                         f"{1e3 / r['output_tok_per_s']:.1f} (mean) | 0 |")
    if "baseline_batch_chat" in results:
        b = results["baseline_batch_chat"]
        lines.append(f"| transformers batch_chat | {b['batch']} | {b['output_tok_per_s']:.1f} | | | 0 |")
    for key, label in (("server", "Triton server (gRPC stream)"), ("server_int8", "Triton server, int8 weights"),
                       *((k, LAYOUT_LABELS[k[len('server_'):]]) for k in results
                         if k.startswith("server_") and k[len('server_'):] in LAYOUT_LABELS),
                       *((k, f"Triton server (gRPC stream; {spec})") for k, spec in _compare_runs(results))):
        for row in results.get(key, []) if isinstance(results.get(key), list) else []:
            lines.append(_level_line(label, row))
            speed_rows.append((label, row))
        for row in results.get(f"{key}_direct", []):  # --direct-levels: the same server, past the gRPC guard
            lines.append(_level_line(f"{label}, past the gRPC guard", row))
            speed_rows.append((f"{label}, past the gRPC guard", row))
    for key in _engine_alone_keys(results):
        label = "llm engine alone (in-process, no Triton" + (f"; {key[len('engine_alone['):-1]}" if "[" in key else "") + ")"
        if "error" in results[key]:
            lines.append(f"| {label} | | {results[key]['error']} | | | |")
        for row in results[key].get("levels", []):
            lines.append(_level_line(label, row))
            speed_rows.append((label, row))
    steps = [(label, row) for label, row in speed_rows if row.get("engine_steps")]
    if steps:
        lines += ["", "The llm engine during each level (its own counters, the same in the server and alone): "
                  "milliseconds of engine-thread work per launched step, and the share of that work spent "
                  "waiting for the GPU (near 1: the GPU sets the pace; lower: the host does):", "",
                  "| path | streams | steps | ms of work per step | waiting for the GPU |", "|---|---|---|---|---|"]
        for label, row in steps:
            e = row["engine_steps"]
            lines.append(f"| {label} | {row['concurrency']} | {e['steps']} | {e['ms_per_step']:.2f} | "
                         f"{100 * e['device_wait_share']:.0f} % |")
    stages = [(label, row) for label, row in speed_rows if row.get("ttft_stages") and "ttft_mean_ms" in row]
    if stages:
        lines += ["", "Where each server level's time to first token went (means per request, ms, from the server's "
                  "metrics over the level; a batch's compute counts for each of its requests; the llm stub: "
                  "Triton's queue in front of it and its execute, which hands the image rows to the engine and "
                  "submits; the rest: gRPC and the ensemble's hand-offs, and the llm stub's part where a row "
                  "lacks it):", "",
                  "| path | streams | TTFT mean | preprocess queue / compute | vision queue / compute | "
                  "llm stub queue / execute | llm submit -> first token (queue + prefill) | rest |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, row in stages:
            st = row["ttft_stages"]

            def pair(model):
                q, c = st.get(f"{model}_queue_ms"), st.get(f"{model}_compute_ms")
                return " / ".join("" if v is None else f"{v:.1f}" for v in (q, c))
            parts = [st.get(k) for k in ("preprocess_queue_ms", "preprocess_compute_ms", "vision_queue_ms",
                                          "vision_compute_ms", "llm_first_token_ms")]
            stub = [st.get(k, 0.0) for k in ("llm_stub_queue_ms", "llm_stub_compute_ms")]  # not in older rows
            rest = "" if None in parts else f"{row['ttft_mean_ms'] - sum(parts) - sum(stub):.1f}"
            llm, queue, prefill = (st.get(f"llm_{k}_ms") for k in ("first_token", "queue", "prefill"))
            llm = "" if llm is None else f"{llm:.1f}" + (
                "" if queue is None or prefill is None else f" ({queue:.1f} + {prefill:.1f})")
            lines.append(f"| {label} | {row['concurrency']} | {row['ttft_mean_ms']:.1f} | {pair('preprocess')} | "
                         f"{pair('vision')} | {pair('llm_stub')} | {llm} | {rest} |")
    rounds = [(label, row) for label, row in speed_rows if "ttft_later_p50_ms" in row]
    if rounds:
        lines += ["", "Time to first token of each level's opening burst (every stream's first request, all sent "
                  "at once) and of its later rounds (each sent as its stream's last answer ended):", "",
                  "| path | streams | opening burst: requests, TTFT p50 / p95 ms | later rounds: requests, "
                  "TTFT p50 / p95 ms |", "|---|---|---|---|"]
        for label, row in rounds:
            lines.append(f"| {label} | {row['concurrency']} | {row['ttft_opening_requests']}: "
                         f"{row['ttft_opening_p50_ms']:.0f} / {row['ttft_opening_p95_ms']:.0f} | "
                         f"{row['ttft_later_requests']}: {row['ttft_later_p50_ms']:.0f} / "
                         f"{row['ttft_later_p95_ms']:.0f} |")
    lines += _cpu_lines([(label, row) for label, row in speed_rows if row.get("cpu_cores")])
    if results.get("server_warm"):
        lines += ["", "Warm caches (the same server after the rows above; every request sends the same image, so "
                  "the vision embedding cache and the KV prefix cache hit):", "",
                  "| path | streams | output tok/s | TTFT p50 / p95 ms | ITL p50 / p95 ms | errors |",
                  "|---|---|---|---|---|---|"]
        for row in results["server_warm"]:
            lines.append(_level_line("Triton server, same image", row))
        for warm in results["server_warm"]:
            cold = _server_row(results, "server", warm["concurrency"])
            if cold and warm["concurrency"] > 1:
                lines += ["", f"At {warm['concurrency']} streams, new images (vision + prefill of the image rows "
                          f"for every request) against the same image (both cached): output tok/s "
                          f"{cold['output_tok_per_s']:.0f} vs {warm['output_tok_per_s']:.0f}, ITL p50 "
                          f"{cold['itl_p50_ms']:.1f} vs {warm['itl_p50_ms']:.1f} ms "
                          f"({100 * (cold['itl_p50_ms'] / warm['itl_p50_ms'] - 1):+.0f} %)."]
    for key in [k for k in results if k == "open_loop" or k.startswith("open_loop[")]:
        if results[key]:
            lines += openloop.markdown_lines(results[key], key.removeprefix("open_loop")[1:-1])
    profiles = [(k, r) for k in _engine_alone_keys(results) for r in results[k].get("profile", [])]
    if profiles:
        lines += ["", "Per decode step, engine alone, steady decode (torch.profiler; GPU busy = union of kernel and "
                  "copy intervals):", "",
                  "| engine | streams | wall ms/step | GPU busy ms/step | GPU idle ms/step |", "|---|---|---|---|---|"]
        for key, r in profiles:
            name = key[len("engine_alone["):-1] if "[" in key else "default"
            lines.append(f"| {name} | {r['concurrency']} | {r['wall_ms_per_step']:.2f} | "
                         f"{r['gpu_busy_ms_per_step']:.2f} | {r['host_gap_ms_per_step']:.2f} |")
    lines += ["", f"Peak GPU memory: baseline {results.get('baseline_peak_gpu_mib', float('nan')):.0f} MiB "
                  f"(torch), server {results.get('server_peak_gpu_mib', float('nan')):.0f} MiB (nvidia-smi, device)"
                  + (f", int8 server {results['server_int8_peak_gpu_mib']:.0f} MiB"
                     if "server_int8_peak_gpu_mib" in results else "") + "."]
    for key, label in (("server", "server"), ("server_int8", "int8 server"),
                       *((f"server_{n}", LAYOUT_LABELS[n]) for n in LAYOUT_LABELS),
                       *((k, f"server with {spec}") for k, spec in _compare_runs(results))):
        if key not in results:
            continue
        after = results.get(f"{key}_after")
        if after is None:
            lines.append(f"KV blocks in use after the {label} run: not measured (a run before this check existed).")
            continue
        used = after.get("kv_blocks_used_after")
        total = after.get("kv_blocks_total")
        text = ("not available (the server exports no internvl_kv_cache_blocks_used"
                + (f": {after['metrics_error']}" if after.get("metrics_error") else "") + ")") if used is None \
            else f"{used}" + (f" of {total}" if total is not None else "")
        cache = ""
        if after.get("image_cache_hits") is not None:
            cache = (f"; vision embedding cache: {after['image_cache_hits']} hits, "
                     f"{after.get('image_cache_misses')} misses")
        if after.get("preemptions") is not None:
            cache += f"; requests preempted for KV blocks: {after['preemptions']}"
        if after.get("encoder_wait_s") is not None:
            cache += f"; decode steps held for the vision encoder: {after['encoder_wait_s']:.1f} s in all"
        lines.append(f"KV blocks in use after the {label} run: {text}{cache}.")
    lines += ["", "Against the speed issue's targets:", "",
              "| target | goal | measured | status | gap |", "|---|---|---|---|---|"]
    for t in targets(results):
        lines.append(f"| {t['target']} | {t['goal']} | {t['measured']} | {t['status']} | {t['gap']} |")
    return "\n".join(lines) + "\n"


def targets_for_json(results: dict) -> list[dict]:
    """targets() as results.json keeps them: without the raw value and limit."""
    return [{k: v for k, v in t.items() if k not in ("value", "limit")} for t in targets(results)]


def write_markdown(results: dict, out_dir: Path) -> str:
    """results.md under out_dir; returns its text (the caller prints it)."""
    table = markdown(results)
    (out_dir / "results.md").write_text(table)
    return table
