"""scale_benchmark's curves: bench/results/scale.png and scale.svg (render_results.py calls this).

One row of four panels per operation: time against the parameter count (a line per world size),
time against the world size (a line per model), and the largest rank's peak RSS the same two
ways; ours solid with dots, PyTorch 2.13's dashed with squares, log axes. Only the standard
library: the PNG is rasterised here (zlib, a 5x7 bitmap font of its own for the labels) and the
SVG, the same drawing, carries real text.
"""

import math
import re
import struct
import zlib

OPS = ["Step", "FullOptimStateDict", "ShardedOptimStateDict", "LoadShardedOptimStateDict",
       "SaveSharded", "LoadSharded"]
PYTORCH_NAMES = {
    "Step": "FSDP1/FSDP2 step, the faster",
    "FullOptimStateDict": "FSDP1 optim_state_dict, rank0_only",
    "ShardedOptimStateDict": "FSDP2 get_optimizer_state_dict",
    "LoadShardedOptimStateDict": "FSDP2 set_optimizer_state_dict",
    "SaveSharded": "dcp.save",
    "LoadSharded": "dcp.load + set_state_dict",
}
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75)]
BLACK, GREY, LIGHT, WHITE = (0, 0, 0), (120, 120, 120), (225, 225, 225), (255, 255, 255)

# 5x7 glyphs, rows top to bottom; lower case is drawn as upper case.
GLYPHS = {
    "0": "01110/10001/10011/10101/11001/10001/01110",
    "1": "00100/01100/00100/00100/00100/00100/01110",
    "2": "01110/10001/00001/00010/00100/01000/11111",
    "3": "11110/00001/00001/01110/00001/00001/11110",
    "4": "00010/00110/01010/10010/11111/00010/00010",
    "5": "11111/10000/11110/00001/00001/10001/01110",
    "6": "00110/01000/10000/11110/10001/10001/01110",
    "7": "11111/00001/00010/00100/01000/01000/01000",
    "8": "01110/10001/10001/01110/10001/10001/01110",
    "9": "01110/10001/10001/01111/00001/00010/01100",
    "A": "01110/10001/10001/11111/10001/10001/10001",
    "B": "11110/10001/10001/11110/10001/10001/11110",
    "C": "01110/10001/10000/10000/10000/10001/01110",
    "D": "11100/10010/10001/10001/10001/10010/11100",
    "E": "11111/10000/10000/11110/10000/10000/11111",
    "F": "11111/10000/10000/11110/10000/10000/10000",
    "G": "01110/10001/10000/10111/10001/10001/01111",
    "H": "10001/10001/10001/11111/10001/10001/10001",
    "I": "01110/00100/00100/00100/00100/00100/01110",
    "J": "00111/00010/00010/00010/00010/10010/01100",
    "K": "10001/10010/10100/11000/10100/10010/10001",
    "L": "10000/10000/10000/10000/10000/10000/11111",
    "M": "10001/11011/10101/10101/10001/10001/10001",
    "N": "10001/10001/11001/10101/10011/10001/10001",
    "O": "01110/10001/10001/10001/10001/10001/01110",
    "P": "11110/10001/10001/11110/10000/10000/10000",
    "Q": "01110/10001/10001/10001/10101/10010/01101",
    "R": "11110/10001/10001/11110/10100/10010/10001",
    "S": "01111/10000/10000/01110/00001/00001/11110",
    "T": "11111/00100/00100/00100/00100/00100/00100",
    "U": "10001/10001/10001/10001/10001/10001/01110",
    "V": "10001/10001/10001/10001/10001/01010/00100",
    "W": "10001/10001/10001/10101/10101/10101/01010",
    "X": "10001/10001/01010/00100/01010/10001/10001",
    "Y": "10001/10001/01010/00100/00100/00100/00100",
    "Z": "11111/00001/00010/00100/01000/10000/11111",
    " ": "00000/00000/00000/00000/00000/00000/00000",
    ".": "00000/00000/00000/00000/00000/01100/01100",
    ",": "00000/00000/00000/00000/01100/00100/01000",
    ":": "00000/01100/01100/00000/01100/01100/00000",
    "/": "00000/00001/00010/00100/01000/10000/00000",
    "(": "00010/00100/01000/01000/01000/00100/00010",
    ")": "01000/00100/00010/00010/00010/00100/01000",
    "-": "00000/00000/00000/11111/00000/00000/00000",
    "=": "00000/00000/11111/00000/11111/00000/00000",
    "_": "00000/00000/00000/00000/00000/00000/11111",
    "+": "00000/00100/00100/11111/00100/00100/00000",
    "%": "11000/11001/00010/00100/01000/10011/00011",
    "<": "00010/00100/01000/10000/01000/00100/00010",
    ">": "01000/00100/00010/00001/00010/00100/01000",
    "?": "01110/10001/00001/00010/00100/00000/00100",
    ";": "00000/01100/01100/00000/01100/00100/01000",
    "'": "00100/00100/01000/00000/00000/00000/00000",
}
CHAR_W = 6  # 5 columns and a space


