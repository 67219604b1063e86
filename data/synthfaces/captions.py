"""
What a synthfaces prompt can say: the attribute vocabulary (ATTRIBUTES), the short and long captions of a set of
attribute values (build_caption) and their inverse (parse_caption), and the word-level caption tokenizer that covers
every caption (build_tokenizer), and the phrase of an identity's looks (person_phrase: the base model learns to
draw a person from words with it, as a web-trained text-to-image model has). A library (no command line):
prepare.py writes the captions and tokenizer.json with it, the judge reads ATTRIBUTES from it, and prompts for a
context are written with build_caption.
"""

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

# -----------------------------------------------------------------------------
# What a prompt controls: attribute -> values. accessory_color is "none" iff accessory is "none".

ATTRIBUTES = {
    "background": ["red", "orange", "yellow", "green", "teal", "blue", "purple", "pink"],
    "clothing": ["red", "blue", "green", "yellow", "black", "white"],
    "accessory": ["none", "hat", "glasses", "earrings"],
    "accessory_color": ["none", "red", "blue", "gold", "black"],
    "expression": ["neutral", "smiling", "surprised", "angry"],
    "position": ["left", "center", "right"],
    "size": ["small", "medium", "large"],
    "lighting": ["even", "left", "right"],
    "style": ["photo", "flat", "sketch"],
}

# Captions: the same facts at two levels of detail (HEAR App. C: a short tag-like prompt, then an expansion with
# expression, clothing and spatial detail). Every phrase is unique to its value, so parse_caption can invert them.
SHORT = {
    "style": {"photo": "photo of", "flat": "flat illustration of", "sketch": "pencil sketch of"},
    "expression": {"neutral": "a calm person", "smiling": "a smiling person", "surprised": "a surprised person",
                   "angry": "an angry person"},
    "clothing": "in a {} shirt",
    "accessory": {"none": "with no accessories", "hat": "with a {} hat", "glasses": "with {} glasses",
                  "earrings": "with {} earrings"},
    "size": {"small": "small face", "medium": "medium face", "large": "large face"},
    "position": {"left": "on the left", "center": "in the center", "right": "on the right"},
    "lighting": {"even": "even light", "left": "lit from the left", "right": "lit from the right"},
    "background": "{} background",
}
LONG = {
    "style": {"photo": "A realistic photograph of", "flat": "A flat vector illustration of",
              "sketch": "A colored pencil sketch of"},
    "expression": {"neutral": "a person with a calm, neutral expression and relaxed brows",
                   "smiling": "a person with a broad smile and lifted cheeks",
                   "surprised": "a person with a surprised look, raised brows and an open mouth",
                   "angry": "a person with an angry frown and lowered brows"},
    "clothing": "wearing a {} crew-neck shirt",
    "accessory": {"none": "and no accessories", "hat": "and a {} brimmed hat", "glasses": "and {} round glasses",
                  "earrings": "and small {} drop earrings"},
    "size": {"small": "The head is small and far from the camera",
             "medium": "The head is at a medium distance from the camera",
             "large": "The head is a large close-up near the camera"},
    "position": {"left": "placed on the left side of the frame", "center": "placed in the middle of the frame",
                 "right": "placed on the right side of the frame"},
    "lighting": {"even": "Soft, even light falls on the whole scene", "left": "Warm light falls from the left side",
                 "right": "Warm light falls from the right side"},
    "background": "in front of a plain {} wall",
}
# An identity's looks in words (draw.TRAITS values -> phrase), for the base model's training captions only: the
# held-out prompts and HEAR's own captions never describe the person, whose looks must come from the reference face.
PERSON = {"skin": "{} skin", "hair_color": "{} hair", "hair_style": "{} haircut", "eye_shape": "{} eyes",
          "iris": "{} irises", "nose": "a {} nose", "ears": "{} ears", "facial_hair": "facial hair: {}",
          "freckles": "freckles: {}"}


