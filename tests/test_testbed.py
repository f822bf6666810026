"""The Mixtral testbed (training) and the results grid (reproduce_tables.py), on tiny
configs: seconds, not minutes."""
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA

SMOKE = ["--data", os.path.join(DATA, "python-docs"), "--preset", "smoke", "--train_bytes", "200000"]


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    from moeq.testbed.train_mixtral import main
    out = str(tmp_path_factory.mktemp("testbed") / "s0")
    assert main(SMOKE + ["--out", out, "--seed", "0", "--steps", "24"]) == 0
    return out


def test_training_saves_init_and_trained_and_learns(testbed):
    for d in ("init", "trained"):
        assert os.path.isfile(os.path.join(testbed, d, "config.json"))
        assert os.path.isfile(os.path.join(testbed, d, "tokenizer.json"))
    curve = json.load(open(os.path.join(testbed, "loss_curve.json")))
    assert curve[-1]["step"] == 24 and "val_loss" in curve[-1]
    assert curve[-1]["train_loss"] < curve[0]["train_loss"] - 0.3
    info = json.load(open(os.path.join(testbed, "train_info.json")))
    # the router reference really is the initial model: its router rows give the recorded norms
    from conftest import load_tiny
    init, trained = load_tiny(os.path.join(testbed, "init")), load_tiny(os.path.join(testbed, "trained"))
    for row in info["router_norm_change"]:
        i = row["layer"]
        assert torch.allclose(init.model.layers[i].mlp.gate.weight.norm(dim=1), torch.tensor(row["init_norm"]))
        assert torch.allclose(trained.model.layers[i].mlp.gate.weight.norm(dim=1), torch.tensor(row["trained_norm"]))
        assert max(abs(c) for c in row["change"]) > 1e-3