class Canvas:
    """The same drawing as RGB pixels (for the PNG) and as SVG elements."""

    def __init__(self, width, height):
        self.width, self.height = width, height
        self.pixels = [bytearray(WHITE * width) for _ in range(height)]
        self.svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                    f'font-family="monospace" font-size="10">',
                    f'<rect width="{width}" height="{height}" fill="white"/>']

    def dot(self, x, y, color):
        if 0 <= x < self.width and 0 <= y < self.height:
            self.pixels[y][3 * x:3 * x + 3] = bytes(color)

    def _raster_line(self, x1, y1, x2, y2, color, width, dash):
        steps = max(abs(x2 - x1), abs(y2 - y1), 1)
        for i in range(steps + 1):
            if dash and (i // dash) % 2 == 1:
                continue
            x = round(x1 + (x2 - x1) * i / steps)
            y = round(y1 + (y2 - y1) * i / steps)
            for dx in range(width):
                for dy in range(width):
                    self.dot(x + dx - width // 2, y + dy - width // 2, color)

    def line(self, x1, y1, x2, y2, color, width=1, dash=0):
        self._raster_line(round(x1), round(y1), round(x2), round(y2), color, width, dash)
        style = f' stroke-dasharray="{dash},{dash}"' if dash else ""
        self.svg.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
                        f'stroke="{hex_color(color)}" stroke-width="{width}"{style}/>')

    def marker(self, x, y, color, square):
        x, y = round(x), round(y)
        for dx in range(-3, 4):
            for dy in range(-3, 4):
                if square or dx * dx + dy * dy <= 10:
                    self.dot(x + dx, y + dy, color)
        if square:
            self.svg.append(f'<rect x="{x - 3}" y="{y - 3}" width="7" height="7" '
                            f'fill="{hex_color(color)}"/>')
        else:
            self.svg.append(f'<circle cx="{x}" cy="{y}" r="3.5" fill="{hex_color(color)}"/>')

    def text(self, x, y, text, color=BLACK, anchor="start"):
        """`text` with its top-left (start), top-centre (middle) or top-right (end) at x, y."""
        width = len(text) * CHAR_W
        x0 = round(x - {"start": 0, "middle": width / 2, "end": width}[anchor])
        for i, ch in enumerate(text):
            rows = GLYPHS.get(ch.upper(), GLYPHS["?"]).split("/")
            for row, bits in enumerate(rows):
                for col, bit in enumerate(bits):
                    if bit == "1":
                        self.dot(x0 + i * CHAR_W + col, round(y) + row, color)
        escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        self.svg.append(f'<text x="{x:.1f}" y="{y + 8:.1f}" text-anchor="{anchor}" '
                        f'fill="{hex_color(color)}">{escaped}</text>')

    def write_png(self, path):
        raw = b"".join(b"\x00" + bytes(row) for row in self.pixels)

        def chunk(kind, data):
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

        with open(path, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n")
            f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0,
                                               0)))
            f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
            f.write(chunk(b"IEND", b""))

    def write_svg(self, path):
        with open(path, "w") as f:
            f.write("\n".join(self.svg + ["</svg>"]) + "\n")


def hex_color(color):
    return "#%02x%02x%02x" % color


def log_ticks(lo, hi):
    """1-2-5 ticks within [lo, hi]; a log axis that spans less than one of them gets its ends."""
    ticks = []
    for exp in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10 ** exp
            if lo <= v <= hi:
                ticks.append(v)
    return ticks if len(ticks) >= 2 else [lo, hi]


def short(value):
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if value >= limit:
            v = value / limit
            return f"{v:.0f}{suffix}" if v == int(v) else f"{v:.3g}{suffix}"
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.2g}"


class LogLog:
    """Log-log mapping of data to the pixels of a plot area (left, right, top, bottom)."""

    def __init__(self, area, points, x_ticks):
        self.left, self.right, self.top, self.bottom = area
        xs = [p[0] for p in points] + list(x_ticks)
        ys = [p[1] for p in points]
        pad = 1.2 if min(xs) == max(xs) else 1.1
        self.x = (math.log(min(xs) / pad), math.log(max(xs) * pad))
        self.y = (math.log(min(ys) / 1.3), math.log(max(ys) * 1.3))

    def px(self, x):
        lo, hi = self.x
        return self.left + (self.right - self.left) * (math.log(x) - lo) / (hi - lo)

    def py(self, y):
        lo, hi = self.y
        return self.bottom - (self.bottom - self.top) * (math.log(y) - lo) / (hi - lo)


def axes(canvas, m, x_ticks, x_label, y_label, y_label_x):
    for t in log_ticks(math.exp(m.y[0]), math.exp(m.y[1])):
        canvas.line(m.left, m.py(t), m.right, m.py(t), LIGHT)
        canvas.text(m.left - 4, m.py(t) - 3, short(t), GREY, anchor="end")
    for t in x_ticks:
        canvas.line(m.px(t), m.top, m.px(t), m.bottom, LIGHT)
        canvas.text(m.px(t), m.bottom + 4, short(t), GREY, anchor="middle")
    canvas.line(m.left, m.bottom, m.right, m.bottom, BLACK)
    canvas.line(m.left, m.top, m.left, m.bottom, BLACK)
    canvas.text((m.left + m.right) / 2, m.bottom + 16, x_label, anchor="middle")
    canvas.text(y_label_x, m.top - 12, y_label, GREY)


