"""The four generated domains of the built-in corpus (prose, code, arithmetic, records): templated text from a
seeded ``random.Random`` (see :mod:`moeaudit.builtin.corpus` for the choice, the seeds and the splits). Only
``random()``, ``randint`` / ``randrange``, ``choice`` and ``sample`` are used, whose output is stable across CPython
3.10-3.13."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

# --------------------------------------------------------------------------------------------------
# vocabulary for the generated domains
# --------------------------------------------------------------------------------------------------
_NAMES = (
    "Alice",
    "Bruno",
    "Chen",
    "Dara",
    "Elena",
    "Farid",
    "Grace",
    "Hugo",
    "Ines",
    "Jonas",
    "Keiko",
    "Liam",
    "Maya",
    "Nadia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sami",
    "Tariq",
    "Uma",
    "Victor",
    "Wen",
    "Yusuf",
)
_CITIES = (
    "Lisbon",
    "Oslo",
    "Nairobi",
    "Lima",
    "Kyoto",
    "Dublin",
    "Quito",
    "Hanoi",
    "Tunis",
    "Porto",
    "Bergen",
    "Cairo",
    "Seoul",
    "Zurich",
    "Madrid",
    "Austin",
)
_JOBS = (
    "baker",
    "teacher",
    "nurse",
    "pilot",
    "carpenter",
    "painter",
    "farmer",
    "doctor",
    "engineer",
    "librarian",
    "gardener",
    "chemist",
)
_PETS = ("cat", "dog", "parrot", "rabbit", "turtle", "goat", "horse", "hamster")
_OBJECTS = ("book", "lamp", "bicycle", "guitar", "clock", "kettle", "camera", "ladder", "basket", "map")
_COLOURS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple")
_FOODS = ("bread", "soup", "rice", "apples", "cheese", "fish", "beans", "noodles", "pears", "olives")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_ADVERBS = ("slowly", "quickly", "happily", "quietly", "carefully", "often", "rarely")


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _plural(noun: str, n: int) -> str:
    return noun if n == 1 else noun + "s"


def _gen_prose(rng: random.Random) -> str:
    people = rng.sample(_NAMES, 3)
    facts = {}
    for p in people:
        facts[p] = {
            "city": rng.choice(_CITIES),
            "job": rng.choice(_JOBS),
            "pet": rng.choice(_PETS),
            "npets": rng.randint(1, 5),
            "object": rng.choice(_OBJECTS),
            "colour": rng.choice(_COLOURS),
            "food": rng.choice(_FOODS),
            "day": rng.choice(_DAYS),
        }
    sents: list[str] = []
    for p in people:
        f = facts[p]
        n = f["npets"]
        sents.append(f"{p} lives in {f['city']} and works as {_a(f['job'])}.")
        sents.append(f"{p} has {_NUMBER_WORDS[n]} {_plural(f['pet'], n)} and {_a(f['colour'] + ' ' + f['object'])}.")
        sents.append(f"Every {f['day']}, {p} {rng.choice(_ADVERBS)} cooks {f['food']} for dinner.")
    for _ in range(rng.randint(4, 7)):
        p = rng.choice(people)
        f = facts[p]
        q = rng.choice([x for x in people if x != p])
        kind = rng.randrange(6)
        if kind == 0:
            sents.append(f"One day {p} travelled from {f['city']} to {facts[q]['city']} to visit {q}.")
        elif kind == 1:
            sents.append(f"{q} asked {p} to lend the {f['colour']} {f['object']}, and {p} agreed.")
        elif kind == 2:
            n = f["npets"]
            sents.append(f"The {_plural(f['pet'], n)} of {p} like to sleep near the {f['object']}.")
        elif kind == 3:
            sents.append(f"Because {p} is {_a(f['job'])}, {p} is busy on most days except {f['day']}.")
        elif kind == 4:
            sents.append(f"{p} and {q} shared some {f['food']} and talked about {facts[q]['city']}.")
        else:
            sents.append(f"It rained in {f['city']}, so {p} stayed at home with the {_plural(f['pet'], f['npets'])}.")
    qa: list[str] = []
    for p in rng.sample(people, 2):
        f = facts[p]
        kind = rng.randrange(4)
        if kind == 0:
            qa.append(f"Question: Where does {p} live? Answer: {p} lives in {f['city']}.")
        elif kind == 1:
            qa.append(f"Question: What is the job of {p}? Answer: {p} works as {_a(f['job'])}.")
        elif kind == 2:
            n = f["npets"]
            qa.append(f"Question: How many {f['pet']}s does {p} have? Answer: {p} has {_NUMBER_WORDS[n]}.")
        else:
            qa.append(f"Question: What does {p} cook on {f['day']}? Answer: {p} cooks {f['food']}.")
    return " ".join(sents) + "\n\n" + "\n".join(qa) + "\n"


_FN_VERBS = ("compute", "count", "find", "filter", "sum", "scale", "merge", "clean", "collect", "check")
_FN_NOUNS = ("items", "values", "scores", "prices", "names", "records", "words", "points", "orders", "rows")
_ATTRS = ("price", "score", "size", "weight", "count", "age")


def _gen_function(rng: random.Random) -> str:
    verb = rng.choice(_FN_VERBS)
    noun = rng.choice(_FN_NOUNS)
    single = noun[:-1]
    attr = rng.choice(_ATTRS)
    limit = rng.randint(1, 99)
    kind = rng.randrange(5)
    name = f"{verb}_{noun}"
    if kind == 0:
        return (
            f"def {name}({noun}):\n"
            f'    """Return the total {attr} of all {noun}."""\n'
            f"    total = 0\n"
            f"    for {single} in {noun}:\n"
            f"        total += {single}.{attr}\n"
            f"    return total\n"
        )
    if kind == 1:
        return (
            f"def {name}({noun}, limit={limit}):\n"
            f'    """Return the {noun} whose {attr} is greater than limit."""\n'
            f"    result = []\n"
            f"    for {single} in {noun}:\n"
            f"        if {single}.{attr} > limit:\n"
            f"            result.append({single})\n"
            f"    return result\n"
        )
    if kind == 2:
        return (
            f"def {name}({noun}):\n"
            f'    """Count the {noun} with a positive {attr}."""\n'
            f"    count = 0\n"
            f"    for {single} in {noun}:\n"
            f"        if {single}.{attr} > 0:\n"
            f"            count += 1\n"
            f"    return count\n"
        )
    if kind == 3:
        factor = rng.randint(2, 9)
        return (
            f"def {name}({noun}, factor={factor}):\n"
            f'    """Return a new list with every {attr} multiplied by factor."""\n'
            f"    return [{single}.{attr} * factor for {single} in {noun}]\n"
        )
    return (
        f"def {name}({noun}):\n"
        f'    """Return the {single} with the largest {attr}, or None if there are no {noun}."""\n'
        f"    best = None\n"
        f"    for {single} in {noun}:\n"
        f"        if best is None or {single}.{attr} > best.{attr}:\n"
        f"            best = {single}\n"
        f"    return best\n"
    )


def _gen_code(rng: random.Random) -> str:
    parts = [f"# module {rng.choice(_FN_VERBS)}_{rng.choice(_FN_NOUNS)}.py\n"]
    if rng.random() < 0.5:
        parts.append(f"import {rng.choice(('math', 'json', 'os', 'random', 'statistics'))}\n")
    parts.append("\n")
    fns: list[str] = []
    seen: set[str] = set()
    for _ in range(rng.randint(2, 4)):
        fn = _gen_function(rng)
        if fn.split("(", 1)[0] not in seen:
            seen.add(fn.split("(", 1)[0])
            fns.append(fn)
    parts.append("\n\n".join(fns))
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    parts.append(f'\n\nif __name__ == "__main__":\n    print({a} + {b})\n')
    return "".join(parts)


def _gen_arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(18, 30)):
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(0, 12), rng.randint(0, 12)
            c = a * b
        elif op == "+":
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            c = a + b
        else:
            a = rng.randint(0, 99)
            b = rng.randint(0, a)
            c = a - b
        lines.append(f"{a} {op} {b} = {c}")
    return "\n".join(lines) + "\n"


def _gen_record(rng: random.Random, rid: int) -> dict:
    first = rng.choice(_NAMES)
    city = rng.choice(_CITIES)
    return {
        "id": rid,
        "name": first,
        "city": city,
        "age": rng.randint(18, 80),
        "score": round(rng.randint(0, 1000) / 10, 1),
        "email": f"{first.lower()}.{rid}@{city.lower()}.example",
    }


def _gen_records(rng: random.Random) -> str:
    start = rng.randint(1, 900)
    rows = [_gen_record(rng, start + i) for i in range(rng.randint(6, 12))]
    if rng.random() < 0.5:
        lines = ["id,name,city,age,score,email"]
        lines += [f"{r['id']},{r['name']},{r['city']},{r['age']},{r['score']},{r['email']}" for r in rows]
    else:
        lines = [json.dumps(r, sort_keys=False) for r in rows]
    return "\n".join(lines) + "\n"


#: The generator of each generated domain: ``random.Random -> document text``.
GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "prose": _gen_prose,
    "code": _gen_code,
    "arithmetic": _gen_arithmetic,
    "records": _gen_records,
}
