"""encoders/export.py + encoders/onnx_runtime.py on the tiny checkpoint: the ONNX export of each encoder matches
torch (random and real preprocessed inputs, batches of 1, 2 and 5 through the dynamic batch axis), its manifest,
reuse and staleness rules, and the provider actually used.

Each encoder is exported once per module (~3-4 s each) into a copy of the shared checkpoint, so the session
fixture's directory never gains an ``onnx/`` folder.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from encoders import export as export_mod
from encoders.export import MANIFEST_FILE, MODEL_FILE, PARITY_TOLERANCE, ensure_onnx, example_input
from encoders.loader import load_preprocessor, load_torch_module
from encoders.onnx_runtime import OnnxRuntime
from tests.media import jpeg_bytes, png_bytes, wav_bytes

MODALITIES = ("image", "audio")
ORT_ATOL = 1e-4  # |ORT - torch| per element; the export measures ~5e-7 on these encoders


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def spec(tiny_model, tmp_path_factory):
    from models.spec import ModelSpec

    copy = tmp_path_factory.mktemp("onnx-model") / "demo-tiny"
    shutil.copytree(tiny_model, copy)
    return ModelSpec.from_dir(copy)


@pytest.fixture(scope="module")
def exported(spec):
    """modality -> model.onnx path, exported once for the module."""
    return {m: ensure_onnx(spec, m, progress=_quiet) for m in MODALITIES}


@pytest.fixture(scope="module")
def torch_modules(spec):
    return {m: load_torch_module(spec, m).eval() for m in MODALITIES}


@pytest.fixture(scope="module")
def ort(exported):
    return {m: OnnxRuntime(exported[m]) for m in MODALITIES}


def _torch(module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return module(x)


def _media(modality: str, n: int) -> list[bytes]:
    if modality == "image":
        return [(png_bytes if i % 2 else jpeg_bytes)(width=30 + 7 * i, height=25 + 5 * i, seed=i) for i in range(n)]
    return [wav_bytes(0.3 + 0.4 * i, seed=i) for i in range(n)]


# ---- export and manifest --------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", MODALITIES)
def test_export_lands_next_to_the_checkpoint_copy(spec, exported, tiny_model, modality):
    path = exported[modality]
    assert path == spec.path / "onnx" / modality / MODEL_FILE
    assert path.is_file() and path.stat().st_size > 0
    assert not (tiny_model / "onnx").exists()  # the shared session checkpoint is untouched


@pytest.mark.parametrize("modality", MODALITIES)
def test_manifest_records_fingerprint_and_parity(spec, exported, modality):
    manifest = json.loads((exported[modality].parent / MANIFEST_FILE).read_text())
    assert manifest["fingerprint"] == spec.fingerprint
    assert manifest["modality"] == modality
    assert manifest["tolerance"] == PARITY_TOLERANCE
    assert 0.0 <= manifest["max_abs_diff"] <= PARITY_TOLERANCE


# ---- parity with torch ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("modality", MODALITIES)
def test_ort_matches_torch_on_random_inputs(spec, ort, torch_modules, modality, batch):
    x = example_input(spec, modality, batch, seed=100 + batch)
    ref = _torch(torch_modules[modality], x)
    out = ort[modality].run(x)
    assert out.shape == ref.shape and out.shape[0] == batch
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=ORT_ATOL, rtol=0)


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("modality", MODALITIES)
def test_ort_matches_torch_on_real_media(spec, ort, torch_modules, modality, batch):
    pre = load_preprocessor(spec, modality)
    x = torch.stack([pre(data).data for data in _media(modality, batch)])
    ref = _torch(torch_modules[modality], x)
    assert ref.abs().max() > 0  # a real, non-degenerate output
    torch.testing.assert_close(ort[modality].run(x), ref, atol=ORT_ATOL, rtol=0)


def test_ort_rows_depend_on_their_own_input_only(spec, ort):
    # A batch of 5 is five independent rows: row 3 alone gives row 3 of the batch (and differs from row 0).
    x = example_input(spec, "image", 5, seed=7)
    full = ort["image"].run(x)
    torch.testing.assert_close(ort["image"].run(x[3:4]), full[3:4], atol=ORT_ATOL, rtol=0)
    assert not torch.allclose(full[0], full[3], atol=1e-3)


# ---- reuse and staleness --------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", MODALITIES)
def test_second_ensure_reuses_the_export(spec, exported, modality, monkeypatch):
    path = exported[modality]
    before = (path.stat().st_mtime_ns, path.stat().st_ino, (path.parent / MANIFEST_FILE).read_text())

    def no_export(*args, **kwargs):
        raise AssertionError("ensure_onnx re-exported a fresh export")

    monkeypatch.setattr(export_mod, "export", no_export)
    assert ensure_onnx(spec, modality, progress=_quiet) == path
    assert (path.stat().st_mtime_ns, path.stat().st_ino, (path.parent / MANIFEST_FILE).read_text()) == before


def test_another_fingerprint_triggers_a_reexport(spec, exported, caplog):
    """Audio is the cheaper encoder to export (~3 s). The stale manifest claims another checkpoint's fingerprint.
    The exporter's own chatter stays out of the logs (onnxscript and onnx_ir logged hundreds of INFO lines, one per
    rewrite rule and deduplicated initializer)."""
    path = exported["audio"]
    manifest_file = path.parent / MANIFEST_FILE
    stale = dict(json.loads(manifest_file.read_text()), fingerprint="0" * 64)
    manifest_file.write_text(json.dumps(stale))
    before = (path.stat().st_mtime_ns, path.stat().st_ino)

    calls = []
    real_export = export_mod.export

    def counting_export(*args, **kwargs):
        calls.append(args[1])
        return real_export(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.INFO):
        mp.setattr(export_mod, "export", counting_export)
        assert ensure_onnx(spec, "audio", progress=_quiet) == path
    chatter = [r for r in caplog.records if r.name.startswith(("onnxscript", "onnx_ir")) or r.name == "py.warnings"]
    assert not chatter, [r.getMessage() for r in chatter[:5]]

    assert calls == ["audio"]
    assert (path.stat().st_mtime_ns, path.stat().st_ino) != before
    fresh = json.loads(manifest_file.read_text())
    assert fresh["fingerprint"] == spec.fingerprint
    assert fresh["max_abs_diff"] <= PARITY_TOLERANCE
    # The re-export is usable and still matches torch.
    x = example_input(spec, "audio", 2, seed=9)
    torch.testing.assert_close(OnnxRuntime(path).run(x), _torch(load_torch_module(spec, "audio"), x),
                               atol=ORT_ATOL, rtol=0)


def test_missing_model_file_triggers_a_reexport(spec, exported, monkeypatch):
    # A manifest without its model file (an interrupted copy) is not fresh either; export is stubbed: only the
    # decision is under test here, the real re-export is covered above.
    manifest = exported["image"].parent / MANIFEST_FILE
    assert export_mod._fresh(exported["image"].parent, spec)
    calls = []
    monkeypatch.setattr(export_mod, "export", lambda s, m, target, progress: calls.append((m, target)))
    moved = exported["image"].with_suffix(".bak")
    exported["image"].rename(moved)
    try:
        ensure_onnx(spec, "image", progress=_quiet)
    finally:
        moved.rename(exported["image"])
    assert calls == [("image", exported["image"].parent)]
    assert manifest.exists()


# ---- providers ------------------------------------------------------------------------------------------------


def test_cpu_provider(exported):
    runtime = OnnxRuntime(exported["image"], threads=1)
    assert runtime.provider == "CPUExecutionProvider"
    assert runtime.session.get_providers() == ["CPUExecutionProvider"]


def test_cuda_request_falls_back_to_cpu_with_a_warning(exported, caplog):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: no fallback to observe")
    with caplog.at_level(logging.WARNING, logger="encoders.onnx_runtime"):
        runtime = OnnxRuntime(exported["image"], device="cuda:0")
    assert runtime.provider == "CPUExecutionProvider"
    warnings = [r for r in caplog.records if r.name == "encoders.onnx_runtime" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "CUDAExecutionProvider" in warnings[0].getMessage() and "CPU" in warnings[0].getMessage()


def test_cpu_request_logs_no_warning(exported, caplog):
    with caplog.at_level(logging.WARNING, logger="encoders.onnx_runtime"):
        OnnxRuntime(exported["audio"], device="cpu")
    assert not [r for r in caplog.records if r.name == "encoders.onnx_runtime" and r.levelno >= logging.WARNING]
