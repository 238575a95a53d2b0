"""Renders Google Benchmark JSON results of bench/ as bench/results/RESULTS.md and results.png.

    tools/python bench/render_results.py [--out_dir DIR] [RESULT.json ...]

Each JSON file is one benchmark binary's `--benchmark_out` (format json); its name without
`.json` names the benchmark (comm_benchmark.json -> comm_benchmark). Without files, every
*.json in the output directory is read. RESULTS.md gets the machine (CPU model, cores, RAM,
kernel, date, each run's load average) and, per benchmark, a table: case, time, throughput, the
counters that matter, the goal that applies to the case and whether it was met. results.png
charts each benchmark's goal ratio per case (bars, goal line; green met, red missed);
scale_benchmark's curves go to scale.png and scale.svg (render_scale.py).

The PNG is drawn with Pillow when it is importable, otherwise with the small PNG writer below
(zlib only, bars and goal lines without text labels). Only the standard library is needed.
"""

import argparse
import datetime
import glob
import json
import os
import platform
import re
import struct
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import render_scale  # noqa: E402

# Goals of issue #6, per benchmark: (case regex, counter, limit, what). A goal applies to a
# case whose name matches and that reports the counter.
GOALS = {
    "comm_benchmark": [
        (r"^ReduceScatter", "vs_allgather", 1.25, "reduce-scatter / all-gather time"),
    ],
    "optim_state_benchmark": [
        (r".", "vs_collective", 1.5, "API time / raw collective time"),
        (r".", "vs_pytorch", 0.5, "API time / PyTorch's (faster of FSDP1, FSDP2)"),
        (r".", "mem_vs_pytorch", 1.0, "rank 0 peak RSS / PyTorch's"),
    ],
    "checkpoint_benchmark": [
        (r".", "vs_write", 1.5, "save or load time / plain write+fsync or read time"),
        (r".", "vs_same_size_load", 1.2, "resharded load / same-size load"),
        (r".", "vs_pytorch", 0.5, "sharded save or load time / PyTorch's dcp.save or dcp.load"),
        (r".", "mem_vs_pytorch", 1.0, "rank 0 peak RSS / PyTorch's"),
    ],
    "scale_benchmark": [
        (r"^Scale/Step/", "vs_pytorch", 1.0, "step time / PyTorch's (faster of FSDP1, FSDP2)"),
        (r"^Scale/(?!Step/)", "vs_pytorch", 0.5, "time / PyTorch's at the same point"),
        (r".", "mem_vs_pytorch", 1.0, "rank 0 peak RSS / PyTorch's"),
    ],
    "fsdp_step_benchmark": [
        (r"^Step/FULL_SHARD", "vs_no_shard", 1.5, "step time / NO_SHARD step time"),
        (r"^Step/FULL_SHARD", "mem_vs_target", 1.25,
         "peak step memory (worst rank) / shard_target"),
    ],
    "full_checkpoint_benchmark": [
        (r".", "vs_pytorch", 0.5, "full save or load time / PyTorch's (faster of FSDP1, FSDP2)"),
        (r".", "mem_vs_pytorch", 1.0, "rank 0 peak RSS / PyTorch's (lower of FSDP1, FSDP2)"),
    ],
    "async_save_benchmark": [
        (r".", "staging_vs_sync", 0.1,
         "training's wait in Save() + SynchronizeStaging() (async staging) / synchronous save time"),
        (r".", "vs_pytorch", 1.0,
         "that wait / dcp.async_save's with use_async_staging (call + staging_completion)"),
    ],
}

