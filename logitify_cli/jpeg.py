"""JPEGs through libjpeg-turbo's TurboJPEG API (simplejpeg), only where the pixels are Pillow's.

Pillow decodes a JPEG with its bundled libjpeg-turbo: the accurate integer
IDCT (JDCT_ISLOW), fancy (smooth) chroma upsampling, and libjpeg's own
guess of the colour space; `draft()` only adds a DCT-domain scale of 1/2,
1/4 or 1/8 (Pillow's "draft" flag, which would switch to the fast IDCT, is
never set by `draft()`). simplejpeg, called with fastdct=False and
fastupsample=False, asks libjpeg-turbo for exactly that, so both give the
same pixels; what it saves is Pillow's per-file Python parsing and a copy.

The shortcut takes only files whose header this module understands
completely and whose pixels cannot depend on anything Pillow does beyond
libjpeg: 8-bit baseline, extended or progressive Huffman JPEGs with one
(grey) or three (YCbCr) components, no Adobe marker (CMYK, YCCK, RGB
transforms), no MPO index, and an EXIF orientation read with Pillow's own
Exif class (the same value read_image's Pillow road finds). Decoding is
strict: any libjpeg warning (a truncated file, a damaged scan, extraneous
bytes) and any error give None, and the caller takes Pillow's road, which
then gives Pillow's pixels or Pillow's refusal. tests/test_jpeg.py holds
both roads together on generated valid, odd and damaged files, and
benchmarks/check_decoders.py does it over a whole corpus.
"""
from __future__ import annotations

import struct

from PIL import Image

try:  # an optional speed-up: without it every JPEG takes Pillow's road
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the installation
    simplejpeg = None

_SOF_OK = {0xC0, 0xC1, 0xC2}  # baseline, extended and progressive Huffman
_SOF_ANY = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # every start of frame (not DHT, JPG, DAC)
_EXIF = b"Exif\x00\x00"
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
# EXIF orientation -> the transpose ImageOps.exif_transpose applies.
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SWAPS = frozenset({5, 6, 7, 8})


def available() -> bool:
    return simplejpeg is not None


def header(data: bytes):
    """(width, height, components, orientation) of a JPEG the shortcut may decode, or None.

    Walks the markers up to the first scan, as Pillow's JPEG plugin does,
    and gives None for anything outside the plain case described above, so
    that Pillow's road decides.
    """
    if data[:3] != b"\xff\xd8\xff":
        return None
    unpack = struct.unpack_from
    pos, n = 2, len(data)
    size = exif = None
    xmp = False
    while True:
        if pos + 4 > n or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        length = unpack(">H", data, pos + 2)[0]
        if length < 2 or pos + 2 + length > n:
            return None
        body = data[pos + 4:pos + 2 + length]
        if marker == 0xDA:  # start of scan: the header is over
            break
        if marker in _SOF_ANY:
            if marker not in _SOF_OK or size is not None or len(body) < 6:
                return None
            precision, h, w, comps = unpack(">BHHB", body, 0)
            if precision != 8 or comps not in (1, 3) or h < 1 or w < 1:
                return None
            size = (w, h, comps)
        elif marker == 0xE1:
            if body.startswith(_EXIF):
                if exif is not None:  # Pillow joins several; leave that to it
                    return None
                exif = body
            elif body.startswith(_XMP):
                xmp = True
        elif marker == 0xE2 and body.startswith(b"MPF\x00"):
            return None  # an MPO: Pillow opens it as a sequence of frames
        elif marker == 0xEE and body.startswith(b"Adobe"):
            return None  # colour transform flags: CMYK, YCCK or RGB
        elif marker in (0xD8, 0xD9) or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            return None  # markers without a length where a segment should be
        pos += 2 + length
    if size is None:
        return None
    orientation = 1
    if exif is not None:
        if xmp:  # Pillow may take the orientation from the XMP packet then
            return None
        orientation = exif_orientation(exif)
        if type(orientation) is not int:  # an odd value: Pillow's road says what it makes of it
            return None
    return (*size, orientation)


def exif_orientation(segment: bytes) -> int:
    """The orientation Pillow's getexif() reads from an APP1 Exif segment (1 if unreadable)."""
    try:
        exif = Image.Exif()
        exif.load(segment)
        return exif.get(0x0112, 1) or 1
    except Exception:
        return 1


def draft_scale(w: int, h: int, size) -> int:
    """The DCT scale denominator Pillow's draft(mode, size) picks for a w x h JPEG: 8, 4, 2 or 1.

    The largest of them that keeps the image at least `size` (w, h).
    """
    scale = min(w // size[0], h // size[1])
    for s in (8, 4, 2, 1):
        if scale >= s:
            return s
    return 1


def decode(data: bytes, info, draft=None):
    """A Pillow image of the JPEG's own mode (L or RGB), not yet turned by its orientation, or None.

    `info` is header(data). `draft` (w, h) in the file's orientation asks
    for Pillow's draft scale for that size. None when libjpeg-turbo warns
    or fails, or gives another size than Pillow would.
    """
    if simplejpeg is None:
        return None
    w, h, comps, _ = info
    scale = draft_scale(w, h, draft) if draft else 1
    want = (-(-h // scale), -(-w // scale))
    try:
        if scale == 1:
            arr = simplejpeg.decode_jpeg(data, "GRAY" if comps == 1 else "RGB", False, False, strict=True)
        else:
            arr = simplejpeg.decode_jpeg(data, "GRAY" if comps == 1 else "RGB", False, False,
                                         min_height=want[0], min_width=want[1], min_factor=scale, strict=True)
    except (ValueError, RuntimeError, MemoryError, OSError):
        return None
    if arr.shape[:2] != want:
        return None
    return Image.fromarray(arr[:, :, 0] if comps == 1 else arr)