def person_phrase(traits):
    """An identity's trait labels {trait: value} (draw.trait_labels) -> 'with tone 3 skin, red hair, curly haircut,
    ...' (every PERSON trait, in PERSON's order)."""
    return "with " + ", ".join(PERSON[name].format(traits[name].replace("_", " ")) for name in PERSON)


def _phrases(table, attrs):
    """The phrase of every attribute under one table (SHORT or LONG)."""
    acc = table["accessory"][attrs["accessory"]].format(attrs["accessory_color"])
    return dict(style=table["style"][attrs["style"]], expression=table["expression"][attrs["expression"]],
                clothing=table["clothing"].format(attrs["clothing"]), accessory=acc,
                size=table["size"][attrs["size"]], position=table["position"][attrs["position"]],
                lighting=table["lighting"][attrs["lighting"]],
                background=table["background"].format(attrs["background"]))


def build_caption(attrs, long=False):
    """Attributes {name: value} -> the short (default) or long caption. Eval/sample use it to write prompts."""
    p = _phrases(LONG if long else SHORT, attrs)
    if long:
        return (f"{p['style']} {p['expression']}, {p['clothing']} {p['accessory']}. {p['size']}, {p['position']}. "
                f"{p['lighting']}, {p['background']}.")
    return (f"{p['style']} {p['expression']} {p['clothing']} {p['accessory']}, {p['size']} {p['position']}, "
            f"{p['lighting']}, {p['background']}")


def parse_caption(text):
    """Caption (short or long) -> attributes {name: value}; raises ValueError unless every attribute matches once."""
    text = text.lower()
    found = {}
    for table in (SHORT, LONG):
        for name in ("style", "expression", "size", "position", "lighting"):
            for value, phrase in table[name].items():
                if phrase.lower() in text:
                    found.setdefault(name, set()).add(value)
        for name in ("clothing", "background"):
            for value in ATTRIBUTES[name]:
                if table[name].format(value).lower() in text:
                    found.setdefault(name, set()).add(value)
        for acc, phrase in table["accessory"].items():
            for color in (["none"] if acc == "none" else ATTRIBUTES["accessory_color"][1:]):
                if phrase.format(color).lower() in text:
                    found.setdefault("accessory", set()).add((acc, color))
    bad = [n for n in ("style", "expression", "size", "position", "lighting", "clothing", "background", "accessory")
           if len(found.get(n, ())) != 1]
    if bad:
        raise ValueError(f"caption does not name exactly one value of {bad}: {text!r}")
    attrs = {n: next(iter(v)) for n, v in found.items()}
    attrs["accessory"], attrs["accessory_color"] = attrs["accessory"]
    return {n: attrs[n] for n in ATTRIBUTES}



def build_tokenizer():
    """Word-level caption tokenizer (T5 conventions: <pad>=0, </s>=1, <unk>=2, '</s>' appended), lower-cased,
    split on whitespace and punctuation. The vocabulary covers every phrase of every attribute value and every
    person_phrase value, so any build_caption or person_phrase output is in-vocabulary whatever the sampled data."""
    pre = pre_tokenizers.Whitespace()  # regex \w+|[^\w\s]+
    words = set()
    for name, values in ATTRIBUTES.items():
        for value in values:
            attrs = {n: v[1] for n, v in ATTRIBUTES.items()}  # any valid base context
            attrs[name] = value
            if value == "none" and name in ("accessory", "accessory_color"):
                attrs["accessory"], attrs["accessory_color"] = "none", "none"
            for long in (False, True):
                words.update(w for w, _ in pre.pre_tokenize_str(build_caption(attrs, long).lower()))
    from data.synthfaces.draw import TRAITS  # here, not at the top: draw.py imports ATTRIBUTES from this module
    for name, values in TRAITS.items():
        if name in PERSON:
            words.update(w for value in values for w, _ in pre.pre_tokenize_str(
                person_phrase({n: value for n in PERSON}).lower()))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in sorted(words):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    return tok
