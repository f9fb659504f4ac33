"""Plot a soak's time series (loadtest/soak.py's soak.json): is anything growing?

    python loadtest/plot_soak.py SOAK_DIR          # writes SOAK_DIR/soak.png

Four panels against minutes since the streams started: output tokens/s and errors per interval; TTFT
p50/p95 and the mean inter-token latency; the server's RSS (tritonserver and its stubs); GPU memory
(device) and the llm's KV-cache blocks in use. The warm-up rows that soak.md leaves out of the memory
summary are shaded. Needs matplotlib (headless, Agg); soak.py calls it when matplotlib is importable.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def plot(data: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, settings, summary = data["rows"], data["settings"], data["summary"]
    if not rows:
        raise ValueError("the soak has no rows")
    minutes = [row["t_s"] / 60 for row in rows]

    def column(key: str) -> list[float]:
        return [float("nan") if row.get(key) is None else row[key] for row in rows]

    fig, axes = plt.subplots(2, 2, figsize=(14, 8), sharex=True, constrained_layout=True)
    (ax_tok, ax_lat), (ax_rss, ax_gpu) = axes
    fig.suptitle(f"Soak: {settings['streams']} streams, {summary['elapsed_s'] / 60:.1f} min, started "
                 f"{settings['started']}; {summary['requests']} requests, {summary['errors']} errors"
                 + (f"\n{settings['device']}" if settings.get("device") else ""))
    ax_tok.plot(minutes, column("output_tokens_per_s"), label="output tokens/s")
    ax_tok.set_ylabel("output tokens/s")
    ax_tok.set_ylim(bottom=0)
    failed = [(m, row["errors"]) for m, row in zip(minutes, rows) if row["errors"]]
    if failed:
        ax_err = ax_tok.twinx()
        ax_err.bar([m for m, _ in failed], [e for _, e in failed], width=0.3, color="tab:red", label="errors")
        ax_err.set_ylabel("errors per interval", color="tab:red")
        ax_err.set_ylim(bottom=0)
    ax_lat.plot(minutes, column("ttft_p50_ms"), label="TTFT p50")
    ax_lat.plot(minutes, column("ttft_p95_ms"), label="TTFT p95")
    ax_lat.plot(minutes, column("itl_mean_ms"), label="ITL mean")
    ax_lat.set_ylabel("ms")
    ax_lat.set_yscale("log")
    ax_lat.legend(loc="upper right")
    ax_rss.plot(minutes, column("server_rss_mib"), label="server RSS (tritonserver + stubs)")
    ax_rss.set_ylabel("MiB")
    steady = [row["server_rss_mib"] for row in rows
              if row.get("server_rss_mib") is not None and row["t_s"] >= (summary.get("memory_from_s") or 0)]
    if steady and max(column("server_rss_mib")) > 1.5 * max(steady):  # a warm-up spike would flatten the rest
        ax_rss.set_ylim(0.9 * min(steady), 1.1 * max(steady))
        ax_rss.annotate("warm-up peak above the scale", xy=(0.01, 0.97), xycoords="axes fraction", va="top",
                        fontsize=8)
    ax_rss.legend(loc="lower right")
    ax_gpu.plot(minutes, column("gpu_mem_used_mib"), label="GPU memory used (device)")
    ax_gpu.set_ylabel("GPU MiB")
    ax_kv = ax_gpu.twinx()
    ax_kv.plot(minutes, column("kv_blocks_used"), color="tab:green", alpha=0.7, label="KV blocks in use")
    ax_kv.set_ylabel("KV blocks in use", color="tab:green")
    ax_kv.set_ylim(bottom=0)
    ax_gpu.legend(loc="lower left")
    for ax in (ax_rss, ax_gpu):
        ax.set_xlabel("minutes since the streams started")
    start = summary.get("memory_from_s")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if start:
            ax.axvspan(0, start / 60, color="grey", alpha=0.12, lw=0)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a soak's --out folder (with soak.json)")
    args = parser.parse_args(argv)
    print(plot(json.loads((args.folder / "soak.json").read_text()), args.folder / "soak.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
