"""Real Portuguese text that Debian packages ship, read at benchmark time (never committed to this repository).

The sample data in `ptmoe/data/` is written by us and small (a few hundred sentences): enough for tests, too little
to show a quality difference between models. Benchmarks that claim quality read real Portuguese prose instead, from
free-licensed documents that Debian packages install on the machine::

    apt-get install focalinux-text fortunes-br debian-reference-pt-br

| name | package | what it is | licence | domain |
|---|---|---|---|---|
| `focalinux` | focalinux-text | Foca GNU/Linux guide (Brazilian Portuguese; ~300k words) | GNU FDL | `tecnico` |
| `fortunes` | fortunes-br | Brazilian fortune cookies: jokes, sayings, anecdotes | GPL-2+ | `humor` |
| `debian_reference` | debian-reference-pt-br | Debian Reference (Portuguese translation; ~100k words) | GPL-2+ | `referencia` |

The texts are read with their own encodings, re-flowed into sentences, and filtered to Portuguese prose: a sentence
is kept when it has at least `min_words` words, is mostly letters, and contains Portuguese function words (command
lines, English passages and tables are dropped). The result is deterministic for a given package version.
"""

from __future__ import annotations

import gzip
import random
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["REAL_CORPORA", "RealCorpus", "load_real_corpus", "real_domain_corpus", "split_sentences"]


@dataclass(frozen=True)
class RealCorpus:
    """One real Portuguese text source installed by a Debian package."""

    name: str
    package: str
    description: str
    licence: str
    domain: str
    files: tuple[str, ...]  # glob patterns (absolute)
    encoding: str
    record_separator: str | None = None  # fortune files separate records with a line holding "%"


REAL_CORPORA: dict[str, RealCorpus] = {
    corpus.name: corpus
    for corpus in (
        RealCorpus(
            name="focalinux",
            package="focalinux-text",
            description="Foca GNU/Linux guide, beginner/intermediate/advanced volumes (pt-BR)",
            licence="GFDL",
            domain="tecnico",
            files=("/usr/share/doc/focalinux/text/*/index.txt.gz",),
            encoding="latin-1",
        ),
        RealCorpus(
            name="fortunes",
            package="fortunes-br",
            description="Brazilian fortune cookies: jokes, sayings and anecdotes (pt-BR)",
            licence="GPL-2+",
            domain="humor",
            files=("/usr/share/games/fortunes/brasil",),
            encoding="utf-8",
            record_separator="%",
        ),
        RealCorpus(
            name="debian_reference",
            package="debian-reference-pt-br",
            description="Debian Reference, Portuguese translation",
            licence="GPL-2+",
            domain="referencia",
            files=("/usr/share/debian-reference/debian-reference.pt-br.txt.gz",),
            encoding="utf-8",
        ),
    )
}

# Frequent Portuguese function words; English and code almost never contain two of them.
_PORTUGUESE_WORDS = frozenset(
    "de que o a os as do da dos das em no na nos nas um uma para com não por se mais como mas ao é são foi "
    "ser está pelo pela seu sua também quando já ou".split()
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"“(\-–—]?[A-ZÀ-Ý])")
_WORD = re.compile(r"[A-Za-zÀ-ÿ]+")


def split_sentences(text: str, min_words: int = 6) -> list[str]:
    """Re-flow `text` (paragraphs separated by blank lines) and return its Portuguese prose sentences.

    Args:
        text (`str`): raw text; line breaks inside a paragraph are joined.
        min_words (`int`): shortest sentence kept, in words.
    """
    sentences = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        for sentence in _SENTENCE_END.split(flat):
            words = sentence.split()
            if len(words) < min_words:
                continue
            letters = sum(len(w) for w in _WORD.findall(sentence))
            if letters < 0.7 * len(sentence.replace(" ", "")):
                continue  # commands, paths, tables
            lowered = [w.lower() for w in _WORD.findall(sentence)]
            if sum(w in _PORTUGUESE_WORDS for w in lowered) < 2:
                continue  # English passages, headings
            sentences.append(sentence)
    return sentences


def _read(path: Path, encoding: str) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding=encoding, errors="replace") as handle:
        return handle.read()


def load_real_corpus(
    name: str, *, min_words: int = 6, max_sentences: int | None = None, seed: int | None = None
) -> list[str]:
    """Sentences of one real corpus from `REAL_CORPORA`, read from the files its Debian package installed.

    Args:
        name (`str`): a key of `REAL_CORPORA` (`"focalinux"`, `"fortunes"`, `"debian_reference"`).
        min_words (`int`): shortest sentence kept.
        max_sentences (`int`, *optional*): keep at most this many (a seeded sample when `seed` is given, else the
            first ones in reading order).
        seed (`int`, *optional*): shuffle the sentences with this seed before cutting to `max_sentences`.

    Raises:
        ValueError: unknown `name`. FileNotFoundError: the package is not installed (the message names it).
    """
    if name not in REAL_CORPORA:
        raise ValueError(f"unknown real corpus {name!r}: choose one of {sorted(REAL_CORPORA)}")
    corpus = REAL_CORPORA[name]
    paths = sorted(p for pattern in corpus.files for p in Path("/").glob(pattern.lstrip("/")))
    if not paths:
        raise FileNotFoundError(
            f"real corpus {name!r} is not installed: its files {list(corpus.files)} come with the Debian package "
            f"{corpus.package!r} (`apt-get install {corpus.package}`)"
        )
    sentences: list[str] = []
    for path in paths:
        text = _read(path, corpus.encoding)
        if corpus.record_separator is not None:
            records = re.split(rf"^{re.escape(corpus.record_separator)}\s*$", text, flags=re.MULTILINE)
            # A fortune is one short text: keep each record whole (re-flowed), not split into sentences.
            for record in records:
                # the attribution line ("-- Author") is not part of the text
                lines = [line.strip() for line in record.splitlines() if not line.strip().startswith("--")]
                flat = " ".join(" ".join(lines).split())
                if split_sentences(flat, min_words=min_words):  # at least one Portuguese prose sentence
                    sentences.append(flat)
        else:
            sentences.extend(split_sentences(text, min_words=min_words))
    # Duplicates (repeated notes, headers) would leak between train and validation splits.
    sentences = list(dict.fromkeys(sentences))
    if seed is not None:
        random.Random(seed).shuffle(sentences)
    return sentences[:max_sentences] if max_sentences is not None else sentences


def real_domain_corpus(
    names: list[str] | None = None, *, max_per_domain: int | None = None, seed: int = 0, min_words: int = 6
) -> list[dict[str, str]]:
    """Rows `{"text": sentence, "domain": domain}` from several real corpora, one domain each, seeded order.

    Args:
        names (`list[str]`, *optional*): corpora to read (default: all of `REAL_CORPORA`).
        max_per_domain (`int`, *optional*): cap per corpus, so that domains can be balanced.
        seed (`int`): sampling and shuffling seed.
        min_words (`int`): shortest sentence kept.
    """
    rows = []
    for name in names or sorted(REAL_CORPORA):
        domain = REAL_CORPORA[name].domain
        for sentence in load_real_corpus(name, min_words=min_words, max_sentences=max_per_domain, seed=seed):
            rows.append({"text": sentence, "domain": domain})
    random.Random(seed).shuffle(rows)
    return rows
