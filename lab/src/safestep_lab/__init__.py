"""The reproduction lab (distribution safestep-lab): bundled data, small models, training loops, the papers' experiments and the demos, on the public API of ``safestep`` (which never imports it)."""
