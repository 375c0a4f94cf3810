"""A fixture source in the folder layout (one sub-folder per identity, images inside), with drawn faces.

The faces are procedural (an ellipse head, eyes, brows, nose, mouth, hair) with per-identity geometry and colours
and small per-image jitter, plus fine noise so that a 112x112 PNG weighs about 20-25 KB like a DigiFace crop.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def draw_face(identity_index: int, image_index: int = 0, size: int = 112, noise: float = 6.0) -> Image.Image:
    """A face drawn for (identity, image): the identity fixes shape and colours, the image index jitters pose/light."""
    ident = np.random.default_rng(10_007 * identity_index + 17)
    shot = np.random.default_rng((identity_index + 1) * 1_000_003 + image_index)
    s = size / 112.0
    background = tuple(int(v) for v in ident.integers(40, 220, 3))
    skin = tuple(int(v) for v in ident.integers([150, 100, 70], [255, 210, 180]))
    hair = tuple(int(v) for v in ident.integers(0, 120, 3))
    eye = tuple(int(v) for v in ident.integers(0, 160, 3))
    head_w, head_h = ident.uniform(30, 38), ident.uniform(40, 48)
    eye_dx, eye_y = ident.uniform(14, 20), ident.uniform(-8, -2)
    mouth_w, mouth_y = ident.uniform(10, 18), ident.uniform(20, 26)
    cx = 56 + shot.normal(0, 2.0)
    cy = 58 + shot.normal(0, 2.0)
    light = shot.uniform(0.8, 1.15)

    img = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(img)

    def box(x0, y0, x1, y1):
        return [x0 * s, y0 * s, x1 * s, y1 * s]

    d.ellipse(box(cx - head_w - 3, cy - head_h - 6, cx + head_w + 3, cy + head_h * 0.4), fill=hair)
    d.ellipse(box(cx - head_w, cy - head_h, cx + head_w, cy + head_h), fill=skin)
    for side in (-1, 1):
        ex = cx + side * eye_dx
        d.ellipse(box(ex - 6, cy + eye_y - 3, ex + 6, cy + eye_y + 3), fill=(250, 250, 250))
        d.ellipse(box(ex - 2.5, cy + eye_y - 2.5, ex + 2.5, cy + eye_y + 2.5), fill=eye)
        d.line(box(ex - 7, cy + eye_y - 8, ex + 7, cy + eye_y - 9), fill=hair, width=max(1, int(2 * s)))
    d.polygon([(cx * s, (cy + 2) * s), ((cx - 5) * s, (cy + 13) * s), ((cx + 5) * s, (cy + 13) * s)],
              fill=tuple(max(0, c - 40) for c in skin))
    d.arc(box(cx - mouth_w, cy + mouth_y - 6, cx + mouth_w, cy + mouth_y + 4), 20, 160,
          fill=(150, 40, 50), width=max(1, int(3 * s)))

    pixels = np.asarray(img, dtype=np.float32) * light
    if noise:
        pixels += shot.normal(0, noise, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        image.save(buf, format="JPEG", quality=90)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def write_folder_source(
    root: str | os.PathLike,
    identities: int = 10,
    images_per_identity: int = 4,
    size: int = 112,
    fmt: str = "png",
    corrupt: int = 0,
    unreadable: int = 0,
    start: int = 0,
    noise: float = 6.0,
) -> Path:
    """Write ``identities`` folders ``{start}..`` with ``images_per_identity`` images ``0.png, 1.png …`` each.

    ``corrupt`` images (the last image of the first identities) get truncated bytes; ``unreadable`` others are
    written with mode 000 (only unreadable when not running as root). Returns the root path.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + identities):
        folder = root / str(i)
        folder.mkdir(exist_ok=True)
        for k in range(images_per_identity):
            data = encode(draw_face(i, k, size=size, noise=noise), fmt)
            (folder / f"{k}.{fmt}").write_bytes(data)
    for j in range(corrupt):
        victim = root / str(start + j) / f"{images_per_identity - 1}.{fmt}"
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
    for j in range(unreadable):
        victim = root / str(start + corrupt + j) / f"{images_per_identity - 1}.{fmt}"
        victim.chmod(0)
    return root
