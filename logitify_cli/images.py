"""Pixels from files (reading): every rule of Pillow as the reference decoder, in one place.

Runs in the pool's reader processes, so it imports only NumPy and Pillow.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import struct
import threading
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# Pillow's own default (about 89.5 megapixels): larger images are refused as
# possible decompression bombs before any pixel is decoded.
DEFAULT_MAX_PIXELS = 89_478_485

IMAGE_EXTENSIONS = frozenset(
    ".png .jpg .jpeg .jpe .jfif .bmp .dib .gif .webp .tif .tiff .ppm .pgm .pbm .pnm".split()
)
MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# --filter names, with Pillow's meaning.
FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
DEFAULT_FILTER = "bicubic"
RESIZE_MODES = ("stretch", "center-crop", "border")
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})


class ImageReadError(Exception):
    """An input that cannot become pixels; its message is the reason recorded."""


class ImageSizeMismatch(ImageReadError):
    """The image is not of the size the caller expects (read_image's expect_size).

    `shape` is (h, w, channels) as read_image would have returned it (after EXIF
    orientation), `expected` the (h, w) asked for. Raised before any pixel is
    decoded whenever the header tells the size.
    """

    def __init__(self, shape, expected):
        self.shape = tuple(int(x) for x in shape)
        self.expected = tuple(int(x) for x in expected)
        h, w = self.shape[:2]
        super().__init__(f"image is {w}x{h} but {self.expected[1]}x{self.expected[0]} was expected")

    def __reduce__(self):  # travels back from the reader processes
        return type(self), (self.shape, self.expected)


@dataclass(frozen=True)
class Geometry:
    """How decoded pixels become the dataset's size: --crop, then --size by --resize-mode and --filter.

    Applied after EXIF orientation (unless `exif` is False: a preset whose
    source code never turned its images) and the conversion to the output
    channels, with Pillow's own crop, resize (never reduce or draft) and
    paste, so the pixels equal, byte for byte, what those calls give:

    - crop (top, left, height, width): that fixed window first; an image
      too small for it is unreadable (ImageReadError, the input is skipped);
    - size (H, W), image w x h:
      stretch: resize to W x H whatever the aspect ratio;
      center-crop: the largest centred window of the target's aspect ratio,
        then resize. If w*H > h*W, the width w2 = max(1, h*W // H) from
        left = (w - w2) // 2 (full height); else the height
        h2 = max(1, w*H // W) from top = (h - h2) // 2 (full width);
      border: resize to fit inside, keeping the aspect ratio, and paste on
        zeros (black; transparent black with 4 channels). If w*H >= h*W, to
        W x max(1, (h*W + w//2) // w), else max(1, (w*H + h//2) // h) x H,
        pasted at ((W - w') // 2, (H - h') // 2).
    """

    size: tuple | None = None  # (H, W)
    resize_mode: str = "stretch"
    crop: tuple | None = None  # (top, left, height, width)
    filter: str = DEFAULT_FILTER
    exif: bool = True  # turn each image by its EXIF orientation first
    # Opt-in, other pixels: JPEGs are decoded with libjpeg's DCT-domain
    # scaling as Pillow's draft() picks it (1/2, 1/4 or 1/8, the smallest
    # that keeps the image at least --size), then resized as above.
    jpeg_draft: bool = False

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize mode {self.resize_mode!r} (expected one of {', '.join(RESIZE_MODES)})")
        if self.filter not in FILTERS:
            raise ValueError(f"filter {self.filter!r} (expected one of {', '.join(FILTERS)})")
        if self.size is not None:
            object.__setattr__(self, "size", tuple(int(v) for v in self.size))
            if len(self.size) != 2 or min(self.size) < 1:
                raise ValueError(f"size {self.size!r} is not (height, width) of positive integers")
        if self.crop is not None:
            object.__setattr__(self, "crop", tuple(int(v) for v in self.crop))
            if len(self.crop) != 4 or min(self.crop[:2]) < 0 or min(self.crop[2:]) < 1:
                raise ValueError(f"crop {self.crop!r} is not (top, left, height, width) "
                                 "with top, left >= 0 and height, width >= 1")
        if self.jpeg_draft and (self.size is None or self.crop is not None):
            raise ValueError("jpeg_draft needs a size and no crop (a crop window is in full-size pixels)")

    def draft_size(self, orientation: int):
        """The (w, h) to hand Pillow's draft() for a JPEG of this EXIF orientation, or None."""
        if not self.jpeg_draft:
            return None
        H, W = self.size
        return (H, W) if orientation in _SWAPS else (W, H)

    @property
    def out_size(self):
        """(H, W) of every result, or None when it follows the input."""
        return self.size or (self.crop[2:] if self.crop else None)

    def apply(self, img):
        """img (a Pillow image) cropped, resized and padded as described above."""
        if self.crop is not None:
            top, left, ch, cw = self.crop
            w, h = img.size
            if top + ch > h or left + cw > w:
                raise ImageReadError(f"image is {w}x{h}, too small for the crop window of {cw}x{ch} at "
                                     f"top {top}, left {left} (it needs at least {left + cw}x{top + ch})")
            img = img.crop((left, top, left + cw, top + ch))
        if self.size is None:
            return img
        H, W = self.size
        w, h = img.size
        resample = FILTERS[self.filter]
        if self.resize_mode == "center-crop":
            if w * H > h * W:
                w2 = max(1, h * W // H)
                left = (w - w2) // 2
                img = img.crop((left, 0, left + w2, h))
            elif w * H < h * W:
                h2 = max(1, w * H // W)
                top = (h - h2) // 2
                img = img.crop((0, top, w, top + h2))
        elif self.resize_mode == "border":
            if w * H >= h * W:
                inner = (W, max(1, (h * W + w // 2) // w))
            else:
                inner = (max(1, (w * H + h // 2) // h), H)
            if img.size != inner:
                img = img.resize(inner, resample, reducing_gap=None)
            if inner == (W, H):
                return img
            canvas = Image.new(img.mode, (W, H))
            canvas.paste(img, ((W - inner[0]) // 2, (H - inner[1]) // 2))
            return canvas
        if img.size != (W, H):  # (Pillow's resize to the same size is a copy)
            img = img.resize((W, H), resample, reducing_gap=None)
        return img


def as_geometry(size) -> Geometry | None:
    """read_image's `size`: None, (H, W) (stretch, bicubic, as before geometry options existed) or a Geometry."""
    if size is None or isinstance(size, Geometry):
        return size
    return Geometry(size=tuple(size))


class NotRegularFile(OSError):
    """A path that is not a regular file (a FIFO, socket or device): never read, never waited on."""

    def __init__(self, path, mode: int):
        reason = f"not a regular file ({file_kind(mode)})"
        super().__init__(reason)
        self.strerror = reason
        self.path = path
        self.mode = mode


def file_kind(mode: int) -> str:
    """What a stat mode is, in words, for a reason."""
    for test, name in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "an unknown kind of file"


_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_BINARY", 0))


def open_regular(path) -> int:
    """A read-only descriptor of a regular file, or OSError (NotRegularFile).

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a
    writer; it changes nothing for regular files.
    """
    fd = os.open(path, _OPEN_FLAGS)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(path, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _why_unreadable(path: str, error: Exception) -> str:
    """A useful reason for a path Pillow could not open (only on failure)."""
    if os.path.islink(path) and not os.path.exists(path):
        return "broken symbolic link"
    if os.path.isdir(path):
        return "is a directory, not an image"
    if isinstance(error, NotRegularFile):
        return str(error)
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    if isinstance(error, UnidentifiedImageError):
        return "not an image Pillow can read"
    return f"cannot read: {getattr(error, 'strerror', None) or error}"


@contextlib.contextmanager
def _opened(source, max_pixels: int):
    """The image, header read, bombs refused; it and its file are closed after.

    A path is opened here, never waiting on a FIFO or a device, and handed
    to Pillow as a file.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageReadError("empty image bytes")
        with _open(io.BytesIO(source), max_pixels) as img:
            yield img
        return
    try:
        fp = os.fdopen(open_regular(source), "rb")
    except OSError as e:
        raise ImageReadError(_why_unreadable(source, e)) from None
    with fp, _open(fp, max_pixels, source) as img:
        yield img


_LIFTED = threading.Lock()


@contextlib.contextmanager
def _pillow_limit(max_pixels: int):
    """Pillow's own bomb checks (Image.open, crop) as errors, or lifted where --max-pixels allows more.

    Pillow's limit is a module global: lifted, it is None only for the call
    inside, under a lock, and put back after; our own check is the limit then.
    """
    limit = Image.MAX_IMAGE_PIXELS
    lift = limit is not None and max_pixels > limit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if lift else "error", Image.DecompressionBombWarning)
        if not lift:
            yield
            return
        with _LIFTED:
            Image.MAX_IMAGE_PIXELS = None
            try:
                yield
            finally:
                Image.MAX_IMAGE_PIXELS = limit


def _bomb(e: Exception, max_pixels: int) -> ImageReadError:
    """Pillow's bomb error in our words: its text names its own limit (twice ours, where it raises)."""
    found = re.search(r"\((\d+) pixels\)", str(e))
    size = f"{int(found.group(1))} pixels" if found else "its size"
    return ImageReadError(f"decompression bomb: {size} exceeds the limit of {max_pixels} (--max-pixels)")


def _open(fp, max_pixels: int, path=None):
    """Open lazily (header only) and refuse bombs before decoding; `path` names fp for reasons."""
    with _pillow_limit(max_pixels):
        try:
            img = Image.open(fp)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _bomb(e, max_pixels) from None
        except (UnidentifiedImageError, OSError) as e:
            if path is not None:
                raise ImageReadError(_why_unreadable(path, e)) from None
            raise ImageReadError("not an image Pillow can read") from None
        except Exception as e:  # a plugin's own parser failing on a stranger's header (too much PNG text, ...)
            raise ImageReadError(f"cannot read its header: {str(e) or type(e).__name__}") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ImageReadError(
            f"decompression bomb: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} (--max-pixels)"
        )
    if w < 1 or h < 1:
        img.close()
        raise ImageReadError(f"image has no pixels ({w}x{h})")
    return img


def _orientation(img) -> int:
    """The EXIF orientation, looked up only where there is EXIF to read."""
    if "exif" not in img.info and img.format not in ("TIFF", "MPO"):
        return 1
    try:
        return img.getexif().get(0x0112, 1) or 1
    except Exception:
        return 1


def peek_mode(source, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """The Pillow mode of an image, read from its header."""
    with _opened(source, max_pixels) as img:
        return img.mode


def is_grayscale_mode(mode: str) -> bool:
    return mode in GRAY_MODES or mode.startswith("I;16")


def _high_bytes(img) -> Image.Image:
    """16-bit images to 8 bits by keeping the high byte (scaled, not clipped as Pillow's convert would)."""
    arr = np.asarray(img)
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise ImageReadError("pixel values outside 0-65535 in a 16-bit image")
    return Image.fromarray((arr >> 8).astype(np.uint8), mode="L")


def _sixteen_bits(img) -> bool:
    """Whether a mode "I" image holds 16-bit samples (PNG and PNM never hold more; TIFF says so).

    Mode "I" alone does not say: it is also Pillow's mode for 32-bit
    integer samples, whose range no rule of ours could know.
    """
    if img.format in ("PNG", "PPM"):
        return True
    bits = getattr(img, "tag_v2", {}).get(258) if img.format == "TIFF" else None
    return bits in (16, (16,))


_SWAPS = frozenset({5, 6, 7, 8})  # EXIF orientations that turn the image a quarter
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


def _turn(img, orientation):
    """The image turned by its EXIF orientation: exif_transpose's pixels, without writing its EXIF back.

    exif_transpose also rewrites the image's EXIF without the orientation,
    and fails (or raises struct.error and others) on tags Pillow reads but
    cannot write; the pixels never depended on that, so both roads turn here.
    """
    method = TRANSPOSE.get(orientation)
    return img if method is None else img.transpose(method)


def _check_header_size(img, channels: int, expect_size, orient: bool = True) -> None:
    """Refuse an image whose header already says it is not expect_size (h, w).

    EXIF orientation is read from the header where it can be; a PNG may
    carry its eXIf after the pixel data, so there either orientation passes
    here and read_image checks the pixels' size once they are read.
    """
    w, h = img.size
    final = (w, h) if orient and _orientation(img) in _SWAPS else (h, w)
    want = tuple(expect_size)
    if final == want:
        return
    if img.format == "PNG" and "exif" not in img.info and (w, h) == want:
        return
    raise ImageSizeMismatch((*final, channels), want)


def read_image(source, channels: int, size=None, max_pixels: int = DEFAULT_MAX_PIXELS, fast: bool = True,
           expect_size=None, modes: list | None = None) -> np.ndarray:
    """uint8 [H, W, channels] from a path or encoded bytes; ImageReadError if not.

    `size` is None, (H, W) (stretched with bicubic) or a Geometry, applied
    after EXIF orientation (which a Geometry with exif=False leaves out)
    and the conversion to `channels`.
    `fast` lets plain PNGs skip Pillow's per-file Python parsing (same
    decoder, same pixels; see _plain_png) and plain JPEGs go to
    libjpeg-turbo directly (same library and settings, same pixels; see
    jpeg.py). `expect_size` (h, w), used only
    when nothing crops or resizes: an image of any other size (after EXIF
    orientation) raises ImageSizeMismatch, before its pixels are decoded
    wherever its header tells, so a run of small images is not made to
    decode a huge stray one only to refuse it. `modes`, a list, is given
    the image's own mode (before the conversion to `channels`).
    """
    geometry = as_geometry(size)
    if geometry is not None and geometry.out_size is not None:
        expect_size = None
    orient = geometry is None or geometry.exif
    try:
        img = _shortcut(source, max_pixels, channels, expect_size, geometry) if fast else None
        plain = img is not None
        if not plain:
            img = _opened(source, max_pixels)
        with img as img:
            if not plain:
                if expect_size is not None:
                    _check_header_size(img, channels, expect_size, orient)
                try:
                    img.seek(0)
                except EOFError:
                    pass
                if geometry is not None and geometry.jpeg_draft:  # a no-op but for JPEGs
                    img.draft(img.mode, geometry.draft_size(_orientation(img) if orient else 1))
                img.load()
                sixteen = img.mode == "I" and _sixteen_bits(img)  # asked of the file: a turned image has no format
                if orient:
                    img = _turn(img, _orientation(img))
            else:
                sixteen = False
            if expect_size is not None and img.size != (expect_size[1], expect_size[0]):
                raise ImageSizeMismatch((img.size[1], img.size[0], channels), expect_size)
            if modes is not None:
                modes.append(_own_mode(img))
            img = _convert(img, channels, sixteen)
            if geometry is not None:
                with _pillow_limit(max_pixels):  # Pillow checks a crop's size as it checks an image's
                    img = geometry.apply(img)
            arr = np.asarray(img, dtype=np.uint8)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb(e, max_pixels) from None
    except MemoryError:
        raise ImageReadError("out of memory while reading its pixels") from None
    except Exception as e:  # whatever Pillow's parsers raise on a stranger's file is that file's fault
        text = str(e) or type(e).__name__
        if "truncated" in text.lower():
            text = f"truncated image ({text})"
        raise ImageReadError(f"unreadable image: {text}") from None
    if channels == 1:
        arr = arr[:, :, np.newaxis]
    return np.ascontiguousarray(arr)


def _shortcut(source, max_pixels: int, channels: int, expect_size, geometry):
    """The image decoded without Image.open (a plain PNG or JPEG), or None for Pillow's road.

    The file is read once, whole, and its first bytes pick the decoder.
    """
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source[:_PLAIN_PNG_MAX_BYTES + 1])
        else:
            data = _read_small(source)
    except (OSError, ValueError, MemoryError):
        return None
    if data is None or len(data) > _PLAIN_PNG_MAX_BYTES:
        return None
    if data[:8] == _PNG_SIGNATURE:
        return _plain_png(data, max_pixels, channels, expect_size)
    if data[:2] == b"\xff\xd8":
        return _plain_jpeg(data, max_pixels, channels, expect_size, geometry)
    return None


def _plain_jpeg(data: bytes, max_pixels: int, channels: int, expect_size, geometry):
    """A plain JPEG decoded by libjpeg-turbo with Pillow's settings and turned by its orientation, or None.

    See jpeg.py for which files qualify. A size other than expect_size
    goes to Pillow's road, which refuses it from Pillow's own reading of the
    header, before any pixel is decoded.
    """
    from . import jpeg

    if not jpeg.available():
        return None
    try:
        info = jpeg.header(data)
    except (ValueError, struct.error):
        return None
    if info is None:
        return None
    w, h, comps, settled = info
    limit = Image.MAX_IMAGE_PIXELS
    if w * h > max_pixels or (limit is not None and w * h > limit):
        return None  # Pillow's road refuses it, with its reason
    orientation = 1
    if not settled:  # Pillow's parser reads segments of this header: its verdict, and its orientation
        try:
            with _opened(data, max_pixels) as opened:
                if opened.size != (w, h) or opened.mode != ("L" if comps == 1 else "RGB"):
                    return None
                orientation = _orientation(opened)
        except Exception:
            return None
    if geometry is not None and not geometry.exif:
        orientation = 1  # as Pillow's road with exif=False: the file's own orientation is not applied
    if expect_size is not None:
        final = (w, h) if orientation in _SWAPS else (h, w)
        if final != tuple(expect_size):
            # Pillow's road names the size from its own reading of the header, or refuses a header
            # it cannot read (a short DQT, a DHP marker): its verdict, not this walk's.
            return None
    draft = geometry.draft_size(orientation) if geometry is not None else None
    img = jpeg.read_pixels(data, info, draft)
    if img is None:
        return None
    try:
        return _turn(img, orientation)
    except Exception:  # an odd orientation value: Pillow's road says what it makes of it
        return None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = {0: "L", 2: "RGB", 4: "LA", 6: "RGBA"}  # 8-bit colour types, no palette
# Chunks Pillow reads without effect on the pixels, with the least length its
# handler needs (so a short one is left to Pillow to refuse).
_PNG_HARMLESS = {b"tEXt": 0, b"pHYs": 9, b"gAMA": 4, b"sRGB": 1, b"cHRM": 0, b"tIME": 0, b"bKGD": 0, b"sBIT": 0}
_PLAIN_PNG_MAX_BYTES = 64 << 20
_PILLOW_KEY = re.compile(rb"[a-z0-9_]+")


def _read_small(path):
    """The whole file in four system calls (open, fstat, read, close), or None if too big.

    open() would add an isatty ioctl, a seek and two more stats per file,
    which at 50,000 small PNGs is a measurable part of a worker's time.
    Anything but a regular file gives None (Pillow's road then says why):
    O_NONBLOCK keeps a FIFO from holding the open, and it is never read.
    """
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        size = st.st_size
        if size > _PLAIN_PNG_MAX_BYTES or not stat.S_ISREG(st.st_mode):
            return None
        data = os.read(fd, size)
        while len(data) < size:  # a short read (e.g. a network filesystem): keep reading
            more = os.read(fd, size - len(data))
            if not more:
                break
            data += more
        return data
    finally:
        os.close(fd)


def _plain_png(source, max_pixels: int, channels: int = 3, expect_size=None):
    """Decode a plain PNG with Pillow's own zlib/unfilter decoder, or None.

    Image.open spends most of a small PNG's time parsing chunks in Python.
    A PNG that is 8-bit grey/RGB(A), not interlaced, has valid CRCs, only
    chunks that cannot change its pixels (no tRNS, PLTE, eXIf, iCCP,
    compressed text, animation) and ends IDAT... IEND is fed straight to
    the same decoder Pillow's PNG plugin uses. Anything else, and any
    failure, returns None so the caller takes Pillow's full road, which
    then gives Pillow's verdict. tests/test_plain_png.py checks both roads
    agree on valid, odd and damaged files. A plain PNG has no EXIF, so its
    IHDR is its size: one other than expect_size raises ImageSizeMismatch
    before the pixels are decoded, as Pillow's road would.
    """
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source[:_PLAIN_PNG_MAX_BYTES + 1])
        else:
            data = _read_small(source)
        if data is None or len(data) > _PLAIN_PNG_MAX_BYTES or data[:8] != _PNG_SIGNATURE:
            return None
        unpack = struct.unpack_from
        n = len(data)
        if n < 33 or data[12:16] != b"IHDR" or unpack(">I", data, 8)[0] != 13:
            return None
        w, h, depth, ctype, comp, filt, interlace = unpack(">IIBBBBB", data, 16)
        mode = _PNG_MODES.get(ctype)
        limit = Image.MAX_IMAGE_PIXELS
        if (mode is None or depth != 8 or comp or filt or interlace or w < 1 or h < 1
                or w * h > max_pixels or (limit is not None and w * h > limit)):
            return None
        pos, idat, text, state = 8, [], 0, "head"
        while True:
            if pos + 12 > n:
                return None
            length, cid = unpack(">I4s", data, pos)
            end = pos + 12 + length
            if end > n:
                return None
            body = data[pos + 8:end - 4]
            if zlib.crc32(body, zlib.crc32(cid)) != unpack(">I", data, end - 4)[0]:
                return None
            if cid == b"IHDR":
                if pos != 8:
                    return None
            elif cid == b"IDAT":
                state = "data"
                idat.append(body)
            elif cid == b"IEND":
                break
            elif state != "head" or cid not in _PNG_HARMLESS or length < _PNG_HARMLESS[cid]:
                return None
            elif cid == b"cHRM" and length % 4:
                return None  # Pillow unpacks it as whole 32-bit values and refuses the file
            elif cid == b"tEXt":
                text += length
                keyword = body.split(b"\0", 1)[0]
                # Pillow files a text chunk under its keyword beside its own keys
                # ("interlace", "transparency", "bbox", ...), which then act on
                # the pixels; those are lower case, the usual keywords are not.
                if text > (1 << 20) or b"exif" in keyword.lower() or _PILLOW_KEY.fullmatch(keyword):
                    return None
            pos = end
        if state != "data":
            return None
    except (OSError, ValueError, struct.error, MemoryError):
        return None
    if expect_size is not None and (h, w) != tuple(expect_size) and (w, h) != tuple(expect_size):
        # (turned a quarter, it would fit: Pillow's road cannot rule out a late
        # eXIf before reading pixels, so neither does this one; read_image checks after)
        raise ImageSizeMismatch((h, w, channels), expect_size)
    try:
        return _inflate(mode, (w, h), idat)
    except Exception:  # Pillow's road gives its own verdict
        return None


def _inflate(mode: str, size, idat: list):
    """The image from its IDAT chunks, fed to Pillow's decoder as Pillow's PNG plugin feeds it; or None.

    Pillow hands the decoder each chunk's data in reads of at most
    decodermaxblock bytes, and refuses the file as truncated when the data
    runs out before the decoder says it is done; whether that happens can
    depend on where the chunks split a short zlib stream. Fed the same
    pieces, the same decoder gives the same verdict.
    """
    # Made as Pillow's own road makes it (ImagingNew: zeroed, by calloc where new, so untouched pages
    # cost nothing), not filled by Image.new's colour: a stream that ends early on a row boundary is
    # "done" for the decoder, and the rows it never wrote stay zero on both roads.
    img = Image.new(mode, size, None)
    decoder = Image._getdecoder(mode, "zip", mode)
    try:
        decoder.setimage(img.im, (0, 0) + size)
        block = ImageFile.MAXBLOCK  # what each ImageFile sets as its decodermaxblock
        b, err = b"", 0
        for body in idat:
            for at in range(0, len(body), block):
                b += body[at:at + block]
                n, err = decoder.decode(b)
                if n < 0:
                    return None if err < 0 else img
                b = b[n:]
        return None  # Pillow: "image file is truncated"
    finally:
        decoder.cleanup()


def _convert(img, channels: int, sixteen: bool = False):
    """The image in the mode of `channels`; `sixteen`: a mode "I" image the file says holds 16-bit samples."""
    mode = img.mode
    if mode.startswith("I;16") or (mode == "I" and sixteen):
        img = _high_bytes(img)
    elif mode == "I":
        raise ImageReadError("32-bit integer images are not supported (their range is unknown): "
                             "convert them to 8 or 16 bits")
    elif mode == "F":
        raise ImageReadError("floating-point images are not supported")
    elif mode in ("P", "PA"):
        img = img.convert("RGBA" if (mode == "PA" or "transparency" in img.info) else "RGB")
    elif mode == "1":
        img = img.convert("L")
    target = MODES[channels]
    if img.mode != target:
        if img.mode not in ("L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "RGBX", "RGBa", "La"):
            img = img.convert("RGB")
        img = img.convert(target)
    return img


# The note beside a grey image read from a colour one, in a run whose channels were guessed
# from a sample (see planner.guessed_grey): the run names such images when it ends.
MADE_GREY = "a colour image, made grey"


def _own_mode(img) -> str:
    """The image's mode, with a palette of greys only said as the grey mode it stands for."""
    if img.mode in ("P", "PA"):
        palette = img.getpalette() or []
        if palette[0::3] == palette[1::3] == palette[2::3]:
            return "L" if img.mode == "P" else "LA"
    return img.mode


def read_noting(source, channels, size, max_pixels, expect_size=None, note_colour: bool = False):
    """(read_image(...), MADE_GREY or None): with note_colour, whether a colour image was made grey."""
    modes = [] if note_colour and channels == 1 else None
    arr = read_image(source, channels, size, max_pixels, expect_size=expect_size, modes=modes)
    return arr, (MADE_GREY if modes and not is_grayscale_mode(modes[0]) else None)


def read_one(payload, channels, size, max_pixels, expect_size=None, note_colour: bool = False):
    """(array, note or None), or (None, reason) for one payload: a path, bytes, or the error met fetching it.

    The reason is a string, or the ImageSizeMismatch itself (see read_many).
    """
    if isinstance(payload, BaseException):
        return None, str(payload)
    try:
        return read_noting(payload, channels, size, max_pixels, expect_size, note_colour)
    except ImageSizeMismatch as e:
        return None, e
    except ImageReadError as e:
        return None, str(e)


def read_many(payloads, channels, size, max_pixels, expect_size=None, note_colour: bool = False):
    """Worker entry point: (stack, same, odd, reasons) for a chunk.

    Images of the chunk's common shape travel as one array (one buffer to
    pickle, not dozens); the odd ones out, and failures, ride alongside:
    (stack [n, ...] or None, the chunk positions of its rows, {position:
    array} of the others, each image's reason or note). pixels.PixelStream
    hands them out. With expect_size (h, w), an image of another
    size has the ImageSizeMismatch itself as its reason, not a string. An
    image read has a note as its reason, or None (see read_noting).
    """
    arrays, reasons = [], []
    for p in payloads:
        arr, reason = read_one(p, channels, size, max_pixels, expect_size, note_colour)
        arrays.append(arr)
        reasons.append(reason)
    good = [a for a in arrays if a is not None]
    common = good[0].shape if good else None
    same = [i for i, a in enumerate(arrays) if a is not None and a.shape == common]
    stack = np.stack([arrays[i] for i in same]) if same else None
    odd = {i: a for i, a in enumerate(arrays) if a is not None and a.shape != common}
    return stack, same, odd, reasons