def panel(canvas, box, title, x_label, y_label, series, x_ticks):
    """A log-log panel in box (x, y, w, h): series [(color, dashed, label, [(x, y)])]."""
    bx, by, bw, bh = box
    points = [p for _, _, _, pts in series for p in pts if p[1] > 0]
    canvas.text(bx + bw / 2, by + 4, title, anchor="middle")
    if not points:
        canvas.text(bx + bw / 2, by + bh / 2, "no data", GREY, anchor="middle")
        return
    m = LogLog((bx + 48, bx + bw - 8, by + 30, by + bh - 34), points, x_ticks)
    axes(canvas, m, x_ticks, x_label, y_label, bx + 2)
    for color, dashed, _, pts in series:
        pts = sorted(p for p in pts if p[1] > 0)
        for (x1, y1), (x2, y2) in zip(pts, pts[1:]):
            canvas.line(m.px(x1), m.py(y1), m.px(x2), m.py(y2), color, width=2,
                        dash=5 if dashed else 0)
        for x, y in pts:
            canvas.marker(m.px(x), m.py(y), color, square=dashed)
    # The colours' legend, bottom right inside the plot.
    labels = list(dict.fromkeys((label, color) for color, _, label, _ in series))
    for i, (label, color) in enumerate(labels):
        y = m.bottom - 12 - 11 * (len(labels) - 1 - i)
        canvas.line(m.right - 70, y + 3, m.right - 58, y + 3, color, width=2)
        canvas.text(m.right - 54, y, label, color)


DEFAULT_SETTINGS = "widths=128,256,512 worlds=1,2,4,8 iterations=2"


def settings_note(context):
    """RESULTS.md's lines on the grid a run measured, flagging one smaller than the default."""
    settings = context.get("scale_settings", "unknown (older JSON)")
    if settings == DEFAULT_SETTINGS:
        return [f"Settings: the default grid ({settings}).", ""]
    return [f"Settings: **reduced** ({settings}; the default is {DEFAULT_SETTINGS}): "
            "fewer calls or points than a full run, for a quick look only.", ""]


def points(rows):
    """{op: [(params, world, ours_ms, pytorch_ms, ours_mem, pytorch_mem)]} from the rows."""
    out = {}
    for r in rows:
        m = re.match(r"^(?:BM_)?Scale/(\w+)/d_model:(\d+)/world:(\d+)", r.get("name", ""))
        if not m or r.get("error_occurred") or "params" not in r:
            continue
        scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[r.get("time_unit", "ns")]
        out.setdefault(m.group(1), []).append(
            (r["params"], int(m.group(3)), r["real_time"] * scale, r.get("pytorch_ms", 0),
             r.get("peak_rss_max", 0) / 2**20, r.get("pytorch_peak_rss_max", 0) / 2**20))
    return out


def panel_series(pts, metric, by_size):
    """Ours (solid) and PyTorch's (dashed) lines of one panel: against the parameter count, a
    line per world size (by_size), or against the world size, a line per model."""
    series = []
    keys = sorted({p[1] if by_size else p[0] for p in pts})
    for i, key in enumerate(keys):
        color = PALETTE[i % len(PALETTE)]
        chosen = [p for p in pts if (p[1] if by_size else p[0]) == key]
        x_of = (lambda p: p[0]) if by_size else (lambda p: p[1])
        label = f"ws {key}" if by_size else short(key)
        series.append((color, False, label, [(x_of(p), p[metric]) for p in chosen]))
        series.append((color, True, label, [(x_of(p), p[metric + 1]) for p in chosen]))
    return series


def render(rows, png_path, svg_path, title):
    """Draws the curves of scale_benchmark's rows; returns False when no row is a scale case."""
    data = points(rows)
    ops = [op for op in OPS if op in data] + sorted(set(data) - set(OPS))
    if not ops:
        return False
    pw, ph = 300, 230
    canvas = Canvas(4 * pw, 50 + ph * len(ops))
    canvas.text(10, 8, title)
    canvas.text(10, 24, "solid, dots: ours (fsdp-cpp)   dashed, squares: PyTorch 2.13   "
                "log axes; memory: the largest rank's peak RSS", GREY)
    for row, op in enumerate(ops):
        pts = data[op]
        titles = [f"{op}: time", f"PyTorch: {PYTORCH_NAMES.get(op, '?')}"[:48], f"{op}: memory",
                  ""]
        for col, (metric, by_size) in enumerate([(2, True), (2, False), (4, True), (4, False)]):
            x_ticks = sorted({p[0] if by_size else p[1] for p in pts})
            panel(canvas, (col * pw, 50 + row * ph, pw, ph), titles[col],
                  "parameters" if by_size else "world size",
                  "ms" if metric == 2 else "peak RSS, MiB", panel_series(pts, metric, by_size),
                  x_ticks)
    canvas.write_png(png_path)
    canvas.write_svg(svg_path)
    return True
