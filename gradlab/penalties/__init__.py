"""gradlab.penalties (see ../shared/API.md)."""
