"""Applications built on the library: the demo (``nonlocalnet demo``)."""
