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
    k = results["cache"]
    xs = range(len(k["turns"]))
    right.bar([x - 0.2 for x in xs], k["direct"], width=0.4, label="direct", color="#555555")
    right.bar([x + 0.2 for x in xs], k["proxy"], width=0.4, label="llamabridge", color="#1f77b4")
    right.set_xticks(list(xs), [t.replace("session ", "s").replace(" turn ", " t") for t in k["turns"]])
    right.set_ylabel("prompt tokens evaluated")
    right.set_title("Prefill per turn, two Claude Code sessions")
    right.legend()
    right.grid(alpha=0.3, axis="y")
    p = results["persist"]
    xs = range(len(p["turns"]))
    restarts.bar([x - 0.2 for x in xs], p["direct"], width=0.4, label="direct", color="#555555")
    restarts.bar([x + 0.2 for x in xs], p["proxy"], width=0.4, label="llamabridge, slots saved to disk", color="#1f77b4")
    restarts.set_xticks(list(xs), [t.replace("session ", "s").replace(" turn ", " t") for t in p["turns"]])
    restarts.set_ylabel("prompt tokens evaluated")
    restarts.set_title("Prefill per turn, each after a llama-server restart")
    restarts.legend()
    restarts.grid(alpha=0.3, axis="y")
    fig.suptitle(f"llamabridge bench, {results['date']}: {results['machine']['cpu']}, {results['machine']['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
