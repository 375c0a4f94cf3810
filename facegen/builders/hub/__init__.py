"""The Hub side: publish a build, download a source's files, rebuild from a card."""
