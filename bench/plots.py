"""PNG figures of `ttt eval` and `ttt bench` results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

LABELS = {
    "window": "(a) base model, window only",
    "ttt": "(b) TTT: fast weights + window",
    "full": "(c) full attention over the prefix",
}


def label(method: str) -> str:
    """A curve's legend: "ttt/<preset>" is TTT with that memory preset."""
    name, _, preset = method.partition("/")
    return LABELS[name] + (f", {preset}" if preset else "")


def tokens_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plots need matplotlib: pip install 'ttt-server[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(ax, x, mean, sem, **kw):
    """A line with a +-1 standard-error band when there are several runs (sem is None for one run)."""
    (line,) = ax.plot(x, mean, marker="o", markersize=3, **kw)
    if sem is not None:
        lo = [m - s for m, s in zip(mean, sem, strict=True)]
        hi = [m + s for m, s in zip(mean, sem, strict=True)]
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)


def nll_figures(out: Path, positions: list[int], nll: dict[str, dict], gain: dict[str, dict], title: str) -> list[Path]:
    """``nll_vs_position.png`` (a, b, c) and ``gain.png`` (how much lower b and c are than a)."""
    return [
        _curves(
            out / "nll_vs_position.png",
            positions,
            {label(n): s for n, s in nll.items()},
            "NLL before training on the chunk (nats/token)",
            title,
        ),
        _curves(
            out / "gain.png",
            positions,
            {f"{label(n)} vs (a)": s for n, s in gain.items()},
            "NLL gain over window only (nats/token)",
            title,
            zero_line=True,
        ),
    ]


def _curves(
    path: Path, positions: list[int], series: dict[str, dict], ylabel: str, title: str, zero_line: bool = False
) -> Path:
    """One figure of mean curves with standard-error bands against chunk position."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, s in series.items():
        _band(ax, positions, s["mean"], s["sem"], label=label)
    if zero_line:
        ax.axhline(0, color="gray", linewidth=0.8)
    ax.set(xlabel="chunk end (tokens into the document)", ylabel=ylabel, title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def recall_heatmap(
    path: Path, grids: dict[str, list[list[float | None]]], lengths: list[int], depths: list[int], title: str
) -> Path:
    """Accuracy by needle depth (rows: tokens before the end) and document length (columns), a panel per memory."""
    plt = _pyplot()
    cols = min(len(grids), 4)
    rows = -(-len(grids) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(grids) :]:
        ax.axis("off")
    for ax, (memory, grid) in zip(axes.flat, grids.items(), strict=False):  # more axes than grids
        grid = [[float("nan") if v is None else v for v in row] for row in grid]
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for r, row in enumerate(grid):
            for c, v in enumerate(row):
                ax.text(
                    c,
                    r,
                    "-" if v != v else f"{v:.2f}",
                    ha="center",
                    va="center",
                    color="white" if v != v or v < 0.6 else "black",
                )
        ax.set_xticks(range(len(lengths)), [tokens_label(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [tokens_label(d) for d in depths])
        ax.set(xlabel="document tokens", ylabel="tokens after the needle", title=memory)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bench_figure(path: Path, tokens: list[int], series: dict[str, dict[str, list]], title: str) -> Path:
    """Latency and memory vs tokens read: ``series[panel][label]`` lists one value per N (None: not measured)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 4), squeeze=False)
    for ax, (panel, lines) in zip(axes[0], series.items(), strict=True):
        for label, values in lines.items():
            pts = [(n, v) for n, v in zip(tokens, values, strict=True) if v is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(tokens, [tokens_label(n) for n in tokens])
        ax.minorticks_off()
        ax.set(xlabel="tokens read (N)", ylabel=panel)
        if panel.startswith("bytes"):
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
