"""Stage 1: the project's own prompt set, built from templates (nothing downloaded).

`build_prompts()` is deterministic; `prefix-scorers prompts` writes it as
`prefix_scorers/data/prompts_{train,eval}.jsonl` (committed), one JSON object a line:
`{"id": "p0042", "category": "review", "prompt": "..."}`. The eval split is held out: the
trainer never sees it, the quality benchmark draws from it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"

_PRODUCTS = ["wireless headphones", "coffee maker", "running shoes", "budget smartphone", "electric kettle",
             "standing desk", "mechanical keyboard", "air fryer", "e-reader", "robot vacuum",
             "hiking backpack", "office chair", "smartwatch", "blender", "rice cooker", "desk lamp",
             "portable speaker", "winter jacket", "board game", "electric toothbrush"]
_PLACES = ["Italian restaurant", "hotel by the airport", "local gym", "neighbourhood bakery",
           "sushi bar", "camping site", "public library", "dentist's office", "car rental company",
           "coffee shop downtown", "museum of modern art", "yoga studio", "pizza place", "train station",
           "farmers market"]
_MEDIA = ["science fiction novel", "romantic comedy", "documentary about the ocean", "video game sequel",
          "jazz album", "fantasy TV series", "cooking show", "true crime podcast", "animated film",
          "historical drama", "mystery novel", "superhero movie"]
_ADVICE = ["how to save money on groceries", "how to sleep better", "how to prepare for a job interview",
           "how to start running", "how to deal with a noisy neighbour", "how to learn a new language",
           "how to stay focused while working from home", "how to make friends in a new city",
           "how to ask for a raise", "how to keep houseplants alive", "how to stop procrastinating",
           "how to plan a budget trip", "how to cook for a family on weeknights",
           "how to handle stress before exams", "how to write a good cover letter",
           "how to get back into exercise after a break", "how to talk to a teenager about screen time",
           "how to organise a small apartment", "how to choose a first car", "how to be a better listener"]
_TOPICS = ["photosynthesis", "how vaccines work", "inflation", "black holes", "the water cycle",
           "machine learning", "why the sky is blue", "compound interest", "how airplanes fly",
           "the French Revolution", "climate change", "how the internet works", "DNA",
           "supply and demand", "earthquakes", "the immune system", "recycling", "electric cars",
           "the stock market", "sleep cycles", "volcanoes", "gravity", "antibiotics", "democracy"]
_STORY = ["a lost dog finding its way home", "a robot learning to paint", "two strangers stuck in an elevator",
          "a child's first day at school", "a lighthouse keeper during a storm", "a dragon who is afraid of fire",
          "a chef who lost their sense of taste", "a time traveller visiting the year 1900",
          "a village where it never stops raining", "an old man and his garden", "a cat who runs a bookstore",
          "an astronaut alone on Mars", "a musician playing their last concert", "a rivalry between two bakers",
          "a detective solving a small-town mystery", "a family road trip gone wrong"]
_COMPLAINTS = ["my flight was cancelled without notice", "my package arrived broken",
               "my landlord won't fix the heating", "the restaurant got my order wrong twice",
               "my internet keeps dropping every evening", "I was overcharged on my phone bill",
               "my coworker takes credit for my work", "the new software update made my laptop slow",
               "the bus is late every single morning", "my gym cancelled my membership by mistake",
               "the hotel room was dirty", "customer support hung up on me",
               "my neighbour's dog barks all night", "the repair shop kept my bike for three weeks"]
_OPINION = ["remote work", "social media", "homework for young children", "electric scooters in cities",
            "four-day work weeks", "reality TV", "self-driving cars", "online dating", "fast fashion",
            "public transport", "video games", "tipping culture", "open-plan offices", "cooking at home"]
_PEOPLE = ["my sister", "a coworker", "my best friend", "my grandmother", "a new neighbour", "my manager",
           "my teacher", "my partner"]
_EVENTS = ["birthday", "graduation", "promotion", "wedding", "retirement", "new baby", "recovery from surgery"]

_TEMPLATES: dict[str, tuple[list[str], list[str]]] = {
    "review": (_PRODUCTS + _PLACES + _MEDIA, [
        "Write a short review of the {x} I tried last week.",
        "What did you think of the {x}? Give me an honest review.",
        "Write a customer review for a {x}.",
        "Describe your experience with the {x} in a few sentences.",
        "Is the {x} worth it? Share your opinion.",
    ]),
    "advice": (_ADVICE, [
        "Can you give me some advice on {x}?",
        "I need tips on {x}.",
        "What is the best way to figure out {x}?",
        "My friend asked me {x}. What should I tell them?",
    ]),
    "explain": (_TOPICS, [
        "Explain {x} in simple terms.",
        "Can you explain {x} to a ten-year-old?",
        "What should everyone know about {x}?",
        "Give me a short explanation of {x}.",
        "Why does {x} matter?",
    ]),
    "story": (_STORY, [
        "Write a short story about {x}.",
        "Tell me a story about {x}.",
        "Begin a story about {x}.",
        "Write the opening paragraph of a story about {x}.",
    ]),
    "complaint": (_COMPLAINTS, [
        "I'm so annoyed: {x}. What do you think?",
        "Help me write a complaint: {x}.",
        "Ugh, {x}. How should I react?",
        "I want to vent. {x}.",
    ]),
    "opinion": (_OPINION, [
        "What do you think about {x}?",
        "Is {x} good or bad for society?",
        "Give me the pros and cons of {x}.",
        "Argue for or against {x}.",
    ]),
    "message": ([f"{p}|{e}" for p in _PEOPLE for e in _EVENTS], [
        "Write a message to {p} about their {e}.",
        "Help me write a note to {p} for their {e}.",
    ]),
    "short": (_TOPICS + _OPINION, [
        "In one sentence, tell me about {x}.",
        "Answer briefly: what do you think of {x}?",
        "Describe {x} in five words.",
    ]),
}


def build_prompts(seed: int = 0, per_category: int = 90) -> list[dict]:
    """Every (template, subject) pair per category, shuffled and capped at `per_category`."""
    rng = random.Random(seed)
    prompts: list[dict] = []
    for category, (subjects, templates) in _TEMPLATES.items():
        pool = []
        for template in templates:
            for subject in subjects:
                if "|" in subject:
                    p, e = subject.split("|")
                    text = template.format(p=p, e=e)
                else:
                    text = template.format(x=subject)
                pool.append(text[0].upper() + text[1:])
        rng.shuffle(pool)
        prompts.extend({"category": category, "prompt": t} for t in pool[:per_category])
    rng.shuffle(prompts)
    return [{"id": f"p{i:04d}", **p} for i, p in enumerate(prompts)]


def split_prompts(prompts: list[dict], eval_fraction: float = 0.15, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Stratified by category, so the held-out set has every kind of prompt."""
    rng = random.Random(seed + 1)
    train, evals = [], []
    for category in sorted({p["category"] for p in prompts}):
        group = [p for p in prompts if p["category"] == category]
        rng.shuffle(group)
        n_eval = max(1, round(len(group) * eval_fraction))
        evals += group[:n_eval]
        train += group[n_eval:]
    key = lambda p: p["id"]
    return sorted(train, key=key), sorted(evals, key=key)


def write_jsonl(rows, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return path


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_prompt_set(out_dir: Path = DATA_DIR, seed: int = 0) -> tuple[Path, Path]:
    train, evals = split_prompts(build_prompts(seed), seed=seed)
    return (write_jsonl(train, Path(out_dir) / "prompts_train.jsonl"),
            write_jsonl(evals, Path(out_dir) / "prompts_eval.jsonl"))


def load_prompts(split: str, data_dir: Path = DATA_DIR) -> list[dict]:
    """The committed prompts of one split ('train' or 'eval')."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return read_jsonl(Path(data_dir) / f"prompts_{split}.jsonl")
