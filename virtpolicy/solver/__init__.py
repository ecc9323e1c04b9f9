"""Problem building, solving, explanation and rendering."""
