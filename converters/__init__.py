"""Format readers, writers and quantizers. Nothing here imports from ``exporter``: converters know formats, not the
pipeline that drives them."""
