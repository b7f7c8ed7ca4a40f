"""Read a corpus through `datasets` (local files or a streamed hub dataset) and pack it into contexts.

Each context is BOS followed by the next ctx_len - 1 tokens of one continuous token stream.
Rows (documents) are joined with a separator token: none for line-based text files, where
a row is a line of one document, BOS otherwise (as SAELens does). The stream is fully
deterministic, so a resumed or distributed harvest sees exactly the same contexts.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from batchtopk.core.errors import PipelineError

BUILDERS = {".txt": "text", ".raw": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SEPARATORS = ("auto", "none", "bos", "eos")


@dataclass(frozen=True)
class CorpusSpec:
    name: str                      # local file/folder (absolute) or hub id
    config: str | None = None
    split: str = "train"
    text_column: str = "text"
    revision: str | None = None
    separator: str = "auto"
    files: tuple[str, ...] = field(default=())  # local files, sorted; empty for hub datasets

    @property
    def is_local(self) -> bool:
        return bool(self.files)

    @property
    def builder(self) -> str | None:
        return BUILDERS[Path(self.files[0]).suffix] if self.files else None

    def separator_kind(self) -> str:
        if self.separator != "auto":
            return self.separator
        return "none" if self.builder == "text" else "bos"

    def identity(self) -> dict[str, Any]:
        ident: dict[str, Any] = {"dataset": self.name, "text_column": self.text_column,
                                 "separator": self.separator_kind()}
        if self.is_local:
            h = hashlib.sha256()
            for f in self.files:
                h.update(Path(f).name.encode())
                h.update(bytes.fromhex(_sha256(Path(f))))
            ident["files_sha256"] = h.hexdigest()
        else:
            ident.update(config=self.config, split=self.split, revision=self.revision or "main")
        return ident


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def resolve_corpus(dataset: str, config: str | None = None, split: str | None = None,
                   text_column: str | None = None, revision: str | None = None,
                   separator: str | None = None, fallback: dict | None = None) -> CorpusSpec:
    """Local file/folder or hub id -> CorpusSpec. A missing local default may fall back to the hub."""
    sep = separator or "auto"
    if sep not in SEPARATORS:
        raise PipelineError(f"unknown separator {sep!r}; allowed: {', '.join(SEPARATORS)}")
    p = Path(dataset).expanduser()
    looks_local = p.exists() or dataset.startswith((".", "/", "~")) or p.suffix in BUILDERS
    if looks_local:
        if not p.exists():
            if fallback:
                return resolve_corpus(fallback["name"], fallback.get("config"), fallback.get("split"),
                                      fallback.get("text_column"), fallback.get("revision"),
                                      fallback.get("separator", "none"))
            raise PipelineError(f"dataset {dataset} does not exist; give a local .txt/.jsonl/.parquet file "
                                "or folder, or a hub dataset id")
        files = (sorted(str(f.resolve()) for f in p.rglob("*") if f.suffix in BUILDERS) if p.is_dir()
                 else [str(p.resolve())])
        if p.is_file() and p.suffix not in BUILDERS:
            raise PipelineError(f"dataset file {dataset} has an unsupported type {p.suffix!r}; "
                                f"allowed: {', '.join(sorted(BUILDERS))}")
        if not files:
            raise PipelineError(f"dataset folder {dataset} holds no {'/'.join(sorted(BUILDERS))} files")
        kinds = {BUILDERS[Path(f).suffix] for f in files}
        if len(kinds) > 1:
            raise PipelineError(f"dataset folder {dataset} mixes file types ({', '.join(sorted(kinds))}); use one")
        return CorpusSpec(str(p.resolve()), split="train", text_column=text_column or "text",
                          separator=sep, files=tuple(files))
    return CorpusSpec(dataset, config, split or "train", text_column or "text", revision, sep)


def iter_texts(spec: CorpusSpec) -> Iterator[str]:
    """Stream the text column, row by row, in a fixed order."""
    import datasets
    datasets.disable_progress_bars()
    try:
        if spec.is_local:
            kw = {"keep_linebreaks": True} if spec.builder == "text" else {}
            ds = datasets.load_dataset(spec.builder, data_files=list(spec.files), split="train", streaming=True, **kw)
        else:
            ds = datasets.load_dataset(spec.name, spec.config, split=spec.split, revision=spec.revision, streaming=True)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise PipelineError(f"cannot open dataset {spec.name!r} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0]})") from None
    first = True
    for row in ds:
        if first:
            if spec.text_column not in row:
                raise PipelineError(f"dataset {spec.name!r} has no column {spec.text_column!r}; "
                                    f"its columns are: {', '.join(row)} (choose one with --text-column)")
            first = False
        text = row[spec.text_column]
        if text:
            yield text


def iter_contexts(texts: Iterator[str], tokenizer, ctx_len: int, separator: str,
                  batch_rows: int = 512) -> Iterator[np.ndarray]:
    """Tokenise rows in batches and yield int32 contexts [BOS, t1, ..., t_{ctx_len-1}]."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise PipelineError("the tokenizer has neither a BOS nor an EOS token to start contexts with")
    sep_id = {"none": None, "bos": bos, "eos": tokenizer.eos_token_id}[separator]
    body = ctx_len - 1
    buf = np.empty(0, dtype=np.int32)

    def batches() -> Iterator[list[str]]:
        rows: list[str] = []
        for t in texts:
            rows.append(t)
            if len(rows) == batch_rows:
                yield rows
                rows = []
        if rows:
            yield rows

    for rows in batches():
        ids = tokenizer(rows, add_special_tokens=False)["input_ids"]
        parts = [buf]
        for seq in ids:
            if sep_id is not None and (len(parts) > 1 or len(buf)):
                parts.append(np.array([sep_id], dtype=np.int32))
            parts.append(np.asarray(seq, dtype=np.int32))
        buf = np.concatenate(parts)
        n = len(buf) // body
        for i in range(n):
            yield np.concatenate(([bos], buf[i * body:(i + 1) * body])).astype(np.int32)
        buf = buf[n * body:]
