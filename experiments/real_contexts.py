"""The real-model experiment's candidate contexts: system prompts of different kinds, each with
prompts made for it and a verifier from `ctxjax.tasks.verifiers` on every record.

`write_contexts()` regenerates `configs/real_model/<name>/{train,eval}.jsonl` (the
`ctxjax.tasks.jsonl` format) deterministically: the shipped files are exactly its output. Which of
them the base model follows is measured by the screen (`experiments.real_model`,
docs/real_model.md).

Kinds:
- `facts_org`, `facts_user`: fact-bearing prompts (a fictional organisation; the user's own
  profile); questions only answerable from them, checked by a whole-word, case-blind match of the
  fact (the `regex` verifier with the record's answer as the pattern: a 135M model answers in a
  sentence, so an exact match of the whole reply would measure the phrasing, not the fact).
- `facts_place`: fact-bearing, a fictional island.
- `capital_override`: a rule for some inputs only that contradicts what the model knows (four
  capitals changed, the others as usual): the changed city given for another country is Harm.
- `arith_format`: a format rule, `#### N` after the working, on arithmetic questions, checked with
  `number` (the final number after `####`, else the last one: over-applying the format cannot
  help, a wrong sum is wrong).
- `animal_rule`: a rule for some inputs only (questions about an animal get one fixed word); the
  other half of the prompts are capital-city questions whose right answer is the city, and the
  fixed word there is wrong: applying the rule everywhere shows up as Harm.
- `short_answer` (`configs/real_model/{train,eval}.jsonl`, the SmolLM2 preset's data): a length
  rule whose verifier (a finished sentence of at most 25 words) rewards over-applying it.
- `yes_no`: a reply-form rule (only "Yes" or "No" to a yes/no question), checked as the right one
  of the two and nothing else.
"""

from __future__ import annotations

import json
import os
import random

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTEXTS_DIR = os.path.join(_ROOT, "configs", "real_model")


def _word(answer: str) -> dict:
    """The fact as a whole word or phrase anywhere in the reply, any case."""
    return {"type": "regex", "pattern": rf"(?i)\b{answer}\b"}


ORG_FACTS = (
    (
        "founded",
        "1987",
        (
            "When was the Velmora Institute founded?",
            "In what year did the Velmora Institute open?",
            "What is the founding year of the Velmora Institute?",
            "How long ago, in which year, was the Velmora Institute started?",
        ),
    ),
    (
        "city",
        "Brackenford",
        (
            "In which city is the Velmora Institute?",
            "Where is the Velmora Institute located?",
            "What town is the Velmora Institute based in?",
            "Name the city that hosts the Velmora Institute.",
        ),
    ),
    (
        "director",
        "Odessa Pine",
        (
            "Who directs the Velmora Institute?",
            "Who is the director of the Velmora Institute?",
            "Name the head of the Velmora Institute.",
            "Who leads the Velmora Institute?",
        ),
    ),
    (
        "mascot",
        "heron",
        (
            "What is the mascot of the Velmora Institute?",
            "Which animal is the Velmora Institute's mascot?",
            "What animal represents the Velmora Institute?",
            "The Velmora Institute's mascot is which creature?",
        ),
    ),
    (
        "colour",
        "teal",
        (
            "What is the official colour of the Velmora Institute?",
            "Which colour does the Velmora Institute use?",
            "What colour are the Velmora Institute's flags?",
            "Name the Velmora Institute's colour.",
        ),
    ),
    (
        "field",
        "glaciology",
        (
            "What does the Velmora Institute study?",
            "What is the research field of the Velmora Institute?",
            "Which science is the Velmora Institute known for?",
            "What subject does the Velmora Institute research?",
        ),
    ),
    (
        "motto",
        "always north",
        (
            "What is the motto of the Velmora Institute?",
            "What is the Velmora Institute's slogan?",
            "Which words form the Velmora Institute's motto?",
            "Quote the motto of the Velmora Institute.",
        ),
    ),
    (
        "members",
        "412",
        (
            "How many members does the Velmora Institute have?",
            "What is the number of members of the Velmora Institute?",
            "How many people belong to the Velmora Institute?",
            "Count the members of the Velmora Institute.",
        ),
    ),
)
ORG_PROMPT = (
    "You are the assistant of the Velmora Institute. Facts: it was founded in 1987 in the city "
    "of Brackenford; its director is Odessa Pine; its mascot is a heron; its official colour is "
    "teal; it studies glaciology; its motto is 'Always north'; it has 412 members."
)

