"""The core layer under every stage: errors, distributed helpers, pipelines.yaml, CLI helpers, pointers."""
