"""The reproduction lab: bundled data, small models, training loops and the demo (not imported by ``safestep``)."""
