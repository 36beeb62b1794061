"""The one report writer: a document as a list of blocks (headings, paragraphs, bullet lists, tables,
images, verbatim text), rendered as Markdown and as a self-contained HTML page (images embedded), so
the two always say the same thing. ``preftune compare`` and ``preftune demo`` write their reports with it.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Doc:
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: Sequence[str]) -> None:
        self.blocks.append(("ul", list(items)))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.blocks.append(("table", (list(header), [[str(c) for c in r] for r in rows])))

    def image(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", (path, alt)))

    def pre(self, text: str) -> None:
        self.blocks.append(("pre", text))

    def markdown(self, root: Path) -> str:
        out = []
        for kind, value in self.blocks:
            if kind == "h":
                out.append("#" * value[0] + " " + value[1])
            elif kind == "p":
                out.append(value)
            elif kind == "ul":
                out.append("\n".join(f"- {item}" for item in value))
            elif kind == "table":
                header, rows = value
                out.append("\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                                     + ["| " + " | ".join(c.replace("|", "\\|").replace("\n", " / ") for c in r) + " |"
                                        for r in rows]))
            elif kind == "img":
                out.append(f"![{value[1]}]({value[0].relative_to(root).as_posix()})")
            elif kind == "pre":
                out.append("```\n" + value.rstrip() + "\n```")
        return "\n\n".join(out) + "\n"

    def write(self, directory: str | Path, name: str, *, title: str) -> list[Path]:
        """Write ``NAME.md`` and ``NAME.html`` into ``directory`` (image paths are relative to it)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        md, page = directory / f"{name}.md", directory / f"{name}.html"
        md.write_text(self.markdown(directory), encoding="utf-8")
        page.write_text(self.html(title), encoding="utf-8")
        return [md, page]

    def html(self, title: str) -> str:
        body = []
        for kind, value in self.blocks:
            if kind == "h":
                body.append(f"<h{value[0]}>{html.escape(value[1])}</h{value[0]}>")
            elif kind == "p":
                body.append(f"<p>{_inline(value)}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in value) + "</ul>")
            elif kind == "table":
                header, rows = value
                head = "".join(f"<th>{_inline(c)}</th>" for c in header)
                cells = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
            elif kind == "img":
                data = base64.b64encode(value[0].read_bytes()).decode()
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(value[1])}">'
                            f"<figcaption>{html.escape(value[1])}</figcaption></figure>")
            elif kind == "pre":
                body.append(f"<pre>{html.escape(value)}</pre>")
        return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                f"<style>{_CSS}</style></head><body><main>\n" + "\n".join(body) + "\n</main></body></html>\n")


def _inline(text: str) -> str:
    """Markdown's **bold**, `code` and line breaks (/) in table cells, escaped for HTML."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"`(.+?)`", r"<code>\1</code>", out)
    return out.replace("\n", "<br>")


_CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,sans-serif;color:#222;background:#fafafa;margin:0}
main{max-width:1000px;margin:0 auto;padding:24px 32px;background:#fff}
h1{font-size:26px;margin-top:8px}h2{font-size:20px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:12px 0;font-size:14px}th,td{border:1px solid #ddd;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f0f0f0}td{white-space:pre-line}
figure{margin:12px 0}img{max-width:100%}figcaption{font-size:13px;color:#666}
pre{background:#f4f4f4;padding:10px;overflow-x:auto;font-size:13px}code{background:#f4f4f4;padding:0 3px}
"""