# The counters shown per benchmark (others are in the JSON). Unknown benchmarks show all.
COLUMNS = {
    "comm_benchmark": ["busbw_GBps", "vs_allgather", "vs_ring"],
    "optim_state_benchmark": ["vs_collective", "vs_pytorch", "pytorch_ms", "mem_vs_pytorch",
                              "vs_scatter", "ref_ms", "peak_rss_rank0",
                              "peak_rss_other", "base_rss_rank0"],
    "checkpoint_benchmark": ["vs_write", "vs_same_size_load", "ref_ms", "same_size_ms",
                             "ckpt_bytes", "vs_pytorch", "pytorch_ms", "mem_vs_pytorch",
                             "peak_rss_rank0", "pytorch_peak_rss_rank0"],
    "scale_benchmark": ["params", "vs_pytorch", "pytorch_ms", "pytorch_fsdp", "mem_vs_pytorch",
                        "peak_rss_rank0", "pytorch_peak_rss_rank0", "peak_rss_max",
                        "pytorch_peak_rss_max"],
    "fsdp_step_benchmark": ["vs_no_shard", "vs_pytorch", "pytorch_fsdp1_ms", "pytorch_fsdp2_ms",
                            "no_shard_ms", "step_mem_rank0", "step_mem_rank1", "held_mem_rank0",
                            "local_state_bytes", "shard_target", "mem_vs_target"],
    "full_checkpoint_benchmark": ["vs_pytorch", "mem_vs_pytorch", "pytorch_fsdp1_ms",
                                  "pytorch_fsdp2_ms", "peak_rss_rank0", "pytorch_fsdp1_peak",
                                  "pytorch_fsdp2_peak", "base_rss_rank0", "full_state_bytes"],
    "async_save_benchmark": ["staging_vs_sync", "vs_pytorch", "staging_lost_ms", "sync_ms",
                             "copy_blocked_ms", "pytorch_blocked_ms", "step_ms",
                             "staging_step_extra_ms", "pytorch_staging_step_extra_ms",
                             "copy_step_extra_ms", "pytorch_step_extra_ms", "staged_bytes"],
}

# full_checkpoint_benchmark run alone at 500M parameters (FULL_CHECKPOINT_D_MODELS=1664, its
# own --benchmark_out): the same goals and columns.
GOALS["full_checkpoint_benchmark_500m"] = GOALS["full_checkpoint_benchmark"]
COLUMNS["full_checkpoint_benchmark_500m"] = COLUMNS["full_checkpoint_benchmark"]

STANDARD_KEYS = {
    "name", "family_index", "per_family_instance_index", "run_name", "run_type", "repetitions",
    "repetition_index", "threads", "iterations", "real_time", "cpu_time", "time_unit",
    "bytes_per_second", "items_per_second", "error_occurred", "error_message", "label",
    "aggregate_name", "aggregate_unit",
}


# Benchmarks drawn as curves (render_scale.py) rather than as bars in results.png.
CURVES = {"scale_benchmark"}


def is_bytes_counter(name):
    return bool(re.search(r"rss|bytes|mem_rank|target$", name)) and not name.startswith("mem_vs")


def case_name(bench):
    name = bench.get("run_name") or bench["name"]
    name = re.sub(r"^BM_", "", name)
    name = re.sub(r"/(iterations:\d+|real_time|manual_time|min_time:[0-9.]+)", "", name)
    return name


def derived_counters(benchmark, bench):
    """Counters computed from others (kept here so older JSON renders the same way)."""
    out = {}
    if benchmark == "fsdp_step_benchmark" and "shard_target" in bench:
        mems = [v for k, v in bench.items() if k.startswith("step_mem_rank")]
        if mems and bench["shard_target"] > 0:
            out["mem_vs_target"] = max(mems) / bench["shard_target"]
    return out


def fmt_time(value, unit):
    scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
    ms = value * scale
    return f"{ms / 1e3:.2f} s" if ms >= 1e4 else f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms"


def fmt_counter(name, value):
    if is_bytes_counter(name):
        return f"{value / 2**20:.0f} MiB"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"


