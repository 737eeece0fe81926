"""The documentation lists every recipe key a user can set, and every section the code cites exists."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from tests.conftest import REPO
from trainer.recipe import Recipe


def _keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        args = typing.get_args(kind)
        if dataclasses.is_dataclass(kind):
            yield from _keys(kind, f"{prefix}{field.name}.")
        elif args and dataclasses.is_dataclass(args[0]):
            yield f"{prefix}{field.name}"
            yield from _keys(args[0], f"{prefix}{field.name}[].")
        else:
            yield f"{prefix}{field.name}"


def test_every_recipe_key_is_documented():
    text = (REPO / "docs" / "recipes.md").read_text()
    missing = [key for key in _keys(Recipe) if f"`{key}`" not in text and f"`{key}`," not in text]
    assert not missing, f"docs/recipes.md does not describe: {missing}"


def _anchors(markdown: Path) -> set[str]:
    """The anchors GitHub gives the file's headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors, seen, in_code = set(), {}, False
    for line in markdown.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (heading := re.match(r"#{1,6} (.+)", line)):
            anchor = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            anchors.add(anchor if anchor not in seen else f"{anchor}-{seen[anchor]}")
            seen[anchor] = seen.get(anchor, 0) + 1
    return anchors


def _cited_files() -> list[Path]:
    sources = [*REPO.glob("trainer/**/*.py"), *REPO.glob("tests/*.py"), *REPO.glob("docs/*.md"), REPO / "README.md"]
    return [path for path in sources if path != Path(__file__).resolve()]


def test_every_cited_docs_section_exists():
    missing = []
    for path in _cited_files():
        text = path.read_text(encoding="utf-8")
        citations = re.findall(r"docs/([\w-]+\.md)#([\w-]+)", text)
        if path.parent.name == "docs":  # links between and within the docs
            citations += re.findall(r"\]\(([\w-]+\.md)#([\w-]+)\)", text)
            citations += [(path.name, anchor) for anchor in re.findall(r"\]\(#([\w-]+)\)", text)]
        for name, anchor in citations:
            target = REPO / "docs" / name
            if not target.is_file() or anchor not in _anchors(target):
                missing.append(f"{path.relative_to(REPO)}: docs/{name}#{anchor}")
    assert not missing, "cited sections that do not exist:\n" + "\n".join(missing)


def test_no_citation_points_outside_the_repository():
    # Notes outside the repository (e.g. "formats.md 2.1" meaning a shared reference file) are not the reader's.
    outside = re.compile(r"shared/reference|(formats|kohya)\.md \u00a7|(formats|kohya)\.md [0-9]")
    found = [f"{path.relative_to(REPO)}: {match.group(0)}" for path in _cited_files() for match in outside.finditer(path.read_text(encoding="utf-8"))]
    assert not found, found