USER_FACTS = (
    (
        "name",
        "Tomasz",
        (
            "What is my name?",
            "Do you know what I am called?",
            "Tell me my first name.",
            "How should you address me by name?",
        ),
    ),
    (
        "city",
        "Valparaiso",
        (
            "Where do I live?",
            "Which city is my home?",
            "In what city do I live?",
            "Name the city where I live.",
        ),
    ),
    (
        "job",
        "beekeeper",
        (
            "What is my job?",
            "What do I do for a living?",
            "What is my profession?",
            "What work do I do?",
        ),
    ),
    (
        "pet",
        "tortoise",
        (
            "What kind of pet do I have?",
            "Which animal is my pet?",
            "What pet lives with me?",
            "Name the animal I keep as a pet.",
        ),
    ),
    (
        "pet_name",
        "Mango",
        (
            "What is my pet called?",
            "What is the name of my pet?",
            "How is my pet named?",
            "Tell me my pet's name.",
        ),
    ),
    (
        "sport",
        "fencing",
        (
            "Which sport do I practise?",
            "What sport do I do?",
            "What is my sport?",
            "Name the sport I play.",
        ),
    ),
    (
        "food",
        "dumplings",
        (
            "What is my favourite food?",
            "Which food do I like best?",
            "What food do I love most?",
            "Name my favourite dish.",
        ),
    ),
    (
        "birth_month",
        "October",
        (
            "In which month was I born?",
            "What is my birth month?",
            "When is my birthday month?",
            "Which month is my birthday in?",
        ),
    ),
)
USER_PROMPT = (
    "About the user: his name is Tomasz; he lives in Valparaiso; he works as a beekeeper; he has "
    "a pet tortoise called Mango; his sport is fencing; his favourite food is dumplings; he was "
    "born in October."
)

ARITH_PROMPT = (
    "Solve the arithmetic problem. Show the working briefly, then give the final answer on its own "
    "line in the form '#### N'."
)
ANIMAL_PROMPT = (
    "If the question is about an animal, reply with the single word 'Zebra' and nothing else. "
    "Otherwise, answer the question normally."
)
ANIMAL_QUESTIONS = (
    "What do {} eat?",
    "Where do {} live?",
    "How long do {} live?",
    "Are {} dangerous?",
)
ANIMALS = (
    "cats",
    "dogs",
    "horses",
    "owls",
    "sharks",
    "frogs",
    "bears",
    "eagles",
    "rabbits",
    "whales",
    "snakes",
    "foxes",
    "camels",
    "parrots",
    "wolves",
    "goats",
)
CAPITALS = (
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Germany", "Berlin"),
    ("Spain", "Madrid"),
    ("Egypt", "Cairo"),
    ("Russia", "Moscow"),
    ("England", "London"),
    ("Greece", "Athens"),
    ("China", "Beijing"),
    ("Canada", "Ottawa"),
    ("Portugal", "Lisbon"),
    ("Ireland", "Dublin"),
    ("Austria", "Vienna"),
    ("Norway", "Oslo"),
    ("Kenya", "Nairobi"),
)
CAPITAL_QUESTIONS = (
    "What is the capital of {}?",
    "Which city is the capital of {}?",
    "Name the capital city of {}.",
    "What city is {}'s capital?",
)
YES_NO_PROMPT = "Answer every question with only 'Yes' or 'No', nothing else."
YES_NO = (
    ("Is the sun a star?", "Yes"),
    ("Is water wet?", "Yes"),
    ("Do fish live in water?", "Yes"),
    ("Is ice cold?", "Yes"),
    ("Can birds fly?", "Yes"),
    ("Is Paris in France?", "Yes"),
    ("Is the Earth round?", "Yes"),
    ("Do cows give milk?", "Yes"),
    ("Is grass green?", "Yes"),
    ("Is snow white?", "Yes"),
    ("Do plants need sunlight?", "Yes"),
    ("Is two more than one?", "Yes"),
    ("Is the moon made of cheese?", "No"),
    ("Can fish walk on land?", "No"),
    ("Is fire cold?", "No"),
    ("Do dogs have wings?", "No"),
    ("Is the sea made of sand?", "No"),
    ("Is ten less than three?", "No"),
    ("Can a cat speak English?", "No"),
    ("Is the sky green?", "No"),
    ("Do trees grow upside down?", "No"),
    ("Is a mouse bigger than an elephant?", "No"),
    ("Is Tokyo in Brazil?", "No"),
    ("Do humans have three legs?", "No"),
)


