"""Plots and Markdown tables from evaluation results (matplotlib is optional: the ``eval``
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


def plot_alignment(result: dict, out_dir: str | Path) -> list[Path]:
    """recall accuracy and perplexity vs context length per (training variant, inference mode);
    perplexity by position at the longest length."""
    plt = _plt()
    out = Path(out_dir)
    written = []
    rows = [dict(r, model=v) for v, rs in result["alignment"].items() for r in rs]
    train_len = result["config"]["train_length"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], lambda r: r["recall_accuracy"], "recall accuracy (passkey + NIAH)"),
                           (axes[1], lambda r: r["ppl"], "perplexity (held-out text)")):
        for label, pts in _series(rows, key, with_model=True).items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    linestyle="-" if "segmented" in label else "--", label=label)
        ax.axvline(train_len, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title)
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    written.append(out / "alignment.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    longest = max(r["length"] for r in rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["length"] == longest:
            b = len(r["bucket_ppl"])
            width = r["length"] / b
            ax.plot([(i + 0.5) * width for i in range(b)], r["bucket_ppl"],
                    linestyle="-" if "segmented" in r["mode"] else "--", label=_label(r, True))
    ax.axvline(train_len, color="grey", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("perplexity")
    ax.set_title(f"perplexity by position, {longest}-token context")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    written.append(out / "alignment_ppl_by_position.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    if result.get("baselines"):
        written.append(plot_modes(result["baselines"], out / "alignment_baselines.png", "baselines: same weights",
                                  with_model=True))
    if result.get("head_selection", {}).get("rows"):
        written.append(plot_modes(result["head_selection"]["rows"], out / "alignment_head_selection.png",
                                  f"head plans on the {result['head_selection']['model']} model"))
    return written


def plot_modes(rows: list[dict], path: str | Path, title: str, with_model: bool = False) -> Path:
    """task accuracy, perplexity and attention state memory vs context length per mode."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    acc = (lambda r: r["recall_accuracy"]) if "recall_accuracy" in rows[0] else (lambda r: r["accuracy"])
    for ax, key, name in ((axes[0], acc, "recall accuracy"), (axes[1], lambda r: r["ppl"], "perplexity"),
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


def markdown_table(rows: list[dict], tasks: list[str], with_model: bool = False) -> str:
    """One row per (model, mode, length): perplexity, per-task accuracy, peak state MiB."""
    head = (["model"] if with_model else []) + ["mode", "length", "ppl"] + tasks + ["state MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ([r.get("model", "")] if with_model else []) + [r["mode"], str(r["length"]), f"{r['ppl']:.2f}"]
        cells += [f"{r['tasks'][t]['accuracy']:.2f}" if "accuracy" in r["tasks"].get(t, {}) else "–" for t in tasks]
        cells.append(f"{max(r['peak_state_mib'], r.get('task_peak_state_mib', 0)):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def alignment_markdown(result: dict) -> str:
    """The experiment's tables: recall and perplexity per (variant, inference mode) and
    length; the baselines; the head plans."""
    lengths = sorted({r["length"] for rs in result["alignment"].values() for r in rs})
    out = ["Recall accuracy (mean of passkey, niah_single, niah_multikey) / perplexity:", "",
           "| trained | inference | " + " | ".join(f"{L}" for L in lengths) + " |",
           "|---|---|" + "---|" * len(lengths)]
    for v, rows in result["alignment"].items():
        by = {}
        for r in rows:
            by.setdefault(r["mode"], {})[r["length"]] = r
        for mode, per in by.items():
            cells = [f"{per[L]['recall_accuracy']:.2f} / {per[L]['ppl']:.2f}" if L in per else "" for L in lengths]
            out.append(f"| {v} | {mode} | " + " | ".join(cells) + " |")
    tasks = list(result["config"]["tasks"])
    if result.get("baselines"):
        out += ["", "Baselines (same weights, same tasks and lengths; accuracy per task, state = peak attention "
                "state MiB):", "",
                markdown_table(sorted(result["baselines"], key=lambda r: (r["model"], r["length"])), tasks, with_model=True)]
    hs = result.get("head_selection") or {}
    if hs.get("rows"):
        rec = hs["record"]
        out += ["", f"Head plans on the {hs['model']} model (calibrated: top {rec['budget']} by {rec['metric']} "
                f"increase, ranking {rec['ranking'][:rec['budget']]}):", "",
                markdown_table(sorted(hs["rows"], key=lambda r: (r["length"], r["mode"])), [t for t in TRAIN_TASKS_ORDER if t in hs["rows"][0]["tasks"]])]
    return "\n".join(out) + "\n"


TRAIN_TASKS_ORDER = ("passkey", "niah_single", "niah_multikey", "niah_multivalue")
