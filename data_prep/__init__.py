"""Corpus building for bytelm: sources, dedupe, decontamination, split, BPE, shards.

`bytelm prepare` (data_prep/prepare.py) runs the stages in order; docs/data.md describes
the formats and the choices.
"""