def test_training_is_deterministic(testbed, tmp_path):
    from moeq.testbed.train_mixtral import main
    for seed, same in ((0, True), (1, False)):
        out = str(tmp_path / f"s{seed}")
        assert main(SMOKE + ["--out", out, "--seed", str(seed), "--steps", "24"]) == 0
        a = load_file(os.path.join(testbed, "trained", "model.safetensors"))
        b = load_file(os.path.join(out, "trained", "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a) == same, seed


def test_experts_in_the_autocast_dtype_train_the_float32_parameters():
    """cuda_speed's autocast_experts (exercised here with CPU autocast): under autocast the
    fused experts read their weights and inputs in bf16, outside it in float32; the gradients
    and the optimizer's updates reach the model's own float32 parameters, and undoing it
    leaves the state dict as it was."""
    from torch.nn.utils import parametrize

    from moeq.testbed.common import autocast_experts
    from moeq.testbed.train_mixtral import PRESETS, build_model
    torch.manual_seed(0)
    model = build_model(PRESETS["smoke"], 320, 8, 2, 0.01).train()
    params = dict(model.named_parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    experts = model.model.layers[0].mlp.experts
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    undo = autocast_experts(model, "cpu")
    seen = []   # what the experts' forward gets (this hook runs after autocast_experts' own)
    experts.register_forward_pre_hook(lambda m, args, kw: seen.append(((args[0] if args else kw["hidden_states"]).dtype,
                                                                       m.gate_up_proj.dtype)), with_kwargs=True)
    ids = torch.randint(0, 320, (2, 16))
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16), parametrize.cached():
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model(input_ids=ids)
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2 + [(torch.float32, torch.float32)]
    x, top = torch.randn(5, 32), torch.randint(0, 8, (5, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):   # transformers versions that pass keywords
        experts(hidden_states=x, top_k_index=top, top_k_weights=torch.rand(5, 2))
    assert seen[-1] == (torch.bfloat16, torch.bfloat16)
    undo()
    assert list(model.state_dict()) == list(before) and dict(model.named_parameters()) == params
    assert params["model.layers.0.mlp.experts.gate_up_proj"].grad.abs().sum() > 0
    assert not torch.equal(model.state_dict()["model.layers.0.mlp.experts.down_proj"],
                           before["model.layers.0.mlp.experts.down_proj"])
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids)
    assert seen == [(torch.float32, torch.float32)]   # undone: autocast leaves the experts alone again


def test_logged_loss_is_the_mean_of_the_steps_and_a_nan_names_its_step():
    from moeq.testbed.common import _mean_loss
    losses = [torch.tensor(v) for v in (0.1, 0.7, 0.3)]
    total = 0.0
    for v in losses:   # what the loop summed when it read every step's loss at once
        total += v.item()
    assert _mean_loss(losses, 13, "t") == total / 3
    with pytest.raises(FloatingPointError, match="at step 11"):
        _mean_loss([torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(2.0)], 13, "t")


def direct_perplexity(model_dir, windows):
    """exp(mean next-token loss) straight from transformers: what the grid's ppl must equal."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(input_ids=w[None]).logits[0, :-1], w[1:]).item()
                  for w in windows]
    return math.exp(sum(losses) / len(losses))


def test_two_row_grid_with_lm_eval_and_resume(testbed, tmp_path):
    from moeq.reproduce_tables import ModelData, main

    from test_packed import write_tasks
    tasks = write_tasks(tmp_path)
    out = str(tmp_path / "grid")
    args = ["--model", os.path.join(testbed, "trained"), "--router_reference", os.path.join(testbed, "init"),
            "--dataset", os.path.join(DATA, "python-docs"), "--eval_dataset", os.path.join(DATA, "python-docs"),
            "--out", out, "--rows", "unquantized", "gptq-uniform-3", "--nsamples", "8", "--seqlen", "64",
            "--groupsize", "32", "--eval_windows", "6", "--tasks", "moeq_mc", "--include_path", tasks]
    assert main(args) == 0
    runs = [json.loads(line) for line in open(os.path.join(out, "runs.jsonl"))]
    assert [r["row"] for r in runs] == ["unquantized", "gptq-uniform-3"]
    fp, q = runs
    # perplexity is traceable: the same windows through stock transformers give the same number
    a = SimpleNamespace(dataset=os.path.join(DATA, "python-docs"), eval_dataset=[os.path.join(DATA, "python-docs")],
                        nsamples=8, seqlen=64, calib_seed=0, eval_windows=6, device="cpu", dtype="float32", task="causal")
    windows = ModelData(os.path.join(testbed, "trained"), a).evals["python-docs"]
    assert fp["ppl"]["python-docs"] == pytest.approx(direct_perplexity(os.path.join(testbed, "trained"), windows),
                                                     rel=1e-4)
    assert q["avg_bits"] == 3.0 and q["bits"] == [[3] * 8, [3] * 8]
    assert q["packed_mib"] < fp["packed_mib"] / 2
    assert q["ppl"]["python-docs"] != fp["ppl"]["python-docs"]
    assert 0.0 <= q["tasks"]["moeq_mc/acc"] <= 1.0
    for f in ("table.md", "results.json", "bits_vs_ppl.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    table = open(os.path.join(out, "table.md")).read()
    assert "| gptq-uniform-3 | 3.000 |" in table and "moeq_mc/acc" in table
    # a rerun finds both rows done and runs nothing
    assert main(args) == 0
    assert len(open(os.path.join(out, "runs.jsonl")).read().splitlines()) == 2
    # a run killed while writing its line: the cut line is skipped, that row runs again
    # and its new line stands on its own
    lines = open(os.path.join(out, "runs.jsonl")).read().splitlines()
    with open(os.path.join(out, "runs.jsonl"), "w") as f:
        f.write(lines[0] + "\n" + lines[1][:40])
    assert main(args) == 0
    rerun = [json.loads(line) for line in open(os.path.join(out, "runs.jsonl")).read().splitlines()[2:]]
    assert [r["row"] for r in rerun] == ["gptq-uniform-3"]
    assert rerun[0]["ppl"]["python-docs"] == pytest.approx(q["ppl"]["python-docs"], rel=1e-5)


def test_aggregation_means_spread_and_beats_random():
    from moeq.reproduce_tables import paper_rows
    from moeq.utils.tables import aggregate
    rows = paper_rows(random_seeds=2, zetas=[3.0])
    run = lambda model, row, ppl: {"model": model, "row": row, "ppl": {"x": ppl}, "avg_bits": 2.0,
                                   "packed_mib": 1.0, "quant_seconds": 1.0}
    runs = [run("m0", "mixed-2.0-3/2/1-random-seed0", 10.0), run("m0", "mixed-2.0-3/2/1-random-seed1", 12.0),
            run("m1", "mixed-2.0-3/2/1-random-seed0", 20.0), run("m1", "mixed-2.0-3/2/1-random-seed1", 22.0),
            run("m0", "mixed-2.0-3/2/1-router", 10.5), run("m1", "mixed-2.0-3/2/1-router", 21.5),
            run("m0", "unquantized", 9.0), run("m1", "unquantized", 19.0)]
    lines = {line["id"]: line for line in aggregate(runs, rows)}
    rnd = lines["mixed-2.0-3/2/1-random"]["ppl"]["x"]
    assert rnd["n"] == 4 and rnd["mean"] == 16.0
    assert rnd["sd"] == pytest.approx(torch.tensor([10.0, 12, 20, 22]).std().item())
    # router beats its own model's random mean on m0 (10.5 < 11) but not on m1 (21.5 > 21)
    assert lines["mixed-2.0-3/2/1-router"]["beats_random"] == {"eval": "x", "wins": 1, "models": 2}
    # paired with each model's own unquantized perplexity: 1.5 and 2.5
    delta = lines["mixed-2.0-3/2/1-router"]["delta_ppl"]["x"]
    assert delta["mean"] == 2.0 and delta["n"] == 2 and delta["sd"] == pytest.approx(0.5 ** 0.5)


def test_grid_rows_cover_the_paper_settings():
    from moeq.reproduce_tables import paper_rows
    ids = [r["id"] for r in paper_rows(random_seeds=3, zetas=[1, 3, 5])]
    assert len(ids) == len(set(ids))
    for expected in ("unquantized", "rtn-uniform-2", "gptq-uniform-4", "mixed-2.5-3/2-router_change",
                     "mixed-2.0-3/1-combined", "mixed-2.0-3/2/1-random-seed2", "mixed-2.0-3/2/1-combined-zeta5"):
        assert expected in ids
    assert "mixed-2.0-3/2/1-combined-zeta3" not in ids   # the combined row is zeta 3
