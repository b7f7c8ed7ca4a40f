"""The docs tool: `make docs` renders the tables of README.md and docs/*.md from the JSON kept under docs/
(docgen/render.py)."""
