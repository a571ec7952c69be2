"""Test documents: PDFs made here (Pillow writes real ones; hostile ones are written by hand) and
their pages rendered the way the server renders them (pypdfium2 at a dpi), for the oracle."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

from tools.tiny_checkpoint.synthetic import draw_shape_image

# shapes the shipped checkpoint knows, one per page
PAGES = (("circle", "red", "white"), ("triangle", "green", "white"), ("square", "blue", "yellow"))


def shape_pages(size=(200, 150), label: bool = True) -> list[Image.Image]:
    """Three pages of coloured shapes, each with a line of text in a corner."""
    pages = []
    for number, (shape, color, background) in enumerate(PAGES, 1):
        page = draw_shape_image(shape, color, background, size=size)
        if label:
            ImageDraw.Draw(page).text((4, 2), f"page {number}", fill="black")
        pages.append(page)
    return pages


def pdf_of(pages: list[Image.Image], resolution: float = 72.0) -> bytes:
    """A PDF with one page per image (Pillow's writer); at 72 dpi a page is as many points as pixels."""
    buf = io.BytesIO()
    pages[0].save(buf, format="PDF", save_all=True, append_images=pages[1:], resolution=resolution)
    return buf.getvalue()


def render_pages(pdf: bytes, dpi: int, pages: list[int] | None = None) -> list[Image.Image]:
    """The pages (zero-based; None: all) as pypdfium2 renders them at ``dpi``, as the server does."""
    import pypdfium2 as pdfium

    document = pdfium.PdfDocument(pdf)
    numbers = range(len(document)) if pages is None else pages
    return [document[i].render(scale=dpi / 72, rev_byteorder=True, may_draw_forms=False).to_pil().convert("RGB")
            for i in numbers]


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def handmade_pdf(media_box: str = "0 0 200 200", content: bytes = b"", extra_objects: list[bytes] = (),
                 trailer_extra: bytes = b"", page_extra: bytes = b"") -> bytes:
    """A one-page PDF written object by object, with a correct cross-reference table: for files
    no writer would make (a page kilometres wide, an /Encrypt entry, objects nested deep)."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [" + media_box.encode() + b"] /Contents 4 0 R " + page_extra + b">>",
               b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
               *extra_objects]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R " % (len(objects) + 1) + trailer_extra + b">>\n"
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def encrypted_pdf() -> bytes:
    """A PDF whose standard security handler wants a user password (none given opens nothing)."""
    encrypt = (b"<< /Filter /Standard /V 1 /R 2 /P -4 /O <" + b"11" * 32 + b"> /U <" + b"22" * 32 + b"> >>")
    return handmade_pdf(extra_objects=[encrypt], trailer_extra=b"/Encrypt 5 0 R /ID [<00112233445566778899aabbccddeeff> "
                                                               b"<00112233445566778899aabbccddeeff>] ")


def huge_page_pdf() -> bytes:
    """A page 14,400,000 points (about 5 km) square: billions of pixels at any dpi."""
    return handmade_pdf(media_box="0 0 14400000 14400000", content=b"0 0 1 rg 0 0 100 100 re f")


def deeply_nested_pdf(depth: int = 100_000) -> bytes:
    """A page whose resources are arrays nested ``depth`` deep (a parser that recurses overflows)."""
    nested = b"[" * depth + b"]" * depth
    return handmade_pdf(extra_objects=[nested], content=b"0 0 1 rg 0 0 100 100 re f", page_extra=b"/Resources 5 0 R ")


def many_pages_pdf(count: int) -> bytes:
    return pdf_of([Image.new("RGB", (20, 20), "white")] * count)
