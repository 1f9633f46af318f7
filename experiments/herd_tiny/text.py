"""English text for herd-tiny, generated here (no outside corpus): short stories from a seeded
grammar, and a long-context retrieval task.

The stories are plain, grammatical English about animals and children (a few thousand word
forms). They are herd's own code, under herd's licence (Apache-2.0): nothing is downloaded.

Retrieval: facts "The number of the fox is 42." scattered through story sentences, then a question
about one of them; `retrieval_example` places the asked fact a chosen number of tokens before the
question, so that for distances beyond one attention chunk only the global (NoPE) layers can see it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

NAMES = ("Anna", "Ben", "Cleo", "Dan", "Ella", "Finn", "Grace", "Hugo", "Ivy", "Jack", "Kate", "Leo", "Mia",
         "Nora", "Omar", "Paul", "Rosa", "Sam", "Tom", "Uma", "Vera", "Will", "Zoe", "Lily", "Max")
ANIMALS = ("cat", "dog", "fox", "bird", "rabbit", "bear", "mouse", "duck", "frog", "horse", "owl", "goat",
           "sheep", "pig", "cow", "lion", "tiger", "wolf", "deer", "fish", "turtle", "llama", "bee", "hen")
ADJECTIVES = ("little", "big", "happy", "sleepy", "brave", "kind", "curious", "small", "old", "young", "shy",
              "funny", "quiet", "clever", "gentle", "hungry", "busy", "proud")
PLACES = ("the forest", "the garden", "the park", "the river", "the farm", "the beach", "the hill", "the village",
          "the lake", "the meadow", "the school", "the market", "the woods", "the field", "the house")
THINGS = ("ball", "kite", "box", "hat", "book", "apple", "flower", "stone", "cake", "boat", "shell", "key",
          "cup", "drum", "map", "leaf", "basket", "bell", "coat", "toy")
COLOR_WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "brown", "pink", "black")
FEELINGS = ("happy", "sad", "tired", "excited", "scared", "proud", "surprised", "calm", "glad", "sorry")
WEATHER = ("The sun was warm.", "It was a cold morning.", "Rain fell all day.", "The sky was clear and blue.",
           "A soft wind blew through the trees.", "Snow covered the ground.", "The night was dark and quiet.",
           "Clouds moved slowly over the hills.")
TIMES = ("Once upon a time", "One day", "One morning", "Last summer", "Every evening", "Long ago", "On a rainy day", "After lunch",
         "Early in the morning", "At night", "On Sunday")
VERBS_PAST = ("played", "walked", "ran", "sang", "danced", "read", "slept", "jumped", "swam", "worked")
GOALS = ("find a {color} {thing}", "build a small house", "catch a {thing}", "visit a friend", "learn to swim",
         "climb the tall tree", "bake a {color} cake", "paint the {thing} {color}", "count the stars",
         "plant a {color} flower")
ENDINGS = ("In the end, everyone was {feeling}.", "From that day on, they were good friends.",
           "They went home and slept well.", "It was the best day of the year.",
           "{hero} smiled and said thank you.", "And that is how {hero} learned to share.",
           "They promised to meet again the next day.")


def _fill(rng: random.Random, template: str, **kw) -> str:
    text = template.format(color=rng.choice(COLOR_WORDS), thing=rng.choice(THINGS), **kw)
    return text.replace(" a orange", " an orange").replace(" a apple", " an apple").replace(" a old", " an old")


def story(rng: random.Random, hero: str | None = None) -> str:
    """One short story (5-9 sentences) from the grammar; ``hero`` fixes the main character."""
    hero = hero or rng.choice(NAMES)
    animal = rng.choice(ANIMALS)
    friend = rng.choice([n for n in NAMES if n != hero])
    place = rng.choice(PLACES)
    goal = _fill(rng, rng.choice(GOALS))
    lines = [f"{rng.choice(TIMES)}, {hero} went to {place}."]
    if rng.random() < 0.6:
        lines.append(rng.choice(WEATHER))
    lines.append(f"{hero} wanted to {goal}.")
    lines.append(rng.choice((
        _fill(rng, f"On the way, {hero} met a {rng.choice(ADJECTIVES)} {animal}."),
        _fill(rng, f"There, {hero} saw {friend} and a {rng.choice(ADJECTIVES)} {animal}."),
        _fill(rng, f"{friend} was already there with a {{color}} {{thing}}."))))
    lines.append(rng.choice((
        f"The {animal} said, \"I can help you.\"",
        f"\"Can I come with you?\" asked {friend}.",
        f"\"What are you doing?\" asked the {animal}.",
        f"{hero} felt {rng.choice(FEELINGS)} and a little {rng.choice(FEELINGS)}.")))
    middle = (f"They {rng.choice(VERBS_PAST)} together near {rng.choice(PLACES)}.",
              _fill(rng, f"{hero} found a {{color}} {{thing}} under a tree."),
              f"The {animal} {rng.choice(VERBS_PAST)} and {rng.choice(VERBS_PAST)} all afternoon.",
              _fill(rng, f"{friend} gave {hero} a {{thing}}."),
              f"It was hard, but {hero} did not give up.",
              f"Then they {rng.choice(VERBS_PAST)} until the sun went down.")
    lines += rng.sample(middle, rng.randint(0, 3))
    lines.append(rng.choice((f"At last, {hero} was able to {goal}.", f"Soon {hero} knew how to {goal}.",
                             f"{hero} did not {goal}, but it did not matter.")))
    lines.append(rng.choice(ENDINGS).format(feeling=rng.choice(FEELINGS), hero=hero))
    return " ".join(lines)


STORY_REQUESTS = ("Tell me a story about {hero}.", "Write a short story about {hero}.",
                  "Can you tell me a story about {hero}?", "Please write a story with {hero} in it.")


def story_chat(rng: random.Random) -> list[dict]:
    """A request for a story about a named character, answered with one."""
    hero = rng.choice(NAMES)
    return [{"role": "user", "content": rng.choice(STORY_REQUESTS).format(hero=hero)},
            {"role": "assistant", "content": story(rng, hero)}]


# ---- long-context retrieval --------------------------------------------------------------------

KEYS = ANIMALS
ASK_FACT = ("What is the number of the {key}?", "What number does the {key} have?",
            "Which number belongs to the {key}?")


def fact(key: str, value: int) -> str:
    return f"The number of the {key} is {value}."


def retrieval_example(rng: random.Random, count_tokens, distance: int, n_facts: int = 6,
                      lead: int = 0, n_questions: int = 1) -> tuple[list[dict], int]:
    """(messages, measured distance): a user turn of story sentences holding ``n_facts`` facts about
    distinct keys (two-digit values) and ending with a question, the assistant's answer (the fact:
    "The number of the fox is 42.", which a decoder completes by copying what followed the same words),
    then ``n_questions - 1`` more question / answer turns about the other facts.

    The first asked fact ends about ``distance`` tokens before the question (``count_tokens(text)``
    counts the model's tokens); the other facts fall inside that stretch; about ``lead`` tokens of
    stories come before the asked fact. Returns the measured distance in tokens.
    """
    keys = rng.sample(KEYS, n_facts)
    values = [rng.randint(10, 99) for _ in keys]
    filler: list[str] = []
    while count_tokens(" ".join(filler)) < distance:
        filler += [s if s.endswith((".", "?", "!", "\"")) else s + "." for s in story(rng).split(". ")]
    after: list[str] = []
    for sentence in filler:
        if count_tokens(" ".join(after + [sentence])) > distance:
            break
        after.append(sentence)
    for k, v in zip(keys[1:], values[1:]):
        after.insert(rng.randint(0, len(after)), fact(k, v))
    before: list[str] = []
    while count_tokens(" ".join(before)) < lead:
        before.append(story(rng))
    body = " ".join(before + [fact(keys[0], values[0])] + after)
    asked = [0] + rng.sample(range(1, n_facts), min(n_questions, n_facts) - 1)
    messages: list[dict] = []
    for n, i in enumerate(asked):
        question = rng.choice(ASK_FACT).format(key=keys[i])
        messages += [{"role": "user", "content": f"{body}\n\n{question}" if n == 0 else question},
                     {"role": "assistant", "content": fact(keys[i], values[i])}]
    return messages, count_tokens(" ".join(after))


# ---- induction: copying at its barest ----------------------------------------------------------


def word_list(rng: random.Random, words: Sequence[str], n_words: int) -> list[str]:
    """The pieces of "Words: w1 ... wn. Again: w1 ... wn." with ``n_words`` drawn at random from
    ``words``: ["Words:", " w1 ... wn", ". Again:", " w1 ... wn", "."]. Nothing but finding where the
    current word stood in the first listing (an induction head) predicts the repetition; the first
    listing itself cannot be predicted beyond picking from ``words``."""
    listed = " " + " ".join(rng.choice(words) for _ in range(n_words))
    return ["Words:", listed, ". Again:", listed, "."]


# ---- copying (grows the long-range lookup that retrieval needs) ----------------------------------

ASK_REPEAT = ("Repeat the text.", "Say that again, word for word.", "Copy the text above.")


def copy_example(rng: random.Random, count_tokens, n_tokens: int) -> list[dict]:
    """A passage of story text of about ``n_tokens`` tokens, a request to repeat it, and the passage.

    Every token of the repetition is found by looking up where the previous token stood in the
    passage, ``n_tokens`` back: the same lookup a fact question needs, with a training signal on
    every token instead of one number per question. Past one attention chunk only the NoPE layers
    can do it.
    """
    words: list[str] = []
    while count_tokens(" ".join(words)) < n_tokens:
        words += story(rng).split()
    lo, hi = 1, len(words)  # the longest prefix of whole words within n_tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count_tokens(" ".join(words[:mid])) <= n_tokens else (lo, mid - 1)
    passage = " ".join(words[:lo])
    return [{"role": "user", "content": f"{passage}\n\n{rng.choice(ASK_REPEAT)}"},
            {"role": "assistant", "content": passage}]
