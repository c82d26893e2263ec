"""The documentation site builds without a warning, needs no network to be
read, stands alone, and documents every public name."""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import attrs
import pytest
from mkdocs.utils.yaml import yaml_load

import p2ptimeline
import p2ptimeline.testing

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PACKAGE = ROOT / "p2ptimeline"
_WINGS = (PACKAGE / "_dht", PACKAGE / "_p2p")

# Pages that must name modules as they are today. benchmarks.md is left out:
# it records measurements of the code of a given commit, in its words.
CURRENT_PAGES = sorted(set(DOCS.rglob("*.md")) - {DOCS / "benchmarks.md"})


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once with `mkdocs build --strict` (about 3 s)."""
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
def test_docs_build_strictly(site: Path) -> None:
    """`mkdocs build --strict` succeeds: no broken link or docstring reference."""
    assert (site / "index.html").exists()
    assert (site / "api" / "peer.html").exists()


class _Fetches(HTMLParser):
    """Collects what a page makes the browser fetch by itself, and the tags
    that make mkdocs-material fetch a script (Mermaid diagrams)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.mermaid = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if "mermaid" in (values.get("class") or "").split():
            self.mermaid += 1
        if tag == "link":
            # Every <link> but a plain hyperlink (rel="alternate", "canonical")
            # is fetched or connected to: stylesheet, preconnect, icon, ...
            rel = set((values.get("rel") or "").split())
            if rel - {"alternate", "canonical", "prev", "next"}:
                self.urls.append(values.get("href") or "")
        elif tag in {"script", "img", "iframe", "source"}:
            self.urls.append(values.get("src") or "")


_REMOTE_CSS = r"(?:@import|url\()\s*['\"]?(?:https?:)?//[^)'\";]*"


def _external(url: str) -> bool:
    return re.match(r"(?i)(https?:)?//", url.strip()) is not None


@pytest.mark.slow
def test_site_needs_no_network(site: Path) -> None:
    """No page loads a script, stylesheet, font or image from elsewhere (no
    CDN, no Google Fonts), and no page holds a Mermaid diagram, which
    mkdocs-material would render with a script fetched from a CDN."""
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 10
    for page in pages:
        parser = _Fetches()
        parser.feed(page.read_text(encoding="utf-8"))
        external = [url for url in parser.urls if _external(url)]
        assert external == [], f"{page.relative_to(site)} fetches {external}"
        assert parser.mermaid == 0, f"{page.relative_to(site)} has a Mermaid diagram"
    for sheet in site.rglob("*.css"):
        remote = re.findall(_REMOTE_CSS, sheet.read_text(encoding="utf-8"))
        assert remote == [], f"{sheet.relative_to(site)} fetches {remote}"


def test_site_browses_from_files(site: Path) -> None:
    """Opened as files (``site/index.html``, no server), every link between
    pages names an HTML file, not a directory."""
    links = re.findall(r'href="([^"#:]+)"', (site / "index.html").read_text())
    pages = [link for link in links if not link.endswith((".css", ".js", ".png"))]
    assert pages
    assert [link for link in pages if not link.endswith(".html")] == []


def test_mkdocs_config_fetches_nothing() -> None:
    """mkdocs.yml turns the theme's web fonts off and adds no remote script,
    stylesheet or Mermaid fence."""
    config = yaml_load((ROOT / "mkdocs.yml").read_text())
    assert config["theme"]["font"] is False
    extras = [*config.get("extra_javascript", []), *config.get("extra_css", [])]
    assert [e for e in extras if _external(str(e))] == []
    assert "mermaid" not in (ROOT / "mkdocs.yml").read_text()
    for page in DOCS.rglob("*.md"):
        assert "```mermaid" not in page.read_text(), page


def test_docs_stand_alone() -> None:
    """No page refers to a design document that is not in the repository."""
    for path in [*DOCS.rglob("*.md"), ROOT / "README.md", ROOT / "mkdocs.yml"]:
        assert "DESIGN.md" not in path.read_text(), path


def _anchors(site: Path) -> set[str]:
    found: set[str] = set()
    for page in (site / "api").rglob("*.html"):
        found.update(re.findall(r'id="(p2ptimeline\.[\w.]+)"', page.read_text()))
    return found


@pytest.mark.slow
def test_every_public_name_is_documented(site: Path) -> None:
    """Every name of `p2ptimeline.__all__` and `p2ptimeline.testing.__all__`
    has its entry in the API reference."""
    anchors = _anchors(site)
    names = [f"p2ptimeline.{n}" for n in p2ptimeline.__all__]
    names += [f"p2ptimeline.testing.{n}" for n in p2ptimeline.testing.__all__]
    assert [n for n in names if n not in anchors] == []


def test_api_index_lists_every_public_name() -> None:
    """The API reference's index page names every public name, so a reader
    finds the page of each."""
    index = (DOCS / "api" / "index.md").read_text()
    listed = set(re.findall(r"`([\w.]+)`", index))
    names = [*p2ptimeline.__all__, *p2ptimeline.testing.__all__]
    assert [n for n in names if n not in listed] == []


