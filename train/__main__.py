"""`python -m train` (also `python -m batchtopk.train`)."""
from batchtopk.core.memory import reexec_with_heap_settings

reexec_with_heap_settings()  # large tensors from the heap, reused (see core/memory.py)

from batchtopk.train.cli import main  # noqa: E402

main(prog_name="python -m train")
