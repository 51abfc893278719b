"""The run configuration: files that do not parse are errors naming the file (and line)."""
from __future__ import annotations

import pytest

from plumrec.pipeline.config import load_run_config, read_config_file


def test_config_files_that_do_not_parse_name_the_file_and_line(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('seed = 3\n[sid]\nepochs = 4\n[cpt]\nsteps = "1\n')
    with pytest.raises(ValueError, match=r"run.toml: not valid TOML .*line 5"):
        load_run_config(toml)
    toml.write_bytes(b'seed = 3\n[data]\npath = "caf\xe9"\n')
    with pytest.raises(ValueError, match=r"run.toml: line 3: not UTF-8"):
        read_config_file(toml)
    js = tmp_path / "run.json"
    js.write_text('{"seed": 3,\n "sid": {"epochs": 4')
    with pytest.raises(ValueError, match=r"run.json: line 2: not valid JSON"):
        load_run_config(js)
    js.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"run.json: a run configuration must be a JSON object, got list"):
        load_run_config(js)
    with pytest.raises(FileNotFoundError, match=r"none.toml not found"):
        load_run_config(tmp_path / "none.toml")
    toml.write_text("seed = 3\n[sid]\nepochs = 4\n")
    cfg = load_run_config(toml)
    assert cfg["seed"] == 3 and cfg["sid"]["epochs"] == 4
