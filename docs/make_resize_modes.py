"""Draw docs/resize-modes.png: one photograph through the three --resize-mode values.

    python docs/make_resize_modes.py          (needs matplotlib, for its sample photograph)

The photograph is matplotlib's sample `grace_hopper.jpg` (512x600, a U.S.
Navy portrait in the public domain). Each mode's panel is exactly what
`logitify encode --size 120x180 --resize-mode MODE` reads (filter bicubic),
at its own size; only the original is scaled down for the picture.
"""
from __future__ import annotations

import os
import sys

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from logitify_cli.images import Geometry, read_image  # noqa: E402

H, W = 120, 180  # --size HxW
PAD, LABEL = 14, 20


def main(out: str) -> None:
    from matplotlib import cbook

    path = str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    panels = []
    with Image.open(path) as img:
        w, h = img.size
        shown = img.convert("RGB").resize((round(w * 2 * H / h), 2 * H), Image.Resampling.LANCZOS)
    # the centre-crop window, drawn on the scaled original
    draw = ImageDraw.Draw(shown)
    s = shown.height / h
    if w * H > h * W:
        w2 = h * W // H
        box = ((w - w2) // 2, 0, (w - w2) // 2 + w2, h)
    else:
        h2 = w * H // W
        box = (0, (h - h2) // 2, w, (h - h2) // 2 + h2)
    draw.rectangle([round(v * s) for v in box], outline=(230, 40, 40), width=2)
    panels.append((f"original {w}x{h}", shown))
    for mode in ("stretch", "center-crop", "border"):
        arr = read_image(path, 3, Geometry(size=(H, W), resize_mode=mode))
        panels.append((mode, Image.fromarray(arr)))
    font = ImageFont.load_default(size=14)
    width = PAD + sum(p.width + PAD for _, p in panels)
    height = PAD + LABEL + 2 * H + PAD
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    pen = ImageDraw.Draw(canvas)
    x = PAD
    for label, p in panels:
        pen.text((x, PAD), label, fill=(0, 0, 0), font=font)
        canvas.paste(p, (x, PAD + LABEL))
        x += p.width + PAD
    pen.text((PAD + panels[0][1].width + PAD, PAD + LABEL + H + PAD),
             f"--size {H}x{W} (H x W), filter bicubic; red: the center-crop window", fill=(90, 90, 90), font=font)
    canvas.save(out, optimize=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                              "resize-modes.png"))
