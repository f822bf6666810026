"""Per-expert sensitivity: the cost orders (sensitivity, oracle, anti_oracle) and their exact
DP, the pipeline's fp_outputs, expert_sensitivity.py's measurement and the pre-registered
statistics, the grid's new rows and per-expert scores."""
import itertools
import json
import math
import os

import numpy as np
import pytest
import torch

from moeq.config import ConfigError, QuantConfig
from moeq.quant import allocation
from moeq.utils import data
from moeq.utils import sensitivity as stats
from moeq.utils.families import family_for
from moeq.utils.pipeline import QuantReport, _collect_moe_stats, _Run, quantize_model
from moeq.utils.sequential import capture_block_inputs, run_block

from conftest import DATA, load_tiny

CPU = torch.device("cpu")


def calib(tokenizer, text_dir, n=8, seqlen=64):
    text = data.load_text(text_dir)
    return data.calibration_windows(data.tokenize(tokenizer, text.train), n, seqlen, seed=0)


# ---- the exact DP ----------------------------------------------------------------------

def brute_force(costs, counts, maximize):
    levels = [b for b in counts for _ in range(counts[b])]
    value = lambda bits: sum(costs[b][e] for e, b in enumerate(bits))
    best = (max if maximize else min)(set(itertools.permutations(levels)), key=value)
    return value(best)


@pytest.mark.parametrize("counts", [{3: 2, 2: 3, 1: 2}, {3: 4, 1: 3}, {3: 1, 2: 0, 1: 6}, {2: 7}])
def test_assign_levels_is_the_exact_optimum(counts):
    g = torch.Generator().manual_seed(sum(counts) * 7 + len(counts))
    for trial in range(5):
        costs = {b: torch.rand(7, generator=g).tolist() for b in (1, 2, 3)}
        for maximize in (False, True):
            bits = allocation.assign_levels(costs, counts, maximize)
            assert {b: bits.count(b) for b in counts if counts[b]} == {b: n for b, n in counts.items() if n}
            assert sum(costs[b][e] for e, b in enumerate(bits)) == pytest.approx(brute_force(costs, counts, maximize))


def test_assign_levels_beats_ranking_by_the_low_width_cost():
    """Three levels: the expert that costs most at 1 bit need not get 3 bits (greedy gives 3/2/1: 7)."""
    costs = {3: [0.0, 0.0, 0.0], 2: [1.0, 5.0, 1.0], 1: [10.0, 6.0, 2.0]}
    assert allocation.assign_levels(costs, {3: 1, 2: 1, 1: 1}) == [2, 3, 1]     # 1 + 0 + 2 = 3
    assert allocation.assign_levels(costs, {3: 1, 2: 1, 1: 1}, maximize=True) == [1, 2, 3]   # 10 + 5 + 0
    with pytest.raises(ValueError, match="no costs for"):
        allocation.assign_levels({1: [0.0] * 3}, {3: 1, 1: 2})


# ---- the sensitivity order in the quantization pass -------------------------------------

def module_errors(report, layer, bits):
    """Per expert: the relative errors of its matrices at their final widths, summed."""
    err = [0.0] * len(bits)
    for row in report.modules:
        if row["name"].startswith(layer + ".experts.") and row["rel_err"] is not None:
            e = int(row["name"].rsplit("[", 1)[1][:-1])
            assert row["bits"] == bits[e]
            err[e] += row["rel_err"]
    return err


