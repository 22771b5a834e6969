"""PNG plots of a ``sparkserve bench`` run (matplotlib, Agg backend): latency CDFs per target and
level, and output throughput / per-user speed against concurrency."""

from __future__ import annotations

import math
from pathlib import Path


def plot_all(doc: dict, result: dict, stem: Path) -> list[Path]:
    """Write ``STEM_cdf.png`` and (with more than one concurrency level) ``STEM_concurrency.png``;
    returns the paths written (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    getters = {
        "TTFT (ms)": lambda r: [r.ttft_s * 1e3],
        "TPOT (ms)": lambda r: [r.tpot_s * 1e3],
        "ITL per token (ms)": lambda r: [x * 1e3 for x in r.itl_per_token_s()],
        "E2E (ms)": lambda r: [r.e2e_s * 1e3],
    }
    for ax, (title, get) in zip(axes.flat, getters.items(), strict=True):
        for pooled in result["levels"]:
            records = [x for r in result["runs"] if r["level"] == pooled["level"] and r["target"] == pooled["target"]
                       for x in r["records"] if x.ok]
            xs = sorted(v for rec in records for v in get(rec) if not math.isnan(v))
            if xs:
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=f"{pooled['target']} {pooled['level'].label()}")
        ax.set_title(f"CDF of {title}")
        ax.set_xlabel(title)
        ax.set_ylabel("fraction")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(f"{stem}_cdf.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
    conc = sorted({x["level"]["max_concurrency"] for x in doc["levels"] if x["level"]["max_concurrency"]})
    if len(conc) > 1:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for name in dict.fromkeys(x["target"] for x in doc["levels"]):
            cells = sorted((x for x in doc["levels"] if x["target"] == name and x["level"]["max_concurrency"]),
                           key=lambda x: x["level"]["max_concurrency"])
            cs = [x["level"]["max_concurrency"] for x in cells]
            axes[0].plot(cs, [x["metrics"]["output_throughput"] for x in cells], marker="o", label=name)
            axes[1].plot(cs, [x["metrics"]["per_user_tokens_per_s"]["median"] for x in cells], marker="o", label=name)
        for ax, title in zip(axes, ("output tokens/s (aggregate)", "per-user tokens/s (median, 1/TPOT)"), strict=True):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("max concurrency")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        path = Path(f"{stem}_concurrency.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
