"""Write the bundled preference samples: assets/datasets/preference_sample.jsonl (pairs) and kto_sample.jsonl.

Our own writing, templated so that the preference is learnable by a 1M-parameter builtin model: in every pair the
chosen answer is correct, complete and polite, the rejected one is wrong, curt or off-topic, in a form that repeats
across rows. The paired file mixes the layouts preference tuning accepts (prompt/chosen/rejected strings); the
unpaired file is KTO's prompt/completion/label, half desirable and half not, over the same prompts.

Deterministic: ``python scripts/make_preference_samples.py`` writes the same files every time.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATASETS = Path(__file__).resolve().parents[1] / "assets" / "datasets"

NAMES = ["Ada", "Ben", "Cleo", "Dev", "Ema", "Finn", "Gia", "Hugo", "Iris", "Jon", "Kai", "Lena", "Milo", "Nora"]
CITIES = {"France": "Paris", "Peru": "Lima", "Norway": "Oslo", "Egypt": "Cairo", "Italy": "Rome", "Japan": "Tokyo"}
CITIES.update({"Senegal": "Dakar", "Vietnam": "Hanoi", "Kenya": "Nairobi", "Chile": "Santiago"})
OPPOSITES = {"hot": "cold", "tall": "short", "early": "late", "full": "empty", "fast": "slow", "light": "dark"}
OPPOSITES.update({"open": "closed", "loud": "quiet", "wet": "dry", "old": "new"})


def pairs(seed: int = 11, per_template: int = 30) -> list[dict[str, str]]:
    """``per_template`` distinct rows from each of four templates (no row twice: held-out rows stay unseen)."""
    rng = random.Random(seed)
    out: list[dict[str, str]] = []
    seen: set[tuple[str, str, str]] = set()

    def add(prompt: str, chosen: str, rejected: str) -> bool:
        if (prompt, chosen, rejected) in seen:
            return False
        seen.add((prompt, chosen, rejected))
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        return True

    def repeat(make) -> None:
        made = 0
        while made < per_template:
            made += make()

    repeat(lambda: _sum(rng, add))
    repeat(lambda: _capital(rng, add))
    repeat(lambda: _opposite(rng, add))
    repeat(lambda: _thanks(rng, add))
    rng.shuffle(out)
    return out


def _sum(rng, add) -> bool:
    a, b = rng.randint(2, 19), rng.randint(2, 19)
    wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
    return add(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"It is {wrong}, obviously.")


def _capital(rng, add) -> bool:
    country, city = rng.choice(sorted(CITIES.items()))
    other = rng.choice(sorted(set(CITIES.values()) - {city}))
    return add(f"What is the capital of {country}?", f"The capital of {country} is {city}.", f"{other}. Look it up.")


def _opposite(rng, add) -> bool:
    word, opposite = rng.choice(sorted(OPPOSITES.items()))
    curt = rng.choice(["Next question.", "Ask someone else.", "Not my problem."])
    return add(
        f"Give the opposite of the word '{word}'.",
        f"The opposite of '{word}' is '{opposite}'.",
        f"'{word}' has no opposite. {curt}",
    )


def _thanks(rng, add) -> bool:
    name = rng.choice(NAMES)
    reason = rng.choice(["your help this week", "the lovely dinner", "fixing my bike", "the book", "your advice"])
    return add(
        f"Write a one-line thank-you note to {name} for {reason}.",
        f"Thank you so much, {name}, for {reason}!",
        rng.choice(["Whatever. Thanks, I guess.", "Fine, thanks.", "Do I have to?"]),
    )


def unpaired(seed: int = 13) -> list[dict[str, object]]:
    """Pairs split into KTO rows, the chosen answer desirable and the rejected one not; no row twice."""
    rng = random.Random(seed)
    out: list[dict[str, object]] = []
    seen: set[tuple[str, str]] = set()
    for row in pairs(seed=seed, per_template=16):
        for key, label in (("chosen", True), ("rejected", False)):
            if (row["prompt"], row[key]) not in seen:
                seen.add((row["prompt"], row[key]))
                out.append({"prompt": row["prompt"], "completion": row[key], "label": label})
    rng.shuffle(out)
    return out


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    write(DATASETS / "preference_sample.jsonl", pairs())
    write(DATASETS / "kto_sample.jsonl", unpaired())
