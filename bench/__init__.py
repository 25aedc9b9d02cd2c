"""The ssehub benchmark suite: ``python -m bench`` (or ``make bench``)."""
