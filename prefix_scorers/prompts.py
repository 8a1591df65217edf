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


# -- the extra training prompts: more subjects and templates, same categories ---------------------
_MORE_PRODUCTS = ["noise-cancelling earbuds", "espresso machine", "yoga mat", "gaming laptop", "slow cooker",
                  "electric bike", "water filter", "baby stroller", "camping tent", "dishwasher",
                  "fitness tracker", "tablet for kids", "vacuum flask", "sewing machine", "drone",
                  "instant camera", "memory foam pillow", "garden hose", "space heater", "car seat"]
_MORE_PLACES = ["Thai restaurant", "ski resort", "vet clinic", "bookshop on the corner", "ramen shop",
                "beach hotel", "climbing gym", "hair salon", "airport lounge", "escape room",
                "art gallery", "bike repair shop", "food truck", "zoo", "cinema"]
_MORE_MEDIA = ["horror movie", "poetry collection", "cooking blog", "indie video game", "classical concert",
               "stand-up comedy special", "nature documentary", "graphic novel", "musical", "sitcom"]
_MORE_ADVICE = ["how to train a puppy", "how to negotiate a used car price", "how to make a good first impression",
                "how to start a vegetable garden", "how to meditate", "how to read more books",
                "how to apologise to a friend", "how to save for retirement", "how to give a presentation",
                "how to travel with small children", "how to fix a leaking tap", "how to bake bread",
                "how to get better at chess", "how to reduce plastic waste", "how to move to another country",
                "how to study for a maths exam", "how to choose a laptop", "how to sleep on a long flight",
                "how to keep a journal", "how to say no to extra work"]
_MORE_TOPICS = ["rainbows", "how batteries work", "the moon's phases", "plate tectonics", "evolution",
                "how bees make honey", "the Roman Empire", "solar panels", "interest rates", "nuclear power",
                "how the heart works", "ocean tides", "cryptocurrency", "the printing press", "viruses",
                "how memory works", "coral reefs", "the speed of light", "taxes", "bread rising",
                "the Great Wall of China", "3D printing", "how GPS works", "dinosaurs"]
_MORE_STORY = ["a girl who can talk to birds", "a forgotten toy in an attic", "a baker who opens a shop at midnight",
               "a postman on his last day of work", "a ghost who is bad at scaring people",
               "a submarine crew finding a new creature", "a king who gives away his crown",
               "two old friends meeting after twenty years", "a runaway hot-air balloon",
               "a robot and a boy fixing a bicycle", "a snowman who wants to see summer",
               "a pirate who gets seasick", "a small town's first traffic light", "a mouse living in a piano"]
_MORE_COMPLAINTS = ["my order has been 'processing' for two weeks", "the airline lost my suitcase",
                    "my new phone's battery dies by noon", "the plumber never showed up",
                    "my bank froze my card while I was abroad", "the parking ticket was unfair",
                    "my roommate never does the dishes", "the concert was cancelled an hour before",
                    "the delivery driver left my parcel in the rain", "my train ticket was charged twice",
                    "the school changed the timetable without telling parents", "my washing machine broke after a month"]
_MORE_OPINION = ["school uniforms", "working from cafes", "banning cars from city centres", "learning Latin",
                 "smart speakers at home", "pineapple on pizza", "year-round daylight saving time",
                 "universal basic income", "space tourism", "homeschooling", "e-books versus paper books",
                 "zoos", "unlimited vacation policies", "tiny houses"]
_MORE_PEOPLE = ["my brother", "my dad", "an old classmate", "my mentor", "my landlord", "a team I lead"]
_MORE_EVENTS = ["first marathon", "new job", "moving house", "exam results", "engagement", "anniversary"]

