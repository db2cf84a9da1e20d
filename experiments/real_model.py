"""The real-model example: SmolLM2-135M-Instruct internalizes a format system prompt, plain OPD vs
OPD + NCA over seeds (`scripts/real_model.py`, docs/real_model.md).

Every run is an ordinary `ctxjax.train.run` of the preset `configs/smollm2_cpu.yaml` planned as a
harness `RunSpec` and run by `experiments.runner.run_all`: a run whose summary exists is reused, so
the command resumes. Intervals are 95% percentile bootstraps over seeds x items (seeds drawn with
replacement, then eval items with replacement within each; an item's draws stay together), paired
across variants for the differences; the layer cosine has no per-item values and shows the mean and
range over seeds. `write_prompts` regenerates the shipped prompt set (`configs/real_model/*.jsonl`).
"""

from __future__ import annotations

import json
import os

import numpy as np

from ctxjax.config import BaseModelConfig, read_yaml_mapping
from ctxjax.logs import configure_logging
from ctxjax.metrics import markdown_table, removability_metrics
from experiments import runner
from experiments.grid import RunSpec, dotted

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(_ROOT, "configs", "real_model")
PRESET = os.path.join(_ROOT, "configs", "smollm2_cpu.yaml")
DOC = os.path.join(_ROOT, "docs", "real_model.md")

# The distilled context and its automatic check (`ctxjax.tasks.verifiers`); why these: the doc.
SYSTEM_PROMPT = "Answer in one short sentence of at most twelve words."
# A finished answer (it ends a sentence within the token budget) of at most 25 words: the 135M
# model rarely meets the literal twelve words even with the prompt, so that check measures little.
VERIFIER = [{"type": "regex", "pattern": "[.!?]$"}, {"type": "max_words", "n": 25}]

# Question forms, each with a {} for the topic.
QUESTIONS = (
    "Tell me about {}.",
    "Give a one-line definition of {}.",  # often short without the context: Harm has a denominator
    "Why does {} matter?",
)
TOPICS = tuple(
    t.strip()
    for t in """
photosynthesis, gravity, the water cycle, the moon, volcanoes, rainbows, electricity, magnets,
the internet, democracy, inflation, vaccines, sleep, exercise, coffee, chess, the piano, the
Roman Empire, the printing press, the Eiffel Tower, the Amazon rainforest, the Sahara desert,
the Pacific Ocean, honeybees, dolphins, elephants, penguins, dinosaurs, DNA, the human heart,
the brain, bread, cheese, tea, recycling, solar power, wind turbines, batteries, airplanes,
bicycles, trains, the stock market, a budget, a library, mathematics, poetry, photography, jazz,
football, the Olympics, a marathon, yoga, meditation, gardening, composting, clouds, snow,
earthquakes, tides, the sun, Mars, black holes, the Milky Way, telescopes, microscopes,
antibiotics, the immune system, nutrition, protein, vitamin C, water, oxygen, carbon dioxide,
climate change, forests, rivers, mountains, glaciers, coral reefs, salt, sugar, chocolate, rice,
the wheel, fire, writing, the alphabet, maps, compasses, clocks, calendars, money, banks, taxes,
voting, the United Nations, museums, theater, painting, sculpture, architecture, bridges,
skyscrapers, roads, email, smartphones, computers, programming, algorithms, robots, artificial
intelligence, cooking, baking, friendship, kindness, reading, learning a language, music, dance,
history, geography, chemistry, physics, biology, astronomy, ecology, economics, psychology,
philosophy, owls, wolves, lighthouses
""".replace("\n", " ").split(",")
)
EVAL_TOPICS = 22  # every 6th topic (22 of 132) is held out: 66 eval prompts, 330 train prompts


def _records(topics: list[str]) -> list[dict]:
    return [
        {"prompt": q.format(t), "context": SYSTEM_PROMPT, "verifier": VERIFIER}
        for t in topics
        for q in QUESTIONS
    ]


