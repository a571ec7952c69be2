"""OpenAI ``file`` content parts (PDFs) and a request's media options, read into what
``granite_vision`` takes: a ``<document>`` tag where the part stands, the PDF in ``document``, the
options as the ``mm_processor_kwargs`` JSON. preprocess renders the pages and checks the PDF.

    {"type": "file", "file": {"file_data": "data:application/pdf;base64,...", "filename": "a.pdf",
                              "pages": "1-3,7", "dpi": 144}}

``pages`` and ``dpi`` on the part are this server's (OpenAI's part has neither); a request may set
them for every document in ``mm_processor_kwargs``, as vLLM takes processor options.
"""

from __future__ import annotations

from spyre_backend.errors import InvalidRequest
from spyre_backend.preprocess.documents import DOCUMENT_TAG
from spyre_backend.preprocess.options import MediaOptions

PART_OPTIONS = ("pages", "dpi")  # a file part's own options (its document's entry in the lists)
PLAIN = ("max_image_side", "max_image_tiles")  # request-level options also taken as top-level body keys
MEDIA_IO = {"image": PLAIN, "document": PART_OPTIONS}  # media_io_kwargs: the options of each modality
PDF_URI = "data:application/pdf;base64,"


class DocumentParts:
    """The file parts of one request, in prompt order."""

    def __init__(self):
        self.payloads: list[str] = []
        self.options: list[dict] = []

    def add(self, part: dict, at: str, bad) -> dict:
        """A ``file`` part: its PDF kept, the template part that stands for it returned.
        ``bad(message, param)`` makes the 400 to raise."""
        file = part.get("file")
        if not isinstance(file, dict):
            raise bad(f"{at}.file must be an object with file_data", f"{at}.file")
        if file.get("file_id") is not None:
            raise bad(f"{at}.file.file_id: uploaded files are not supported; send the PDF as file_data",
                      f"{at}.file.file_id")
        data = file.get("file_data")
        if not isinstance(data, str) or not data:
            raise bad(f"{at}.file.file_data must be a non-empty string (a data:application/pdf;base64 URI "
                      f"or base64)", f"{at}.file.file_data")
        if data[:5].lower() == "data:" and not data[:len(PDF_URI)].lower() == PDF_URI:
            raise bad(f"{at}.file.file_data: only PDFs are accepted (data:application/pdf;base64,...), got "
                      f"{data[:40]!r}", f"{at}.file.file_data")
        self.payloads.append(data)
        self.options.append({name: file[name] for name in PART_OPTIONS if file.get(name) is not None})
        return {"type": "text", "text": DOCUMENT_TAG}  # preprocess turns it into one image per page


def media_options(body: dict, documents: DocumentParts, bad) -> str:
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
            raise bad(f"media_io_kwargs.{modality}: expected an object under one of {list(MEDIA_IO)}", "media_io_kwargs")
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
