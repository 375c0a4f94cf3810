"""Dataset cards: README.md (YAML front matter + text), LICENSE and preview.jpg, from a build's own records.

Everything is read from ``OUT/.facegen/run.json`` and ``OUT/.facegen/shards/*.json``, so a card can be
re-rendered at any time without rebuilding (``facegen card OUT``).
"""

from facegen.cards.card import CardFiles, card_data, rebuild_command, render_card, write_card
from facegen.cards.licenses import LicenceChain, LicenceInput, licence_chain

__all__ = ["CardFiles", "LicenceChain", "LicenceInput", "card_data", "licence_chain", "rebuild_command",
           "render_card", "write_card"]
