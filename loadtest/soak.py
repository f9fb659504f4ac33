"""Soak test: N concurrent chat streams for a long time against one server, watching for errors,
throughput decay and memory growth (docs/loadtest.md).

    python loadtest/soak.py --url 127.0.0.1:8001 --server-pid "$(pgrep -x tritonserver)" --out soak-run
    python loadtest/soak.py --launch /models/InternVL-Chat-V1-1 --streams 64 --duration 30m --out soak-run

Every --interval it records one row: requests ended and errors in the interval, output tokens/s,
TTFT p50/p95, the mean ITL, streams in flight, the server's RSS (the tritonserver process tree, read
from /proc), GPU memory (nvidia-smi, when present) and, given the server's metrics endpoint
(--metrics-url; with --launch its own), the llm's KV blocks in use and requests running / waiting.
Once the streams stop, the KV gauge must come back to 0 (blocks still held are a leak). Writes, in
--out: soak.csv (the rows, written as they come), soak.json (settings, rows, summary) and soak.md (the
summary: errors, throughput of the first vs the last interval, RSS and GPU memory min / max / drift,
the KV check). Exit status: 0 when no request failed, the server still runs and no KV block is left
held; 1 otherwise; 2 for bad usage or no server.

Streams are threads, each with its own `internvl_client.Client`, running the workload's chat mix
(workload.py; the same --weight-* and media options as the Locust file) back to back. Without
--launch the server's pid is --server-pid, or the one process named tritonserver (RSS is left blank
when there is none, e.g. a remote server).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import re
import signal
import sys
import threading
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from internvl_client import Client

from procstats import find_pids_by_name, gpu_memory, tree_rss
from servermetrics import KV_BLOCKS_USED, REQUESTS_RUNNING, REQUESTS_WAITING, kv_blocks_after_run, read_values
from workload import InFlight, Media, RequestResult, Workload, add_workload_arguments, load_media, parse_url

FIELDS = ("t_s", "interval_s", "requests", "errors", "output_tokens", "output_tokens_per_s", "ttft_p50_ms",
          "ttft_p95_ms", "itl_mean_ms", "in_flight", "server_rss_mib", "server_processes", "gpu_mem_used_mib",
          "gpu_mem_server_mib", "kv_blocks_used", "requests_running", "requests_waiting")
GAUGES = {"kv_blocks_used": KV_BLOCKS_USED, "requests_running": REQUESTS_RUNNING,
          "requests_waiting": REQUESTS_WAITING}
MIB = 1024 * 1024


def parse_duration(text: str) -> float:
    """Seconds from "90", "90s", "30m", "1h30m"."""
    text = str(text).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    if not text or parts is None:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration like 600, 45s, 30m or 1h30m")
    h, m, s = (int(g or 0) for g in parts.groups())
    return float(h * 3600 + m * 60 + s)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python loadtest/soak.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC address (HOST:PORT or grpc://...)")
    p.add_argument("--launch", type=Path, default=None, metavar="CHECKPOINT",
                   help="start tritonserver on this checkpoint (free ports on 127.0.0.1), stop it at the end")
    p.add_argument("--ready-timeout", type=float, default=1800.0, help="with --launch: seconds to wait for the models")
    p.add_argument("--server-pid", type=int, default=None, help="pid of tritonserver (default: found by name)")
    p.add_argument("--metrics-url", default=None,
                   help="the server's Prometheus endpoint, e.g. http://127.0.0.1:8002/metrics (with --launch: "
                        "its own): KV blocks and requests running / waiting per row, and the KV check at the end")
    p.add_argument("--streams", type=int, default=64, help="concurrent streams")
    p.add_argument("--duration", type=parse_duration, default=1800.0, help="how long (600, 45s, 30m, 1h)")
    p.add_argument("--interval", type=parse_duration, default=30.0, help="one row every ...")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: soak-<date>-<time>)")
    p.add_argument("--seed", type=int, default=0, help="seed of the streams' task choices")
    p.add_argument("--warmup", type=parse_duration, default=120.0,
                   help="rows up to this time are warm-up, left out of the memory summary (not of the errors)")
    p.add_argument("--report", type=Path, default=None, metavar="DIR",
                   help="no run: rebuild soak.json and soak.md in DIR from the soak.csv, settings.json and "
                        "errors.txt of a run that was cut off before its own summary")
    add_workload_arguments(p.add_argument_group("workload (loadtest/workload.py)"))
    args = p.parse_args(argv)
    if args.streams < 1 or args.duration <= 0 or args.interval <= 0:
        p.error("--streams, --duration and --interval must be > 0")
    return args


class Recorder:
    """Results handed over from the stream threads to the sampler."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._results: list[RequestResult] = []

    def add(self, result: RequestResult) -> None:
        with self._lock:
            self._results.append(result)

    def take(self) -> list[RequestResult]:
        with self._lock:
            results, self._results = self._results, []
        return results


