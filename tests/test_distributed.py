"""Several ranks (torch.distributed, gloo on the CPU) write the checkpoint one process writes,
byte for byte: through torchrun and the CLI, and through the Python API in a process group
the caller made (uneven splits of batches and experts, experts in chunks, starved experts,
shared experts, a dense layer, attention in four groups)."""
import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

from moeq import ConfigError, QuantConfig, RunConfig, quantize
from moeq.utils import distributed
from moeq.utils.distributed import Ranks, RankError

from conftest import ROOT

FLAGS = ["--avg_bits", "2.0", "--high_bit_level", "3", "--mid_bit_level", "2", "--low_bit_level", "1",
         "--groupsize", "32", "--nsamples", "8", "--seqlen", "64", "--batch_size", "2", "--device", "cpu"]


def same_run(a_dir, b_dir):
    """Two checkpoint directories hold the same weights (byte for byte), config and allocation."""
    with open(os.path.join(a_dir, "model.safetensors"), "rb") as fa, \
            open(os.path.join(b_dir, "model.safetensors"), "rb") as fb:
        assert fa.read() == fb.read()
    for name in ("config.json", "bit_allocation.json"):
        a, b = (_timeless(json.load(open(os.path.join(d, name)))) for d in (a_dir, b_dir))
        assert a == b, name


def _timeless(obj):
    """JSON without the timings (wall-clock seconds differ between any two runs)."""
    if isinstance(obj, dict):
        return {k: _timeless(v) for k, v in obj.items() if k not in ("seconds", "quantization_seconds")}
    if isinstance(obj, list):
        return [_timeless(v) for v in obj]
    return obj


