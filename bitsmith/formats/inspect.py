"""What a bitsmith checkpoint holds, per layer: shape, the plan's choice (bits, group size, symmetry, outliers)
and predicted error, the GPTQ loss of the run, all-in bits per weight and bytes; and a figure of the plan."""
from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..layouts import layout_of
from ..plan import FLAGS, LayerPlan, error_unit, whole_or_half
from . import dfloat
from .checkpoint import Checkpoint
from .errors import InputError

QOQ_PARTS = ("qweight", "channel_scale", "group_scale", "group_zero")     # W4A8 linears (kernels/reference.py)
PLOT_EXTRA = "pip install 'bitsmith[plot]'"
OUTSIDE_BLOCKS = "other"


def layer_table(path) -> tuple[list[dict], dict]:
    ckpt = Checkpoint(path)
    if ckpt.manifest is None:
        raise InputError(f"{path}: no bitsmith manifest (not a finished bitsmith checkpoint)")
    if "exported_from" in ckpt.manifest:
        raise InputError(f"{path}: an export to {ckpt.manifest.get('format')} (its layers are in that format's "
                         f"config); inspect the checkpoint it was exported from, {ckpt.manifest['exported_from']}")
    plan = _object(ckpt.manifest.get("plan", {}), "plan")
    entries = _object(plan.get("layers", {}), "plan layers")
    layers = _object(ckpt.manifest.get("layers", {}), "layers")
    source = _object(ckpt.manifest.get("source", {}), "source")
    coded = [dfloat.describe(n, meta) for n, meta in sorted(ckpt.coded.items())]
    sizes = {name: ckpt.nbytes(name) for name in ckpt}
    sizes.update({c["name"]: c["coded_bytes"] for c in coded})
    rows, counted = [], set()
    for name, report in layers.items():
        entry = _object(entries.get(name), f"plan entry of {name}")
        try:
            out_f, in_f = (int(n) for n in report["shape"])
            layer = LayerPlan(whole_or_half(entry["bits"]), int(entry["group_size"]), bool(entry.get("sym", False)),
                              outliers=float(entry.get("outliers", 0.0)),
                              **{key: entry.get(key) is True for key in FLAGS})
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path}: manifest entry of {name} is malformed ({type(e).__name__}: {e})") from None
        parts = [f"{name}.{p}" for p in dict.fromkeys((*layout_of(layer).parts, *QOQ_PARTS)) if f"{name}.{p}" in sizes]
        nbytes = sum(sizes[p] for p in parts)
        counted.update(parts)
        sparse = f"{name}.outlier_values"
        row = {"name": name, "shape": [out_f, in_f], "bits": layer.bits, "group_size": layer.group_size,
               "sym": layer.sym, "outliers": layer.outliers, **{key: getattr(layer, key) for key in FLAGS},
               "outlier_weights": ckpt.numel(sparse) if sparse in parts else 0,
               "predicted_error": entry.get("predicted_error"), "loss": _loss(report.get("loss")),
               "bpw": 8 * nbytes / max(out_f * in_f, 1), "bytes": nbytes}
        rows.append(row)
    weights = sum(r["shape"][0] * r["shape"][1] for r in rows)
    quantized_bytes = sum(r["bytes"] for r in rows)
    other = {n: b for n, b in sizes.items() if n not in counted}
    predicted = [r["predicted_error"] for r in rows]
    totals = {"model": source.get("name"), "coded": coded, "layers": len(rows), "target_bpw": plan.get("target_bpw"),
              "outlier_weights": sum(r["outlier_weights"] for r in rows),
              "predicted_error": None if None in predicted or not rows else sum(predicted),
              "predicted_error_unit": error_unit(_proxy(plan)),
              "bpw": 8 * quantized_bytes / max(weights, 1), "quantized_bytes": quantized_bytes,
              "rotation": ckpt.manifest.get("rotation"), "other_tensors": len(other), "other_bytes": sum(other.values()),
              "total_bytes": quantized_bytes + sum(other.values())}
    return rows, totals