def write_prompts(data_dir: str = DATA_DIR) -> dict[str, str]:
    """Writes `train.jsonl` and `eval.jsonl` (the `ctxjax.tasks.jsonl` format) into `data_dir`;
    returns {split: path}. Deterministic: the shipped files are exactly its output."""
    held = [t for i, t in enumerate(TOPICS) if i % 6 == 5]
    assert len(held) == EVAL_TOPICS, len(held)
    splits = {"eval": held, "train": [t for t in TOPICS if t not in held]}
    os.makedirs(data_dir, exist_ok=True)
    paths = {}
    for split, topics in splits.items():
        paths[split] = os.path.join(data_dir, f"{split}.jsonl")
        with open(paths[split], "w") as f:
            for record in _records(topics):
                f.write(json.dumps(record) + "\n")
    return paths


# --------------------------------------------------------------------------------------------------
# The plan and the runs
# --------------------------------------------------------------------------------------------------

VARIANTS = {"opd": 0.0, "nca": 0.5}  # variant -> loss.beta
SEEDS = (0, 1)
# Tiny budgets that prove the pipeline end to end in minutes (`--smoke`); never for results.
SMOKE_OVERRIDES = (
    "train.steps=2",
    "train.checkpoint_every=0",
    "optim.warmup_steps=1",
    "eval.examples=4",
    "eval.samples=2",
)
BEGIN, END = "<!-- real_model:begin -->", "<!-- real_model:end -->"
RESULTS_FILE = "results.json"
BOOTSTRAP = 2000


def plan(
    model: str, seeds: tuple[int, ...] = SEEDS, overrides: tuple[str, ...] = ()
) -> list[RunSpec]:
    """One run per (seed, variant): the preset as dotted overrides (the shipped prompt files as
    absolute paths, so any working directory works), the model, the variant's beta, the seed, then
    `overrides` (which win)."""
    preset = dotted(read_yaml_mapping(PRESET))
    files = [f"data.{k}_file={os.path.join(DATA_DIR, k + '.jsonl')}" for k in ("train", "eval")]
    specs = []
    for seed in seeds:
        for variant, beta in VARIANTS.items():
            layers = [*preset, *files, f"student={os.path.abspath(model)}", f"loss.beta={beta}"]
            layers += [f"train.seed={seed}", *overrides]
            specs.append(
                RunSpec(
                    task="real",
                    context="system",
                    size="smollm2",
                    variant=variant,
                    base_seed=0,  # one given checkpoint: no base model is built
                    seed=seed,
                    task_name="jsonl",
                    overrides=tuple(layers),
                )
            )
    return specs


def greedy_evals(specs: list[RunSpec], out_dir: str) -> dict[str, list[dict]]:
    """variant -> greedy evaluations after distillation, one per seed in seed order; "base" -> the
    starting model's, once per seed (the same evaluation: its interval is over items)."""
    out: dict[str, list[dict]] = {}
    base = None
    for spec in sorted(specs, key=lambda s: s.seed):
        run_dir = os.path.join(out_dir, spec.run_dir_name)
        with open(os.path.join(run_dir, runner.SUMMARY_FILE)) as f:
            cfg = json.load(f)["config"]
        if base is None:
            base = runner.greedy_eval(
                cfg["student"], os.path.join(out_dir, runner.GREEDY_FILE), cfg
            )
        final = os.path.join(run_dir, "final")
        result = runner.greedy_eval(final, os.path.join(run_dir, runner.GREEDY_FILE), cfg)
        out.setdefault(spec.variant, []).append(result)
    out["base"] = [base] * len(out[next(iter(out))])
    return out


# --------------------------------------------------------------------------------------------------
# Aggregation: bootstrap over seeds x items
# --------------------------------------------------------------------------------------------------

_METRICS = ("acc_x", "acc_xc", "harm", "both_correct", "delta_len")


def _arrays(result: dict) -> tuple[np.ndarray, ...]:
    """A run's per-answer arrays as [N, K]: correct_x, correct_xc, lengths_x, lengths_xc."""
    shape = (result["n"], result["draws"])
    keys = ("correct_x", "correct_xc", "lengths_x", "lengths_xc")
    return tuple(np.asarray(result[k]).reshape(shape) for k in keys)


