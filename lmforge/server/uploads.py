"""multipart/form-data uploads parsed as they stream, with a size limit (``POST /v1/files``).

The file part goes straight from the socket to a path in the files directory (a few MB in
memory at most), never through Starlette's spooled copy in the system temp directory. An
over-limit upload is refused before its end: at once from ``Content-Length`` when the client
sent one, else as soon as the bytes counted so far pass the limit; either way the rest of the
body is never stored (uvicorn drops what the client still sends once the 413 is out, and the
connection stays usable, so the client reads the answer rather than a reset).
"""

from __future__ import annotations

import asyncio
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from lmforge.errors import InvalidRequestError, PayloadTooLargeError

FORM_SLACK = 64 * 1024  # bytes a body may carry beyond the file: boundaries, headers, fields
_FLUSH_BYTES = 1 << 20  # file bytes gathered in memory before one write in a worker thread
MAX_FILENAME_CHARS = 255  # the store's column width (and most file systems' name limit)
FALLBACK_FILENAME = "upload"


@dataclass
class Upload:
    """What ``receive_upload`` read: the text fields, and the file part's name and size."""

    fields: dict[str, str]  # text parts by name
    filename: str | None = None  # the file part's filename (raw); None = no "file" part
    size: int = 0  # bytes of the file part, now in the destination path


async def receive_upload(request: Request, destination: Path, limit: int,
                         file_field: str = "file") -> Upload:
    """Parse ``request``'s multipart body, writing the ``file_field`` part to ``destination``
    (flushed and fsynced) and keeping the other parts as text.

    Args:
        limit: the most bytes the file part may have; the whole body may have ``FORM_SLACK``
            more.

    Raises:
        PayloadTooLargeError: (413, param ``file_field``) ``Content-Length`` or the bytes
            received pass the limit.
        InvalidRequestError: (400) not multipart/form-data, malformed or cut short, a part
            without a name, a field sent twice, a text field over ``FORM_SLACK`` bytes.
    """
    body_limit = limit + FORM_SLACK
    if _content_length(request) > body_limit:
        raise _too_large(limit, file_field)
    ctype, params = parse_options_header(request.headers.get("content-type"))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise InvalidRequestError(
            f"Send the upload as multipart/form-data with the parts '{file_field}' and "
            "'purpose' (e.g. curl -F purpose=batch -F file=@data.jsonl).",
            code="invalid_content_type")
    with open(destination, "wb") as sink:
        parts = _Parts(sink, limit, file_field)
        try:
            parser = MultipartParser(params[b"boundary"], parts.callbacks())
            received = 0
            async for chunk in request.stream():
                received += len(chunk)
                if received > body_limit:
                    raise _too_large(limit, file_field)
                parser.write(chunk)
                if len(parts.pending) >= _FLUSH_BYTES:
                    await asyncio.to_thread(parts.flush)
        except FormParserError as e:
            raise InvalidRequestError(f"The multipart/form-data body is malformed ({e}).") from e
        except ClientDisconnect:  # nobody reads this answer; it only stops the route quietly
            raise InvalidRequestError("The client went away during the upload.") from None
        await asyncio.to_thread(parts.finish)
    if not parts.complete:
        raise InvalidRequestError("The multipart/form-data body ended before its closing "
                                  "boundary; the upload was cut short.")
    return parts.upload


def _content_length(request: Request) -> int:
    try:
        return int(request.headers.get("content-length", "0"))
    except ValueError:  # uvicorn refuses a malformed one before the app sees it
        return 0


def _too_large(limit: int, param: str) -> PayloadTooLargeError:
    mb = limit / 2**20
    return PayloadTooLargeError(
        f"The file is larger than this server's upload limit of {mb:g} MB; split it, or start "
        "the server with a larger --max-upload-mb.", param=param)


@dataclass
class _Parts:
    """The parser's callbacks: one part at a time, the file part's bytes gathered in
    ``pending`` for the next ``flush`` (a disk write off the event loop)."""

    sink: BinaryIO
    limit: int
    file_field: str
    upload: Upload = field(default_factory=lambda: Upload(fields={}))
    pending: bytearray = field(default_factory=bytearray)
    complete: bool = False  # the closing boundary was seen
    _header: list[bytes] = field(default_factory=lambda: [b"", b""])  # name, value so far
    _disposition: bytes = b""
    _name: str | None = None
    _text: bytearray | None = None  # the current text part; None while in the file part

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_done, "on_part_data": self._data,
                "on_part_end": self._end, "on_end": self._closed}

    def flush(self) -> None:
        self.sink.write(self.pending)
        self.pending.clear()

    def finish(self) -> None:
        self.flush()
        self.sink.flush()
        os.fsync(self.sink.fileno())  # the bytes are durable before the row points at them

    def _begin(self) -> None:
        self._disposition, self._name, self._text = b"", None, bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header[0] += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._header[1] += data[start:end]

    def _header_end(self) -> None:
        if self._header[0].strip().lower() == b"content-disposition":
            self._disposition = self._header[1]
        self._header = [b"", b""]

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise InvalidRequestError("A multipart part has no Content-Disposition name.")
        name = options[b"name"].decode("utf-8", "replace")
        if name in self.upload.fields or (name == self.file_field
                                          and self.upload.filename is not None):
            raise InvalidRequestError(f"The form field '{name}' is sent twice.", param=name)
        self._name = name
        if name == self.file_field:
            raw = options.get(b"filename", FALLBACK_FILENAME.encode())
            self.upload.filename = raw.decode("utf-8", "replace")
            self._text = None

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._text is not None:
            self._text += data[start:end]
            if len(self._text) > FORM_SLACK:  # only the file part may be large
                raise InvalidRequestError(f"The form field '{self._name}' is longer than "
                                          f"{FORM_SLACK // 1024} KiB.", param=self._name)
            return
        self.upload.size += end - start
        if self.upload.size > self.limit:
            raise _too_large(self.limit, self.file_field)
        self.pending += data[start:end]

    def _end(self) -> None:
        if self._text is not None and self._name is not None:
            self.upload.fields[self._name] = self._text.decode("utf-8", "replace")

    def _closed(self) -> None:
        self.complete = True


def safe_filename(name: str) -> str:
    """The name to keep for an uploaded file: its base name (after the last ``/`` or ``\\``),
    without control, format (e.g. right-to-left override) or surrogate characters, stripped
    of surrounding blanks, at most ``MAX_FILENAME_CHARS`` long (cut in the stem, keeping a
    short extension); ``"upload"`` when nothing is left or only ``.``/``..``.

    The bytes are stored under the file id, so the name is only ever shown, never a path; it
    is cleaned so that showing it (a download's Content-Disposition, a terminal) is safe too.

    >>> safe_filename("../../etc/passwd"), safe_filename("C:\\\\data\\\\in.jsonl")
    ('passwd', 'in.jsonl')
    """
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    kept = "".join(c for c in base if unicodedata.category(c) not in ("Cc", "Cf", "Cs")).strip()
    if kept in ("", ".", ".."):
        return FALLBACK_FILENAME
    if len(kept) > MAX_FILENAME_CHARS:
        stem, dot, ext = kept.rpartition(".")
        suffix = dot + ext if stem and len(ext) <= 16 else ""
        kept = kept[: MAX_FILENAME_CHARS - len(suffix)] + suffix
    return kept
