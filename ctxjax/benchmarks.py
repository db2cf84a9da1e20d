"""Benchmarks run by `scripts/bench.py`; each returns a JSON-ready dict and can write it to a file.

torch and transformers are imported inside the functions that compare against them: they are
test/bench-only dependencies, never needed to train or sample.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import numpy as np

# bench_sample: a tiny Llama, big enough that the decode step is real work on a CPU.
SAMPLE_MODEL = dict(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
# Random weights at HF's std 0.02 give near-uniform logits whose argmax flips on float rounding;
# std 0.1 spreads the logits over several units so the two implementations can agree token for token.
SAMPLE_INIT_STD = 0.1


def _write_json(result: dict, out_json: str | None) -> None:
  if out_json:
    with open(out_json, "w") as fh:
      json.dump(result, fh, indent=2)


def _timing(times_s: list[float], tokens: int) -> dict:
  median = statistics.median(times_s)
  return {"times_s": [round(t, 5) for t in times_s], "median_s": round(median, 5),
          "best_s": round(min(times_s), 5), "tokens_per_s": round(tokens / median, 1)}


def bench_sample(out_json: str | None = None, *, batch: int = 8, prompt_len: int = 16,
                 new_tokens: int = 64, reps: int = 5, seed: int = 0,
                 hf_threads: tuple[int, ...] | None = None, hf_skip_s: float = 10.0) -> dict:
  """Greedy decoding tokens/s: `ctxjax.sampling.generate` vs transformers `generate()` (torch CPU).

  Both run the same random HF Llama (saved with `save_pretrained`, loaded by `ctxjax.hf.load_model`)
  on the same prompts (no padding, no EOS, `min_new_tokens` so HF cannot stop early). Each side is
  warmed up once (ours: the compile, reported as `compile_s` = first call minus the median call),
  then timed `reps` times, alternating ours / theirs so that load from other processes hits both
  alike. Tokens/s counts generated tokens (batch x new_tokens) over the median wall time of a call.

  torch runs at each thread count in `hf_threads` (default: 1 and torch's default). On a shared CPU
  torch's multi-threaded kernels can be ~50x slower than single-threaded (its threads wait on a
  descheduled peer), so the transformers baseline is the *fastest* setting (the ratio is the
  conservative one); a setting whose warm-up call exceeds `hf_skip_s` seconds is reported, not timed.
  """
  import jax
  import torch
  import transformers

  from ctxjax import hf
  from ctxjax.sampling import generate

  default_threads = torch.get_num_threads()
  hf_threads = tuple(dict.fromkeys(hf_threads or (1, default_threads)))
  rng = np.random.default_rng(seed)
  prompts = rng.integers(0, SAMPLE_MODEL["vocab_size"], (batch, prompt_len))
  with tempfile.TemporaryDirectory() as tmp:
    # eos_token_id None: no EOS anywhere, so neither side can end a row early.
    hf_cfg = transformers.LlamaConfig(**SAMPLE_MODEL, initializer_range=SAMPLE_INIT_STD,
                                      tie_word_embeddings=False, eos_token_id=None,
                                      bos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    hf_model = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf_model.save_pretrained(tmp)
    ours_model = hf.load_model(tmp)

  def run_ours():
    return generate(ours_model, prompts.tolist(), max_new_tokens=new_tokens).tokens_BxN

  ids = torch.from_numpy(prompts.astype(np.int64))

  @torch.no_grad()
  def run_hf(threads):
    torch.set_num_threads(threads)
    out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    return out[:, prompt_len:].numpy()

  def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0

  try:
    ours_tokens, first_call_s = timed(run_ours)
    hf_tokens, hf_warmup = {}, {}
    for th in hf_threads:
      hf_tokens[th], hf_warmup[th] = timed(run_hf, th)
    timed_threads = [th for th in hf_threads if hf_warmup[th] <= hf_skip_s]
    load_before = os.getloadavg()[0]
    ours_times, hf_times = [], {th: [] for th in timed_threads}
    for _ in range(reps):
      ours_times.append(timed(run_ours)[1])
      for th in timed_threads:
        hf_times[th].append(timed(run_hf, th)[1])
    load_after = os.getloadavg()[0]
  finally:
    torch.set_num_threads(default_threads)

  n_tok = batch * new_tokens
  ours = _timing(ours_times, n_tok)
  ours["compile_s"] = round(first_call_s - ours["median_s"], 3)
  per_threads = {}
  for th in hf_threads:
    per_threads[str(th)] = (_timing(hf_times[th], n_tok) if th in hf_times else
                            {"skipped": f"warm-up call took {hf_warmup[th]:.1f} s > {hf_skip_s} s"})
  if not timed_threads:
    raise RuntimeError(f"every transformers setting was skipped: {per_threads}")
  best = min(timed_threads, key=lambda th: per_threads[str(th)]["median_s"])
  theirs = dict(per_threads[str(best)], torch_threads=best)
  same = {str(th): bool(np.array_equal(ours_tokens, hf_tokens[th])) for th in hf_threads}
  result = {
      "benchmark": "sample",
      "setup": {"model": SAMPLE_MODEL, "init_std": SAMPLE_INIT_STD, "batch": batch,
                "prompt_len": prompt_len, "new_tokens": new_tokens, "reps": reps,
                "decoding": "greedy", "jax_backend": jax.default_backend(),
                "cpu_count": os.cpu_count(), "transformers": transformers.__version__,
                "torch": torch.__version__, "jax": jax.__version__,
                # Other processes on the machine skew both sides; the 1-minute load average
                # before and after the timed loop says how busy it was.
                "load_avg_1min": [round(load_before, 2), round(load_after, 2)]},
      "ctxjax": ours,
      "transformers": theirs,
      "transformers_by_threads": per_threads,
      "speedup": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2),
      "tokens_identical": all(same.values()),
      "tokens_identical_by_threads": same,
  }
  print(f"sample: batch {batch}, prompt {prompt_len}, {new_tokens} new tokens, greedy, "
        f"median of {reps}; load avg {load_before:.2f} -> {load_after:.2f}")
  print(f"  {'':22s}{'tokens/s':>10s}{'median s':>10s}{'best s':>10s}{'compile s':>11s}")
  print(f"  {'ctxjax':22s}{ours['tokens_per_s']:10.1f}{ours['median_s']:10.4f}"
        f"{ours['best_s']:10.4f}{ours['compile_s']:11.2f}")
  for th, row in per_threads.items():
    name = f"transformers ({th} thr)"
    if "skipped" in row:
      print(f"  {name:22s}  skipped: {row['skipped']}")
    else:
      print(f"  {name:22s}{row['tokens_per_s']:10.1f}{row['median_s']:10.4f}{row['best_s']:10.4f}"
            f"{'-':>11s}")
  print(f"  speedup vs the fastest transformers setting ({best} thr): {result['speedup']}x; "
        f"identical tokens: {result['tokens_identical']}")
  _write_json(result, out_json)
  return result
