"""`python -m evaluate` (also `python -m batchtopk.evaluate`)."""
from batchtopk.evaluate.cli import main

main(prog_name="python -m evaluate")
