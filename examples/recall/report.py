"""Tables and plots of recall_eval.py JSONs (examples/recall/run.sh and capacity.sh write them):
accuracy, retrieval hit rate and attention state per (checkpoint, mode) and evaluation set,
or with --capacity the MQAR capacity curve (accuracy vs pairs per retrieved-prefix size R).

    python examples/recall/report.py runs/recall/recall*.json --plot docs/benchmarks/recall.png
    python examples/recall/report.py --capacity runs/recall_capacity/capacity*.json --plot docs/benchmarks/recall_capacity.png
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def _fmt(x) -> str:
    return "-" if x is None or x != x else f"{x:.2f}"


def tables(rows: list[dict]) -> str:
    sets = list(dict.fromkeys(r["data"] for r in rows))
    by_arm = defaultdict(dict)
    for r in rows:
        by_arm[(r["checkpoint"], r["mode"])][r["data"]] = r
    out = ["accuracy (all answers) / accuracy beyond the segment and tail / retrieval hit rate there (value token; "
           "needle span from the value on), per eval set", "",
           "| checkpoint | mode | " + " | ".join(f"{s} ({rows[[r['data'] for r in rows].index(s)]['length']} tok)"
                                               for s in sets) + " |",
           "|---|---|" + "---|" * len(sets)]
    for (ckpt, mode), cells in by_arm.items():
        parts = []
        for s in sets:
            r = cells.get(s)
            parts.append("" if r is None else
                         f"{_fmt(r['accuracy'])} / {_fmt(r['accuracy_outside_reach'])} / {_fmt(r['hit_rate'])}; "
                         f"{_fmt(r.get('span_hit_rate'))}")
        out.append(f"| {ckpt} | {mode} | " + " | ".join(parts) + " |")
    return "\n".join(out)


def state_table(rows: list[dict]) -> str:
    """Attention state (MiB) per mode and length, and its ratio to full attention's."""
    sets = [s for s in dict.fromkeys(r["data"] for r in rows) if s.isdigit()]
    full = {r["data"]: r["state_mib"] for r in rows if r["mode"] == "full" and r.get("state_mib") is not None}
    for r in rows:  # lengths where full attention was not run: the state it would hold, counted
        if r.get("full_state_mib") is not None and r["full_state_mib"] == r["full_state_mib"]:
            full.setdefault(r["data"], r["full_state_mib"])
    by_arm = defaultdict(dict)
    for r in rows:
        if r["data"] in sets and r.get("state_mib") is not None:
            by_arm[(r["checkpoint"], r["mode"])][r["data"]] = r["state_mib"]
    out = ["attention state held while streaming the longest document, MiB (/ full attention's)", "",
           "| checkpoint | mode | " + " | ".join(f"{s} tok" for s in sets) + " |", "|---|---|" + "---|" * len(sets)]
    for (ckpt, mode), cells in by_arm.items():
        parts = []
        for s in sets:
            v = cells.get(s)
            ratio = f" ({v / full[s]:.3f})" if v is not None and full.get(s) else ""
            parts.append("" if v is None else f"{v:.2f}{ratio}")
        out.append(f"| {ckpt} | {mode} | " + " | ".join(parts) + " |")
    return "\n".join(out)


def _pairs(row: dict) -> int:
    return int(row["data"].lstrip("p"))


def capacity_table(rows: list[dict]) -> str:
    """MQAR accuracy (retrieval hit rate of the queried values; share of the picks in the pairs
    block) per number of pairs and mode."""
    arms = list(dict.fromkeys((r["checkpoint"], r["mode"]) for r in rows))
    cells = {(r["checkpoint"], r["mode"], _pairs(r)): r for r in rows}
    pairs = sorted({_pairs(r) for r in rows})
    out = ["MQAR accuracy (hit rate: the queried value among the retrieved tokens; needle share: the share of the "
           "retrieved tokens in the pairs block) vs key-value pairs", "",
           "| pairs (2P tokens) | " + " | ".join(f"{c} / {m}" for c, m in arms) + " |", "|---|" + "---|" * len(arms)]
    for p in pairs:
        parts = []
        for c, m in arms:
            r = cells.get((c, m, p))
            parts.append("" if r is None else
                         f"{_fmt(r['accuracy'])} ({_fmt(r['hit_rate'])}; {_fmt(r.get('needle_share'))})")
        out.append(f"| {p} ({2 * p}) | " + " | ".join(parts) + " |")
    return "\n".join(out)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(1, 2, figsize=(11, 4))


def _save(fig, axes, titles, xlabel: str, legend: int, path: str) -> None:
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=legend)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def capacity_plot(rows: list[dict], path: str) -> None:
    _, fig, axes = _figure()
    arms = defaultdict(list)
    for r in rows:
        arms[(r["checkpoint"], r["mode"])].append(r)
    for (ckpt, mode), rs in arms.items():
        rs.sort(key=_pairs)
        xs = [_pairs(r) for r in rs]
        style = dict(marker="o", ls="--" if ckpt == "full" else "-", label=f"{ckpt} / {mode}")
        line, = axes[0].plot(xs, [r["accuracy"] for r in rs], **style)
        hits = [(x, r["hit_rate"]) for x, r in zip(xs, rs) if r.get("hit_rate") is not None and r["hit_rate"] == r["hit_rate"]]
        if hits and mode != "no_retrieval":
            axes[1].plot(*zip(*hits), color=line.get_color(), **style)
        if mode.startswith("r") and mode[1:].isdigit():  # where 2P = R: the pairs block just fits
            for ax in axes:
                ax.axvline(int(mode[1:]) / 2, color=line.get_color(), lw=0.8, ls=":")
    _save(fig, axes, ("MQAR accuracy", "hit rate: the queried value retrieved"),
          "key-value pairs (dotted: 2 x pairs = R)", 7, path)


def plot(rows: list[dict], path: str) -> None:
    plt, fig, axes = _figure()
    arms = defaultdict(list)
    for r in rows:
        if r["data"].isdigit():  # the length sweep (held-out sets are named otherwise)
            arms[(r["checkpoint"], r["mode"])].append(r)
    colors = plt.cm.tab20.colors
    for i, ((ckpt, mode), rs) in enumerate(arms.items()):
        rs.sort(key=lambda r: r["length"])
        xs = [r["length"] for r in rs]
        style = dict(color=colors[i % len(colors)], marker="o", ls="-" if ckpt != "full" else "--",
                     lw=2.5 if mode == "own" else 1.2, label=f"{ckpt} / {mode}")
        axes[0].plot(xs, [r["accuracy"] for r in rs], **style)
        hits = [(r["length"], r.get("span_hit_rate")) for r in rs
                if r.get("span_hit_rate") is not None and r["span_hit_rate"] == r["span_hit_rate"]]
        if hits:
            axes[1].plot(*zip(*hits), **style)
    _save(fig, axes, ("pass-key accuracy", "span hit rate: a needle token from the value on retrieved"),
          "document length (tokens)", 6, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="recall_eval.py JSON files (their rows are joined)")
    p.add_argument("--plot", default=None)
    p.add_argument("--capacity", action="store_true", help="the JSONs are capacity.sh's: accuracy vs pairs")
    args = p.parse_args(argv)
    rows = [row for path in args.json for row in json.load(open(path))]
    if args.capacity:
        print(capacity_table(rows))
    else:
        print(tables(rows) + "\n\n" + state_table(rows))
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(f"no plot: {args.plot} needs matplotlib (pip install -e \".[eval]\"); the tables above are complete")
            return 0
        (capacity_plot if args.capacity else plot)(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
