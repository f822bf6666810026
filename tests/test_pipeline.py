import json
import math
import os
import subprocess
import sys

import pytest
import torch

from moeq.config import QuantConfig
from moeq.utils import data
from moeq.utils.families import family_for
from moeq.utils.pipeline import QuantReport, _collect_moe_stats, _Run, quantize_model
from moeq.utils.sequential import capture_block_inputs, run_block

from conftest import ROOT, load_tiny


def calib(tokenizer, text_dir, n=8, seqlen=64):
    text = data.load_text(text_dir)
    return data.calibration_windows(data.tokenize(tokenizer, text.train), n, seqlen, seed=0)


def test_expert_hessians_equal_brute_force(tiny_mixtral_dir, tokenizer, small_text_dir):
    model = load_tiny(tiny_mixtral_dir)
    fam = family_for(model)
    windows = calib(tokenizer, small_text_dir)
    cpu = torch.device("cpu")
    inputs, kwargs = capture_block_inputs(model, fam, windows, 4, cpu, cpu)
    block = model.model.layers[0]
    moe = fam.moe(block, "model.layers.0")
    stats = _collect_moe_stats(_Run(fam, QuantConfig(), QuantReport(), cpu, cpu), moe, block, inputs, kwargs, None)
    accs, tokens = stats.accs, stats.tokens

    # brute force: the MoE input of every token, routed by the stock block's own router
    seen = []
    h = moe.module.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    run_block(block, inputs, kwargs, cpu, cpu)
    h.remove()
    x = torch.cat(seen)
    _, _, top = moe.module.gate(x)
    ex = moe.module.experts
    for e in range(moe.num_experts):
        H1 = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        H2 = torch.zeros(ex.down_proj.shape[2], ex.down_proj.shape[2], dtype=torch.float64)
        n = 0
        for t in range(x.shape[0]):
            if e in top[t].tolist():
                xt = x[t].double()
                H1 += torch.outer(xt, xt)
                g, u = (ex.gate_up_proj[e].double() @ xt).chunk(2)
                a = torch.nn.functional.silu(g) * u
                H2 += torch.outer(a, a)
                n += 1
        assert n == tokens[e] > 0
        assert torch.allclose(accs["gate_up_proj"].hessian(e).double(), H1 / n, rtol=1e-4, atol=1e-5)
        assert torch.allclose(accs["down_proj"].hessian(e).double(), H2 / n, rtol=1e-4, atol=1e-6)


def test_fallback_experts_hessians_come_from_every_token(tiny_mixtral_dir, tokenizer, small_text_dir):
    """Experts in ``fallback`` (starved) take every token: their gate/up Hessian (one shared sum)
    and their own down-projection Hessian against a brute force over all tokens; the other
    experts' Hessians are exactly those of a pass without fallback."""
    model = load_tiny(tiny_mixtral_dir)
    fam = family_for(model)
    cpu = torch.device("cpu")
    inputs, kwargs = capture_block_inputs(model, fam, calib(tokenizer, small_text_dir), 4, cpu, cpu)
    block = model.model.layers[0]
    moe = fam.moe(block, "model.layers.0")
    run = _Run(fam, QuantConfig(), QuantReport(), cpu, cpu)
    plain = _collect_moe_stats(run, moe, block, inputs, kwargs, None)
    got = _collect_moe_stats(run, moe, block, inputs, kwargs, None, fallback={2, 5})
    seen = []
    h = moe.module.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    run_block(block, inputs, kwargs, cpu, cpu)
    h.remove()
    x = torch.cat(seen).double()
    ex = moe.module.experts
    for e in (2, 5):
        g, u = (x @ ex.gate_up_proj[e].double().T).chunk(2, dim=-1)
        a = torch.nn.functional.silu(g) * u
        assert int(got.accs["gate_up_proj"].n[e]) == int(got.accs["down_proj"].n[e]) == x.shape[0]
        assert torch.allclose(got.accs["gate_up_proj"].hessian(e).double(), x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)
        assert torch.allclose(got.accs["down_proj"].hessian(e).double(), a.T @ a / x.shape[0], rtol=1e-4, atol=1e-6)
    for e in set(range(moe.num_experts)) - {2, 5}:
        for name in ("gate_up_proj", "down_proj"):
            assert torch.equal(got.accs[name].hessian(e), plain.accs[name].hessian(e))