def stream_loop(url: str, ssl: bool, workload: Workload, timeout: float, stop: threading.Event,
                recorder: Recorder) -> None:
    """One stream: chats back to back until `stop` (a running multi-round chat ends after its round)."""
    with Client(url, timeout=timeout, retries=0, ssl=ssl) as client:
        while not stop.is_set():
            for result in workload.run(client, workload.pick()):
                recorder.add(result)
                if stop.is_set():
                    break


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]  # nearest rank


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def sample(t_s: float, interval_s: float, results: list[RequestResult], in_flight: int,
           server_pid: int | None, metrics_url: str | None = None) -> dict[str, Any]:
    """One row of the time series."""
    ok = [r for r in results if r.error is None]
    tokens = sum(r.output_tokens for r in ok)
    itls = [r.itl_s for r in ok if r.itl_s is not None]
    rss = tree_rss(server_pid) if server_pid else None
    gpu = gpu_memory(rss.pids if rss else ())
    gauges = read_values(metrics_url, tuple(GAUGES.values())) if metrics_url else {}
    return {
        "t_s": round(t_s, 1), "interval_s": round(interval_s, 2), "requests": len(results),
        "errors": len(results) - len(ok), "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / interval_s, 1) if interval_s > 0 else None,
        "ttft_p50_ms": _round(None if not ok else 1000 * percentile([r.ttft_s for r in ok], 50)),
        "ttft_p95_ms": _round(None if not ok else 1000 * percentile([r.ttft_s for r in ok], 95)),
        "itl_mean_ms": _round(1000 * sum(itls) / len(itls) if itls else None, 2),
        "in_flight": in_flight,
        "server_rss_mib": _round(rss.bytes / MIB if rss else None),
        "server_processes": rss.processes if rss else None,
        "gpu_mem_used_mib": gpu.used_mib if gpu else None,
        "gpu_mem_server_mib": gpu.server_mib if gpu else None,
        **{key: None if gauges.get(name) is None else int(gauges[name]) for key, name in GAUGES.items()},
    }


def _spread(rows: list[dict], key: str) -> dict[str, float] | None:
    """min / max / first / last of a column, and its least-squares trend per minute (3 points or more)."""
    points = [(row["t_s"], row[key]) for row in rows if row[key] is not None]
    if not points:
        return None
    values = [v for _, v in points]
    trend = None
    if len(points) >= 3:
        mean_t, mean_v = sum(t for t, _ in points) / len(points), sum(values) / len(values)
        var_t = sum((t - mean_t) ** 2 for t, _ in points)
        trend = round(60 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var_t, 2) if var_t else None
    return {"first": values[0], "last": values[-1], "min": min(values), "max": max(values),
            "drift": round(values[-1] - values[0], 1), "trend_per_min": trend}


def summarize(rows: list[dict], errors: Counter, requests: int, output_tokens: int, elapsed_s: float,
              server_alive: bool | None, after: dict | None = None, warmup_s: float = 0.0) -> dict[str, Any]:
    """`after`: the KV check once the streams stopped (servermetrics.kv_blocks_after_run), None without
    a metrics URL; blocks still held then fail the soak (a leak), an unreadable gauge does not.
    Memory is summarized over the rows after `warmup_s` (all rows when none is later): start-up work,
    such as torch.compile's worker processes, is not growth."""
    steady = [row for row in rows if row["t_s"] > warmup_s] or rows
    first, last = (rows[0]["output_tokens_per_s"], rows[-1]["output_tokens_per_s"]) if rows else (None, None)
    n_errors = sum(errors.values())
    return {
        "elapsed_s": round(elapsed_s, 1), "intervals": len(rows), "requests": requests,
        "errors": n_errors, "error_samples": [{"error": e, "count": c} for e, c in errors.most_common(10)],
        "output_tokens": output_tokens,
        "output_tokens_per_s_mean": round(output_tokens / elapsed_s, 1) if elapsed_s > 0 else None,
        "output_tokens_per_s_first_interval": first, "output_tokens_per_s_last_interval": last,
        "throughput_change_pct": round(100 * (last - first) / first, 1) if first else None,
        "memory_from_s": steady[0]["t_s"] if steady else None,
        "server_rss_mib": _spread(steady, "server_rss_mib"),
        "gpu_mem_used_mib": _spread(steady, "gpu_mem_used_mib"),
        "gpu_mem_server_mib": _spread(steady, "gpu_mem_server_mib"),
        "server_alive": server_alive,
        "kv_after": after,
        "ok": n_errors == 0 and server_alive is not False and requests > 0
        and not (after or {}).get("kv_blocks_used_after"),
    }


