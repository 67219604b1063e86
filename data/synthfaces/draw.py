"""
How a synthfaces identity is drawn (a library: prepare.py writes the data set with it, the judge's trait readers draw
identities of their own with it). An identity is a generator that fixes face shape, skin tone, eyes, brows, nose,
mouth, ears, hair, facial hair and a fine mole/freckle pattern (sample_identity; its class labels: trait_labels,
TRAITS); an image adds what a prompt controls (sample_attributes) and is rendered on a supersampled canvas (render).
Every pixel is a function of the generator's draws.
"""

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from face_detect import square_box
from data.synthfaces.captions import ATTRIBUTES


# -----------------------------------------------------------------------------
# Identity traits (fixed per identity) and per-image attributes

SKIN_TONES = [(255, 224, 196), (241, 194, 160), (224, 172, 125), (198, 134, 90), (160, 102, 64), (112, 72, 48)]
HAIR_COLORS = [(28, 24, 24), (82, 52, 32), (138, 90, 52), (222, 192, 112), (166, 64, 32), (150, 150, 150),
               (236, 234, 226)]
IRIS_COLORS = [(96, 58, 30), (60, 122, 205), (58, 140, 78), (118, 128, 140), (190, 132, 40), (30, 26, 22)]
HAIR_STYLES = ["short", "side_part", "spiky", "curly", "long", "bob", "bun", "bald"]
EYE_SHAPES = [0.78, 0.56, 0.40]  # eye height / width: round, almond, narrow
BACKGROUND_RGB = {"red": (200, 50, 50), "orange": (240, 140, 40), "yellow": (238, 214, 70), "green": (70, 170, 80),
                  "teal": (40, 160, 160), "blue": (62, 100, 212), "purple": (130, 70, 182), "pink": (240, 150, 200)}
CLOTHING_RGB = {"red": (190, 30, 40), "blue": (30, 60, 170), "green": (30, 130, 50), "yellow": (235, 200, 40),
                "black": (28, 28, 32), "white": (242, 242, 242)}
ACCESSORY_RGB = {"red": (225, 30, 30), "blue": (30, 80, 235), "gold": (235, 180, 30), "black": (18, 18, 18)}
SIZE_FRAC = {"small": 0.40, "medium": 0.50, "large": 0.60}  # face height / image height
POSITION_FRAC = {"left": 0.33, "center": 0.50, "right": 0.67}  # face centre x / image width


def sample_identity(rng):
    """Draw the fixed traits of one identity. Lengths are in units of the face half-width a / half-height b."""
    t = {"skin_tone": int(rng.integers(len(SKIN_TONES)))}
    tone = np.array(SKIN_TONES[t["skin_tone"]]) + rng.integers(-10, 11, 3)
    t["skin"] = tuple(int(c) for c in np.clip(tone, 0, 255))
    t["aspect"] = rng.uniform(0.68, 0.86)  # face width / height
    t["squareness"] = rng.uniform(2.0, 3.4)  # superellipse exponent of the face outline (2 = ellipse)
    t["chin"] = rng.uniform(0.0, 0.45)  # narrowing of the lower face towards the chin
    t["eye_ratio"] = EYE_SHAPES[rng.integers(3)]
    t["eye_size"] = rng.uniform(0.26, 0.36)  # eye width / a
    t["eye_spacing"] = rng.uniform(0.36, 0.50)  # eye centre offset from the midline / a
    t["eye_y"] = rng.uniform(-0.22, -0.02)  # eye height / b (0 = face centre)
    t["iris"] = IRIS_COLORS[rng.integers(len(IRIS_COLORS))]
    t["brow_thick"] = rng.uniform(0.04, 0.11)
    t["brow_arch"] = rng.uniform(-0.04, 0.08)
    t["brow_tilt"] = rng.uniform(-0.07, 0.07)
    t["brow_gap"] = rng.uniform(0.10, 0.20)
    t["nose_type"] = int(rng.integers(3))  # line, triangle, button
    t["nose_len"] = rng.uniform(0.22, 0.40)
    t["nose_width"] = rng.uniform(0.16, 0.32)
    t["mouth_y"] = max(rng.uniform(0.48, 0.66), t["eye_y"] + t["nose_len"] + 0.16)
    t["mouth_width"] = rng.uniform(0.34, 0.60)
    t["lip"] = rng.uniform(0.035, 0.08)
    lip = 0.65 * np.array(t["skin"]) + 0.35 * np.array([(196, 70, 80), (170, 60, 60), (150, 80, 90)][rng.integers(3)])
    t["lip_color"] = tuple(int(c) for c in lip)
    t["ear_shape"] = int(rng.integers(3))  # round, pointed, long
    t["ear_size"] = rng.uniform(0.8, 1.3)
    t["hair_style"] = HAIR_STYLES[rng.integers(len(HAIR_STYLES))]
    t["hair"] = HAIR_COLORS[rng.integers(len(HAIR_COLORS))]
    t["hairline"] = rng.uniform(0.35, 0.62)  # hairline height above the face centre / b
    t["hair_side"] = int(rng.choice([-1, 1]))  # side of the fringe of side_part
    t["facial_hair"] = ["none", "moustache", "beard", "goatee"][rng.choice(4, p=[0.55, 0.15, 0.15, 0.15])]
    # fine marks: 1-4 moles (about 2 px wide at 64x64) and for some identities a freckle pattern (about 1 px each)
    t["moles"] = [_free_spot(rng, t) + (rng.uniform(0.55, 0.85),) for _ in range(rng.integers(1, 5))]
    t["freckles"] = [_free_spot(rng, t) for _ in range(rng.integers(6, 13) if rng.random() < 0.4 else 0)]
    return t


