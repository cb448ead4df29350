"""The study's plots, drawn with a matplotlib.pyplot handed in (``report.plot`` imports
it, or says that it is missing). Each returns False when there is nothing to draw."""

from __future__ import annotations

from pathlib import Path

PANELS = (("image_auroc", "image AUROC (%)"), ("pixel_auroc", "pixel AUROC (%)"))


def _ok(variant: dict) -> dict[int, dict]:
    return {int(k): r for k, r in variant["shots"].items() if "categories" in r}


def accuracy_vs_speed(plt, report: dict, path: Path) -> bool:
    """One point per variant, at its largest evaluated shot count: mean accuracy against
    evaluation throughput (log scale)."""
    points = []
    for v in report["variants"]:
        ok = _ok(v)
        if ok:
            k = max(ok)
            points.append((v["name"], k, ok[k]))
    if not points:
        return False
    fig, axes = plt.subplots(1, len(PANELS), figsize=(12, 4.6))
    for ax, (key, label) in zip(axes, PANELS):
        for i, (name, k, r) in enumerate(points):
            speed = r["mean"].get("images_per_second")
            value = r["mean"].get(key)
            if speed is None or value is None:
                continue
            ax.scatter([speed], [100 * value], s=40, color=f"C{i % 10}", label=f"{name} ({k}-shot)")
            ax.annotate(name, (speed, 100 * value), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("images/s (batched evaluation, this machine)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, loc="best")
    fig.suptitle(f"clipinspect study {report['study']['name']}: accuracy vs speed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def shots_curve(plt, report: dict, path: Path) -> bool:
    """Mean accuracy per shot count, one line per variant."""
    lines = [(v["name"], _ok(v)) for v in report["variants"]]
    lines = [(name, ok) for name, ok in lines if ok]
    if not lines:
        return False
    fig, axes = plt.subplots(1, len(PANELS), figsize=(12, 4.6))
    for ax, (key, label) in zip(axes, PANELS):
        for i, (name, ok) in enumerate(lines):
            ks = sorted(k for k in ok if ok[k]["mean"].get(key) is not None)
            ax.plot(ks, [100 * ok[k]["mean"][key] for k in ks], marker="o",
                    color=f"C{i % 10}", linestyle="-" if i < 10 else "--", label=name)
        ax.set_xlabel("reference shots")
        ax.set_ylabel(label)
        ax.set_xticks(report["study"]["shots"])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, loc="best")
    fig.suptitle(f"clipinspect study {report['study']['name']}: accuracy vs shots", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def pool_curve(plt, report: dict, path: Path) -> bool:
    """Mean zero-shot accuracy per pool size ('all': each category's whole test set), one line
    per pool-scored variant; False when the study has no pool sizes."""
    sizes = report["study"].get("pool_sizes") or []
    lines = []
    for v in report["variants"]:
        runs = {str(p): v.get("pools", {}).get(str(p), {}) for p in sizes}
        runs["all"] = v["shots"].get("0", {})
        if v.get("pools") and any("categories" in r for r in runs.values()):
            lines.append((v["name"], runs))
    if not lines:
        return False
    labels = [*map(str, sizes), "all"]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(12, 4.6))
    for ax, (key, label) in zip(axes, PANELS):
        for i, (name, runs) in enumerate(lines):
            xs = [x for x, p in enumerate(labels) if runs[p].get("mean", {}).get(key) is not None]
            ax.plot(xs, [100 * runs[labels[x]]["mean"][key] for x in xs], marker="o",
                    color=f"C{i % 10}", linestyle="-" if i < 10 else "--", label=name)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("zero-shot pool size (test images scored together)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, loc="best")
    fig.suptitle(f"clipinspect study {report['study']['name']}: accuracy vs pool size",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
