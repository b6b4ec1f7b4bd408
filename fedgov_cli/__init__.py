"""The ``fedgov`` command line: the top layer, which may import every other package (README:
Layout)."""
