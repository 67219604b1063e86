"""data/vlm_prompts.py: the Appendix C prompts against the paper, the answer parsers on canned answers (each verdict,
well-formed and malformed, markdown, Chinese and English punctuation), and the caption attributes of Fig. 5."""

import os
import re

import pytest

from data import vlm_prompts as vp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = next((p for p in (os.path.join(ROOT, up, "shared", "reference", "hear-paper.md") for up in ("..", "../.."))
              if os.path.isfile(p)), "")  # the project's shared/ folder beside the checkout (or a worktree's)


@pytest.mark.skipif(not PAPER, reason="the paper text is not next to this checkout")
@pytest.mark.parametrize("name,role", [("ANALYST", "Facial Recognition Analyst"), ("REFINER", "Textual Prompt Refiner"),
                                       ("CAPTIONER", "Image Caption Creator")])
def test_prompts_are_the_papers(name, role):
    """Appendix C, from `**Your Role:** <role>` to its `**User prompt:** {...}`: the system prompt is the text before
    the user prompt without the `[leftmargin=2em]` conversion lines, the user prompt is the text inside the braces."""
    paper = open(PAPER, encoding="utf-8").read()
    start = paper.index(f"**Your Role:** {role}")
    user = paper.index("**User prompt:**", start)
    lines = [line for line in paper[start:user].split("\n") if line.strip() != "[leftmargin=2em]"]
    assert getattr(vp, f"{name}_SYSTEM") == re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    assert getattr(vp, f"{name}_USER") == paper[paper.index("{", user) + 1: paper.index("}", user)].strip()


ANALYST_OK = [  # (answer, compliant, issues)
    ("Reasoning: Full frontal view (5° tilt). All features visible.\nObjects: [(\"face\", [None, None, None, None])]\n"
     "Negation: False", True, []),
    ("Reasoning: Face has a 45-degree side angle.\nObjects: [(“face”, [“45° side angle”, “obscured eye”])]\n"
     "Negation: True", False, ["45° side angle", "obscured eye"]),
    ("**Reasoning:** blurred\n**Objects:** [(\"face\", [\"blurring\"])]\n**Negation:** **True**", False, ["blurring"]),
    ("reasoning： 正面，清晰。\nobjects： [（“face”， [None]）]\nnegation： 否", True, []),  # Chinese punctuation
    ("Reasoning: ok. Objects: None. Negation: false.", True, []),  # one line, lower case
    ("Example: Reasoning: x Negation: True\nReasoning: fine\nNegation: False", True, []),  # the last one counts
    ("Reasoning：侧脸超过30度。\nObjects：[(“face”, [“profile”])]\nNegation：是", False, ["profile"]),
]


@pytest.mark.parametrize("answer,compliant,issues", ANALYST_OK)
def test_analyst_answers(answer, compliant, issues):
    got = vp.parse_analyst(answer)
    assert got["compliant"] == compliant and got["objects"] == issues


@pytest.mark.parametrize("answer,reason", [
    ("", "empty answer"), ("   \n", "empty answer"),
    ("Reasoning: the face is clear.\nObjects: None", "malformed answer"),  # no verdict
    ("Reasoning: x\nNegation: maybe", "malformed answer"),
    ("The face looks fine to me.", "malformed answer"),
    ("Negation", "malformed answer"),  # a label without its colon
])
def test_analyst_bad_answers_raise_their_reason(answer, reason):
    with pytest.raises(vp.AnswerError) as e:
        vp.parse_analyst(answer)
    assert e.value.reason == reason == str(e.value)


@pytest.mark.parametrize("answer", [
    '- Short Prompt: "Young East Asian woman sipping coffee in a sunlit cafe"\n- Long Prompt: "A young East Asian '
    'woman sipping from a white mug, soft smile."',
    "**Short Prompt:** Young East Asian woman sipping coffee in a sunlit cafe\n\n**Long Prompt:** A young East Asian "
    "woman sipping from a white mug, soft smile.",
    "Long Prompt： “A young East Asian woman sipping from a white mug, soft smile.”\nShort Prompt： “Young East Asian "
    "woman sipping coffee in a sunlit cafe”",  # other order, Chinese colon and quotes
    "Short-Form Prompt: Young East Asian woman sipping coffee in a sunlit cafe\nLong-Form Prompt: A young East "
    "Asian woman sipping from a white mug,\n  soft smile.",  # the process-step names, a wrapped line
])
def test_caption_answers(answer):
    assert vp.parse_captions(answer) == ("Young East Asian woman sipping coffee in a sunlit cafe",
                                         "A young East Asian woman sipping from a white mug, soft smile.")


@pytest.mark.parametrize("answer,reason", [
    ("", "empty answer"),
    ("Short Prompt: a woman in a park", "malformed answer"),  # no long caption
    ('Short Prompt: ""\nLong Prompt: "A woman."', "malformed answer"),
    ('Short Prompt: "[Gender] [Ethnicity] [Action] in [Environment]"\nLong Prompt: "x"', "malformed answer"),
    ("A woman smiling in a park, wearing a red scarf.", "malformed answer"),
])
def test_caption_bad_answers(answer, reason):
    with pytest.raises(vp.AnswerError, match=reason):
        vp.parse_captions(answer)


def test_refined_prompts():
    paper_example = ('Enhanced Prompt: "A Kurdish man in his late 60s with deq facial tattoos." Objects: [{"face"}, '
                     '{"tribal ink"}]]')
    assert vp.parse_refined(paper_example) == "A Kurdish man in his late 60s with deq facial tattoos."
    assert vp.parse_refined('Input Prompt: "An old man."\nEnhanced Prompt：“An old man with deep nasojugal grooves.”'
                            ) == "An old man with deep nasojugal grooves."
    assert vp.parse_refined("  A woman with olive skin.\n") == "A woman with olive skin."  # no label: the answer
    with pytest.raises(vp.AnswerError, match="empty answer"):
        vp.parse_refined("Enhanced Prompt: ")


def test_records_keep_the_answer_and_the_drop_reason():
    items = [{"key": "a"}, {"key": "b"}, {"key": "c"}]
    answers = ["Negation: False", "Negation: True", "no verdict"]
    recs = vp.records(items, answers, vp.analyst_fields, "ans")
    assert [r.get("drop") for r in recs] == [None, "non-compliant", "malformed answer"]
    assert [r["ans"] for r in recs] == answers and recs[2]["why"] == "no Negation field"


@pytest.mark.parametrize("short,long,want", [
    ("Middle-aged Hispanic man adjusting tie in a city street", "He wears a black jacket; olive skin, grinning.",
     dict(gender="male", age="middle-aged", ethnicity="hispanic", skin_tone="medium", expression="smiling")),
    ("Young East Asian woman sipping coffee in a cafe", "A 30-year-old woman with glasses and her son.",
     dict(gender="female", age="young", ethnicity="east asian", skin_tone="unknown", eyewear="glasses")),
    ("Black woman in her 60s reading", "Dark-skinned, serious face, white blouse.",
     dict(gender="female", age="elderly", ethnicity="black", skin_tone="dark", expression="neutral")),
    ("Man in a white shirt on a beach", "He has fair skin and wears sunglasses.",  # "white shirt" is no ethnicity
     dict(gender="male", ethnicity="unknown", skin_tone="light", eyewear="glasses")),
    ("Portrait in a studio", "A person, 25 years old.", dict(gender="unknown", age="unknown", eyewear="none")),
])
def test_caption_attributes(short, long, want):
    got = vp.caption_attributes(short, long)
    assert set(got) == set(vp.ATTRIBUTE_WORDS) and {k: got[k] for k in want} == want