# The identity traits a trait reader can be scored on (data/synthfaces/judge.py), as class labels. Coarse traits span
# many pixels; fine traits are the 1-2 px ones only the finest token scales carry (the iris, freckles, moles).
TRAITS = {"skin": [f"tone {k + 1}" for k in range(len(SKIN_TONES))],
          "hair_color": ["black", "dark brown", "light brown", "blond", "red", "grey", "white"],
          "hair_style": HAIR_STYLES, "eye_shape": ["round", "almond", "narrow"], "nose": ["line", "triangle", "button"],
          "ears": ["round", "pointed", "long"], "facial_hair": ["none", "moustache", "beard", "goatee"],
          "iris": ["brown", "blue", "green", "grey", "amber", "black"], "freckles": ["no", "yes"],
          "moles": ["1", "2", "3", "4"]}
COARSE_TRAITS = ["skin", "hair_color", "hair_style", "eye_shape", "nose", "ears", "facial_hair"]
# the fine traits a reader can score: the judge's readers read the mole count (1-4 dots of about 2 px among up to 12
# freckles) no better than always guessing the commonest count, so "moles" is recorded but left out of the summary
FINE_TRAITS = ["iris", "freckles"]


def trait_labels(t):
    """sample_identity's traits -> {trait: value of TRAITS[trait]}."""
    index = dict(skin=t["skin_tone"], hair_color=HAIR_COLORS.index(t["hair"]),
                 hair_style=HAIR_STYLES.index(t["hair_style"]), eye_shape=EYE_SHAPES.index(t["eye_ratio"]),
                 nose=t["nose_type"], ears=t["ear_shape"], facial_hair=TRAITS["facial_hair"].index(t["facial_hair"]),
                 iris=IRIS_COLORS.index(t["iris"]), freckles=int(len(t["freckles"]) > 0), moles=len(t["moles"]) - 1)
    return {name: TRAITS[name][index[name]] for name in TRAITS}


def _free_spot(rng, t):
    """A (u, v) face position for a mark that does not sit on the eyes, nose or mouth (rejection sampling)."""
    while True:
        u, v = rng.uniform(-0.75, 0.75), rng.uniform(-0.5, 0.85)
        if u * u + v * v > 0.8:
            continue
        on_eye = abs(v - t["eye_y"]) < 0.2 and abs(abs(u) - t["eye_spacing"]) < t["eye_size"] * 0.7
        on_nose = abs(u) < 0.18 and t["eye_y"] < v < t["eye_y"] + t["nose_len"] + 0.08
        on_mouth = abs(v - t["mouth_y"]) < 0.12 and abs(u) < t["mouth_width"] / 2 + 0.08
        if not (on_eye or on_nose or on_mouth):
            return (float(u), float(v))