@contextmanager
def one_thread():
    """The ranks compute with one thread each: the one-process reference too (same arithmetic;
    a CPU GEMM may round differently with another thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torchrun(nproc, *args, timeout=180):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(free_port()), os.path.join(ROOT, "quantize_mixtral.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_write_the_one_process_checkpoint(tiny_mixtral_dir, small_text_dir, tmp_path):
    from moeq.cli import parser, run_config
    flags = ["--model", tiny_mixtral_dir, "--dataset", small_text_dir, *FLAGS, "--pack", "--save"]
    one = tmp_path / "one"
    with one_thread():
        quantize(run_config(parser("causal").parse_args([*flags, "--saving_path", str(one)]), "causal", "one"))

    two = tmp_path / "two"
    r = torchrun(2, *flags, "--saving_path", str(two))
    assert r.returncode == 0, r.stderr[-3000:]
    same_run(one, two)
    assert json.loads((two / "results.json").read_text())["ranks"] == 2
    assert r.stdout.count("rel_err") == 1 and r.stdout.count("saved packed checkpoint") == 1   # rank 0 alone logs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]   # no partial folder, no lock left

    # a check only rank 0 makes (its output folder) stops every rank, with one line
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    r = torchrun(2, *flags, "--saving_path", str(tmp_path / "full"))
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--overwrite" in errors[0], r.stderr[-3000:]
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "one", "two"]


def api_config(model_dir, text_dir, out) -> RunConfig:
    # 10 windows in batches of 2: five batches over three ranks (2, 2, 1); 8 experts in chunks of
    # 2 over three ranks (2, 3, 3 experts: one chunk, two, two); experts with fewer than 70
    # tokens fall back to all tokens; the sensitivity order: each rank predicts its experts' costs,
    # which every rank needs to choose the same bits
    return RunConfig(model=model_dir, dataset=text_dir, nsamples=10, seqlen=32, device="cpu", verbose=False,
                     quant=QuantConfig(avg_bits=2.0, high_bits=3, mid_bits=2, low_bits=1, groupsize=32,
                                       batch_size=2, expert_batch=2, min_expert_tokens=70, order_type="sensitivity"),
                     saving_path=str(out))


def _api_rank(rank, size, port, model_dir, text_dir, out, reports):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=timedelta(seconds=120))
    try:
        result = quantize(api_config(model_dir, text_dir, out))
        with open(os.path.join(reports, f"rank{rank}.json"), "w") as f:
            json.dump(_timeless({"layers": result.report.layers, "modules": result.report.modules,
                                 "starved": result.report.starved}), f)
        dist.barrier()   # as distributed.stop: nobody closes its connections while a peer finishes
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tiny_deepseek_dir(tmp_path_factory, tokenizer):
    """DeepSeek-V3 (random weights): a dense first layer, shared experts, attention in four
    groups of linears (q_a + kv_a, q_b, kv_b, o)."""
    from test_families import tiny_model
    d = str(tmp_path_factory.mktemp("tiny_deepseek"))
    tiny_model("deepseek_v3", len(tokenizer)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def test_api_three_ranks_uneven_splits_equal_one_process(tiny_deepseek_dir, small_text_dir, tmp_path):
    with one_thread():
        one = quantize(api_config(tiny_deepseek_dir, small_text_dir, tmp_path / "one"))
    assert one.report.starved and len(one.report.starved) < 16   # some experts fell back to all tokens
    reports = tmp_path / "reports"
    reports.mkdir()
    mp.spawn(_api_rank, args=(3, free_port(), tiny_deepseek_dir, small_text_dir, str(tmp_path / "three"),
                              str(reports)), nprocs=3)
    same_run(tmp_path / "one", tmp_path / "three")
    expected = _timeless({"layers": one.report.layers, "modules": one.report.modules, "starved": one.report.starved})
    for rank in range(3):   # every rank returns the whole report
        assert json.loads((reports / f"rank{rank}.json").read_text()) == json.loads(json.dumps(expected)), rank


def _exchange_rank(rank, size, port, out):
    """The exchanges on their own: batches in global order (uneven counts, rows and dtypes),
    a result shared from its rank, an error raised on every rank."""
    import torch.distributed as dist

    from moeq.utils.loading import BadWeights
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=timedelta(seconds=60))
    ranks, _ = distributed.start("cpu")
    # global batch b (on rank b % 2): b + 1 rows of b's in bfloat16 and a bool per row; batch 2 has no rows
    rows = [1, 2, 0, 4, 5]
    kept = [(torch.full((rows[b], 3), float(b), dtype=torch.bfloat16), torch.ones(rows[b], dtype=torch.bool))
            for b in ranks.batches(5)]
    to_all = [(float(x[0, 0]), x.shape[0], x.dtype, bool(f.all())) for x, f in ranks.in_batch_order(kept)]
    to_one = [float(x[0, 0]) for x, _ in ranks.in_batch_order(kept, dst=1)]
    payload = {"codes": torch.arange(6, dtype=torch.uint8).view(2, 3), "loss": torch.tensor([0.5, 0.25])}
    got = ranks.share(payload if rank == 1 else None, src=1)
    try:
        ranks.share(BadWeights("expert 3: not finite") if rank == 1 else None, src=1)
        error = None
    except BadWeights as e:
        error = str(e)
    torch.save({"to_all": to_all, "to_one": to_one, "got": got, "error": error,
                "min": ranks.agree_min(10 + rank)}, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_exchanges_keep_batch_order_and_share_results_and_errors(tmp_path):
    mp.spawn(_exchange_rank, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["to_all"] == [(float(b), b + 1, torch.bfloat16, True) for b in (0, 1, 3, 4)]   # batch 2: no rows
        assert r["to_one"] == ([0.0, 1.0, 3.0, 4.0] if rank == 1 else [])
        assert r["got"]["codes"].dtype == torch.uint8 and r["got"]["codes"].tolist() == [[0, 1, 2], [3, 4, 5]]
        assert r["got"]["loss"].tolist() == [0.5, 0.25]
        assert r["error"] == "expert 3: not finite" and r["min"] == 10


def test_bad_splits_and_devices_are_one_line_errors(monkeypatch):
    with pytest.raises(ConfigError, match="a MoE layer of this model has 8 experts: .* start at most 8"):
        Ranks(0, 16).check_split([8, 8], 32, 4)
    with pytest.raises(ConfigError, match="makes 2 calibration batch"):
        Ranks(0, 4).check_split([8], 2, 8)
    Ranks(0, 4).check_split([8], 4, 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RankError, match="rank 1: --device cuda:0, but its local rank is 1"):
        distributed._rank_device("cuda:0", 1, "1")
    with pytest.raises(RankError, match="needs GPU cuda:2, but 2 GPU"):
        distributed._rank_device(None, 2, "2")
    assert distributed._rank_device("cuda", 1, "1") == torch.device("cuda", 1)
    assert distributed._rank_device("cpu", 1, "1") == torch.device("cpu")
