"""The repository is complete without anything beside it: every document the code and the
docs cite is in docs/, every cited section exists, and the layout table the engine is
built against is the one the engine computes.

Citations look like `btt-format.md §6.5`, `docs/namespaces.md §5.1`, `label-format.md
§3.2 rule 6`, `btt-format.md §6, §7.1` or `btt-format.md section 6.5`; a section exists
when a heading of that document starts with its number ("## 6. Flog", "### 6.5 …")."""
import errno
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
SOURCES = (".py", ".c", ".h", ".md")
SKIP_DIRS = {"__pycache__", "build", "dist", "var", "node_modules"}

NUMBER = r"(\d+(?:\.\d+)*)"
# A document name, optionally as a Markdown link or in backquotes, then the section.
CITATION = re.compile(r"(?<![\w/.-])(?:docs/)?([\w-]+\.md)`?(?:\]\([^)\s]*\))?"
                      r"\s+(?:§\s*|section\s+)" + NUMBER)
MORE = re.compile(r"\s*(?:,|and|or)\s*§\s*" + NUMBER)  # "…md §6, §7.1"
BARE = re.compile(r"§\s*" + NUMBER)
HEADING = re.compile(r"^#{1,6}\s+" + NUMBER + r"\.?\s", re.M)
MD_NAME = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w-]+\.md)\b")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def repo_files(suffixes=SOURCES):
    """Every source and document of the repository, wherever packages move to."""
    for dirpath, dirnames, files in os.walk(ROOT):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(files):
            if name.endswith(suffixes):
                yield os.path.join(dirpath, name)


def read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def rel(path):
    return os.path.relpath(path, ROOT)


def line_of(text, pos):
    return text.count("\n", 0, pos) + 1


def sections(doc_path):
    return set(HEADING.findall(read(doc_path)))


def citations(text):
    """(position, document, section, span) of every citation in text, lists expanded."""
    for m in CITATION.finditer(text):
        yield m.start(), m.group(1), m.group(2), (m.start(), m.end())
        end = m.end()
        while (more := MORE.match(text, end)):
            yield more.start(1), m.group(1), more.group(1), (more.start(), more.end())
            end = more.end()


def test_every_cited_section_exists():
    bad, seen = [], 0
    for path in repo_files():
        text = read(path)
        for pos, doc, section, _ in citations(text):
            seen += 1
            where = f"{rel(path)}:{line_of(text, pos)}"
            target = os.path.join(DOCS, doc)
            if not os.path.isfile(target):
                bad.append(f"{where}: {doc} §{section}: there is no docs/{doc}")
            elif section not in sections(target):
                bad.append(f"{where}: {doc} §{section}: docs/{doc} has no section {section}")
    assert seen > 30, f"only {seen} citations found: is the pattern still right?"
    assert not bad, "citations of missing documents or sections:\n" + "\n".join(bad)


def test_bare_section_numbers_in_docs_are_their_own():
    """A § without a document name, in a document, means a section of that document."""
    bad = []
    for path in [*repo_files((".md",))]:
        text = read(path)
        cited = [span for *_, span in citations(text)]
        own = sections(path)
        for m in BARE.finditer(text):
            if any(start <= m.start() < end for start, end in cited):
                continue
            if m.group(1) not in own:
                bad.append(f"{rel(path)}:{line_of(text, m.start())}: §{m.group(1)} is not a "
                           "section of this document (name the document it belongs to)")
    assert not bad, "\n".join(bad)


def resolves(name, from_dir):
    """A document name as the text gives it: a path (from the citing file or the root),
    or a bare name of a file in docs/ or at the root."""
    if "/" in name:
        return any(os.path.isfile(os.path.join(base, name)) for base in (from_dir, ROOT))
    return any(os.path.isfile(os.path.join(base, name)) for base in (DOCS, ROOT, from_dir))