def test_api_reference_starts_with_peer() -> None:
    """The API reference is a section of pages, its index first, then `Peer`."""
    config = yaml_load((ROOT / "mkdocs.yml").read_text())
    section = next(e["API reference"] for e in config["nav"] if "API reference" in e)
    assert section[0] == "api/index.md"
    assert section[1] == {"Peer": "api/peer.md"}
    assert (DOCS / "api" / "peer.md").read_text().count(":::") == 1


_MODULE = re.compile(r"`(?:p2ptimeline/)?((?:_dht/|_p2p/)?_?[a-z][a-z_]*\.py)`")


@pytest.mark.parametrize("page", CURRENT_PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_pages_name_existing_modules(page: Path) -> None:
    """Every module a page names exists, so the docs follow the package when
    it moves: a path (`_dht/records.py`, `p2ptimeline/testing.py`), or a bare
    name from a table of one folder (`records.py`)."""
    names = set(_MODULE.findall(page.read_text()))
    assert sorted(n for n in names if not _module_exists(n)) == []


def _module_exists(name: str) -> bool:
    if "/" in name:
        return (PACKAGE / name).exists()
    return any((folder / name).exists() for folder in (PACKAGE, *_WINGS))


def _table_names(page: str, header: str) -> list[str]:
    """The names in the first column of the table whose header row starts
    with `header`."""
    lines = page.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    names = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        names.append(line.split("|")[1].strip().strip("`"))
    return names


@pytest.mark.parametrize(
    ("cls", "header"),
    [
        (p2ptimeline.PeerConfig, "| `PeerConfig` field"),
        (p2ptimeline.Limits, "| `Limits` argument"),
    ],
)
def test_operations_tables_every_setting(cls: type, header: str) -> None:
    """operations.md's configuration tables list exactly the fields of
    `PeerConfig` and `Limits`, in their order."""
    page = (DOCS / "operations.md").read_text()
    assert _table_names(page, header) == [f.name for f in attrs.fields(cls)]


_SETTING = re.compile(r"\b(PeerConfig|Limits)\.([a-z_]+)\b")


@pytest.mark.parametrize("page", CURRENT_PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_pages_name_existing_settings(page: Path) -> None:
    """Every `PeerConfig.x` or `Limits.x` a page names is a field of today's."""
    fields = {
        "PeerConfig": {f.name for f in attrs.fields(p2ptimeline.PeerConfig)},
        "Limits": {f.name for f in attrs.fields(p2ptimeline.Limits)},
    }
    named = set(_SETTING.findall(page.read_text()))
    assert sorted(f"{c}.{n}" for c, n in named if n not in fields[c]) == []


def _layout() -> dict[str, dict[str, str]]:
    """architecture.md's layout tables: for each folder of the package ("",
    "_dht", "_p2p"), each module's name and what its I/O column says."""
    tables: dict[str, dict[str, str]] = {}
    folder = None
    for line in (DOCS / "architecture.md").read_text().splitlines():
        heading = re.match(r"### .*`p2ptimeline/(\w*)/?`$", line)
        if heading:
            folder = heading[1]
            tables[folder] = {}
        elif folder is not None and line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            (name,) = re.findall(r"^`(\w+)\.py`", cells[0])
            tables[folder][name] = cells[-1]
        elif line.startswith("## "):
            folder = None
    return tables


def _pure_modules() -> list[str]:
    """The modules architecture.md's layout tables mark pure, as dotted names."""
    return [
        ".".join(filter(None, ["p2ptimeline", folder, name]))
        for folder, modules in _layout().items()
        for name, io in modules.items()
        if io == "pure"
    ]


def test_architecture_lists_every_module() -> None:
    """architecture.md's layout has one row per module of the package, in the
    folder it is in, and no row for a module that does not exist."""
    tables = _layout()
    assert sorted(tables) == ["", "_dht", "_p2p"]
    for folder, modules in tables.items():
        files = {f.stem for f in (PACKAGE / folder).glob("*.py")} - {"__init__"}
        assert sorted(modules) == sorted(files), folder


def test_pure_modules_import_no_io() -> None:
    """The modules architecture.md calls pure (models, hlc, both wires, records,
    tree, directory, ...) import neither asyncio nor socket, even indirectly."""
    pure = _pure_modules()
    named = ["_models", "_hlc", "_dht.records", "_dht.wire"]
    named += ["_p2p.wire", "_p2p.tree", "_p2p.directory"]
    assert {f"p2ptimeline.{m}" for m in named} <= set(pure)
    # The package's __init__ imports everything: stand a bare package in for it.
    program = (
        "import importlib, sys, types\n"
        "package = types.ModuleType('p2ptimeline')\n"
        f"package.__path__ = [{str(PACKAGE)!r}]\n"
        "sys.modules['p2ptimeline'] = package\n"
        f"for name in {pure!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted({'asyncio', 'socket'} & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