def markdown(summary: dict[str, Any], settings: dict[str, Any]) -> str:
    def spread(name: str, key: str) -> str:
        s = summary[key]
        if s is None:
            return f"| {name} | n/a | | | | |\n"
        trend = "n/a" if s.get("trend_per_min") is None else f"{s['trend_per_min']:+g}"
        return (f"| {name} | {s['min']:g} | {s['max']:g} | {s['first']:g} -> {s['last']:g} | {s['drift']:+g} "
                f"| {trend} |\n")

    lines = [
        f"# Soak: {'OK' if summary['ok'] else 'FAILED'}\n\n",
        f"{settings['streams']} streams against {settings['url']} for {summary['elapsed_s']:g} s "
        f"({summary['intervals']} intervals of {settings['interval_s']:g} s), started {settings['started']}; "
        f"max_new_tokens {settings['max_new_tokens']}, mix {settings['mix']}.\n\n",
        ("**Rebuilt from the rows the run wrote as it went** (`soak.py --report`): the run was cut off "
         "before writing its own summary, so requests in flight at the cut, the server's state at the end "
         "and the KV check after the run are not known.\n\n" if summary.get("rebuilt_from_rows") else ""),
        f"- requests: {summary['requests']}, errors: **{summary['errors']}**\n",
        f"- output tokens/s: mean {summary['output_tokens_per_s_mean']}, first interval "
        f"{summary['output_tokens_per_s_first_interval']}, last interval "
        f"{summary['output_tokens_per_s_last_interval']} (change {summary['throughput_change_pct']} %)\n",
        f"- server process still running at the end: "
        f"{'not known' if summary['server_alive'] is None else summary['server_alive']}\n",
        f"- KV-cache blocks in use once the streams stopped: "
        f"{'not known' if summary.get('rebuilt_from_rows') else kv_after_text(summary['kv_after'])}\n\n",
        ("" if summary["memory_from_s"] is None else
         f"Memory from the row at t = {summary['memory_from_s']:g} s on (the rows before it are warm-up); "
         f"trend = least-squares slope.\n\n"),
        "| memory (MiB) | min | max | first -> last | drift | trend (MiB/min) |\n|---|---|---|---|---|---|\n",
        spread("server RSS (process tree)", "server_rss_mib"),
        spread("GPU memory used (device)", "gpu_mem_used_mib"),
        spread("GPU memory (server processes)", "gpu_mem_server_mib"),
    ]
    if summary["error_samples"]:
        lines.append("\n| errors | count |\n|---|---|\n")
        lines += [f"| {e['error'][:200].replace('|', '/')} | {e['count']} |\n" for e in summary["error_samples"]]
    return "".join(lines)


def kv_after_text(after: dict | None) -> str:
    if after is None:
        return "not checked (no --metrics-url)"
    if after.get("kv_blocks_used_after") is None:
        return "not available" + (f" ({after['metrics_error']})" if after.get("metrics_error") else "")
    return f"**{after['kv_blocks_used_after']}** of {after['kv_blocks_total']}"


def resolve_server_pid(args: argparse.Namespace) -> int | None:
    if args.server_pid is not None:
        if tree_rss(args.server_pid) is None:
            raise ValueError(f"no process {args.server_pid} (--server-pid)")
        return args.server_pid
    found = find_pids_by_name("tritonserver")
    if len(found) > 1:
        raise ValueError(f"several tritonserver processes ({', '.join(map(str, found))}): pass --server-pid")
    if not found:
        print("soak: no local tritonserver process: server RSS is not recorded", file=sys.stderr)
    return found[0] if found else None


