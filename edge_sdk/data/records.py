"""RLAIF-V records: one image, a question, the answer to train on, and where it came from.

A :class:`Record` keeps its image compressed (the bytes as they were stored) and decodes
it on access, so a device can hold thousands of photos in memory at their file size, not
their pixel size. The bytes are fully decoded once when the record is made, so a broken
image is reported while loading, with its file and row, never halfway through training.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Iterator, NamedTuple, Sequence

from PIL import Image

from fedvlm.edge.errors import EdgeError

# Raised by PIL for bytes it cannot turn into pixels (truncated, corrupt, not an image,
# or a decompression bomb).
_UNREADABLE_IMAGE_ERRORS = (Image.UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
                            SyntaxError)


class DataError(EdgeError):
    """The data set cannot be used as given: the message names the file, the row and the fix."""


class EncodedImage(NamedTuple):
    """An image as stored on disk: its bytes and their format's usual file extension."""

    data: bytes
    extension: str  # "png", "jpeg", ...


@dataclasses.dataclass(frozen=True, init=False, eq=False)
class Record:
    """One RLAIF-V example.

    Attributes:
        image: the picture, RGB (a property: decoded from the stored bytes on access).
        question: the prompt about the image.
        chosen: the preferred answer; supervised fine-tuning trains on it.
        rejected: the dispreferred answer, if the data set has one (kept for preference
            training and for the record; unused by supervised fine-tuning).
        origin_dataset: the data set the example came from (e.g. ``"VQAv2"``).
        source: where this record was read, e.g. ``"client_00.parquet:row 17"``.
        model, feedback_model, type: RLAIF-V's ``origin_split``: the model that wrote the
            answers, the model that judged which is better, and the kind of question
            ('' when the data does not say).

    ``image`` may be given as a PIL image (converted to RGB) or as encoded bytes (PNG,
    JPEG, ... anything PIL reads); bytes are checked here and raise ``ValueError`` if they
    are not a readable picture.
    """

    question: str
    chosen: str
    rejected: str | None
    origin_dataset: str
    source: str
    model: str
    feedback_model: str
    type: str

    def __init__(
        self,
        image: Image.Image | bytes,
        question: str,
        chosen: str,
        rejected: str | None = None,
        origin_dataset: str = "",
        source: str = "",
        model: str = "",
        feedback_model: str = "",
        type: str = "",  # noqa: A002 - RLAIF-V's own name for the question kind
    ) -> None:
        if isinstance(image, Image.Image):
            stored: Image.Image | EncodedImage = image if image.mode == "RGB" else image.convert("RGB")
        elif isinstance(image, (bytes, bytearray, memoryview)):
            stored = _checked_encoded_image(bytes(image))
        else:
            raise TypeError(f"image must be a PIL image or encoded image bytes, not {image.__class__.__name__}")
        object.__setattr__(self, "_stored_image", stored)
        object.__setattr__(self, "question", question)
        object.__setattr__(self, "chosen", chosen)
        object.__setattr__(self, "rejected", rejected)
        object.__setattr__(self, "origin_dataset", origin_dataset)
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "feedback_model", feedback_model)
        object.__setattr__(self, "type", type)

    @property
    def image(self) -> Image.Image:
        stored = self._stored_image
        if isinstance(stored, Image.Image):
            return stored
        return _decode_rgb(stored.data)

    def replace(self, **changes: object) -> "Record":
        """A copy with some fields changed (``dataclasses.replace`` cannot see the image)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        unknown = set(changes) - set(fields) - {"image"}
        if unknown:
            raise TypeError(f"Record has no field(s) {', '.join(sorted(unknown))}")
        image = changes.pop("image", self._stored_image)
        if isinstance(image, EncodedImage):
            image = image.data
        return Record(image, **{**fields, **changes})  # type: ignore[arg-type]

    def encoded_image(self) -> EncodedImage:
        """The image as bytes: the original bytes if the record was read from a file (no
        re-encoding, no quality loss), else PNG."""
        stored = self._stored_image
        if isinstance(stored, EncodedImage):
            return stored
        buffer = io.BytesIO()
        stored.save(buffer, format="PNG")
        return EncodedImage(buffer.getvalue(), "png")


def _decode_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as opened:
        return opened.convert("RGB")


def _checked_encoded_image(data: bytes) -> EncodedImage:
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image_format = (opened.format or "png").lower()
            # convert() decodes every pixel: a truncated file fails here, not in training.
            opened.convert("RGB")
    except _UNREADABLE_IMAGE_ERRORS as error:
        raise ValueError(f"the image is not a readable picture ({type(error).__name__}: {error})") from None
    return EncodedImage(data, image_format)


@dataclasses.dataclass
class LoadedRecords(Sequence[Record]):
    """What :func:`~fedvlm.edge.data.load_records` read: the records, and what it skipped.

    Behaves like a list of records (``len``, indexing, iteration).

    Attributes:
        records: the good records, in file order (files sorted by name).
        skipped: how many malformed records were skipped (only with ``skip_bad=True``).
        problems: one message per skipped record, naming its file and row.
        files: the data files that were read.
        skipped_by_reason: ``skipped`` per reason code (``fedvlm.edge.data.bad_rows.REASONS``).
    """

    records: list[Record]
    skipped: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    files: list[str] = dataclasses.field(default_factory=list)
    skipped_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):  # type: ignore[override]
        return self.records[index]

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)
