"""A tiny document model for the study report, rendered twice: report.md (figures linked) and a self-contained
report.html (figures embedded)."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Doc:
    """Headings, paragraphs, tables and figures, in order; to_markdown and to_html render the same blocks."""

    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, headers: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", headers, rows))

    def img(self, path: Path, caption: str) -> None:
        if path.exists():
            self.blocks.append(("img", path, caption))

    def to_markdown(self, base: Path) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":
                out.append("| " + " | ".join(b[1]) + " |")
                out.append("|" + "---|" * len(b[1]))
                out += ["| " + " | ".join(r) + " |" for r in b[2]]
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1].relative_to(base).as_posix()})")
            out.append("")
        return "\n".join(out)

    def to_html(self, title: str) -> str:
        parts = [
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><main>",
        ]
        for b in self.blocks:
            if b[0] == "h":
                parts.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                parts.append(f"<p>{_inline(b[1])}</p>")
            elif b[0] == "table":
                head = "".join(f"<th>{_inline(h)}</th>" for h in b[1])
                body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b[2])
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif b[0] == "img":
                data = base64.b64encode(b[1].read_bytes()).decode()
                caption = html.escape(b[2])
                parts.append(
                    f"<figure><img alt='{caption}' src='data:image/png;base64,{data}'>"
                    f"<figcaption>{caption}</figcaption></figure>"
                )
        parts.append("</main></body></html>")
        return "\n".join(parts)


def _inline(text: str) -> str:
    """Escape, then the two bits of markdown the report uses: **bold** and `code`."""
    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


_CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#1d2330;background:#f6f7f9;margin:0}
main{max-width:1100px;margin:0 auto;padding:24px 32px;background:#fff}
h1{font-size:26px;border-bottom:3px solid #7b2d8b;padding-bottom:6px}h2{margin-top:34px;color:#5a1f66}\
h3{margin-top:22px}
table{border-collapse:collapse;margin:10px 0 18px;font-size:13.5px}\
th,td{border:1px solid #d9dce3;padding:4px 8px;text-align:right}
th{background:#f0edf3}td:first-child,th:first-child{text-align:left}tr:nth-child(even) td{background:#fafafc}
figure{margin:12px 0}img{max-width:100%;border:1px solid #e3e5ea}figcaption{font-size:12.5px;color:#5b6170}
code{background:#f1f1f4;padding:1px 4px;border-radius:3px}
"""
