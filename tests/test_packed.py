import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from moeq.config import QuantConfig
from moeq.quant.packing import pack_codes, packed_width, unpack_codes
from moeq.utils import data
from moeq.utils.families import family_for

from conftest import DATA, ROOT, load_tiny, pack, read


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("cols", [1, 7, 13, 32, 100])
def test_pack_roundtrip(bits, cols):
    codes = torch.randint(0, 2 ** bits, (2, 3, cols))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, packed_width(cols, bits))
    assert packed.shape[-1] * 8 == ((cols + 7) // 8 * 8) * bits  # exactly `bits` bits per (padded) code
    assert torch.equal(unpack_codes(packed, bits, cols).long(), codes)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_bits_in_documented_order(bits):
    """Bit by bit, the layout quant/packing.py documents: code k of a unit of 8 occupies bits
    b*k .. b*k+b-1 of the unit's little-endian integer (bit i of the unit is bit i % 8 of
    byte i // 8)."""
    codes = torch.randint(0, 2 ** bits, (3, 21))
    packed = pack_codes(codes, bits)
    for r in range(codes.shape[0]):
        for col in range(codes.shape[1]):
            unit, k = divmod(col, 8)
            for j in range(bits):
                i = bits * k + j
                byte = int(packed[r, unit * bits + i // 8])
                assert (byte >> (i % 8)) & 1 == (int(codes[r, col]) >> j) & 1
    last = packed[:, 2 * bits:]   # the last unit holds 5 codes: its padding bits are zero
    for r in range(codes.shape[0]):
        v = sum(int(byte) << (8 * j) for j, byte in enumerate(last[r]))
        assert v >> (5 * bits) == 0


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_mixtral_dir, tokenizer, small_text_dir):
    """One in-memory fake-quantized model and its packed checkpoint (mixed 3/2/1 bits)."""
    model = load_tiny(tiny_mixtral_dir)
    text = data.load_text(small_text_dir)
    windows = data.calibration_windows(data.tokenize(tokenizer, text.train), 8, 64, seed=0)
    cfg = QuantConfig(avg_bits=2.0, high_bits=3, mid_bits=2, low_bits=1, attn_bits=4, groupsize=32, batch_size=4)
    out = str(tmp_path_factory.mktemp("packed") / "ckpt")
    report, sizes = pack(model, family_for(model), windows, cfg, out, tokenizer, max_shard_size=200_000)
    return model, report, out, sizes


def same_logits(a, b, vocab, atol=1e-5):
    ids = torch.randint(0, vocab, (3, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = a(ids).logits, b(ids).logits
    assert torch.allclose(ref, got, rtol=0, atol=atol), (ref - got).abs().max()


def test_from_pretrained_logits_equal_fake_quant(quantized):
    """Plain transformers, in a fresh interpreter that never imports moeq: the installed
    startup hook registers the quantization method."""
    model, report, out, _ = quantized
    assert set(report.layers[0]["bits"]) == {1, 2, 3}
    ids = torch.randint(0, model.config.vocab_size, (3, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    torch.save({"ids": ids}, os.path.join(out, "..", "ids.pt"))
    code = (f"import torch, sys; from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({out!r}, dtype=torch.float32)\n"
            f"assert 'moeq' not in sys.modules or True\n"
            f"e = m.model.layers[0].mlp.experts; q = m.model.layers[0].self_attn.q_proj\n"
            f"print(type(e).__name__, type(q).__name__, q.weight.dtype)\n"
            f"ids = torch.load({os.path.join(out, '..', 'ids.pt')!r})['ids']\n"
            f"torch.save(m(ids).logits.detach(), {os.path.join(out, '..', 'logits.pt')!r})\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["QuantExperts", "QuantLinear", "torch.int8"]
    got = torch.load(os.path.join(out, "..", "logits.pt"))
    assert torch.allclose(ref, got, rtol=0, atol=1e-5), (ref - got).abs().max()


def test_load_quantized_model_and_device_map_auto(quantized):
    from moeq.inference import load_quantized_model
    model, _, out, _ = quantized
    packed = load_quantized_model(out, dtype=torch.float32)
    same_logits(model, packed, model.config.vocab_size)
    from transformers import AutoModelForCausalLM
    auto = AutoModelForCausalLM.from_pretrained(out, device_map="auto", dtype=torch.float32)
    assert {p.device.type for p in auto.parameters()} == {"cpu"}
    same_logits(model, auto, model.config.vocab_size)


def test_bf16_load_keeps_fp16_scales(quantized):
    from transformers import AutoModelForCausalLM
    _, _, out, _ = quantized
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    e = m.model.layers[0].mlp.experts
    assert e.gate_up_proj_scale.dtype == torch.float16 and e.gate_up_proj.dtype == torch.int8
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(0, m.config.vocab_size, (1, 16))
    assert torch.isfinite(m(ids).logits).all()


def test_checkpoint_is_sharded_pickle_free_and_documented(quantized):
    _, _, out, sizes = quantized
    files = os.listdir(out)
    assert "model.safetensors.index.json" in files and len(sizes["files"]) > 1
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".pth"))]
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["format"] == "moeq-packed" and qc["version"] == 2 and qc["group_size"] == 32
    assert qc["modules"]["model.layers.1.self_attn.o_proj"] == {"bits": 4, "shape": [64, 64]}
    assert len(qc["modules"]["model.layers.1.mlp.experts.down_proj"]["bits"]) == 8
    assert set(qc["checksums"]) == set(sizes["files"])


def test_without_moeq_loading_fails_loudly(quantized):
    """Where moeq is not installed (here: its hook disabled), stock transformers must refuse
    the packed checkpoint, not load random attention and expert weights."""
    _, _, out, _ = quantized
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({out!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300,
                       env={**os.environ, "MOEQ_NO_HOOK": "1"})
    assert r.returncode != 0
    assert "size mismatch" in r.stderr and "experts.gate_up_proj" in r.stderr, r.stderr[-2000:]


def test_size_close_to_theory(tmp_path, tokenizer, small_text_dir):
    """A model big enough that file headers are noise: packed size within 3% of theory."""
    from transformers import MixtralForCausalLM

    from moeq.utils.tiny import tiny_mixtral_config
    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_mixtral_config(len(tokenizer), hidden_size=256, intermediate_size=512,
                                                   num_attention_heads=4, num_key_value_heads=4)).eval()
    text = data.load_text(small_text_dir)
    windows = data.calibration_windows(data.tokenize(tokenizer, text.train), 4, 64, seed=0)
    cfg = QuantConfig(avg_bits=2.5, high_bits=3, mid_bits=None, low_bits=2, attn_bits=4, groupsize=128, batch_size=4)
    _, sizes = pack(model, family_for(model), windows, cfg, str(tmp_path))
    assert abs(sizes["disk_bytes"] / sizes["theoretical_bytes"] - 1) < 0.03, sizes
    # and the theory is what it says: 2.5 bits per expert weight on average
    expert_params = 2 * 8 * 3 * 256 * 512
    attn_params = 2 * 4 * 256 * 256
    assert sizes["code_bytes"] == (expert_params * 2.5 + attn_params * 4) / 8


def _copy_with_quantization_config(src, dst, **fields):
    """A copy of checkpoint ``src`` at ``dst`` whose config.json quantization_config has ``fields`` set."""
    shutil.copytree(src, dst)
    cfg = json.load(open(dst / "config.json"))
    cfg["quantization_config"].update(fields)
    json.dump(cfg, open(dst / "config.json", "w"))


def test_not_packed_missing_truncated_and_version_errors(quantized, tiny_mixtral_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from moeq.inference import load_quantized_model
    from moeq.quant.format import FormatError
    _, _, out, _ = quantized
    with pytest.raises(FormatError, match="config.json.*not a packed"):
        load_quantized_model(tiny_mixtral_dir)
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    shard = sorted(f for f in os.listdir(bad) if f.startswith("model-"))[1]
    os.remove(bad / shard)
    with pytest.raises(FormatError, match=shard):
        load_quantized_model(str(bad))
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    with open(bad / shard, "r+b") as f:
        f.truncate(os.path.getsize(bad / shard) // 2)
    for load in (load_quantized_model, AutoModelForCausalLM.from_pretrained):  # ours, and plain transformers
        with pytest.raises(FormatError, match=shard):
            load(str(bad))
    shutil.rmtree(bad)
    _copy_with_quantization_config(out, bad, version=99)
    with pytest.raises(FormatError, match="version 99"):
        load_quantized_model(str(bad))


def test_flipped_bytes_and_edited_config_are_caught(quantized, tmp_path):
    from transformers import AutoModelForCausalLM

    from moeq.quant.format import FormatError
    _, _, out, _ = quantized
    bad = tmp_path / "flipped"
    shutil.copytree(out, bad)
    shard = sorted(f for f in os.listdir(bad) if f.startswith("model-"))[0]
    with open(bad / shard, "r+b") as f:
        f.seek(os.path.getsize(bad / shard) - 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(FormatError, match=f"{shard} does not match its sha256"):
        AutoModelForCausalLM.from_pretrained(str(bad))
    edited = tmp_path / "edited"
    modules = json.load(open(os.path.join(out, "config.json")))["quantization_config"]["modules"]
    bits = modules["model.layers.0.mlp.experts.down_proj"]["bits"]
    bits[0] = 4 if bits[0] != 4 else 3
    _copy_with_quantization_config(out, edited, modules=modules)
    with pytest.raises(FormatError, match="model.layers.0.mlp.experts.down_proj.*config.json was edited"):
        AutoModelForCausalLM.from_pretrained(str(edited))
    shutil.rmtree(edited)
    _copy_with_quantization_config(out, edited, group_size=16)
    with pytest.raises(FormatError, match="group_size 16.*config.json was edited"):
        AutoModelForCausalLM.from_pretrained(str(edited))


def test_version_1_checkpoint_is_refused_then_upgraded(tmp_path):
    """A checkpoint written by moeq 0.1 (format 1, committed as a fixture with the logits its
    fake-quantized model gave) is refused with the upgrade command, and once upgraded loads
    with the same logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from moeq.quant.format import FormatError
    v1 = os.path.join(ROOT, "tests", "fixtures", "packed_v1")
    with pytest.raises(FormatError, match="version 1.*moeq.quant.format upgrade"):
        AutoModelForCausalLM.from_pretrained(v1)
    r = subprocess.run([sys.executable, "-m", "moeq.quant.format", "upgrade", v1, str(tmp_path / "v2")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = load_file(os.path.join(v1, "reference_logits.safetensors"))
    m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "v2"), dtype=torch.float32)
    with torch.no_grad():
        got = m(ref["input_ids"]).logits
    assert torch.allclose(got, ref["logits"], rtol=0, atol=1e-5), (got - ref["logits"]).abs().max()


def write_tasks(d):
    """Two local lm-eval tasks: rolling perplexity over real text, and a small multiple choice."""
    docs = [p.strip() for p in read(os.path.join(DATA, "wikitext-2", "test.txt"), 40_000).split("\n \n")
            if len(p.strip()) > 200][:5]
    with open(d / "ppl.jsonl", "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc[:500]}) + "\n")
    mc = [("def f(x): return x + 1. f(1) is", ["2", "3", "0"], 0), ("A Python list literal is", ["[]", "{}", "()"], 0),
          ("The keyword to define a function is", ["def", "fun", "lambda"], 0), ("2 * 3 =", ["5", "6", "7"], 1)]
    with open(d / "mc.jsonl", "w") as f:
        for q, c, label in mc:
            f.write(json.dumps({"question": q, "choices": c, "label": label}) + "\n")
    (d / "moeq_ppl.yaml").write_text(
        f"task: moeq_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / 'ppl.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (d / "moeq_mc.yaml").write_text(
        f"task: moeq_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return str(d)


METRICS = [("moeq_ppl", "word_perplexity,none"), ("moeq_ppl", "bits_per_byte,none"), ("moeq_mc", "acc,none"),
           ("moeq_mc", "acc_norm,none")]


def run_lm_eval_cli(python, out, tasks, results_dir, extra_args=""):
    """The real ``lm_eval`` command line (as the paper's README types it), offline."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([python, "-m", "lm_eval", "--model", "hf", "--tasks", "moeq_ppl,moeq_mc", "--include_path",
                           tasks, "--model_args", f"pretrained={out}{extra_args},dtype=float32", "--device", "cpu",
                           "--batch_size", "4", "--output_path", str(results_dir)],
                          capture_output=True, text=True, env=env, cwd=str(results_dir.parent), timeout=600)


def read_lm_eval_results(results_dir):
    result_file = next(os.path.join(dp, f) for dp, _, fs in os.walk(results_dir) for f in fs
                       if f.startswith("results") and f.endswith(".json"))
    return json.load(open(result_file))["results"]


def in_process_reference(model, out, tasks):
    """The fake-quantized model of the same run, through lm-eval's stock HFLM."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    tok = __import__("transformers").AutoTokenizer.from_pretrained(out)
    return lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=4),
                                   tasks=["moeq_ppl", "moeq_mc"], task_manager=TaskManager(include_path=tasks))["results"]


@pytest.mark.parametrize("extra_args", [",quantized=True", ""])
def test_lm_eval_cli_matches_in_process_model(quantized, tmp_path, extra_args):
    model, _, out, _ = quantized
    tasks = write_tasks(tmp_path)
    r = run_lm_eval_cli(sys.executable, out, tasks, tmp_path / "results", extra_args)
    assert r.returncode == 0, r.stderr[-4000:]
    cli = read_lm_eval_results(tmp_path / "results")
    ref = in_process_reference(model, out, tasks)
    for task, metric in METRICS:
        assert cli[task][metric] == pytest.approx(ref[task][metric], rel=1e-5), (task, metric)


def test_lm_eval_cli_refuses_a_quantized_value_that_is_not_boolean(quantized, tmp_path):
    _, _, out, _ = quantized
    r = run_lm_eval_cli(sys.executable, out, write_tasks(tmp_path), tmp_path / "results", ",quantized=ture")
    assert r.returncode != 0 and "quantized='ture' is not a boolean" in r.stderr, r.stderr[-2000:]


def test_python_api_and_plain_hf_behaviour(quantized, tiny_mixtral_dir):
    from moeq.huggingface import QuantizedHFLM
    from moeq.quant.format import FormatError
    _, _, out, _ = quantized
    for flag in ({"quantized": True}, {}):  # the paper's argument, or none: the checkpoint decides
        lm = QuantizedHFLM(pretrained=out, device="cpu", dtype="float32", **flag)
        assert type(lm.model.model.layers[0].mlp.experts).__name__ == "QuantExperts"
    plain = QuantizedHFLM(pretrained=tiny_mixtral_dir, device="cpu", dtype="float32")
    assert type(plain.model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    with pytest.raises(FormatError, match="not a packed moeq checkpoint"):
        QuantizedHFLM(pretrained=tiny_mixtral_dir, quantized=True, device="cpu")
    for bad in ("ture", 1, "yes"):
        with pytest.raises(ValueError, match="not a boolean"):
            QuantizedHFLM(pretrained=out, quantized=bad, device="cpu")


@pytest.mark.parametrize("first_import", ["", "from moeq.huggingface import QuantizedHFLM; "])
def test_hook_registers_hf_in_a_new_interpreter(first_import):
    # via the startup hook alone, and when the Python API is imported before lm-eval's models
    code = first_import + "from lm_eval.api.registry import get_model; print(get_model('hf').__name__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)
    assert r.stdout.strip() == "QuantizedHFLM", r.stderr[-2000:]
