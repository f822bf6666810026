import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import DATA, load_tiny, read
from quant.packing import pack_codes, packed_width, unpack_codes
from utils import checkpoint, data
from utils.families import family_for
from utils.pipeline import QuantConfig, quantize_model


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("cols", [1, 7, 13, 32, 100])
def test_pack_roundtrip(bits, cols):
    codes = torch.randint(0, 2 ** bits, (2, 3, cols))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, packed_width(cols, bits))
    assert packed.shape[-1] * 8 == ((cols + 7) // 8 * 8) * bits  # exactly `bits` bits per (padded) code
    assert torch.equal(unpack_codes(packed, bits, cols).long(), codes)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_mixtral_dir, tokenizer, small_text_dir):
    """One in-memory fake-quantized model and its packed checkpoint (mixed 3/2/1 bits)."""
    model = load_tiny(tiny_mixtral_dir)
    text = data.load_text(small_text_dir)
    windows = data.calibration_windows(data.tokenize(tokenizer, text.train), 8, 64, seed=0)
    cfg = QuantConfig(avg_bits=2.0, high_bits=3, mid_bits=2, low_bits=1, attn_bits=4, groupsize=32, batch_size=4)
    report = quantize_model(model, family_for(model), windows, cfg, torch.device("cpu"))
    out = str(tmp_path_factory.mktemp("packed") / "ckpt")
    os.makedirs(out)
    sizes = checkpoint.save_packed(model, report, out, cfg.groupsize, cfg.sym, max_shard_size="200KB")
    tokenizer.save_pretrained(out)
    return model, report, out, sizes


def test_packed_logits_equal_fake_quant(quantized):
    from inference import load_quantized_model
    model, report, out, _ = quantized
    assert set(report.module_bits["model.layers.0.mlp.experts.gate_up_proj"]) == {1, 2, 3}
    packed = load_quantized_model(out, dtype=torch.float32)
    assert type(packed.model.layers[0].mlp.experts).__name__ == "QuantExperts"
    assert type(packed.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"
    ids = torch.randint(0, model.config.vocab_size, (3, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = model(ids).logits, packed(ids).logits
    assert torch.allclose(ref, got, rtol=0, atol=1e-5), (ref - got).abs().max()


def test_checkpoint_is_sharded_pickle_free_and_documented(quantized):
    _, _, out, sizes = quantized
    files = os.listdir(out)
    assert "model.safetensors.index.json" in files and len(sizes["files"]) > 1
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".pth"))]
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["format"] == "moeq-packed" and qc["version"] == 1 and qc["group_size"] == 32
    assert qc["modules"]["model.layers.1.self_attn.o_proj"] == {"bits": 4}
    assert len(qc["modules"]["model.layers.1.mlp.experts.down_proj"]["bits"]) == 8


def test_size_close_to_theory(tmp_path, tokenizer, small_text_dir):
    """A model big enough that file headers are noise: packed size within 3% of theory."""
    from transformers import MixtralForCausalLM

    from utils.tiny import tiny_mixtral_config
    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_mixtral_config(len(tokenizer), hidden_size=256, intermediate_size=512,
                                                   num_attention_heads=4, num_key_value_heads=4)).eval()
    text = data.load_text(small_text_dir)
    windows = data.calibration_windows(data.tokenize(tokenizer, text.train), 4, 64, seed=0)
    cfg = QuantConfig(avg_bits=2.5, high_bits=3, mid_bits=None, low_bits=2, attn_bits=4, groupsize=128, batch_size=4)
    report = quantize_model(model, family_for(model), windows, cfg, torch.device("cpu"))
    sizes = checkpoint.save_packed(model, report, str(tmp_path), 128, False)
    assert abs(sizes["disk_bytes"] / sizes["theoretical_bytes"] - 1) < 0.03, sizes
    # and the theory is what it says: 2.5 bits per expert weight on average
    expert_params = 2 * 8 * 3 * 256 * 512
    attn_params = 2 * 4 * 256 * 256
    assert sizes["code_bytes"] == (expert_params * 2.5 + attn_params * 4) / 8


def test_not_packed_missing_truncated_and_version_errors(quantized, tiny_mixtral_dir, tmp_path):
    from inference import CheckpointError, load_quantized_model
    _, _, out, _ = quantized
    with pytest.raises(CheckpointError, match="config.json.*not a packed"):
        load_quantized_model(tiny_mixtral_dir)
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    shard = sorted(f for f in os.listdir(bad) if f.startswith("model-"))[1]
    os.remove(bad / shard)
    with pytest.raises(CheckpointError, match=shard):
        load_quantized_model(str(bad))
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    with open(bad / shard, "r+b") as f:
        f.truncate(os.path.getsize(bad / shard) // 2)
    with pytest.raises(CheckpointError, match=shard):
        load_quantized_model(str(bad))
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    cfg = json.load(open(bad / "config.json"))
    cfg["quantization_config"]["version"] = 99
    json.dump(cfg, open(bad / "config.json", "w"))
    with pytest.raises(CheckpointError, match="version 99"):
        load_quantized_model(str(bad))


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


def test_lm_eval_cli_matches_in_process_model(quantized, tmp_path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    model, _, out, _ = quantized
    tasks = write_tasks(tmp_path)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    lm_eval_bin = shutil.which("lm_eval") or os.path.join(os.path.dirname(sys.executable), "lm_eval")
    r = subprocess.run([lm_eval_bin, "--model", "hf", "--tasks", "moeq_ppl,moeq_mc", "--include_path", tasks,
                        "--model_args", f"pretrained={out},quantized=True,dtype=float32", "--device", "cpu",
                        "--batch_size", "4", "--output_path", str(tmp_path / "results")],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    result_file = next(os.path.join(dp, f) for dp, _, fs in os.walk(tmp_path / "results") for f in fs
                       if f.startswith("results") and f.endswith(".json"))
    cli = json.load(open(result_file))["results"]

    # in process: the fake-quantized model from the same run, through lm-eval's stock HFLM
    tok = __import__("transformers").AutoTokenizer.from_pretrained(out)
    ref = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=4),
                                  tasks=["moeq_ppl", "moeq_mc"], task_manager=TaskManager(include_path=tasks))["results"]
    for task, metric in METRICS:
        assert cli[task][metric] == pytest.approx(ref[task][metric], rel=1e-5), (task, metric)


def test_python_api_and_plain_hf_behaviour(quantized, tiny_mixtral_dir):
    from huggingface import QuantizedHFLM
    _, _, out, _ = quantized
    lm = QuantizedHFLM(pretrained=out, quantized=True, device="cpu", dtype="float32")
    assert type(lm.model.model.layers[0].mlp.experts).__name__ == "QuantExperts"
    plain = QuantizedHFLM(pretrained=tiny_mixtral_dir, device="cpu", dtype="float32")
    assert type(plain.model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    from inference import CheckpointError
    with pytest.raises(CheckpointError, match="not a packed checkpoint"):
        QuantizedHFLM(pretrained=tiny_mixtral_dir, quantized=True, device="cpu")


@pytest.mark.parametrize("first_import", ["", "from huggingface import QuantizedHFLM; "])
def test_hook_registers_hf_in_a_new_interpreter(first_import):
    # via the startup hook alone, and when the Python API is imported before lm-eval's models
    code = first_import + "from lm_eval.api.registry import get_model; print(get_model('hf').__name__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)
    assert r.stdout.strip() == "QuantizedHFLM", r.stderr[-2000:]