def _loss(value) -> float | None:
    """A linear's GPTQ loss from the manifest; None where its method measured none (RTN, QoQ)."""
    return None if value is None else float(value)


def _proxy(plan: dict) -> str | None:
    options = plan.get("options")
    return options.get("proxy") if isinstance(options, dict) else None


def _object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"manifest: {what} is not an object")
    return value


@dataclass
class Grid:
    """Rows of the layer table laid out by layer kind (y) and block index (x)."""
    kinds: list[str]
    blocks: list[str]
    cells: dict[tuple[int, int], dict] = field(default_factory=dict)

    def labels(self) -> list[str]:
        """Each kind by its last name part (`q_proj`) where that is unambiguous, else in full."""
        last = [k.rsplit(".", 1)[-1] for k in self.kinds]
        return [short if last.count(short) == 1 else kind for short, kind in zip(last, self.kinds)]


def block_grid(rows: list[dict], block_prefix: str, kind_order=()) -> Grid:
    """Place each row by its block (block_prefix has "{i}" for the index) and kind (the name after the prefix),
    kinds in kind_order first, then as met; linears outside the blocks go to a column of their own."""
    pattern = re.compile(r"(\d+)".join(map(re.escape, block_prefix.split("{i}"))) + "(.+)")
    placed = []
    for row in rows:
        m = pattern.fullmatch(row["name"])
        placed.append((m.group(2), int(m.group(1))) if m else (row["name"], None))
    met = [kind for kind, _ in placed]
    kinds = [k for k in kind_order if k in met] + [k for k in dict.fromkeys(met) if k not in kind_order]
    indices = sorted({i for _, i in placed if i is not None})
    blocks = [str(i) for i in indices] + ([OUTSIDE_BLOCKS] if None in (i for _, i in placed) else [])
    grid = Grid(kinds, blocks)
    for row, (kind, i) in zip(rows, placed):
        grid.cells[kinds.index(kind), blocks.index(OUTSIDE_BLOCKS if i is None else str(i))] = row
    return grid


def cell_label(row: dict) -> str:
    """Bits and group size of one linear: "3/g64", "4/g128s" (symmetric), "3/ch" (per output channel),
    "3/g128+1%" (1 % of the weights kept as outliers), "3/lut" (a lookup table per row), "3/ic64" (per input
    channel, groups of 64 output rows), "3/vq128" (codebooks of pairs per 128 inputs), "3/cb128" (groups of 128
    columns on 2, 3 or 4 bits), "4/g64dq" (group scales double-quantized)."""
    if row.get("column_bits"):
        return f"{row['bits']}/cb{row['group_size']}"
    if row.get("vq"):
        return f"{row['bits']}/vq{'all' if row['group_size'] == -1 else row['group_size']}"
    if row.get("lut"):
        return f"{row['bits']}/lut"
    if row.get("per_ic"):
        return f"{row['bits']}/ic{'all' if row['group_size'] == -1 else row['group_size']}{'s' if row['sym'] else ''}"
    group = "ch" if row["group_size"] == -1 else f"g{row['group_size']}"
    outliers = f"+{100 * row['outliers']:g}%" if row.get("outliers") else ""
    return f"{row['bits']}/{group}{'s' if row['sym'] else ''}{outliers}{'dq' if row.get('dq') else ''}"


def check_plot_path(path) -> None:
    """Refuse a figure that cannot be written, before any work: no matplotlib, no such folder, not a .png."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InputError(f"--plot {path}: the figure is a PNG; name it *.png")
    if not path.parent.is_dir():
        raise InputError(f"--plot {path}: no such folder {path.parent}")
    _matplotlib()


def _matplotlib():
    """Figure, the Agg canvas and LogNorm, or a one-line error naming the extra to install."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import LogNorm
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError(f"--plot needs matplotlib: {PLOT_EXTRA}") from None
    return Figure, FigureCanvasAgg, LogNorm


