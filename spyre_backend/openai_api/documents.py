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
    """The ``mm_processor_kwargs`` JSON for granite_vision ("" when there are none), checked here."""
    given = body.get("mm_processor_kwargs")
    if given is not None and not isinstance(given, dict):
        raise bad("mm_processor_kwargs must be an object", "mm_processor_kwargs")
    values = dict(given or {})
    for name in PART_OPTIONS:
        if any(name in o for o in documents.options):  # per document: the part's own, else the request's
            default = values.get(name)
            values[name] = [o.get(name, default) for o in documents.options]
    try:
        options = MediaOptions.from_dict(values)
    except InvalidRequest as exc:
        raise bad(str(exc), "mm_processor_kwargs") from None
    return options.to_json() if values else ""