def _pooled(runs: list[tuple[np.ndarray, ...]], picks: list[tuple[int, np.ndarray]]) -> dict:
    """The metrics over the answers of the picked (run, items) pairs, pooled."""
    parts = [[a[items] for a in runs[r]] for r, items in picks]
    return removability_metrics(*(np.concatenate(col) for col in zip(*parts, strict=True)))


def _interval(values: list) -> list[float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def bootstrap(by_variant: dict[str, list[dict]], n_boot: int = BOOTSTRAP, seed: int = 0) -> dict:
    """variant -> metric -> {mean (pooled point estimate), ci95}, plus "nca-opd" paired differences.

    `by_variant` holds one evaluation per seed, in the same seed order for every variant and over
    the same eval items: each bootstrap draw resamples seeds, then items within each drawn seed, and
    applies the same draw to every variant, so the differences are paired.
    """
    arrays = {v: [_arrays(r) for r in rs] for v, rs in by_variant.items()}
    n_seeds = {len(rs) for rs in arrays.values()}
    n_items = {a[0].shape[0] for rs in arrays.values() for a in rs}
    if len(n_seeds) != 1 or len(n_items) != 1:
        raise ValueError(f"variants must share seeds and items: {n_seeds} seeds, {n_items} items")
    (s,), (n,) = n_seeds, n_items
    everything = [(r, np.arange(n)) for r in range(s)]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[dict]] = {v: [] for v in arrays}
    for _ in range(n_boot):
        picks = [(int(r), rng.integers(0, n, n)) for r in rng.integers(0, s, s)]
        for v, runs in arrays.items():
            draws[v].append(_pooled(runs, picks))
    out: dict = {}
    for v, runs in arrays.items():
        point = _pooled(runs, everything)
        out[v] = {
            m: dict(mean=point[m], ci95=_interval([d[m] for d in draws[v]])) for m in _METRICS
        }
    if {"opd", "nca"} <= set(arrays):
        out["nca-opd"] = {}
        for m in _METRICS:
            diffs = [
                None if a[m] is None or b[m] is None else a[m] - b[m]
                for a, b in zip(draws["nca"], draws["opd"], strict=True)
            ]
            point = (out["nca"][m]["mean"], out["opd"][m]["mean"])
            mean = None if None in point else point[0] - point[1]
            out["nca-opd"][m] = dict(mean=mean, ci95=_interval(diffs))
    return out


def _cosine_summary(results: list[dict]) -> dict:
    """Mean cosine over the transformer blocks (layer 0, the embeddings, is 1 by construction) and
    the last block's: mean and [min, max] over seeds."""
    blocks = [np.asarray(r["layer_cosine"][1:]) for r in results if len(r["layer_cosine"]) > 1]
    out = {}
    for name, vals in (("mean", [b.mean() for b in blocks]), ("last", [b[-1] for b in blocks])):
        vals = [float(x) for x in vals]
        out[name] = dict(mean=float(np.mean(vals)), range=[min(vals), max(vals)]) if vals else None
    return out


def aggregate(records: list[dict], greedy: dict[str, list[dict]] | None = None) -> dict:
    """The runner's records -> the results JSON: bootstrapped metrics of the base model (the
    plain-OPD runs' `before`, one per seed) and of each variant after distillation, the cosine
    summaries, each run's wall time; and the greedy evaluations' metrics when given."""
    by_variant: dict[str, list[dict]] = {"base": []}
    for rec in sorted(records, key=lambda r: r["spec"]["seed"]):
        by_variant.setdefault(rec["spec"]["variant"], []).append(rec["after"])
        if rec["spec"]["variant"] == "opd":
            by_variant["base"].append(rec["before"])
    return dict(
        metrics=bootstrap(by_variant),
        greedy=bootstrap(greedy) if greedy else None,
        cosine={v: _cosine_summary(rs) for v, rs in by_variant.items()},
        seeds=sorted({r["spec"]["seed"] for r in records}),
        items=by_variant["base"][0]["n"],
        draws=by_variant["base"][0]["draws"],
        runs={r["name"]: r["seconds"] for r in records},
    )


# --------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------

_LABELS = {"acc_x": "Acc_x", "acc_xc": "Acc_xc", "harm": "Harm", "both_correct": "BothCorrect"}
_LABELS["delta_len"] = "Δlen"


