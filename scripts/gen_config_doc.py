"""Regenerates the key table of docs/config.md from lmkv.config.describe() (run after adding a config key)."""

from __future__ import annotations

from pathlib import Path

from lmkv import config

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"
MARK = "| key | default | meaning |"


def main() -> None:
    text = DOC.read_text()
    head = text[: text.index(MARK)]
    rows = [MARK, "|---|---|---|"] + [f"| `{k}` | `{d}` | {doc} |" for k, d, doc in config.describe()]
    DOC.write_text(head + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
