"""
The three prompts of HEAR's identity data pipeline (paper Appendix C, Fig. 3), verbatim, and robust parsers of the
answers a vision-language / text model gives to them. curate.py sends each prompt as a system message (the role,
objective, steps, examples and output format) plus the paper's "User prompt" as the user message (with the image,
or, for the refiner, followed by the input prompt in the examples' `Input Prompt: "..."` form).

  ANALYST_*    "Facial Recognition Analyst" (image preprocessing, second-round filter): Reasoning / Objects / Negation
  CAPTIONER_*  "Image Caption Creator" (recaption): a short and a long prompt
  REFINER_*    "Textual Prompt Refiner" (synthetic data augmentation): an enhanced identity prompt

The texts are the paper's markdown with one change: the `[leftmargin=2em]` lines (a LaTeX list option left over
from the conversion) are removed. tests/test_curate_prompts.py checks them against the paper when it is present.

Parsers take any string and either return the fields or raise AnswerError("empty answer" | "malformed answer");
they accept markdown decoration (bold, bullets), any letter case, Chinese/full-width punctuation (：“”，（）) and
the fields in any order, and use the last occurrence of a field (models sometimes echo the examples first).
Caption attributes (Fig. 5: gender, age, ethnicity, skin tone, expression, eyewear) are read from the captions
by keyword; "unknown" when the captions do not say.
"""

import re
import unicodedata

import torch

