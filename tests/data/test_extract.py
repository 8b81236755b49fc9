"""Documents in (data/extract.py): text, Markdown, HTML and PDF give their text (a PDF's pages kept);
every file that has none is refused in one line naming it."""

import pytest
from conftest import pdf_bytes

from loraqa.data.examples import DataError
from loraqa.data.extract import MAX_BYTES, read_document


def test_text_markdown_and_html_give_their_text(tmp_path):
    (tmp_path / "a.txt").write_text("The mill was rebuilt in 1887.")
    (tmp_path / "a.md").write_text("# Mill\n\nThe mill was rebuilt in *1887*.")
    (tmp_path / "a.html").write_text("<html><head><title>t</title><script>var x = 'secret';</script></head>"
                                     "<body><h1>Mill</h1><p>The mill was rebuilt&nbsp;in 1887.</p><p>Two</p></body></html>")
    assert read_document(tmp_path / "a.txt").text == "The mill was rebuilt in 1887."
    assert "rebuilt in *1887*" in read_document(tmp_path / "a.md").text
    html = read_document(tmp_path / "a.html").text
    assert html == "Mill\n\nThe mill was rebuilt\xa0in 1887.\n\nTwo" and "secret" not in html


def test_a_pdf_gives_its_pages_and_where_each_begins(tmp_path):
    pytest.importorskip("pypdf")
    (tmp_path / "a.pdf").write_bytes(pdf_bytes(["The mill was rebuilt in 1887.", "The Muller family rebuilt it."]))
    doc = read_document(tmp_path / "a.pdf")
    assert doc.text == "The mill was rebuilt in 1887.\n\nThe Muller family rebuilt it."
    assert doc.page_of(doc.text.index("1887")) == 1 and doc.page_of(doc.text.index("Muller")) == 2
    assert doc.page_of(None) is None


def test_files_without_text_are_refused_in_one_line(tmp_path):
    pypdf = pytest.importorskip("pypdf")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n ")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)))
    (tmp_path / "a.docx").write_text("x")
    with open(tmp_path / "huge.txt", "wb") as f:  # sparse: 100 MB on the size, nothing on the disk
        f.truncate(100 << 20)
    blank = pypdf.PdfWriter()
    blank.add_blank_page(612, 792)
    blank.write(tmp_path / "scanned.pdf")
    locked = pypdf.PdfWriter()
    locked.add_blank_page(612, 792)
    locked.encrypt("secret")
    locked.write(tmp_path / "locked.pdf")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\nnot really")
    cases = {"empty.txt": "the file is empty", "blank.txt": "no text in it", "binary.txt": "not UTF-8 text",
             "a.docx": "unknown kind of file '.docx'", "huge.txt": f"over the {MAX_BYTES >> 20} MB",
             "scanned.pdf": "has no text layer", "locked.pdf": "encrypted", "broken.pdf": "not a readable PDF",
             "missing.txt": "cannot read"}
    for name, reason in cases.items():
        with pytest.raises(DataError, match=reason) as e:
            read_document(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value), name
