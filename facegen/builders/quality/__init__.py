"""Quality: the report, curation, identity embedding and selection, the domain-gap shift."""
