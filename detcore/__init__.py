"""detcore: the shared detection core (data, views, dense detectors, outputs, evaluation).

Imports nothing heavy at package import; import the submodules you need.
"""
