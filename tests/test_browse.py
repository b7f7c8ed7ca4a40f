"""The latent browser: statistics against brute force, the site in a real browser, bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from batchtopk.cache.format import Cache
from batchtopk.cache.split import heldout_sequences, keep_mask
from batchtopk.core.errors import PipelineError
from batchtopk.evaluate.browse import build
from batchtopk.evaluate.settings import BrowseSettings
from batchtopk.harvest.run import harvest
from batchtopk.harvest.settings import HarvestSettings
from batchtopk.train.sae import load_sae
from batchtopk.train.settings import TrainSettings
from batchtopk.train.trainer import Trainer

SITE = "blocks.2.hook_resid_pre"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models, corpus_file):
    tmp = tmp_path_factory.mktemp("browse")
    loc = harvest(HarvestSettings(model=str(tiny_models["llama"]), layers=[2], dataset=str(corpus_file),
                                  tokens=256 * 32, ctx_len=32, dtype="float16", device="cpu", batch_size=16,
                                  chunk_mb=0.05, cache_root=str(tmp / "cache")))
    dirs = Trainer(TrainSettings(cache=loc, out=str(tmp / "run"), batch_size=512, tokens=512 * 30, lr=1e-3,
                                 saes=[{"arch": "batchtopk", "d_sae": 128, "k": 4}, {"arch": "topk", "d_sae": 128, "k": 4}],
                                 device="cpu", val_fraction=0.25, pipeline="tiny")).run()
    dirs += Trainer(TrainSettings(cache=loc, out=str(tmp / "interleaved"), batch_size=512, tokens=512 * 10, lr=1e-3,
                                  saes=[{"arch": "batchtopk", "d_sae": 128, "k": 4}], device="cpu",
                                  val_fraction=0.25, heldout="interleaved", pipeline="tiny")).run()
    return loc, dirs


def read_js(path: Path, prefix: str) -> dict:
    text = path.read_text().strip()
    assert text.startswith(prefix)
    return json.loads(text[len(prefix):].rstrip(");").rstrip(";").rstrip(")"))


@pytest.mark.parametrize("which", [0, 1, 2])  # BatchTopK, TopK (one run, tail), BatchTopK with an interleaved held-out part
def test_statistics_and_top_contexts_equal_brute_force(trained, tmp_path, which):
    loc, dirs = trained
    index = build(BrowseSettings(sae=str(dirs[which]), out=str(tmp_path / "site")))
    assert index == tmp_path / "site" / "index.html" and index.exists()
    idx = read_js(index.parent / "data" / "index.js", "window.BROWSER_INDEX = ")
    sae, meta = load_sae(dirs[which])
    cache = Cache.open(loc)
    held = np.array(heldout_sequences(meta["metadata"]))
    # the sequences evaluation reads: every other one of the held-out part (the rest calibrated θ)
    assert held[-1] == cache.n_sequences - 1 and len(held) > 25 and (np.diff(held) == (8 if which == 2 else 2)).all()
    rows, ids = [], []
    for c in range(cache.n_chunks):  # every held-out, non-BOS, non-outlier row
        r0, r1 = cache.row_range(c)
        keep = keep_mask(cache, c, int(cache.tokens[0, 0]), cache.outliers(SITE)[0])
        rid = r0 + np.flatnonzero(keep)
        mine = np.isin(rid // cache.ctx_len, held)
        rows.append(cache.read_rows(SITE, r0, r1)[keep][mine])
        ids.append(rid[mine])
    x, ids = torch.from_numpy(np.concatenate(rows)), np.concatenate(ids)
    with torch.no_grad():
        f = sae.encode(x, "threshold").numpy()
    assert idx["tokens"] == len(x) and idx["d_sae"] == 128
    fired = (f > 0).sum(0)
    np.testing.assert_allclose(idx["freq"], fired / len(x), rtol=1e-3, atol=1e-7)  # 4 significant digits
    checked = 0
    for lat in np.argsort(-fired)[:5].tolist() + [int(np.argmin(np.where(fired > 0, fired, 10 ** 9)))]:
        col = f[:, lat]
        assert idx["mean"][lat] == pytest.approx(col[col > 0].mean(), rel=2e-3)
        assert idx["max"][lat] == pytest.approx(col.max(), rel=2e-3)
        data = read_js(index.parent / "data" / "latents" / f"{lat}.js", "window.latentLoaded(")
        order = np.argsort(-col, kind="stable")[: min(20, int((col > 0).sum()))]
        got = [(c["row"], c["a"][c["at"]]) for c in data["top"]]
        assert [r for r, _ in got] == ids[order].tolist() or \
            np.allclose(sorted(v for _, v in got), sorted(col[order]), rtol=5e-3)  # ties may swap rows
        np.testing.assert_allclose([v for _, v in got], col[order], rtol=5e-3)  # 3 significant digits
        # every shaded token of a context carries that row's activation of this latent
        for c in data["top"][:3]:
            a = c["row"] - c["at"]
            for j, v in enumerate(c["a"]):
                r = a + j
                want = col[ids == r][0] if (ids == r).any() else float(sae.encode(
                    torch.from_numpy(cache.read_rows(SITE, r, r + 1)), "threshold")[0, lat])
                assert v == pytest.approx(want, rel=5e-3, abs=1e-6)
        assert sum(data["hist"]["counts"]) == fired[lat]
        assert len(data["up"]) == len(data["down"]) == 12 and data["up"][0][1] > data["down"][0][1]
        checked += 1
    assert checked == 6
    summary = json.loads((index.parent / "data" / "summary.json").read_text())
    assert summary["alive"] == int((fired > 0).sum()) and summary["site_bytes"] > 0


def _chromium() -> str | None:
    """The system's Chromium, installed with apt-get where that can be done (root, network)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found or not shutil.which("apt-get") or os.geteuid() != 0:
        return found
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        if subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode != 0:
            return None
    return shutil.which("chromium")


