"""A truncated or corrupt model.safetensors is refused with a message that names the file and
the fix, not safetensors' own header error."""

from __future__ import annotations

import shutil

import pytest

from prefix_scorers.base_model import load_model
from prefix_scorers.checkpoint import load_scorer


@pytest.mark.parametrize("content", [b"", b"not a safetensors file", b"\x08\x00\x00\x00\x00\x00\x00\x00{"])
def test_corrupt_weights_name_the_file_and_the_fix(tmp_path, tiny_model_dir, tiny_scorer_dir, content):
    broken = tmp_path / "scorer"
    shutil.copytree(tiny_scorer_dir, broken)
    (broken / "model.safetensors").write_bytes(content)
    with pytest.raises(ValueError) as e:
        load_scorer(broken, base_embedding=load_model(tiny_model_dir).get_input_embeddings().weight)
    message = str(e.value)
    assert str(broken / "model.safetensors") in message
    assert "corrupt" in message and "prefix-scorers export" in message and "--scorer" in message
