"""The README's main job, `plum demo`, on a small default."""
import json
import subprocess
import sys

from plum.cli import main


def test_demo_writes_results(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--items", "20000"]) == 0
    res = json.loads((tmp_path / "trie_demo.json").read_text())
    assert res["num_items"] == 20000 and res["num_sids"] == 20000
    assert res["random_sids_present"] < 0.01  # random SIDs are (almost) never in the trie
    assert (tmp_path / "trie.safetensors").exists()
    assert "bytes per item" in capsys.readouterr().out


def test_console_script_entry_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "plum.cli", "demo", "--out", str(tmp_path), "--items", "1000"],
                         capture_output=True, text=True, check=True)
    assert "PLUM SID trie demo" in out.stdout
