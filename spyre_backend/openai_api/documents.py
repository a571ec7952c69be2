"""OpenAI ``file`` content parts (PDFs), media uuids and a request's media options, read into what
``granite_vision`` takes: a ``<document>`` tag where the part stands, the PDF in ``document``, the
uuids in ``image_uuid`` / ``document_uuid``, the options as the ``mm_processor_kwargs`` JSON.
preprocess renders the pages, checks the PDF and keeps what a uuid names.

    {"type": "file", "file": {"file_data": "data:application/pdf;base64,...", "filename": "a.pdf",
                              "pages": "1-3,7", "dpi": 144}, "uuid": "report-2026"}
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}, "uuid": "chart-1"}
    {"type": "image_url", "uuid": "chart-1"}       # later: the image sent once is used again

``pages`` and ``dpi`` on the part are this server's (OpenAI's part has neither); a request may set
them for every document in ``mm_processor_kwargs``, as vLLM takes processor options. ``uuid`` is
vLLM's field; a part with only a uuid that the server no longer holds gets a 409 ``image_not_cached``.
"""

from __future__ import annotations

from spyre_backend.errors import InvalidRequest
from spyre_backend.preprocess.documents import DOCUMENT_TAG
from spyre_backend.preprocess.options import MediaOptions

PART_OPTIONS = ("pages", "dpi")  # a file part's own options (its document's entry in the lists)
PLAIN = ("max_image_side", "max_image_tiles")  # request-level options also taken as top-level body keys
MEDIA_IO = {"image": PLAIN, "document": PART_OPTIONS}  # media_io_kwargs: the options of each modality
PDF_URI = "data:application/pdf;base64,"


MAX_UUID_CHARS = 256


class MediaParts:
    """The file parts of one request and the uuids of its images and documents, in prompt order."""

    def __init__(self):
        self.payloads: list[str] = []  # the documents'; "" where a uuid alone names one
        self.options: list[dict] = []
        self.document_uuids: list[str] = []
        self.image_uuids: list[str] = []

    def image(self, part: dict, at: str, bad) -> str:
        """An ``image_url`` part's URL ("" when its uuid alone names it); its uuid kept."""
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        uuid = _uuid(part, at, bad)
        if (not isinstance(url, str) or not url) and not uuid:
            raise bad(f"{at}.image_url.url must be a non-empty string", f"{at}.image_url")
        self.image_uuids.append(uuid)
        return url if isinstance(url, str) else ""

    def add(self, part: dict, at: str, bad) -> dict:
        """A ``file`` part: its PDF kept, the template part that stands for it returned.
        ``bad(message, param)`` makes the 400 to raise."""
        uuid = _uuid(part, at, bad)
        file = part.get("file")
        if file is None and uuid:
            file = {}
        if not isinstance(file, dict):
            raise bad(f"{at}.file must be an object with file_data", f"{at}.file")
        if file.get("file_id") is not None:
            raise bad(f"{at}.file.file_id: uploaded files are not supported; send the PDF as file_data",
                      f"{at}.file.file_id")
        data = file.get("file_data")
        if data is None and uuid:
            data = ""
        elif not isinstance(data, str) or not data:
            raise bad(f"{at}.file.file_data must be a non-empty string (a data:application/pdf;base64 URI "
                      f"or base64)", f"{at}.file.file_data")
        if data[:5].lower() == "data:" and not data[:len(PDF_URI)].lower() == PDF_URI:
            raise bad(f"{at}.file.file_data: only PDFs are accepted (data:application/pdf;base64,...), got "
                      f"{data[:40]!r}", f"{at}.file.file_data")
        self.payloads.append(data)
        self.options.append({name: file[name] for name in PART_OPTIONS if file.get(name) is not None})
        self.document_uuids.append(uuid)
        return {"type": "text", "text": DOCUMENT_TAG}  # preprocess turns it into one image per page

    def inputs(self) -> dict:
        """What ``TritonGenerator.generate`` sends of them (see ``request_inputs``)."""
        out: dict = {"documents": [d.encode() for d in self.payloads]}
        if any(self.image_uuids):
            out["image_uuids"] = self.image_uuids
        if any(self.document_uuids):
            out["document_uuids"] = self.document_uuids
        return out


def _uuid(part: dict, at: str, bad) -> str:
    uuid = part.get("uuid")
    if uuid is None:
        return ""
    if not isinstance(uuid, str) or not uuid or len(uuid) > MAX_UUID_CHARS:
        raise bad(f"{at}.uuid must be a non-empty string of at most {MAX_UUID_CHARS} characters", f"{at}.uuid")
    return uuid


def media_options(body: dict, documents: MediaParts, bad) -> str:
    """The ``mm_processor_kwargs`` JSON for granite_vision ("" when there are none), checked here.

    The same options come in three forms, merged (one key set twice to different values is refused):
    vLLM's ``mm_processor_kwargs`` (``{"max_image_side": 768}``), vLLM's per-modality
    ``media_io_kwargs`` (``{"image": {"max_image_side": 768}, "document": {"dpi": 144}}``) and plain
    top-level keys (``"max_image_side": 768``); a file part's own ``pages``/``dpi`` win for its document."""
    values: dict = {}
    origin: dict = {}

    def merge(given: dict, where: str) -> None:
        for key, value in given.items():
            if key in values and values[key] != value:
                raise bad(f"{where}.{key} is {value!r} but {origin[key]} is {values[key]!r}", where)
            values[key], origin[key] = value, f"{where}.{key}"

    for name in ("mm_processor_kwargs", "media_io_kwargs"):
        if body.get(name) is not None and not isinstance(body[name], dict):
            raise bad(f"{name} must be an object", name)
    merge(body.get("mm_processor_kwargs") or {}, "mm_processor_kwargs")
    for modality, given in (body.get("media_io_kwargs") or {}).items():
        if modality not in MEDIA_IO or not isinstance(given, dict):
            raise bad(f"media_io_kwargs.{modality}: expected an object under one of {list(MEDIA_IO)}",
                      "media_io_kwargs")
        unknown = sorted(set(given) - set(MEDIA_IO[modality]))
        if unknown:
            raise bad(f"media_io_kwargs.{modality}: unknown key(s) {unknown}; known: {list(MEDIA_IO[modality])}",
                      "media_io_kwargs")
        merge(given, f"media_io_kwargs.{modality}")
    merge({key: body[key] for key in PLAIN if body.get(key) is not None}, "body")
    for name in PART_OPTIONS:
        if any(name in o for o in documents.options):  # per document: the part's own, else the request's
            default = values.get(name)
            values[name] = [o.get(name, default) for o in documents.options]
    try:
        options = MediaOptions.from_dict(values)
    except InvalidRequest as exc:
        raise bad(str(exc), origin.get(str(exc).split(" ", 1)[0], "mm_processor_kwargs")) from None
    return options.to_json() if values else ""
