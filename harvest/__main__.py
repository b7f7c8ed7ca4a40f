"""`python -m harvest` (also `python -m batchtopk.harvest`)."""
from batchtopk.harvest.cli import main

main(prog_name="python -m harvest")
