"""What differs between a causal LM run (quantize_mixtral.py) and a seq2seq run
(quantize_switch.py): the model class, the calibration data and the evaluation.

- causal: calibration = random windows of the train text; evaluation = perplexity on
  non-overlapping windows of each eval set's test split (utils/perplexity.py).
- seq2seq: calibration = (source, target) pairs; evaluation = teacher-forced target loss,
  ROUGE-1/2/L and exact match of greedy generations on the test pairs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import ConfigError, RunConfig
from . import data as text_data


@dataclass
class Data:
    """Tokenized calibration and evaluation data of one run (reusable across runs of a model)."""
    calibration: object                                 # (n, seqlen) windows | (src (n, s), tgt (n, t))
    info: dict                                          # where it came from, how much (results JSON)
    evals: dict[str, torch.Tensor] = field(default_factory=dict)   # causal: eval set -> test windows
    pairs: object = None                                # seq2seq: data.PairSplits (test pairs evaluated)


def model_class(config: RunConfig):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    return AutoModelForCausalLM if config.causal else AutoModelForSeq2SeqLM


def prepare(config: RunConfig, tokenizer, model_config) -> Data:
    try:
        return _prepare_causal(config, tokenizer, model_config) if config.causal else \
            _prepare_seq2seq(config, tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None


def _prepare_causal(config: RunConfig, tokenizer, model_config) -> Data:
    cap = getattr(model_config, "max_position_embeddings", None) or config.seqlen
    seqlen = min(config.seqlen, cap)
    text = text_data.load_text(config.dataset)
    calib = text_data.calibration_windows(text_data.tokenize(tokenizer, text.train), config.nsamples, seqlen,
                                          config.seed)
    evals = {}
    if config.evaluate or config.evaluate_fp:
        for ds in config.eval_datasets or (config.dataset,):
            split = text if ds == config.dataset else text_data.load_text(ds)
            evals[split.name] = text_data.eval_windows(text_data.tokenize(tokenizer, split.test), seqlen)
    info = {"source": text.source, "nsamples": int(calib.shape[0]), "seqlen": seqlen, "seed": config.seed,
            "eval_windows": {k: int(v.shape[0]) for k, v in evals.items()}}
    return Data(calib, info, evals)


def _prepare_seq2seq(config: RunConfig, tokenizer) -> Data:
    pairs = text_data.load_pairs(config.dataset)
    calib = text_data.pair_windows(tokenizer, pairs.train, config.nsamples, config.src_len, config.tgt_len,
                                   config.seed)
    info = {"source": pairs.source, "nsamples": config.nsamples, "src_len": config.src_len,
            "tgt_len": config.tgt_len, "seed": config.seed}
    return Data(calib, info, pairs=pairs)


def evaluate(config: RunConfig, data: Data, model, family, tokenizer, device, act_device, loader=None,
             keep=None, desc="ppl") -> dict:
    """causal: {"ppl": {eval set: perplexity}}; seq2seq: {"loss": ..., "rouge": {...}}."""
    if config.causal:
        from .perplexity import perplexity
        return {"ppl": {name: perplexity(model, family, windows, device, config.quant.batch_size, act_device,
                                         desc=f"{desc} {name}", loader=loader, keep=keep)
                        for name, windows in data.evals.items()}}
    return _seq2seq_scores(config, data, model.to(device), tokenizer, device)


@torch.no_grad()
def _seq2seq_scores(config: RunConfig, data: Data, model, tokenizer, device) -> dict:
    """Teacher-forced target loss, ROUGE and exact match of greedy titles on the test pairs.
    On the CPU one pair at a time, as the published CPU figures were made; on CUDA in batches
    of --batch_size padded pairs (one pair at a time leaves the GPU waiting on the host at
    every generated token; padding changes the arithmetic, not what is scored)."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    pairs = data.pairs.test[: config.eval_samples]
    run = _pair_batches if torch.device(device).type == "cuda" else _pairs_one_by_one
    nll, count, texts = run(config, pairs, model, tokenizer, device)
    rouge = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    exact = 0
    for reference, generated in texts:
        scores = scorer.score(reference, generated)
        for k in rouge:
            rouge[k] += scores[k].fmeasure / len(pairs)
        exact += (generated == reference) / len(pairs)
    return {"loss": nll / count, "target_tokens": count, "pairs": len(pairs), "rouge": rouge,
            "exact_match": exact, "eval_set": data.pairs.name}


def _pairs_one_by_one(config: RunConfig, pairs, model, tokenizer, device) -> tuple[float, int, list]:
    """(summed target loss, target tokens, [(reference, generated)]) scoring one pair at a time."""
    nll = count = 0
    texts = []
    for source, target in pairs:
        src = tokenizer(source, return_tensors="pt", truncation=True, max_length=config.src_len).input_ids.to(device)
        tgt = tokenizer(target, return_tensors="pt", truncation=True, max_length=config.tgt_len).input_ids.to(device)
        nll += float(model(input_ids=src, labels=tgt).loss) * tgt.shape[1]
        count += tgt.shape[1]
        gen = model.generate(src, max_new_tokens=config.tgt_len, do_sample=False)
        texts.append(tuple(tokenizer.decode(t, skip_special_tokens=True).strip() for t in (tgt[0], gen[0])))
    return nll, count, texts


def _pair_batches(config: RunConfig, pairs, model, tokenizer, device) -> tuple[float, int, list]:
    """_pairs_one_by_one's figures from batches of --batch_size right-padded pairs (padding
    masked in the encoder, left out of the loss; pad tokens leave the decoded texts)."""
    from .switch_experts import batched_switch_experts
    batched_switch_experts(model)   # Switch experts without a host sync per expert; the same math
    nll = count = 0
    texts = []
    batch = max(1, config.quant.batch_size)
    for i in range(0, len(pairs), batch):
        part = pairs[i:i + batch]
        src = tokenizer([s for s, _ in part], return_tensors="pt", padding=True, truncation=True,
                        max_length=config.src_len).to(device)
        tgt = tokenizer([t for _, t in part], return_tensors="pt", padding=True, truncation=True,
                        max_length=config.tgt_len).to(device)
        labels = tgt.input_ids.masked_fill(tgt.attention_mask == 0, -100)
        logits = model(input_ids=src.input_ids, attention_mask=src.attention_mask, labels=labels).logits
        nll += float(torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, reduction="sum"))
        count += int(tgt.attention_mask.sum())
        gen = model.generate(input_ids=src.input_ids, attention_mask=src.attention_mask,
                             max_new_tokens=config.tgt_len, do_sample=False)
        texts += [tuple(tokenizer.decode(t, skip_special_tokens=True).strip() for t in row)
                  for row in zip(tgt.input_ids, gen)]
    return nll, count, texts


def summary_lines(config: RunConfig, scores: dict, tag: str | None = None) -> list[str]:
    """The evaluation as printed (the last line of a causal run is ``ppl <set>: <value>``)."""
    suffix = f" ({tag})" if tag else ""
    if config.causal:
        return [f"ppl {name}{suffix}: {ppl:.4f}" for name, ppl in scores["ppl"].items()]
    name = scores["eval_set"] + suffix
    return [f"eval loss {name}: {scores['loss']:.4f} over {scores['target_tokens']} target tokens of "
            f"{scores['pairs']} test pairs",
            f"rouge {name}: " + " ".join(f"{k} {100 * v:.2f}" for k, v in scores["rouge"].items())
            + f"; exact match {100 * scores['exact_match']:.2f}"]
