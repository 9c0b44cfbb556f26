"""Package data read with :mod:`importlib.resources`: ImageNet-R/A class lists and the AlexNet ImageNet-C errors.

Sources are cited in ``README.md`` beside this file and in the ``source`` field of each JSON file.
"""
