"""The native CPU ops of ``csrc/``: :mod:`.build` compiles them (standard library only:
``setup.py`` loads it by path) and :mod:`.load` loads and calls them."""