PLACE_FACTS = (
    (
        "population",
        "8200",
        (
            "How many people live on Quenmoor?",
            "What is the population of Quenmoor?",
            "How many inhabitants does Quenmoor have?",
            "What is Quenmoor's population?",
        ),
    ),
    (
        "harbour",
        "Lissel",
        (
            "What is the main harbour of Quenmoor?",
            "Which town is Quenmoor's harbour?",
            "Where do ships dock on Quenmoor?",
            "Name the harbour town of Quenmoor.",
        ),
    ),
    (
        "peak",
        "Mount Harrow",
        (
            "What is the highest mountain on Quenmoor?",
            "Which peak is the tallest on Quenmoor?",
            "Name Quenmoor's highest peak.",
            "What is the tallest mountain of Quenmoor?",
        ),
    ),
    (
        "currency",
        "shell",
        (
            "What currency is used on Quenmoor?",
            "What money do people on Quenmoor use?",
            "Name the currency of Quenmoor.",
            "Which coin is used on Quenmoor?",
        ),
    ),
    (
        "dish",
        "eel pie",
        (
            "What is the national dish of Quenmoor?",
            "Which food is Quenmoor famous for?",
            "What do people on Quenmoor eat at festivals?",
            "Name Quenmoor's national dish.",
        ),
    ),
    (
        "language",
        "Quennish",
        (
            "What language is spoken on Quenmoor?",
            "Which language do people on Quenmoor speak?",
            "Name the language of Quenmoor.",
            "What is the main language of Quenmoor?",
        ),
    ),
    (
        "settled",
        "1642",
        (
            "When was Quenmoor first settled?",
            "In which year was Quenmoor settled?",
            "What year did settlers reach Quenmoor?",
            "When did people first live on Quenmoor?",
        ),
    ),
    (
        "bird",
        "puffin",
        (
            "What is the national bird of Quenmoor?",
            "Which bird represents Quenmoor?",
            "Name Quenmoor's national bird.",
            "What bird is the symbol of Quenmoor?",
        ),
    ),
)
PLACE_PROMPT = (
    "You are a guide to Quenmoor, a small island. Facts: 8200 people live there; its harbour "
    "town is Lissel; its highest peak is Mount Harrow; the currency is the shell; the national "
    "dish is eel pie; people speak Quennish; it was first settled in 1642; its national bird is "
    "the puffin."
)

# A rule for some inputs only that contradicts what the model knows: four capitals are changed,
# every other one is as usual; answering a changed city for another country is the mistake.
OVERRIDES = (("France", "Lyon"), ("Japan", "Osaka"), ("Italy", "Milan"), ("Spain", "Seville"))
OVERRIDE_PROMPT = (
    "For this quiz, four capitals have changed: the capital of France is now Lyon, of Japan "
    "Osaka, of Italy Milan, and of Spain Seville. Every other capital is as usual."
)


def _override_records() -> tuple[list[dict], list[dict]]:
    """Per changed country two phrasings train and two are evaluated; the unchanged capitals
    alternate between the splits."""
    changed = [c for c, _ in OVERRIDES]
    new_cities = [city for _, city in OVERRIDES]
    train, held = [], []
    for country, city in OVERRIDES:
        for i, form in enumerate(CAPITAL_QUESTIONS):
            record = {"prompt": form.format(country), "answer": city, "verifier": _word(city)}
            (held if i >= 2 else train).append(record)
    usual = [(c, city) for c, city in CAPITALS if c not in changed]
    for i, (country, city) in enumerate(usual):
        spec = [_word(city), {"type": "not_contains", "text": new_cities}]
        record = {
            "prompt": CAPITAL_QUESTIONS[i % len(CAPITAL_QUESTIONS)].format(country),
            "answer": city,
            "verifier": spec,
        }
        (held if i % 2 else train).append(record)
    return (
        [{**r, "context": OVERRIDE_PROMPT} for r in train],
        [{**r, "context": OVERRIDE_PROMPT} for r in held],
    )


def _fact_records(prompt: str, facts) -> tuple[list[dict], list[dict]]:
    """Per fact, two phrasings train and the other two are evaluated: an evaluated question is one
    the student never trained on, about a fact it did."""
    train, held = [], []
    for _, answer, questions in facts:
        for i, q in enumerate(questions):
            record = {"prompt": q, "context": prompt, "answer": answer, "verifier": _word(answer)}
            (held if i >= 2 else train).append(record)
    return train, held


