"""Reading one value off a Prometheus text page (llama-server's, the proxy's, the collector's)."""

from __future__ import annotations

import requests
from prometheus_client.parser import text_string_to_metric_families


def metric_in(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """The sum of the samples called `name` (with these labels) in a page; None if it has none."""
    found = [sample.value for family in text_string_to_metric_families(text) for sample in family.samples
             if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items())]
    return sum(found) if found else None


def metric(url: str, name: str, labels: dict[str, str] | None = None, missing: float | None = None,
           headers: dict[str, str] | None = None) -> float:
    """`metric_in` of `url`/metrics (asked with `headers`: a key, where the service has keys). A
    sample that is not there fails the test, unless `missing` says what it counts as (a labelled
    counter appears only once it has counted something)."""
    value = metric_in(requests.get(url + "/metrics", headers=headers, timeout=5).text, name, labels)
    if value is None:
        assert missing is not None, f"{name} {labels or ''} not in {url}/metrics"
        return missing
    return value
