"""Draws loadtest/results/compare.json (written by the compare benchmark) as latency
percentiles against offered rate, cdc-relay next to Debezium.

    python loadtest/plot.py results/compare.json results/compare.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    data = json.load(open(src))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    styles = {"relay": ("cdc-relay", "tab:blue"), "debezium": ("Debezium", "tab:red")}
    for key, (label, colour) in styles.items():
        pts = data[key]["points"]
        rates = [p["rate"] for p in pts]
        for q, ls in (("p50", ":"), ("p95", "--"), ("p99", "-")):
            ax.plot(rates, [p[q] for p in pts], ls, marker="o", color=colour, label=f"{label} {q}")
    ax.set_xlabel("offered rate (events/s, one row per transaction)")
    ax.set_ylabel("commit → visible to a read_committed consumer (ms)")
    ax.set_yscale("log")
    ax.set_title(
        f"cdc-relay {data['relay']['sustained']:.0f} ev/s sustained, {data['relay']['rss_mib']:.0f} MiB RSS; "
        f"Debezium {data['debezium']['sustained']:.0f} ev/s, {data['debezium']['rss_mib']:.0f} MiB",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
