"""Conversations as people hold them with herd-tiny: many wordings of every question (colour or
color, "how many", "count", "which shapes", "is there a", polite and short forms, lower case, no
question mark), pictures that arrive after some text turns, follow-up questions about an earlier
picture, two pictures in one chat ("in the second picture ..."), greetings, and one polite answer
(`OUTSIDE_ANSWER`) to questions about anything outside its world of shapes and stories.

Every list of wordings is a pair (trained, held out): the evaluation asks the held-out ones, which
no training chat contains; so are pictures after three text turns (training has one or two).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from experiments.herd_tiny import shapes, text

# (trained, held out) wordings per question kind; {shape} and {color} are filled in.
SHAPE = (["What shape is in the image?", "What shape is this?", "Which shape do you see?", "What shape is shown?",
          "What shape is in the picture?", "What is the shape?", "Which shape is it?", "Tell me the shape.",
          "Could you tell me what shape this is?", "What shape?"],
         ["What kind of shape is it?", "Which shape is in the picture?", "Can you name the shape?"])
COLOR = (["What color is the {shape}?", "What colour is the {shape}?", "Which color is the {shape}?",
          "Which colour is the {shape}?", "What is the color of the {shape}?", "What is the colour of the {shape}?",
          "Tell me the colour of the {shape}.", "What color does the {shape} have?", "Colour of the {shape}?",
          "Could you tell me what colour the {shape} is?", "The {shape} is which color?"],
         ["What's the colour of the {shape}?", "Can you tell me the color of the {shape}?",
          "Name the colour of the {shape}."])
SHAPE_OF = (["What shape is {color}?", "Which shape is {color}?", "What is the {color} shape?",
             "What shape is the {color} one?", "Which shape has the colour {color}?"],
            ["What kind of shape is the {color} one?", "Tell me which shape is {color}."])
COUNT = (["How many shapes are there?", "How many shapes are in the image?", "Count the shapes.",
          "How many shapes do you see?", "How many shapes are in the picture?", "How many shapes?",
          "Please count the shapes.", "What is the number of shapes?", "Could you count the shapes?"],
         ["How many shapes can you see?", "Tell me how many shapes there are.", "Count the shapes for me."])
DESCRIBE = (["Describe the image.", "What is in the image?", "Describe what you see.", "Which shapes are there?",
             "Which shapes are in the picture?", "What do you see?", "Describe the picture.",
             "What shapes are in the image?", "Could you describe the picture?"],
            ["What can you see in the picture?", "Tell me what is in the picture.", "Which shapes do you see?"])
IS_THERE = (["Is there {thing}?", "Is there {thing} in the picture?", "Do you see {thing}?", "Can you see {thing}?"],
            ["Does the picture have {thing}?", "Is there {thing} in the image?"])  # thing: "a red circle"
# Questions outside herd-tiny's world (with or without a picture), answered with OUTSIDE_ANSWER: a
# template filled from topic words, so it learns the kind of question rather than a list of them.
OUTSIDE_FORMS = (["What is the capital of {country}?", "Who is the president of {country}?",
                  "What is the weather like in {city}?", "What time is it in {city}?", "How do I {task}?",
                  "Can you help me {task}?", "What is {a} plus {b}?", "What is {a} times {b}?",
                  "Is there a {thing} in the picture?", "Can you see a {thing}?", "Who made this picture?",
                  "Tell me about {topic}.", "What do you think about {topic}?", "Do you speak {language}?",
                  "Translate this into {language}.", "How old are you?", "Where do you live?", "What year is it?",
                  "What is in the news today?", "What is your favourite {kind}?", "Is this a photo of a {thing}?",
                  "Why is the sky blue?", "What does the text in the picture say?"],
                 ["What is the tallest mountain in {country}?", "Is there a {thing} in the image?",
                  "How do you {task}?", "What is {a} minus {b}?", "Which language do people speak in {country}?",
                  "What is your name?"])
OUTSIDE_WORDS = {  # (trained, held out) fill words
    "country": (["France", "Spain", "Japan", "Brazil", "Kenya", "Canada", "Italy", "India", "Peru", "Norway"],
                ["Chile", "Egypt", "Mexico"]),
    "city": (["Paris", "London", "Tokyo", "Rome", "Cairo", "Lima", "Oslo"], ["Madrid", "Delhi"]),
    "task": (["bake bread", "fix my bike", "learn to swim", "write a letter", "find a job", "cook rice",
              "change a tyre"], ["plant tomatoes", "tie a tie"]),
    "thing": (["dog", "cat", "car", "tree", "house", "person", "boat", "phone", "book", "chair", "face", "word"],
              ["bicycle", "clock", "horse"]),
    "topic": (["football", "music", "cooking", "computers", "history", "science", "money", "the ocean", "planets"],
              ["chess", "painting", "medicine"]),
    "language": (["French", "German", "Spanish", "Chinese"], ["Italian", "Arabic"]),
    "kind": (["food", "film", "song", "book", "sport"], ["game", "animal"]),
}
OUTSIDE_ANSWER = "Sorry, I only know about shapes in pictures and stories."


def outside_question(rng: random.Random, held_out: bool = False) -> str:
    """A question outside herd-tiny's world: a trained (or held-out) form with trained (or held-out) words."""
    side = 1 if held_out else 0
    words = {k: rng.choice(v[side]) for k, v in OUTSIDE_WORDS.items()}
    return styled(rng.choice(OUTSIDE_FORMS[side]).format(a=rng.randint(2, 99), b=rng.randint(2, 99), **words), rng)