def error_text(result: RequestResult) -> str:
    return f"{result.kind}: {type(result.error).__name__}: {result.error}"[:300]


def run(args: argparse.Namespace, media: Media, url: str, ssl: bool, server_pid: int | None,
        out: Path, metrics_url: str | None = None) -> tuple[list[dict], dict[str, Any]]:
    """Drive the streams, write soak.csv as rows come; returns the rows and the summary."""
    in_flight, recorder, stop = InFlight(), Recorder(), threading.Event()
    workloads = [Workload(args, media, rng=random.Random(args.seed + i), in_flight=in_flight)
                 for i in range(args.streams)]
    threads = [threading.Thread(target=stream_loop, name=f"stream-{i}", daemon=True,
                                args=(url, ssl, w, args.request_timeout, stop, recorder))
               for i, w in enumerate(workloads)]
    rows: list[dict] = []
    errors: Counter = Counter()
    totals = {"requests": 0, "tokens": 0}
    timer = threading.Event()  # never set: its wait() is the interval clock

    error_log = open(out / "errors.txt", "a")  # every failed request as it comes: kept if the run is cut off

    def account(results: list[RequestResult]) -> None:
        totals["requests"] += len(results)
        totals["tokens"] += sum(r.output_tokens for r in results if r.error is None)
        failed = [error_text(r) for r in results if r.error is not None]
        errors.update(failed)
        t_s = time.monotonic() - start
        for text in failed:
            print(f"soak: error at t={t_s:.0f}s: {text}", flush=True)
            error_log.write(f"{t_s:.1f}\t{text}\n")
        error_log.flush()

    start = time.monotonic()
    for t in threads:
        t.start()
    server_alive = None if server_pid is None else True
    with open(out / "soak.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        last_tick, end = start, start + args.duration
        ticks = [min(start + k * args.interval, end) for k in range(1, math.ceil(args.duration / args.interval) + 1)]
        try:
            for tick in ticks:  # on a fixed grid from the start: sampling time does not shift it
                timer.wait(max(0.0, tick - time.monotonic()))
                now = time.monotonic()
                results = recorder.take()
                account(results)
                row = sample(now - start, now - last_tick, results, in_flight.now, server_pid, metrics_url)
                rows.append(row)
                writer.writerow(row)
                f.flush()
                print(f"soak: t={row['t_s']:.0f}s requests={row['requests']} errors={row['errors']} "
                      f"tok/s={row['output_tokens_per_s']} rss_mib={row['server_rss_mib']} "
                      f"gpu_mib={row['gpu_mem_used_mib']}", flush=True)
                last_tick = now
                if server_pid is not None and row["server_rss_mib"] is None:
                    server_alive = False
                    errors[f"the server process {server_pid} exited"] += 1
                    break
        except KeyboardInterrupt:
            print("soak: interrupted; stopping the streams (the reports follow)", file=sys.stderr)
    stop.set()
    deadline = time.monotonic() + args.request_timeout + 30
    for t in threads:  # each ends after its request in flight (bounded by the request timeout)
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    elapsed = time.monotonic() - start
    account(recorder.take())  # requests that ended after the last row
    stuck = sum(t.is_alive() for t in threads)
    if stuck:
        errors[f"{stuck} streams did not end within the request timeout"] += stuck
    error_log.close()
    if server_pid is not None and tree_rss(server_pid) is None:
        server_alive = False
    after = kv_blocks_after_run(metrics_url) if metrics_url and server_alive is not False else None
    return rows, summarize(rows, errors, totals["requests"], totals["tokens"], elapsed, server_alive, after,
                           warmup_s=args.warmup)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """soak.csv back into rows (numbers as numbers, blanks as None)."""
    def value(text: str) -> Any:
        if text == "":
            return None
        number = float(text)
        return int(number) if number.is_integer() and "." not in text else number
    with open(path, newline="") as f:
        return [{key: value(text) for key, text in row.items()} for row in csv.DictReader(f)]


def read_errors(path: Path) -> Counter:
    """errors.txt ("<t_s>\t<text>" a line) as counts by text; empty when the file is absent."""
    if not path.is_file():
        return Counter()
    return Counter(line.split("\t", 1)[1] for line in path.read_text().splitlines() if "\t" in line)


def rebuild_report(folder: Path, warmup_s: float = 120.0) -> dict[str, Any]:
    """soak.json and soak.md for a run cut off before its summary (killed, machine taken back): from the
    rows it wrote as they came. Requests still in flight at the cut, and the KV check, are unknown."""
    rows = read_rows(folder / "soak.csv")
    if not rows:
        raise ValueError(f"{folder / 'soak.csv'}: no rows")
    settings = json.loads((folder / "settings.json").read_text())
    errors = read_errors(folder / "errors.txt")
    in_rows = sum(row["errors"] for row in rows)
    if sum(errors.values()) < in_rows:  # a run without errors.txt: the rows' counts, texts unknown
        errors["(text not recorded)"] += in_rows - sum(errors.values())
    summary = summarize(rows, errors, sum(row["requests"] for row in rows),
                        sum(row["output_tokens"] for row in rows), rows[-1]["t_s"], None, warmup_s=warmup_s)
    summary["rebuilt_from_rows"] = True
    write_reports(folder, settings, rows, summary)
    return summary


def write_reports(folder: Path, settings: dict, rows: list[dict], summary: dict) -> None:
    """soak.json, soak.md and, when there are rows and matplotlib is there, soak.png."""
    data = {"settings": settings, "rows": rows, "summary": summary}
    (folder / "soak.json").write_text(json.dumps(data, indent=1))
    (folder / "soak.md").write_text(markdown(summary, settings))
    if not rows:
        return
    try:
        import plot_soak
        plot_soak.plot(data, folder / "soak.png")
    except ImportError:
        print("soak: no matplotlib: soak.png not drawn (python loadtest/plot_soak.py DIR draws it later)",
              file=sys.stderr)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        try:
            summary = rebuild_report(args.report, args.warmup)
        except (OSError, ValueError, KeyError) as e:
            print(f"soak: --report: {e}", file=sys.stderr)
            return 2
        print((args.report / "soak.md").read_text())
        return 0 if summary["ok"] else 1
    # Ctrl-C and SIGTERM end the run early with its reports. Set here, since a soak started in the
    # background by a non-interactive shell (`nohup ... &`) inherits SIGINT ignored.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return soak(args)
    except KeyboardInterrupt as e:
        print(f"soak: interrupted ({e}) before the streams started, or a second time; stopped without "
              f"reports (rows so far are in soak.csv: --report rebuilds them)", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def soak(args: argparse.Namespace) -> int:
    try:
        url, ssl = parse_url(args.url)
        media = load_media(args)
        mix = Workload(args, media).weights  # refuses bad options before anything starts
    except (ValueError, OSError) as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2
    out = args.out or Path(time.strftime("soak-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        if args.launch is not None:
            from internvl_serve.serving.launcher import LaunchError, TritonServer

            server = TritonServer(args.launch, log_file=out / "server.log", exit_timeout_s=10,
                                  ready_timeout_s=args.ready_timeout)
            print(f"soak: starting tritonserver on {args.launch} (log {out / 'server.log'})", flush=True)
            stack.callback(server.stop)  # also when start() is interrupted half-way
            try:
                server.start()
            except LaunchError as e:
                print(f"soak: {e}", file=sys.stderr)
                return 2
            url, ssl, server_pid = server.grpc_url, False, server.pid
            metrics_url = args.metrics_url or server.metrics_url
        else:
            metrics_url = args.metrics_url
            try:
                server_pid = resolve_server_pid(args)
            except ValueError as e:
                print(f"soak: {e}", file=sys.stderr)
                return 2
        with Client(url, ssl=ssl, retries=0) as client:
            if not client.is_ready():
                print(f"soak: no ready internvl_chat at {url}", file=sys.stderr)
                return 2
        settings = {"url": url, "metrics_url": metrics_url, "streams": args.streams, "duration_s": args.duration,
                    "interval_s": args.interval, "server_pid": server_pid, "launch": str(args.launch) if args.launch else None,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "max_new_tokens": args.max_new_tokens,
                    "mix": ", ".join(f"{k}={w:g}" for k, w in mix.items()),
                    "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
        (out / "settings.json").write_text(json.dumps(settings, indent=1))
        print(f"soak: {args.streams} streams against {url} for {args.duration:g} s, server pid {server_pid}; "
              f"writing {out}", flush=True)
        rows, summary = run(args, media, url, ssl, server_pid, out, metrics_url)
    write_reports(out, settings, rows, summary)
    print((out / "soak.md").read_text())
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
