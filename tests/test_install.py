"""The package as users install it. A regular (non-editable) install in a fresh virtualenv
puts one import package, ``moeq``, and its startup hook at the top of site-packages and
nothing generic (no utils, quant, inference ...); there, with no import in the user's code,
``from_pretrained`` and the paper's ``lm_eval`` command load a packed checkpoint. (The
editable install the tests themselves run from is covered by test_packed.py.)"""
import os
import subprocess
import sys

import pytest

from moeq.config import QuantConfig
from moeq.utils import data
from moeq.utils.families import family_for

from conftest import ROOT, load_tiny, pack
from test_packed import METRICS, in_process_reference, read_lm_eval_results, run_lm_eval_cli, write_tasks


def build_wheel(out_dir) -> str:
    """The wheel pip would build for ``pip install .``; in this environment when its setuptools
    can (no download), else in pip's isolated build environment."""
    try:
        import setuptools
        own = tuple(int(x) for x in setuptools.__version__.split(".")[:2]) >= (70, 1)
    except ImportError:
        own = False
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out_dir), ROOT]
    r = subprocess.run(cmd + (["--no-build-isolation"] if own else []), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return next(os.path.join(out_dir, f) for f in os.listdir(out_dir) if f.endswith(".whl"))


def site_packages(python) -> str:
    r = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       capture_output=True, text=True, check=True)
    return r.stdout.strip()


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    d = tmp_path_factory.mktemp("install")
    wheel = build_wheel(d / "wheel")
    subprocess.run([sys.executable, "-m", "venv", str(d / "venv")], check=True)
    python = str(d / "venv" / "bin" / "python")
    # torch, transformers and lm-eval come from the test environment: its site directories go on the
    # new venv's path through a .pth file, after the venv's own (a venv's --system-site-packages
    # would give the base interpreter's, which need not have them). The .pth files in those
    # directories do not run there, so the test environment's editable moeq stays out.
    env_sites = sorted({p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")})
    with open(os.path.join(site_packages(python), "_test_env.pth"), "w") as f:
        f.write("\n".join(env_sites) + "\n")
    before = set(os.listdir(site_packages(python)))
    r = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return python, set(os.listdir(site_packages(python))) - before


def test_regular_install_adds_only_moeq(venv):
    python, added = venv
    assert {a for a in added if not a.endswith(".dist-info")} == {"moeq", "moeq.pth"}, added
    r = subprocess.run([python, "-c", "import moeq, sys; print(moeq.__file__)"], capture_output=True, text=True,
                       cwd="/")
    assert r.stdout.strip().startswith(site_packages(python)), (r.stdout, r.stderr[-2000:])


def test_regular_install_loads_and_evaluates(venv, tiny_mixtral_dir, tokenizer, small_text_dir, tmp_path):
    python, _ = venv
    model = load_tiny(tiny_mixtral_dir)
    windows = data.calibration_windows(data.tokenize(tokenizer, data.load_text(small_text_dir).train), 8, 64, 0)
    out = str(tmp_path / "ckpt")
    pack(model, family_for(model), windows, QuantConfig(groupsize=32, batch_size=4), out, tokenizer)
    code = ("import torch, transformers, moeq; m = transformers.AutoModelForCausalLM.from_pretrained("
            f"{out!r}, dtype=torch.float32); print(type(m.model.layers[0].mlp.experts).__name__, "
            "moeq.__file__)")
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    kind, where = r.stdout.split()
    assert kind == "QuantExperts" and where.startswith(site_packages(python))
    tasks = write_tasks(tmp_path)
    r = run_lm_eval_cli(python, out, tasks, tmp_path / "results", ",quantized=True")
    assert r.returncode == 0, r.stderr[-4000:]
    cli = read_lm_eval_results(tmp_path / "results")
    ref = in_process_reference(model, out, tasks)
    for task, metric in METRICS:
        assert cli[task][metric] == pytest.approx(ref[task][metric], rel=1e-5), (task, metric)
