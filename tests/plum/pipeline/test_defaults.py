"""The defaults of ``plum run``: the packaged amazon.toml (every setting with its reason), another file of the
same layout through --config, and the errors naming what a file misses."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from retrieval_data import load_bench

from plumrec.pipeline.defaults import PACKAGED, load_defaults


def test_run_defaults_come_from_a_config_file(tmp_path, capsys):
    """The packaged amazon.toml gives the defaults (each with its reason); --config takes another file of
    the same layout, and a file missing a section or setting is an error naming --config."""
    import tomllib

    d = load_defaults()
    assert d["model"]["preset"] == "auto" and d["sid"]["codebook_sizes"] == "auto"  # plumrec.pipeline.recipe
    assert d["sft"]["distill"] == 0.5 and d["run"]["budget"] == {"cpt": 0.35, "sft": 0.35, "sasrec": 0.3}
    text = (Path(__file__).resolve().parents[3] / "plum" / "configs" / "amazon.toml").read_text().splitlines()
    for i, line in enumerate(text):  # every setting has a comment line above it
        if "=" in line and not line.startswith("#"):
            assert text[i - 1].startswith("# "), line
    small = {**d, "model": {"preset": "tiny", "sid_init_scale": 0.0}}
    path = tmp_path / "small.json"
    path.write_text(json.dumps(small))
    base = ["--dataset", str(tmp_path), "--out", str(tmp_path / "o")]
    args = load_bench().parse_args([*base, "--config", str(path)])
    assert args.preset == "tiny" and args.defaults == small
    assert load_bench().parse_args([*base, "--config", str(path), "--preset", "small"]).preset == "small"
    del small["sasrec"]
    path.write_text(json.dumps(small))
    for bad in (str(path), "no-such-config"):
        with pytest.raises(SystemExit):
            load_bench().parse_args([*base, "--config", bad])
        assert "--config" in capsys.readouterr().err
    assert tomllib.loads("\n".join(text)) == d


@pytest.mark.parametrize("change, match", [
    (lambda d: {k: v for k, v in d.items() if k != "sid"}, r"section \[sid\] must set \['codebook_sizes', 'epochs'\]"),
    (lambda d: {**d, "run": {**d["run"], "budget": {"cpt": 1, "sft": 1}}},
     r"\[run.budget\] must give a share > 0 to each of \['cpt', 'sft', 'sasrec'\]"),
    (lambda d: {**d, "run": {**d["run"], "budget": {"cpt": 1, "sft": 0, "sasrec": 1}}},
     r"\[run.budget\] must give a share > 0"),
    (lambda d: {**d, "extra": {}}, r"unknown sections \['extra'\]"),
])
def test_a_config_file_missing_or_adding_settings_is_refused(tmp_path, change, match):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(change(load_defaults(PACKAGED))))
    with pytest.raises(ValueError, match=f"{path}: {match}"):
        load_defaults(str(path))
    with pytest.raises(ValueError, match=r"'nope' must be a packaged config \(amazon\) or an existing file"):
        load_defaults("nope")
