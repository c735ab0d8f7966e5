"""Paper figure scripts (imported as ``toolkit.paper_figures``)."""