def test_every_named_document_is_in_the_repository():
    """design notes kept beside the repository were cited by name; a clone lacks them."""
    bad = []
    for path in repo_files():
        text = read(path)
        for m in MD_NAME.finditer(text):
            if not resolves(m.group(1), os.path.dirname(path)):
                bad.append(f"{rel(path)}:{line_of(text, m.start())}: {m.group(1)}")
    assert not bad, "documents named but not in the repository:\n" + "\n".join(bad)


def test_nothing_points_beside_the_repository():
    needles = ("../" + "shared", "/work/" + "shared")
    found = [f"{rel(p)}: {n}" for p in repo_files() for n in needles if n in read(p)]
    assert not found, "\n".join(found)


def test_relative_links_resolve():
    bad = []
    for path in repo_files((".md",)):
        text = read(path)
        for m in LINK.finditer(text):
            target = m.group(1).split("#", 1)[0]
            if not target or re.match(r"[a-z]+:", target):
                continue  # an anchor, or a URL
            if not os.path.exists(os.path.join(os.path.dirname(path), target)):
                bad.append(f"{rel(path)}:{line_of(text, m.start())}: {m.group(1)}")
    assert not bad, "links to nothing:\n" + "\n".join(bad)


# ---- btt-format.md §9 against the engine ------------------------------------------------

UNITS = {"MiB": 1 << 20, "GiB": 1 << 30}
COLUMNS = ("ns_off", "external_nlba", "internal_nlba", "nfree", "dataoff", "mapoff",
           "logoff", "info2off", "nextoff")


def section_text(doc, number):
    text = read(os.path.join(DOCS, doc))
    start = re.search(r"^#{1,6}\s+" + re.escape(number) + r"\.?\s.*$", text, re.M)
    assert start, f"{doc} has no section {number}"
    end = re.compile(r"^#{1,6}\s", re.M).search(text, start.end())
    return text[start.end():end.start() if end else len(text)]


def table_9():
    """{(raw size, lbasize, version): None (rejected) or ([arena rows], capacity)}."""
    rows = [line for line in section_text("btt-format.md", "9").splitlines()
            if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header[:6] == ["raw size", "lbasize", "ver", "#arenas", "arena", "ns_off"]
    table, key = {}, None
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0]:
            number, unit = cells[0].split()
            key = (int(number) * UNITS[unit], int(cells[1]), cells[2])
            if cells[5] == "–":  # a rejected geometry: no arenas
                table[key] = None
                continue
            table[key] = ([], int(cells[-1]))
        table[key][0].append(tuple(int(c, 0) for c in cells[5:14]))
        assert int(cells[4]) == len(table[key][0]) - 1, line
    return table


def engine_layout(size, lbasize, version):
    from btt_core import compute_layout
    initial = 4096 if version == "1.1" else 0
    arenas = compute_layout(size - initial, lbasize)
    rows = [(initial + a["start"], *(a[c] for c in COLUMNS[1:])) for a in arenas]
    sector = 4096 if lbasize >= 4096 else 512
    return rows, sum(a["external_nlba"] for a in arenas) * sector


def test_section_9_table_is_what_the_engine_computes():
    from btt_core import BttError
    table = table_9()
    sizes = {4 << 20, 16 << 20, 1 << 30, 513 << 30, 1200 << 30}
    wanted = {(s, lb, v) for s in sizes for lb in (512, 4096) for v in ("1.1", "2.0")}
    assert set(table) == wanted, f"rows missing: {sorted(wanted - set(table))}, " \
                                 f"unexpected: {sorted(set(table) - wanted)}"
    wrong = []
    for (size, lbasize, version), expected in sorted(table.items()):
        if expected is None:
            with pytest.raises(BttError) as e:
                engine_layout(size, lbasize, version)
            assert e.value.errno == errno.ENXIO
        elif engine_layout(size, lbasize, version) != expected:
            wrong.append(f"{size} bytes, {lbasize}, v{version}: the engine computes "
                         f"{engine_layout(size, lbasize, version)}, the table says {expected}")
    assert not wrong, "\n".join(wrong)
