"""The real-corpus reader: sentence filtering on text written here, and a clear error for a missing package."""

from __future__ import annotations

import pytest

from ptmoe import corpora


def test_split_sentences_keeps_portuguese_prose_only():
    text = (
        "O guia explica como montar o sistema de arquivos com segurança. Ele também mostra\n"
        "como configurar a rede em poucos passos.\n\n"
        "$ mount -t ext4 /dev/sda1 /mnt\n\n"
        "This paragraph is written in English and should be dropped by the filter.\n\n"
        "Curto demais."
    )
    assert corpora.split_sentences(text) == [
        "O guia explica como montar o sistema de arquivos com segurança.",
        "Ele também mostra como configurar a rede em poucos passos.",
    ]


def test_unknown_corpus_names_the_choices():
    with pytest.raises(ValueError, match="focalinux"):
        corpora.load_real_corpus("wikipedia")


def test_missing_package_names_the_package(monkeypatch):
    missing = corpora.RealCorpus("x", "pacote-inexistente", "", "", "d", ("/nonexistent/dir/*.txt",), "utf-8")
    monkeypatch.setitem(corpora.REAL_CORPORA, "x", missing)
    with pytest.raises(FileNotFoundError, match="apt-get install pacote-inexistente"):
        corpora.load_real_corpus("x")
