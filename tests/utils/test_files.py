"""Atomic writes and prompts files."""

from __future__ import annotations

import pytest

from dpldm.errors import ConfigError
from dpldm.utils.files import atomic_write, read_prompts


def test_a_write_that_fails_leaves_the_old_file_whole_and_no_part(tmp_path):
    path = tmp_path / "record.json"
    with atomic_write(str(path)) as f:
        f.write("old")
    with pytest.raises(RuntimeError):
        with atomic_write(str(path)) as f:
            f.write("half of the new")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "old" and not (tmp_path / "record.json.part").exists()


def test_prompts_one_a_line_and_errors_that_name_the_field(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a dog\n\n  a red square  \n")
    assert read_prompts(str(path), "--prompts") == ["a dog", "a red square"]
    path.write_text("\n \n")
    with pytest.raises(ConfigError, match="--prompts = .*holds no prompt"):
        read_prompts(str(path), "--prompts")
    with pytest.raises(ConfigError, match="CLIPScore.prompts_file = .*no such file"):
        read_prompts(str(tmp_path / "none.txt"), "CLIPScore.prompts_file")