def error_measure(rows: list[dict]) -> tuple[str, str]:
    """(row key, caption) of the error to draw: the plan's predicted error, else the measured loss."""
    if rows and all(r["predicted_error"] is not None for r in rows):
        return "predicted_error", "predicted loss increase (nats/token), log scale"
    return "loss", "measured loss per linear (the plan has no predicted errors), log scale"


def plan_title(totals: dict, path) -> str:
    model = Path(str(totals.get("model") or path)).name
    target = "no target" if totals["target_bpw"] is None else f"target {totals['target_bpw']} bpw"
    return f"{model}: {target}, achieved {totals['bpw']:.3f} bpw all-in"


def plot_plan(grid: Grid, title: str, error_key: str, error_caption: str, path) -> None:
    """Two heatmaps, kind x block: the chosen bits (annotated with bits/group) and the error; written as PNG."""
    import numpy as np
    Figure, FigureCanvasAgg, LogNorm = _matplotlib()
    bits, error = np.full((2, len(grid.kinds), len(grid.blocks)), np.nan)
    for (k, b), row in grid.cells.items():
        bits[k, b], error[k, b] = row["bits"], row[error_key] if row[error_key] is not None else np.nan
    width = max(6.0, 2.0 + 0.62 * len(grid.blocks))
    fig = Figure(figsize=(width, 2.0 + 0.7 * len(grid.kinds)), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1)
    _bits_map(fig, top, grid, bits)
    _error_map(fig, bottom, grid, error, LogNorm, error_caption)
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    Path(path).write_bytes(buffer.getvalue())


def _axes(ax, grid: Grid, caption: str) -> None:
    ax.set_xticks(range(len(grid.blocks)), grid.blocks)
    ax.set_yticks(range(len(grid.kinds)), grid.labels())
    ax.set_xlabel("block")
    ax.set_title(caption, fontsize="medium")


def _bits_map(fig, ax, grid: Grid, bits) -> None:
    import numpy as np
    values = sorted({row["bits"] for row in grid.cells.values()})
    image = ax.imshow(np.ma.masked_invalid(bits), aspect="auto", cmap=_cmap("viridis"),
                      vmin=values[0] - 0.5, vmax=values[-1] + 0.5)
    for (k, b), row in grid.cells.items():
        dark = (row["bits"] - values[0] + 0.5) / (values[-1] - values[0] + 1) < 0.55
        ax.text(b, k, cell_label(row), ha="center", va="center", fontsize=7, color="white" if dark else "black")
    fig.colorbar(image, ax=ax, ticks=values, label="bits")
    _axes(ax, grid, "bits / group size (s = symmetric, ch = per output channel, +x% = outliers, lut = lookup table, "
                    "ic = per input channel, vq = codebooks of pairs, cb = bits per group of columns)")


def _error_map(fig, ax, grid: Grid, error, LogNorm, caption: str) -> None:
    import numpy as np
    shown = np.ma.masked_where(~(error > 0), error)
    norm = _log_norm(shown, LogNorm)
    image = ax.imshow(shown, aspect="auto", cmap=_cmap("magma_r"), norm=norm)
    for k, b in zip(*np.nonzero(error == 0)):
        ax.text(b, k, "0", ha="center", va="center", fontsize=7)
    if norm is not None:
        fig.colorbar(image, ax=ax, label="error")
    if norm is None:
        caption = caption.replace(", log scale", ": not measured" if np.isnan(error).all() else ": none above zero")
    _axes(ax, grid, caption)


def _log_norm(values, LogNorm):
    """A log scale over the positive values (one decade wide when they are all equal); None when there are none."""
    if not values.count():
        return None
    low, high = float(values.min()), float(values.max())
    return LogNorm(vmin=low, vmax=high if high > low else low * 10)


def _cmap(name: str):
    from matplotlib import colormaps
    return colormaps[name].with_extremes(bad="#dddddd")       # grey: no linear there, or no error above zero