def test_rtn_method_rounds_every_matrix_of_the_original_weights(tiny_mixtral_dir, tokenizer, small_text_dir):
    # RTN does not look at the data: each quantized matrix must be exactly rtn(original)
    # at its allocated width, whatever the calibration (GPTQ rows would differ).
    from moeq.quant.quantizer import rtn
    model = load_tiny(tiny_mixtral_dir)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = QuantConfig(method="rtn", order_type="router", avg_bits=2.0, attn_bits=3, groupsize=32, batch_size=4)
    report = quantize_model(model, family_for(model), calib(tokenizer, small_text_dir), cfg, torch.device("cpu"))
    state = model.state_dict()
    for layer in report.layers:
        for kind in ("gate_up_proj", "down_proj"):
            name = f"{layer['name']}.experts.{kind}"
            for e, bits in enumerate(layer["bits"]):
                assert torch.equal(state[name][e], rtn(original[name][e], bits, 32)[3]), (name, e)
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(state[q], rtn(original[q], 3, 32)[3])
    gptq = load_tiny(tiny_mixtral_dir)
    quantize_model(gptq, family_for(gptq), calib(tokenizer, small_text_dir), QuantConfig(
        order_type="router", avg_bits=2.0, attn_bits=3, groupsize=32, batch_size=4), torch.device("cpu"))
    assert not torch.equal(gptq.state_dict()[q], state[q])


def never_route_to_7(model):
    """The model's routers, except that expert 7 never receives a token."""
    for layer in model.model.layers:
        gate = layer.mlp.gate

        def forward(hidden_states, gate=gate):
            logits = torch.nn.functional.linear(hidden_states.reshape(-1, gate.hidden_dim), gate.weight)
            logits[:, 7] = float("-inf")
            top, idx = logits.float().softmax(dim=-1).topk(gate.top_k, dim=-1)
            return logits, top / top.sum(dim=-1, keepdim=True), idx
        gate.forward = forward
    return model


def test_expert_with_zero_tokens_keeps_sane_weights(tiny_mixtral_dir, tokenizer, small_text_dir):
    model = load_tiny(tiny_mixtral_dir)
    before = model.model.layers[0].mlp.experts.gate_up_proj.data[7].clone()
    cfg = QuantConfig(order_type="router", avg_bits=2.0, attn_bits=None, groupsize=32, batch_size=4)
    report = quantize_model(never_route_to_7(model), family_for(model), calib(tokenizer, small_text_dir), cfg,
                            torch.device("cpu"))
    assert {"layer": "model.layers.0.mlp", "expert": 7, "tokens": 0} in report.starved
    after = model.model.layers[0].mlp.experts.gate_up_proj.data[7]
    bits = report.layers[0]["bits"][7]
    rel = ((after - before).norm() / before.norm()).item()
    assert rel < {1: 0.8, 2: 0.6, 3: 0.3}[bits], (bits, rel)
    assert after.abs().sum() > 0


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "quantize_mixtral.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


SEED_FLAGS = ["--mixed_type", "mixed", "--order_type", "combined", "--zeta", "3.0", "--avg_bits", "2.0",
              "--high_bit_level", "3", "--mid_bit_level", "2", "--low_bit_level", "1", "--attn_bit_level", "4"]


def test_seed_command_end_to_end(tiny_mixtral_dir, small_text_dir, tmp_path):
    out = tmp_path / "2p0"
    r = run_cli("--model", tiny_mixtral_dir, *SEED_FLAGS, "--groupsize", "32", "--dataset", small_text_dir,
                "--eval_ppl", "--save", "--saving_path", str(out), "--nsamples", "8", "--seqlen", "128")
    assert r.returncode == 0, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith(f"ppl {os.path.basename(small_text_dir)}: ")
    assert math.isfinite(float(last.split(": ")[1]))
    alloc = json.loads((out / "bit_allocation.json").read_text())
    assert alloc["avg_bits"] == 2.0
    assert len(alloc["layers"]) == 2
    for layer in alloc["layers"]:
        assert sorted(layer["expert_order"]) == list(range(8))
        assert sorted(layer["bits"]) == [1, 1, 2, 2, 2, 2, 3, 3]
        assert set(layer["scores"]) >= {"router_norm", "max_var", "tokens"}
        # the first experts of the order carry the high bits
        assert [layer["bits"][e] for e in layer["expert_order"][:2]] == [3, 3]
    # the dequantized checkpoint loads with stock transformers
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(out))
    assert m.config.num_local_experts == 8
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial directory left


def make_dense_model(path, tokenizer):
    from transformers import MistralConfig, MistralForCausalLM
    cfg = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2)
    MistralForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)


def nan_model(src, path):
    m = load_tiny(src)
    with torch.no_grad():
        m.model.layers[1].mlp.experts.down_proj[3, 0, 0] = float("nan")
    m.save_pretrained(path)
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(src).save_pretrained(path)


