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
transforms), no MPO index, no fill bytes between segments. Where the header
holds segments Pillow's plugin parses itself (EXIF, ICC profile fragments,
Photoshop resources), Pillow opens the header first: a file it refuses
takes its road, and the orientation is the one its road reads. Decoding is
strict: any libjpeg warning (a truncated file, a damaged scan, extraneous
bytes) and any error give None, and the caller takes Pillow's road, which
then gives Pillow's pixels or Pillow's refusal. tests/test_jpeg.py holds
both roads together on generated valid, odd and damaged files, and
benchmarks/check_decoders.py does it over a whole corpus.
"""
from __future__ import annotations

import functools
import struct

import numpy as np
from PIL import Image

try:  # an optional speed-up: without it every JPEG takes Pillow's road
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the installation
    simplejpeg = None

_SOF_OK = {0xC0, 0xC1, 0xC2}  # baseline, extended and progressive Huffman
_SOF_ANY = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # every start of frame (not DHT, JPG, DAC)
_EXIF = b"Exif\x00\x00"
# More scans than any encoder writes (libjpeg's progressive script has 10, mozjpeg's at most some 60):
# such a progressive file goes to Pillow's road at once. Counting 0xFF 0xDA counts the scans (entropy-
# coded data never holds it; a table or comment between scans might, which only sends a file to Pillow).
MAX_SCANS = 128
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
# Segments Pillow's JPEG plugin parses in Python as it opens a file, where
# its own checks can refuse the file: EXIF (orientation, resolution, the
# merged tag dictionary), ICC profile fragments, Photoshop resources.
_PARSED_BY_PILLOW = ((0xE1, _EXIF), (0xE2, b"ICC_PROFILE\x00"), (0xED, b"Photoshop 3.0\x00"))


def available() -> bool:
    return simplejpeg is not None


def header(data: bytes):
    """(width, height, components, settled) of a JPEG the shortcut may decode, or None.

    Walks the markers up to the first scan, as Pillow's JPEG plugin does,
    and gives None for anything outside the plain case described above, so
    that Pillow's road decides. `settled` is False where the header holds
    segments Pillow parses itself (see _PARSED_BY_PILLOW): the caller then
    has Pillow open the header, for its verdict and the orientation.
    """
    if data[:3] != b"\xff\xd8\xff":
        return None
    unpack = struct.unpack_from
    pos, n = 2, len(data)
    size = exif = None
    xmp = progressive = False
    settled = True
    while True:
        if pos + 4 > n or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte, which Pillow skips; rare enough to leave to it
            return None
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
            progressive = marker == 0xC2
        elif marker == 0xE0 and body.startswith(b"JFIF") and len(body) < 7:
            return None  # Pillow cannot read the JFIF version and refuses the file
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
        if any(marker == m and body.startswith(sig) for m, sig in _PARSED_BY_PILLOW):
            settled = False
        pos += 2 + length
    if size is None or (exif is not None and xmp):  # Pillow may take the orientation from the XMP packet then
        return None
    if progressive and data.count(b"\xff\xda", pos) > MAX_SCANS:
        # Thousands of scans each redo the whole image: decoded here, then again by Pillow's road
        # when libjpeg warns at the end, such a file took four times Pillow's own (long) time.
        return None
    return (*size, settled)


def draft_scale(w: int, h: int, size) -> int:
    """The DCT scale denominator Pillow's draft(mode, size) picks for a w x h JPEG: 8, 4, 2 or 1.

    The largest of them that keeps the image at least `size` (w, h).
    """
    scale = min(w // size[0], h // size[1])
    for s in (8, 4, 2, 1):
        if scale >= s:
            return s
    return 1


def scale_is_settled(w: int, h: int, scale: int) -> bool:
    """Whether 1/scale is the only DCT scale n/8 (n = 1..16) that gives a w x h JPEG its size at 1/scale.

    libjpeg-turbo's TurboJPEG API offers every n/8, and simplejpeg asks for
    an output size, not a scale: where another n gives the same size (a 3x3
    file at 1/2 is 2x2, and so it is at 3/8, 4/8 and 5/8), it may pick
    that one, whose pixels are not Pillow's. Such files take Pillow's road.
    """
    want = (-(-h // scale), -(-w // scale))
    own = 8 // scale
    return all((-(-h * n // 8), -(-w * n // 8)) != want for n in range(1, 17) if n != own)


def read_pixels(data: bytes, info, draft=None):
    """A Pillow image of the JPEG's own mode (L or RGB), not yet turned by its orientation, or None.

    `info` is header(data). `draft` (w, h) in the file's orientation asks
    for Pillow's draft scale for that size. None when libjpeg-turbo warns
    or fails, or gives another size than Pillow would, or when that size
    does not settle the scale (scale_is_settled).
    """
    if simplejpeg is None:
        return None
    w, h, comps = info[:3]
    scale = draft_scale(w, h, draft) if draft else 1
    if scale != 1 and not scale_is_settled(w, h, scale):
        return None
    want = (-(-h // scale), -(-w // scale))
    colour = "GRAY" if comps == 1 else "RGBX" if _maps_rgb() else "RGB"
    try:
        if scale == 1:
            arr = simplejpeg.decode_jpeg(data, colour, False, False, strict=True)
        else:
            arr = simplejpeg.decode_jpeg(data, colour, False, False,
                                         min_height=want[0], min_width=want[1], min_factor=scale, strict=True)
    except (ValueError, RuntimeError, MemoryError, OSError):
        return None
    if arr.shape[:2] != want:
        return None
    if colour == "RGBX":
        return _rgb_over(arr)
    return Image.fromarray(arr[:, :, 0] if comps == 1 else arr)


def _rgb_over(arr):
    """An RGB image over an [h, w, 4] uint8 array, without a copy: the layout Pillow keeps RGB in.

    Image.fromarray of [h, w, 3] spreads every pixel to 4 bytes (as much CPU
    as a tenth of the decode), and frombuffer maps only modes such as RGBX,
    whose resize works on 4 bands where RGB's works on 3. Pillow's own
    frombuffer maps with the call below; _maps_rgb() checks it once. Such
    an image stays inside images.read_image, which gives arrays: Pillow's
    Arrow export of a mapped image (frombuffer's too) crashes the process.
    """
    h, w = arr.shape[:2]
    img = Image.new("RGB", (0, 0))._new(Image.core.map_buffer(arr, (w, h), "raw", 0, ("RGB", 0, 1)))
    img.readonly = 1  # as frombuffer's: a change copies first
    return img


@functools.cache
def _maps_rgb() -> bool:
    """Whether this Pillow maps an RGBX buffer as an RGB image of its R, G and B (if not: decode RGB, copy)."""
    probe = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    try:
        img = _rgb_over(probe)
        return img.mode == "RGB" and img.size == (3, 2) and img.tobytes() == probe[:, :, :3].tobytes()
    except Exception:
        return False
