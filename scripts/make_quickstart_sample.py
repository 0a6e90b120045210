"""Write assets/datasets/quickstart_sample.jsonl: the offline quickstart's instruction data.

The bundled instruction sample holds 120 unrelated questions (capitals, translations, antonyms): a real
model learns from it, but a 1M-parameter builtin model cannot, and its held-out loss stays flat. The
quickstart is the first curve a newcomer sees, so it trains on rows with learnable structure instead:
five instruction templates whose answers follow a fixed form and reuse words of the prompt. A held-out
row is new (other names, numbers, places) yet predictable, so the held-out loss falls within seconds.

Deterministic: ``python scripts/make_quickstart_sample.py`` writes the same file every time.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "assets" / "datasets" / "quickstart_sample.jsonl"

NAMES = ["Ada", "Ben", "Cleo", "Dev", "Ema", "Finn", "Gia", "Hugo", "Iris", "Jon", "Kai", "Lena", "Milo"]
NAMES += ["Nora", "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Vik", "Wren", "Yara", "Zed"]
ITEMS = ["apples", "books", "chairs", "coins", "cups", "keys", "lamps", "maps", "pens", "plates", "rings", "shoes"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
OBJECTS = ["door", "car", "kite", "bag", "boat", "hat", "bike", "cup"]
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Quito", "Rome", "Seoul", "Tokyo", "Dakar", "Hanoi"]


def rows(seed: int = 7, per_template: int = 40) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out: list[dict[str, str]] = []

    def add(instruction: str, output: str, extra: str = "") -> None:
        out.append({"instruction": instruction, "input": extra, "output": output})

    for _ in range(per_template):
        name = rng.choice(NAMES)
        add(f"Write a short greeting for {name}.", f"Hello, {name}! It is nice to meet you.")
    for _ in range(per_template):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        add(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")
    for _ in range(per_template):
        colour, thing = rng.choice(COLOURS), rng.choice(OBJECTS)
        article = "an" if colour[0] in "aeiou" else "a"
        add("Describe the object in one sentence.", f"The {thing} is {colour}.", f"{article} {colour} {thing}")
    for _ in range(per_template):
        name, count, item = rng.choice(NAMES), rng.randint(2, 9), rng.choice(ITEMS)
        add(f"How many {item} does {name} have?", f"{name} has {count} {item}.", f"{name} counted {count} {item}.")
    for _ in range(per_template):
        name, city = rng.choice(NAMES), rng.choice(CITIES)
        add(
            "Where does the person live? Answer in a full sentence.",
            f"{name} lives in {city}.",
            f"{name} has lived in {city} for years.",
        )
    rng.shuffle(out)
    return out


if __name__ == "__main__":
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows()), encoding="utf-8")
    print(f"wrote {OUT}")