ANALYST_SYSTEM = (
    "**Your Role:** Facial Recognition Analyst\n\n"
    "**Objective:** Determine if the subject’s face in the provided image meets frontal orientation and "
    "clarity requirements by verifying some specific criteria.\n\n"
    "**Process Steps:**\n\n"
    "1. Measure the face’s side/profile angles to ensure they do not exceed 30 degrees.\n"
    "2. Verify eyes, nose, and mouth are mostly visible (e.g., no hair, accessories, or hands blocking "
    "features). Ensure no reflections (e.g., glasses) obscure key areas.\n"
    "3. Evaluate Image Clarity: Look for blurring, pixelation, or compression artifacts affecting facial "
    "details. Check resolution quality (e.g., edges of facial features must be sharp).\n"
    "4. Ensure even illumination across the face (no shadows over eyes/nose/mouth). Confirm no "
    "overexposure or underexposure distorting features.\n\n"
    "**Examples:**\n\n"
    "- Example 1 (Non-Compliant):\n\n"
    "User Prompt: Now you are a “Facial Recognition Analyst”. Carefully examine the provided image and "
    "...\n\n"
    "Reasoning: Face has a 45-degree side angle. Left eye obscured by hair. Blurring around the mouth. "
    "Harsh shadows under the nose.\n\n"
    "Objects: [(“face”, [“45° side angle”, “obscured eye”, “blurring”, “harsh shadows”])]\n\n"
    "Negation: True\n\n"
    "- Example 2 (Compliant):\n\n"
    "User Prompt: Now you are a “Facial Recognition Analyst”. Carefully examine the provided image and "
    "...\n\n"
    "Reasoning: Full frontal view (5° tilt). All features visible. Sharp resolution. Even lighting with "
    "no shadows.\n\n"
    "Objects: [(“face”, [None, None, None, None])]\n\n"
    "Negation: False\n\n"
    "**Your Current Task:**\n\n"
    "Follow the Process Steps to analyze the provided image. Present results in the format:\n\n"
    "Reasoning: Detailed analysis of each criterion.\n\n"
    "Objects: List attributes (or None if compliant).\n\n"
    "Negation: Boolean (True/False) indicating compliance."
)
ANALYST_USER = (
    "Now you are a “Facial Recognition Analyst”. Carefully examine the provided image and determine "
    "whether the subject’s face meets frontal orientation and clarity requirements by verifying the "
    "following criteria: Full frontal view with no side/profile angles exceeding 30 degrees, all facial "
    "features (eyes, nose, mouth) fully visible and unobstructed, no significant blurring or "
    "low-resolution artifacts, and proper illumination without harsh shadows obscuring features."
)
REFINER_SYSTEM = (
    "**Your Role:** Textual Prompt Refiner\n\n"
    "**Objective:** Enhance human-centric image generation prompts by diversity injection through 3-4 "
    "specific physical attributes.\n\n"
    "**Process Steps:**\n\n"
    "1. Inject descriptors like \"high nasal root typical of East Asian ancestry\" or \"broad alar base "
    "common in West African phenotypes\".\n"
    "2. Add gender-fluid traits (e.g., \"softened mandibular angle with stubble shadow\").\n"
    "3. Specify hormonal influences (e.g., \"post-adolescent acne scarring along the jaw-line\").\n"
    "4. Map muscle movements to emotional states: \"subtle crow's feet from frequent laughter\" or "
    "\"vertical glabellar lines indicating chronic focus\".\n"
    "5. Use dynamic modifiers (e.g., \"partially contracted corrugator supercilii muscles\").\n"
    "6. Embed region-specific adornments (e.g., \"Maasai beadwork collar\", \"Balinese temple ear cuffs\").\n"
    "7. Reference symbolic body modifications (e.g., \"Yakuza-inspired fingertip tattoos\").\n\n"
    "### Examples\n\n"
    "- Example 1 (Original → Enhanced):\n\n"
    "Input Prompt: \"A young woman smiling.\"\n\n"
    "Enhanced Prompt: \"A Southeast Asian woman in her 20s with epicanthic folds and a low nasal bridge, "
    "displaying asymmetrical nasolabial folds from a half-suppressed grin. Traditional sihn skirt drapes "
    "over her knees, complemented by a sak yant tattoo peeking above her collarbone.\"\n\n"
    "- Example 2 (Original → Enhanced):\n\n"
    "Input Prompt: \"An old man with a beard.\"\n\n"
    "Enhanced Prompt: \"A Kurdish man in his late 60s with salt-and-pepper şal û şapik mustache, deep "
    "nasojugal grooves from decades of squinting in sunlight, and deq facial tattoos fading into sagging "
    "jowls.\" Objects: [{\"face\"}, {\"ethnic wrinkles\"}, {\"cultural facial hair\"}, {\"tribal ink\"}]]\n\n"
    "### Your Current Task:\n\n"
    "Building upon the original input prompt, we enhance human-centric image generation by injecting "
    "descriptive attributes, adding gender-fluid traits, specifying hormonal influences, mapping muscle "
    "movements to emotional states, using dynamic modifiers, embedding region-specific adornments, and "
    "referencing symbolic body modifications."
)
REFINER_USER = (
    "Now you are a \"Textual Prompt Refiner\" specializing in expanding facial details for human-centric "
    "image generation. For each input prompt, first perform diversity injection by adding 3-4 specific "
    "physical attributes including racial features (like epicanthic folds or nose bridge height), gender "
    "characteristics (such as androgynous jawline or beard density), micro-expressions (for example "
    "nasolabial folds when smiling), and cultural accessories (like tribal scarification patterns)."
)
CAPTIONER_SYSTEM = (
    "**Your Role:** Image Caption Creator\n\n"
    "**Objective:** Enhance facial image prompts by generating a dual-description structure that "
    "transitions from concise demographic-action-environment tagging to richly detailed, photo-realistic "
    "portrayals emphasizing expression, clothing, and spatial context.\n\n"
    "**Process Steps:**\n\n"
    "1. **Short-Form Prompt Construction:** \"[Gender] [Ethnicity] [Action] in [Environment]\" (e.g., "
    "\"Middle-aged Hispanic man adjusting tie in a city street at dusk\")\n"
    "2. **Long-Form Prompt Expansion:**\n"
    "  - **Facial Expression Expansion:** Describe micro-expressions and gaze direction with anatomical "
    "precision. (e.g., \"slight levator labii contraction from a half-smirk,\" \"glance directed 30° "
    "rightward,\" \"orbicularis oculi tension from narrowed gaze.\")\n"
    "  - **Clothing Detailing:** Highlight fabric type, texture, and interaction with light. (e.g., "
    "\"wool-blend blazer catching low-angle sunlight,\" \"crimson silk scarf loosely looped at clavicle.\")\n"
    "  - **Spatial Elements:** Specify physical orientation and spatial relationships with the "
    "surrounding environment. (e.g., \"leaning 15° toward a reflective window 1 meter to his left,\" "
    "\"background softened by a 3-meter depth of field with blurred pedestrians.\")\n"
    "  - **Photorealism Enforcement:** Include optical effects that simulate real-world imaging "
    "conditions. (e.g., \"light scattering,\" \"depth blur,\" \"lens distortion.\")\n\n"
    "### Examples\n\n"
    "- Short Prompt: \"Young East Asian woman sipping coffee in a sunlit cafe corner.\"\n"
    "- Long Prompt: \"A young East Asian woman sipping from a white ceramic mug, with a soft smile "
    "indicated by gentle zygomaticus major activation and a downward gaze angled 45°, showing mild "
    "orbicularis oculi engagement. She wears a cream cashmere sweater with visible ribbing, catching warm"
    " sunlight across the sleeves, and a loosely tied silk scarf with floral tones at her collarbone. Her"
    " posture leans 10° forward, right elbow resting on a polished wooden table; a frosted window 80 cm "
    "to her left reflects ambient light. The background fades with a 2-meter depth blur, and subtle lens "
    "bloom and light scattering reinforce the scene's photorealism.\"\n\n"
    "**Your Current Task:** Generate both a short and a detailed caption for the following image using a "
    "full attribute structure. Present the results in the following format:\n\n"
    "- Short Prompt: \"[Gender] [Ethnicity] [Action] in [Environment]\"\n"
    "- Long Prompt: Detailed expansion based on the short prompt, covering facial expression, clothing, "
    "spatial elements and photorealism enforcement."
)
CAPTIONER_USER = (
    "Now you are a \"Image Caption Creator\". Generate a dual-prompt description for the input facial "
    "image. First, create a short prompt stating the subject's gender, ethnicity, action, and surrounding"
    " environment in a concise format (e.g., '[Gender] [Ethnicity] [Action] in [Environment]'). Then, "
    "expand this into a long prompt by adding: 1) Detailed facial expressions (e.g., micro-expressions, "
    "eye direction, muscle tension), 2) Clothing specifics (textures, colors, material interactions), and"
    " 3) Spatial relationships between the subject and objects or environment (quantify distances and "
    "angles where applicable). Ensure both prompts maintain photographic realism and avoid artistic "
    "stylization."
)


