"""Plot bench/results/results.json (bench/benchmark.py's output): throughput, TTFT and ITL against concurrency.

    python bench/plot.py [--results bench/results/results.json] [--out bench/results/throughput_latency.png]

Three panels over the server's concurrency levels (1/8/32/64 streams, log axis): output tokens/s; time to
first token p50 (p95 as a band); inter-token latency p50 (p95 as a band). The transformers baseline
(sequential chat, batch_chat of 8) is drawn as reference lines, the speed issue's goals dotted, and the int8
server's points (benchmark.py --int8) where present. Headless (matplotlib's Agg backend).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = sorted(rows, key=lambda r: r["concurrency"])
    return [r["concurrency"] for r in rows], [r[key] for r in rows]


def plot(results: dict, out: Path) -> Path:
    server, int8 = results.get("server", []), results.get("server_int8", [])
    if not server and not int8:
        raise ValueError("results.json holds no server rows (run benchmark.py without --skip-server)")
    levels = sorted({r["concurrency"] for r in server + int8})
    fig, (ax_tok, ax_ttft, ax_itl) = plt.subplots(1, 3, figsize=(16, 4.8), constrained_layout=True)
    fig.suptitle(f"InternVL-Chat-V1-1 on Triton: {results.get('device', '?')}, {results.get('date', '?')}, "
                 f"commit {results.get('commit', '?')}; {results.get('new_tokens', 256)} new tokens per request")

    # throughput
    x, y = series(server, "output_tok_per_s")
    ax_tok.plot(x, y, "o-", color="C0", label="Triton server (gRPC stream)")
    for xi, yi in zip(x, y):
        ax_tok.annotate(f"{yi:.0f}", (xi, yi), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    if int8:
        xi, yi = series(int8, "output_tok_per_s")
        ax_tok.plot(xi, yi, "s--", color="C3", label="Triton server, int8 weights")
    seq = results.get("baseline_sequential", {}).get("output_tok_per_s")
    if seq:
        ax_tok.axhline(seq, color="C7", ls="-", lw=1, label=f"transformers chat, sequential ({seq:.0f})")
    batch = results.get("baseline_batch_chat")
    if batch:
        ax_tok.plot([batch["batch"]], [batch["output_tok_per_s"]], "D", color="C2",
                    label=f"transformers batch_chat x{batch['batch']} ({batch['output_tok_per_s']:.0f})")
    ax_tok.plot([32], [2000], "*", color="k", ms=10, label="goal: 2000 tok/s at 32 streams")
    ax_tok.set_ylabel("output tokens/s")
    ax_tok.set_title("throughput")

    # latencies: p50 line, p95 band
    for ax, key, title in ((ax_ttft, "ttft", "time to first token"), (ax_itl, "itl", "inter-token latency")):
        x, p50 = series(server, f"{key}_p50_ms")
        _, p95 = series(server, f"{key}_p95_ms")
        ax.plot(x, p50, "o-", color="C0", label="server p50")
        ax.fill_between(x, p50, p95, color="C0", alpha=0.15, label="server p50..p95")
        if int8:
            xi, yi = series(int8, f"{key}_p50_ms")
            ax.plot(xi, yi, "s--", color="C3", label="int8 server p50")
        ax.set_ylabel("ms")
        ax.set_title(title)
    ax_ttft.axhline(80, color="k", ls=":", lw=1, label="goal: 80 ms at 1 stream")
    floor = results.get("hbm_floor_ms")
    if floor:
        ax_itl.axhline(floor, color="C1", ls="-", lw=1, label=f"HBM floor of a decode step ({floor:.1f} ms)")
        ax_itl.axhline(1.2 * floor, color="k", ls=":", lw=1, label=f"goal at 1 stream: 1.2x floor ({1.2 * floor:.1f})")
    if seq:
        ax_itl.axhline(1e3 / seq, color="C7", ls="-", lw=1, label=f"transformers chat ({1e3 / seq:.1f} ms, mean)")

    for ax in (ax_tok, ax_ttft, ax_itl):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(v) for v in levels])
        ax.minorticks_off()
        ax.set_xlabel("concurrent streams")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "results.json")
    parser.add_argument("--out", type=Path, default=None, help="default: throughput_latency.png next to --results")
    args = parser.parse_args(argv)
    out = args.out or args.results.parent / "throughput_latency.png"
    print(plot(json.loads(args.results.read_text()), out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
