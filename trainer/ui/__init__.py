"""``sdtrain ui``: a local web app over the code the command line uses (docs/ui.md).

The server (``server.py``) only calls the toolkit: the data scan of ``sdtrain data inspect``, recipe
loading and validation, ``sdtrain train`` in a subprocess. The browser only displays what it gets.
"""
