"""bench/results/latest.png: the 1-token latency distributions of every path, and the prompt
tokens evaluated per turn of the two replayed sessions and of the turns after llama-server
restarts, direct and through the proxy."""

from __future__ import annotations

from pathlib import Path

from bench.stats import percentile as pct


def plot(results: dict, path: Path) -> None:
    """Draw the figure to `path`. matplotlib is imported here rather than above: only `make bench`
    installs it (the bench extra), and tests/test_bench.py runs the harness without it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right, restarts) = plt.subplots(1, 3, figsize=(19, 4.8))
    samples = results["overhead"]["samples"]
    for name, label, color in (("direct", "direct", "#555555"), ("floor", "bare WSGI relay, same gunicorn", "#bdbdbd"),
                               ("flask", "one-route Flask relay, same gunicorn", "#8c8c8c"),
                               ("relay", "OpenAI relay", "#1f77b4"), ("anthropic", "Anthropic translation", "#d62728")):
        values = sorted(samples[name])
        left.plot(values, [i / len(values) for i in range(len(values))], label=label, color=color)
    left.set_xlabel("1-token completion latency (ms)")
    left.set_ylabel("share of requests at or below")
    left.set_xlim(0, pct(samples["anthropic"], 99.5) * 1.1)
    left.set_title("Latency: direct vs through llamabridge")
    left.legend()
    left.grid(alpha=0.3)
    prefill_bars(right, results["cache"], "llamabridge", "Prefill per turn, two Claude Code sessions")
    prefill_bars(restarts, results["persist"], "llamabridge, slots saved to disk", "Prefill per turn, each after a llama-server restart")
    fig.suptitle(f"llamabridge bench, {results['date']}: {results['machine']['cpu']}, {results['machine']['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def prefill_bars(ax, phase: dict, proxied: str, title: str) -> None:
    """Prompt tokens evaluated per turn of a phase (its "turns", "direct" and "proxy"), side by side."""
    xs = range(len(phase["turns"]))
    ax.bar([x - 0.2 for x in xs], phase["direct"], width=0.4, label="direct", color="#555555")
    ax.bar([x + 0.2 for x in xs], phase["proxy"], width=0.4, label=proxied, color="#1f77b4")
    ax.set_xticks(list(xs), [t.replace("session ", "s").replace(" turn ", " t") for t in phase["turns"]])
    ax.set_ylabel("prompt tokens evaluated")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
