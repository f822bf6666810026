"""Calibration and evaluation text: hub datasets (online) or local files (offline).

``--dataset`` forms:
- ``wikitext2`` | ``ptb`` | ``c4``: loaded with ``datasets`` from the hub (needs internet).
- a directory: train split from the first of TRAIN_FILES found, test split from the
  first of TEST_FILES (e.g. WikiText-2's ``wiki.train.raw`` / ``wiki.test.raw``).
- a single text file: its first 90% (by lines) calibrates, its last 10% evaluates.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import NamedTuple

import torch

HUB_DATASETS = ("wikitext2", "ptb", "c4")
TRAIN_FILES = ("train.txt", "wiki.train.raw", "train.raw", "valid.txt", "wiki.valid.raw", "validation.txt")
TEST_FILES = ("test.txt", "wiki.test.raw", "test.raw")


@dataclass
class TextSplits:
    name: str        # printed in "ppl <name>: ..."
    train: str
    test: str
    source: str      # where the text came from, for the log


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): convert it to UTF-8, e.g. "
                         f"iconv -f latin1 -t utf-8") from None


def _local(path: str) -> TextSplits:
    path = os.path.abspath(path)
    name = os.path.basename(path.rstrip("/"))
    if os.path.isdir(path):
        train = next((os.path.join(path, f) for f in TRAIN_FILES if os.path.isfile(os.path.join(path, f))), None)
        test = next((os.path.join(path, f) for f in TEST_FILES if os.path.isfile(os.path.join(path, f))), None)
        if train is None or test is None:
            raise FileNotFoundError(f"dataset directory {path} needs a train file (one of {', '.join(TRAIN_FILES)}) "
                                    f"and a test file (one of {', '.join(TEST_FILES)})")
        return TextSplits(name, _read(train), _read(test), f"train={train} test={test}")
    lines = _read(path).splitlines(keepends=True)
    cut = max(1, int(len(lines) * 0.9))
    return TextSplits(os.path.splitext(name)[0], "".join(lines[:cut]), "".join(lines[cut:]),
                      f"{path} (first 90% of lines calibrate, last 10% evaluate)")


def _hub(name: str) -> TextSplits:
    from datasets import load_dataset
    if name == "wikitext2":
        d = load_dataset("wikitext", "wikitext-2-raw-v1")
        return TextSplits(name, "\n\n".join(d["train"]["text"]), "\n\n".join(d["test"]["text"]), "hub:wikitext-2-raw-v1")
    if name == "ptb":
        d = load_dataset("ptb_text_only", "penn_treebank")
        return TextSplits(name, " ".join(d["train"]["sentence"]), " ".join(d["test"]["sentence"]), "hub:ptb_text_only")
    train = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
    val = load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                       split="validation")
    return TextSplits(name, "\n\n".join(train["text"][:20000]), " ".join(val["text"][:1100]), "hub:allenai/c4 shard 0")


def load_text(dataset: str) -> TextSplits:
    if os.path.exists(dataset):
        return _local(dataset)
    if dataset in HUB_DATASETS:
        return _from_hub(_hub, dataset, "a text file or a directory with train/test text files")
    raise FileNotFoundError(f"--dataset {dataset!r} is neither an existing path nor one of {', '.join(HUB_DATASETS)}: "
                            f"pass a text file, a directory with train/test text files, or a hub dataset name")


def _from_hub(load, name: str, local: str):
    """``load(name)``; a failed download (offline, unknown name) is one line naming the
    dataset and the local alternative, not a traceback."""
    try:
        return load(name)
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"--dataset {name}: could not load it from the Hugging Face hub ({reason}): "
                                f"pass {local} instead, e.g. data/python-docs in this repository") from None


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The text as one token stream. With $MOEQ_TOKEN_CACHE (a folder), a stream made before
    by the same tokenizer from the same text is read from there: the processes of one study
    (training, measurement, grid) tokenize the same train split (~5 s for 10 MB) with the
    same tokenizer."""
    cached = _token_cache_file(tokenizer, text)
    if cached is not None and os.path.isfile(cached):
        return torch.load(cached, weights_only=True)
    # One long stream, as in the GPTQ protocol; chunks keep the tokenizer's memory bounded.
    ids: list[int] = []
    chunk = 1 << 20
    for i in range(0, len(text), chunk):
        ids.extend(tokenizer(text[i:i + chunk], add_special_tokens=False)["input_ids"])
    ids = torch.tensor(ids, dtype=torch.long)
    if cached is not None:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = f"{cached}.partial-{os.getpid()}"   # processes side by side may write the same file
        torch.save(ids, tmp)
        os.replace(tmp, cached)
    return ids


