"""Every committed result names where it came from: an installed ``lmlib`` and a clean, named commit
(issue 26: five manifests recorded ``lmlib: not installed`` and no git state, others a dirty tree)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "results"

# Made before the driver recorded provenance (or from a dirty tree); each leaves this list when re-run from a
# clean commit. The GPU rows wait for a GPU session. The list may only shrink: a listed manifest that is
# clean now fails the test, so that it is taken off.
LEGACY = {
    "hamedan-ceph/htc_gpu": "a GPU run: re-run in a session with a GPU",
    "hamedan-ceph/htc_gpu/half_head": "a GPU run: re-run in a session with a GPU",
    "hamedan-ceph/htc_gpu/quarter_head": "a GPU run: re-run in a session with a GPU",
}


def _problems(manifest: dict) -> list[str]:
    out = []
    if not manifest.get("git_commit"):
        out.append("no git commit")
    if manifest.get("git_dirty") is not False:
        out.append(f"git_dirty is {manifest.get('git_dirty')!r} (not a clean tree)")
    lmlib = (manifest.get("environment") or {}).get("lmlib")
    if not lmlib or lmlib == "not installed":
        out.append(f"lmlib {lmlib or 'missing'}")
    return out


MANIFESTS = sorted(RESULTS.glob("**/manifest.json"))


@pytest.mark.skipif(not MANIFESTS, reason="no committed results")
def test_every_committed_result_comes_from_a_clean_named_commit() -> None:
    found = {str(p.parent.relative_to(RESULTS)): _problems(json.loads(p.read_text(encoding="utf-8")))
             for p in MANIFESTS}
    unexplained = {k: v for k, v in found.items() if v and k not in LEGACY}
    assert not unexplained, f"results without provenance (re-run them from a clean commit): {unexplained}"
    fixed = [k for k in LEGACY if k in found and not found[k]]
    assert not fixed, f"clean now: take these off LEGACY in {Path(__file__).name}: {fixed}"


SYNTHETIC_RUNS = sorted(p.parent for d in ("synthetic2d", "synthetic3d") for p in (RESULTS / d).glob("**/metrics.json"))


@pytest.mark.parametrize("folder", [f for f in SYNTHETIC_RUNS if int(json.loads((f / "metrics.json").read_text(
    encoding="utf-8")).get("epochs") or 0) > 0], ids=lambda f: f.relative_to(RESULTS).as_posix())
def test_committed_synthetic_runs_beat_the_mean_shape(folder: Path) -> None:
    """Every committed trained row on the phantoms (the default profile of each notebook) is at least a third below
    the mean-shape row of its set: the notebooks' accuracy, asserted where it was measured (a smoke run in the
    notebook tests trains 2 epochs and checks the plumbing)."""
    dataset = folder.relative_to(RESULTS).parts[0]
    mean_shape = json.loads((RESULTS / dataset / "reference" / "mean_shape" / "metrics.json").read_text())["mre_mm"]
    mre = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))["mre_mm"]
    assert mre < 2 / 3 * mean_shape, f"{mre:.2f} mm vs the mean shape's {mean_shape:.2f} mm"


def _openblas_avx512() -> bool:
    """Whether OpenBLAS picks its AVX-512 kernels here (an AVX-512 CPU, no OPENBLAS_CORETYPE set)."""
    import os

    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return "avx512f" in flags and not os.environ.get("OPENBLAS_CORETYPE")


@pytest.mark.parametrize("dataset", ["synthetic2d", pytest.param("synthetic3d", marks=pytest.mark.xfail(
    _openblas_avx512(), strict=False, reason="known gap: the 3D phantoms pass small products and a QR decomposition "
    "through OpenBLAS, whose AVX-512 kernels round differently (docs/explanation/data.md); passes with "
    "OPENBLAS_CORETYPE=Haswell"))])
def test_the_committed_data_checksum_of_a_generated_set_reproduces(dataset: str) -> None:
    """A generated set gives the bits its committed rows were trained on (the mean-shape row records train + test),
    here and on any other machine (tests/test_deform.py holds the generation to that across BLAS kernels)."""
    from lmlib.engine.runner import load_run_data
    from lmlib.outputs.manifest import checksum_samples

    manifest = RESULTS / dataset / "reference" / "mean_shape" / "manifest.json"
    if not manifest.exists():
        pytest.skip(f"{manifest} not committed")
    data = load_run_data({"dataset": dataset})
    assert checksum_samples(data.split("train") + data.split("test")) == json.loads(manifest.read_text())["data_checksum"]


@pytest.mark.slow
@pytest.mark.realdata
def test_the_committed_afids_templates_rows_were_trained_on_the_posed_copies_made_today(shared_data: Path) -> None:
    """The posed copies are regenerated from their seeds by every run: each committed learned row's manifest records
    the checksum of its train + val + test samples, and today's generation gives the same bits (about a minute)."""
    from lmlib.engine.runner import load_run_data
    from lmlib.outputs.manifest import checksum_samples

    manifests = {p.parent.name: json.loads(p.read_text()) for p in (RESULTS / "afids-templates").glob("*/manifest.json")}
    # the learned rows (the registration row checksums train + test only)
    recorded = {k: m["data_checksum"] for k, m in manifests.items() if m.get("method") not in (None, "registration")}
    if not recorded:
        pytest.skip("no learned afids-templates row committed")
    data = load_run_data({"dataset": "afids-templates", "data_dir": str(shared_data / "afids-templates")})
    today = checksum_samples(data.split("train") + data.split("val") + data.split("test"))
    assert {k: v for k, v in recorded.items() if v != today} == {}, f"today's posed copies: {today}"
