"""`python -m docgen [--check]` (also `python -m batchtopk.docgen`; `python -m bench docs` is the old spelling)."""
from batchtopk.docgen.cli import main

main(prog_name="python -m docgen")