_MORE_TEMPLATES: dict[str, list[str]] = {
    "review": ["Tell me what you liked and disliked about the {x}.", "Rate the {x} out of ten and explain why.",
               "Would you recommend the {x} to a friend?", "Write a one-paragraph review of a {x}."],
    "advice": ["What would you suggest about {x}?", "Quick question: {x}?", "Give me three tips on {x}.",
               "I'm a beginner. Explain {x}."],
    "explain": ["How would you describe {x} to a friend?", "What is the most surprising fact about {x}?",
                "Teach me about {x}.", "Summarise {x} in a short paragraph."],
    "story": ["Write a bedtime story about {x}.", "Write a funny story about {x}.",
              "Describe the first scene of a film about {x}."],
    "complaint": ["{x}, and I'm furious. Any advice?", "Write an email to complain that {x}.",
                  "Should I be upset that {x}?"],
    "opinion": ["Convince me that {x} is a good idea.", "What are the risks of {x}?",
                "Share your honest view on {x}."],
    "message": ["Write a short card to {p} for their {e}.", "What should I say to {p} about their {e}?",
                "Draft a text message to {p} about their {e}."],
    "short": ["Sum up {x} in one line.", "Give me a one-word opinion of {x}, then explain.",
              "Tell me one fact about {x}."],
}


def _extended_subjects() -> dict[str, list[str]]:
    people = _PEOPLE + _MORE_PEOPLE
    return {
        "review": _PRODUCTS + _PLACES + _MEDIA + _MORE_PRODUCTS + _MORE_PLACES + _MORE_MEDIA,
        "advice": _ADVICE + _MORE_ADVICE,
        "explain": _TOPICS + _MORE_TOPICS,
        "story": _STORY + _MORE_STORY,
        "complaint": _COMPLAINTS + _MORE_COMPLAINTS,
        "opinion": _OPINION + _MORE_OPINION,
        "message": [f"{p}|{e}" for p in people for e in _EVENTS + _MORE_EVENTS],
        "short": _TOPICS + _OPINION + _MORE_TOPICS + _MORE_OPINION,
    }


def build_extra_prompts(seed: int = 0) -> list[dict]:
    """More training prompts (ids `x00000`...): every (template, subject) pair of the extended
    lists (the original and `_MORE_*` subjects, the original and `_MORE_TEMPLATES` templates)
    that is not already a prompt of `build_prompts(seed)` -- train or eval -- shuffled. Adding
    them never changes the original 616 prompts or their train/eval split."""
    rng = random.Random(seed + 2)
    taken = {p["prompt"] for p in build_prompts(seed)}
    subjects = _extended_subjects()
    pool = []
    for category, (_, templates) in _TEMPLATES.items():
        for template in templates + _MORE_TEMPLATES[category]:
            for subject in subjects[category]:
                if "|" in subject:
                    p, e = subject.split("|")
                    text = template.format(p=p, e=e)
                else:
                    text = template.format(x=subject)
                text = text[0].upper() + text[1:]
                if text not in taken:
                    taken.add(text)
                    pool.append({"category": category, "prompt": text})
    rng.shuffle(pool)
    return [{"id": f"x{i:05d}", **p} for i, p in enumerate(pool)]


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


def write_prompt_set(out_dir: Path = DATA_DIR, seed: int = 0) -> tuple[Path, Path, Path]:
    """prompts_train.jsonl and prompts_eval.jsonl (the original 522 / 94 split), and
    prompts_train_large.jsonl: the 522 train prompts followed by every extra prompt."""
    train, evals = split_prompts(build_prompts(seed), seed=seed)
    return (write_jsonl(train, Path(out_dir) / "prompts_train.jsonl"),
            write_jsonl(evals, Path(out_dir) / "prompts_eval.jsonl"),
            write_jsonl(train + build_extra_prompts(seed), Path(out_dir) / "prompts_train_large.jsonl"))


def load_prompts(split: str, data_dir: Path = DATA_DIR) -> list[dict]:
    """The committed prompts of one split ('train', 'eval' or 'train_large')."""
    if split not in ("train", "eval", "train_large"):
        raise ValueError(f"split must be 'train', 'eval' or 'train_large', got {split!r}")
    return read_jsonl(Path(data_dir) / f"prompts_{split}.jsonl")