GREETINGS = (["Hi", "Hello", "Hello!", "Hi there!", "Good morning!", "Hey"], ["Hello there", "Good evening!"])
GREETING_ANSWER = "Hello! Show me a picture of shapes, or ask me for a story."
ORDINALS = ("first", "second")


def styled(question: str, rng: random.Random) -> str:
    """A wording as people type it: as written, in lower case, without its final mark, or both."""
    r = rng.random()
    if r < 0.55:
        return question
    if r < 0.7:
        return question.lower()
    if r < 0.85:
        return question.rstrip("?.!")
    return question.lower().rstrip("?.!")


def questions(scene: shapes.Scene, rng: random.Random, held_out: bool = False) -> list[tuple[str, str, str]]:
    """(kind, question, answer) about ``scene``, one of each kind that has an unambiguous answer, in
    a trained (or held-out) wording picked by ``rng`` and `styled`."""
    side = 1 if held_out else 0
    pick = lambda options: styled(rng.choice(options), rng)  # noqa: E731
    wordings = {"count": COUNT[side], "describe": DESCRIBE[side], "shape": SHAPE[side], "color": COLOR[side],
                "shape_of": SHAPE_OF[side]}
    out = shapes.questions(scene, wordings=wordings, pick=pick)
    there = {(s.color, s.kind) for s in scene.shapes}
    color, kind = rng.choice(sorted(there)) if rng.random() < 0.5 else \
        (rng.choice(list(shapes.COLORS)), rng.choice(shapes.SHAPES))
    out.append(("is_there", pick(IS_THERE[side]).format(thing=shapes.article(color, kind)),
                "Yes." if (color, kind) in there else "No."))
    return out


def about(ordinal: str, question: str) -> str:
    """A question about one of two pictures: 'In the second picture, how many shapes are there?'."""
    if question[:1].isupper() and not question[:2].isupper():
        question = question[0].lower() + question[1:]
    return f"In the {ordinal} picture, {question}"