def test_sensitivity_order_costs_and_bits(tiny_mixtral_dir, tokenizer, small_text_dir):
    windows = calib(tokenizer, small_text_dir)
    cfg = QuantConfig(order_type="sensitivity", avg_bits=2.0, attn_bits=None, groupsize=32, batch_size=4)
    model = load_tiny(tiny_mixtral_dir)
    # routing weights of layer 0 from the stock router (its inputs are unquantized: no attention bits)
    inputs, kwargs = capture_block_inputs(model, family_for(model), windows, 4, CPU, CPU)
    seen = []
    h = model.model.layers[0].mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    run_block(model.model.layers[0], inputs, kwargs, CPU, CPU)
    h.remove()
    _, w, top = model.model.layers[0].mlp.gate(torch.cat(seen))
    weight_sq = torch.zeros(8, dtype=torch.float64).index_add_(0, top.reshape(-1), w.reshape(-1).double() ** 2)

    reports = [quantize_model(load_tiny(tiny_mixtral_dir), family_for(model), windows,
                              QuantConfig(**{**cfg.to_dict(), "expert_batch": chunk}), CPU) for chunk in (0, 3)]
    report = reports[0]
    assert [layer["bits"] for layer in report.layers] == [layer["bits"] for layer in reports[1].layers]
    counts = cfg.counts_for(8)
    for layer in report.layers:
        s = layer["scores"]
        assert {b: layer["bits"].count(b) for b in counts} == counts
        widths = sorted(counts)
        rel = {b: s["gptq_error"][str(b)] for b in widths}
        # the cost is the documented product, and the bits its exact optimum
        expected = allocation.predicted_cost(rel, s["routing_weight_sq"], s["output_energy"])
        assert {int(b): c for b, c in s["cost"].items()} == expected
        assert layer["bits"] == allocation.assign_levels(expected, counts)
        # the errors it predicted from are the final pass's, at the widths it chose
        final = module_errors(report, layer["name"], layer["bits"])
        assert final == pytest.approx([rel[b][e] for e, b in enumerate(layer["bits"])], rel=1e-5)
        # cheaper than giving the same widths by frequency or by the router norm
        for order_type in ("frequency", "router"):
            other = allocation.bits_per_expert(allocation.expert_order(order_type, s), counts)
            cost = lambda bits: sum(expected[b][e] for e, b in enumerate(bits))
            assert cost(layer["bits"]) <= cost(other) + 1e-12
    s0 = report.layers[0]["scores"]
    assert s0["routing_weight_sq"] == pytest.approx((weight_sq / top.shape[0]).tolist(), rel=1e-5)
    for x, y in zip(report.layers, reports[1].layers):
        assert x["scores"]["cost"]["1"] == pytest.approx(y["scores"]["cost"]["1"], rel=1e-5)


def test_oracle_and_anti_oracle_read_measured_costs(tiny_mixtral_dir, tokenizer, small_text_dir, tmp_path):
    model = load_tiny(tiny_mixtral_dir)
    layers = [f"model.layers.{i}.mlp" for i in range(len(model.model.layers))]
    # expert e costs (e + 1) / b at b bits in layer 0, the reverse order in layer 1
    rank = {layers[0]: list(range(8)), layers[1]: list(range(7, -1, -1))}
    experts = [{"layer": name, "expert": e, "by_width": {str(b): {"d_loss": (rank[name][e] + 1) / b} for b in (1, 2, 3)}}
               for name in layers for e in range(8)]
    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps({"widths": [1, 2, 3], "experts": experts}))
    windows = calib(tokenizer, small_text_dir)
    bits = {}
    for order in ("oracle", "anti_oracle"):
        cfg = QuantConfig(order_type=order, sensitivity_file=str(path), avg_bits=2.0, attn_bits=None, groupsize=32,
                          batch_size=4)
        bits[order] = [layer["bits"] for layer in quantize_model(load_tiny(tiny_mixtral_dir), family_for(model),
                                                                  windows, cfg, CPU).layers]
    # 3/2/1 at 2.0 bits: 2 / 4 / 2 experts; the costliest get 3 bits from the oracle, 1 from the anti-oracle
    assert bits["oracle"] == [[1, 1, 2, 2, 2, 2, 3, 3], [3, 3, 2, 2, 2, 2, 1, 1]]
    assert bits["anti_oracle"] == [[3, 3, 2, 2, 2, 2, 1, 1], [1, 1, 2, 2, 2, 2, 3, 3]]
    with pytest.raises(ConfigError, match="needs --sensitivity_file"):
        QuantConfig(order_type="oracle")
    with pytest.raises(ConfigError, match="not at every level"):
        QuantConfig(order_type="oracle", sensitivity_file=str(path), high_bits=4, mid_bits=3, low_bits=2, avg_bits=3.0)
    path.write_text(json.dumps({"widths": [1, 2, 3], "experts": experts[:8]}))
    with pytest.raises(ConfigError, match="no measurement for every expert of model.layers.1.mlp"):
        quantize_model(load_tiny(tiny_mixtral_dir), family_for(model), windows,
                       QuantConfig(order_type="oracle", sensitivity_file=str(path), attn_bits=None, groupsize=32), CPU)


