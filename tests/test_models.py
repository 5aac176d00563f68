"""The Anthropic shape of `/v1/models` (proxy/models.py): pagination as Anthropic's API pages
its `ModelInfo` list. The live listing, with both SDKs, is in test_proxy_llama.py."""

from __future__ import annotations

import pytest

from proxy import models
from proxy.errors import ApiError, Rejected

ENTRIES = models.openai_entries({"data": [{"id": f"m{i}", "created": 1_764_000_000} for i in range(5)] + ["junk", {"id": 3}]},
                                n_ctx=4096, slots=2)


def ids(page: dict) -> list[str]:
    return [m["id"] for m in page["data"]]


def test_entries_keep_only_named_models_and_carry_the_window():
    assert [m["id"] for m in ENTRIES] == ["m0", "m1", "m2", "m3", "m4"]
    info = models.anthropic_entry(ENTRIES[0])
    assert info["max_input_tokens"] == 4096 and info["slots"] == 2 and info["created_at"] == "2025-11-24T16:00:00Z"
    assert models.anthropic_entry({"id": "x", "created": "soon", "context_window": 1, "slots": 1})["created_at"] == "1970-01-01T00:00:00Z"


@pytest.mark.parametrize("args, expect, more", [
    ({}, ["m0", "m1", "m2", "m3", "m4"], False),
    ({"limit": "2"}, ["m0", "m1"], True),
    ({"limit": "2", "after_id": "m1"}, ["m2", "m3"], True),
    ({"limit": "2", "after_id": "m2"}, ["m3", "m4"], False),
    ({"limit": "2", "before_id": "m4"}, ["m2", "m3"], True),
    ({"limit": "2", "before_id": "m2"}, ["m0", "m1"], False),
    ({"after_id": "m4"}, [], False),
])
def test_pages(args, expect, more):
    page = models.anthropic_page(ENTRIES, args)
    assert ids(page) == expect and page["has_more"] is more
    assert page["first_id"] == (expect[0] if expect else None) and page["last_id"] == (expect[-1] if expect else None)


@pytest.mark.parametrize("args, where", [
    ({"limit": "many"}, "limit"), ({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"),
    ({"after_id": "nope"}, "after_id"), ({"after_id": "m1", "before_id": "m3"}, "after_id and before_id"),
])
def test_bad_page_arguments_are_the_clients_400(args, where):
    with pytest.raises(Rejected) as err:
        models.anthropic_page(ENTRIES, args)
    assert err.value.status == 400 and err.value.message.startswith(where)


def test_an_unknown_model_is_a_404_naming_the_served_ones():
    with pytest.raises(ApiError) as err:
        models.find(ENTRIES, "claude-opus-5-5")
    assert err.value.status == 404 and "'m0'" in err.value.message


def test_a_model_named_by_its_path_is_found_whatever_the_url_did_to_its_slashes():
    entries = models.openai_entries({"data": [{"id": "/models/qwen/q.gguf"}]}, n_ctx=1, slots=1)
    for asked in ("/models/qwen/q.gguf", "models/qwen/q.gguf", "models//qwen/q.gguf"):
        assert models.find(entries, asked)["id"] == "/models/qwen/q.gguf"
