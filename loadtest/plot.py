"""Draws compare.json (written by the compare benchmark, loadtest/bench) as commit → visible
latency against offered rate for the four contenders: the median of the runs, with bars from
the lowest to the highest run.

    python loadtest/plot.py results/compare.json results/compare.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {
    "relay_eo": "tab:blue",
    "relay_alo": "tab:cyan",
    "dbz_alo": "tab:red",
    "dbz_eo": "tab:orange",
}


def main(src, dst):
    data = json.load(open(src))
    runs = len(data["runs"])
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    for key, colour in COLOURS.items():
        c = data["summary"][key]
        pts = c["points"]
        rates = [p["rate"] for p in pts]
        for q, ls in (("p50", ":"), ("p99", "-")):
            med = [p[q]["median"] for p in pts]
            low = [p[q]["median"] - p[q]["min"] for p in pts]
            high = [p[q]["max"] - p[q]["median"] for p in pts]
            ax.errorbar(
                rates,
                med,
                yerr=[low, high],
                fmt=ls,
                marker="o",
                capsize=3,
                color=colour,
                label=f"{c['label']} {q}",
            )
    ax.set_xlabel("offered rate asked (events/s, one row per transaction, eight writers; compare.md gives what they wrote)")
    ax.set_ylabel("commit → visible to a read_committed consumer (ms)")
    ax.set_yscale("log")
    drains = ", ".join(
        f"{data['summary'][k]['label']} {data['summary'][k]['sustained']['median']:.0f}"
        for k in COLOURS
    )
    ax.set_title(
        f"{runs} runs: median, bars from the lowest to the highest run\nbacklog drain, events/s: {drains}",
        fontsize=8,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