def _cell(stat: dict | None) -> str:
    if not stat or stat["mean"] is None:
        return "-"
    ci = stat["ci95"]
    return f"{stat['mean']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{stat['mean']:.3f}"


def _cos_cell(stat: dict | None) -> str:
    if not stat:
        return "-"
    return f"{stat['mean']:.3f} ({stat['range'][0]:.3f}-{stat['range'][1]:.3f})"


_VARIANT_LABELS = (("base", "base model"), ("opd", "OPD"), ("nca", "OPD + NCA (β 0.5)"))


def _table(metrics: dict, cosine: dict | None) -> str:
    rows = []
    for v, label in _VARIANT_LABELS:
        row = {"": label, **{_LABELS[m]: _cell(metrics[v][m]) for m in _METRICS}}
        if cosine:
            row["cosine (blocks)"] = _cos_cell(cosine[v]["mean"])
            row["cosine (last)"] = _cos_cell(cosine[v]["last"])
        rows.append(row)
    diff = {
        "": "NCA - OPD (paired)",
        **{_LABELS[m]: _cell(metrics["nca-opd"][m]) for m in _METRICS},
    }
    columns = ["", *(_LABELS[m] for m in _METRICS)]
    columns += ["cosine (blocks)", "cosine (last)"] if cosine else []
    # Cells are preformatted strings; a row without a column (the difference's cosine) shows "-".
    return markdown_table([*rows, diff], columns, lambda v: "-" if v is None else v)


def results_markdown(results: dict, command: str) -> str:
    """The generated section of docs/real_model.md."""
    seconds = [s for s in results["runs"].values() if s] + [results.get("greedy_seconds") or 0]
    minutes = sum(seconds) / 60
    return "\n".join(
        [
            f"`{command}`: seeds {results['seeds']}, {results['items']} eval items x "
            f"{results['draws']} sampled draws per item and view (independent streams per view); "
            f"{len(results['runs'])} runs; {minutes:.1f} min of training and evaluation in all.",
            "",
            "Sampled (temperature 1):",
            "",
            _table(results["metrics"], results["cosine"]),
            "",
            *(["Greedy:", "", _table(results["greedy"], None), ""] if results["greedy"] else []),
            "Metrics: pooled point estimate [95% percentile bootstrap over seeds x items, "
            f"{BOOTSTRAP} draws]; the base model's interval is over items (its evaluation is the "
            "same for every seed). Cosine: mean over seeds (min-max over seeds), no per-item "
            "values. NCA helps only where its paired difference's interval excludes 0.",
        ]
    )


def write_section(path: str, body: str) -> None:
    """Replaces the text between the generated markers of `path` (which must hold them)."""
    with open(path) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path}: no generated markers {BEGIN} ... {END}")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(path + ".tmp", "w") as f:
        f.write(f"{head}{BEGIN}\n{body}\n{END}{tail}")
    os.replace(path + ".tmp", path)  # nothing saved is lost to a crash mid-write


def run_real_model(
    model: str,
    out_dir: str = "runs/real_model",
    doc: str = DOC,
    *,
    seeds: tuple[int, ...] = SEEDS,
    overrides: tuple[str, ...] = (),
    command: str = "python scripts/real_model.py",
    greedy: bool = True,
) -> dict:
    """Runs (or reuses) every planned run under `out_dir`, evaluates the base and final models
    greedily too (`greedy`), writes `results.json` there and the results section of `doc`;
    returns the results."""
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ValueError(f"--model {model}: not an HF model folder (no config.json)")
    configure_logging("ctxjax", "experiments")
    specs = plan(model, seeds, overrides)
    records = runner.run_all(specs, out_dir, base_cache=BaseModelConfig.cache_dir)
    evals = greedy_evals(specs, out_dir) if greedy else None
    results = aggregate(records, evals)
    if evals:  # the base model's evaluation counted once
        unique = {id(r): r for rs in evals.values() for r in rs}.values()
        results["greedy_seconds"] = sum(r.get("seconds") or 0 for r in unique)
    results["overrides"] = list(overrides)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, RESULTS_FILE), "w") as f:
        json.dump(results, f, indent=2)
    write_section(doc, results_markdown(results, command))
    return results