def sample_attributes(rng):
    """Draw the prompt-controlled attributes of one image, uniformly and independently."""
    attrs = {name: vals[rng.integers(len(vals))] for name, vals in ATTRIBUTES.items() if name != "accessory_color"}
    colors = ATTRIBUTES["accessory_color"][1:]
    attrs["accessory_color"] = "none" if attrs["accessory"] == "none" else colors[rng.integers(len(colors))]
    return {name: attrs[name] for name in ATTRIBUTES}


# -----------------------------------------------------------------------------
# Rendering: one image is drawn on a supersampled canvas from back to front (backdrop, ears, face, marks, facial
# hair, eyes and brows, nose, mouth, hair, accessory), then shaded, box-filtered down and cropped.

PAPER = (250, 248, 240)  # the sketch style's paper
PENCIL = (52, 46, 40)  # the sketch style's outlines
EAR_V = 0.02  # height of the ear centres, in units of the face half-height b
EYE_OPENING = {"neutral": 1.0, "smiling": 0.7, "surprised": 1.4, "angry": 0.75}  # eye height factor per expression


def _mul(color, k):
    return tuple(int(min(255, max(0, c * k))) for c in color)


def _mix(color, other, k):
    return tuple(int(round(c * (1 - k) + o * k)) for c, o in zip(color, other))