@pytest.mark.slow
def test_site_works_in_a_real_browser(trained, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium here, and apt-get could not install Debian's chromium package")
    _, dirs = trained
    index = build(BrowseSettings(sae=str(dirs[0]), out=str(tmp_path / "site")))
    idx = read_js(index.parent / "data" / "index.js", "window.BROWSER_INDEX = ")
    problems = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(index.as_uri())
        rows = page.locator("#latents tbody tr")
        alive = sum(f > 0 for f in idx["freq"])
        assert rows.count() == min(100, alive) and alive > 0
        # search: a token that appears in some latent's top contexts, but not in all of them
        postings = read_js(index.parent / "data" / "search.js", "window.searchLoaded(")
        word, hits = next((idx["vocab"][int(t)].strip(), set(v)) for t, v in sorted(postings.items(), key=lambda kv: len(kv[1]))
                          if len(idx["vocab"][int(t)].strip()) >= 4 and 0 < len(v) < alive)
        page.fill("#search", word)
        page.wait_for_function(f"document.querySelector('#count').textContent.includes('{word}')")
        shown = {int(r.get_attribute("data-id")) for r in page.locator("#latents tbody tr").all()}
        assert 0 < len(shown) < min(100, alive) or len(shown) < alive
        matched = {i for t, v in postings.items() if word.lower() in idx["vocab"][int(t)].lower() for i in v}
        assert shown <= matched
        # open a latent: its contexts, with the tokens where it fires highlighted
        first = sorted(shown)[0]
        page.click(f"#latents tbody tr[data-id='{first}'] a")
        page.wait_for_selector("#top-contexts .context")
        assert page.locator("#latent-title").inner_text() == f"Latent #{first}"
        assert page.locator("#top-contexts .context").count() >= 1
        lit = page.locator("#top-contexts .tok[style*='background']")
        assert lit.count() >= 1 and float(lit.first.get_attribute("data-act")) > 0
        assert page.locator("#up li").count() == 12
        page.screenshot(path=str(tmp_path / "latent.png"))
        page.click("text=← all latents")
        page.wait_for_selector("#index-view:not([hidden])")
        browser.close()
    assert problems == []


def test_bad_input(trained, tmp_path):
    loc, dirs = trained
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PipelineError, match="not an SAE directory"):
        build(BrowseSettings(sae=str(empty)))
    gone = tmp_path / "gone"
    shutil.copytree(dirs[0], gone)
    cfg = json.loads((gone / "cfg.json").read_text())
    cfg["metadata"]["cache"] = str(tmp_path / "no-such-cache")
    (gone / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(PipelineError, match="no cache at .*no-such-cache"):
        build(BrowseSettings(sae=str(gone)))
    half = tmp_path / "half-cache"
    shutil.copytree(loc, half)
    import zarr
    zarr.open_group(str(half), mode="r+").attrs["complete"] = False
    cfg["metadata"]["cache"] = str(half)
    (gone / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(PipelineError, match="incomplete"):
        build(BrowseSettings(sae=str(gone)))
    cfg["metadata"]["cache"] = loc
    cfg["metadata"]["hook_name"] = "blocks.3.hook_resid_post"
    (gone / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(PipelineError, match="reads blocks.3.hook_resid_post, which cache .* does not hold"):
        build(BrowseSettings(sae=str(gone)))
