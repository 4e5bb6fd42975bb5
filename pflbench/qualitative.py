"""Predicted masks of a few fixed test cases per site, stored with a run for the report's
qualitative figure (image, ground truth and predictions side by side).

The report reads only result files, so a run stores what the figure draws: for each of its
*candidate* cases, one 2-D slice of the image (uint8, display only), the ground-truth label map and
the predicted label map of the selected (best-validation) checkpoint, in ``qualitative.npz``.

Choice of the candidates (fixed, so every method and seed stores the same cases): per site, the
``k`` test cases (``protocol.qualitative_cases``) that come first when the site's test case ids are
ordered by the SHA-256 of ``"<site>/<case_id>"`` — a spread over the test split that depends on the
case ids only, never on a method, a run seed or a score. For a case made of slices (a volume), the
slice shown is the one with the most ground-truth foreground (ties: the one nearest the middle of
the volume, then the lower slice index); it depends on the ground truth only. The report then picks
among the candidates (the reference method's median-Dice case, :mod:`pflbench.report.qualitative`).

File layout (``numpy.savez_compressed``, no pickled objects): ``client``, ``case_id`` (strings),
``slice_index`` and ``round`` (int64), ``classes`` (class names, index = class id), and per entry
``i``: ``label_i`` and ``pred_i`` (uint8 H×W class ids, lossless, full resolution: about 1 kB
each at 256 px) and ``image_i``, the image as JPEG bytes (grey or RGB, quality 85, no chroma
subsampling), shrunk so that its longer side is at most 128 px. The image is for drawing only
(the figure stretches it under the full-resolution masks) and is what would make the file large:
a 256 px synthetic slice takes about 3–5 kB so, 17 kB as a full-size JPEG and 65–200 kB
uncompressed; a run of 6 sites × 3 cases at 256 px stores about 60 kB. Storing the masks changes
no number of a run and is not part of its key.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

FILE = "qualitative.npz"
JPEG_QUALITY = 85
#: Longest side (pixels) of the stored display image; the masks keep their full resolution.
IMAGE_SIDE = 128


@dataclass
class Case:
    """One stored case: the slice drawn and the predicted label map of the selected round."""

    client: str
    case_id: str
    slice_index: int
    round: int
    image: np.ndarray  # uint8 h×w×C, C = 1 or 3 (stored shrunk, as JPEG: drawing only)
    label: np.ndarray  # uint8 H×W class ids
    pred: np.ndarray  # uint8 H×W class ids


def candidate_cases(site: str, case_ids: Sequence[str], k: int) -> list[str]:
    """The ``k`` candidate cases of a site (see the module docstring), in their chosen order."""
    distinct = list(dict.fromkeys(case_ids))
    order = sorted(distinct, key=lambda c: (hashlib.sha256(f"{site}/{c}".encode()).digest(), c))
    return order[: max(0, k)]


def representative_slice(labels: np.ndarray) -> int:
    """Index (into the first axis of ``labels``, S×H×W in slice order) of the slice shown for a
    case: most foreground pixels, ties nearest the middle, then the lower index."""
    fg = (np.asarray(labels).reshape(len(labels), -1) > 0).sum(axis=1)
    mid = (len(labels) - 1) / 2
    return min(range(len(labels)), key=lambda i: (-int(fg[i]), abs(i - mid), i))


def display_image(image: np.ndarray) -> np.ndarray:
    """C×H×W float in [0, 1] → uint8 H×W×C for drawing: RGB for three channels, else the first
    channel (a multi-modal scan shows its first modality)."""
    img = np.asarray(image, dtype=np.float32)
    img = img[:3] if img.shape[0] == 3 else img[:1]
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def label_map(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"class ids must lie in 0..255 to be stored, got {arr.min()}..{arr.max()}")
    return arr.astype(np.uint8)


def encode_image(image: np.ndarray) -> np.ndarray:
    """uint8 H×W×C (C = 1 or 3) → JPEG bytes as a uint8 array, the longer side shrunk to at most
    :data:`IMAGE_SIDE` (see the module docstring)."""
    img = np.asarray(image, dtype=np.uint8)
    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    scale = IMAGE_SIDE / max(pil.size)
    if scale < 1:
        size = (max(1, round(pil.size[0] * scale)), max(1, round(pil.size[1] * scale)))
        pil = pil.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def decode_image(blob: np.ndarray) -> np.ndarray:
    """The inverse of :func:`encode_image`: uint8 H×W×C."""
    with Image.open(io.BytesIO(np.asarray(blob, dtype=np.uint8).tobytes())) as pil:
        img = np.asarray(pil.convert("L" if pil.mode == "L" else "RGB"))
    return img[..., None] if img.ndim == 2 else img


def to_bytes(cases: Sequence[Case], classes: Sequence[str]) -> bytes:
    """The ``qualitative.npz`` content of ``cases``."""
    arrays: dict[str, np.ndarray] = {
        "client": np.array([c.client for c in cases], dtype=str),
        "case_id": np.array([c.case_id for c in cases], dtype=str),
        "slice_index": np.array([c.slice_index for c in cases], dtype=np.int64),
        "round": np.array([c.round for c in cases], dtype=np.int64),
        "classes": np.array(list(classes), dtype=str),
    }
    for i, c in enumerate(cases):
        arrays[f"image_{i}"] = encode_image(c.image)
        arrays[f"label_{i}"] = c.label
        arrays[f"pred_{i}"] = c.pred
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def from_bytes(blob: bytes) -> tuple[list[Case], list[str]]:
    """The cases and class names of a ``qualitative.npz`` (raises ValueError when malformed)."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        n = len(z["case_id"])
        cases = [
            Case(
                client=str(z["client"][i]),
                case_id=str(z["case_id"][i]),
                slice_index=int(z["slice_index"][i]),
                round=int(z["round"][i]),
                image=decode_image(z[f"image_{i}"]),
                label=z[f"label_{i}"],
                pred=z[f"pred_{i}"],
            )
            for i in range(n)
        ]
        classes = [str(x) for x in z["classes"]]
    return cases, classes