def _token_cache_file(tokenizer, text: str) -> str | None:
    """Where $MOEQ_TOKEN_CACHE keeps this tokenizer's stream of this text (None: no cache, or a
    tokenizer without a serialisable fast backend). The name hashes the whole tokenizer
    (vocabulary, merges, normalisation) and the text."""
    folder = os.environ.get("MOEQ_TOKEN_CACHE")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not folder or backend is None:
        return None
    import hashlib
    h = hashlib.sha256(backend.to_str().encode())
    h.update(b"\0add_special_tokens=False\0")
    h.update(text.encode("utf-8", "surrogatepass"))
    return os.path.join(folder, f"{h.hexdigest()}.pt")


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """nsamples windows of seqlen tokens, (nsamples, seqlen), drawn at random among the
    non-overlapping windows of the text (after a random offset): no token is calibrated on
    twice. Too little text for that is an error, not overlapping windows."""
    slots = ids.numel() // seqlen
    if slots < nsamples:
        raise ValueError(f"the calibration text has {ids.numel()} tokens: {slots} windows of --seqlen {seqlen}, "
                         f"fewer than --nsamples {nsamples}: use more text, or a smaller --nsamples or --seqlen")
    rng = random.Random(seed)
    offset = rng.randint(0, ids.numel() - slots * seqlen)
    starts = sorted(rng.sample(range(slots), nsamples))
    return torch.stack([ids[offset + s * seqlen: offset + (s + 1) * seqlen] for s in starts])


def eval_windows(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Non-overlapping windows covering the test stream: (n, seqlen); the tail is dropped."""
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"the test split has {ids.numel()} tokens, fewer than --seqlen {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


# ---- seq2seq pairs (Switch Transformer) --------------------------------------------

@dataclass
class PairSplits:
    name: str
    train: list[tuple[str, str]]
    test: list[tuple[str, str]]
    source: str


def _read_jsonl(path: str) -> list[tuple[str, str]]:
    import json
    pairs = []
    for i, line in enumerate(_read(path).splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {i + 1}: not valid JSON ({e.msg} at column {e.colno}): each line must be "
                             f'one record like {{"source": "...", "target": "..."}}') from None
        if not isinstance(rec, dict) or not isinstance(rec.get("source"), str) or \
                not isinstance(rec.get("target"), str):
            raise ValueError(f"{path} line {i + 1}: each record needs 'source' and 'target' text fields")
        pairs.append((rec["source"], rec["target"]))
    return pairs


def load_pairs(dataset: str) -> PairSplits:
    """``cnn_dailymail`` (hub), a jsonl file of {"source", "target"} (first 90% calibrate,
    last 10% evaluate), or a directory with train.jsonl and test.jsonl."""
    if os.path.isdir(dataset):
        tr, te = os.path.join(dataset, "train.jsonl"), os.path.join(dataset, "test.jsonl")
        if not (os.path.isfile(tr) and os.path.isfile(te)):
            raise FileNotFoundError(f"dataset directory {dataset} needs train.jsonl and test.jsonl")
        return PairSplits(os.path.basename(dataset.rstrip("/")), _read_jsonl(tr), _read_jsonl(te), f"{tr}, {te}")
    if os.path.isfile(dataset):
        pairs = _read_jsonl(dataset)
        cut = max(1, int(len(pairs) * 0.9))
        return PairSplits(os.path.splitext(os.path.basename(dataset))[0], pairs[:cut], pairs[cut:],
                          f"{dataset} (first 90% calibrate, last 10% evaluate)")
    if dataset == "cnn_dailymail":
        return _from_hub(_cnn_dailymail, dataset, "a jsonl file of source/target pairs")
    raise FileNotFoundError(f"--dataset {dataset!r}: pass a jsonl file of source/target pairs, a directory with "
                            f"train.jsonl/test.jsonl, or cnn_dailymail (hub)")


def _cnn_dailymail(name: str) -> PairSplits:
    from datasets import load_dataset
    d = load_dataset("cnn_dailymail", "3.0.0")
    get = lambda split, n: list(zip(d[split]["article"][:n], d[split]["highlights"][:n]))
    return PairSplits(name, get("train", 5000), get("test", 1000), "hub:cnn_dailymail 3.0.0")


class Pairs(NamedTuple):
    """Calibration pairs, right-padded: token ids (n, S) / (n, T) and masks (True: a real token)."""
    src: torch.Tensor
    tgt: torch.Tensor
    src_mask: torch.Tensor | None = None   # None: no padding
    tgt_mask: torch.Tensor | None = None


def pair_windows(tokenizer, pairs, n: int, src_len: int, tgt_len: int, seed: int) -> Pairs:
    """n random pairs, source and target cut to src_len / tgt_len tokens; shorter ones are
    padded and masked (the masks keep padding out of the Hessians and token counts), so
    short pairs (titles, answers) count like long ones. Pairs with an empty side are skipped."""
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    src, tgt = [], []
    for i in order:
        s = tokenizer(pairs[i][0], add_special_tokens=False)["input_ids"][:src_len]
        t = tokenizer(pairs[i][1], add_special_tokens=False)["input_ids"][:tgt_len]
        if s and t:
            src.append(s)
            tgt.append(t)
            if len(src) == n:
                break
    if len(src) < n:
        raise ValueError(f"only {len(src)} pairs have a non-empty source and target, --nsamples {n} needed: "
                         f"use more pairs or a smaller --nsamples")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    src_ids, src_mask = _padded(src, pad)
    tgt_ids, tgt_mask = _padded(tgt, pad)
    return Pairs(src_ids, tgt_ids, src_mask, tgt_mask)


def _padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
    return ids, mask