def test_fp_outputs_calibrates_on_the_unquantized_model_and_restores_it(tiny_mixtral_dir, tokenizer, small_text_dir):
    model = load_tiny(tiny_mixtral_dir)
    fam = family_for(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = calib(tokenizer, small_text_dir)
    seen = []
    cfg = QuantConfig(mixed_type="uniform", avg_bits=1, attn_bits=4, groupsize=32, batch_size=4)
    report = quantize_model(model, fam, windows, cfg, CPU, fp_outputs=True,
                            on_experts=lambda name, W, H, bits, res, first: seen.append((name, res["weight"])))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(seen) == 4 and not torch.equal(seen[0][1], model.model.layers[0].mlp.experts.gate_up_proj.data)
    # without attention bits, layer 1 is routed as in the unquantized model (at 1 bit, the
    # sequential pass's inputs route otherwise)
    cfg = QuantConfig(mixed_type="uniform", avg_bits=1, attn_bits=None, groupsize=32, batch_size=4)
    report = quantize_model(model, fam, windows, cfg, CPU, fp_outputs=True)
    inputs, kwargs = capture_block_inputs(model, fam, windows, 4, CPU, CPU)
    inputs = run_block(model.model.layers[0], inputs, kwargs, CPU, CPU)
    run = _Run(fam, cfg, QuantReport(), CPU, CPU)
    fp = _collect_moe_stats(run, fam.moe(model.model.layers[1], "model.layers.1"), model.model.layers[1], inputs,
                            kwargs, None)
    assert report.layers[1]["scores"]["tokens"] == fp.tokens.tolist()
    sequential = quantize_model(load_tiny(tiny_mixtral_dir), fam, windows, cfg, CPU)
    assert sequential.layers[1]["scores"]["tokens"] != fp.tokens.tolist()


# ---- the pre-registered statistics --------------------------------------------------------

def test_ranks_and_pooled_spearman_with_permutations():
    assert stats.ranks([3.0, 1.0, 2.0, 1.0]).tolist() == [3.0, 0.5, 2.0, 0.5]
    rng = np.random.default_rng(1)
    x = [rng.normal(size=8) for _ in range(6)]
    anti = stats.spearman_groups([(a, -a ** 3) for a in x], n_perm=2000)
    assert anti["stat"] == pytest.approx(-1.0) and anti["p_neg"] < 0.001 and anti["p_pos"] > 0.99
    assert anti["groups"] == 6
    noise = stats.spearman_groups([(a, rng.normal(size=8)) for a in x], n_perm=2000)
    assert abs(noise["stat"]) < 0.3 and 0.05 < noise["p_neg"] < 0.95
    assert noise["p_neg"] + noise["p_pos"] == pytest.approx(1.0, abs=0.01)
    # a constant group says nothing and is left out
    assert stats.spearman_groups([(x[0], np.ones(8)), (x[1], -x[1])], n_perm=100)["groups"] == 1


def test_partial_correlation_removes_a_shared_cause():
    rng = np.random.default_rng(2)
    groups = []
    for _ in range(8):
        tokens = rng.uniform(1, 1000, 8)
        groups.append((np.log(tokens) + 0.3 * rng.normal(size=8), -np.log(tokens) + 0.3 * rng.normal(size=8),
                       tokens))
    plain = stats.spearman_groups([(a, b) for a, b, _ in groups], n_perm=1000)
    partial = stats.partial_groups(groups, n_perm=1000)
    assert plain["stat"] < -0.7 and plain["p_neg"] < 0.01
    assert abs(partial["stat"]) < 0.1 and 0.05 < partial["p_neg"] < 0.95


def test_fixed_effects_slope_and_the_decision_rule():
    rng = np.random.default_rng(3)
    groups = [(x := rng.normal(size=8), 100 * g - 2.0 * x + 0.01 * rng.normal(size=8)) for g in range(5)]
    fe = stats.fixed_effects_slope(groups, n_perm=1000)
    assert fe["slope"] == pytest.approx(-2.0, abs=0.01) and fe["p_neg"] < 0.01    # group offsets do not leak in
    t = lambda stat, p_neg, p_pos: {"stat": stat, "p_neg": p_neg, "p_pos": p_pos, "groups": 4}
    assert stats.decide(t(-0.4, 0.01, 0.99), t(-0.3, 0.02, 0.98)) == "supported"
    assert stats.decide(t(-0.4, 0.01, 0.99), t(0.1, 0.7, 0.3)) == "partly supported"
    assert stats.decide(t(0.4, 0.99, 0.01), t(0.1, 0.7, 0.3)) == "contradicted"
    assert stats.decide(t(-0.1, 0.2, 0.8), t(-0.1, 0.3, 0.7)) == "not supported"


# ---- expert_sensitivity.py on a trained testbed model, and the grid's new rows ---------------

@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory):
    from moeq.testbed.train_mixtral import main
    out = str(tmp_path_factory.mktemp("sens") / "mixtral-smoke-s0")
    assert main(["--data", os.path.join(DATA, "python-docs"), "--preset", "smoke", "--train_bytes", "200000",
                 "--out", out, "--seed", "0", "--steps", "24"]) == 0
    return out


