"""Nothing lost, nothing silent: bad input and faults end in one line (``error: ...``, exit
2) naming the file, tensor, flag or line and the fix, and leave the disk as it was; kills
leave nothing behind that the next run does not clean up. Error cases run the CLI in
process (fast); kill cases run a real subprocess and send a real signal."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, load_tiny
from moeq import cli

FLAGS = ["--avg_bits", "2.0", "--high_bit_level", "3", "--mid_bit_level", "2", "--low_bit_level", "1",
         "--groupsize", "32", "--nsamples", "8", "--seqlen", "64"]


def listing(d) -> list[str]:
    return sorted(os.listdir(d))


def error_of(argv, capsys, task="causal") -> str:
    """Runs the CLI; asserts exit 2 and exactly one error line, returns it."""
    code = cli.main(task, "", [str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    return err[0]


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


# ---- flags: every number validated before anything is loaded ----------------------------

@pytest.mark.parametrize("flag,value,expect", [
    ("--groupsize", "0", "--groupsize 0: must be positive"), ("--groupsize", "-5", "--groupsize -5"),
    ("--attn_bit_level", "32", "--attn_bit_level 32: choose one of 1, 2, 3, 4, 8, or 16"), ("--nsamples", "0", "--nsamples 0"),
    ("--seqlen", "0", "--seqlen 0"), ("--batch_size", "0", "--batch_size 0"),
    ("--expert_batch", "-1", "--expert_batch -1"), ("--percdamp", "-1", "--percdamp -1.0"),
    ("--max_shard_size", "abc", "--max_shard_size 'abc' is not a size"), ("--zeta", "0", "--zeta 0.0"),
    ("--min_expert_tokens", "-1", "--min_expert_tokens -1"), ("--device", "cuda", "no CUDA GPU")])
def test_bad_numbers_are_refused_before_anything_is_written(flag, value, expect, tiny_mixtral_dir, small_text_dir,
                                                             work, capsys):
    if flag == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = ["--model", tiny_mixtral_dir, "--dataset", small_text_dir, *FLAGS, "--save", "--pack",
            "--saving_path", work / "out", flag, value]
    assert expect in error_of(argv, capsys)
    assert listing(work) == []


@pytest.mark.parametrize("avg,levels,experts,nearest", [
    ("2.1", ["--mid_bit_level", "2"], 8, "2 and 2.125"), ("1.75", [], 4, "1.5 and 2")])
def test_unreachable_budget_lists_the_nearest_and_can_be_rounded_on_request(avg, levels, experts, nearest,
                                                                            tokenizer, small_text_dir, work,
                                                                            capsys):
    from moeq.utils.tiny import build_tiny_mixtral
    model = build_tiny_mixtral(str(work / f"m{experts}"), open(os.path.join(small_text_dir, "train.txt")).read(),
                               vocab_size=320, num_local_experts=experts)
    base = ["--model", model, "--dataset", small_text_dir, "--avg_bits", avg, "--high_bit_level", "3",
            "--low_bit_level", "1", *levels, "--groupsize", "32", "--nsamples", "8", "--seqlen", "64",
            "--allocation_path", work / "a.json"]
    line = error_of(base, capsys)
    assert f"--avg_bits {avg} cannot be met with {experts} experts" in line and nearest in line
    assert not os.path.exists(work / "a.json")
    assert cli.main("causal", "", [str(a) for a in base] + ["--round_avg_bits"]) == 0
    assert json.loads((work / "a.json").read_text())["avg_bits"] == float(nearest.split(" and ")[1])


# ---- the source model and the data: checked before the first block ----------------------

def test_broken_source_checkpoints(tiny_mixtral_dir, small_text_dir, work, capsys, tokenizer):
    def err(model):
        return error_of(["--model", model, "--dataset", small_text_dir, *FLAGS], capsys)

    garbled = copy_model(tiny_mixtral_dir, work / "garbled")
    open(os.path.join(garbled, "config.json"), "w").write("{ not json")
    assert "config.json" in err(garbled) and "damaged" in err(garbled)
    open(os.path.join(garbled, "config.json"), "w").write("")
    assert "config.json" in err(garbled)

    truncated = copy_model(tiny_mixtral_dir, work / "truncated")
    weights = os.path.join(truncated, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(100)
    assert "model.safetensors" in err(truncated) and "truncated or corrupt" in err(truncated)

    # a sharded source with a missing shard: found before any block is quantized
    sharded = str(work / "sharded")
    load_tiny(tiny_mixtral_dir).save_pretrained(sharded, max_shard_size="200KB")
    tokenizer.save_pretrained(sharded)
    shard = sorted(f for f in os.listdir(sharded) if f.startswith("model-"))[-1]
    os.remove(os.path.join(sharded, shard))
    assert shard in err(sharded) and "missing" in err(sharded)

    fewer = copy_model(tiny_mixtral_dir, work / "fewer_layers")
    cfg = json.load(open(os.path.join(fewer, "config.json")))
    cfg["num_hidden_layers"] = 1
    json.dump(cfg, open(os.path.join(fewer, "config.json"), "w"))
    assert "model.layers.1" in err(fewer) and "a block the config does not have" in err(fewer)
    more = copy_model(tiny_mixtral_dir, work / "more_layers")
    cfg["num_hidden_layers"] = 3
    json.dump(cfg, open(os.path.join(more, "config.json"), "w"))
    assert "model.layers.2." in err(more) and "is in no weight file" in err(more)


def test_a_packed_checkpoint_is_not_a_source(tiny_mixtral_dir, small_text_dir, work, capsys):
    assert cli.main("causal", "", ["--model", tiny_mixtral_dir, "--dataset", small_text_dir, *FLAGS, "--save",
                                   "--pack", "--saving_path", str(work / "packed")]) == 0
    capsys.readouterr()
    line = error_of(["--model", work / "packed", "--dataset", small_text_dir, *FLAGS], capsys)
    assert "is already quantized (quant_method moeq)" in line


def test_short_text_non_utf8_and_broken_jsonl(tiny_mixtral_dir, small_text_dir, work, capsys):
    short = work / "short.txt"
    short.write_text(open(os.path.join(small_text_dir, "train.txt")).read()[:2000])
    line = error_of(["--model", tiny_mixtral_dir, "--dataset", short, *FLAGS[:-4], "--nsamples", "64",
                     "--seqlen", "64"], capsys)
    assert "fewer than --nsamples 64" in line
    latin = work / "latin1.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 5000)
    line = error_of(["--model", tiny_mixtral_dir, "--dataset", latin, *FLAGS], capsys)
    assert str(latin) in line and "not UTF-8" in line


def test_broken_jsonl_names_file_and_line(tokenizer, small_text_dir, work, capsys):
    from test_switch import make_switch_dirs
    finetuned, _, _, _ = make_switch_dirs(work, tokenizer, small_text_dir)
    broken = work / "broken.jsonl"
    broken.write_text(json.dumps({"source": "a b c", "target": "d"}) + "\n{broken\n")
    line = error_of(["--model", finetuned, "--dataset", broken, "--groupsize", "32", "--nsamples", "1"],
                    capsys, task="seq2seq")
    assert f"{broken} line 2: not valid JSON" in line


def test_extreme_weight_names_the_expert_not_a_cholesky_failure(tiny_mixtral_dir, small_text_dir, work, capsys):
    model = load_tiny(tiny_mixtral_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.gate_up_proj[3, 5, 7] = 1e6
    model.save_pretrained(work / "outlier")
    shutil.copy(os.path.join(tiny_mixtral_dir, "tokenizer.json"), work / "outlier")
    line = error_of(["--model", work / "outlier", "--dataset", small_text_dir, "--mixed_type", "uniform",
                     "--avg_bits", "3", "--groupsize", "32", "--nsamples", "8", "--seqlen", "64"], capsys)
    assert "model.layers.0.mlp.experts.gate_up_proj[3]: row 5 holds 1e+06 (column 7)" in line
    assert "overflows float16" in line


def test_expert_without_tokens_reports_no_tokens(tiny_mixtral_dir, small_text_dir, tokenizer):
    from moeq.config import QuantConfig
    from moeq.utils import data
    from moeq.utils.families import family_for
    from moeq.utils.pipeline import quantize_model
    from test_pipeline import never_route_to_7
    model = never_route_to_7(load_tiny(tiny_mixtral_dir))
    windows = data.calibration_windows(data.tokenize(tokenizer, data.load_text(small_text_dir).train), 8, 64, 0)
    lines = []
    report = quantize_model(model, family_for(model), windows, QuantConfig(attn_bits=None, groupsize=32,
                                                                           batch_size=4, min_expert_tokens=0),
                            torch.device("cpu"), log=lines.append)
    rows = [r for r in report.modules if r["name"].endswith("[7]")]
    assert rows and all(r["tokens"] == 0 and r["rel_err"] is None for r in rows)
    assert report.starved == []
    assert any(line.split()[0].endswith("[7]") and "no tokens" in line for line in lines)


# ---- the output location -------------------------------------------------------------

def test_output_location_checks(tiny_mixtral_dir, small_text_dir, work, capsys, monkeypatch):
    base = ["--model", tiny_mixtral_dir, "--dataset", small_text_dir, *FLAGS, "--save", "--pack"]
    (work / "a_file").write_text("x")
    assert "is a file, not a checkpoint directory" in error_of(base + ["--saving_path", work / "a_file",
                                                                        "--overwrite"], capsys)
    assert "a file is in the way" in error_of(base + ["--saving_path", work / "a_file" / "ckpt"], capsys)
    (work / "notes").mkdir()
    (work / "notes" / "keep.txt").write_text("mine")
    assert "pass --overwrite" in error_of(base + ["--saving_path", work / "notes"], capsys)
    assert "is not a checkpoint this toolkit wrote" in error_of(base + ["--saving_path", work / "notes",
                                                                        "--overwrite"], capsys)
    assert (work / "notes" / "keep.txt").read_text() == "mine"
    model = copy_model(tiny_mixtral_dir, work / "model")
    for target in (model, os.path.join(model, "inside"), str(work)):   # the source, inside it, around it
        line = error_of(["--model", model, *base[2:], "--saving_path", target, "--overwrite"], capsys)
        assert "the checkpoint" in line and "the run reads" in line
    assert sorted(os.listdir(model)) == sorted(os.listdir(tiny_mixtral_dir))
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert "is not writable" in error_of(base + ["--saving_path", work / "ro" / "ckpt"], capsys)
    monkeypatch.undo()
    monkeypatch.chdir(work)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    line = error_of(base + ["--saving_path", work / "full"], capsys)
    assert "the checkpoint needs about" in line and "free some space" in line
    assert sorted(p for p in listing(work) if p.startswith(".")) == []   # no partial, no lock left


def test_a_second_run_to_the_same_path_stops_at_once(tiny_mixtral_dir, small_text_dir, work, capsys):
    from moeq.utils.checkpoint import OutputDir
    held = OutputDir(str(work / "ckpt"), False).open()    # another run, in the middle of its work
    try:
        line = error_of(["--model", tiny_mixtral_dir, "--dataset", small_text_dir, *FLAGS, "--save", "--pack",
                         "--saving_path", work / "ckpt", "--overwrite"], capsys)
        assert "is being written by another run right now" in line
    finally:
        held.close(failed=True)
    assert listing(work) == []


def test_overwrite_swaps_atomically_and_a_kill_mid_way_is_cleaned_up(tiny_mixtral_dir, small_text_dir, work,
                                                                      capsys, monkeypatch):
    from moeq.utils import checkpoint
    argv = [str(a) for a in ["--model", tiny_mixtral_dir, "--dataset", small_text_dir, *FLAGS, "--save", "--pack",
                             "--saving_path", work / "ckpt", "--overwrite"]]
    assert cli.main("causal", "", argv) == 0
    first = json.loads((work / "ckpt" / "results.json").read_text())["config"]["seed"]
    # the process dies after the swap, before the old checkpoint is deleted
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(SystemExit(137)))
    with pytest.raises(SystemExit):
        cli.main("causal", "", argv + ["--seed", "1"])
    monkeypatch.undo()
    monkeypatch.chdir(work)
    assert json.loads((work / "ckpt" / "results.json").read_text())["config"]["seed"] == 1  # the new one, whole
    stale = [p for p in listing(work) if p.startswith(".ckpt.partial-")]
    assert len(stale) == 1 and json.loads((work / stale[0] / "results.json").read_text())["config"]["seed"] == first
    capsys.readouterr()
    assert cli.main("causal", "", argv + ["--seed", "2"]) == 0
    assert f"removed {work / stale[0]}" in capsys.readouterr().out
    assert listing(work) == ["ckpt"]


def _start(argv, cwd):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "quantize_mixtral.py"), *map(str, argv)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_partial(work, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(p.startswith(".ckpt.partial-") for p in os.listdir(work)):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("no partial directory appeared")


def _packing_run_under_way(tiny_mixtral_dir, small_text_dir, tmp_path):
    """A packing run to tmp_path/ckpt, once its partial folder exists: (argv, process)."""
    argv = ["--model", tiny_mixtral_dir, "--dataset", small_text_dir, *FLAGS, "--save", "--pack", "--saving_path",
            tmp_path / "ckpt"]
    proc = _start(argv, tmp_path)
    _wait_for_partial(tmp_path, proc)
    return argv, proc


def test_sigterm_cleans_up_like_ctrl_c(tiny_mixtral_dir, small_text_dir, tmp_path):
    _, proc = _packing_run_under_way(tiny_mixtral_dir, small_text_dir, tmp_path)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "error: interrupted" in err, err[-2000:]
    assert listing(tmp_path) == []


def test_kill_9_leaves_a_partial_that_the_next_run_removes(tiny_mixtral_dir, small_text_dir, tmp_path):
    argv, proc = _packing_run_under_way(tiny_mixtral_dir, small_text_dir, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    left = [p for p in listing(tmp_path) if p.startswith(".ckpt.partial-")]
    assert left and not os.path.exists(tmp_path / "ckpt")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "quantize_mixtral.py"), *map(str, argv)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"removed {tmp_path / left[0]}" in r.stdout
    assert listing(tmp_path) == ["ckpt"]


# ---- loading: integrity -----------------------------------------------------------------

def _rewrite_checksum(ckpt):
    from moeq.quant.format import file_sha256
    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    cfg["quantization_config"]["checksums"] = {f: file_sha256(os.path.join(ckpt, f))
                                               for f in cfg["quantization_config"]["checksums"]}
    json.dump(cfg, open(os.path.join(ckpt, "config.json"), "w"))


def test_nan_scale_is_refused_on_load_and_nan_logits_fail_lm_eval(tiny_mixtral_dir, small_text_dir, work, capsys):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from moeq.quant.format import FormatError
    assert cli.main("causal", "", [str(a) for a in ["--model", tiny_mixtral_dir, "--dataset", small_text_dir,
                                                    *FLAGS, "--save", "--pack", "--saving_path", work / "ck"]]) == 0
    weights = str(work / "ck" / "model.safetensors")
    tensors = load_file(weights)
    name = "model.layers.1.mlp.experts.down_proj_scale"
    tensors[name][2, 0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    _rewrite_checksum(work / "ck")   # the file is consistent: only the value is wrong
    with pytest.raises(FormatError, match=f"tensor {name} \\({weights}\\) contains NaN"):
        AutoModelForCausalLM.from_pretrained(str(work / "ck"))

    import lm_eval
    from lm_eval.tasks import TaskManager

    from moeq.huggingface import QuantizedHFLM
    from test_packed import write_tasks
    os.remove(weights)
    assert cli.main("causal", "", [str(a) for a in ["--model", tiny_mixtral_dir, "--dataset", small_text_dir,
                                                    *FLAGS, "--save", "--pack", "--saving_path", work / "ck",
                                                    "--overwrite"]]) == 0
    lm = QuantizedHFLM(pretrained=str(work / "ck"), quantized=True, device="cpu", dtype="float32", batch_size=2)
    with torch.no_grad():
        lm.model.model.layers[0].mlp.experts.gate_up_proj_scale[:] = float("inf")   # corrupted in memory
    with pytest.raises(RuntimeError, match="logits are not finite"):
        lm_eval.simple_evaluate(model=lm, tasks=["moeq_mc"], task_manager=TaskManager(include_path=write_tasks(work)))


def test_a_failed_shard_write_stops_the_run_and_leaves_nothing(tiny_mixtral_dir, small_text_dir, work, monkeypatch, capsys):
    """Shards are written by a background thread: a write that fails (here the disk fills at the
    third shard) still stops the run, in its own thread, with one line naming the error, and no
    partial folder is left."""
    import safetensors.torch
    real, calls = safetensors.torch.save_file, []

    def save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", path)
        time.sleep(0.2)   # still writing while the run goes on
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    rc = cli.main("causal", "", [str(a) for a in ["--model", tiny_mixtral_dir, "--dataset", small_text_dir, *FLAGS,
                                                  "--save", "--pack", "--saving_path", work / "ckpt",
                                                  "--max_shard_size", "100KB"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: No space left on device (") and "nothing was saved" in err[0], err
    assert len(calls) >= 3
    assert [p for p in listing(work) if p.startswith(".") or p == "ckpt"] == []
