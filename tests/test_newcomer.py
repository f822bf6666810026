"""What a newcomer meets: --help, the errors for what they type offline, the results a run
leaves on disk, clean output in a log file, and the demo on the shipped trained model."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from moeq import cli

TINY_FLAGS = ["--avg_bits", "2.0", "--high_bit_level", "3", "--mid_bit_level", "2", "--low_bit_level", "1",
              "--groupsize", "32", "--nsamples", "8", "--seqlen", "64"]


@pytest.mark.parametrize("task", ["causal", "seq2seq"])
def test_help_has_a_pasteable_example_and_every_flag_explained_with_its_default(task):
    script = "quantize_mixtral.py" if task == "causal" else "quantize_switch.py"
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    example = [line.strip() for line in r.stdout.splitlines() if line.strip().startswith(f"python {script}")]
    assert example and example[0].endswith("\\")   # the example keeps its lines (and continuations)
    for action in cli.parser(task)._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings} has no help text"
        if action.default not in (None, False, argparse_suppress()):
            assert f"(default: {action.default})" in " ".join(r.stdout.split()), action.option_strings


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_offline_hub_model_is_one_line_naming_the_id_and_the_fix(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert cli.main("causal", "", ["--model", "mistralai/Mixtral-8x7B-v0.1", "--dataset", "wikitext2"]) == 2
    line = one_error_line(capsys)
    assert "mistralai/Mixtral-8x7B-v0.1" in line and "pass a local checkpoint directory" in line
    assert cli.main("causal", "", ["--model", "Mixtral8x7B"]) == 2   # the paper's alias: the same
    assert "mistralai/Mixtral-8x7B-v0.1" in one_error_line(capsys)
    assert os.listdir(tmp_path) == []


def test_offline_hub_dataset_is_one_line_naming_it_and_the_fix(monkeypatch, capsys, tiny_mixtral_dir, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert cli.main("causal", "", ["--model", tiny_mixtral_dir, "--dataset", "wikitext2", *TINY_FLAGS]) == 2
    line = one_error_line(capsys)
    assert "--dataset wikitext2: could not load it from the Hugging Face hub" in line
    assert "pass a text file or a directory" in line
    assert os.listdir(tmp_path) == []


def test_results_json_and_allocation_picture_beside_the_checkpoint(tiny_mixtral_dir, small_text_dir, tmp_path):
    out = tmp_path / "ckpt"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "quantize_mixtral.py"), "--model", tiny_mixtral_dir,
                        "--dataset", small_text_dir, *TINY_FLAGS, "--eval_ppl", "--save", "--pack", "--saving_path",
                        str(out)], capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["command"].startswith("python quantize_mixtral.py --model ")
    assert set(res["versions"]) >= {"moeq", "torch", "transformers"}
    ppl = float(r.stdout.strip().splitlines()[-1].split(": ")[1])
    assert res["evaluation"]["quantized"]["ppl"][os.path.basename(small_text_dir)] == pytest.approx(ppl, abs=1e-4)
    assert res["avg_expert_bits"] == 2.0 and res["config"]["quant"]["avg_bits"] == 2.0
    assert res["seconds"]["quantize"] > 0 and res["seconds"]["total"] >= res["seconds"]["quantize"]
    assert res["sizes"]["disk_bytes"] == sum(os.path.getsize(out / f) for f in res["sizes"]["files"])
    assert [layer["bits"] for layer in res["layers"]] == \
        [layer["bits"] for layer in json.loads((out / "bit_allocation.json").read_text())["layers"]]
    png = (out / "bit_allocation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # the short summary on screen: the bits of every layer's experts
    for layer in res["layers"]:
        assert f"{layer['name']}: bits by expert {' '.join(map(str, layer['bits']))}" in r.stdout


def test_without_saving_results_go_beside_the_allocation(tiny_mixtral_dir, small_text_dir, tmp_path, capsys):
    alloc = tmp_path / "runs" / "a.json"
    alloc.parent.mkdir()
    assert cli.main("causal", "", ["--model", tiny_mixtral_dir, "--dataset", small_text_dir, *TINY_FLAGS,
                                   "--allocation_path", str(alloc)]) == 0
    assert sorted(os.listdir(alloc.parent)) == ["a.json", "a.png", "results.json"]
    assert json.loads((alloc.parent / "results.json").read_text())["saved_to"] is None


def test_a_log_file_gets_the_table_and_no_progress_bar(tiny_mixtral_dir, small_text_dir, tmp_path):
    """stdout and stderr into one file, as `cmd > log 2>&1` does: no carriage returns,
    every table row whole."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "quantize_mixtral.py"), "--model", tiny_mixtral_dir,
                        "--dataset", small_text_dir, *TINY_FLAGS, "--eval_ppl", "--save", "--pack", "--saving_path",
                        str(tmp_path / "ckpt")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=600, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:]
    assert "\r" not in r.stdout
    rows = [line for line in r.stdout.splitlines() if "experts.gate_up_proj[" in line]
    assert len(rows) == 16
    for line in rows:
        assert re.fullmatch(r"  model\.layers\.\d\.mlp\.experts\.gate_up_proj\[\d\] +[123] +\d+ +\S+ +\d+\.\d\d", line)


def test_demo_shows_the_gap_on_the_trained_model(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), "--out", str(tmp_path / "demo")],
                       capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["run"]: row for row in json.loads((tmp_path / "demo" / "summary.json").read_text())["rows"]}
    fp = rows["unquantized"]["ppl"]
    for name in ("mixed-paper", "mixed-frequency", "uniform-gptq", "uniform-rtn"):
        assert rows[name]["avg_bits"] == 2.0
        assert rows[name]["ppl"] > fp * 1.02                       # 2 bits cost something visible
        assert os.path.isfile(os.path.join(rows[name]["checkpoint"], "bit_allocation.png"))
    assert rows["uniform-gptq"]["ppl"] < rows["uniform-rtn"]["ppl"]  # GPTQ beats rounding
    assert "perplexity on held-out Python docs" in r.stdout
