"""gradlab.hooks (see ../shared/API.md)."""