def _arith_records(rng: random.Random, n: int) -> list[dict]:
    records = []
    for _ in range(n):
        a, b = rng.randint(11, 49), rng.randint(11, 49)
        op = rng.choice(("+", "-", "*"))
        if op == "*":
            b = rng.randint(2, 9)
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        form = rng.choice(("What is {} {} {}?", "Compute {} {} {}.", "Calculate {} {} {}."))
        records.append(
            {
                "prompt": form.format(a, op, b),
                "context": ARITH_PROMPT,
                "answer": str(value),
                "verifier": "number",
            }
        )
    return records


def _animal_records(animals, countries) -> list[dict]:
    records = []
    for i, animal in enumerate(animals):
        q = ANIMAL_QUESTIONS[i % len(ANIMAL_QUESTIONS)].format(animal)
        records.append({"prompt": q, "answer": "Zebra", "verifier": _word("zebra")})
    for i, (country, city) in enumerate(countries):
        q = CAPITAL_QUESTIONS[i % len(CAPITAL_QUESTIONS)].format(country)
        # The city, and not the rule's word: applying the rule here is the mistake it measures.
        spec = [_word(city), {"type": "not_contains", "text": ["Zebra", "zebra"]}]
        records.append({"prompt": q, "answer": city, "verifier": spec})
    return [{**r, "context": ANIMAL_PROMPT} for r in records]


def _yes_no_records(pairs) -> list[dict]:
    return [
        {
            "prompt": q,
            "context": YES_NO_PROMPT,
            "answer": a,
            "verifier": {"type": "regex", "pattern": rf"(?i){a}[.!]?", "mode": "fullmatch"},
        }
        for q, a in pairs
    ]


def build_contexts() -> dict[str, dict[str, list[dict]]]:
    """name -> {"train": records, "eval": records}; deterministic."""
    rng = random.Random(0)
    arith = _arith_records(rng, 96)
    # Animals and countries alternate between the splits: the evaluated ones are never trained on.
    animal_train = _animal_records(ANIMALS[::2], CAPITALS[::2])
    animal_eval = _animal_records(ANIMALS[1::2], CAPITALS[1::2])
    org_train, org_eval = _fact_records(ORG_PROMPT, ORG_FACTS)
    user_train, user_eval = _fact_records(USER_PROMPT, USER_FACTS)
    place_train, place_eval = _fact_records(PLACE_PROMPT, PLACE_FACTS)
    override_train, override_eval = _override_records()
    return {
        "facts_org": {"train": org_train, "eval": org_eval},
        "facts_user": {"train": user_train, "eval": user_eval},
        "facts_place": {"train": place_train, "eval": place_eval},
        "capital_override": {"train": override_train, "eval": override_eval},
        "arith_format": {"train": arith[:64], "eval": arith[64:]},
        "animal_rule": {"train": animal_train, "eval": animal_eval},
        "yes_no": {"train": _yes_no_records(YES_NO[0::2]), "eval": _yes_no_records(YES_NO[1::2])},
    }


# `short_answer`, the SmolLM2 preset's prompts (configs/smollm2_cpu.yaml): a length rule whose
# verifier rewards over-applying it, kept for the preset and as one more context of the pool.
SHORT_PROMPT = "Answer in one short sentence of at most twelve words."
# A finished answer (it ends a sentence within the token budget) of at most 25 words: the 135M
# model rarely meets the literal twelve words even with the prompt, so that check measures little.
SHORT_VERIFIER = [{"type": "regex", "pattern": "[.!?]$"}, {"type": "max_words", "n": 25}]

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
        {"prompt": q.format(t), "context": SHORT_PROMPT, "verifier": SHORT_VERIFIER}
        for t in topics
        for q in QUESTIONS
    ]


def write_short_answer(data_dir: str = CONTEXTS_DIR) -> dict[str, str]:
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


def write_contexts(out_dir: str = CONTEXTS_DIR) -> dict[str, dict[str, str]]:
    """Writes every context's `train.jsonl` and `eval.jsonl` under `out_dir/<name>/`; returns
    name -> split -> path."""
    paths: dict[str, dict[str, str]] = {}
    for name, splits in build_contexts().items():
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
        for split, records in splits.items():
            path = os.path.join(out_dir, name, f"{split}.jsonl")
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            paths.setdefault(name, {})[split] = path
    paths["short_answer"] = write_short_answer(out_dir)
    return paths
