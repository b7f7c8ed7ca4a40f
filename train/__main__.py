"""`python -m train` (also `python -m batchtopk.train`)."""
from batchtopk.train.cli import main

main(prog_name="python -m train")
