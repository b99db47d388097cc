"""Image opening: `ImageLoader` opens an image by its path inside one folder (which the path may not leave,
symlinks included), refusing anything but a regular file and, from the header before any pixel is decoded,
images over a pixel limit. What a bad image means (an error, a rejected record) is left to the callers."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

from PIL import Image

from .records import DataError, image_path_problem, quote, shorten

# images above this many pixels are refused from their header, before any pixel is decoded: a 144-megapixel
# PNG can be a 420 KB file and 430 MB as RGB (PIL's own guard only warns below 2 x 89 megapixels)
MAX_IMAGE_PIXELS = 64_000_000


class ImageTooLargeError(ValueError):
    """An image whose header gives more pixels than the limit; nothing of it was decoded."""


class ImageProblem(Exception):
    """Why an image cannot be opened, in the two wordings its readers use.

    Attributes:
        reason: the `visprune data check` reason: `image_path`, `image_outside_folder`, `image_missing`,
            `image_not_a_file`, `image_too_large` or `image_undecodable`.
        detail: the check's wording (the image, then why).
        message: the collator's wording (a sentence that follows the sample's name).
    """

    def __init__(self, reason: str, detail: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.detail = detail
        self.message = message


def decode_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[Image.Image, str | None]:
    """(the image decoded as RGB, its format as PIL reads it from the content), after checking its size
    from the header: nothing is decoded for an image over `max_pixels`. PIL's own decompression-bomb
    warning is silenced (this check replaces it); its error above 2 x `Image.MAX_IMAGE_PIXELS` stays one.

    Raises:
        ImageTooLargeError: over `max_pixels` (or PIL's own limit).
        OSError, ValueError: PIL cannot decode the file.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise ImageTooLargeError(f"{width} x {height} = {width * height:,} pixels, over the limit of "
                                             f"{max_pixels:,} (max_image_pixels)")
                found = opened.format
                opened.load()  # decode every pixel: a truncated file fails here
                return opened.convert("RGB"), found
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(f"{exc} (PIL's Image.MAX_IMAGE_PIXELS; max_image_pixels is "
                                     f"{max_pixels:,})") from None


class ImageLoader:
    """Opens images given relative to `folder` (resolved once). With `folder` None, `load` refuses every
    image; `resolve` and `open` need a folder.

    `max_image_pixels` (a whole number >= 1) is checked by the owners that take it from the user
    (`collator.ChatCollator`, `check.Judge`).
    """

    def __init__(self, folder: str | os.PathLike | None, max_image_pixels: int = MAX_IMAGE_PIXELS):
        self.folder = Path(folder).resolve() if folder is not None else None
        self.max_image_pixels = max_image_pixels

    def load(self, sample_id: str, image: str) -> Image.Image:
        """`image` of sample `sample_id` decoded as RGB (see `open`).

        Raises:
            DataError: naming the sample and the image, when the folder is not set or `open` refuses it.
        """
        if self.folder is None:
            raise DataError(f"sample {quote(sample_id)} has image {quote(image)} but data.image_folder is not set")
        try:
            return self.open(image)[0]
        except ImageProblem as exc:
            raise DataError(f"sample {quote(sample_id)}: {exc.message}") from exc.__cause__

    def resolve(self, image: str) -> Path:
        """The real path of `image`; symlinks are followed and the target must stay inside the folder.

        Raises:
            ImageProblem: `image_path` (refused from the string alone) or `image_outside_folder`.
        """
        problem = image_path_problem(image)
        if problem:
            raise ImageProblem("image_path", f"{quote(image)}: {problem}", f"image {quote(image)}: {problem}")
        path = (self.folder / image).resolve()
        if not path.is_relative_to(self.folder):
            raise ImageProblem("image_outside_folder",
                               f"{quote(image)} resolves to {shorten(str(path), 200)}, outside {self.folder}",
                               f"image {quote(image)} resolves outside data.image_folder ({self.folder}); "
                               "symlinks must point inside it")
        return path

    def open(self, image: str) -> tuple[Image.Image, str | None, Path]:
        """(`image` decoded as RGB, its format read from the content, its real path). Nothing is opened
        that is not a regular file (a FIFO would block the reader), and nothing decoded for an image over
        `max_image_pixels` pixels (`decode_image`).

        Raises:
            ImageProblem: see its `reason`s; an undecodable image's has PIL's error as its `__cause__`.
        """
        path = self.regular_file(image, "image")
        try:
            rgb, found = decode_image(path, self.max_image_pixels)
        except ImageTooLargeError as exc:
            raise ImageProblem("image_too_large", f"{quote(image)}: {exc}",
                               f"image {quote(image)} is too large: {exc}") from None
        except (OSError, ValueError) as exc:
            raise ImageProblem("image_undecodable", f"{quote(image)}: {shorten(str(exc), 300)}",
                               f"cannot decode image {quote(image)}: {shorten(str(exc))}") from exc
        return rgb, found, path

    def regular_file(self, name: str, kind: str) -> Path:
        """The real path of `name` (`resolve`), a regular file: never a FIFO, device or folder.

        Raises:
            ImageProblem: `resolve`'s, or `{kind}_missing` / `{kind}_not_a_file` (kind: image or video).
        """
        path = self.resolve(name)
        try:
            mode = os.stat(path).st_mode
        except OSError:
            raise ImageProblem(f"{kind}_missing", f"{quote(name)} not found in {self.folder}",
                               f"{kind} {quote(name)} not found in {self.folder}") from None
        if not stat.S_ISREG(mode):
            raise ImageProblem(f"{kind}_not_a_file", f"{quote(name)} is not a regular file",
                               f"{kind} {quote(name)} is not a regular file")
        return path

    def video_file(self, video: str) -> Path:
        """The real path of the video file `video`, for the processor's own video loader: inside the folder (as
        `resolve`), a regular file, and a video container by its first bytes (MP4 / QuickTime, Matroska / WebM,
        AVI, MPEG, GIF), so a picture or a text file named .mp4 is refused before any decoder sees it.

        Raises:
            ImageProblem: `image_path`, `image_outside_folder`, `video_missing`, `video_not_a_file` or
                `video_not_a_video`.
        """
        path = self.regular_file(video, "video")
        with open(path, "rb") as handle:
            head = handle.read(16)
        if not is_video_container(head):
            raise ImageProblem("video_not_a_video", f"{quote(video)} is not a video file (first bytes {head[:8]!r})",
                               f"video {quote(video)} is not a video file (MP4, MOV, MKV, WebM, AVI, MPEG or GIF)")
        return path


def is_video_container(head: bytes) -> bool:
    """Whether a file's first 16 bytes start a video container: ISO BMFF (MP4, MOV: a box of type `ftyp`, `moov`,
    `mdat`, `free` or `wide` at byte 4), EBML (Matroska, WebM), RIFF AVI, MPEG program and elementary streams, GIF."""
    return (head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")
            or head.startswith((b"\x1aE\xdf\xa3", b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3", b"GIF87a", b"GIF89a"))
            or (head[:4] == b"RIFF" and head[8:12] == b"AVI "))


__all__ = ["MAX_IMAGE_PIXELS", "ImageLoader", "ImageProblem", "ImageTooLargeError", "decode_image",
           "is_video_container"]
