"""Write ``lede_env/data/prompts/prose.jsonl``: prose and chat prompts written for lede.

The packaged sets give lede's datastore (``lede_env.datastore``) the model's own text on code,
everyday instructions, math word problems and translation, but none of the open-ended prose and
chat most users decode (stories, essays, letters, speaking in a persona, conversation). This
script writes those prompts from the forms, topics, personas and questions listed below (written
for lede by its developers, CC0-1.0), so the datastore can hold the model's own habits on such
text. Deterministic: the same file every run; a fixed seed picks the (form, topic) and
(persona, question) pairs.

    python scripts/make_prose_prompts.py

Categories: ``creative_writing`` (a form of writing about a topic) and ``chat`` (a persona asked a
question, or an everyday conversational request). No prompt of lede's evaluation splits is made
here (``tests/lede_env/test_prompts_costs.py::test_default_splits_are_disjoint`` checks the texts).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "lede_env" / "data" / "prompts" / "prose.jsonl"

FORMS = [
    "a short story", "a poem", "a blog post", "a persuasive essay", "a diary entry", "a letter to a friend",
    "a speech for a school assembly", "a news report", "a product description", "a restaurant review",
    "a fairy tale for children", "a motivational message", "a short opinion piece", "a travel postcard",
    "a description of a place", "a scene from a play",
]
TOPICS = [
    "a lighthouse keeper who finds a message in a bottle", "the first day of spring", "learning to ride a bicycle",
    "a city without cars", "an old bookshop closing down", "friendship between a cat and a dog",
    "a journey across the desert", "the importance of sleep", "a robot that learns to paint",
    "growing vegetables on a balcony", "a storm at sea", "a village festival", "the last day of summer camp",
    "moving to a new country", "a lost umbrella", "the night sky in the mountains", "a grandmother's recipe",
    "a train that never stops", "volunteering at an animal shelter", "the sound of rain on a tin roof",
    "a chess match between rivals", "a small island with one school", "the invention of the wheel",
    "a museum at night", "saving money for a big trip", "a forest after a fire", "a musician's first concert",
    "why reading matters", "a picnic that goes wrong", "the view from a hot-air balloon",
]
PERSONAS = [
    "a ship's captain from the eighteenth century", "a friendly librarian", "a medieval knight",
    "a detective in 1920s London", "a professional chef", "an astronaut on the Moon", "a wise old wizard",
    "a park ranger", "a football coach", "a time traveller from the year 3000", "a pirate", "a kind nurse",
    "a street magician", "a famous inventor", "a mountain guide", "a tour guide in Rome",
]
QUESTIONS = [
    "What does a normal day look like for you?", "What is the best advice you have ever received?",
    "Tell me about the hardest challenge you faced.", "What should a beginner in your job know first?",
    "What do you do to relax after work?", "Describe your favourite place in the world.",
    "What mistake taught you the most?", "How would you cheer up a friend who is sad?",
    "What do you think about modern technology?", "Tell me a funny story from your past.",
]
CHAT = [
    "Can you help me plan a relaxing weekend at home?", "I feel nervous before exams. What can I do?",
    "What are some good habits for staying healthy?", "How do I start a conversation with new colleagues?",
    "Can you suggest a few fun activities for a rainy day?", "What should I pack for a week-long hiking trip?",
    "How can I be more productive in the mornings?", "Give me some ideas for a birthday present for my dad.",
    "I want to learn to cook. Where should I begin?", "How do I keep a houseplant alive?",
    "What are some tips for saving money on groceries?", "Can you recommend a routine for learning a new language?",
    "How do I tell a friend that I need some time alone?", "What is a good way to start journaling?",
    "Help me write a polite message declining an invitation.", "What can I do to sleep better at night?",
    "How do I prepare for a job interview?", "Suggest a simple dinner I can make in twenty minutes.",
    "What are the pros and cons of working from home?", "How can I make my small apartment feel bigger?",
    "Tell me something interesting about octopuses.", "How do I explain to my child why the sky is blue?",
    "What should I think about before adopting a dog?", "Can you give me a short pep talk before my run?",
]


def prompts() -> list[dict]:
    rng = random.Random(0)
    pairs = [(f, t) for f in FORMS for t in TOPICS]
    rng.shuffle(pairs)
    rows = [("creative_writing", f"Write {f} about {t}.") for f, t in pairs[:128]]
    asks = [(p, q) for p in PERSONAS for q in QUESTIONS]
    rng.shuffle(asks)
    rows += [("chat", f"Pretend you are {p}. {q}") for p, q in asks[:104]]
    rows += [("chat", q) for q in CHAT]
    return [{"question_id": 20001 + i, "category": c, "turns": [text]} for i, (c, text) in enumerate(rows)]


def main() -> None:
    rows = prompts()
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {OUT} ({len(rows)} prompts)")


if __name__ == "__main__":
    main()