MEASURE = ["--dataset", os.path.join(DATA, "python-docs"), "--nsamples", "8", "--seqlen", "64", "--eval_windows", "6",
           "--groupsize", "32", "--widths", "1", "2", "3", "--batch_size", "4"]


@pytest.fixture(scope="module")
def measured(smoke_model, tmp_path_factory):
    from moeq.expert_sensitivity import main
    out = str(tmp_path_factory.mktemp("measured"))
    assert main(["--model", f"{smoke_model}/trained", "--router_reference", f"{smoke_model}/init", "--out", out]
                + MEASURE) == 0
    return out


def test_measurement_scores_each_expert_alone(smoke_model, measured):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    f = json.load(open(os.path.join(measured, "sensitivity-mixtral-smoke-s0.json")))
    model = AutoModelForCausalLM.from_pretrained(f"{smoke_model}/trained", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(f"{smoke_model}/trained")
    windows = data.eval_windows(data.tokenize(tok, open(os.path.join(DATA, "python-docs", "valid.txt")).read()), 64)[:6]
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")
    assert f["base"]["loss"] == pytest.approx(nll.mean().item(), rel=1e-5)
    assert f["base"]["tokens"] == 6 * 63 and 0 < f["base"]["rare_tokens"] <= 6 * 63 / 2
    layers = sorted({x["layer"] for x in f["experts"]})
    assert len(f["experts"]) == 8 * len(layers)
    for layer in layers:
        experts = [x for x in f["experts"] if x["layer"] == layer]
        assert sum(x["routed"] for x in experts) == 2 * 6 * 63      # top-2: two experts per predicting position
    init = AutoModelForCausalLM.from_pretrained(f"{smoke_model}/init").model.layers[1].mlp.gate.weight
    last = [x for x in f["experts"] if x["layer"] == layers[-1]]
    for x in last:
        trained = model.model.layers[1].mlp.gate.weight[x["expert"]].norm().item()
        assert x["router_norm_change"] == pytest.approx(trained - init[x["expert"]].norm().item(), abs=1e-5)
        for b, m in x["by_width"].items():
            # the last layer's expert changes nothing but the positions routed to it: only it was quantized
            if x["routed"] == 0:
                assert m["d_loss"] == 0.0 and m["damage_per_routed_token"] is None
                continue
            assert m["d_loss"] * f["base"]["tokens"] == pytest.approx(m["damage_per_routed_token"] * x["routed"],
                                                                       rel=1e-6, abs=1e-9)
            assert m["d_loss_routed"] == pytest.approx(m["damage_per_routed_token"], rel=1e-6, abs=1e-9)
        assert x["gptq_error"]["1"] > x["gptq_error"]["2"] > x["gptq_error"]["3"] > 0
    assert np.mean([abs(x["by_width"]["1"]["d_loss"]) for x in f["experts"]]) > \
        np.mean([abs(x["by_width"]["3"]["d_loss"]) for x in f["experts"]])
    a = json.load(open(os.path.join(measured, "analysis.json")))
    assert a["decision"] in ("supported", "partly supported", "contradicted", "not supported")
    assert a["T1"]["groups"] == len(layers) and "d_loss@2|router_norm_change" in a["secondary"]
    assert os.path.getsize(os.path.join(measured, "sensitivity_vs_router_change.png")) > 0


def test_grid_rows_from_measured_sensitivities(smoke_model, measured, tmp_path):
    from moeq.reproduce_tables import main
    sens = os.path.join(measured, "sensitivity-mixtral-smoke-s0.json")
    out = str(tmp_path / "grid")
    rows = ["mixed-2.0-3/2/1-sensitivity", "mixed-2.0-3/2/1-oracle", "mixed-2.0-3/2/1-anti_oracle"]
    assert main(["--model", f"{smoke_model}/trained", "--router_reference", f"{smoke_model}/init",
                 "--sensitivity_file", sens, "--dataset", os.path.join(DATA, "python-docs"), "--out", out,
                 "--rows", *rows, "--nsamples", "8", "--seqlen", "64", "--groupsize", "32", "--eval_windows", "4"]) == 0
    runs = {r["row"]: r for r in map(json.loads, open(os.path.join(out, "runs.jsonl")))}
    assert sorted(runs) == sorted(rows)
    measured_costs = json.load(open(sens))["experts"]
    for i, name in enumerate(["model.layers.0.mlp", "model.layers.1.mlp"]):
        costs = {b: [x["by_width"][str(b)]["d_loss"] for x in measured_costs if x["layer"] == name] for b in (1, 2, 3)}
        for order in ("oracle", "anti_oracle"):
            r = runs[f"mixed-2.0-3/2/1-{order}"]
            assert r["bits"][i] == allocation.assign_levels(costs, {3: 2, 2: 4, 1: 2}, order == "anti_oracle")
            assert r["scores"][i]["cost"]["1"] == costs[1]
        s = runs["mixed-2.0-3/2/1-sensitivity"]["scores"][i]
        assert set(s) >= {"cost", "gptq_error", "output_energy", "routing_weight_sq", "tokens", "router_norm"}
    for r in runs.values():   # every run keeps both router scores and the stored width
        assert len(r["router_norm_change"]) == 2 and len(r["router_norm_change"][0]) == 8
        # and where its time went
        assert set(r["stage_seconds"]) == {"load", "quantize", "save", "evaluate"}
        assert {"hessian_experts", "gptq_experts"} <= set(r["quantize_phases"])
        assert r["stored_bits"] > r["avg_bits"] == 2.0
        assert math.isfinite(r["ppl"]["python-docs"])
    table = open(os.path.join(out, "table.md")).read()
    assert "| oracle |" in table and "| anti_oracle |" in table


@pytest.fixture(scope="module")
def switch_pair(tmp_path_factory):
    from moeq.testbed import train_switch
    out = tmp_path_factory.mktemp("switch") / "switch-smoke-s0"
    threads = torch.get_num_threads()
    try:
        assert train_switch.main(["--data", os.path.join(DATA, "python-docs"), "--out", str(out), "--preset", "smoke",
                                  "--pretrain_steps", "3", "--finetune_steps", "2", "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_switch_measurement_and_grid(switch_pair, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    from moeq.expert_sensitivity import PairsHeldOut, main
    from moeq.reproduce_tables import main as grid
    out = str(tmp_path / "sens")
    assert main(["--task", "seq2seq", "--model", str(switch_pair / "finetuned"), "--router_reference",
                 str(switch_pair / "pretrained"), "--dataset", str(switch_pair / "pairs"), "--out", out, "--widths", "2",
                 "--nsamples", "16", "--src_len", "32", "--tgt_len", "8", "--eval_samples", "8", "--groupsize", "32",
                 "--min_expert_tokens", "1", "--batch_size", "8"]) == 0
    f = json.load(open(os.path.join(out, "sensitivity-switch-smoke-s0.json")))
    enc = [x for x in f["experts"] if x["layer"].startswith("encoder.")]
    dec = [x for x in f["experts"] if x["layer"].startswith("decoder.")]
    assert len(enc) == len(dec) == 8
    # the held-out pairs' real tokens, each routed to one expert (top-1): sources in the encoder, targets in the decoder
    model = AutoModelForSeq2SeqLM.from_pretrained(switch_pair / "finetuned").eval()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(switch_pair / "finetuned")
    pairs = data.load_pairs(str(switch_pair / "pairs")).test[-8:]
    held = PairsHeldOut(model, family_for(model), tok, pairs, torch.ones(len(tok)),
                        type("A", (), {"src_len": 32, "tgt_len": 8, "batch_size": 8, "device": "cpu"})())
    assert sum(x["routed"] for x in enc) == int(held.src_mask.sum())
    assert sum(x["routed"] for x in dec) == int(held.tgt_mask.sum()) == f["base"]["tokens"]
    with torch.no_grad():
        loss = model(input_ids=held.src, attention_mask=held.src_mask.long(), labels=held.labels).loss
    assert f["base"]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert 0.0 <= f["base"]["exact_match"] <= 1.0
    assert all(x["by_width"]["2"]["d_loss_routed"] is None for x in enc)
    assert all("d_exact_match" in x["by_width"]["2"] for x in dec)
    # the Switch grid: exp(target loss) as its ppl, rougeL and exact match as columns
    g = str(tmp_path / "grid")
    assert grid(["--task", "seq2seq", "--model", str(switch_pair / "finetuned"), "--router_reference",
                 str(switch_pair / "pretrained"), "--dataset", str(switch_pair / "pairs"), "--out", g, "--rows",
                 "mixed-2.5-3/2-sensitivity", "--nsamples", "16", "--src_len", "32", "--tgt_len", "8",
                 "--eval_samples", "2", "--groupsize", "32", "--min_expert_tokens", "1", "--batch_size", "8"]) == 0
    [q] = map(json.loads, open(os.path.join(g, "runs.jsonl")))
    assert set(q["ppl"]) == {"pairs"} and set(q["tasks"]) == {"rougeL", "exact_match"}
    assert q["bits"][0].count(3) == 4 and q["avg_bits"] == 2.5 and len(q["router_norm_change"]) == 2
    assert "exact_match" in open(os.path.join(g, "table.md")).read()


# ---- what the measurement shares, and that sharing changes no number ----------------------

def test_one_pass_for_every_width_equals_a_pass_per_width(tiny_mixtral_dir, tokenizer, small_text_dir):
    """expert_sensitivity.quantized_experts collects the Hessians once and runs GPTQ at every
    width from them: the very same weights and errors as one fp_outputs pipeline pass per width."""
    from types import SimpleNamespace

    from moeq.expert_sensitivity import quantized_experts
    windows = calib(tokenizer, small_text_dir)
    model = load_tiny(tiny_mixtral_dir)
    fam = family_for(model)
    a = SimpleNamespace(groupsize=32, quant_grid="search", batch_size=4, min_expert_tokens=16, device="cpu")
    shared, report = quantized_experts(model, fam, windows, [1, 2, 3], a)
    for b in (1, 2, 3):
        seen = {}
        cfg = QuantConfig(mixed_type="uniform", avg_bits=b, attn_bits=None, shared_bits=None, dense_bits=None,
                          groupsize=32, batch_size=4, min_expert_tokens=16)
        alone = quantize_model(load_tiny(tiny_mixtral_dir), fam, windows, cfg, CPU, fp_outputs=True,
                               on_experts=lambda name, W, H, bits, res, first: seen.update({name: res}))
        weights, errors = shared[b]
        assert sorted(weights) == sorted(seen) and len(seen) == 2 * len(model.model.layers)
        for name, res in seen.items():
            assert torch.equal(weights[name], res["weight"]) and torch.equal(errors[name], res["loss"])
        assert [x["scores"] for x in alone.layers] == [x["scores"] for x in report.layers]


def test_scoring_from_a_block_equals_scoring_the_whole_model(tiny_mixtral_dir, tokenizer, small_text_dir):
    """CausalHeldOut runs only the blocks from the changed one on (the earlier blocks' inputs are
    kept): with an expert of block 1 changed, its scores equal those of the whole model run."""
    from types import SimpleNamespace

    from moeq.expert_sensitivity import CausalHeldOut
    model = load_tiny(tiny_mixtral_dir)
    fam = family_for(model)
    windows = calib(tokenizer, small_text_dir, n=6)
    a = SimpleNamespace(batch_size=4, device="cpu")
    with torch.no_grad():
        held = CausalHeldOut(model, fam, windows, torch.ones(len(tokenizer)), a)
        experts = model.model.layers[1].mlp.experts
        experts.down_proj.data[3] *= 0.5
        nll, correct = held.token_scores(1)
        full_nll, full_correct = held.token_scores(0)
    assert torch.equal(nll, full_nll) and torch.equal(correct, full_correct)
    assert not torch.equal(nll, held.base[0])
