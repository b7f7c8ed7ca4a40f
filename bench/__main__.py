"""`python -m bench` (also `python -m batchtopk.bench`)."""
from batchtopk.bench.cli import main

main(prog_name="python -m bench")
