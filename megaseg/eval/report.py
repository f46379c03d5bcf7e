"""Plots of evaluation results (matplotlib is optional: the ``eval``
extra). Without it, ``plots_available()`` is False and the driver says so in one line."""
from __future__ import annotations

from pathlib import Path


def plots_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(row, with_model=False):
    return (f"{row['model']}: " if with_model and "model" in row else "") + row["mode"]


def _series(rows, key, with_model=False):
    out: dict[str, list] = {}
    for r in rows:
        out.setdefault(_label(r, with_model), []).append((r["length"], key(r)))
    return {k: sorted(v) for k, v in out.items()}


def plot_modes(rows: list[dict], path: str | Path, title: str, with_model: bool = False) -> Path:
    """task accuracy, perplexity and attention state memory vs context length per mode."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, name in ((axes[0], lambda r: r["accuracy"], "task accuracy"), (axes[1], lambda r: r["ppl"], "perplexity"),
                          (axes[2], lambda r: max(r["peak_state_mib"], r.get("task_peak_state_mib", 0)),
                           "peak attention state (MiB)")):
        for label, pts in _series(rows, key, with_model).items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(name)
    axes[1].set_yscale("log")
    axes[2].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
