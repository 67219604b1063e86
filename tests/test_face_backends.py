"""face_encoder.py face backends: the real dlib backend (HOG + 5 landmarks + ResNet-128 from face-recognition-models)
on skimage's public-domain astronaut() photo, the multi-face policy, and backend selection by make_face_detector."""

import copy

import numpy as np
import pytest
from skimage.data import astronaut, camera
from skimage.transform import resize

import face_detect as fd
import face_encoder as fe

FACE = (183, 75, 270, 173)  # astronaut(): hairline to chin, cheek to cheek, measured by eye on a 3x zoom


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h)


def shrink(image, side):
    return (resize(image, (side, side), anti_aliasing=True) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def dlib_backend():
    return fd.make_face_detector("dlib")


def test_dlib_finds_the_astronaut_face_not_the_patch(dlib_backend):
    image = astronaut()
    raw = dlib_backend.hog.run(image, dlib_backend.upsample, dlib_backend.det_thresh)[0]
    assert len(raw) == 2  # HOG also fires on the mission patch, at almost the face's size: the policy must drop it
    faces = dlib_backend(image)
    assert len(faces) == 1 and dlib_backend.name == "dlib"
    f = faces[0]
    assert iou(f["box"], FACE) > 0.6, f["box"]
    assert f["kps"].shape == (5, 2) and np.all((f["kps"] > f["box"][:2]) & (f["kps"] < f["box"][2:]))
    assert f["embedding"].shape == (128,) and abs(np.linalg.norm(f["embedding"]) - 1) < 1e-5
    mirrored = dlib_backend(image[:, ::-1])[0]["box"]  # the box mirrors with the photo
    assert iou(mirrored, (512 - FACE[2], FACE[1], 512 - FACE[0], FACE[3])) > 0.6


def test_dlib_identity_similarity(dlib_backend):
    image = astronaut()
    ref = dlib_backend(image)[0]["embedding"]
    gray = np.repeat(image.mean(-1, keepdims=True), 3, -1).round().astype(np.uint8)
    same = [dlib_backend(x)[0]["embedding"] @ ref for x in (image[:, ::-1], shrink(image, 300), gray)]
    lenient = copy.copy(dlib_backend)  # the cameraman's face is half hidden by his camera: HOG margin -0.1
    lenient.det_thresh = -0.3
    other = lenient(np.repeat(camera()[..., None], 3, -1))[0]["embedding"] @ ref
    # dlib's same-person rule, Euclidean d < 0.6 on raw descriptors of norm ~1.4, is cos > ~0.9 (see DlibDetector);
    # measured: mirror / 300 px / grayscale 0.99, cameraman 0.83
    assert min(same) > 0.95 and other < 0.9, (same, other)


def test_two_faces_largest_first_with_warning(dlib_backend, capsys):
    image = astronaut()
    pair = np.zeros((512, 812, 3), np.uint8)
    pair[:, :512], pair[:300, 512:] = image, shrink(image, 300)  # two real faces: 91 px (score 1.16), 53 px (1.26)
    faces = dlib_backend(pair)
    assert len(faces) == 2 and iou(faces[0]["box"], FACE) > 0.6 and faces[0]["score"] < faces[1]["score"]
    assert iou(fd.detect_face(pair, dlib_backend, "pair.png")["box"], FACE) > 0.6
    assert "2 faces found in pair.png; using the largest" in capsys.readouterr().out


def test_make_face_detector_picks_and_explains(tmp_path):
    logged = []
    auto = fd.make_face_detector("auto", root=str(tmp_path), log=logged.append)  # no InsightFace pack there
    assert auto.name == "dlib" and auto.det_thresh == 0.0
    assert "dlib" in logged[0] and str(tmp_path) in logged[0]
    assert fd.make_face_detector("none") is None
    for kind, words in [("insightface", ["buffalo_l", str(tmp_path)]), ("mtcnn", ["auto, insightface, dlib"])]:
        with pytest.raises(fe.FaceError) as e:
            fd.make_face_detector(kind, root=str(tmp_path))
        assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)
    with pytest.raises(fe.FaceError, match="shape_predictor_5_face_landmarks.dat missing"):
        fd.DlibDetector(models=str(tmp_path))
    with pytest.raises(fe.FaceError, match=r"no face found in flat.png \(dlib, threshold 0.0\)"):
        fd.detect_face(np.full((200, 200, 3), 128, np.uint8), auto, "flat.png")
