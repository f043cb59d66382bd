"""The prompts of the tasks the shipped model is trained on, and the words it answers with.

Plain strings, no imports: the synthetic world (:mod:`mmdiff.data.questions`) asks these questions
in training, :mod:`mmdiff.tasks.captioning` asks them at inference and the test-time search's
``yesno`` verifier (:mod:`mmdiff.search`) reads P(yes) from the verification prompt.
"""
from __future__ import annotations

YES, NO = "yes", "no"
#: captions as a sentence / as JSON
CAPTION_QUESTION = "describe the image."
CAPTION_JSON_QUESTION = "describe the image in json."
#: the count family's question about every object (``Filter().noun(plural=True)`` = "objects")
COUNT_QUESTION = "how many objects are there?"


def verification_question(question: str, proposal: str) -> str:
    """The ``verify`` family's prompt: does ``proposal`` answer ``question``?"""
    return f"{question} answer: {proposal}. is that right?"
