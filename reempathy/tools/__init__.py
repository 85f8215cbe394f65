"""Tools for working on reempathy itself (not for plugins): ``python -m reempathy.tools.apidoc`` renders docs/reference.md."""
