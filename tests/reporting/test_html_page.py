"""The report's HTML page: self-contained (inline images, no URL), escaped, a table with its caption."""

from __future__ import annotations

import base64
from html.parser import HTMLParser

from distrag.reporting.html_page import Plot, data_uri, report_page

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells, self.imgs, self.attrs, self.data = [], [], [], []
        self._in_td = False

    def handle_starttag(self, tag, attrs):
        self.attrs += attrs
        if tag == "img":
            self.imgs.append(dict(attrs))
        if tag in ("td", "th"):
            self.cells.append((tag, dict(attrs).get("class"), ""))

    def handle_data(self, data):
        self.data.append(data)
        if self.cells and self.cells[-1][2] == "":
            tag, cls, _ = self.cells[-1]
            self.cells[-1] = (tag, cls, data)


def test_page_inlines_images_escapes_text_and_aligns_numbers():
    text = report_page(title="EM <&> cost", meta=["group 1234 <b>"], headers=["Strategy", "EM"],
                       cells=[["RAG-Tok <x>", "31.0"]], numeric=[False, True], caption="decoding=concat, k=5",
                       figures=[Plot("EM vs FLOPs", PNG, "caption & more")], notes=["note"])
    p = _Collect()
    p.feed(text)
    assert "<b>" not in text and "EM &lt;&amp;&gt; cost" in text and "RAG-Tok &lt;x&gt;" in text
    assert p.cells == [("th", None, "Strategy"), ("th", None, "EM"), ("td", None, "RAG-Tok <x>"), ("td", "num", "31.0")]
    assert "<caption>decoding=concat, k=5</caption>" in text
    (img,) = p.imgs
    assert img["alt"] == "EM vs FLOPs" and img["src"] == data_uri(PNG)
    assert base64.b64decode(img["src"].split(",", 1)[1]) == PNG
    assert not [v for k, v in p.attrs if k in ("src", "href") and not v.startswith("data:")]
    assert "http" not in text