def face_outline(fx, fy, a, b, squareness, chin, n=64):
    """Superellipse face outline, narrowed towards the chin: n points [(x, y)] in pixels (y down)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    x = np.sign(c) * np.abs(c) ** (2 / squareness)
    y = np.sign(s) * np.abs(s) ** (2 / squareness)
    x = x * (1 - chin * np.clip(y, 0, None) ** 2)
    return [(float(fx + a * xi), float(fy + b * yi)) for xi, yi in zip(x, y)]


class Canvas:
    """The supersampled drawing of one image (PIL image + pen, side R = resolution * S) and its face frame: centre
    (fx, fy), half-width a and half-height b in canvas pixels, so face coordinates (u, v) = (+-1, +-1) reach the
    outline. The style sets fills and outlines: sketch keeps hues (prompts name colours) but pales the big fills and
    outlines every shape in pencil."""

    def __init__(self, attrs, aspect, resolution, supersample, jitter):
        self.S, self.R, self.style = supersample, resolution * supersample, attrs["style"]
        fh = (SIZE_FRAC[attrs["size"]] + jitter[2]) * self.R  # face height
        self.a, self.b = fh * aspect / 2, fh / 2
        self.fx, self.fy = (POSITION_FRAC[attrs["position"]] + jitter[0]) * self.R, (0.45 + jitter[1]) * self.R
        self.line = dict(outline=PENCIL, width=max(1, supersample // 2)) if self.style == "sketch" else {}
        self.image = Image.new("RGB", (self.R, self.R), self.fill(BACKGROUND_RGB[attrs["background"]]))
        self.draw = ImageDraw.Draw(self.image)

    def fill(self, color):
        """The colour of a big filled shape in this style."""
        return _mix(color, PAPER, 0.5) if self.style == "sketch" else color

    def pt(self, u, v):
        """Face coordinates -> canvas pixels (x, y)."""
        return (self.fx + u * self.a, self.fy + v * self.b)

    def box(self, u0, v0, u1, v1):
        """Face-coordinate corners -> canvas box [x0, y0, x1, y1]."""
        return [self.fx + u0 * self.a, self.fy + v0 * self.b, self.fx + u1 * self.a, self.fy + v1 * self.b]

    def disc(self, x, y, r, **style):
        """A disc of radius r (canvas pixels) around canvas point (x, y)."""
        self.draw.ellipse([x - r, y - r, x + r, y + r], **style)


def render(t, attrs, resolution=64, crop_size=64, crop_scale=1.4, supersample=4, jitter=(0.0, 0.0, 0.0), rng=None):
    """Draw one image of identity traits t in context attrs.
    jitter = (dx, dy, dsize) as fractions of the image side; rng (numpy Generator) draws the photo-style noise.
    Returns (image PIL RGB resolution^2, crop PIL RGB crop_size^2, face_box [x0, y0, x1, y1] in image pixels)."""
    c = Canvas(attrs, t["aspect"], resolution, supersample, jitter)
    expr = attrs["expression"]
    _backdrop(c, t, attrs)
    _ears(c, t)
    outline, face_box = _face(c, t)
    _marks(c, t)
    _facial_hair(c, t, outline)  # under the mouth
    for sgn in (-1, 1):  # left, right
        eye_height = _eye(c, t, expr, sgn)
        _brow(c, t, expr, sgn, eye_height)
    _nose(c, t)
    _mouth(c, t, expr)
    _hair(c, t)
    _accessory(c, t, attrs)
    return _downsample_and_crop(_shade(c, attrs), c, face_box, resolution, crop_size, crop_scale, rng)


def _backdrop(c, t, attrs):
    """Everything behind the head: sketch hatching on the background, the body (clothing), long hair, and the neck
    in shadow (never the exact skin colour)."""
    d, S, R = c.draw, c.S, c.R
    if c.style == "sketch":  # diagonal hatching
        for k in range(-R, R, 5 * S):
            d.line([(k, R), (k + R, 0)], fill=_mul(c.fill(BACKGROUND_RGB[attrs["background"]]), 0.88), width=S // 2)
    d.rounded_rectangle(c.box(-2.0, 1.25, 2.0, 1.25 + R / c.b), radius=0.9 * c.a,
                        fill=c.fill(CLOTHING_RGB[attrs["clothing"]]), **c.line)
    if t["hair_style"] in ("long", "bob"):
        bottom = 1.45 if t["hair_style"] == "long" else 0.8
        d.rounded_rectangle(c.box(-1.32, -1.05, 1.32, bottom), radius=0.6 * c.a, fill=c.fill(t["hair"]), **c.line)
    d.rectangle(c.box(-0.42, 0.5, 0.42, 1.4), fill=c.fill(_mul(t["skin"], 0.72)))


def _ear_size(t):
    """(width, half-height) of an ear in face units."""
    return 0.26 * t["ear_size"], 0.30 * t["ear_size"] * (1.35 if t["ear_shape"] == 2 else 1.0)


def _ears(c, t):
    """Round, pointed or long ears, centred at u = +-0.97 so the face covers their inner edge."""
    ew, eh = _ear_size(t)
    skin = t["skin"]
    for sgn in (-1, 1):
        cu = sgn * 0.97
        if t["ear_shape"] == 1:  # pointed: an ellipse with a tip at the top
            arc = np.linspace(-0.3, np.pi + 0.3, 12)
            pts = [c.pt(cu + sgn * ew / 2 * np.cos(q), EAR_V + eh * np.sin(q)) for q in arc]
            c.draw.polygon(pts + [c.pt(cu + sgn * ew * 0.45, EAR_V - eh * 1.45)], fill=c.fill(skin), **c.line)
        else:
            c.draw.ellipse(c.box(cu - ew / 2, EAR_V - eh, cu + ew / 2, EAR_V + eh), fill=c.fill(skin), **c.line)
        c.draw.ellipse(c.box(cu - ew / 5, EAR_V - eh / 2, cu + ew / 5, EAR_V + eh / 2), fill=c.fill(_mul(skin, 0.84)))


def _face(c, t):
    """The skin of the face. Returns its outline [(x, y)] and the face box [x0, y0, x1, y1] in canvas pixels:
    outline and both ears (hair and hat excluded)."""
    outline = face_outline(c.fx, c.fy, c.a, c.b, t["squareness"], t["chin"])
    c.draw.polygon(outline, fill=c.fill(t["skin"]), **c.line)
    ew, _ = _ear_size(t)
    xs = [p[0] for p in outline] + [c.fx - (0.97 + ew / 2) * c.a, c.fx + (0.97 + ew / 2) * c.a]
    return outline, [min(xs), c.fy - c.b, max(xs), c.fy + c.b]


def _marks(c, t):
    """Fine marks: freckles (about 1 px at 64x64) and moles (about 2 px)."""
    for u, v in t["freckles"]:
        c.disc(*c.pt(u, v), 0.45 * c.S, fill=_mul(t["skin"], 0.70))
    for u, v, r in t["moles"]:
        c.disc(*c.pt(u, v), r * c.S, fill=_mul(t["skin"], 0.38))


def _facial_hair(c, t, outline):
    """A beard (the face outline below the cheeks), a goatee or a moustache."""
    hair, my = t["hair"], t["mouth_y"]
    if t["facial_hair"] == "beard":
        c.draw.polygon([p for p in outline if p[1] > c.fy + 0.3 * c.b], fill=c.fill(hair), **c.line)
    elif t["facial_hair"] == "goatee":
        c.draw.ellipse(c.box(-0.22, my + 0.07, 0.22, 0.98), fill=c.fill(hair))
    elif t["facial_hair"] == "moustache":
        mw = t["mouth_width"] * 0.6
        c.draw.polygon([c.pt(-mw, my - 0.04), c.pt(0, my - 0.16), c.pt(mw, my - 0.04), c.pt(0, my - 0.08)], fill=hair)


def _eye(c, t, expr, sgn):
    """One eye (sgn -1 left, +1 right): sclera, iris, pupil, highlight, upper lid; the expression changes the
    opening. Returns the eye height in canvas pixels."""
    ex, ey = c.pt(sgn * t["eye_spacing"], t["eye_y"])
    w = t["eye_size"] * c.a
    h = w * t["eye_ratio"] * EYE_OPENING[expr]
    eye = [ex - w / 2, ey - h / 2, ex + w / 2, ey + h / 2]
    c.draw.ellipse(eye, fill=(245, 245, 238), outline=(40, 30, 30), width=max(1, c.S // 2))
    ri = min(0.5 * h, 0.32 * w)  # iris radius
    c.disc(ex, ey, ri, fill=t["iris"])
    c.disc(ex, ey, 0.45 * ri, fill=(12, 10, 10))
    c.disc(ex + 0.35 * ri, ey - 0.35 * ri, 0.22 * ri, fill=(255, 255, 255))
    c.draw.arc(eye, 190, 350, fill=(30, 22, 22), width=max(1, c.S // 2 + 1))
    return h


def _brow(c, t, expr, sgn, eye_height):
    """The brow over one eye through an inner, middle and outer point; angry pulls the inner end down, surprised
    lifts the whole brow."""
    lift = {"surprised": -0.13, "angry": -0.03}.get(expr, 0.0)
    by = t["eye_y"] - eye_height / c.b / 2 - t["brow_gap"] + lift
    inner_drop = t["brow_tilt"] + (0.2 if expr == "angry" else 0.0)
    inner = c.pt(sgn * (t["eye_spacing"] - t["eye_size"] * 0.55), by + inner_drop)
    mid = c.pt(sgn * t["eye_spacing"], by - t["brow_arch"])
    outer = c.pt(sgn * (t["eye_spacing"] + t["eye_size"] * 0.65), by)
    c.draw.line([inner, mid, outer], fill=_mul(t["hair"], 0.75), width=max(c.S, int(t["brow_thick"] * c.b)),
                joint="curve")


def _nose(c, t):
    """A line, a triangle or a button, the last two with nostrils."""
    top, tip = t["eye_y"] + 0.05, t["eye_y"] + t["nose_len"]
    nw = t["nose_width"] / 2
    dark = _mul(t["skin"], 0.62)
    if t["nose_type"] == 0:
        c.draw.line([c.pt(0.03, top), c.pt(0.07, tip), c.pt(-nw, tip)], fill=dark, width=max(1, c.S // 2 + 1),
                    joint="curve")
        return
    if t["nose_type"] == 1:
        c.draw.polygon([c.pt(0, top), c.pt(nw, tip), c.pt(-nw, tip)], fill=_mul(t["skin"], 0.86))
    else:
        c.draw.ellipse(c.box(-nw, tip - 0.1, nw, tip + 0.02), fill=_mul(t["skin"], 0.88))
    for sgn in (-1, 1):
        c.disc(*c.pt(sgn * nw * 0.5, tip), 0.5 * c.S, fill=dark)


def _mouth(c, t, expr):
    """The expression decides the shape, the identity its width, height and lip colour."""
    d = c.draw
    mw, my, lt, lip = t["mouth_width"], t["mouth_y"], max(c.S, int(t["lip"] * c.b)), t["lip_color"]
    if expr == "neutral":
        d.line([c.pt(-mw / 2, my), c.pt(mw / 2, my)], fill=lip, width=lt)
        d.line([c.pt(-mw / 2, my), c.pt(mw / 2, my)], fill=_mul(lip, 0.55), width=max(1, c.S // 2))
    elif expr == "smiling":
        d.chord(c.box(-mw * 0.62, my - 0.16, mw * 0.62, my + 0.2), 0, 180, fill=(110, 24, 34), outline=lip, width=lt)
        d.rectangle(c.box(-mw * 0.4, my + 0.02, mw * 0.4, my + 0.06), fill=(246, 244, 236))
    elif expr == "surprised":
        d.ellipse(c.box(-0.15, my - 0.12, 0.15, my + 0.15), fill=(80, 20, 28), outline=lip, width=max(1, lt * 2 // 3))
    else:  # angry: an open frown (a dome, the smile's bowl upside down)
        d.chord(c.box(-mw * 0.55, my - 0.1, mw * 0.55, my + 0.34), 180, 360, fill=(90, 20, 30), outline=lip, width=lt)


def _hair(c, t):
    """Hair on top of the head: a cap down to the hairline, then the style (long hair behind the head is part of
    the backdrop); bald heads get tufts above the ears."""
    d, hs, hair = c.draw, t["hair_style"], c.fill(t["hair"])
    if hs == "bald":
        for sgn in (-1, 1):
            d.ellipse(c.box(min(sgn * 0.84, sgn * 1.08), -0.45, max(sgn * 0.84, sgn * 1.08), 0.0), fill=hair)
        return
    line_v, top_v = -t["hairline"] - (0.12 if hs == "spiky" else 0.0), -1.13
    if hs == "spiky":
        for u in np.linspace(-0.8, 0.8, 7):
            v_top = top_v * np.sqrt(max(0.0, 1 - u * u / 1.15)) - 0.05
            d.polygon([c.pt(u - 0.16, v_top + 0.15), c.pt(u, v_top - 0.28), c.pt(u + 0.16, v_top + 0.15)], fill=hair,
                      **c.line)
    if hs == "curly":
        for q in np.linspace(np.pi * 1.03, np.pi * 1.97, 9):
            x, y = c.pt(1.02 * np.cos(q), 0.5 * (top_v + line_v) + 0.5 * (line_v - top_v) * np.sin(q) * 1.05)
            c.disc(x, y, 0.24 * c.a, fill=hair, **c.line)
    d.chord(c.box(-1.07, top_v, 1.07, 2 * line_v - top_v), 180, 360, fill=hair, **c.line)  # the cap
    if hs == "bun":
        d.ellipse(c.box(-0.3, top_v - 0.42, 0.3, top_v + 0.05), fill=hair, **c.line)
    if hs in ("long", "bob"):  # side curtains over the ears
        low = 1.3 if hs == "long" else 0.6
        for sgn in (-1, 1):
            d.rectangle(c.box(min(sgn * 0.84, sgn * 1.3), line_v, max(sgn * 0.84, sgn * 1.3), low), fill=hair)
    else:  # sideburns
        for sgn in (-1, 1):
            d.rectangle(c.box(min(sgn * 0.86, sgn * 1.05), line_v, max(sgn * 0.86, sgn * 1.05), -0.05), fill=hair)
    if hs == "side_part":
        s = t["hair_side"]
        d.polygon([c.pt(s * 1.0, line_v - 0.02), c.pt(-s * 0.15, line_v - 0.02), c.pt(s * 0.95, line_v + 0.38)],
                  fill=hair)


def _accessory(c, t, attrs):
    """A hat, glasses or earrings in the prompt's colour (or nothing)."""
    if attrs["accessory"] == "none":
        return
    color = ACCESSORY_RGB[attrs["accessory_color"]]
    d = c.draw
    if attrs["accessory"] == "hat":  # crown, band, brim
        brim_v, top_v = -0.62, -1.55
        d.chord(c.box(-1.03, top_v, 1.03, 2 * brim_v - top_v), 180, 360, fill=c.fill(color), **c.line)
        d.rectangle(c.box(-1.0, brim_v - 0.26, 1.0, brim_v - 0.12), fill=_mul(color, 0.6))
        d.rounded_rectangle(c.box(-1.5, brim_v - 0.08, 1.5, brim_v + 0.07), radius=0.05 * c.b, fill=c.fill(color),
                            **c.line)
    elif attrs["accessory"] == "glasses":  # a rim around each eye, temples to the ears, a bridge
        rim, inner = max(c.S, int(0.1 * c.a)), []
        for sgn in (-1, 1):
            ex, ey = c.pt(sgn * t["eye_spacing"], t["eye_y"])
            rx, ry = 0.8 * t["eye_size"] * c.a, 0.55 * t["eye_size"] * c.a
            d.ellipse([ex - rx, ey - ry, ex + rx, ey + ry], outline=color, width=rim)
            inner.append((ex - sgn * rx, ey))
            d.line([(ex + sgn * rx, ey), c.pt(sgn * 0.97, t["eye_y"] + 0.05)], fill=color, width=rim)
        d.line(inner, fill=color, width=rim)
    else:  # earrings: drops under the ear lobes
        _, eh = _ear_size(t)
        for sgn in (-1, 1):
            c.disc(*c.pt(sgn * 0.99, EAR_V + eh + 0.06), 0.13 * c.a, fill=color, outline=_mul(color, 0.5),
                   width=max(1, c.S // 2))


def _shade(c, attrs):
    """Photo style: soft focus, a shadow ring at the face border, a vignette; lighting: a horizontal gain ramp.
    Computed in float. Returns the shaded canvas (PIL)."""
    img, R = c.image, c.R
    if c.style == "photo":
        img = img.filter(ImageFilter.GaussianBlur(0.35 * c.S))
    if c.style != "photo" and attrs["lighting"] == "even":
        return img
    x = (np.arange(R, dtype=np.float32) + 0.5) / R
    gain = np.ones((R, R), np.float32)
    if c.style == "photo":
        u = ((np.arange(R, dtype=np.float32)[None, :] - c.fx) / c.a) ** 2
        v = ((np.arange(R, dtype=np.float32)[:, None] - c.fy) / c.b) ** 2
        gain *= 1 - 0.22 * np.exp(-((u + v - 1.0) ** 2) / 0.08)  # a shadow ring at the face border
        gain *= 1 - 0.3 * ((x[None, :] - 0.5) ** 2 + (x[:, None] - 0.5) ** 2)  # vignette
    if attrs["lighting"] != "even":
        ramp = 1.12 - 0.44 * x  # bright on the left
        gain *= (ramp if attrs["lighting"] == "left" else ramp[::-1])[None, :]
    return Image.fromarray(np.clip(np.asarray(img, np.float32) * gain[:, :, None] + 0.5, 0, 255).astype(np.uint8))


def _downsample_and_crop(img, c, face_box, resolution, crop_size, crop_scale, rng):
    """Box-filter the canvas down to the image, and cut the reference crop from the canvas (sharper than the image,
    like a close-up reference photo): the window is face_detect.square_box, the one framing of every face crop,
    and the canvas is edge-padded so faces near the border still get a full square crop. Photo style adds sensor
    noise to both. Returns (image, crop, face box in image pixels)."""
    image = img.resize((resolution, resolution), Image.BOX)
    x0, y0, x1, y1 = square_box(torch.tensor(face_box, dtype=torch.float64), crop_scale).tolist()  # the crop window
    pad = int(np.ceil(max(-x0, -y0, x1 - c.R, y1 - c.R, 0))) + 1
    canvas = Image.fromarray(np.pad(np.asarray(img), ((pad, pad), (pad, pad), (0, 0)), mode="edge"))
    crop = canvas.resize((crop_size, crop_size), Image.BOX, box=(x0 + pad, y0 + pad, x1 + pad, y1 + pad))
    if c.style == "photo" and rng is not None:  # sensor noise
        image, crop = (Image.fromarray(np.clip(np.asarray(im, np.float32) + rng.normal(0, 3.0, (*im.size[::-1], 3)),
                                               0, 255).round().astype(np.uint8)) for im in (image, crop))
    return image, crop, [round(float(np.clip(v / c.S, 0, resolution)), 2) for v in face_box]



def identity_rng(seed, split, ordinal):
    """The generator of one identity: independent of worker order and of the other split's size."""
    return np.random.default_rng([seed, 0 if split == "train" else 1, ordinal])