class AnswerError(ValueError):
    """A model answer that cannot be used; str(e) is the drop reason ("empty answer" or "malformed answer")."""

    def __init__(self, reason, detail=""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


# quotes, brackets and punctuation that NFKC leaves as they are
_PUNCT = str.maketrans({"“": '"', "”": '"', "„": '"', "「": '"', "」": '"', "『": '"', "』": '"', "‘": "'", "’": "'",
                        "。": ". ", "、": ", ", "【": "[", "】": "]", "《": '"', "》": '"'})


def normalize(text):
    """Full-width forms -> ASCII (NFKC: ：，（）！ and full-width letters), then Chinese quotes and stops."""
    return unicodedata.normalize("NFKC", text or "").translate(_PUNCT)


def fields(text, labels):
    """Labelled fields of an answer -> {label: value}. labels: {name: regex of the label words}. A label counts
    when it starts the text or follows a non-letter, may be wrapped in markdown bold and ends with a colon; its value
    runs to the next label. The last occurrence of a label wins."""
    pattern = "|".join(f"(?P<{name}>{words})" for name, words in labels.items())
    marks = list(re.finditer(rf"(?<![A-Za-z])(?:{pattern})\s*\**\s*:\**", text, re.IGNORECASE))
    out = {}
    for m, nxt in zip(marks, marks[1:] + [None]):
        value = text[m.end(): nxt.start() if nxt else len(text)]
        out[m.lastgroup] = value.strip().strip("*-•#>").strip()
    return out


def _unquote(value):
    return value.strip().strip("*").strip().strip('"\'`').strip()


def parse_analyst(answer):
    """Facial Recognition Analyst answer -> {"compliant", "reasoning", "objects"}. Negation True means the face
    fails the criteria (the paper's Example 1, non-compliant); False means it passes (Example 2)."""
    text = normalize(answer)
    if not text.strip():
        raise AnswerError("empty answer")
    got = fields(text, {"reasoning": "reasoning", "objects": "objects", "negation": "negation"})
    if "negation" not in got:
        raise AnswerError("malformed answer", "no Negation field")
    word = re.match(r"[\s\"'`*\[(]*([A-Za-z]+|是|否|真|假)", got["negation"])
    verdict = word.group(1).lower() if word else ""
    if verdict not in ("true", "false", "yes", "no", "是", "否", "真", "假"):
        raise AnswerError("malformed answer", f"Negation is {got['negation'][:40]!r}, not True/False")
    issues = [q for q in re.findall(r"[\"']([^\"']+)[\"']", got.get("objects", "")) if q.strip().lower() != "face"]
    return {"compliant": verdict in ("false", "no", "否", "假"), "reasoning": got.get("reasoning", ""),
            "objects": issues}


def parse_captions(answer):
    """Image Caption Creator answer -> (short caption, long caption). Labels: Short/Long Prompt (or Caption,
    Description, Short-Form ...). A caption that is empty or still holds a template slot like [Gender] is malformed."""
    text = normalize(answer)
    if not text.strip():
        raise AnswerError("empty answer")
    tail = r"[\s-]*(?:form)?[\s-]*(?:prompt|caption|description)?"
    got = fields(text, {"short": "short" + tail, "long": "long" + tail})
    short, long = _unquote(got.get("short", "")), _unquote(got.get("long", ""))
    for name, cap in (("short", short), ("long", long)):
        if not cap:
            raise AnswerError("malformed answer", f"no {name} caption")
        if re.search(r"\[(gender|ethnicity|action|environment)\]", cap, re.IGNORECASE):
            raise AnswerError("malformed answer", f"the {name} caption is the template")
    return " ".join(short.split()), " ".join(long.split())


def parse_refined(answer):
    """Textual Prompt Refiner answer -> the enhanced prompt: the text after `Enhanced Prompt:` when there is one,
    else the whole answer; an `Objects:` list after it (the paper's Example 2 has one) is cut off."""
    text = normalize(answer)
    got = fields(text, {"enhanced": r"enhanced\s*prompt", "objects": "objects", "input": r"input\s*prompt"})
    prompt = _unquote(got["enhanced"] if "enhanced" in got else re.split(r"(?i)objects\s*:", text)[0])
    if not prompt:
        raise AnswerError("empty answer")
    return " ".join(prompt.split())


def analyst_fields(answer):
    """Analyst answer -> the fields curate.py stores; a non-compliant face is a drop."""
    verdict = parse_analyst(answer)
    return {"objects": verdict["objects"], **({} if verdict["compliant"] else {"drop": "non-compliant"})}


def caption_fields(answer):
    short, long = parse_captions(answer)
    return {"caption_short": short, "caption_long": long}


def refine_fields(answer):
    return {"refined": parse_refined(answer)}


# curate.py stage -> (system prompt, user prompt, answer -> stored fields)
STAGE_PROMPTS = {"vlm_filter": (ANALYST_SYSTEM, ANALYST_USER, analyst_fields),
                 "recaption": (CAPTIONER_SYSTEM, CAPTIONER_USER, caption_fields),
                 "refine": (REFINER_SYSTEM, REFINER_USER, refine_fields)}


def records(items, answers, parse, field):
    """Answers -> stage records {key, <field>: answer, **parse(answer)}, or with "drop": the AnswerError reason
    (and "why": its detail) when the answer does not parse."""
    out = []
    for item, answer in zip(items, answers):
        rec = {"key": item["key"], field: answer[:2000]}
        try:
            rec.update(parse(answer))
        except AnswerError as e:
            rec.update(drop=e.reason, why=e.detail)
        out.append(rec)
    return out


def chat(model, processor, system, users, images=None, max_new_tokens=256):
    """One batched greedy generation of a chat model -> answers: a system message and one user message each (with
    one image each when images are given). processor: the model's processor (VLM) or tokenizer (text model), with
    padding_side="left" (new tokens are appended on the right)."""
    msgs = [[{"role": "system", "content": system},
             {"role": "user", "content": u if images is None else [{"type": "image"}, {"type": "text", "text": u}]}]
            for u in users]
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
    extra = {} if images is None else {"images": images}
    batch = processor(text=texts, padding=True, return_tensors="pt", **extra).to(model.device)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return [a.strip() for a in processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]


# -----------------------------------------------------------------------------
# Caption attributes (Fig. 5): value -> regex of its words (whole words, lower case). The value whose words occur
# first in the short caption decides (then the long one), so "a woman and her son" is female. Colour words are
# ethnicity only before a person noun ("black man", not "black jacket").

_PERSON = r"(?=[\s-]+(?:man|woman|men|women|male|female|person|people|girl|boy|lady|gentleman|child|teen\w*|adult))"
ATTRIBUTE_WORDS = {
    "gender": {"female": r"woman|women|female|girl|lady", "male": r"man|men|male|boy|gentleman"},
    "age": {"child": r"child|kid|toddler|baby|boy|girl", "young": r"young|teen\w*|youthful|20s|30s|twenties|thirties",
            "middle-aged": r"middle-aged|40s|50s|forties|fifties",
            "elderly": r"elderly|senior|older|old (?:man|woman|lady|person)|60s|70s|80s|sixties|seventies|eighties"},
    "ethnicity": {"east asian": r"east asian|chinese|japanese|korean", "south asian": r"south asian|indian",
                  "southeast asian": r"southeast asian|thai|vietnamese|filipino|filipina",
                  "black": r"african|black" + _PERSON, "white": r"caucasian|european|white" + _PERSON,
                  "hispanic": r"hispanic|latino|latina|latinx", "middle eastern": r"middle eastern|arab|persian"},
    "skin_tone": {"light": r"fair|pale|light", "medium": r"olive|tan|tanned|medium|golden", "dark": r"dark|deep|brown"},
    "expression": {"smiling": r"smil\w*|grin\w*|laugh\w*", "neutral": r"neutral|serious|calm"},
    "eyewear": {"glasses": r"glasses|sunglasses|spectacles|eyeglasses"},
}
_SKIN = r"[\s-]*(?:skin|skinned|complexion)"  # a tone word counts only before one of these


def _first(text, values, suffix=""):
    """The value whose words occur first in text, or None."""
    hits = [(m.start(), value) for value, words in values.items()
            for m in [re.search(rf"(?<![a-z0-9-])(?:{words}){suffix}(?![a-z])", text)] if m]
    return min(hits)[1] if hits else None


def caption_attributes(short, long):
    """Captions -> {attribute: value or "unknown"}; eyewear is "none" when no eyewear is mentioned."""
    out = {}
    for text in (normalize(short).lower(), normalize(long).lower()):
        for name, values in ATTRIBUTE_WORDS.items():
            out[name] = out.get(name) or _first(text, values, _SKIN if name == "skin_tone" else "")
    out = {k: v or "unknown" for k, v in out.items()}
    out["eyewear"] = "none" if out["eyewear"] == "unknown" else out["eyewear"]
    return out
