"""How a prompt finds the saved KV cache that shares the longest beginning with it (proxy/kvcache.py):
hashes of the first 256, 512, ... tokens and of all of them, computed once per prompt."""

from __future__ import annotations

import hashlib
from array import array

from proxy.kvcache import CHECKPOINT, Prompt, SavedFile


def saved(tokens: array) -> SavedFile:
    prompt = Prompt(tokens)
    return SavedFile("f.bin", "model", 4096, len(tokens), tuple(prompt.checkpoints), prompt.full, len(tokens) + 5, 1, "s", 0.0, 0.0)


def test_the_hash_of_a_beginning_is_the_hash_of_those_tokens():
    tokens = array("i", range(1000))
    prompt = Prompt(tokens)
    for n in (0, 1, 255, 256, 257, 700, 1000):
        assert prompt.hash_of_first(n) == hashlib.blake2b(tokens[:n].tobytes(), digest_size=16).hexdigest()
    assert len(prompt.checkpoints) == 1000 // CHECKPOINT


def test_a_conversation_matches_its_own_file_whole_and_a_new_session_by_checkpoints():
    system = array("i", range(2000))  # shared by every session
    one = system + array("i", [7] * 300)
    one_later = one + array("i", [8] * 50)
    other = system + array("i", [9] * 300)
    file = saved(one)
    assert Prompt(one_later).shared_with(file) == len(one)  # all of it: the session's next turn
    assert Prompt(other).shared_with(file) == (2000 // CHECKPOINT) * CHECKPOINT  # what the checkpoints show
    assert Prompt(array("i", [5] * 3000)).shared_with(file) == 0
    assert Prompt(system[:100]).shared_with(file) == 0


def test_an_index_row_reads_back_and_another_step_is_not_matched():
    file = saved(array("i", range(600)))
    assert SavedFile.of_row(file.row()) == file
    row = file.row()
    row["checkpoints"] = row["checkpoints"].replace(f'"step": {CHECKPOINT}', '"step": 128')
    assert SavedFile.of_row(row) is None
    assert SavedFile.of_row({**file.row(), "checkpoints": "not json"}) is None
