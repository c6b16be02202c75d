"""The README and the pages under docs/ document every config field and `run` flag, link only to what
exists, reach every docs page, name only real subcommands, and keep the README a short front page."""

import dataclasses
import re
import unicodedata
from pathlib import Path

from swarmloco.app.cli import build_parser
from swarmloco.config import RunConfig

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
DOC_TEXT = "\n".join(p.read_text() for p in PAGES)

FENCE = re.compile(r"^ {0,3}(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
SUBCOMMAND = re.compile(r"(?<![\w./-])swarmloco[ \t]+([a-z][\w-]*)")


def _split_fences(text: str) -> tuple[list[str], list[str]]:
    """(lines outside fenced code blocks, lines inside them)."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        (code if fenced else prose).append(line)
    return prose, code


def _links(page: Path) -> list[str]:
    """Targets of the Markdown links and images of a page, outside code blocks and inline code."""
    prose, _ = _split_fences(page.read_text())
    return [m.group(1) for line in prose for m in LINK.finditer(INLINE_CODE.sub("", line))]


def _relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) and not target.startswith("//")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lowercased, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LMN")
    return kept.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    prose, _ = _split_fences(page.read_text())
    seen: dict[str, int] = {}
    anchors = set()
    for line in prose:
        m = re.match(r"^ {0,3}#{1,6}[ \t]+(.*?)[ \t#]*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    anchors |= set(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", page.read_text()))
    return anchors


def broken_links(page: Path) -> list[str]:
    """The relative links of a page whose file, or whose heading in a .md file, does not exist."""
    broken = []
    for target in filter(_relative, _links(page)):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    return broken


def linked_pages(page: Path) -> set[Path]:
    """The files a page's relative links point to."""
    return {(page.parent / t.partition("#")[0]).resolve() for t in filter(_relative, _links(page))
            if t.partition("#")[0]}


def subcommands_in_code(text: str) -> set[str]:
    """Every `swarmloco WORD` written in a fenced code block."""
    _, code = _split_fences(text)
    return {m.group(1) for line in code for m in SUBCOMMAND.finditer(line)}


def _subparsers():
    return build_parser()._subparsers._group_actions[0].choices


def test_every_config_field_is_documented() -> None:
    cfg = RunConfig()
    missing = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        names = [x.name for x in dataclasses.fields(value)] if dataclasses.is_dataclass(value) else [f.name]
        missing += [n for n in names if f"`{n}`" not in DOC_TEXT]
    assert not missing, f"README.md and docs/*.md lack config fields: {missing}"


def test_every_run_flag_is_documented() -> None:
    run = _subparsers()["run"]
    flags = [opt for a in run._actions for opt in a.option_strings
             if opt.startswith("--") and a.help != "==SUPPRESS==" and opt not in ("--help",)]
    missing = [f for f in flags if f"`{f}" not in DOC_TEXT]
    assert not missing, f"README.md and docs/*.md lack run flags: {missing}"


def test_every_relative_link_reaches_an_existing_file_and_heading() -> None:
    broken = {str(p.relative_to(ROOT)): b for p in PAGES if (b := broken_links(p))}
    assert not broken, f"broken links: {broken}"


def test_every_docs_page_is_linked_from_the_readme_or_the_docs_index() -> None:
    index = DOCS / "README.md"
    from_readme = linked_pages(README)
    assert index.resolve() in from_readme, "README.md does not link docs/README.md"
    reachable = from_readme | linked_pages(index)
    orphans = [p.name for p in DOCS.glob("*.md") if p != index and p.resolve() not in reachable]
    assert not orphans, f"docs pages linked from neither README.md nor docs/README.md: {orphans}"


def test_every_swarmloco_command_in_a_code_block_is_a_real_subcommand() -> None:
    real = set(_subparsers())
    unknown = {p.relative_to(ROOT).as_posix(): sorted(bad) for p in PAGES
               if (bad := subcommands_in_code(p.read_text()) - real)}
    assert not unknown, f"code blocks name subcommands the CLI does not have ({sorted(real)}): {unknown}"


def test_readme_is_a_front_page_of_at_most_260_lines() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= 260, f"README.md has {lines} lines; move the deep material under docs/"


def test_link_and_command_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    """The helpers above flag a missing file, a missing heading and an unknown subcommand."""
    (tmp_path / "b.md").write_text("# Real heading\n\n```bash\n# Not a heading\n```\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#real-heading) [gone](c.md) [anchor](b.md#not-a-heading) "
                    "[web](https://example.com/x) `[code](nowhere.md)`\n"
                    "```bash\nswarmloco run x.toml\nswarmloco frobnicate\n[in code](nowhere.md)\n```\n")
    assert broken_links(page) == ["c.md (no such file)", "b.md#not-a-heading (no heading #not-a-heading in b.md)"]
    assert subcommands_in_code(page.read_text()) - set(_subparsers()) == {"frobnicate"}
    assert _slug("Hiding the communication: overlapped rounds and streaming fragments") == \
        "hiding-the-communication-overlapped-rounds-and-streaming-fragments"
    assert _slug("`hadtopk`: each peer's largest coefficients at 1 bit") == "hadtopk-each-peers-largest-coefficients-at-1-bit"
