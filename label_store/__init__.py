"""label_store."""
