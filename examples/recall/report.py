"""Tables and plots of a recall_eval.py JSON (examples/recall/run.sh writes one):
accuracy and retrieval hit rate per (checkpoint, mode) and evaluation set.

    python examples/recall/report.py runs/recall/recall*.json --plot docs/benchmarks/recall.png
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


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
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
    for ax, title in zip(axes, ("pass-key accuracy", "span hit rate: a needle token from the value on retrieved")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("document length (tokens)")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="recall_eval.py JSON files (their rows are joined)")
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    rows = [row for path in args.json for row in json.load(open(path))]
    print(tables(rows))
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
