"""A harvest's settings, each declared once (its help text and command-line group)."""
from __future__ import annotations

from dataclasses import dataclass

from batchtopk.cache.format import STORAGE_DTYPES
from batchtopk.core.options import ADVANCED, int_list, parse_tokens, setting
from batchtopk.core.pipelines import DATA_DIR

from .corpus import SEPARATORS


@dataclass
class HarvestSettings:
    """What to harvest and how to store it. Pipelines spell `site_kinds` as `sites` and `dataset_config` as
    `config` (harvest.cli.settings_from)."""

    model: str = setting("smollm2-135m", "Alias (smollm2-135m, gpt2, gemma-2-2b), hub id, local folder or .gguf "
                         "file.")
    # None: the model alias's default layer, else the middle one
    layers: list[int] | None = setting(None, "Layer(s) to hook, e.g. 8 or 6,8,10 (default: the model's usual "
                                       "layer).", cli="layer", parse=int_list)
    site_kinds: list[str] = setting(help="resid_pre and/or resid_post.", cli=False,
                                    default_factory=lambda: ["resid_pre"])
    # full site names; override layers x site_kinds (the command line's --site takes either)
    sites: list[str] | None = setting(None, "resid_pre and/or resid_post (comma-separated), or full names like "
                                      "blocks.8.hook_resid_pre.", cli="site")
    dataset: str = setting("../shared/data/wikitext-2-raw/wiki.test.raw", "Hub dataset id, or a local "
                           ".txt/.jsonl/.parquet file or folder.")
    dataset_config: str | None = setting(None, "Hub dataset configuration, e.g. wikitext-2-raw-v1.")
    split: str | None = setting(None, "Dataset split (hub datasets).")
    text_column: str | None = setting(None, "Column holding the text (default: text).", group=ADVANCED)
    dataset_revision: str | None = setting(None, "Hub dataset revision.", group=ADVANCED)
    separator: str | None = setting(None, "Token between documents.", choices=SEPARATORS, group=ADVANCED)
    dataset_fallback: dict | None = setting(None, cli=False)  # a hub dataset for a missing local default
    tokens: int | None = setting(65536, "Tokens to cache (an integer, or 'all' for the whole corpus).",
                                 parse=parse_tokens, metavar="N|all")
    ctx_len: int = setting(128, "Tokens per context, BOS included.")
    dtype: str = setting("float16", "Storage precision.", choices=STORAGE_DTYPES)
    model_dtype: str = setting("auto", "Compute dtype.", choices=("auto", "float32", "bfloat16", "float16"),
                               group=ADVANCED)
    model_revision: str | None = setting(None, "Hub revision (branch, tag or commit) of the model.", group=ADVANCED)
    device: str | None = setting(None, "cuda, cuda:1 or cpu (default: CUDA when present).")
    batch_size: int = setting(32, "Sequences per forward pass.", group=ADVANCED)
    chunk_mb: float = setting(4.0, "Target size of one chunk in MiB.", group=ADVANCED)
    cache_root: str = setting(str(DATA_DIR / "cache"), "Root directory or URL under which caches live.")
    out: str | None = setting(None, "Explicit cache location (default: derived from the settings under the root).",
                              group=ADVANCED)
    wait: bool = setting(True, cli=False)  # wait for another writer of the same cache, or fail (--no-wait)