def machine():
    cpu_model, cores = "unknown", os.cpu_count()
    try:
        with open("/proc/cpuinfo") as f:
            models = re.findall(r"^model name\s*:\s*(.*)$", f.read(), re.M)
        if models:
            cpu_model, cores = models[0].strip(), len(models)
    except OSError:
        pass
    ram = "unknown"
    try:
        with open("/proc/meminfo") as f:
            kb = int(re.search(r"^MemTotal:\s*(\d+)", f.read(), re.M).group(1))
        ram = f"{kb / 2**20:.1f} GiB"
    except (OSError, AttributeError):
        pass
    return {
        "cpu": cpu_model,
        "cores": cores,
        "ram": ram,
        "kernel": f"{platform.system()} {platform.release()}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def evaluate(benchmark, case, bench):
    """[(goal text, value, limit, met)] for the goals that apply to this case."""
    results = []
    for regex, counter, limit, what in GOALS.get(benchmark, []):
        if re.search(regex, case) and counter in bench:
            results.append((f"{counter} <= {limit}", bench[counter], limit,
                            bench[counter] <= limit, what))
    return results


def load(paths):
    runs = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        benchmark = os.path.splitext(os.path.basename(path))[0]
        rows = []
        for bench in data.get("benchmarks", []):
            if bench.get("run_type") == "aggregate":
                continue
            bench = dict(bench)
            bench.update(derived_counters(benchmark, bench))
            rows.append(bench)
        runs.append((benchmark, data.get("context", {}), rows))
    order = ["optim_state_benchmark", "checkpoint_benchmark", "fsdp_step_benchmark",
             "comm_benchmark", "scale_benchmark"]
    runs.sort(key=lambda r: (order.index(r[0]) if r[0] in order else len(order), r[0]))
    return runs


def render_markdown(runs, info):
    lines = ["# Benchmark results", "",
             "Written by `bench/render_results.py` from the Google Benchmark JSON files in this "
             "directory (`bash bench/run_all.sh` runs every benchmark and renders).", "",
             "## Machine", "",
             f"* CPU: {info['cpu']}, {info['cores']} cores",
             f"* RAM: {info['ram']}",
             f"* Kernel: {info['kernel']}",
             f"* Rendered: {info['date']}", ""]
    for benchmark, context, rows in runs:
        load_avg = context.get("load_avg")
        load_text = (", load average at start " + ", ".join(f"{x:.1f}" for x in load_avg)
                     if load_avg else "")
        lines += [f"## {benchmark}", "",
                  f"Run {context.get('date', '?')}{load_text}; "
                  f"{context.get('num_cpus', '?')} CPUs at {context.get('mhz_per_cpu', '?')} MHz.",
                  ""]
        if benchmark in CURVES:
            lines += render_scale.settings_note(context)
            lines += ["Curves: [scale.png](scale.png) ([scale.svg](scale.svg), the same with "
                      "text labels).", ""]
        columns = COLUMNS.get(benchmark)
        if columns is None:
            columns = sorted({k for r in rows for k in r if k not in STANDARD_KEYS})
        columns = [c for c in columns if any(c in r for r in rows)]
        header = ["case", "time", "throughput"] + [f"`{c}`" for c in columns] + ["goal", "met"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + " --- |" * len(header))
        missed = []
        for r in rows:
            case = case_name(r)
            if r.get("error_occurred"):
                cells = [case, "error: " + r.get("error_message", "")] + [""] * (len(header) - 2)
                lines.append("| " + " | ".join(cells) + " |")
                continue
            bps = r.get("bytes_per_second")
            cells = [case, fmt_time(r["real_time"], r.get("time_unit", "ns")),
                     f"{bps / 2**20:.0f} MiB/s" if bps else ""]
            cells += [fmt_counter(c, r[c]) if c in r else "" for c in columns]
            goals = evaluate(benchmark, case, r)
            cells.append("; ".join(g[0] for g in goals) if goals else "-")
            if goals:
                verdicts = []
                for text, value, limit, met, what in goals:
                    verdicts.append(("met" if met else "**missed**") + f" ({value:.2f})")
                    if not met:
                        missed.append(f"{case}: {text} ({what}) is {value:.2f}")
                cells.append("; ".join(verdicts))
            else:
                cells.append("-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if missed:
            lines.append("Missed goals (reasons in bench/README.md):")
            lines.append("")
            lines += [f"* {m}" for m in missed]
            lines.append("")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ PNG chart

def chart_items(runs):
    """[(benchmark, [(case, value, limit, met or None, counter)])]: the benchmark's first ratio
    goal counter for every case that reports it; met is None where no goal applies."""
    panels = []
    for benchmark, _, rows in runs:
        ratio_goals = [g for g in GOALS.get(benchmark, []) if not g[1].startswith("mem_vs")]
        if not ratio_goals or benchmark in CURVES:
            continue
        counter, limit = ratio_goals[0][1], ratio_goals[0][2]
        items = []
        for r in rows:
            if r.get("error_occurred") or counter not in r:
                continue
            goals = [g for g in evaluate(benchmark, case_name(r), r) if g[0].startswith(counter)]
            items.append((case_name(r), r[counter], limit, goals[0][3] if goals else None,
                          counter))
        if items:
            panels.append((benchmark, items))
    return panels


def bar_color(met):
    return GREY if met is None else GREEN if met else RED


GREEN, RED, GREY, BLACK, WHITE = (46, 160, 67), (215, 58, 73), (150, 150, 150), (0, 0, 0), (
    255, 255, 255)


def draw_with_pillow(panels, path, title):
    from PIL import Image, ImageDraw, ImageFont  # noqa: deferred, optional
    try:
        font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", 13)
        bold = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", 15)
    except OSError:
        font = bold = ImageFont.load_default()
    label_w, bar_w, row_h = 380, 520, 20
    height = 40 + sum(50 + row_h * len(items) for _, items in panels)
    img = Image.new("RGB", (label_w + bar_w + 90, height), WHITE)
    d = ImageDraw.Draw(img)
    d.text((10, 10), title, fill=BLACK, font=bold)
    y = 40
    for benchmark, items in panels:
        counter = items[0][4]
        vmax = max(max(v for _, v, _, _, _ in items), max(l for _, _, l, _, _ in items)) * 1.1
        d.text((10, y), f"{benchmark}: {counter} (lower is better; line: goal; grey: no goal)", fill=BLACK,
               font=bold)
        y += 25
        x0 = label_w
        top = y
        for case, value, limit, met, _ in items:
            d.text((10, y + 3), case[:55], fill=BLACK, font=font)
            w = int(bar_w * value / vmax)
            d.rectangle([x0, y + 3, x0 + max(w, 1), y + row_h - 3], fill=bar_color(met))
            d.text((x0 + w + 5, y + 3), f"{value:.2f}", fill=BLACK, font=font)
            y += row_h
        limit = items[0][2]
        lx = x0 + int(bar_w * limit / vmax)
        d.line([lx, top - 3, lx, y + 2], fill=BLACK, width=2)
        d.text((lx - 10, y + 3), f"{limit}", fill=BLACK, font=font)
        y += 25
    img.save(path)


def write_png_plain(path, width, height, pixels):
    """A truecolor PNG from rows of (r, g, b) tuples, with zlib only."""
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in pixels)

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))


