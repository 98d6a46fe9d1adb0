"""The pure text helpers of scripts/build_gpu_corpus.py, on small inline samples (no network)."""

import xml.etree.ElementTree as ET
import zipfile

import pytest

from scripts.build_gpu_corpus import (
    PIP_FILES,
    SphinxText,
    bible_chapter,
    cap_chars,
    help_docs,
    lang_code,
    mallard_blocks,
    man_text,
    ui_docs,
)


@pytest.mark.parametrize(
    ("tag", "code"),
    [
        ("pt_BR", "pt"),
        ("zh_CN", "zh"),
        ("sr@latin", "sr"),
        ("de-1996", "de"),
        ("zh-Hans", "zh"),
        ("C", "en"),
        ("yue", "yue"),
        ("zlm-Arab", "zlm"),
        ("ES", "es"),
    ],
)
def test_lang_code_keeps_the_primary_subtag(tag, code):
    assert lang_code(tag) == code


def test_lang_code_falls_back_for_undetermined_languages():
    assert lang_code("und", "013") == "013"
    assert lang_code("und-Latn") == "und"


def test_cap_chars_keeps_whole_groups_per_language_in_hash_order():
    docs = [("d", lang, f"g{i}", "x" * 10) for lang in ("a", "b") for i in range(10)]
    docs.append(("d", "a", "g0", "y" * 10))  # a second document of group g0
    kept = cap_chars(docs, 25)
    for lang in ("a", "b"):
        groups = {d[2] for d in kept if d[1] == lang}
        assert 2 <= len(groups) <= 3  # stops once 25 characters are reached
    if "g0" in {d[2] for d in kept if d[1] == "a"}:
        assert ("d", "a", "g0", "y" * 10) in kept  # never half a group
    assert kept == [d for d in docs if d in kept]  # source order kept
    assert cap_chars(docs, 25) == kept  # deterministic
    assert cap_chars(docs, 10**6) == docs


def test_bible_chapter_merges_continuations_and_drops_repeated_headings():
    out = (
        "A Psalm by David.\n  Psalms 3:1: Yahweh, how my adversaries have increased!\n"
        "Many rise up against me. \n\nA Psalm by David.\n  Psalms 3:2: Many say of my soul,\n"
        "Selah.\n\nA glossary after the last verse.\n(engWEB2015eb)\n"
    )
    assert bible_chapter(out, "Psalms", 3) == [
        "A Psalm by David.",
        "1 Yahweh, how my adversaries have increased! Many rise up against me.",
        "2 Many say of my soul, Selah.",
    ]
    spanish = "Revelation of John 22:21: La gracia de nuestro Señor Jesucristo <G5547> sea.\n"
    assert bible_chapter(spanish, "Revelation of John", 22) == [
        "21 La gracia de nuestro Señor Jesucristo sea."
    ]


PO = """msgid ""
msgstr "Content-Type: text/plain; charset=UTF-8\\n"

msgid "Name"
msgstr "Name"

#, fuzzy
msgid "Delete"
msgstr "Löschen"

msgid "%(count)d item"
msgid_plural "%(count)d items"
msgstr[0] "%(count)d Eintrag"
msgstr[1] "%(count)d Einträge"
"""


def test_ui_docs_reads_every_locale_and_skips_fuzzy_entries_and_copies(tmp_path):
    with zipfile.ZipFile(tmp_path / PIP_FILES["django==5.2.8"][0], "w") as wheel:
        for app in ("conf", "contrib/admin"):
            for locale in ("de", "en", "en_GB", "pt_BR"):
                wheel.writestr(f"django/{app}/locale/{locale}/LC_MESSAGES/django.po", PO)
    docs = ui_docs(tmp_path)
    assert [d[:3] for d in docs] == [
        ("ui", "de", "de/0"),
        ("ui", "en", "en/0"),
        ("ui", "pt", "pt_BR/0"),
    ]
    assert docs[0][3] == "Name\n%(count)d Eintrag\n%(count)d Einträge"  # each string once
    assert docs[1][3] == "Name\n%(count)d item\n%(count)d items"  # en: the msgids


def test_man_text_drops_the_running_header_and_footer():
    rendered = (
        "LS(1)        User Commands        LS(1)\n\n\n\nNAME\n       ls - list directory\n\n"
        "DESCRIPTION\n       List   information.\n\nGNU coreutils 9.1   2023   LS(1)\n"
    )
    assert man_text(rendered) == "NAME\nls - list directory\n\nDESCRIPTION\nList information."
    assert man_text("only a header\n") == ""


def test_mallard_blocks_reads_text_but_not_metadata():
    page = """<?xml version="1.0" encoding="utf-8"?>
<page xmlns="http://projectmallard.org/1.0/" id="print" xml:lang="de">
  <info><desc>Metadata</desc><credit><name>Translator</name></credit></info>
  <title>Dokumente   drucken</title>
  <steps><item><p>Wählen Sie <guiseq><gui>Datei</gui><gui>Drucken</gui></guiseq> oder
  drücken Sie <keyseq><key>Strg</key><key>P</key></keyseq>.</p></item></steps>
  <code>make
  install</code>
</page>"""
    assert mallard_blocks(ET.fromstring(page)) == [
        "Dokumente drucken",
        "Wählen Sie Datei ▸ Drucken oder drücken Sie Strg+P.",
        "make\n  install",
    ]


def test_sphinx_text_keeps_the_main_body_only():
    page = """<html><body><div class="sphinxsidebar"><p>Navigation</p></div>
<div class="body" role="main"><div class="section"><h1>os — Miscellaneous
<a class="headerlink" href="#os">¶</a></h1><p>This module   provides <code>os</code>.</p>
<pre>&gt;&gt;&gt; import os
    x = 1</pre></div></div><div class="footer"><p>Copyright</p></div></body></html>"""
    parser = SphinxText()
    parser.feed(page)
    parser.close()
    assert parser.blocks == [
        "os — Miscellaneous",
        "This module provides os.",
        ">>> import os\n    x = 1",
    ]


def help_page(*paragraphs: str) -> str:
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    return f'<page xmlns="http://projectmallard.org/1.0/" id="x"><title>T</title>{body}</page>'


def test_help_docs_drops_english_left_untranslated_in_a_translation(tmp_path):
    english = ["Open the menu and choose a file to print." * 3, "Untranslated paragraph. " * 10]
    pages = {"C": help_page(*english), "de": help_page("Öffnen Sie das Menü. " * 12, english[1])}
    pages["en_GB"] = pages["C"]  # a near-copy locale: left out
    for locale, page in pages.items():
        folder = tmp_path / "gedit-common/usr/share/help" / locale / "gedit"
        folder.mkdir(parents=True)
        (folder / "print.page").write_text(page, encoding="utf-8")
    docs = help_docs(tmp_path)
    assert [d[:2] for d in docs] == [("help", "en"), ("help", "de")]
    assert "Untranslated" in docs[0][3] and "Untranslated" not in docs[1][3]
    assert docs[1][3].startswith("Öffnen Sie das Menü.")
