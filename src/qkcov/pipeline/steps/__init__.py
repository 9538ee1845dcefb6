"""One module per step of a run; :mod:`qkcov.pipeline.run` calls them in order."""