def draw_plain(panels, path):
    bar_w, row_h, x0 = 600, 16, 20
    height = 20 + sum(30 + row_h * len(items) for _, items in panels)
    width = x0 + bar_w + 40
    pixels = [[WHITE] * width for _ in range(height)]

    def rect(x1, y1, x2, y2, color):
        for yy in range(max(0, y1), min(height, y2)):
            row = pixels[yy]
            for xx in range(max(0, x1), min(width, x2)):
                row[xx] = color

    y = 20
    for _, items in panels:
        vmax = max(max(v for _, v, _, _, _ in items), items[0][2]) * 1.1
        top = y
        for _, value, _, met, _ in items:
            rect(x0, y + 3, x0 + max(1, int(bar_w * value / vmax)), y + row_h - 3,
                 bar_color(met))
            y += row_h
        lx = x0 + int(bar_w * items[0][2] / vmax)
        rect(lx, top, lx + 2, y, BLACK)
        rect(0, y + 12, width, y + 13, GREY)
        y += 30
    write_png_plain(path, width, height, pixels)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out_dir", default=os.path.join(here, "results"))
    parser.add_argument("json", nargs="*")
    args = parser.parse_args()
    paths = args.json or sorted(glob.glob(os.path.join(args.out_dir, "*.json")))
    if not paths:
        sys.exit(f"render_results: no JSON results given or in {args.out_dir}")
    os.makedirs(args.out_dir, exist_ok=True)
    runs = load(paths)
    info = machine()
    md_path = os.path.join(args.out_dir, "RESULTS.md")
    with open(md_path, "w") as f:
        f.write(render_markdown(runs, info))
    png_path = os.path.join(args.out_dir, "results.png")
    panels = chart_items(runs)
    if panels:
        title = f"fsdp-cpp benchmarks, {info['cpu']}, {info['cores']} cores, {info['date']}"
        try:
            draw_with_pillow(panels, png_path, title)
        except ImportError:
            draw_plain(panels, png_path)
    print(f"render_results: wrote {md_path} and {png_path}")
    for benchmark, _, rows in runs:
        if benchmark in CURVES:
            png, svg = (os.path.join(args.out_dir, f"scale.{ext}") for ext in ("png", "svg"))
            title = f"fsdp-cpp scale curves, {info['cpu']}, {info['cores']} cores, {info['date']}"
            if render_scale.render(rows, png, svg, title):
                print(f"render_results: wrote {png} and {svg}")


if __name__ == "__main__":
    main()