def text_turn(rng: random.Random, held_out: bool = False) -> list[dict]:
    """A user turn and its answer that is not about a picture: a story, a greeting, or a question
    outside herd-tiny's world."""
    side = 1 if held_out else 0
    r = rng.random()
    if r < 0.5:
        return text.story_chat(rng)
    if r < 0.7:
        return [{"role": "user", "content": rng.choice(GREETINGS[side])},
                {"role": "assistant", "content": GREETING_ANSWER}]
    return [{"role": "user", "content": outside_question(rng, held_out)},
            {"role": "assistant", "content": OUTSIDE_ANSWER}]


def _picture_turn(image, question: str) -> dict:
    return {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}


# The conversation forms of `chat` and the share of each when none is given (the third stage's).
FORMS = {"picture first": (0.0, 0.15), "text first": (0.15, 0.55), "text between": (0.55, 0.65),
         "two pictures": (0.65, 0.87), "outside": (0.87, 1.0)}


def chat(rng: random.Random, picture: Callable[[shapes.Scene], object],
         shares: dict[str, float] | None = None) -> list[dict]:
    """One training conversation. ``picture(scene)`` returns what a message holds for the scene's
    image (a file name here, a PIL image in the evaluation). Its form, by chance (`FORMS`, or in
    ``shares``, each form's share):
      - a picture and a question first, then follow-ups about it;
      - one or two text turns, then a picture and a question, then follow-ups;
      - a picture, its questions, a text turn, more follow-ups about the same picture;
      - two pictures: questions about the newest one, then about either ("in the first picture ...");
      - a question outside its world, with a picture or in a text chat."""
    if shares is None:
        r = rng.random()
    else:
        u, form = rng.random() * sum(shares.values()), None
        for form, share in shares.items():
            if u < share:
                break
            u -= share
        lo, hi = FORMS[form]
        r = rng.uniform(lo, min(hi, 0.999))  # r picks the form below
    messages: list[dict] = []
    if 0.15 <= r < 0.55:
        for _ in range(rng.randint(1, 2)):
            messages += text_turn(rng)
    if r >= 0.87:  # outside its world: asked beside a picture, or after one
        scene = shapes.random_scene(rng)
        q = outside_question(rng)
        if rng.random() < 0.5:
            return messages + [_picture_turn(picture(scene), q), {"role": "assistant", "content": OUTSIDE_ANSWER}]
        kind, first, answer = rng.choice(questions(scene, rng))
        return [_picture_turn(picture(scene), first), {"role": "assistant", "content": answer},
                {"role": "user", "content": q}, {"role": "assistant", "content": OUTSIDE_ANSWER}]
    scene = shapes.random_scene(rng)
    qa = questions(scene, rng)
    rng.shuffle(qa)
    # Counting is the hardest question to keep across turns: it often comes first, or right after a
    # description (the order people ask in).
    u = rng.random()
    first = ["describe", "count"] if u < 0.25 else ["count"] if u < 0.6 else []
    qa.sort(key=lambda item: first.index(item[0]) if item[0] in first else len(first))
    qa = qa[:rng.randint(max(1, len(first)), 4)]
    for i, (_, q, a) in enumerate(qa):
        messages += [_picture_turn(picture(scene), q) if i == 0 else {"role": "user", "content": q},
                     {"role": "assistant", "content": a}]
    if 0.55 <= r < 0.65:  # a text turn, then back to the picture
        messages += text_turn(rng)
        _, q, a = rng.choice(questions(scene, rng))
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    elif 0.65 <= r < 0.87:  # a second picture
        second = shapes.random_scene(rng)
        _, q, a = rng.choice(questions(second, rng))
        messages += [_picture_turn(picture(second), q if rng.random() < 0.5 else about("second", q)),
                     {"role": "assistant", "content": a}]
        for _ in range(rng.randint(1, 3)):
            which = rng.randint(0, 1)
            _, q, a = rng.choice(questions((scene, second)[which], rng))
            messages += [{"role": "user", "content": about(ORDINALS[which], q)}, {"role": "assistant", "content": a}]
    return messages