@pytest.mark.parametrize("case", ["not_moe", "missing_model", "order", "budget", "spacing", "groupsize", "nan",
                                  "nonempty_out", "missing_data", "bits"])
def test_bad_input_one_line_error_nothing_written(case, tiny_mixtral_dir, small_text_dir, tokenizer, tmp_path):
    model, flags = tiny_mixtral_dir, list(SEED_FLAGS) + ["--groupsize", "32"]
    dataset = small_text_dir
    out = tmp_path / "out"
    expect = {"not_moe": "not a supported MoE model", "missing_model": "no such checkpoint",
              "order": "unknown --order_type", "budget": "outside", "spacing": "equally spaced",
              "groupsize": "does not divide", "nan": "NaN", "nonempty_out": "--overwrite",
              "missing_data": "no such file", "bits": "--attn_bit_level 5: choose one of"}[case]
    if case == "not_moe":
        model = str(tmp_path / "dense")
        make_dense_model(model, tokenizer)
    elif case == "missing_model":
        model = str(tmp_path / "nowhere")
    elif case == "order":
        flags[flags.index("combined")] = "bogus"
    elif case == "budget":
        flags[flags.index("--avg_bits") + 1] = "3.5"
    elif case == "spacing":
        flags[flags.index("--high_bit_level") + 1] = "4"
    elif case == "groupsize":
        flags[-1] = "48"
    elif case == "nan":
        model = str(tmp_path / "nan")
        nan_model(tiny_mixtral_dir, model)
    elif case == "nonempty_out":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    elif case == "missing_data":
        dataset = str(tmp_path / "no" / "data")
    elif case == "bits":
        flags[flags.index("--attn_bit_level") + 1] = "5"
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_cli("--model", model, *flags, "--dataset", dataset, "--save", "--saving_path", str(out),
                "--nsamples", "4", "--seqlen", "64", cwd=str(tmp_path))
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    err = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(err) == 1 and expect in err[0], r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "nonempty_out":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_router_reference_orders_by_norm_change(tiny_mixtral_dir, small_text_dir, tmp_path):
    model = load_tiny(tiny_mixtral_dir)
    factors = torch.tensor([1.3, 0.7, 1.0, 0.5, 1.6, 0.9, 1.1, 0.8])
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(factors[:, None])  # the "pre-training" routers
    ref = tmp_path / "ref"
    model.save_pretrained(ref)
    out = tmp_path / "alloc.json"
    r = run_cli("--model", tiny_mixtral_dir, "--order_type", "router", "--router_reference", str(ref),
                "--avg_bits", "2.0", "--high_bit_level", "3", "--low_bit_level", "1", "--groupsize", "32",
                "--dataset", small_text_dir, "--nsamples", "4", "--seqlen", "64", "--allocation_path", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    alloc = json.loads(out.read_text())
    final = load_tiny(tiny_mixtral_dir)
    for layer, rec in zip(final.model.layers, alloc["layers"]):
        norms = layer.mlp.gate.weight.norm(dim=1)
        change = norms - (norms * factors)           # ||w|| - ||w_ref||
        assert rec["expert_order"] == torch.argsort(change, stable=True).tolist()
        assert rec["router_score"] == "norm_change"
        assert [rec["bits"][e] for e in rec["expert_order"]] == [3] * 4 + [1] * 4

    # a reference with another expert count is refused
    from transformers import MixtralForCausalLM

    from moeq.utils.tiny import tiny_mixtral_config
    bad = tmp_path / "bad"
    MixtralForCausalLM(tiny_mixtral_config(final.config.vocab_size, num_local_experts=4)).save_pretrained(bad)
    r = run_cli("--model", tiny_mixtral_dir, "--order_type", "router", "--router_reference", str(bad),
                "--groupsize", "32", "--dataset", small_text_dir, "--nsamples", "4", "--seqlen", "64",
                "--allocation_path", str(out))
    assert r.returncode == 2 and "same architecture" in r.stderr


def test_cli_packed_checkpoint_equals_dequantized_one(tiny_mixtral_dir, small_text_dir, tmp_path):
    """The packed output is streamed to disk while quantizing; the same run saved dequantized
    must give the same logits."""
    from transformers import AutoModelForCausalLM

    from moeq.inference import load_quantized_model
    common = ["--model", tiny_mixtral_dir, *SEED_FLAGS, "--groupsize", "32", "--dataset", small_text_dir,
              "--nsamples", "8", "--seqlen", "64", "--save", "--max_shard_size", "100KB"]
    r1 = run_cli(*common, "--saving_path", str(tmp_path / "deq"))
    r2 = run_cli(*common, "--pack", "--saving_path", str(tmp_path / "packed"))
    assert r1.returncode == 0 and r2.returncode == 0, (r1.stderr[-2000:], r2.stderr[-2000:])
    assert len(list((tmp_path / "packed").glob("model-*-of-*.safetensors"))) > 1
    deq = AutoModelForCausalLM.from_pretrained(str(tmp_path / "deq")).eval()
    packed = load_quantized_model(str(tmp_path / "packed"), dtype=torch.float32)
    ids = torch.randint(0, deq.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(deq(ids).logits, packed(ids).logits, rtol=0, atol=1e-5)


def test_experts_in_chunks_equal_all_at_once(tiny_mixtral_dir, tokenizer, small_text_dir):
    """Layers whose experts do not fit at once go a chunk at a time (one more pass per chunk
    for its Hessians): the same packed checkpoint, a starved expert in the last chunk too."""
    from moeq.quant.format import MemoryWriter
    outs = []
    for chunk in (0, 3):
        model = never_route_to_7(load_tiny(tiny_mixtral_dir))
        sink = MemoryWriter(32, False)
        cfg = QuantConfig(avg_bits=2.0, groupsize=32, batch_size=4, expert_batch=chunk)
        report = quantize_model(model, family_for(model), calib(tokenizer, small_text_dir), cfg, torch.device("cpu"),
                                sink=sink)
        outs.append((sink, report))
    (a, ra), (b, rb) = outs
    assert [layer["bits"] for layer in ra.layers] == [layer["bits"] for layer in rb.layers]
    assert ra.starved == rb.starved and {s["expert"] for s in ra.starved} == {7}
    assert a.tensors.keys() == b.tensors.keys() and a.modules == b.modules
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k
    errs = [(r["rel_err"], q["rel_err"]) for r, q in zip(ra.modules, rb.modules, strict=True)]
    assert [x is None for x, _ in errs] == [y is None for _, y in errs]     # None: an expert without tokens
    assert [x for x, _ in errs if x is not None] == pytest.approx([y for _, y in errs if y is not None], rel=1e-6)


def test_allocation_picture_can_be_left_out(tiny_mixtral_dir, small_text_dir, tmp_path):
    """reproduce_tables.py measures and deletes its checkpoints: RunConfig.allocation_png=False
    writes bit_allocation.json alone."""
    from moeq.api import quantize
    from moeq.config import QuantConfig, RunConfig
    for png in (True, False):
        path = tmp_path / f"{png}" / "bit_allocation.json"
        path.parent.mkdir()
        quantize(RunConfig(model=tiny_mixtral_dir, dataset=small_text_dir, nsamples=4, seqlen=64, verbose=False,
                           quant=QuantConfig(groupsize=32, attn_bits=None), allocation_path=str(path),
                           allocation_png=png))
        assert path.is_file() and (tmp_path / f"{png}" / "bit_allocation.png").is_file() == png


def test_token_cache_returns_the_same_stream_and_tells_tokenizers_apart(tokenizer, small_text_dir, tmp_path,
                                                                        monkeypatch):
    """$MOEQ_TOKEN_CACHE: a stream is tokenized once per tokenizer and text, then read back."""
    from moeq.utils.tiny import train_tokenizer
    text = open(os.path.join(small_text_dir, "train.txt")).read()[:50_000]
    plain = data.tokenize(tokenizer, text)
    monkeypatch.setenv("MOEQ_TOKEN_CACHE", str(tmp_path / "cache"))
    assert torch.equal(data.tokenize(tokenizer, text), plain)          # made and written
    assert len(os.listdir(tmp_path / "cache")) == 1
    calls = []
    monkeypatch.setattr(type(tokenizer), "__call__", lambda *a, **k: calls.append(1) or {"input_ids": []})
    assert torch.equal(data.tokenize(tokenizer, text), plain) and not calls   # read back, not tokenized
    monkeypatch.undo()
    monkeypatch.setenv("MOEQ_TOKEN_CACHE", str(tmp_path / "cache"))
    other = train_tokenizer(text, 300)
    assert torch.equal(data.tokenize(other, text), data.tokenize(other, text)) and \
        not torch.equal(data.tokenize(other, text), plain)
    assert len(os.listdir(tmp_path / "cache")) == 2
    data.tokenize(tokenizer, text[:25_000])                            # another text, another file
    assert len(os.listdir(tmp_path / "cache")) == 3
